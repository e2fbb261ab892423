//! Softmax along any axis and LayerNorm over the last axis.
//!
//! Both memory bound (a row is read twice and written once, and stays in L1 between
//! passes). Rows go to tasks in chunks; a softmax along an inner axis works on whole
//! `[n, inner]` blocks so every pass over the block is contiguous.

use rayon::prelude::*;

use crate::fastmath;
use crate::layout::chunk_len;
use crate::pool;
use crate::value::Value;

/// Softmax of `x` along `axis` (checked in range); max-subtracted, so stable.
pub fn softmax(x: Value, axis: usize) -> Value {
    let shape = x.shape().to_vec();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    if x.numel() == 0 {
        return x;
    }
    let buf = if inner == 1 {
        rows_in_place(x, n, fastmath::softmax_row)
    } else {
        rows_in_place(x, n * inner, |b| {
            let mut max = vec![0.0f32; inner];
            let mut sum = vec![0.0f64; inner];
            softmax_block(b, inner, &mut max, &mut sum);
        })
    };
    Value::new(shape, buf)
}

/// Apply `f` to every row of `len` elements of `x`, in parallel chunks of rows: in `x`'s
/// buffer when nothing else holds it, else row by row into a new buffer (each row copied
/// first, so it is in L1 when `f` works on it).
fn rows_in_place(x: Value, len: usize, f: impl Fn(&mut [f32]) + Sync) -> Vec<f32> {
    rows_in_place_at(x, len, |_, row| f(row))
}

/// [`rows_in_place`] with `f` also given the row's index (`x` not empty, `len > 0`).
pub(crate) fn rows_in_place_at(
    x: Value,
    len: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let chunk = chunk_len(x.numel(), len);
    let per = chunk / len;
    match x.into_unique() {
        Ok(mut buf) => {
            buf.par_chunks_mut(chunk).enumerate().for_each(|(c, ch)| {
                for (i, row) in ch.chunks_mut(len).enumerate() {
                    f(c * per + i, row);
                }
            });
            buf
        }
        Err(x) => {
            let src = x.data();
            let mut out = pool::alloc(src.len());
            out.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .enumerate()
                .for_each(|(c, (o, s))| {
                    for (i, (o, s)) in o.chunks_mut(len).zip(s.chunks(len)).enumerate() {
                        o.copy_from_slice(s);
                        f(c * per + i, o);
                    }
                });
            out
        }
    }
}

/// Softmax along the outer axis of a row-major `[n, inner]` block, in place.
fn softmax_block(b: &mut [f32], inner: usize, max: &mut [f32], sum: &mut [f64]) {
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    for row in b.chunks(inner) {
        for (m, &v) in max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    for row in b.chunks_mut(inner) {
        for ((v, &m), s) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *v = fastmath::exp_nonpos_f32::<false>(*v - m);
            *s += f64::from(*v);
        }
    }
    let recip: Vec<f32> = sum.iter().map(|&s| (1.0 / s) as f32).collect();
    for row in b.chunks_mut(inner) {
        for (v, &r) in row.iter_mut().zip(&recip) {
            *v *= r;
        }
    }
}

/// The gradient of LayerNorm with respect to `x` (`layernorm_grad`), row by row in place
/// of `dy`: statistics recomputed from `x` in f64, then one pass for the two means and
/// one for the result. Memory bound: `x` read three times, `dy` twice, one write.
pub fn layernorm_grad(x: &Value, gamma: &[f32], dy: Value, eps: f32) -> Value {
    let shape = dy.shape().to_vec();
    let d = gamma.len();
    if dy.numel() == 0 || d == 0 {
        return dy;
    }
    let xs = x.data();
    let buf = rows_in_place_at(dy, d, |i, row| {
        fastmath::layernorm_grad_row(row, &xs[i * d..(i + 1) * d], gamma, eps)
    });
    Value::new(shape, buf)
}

/// LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * gamma + beta`, biased
/// variance (as PyTorch), statistics in f64 over two passes.
pub fn layernorm(x: Value, gamma: &[f32], beta: &[f32], eps: f32) -> Value {
    let shape = x.shape().to_vec();
    let d = gamma.len();
    if x.numel() == 0 || d == 0 {
        return x;
    }
    let buf = rows_in_place(x, d, |row| fastmath::layernorm_row(row, gamma, beta, eps));
    Value::new(shape, buf)
}
