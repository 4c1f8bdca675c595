//! Our own CUDA C kernels (`*.cu` beside this file): compiled by NVRTC at run time for the
//! device's compute capability (no CUDA toolkit at build time), launched on CubeCL's stream over
//! Burn's CUDA buffers, as `cublas.rs` runs its GEMMs.

use std::collections::HashMap;
use std::ffi::c_void;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::driver::sys::{self, CUfunction_attribute, CUstream};
use cudarc::driver::{CudaFunction, CudaModule, result as driver};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

pub type Tensor = CubeTensor<CudaRuntime>;
/// The backend behind `burn::backend::Cuda<f32>`'s fusion.
pub type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;

/// `source` (`name` in messages) compiled for `device` with `-D` definitions `defines`.
pub fn module(device: usize, name: &str, source: &str, defines: &[String]) -> Arc<CudaModule> {
    let (major, minor) = super::compute_capability(device);
    let mut options = vec![format!("--gpu-architecture=compute_{major}{minor}")];
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    let options = CompileOptions {
        options,
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(source, options)
        .unwrap_or_else(|e| panic!("NVRTC could not compile {name}: {e:?}"));
    super::context(device)
        .load_module(ptx)
        .unwrap_or_else(|e| panic!("load the module of {name}: {e:?}"))
}

/// Kernels built once per `key` (a device and a variant) and kept for the life of the process.
pub type Cache<K, V> = OnceLock<Mutex<HashMap<K, &'static V>>>;

/// The entry of `cache` for `key`, built by `build` the first time.
pub fn cached<K: Eq + Hash, V>(
    cache: &'static Cache<K, V>,
    key: K,
    build: impl FnOnce() -> V,
) -> &'static V {
    let mut entries = cache.get_or_init(Default::default).lock().expect("kernels");
    entries
        .entry(key)
        .or_insert_with(|| Box::leak(Box::new(build())))
}

/// Kernel `name` of `module`, allowed `shared` bytes of dynamic shared memory.
pub fn function(module: &Arc<CudaModule>, name: &str, shared: u32) -> CudaFunction {
    let function = module
        .load_function(name)
        .unwrap_or_else(|e| panic!("kernel {name}: {e:?}"));
    if shared > 0 {
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                i32::try_from(shared).expect("shared bytes"),
            )
            .unwrap_or_else(|e| panic!("{name}: {shared} bytes of shared memory: {e:?}"));
    }
    function
}

/// One kernel of a packed-weight source (`-DBITS`) compiled for bf16 scales and for f32 ones
/// (`{stem}_bf16`, `{stem}_f32`), for one bit width on one device.
pub struct ByScales {
    bf16: CudaFunction,
    f32: CudaFunction,
}

impl ByScales {
    /// `stem`'s two kernels in `source` (`name` in messages), compiled with `-DBITS=bits`.
    pub fn build(device: usize, name: &str, source: &str, bits: u32, stem: &str) -> Self {
        let module = module(device, name, source, &[format!("BITS={bits}")]);
        ByScales {
            bf16: function(&module, &format!("{stem}_bf16"), 0),
            f32: function(&module, &format!("{stem}_f32"), 0),
        }
    }

    /// The kernel for scales in `dtype`.
    pub fn of(&self, dtype: DType) -> &CudaFunction {
        match dtype {
            DType::BF16 => &self.bf16,
            DType::F32 => &self.f32,
            other => panic!("{other:?} scales: only bf16 and f32"),
        }
    }
}

/// The device address of the tensor's first element (the pooled offset included).
pub fn pointer(t: &Tensor) -> u64 {
    t.client
        .get_resource(t.handle.clone())
        .expect("CUDA buffer")
        .resource()
        .ptr
}

/// A new contiguous tensor on `like`'s device.
pub fn empty(like: &Tensor, shape: Shape, dtype: DType) -> Tensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// `t` in `dtype` (itself when it already is).
pub fn cast(t: Tensor, dtype: FloatDType) -> Tensor {
    if t.dtype == DType::from(dtype) {
        t
    } else {
        Cube::float_cast(t, dtype)
    }
}

pub fn u32_of(n: usize) -> u32 {
    u32::try_from(n).expect("grid dimension under 2³²")
}

/// A kernel's arguments, in the order of its signature.
#[derive(Default)]
pub struct Args(Vec<Arg>);

enum Arg {
    Pointer(u64),
    Int(i32),
    Long(i64),
    Float(f32),
}

impl Args {
    /// Device pointers (the pooled offset included); the caller keeps the tensors, and so their
    /// memory, alive until the launch is queued.
    pub fn pointers(&mut self, tensors: &[&Tensor]) {
        for tensor in tensors {
            self.0.push(Arg::Pointer(pointer(tensor)));
        }
    }

