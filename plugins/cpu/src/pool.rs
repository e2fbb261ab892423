//! Recycled output buffers. A ViT forward pass allocates and frees hundreds of
//! megabytes of intermediates; fresh allocations of that size come from the kernel as
//! zeroed pages (a fault per page, then a memset), which costs as much as the
//! element-wise ops themselves. Each executable keeps the buffers its run freed and hands
//! them out again, already faulted in and never zeroed (kernels overwrite every element).
//!
//! The executable makes its pool the *active* one on the interpreter's thread for the
//! length of a run ([`BufferPool::activate`]); [`alloc`] takes from the active pool and a
//! dropped [`Buf`] goes back to it. On any other thread both fall back to the allocator.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// Free buffers kept at most; past that the smallest are released.
const MAX_FREE: usize = 64;

#[derive(Debug, Default)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
}

thread_local! {
    static ACTIVE: RefCell<Option<Arc<BufferPool>>> = const { RefCell::new(None) };
}

/// While alive, `pool` is the active pool of this thread.
pub struct Active(Option<Arc<BufferPool>>);

impl Drop for Active {
    fn drop(&mut self) {
        let prev = self.0.take();
        let _ = ACTIVE.try_with(|a| *a.borrow_mut() = prev);
    }
}

impl BufferPool {
    pub fn activate(self: &Arc<Self>) -> Active {
        let prev = ACTIVE.with(|a| a.borrow_mut().replace(Arc::clone(self)));
        Active(prev)
    }

    /// The smallest free buffer holding `n` values without wasting more than half.
    fn take(&self, n: usize) -> Option<Vec<f32>> {
        let mut free = self.free.lock().ok()?;
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n && v.capacity() <= 2 * n.max(1024))
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)?;
        let mut v = free.swap_remove(best);
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        Some(v)
    }

    fn put(&self, v: Vec<f32>) {
        if let Ok(mut free) = self.free.lock() {
            free.push(v);
            if free.len() > MAX_FREE {
                let smallest = (0..free.len())
                    .min_by_key(|&i| free[i].capacity())
                    .expect("not empty");
                free.swap_remove(smallest);
            }
        }
    }
}

/// A buffer of `n` values whose contents are unspecified (the caller overwrites them).
pub fn alloc(n: usize) -> Vec<f32> {
    ACTIVE
        .try_with(|a| a.borrow().as_ref().and_then(|p| p.take(n)))
        .ok()
        .flatten()
        .unwrap_or_else(|| vec![0.0; n])
}

/// A computed buffer that returns to the active pool when dropped.
#[derive(Debug)]
pub struct Buf(pub Vec<f32>);

impl Buf {
    /// The vector itself, which then will not be recycled.
    pub fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() == 0 {
            return;
        }
        let _ = ACTIVE.try_with(|a| {
            if let Some(p) = a.borrow().as_ref() {
                p.put(v);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_while_active() {
        let pool = Arc::new(BufferPool::default());
        let guard = pool.activate();
        let v = alloc(5000);
        let p = v.as_ptr();
        drop(Buf(v));
        let again = alloc(4000);
        assert_eq!(again.as_ptr(), p, "recycled");
        assert_eq!(again.len(), 4000);
        // Too small a request for that buffer: a fresh one.
        drop(Buf(again));
        let small = alloc(10);
        assert_ne!(small.as_ptr(), p);
        drop(guard);
        // Inactive: plain allocations.
        assert_eq!(alloc(3), vec![0.0; 3]);
    }
}
