//! Adapters on parts of a fused linear (Phi-3's `q_proj` rows of `qkv_proj`) as files hold
//! them. mlx-lm's and transformers' models have only the fused linear, so the parts' adapters are
//! written as one adapter on it, of rank `Σ rᵢ`: `A` stacks the parts' `A`s, `B` is block-diagonal
//! and zero on the rows of parts without an adapter, which is the same update:
//!
//! ```text
//! ΔW_qkv = s · [B_q A_q; 0; B_v A_v] = s · B A     (peft's orientation, A: [r, in], B: [out, r])
//! A = [A_q; A_v]                       [2r, in]
//! B = [[B_q, 0], [0, 0], [0, B_v]]     [out_q + out_k + out_v, 2r]
//! ```
//!
//! Reading such a file into a model that adapts the parts splits it back; an adapter with
//! anything off those blocks was trained on the fused linear as a whole, and is refused there.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};

use super::stored::HostAdapter;
use crate::model::config::ModelConfig;
use crate::model::names::{self, BlockLinear};

/// A fused linear's module path and the path of each of its parts, in row order, with the rows
/// each part takes.
struct FusedPaths {
    fused: String,
    key: &'static str,
    parts: Vec<(String, usize)>,
}

/// Every fused linear of a model of `config` (none for families that keep projections apart).
fn fused_linears(config: &ModelConfig) -> Vec<FusedPaths> {
    if !config.family.fuses_projections() {
        return Vec::new();
    }
    let family = config.family;
    (0..config.num_layers)
        .flat_map(|i| {
            BlockLinear::FUSED
                .into_iter()
                .filter(|l| !l.parts().is_empty())
                .map(move |fused| {
                    let path = |l: BlockLinear| format!("{}.{}", names::block(i), l.key(family));
                    FusedPaths {
                        fused: path(fused),
                        key: fused.key(family),
                        parts: fused
                            .parts()
                            .iter()
                            .map(|&p| (path(p), p.shape(config)[0]))
                            .collect(),
                    }
                })
        })
        .collect()
}

/// `adapters` (by module path) with each fused linear's parts' adapters joined into one adapter
/// on the fused linear (see the module docs); the rest as they are.
pub fn join_parts(
    mut adapters: BTreeMap<String, HostAdapter>,
    config: &ModelConfig,
) -> Result<BTreeMap<String, HostAdapter>> {
    for f in fused_linears(config) {
        let parts: Vec<(Option<HostAdapter>, usize)> = f
            .parts
            .iter()
            .map(|(path, rows)| (adapters.remove(path), *rows))
            .collect();
        let adapted: Vec<&HostAdapter> = parts.iter().filter_map(|(a, _)| a.as_ref()).collect();
        let Some(first) = adapted.first() else {
            continue;
        };
        if adapters.contains_key(&f.fused) {
            bail!(
                "`{}` has an adapter and so do parts of it: adapt the fused linear or its parts, not both",
                f.fused
            );
        }
        if adapted.iter().any(|a| a.magnitude.is_some()) {
            bail!(
                "`{}`: DoRA on parts of a fused linear cannot be written for mlx-lm or peft; target `{}` instead",
                f.fused,
                f.key
            );
        }
        let (inp, scale) = (first.in_features, first.scale);
        let rank: usize = adapted.iter().map(|a| a.rank).sum();
        let out: usize = parts.iter().map(|(_, rows)| rows).sum();
        let mut a = vec![0f32; inp * rank];
        let mut b = vec![0f32; rank * out];
        let (mut k0, mut row0) = (0, 0);
        for (part, rows) in &parts {
            if let Some(p) = part {
                if p.scale != scale || p.in_features != inp || p.out_features != *rows {
                    bail!(
                        "`{}`: its parts' adapters differ in scale or shape from the model's parts (adapters for another base?)",
                        f.fused
                    );
                }
                for i in 0..inp {
                    a[i * rank + k0..i * rank + k0 + p.rank]
                        .copy_from_slice(&p.a[i * p.rank..(i + 1) * p.rank]);
                }
                for k in 0..p.rank {
                    b[(k0 + k) * out + row0..(k0 + k) * out + row0 + rows]
                        .copy_from_slice(&p.b[k * rows..(k + 1) * rows]);
                }
                k0 += p.rank;
            }
            row0 += rows;
        }
        adapters.insert(
            f.fused,
            HostAdapter {
                a,
                b,
                magnitude: None,
                in_features: inp,
                out_features: out,
                rank,
                scale,
                experts: 1,
            },
        );
    }
    Ok(adapters)
}

