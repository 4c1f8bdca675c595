//! GGUF K-quants (Q2_K .. Q6_K) and Q5_0/Q5_1 read into the affine layout dequantize bit for bit
//! as llama.cpp's gguf-py does, on random (super-)blocks (one with a subnormal f16 scale) written
//! by `scripts/fixtures/make_kquant_blocks.py`, and so do IQ4_NL and IQ4_XS, read as floats. The
//! one difference is the sign of a zero: ggml's `d·sc·q` with a negative scale and `q = 0` is
//! −0, our `scale·c + bias` is +0 (equal values). The affine ones do so too as a device holds
//! them (3-, 5- and 6-bit codes widened to 4 or 8 bits).

use burn::backend::NdArray;
use loraforge::io::gguf::GgmlType;
use loraforge::ops::quantized_linear::DeviceQuantized;
use loraforge::quant::ggml::{float_values, to_affine};

use crate::common;

#[test]
fn gguf_blocks_dequantize_bit_for_bit_as_gguf_py() {
    let bytes = std::fs::read(common::fixture("kquants/blocks.safetensors")).expect("fixture");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let kinds = [
        ("Q2_K", GgmlType::Q2_K),
        ("Q3_K", GgmlType::Q3_K),
        ("Q4_K", GgmlType::Q4_K),
        ("Q5_K", GgmlType::Q5_K),
        ("Q6_K", GgmlType::Q6_K),
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("IQ4_NL", GgmlType::IQ4_NL),
        ("IQ4_XS", GgmlType::IQ4_XS),
    ];
    for (name, kind) in kinds {
        let blocks = file.tensor(&format!("{name}.blocks")).expect("blocks");
        let want: Vec<f32> = file
            .tensor(&format!("{name}.values"))
            .expect("values")
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let same = |g: f32, w: f32| g.to_bits() == w.to_bits() || (g == 0.0 && w == 0.0);
        let differing = |got: &[f32]| {
            assert_eq!(got.len(), want.len(), "{name}");
            got.iter()
                .zip(&want)
                .filter(|(g, w)| !same(**g, **w))
                .count()
        };
        assert!(
            want.iter().any(|&v| v != 0.0),
            "{name}: the fixture is all zeros"
        );
        if let Some(values) = float_values(kind, blocks.data()) {
            let read = differing(&values);
            assert_eq!(read, 0, "{name}: {read} values differ from gguf-py's");
            continue;
        }
        // Eight (super-)blocks as a [2, n/2] matrix: rows of four blocks.
        let (rows, cols) = (2, want.len() / 2);
        let q = to_affine(kind, rows, cols, blocks.data()).expect("an affine block type");
        let on_host = differing(&q.dequantize());
        assert_eq!(on_host, 0, "{name}: {on_host} values differ from gguf-py's");
        // As a device holds it: 3-, 5- and 6-bit codes widened to 4 or 8 bits.
        let held = DeviceQuantized::<NdArray<f32>>::upload(&q, None, &Default::default())
            .expect("every K-quant's groups fit a device word");
        let on_device = differing(&held.dequantize().into_data().into_vec::<f32>().unwrap());
        assert_eq!(
            on_device, 0,
            "{name} on a device: {on_device} values differ"
        );
    }
}

/// A tiny Llama whose matrices are all five K-quants gives the logits of its float copy
/// (dequantized by gguf-py, q and k rows put back from llama.cpp's permutation), both written by
/// `scripts/fixtures/make_kquant_model.py`: the K-quant path reads, un-permutes and multiplies
/// packed weights (host products from the packed codes for a few rows) as the dense path does.
/// So does one whose matrices are Q5_0, Q5_1 (packed) and IQ4_NL, IQ4_XS (read as floats).
#[test]
fn a_k_quant_gguf_gives_the_logits_of_its_dequantized_copy() {
    use loraforge::model::load_model;

    let device = Default::default();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 256).collect();
    let logits = |path: &str| -> Vec<f32> {
        let model = load_model::<NdArray<f32>>(&common::fixture(path), &device).unwrap();
        let logits = model.decoder.forward(&ids, 1, &device);
        logits.into_data().into_vec().unwrap()
    };
    for name in ["tiny-kquant", "tiny-q5-iq4"] {
        let (quantized, dense) = (
            logits(&format!("kquants/{name}.gguf")),
            logits(&format!("kquants/{name}-hf")),
        );
        let scale = dense.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = common::max_abs_diff(&quantized, &dense);
        println!("{name}: max abs diff {diff:.3e} over logits up to {scale:.3}");
        assert!(scale > 0.1, "{name}: logits too small to compare: {scale}");
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max abs diff {diff}");
    }
}
