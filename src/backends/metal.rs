//! Apple Silicon through wgpu/Metal: every op takes its reference form in Burn's ops (the
//! traits' defaults). Compiles here; has never run on Apple hardware.

use burn::backend::Metal;

use crate::ops::ModelBackend;
use crate::ops::attention::AttentionBackend;
use crate::ops::elementwise::ElementwiseBackend;
use crate::ops::matmul::MatmulBackend;
use crate::ops::rope::RopeBackend;

impl MatmulBackend for Metal<f32> {}

impl AttentionBackend for Metal<f32> {}

impl ElementwiseBackend for Metal<f32> {}

impl RopeBackend for Metal<f32> {}

impl ModelBackend for Metal<f32> {}
