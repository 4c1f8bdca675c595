//! The model card (`README.md`) of an exported folder: YAML front matter that the Hub and
//! mlx-community read, then how the model was made and how to run it.

use std::fmt::Write;

use super::fuse::FusedModel;
use super::fuse::Survival;

/// `library` is `mlx` or `transformers`; `usage` is a shell or Python snippet.
pub fn model_card(
    model: &FusedModel,
    library: &str,
    encoding: &str,
    survival: &Survival,
    usage: &str,
) -> String {
    let base = model.files.path.display().to_string();
    let mut out = String::new();
    let _ = writeln!(out, "---");
    let _ = writeln!(out, "library_name: {library}");
    let _ = writeln!(out, "base_model: {base}");
    let _ = writeln!(out, "tags:\n- {library}\n- loraforge\n- lora");
    let _ = writeln!(out, "---\n");
    let _ = writeln!(out, "# {}\n", super::base_name(model.files));
    match model.adapters {
        Some(a) => {
            let rank = a.modules.values().map(|m| m.rank).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "Fine-tuned with loraforge: {} adapters of rank {rank} on {} linear layers of `{base}`, fused into the weights.\n",
                if a.dora { "DoRA" } else { "LoRA" },
                a.modules.len(),
            );
            let _ = writeln!(
                out,
                "Adapted matrices are stored as {encoding}; {:.1}% of the fine-tune's weight change survived that encoding (⟨E(W+ΔW) − E(W), ΔW⟩ / ‖ΔW‖²).\n",
                survival.kept() * 100.0
            );
        }
        None => {
            let _ = writeln!(out, "`{base}` converted by loraforge, without adapters.\n");
        }
    }
    let _ = writeln!(out, "## Use\n\n```\n{usage}\n```");
    out
}
