//! `loraforge inspect PATH`: what a model file or folder holds.

use std::collections::BTreeMap;
use std::fmt::Write;

use anyhow::Result;

use crate::model::ModelFiles;
use crate::model::weights::WeightSource;
use crate::ops::rope::RopeScaling;

/// What the model at `path` holds, as text: format, architecture, parameters, RoPE, weight
/// dtypes and quantization, tokenizer.
pub fn report(path: &std::path::Path) -> Result<String> {
    let files = ModelFiles::open(path)?;
    let c = &files.config;
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "model         {}", path.display())?;
    if files.path != path {
        writeln!(w, "cached at     {}", files.path.display())?;
    }
    writeln!(w, "format        {}", files.format.describe())?;
    writeln!(
        w,
        "architecture  {} ({} layers, hidden {}, ffn {}, {} heads / {} kv heads, head_dim {})",
        c.family.name(),
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim
    )?;
    writeln!(
        w,
        "parameters    {} ({:.1} M)",
        c.parameter_count(),
        c.parameter_count() as f64 / 1e6
    )?;
    let rope = match &c.rope_scaling {
        RopeScaling::None => String::new(),
        RopeScaling::Linear { factor } => format!(", linear scaling x{factor}"),
        RopeScaling::Llama3 { factor, .. } => format!(", llama3 scaling x{factor}"),
        RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } => format!(
            ", LongRoPE (long factors past {original_max_position_embeddings} tokens, cos/sin x{attention_factor:.4})"
        ),
    };
    writeln!(
        w,
        "rope          theta {}{rope}; max positions {}",
        c.rope_theta, c.max_position_embeddings
    )?;
    writeln!(
        w,
        "embeddings    {}",
        if c.tie_word_embeddings {
            "tied to lm_head"
        } else {
            "separate lm_head"
        }
    )?;
    let mut quirks: Vec<String> = Vec::new();
    if c.family.fuses_projections() {
        quirks.push("fused qkv_proj and gate_up_proj".into());
    }
    if c.rotary_dim != c.head_dim {
        quirks.push(format!(
            "RoPE on {} of each head's {} dimensions",
            c.rotary_dim, c.head_dim
        ));
    }
    if c.attention_bias {
        quirks.push("q/k/v bias".into());
    }
    if c.qk_norm {
        quirks.push("q/k RMSNorm".into());
    }
    if let Some(moe) = &c.moe {
        let sparse = moe.sparse_layers.iter().filter(|&&s| s).count();
        let mut line = format!(
            "{} experts of ffn {}, top {} ({}) in {sparse} of {} layers",
            moe.experts,
            moe.expert_intermediate_size,
            moe.top_k,
            if moe.normalize_top_k {
                "weights renormalised"
            } else {
                "softmax weights"
            },
            c.num_layers
        );
        if let Some(shared) = moe.shared_expert_intermediate_size {
            line.push_str(&format!(", a sigmoid-gated shared expert of ffn {shared}"));
        }
        quirks.push(line);
    }
    let q = &c.quirks;
    if q.norm_plus_one {
        quirks.push("norms scale by 1 + w".into());
    }
    if q.sandwich_norms {
        quirks.push("norms after attention and MLP".into());
    }
    if q.activation == crate::ops::elementwise::Activation::GeluTanh {
        quirks.push("GeGLU (gelu tanh)".into());
    }
    if q.scale_embedding {
        quirks.push("embedding × √hidden".into());
    }
    if let Some(s) = q.query_pre_attn_scalar {
        // GGUF stores the scale in f32: 24 reads back as 23.999998.
        quirks.push(format!("scores / √{}", (s * 1e4).round() / 1e4));
    }
    if let Some(cap) = q.attn_softcap {
        quirks.push(format!("score soft-cap {cap}"));
    }
    if let Some(cap) = q.final_softcap {
        quirks.push(format!("logit soft-cap {cap}"));
    }
    if let Some(window) = q.sliding_window {
        let sliding = (0..c.num_layers).filter(|&i| q.slides(i)).count();
        quirks.push(format!(
            "sliding window {window} in {sliding} of {} layers",
            c.num_layers
        ));
    }
    if let Some((theta, _)) = q.local_rope {
        quirks.push(format!("sliding layers' rope theta {theta}"));
    }
    if !quirks.is_empty() {
        writeln!(w, "quirks        {}", quirks.join(", "))?;
    }
    match &files.weights {
        WeightSource::Gguf(g) => {
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for t in &g.tensors {
                *kinds.entry(t.kind.name()).or_default() += 1;
            }
            let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            writeln!(
                w,
                "dtype         GGUF v{} tensors: {}",
                g.version,
                kinds.join(", ")
            )?;
            writeln!(
                w,
                "quantization  {}",
                g.get_str("general.file_type")
                    .map(str::to_string)
                    .or_else(|| g
                        .get_u64("general.file_type")
                        .map(|t| format!("file type {t}")))
                    .unwrap_or_else(|| "see tensor types".into())
            )?;
        }
        WeightSource::Safetensors {
            store,
            quantization,
            ..
        } => {
            let mut dtypes: BTreeMap<&str, usize> = BTreeMap::new();
            for t in store.tensors() {
                *dtypes.entry(t.dtype.name()).or_default() += 1;
            }
            let dtypes: Vec<String> = dtypes.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            writeln!(
                w,
                "dtype         {} (stored: {})",
                c.dtype,
                dtypes.join(", ")
            )?;
            match quantization {
                None => writeln!(w, "quantization  none")?,
                Some(q) => {
                    writeln!(
                        w,
                        "quantization  affine {} bits, group size {}",
                        q.bits, q.group_size
                    )?;
                    for (module, setting) in &q.overrides {
                        match setting {
                            Some((g, b)) => {
                                writeln!(w, "  override    {module}: {b} bits, group {g}")?
                            }
                            None => writeln!(w, "  override    {module}: not quantized")?,
                        }
                    }
                }
            }
        }
        WeightSource::Random { seed } => writeln!(w, "dtype         random f32 (seed {seed})")?,
    }
    match crate::tokenizer::for_model(&files) {
        Ok(tok) => {
            writeln!(w, "tokenizer     {}, vocab {}", tok.kind, tok.vocab_size())?;
            let specials: Vec<String> = tok
                .special_tokens()
                .into_iter()
                .map(|(role, text, id)| {
                    format!(
                        "{role} {text:?} ({})",
                        id.map_or("?".into(), |i| i.to_string())
                    )
                })
                .collect();
            writeln!(w, "special       {}", specials.join(", "))?;
            writeln!(
                w,
                "chat template {}",
                if tok.chat_template.is_some() {
                    "yes"
                } else {
                    "no"
                }
            )?;
        }
        Err(e) => writeln!(w, "tokenizer     unavailable: {e:#}")?,
    }
    Ok(out)
}
