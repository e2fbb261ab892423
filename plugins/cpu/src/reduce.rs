//! Reductions over any set of axes, with or without kept dims.
//!
//! Memory bound (each input element read once). Dims are merged so that a reduction over
//! trailing axes reads contiguous runs; sums accumulate in f64 so the result does not
//! depend on how many elements are summed; max/min propagate NaN; logsumexp subtracts
//! the maximum first.

use eptc_ir::ReduceOp;
use rayon::prelude::*;

use crate::layout::{contiguous_strides, merge_dims, MIN_TASK};
use crate::pool;
use crate::value::Value;

/// Reduce `x` over `axes` (checked: in range, distinct); `out_shape` is the result's.
pub fn reduce(op: ReduceOp, x: &Value, axes: &[usize], out_shape: Vec<usize>) -> Value {
    let shape = x.shape();
    let strides = contiguous_strides(shape);
    // Split the input's dims into kept and reduced, each with its strides, then merge.
    let (mut kd, mut ks, mut rd, mut rs) = (vec![], vec![], vec![], vec![]);
    for (d, (&n, &s)) in shape.iter().zip(&strides).enumerate() {
        if axes.contains(&d) {
            rd.push(n);
            rs.push(s);
        } else {
            kd.push(n);
            ks.push(s);
        }
    }
    let (kd, ks) = merge_dims(&kd, &[ks]);
    let (rd, rs) = merge_dims(&rd, &[rs]);
    let (ks, rs) = (&ks[0], &rs[0]);
    let count: usize = rd.iter().product();
    // Offsets of every reduced run's start, and the run (innermost reduced dim).
    let (run_len, run_stride) = (*rd.last().expect("merged"), *rs.last().expect("merged"));
    let starts = offsets(&rd[..rd.len() - 1], &rs[..rs.len() - 1]);
    let kept_offsets = offsets(&kd, ks);
    let src = x.data();
    let mut out = pool::alloc(kept_offsets.len());
    let per_task = (MIN_TASK / count.max(1)).max(1);
    out.par_chunks_mut(per_task)
        .zip(kept_offsets.par_chunks(per_task))
        .for_each(|(o, base)| {
            for (o, &base) in o.iter_mut().zip(base) {
                // One contiguous run (e.g. the last axis): vectorised logsumexp.
                if op == ReduceOp::LogSumExp && starts.len() == 1 && run_stride == 1 {
                    let row = &src[base + starts[0]..base + starts[0] + run_len];
                    *o = logsumexp_row(row);
                    continue;
                }
                let elems = starts.iter().flat_map(|&s| {
                    let first = base + s;
                    (0..run_len).map(move |j| src[first + j * run_stride])
                });
                *o = fold(op, elems, count);
            }
        });
    debug_assert_eq!(out.len(), out_shape.iter().product::<usize>());
    Value::new(out_shape, out)
}

/// Every offset of the index space `dims` read through `strides`, row-major.
fn offsets(dims: &[usize], strides: &[usize]) -> Vec<usize> {
    let mut v = vec![0usize];
    for (&n, &s) in dims.iter().zip(strides) {
        v = v
            .iter()
            .flat_map(|&b| (0..n).map(move |i| b + i * s))
            .collect();
    }
    v
}

/// One reduction of `count` elements.
fn fold(op: ReduceOp, elems: impl Iterator<Item = f32> + Clone, count: usize) -> f32 {
    match op {
        ReduceOp::Sum => elems.map(f64::from).sum::<f64>() as f32,
        ReduceOp::Mean => (elems.map(f64::from).sum::<f64>() / count as f64) as f32,
        ReduceOp::Max => elems.fold(f32::NEG_INFINITY, |m, v| pick(m, v, v > m)),
        ReduceOp::Min => elems.fold(f32::INFINITY, |m, v| pick(m, v, v < m)),
        ReduceOp::LogSumExp => logsumexp(elems),
    }
}

/// The running extremum `m` after seeing `v`: NaN, once seen, wins.
fn pick(m: f32, v: f32, better: bool) -> f32 {
    if m.is_nan() {
        m
    } else if better || v.is_nan() {
        v
    } else {
        m
    }
}

/// [`logsumexp`] of a contiguous row, the exponentials vectorised.
fn logsumexp_row(row: &[f32]) -> f32 {
    let m = fold(ReduceOp::Max, row.iter().copied(), 0);
    if !m.is_finite() {
        return m;
    }
    let mut s = [0.0f64];
    crate::fastmath::sum_exp_shifted(row, m, &mut s);
    (f64::from(m) + s[0].ln()) as f32
}

/// `log(sum(exp(x)))` with the maximum factored out; all `-inf` gives `-inf`.
fn logsumexp(elems: impl Iterator<Item = f32> + Clone) -> f32 {
    let m = fold(ReduceOp::Max, elems.clone(), 0);
    if !m.is_finite() {
        return m;
    }
    let m64 = f64::from(m);
    let s: f64 = elems.map(|v| (f64::from(v) - m64).exp()).sum();
    (m64 + s.ln()) as f32
}
