//! GGUF reader: metadata, tensor directory, and memory-mapped tensor data.
//!
//! Layout (little-endian): magic `GGUF`, version, tensor count, metadata count, metadata
//! key/values, tensor infos (name, dims innermost-first, ggml type, offset), then the tensor data
//! aligned to `general.alignment` (32 by default).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// Why a GGUF file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or memory-mapped.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("{path} is not a GGUF file (magic bytes are {magic:?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first four bytes found.
        magic: [u8; 4],
    },
    /// The header states a version other than 2 or 3.
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version the header states.
        version: u32,
    },
    /// The file ends early, or a tensor's row length or extent does not fit its type or the file.
    #[error("{path} is truncated or corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong, and where.
        reason: String,
    },
    /// A tensor is stored in a GGML type we cannot read (the i-quants, for one).
    #[error(
        "{path}: tensor `{tensor}` uses GGML type {kind}, which loraforge cannot read yet (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS); convert the model with another quantization"
    )]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The type's ggml name and id (`Q4_K (type id 12)`).
        kind: String,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Metadata type 0: an unsigned byte.
    U8(u8),
    /// Metadata type 1: a signed byte.
    I8(i8),
    /// Metadata type 2: an unsigned 16-bit integer.
    U16(u16),
    /// Metadata type 3: a signed 16-bit integer.
    I16(i16),
    /// Metadata type 4: an unsigned 32-bit integer.
    U32(u32),
    /// Metadata type 5: a signed 32-bit integer.
    I32(i32),
    /// Metadata type 10: an unsigned 64-bit integer.
    U64(u64),
    /// Metadata type 11: a signed 64-bit integer.
    I64(i64),
    /// Metadata type 6: a 32-bit float.
    F32(f32),
    /// Metadata type 12: a 64-bit float.
    F64(f64),
    /// Metadata type 7: a bool, one byte (any non-zero byte is true).
    Bool(bool),
    /// Metadata type 8: a length-prefixed UTF-8 string (invalid bytes replaced).
    String(String),
    /// Metadata type 9: an array whose items all have one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer: any integer type that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float: a float type, or an integer [`Value::as_u64`] reads.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The text of a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value of a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The items of an array value.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short rendering for `inspect` (arrays are summarised).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => {
                format!("{:?}… ({} chars)", &s[..s.floor_char_boundary(60)], s.len())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            other => other.as_u64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// The GGML tensor types we can read, with their block geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)] // ggml's own spelling: Q4_K is not Q4K
pub enum GgmlType {
    /// 32-bit float, 4 bytes.
    F32,
    /// IEEE half float, 2 bytes.
    F16,
    /// bfloat16, 2 bytes.
    BF16,
    /// Blocks of 32 4-bit codes with one f16 scale, centred on 8 (18 bytes).
    Q4_0,
    /// Blocks of 32 4-bit codes with an f16 scale and an f16 minimum (20 bytes).
    Q4_1,
    /// Blocks of 32 signed 8-bit codes with one f16 scale (34 bytes).
    Q8_0,
    /// Blocks of 32 5-bit codes with one f16 scale, centred on 16 (22 bytes).
    Q5_0,
    /// Blocks of 32 5-bit codes with an f16 scale and an f16 minimum (24 bytes).
    Q5_1,
    /// Super-blocks of 256 2-bit codes, 16 groups with 4-bit scales and minimums (84 bytes).
    Q2_K,
    /// Super-blocks of 256 3-bit codes, 16 groups with 6-bit signed scales (110 bytes).
    Q3_K,
    /// Super-blocks of 256 4-bit codes, 8 groups with 6-bit scales and minimums (144 bytes).
    Q4_K,
    /// Super-blocks of 256 5-bit codes, 8 groups with 6-bit scales and minimums (176 bytes).
    Q5_K,
    /// Super-blocks of 256 6-bit codes, 16 groups with 8-bit signed scales (210 bytes).
    Q6_K,
    /// Blocks of 32 4-bit indices into 16 fixed, unevenly spaced levels, one f16 scale (18
    /// bytes).
    IQ4_NL,
    /// Super-blocks of 256 IQ4_NL indices, 8 groups with 6-bit scales (136 bytes).
    IQ4_XS,
}

