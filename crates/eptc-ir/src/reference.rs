//! A straightforward f64 interpreter of the IR: the ground truth for finite-difference
//! gradient tests and backend parity checks.
//!
//! Every op is evaluated by its definition in `ir-specs/ops.toml`, in f64, with no
//! attention paid to speed: broadcasting materialises its operands, a matmul is three
//! nested loops, the fused ops (`softmax_sink`, `attention`, `linear`) are computed by
//! their formulas (not by their decompositions, so the two can be checked against each
//! other). The element type of the graph is ignored: everything is f64.
//!
//! Each node's result is checked against its declared type (the batch `B` bound from the
//! inputs, as `eptc_backend::bind_batch` does); a mismatch, a missing input or parameter,
//! or an op that cannot be evaluated is an `Err` naming the node, never a panic.

use std::collections::{HashMap, HashSet};
use std::f64::consts::{FRAC_1_SQRT_2, PI};

use crate::graph::{Graph, NodeId};
use crate::op::{Activation, BinaryOp, Op, ReduceOp, UnaryOp};
use crate::strides::contiguous_strides as strides;
use crate::types::Dim;
use crate::weights::{HostTensor, WeightStore};

/// A dense f64 tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor64 {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor64 {
    /// A tensor; panics if `data` does not match `shape` (a caller bug).
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data does not match shape {shape:?}"
        );
        Tensor64 { shape, data }
    }

    /// The f32 values of `t`, widened exactly.
    pub fn from_host(t: &HostTensor) -> Self {
        Tensor64 {
            shape: t.shape.clone(),
            data: t.data().iter().map(|&x| f64::from(x)).collect(),
        }
    }

    /// The values rounded to f32.
    pub fn to_host(&self) -> HostTensor {
        HostTensor::new(
            self.shape.clone(),
            self.data.iter().map(|&x| x as f32).collect(),
        )
    }

    /// A scalar (shape `[]`).
    pub fn scalar(v: f64) -> Self {
        Tensor64 {
            shape: vec![],
            data: vec![v],
        }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor64 {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

// ---- scalar functions -------------------------------------------------------------------

// erf and erfc: a port of FreeBSD's msun s_erf.c (fdlibm), accurate to about 1 ulp.
/*
 * ====================================================
 * Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
 *
 * Developed at SunPro, a Sun Microsystems, Inc. business.
 * Permission to use, copy, modify, and distribute this
 * software is freely granted, provided that this notice
 * is preserved.
 * ====================================================
 */

/// fdlibm's coefficients, digits as published (each is the exact f64 its hex value in
/// s_erf.c gives).
#[allow(clippy::excessive_precision)]
mod coef {
    pub const ERX: f64 = 8.45062911510467529297e-01;
    // erf on [0, 0.84375]
    pub const EFX8: f64 = 1.02703333676410069053e+00;
    pub const PP: [f64; 5] = [
        1.28379167095512558561e-01,
        -3.25042107247001499370e-01,
        -2.84817495755985104766e-02,
        -5.77027029648944159157e-03,
        -2.37630166566501626084e-05,
    ];
    pub const QQ: [f64; 6] = [
        1.0,
        3.97917223959155352819e-01,
        6.50222499887672944485e-02,
        5.08130628187576562776e-03,
        1.32494738004321644526e-04,
        -3.96022827877536812320e-06,
    ];
    // erf on [0.84375, 1.25]
    pub const PA: [f64; 7] = [
        -2.36211856075265944077e-03,
        4.14856118683748331666e-01,
        -3.72207876035701323847e-01,
        3.18346619901161753674e-01,
        -1.10894694282396677476e-01,
        3.54783043256182359371e-02,
        -2.16637559486879084300e-03,
    ];
    pub const QA: [f64; 7] = [
        1.0,
        1.06420880400844228286e-01,
        5.40397917702171048937e-01,
        7.18286544141962662868e-02,
        1.26171219808761642112e-01,
        1.36370839120290507362e-02,
        1.19844998467991074170e-02,
    ];
    // erfc on [1.25, 1/0.35]
    pub const RA: [f64; 8] = [
        -9.86494403484714822705e-03,
        -6.93858572707181764372e-01,
        -1.05586262253232909814e+01,
        -6.23753324503260060396e+01,
        -1.62396669462573470355e+02,
        -1.84605092906711035994e+02,
        -8.12874355063065934246e+01,
        -9.81432934416914548592e+00,
    ];
    pub const SA: [f64; 9] = [
        1.0,
        1.96512716674392571292e+01,
        1.37657754143519042600e+02,
        4.34565877475229228821e+02,
        6.45387271733267880336e+02,
        4.29008140027567833386e+02,
        1.08635005541779435134e+02,
        6.57024977031928170135e+00,
        -6.04244152148580987438e-02,
    ];
    // erfc on [1/0.35, 28]
    pub const RB: [f64; 7] = [
        -9.86494292470009928597e-03,
        -7.99283237680523006574e-01,
        -1.77579549177547519889e+01,
        -1.60636384855821916062e+02,
        -6.37566443368389627722e+02,
        -1.02509513161107724954e+03,
        -4.83519191608651397019e+02,
    ];
    pub const SB: [f64; 8] = [
        1.0,
        3.03380607434824582924e+01,
        3.25792512996573918826e+02,
        1.53672958608443695994e+03,
        3.19985821950859553908e+03,
        2.55305040643316442583e+03,
        4.74528541206955367215e+02,
        -2.24409524465858183362e+01,
    ];
}
use coef::*;

/// `c[0] + c[1] s + c[2] s^2 + ...` by Horner's rule.
fn poly(c: &[f64], s: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * s + k)
}

/// The rational kernel on `|x| < 0.84375`: `erf(x) = x + x * small_ratio(x)`.
fn small_ratio(x: f64) -> f64 {
    let z = x * x;
    poly(&PP, z) / poly(&QQ, z)
}

/// `erfc(|x|)` for `0.84375 <= |x| < 28`.
fn erfc_mid(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.25 {
        let s = x - 1.0;
        return 1.0 - ERX - poly(&PA, s) / poly(&QA, s);
    }
    let s = 1.0 / (x * x);
    let (r, q) = if x < 1.0 / 0.35 {
        (poly(&RA, s), poly(&SA, s))
    } else {
        (poly(&RB, s), poly(&SB, s))
    };
    // x with its low 32 bits cleared, so that z*z is exact.
    let z = f64::from_bits(x.to_bits() & 0xffff_ffff_0000_0000);
    (-z * z - 0.5625).exp() * ((z - x) * (z + x) + r / q).exp() / x
}

/// The error function `erf(x) = 2/sqrt(pi) * int_0^x exp(-t^2) dt`, to about 1 ulp.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a < 0.84375 {
        if a < 2f64.powi(-28) {
            return 0.125 * (8.0 * x + EFX8 * x);
        }
        return x + x * small_ratio(x);
    }
    let y = if a < 6.0 { 1.0 - erfc_mid(a) } else { 1.0 };
    y.copysign(x)
}

