//! Adapters loraforge trained load in the reference tools and give our logits: our mlx-lm folder
//! in `mlx_lm.load(adapter_path=...)` on a 4-bit base, our peft folder in
//! `PeftModel.from_pretrained` on a float base (scripts/fixtures/make_adapter_interop.py).

use crate::common;

use burn::backend::NdArray;
use loraforge::lora::files;
use loraforge::model::load_model;

type B = NdArray<f32>;

fn logits_with_adapter(base: &str, adapter_file: Option<&str>) -> (Vec<f32>, Vec<f32>) {
    let device = Default::default();
    let dir = common::fixture(&format!("adapter-interop/{base}"));
    let reference_name = if base.starts_with("mlx") {
        "mlx_reference.json"
    } else {
        "peft_reference.json"
    };
    let (ids, want) = common::reference_logits(&dir.join(reference_name));
    let mut model = load_model::<B>(&common::fixture(&format!("models/{base}")), &device)
        .unwrap()
        .decoder;
    files::attach(&mut model, &dir.join("mlx"), &device).unwrap();
    if let Some(file) = adapter_file {
        // The same adapter read back from the other layout.
        files::load_into(&mut model, &dir.join(file), &device).unwrap();
    }
    let got: Vec<f32> = model
        .forward(&ids, 1, &device)
        .into_data()
        .into_vec()
        .unwrap();
    (got, want)
}

#[test]
fn our_mlx_adapter_in_mlx_lm_on_a_4bit_base() {
    let (got, want) = logits_with_adapter("mlx-q4-g64", None);
    let diff = common::max_abs_diff(&got, &want);
    println!("mlx-lm with our adapter: max abs diff {diff:.2e}");
    assert!(diff <= 1e-3, "max abs diff {diff}");
}

#[test]
fn our_peft_adapter_in_peft_on_a_float_base() {
    for file in [None, Some("peft/adapter_model.safetensors")] {
        let (got, want) = logits_with_adapter("llama-llama3rope-tied", file);
        let diff = common::max_abs_diff(&got, &want);
        println!("peft with our adapter ({file:?}): max abs diff {diff:.2e}");
        assert!(diff <= 1e-3, "max abs diff {diff}");
    }
}

/// Adapters on parts of Phi-3's fused linears (`q_proj` and `v_proj` of `qkv_proj`, `gate_proj`
/// of `gate_up_proj`), as `loraforge train` wrote them on the Phi-4-mini fixture (joined on the
/// fused linears): mlx-lm and peft load our folders on their stock Phi-3 and give our logits,
/// whether the folder is attached to a fresh model (one adapter per fused linear) or read back
/// into a model that adapts the parts (split again).
#[test]
fn adapters_on_parts_of_phi3s_fused_linears_in_mlx_lm_and_peft() {
    use loraforge::lora::{AdapterSpec, inject};
    use loraforge::recipe::{Layers, LoraSection, Targets};
    let device = Default::default();
    let dir = common::fixture("adapter-interop/phi4mini-parts");
    let model_dir = common::fixture("models/phi4mini");
    for (folder, file, reference) in [
        ("mlx", "adapters.safetensors", "mlx_reference.json"),
        ("peft", "adapter_model.safetensors", "peft_reference.json"),
    ] {
        let (ids, want) = common::reference_logits(&dir.join(reference));
        let mut attached = load_model::<B>(&model_dir, &device).unwrap().decoder;
        files::attach(&mut attached, &dir.join(folder), &device).unwrap();
        let mut parts = load_model::<B>(&model_dir, &device).unwrap().decoder;
        let lora = LoraSection {
            rank: 4,
            scale: Some(2.0),
            targets: Targets::Keys(common::PHI3_PART_KEYS.map(String::from).to_vec()),
            layers: Layers::Last(-1),
            ..Default::default()
        };
        let spec = AdapterSpec::from_recipe(&lora, &parts.config).unwrap();
        inject(&mut parts, &spec, 0, &device);
        files::load_into(&mut parts, &dir.join(folder).join(file), &device).unwrap();
        for (how, model) in [("attached", &attached), ("read into the parts", &parts)] {
            let got: Vec<f32> = model
                .forward(&ids, 1, &device)
                .into_data()
                .into_vec()
                .unwrap();
            let diff = common::max_abs_diff(&got, &want);
            println!("{folder} ({how}): max abs diff {diff:.2e}");
            assert!(diff <= 1e-4, "{folder} ({how}): max abs diff {diff}");
        }
    }
}
