//! A borrowed view of one stored tensor, whatever file it came from.

use half::{bf16, f16};

/// Element types as they are stored on disk (safetensors and the float GGUF types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDtype {
    /// 32-bit float.
    F32,
    /// IEEE half float.
    F16,
    /// bfloat16.
    BF16,
    /// Unsigned 32-bit integer (MLX packs its quantized codes in these).
    U32,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
}

impl RawDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            RawDtype::F32 | RawDtype::U32 | RawDtype::I32 => 4,
            RawDtype::F16 | RawDtype::BF16 => 2,
            RawDtype::I64 => 8,
            RawDtype::U8 | RawDtype::I8 => 1,
        }
    }

    /// The type's name as safetensors spells it (`BF16`).
    pub fn name(self) -> &'static str {
        match self {
            RawDtype::F32 => "F32",
            RawDtype::F16 => "F16",
            RawDtype::BF16 => "BF16",
            RawDtype::U32 => "U32",
            RawDtype::I32 => "I32",
            RawDtype::I64 => "I64",
            RawDtype::U8 => "U8",
            RawDtype::I8 => "I8",
        }
    }
}

/// A tensor's bytes (little-endian, row-major) with its type and shape.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// The tensor's name in the file it came from.
    pub name: &'a str,
    /// The element type as stored.
    pub dtype: RawDtype,
    /// Dimensions, outermost first.
    pub shape: &'a [usize],
    /// The stored bytes, `numel() * dtype.size()` of them.
    pub bytes: &'a [u8],
}

impl RawTensor<'_> {
    /// Number of elements: the product of the shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values widened to f32; errors for integer tensors.
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        let b = self.bytes;
        Ok(match self.dtype {
            RawDtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            RawDtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            RawDtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(format!(
                    "tensor `{}` has type {}, expected a float type",
                    self.name,
                    other.name()
                ));
            }
        })
    }

    /// The values of a U32 tensor (packed quantized weights).
    pub fn to_u32(&self) -> Result<Vec<u32>, String> {
        if self.dtype != RawDtype::U32 {
            return Err(format!(
                "tensor `{}` has type {}, expected U32 (packed quantized weights)",
                self.name,
                self.dtype.name()
            ));
        }
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}