/// The complementary error function `erfc(x) = 1 - erf(x)`, accurate (relatively) for
/// large `x` too.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a < 0.84375 {
        if a < 2f64.powi(-56) {
            return 1.0 - x;
        }
        let y = small_ratio(x);
        if x < 0.25 {
            return 1.0 - (x + x * y);
        }
        return 0.5 - (x - 0.5 + x * y);
    }
    if a < 28.0 {
        let c = erfc_mid(a);
        return if x < 0.0 { 2.0 - c } else { c };
    }
    if x < 0.0 {
        2.0
    } else {
        0.0
    }
}

/// The standard normal CDF `Phi(x) = erfc(-x / sqrt(2)) / 2`.
///
/// `x / sqrt(2)` is rounded to `t` and the rounding error `d` (with that of the constant)
/// corrected for to first order, `erfc(-t - d) ~ erfc(-t) + 2/sqrt(pi) exp(-t^2) d`: in
/// the lower tail erfc amplifies a relative error of its argument by about `2 t^2`.
pub fn normal_cdf(x: f64) -> f64 {
    // 1/sqrt(2) - FRAC_1_SQRT_2.
    const LO: f64 = -4.833646656726457e-17;
    let t = x * FRAC_1_SQRT_2;
    let d = x.mul_add(FRAC_1_SQRT_2, -t) + x * LO;
    let c = erfc(-t);
    if !d.is_finite() || d == 0.0 {
        return 0.5 * c;
    }
    0.5 * (c + 2.0 / PI.sqrt() * (-t * t).exp() * d)
}

/// The standard normal density `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`.
pub fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * PI).sqrt()
}

/// The exact GELU `x * Phi(x)` (`0` at `-inf`).
pub fn gelu(x: f64) -> f64 {
    if x == f64::NEG_INFINITY {
        return 0.0;
    }
    x * normal_cdf(x)
}

/// The derivative of the exact GELU, `Phi(x) + x * phi(x)` (its limits at `+-inf`).
pub fn gelu_deriv(x: f64) -> f64 {
    if x.is_infinite() {
        return normal_cdf(x);
    }
    normal_cdf(x) + x * normal_pdf(x)
}

/// The logistic function, without overflow for large `|x|`.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// torch.sign: `-1`, `0` or `1`; NaN stays NaN.
pub fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else if x.is_nan() {
        x
    } else {
        0.0
    }
}

/// One element of a unary op, by the op's definition in `ir-specs/ops.toml`.
pub fn unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => sigmoid(x),
        // NaN passes through (`x < 0` is false for it), as torch.relu.
        UnaryOp::Relu => {
            if x < 0.0 {
                0.0
            } else {
                x
            }
        }
        UnaryOp::Gelu => gelu(x),
        UnaryOp::Sign => sign(x),
        UnaryOp::GeluDeriv => gelu_deriv(x),
    }
}

/// One element of a binary op, by the op's definition in `ir-specs/ops.toml`.
pub fn binary(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        // Like f32::max / f32::min: a NaN side yields the other.
        BinaryOp::Maximum => a.max(b),
        BinaryOp::Minimum => a.min(b),
        BinaryOp::Equal => {
            if a == b {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// The maximum of `xs` (`-inf` when empty); a NaN, once seen, wins.
fn max_nan(xs: impl IntoIterator<Item = f64>) -> f64 {
    let mut m = f64::NEG_INFINITY;
    for x in xs {
        if x.is_nan() {
            return x;
        }
        if x > m {
            m = x;
        }
    }
    m
}

/// The minimum of `xs` (`+inf` when empty); a NaN, once seen, wins.
fn min_nan(xs: impl IntoIterator<Item = f64>) -> f64 {
    -max_nan(xs.into_iter().map(|x| -x))
}

/// `log(sum(exp(x)))` with the maximum `m` factored out; `m` itself when not finite.
fn logsumexp(xs: &[f64]) -> f64 {
    let m = max_nan(xs.iter().copied());
    if !m.is_finite() {
        return m;
    }
    m + xs.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

/// Max-subtracted softmax of one row, with an optional sink logit `z` that takes part in
/// the normalisation only: `exp(x_j - m) / (sum exp(x - m) + exp(z - m))`,
/// `m = max(max x, z)`.
fn softmax_row(xs: &[f64], z: Option<f64>) -> Vec<f64> {
    let m = max_nan(xs.iter().copied().chain(z));
    let den: f64 =
        xs.iter().map(|&x| (x - m).exp()).sum::<f64>() + z.map_or(0.0, |z| (z - m).exp());
    xs.iter().map(|&x| (x - m).exp() / den).collect()
}

// ---- index helpers ------------------------------------------------------------------------

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The multi-index of flat index `i` in `shape`.
fn unravel(shape: &[usize], mut i: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        if shape[d] > 0 {
            idx[d] = i % shape[d];
            i /= shape[d];
        }
    }
    idx
}

/// Numpy broadcast of two concrete shapes.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let r = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        if i + s.len() >= r {
            s[i + s.len() - r]
        } else {
            1
        }
    };
    (0..r)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

/// `t` broadcast (numpy rules, aligned on the right) to exactly `to`, materialised.
fn broadcast_to(t: &Tensor64, to: &[usize]) -> Result<Vec<f64>, String> {
    let bad = || format!("{:?} does not broadcast to {to:?}", t.shape);
    if t.shape.len() > to.len() {
        return Err(bad());
    }
    if t.shape == to {
        return Ok(t.data.clone());
    }
    let lead = to.len() - t.shape.len();
    let ts = strides(&t.shape);
    // The stride of `t` along each axis of `to` (0 where it is repeated).
    let mut st = vec![0; to.len()];
    for (d, &n) in t.shape.iter().enumerate() {
        let want = to[lead + d];
        if n == want {
            st[lead + d] = ts[d];
        } else if n != 1 {
            return Err(bad());
        }
    }
    Ok((0..numel(to))
        .map(|i| {
            let idx = unravel(to, i);
            let off: usize = idx.iter().zip(&st).map(|(i, s)| i * s).sum();
            t.data[off]
        })
        .collect())
}

/// `t` with its axes permuted: `out.shape[i] = t.shape[perm[i]]`.
fn permute(t: &Tensor64, perm: &[usize]) -> Result<Tensor64, String> {
    let r = t.shape.len();
    let mut seen = vec![false; r];
    if perm.len() != r
        || perm
            .iter()
            .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
    {
        return Err(format!("{perm:?} is not a permutation of rank {r}"));
    }
    let shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
    let ts = strides(&t.shape);
    let data = (0..numel(&shape))
        .map(|i| {
            let idx = unravel(&shape, i);
            let off: usize = idx.iter().zip(perm).map(|(&i, &p)| i * ts[p]).sum();
            t.data[off]
        })
        .collect();
    Ok(Tensor64 { shape, data })
}

/// `t` with its last two axes swapped.
fn transpose_last2(t: &Tensor64) -> Result<Tensor64, String> {
    let r = t.shape.len();
    if r < 2 {
        return Err(format!("transpose of rank {r}"));
    }
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 2, r - 1);
    permute(t, &perm)
}

