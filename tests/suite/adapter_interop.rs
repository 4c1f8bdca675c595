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
