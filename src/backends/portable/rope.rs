//! Rotary position embeddings in one CubeCL pass, forward and backward (the math in
//! `ops/rope.rs`, Hugging Face's rotate-half layout), one unit per pair `(j, j + d/2)`:
//!
//! ```text
//! out[j]       = x[j]       · cos[j]       − sign · x[j + d/2] · sin[j]
//! out[j + d/2] = x[j + d/2] · cos[j + d/2] + sign · x[j]       · sin[j + d/2]
//! ```
//!
//! `sign = 1` rotates forward, `−1` is the transpose (the backward pass). `x` is read through its
//! strides (a projection's `[batch, seq, heads, d]` output in place); the backward result is
//! written in `[batch, seq, heads, d]` memory order, so the reshape to the projection's
//! gradient that follows is free. Burn's ops took two slices, a concatenation and three
//! products each way.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use super::{contiguous_f32, elementwise_cubes, empty, f32_of};

/// `x` (`[batch, heads, seq, d]`) rotated by the tables `cos`, `sin` (`[1 or batch, 1, seq, d]`),
/// forward or (`backward`) back.
pub fn rope<R: CubeRuntime>([x, cos, sin]: [CubeTensor<R>; 3], backward: bool) -> CubeTensor<R> {
    let x = f32_of(x);
    let x = if x.meta.strides()[3] == 1 {
        x
    } else {
        into_contiguous(x)
    };
    let [cos, sin] = [cos, sin].map(contiguous_f32);
    let [batch, heads, seq, d] = x.meta.shape().dims::<4>();
    let table_rows = cos.meta.shape()[0];
    let out = if backward {
        let seq_major = empty(&x, Shape::new([batch, seq, heads, d]), DType::F32);
        CubeBackend::<R, f32, i32, u8>::float_swap_dims(seq_major, 1, 2)
    } else {
        empty(&x, Shape::new([batch, heads, seq, d]), DType::F32)
    };
    let (cubes, dim) = elementwise_cubes(&x, batch * heads * seq * d / 2);
    kernel::launch::<R>(
        &x.client.clone(),
        cubes,
        dim,
        x.into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        heads as u32,
        seq as u32,
        (d / 2) as u32,
        table_rows as u32,
        if backward { -1.0 } else { 1.0 },
    );
    out
}

#[cube(launch)]
fn kernel(
    x: &Tensor<f32>,
    cos: &Tensor<f32>,
    sin: &Tensor<f32>,
    out: &mut Tensor<f32>,
    heads: u32,
    seq: u32,
    half: u32,
    table_rows: u32,
    sign: f32,
) {
    let (heads, seq, half) = (heads as usize, seq as usize, half as usize);
    let pairs = x.shape(0) * heads * seq * half;
    let mut i = ABSOLUTE_POS;
    while i < pairs {
        let j = i % half;
        let t = (i / half) % seq;
        let bh = i / (half * seq);
        let (b, h) = (bh / heads, bh % heads);
        let xr = b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        let o = b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
        let mut table_row = 0usize;
        if table_rows > 1 {
            table_row = b;
        }
        let table = (table_row * seq + t) * 2 * half;
        let (x1, x2) = (x[xr + j], x[xr + j + half]);
        out[o + j] = x1 * cos[table + j] - sign * x2 * sin[table + j];
        out[o + j + half] = x2 * cos[table + j + half] + sign * x1 * sin[table + j + half];
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}