/// Batched `a @ b` over the last two axes, leading axes broadcast.
fn matmul(a: &Tensor64, b: &Tensor64) -> Result<Tensor64, String> {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    if ra < 2 || rb < 2 {
        return Err(format!("matmul of {:?} and {:?}", a.shape, b.shape));
    }
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (kb, n) = (b.shape[rb - 2], b.shape[rb - 1]);
    if k != kb {
        return Err(format!(
            "matmul inner dimensions differ: {:?} and {:?}",
            a.shape, b.shape
        ));
    }
    let lead = broadcast_shape(&a.shape[..ra - 2], &b.shape[..rb - 2])?;
    let with = |x: usize, y: usize| {
        let mut s = lead.clone();
        s.extend([x, y]);
        s
    };
    let av = broadcast_to(a, &with(m, k))?;
    let bv = broadcast_to(b, &with(k, n))?;
    let batches = numel(&lead);
    let mut out = vec![0.0; batches * m * n];
    for l in 0..batches {
        let (ab, bb, ob) = (l * m * k, l * k * n, l * m * n);
        for i in 0..m {
            for j in 0..n {
                out[ob + i * n + j] = (0..k)
                    .map(|p| av[ab + i * k + p] * bv[bb + p * n + j])
                    .sum();
            }
        }
    }
    Ok(Tensor64::new(with(m, n), out))
}

/// Apply `f` to every line of `t` along `axis` (a function from the line's values to its
/// new values, of the same length).
fn along_axis(
    t: &Tensor64,
    axis: usize,
    mut f: impl FnMut(&[f64]) -> Vec<f64>,
) -> Result<Tensor64, String> {
    if axis >= t.shape.len() {
        return Err(format!("axis {axis} out of range for {:?}", t.shape));
    }
    let n = t.shape[axis];
    let inner: usize = numel(&t.shape[axis + 1..]);
    let outer: usize = numel(&t.shape[..axis]);
    let mut out = t.data.clone();
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * n * inner + j * inner + i;
            let line: Vec<f64> = (0..n).map(|j| t.data[at(j)]).collect();
            for (j, v) in f(&line).into_iter().enumerate().take(n) {
                out[at(j)] = v;
            }
        }
    }
    Ok(Tensor64::new(t.shape.clone(), out))
}

// ---- the interpreter ----------------------------------------------------------------------

/// Bind the batch from the values of the graph's inputs in `live`, checking each input's
/// shape against its declared type.
fn bind_batch(
    g: &Graph,
    live: &[NodeId],
    values: &HashMap<String, Tensor64>,
) -> Result<usize, String> {
    let mut batch: Option<usize> = None;
    for &id in live {
        let Op::Input { name } = &g.node(id).op else {
            continue;
        };
        let ty = g.ty(id);
        let t = values
            .get(name)
            .ok_or_else(|| format!("input \"{name}\" (%{}) has no value", id.index()))?;
        let bad = || {
            format!(
                "input \"{name}\" (%{}): shape {:?} does not match the declared {}",
                id.index(),
                t.shape,
                ty.shape
            )
        };
        if t.shape.len() != ty.shape.rank() {
            return Err(bad());
        }
        for (d, &n) in ty.shape.dims().iter().zip(&t.shape) {
            match d {
                Dim::Fixed(k) if *k != n => return Err(bad()),
                Dim::Batch => match batch {
                    Some(b) if b != n => return Err(bad()),
                    _ => batch = Some(n),
                },
                _ => {}
            }
        }
    }
    let b = batch.unwrap_or(1);
    if b == 0 {
        return Err("batch size 0".into());
    }
    Ok(b)
}

/// The nodes the outputs depend on, in topological order.
fn live_order(g: &Graph) -> Result<Vec<NodeId>, String> {
    let mut live = HashSet::new();
    let mut stack: Vec<NodeId> = g.outputs().iter().map(|o| o.1).collect();
    for &id in &stack {
        if !g.contains(id) {
            return Err(format!(
                "an output names %{}, which does not exist",
                id.index()
            ));
        }
    }
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    Ok(g.topo_order()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|n| live.contains(n))
        .collect())
}

/// Evaluate every node the outputs of `g` depend on, in f64; returns each node's value.
/// `values` maps input and param names to tensors (see [`eval`]).
pub fn eval_nodes(
    g: &Graph,
    values: &HashMap<String, Tensor64>,
) -> Result<HashMap<NodeId, Tensor64>, String> {
    let order = live_order(g)?;
    let batch = bind_batch(g, &order, values)?;
    let mut env: HashMap<NodeId, Tensor64> = HashMap::with_capacity(order.len());
    for id in order {
        let node = g.node(id);
        let name = |msg: String| format!("node %{} ({}): {msg}", id.index(), node.op.kind());
        let operands = g.operands(id);
        match node.op.arity() {
            Some(n) if n != operands.len() => {
                return Err(name(format!(
                    "{} operand(s), the op takes {n}",
                    operands.len()
                )))
            }
            None if operands.len() < 2 => {
                return Err(name(format!(
                    "{} operand(s), the op takes at least 2",
                    operands.len()
                )))
            }
            _ => {}
        }
        let args: Vec<&Tensor64> = operands.iter().map(|o| &env[o]).collect();
        let want = node.ty.shape.resolve(batch);
        let out = eval_op(&node.op, &args, &want, values).map_err(name)?;
        if out.shape != want {
            return Err(name(format!(
                "computed shape {:?}, but the declared type {} binds to {want:?} (batch {batch})",
                out.shape, node.ty
            )));
        }
        if out.data.len() != numel(&out.shape) {
            return Err(name("internal: data does not match shape".into()));
        }
        env.insert(id, out);
    }
    Ok(env)
}