/// `adapters` read from `file` with a fused linear's adapter split into the adapters of its parts
/// where the model adapts the parts: `ranks` holds the rank of each adapted part by module path.
/// The inverse of [`join_parts`]; an adapter that is not block-diagonal over those parts is an
/// error naming it.
pub fn split_parts(
    mut adapters: BTreeMap<String, HostAdapter>,
    config: &ModelConfig,
    ranks: &BTreeMap<String, usize>,
    file: &Path,
) -> Result<BTreeMap<String, HostAdapter>> {
    for f in fused_linears(config) {
        let wanted: Vec<Option<usize>> =
            f.parts.iter().map(|(p, _)| ranks.get(p).copied()).collect();
        if wanted.iter().all(Option::is_none)
            || f.parts.iter().any(|(p, _)| adapters.contains_key(p))
        {
            continue;
        }
        let Some(joined) = adapters.remove(&f.fused) else {
            continue;
        };
        let rank: usize = wanted.iter().flatten().sum();
        let out: usize = f.parts.iter().map(|(_, rows)| rows).sum();
        // Trailing zero rank columns were dropped on reading as padding; they add nothing.
        let joined = match joined.rank < rank && joined.experts == 1 {
            true => joined.padded(rank),
            false => joined,
        };
        if joined.rank != rank || joined.out_features != out || joined.experts != 1 {
            bail!(
                "{}: `{}` holds one adapter of rank {} on the whole linear; this model adapts its parts ({}) at rank {rank} together: target `{}` itself, or use adapters trained on those parts",
                file.display(),
                f.fused,
                joined.rank,
                names_of(&f, &wanted),
                f.key,
            );
        }
        let inp = joined.in_features;
        let (mut k0, mut row0) = (0, 0);
        for ((path, rows), r) in f.parts.iter().zip(&wanted) {
            let block = |k: usize| &joined.b[k * out + row0..k * out + row0 + rows];
            // Every rank column that is not this part's must leave its rows untouched.
            let own = r.map_or(0..0, |r| k0..k0 + r);
            if let Some(k) =
                (0..rank).find(|k| !own.contains(k) && block(*k).iter().any(|v| *v != 0.0))
            {
                bail!(
                    "{}: `{}`'s adapter is not split by part (rank column {k} reaches the rows of `{path}`): it was trained on the whole linear; target `{}` instead of its parts",
                    file.display(),
                    f.fused,
                    f.key,
                );
            }
            if let Some(r) = *r {
                let a = (0..inp)
                    .flat_map(|i| joined.a[i * rank + k0..i * rank + k0 + r].iter().copied())
                    .collect();
                let b = (k0..k0 + r)
                    .flat_map(|k| block(k).iter().copied())
                    .collect();
                adapters.insert(
                    path.clone(),
                    HostAdapter {
                        a,
                        b,
                        magnitude: None,
                        in_features: inp,
                        out_features: *rows,
                        rank: r,
                        scale: joined.scale,
                        experts: 1,
                    },
                );
                k0 += r;
            }
            row0 += rows;
        }
    }
    Ok(adapters)
}

/// The parts of `f` with a rank in `wanted`, by their leaf names (`q_proj, v_proj`).
fn names_of(f: &FusedPaths, wanted: &[Option<usize>]) -> String {
    f.parts
        .iter()
        .zip(wanted)
        .filter(|(_, r)| r.is_some())
        .map(|((p, _), _)| p.rsplit('.').next().unwrap_or(p))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phi3() -> ModelConfig {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/phi3/config.json");
        ModelConfig::from_config_json(&path).unwrap()
    }

    fn adapter(inp: usize, out: usize, rank: usize, seed: f32) -> HostAdapter {
        let value = |i: usize| ((i as f32 + seed) * 0.37).sin();
        HostAdapter {
            a: (0..inp * rank).map(value).collect(),
            b: (0..rank * out).map(|i| value(i + 1000)).collect(),
            magnitude: None,
            in_features: inp,
            out_features: out,
            rank,
            scale: 2.0,
            experts: 1,
        }
    }

    /// q's and v's adapters joined on qkv_proj give each part's update on its rows and nothing on
    /// k's; split back, they are the adapters they were; a joined adapter that reaches k's rows
    /// is refused for a model that adapts q and v.
    #[test]
    fn parts_join_into_a_block_diagonal_adapter_and_split_back() {
        let c = phi3();
        let hd = c.hidden_size / c.num_heads;
        let (q_rows, kv_rows) = (c.num_heads * hd, c.num_kv_heads * hd);
        let p = "model.layers.1.self_attn";
        let (q, v) = (adapter(64, q_rows, 4, 0.0), adapter(64, kv_rows, 4, 7.0));
        let parts = BTreeMap::from([
            (format!("{p}.q_proj"), q.clone()),
            (format!("{p}.v_proj"), v.clone()),
        ]);
        let joined = join_parts(parts, &c).unwrap();
        let fused = &joined[&format!("{p}.qkv_proj")];
        assert_eq!(
            (joined.len(), fused.rank, fused.out_features),
            (1, 8, q_rows + 2 * kv_rows)
        );
        let delta = fused.delta();
        let (dq, dv) = (q.delta(), v.delta());
        assert_eq!(delta[..q_rows * 64], dq[..]);
        assert!(
            delta[q_rows * 64..(q_rows + kv_rows) * 64]
                .iter()
                .all(|x| *x == 0.0)
        );
        assert_eq!(delta[(q_rows + kv_rows) * 64..], dv[..]);

        let ranks = BTreeMap::from([(format!("{p}.q_proj"), 4), (format!("{p}.v_proj"), 4)]);
        let file = Path::new("adapters.safetensors");
        let split = split_parts(joined.clone(), &c, &ranks, file).unwrap();
        for (path, want) in [("q_proj", &q), ("v_proj", &v)] {
            let got = &split[&format!("{p}.{path}")];
            assert_eq!(
                (&got.a, &got.b, got.out_features),
                (&want.a, &want.b, want.out_features)
            );
        }
        let mut whole = joined;
        let fused = whole.get_mut(&format!("{p}.qkv_proj")).unwrap();
        fused.b[q_rows + 1] = 0.5; // rank column 0 (q's) reaching k's second row
        let err = split_parts(whole, &c, &ranks, file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("k_proj") && err.contains("self_attn.qkv_proj"),
            "{err}"
        );
    }

    /// Padding to a higher rank (mlx-lm's one rank) adds nothing and comes off again.
    #[test]
    fn padding_keeps_the_update_and_comes_off() {
        let a = adapter(16, 24, 3, 1.0);
        let padded = a.clone().padded(8);
        assert_eq!(padded.rank, 8);
        assert_eq!(padded.delta(), a.delta());
        let back = padded.unpadded();
        assert_eq!((back.rank, &back.a, &back.b), (3, &a.a, &a.b));
    }
}
