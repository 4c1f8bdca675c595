//! A GGUF file as llama.cpp's `convert_hf_to_gguf.py` writes it: llama.cpp tensor names, q/k
//! rows permuted for its RoPE (Llama family), norms and biases in F32, matrices in the chosen
//! type (a block type falls back to F16 for a row length not divisible by its block, 32 or 256, as llama.cpp
//! does), the architecture under `{arch}.*`, and the tokenizer with its chat template under
//! `tokenizer.*` (copied from a GGUF base, built from `tokenizer.json` otherwise).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value as J;

use super::fuse::{FusedModel, Survival};
use super::{ExportOptions, GgufType};
use crate::io::gguf::{GgmlType, Value};
use crate::io::gguf_write::{GgufTensor, write as write_gguf};
use crate::model::config::LONG_ROPE_FACTORS;
use crate::model::names::{Role, gguf_name};
use crate::model::weights::{WeightSource, qk_row_order};
use crate::ops::rope::Rope;
use crate::ops::rope::RopeScaling;
use crate::quant::ggml;
use crate::tokenizer::Tokenizer;

pub fn write(
    model: &FusedModel,
    tokenizer: &Tokenizer,
    opts: &ExportOptions,
    dir: &Path,
) -> Result<(Survival, String)> {
    let c = &model.files.config;
    let arch = c.family.gguf_arch();
    let kind = opts.gguf_type.ggml();
    let mut tensors = Vec::new();
    for spec in &model.specs {
        let name = gguf_name(&spec.name, c.family)
            .with_context(|| format!("no GGUF name for `{}`", spec.name))?;
        let blocks_fit = spec
            .shape
            .last()
            .is_some_and(|&n| n.is_multiple_of(kind.block().0));
        let tensor_kind = match (spec.is_matrix(), kind.block().0 > 1 && !blocks_fit) {
            (false, _) => GgmlType::F32,
            (true, true) => GgmlType::F16,
            (true, false) => kind,
        };
        tensors.push(GgufTensor {
            name,
            shape: spec.shape.clone(),
            kind: tensor_kind,
        });
    }
    // Vectors after the model's tensors: Llama 3's `rope_freqs`, or LongRoPE's factor lists.
    let extra = rope_vectors(model);
    for (name, values) in &extra {
        tensors.push(GgufTensor {
            name: name.to_string(),
            shape: vec![values.len()],
            kind: GgmlType::F32,
        });
    }
    let metadata = metadata(model, tokenizer, arch, opts.gguf_type)?;
    let permute = c.family.gguf_permutes_qk();
    // llama.cpp stores Gemma's norms as the gain `1 + w`.
    let plus_one = c.quirks.norm_plus_one;

    let mut survival = Survival::default();
    let progress = model.progress();
    let produce = |i: usize| -> Result<Vec<u8>> {
        progress.inc();
        let out = &tensors[i];
        let Some(spec) = model.specs.get(i) else {
            let (_, values) = &extra[i - model.specs.len()];
            return Ok(ggml::encode(GgmlType::F32, values));
        };
        let tensor = model.tensor(spec)?;
        let heads = match spec.role {
            Role::Weight(w) => w.permuted_heads(c),
            _ => None,
        };
        let is_norm = matches!(spec.role, Role::Norm(_) | Role::FinalNorm);
        let arrange = |values: &[f32]| match heads.filter(|_| permute) {
            Some(h) => permute_rows(values, spec.shape[0], h),
            None if is_norm && plus_one => values.iter().map(|v| v + 1.0).collect(),
            None => values.to_vec(),
        };
        let (rows, cols) = (spec.shape[0], spec.shape.iter().skip(1).product());
        let values = arrange(&tensor.values());
        let bytes = ggml::encode(out.kind, &values);
        if tensor.fused.is_some() {
            let base = arrange(&tensor.base_values());
            let encoded_base = ggml::decode(out.kind, rows, cols, &ggml::encode(out.kind, &base));
            let encoded = ggml::decode(out.kind, rows, cols, &bytes);
            survival.add(spec.module(), &base, &values, &encoded_base, &encoded);
        }
        Ok(bytes)
    };
    let file = dir.join(format!(
        "{}-{}.gguf",
        super::base_name(model.files),
        kind.name()
    ));
    write_gguf(&file, &metadata, &tensors, produce)?;
    progress.finish();
    Ok((survival, kind.name().to_string()))
}