/// Evaluate every output of `g` in f64, in the graph's output order. `values` maps input
/// names and param names to tensors (a param or input not found there is an error naming
/// it). The batch is bound from the inputs (the `B` dims of their declared types), as
/// `eptc_backend::bind_batch` does; 1 when no input has one. Fused ops are evaluated by
/// their definitions. Each node's result is checked against its declared type.
pub fn eval(
    g: &Graph,
    values: &HashMap<String, Tensor64>,
) -> Result<Vec<(String, Tensor64)>, String> {
    let env = eval_nodes(g, values)?;
    Ok(g.outputs()
        .iter()
        .map(|(n, id)| (n.clone(), env[id].clone()))
        .collect())
}

/// [`eval`] with f32 inputs and the params from a weight store (an entry of `inputs`
/// shadows a weight of the same name).
pub fn eval_host(
    g: &Graph,
    inputs: &[(&str, HostTensor)],
    weights: &WeightStore,
) -> Result<Vec<(String, Tensor64)>, String> {
    let mut values: HashMap<String, Tensor64> = weights
        .iter()
        .map(|(n, t)| (n.clone(), Tensor64::from_host(t)))
        .collect();
    for (n, t) in inputs {
        values.insert((*n).to_string(), Tensor64::from_host(t));
    }
    eval(g, &values)
}

/// One op on its evaluated operands; `want` is the node's declared shape, batch bound;
/// `values` holds the inputs and params by name (for leaves).
pub fn eval_op(
    op: &Op,
    args: &[&Tensor64],
    want: &[usize],
    values: &HashMap<String, Tensor64>,
) -> Result<Tensor64, String> {
    Ok(match op {
        Op::Input { name } => values
            .get(name)
            .cloned()
            .ok_or_else(|| format!("input \"{name}\" has no value"))?,
        Op::Param { name, .. } => {
            let t = values
                .get(name)
                .ok_or_else(|| format!("param \"{name}\" has no value"))?;
            if t.shape != want {
                return Err(format!(
                    "param \"{name}\" has shape {:?}, declared {want:?}",
                    t.shape
                ));
            }
            t.clone()
        }
        Op::Const { values } => {
            if values.len() != numel(want) {
                return Err(format!(
                    "{} values for the declared shape {want:?}",
                    values.len()
                ));
            }
            Tensor64::new(
                want.to_vec(),
                values.iter().map(|&v| f64::from(v)).collect(),
            )
        }
        Op::Patchify { patch } => patchify(args[0], *patch)?,
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let a = if *transpose_a {
                transpose_last2(args[0])?
            } else {
                args[0].clone()
            };
            let b = if *transpose_b {
                transpose_last2(args[1])?
            } else {
                args[1].clone()
            };
            matmul(&a, &b)?
        }
        Op::Binary(b) => {
            let shape = broadcast_shape(&args[0].shape, &args[1].shape)?;
            let x = broadcast_to(args[0], &shape)?;
            let y = broadcast_to(args[1], &shape)?;
            let data = x.iter().zip(&y).map(|(&x, &y)| binary(*b, x, y)).collect();
            Tensor64::new(shape, data)
        }
        Op::Unary(u) => Tensor64::new(
            args[0].shape.clone(),
            args[0].data.iter().map(|&x| unary(*u, x)).collect(),
        ),
        Op::Reduce { op, axes, keepdim } => reduce(args[0], *op, axes, *keepdim)?,
        Op::Softmax { axis } => along_axis(args[0], *axis, |row| softmax_row(row, None))?,
        Op::LayerNorm { eps } => layernorm(args[0], args[1], args[2], f64::from(*eps))?,
        Op::LayerNormGrad { eps } => layernorm_grad(args[0], args[1], args[2], f64::from(*eps))?,
        Op::Reshape { .. } => {
            // The target is the node's declared shape (`shape` is the same, symbolic).
            if numel(want) != args[0].numel() {
                return Err(format!("cannot reshape {:?} to {want:?}", args[0].shape));
            }
            Tensor64::new(want.to_vec(), args[0].data.clone())
        }
        Op::Permute { perm } => permute(args[0], perm)?,
        Op::Concat { axis } => concat(args, *axis)?,
        Op::Slice { axis, start, end } => slice(args[0], *axis, *start, *end)?,
        Op::Broadcast { .. } => Tensor64::new(want.to_vec(), broadcast_to(args[0], want)?),
        Op::SoftmaxSink => softmax_sink(args[0], args[1])?,
        Op::Attention { scale, sink } => attention(
            args[0],
            args[1],
            args[2],
            sink.then(|| args[3]),
            f64::from(*scale),
        )?,
        Op::AttentionLse { scale, sink } => {
            attention_lse(args[0], args[1], sink.then(|| args[2]), f64::from(*scale))?
        }
        Op::AttentionGrad { scale, wrt } => attention_grad(args, f64::from(*scale), *wrt)?,
        Op::Linear {
            bias,
            activation,
            residual,
        } => {
            let b = bias.then(|| args[2]);
            let r = residual.then(|| args[2 + usize::from(*bias)]);
            linear(args[0], args[1], b, *activation, r)?
        }
    })
}

fn patchify(x: &Tensor64, p: usize) -> Result<Tensor64, String> {
    let &[n, c, h, w] = x.shape.as_slice() else {
        return Err(format!("patchify wants [N,C,H,W], got {:?}", x.shape));
    };
    if p == 0 || h % p != 0 || w % p != 0 {
        return Err(format!(
            "image {h}x{w} is not a multiple of the patch size {p}"
        ));
    }
    let (gh, gw) = (h / p, w / p);
    let (tokens, feats) = (gh * gw, c * p * p);
    let mut out = vec![0.0; n * tokens * feats];
    for b in 0..n {
        for i in 0..gh {
            for j in 0..gw {
                for ch in 0..c {
                    for kh in 0..p {
                        for kw in 0..p {
                            let o = (b * tokens + i * gw + j) * feats + ch * p * p + kh * p + kw;
                            let s = ((b * c + ch) * h + i * p + kh) * w + j * p + kw;
                            out[o] = x.data[s];
                        }
                    }
                }
            }
        }
    }
    Ok(Tensor64::new(vec![n, tokens, feats], out))
}

