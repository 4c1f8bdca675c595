//! SwiGLU forward and backward as CubeCL kernels, one unit per element (the math in
//! `ops/elementwise.rs`): `y = silu(g) ⊙ u`; `du = dy ⊙ g ⊙ σ`, `dg = dy ⊙ u ⊙ σ ⊙ (1 + g (1 − σ))`,
//! σ recomputed from the gate. Outputs in the dtype the next GEMM reads. Burn's ops took four
//! passes forward and nine back over `[tokens, ffn]`.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{contiguous_f32, elementwise_cubes, empty};

/// `silu(gate) ⊙ up` in `dtype`.
pub fn forward<R: CubeRuntime>(
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    dtype: DType,
) -> CubeTensor<R> {
    let [gate, up] = [gate, up].map(contiguous_f32);
    let out = empty(&gate, gate.meta.shape().clone(), dtype);
    let (cubes, dim) = elementwise_cubes(&gate, out.meta.num_elements());
    forward_kernel::launch::<R>(
        &gate.client.clone(),
        cubes,
        dim,
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype.into(),
    );
    out
}

/// `[d gate, d up]` from the output's gradient `dy`, in `dtype`; each only when `wanted`.
pub fn backward<R: CubeRuntime>(
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    dy: CubeTensor<R>,
    [want_gate, want_up]: [bool; 2],
    dtype: DType,
) -> [Option<CubeTensor<R>>; 2] {
    let [gate, up, dy] = [gate, up, dy].map(contiguous_f32);
    let shape = gate.meta.shape().clone();
    // A gradient nobody wants gets one element the kernel never writes.
    let output = |wanted: bool| {
        empty(
            &gate,
            if wanted {
                shape.clone()
            } else {
                Shape::new([1])
            },
            dtype,
        )
    };
    let (dg, du) = (output(want_gate), output(want_up));
    let (cubes, dim) = elementwise_cubes(&gate, shape.num_elements());
    backward_kernel::launch::<R>(
        &gate.client.clone(),
        cubes,
        dim,
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        dy.into_tensor_arg(),
        dg.clone().into_tensor_arg(),
        du.clone().into_tensor_arg(),
        want_gate,
        want_up,
        dtype.into(),
    );
    [want_gate.then_some(dg), want_up.then_some(du)]
}

/// `σ(g) = 1 / (1 + e^(−g))`.
#[cube]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

#[cube(launch)]
fn forward_kernel<F: Float>(
    gate: &Tensor<f32>,
    up: &Tensor<f32>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let mut i = ABSOLUTE_POS;
    while i < out.len() {
        let g = gate[i];
        out[i] = F::cast_from(g * sigmoid(g) * up[i]);
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

#[cube(launch)]
fn backward_kernel<F: Float>(
    gate: &Tensor<f32>,
    up: &Tensor<f32>,
    dy: &Tensor<f32>,
    dg: &mut Tensor<F>,
    du: &mut Tensor<F>,
    #[comptime] want_gate: bool,
    #[comptime] want_up: bool,
    #[define(F)] _dtype: StorageType,
) {
    let mut i = ABSOLUTE_POS;
    while i < gate.len() {
        let g = gate[i];
        let s = sigmoid(g);
        let grad = dy[i];
        if want_up {
            du[i] = F::cast_from(grad * g * s);
        }
        if want_gate {
            dg[i] = F::cast_from(grad * up[i] * s * (1.0 + g * (1.0 - s)));
        }
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}