impl GgmlType {
    /// Every type we read.
    const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];

    /// The type stored under ggml's `id`, or its name for a type we do not read.
    fn from_id(id: u32) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.id() == id)
            .ok_or_else(|| ggml_type_name(id))
    }

    /// ggml's id of the type (`enum ggml_type`), as a GGUF tensor record stores it.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::IQ4_NL => 20,
            GgmlType::IQ4_XS => 23,
            GgmlType::BF16 => 30,
        }
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::IQ4_NL => (32, 18),
            GgmlType::IQ4_XS => (256, 136),
            GgmlType::Q2_K => (256, 84),
            GgmlType::Q3_K => (256, 110),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
        }
    }

    /// The type's name as ggml spells it (`Q8_0`).
    pub fn name(self) -> &'static str {
        GGML_TYPE_NAMES[self.id() as usize]
    }
}

/// ggml's type names, indexed by id.
const GGML_TYPE_NAMES: [&str; 42] = [
    "F32",
    "F16",
    "Q4_0",
    "Q4_1",
    "Q4_2",
    "Q4_3",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q8_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_K",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ3_XXS",
    "IQ1_S",
    "IQ4_NL",
    "IQ3_S",
    "IQ2_S",
    "IQ4_XS",
    "I8",
    "I16",
    "I32",
    "I64",
    "F64",
    "IQ1_M",
    "BF16",
    "Q4_0_4_4",
    "Q4_0_4_8",
    "Q4_0_8_8",
    "TQ1_0",
    "TQ2_0",
    "IQ4_NL_4_4",
    "IQ4_NL_4_8",
    "IQ4_NL_8_8",
    "MXFP4",
    "NVFP4",
    "?",
];

/// A type id's name, for a type we do not read.
fn ggml_type_name(id: u32) -> String {
    GGML_TYPE_NAMES
        .get(id as usize)
        .map(|n| format!("{n} (type id {id})"))
        .unwrap_or_else(|| format!("unknown (type id {id})"))
}

/// One tensor of the file. `shape` is in row-major order (outermost first), i.e. GGUF's
/// innermost-first `ne` reversed, so a Linear weight reads `[out, in]` as in safetensors.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The name as stored, in llama.cpp's naming (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// How the elements are encoded.
    pub kind: GgmlType,
    offset: usize,
    len: usize,
}

