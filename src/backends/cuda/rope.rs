//! Rotary position embeddings in one pass of `rope.cu`, forward and backward. Burn's ops took
//! two slices, a concatenation and three binary ops each way, for q and for k.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::kernel::into_contiguous;
use cudarc::driver::CudaFunction;

use super::kernel::{self, Args, Cube, Tensor, cast, empty, u32_of};

const SOURCE: &str = include_str!("rope.cu");
const THREADS: u32 = 256;

/// `x` (`[batch, heads, seq, d]`) rotated by the tables `cos`, `sin` (`[1 or batch, 1, seq, d]`);
/// `backward` rotates the other way (the transpose) and writes the result in
/// `[batch, seq, heads, d]` memory order, so the reshape to the projection's `[tokens, heads · d]`
/// gradient that follows is free. The forward result is contiguous, as attention reads it.
pub fn rope([x, cos, sin]: [Tensor; 3], backward: bool) -> Tensor {
    let x = cast(x, FloatDType::F32);
    let x = if x.meta.strides()[3] == 1 {
        x
    } else {
        into_contiguous(x)
    };
    let [cos, sin] = [cos, sin].map(|t| into_contiguous(cast(t, FloatDType::F32)));
    let shape = x.meta.shape().to_vec();
    let [batch, heads, seq, d] = [shape[0], shape[1], shape[2], shape[3]];
    let table_rows = cos.meta.shape()[0];
    assert!(
        d.is_multiple_of(2) && cos.meta.shape()[2] == seq && cos.meta.shape()[3] == d,
        "rope: tables {:?} for x {shape:?}",
        cos.meta.shape()
    );
    let out = if backward {
        let seq_major = empty(&x, Shape::new([batch, seq, heads, d]), DType::F32);
        Cube::float_swap_dims(seq_major, 1, 2)
    } else {
        empty(&x, Shape::new([batch, heads, seq, d]), DType::F32)
    };
    let mut args = Args::default();
    args.pointers(&[&x, &cos, &sin, &out]);
    for n in [heads, seq, d / 2, table_rows] {
        args.int(n);
    }
    for t in [&x, &out] {
        for &stride in &t.meta.strides()[..3] {
            args.long(stride);
        }
    }
    args.float(if backward { -1.0 } else { 1.0 });
    assert!(
        batch * heads <= 65_535,
        "rope: {batch} × {heads} rows of blocks"
    );
    let blocks = (seq * d / 2).div_ceil(THREADS as usize);
    let grid = (u32_of(blocks), u32_of(batch * heads), 1);
    kernel::launch(function(x.device.index), grid, THREADS, 0, &out, args);
    out
}

fn function(device: usize) -> &'static CudaFunction {
    static KERNELS: kernel::Cache<usize, CudaFunction> = kernel::Cache::new();
    kernel::cached(&KERNELS, device, || {
        kernel::function(&kernel::module(device, "rope.cu", SOURCE, &[]), "rope", 0)
    })
}