/// HF row order → llama.cpp's (see [`qk_row_order`]).
fn permute_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let mut out = vec![0f32; values.len()];
    for (hf, gguf) in qk_row_order(rows, heads).into_iter().enumerate() {
        out[gguf * cols..(gguf + 1) * cols].copy_from_slice(&values[hf * cols..(hf + 1) * cols]);
    }
    out
}

/// The RoPE vectors llama.cpp reads as tensors: Llama 3's frequency scaling as `rope_freqs`
/// (divisors), LongRoPE's factor lists as `rope_factors_long` and `rope_factors_short`.
fn rope_vectors(model: &FusedModel) -> Vec<(&'static str, Vec<f32>)> {
    let c = &model.files.config;
    let f32s = |v: &[f64]| v.iter().map(|&f| f as f32).collect();
    match &c.rope_scaling {
        RopeScaling::Llama3 { .. } => {
            let plain = Rope::new(c.rotary_dim, c.rope_theta, &RopeScaling::None);
            let scaled = Rope::new(c.rotary_dim, c.rope_theta, &c.rope_scaling);
            let divisors = plain
                .inv_freq()
                .iter()
                .zip(scaled.inv_freq())
                .map(|(p, s)| p / s)
                .collect();
            vec![("rope_freqs.weight", divisors)]
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } => vec![
            (LONG_ROPE_FACTORS[0], f32s(long_factor)),
            (LONG_ROPE_FACTORS[1], f32s(short_factor)),
        ],
        _ => Vec::new(),
    }
}