impl TensorInfo {
    /// Number of elements: the product of the shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open GGUF file: its metadata and tensor directory, and a read-only map of its bytes.
pub struct GgufFile {
    /// The file this was opened from, for messages.
    pub path: PathBuf,
    /// The format version from the header (2 or 3).
    pub version: u32,
    /// Every metadata key/value, by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    map: Mmap,
}

impl GgufFile {
    /// Maps the file and reads its header, checking each tensor's type, row length and extent.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only map of a file we only read.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |reason: String| GgufError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut r = Reader { buf: &map, pos: 0 };
        let magic: [u8; 4] = r.bytes(4).map_err(&corrupt)?.try_into().unwrap();
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                magic,
            });
        }
        let version = r.u32().map_err(&corrupt)?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = r.u64().map_err(&corrupt)?;
        let n_kv = r.u64().map_err(&corrupt)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string().map_err(&corrupt)?;
            let ty = r.u32().map_err(&corrupt)?;
            let value = r
                .value(ty, 0)
                .map_err(|e| corrupt(format!("metadata `{key}`: {e}")))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(corrupt(format!(
                    "metadata `{key}` appears twice (which one a reader takes is not defined)"
                )));
            }
        }
        let mut raw_infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string().map_err(&corrupt)?;
            let n_dims = r.u32().map_err(&corrupt)?;
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(corrupt(format!(
                    "tensor `{name}` has {n_dims} dimensions (ggml tensors have 1 to {MAX_DIMS})"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64().map_err(&corrupt)?);
            }
            let ty = r.u32().map_err(&corrupt)?;
            let offset = r.u64().map_err(&corrupt)?;
            raw_infos.push((name, ne, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(corrupt(format!(
                        "general.alignment is {v:?}; it must be a power of two (32 by default)"
                    )));
                }
            },
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw_infos.len());
        for (name, ne, ty, offset) in raw_infos {
            let kind = GgmlType::from_id(ty).map_err(|kind| GgufError::UnsupportedType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                kind,
            })?;
            let (per_block, block_bytes) = kind.block();
            if ne[0] % per_block as u64 != 0 {
                return Err(corrupt(format!(
                    "tensor `{name}`: row length {} is not a multiple of the {} block size {per_block}",
                    ne[0],
                    kind.name()
                )));
            }
            // Every size is checked against the file before it is used: a shape whose product
            // wraps, or an offset near 2⁶⁴, must not pass as a small tensor.
            let bytes = ne
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .and_then(|numel| (numel / per_block as u64).checked_mul(block_bytes as u64));
            let end = bytes.and_then(|b| (data_start as u64).checked_add(offset)?.checked_add(b));
            let (Some(len), Some(end)) = (bytes, end) else {
                return Err(corrupt(format!(
                    "tensor `{name}`: shape {ne:?} at offset {offset} overflows 64 bits"
                )));
            };
            if end > map.len() as u64 {
                return Err(corrupt(format!(
                    "tensor `{name}` needs bytes {}..{end} but the file is {} bytes long",
                    end - len,
                    map.len()
                )));
            }
            tensors.push(TensorInfo {
                name,
                shape: ne.into_iter().rev().map(|d| d as usize).collect(),
                kind,
                offset: (end - len) as usize,
                len: len as usize,
            });
        }
        // Two tensors must not share bytes: one would read the other's data as its own.
        let mut spans: Vec<&TensorInfo> = tensors.iter().collect();
        spans.sort_by_key(|t| t.offset);
        if let Some(pair) = spans
            .windows(2)
            .find(|w| w[0].offset + w[0].len > w[1].offset)
        {
            return Err(corrupt(format!(
                "the data of tensors `{}` and `{}` overlap",
                pair[0].name, pair[1].name
            )));
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    /// The tensor of that name, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's bytes as stored (whole blocks for quantized types), borrowed from the map.
    pub fn data(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.offset..info.offset + info.len]
    }

    /// Lets the pages of a tensor's data leave memory (see [`super::release_pages`]).
    pub fn release(&self, info: &TensorInfo) {
        super::release_pages(&self.map, info.offset, info.len);
    }

    /// The metadata value under a key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A metadata value read as an unsigned integer (see [`Value::as_u64`]).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// A metadata value read as a float (see [`Value::as_f64`]).
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// A metadata value that is a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// `general.architecture`: the model family as llama.cpp names it (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }
}

/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Metadata arrays hold scalars or strings, or arrays of them; deeper nesting is refused rather
/// than followed until the stack runs out.
const MAX_ARRAY_DEPTH: usize = 4;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "unexpected end of file at byte {} (needed {n} more bytes)",
                    self.pos
                )
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.bytes(N)?.try_into().unwrap())
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()? as usize;
        let bytes = self.bytes(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// A metadata value of type `ty`, `depth` arrays deep.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"));
                }
                let item_ty = self.u32()?;
                let n = self.u64()?;
                // Each item takes at least this many bytes of what is left of the file.
                let least = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let left = (self.buf.len() - self.pos) as u64;
                if n > left / least {
                    return Err(format!(
                        "array length {n} needs more than the {left} bytes left in the file"
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_reads_back_from_its_id_under_ggmls_name() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Ok(t));
        }
        let names: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(
            names,
            [
                "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"
            ]
        );
        assert_eq!(GgmlType::from_id(16), Err("IQ2_XXS (type id 16)".into()));
    }
}