fn reduce(x: &Tensor64, op: ReduceOp, axes: &[usize], keepdim: bool) -> Result<Tensor64, String> {
    let r = x.shape.len();
    if axes.is_empty() {
        return Err("reduce over no axis".into());
    }
    for (i, &a) in axes.iter().enumerate() {
        if a >= r || axes[..i].contains(&a) {
            return Err(format!("bad axes {axes:?} for rank {r}"));
        }
    }
    // The kept-dims shape (reduced axes set to 1) and the output shape.
    let kept: Vec<usize> = (0..r)
        .map(|d| if axes.contains(&d) { 1 } else { x.shape[d] })
        .collect();
    let shape: Vec<usize> = if keepdim {
        kept.clone()
    } else {
        (0..r)
            .filter(|d| !axes.contains(d))
            .map(|d| x.shape[d])
            .collect()
    };
    let ks = strides(&kept);
    let mut groups: Vec<Vec<f64>> = vec![Vec::new(); numel(&kept)];
    for (i, &v) in x.data.iter().enumerate() {
        let idx = unravel(&x.shape, i);
        let o: usize = (0..r)
            .filter(|d| !axes.contains(d))
            .map(|d| idx[d] * ks[d])
            .sum();
        groups[o].push(v);
    }
    let count: usize = axes.iter().map(|&a| x.shape[a]).product();
    let data = groups
        .iter()
        .map(|g| match op {
            ReduceOp::Sum => g.iter().sum(),
            ReduceOp::Mean => g.iter().sum::<f64>() / count as f64,
            ReduceOp::Max => max_nan(g.iter().copied()),
            ReduceOp::Min => min_nan(g.iter().copied()),
            ReduceOp::LogSumExp => logsumexp(g),
        })
        .collect();
    Ok(Tensor64::new(shape, data))
}

fn layernorm(
    x: &Tensor64,
    gamma: &Tensor64,
    beta: &Tensor64,
    eps: f64,
) -> Result<Tensor64, String> {
    let d = *x.shape.last().ok_or("layernorm of a scalar")?;
    if gamma.shape != [d] || beta.shape != [d] {
        return Err(format!(
            "gamma {:?} and beta {:?} must be [{d}]",
            gamma.shape, beta.shape
        ));
    }
    let last = x.shape.len() - 1;
    along_axis(x, last, |row| {
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + eps).sqrt();
        row.iter()
            .enumerate()
            .map(|(j, v)| (v - mean) * inv * gamma.data[j] + beta.data[j])
            .collect()
    })
}

/// The gradient of `layernorm` with respect to `x` (see `Op::LayerNormGrad`).
fn layernorm_grad(
    x: &Tensor64,
    gamma: &Tensor64,
    dy: &Tensor64,
    eps: f64,
) -> Result<Tensor64, String> {
    let d = *x.shape.last().ok_or("layernorm_grad of a scalar")?;
    if gamma.shape != [d] || dy.shape != x.shape {
        return Err(format!(
            "gamma {:?} must be [{d}] and dy {:?} must be {:?}",
            gamma.shape, dy.shape, x.shape
        ));
    }
    let mut out = Vec::with_capacity(x.data.len());
    if d > 0 {
        for (row, drow) in x.data.chunks_exact(d).zip(dy.data.chunks_exact(d)) {
            let n = d as f64;
            let mean = row.iter().sum::<f64>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let rstd = 1.0 / (var + eps).sqrt();
            let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
            let g: Vec<f64> = drow.iter().zip(&gamma.data).map(|(a, b)| a * b).collect();
            let m1 = g.iter().sum::<f64>() / n;
            let m2 = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n;
            out.extend(
                g.iter()
                    .zip(&xhat)
                    .map(|(gj, xj)| rstd * (gj - m1 - xj * m2)),
            );
        }
    }
    Ok(Tensor64::new(x.shape.clone(), out))
}

fn concat(parts: &[&Tensor64], axis: usize) -> Result<Tensor64, String> {
    let first = parts.first().ok_or("concat of nothing")?;
    let r = first.shape.len();
    if axis >= r {
        return Err(format!("axis {axis} out of range for rank {r}"));
    }
    let mut shape = first.shape.clone();
    shape[axis] = 0;
    for p in parts {
        let same = p.shape.len() == r && (0..r).all(|d| d == axis || p.shape[d] == first.shape[d]);
        if !same {
            return Err(format!(
                "concat along {axis} of {:?} and {:?}",
                first.shape, p.shape
            ));
        }
        shape[axis] += p.shape[axis];
    }
    let outer = numel(&shape[..axis]);
    let inner = numel(&shape[axis + 1..]);
    let mut data = Vec::with_capacity(numel(&shape));
    for o in 0..outer {
        for p in parts {
            let chunk = p.shape[axis] * inner;
            data.extend_from_slice(&p.data[o * chunk..(o + 1) * chunk]);
        }
    }
    Ok(Tensor64::new(shape, data))
}

fn slice(x: &Tensor64, axis: usize, start: usize, end: usize) -> Result<Tensor64, String> {
    let r = x.shape.len();
    if axis >= r || start > end || end > x.shape[axis] {
        return Err(format!(
            "slice {start}..{end} along {axis} out of range for {:?}",
            x.shape
        ));
    }
    let mut shape = x.shape.clone();
    shape[axis] = end - start;
    let (outer, inner) = (numel(&x.shape[..axis]), numel(&x.shape[axis + 1..]));
    let n = x.shape[axis];
    let mut data = Vec::with_capacity(numel(&shape));
    for o in 0..outer {
        data.extend_from_slice(&x.data[(o * n + start) * inner..(o * n + end) * inner]);
    }
    Ok(Tensor64::new(shape, data))
}

/// `softmax_sink(s, z)` by its definition, row by row along the last axis of `s`.
fn softmax_sink(s: &Tensor64, z: &Tensor64) -> Result<Tensor64, String> {
    let m = *s.shape.last().ok_or("softmax_sink of a scalar")?;
    let mut rows = s.shape.clone();
    *rows.last_mut().expect("rank >= 1") = 1;
    let zb = broadcast_to(z, &rows)?;
    let data = if m == 0 {
        vec![]
    } else {
        s.data
            .chunks(m)
            .zip(&zb)
            .flat_map(|(row, &z)| softmax_row(row, Some(z)))
            .collect()
    };
    Ok(Tensor64::new(s.shape.clone(), data))
}