fn metadata(
    model: &FusedModel,
    tokenizer: &Tokenizer,
    arch: &str,
    kind: GgufType,
) -> Result<Vec<(String, Value)>> {
    let c = &model.files.config;
    let u32_of = |v: usize| Value::U32(v as u32);
    let file_type = match kind {
        GgufType::F32 => 0,
        GgufType::F16 => 1,
        GgufType::Q4_0 => 2,
        GgufType::Q4_1 => 3,
        GgufType::Q8_0 => 7,
        GgufType::Bf16 => 32,
        // llama.cpp's MOSTLY_Q4_K_S (every matrix Q4_K) and MOSTLY_Q6_K.
        GgufType::Q4K => 14,
        GgufType::Q6K => 18,
    };
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(super::base_name(model.files)),
        ),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let mut arch_key = |k: &str, v: Value| m.push((format!("{arch}.{k}"), v));
    arch_key("vocab_size", u32_of(c.vocab_size));
    arch_key("context_length", u32_of(c.max_position_embeddings));
    arch_key("embedding_length", u32_of(c.hidden_size));
    arch_key("block_count", u32_of(c.num_layers));
    arch_key("feed_forward_length", u32_of(c.intermediate_size));
    arch_key("rope.dimension_count", u32_of(c.rotary_dim));
    arch_key("attention.head_count", u32_of(c.num_heads));
    arch_key("attention.head_count_kv", u32_of(c.num_kv_heads));
    arch_key("attention.key_length", u32_of(c.head_dim));
    arch_key("attention.value_length", u32_of(c.head_dim));
    arch_key(
        "attention.layer_norm_rms_epsilon",
        Value::F32(c.rms_norm_eps as f32),
    );
    arch_key("rope.freq_base", Value::F32(c.rope_theta as f32));
    match c.rope_scaling {
        RopeScaling::Linear { factor } => {
            arch_key("rope.scaling.type", Value::String("linear".into()));
            arch_key("rope.scaling.factor", Value::F32(factor as f32));
        }
        RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } => {
            arch_key(
                "rope.scaling.original_context_length",
                u32_of(original_max_position_embeddings),
            );
            arch_key(
                "rope.scaling.attn_factor",
                Value::F32(attention_factor as f32),
            );
        }
        _ => {}
    }
    if let Some(moe) = &c.moe {
        arch_key("expert_count", u32_of(moe.experts));
        arch_key("expert_used_count", u32_of(moe.top_k));
        arch_key(
            "expert_feed_forward_length",
            u32_of(moe.expert_intermediate_size),
        );
        arch_key("expert_weights_norm", Value::Bool(moe.normalize_top_k));
        if let Some(shared) = moe.shared_expert_intermediate_size {
            arch_key("expert_shared_feed_forward_length", u32_of(shared));
        }
    }
    let q = &c.quirks;
    if let Some(w) = q.sliding_window {
        arch_key("attention.sliding_window", u32_of(w));
    }
    if q.sliding_window.is_some() && c.family.is_gemma() {
        // What llama.cpp infers for Gemma when absent; our reader takes these keys first.
        let period = q.sliding_period().with_context(|| {
            "the sliding layers follow no `(i + 1) % p` pattern, which GGUF cannot store; export --format hf or mlx"
        })?;
        arch_key("attention.sliding_window_pattern", u32_of(period));
    }
    if let Some(scalar) = q.query_pre_attn_scalar {
        arch_key("attention.scale", Value::F32((1.0 / scalar.sqrt()) as f32));
    }
    if let Some(cap) = q.attn_softcap {
        arch_key("attn_logit_softcapping", Value::F32(cap as f32));
    }
    if let Some(cap) = q.final_softcap {
        arch_key("final_logit_softcapping", Value::F32(cap as f32));
    }
    if let Some((theta, _)) = q.local_rope {
        arch_key("rope.freq_base_swa", Value::F32(theta as f32));
    }
    match &model.files.weights {
        WeightSource::Gguf(g) => m.extend(
            g.metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .map(|(k, v)| (k.clone(), v.clone())),
        ),
        _ => m.extend(tokenizer_metadata(tokenizer, c.vocab_size)?),
    }
    Ok(m)
}

/// `tokenizer.ggml.*` for a byte-level BPE `tokenizer.json` (llama.cpp's "gpt2" model): tokens
/// by id (padded to the model's vocabulary), their types, the merges, special ids and the chat
/// template.
fn tokenizer_metadata(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let json: J = serde_json::from_str(
        &tokenizer
            .inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?,
    )?;
    let model = &json["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == J::Bool(true) {
        bail!(
            "GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM); this one is {} — export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py",
            tokenizer.kind
        );
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let mut place = |id: u64, token: &str, kind: i32| {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(token.to_string());
            types[id as usize] = kind;
        }
    };
    for (token, id) in model["vocab"].as_object().into_iter().flatten() {
        place(id.as_u64().unwrap_or(u64::MAX), token, 1);
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        // Special tokens are control tokens (3); other added tokens are user-defined (4).
        let kind = if added["special"] == J::Bool(true) {
            3
        } else {
            4
        };
        let content = added["content"].as_str().unwrap_or_default();
        place(added["id"].as_u64().unwrap_or(u64::MAX), content, kind);
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            J::Array(pair) => Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            other => Value::String(other.as_str().unwrap_or_default().to_string()),
        })
        .collect();
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("default".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    let id = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_id(t));
    if let Some(bos) = id(&tokenizer.bos) {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(eos) = id(&tokenizer.eos) {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(template) = &tokenizer.chat_template {
        m.push((
            "tokenizer.chat_template".into(),
            Value::String(template.clone()),
        ));
    }
    Ok(m)
}
