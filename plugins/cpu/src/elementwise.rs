//! Element-wise kernels: binary ops with numpy broadcasting and unary ops.
//!
//! All memory bound (one or two reads and a write per element, a few flops): the loops
//! are kept branch-free and monomorphised per op so the compiler vectorises them, work
//! is cut into chunks of whole rows, and a result is written into an operand's buffer
//! when nothing else holds it.

use eptc_ir::{BinaryOp, UnaryOp};
use rayon::prelude::*;

use crate::fastmath;
use crate::layout::{broadcast_strides, chunk_len, merge_dims, Odometer};
use crate::pool;
use crate::value::Value;

/// `op(a, b)` broadcast to `out_shape` (already checked to be the broadcast shape).
pub fn binary(op: BinaryOp, a: Value, b: Value, out_shape: Vec<usize>) -> Value {
    match op {
        BinaryOp::Add => binary_with(|x, y| x + y, a, b, out_shape),
        BinaryOp::Sub => binary_with(|x, y| x - y, a, b, out_shape),
        BinaryOp::Mul => binary_with(|x, y| x * y, a, b, out_shape),
        BinaryOp::Div => binary_with(|x, y| x / y, a, b, out_shape),
        BinaryOp::Maximum => binary_with(f32::max, a, b, out_shape),
        BinaryOp::Minimum => binary_with(f32::min, a, b, out_shape),
        BinaryOp::Equal => binary_with(|x, y| f32::from(u8::from(x == y)), a, b, out_shape),
    }
}

fn binary_with<F>(f: F, a: Value, b: Value, out_shape: Vec<usize>) -> Value
where
    F: Fn(f32, f32) -> f32 + Sync + Copy,
{
    let n: usize = out_shape.iter().product();
    if n == 0 {
        return Value::new(out_shape, Vec::new());
    }
    let (na, nb) = (a.numel(), b.numel());
    // Fast paths where one operand has the output's elements in order: the same shape,
    // the other a scalar, or the other broadcast along leading dims (a bias `[D]` added
    // to `[B,N,D]`). The result goes into that operand's buffer when it is free.
    if na == n && a.shape().len() == out_shape.len() {
        let inner = if nb == n && b.shape().len() == out_shape.len() {
            Some(n)
        } else {
            leading_broadcast_len(b.shape(), &out_shape)
        };
        if let Some(inner) = inner {
            let out = with_rows(a, b.data(), inner, f);
            return Value::new(out_shape, out);
        }
    }
    if nb == n && b.shape().len() == out_shape.len() {
        if let Some(inner) = leading_broadcast_len(a.shape(), &out_shape) {
            let out = with_rows(b, a.data(), inner, move |v, u| f(u, v));
            return Value::new(out_shape, out);
        }
    }
    let out = binary_strided(f, &a, &b, &out_shape);
    Value::new(out_shape, out)
}

/// If `small` broadcast to `out` only repeats it along leading dims (its shape, leading
/// ones stripped, is a suffix of `out`), the repeated block's length.
fn leading_broadcast_len(small: &[usize], out: &[usize]) -> Option<usize> {
    let first = small.iter().position(|&d| d != 1).unwrap_or(small.len());
    let core = &small[first..];
    (core.len() <= out.len() && out[out.len() - core.len()..] == *core)
        .then(|| core.iter().product())
}

/// `f(m[i], y[i % inner])` for every element of `main`, written into `main`'s buffer when
/// nothing else holds it.
fn with_rows<F>(main: Value, y: &[f32], inner: usize, f: F) -> Vec<f32>
where
    F: Fn(f32, f32) -> f32 + Sync + Copy,
{
    if inner == 1 {
        let s = y[0];
        return map_vec(main, move |v| f(v, s));
    }
    match main.into_unique() {
        Ok(mut buf) => {
            apply_rows_inplace(&mut buf, y, inner, f);
            buf
        }
        Err(main) => apply_rows(main.data(), y, inner, f),
    }
}

/// `out[i] = f(x[i], y[i % y.len()])`, with `y.len() == inner` dividing `x.len()`.
fn apply_rows(x: &[f32], y: &[f32], inner: usize, f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = pool::alloc(x.len());
    let chunk = chunk_len(x.len(), inner);
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(inner).zip(x.chunks(inner)) {
                for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                    *o = f(x, y);
                }
            }
        });
    out
}

fn apply_rows_inplace(x: &mut [f32], y: &[f32], inner: usize, f: impl Fn(f32, f32) -> f32 + Sync) {
    let chunk = chunk_len(x.len(), inner);
    x.par_chunks_mut(chunk).for_each(|x| {
        for x in x.chunks_mut(inner) {
            for (x, &y) in x.iter_mut().zip(y) {
                *x = f(*x, y);
            }
        }
    });
}

