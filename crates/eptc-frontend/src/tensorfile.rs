//! Reading and writing safetensors files of f32 host tensors (models, adapters, tensor
//! inputs and outputs). Reads memory-map the file; f32 tensors stay mapped when aligned.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use eptc_ir::HostTensor;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{FrontendError, Result};

/// The tensors of one safetensors file, converted to f32, plus its metadata.
#[derive(Debug, Clone)]
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, HostTensor>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Memory-map and read `path`. Integer tensors are refused by name.
    pub fn read(path: &Path) -> Result<TensorFile> {
        let io = |source| FrontendError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath us is the user's
        // responsibility, as with every memory-mapped reader of checkpoints.
        let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(io)?);
        Self::from_map(path, map)
    }

    /// Read a safetensors file held in memory (`path` only names it in errors): the
    /// bytes are copied into an anonymous read-only map, then read exactly as
    /// [`TensorFile::read`] reads a file (the same parsing, checks and f32 mapping).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<TensorFile> {
        let io = |source| FrontendError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).map_err(io)?;
        map.copy_from_slice(bytes);
        Self::from_map(path, Arc::new(map.make_read_only().map_err(io)?))
    }

    fn from_map(path: &Path, map: Arc<Mmap>) -> Result<TensorFile> {
        let fmt = |msg: String| FrontendError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| fmt(e.to_string()))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| fmt(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let shape = view.shape().to_vec();
            let bytes = view.data();
            let t = match view.dtype() {
                Dtype::F32 => {
                    let offset = bytes.as_ptr() as usize - map.as_ptr() as usize;
                    HostTensor::mapped(shape.clone(), map.clone(), offset).unwrap_or_else(|| {
                        HostTensor::new(
                            shape,
                            decode(bytes, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                        )
                    })
                }
                Dtype::F16 => HostTensor::new(
                    shape,
                    decode(bytes, 2, |b| {
                        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
                    }),
                ),
                Dtype::BF16 => HostTensor::new(
                    shape,
                    decode(bytes, 2, |b| {
                        half::bf16::from_le_bytes([b[0], b[1]]).to_f32()
                    }),
                ),
                Dtype::F64 => HostTensor::new(
                    shape,
                    decode(bytes, 8, |b| {
                        f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32
                    }),
                ),
                other => {
                    return Err(FrontendError::Dtype {
                        path: path.to_path_buf(),
                        key: name.to_string(),
                        dtype: format!("{other:?}"),
                    })
                }
            };
            tensors.insert(name.to_string(), t);
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    /// The tensor `key`, or an error naming the file, the key and the expected shape.
    pub fn get(&self, key: &str, expected: &str) -> Result<&HostTensor> {
        self.tensors
            .get(key)
            .ok_or_else(|| FrontendError::MissingTensor {
                path: self.path.clone(),
                key: key.to_string(),
                expected: expected.to_string(),
            })
    }

    /// The tensor `key`, checked against `shape`.
    pub fn get_shaped(&self, key: &str, shape: &[usize]) -> Result<&HostTensor> {
        let t = self.get(key, &format!("{shape:?}"))?;
        if t.shape != shape {
            return Err(FrontendError::TensorShape {
                path: self.path.clone(),
                key: key.to_string(),
                expected: format!("{shape:?}"),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }
}

fn decode(bytes: &[u8], size: usize, f: impl Fn(&[u8]) -> f32) -> Vec<f32> {
    bytes.chunks_exact(size).map(f).collect()
}

/// Write f32 tensors (and string metadata) to `path` atomically: a temporary file in the
/// same folder, then a rename, so a crash never leaves a half-written file.
pub fn write_tensors(
    path: &Path,
    tensors: &[(&str, &HostTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    struct V<'a>(&'a HostTensor);
    impl safetensors::View for V<'_> {
        fn dtype(&self) -> Dtype {
            Dtype::F32
        }
        fn shape(&self) -> &[usize] {
            &self.0.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            self.0
                .data()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into()
        }
        fn data_len(&self) -> usize {
            self.0.numel() * 4
        }
    }
    let tmp = path.with_extension("safetensors.tmp");
    let views: Vec<(&str, V)> = tensors.iter().map(|(n, t)| (*n, V(t))).collect();
    // Written and flushed to the disk (fsync) before the rename: a crash, a power loss or
    // a full disk leaves the previous `path` intact; a failed write removes its temporary
    // file. `safetensors::serialize_to_file` streams, but into a temporary file of its
    // own that it renames without an fsync; here the serialized bytes are held once in
    // memory instead (at most the file's size: ~0.7 GB for the state of a full
    // fine-tune of ViT-B/16) and written, synced and renamed by eptc.
    let written = safetensors::serialize(views, metadata)
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|bytes| {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(FrontendError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                e.kind(),
                format!("{e} (the previous file, if any, is intact)"),
            ),
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| FrontendError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sync_parent(path);
    Ok(())
}

/// Flush a folder's entry list after a rename into it, so the new name survives a power
/// loss (best effort: not every file system supports it).
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
