//! Our affine quantizer against `mlx_lm.convert -q`: quantizing the float fixture gives the very
//! packed words, scales and biases mlx wrote (4-bit/group 64 and 8-bit/group 32).

use crate::common;

use loraforge::io::safetensors::SafetensorsStore;
use loraforge::quant::quantize::quantize;

fn check(folder: &str, bits: u32, group: usize) {
    let float =
        SafetensorsStore::open_folder(&common::fixture("models/llama-llama3rope-tied")).unwrap();
    let mlx = SafetensorsStore::open_folder(&common::fixture(&format!("models/{folder}"))).unwrap();
    let mut checked = 0;
    for name in mlx.names().filter(|n| n.ends_with(".scales")) {
        let module = name.trim_end_matches(".scales");
        let w = float.get(&format!("{module}.weight")).unwrap();
        let q = quantize(&w.to_f32().unwrap(), w.shape[0], w.shape[1], bits, group).unwrap();
        let want_packed = mlx
            .get(&format!("{module}.weight"))
            .unwrap()
            .to_u32()
            .unwrap();
        let want_scales = mlx.get(name).unwrap().to_f32().unwrap();
        let want_biases = mlx
            .get(&format!("{module}.biases"))
            .unwrap()
            .to_f32()
            .unwrap();
        assert_eq!(q.scales, want_scales, "{module}: scales");
        assert_eq!(q.biases, want_biases, "{module}: biases");
        assert_eq!(q.packed, want_packed, "{module}: packed codes");
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} quantized modules");
}

#[test]
fn four_bit_group_64_matches_mlx_bit_for_bit() {
    check("mlx-q4-g64", 4, 64);
}

#[test]
fn eight_bit_group_32_matches_mlx_bit_for_bit() {
    check("mlx-q8-g32", 8, 32);
}
