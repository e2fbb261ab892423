//! Fused attention, `softmax_sink(scale * q k^T, z) v`, and the softmax with a sink
//! logit on its own.
//!
//! Attention runs one entry of the leading axes (a batch element and head) per task: the
//! scores `S = scale * q k^T` go into a per-task `[N, M]` scratch with a single-threaded
//! GEMM, each row is normalised in place, then `O = P v` is a second GEMM into the output.
//! The scores of the whole batch (`[B, H, N, M]`) never exist, so an entry's q, k, v, S
//! and O stay in the core's L2 (ViT-B: 5 x ~50-155 KB) and both GEMMs are compute bound
//! (2 N M d flops each against ~(N + M) d + N M values touched); the softmax between them
//! (one exp per score) works on rows already in cache. With fewer entries than threads
//! the GEMMs are split across the threads instead.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::fastmath;
use crate::layout::{broadcast_strides, rows_per_task};
use crate::matmul::{gemm_one, Epilogue, Mat};
use crate::norm::rows_in_place_at;
use crate::pool;
use crate::shape_ops;
use crate::value::Value;

/// `z` broadcast to `rows` (the row shape, last dim 1): one sink logit per row,
/// contiguous.
fn sink_per_row(z: &Value, rows: Vec<usize>) -> Value {
    if z.shape() == rows.as_slice() {
        return z.clone();
    }
    shape_ops::broadcast(z, rows)
}

/// Softmax along the last axis of `s` with the extra logit `z` per row (`z` broadcasts
/// to `s`'s shape with the last dim 1; checked). In `s`'s buffer when it is free.
/// Memory bound, like the softmax: a row is read twice and written once, from L1.
pub fn softmax_sink(s: Value, z: &Value) -> Value {
    let shape = s.shape().to_vec();
    let m = *shape.last().expect("rank >= 1 (checked)");
    if s.numel() == 0 {
        return s;
    }
    let mut rows = shape.clone();
    *rows.last_mut().expect("rank >= 1") = 1;
    let zr = sink_per_row(z, rows);
    let zr = zr.data();
    let buf = rows_in_place_at(s, m, |i, row| fastmath::softmax_sink_row(row, zr[i]));
    Value::new(shape, buf)
}

/// Offsets of each output entry's matrix in an operand with leading dims `lead_of`
/// (broadcast to `lead`) and `mat` values per matrix.
fn entry_offsets(lead_of: &[usize], lead: &[usize], mat: usize) -> Vec<usize> {
    let strides = broadcast_strides(lead_of, lead);
    let batches: usize = lead.iter().product();
    let mut idx = vec![0usize; lead.len()];
    let mut out = Vec::with_capacity(batches);
    for _ in 0..batches {
        out.push(idx.iter().zip(&strides).map(|(i, s)| i * s * mat).sum());
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < lead[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// `softmax_sink(scale * q k^T, z) v` (plain softmax without `z`) over the last two axes,
/// leading axes broadcast; shapes checked, `out_shape` is `[lead.., N, e]`.
pub fn attention(
    q: &Value,
    k: &Value,
    v: &Value,
    z: Option<&Value>,
    scale: f32,
    out_shape: Vec<usize>,
) -> Value {
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    let (rq, rk, rv, ro) = (qs.len(), ks.len(), vs.len(), out_shape.len());
    let (n, d, m, e) = (qs[rq - 2], qs[rq - 1], ks[rk - 2], vs[rv - 1]);
    let lead = &out_shape[..ro - 2];
    let batches: usize = lead.iter().product();
    let mut out = pool::alloc(batches * n * e);
    if out.is_empty() {
        return Value::new(out_shape, out);
    }
    let offs = [
        entry_offsets(&qs[..rq - 2], lead, n * d),
        entry_offsets(&ks[..rk - 2], lead, m * d),
        entry_offsets(&vs[..rv - 2], lead, m * e),
    ];
    let zr: Option<Value> = z.map(|z| {
        let mut rows = lead.to_vec();
        rows.extend([n, 1]);
        sink_per_row(z, rows)
    });
    let (qv, kv, vv) = (q.data(), k.data(), v.data());
    let threads = rayon::current_num_threads().max(1);
    // One entry: scores into `scratch`, rows normalised, then the product with v.
    let entry = |b: usize, o: &mut [f32], scratch: &mut Vec<f32>, par: Parallelism| {
        scratch.resize(n * m, 0.0);
        let scores = Epilogue {
            accumulate: false,
            scale,
        };
        // SAFETY: the offsets start one stored matrix of each operand (from their
        // shapes); q is [n, d], k is [m, d] read transposed, scratch holds n * m.
        unsafe {
            gemm_one(
                n,
                m,
                d,
                scratch,
                qv.as_ptr().add(offs[0][b]),
                Mat::rows(d),
                kv.as_ptr().add(offs[1][b]),
                Mat::transposed(d),
                par,
                scores,
            )
        };
        if m > 0 {
            let zb = zr.as_ref().map(|zr| &zr.data()[b * n..(b + 1) * n]);
            let norm = |i: usize, row: &mut [f32]| match zb {
                Some(zb) => fastmath::softmax_sink_row(row, zb[i]),
                None => fastmath::softmax_row(row),
            };
            if matches!(par, Parallelism::None) {
                scratch
                    .chunks_mut(m)
                    .enumerate()
                    .for_each(|(i, r)| norm(i, r));
            } else {
                let per = rows_per_task(n, m);
                scratch
                    .par_chunks_mut(per * m)
                    .enumerate()
                    .for_each(|(c, ch)| {
                        for (i, r) in ch.chunks_mut(m).enumerate() {
                            norm(c * per + i, r);
                        }
                    });
            }
        }
        // SAFETY: scratch is [n, m] row-major, v's matrix [m, e], o is one [n, e] entry.
        unsafe {
            gemm_one(
                n,
                e,
                m,
                o,
                scratch.as_ptr(),
                Mat::rows(m),
                vv.as_ptr().add(offs[2][b]),
                Mat::rows(e),
                par,
                Epilogue::OVERWRITE,
            )
        };
    };
    let per = n * e;
    if batches >= threads {
        out.par_chunks_mut(per)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (b, o)| {
                entry(b, o, scratch, Parallelism::None)
            });
    } else {
        let mut scratch = Vec::new();
        for (b, o) in out.chunks_mut(per).enumerate() {
            entry(b, o, &mut scratch, Parallelism::Rayon(threads));
        }
    }
    Value::new(out_shape, out)
}
