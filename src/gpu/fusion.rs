//! The cuBLAS product as an op of Burn's fusion stream.
//!
//! `burn::backend::Cuda` is `Fusion<CubeBackend<..>>`: ops are recorded and run lazily so
//! element-wise chains can be fused into one kernel. A custom op joins that stream as a
//! `CustomOpIr` (its inputs and output declared), and runs when the stream reaches it, on the
//! `CubeTensor`s behind the fusion handles (the pattern of burn-vision's CUDA ops).

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::cublas;
use crate::model::MatmulBackend;

type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;

type Runtime = <Cube as FusionBackend>::FusionRuntime;

/// `out = lhs · rhs`, as declared in `desc`.
#[derive(Debug)]
struct CublasMatmul {
    desc: CustomOpIr,
}

impl Operation<Runtime> for CublasMatmul {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let ([lhs, rhs], [out]) = self.desc.as_fixed();
        let lhs = handles.get_float_tensor::<Cube>(lhs);
        let rhs = handles.get_float_tensor::<Cube>(rhs);
        handles.register_float_tensor::<Cube>(&out.id, cublas::matmul(lhs, rhs));
    }
}

impl MatmulBackend for Fusion<Cube> {
    fn model_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let client = lhs.client.clone();
        let mut dims = lhs.shape.to_vec();
        let rank = dims.len();
        dims[rank - 1] = rhs.shape[rank - 1];
        let streams = OperationStreams::with_inputs([&lhs, &rhs]);
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::from(dims), DType::F32);
        let desc = CustomOpIr::new("cublas_matmul", &[lhs.into_ir(), rhs.into_ir()], &[out]);
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                CublasMatmul { desc },
            )
            .output()
    }
}
