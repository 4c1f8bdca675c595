//! Memory-mapped safetensors: one file, or shards listed in `model.safetensors.index.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use super::raw::{RawDtype, RawTensor};

/// Why safetensors weights could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// A file or folder could not be opened, listed or memory-mapped.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The header does not parse, or promises more tensor data than the file holds.
    #[error(
        "{path} is not a valid safetensors file ({reason}); it may be truncated or corrupt: download it again"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A tensor's element type is not one [`RawDtype`] has (F64, F8, ...).
    #[error("{path}: tensor `{name}` has unsupported type {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The type as the safetensors crate names it.
        dtype: String,
    },
    /// `model.safetensors.index.json` cannot be read, or has no `weight_map` object.
    #[error("cannot read {path}: {reason}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The folder has neither `model.safetensors`, an index, nor any `*.safetensors` file.
    #[error(
        "no safetensors weights in {0} (expected model.safetensors or model.safetensors.index.json)"
    )]
    NoWeights(PathBuf),
}

struct Entry {
    shard: usize,
    dtype: RawDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    metadata: BTreeMap<String, String>,
}

/// All tensors of a model folder, memory-mapped; nothing is copied until asked for.
pub struct SafetensorsStore {
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

impl SafetensorsStore {
    /// Opens the weights of a Hugging Face or mlx-community folder.
    pub fn open_folder(dir: &Path) -> Result<Self, SafetensorsError> {
        let index = dir.join("model.safetensors.index.json");
        let files = if index.exists() {
            shard_files_from_index(&index)?
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| SafetensorsError::Open {
                    path: dir.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if files.is_empty() {
            return Err(SafetensorsError::NoWeights(dir.to_path_buf()));
        }
        Self::open_files(&files)
    }

    /// Opens the given files as one store; a name found twice keeps the later file's tensor.
    pub fn open_files(files: &[PathBuf]) -> Result<Self, SafetensorsError> {
        let mut store = SafetensorsStore {
            shards: Vec::new(),
            entries: BTreeMap::new(),
        };
        for path in files {
            store.add_shard(path)?;
        }
        Ok(store)
    }

    fn add_shard(&mut self, path: &Path) -> Result<(), SafetensorsError> {
        let file = File::open(path).map_err(|source| SafetensorsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is opened read-only and we only read through the map; a model file
        // changed underneath a running process is outside what any loader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| SafetensorsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |reason: String| SafetensorsError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let (header_len, metadata): (usize, Metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| corrupt(format!("{e:?}")))?;
        let data_start = 8 + header_len;
        let data_len = metadata.data_len();
        if map.len() < data_start + data_len {
            return Err(corrupt(format!(
                "the header promises {} bytes of tensor data but the file holds {}",
                data_len,
                map.len().saturating_sub(data_start)
            )));
        }
        let shard = self.shards.len();
        for (name, info) in metadata.tensors() {
            let dtype =
                raw_dtype(info.dtype).ok_or_else(|| SafetensorsError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    dtype: format!("{:?}", info.dtype),
                })?;
            let (start, end) = info.data_offsets;
            self.entries.insert(
                name,
                Entry {
                    shard,
                    dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                },
            );
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            metadata: metadata
                .metadata()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            map,
        });
        Ok(())
    }

    /// A borrowed view of tensor `name`, if the store has it.
    pub fn get(&self, name: &str) -> Option<RawTensor<'_>> {
        let (key, e) = self.entries.get_key_value(name)?;
        Some(RawTensor {
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &self.shards[e.shard].map[e.start..e.end],
        })
    }

    /// Lets the pages of tensor `name` leave memory (see [`super::release_pages`]).
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            super::release_pages(&self.shards[e.shard].map, e.start, e.end - e.start);
        }
    }

    /// Whether a tensor of that name is in any shard.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor name, in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Every tensor, in name order.
    pub fn tensors(&self) -> impl Iterator<Item = RawTensor<'_>> {
        self.names().filter_map(|n| self.get(n))
    }

    /// The file a tensor lives in, for error messages.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.entries
            .get(name)
            .map(|e| self.shards[e.shard].path.as_path())
    }

    /// The `__metadata__` of the first shard (mlx writes `{"format": "mlx"}` there).
    pub fn file_metadata(&self) -> &BTreeMap<String, String> {
        &self.shards[0].metadata
    }
}

fn shard_files_from_index(index: &Path) -> Result<Vec<PathBuf>, SafetensorsError> {
    let err = |reason: String| SafetensorsError::Index {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| err(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err("no `weight_map` object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn raw_dtype(dtype: Dtype) -> Option<RawDtype> {
    Some(match dtype {
        Dtype::F32 => RawDtype::F32,
        Dtype::F16 => RawDtype::F16,
        Dtype::BF16 => RawDtype::BF16,
        Dtype::U32 => RawDtype::U32,
        Dtype::I32 => RawDtype::I32,
        Dtype::I64 => RawDtype::I64,
        Dtype::U8 => RawDtype::U8,
        Dtype::I8 => RawDtype::I8,
        _ => return None,
    })
}
