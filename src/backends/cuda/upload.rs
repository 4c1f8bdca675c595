//! Host bytes straight into a CUDA buffer, and a CubeCL buffer handed to Burn's fusion: the
//! path of a bf16 weight from the file's pages to the device without the two host copies of
//! Burn's `TensorData` route (CubeCL copies every upload into a new vector first).

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl::Runtime;
use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_fusion::stream::OperationStreams;
use burn_fusion::{NoOp, get_client};
use burn_ir::{BackendIr, InitOperationIr, OperationIr, OperationOutput};
use cudarc::driver::result as driver;

use super::kernel::{Cube, Queue, Tensor, pointer};

type Cuda = burn::backend::Cuda<f32>;

/// A `[rows, cols]` bf16 matrix from its little-endian bytes, copied from `bytes` (a file's
/// mapped pages) into a new buffer on `device`'s stream.
pub fn bf16_matrix(
    bytes: &[u8],
    [rows, cols]: [usize; 2],
    device: &CudaDevice,
) -> FloatTensor<Cuda> {
    assert_eq!(bytes.len(), rows * cols * 2, "a bf16 matrix's bytes");
    let client = CudaRuntime::client(device);
    let shape = Shape::from([rows, cols]);
    let t = empty_device_contiguous_dtype(client, device.clone(), shape, DType::BF16);
    let queue = Queue::of(&t);
    // SAFETY: the buffer holds `bytes.len()` bytes and lives in `t`; the copy is queued on the
    // stream that orders the buffer's other work, and from pageable memory it returns only once
    // `bytes` has been staged (CUDA's rule for host-to-device copies), so `bytes` may go after.
    unsafe {
        super::context(device.index)
            .bind_to_thread()
            .expect("bind the CUDA context");
        driver::memcpy_htod_async(pointer(&t), bytes, queue.stream())
            .unwrap_or_else(|e| panic!("copy a weight to the device: {e:?}"));
    }
    into_fusion(t)
}

/// A CubeCL tensor registered with Burn's fusion as a new tensor of its shape and dtype.
pub fn into_fusion(t: Tensor) -> FloatTensor<Cuda> {
    let client = get_client::<Cube>(&t.device);
    let (shape, dtype) = (t.meta.shape().clone(), t.dtype);
    let handle = Cube::float_tensor_handle(t);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    client
        .register(
            OperationStreams::default(),
            OperationIr::Init(desc),
            NoOp::<Cube>::new(),
        )
        .output()
}