/// The general path: both operands read through broadcast strides, rows of the merged
/// index space in parallel.
fn binary_strided<F>(f: F, a: &Value, b: &Value, out_shape: &[usize]) -> Vec<f32>
where
    F: Fn(f32, f32) -> f32 + Sync + Copy,
{
    let n: usize = out_shape.iter().product();
    let mut out = pool::alloc(n);
    if n == 0 {
        return out;
    }
    let sa = broadcast_strides(a.shape(), out_shape);
    let sb = broadcast_strides(b.shape(), out_shape);
    let (dims, st) = merge_dims(out_shape, &[sa, sb]);
    let inner = *dims.last().expect("at least one dim");
    let (ia, ib) = (st[0][dims.len() - 1], st[1][dims.len() - 1]);
    let (av, bv) = (a.data(), b.data());
    let chunk = chunk_len(n, inner);
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
        let mut odo = Odometer::new(&dims, [&st[0], &st[1]], c * chunk / inner);
        for row in o.chunks_mut(inner) {
            let [oa, ob] = odo.offs;
            match (ia, ib) {
                (1, 1) => {
                    let (x, y) = (&av[oa..oa + inner], &bv[ob..ob + inner]);
                    for ((o, &x), &y) in row.iter_mut().zip(x).zip(y) {
                        *o = f(x, y);
                    }
                }
                (1, 0) => {
                    let y = bv[ob];
                    for (o, &x) in row.iter_mut().zip(&av[oa..oa + inner]) {
                        *o = f(x, y);
                    }
                }
                (0, 1) => {
                    let x = av[oa];
                    for (o, &y) in row.iter_mut().zip(&bv[ob..ob + inner]) {
                        *o = f(x, y);
                    }
                }
                _ => {
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = f(av[oa + j * ia], bv[ob + j * ib]);
                    }
                }
            }
            odo.advance();
        }
    });
    out
}

/// `op(x)` element by element, in place when `x`'s buffer is free.
pub fn unary(op: UnaryOp, x: Value) -> Value {
    match op {
        UnaryOp::Neg => map(x, |v| -v),
        UnaryOp::Exp => map(x, f32::exp),
        UnaryOp::Log => map(x, f32::ln),
        UnaryOp::Sqrt => map(x, f32::sqrt),
        UnaryOp::Rsqrt => map(x, |v| 1.0 / v.sqrt()),
        UnaryOp::Recip => map(x, |v| 1.0 / v),
        UnaryOp::Abs => map(x, f32::abs),
        UnaryOp::Tanh => map(x, f32::tanh),
        UnaryOp::Sigmoid => map(x, sigmoid),
        // `v < 0` is false for NaN, so NaN passes through.
        UnaryOp::Relu => map(x, |v| if v < 0.0 { 0.0 } else { v }),
        UnaryOp::Gelu => {
            let shape = x.shape().to_vec();
            Value::new(shape, map_slices(x, fastmath::gelu_in_place))
        }
        // `v > 0` and `v < 0` are both false for NaN and for +-0.
        UnaryOp::Sign => map(x, |v| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                v * 0.0
            }
        }),
        UnaryOp::GeluDeriv => {
            let shape = x.shape().to_vec();
            Value::new(shape, map_slices(x, fastmath::gelu_deriv_in_place))
        }
    }
}

fn sigmoid(v: f32) -> f32 {
    // Stable on both sides: exp of a non-positive number never overflows.
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

fn map(x: Value, f: impl Fn(f32) -> f32 + Sync + Copy) -> Value {
    let shape = x.shape().to_vec();
    Value::new(shape, map_vec(x, f))
}

fn map_vec(x: Value, f: impl Fn(f32) -> f32 + Sync + Copy) -> Vec<f32> {
    map_slices(x, |c: &mut [f32]| {
        for v in c {
            *v = f(*v);
        }
    })
}

/// Apply `f` to `x`'s elements slice by slice: in `x`'s buffer when nothing else holds
/// it, else copying blocks small enough to stay in L1 into a new buffer first.
fn map_slices(x: Value, f: impl Fn(&mut [f32]) + Sync) -> Vec<f32> {
    const BLOCK: usize = 4096;
    let chunk = chunk_len(x.numel(), 1);
    match x.into_unique() {
        Ok(mut buf) => {
            buf.par_chunks_mut(chunk).for_each(&f);
            buf
        }
        Err(x) => {
            let src = x.data();
            let mut out = pool::alloc(src.len());
            out.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(o, s)| {
                    for (o, s) in o.chunks_mut(BLOCK).zip(s.chunks(BLOCK)) {
                        o.copy_from_slice(s);
                        f(o);
                    }
                });
            out
        }
    }
}
