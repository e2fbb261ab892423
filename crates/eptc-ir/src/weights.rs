//! Host tensors and the weight store. Frozen weights stay memory-mapped when the file
//! allows it (f32, little-endian, 4-byte aligned); everything else is owned.

use std::collections::BTreeMap;
use std::sync::Arc;

use memmap2::Mmap;

#[derive(Clone, Debug)]
enum Storage {
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<f32>>),
}

/// An f32 tensor on the host, cheap to clone (shared storage).
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    storage: Storage,
}

impl HostTensor {
    /// An owned tensor; panics if `data` does not match `shape` (a caller bug).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data does not match shape {shape:?}"
        );
        HostTensor {
            shape,
            storage: Storage::Owned(Arc::new(data)),
        }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        HostTensor::new(shape, vec![0.0; n])
    }

    /// A view of `len` f32 values at byte `offset` of a mapped file. Returns `None` when
    /// the data cannot be viewed in place (misaligned or big-endian host): copy instead.
    pub fn mapped(shape: Vec<usize>, map: Arc<Mmap>, offset: usize) -> Option<Self> {
        let len: usize = shape.iter().product();
        // `wrapping_add`: a hostile offset must not overflow (it fails the bounds check).
        let aligned = map.as_ptr().wrapping_add(offset).cast::<f32>().is_aligned();
        if cfg!(target_endian = "big") || !aligned {
            return None;
        }
        if offset.checked_add(len.checked_mul(4)?)? > map.len() {
            return None;
        }
        Some(HostTensor {
            shape,
            storage: Storage::Mapped { map, offset, len },
        })
    }

    pub fn data(&self) -> &[f32] {
        match &self.storage {
            Storage::Owned(v) => v,
            Storage::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + *len * 4];
                // SAFETY: alignment, bounds and endianness were checked in `mapped`; the map
                // is read-only and outlives the borrow through the Arc.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, *len) }
            }
        }
    }

    /// The values, copied out if they are shared or mapped.
    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Owned(v) => Arc::try_unwrap(v).unwrap_or_else(|v| (*v).clone()),
            s @ Storage::Mapped { .. } => HostTensor {
                shape: vec![],
                storage: s,
            }
            .data()
            .to_vec(),
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Named parameter values: the frozen weights of a checkpoint and the adapter's tensors.
#[derive(Clone, Debug, Default)]
pub struct WeightStore {
    tensors: BTreeMap<String, HostTensor>,
}

impl WeightStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, name: impl Into<String>, t: HostTensor) {
        self.tensors.insert(name.into(), t);
    }
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }
    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &HostTensor)> {
        self.tensors.iter()
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}
