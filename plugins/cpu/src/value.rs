//! The interpreter's value: a row-major f32 tensor viewing shared storage.
//!
//! Storage is either a caller's [`HostTensor`] (inputs and parameters, possibly memory
//! mapped: never copied) or a buffer the backend computed (recycled through
//! [`crate::pool`]). A value is `shape` elements starting at `offset` of its storage, so a
//! reshape, or a slice of a contiguous range, shares the storage; a kernel may reuse the
//! buffer of an operand nobody else holds ([`Value::into_unique`]).

use std::sync::Arc;

use eptc_ir::HostTensor;

use crate::pool::Buf;

#[derive(Clone, Debug)]
enum Data {
    Host(HostTensor),
    Owned(Arc<Buf>),
}

#[derive(Clone, Debug)]
pub struct Value {
    shape: Vec<usize>,
    offset: usize,
    data: Data,
}

impl Value {
    /// A computed buffer; `data.len()` must equal the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Value {
            shape,
            offset: 0,
            data: Data::Owned(Arc::new(Buf(data))),
        }
    }

    /// Wrap a host tensor without copying it (its data length is checked by the caller).
    pub fn host(t: HostTensor) -> Self {
        Value {
            shape: t.shape.clone(),
            offset: 0,
            data: Data::Host(t),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn storage(&self) -> &[f32] {
        match &self.data {
            Data::Host(t) => t.data(),
            Data::Owned(b) => &b.0,
        }
    }

    pub fn data(&self) -> &[f32] {
        &self.storage()[self.offset..self.offset + self.numel()]
    }

    /// The same elements under a new shape (same count; checked by the caller).
    pub fn reshaped(&self, shape: Vec<usize>) -> Value {
        debug_assert_eq!(shape.iter().product::<usize>(), self.numel());
        Value {
            shape,
            offset: self.offset,
            data: self.data.clone(),
        }
    }

    /// The `shape` elements starting `start` elements into this value (in bounds;
    /// checked by the caller).
    pub fn view(&self, start: usize, shape: Vec<usize>) -> Value {
        debug_assert!(start + shape.iter().product::<usize>() <= self.numel());
        Value {
            shape,
            offset: self.offset + start,
            data: self.data.clone(),
        }
    }

    /// Whether the value covers its whole storage (no view of a larger buffer).
    fn whole(&self) -> bool {
        self.offset == 0 && self.storage().len() == self.numel()
    }

    /// The buffer itself if this value is its only holder and covers all of it, so a
    /// kernel can write its result in place; otherwise the value back.
    pub fn into_unique(self) -> Result<Vec<f32>, Value> {
        if !self.whole() {
            return Err(self);
        }
        match self.data {
            Data::Owned(b) => Arc::try_unwrap(b).map(Buf::into_vec).map_err(|b| Value {
                shape: self.shape,
                offset: 0,
                data: Data::Owned(b),
            }),
            d @ Data::Host(_) => Err(Value {
                shape: self.shape,
                offset: 0,
                data: d,
            }),
        }
    }

    /// A host tensor for the caller: shares the storage when it can (a reshaped input
    /// stays the caller's buffer), moves a buffer nobody else holds, copies otherwise.
    pub fn into_host(self) -> HostTensor {
        if let (true, Data::Host(t)) = (self.whole(), &self.data) {
            let mut t = t.clone();
            t.shape = self.shape;
            return t;
        }
        let shape = self.shape.clone();
        match self.into_unique() {
            Ok(v) => HostTensor::new(shape, v),
            Err(v) => HostTensor::new(shape, v.data().to_vec()),
        }
    }
}
