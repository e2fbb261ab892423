//! Data movement: permute, broadcast and patchify are one strided gather; concat and
//! slice copy contiguous runs. (Reshape moves nothing: see `Value::reshaped`.)
//!
//! All memory bound: the gather merges dims so its inner loop is as long as possible and
//! a plain copy whenever the innermost dim is contiguous in the source.

use rayon::prelude::*;

use crate::layout::{broadcast_strides, chunk_len, contiguous_strides, merge_dims, Odometer};
use crate::pool;
use crate::value::Value;

/// `out[i] = src[sum_d i_d * strides[d]]` over the row-major index space `out_shape`.
pub fn gather(src: &[f32], out_shape: &[usize], strides: &[usize]) -> Vec<f32> {
    let n: usize = out_shape.iter().product();
    let mut out = pool::alloc(n);
    if n == 0 {
        return out;
    }
    let (dims, st) = merge_dims(out_shape, &[strides.to_vec()]);
    let st = &st[0];
    let inner = *dims.last().expect("at least one dim");
    let step = *st.last().expect("at least one dim");
    let chunk = chunk_len(n, inner);
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
        let mut odo = Odometer::new(&dims, [st], c * chunk / inner);
        for row in o.chunks_mut(inner) {
            let base = odo.offs[0];
            match step {
                0 => row.fill(src[base]),
                1 => row.copy_from_slice(&src[base..base + inner]),
                _ => {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = src[base + j * step];
                    }
                }
            }
            odo.advance();
        }
    });
    out
}

/// `x` with its axes reordered: output axis `i` is input axis `perm[i]`.
pub fn permute(x: &Value, perm: &[usize]) -> Value {
    let own = contiguous_strides(x.shape());
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| own[p]).collect();
    let out = gather(x.data(), &shape, &strides);
    Value::new(shape, out)
}

/// `x` broadcast (numpy rules, checked) to `shape`.
pub fn broadcast(x: &Value, shape: Vec<usize>) -> Value {
    let strides = broadcast_strides(x.shape(), &shape);
    let out = gather(x.data(), &shape, &strides);
    Value::new(shape, out)
}

/// `[B, C, H, W] -> [B, (H/p)(W/p), C*p*p]`: patches row-major over the grid, features
/// `(c, kh, kw)`. As a gather: the output is `[B, gh, gw, C, p, p]` reading
/// `x[b, c, gy*p + kh, gx*p + kw]`.
pub fn patchify(x: &Value, p: usize) -> Value {
    let &[b, c, h, w] = x.shape() else {
        unreachable!("rank checked by the shape rule")
    };
    let (gh, gw) = (h / p, w / p);
    let gather_shape = [b, gh, gw, c, p, p];
    let strides = [c * h * w, p * w, p, h * w, w, 1];
    let out = gather(x.data(), &gather_shape, &strides);
    Value::new(vec![b, gh * gw, c * p * p], out)
}

/// The concatenation of `parts` along `axis` (other dims checked equal).
pub fn concat(parts: &[Value], axis: usize, out_shape: Vec<usize>) -> Value {
    let outer: usize = out_shape[..axis].iter().product();
    let inner: usize = out_shape[axis + 1..].iter().product();
    let runs: Vec<usize> = parts.iter().map(|p| p.shape()[axis] * inner).collect();
    let row: usize = runs.iter().sum();
    let mut out = pool::alloc(outer * row);
    if out.is_empty() {
        return Value::new(out_shape, out);
    }
    let chunk = chunk_len(out.len(), row);
    let rows_per = chunk / row;
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
        for (r, orow) in o.chunks_mut(row).enumerate() {
            let i = c * rows_per + r;
            let mut at = 0;
            for (p, &len) in parts.iter().zip(&runs) {
                orow[at..at + len].copy_from_slice(&p.data()[i * len..(i + 1) * len]);
                at += len;
            }
        }
    });
    Value::new(out_shape, out)
}

/// Elements `start..end` of `x` along `axis` (checked in range).
pub fn slice(x: &Value, axis: usize, start: usize, end: usize) -> Value {
    let shape = x.shape();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    out_shape[axis] = end - start;
    if shape[..axis].iter().all(|&d| d == 1) {
        // One contiguous range: a view, no copy.
        return x.view(start * inner, out_shape);
    }
    let strides = contiguous_strides(shape);
    // A gather from the slice's first element with the input's strides.
    let src = &x.data()[start * inner..];
    let out = gather(src, &out_shape, &strides);
    Value::new(out_shape, out)
}
