//! GGUF writer (version 3), the mirror of [`super::gguf`]: header, metadata, tensor directory
//! (dims innermost-first), then each tensor's data aligned to 32 bytes. Tensor data is produced
//! one tensor at a time so a large model never sits in memory whole.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::gguf::{GgmlType, Value};

const ALIGNMENT: usize = 32;

/// A tensor to be written: row-major `shape` (outermost first), as [`super::gguf::TensorInfo`].
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// The name in llama.cpp's naming (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, outermost first (written innermost-first, as GGUF stores them).
    pub shape: Vec<usize>,
    /// The encoding to write its elements in.
    pub kind: GgmlType,
}

impl GgufTensor {
    /// Bytes of the tensor's data in its encoding, without the padding that follows it.
    pub fn byte_len(&self) -> usize {
        let (per_block, block_bytes) = self.kind.block();
        self.shape.iter().product::<usize>() / per_block * block_bytes
    }
}

/// Writes a GGUF file; `produce(i)` returns tensor `i`'s encoded bytes.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[GgufTensor],
    mut produce: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut run = || -> Result<()> {
        let mut out = Counting::new(BufWriter::new(File::create(path)?));
        out.put(b"GGUF")?;
        out.put(&3u32.to_le_bytes())?;
        out.put(&(tensors.len() as u64).to_le_bytes())?;
        out.put(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in metadata {
            put_string(&mut out, key)?;
            out.put(&type_id(value).to_le_bytes())?;
            put_value(&mut out, value)?;
        }
        let mut offset = 0usize;
        for t in tensors {
            put_string(&mut out, &t.name)?;
            out.put(&(t.shape.len() as u32).to_le_bytes())?;
            for &d in t.shape.iter().rev() {
                out.put(&(d as u64).to_le_bytes())?;
            }
            out.put(&t.kind.id().to_le_bytes())?;
            out.put(&(offset as u64).to_le_bytes())?;
            offset = (offset + t.byte_len()).next_multiple_of(ALIGNMENT);
        }
        out.pad()?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = produce(i)?;
            if bytes.len() != t.byte_len() {
                bail!(
                    "internal: `{}` encoded to {} bytes, expected {}",
                    t.name,
                    bytes.len(),
                    t.byte_len()
                );
            }
            out.put(&bytes)?;
            out.pad()?;
        }
        out.inner
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        Ok(())
    };
    run().with_context(|| format!("writing {}", path.display()))
}

/// Counts bytes so padding to the alignment needs no seeking.
struct Counting<W: Write> {
    inner: W,
    written: usize,
}

impl<W: Write> Counting<W> {
    fn new(inner: W) -> Self {
        Counting { inner, written: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.written += bytes.len();
        self.inner.write_all(bytes)
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let zeros = self.written.next_multiple_of(ALIGNMENT) - self.written;
        self.put(&vec![0u8; zeros])
    }
}

fn put_string<W: Write>(out: &mut Counting<W>, s: &str) -> std::io::Result<()> {
    out.put(&(s.len() as u64).to_le_bytes())?;
    out.put(s.as_bytes())
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value<W: Write>(out: &mut Counting<W>, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => out.put(&[*x]),
        Value::I8(x) => out.put(&x.to_le_bytes()),
        Value::U16(x) => out.put(&x.to_le_bytes()),
        Value::I16(x) => out.put(&x.to_le_bytes()),
        Value::U32(x) => out.put(&x.to_le_bytes()),
        Value::I32(x) => out.put(&x.to_le_bytes()),
        Value::F32(x) => out.put(&x.to_le_bytes()),
        Value::Bool(x) => out.put(&[u8::from(*x)]),
        Value::String(s) => put_string(out, s),
        Value::U64(x) => out.put(&x.to_le_bytes()),
        Value::I64(x) => out.put(&x.to_le_bytes()),
        Value::F64(x) => out.put(&x.to_le_bytes()),
        Value::Array(items) => {
            // An empty array's item type is irrelevant to readers; string is what llama.cpp uses.
            let item_type = items.first().map_or(8, type_id);
            out.put(&item_type.to_le_bytes())?;
            out.put(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| put_value(out, item))
        }
    }
}
