//! Writing safetensors shards without holding a whole model in memory: the header is planned
//! from shapes and dtypes, then each group of tensors (one module's weight, scales and biases)
//! is produced, written and dropped in turn.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use super::RawDtype;

/// One tensor to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    /// The name in the header.
    pub name: String,
    /// The element type to write.
    pub dtype: RawDtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    /// A tensor of this name, element type and shape (outermost first).
    pub fn new(name: impl Into<String>, dtype: RawDtype, shape: &[usize]) -> Self {
        PlannedTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of the tensor's data: elements times the element size.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Tensors produced together, in order.
pub type Group = Vec<PlannedTensor>;

/// Where the shards went: file names and, per tensor, its shard.
pub struct WrittenShards {
    /// The shard file names, in order.
    pub files: Vec<String>,
    /// Each tensor's name to the file name of the shard it went into.
    pub weight_map: BTreeMap<String, String>,
    /// Bytes of tensor data over all shards, headers excluded (the index's `total_size`).
    pub total_bytes: usize,
}

/// Writes `groups` into `dir` as `model.safetensors`, or `model-0000i-of-0000N.safetensors` when
/// they pass `max_shard_bytes` (a group never straddles two shards). `produce(i)` returns the
/// bytes of group `i`'s tensors, in order.
pub fn write_shards(
    dir: &Path,
    groups: &[Group],
    max_shard_bytes: usize,
    metadata: &[(&str, &str)],
    mut produce: impl FnMut(usize) -> Result<Vec<Vec<u8>>>,
) -> Result<WrittenShards> {
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut filled = 0;
    for (i, group) in groups.iter().enumerate() {
        let len: usize = group.iter().map(PlannedTensor::byte_len).sum();
        if filled > 0 && filled + len > max_shard_bytes {
            shards.push(vec![]);
            filled = 0;
        }
        shards.last_mut().expect("one shard at least").push(i);
        filled += len;
    }
    let count = shards.len();
    let name_of = |s: usize| match count {
        1 => "model.safetensors".to_string(),
        n => format!("model-{:05}-of-{n:05}.safetensors", s + 1),
    };
    let mut written = WrittenShards {
        files: vec![],
        weight_map: BTreeMap::new(),
        total_bytes: 0,
    };
    for (s, members) in shards.iter().enumerate() {
        let file_name = name_of(s);
        let path = dir.join(&file_name);
        let tensors: Vec<&PlannedTensor> = members.iter().flat_map(|&g| &groups[g]).collect();
        let header = header_bytes(&tensors, metadata)?;
        let mut write = || -> Result<()> {
            let mut out = BufWriter::new(File::create(&path)?);
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(&header)?;
            for &g in members {
                let bytes = produce(g)?;
                for (planned, data) in groups[g].iter().zip(&bytes) {
                    if data.len() != planned.byte_len() {
                        bail!(
                            "internal: `{}` produced {} bytes, planned {}",
                            planned.name,
                            data.len(),
                            planned.byte_len()
                        );
                    }
                    out.write_all(data)?;
                }
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(())
        };
        write().with_context(|| format!("writing {}", path.display()))?;
        for t in &tensors {
            written.weight_map.insert(t.name.clone(), file_name.clone());
            written.total_bytes += t.byte_len();
        }
        written.files.push(file_name);
    }
    Ok(written)
}

/// The JSON header, padded with spaces to a multiple of 8 bytes as safetensors writes it.
fn header_bytes(tensors: &[&PlannedTensor], metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        map.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0;
    for t in tensors {
        let end = offset + t.byte_len();
        map.insert(
            t.name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(map))?;
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    Ok(bytes)
}

/// `model.safetensors.index.json` for the written shards.
pub fn index_json(written: &WrittenShards, total_parameters: usize) -> Value {
    json!({
        "metadata": {"total_size": written.total_bytes, "total_parameters": total_parameters},
        "weight_map": written.weight_map,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::SafetensorsStore;

    #[test]
    fn shards_split_by_size_and_read_back() {
        let dir = std::env::temp_dir().join(format!("lf-st-write-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let groups: Vec<Group> = (0..3)
            .map(|i| {
                vec![
                    PlannedTensor::new(format!("t{i}.weight"), RawDtype::F32, &[2, 3]),
                    PlannedTensor::new(format!("t{i}.scales"), RawDtype::U32, &[1]),
                ]
            })
            .collect();
        let produce = |g: usize| -> Result<Vec<Vec<u8>>> {
            let w: Vec<u8> = (0..6)
                .flat_map(|k| (g as f32 * 10.0 + k as f32).to_le_bytes())
                .collect();
            Ok(vec![w, (g as u32).to_le_bytes().to_vec()])
        };
        // 28 bytes a group: two groups fit in 60 bytes, the third starts a new shard.
        let written = write_shards(&dir, &groups, 60, &[("format", "mlx")], produce).unwrap();
        assert_eq!(
            written.files,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let files: Vec<_> = written.files.iter().map(|f| dir.join(f)).collect();
        let store = SafetensorsStore::open_files(&files).unwrap();
        assert_eq!(
            store.get("t2.weight").unwrap().to_f32().unwrap(),
            [20.0, 21.0, 22.0, 23.0, 24.0, 25.0]
        );
        assert_eq!(store.get("t1.scales").unwrap().to_u32().unwrap(), [1]);
        assert_eq!(store.file_metadata()["format"], "mlx");
        assert_eq!(written.weight_map["t2.scales"], written.files[1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