    /// A device pointer, or null for `None` (an operand the kernel may go without).
    pub fn optional_pointer(&mut self, tensor: Option<&Tensor>) {
        self.0.push(Arg::Pointer(tensor.map_or(0, pointer)));
    }

    /// Device addresses taken earlier (from [`pointer`]; 0 for null), of buffers the caller
    /// keeps alive.
    pub fn addresses(&mut self, addresses: &[u64]) {
        self.0.extend(addresses.iter().map(|&a| Arg::Pointer(a)));
    }

    /// An `int`.
    pub fn int(&mut self, n: usize) {
        self.0
            .push(Arg::Int(i32::try_from(n).expect("size under 2³¹")));
    }

    /// A `long long` (strides and element counts).
    pub fn long(&mut self, n: usize) {
        self.0
            .push(Arg::Long(i64::try_from(n).expect("size under 2⁶³")));
    }

    pub fn float(&mut self, x: f32) {
        self.0.push(Arg::Float(x));
    }

    /// What `cuLaunchKernel` takes: a pointer to each argument's value.
    fn params(&mut self) -> Vec<*mut c_void> {
        self.0
            .iter_mut()
            .map(|arg| match arg {
                Arg::Pointer(x) => (x as *mut u64).cast(),
                Arg::Int(x) => (x as *mut i32).cast(),
                Arg::Long(x) => (x as *mut i64).cast(),
                Arg::Float(x) => (x as *mut f32).cast(),
            })
            .collect()
    }
}

/// Queues `function` on the stream of `out`'s buffer (the calling thread's CubeCL stream).
/// `args` must match the kernel's signature.
pub fn launch(
    function: &CudaFunction,
    grid: (u32, u32, u32),
    threads: u32,
    shared: u32,
    out: &Tensor,
    args: Args,
) {
    Queue::of(out).launch(function, grid, threads, shared, args);
}

/// Where a buffer's work runs: its device and the CubeCL stream that orders it.
#[derive(Clone, Copy)]
pub struct Queue {
    device: usize,
    stream: CUstream,
}

impl Queue {
    /// The queue of `t`'s buffer (the calling thread's CubeCL stream).
    pub fn of(t: &Tensor) -> Self {
        let stream = t
            .client
            .get_resource(t.handle.clone())
            .expect("CUDA buffer")
            .resource()
            .stream;
        Queue {
            device: t.device.index,
            stream: stream.cast(),
        }
    }

    /// The CUDA stream.
    pub fn stream(self) -> CUstream {
        self.stream
    }

    /// The device's index.
    pub fn device(self) -> usize {
        self.device
    }

    /// Queues `function` so that it may start while the kernel before it in the stream still
    /// runs (programmatic dependent launch, sm_90 and later): the kernel must wait for that one
    /// (`griddepcontrol.wait`, `decode.cu`) before reading anything earlier work writes. The
    /// driver's error where it refuses the launch (`args` left for a launch the usual way).
    pub fn launch_overlapped(
        self,
        function: &CudaFunction,
        grid: (u32, u32, u32),
        threads: u32,
        shared: u32,
        args: &mut Args,
    ) -> Result<(), driver::DriverError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut params = args.params();
        // SAFETY: the value is a C union of plain integers and structs of them: all zeros is
        // one of its values.
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attribute = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared,
            hStream: self.stream,
            attrs: &raw mut attribute,
            numAttrs: 1,
        };
        // SAFETY: as `launch`'s; `config` and its attribute outlive the call, which copies them.
        unsafe {
            super::context(self.device)
                .bind_to_thread()
                .expect("bind the CUDA context");
            sys::cuLaunchKernelEx(
                &raw const config,
                function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
        }
    }

    /// Queues `function`; `args` must match the kernel's signature.
    pub fn launch(
        self,
        function: &CudaFunction,
        grid: (u32, u32, u32),
        threads: u32,
        shared: u32,
        mut args: Args,
    ) {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return;
        }
        let mut params = args.params();
        // SAFETY: the callers build `args` in the order and types of the kernel's signature
        // (pointers to buffers the caller keeps alive, i32 sizes, i64 strides, f32 scalars),
        // and the launch is queued on the stream CubeCL orders these buffers' other work on.
        unsafe {
            super::context(self.device)
                .bind_to_thread()
                .expect("bind the CUDA context");
            driver::launch_kernel(
                function.cu_function(),
                grid,
                (threads, 1, 1),
                shared,
                self.stream,
                &mut params,
            )
            .unwrap_or_else(|e| panic!("launch a kernel: {e:?}"));
        }
    }
}