/// `softmax_sink(scale * q k^T, z) v` (plain softmax without `z`) by its definition.
fn attention(
    q: &Tensor64,
    k: &Tensor64,
    v: &Tensor64,
    z: Option<&Tensor64>,
    scale: f64,
) -> Result<Tensor64, String> {
    let (rq, rk, rv) = (q.shape.len(), k.shape.len(), v.shape.len());
    if rq < 2 || rk < 2 || rv < 2 {
        return Err(format!(
            "attention needs rank >= 2, got q {:?}, k {:?}, v {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    let (n, d) = (q.shape[rq - 2], q.shape[rq - 1]);
    let (m, dk) = (k.shape[rk - 2], k.shape[rk - 1]);
    let (mv, e) = (v.shape[rv - 2], v.shape[rv - 1]);
    if d != dk || m != mv {
        return Err(format!(
            "attention shapes q {:?}, k {:?}, v {:?} do not fit",
            q.shape, k.shape, v.shape
        ));
    }
    let lead = broadcast_shape(
        &broadcast_shape(&q.shape[..rq - 2], &k.shape[..rk - 2])?,
        &v.shape[..rv - 2],
    )?;
    let with = |x: usize, y: usize| {
        let mut s = lead.clone();
        s.extend([x, y]);
        s
    };
    let qv = broadcast_to(q, &with(n, d))?;
    let kv = broadcast_to(k, &with(m, d))?;
    let vv = broadcast_to(v, &with(m, e))?;
    let zv = z.map(|z| broadcast_to(z, &with(n, 1))).transpose()?;
    let batches = numel(&lead);
    let mut out = vec![0.0; batches * n * e];
    for l in 0..batches {
        for i in 0..n {
            let s: Vec<f64> = (0..m)
                .map(|j| {
                    scale
                        * (0..d)
                            .map(|p| qv[(l * n + i) * d + p] * kv[(l * m + j) * d + p])
                            .sum::<f64>()
                })
                .collect();
            let p = softmax_row(&s, zv.as_ref().map(|z| z[l * n + i]));
            for c in 0..e {
                out[(l * n + i) * e + c] = (0..m).map(|j| p[j] * vv[(l * m + j) * e + c]).sum();
            }
        }
    }
    Ok(Tensor64::new(with(n, e), out))
}

/// `log(sum_j exp(scale q_i . k_j) + exp(z_i))` per row, by its definition (stably).
fn attention_lse(
    q: &Tensor64,
    k: &Tensor64,
    z: Option<&Tensor64>,
    scale: f64,
) -> Result<Tensor64, String> {
    let (rq, rk) = (q.shape.len(), k.shape.len());
    if rq < 2 || rk < 2 || q.shape[rq - 1] != k.shape[rk - 1] {
        return Err(format!(
            "attention_lse shapes q {:?}, k {:?} do not fit",
            q.shape, k.shape
        ));
    }
    let (n, d, m) = (q.shape[rq - 2], q.shape[rq - 1], k.shape[rk - 2]);
    let lead = broadcast_shape(&q.shape[..rq - 2], &k.shape[..rk - 2])?;
    let with = |x: usize, y: usize| {
        let mut s = lead.clone();
        s.extend([x, y]);
        s
    };
    let qv = broadcast_to(q, &with(n, d))?;
    let kv = broadcast_to(k, &with(m, d))?;
    let zv = z.map(|z| broadcast_to(z, &with(n, 1))).transpose()?;
    let mut out = Vec::with_capacity(numel(&lead) * n);
    for l in 0..numel(&lead) {
        for i in 0..n {
            let row = (0..m).map(|j| {
                scale
                    * (0..d)
                        .map(|p| qv[(l * n + i) * d + p] * kv[(l * m + j) * d + p])
                        .sum::<f64>()
            });
            let xs: Vec<f64> = row.chain(zv.as_ref().map(|z| z[l * n + i])).collect();
            let mx = max_nan(xs.iter().copied());
            // All terms -inf (or none): log 0 = -inf; +inf and NaN propagate.
            out.push(if !mx.is_finite() {
                mx
            } else {
                mx + xs.iter().map(|&x| (x - mx).exp()).sum::<f64>().ln()
            });
        }
    }
    Ok(Tensor64::new(with(n, 1), out))
}

/// One operand's gradient of attention, by the definition in `Op::AttentionGrad`.
fn attention_grad(
    args: &[&Tensor64],
    scale: f64,
    wrt: crate::op::AttnWrt,
) -> Result<Tensor64, String> {
    let [q, k, v, lse, delta, dout] = args else {
        return Err(format!(
            "attention_grad takes 6 operands, got {}",
            args.len()
        ));
    };
    let last2 = |t: &Tensor64| {
        let r = t.shape.len();
        (t.shape[r - 2], t.shape[r - 1])
    };
    if args.iter().any(|t| t.shape.len() < 2) {
        return Err("attention_grad needs rank >= 2".into());
    }
    let ((n, d), (m, dk), (mv, e)) = (last2(q), last2(k), last2(v));
    if d != dk || m != mv || last2(lse) != (n, 1) || last2(delta) != (n, 1) || last2(dout) != (n, e)
    {
        return Err(format!(
            "attention_grad shapes do not fit: q {:?}, k {:?}, v {:?}, lse {:?}, delta {:?}, dO {:?}",
            q.shape, k.shape, v.shape, lse.shape, delta.shape, dout.shape
        ));
    }
    let mut lead: Vec<usize> = Vec::new();
    for t in args {
        lead = broadcast_shape(&lead, &t.shape[..t.shape.len() - 2])?;
    }
    let with = |x: usize, y: usize| {
        let mut s = lead.clone();
        s.extend([x, y]);
        s
    };
    let qv = broadcast_to(q, &with(n, d))?;
    let kv = broadcast_to(k, &with(m, d))?;
    let vv = broadcast_to(v, &with(m, e))?;
    let lv = broadcast_to(lse, &with(n, 1))?;
    let dv = broadcast_to(delta, &with(n, 1))?;
    let ov = broadcast_to(dout, &with(n, e))?;
    let (rows, cols) = match wrt {
        crate::op::AttnWrt::Q => (n, d),
        crate::op::AttnWrt::K => (m, d),
        crate::op::AttnWrt::V => (m, e),
    };
    let mut out = vec![0.0; numel(&lead) * rows * cols];
    for l in 0..numel(&lead) {
        for i in 0..n {
            for j in 0..m {
                let s: f64 = scale
                    * (0..d)
                        .map(|p| qv[(l * n + i) * d + p] * kv[(l * m + j) * d + p])
                        .sum::<f64>();
                let p = (s - lv[l * n + i]).exp();
                let o = &mut out[l * rows * cols..(l + 1) * rows * cols];
                match wrt {
                    crate::op::AttnWrt::V => {
                        for c in 0..e {
                            o[j * e + c] += p * ov[(l * n + i) * e + c];
                        }
                    }
                    crate::op::AttnWrt::Q | crate::op::AttnWrt::K => {
                        let dp: f64 = (0..e)
                            .map(|c| ov[(l * n + i) * e + c] * vv[(l * m + j) * e + c])
                            .sum();
                        let ds = scale * p * (dp - dv[l * n + i]);
                        if wrt == crate::op::AttnWrt::Q {
                            for c in 0..d {
                                o[i * d + c] += ds * kv[(l * m + j) * d + c];
                            }
                        } else {
                            for c in 0..d {
                                o[j * d + c] += ds * qv[(l * n + i) * d + c];
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Tensor64::new(with(rows, cols), out))
}

/// `act(x w^T + b) + r` by its definition.
fn linear(
    x: &Tensor64,
    w: &Tensor64,
    b: Option<&Tensor64>,
    act: Activation,
    r: Option<&Tensor64>,
) -> Result<Tensor64, String> {
    let k = *x.shape.last().ok_or("linear of a scalar x")?;
    let &[o, kw] = w.shape.as_slice() else {
        return Err(format!("linear w must be [out, in], got {:?}", w.shape));
    };
    if kw != k {
        return Err(format!(
            "linear inner dimensions differ: x {:?}, w {:?}",
            x.shape, w.shape
        ));
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("rank >= 1") = o;
    if let Some(b) = b {
        if b.shape != [o] {
            return Err(format!("linear bias must be [{o}], got {:?}", b.shape));
        }
    }
    if let Some(r) = r {
        if r.shape != shape {
            return Err(format!(
                "linear residual must be {shape:?}, got {:?}",
                r.shape
            ));
        }
    }
    let rows = numel(&shape[..shape.len() - 1]);
    let mut out = vec![0.0; rows * o];
    for row in 0..rows {
        for j in 0..o {
            let mut y: f64 = (0..k)
                .map(|p| x.data[row * k + p] * w.data[j * k + p])
                .sum();
            if let Some(b) = b {
                y += b.data[j];
            }
            y = match act {
                Activation::None => y,
                Activation::Gelu => gelu(y),
            };
            if let Some(r) = r {
                y += r.data[row * o + j];
            }
            out[row * o + j] = y;
        }
    }
    Ok(Tensor64::new(shape, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Shape, TensorType};

    /// `erf` by its everywhere-convergent series
    /// `2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1))` (no cancellation).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-18 * sum.abs() {
            n += 1.0;
            term *= 2.0 * x * x / (2.0 * n + 1.0);
            sum += term;
        }
        2.0 / PI.sqrt() * (-x * x).exp() * sum
    }

    #[test]
    fn erf_against_series_and_known_values() {
        // The series itself loses up to ~10 ulps to rounding as |x| grows; the table of
        // exact values below checks to 1 ulp.
        for i in -3000..=3000 {
            let x = f64::from(i) * 1e-3;
            let (got, want) = (erf(x), erf_series(x));
            assert!(
                (got - want).abs() <= 2e-15 * want.abs(),
                "erf({x}): {got} vs {want}"
            );
            assert!((erfc(x) - (1.0 - want)).abs() <= 2e-15, "erfc({x})");
        }
        assert_eq!(erf(0.5), 0.5204998778130465);
        // (x, erf(x), erfc(x)) from mpmath at 40 digits, rounded to f64.
        for (x, e, ec) in [
            (0.1, 0.1124629160182849, 0.887537083981715),
            (0.5, 0.5204998778130465, 0.4795001221869535),
            (0.9, 0.7969082124228322, 0.20309178757716786),
            (1.0, 0.8427007929497149, 0.15729920705028513),
            (1.1, 0.8802050695740817, 0.11979493042591827),
            (2.0, 0.9953222650189527, 0.004677734981047266),
            (2.5, 0.999593047982555, 0.0004069520174449589),
            (3.0, 0.9999779095030014, 2.209049699858544e-05),
            (3.936, 0.9999999739861414, 2.6013858653716366e-08),
            (4.5, 0.9999999998033839, 1.9661604415428876e-10),
            (5.0, 0.9999999999984626, 1.537459794428035e-12),
            (6.0, 1.0, 2.1519736712498913e-17),
            (10.0, 1.0, 2.088487583762545e-45),
            (-2.0, -0.9953222650189527, 1.9953222650189528),
            (-0.3, -0.3286267594591274, 1.3286267594591274),
        ] {
            assert!(
                (erf(x) - e).abs() <= 2e-16 * e.abs(),
                "erf({x}) = {}",
                erf(x)
            );
            assert!(
                (erfc(x) - ec).abs() <= 1e-15 * ec,
                "erfc({x}) = {}",
                erfc(x)
            );
        }
        assert!(erf(f64::NAN).is_nan() && erfc(f64::NAN).is_nan());
        assert_eq!((erf(f64::INFINITY), erf(f64::NEG_INFINITY)), (1.0, -1.0));
        assert_eq!((erfc(f64::INFINITY), erfc(f64::NEG_INFINITY)), (0.0, 2.0));
    }

    #[test]
    fn gelu_and_its_derivative() {
        // (x, gelu(x), gelu_deriv(x)) from mpmath.
        for (x, g, d) in [
            (1.0, 0.8413447460685429, 1.0833154705876864),
            (-1.0, -0.15865525393145705, -0.0833154705876863),
            (-3.0, -0.0040496940948902835, -0.011945647204183927),
            (2.5, 2.4844758366855597, 1.037611085908145),
            (-6.0, -5.9195258702261885e-09, -3.5468709453902015e-08),
        ] {
            assert!(
                (gelu(x) - g).abs() <= 1e-15 * g.abs(),
                "gelu({x}) = {}",
                gelu(x)
            );
            let gd = gelu_deriv(x);
            assert!((gd - d).abs() <= 1e-14 * d.abs(), "gelu_deriv({x}) = {gd}");
        }
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu_deriv(0.0), 0.5);
        assert_eq!(
            (gelu(f64::NEG_INFINITY), gelu(f64::INFINITY)),
            (0.0, f64::INFINITY)
        );
        assert_eq!(
            (gelu_deriv(f64::NEG_INFINITY), gelu_deriv(f64::INFINITY)),
            (0.0, 1.0)
        );
        // Central differences of gelu.
        for i in -60..=60 {
            let x = f64::from(i) * 0.1;
            let h = 1e-5;
            let fd = (gelu(x + h) - gelu(x - h)) / (2.0 * h);
            assert!(
                (fd - gelu_deriv(x)).abs() < 1e-9,
                "{x}: {fd} vs {}",
                gelu_deriv(x)
            );
        }
    }

    #[test]
    fn sign_follows_torch() {
        assert_eq!(sign(3.0), 1.0);
        assert_eq!(sign(-0.5), -1.0);
        assert_eq!(sign(0.0), 0.0);
        assert_eq!(sign(-0.0), 0.0);
        assert!(sign(f64::NAN).is_nan());
    }

    fn vals(pairs: &[(&str, Tensor64)]) -> HashMap<String, Tensor64> {
        pairs
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect()
    }

    #[test]
    fn softmax_and_batch_binding() {
        let mut g = Graph::new("t");
        let x = g.input("x", TensorType::f32(Shape::batched(&[3])));
        let y = g.softmax(x, 1).unwrap();
        g.set_output("y", y);
        let out = eval(
            &g,
            &vals(&[(
                "x",
                Tensor64::new(vec![2, 3], vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0]),
            )]),
        )
        .unwrap();
        let e: f64 = 1.0 + 1f64.exp() + 2f64.exp();
        let want = [1.0 / e, 1f64.exp() / e, 2f64.exp() / e];
        assert_eq!(out[0].1.shape, vec![2, 3]);
        for (g, w) in out[0].1.data[..3].iter().zip(want) {
            assert!((g - w).abs() < 1e-15);
        }
        assert!(out[0].1.data[3..]
            .iter()
            .all(|&v| (v - 1.0 / 3.0).abs() < 1e-15));
        // A missing input, a wrongly shaped one.
        assert!(eval(&g, &HashMap::new()).unwrap_err().contains("\"x\""));
        let err = eval(&g, &vals(&[("x", Tensor64::zeros(vec![2, 4]))])).unwrap_err();
        assert!(err.contains("\"x\""), "{err}");
    }

    #[test]
    fn missing_param_and_bad_declared_type_are_errors() {
        let mut g = Graph::new("t");
        let x = g.input("x", TensorType::f32(Shape::fixed(&[2, 3])));
        let w = g.param(
            "w",
            false,
            crate::Init::Checkpoint,
            TensorType::f32(Shape::fixed(&[3])),
        );
        let y = g.binary(BinaryOp::Add, x, w).unwrap();
        g.set_output("y", y);
        let x0 = Tensor64::zeros(vec![2, 3]);
        let err = eval(&g, &vals(&[("x", x0.clone())])).unwrap_err();
        assert!(err.contains("\"w\""), "{err}");
        let err = eval(
            &g,
            &vals(&[("x", x0.clone()), ("w", Tensor64::zeros(vec![4]))]),
        )
        .unwrap_err();
        assert!(err.contains("\"w\""), "{err}");
        // A node whose declared type lies.
        let mut g2 = Graph::new("t");
        let x = g2.input("x", TensorType::f32(Shape::fixed(&[2, 3])));
        let y = g2
            .add_typed(
                Op::Unary(UnaryOp::Exp),
                &[x],
                TensorType::f32(Shape::fixed(&[3, 2])),
            )
            .unwrap();
        g2.set_output("y", y);
        let err = eval(&g2, &vals(&[("x", x0)])).unwrap_err();
        assert!(err.contains("%1") && err.contains("exp"), "{err}");
    }

    #[test]
    fn fused_ops_match_their_decompositions() {
        let mut g = Graph::new("t");
        let s = g.input("s", TensorType::f32(Shape::batched(&[2, 3, 4])));
        let z = g.input("z", TensorType::f32(Shape::fixed(&[3, 1])));
        let q = g.input("q", TensorType::f32(Shape::batched(&[2, 3, 5])));
        let k = g.input("k", TensorType::f32(Shape::fixed(&[4, 5])));
        let v = g.input("v", TensorType::f32(Shape::batched(&[2, 4, 6])));
        let w = g.input("w", TensorType::f32(Shape::fixed(&[7, 6])));
        let b = g.input("b", TensorType::f32(Shape::fixed(&[7])));
        let ss = g.softmax_sink(s, z).unwrap();
        let a = g.attention(q, k, v, Some(z), 0.3).unwrap();
        let a2 = g.attention(q, k, v, None, 0.7).unwrap();
        let r = g.input("r", TensorType::f32(Shape::batched(&[2, 3, 7])));
        let l = g.linear(a, w, Some(b), Activation::Gelu, Some(r)).unwrap();
        g.set_output("ss", ss);
        g.set_output("a2", a2);
        g.set_output("l", l);
        // The fused attention backward (k broadcast over the leading axes).
        let lse = g
            .add(
                Op::AttentionLse {
                    scale: 0.3,
                    sink: true,
                },
                &[q, k, z],
            )
            .unwrap();
        let lse2 = g
            .add(
                Op::AttentionLse {
                    scale: 0.7,
                    sink: false,
                },
                &[q, k],
            )
            .unwrap();
        let dl = g.input("dl", TensorType::f32(Shape::batched(&[2, 3, 1])));
        let dout = g.input("do", TensorType::f32(Shape::batched(&[2, 3, 6])));
        g.set_output("lse", lse);
        g.set_output("lse2", lse2);
        for wrt in crate::op::AttnWrt::ALL {
            let gr = g
                .add(
                    Op::AttentionGrad { scale: 0.3, wrt },
                    &[q, k, v, lse, dl, dout],
                )
                .unwrap();
            g.set_output(&format!("grad_{}", wrt.name()), gr);
        }
        let mut seed = 1u64;
        let mut rand = |shape: Vec<usize>| {
            let n = numel(&shape);
            let data = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
                })
                .collect();
            Tensor64::new(shape, data)
        };
        let values = vals(&[
            ("s", rand(vec![2, 2, 3, 4])),
            ("z", rand(vec![3, 1])),
            ("q", rand(vec![2, 2, 3, 5])),
            ("k", rand(vec![4, 5])),
            ("v", rand(vec![2, 2, 4, 6])),
            ("w", rand(vec![7, 6])),
            ("b", rand(vec![7])),
            ("r", rand(vec![2, 2, 3, 7])),
            ("dl", rand(vec![2, 2, 3, 1])),
            ("do", rand(vec![2, 2, 3, 6])),
        ]);
        let fused = eval(&g, &values).unwrap();
        let mut d = g.clone();
        assert_eq!(
            crate::decompose::lower_unsupported(&mut d, &|_| false).unwrap(),
            9
        );
        let prim = eval(&d, &values).unwrap();
        for ((n, a), (_, b)) in fused.iter().zip(&prim) {
            assert_eq!(a.shape, b.shape, "{n}");
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!((x - y).abs() < 1e-13, "{n}: {x} vs {y}");
            }
        }
    }
}
