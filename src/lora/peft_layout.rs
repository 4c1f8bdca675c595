//! Adapters in peft's file layout: `base_model.model.<module>.lora_A.weight` `[r, in]` (`Aᵀ`),
//! `.lora_B.weight` `[out, r]` (`Bᵀ`), and for the experts of a transformers-5 mixture (3-D
//! parameters, peft's `target_parameters`) one adapter per parameter:
//!
//! ```text
//! mlp.experts.lora_A.weight  [experts · r, in]    row e·r + k      = A_e[k, :]
//! mlp.experts.lora_B.weight  [out, r · experts]   column k·experts + e = B_e[:, k]
//! ΔW_e = s · B_e A_e   (the outer wrapper is down_proj; gate_up_proj's sits inside it, its key
//!                       `mlp.experts.base_layer.lora_*` when both are adapted)
//! ```
//!
//! transformers fuses the experts' gate and up (`gate_up_proj`, gate's rows first) where mlx-lm
//! and loraforge keep two adapters: the two become one of rank `2r` whose `B_e` is
//! block-diagonal, `[[B_gate_e, 0], [0, B_up_e]]`, which gives both halves their own update
//! (`rank_pattern` and `alpha_pattern` record the rank and keep the scale).

use std::collections::BTreeMap;

use super::files::NamedTensors;
use super::stored::{HostAdapter, transpose};

/// peft's tensors and what its config must say of them.
pub struct PeftLayout {
    /// The tensors under peft's names.
    pub tensors: NamedTensors,
    /// Leaf names of the adapted modules (`q_proj`), as `target_modules`.
    pub modules: Vec<String>,
    /// The adapted experts' parameters (`mlp.experts.down_proj`), as `target_parameters`.
    pub parameters: Vec<String>,
    /// Each adapted module's rank by its `rank_pattern` key: the leaf name (`qkv_proj`, or
    /// `gate_up_proj` for the experts' fused gate and up), or the whole path where one leaf has
    /// two ranks.
    pub ranks: BTreeMap<String, usize>,
}

/// The experts' leaves loraforge and mlx-lm adapt (`switch_mlp.<leaf>`).
const GATE: &str = "gate_proj";
const UP: &str = "up_proj";
const DOWN: &str = "down_proj";

/// `adapters` (by module path, [`super::stored::canonical`] names) in peft's layout.
pub fn peft_layout(adapters: &BTreeMap<String, HostAdapter>) -> PeftLayout {
    let mut tensors = NamedTensors::new();
    let mut modules = Vec::new();
    let mut ranks = BTreeMap::new();
    // Per block's MLP (`model.layers.0.mlp`): its experts' adapters by leaf.
    let mut experts: BTreeMap<&str, BTreeMap<&str, &HostAdapter>> = BTreeMap::new();
    for (path, a) in adapters {
        if a.experts > 1
            && let Some((mlp, leaf)) = path.rsplit_once(".switch_mlp.")
        {
            experts.entry(mlp).or_default().insert(leaf, a);
            continue;
        }
        let prefix = format!("base_model.model.{path}");
        tensors.insert(
            format!("{prefix}.lora_A.weight"),
            (
                vec![a.rank, a.in_features],
                transpose(&a.a, a.in_features, a.rank),
            ),
        );
        tensors.insert(
            format!("{prefix}.lora_B.weight"),
            (
                vec![a.out_features, a.rank],
                transpose(&a.b, a.rank, a.out_features),
            ),
        );
        if let Some(m) = &a.magnitude {
            tensors.insert(
                format!("{prefix}.lora_magnitude_vector"),
                (vec![a.out_features], m.clone()),
            );
        }
        let leaf = path.rsplit('.').next().unwrap_or(path).to_string();
        // A leaf adapted at different ranks in different blocks is named by its whole path.
        match ranks.get(&leaf) {
            Some(&r) if r != a.rank => ranks.insert(path.clone(), a.rank),
            _ => ranks.insert(leaf.clone(), a.rank),
        };
        if !modules.contains(&leaf) {
            modules.push(leaf);
        }
    }
    let (mut has_gate_up, mut has_down) = (false, false);
    for (mlp, leaves) in &experts {
        let gate_up: Vec<&HostAdapter> = [GATE, UP]
            .iter()
            .filter_map(|l| leaves.get(l).copied())
            .collect();
        let down = leaves.get(DOWN).copied();
        let both = !gate_up.is_empty() && down.is_some();
        if let Some(d) = down {
            let name = format!("base_model.model.{mlp}.experts");
            insert_stacked(&mut tensors, &name, &[d], [0, d.out_features]);
            has_down = true;
        }
        if !gate_up.is_empty() {
            let wrapper = if both { ".base_layer" } else { "" };
            let name = format!("base_model.model.{mlp}.experts{wrapper}");
            // Each part's rows of the fused `[2 · width, in]` weight.
            let width = gate_up[0].out_features;
            let rows = match (leaves.contains_key(GATE), leaves.contains_key(UP)) {
                (true, true) => [0, 2 * width],
                (true, false) => [0, width],
                _ => [width, 2 * width],
            };
            insert_stacked(&mut tensors, &name, &gate_up, [rows[0], 2 * width]);
            ranks.insert("gate_up_proj".into(), gate_up.iter().map(|a| a.rank).sum());
            has_gate_up = true;
        }
    }
    let mut parameters = Vec::new();
    if has_gate_up {
        parameters.push("mlp.experts.gate_up_proj".into());
    }
    if has_down {
        parameters.push("mlp.experts.down_proj".into());
    }
    PeftLayout {
        tensors,
        modules,
        parameters,
        ranks,
    }
}

/// One experts' parameter's `lora_A` / `lora_B` under `name`, from `parts` (gate and up, or
/// down alone) whose updates land on consecutive rows from `rows[0]` of an `[rows[1], in]`
/// weight: `A_e` stacks the parts' `A`s, `B_e` is block-diagonal.
fn insert_stacked(
    tensors: &mut NamedTensors,
    name: &str,
    parts: &[&HostAdapter],
    [first_row, out]: [usize; 2],
) {
    let (experts, inp) = (parts[0].experts, parts[0].in_features);
    let rank: usize = parts.iter().map(|p| p.rank).sum();
    let mut a = vec![0f32; experts * rank * inp];
    let mut b = vec![0f32; out * rank * experts];
    for e in 0..experts {
        let (mut k0, mut row0) = (0, first_row);
        for p in parts {
            let (r, o) = (p.rank, p.out_features);
            let a_e = &p.a[e * inp * r..(e + 1) * inp * r];
            let b_e = &p.b[e * r * o..(e + 1) * r * o];
            for k in 0..r {
                for i in 0..inp {
                    a[(e * rank + k0 + k) * inp + i] = a_e[i * r + k];
                }
                for j in 0..o {
                    b[(row0 + j) * rank * experts + (k0 + k) * experts + e] = b_e[k * o + j];
                }
            }
            k0 += r;
            row0 += o;
        }
    }
    tensors.insert(
        format!("{name}.lora_A.weight"),
        (vec![experts * rank, inp], a),
    );
    tensors.insert(
        format!("{name}.lora_B.weight"),
        (vec![out, rank * experts], b),
    );
}
