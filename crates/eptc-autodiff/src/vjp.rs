//! The vector-Jacobian product of every op, written with IR ops.
//!
//! [`vjp`] takes a node, the adjoint `dy` of its output and which operands need a
//! gradient, and returns each needed operand's gradient contribution, already reduced to
//! that operand's shape (numpy broadcasting undone by summing). One short rule per op,
//! next to each other; each is checked against finite differences in f64
//! (`tests/finite_differences.rs`).

use eptc_ir::{Activation, AttnWrt, BinaryOp, Dim, Graph, NodeId, Op, ReduceOp, Shape, UnaryOp};

use crate::{AutodiffError, Result};

type Grads = Vec<Option<NodeId>>;

/// Gradients of node `id`'s operands given `dy`, the adjoint of its output; `None` where
/// `needs` is false or the op passes no gradient to that operand.
pub fn vjp(g: &mut Graph, id: NodeId, dy: NodeId, needs: &[bool]) -> Result<Grads> {
    vjp_with(g, id, dy, needs, &crate::Options::default())
}

/// [`vjp`] with the pass's options (the fused attention backward).
pub fn vjp_with(
    g: &mut Graph,
    id: NodeId,
    dy: NodeId,
    needs: &[bool],
    opts: &crate::Options,
) -> Result<Grads> {
    let op = g.node(id).op.clone();
    let x = g.operands(id);
    let mut out: Grads = match &op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => vec![],
        Op::Binary(b) => binary(g, *b, id, &x, dy)?,
        Op::Unary(u) => vec![unary(g, *u, id, x[0], dy)?],
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => matmul(g, x[0], x[1], *transpose_a, *transpose_b, dy, needs)?,
        Op::Reduce { op, axes, keepdim } => vec![reduce(g, *op, id, x[0], axes, *keepdim, dy)?],
        Op::Softmax { axis } => vec![Some(softmax(g, id, *axis, dy)?)],
        Op::LayerNorm { eps } => layernorm(g, &x, *eps, dy, needs)?,
        Op::Reshape { .. } => {
            let shape = g.ty(x[0]).shape.clone();
            vec![Some(g.reshape(dy, shape)?)]
        }
        Op::Permute { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            vec![Some(g.permute(dy, &inv)?)]
        }
        Op::Concat { axis } => {
            let mut start = 0;
            let mut v = Vec::new();
            for &o in &x {
                let n = fixed(g, o, *axis, "concat")?;
                v.push(Some(g.slice(dy, *axis, start, start + n)?));
                start += n;
            }
            v
        }
        Op::Slice { axis, start, end } => vec![Some(pad(g, dy, x[0], *axis, *start, *end)?)],
        Op::Broadcast { .. } => vec![Some(dy)],
        Op::Patchify { patch } => vec![Some(unpatchify(g, dy, x[0], *patch)?)],
        Op::SoftmaxSink => softmax_sink(g, id, x[0], x[1], dy)?,
        Op::Attention { scale, sink } if opts.fused_attention => {
            attention_fused(g, id, &x, *scale, *sink, dy, needs)?
        }
        Op::Attention { scale, sink } => attention(g, id, &x, *scale, *sink, dy, needs)?,
        Op::Linear {
            bias,
            activation,
            residual,
        } => linear(g, &x, *bias, *activation, *residual, dy, needs)?,
        Op::LayerNormGrad { .. } | Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            return Err(AutodiffError::Unsupported {
                op: op.kind().into(),
                node: id.index(),
                why: "second derivatives are not supported".into(),
            })
        }
    };
    out.resize(x.len(), None);
    for (i, o) in out.iter_mut().enumerate() {
        if !needs[i] {
            *o = None;
        } else if let Some(gr) = *o {
            *o = Some(unbroadcast(g, gr, &g.ty(x[i]).shape.clone())?);
        }
    }
    Ok(out)
}

// ---- helpers ---------------------------------------------------------------------------

fn c(g: &mut Graph, v: f32) -> NodeId {
    g.scalar(v)
}
fn mul(g: &mut Graph, a: NodeId, b: NodeId) -> Result<NodeId> {
    Ok(g.binary(BinaryOp::Mul, a, b)?)
}
fn sub(g: &mut Graph, a: NodeId, b: NodeId) -> Result<NodeId> {
    Ok(g.binary(BinaryOp::Sub, a, b)?)
}
fn div(g: &mut Graph, a: NodeId, b: NodeId) -> Result<NodeId> {
    Ok(g.binary(BinaryOp::Div, a, b)?)
}
fn un(g: &mut Graph, op: UnaryOp, a: NodeId) -> Result<NodeId> {
    Ok(g.unary(op, a)?)
}
fn scale(g: &mut Graph, a: NodeId, s: f32) -> Result<NodeId> {
    let k = c(g, s);
    mul(g, a, k)
}
/// Sum over the last axis, kept as size 1.
fn row_sum(g: &mut Graph, a: NodeId) -> Result<NodeId> {
    let last = g.ty(a).shape.rank() - 1;
    Ok(g.reduce(ReduceOp::Sum, a, &[last], true)?)
}

fn fixed(g: &Graph, id: NodeId, axis: usize, what: &str) -> Result<usize> {
    g.ty(id).shape.dims()[axis]
        .fixed()
        .ok_or_else(|| AutodiffError::Unsupported {
            op: what.into(),
            node: id.index(),
            why: format!("axis {axis} is the batch"),
        })
}

/// Sum `grad` down to `target` (undo numpy broadcasting): leading axes summed away,
/// axes of size 1 in `target` summed with keepdim.
pub fn unbroadcast(g: &mut Graph, grad: NodeId, target: &Shape) -> Result<NodeId> {
    let mut cur = grad;
    let have = g.ty(cur).shape.clone();
    if &have == target {
        return Ok(cur);
    }
    let lead = have.rank() - target.rank();
    if lead > 0 {
        let axes: Vec<usize> = (0..lead).collect();
        cur = g.reduce(ReduceOp::Sum, cur, &axes, false)?;
    }
    let now = g.ty(cur).shape.clone();
    let axes: Vec<usize> = (0..target.rank())
        .filter(|&i| target.dims()[i] == Dim::Fixed(1) && now.dims()[i] != Dim::Fixed(1))
        .collect();
    if !axes.is_empty() {
        cur = g.reduce(ReduceOp::Sum, cur, &axes, true)?;
    }
    if &g.ty(cur).shape != target {
        return Err(AutodiffError::Unsupported {
            op: "broadcast".into(),
            node: grad.index(),
            why: format!("cannot reduce a gradient of shape {have} to {target}"),
        });
    }
    Ok(cur)
}

/// `dy` of a reduction, reshaped to the keepdim shape and broadcast back over `x`.
fn spread(g: &mut Graph, dy: NodeId, x: NodeId, axes: &[usize], keepdim: bool) -> Result<NodeId> {
    let xs = g.ty(x).shape.clone();
    let kept = if keepdim {
        dy
    } else {
        let dims =
            xs.dims()
                .iter()
                .enumerate()
                .map(|(i, d)| if axes.contains(&i) { Dim::Fixed(1) } else { *d });
        g.reshape(dy, Shape::new(dims))?
    };
    Ok(g.broadcast(kept, xs)?)
}

/// The reduction's output with keepdim (reshaped when the op dropped the axes).
fn kept(g: &mut Graph, y: NodeId, x: NodeId, axes: &[usize], keepdim: bool) -> Result<NodeId> {
    if keepdim {
        return Ok(y);
    }
    let dims: Vec<Dim> = g
        .ty(x)
        .shape
        .dims()
        .iter()
        .enumerate()
        .map(|(i, d)| if axes.contains(&i) { Dim::Fixed(1) } else { *d })
        .collect();
    Ok(g.reshape(y, Shape::new(dims))?)
}

// ---- rules -----------------------------------------------------------------------------

fn binary(g: &mut Graph, op: BinaryOp, y: NodeId, x: &[NodeId], dy: NodeId) -> Result<Grads> {
    let (a, b) = (x[0], x[1]);
    Ok(match op {
        BinaryOp::Add => vec![Some(dy), Some(dy)],
        BinaryOp::Sub => vec![Some(dy), Some(un(g, UnaryOp::Neg, dy)?)],
        BinaryOp::Mul => vec![Some(mul(g, dy, b)?), Some(mul(g, dy, a)?)],
        BinaryOp::Div => {
            let da = div(g, dy, b)?;
            let t = mul(g, da, y)?;
            vec![Some(da), Some(un(g, UnaryOp::Neg, t)?)]
        }
        // The gradient goes to the side that was taken (to `a` on ties).
        BinaryOp::Maximum | BinaryOp::Minimum => {
            let m = g.binary(BinaryOp::Equal, y, a)?;
            let da = mul(g, dy, m)?;
            let db = sub(g, dy, da)?;
            vec![Some(da), Some(db)]
        }
        BinaryOp::Equal => vec![None, None],
    })
}

fn unary(g: &mut Graph, op: UnaryOp, y: NodeId, x: NodeId, dy: NodeId) -> Result<Option<NodeId>> {
    let r = match op {
        UnaryOp::Neg => un(g, UnaryOp::Neg, dy)?,
        UnaryOp::Exp => mul(g, dy, y)?,
        UnaryOp::Log => div(g, dy, x)?,
        // d sqrt(x) = 1 / (2 sqrt(x))
        UnaryOp::Sqrt => {
            let t = div(g, dy, y)?;
            scale(g, t, 0.5)?
        }
        // d x^(-1/2) = -1/2 y^3
        UnaryOp::Rsqrt => {
            let y2 = mul(g, y, y)?;
            let y3 = mul(g, y2, y)?;
            let t = mul(g, dy, y3)?;
            scale(g, t, -0.5)?
        }
        // d (1/x) = -y^2
        UnaryOp::Recip => {
            let y2 = mul(g, y, y)?;
            let t = mul(g, dy, y2)?;
            un(g, UnaryOp::Neg, t)?
        }
        UnaryOp::Abs => {
            let s = un(g, UnaryOp::Sign, x)?;
            mul(g, dy, s)?
        }
        UnaryOp::Tanh => {
            let y2 = mul(g, y, y)?;
            let one = c(g, 1.0);
            let d = sub(g, one, y2)?;
            mul(g, dy, d)?
        }
        UnaryOp::Sigmoid => {
            let one = c(g, 1.0);
            let d = sub(g, one, y)?;
            let d = mul(g, y, d)?;
            mul(g, dy, d)?
        }
        // 1 where x > 0 (0 at 0, like PyTorch): sign(relu(x)).
        UnaryOp::Relu => {
            let s = un(g, UnaryOp::Sign, y)?;
            mul(g, dy, s)?
        }
        UnaryOp::Gelu => {
            let d = un(g, UnaryOp::GeluDeriv, x)?;
            mul(g, dy, d)?
        }
        UnaryOp::Sign => return Ok(None),
        UnaryOp::GeluDeriv => {
            return Err(AutodiffError::Unsupported {
                op: op.name().into(),
                node: y.index(),
                why: "second derivatives are not supported".into(),
            })
        }
    };
    Ok(Some(r))
}

/// `C = op(A) op(B)`: `dA = dC op(B)^T`, `dB = op(A)^T dC`, transposed back when the
/// operand was used transposed.
fn matmul(
    g: &mut Graph,
    a: NodeId,
    b: NodeId,
    ta: bool,
    tb: bool,
    dy: NodeId,
    needs: &[bool],
) -> Result<Grads> {
    let da = if needs[0] {
        Some(if ta {
            g.matmul(b, dy, tb, true)?
        } else {
            g.matmul(dy, b, false, !tb)?
        })
    } else {
        None
    };
    let db = if needs[1] {
        Some(if tb {
            g.matmul(dy, a, true, ta)?
        } else {
            g.matmul(a, dy, !ta, false)?
        })
    } else {
        None
    };
    Ok(vec![da, db])
}

fn reduce(
    g: &mut Graph,
    op: ReduceOp,
    y: NodeId,
    x: NodeId,
    axes: &[usize],
    keepdim: bool,
    dy: NodeId,
) -> Result<Option<NodeId>> {
    let d = spread(g, dy, x, axes, keepdim)?;
    Ok(Some(match op {
        ReduceOp::Sum => d,
        ReduceOp::Mean => {
            let n = count(g, x, axes)?;
            div(g, d, n)?
        }
        // Shared evenly between tied extremes, as torch.amax / amin do.
        ReduceOp::Max | ReduceOp::Min => {
            let yk = kept(g, y, x, axes, keepdim)?;
            let m = g.binary(BinaryOp::Equal, x, yk)?;
            let n = g.reduce(ReduceOp::Sum, m, axes, true)?;
            let w = div(g, m, n)?;
            mul(g, d, w)?
        }
        // softmax of x over the axes
        ReduceOp::LogSumExp => {
            let yk = kept(g, y, x, axes, keepdim)?;
            let t = sub(g, x, yk)?;
            let p = un(g, UnaryOp::Exp, t)?;
            mul(g, d, p)?
        }
    }))
}

/// The number of elements a reduction over `axes` of `x` combines, as a scalar node (the
/// batch, when reduced, is counted at run time).
fn count(g: &mut Graph, x: NodeId, axes: &[usize]) -> Result<NodeId> {
    let dims = g.ty(x).shape.dims().to_vec();
    let fixed: usize = axes.iter().filter_map(|&a| dims[a].fixed()).product();
    let k = c(g, fixed as f32);
    if axes.iter().all(|&a| dims[a].fixed().is_some()) {
        return Ok(k);
    }
    let one = c(g, 1.0);
    let ones = g.broadcast(one, Shape::new([Dim::Batch]))?;
    let b = g.reduce(ReduceOp::Sum, ones, &[0], false)?;
    mul(g, b, k)
}

/// `y = softmax(x)`: `dx = y * (dy - sum(dy * y))` along the axis.
fn softmax(g: &mut Graph, y: NodeId, axis: usize, dy: NodeId) -> Result<NodeId> {
    let t = mul(g, dy, y)?;
    let s = g.reduce(ReduceOp::Sum, t, &[axis], true)?;
    let d = sub(g, dy, s)?;
    mul(g, y, d)
}

/// LayerNorm over the last axis: `dx` is the fused `layernorm_grad(x, gamma, dy)`
/// (`rstd * (g' - mean(g') - xhat * mean(g' * xhat))`, `g' = dy * gamma`); `dgamma =
/// sum(dy * xhat)` and `dbeta = sum(dy)` over the leading axes.
fn layernorm(g: &mut Graph, x: &[NodeId], eps: f32, dy: NodeId, needs: &[bool]) -> Result<Grads> {
    let (xv, gamma) = (x[0], x[1]);
    let dx = if needs[0] {
        Some(g.add(Op::LayerNormGrad { eps }, &[xv, gamma, dy])?)
    } else {
        None
    };
    let dgamma = if needs[1] {
        // xhat = layernorm(x, 1, 0)
        let d = fixed(g, xv, g.ty(xv).shape.rank() - 1, "layernorm")?;
        let ones = g.constant(vec![1.0; d], &[d])?;
        let zeros = g.constant(vec![0.0; d], &[d])?;
        let xhat = g.layernorm(xv, ones, zeros, eps)?;
        Some(mul(g, dy, xhat)?)
    } else {
        None
    };
    Ok(vec![dx, dgamma, Some(dy)])
}

/// Zeros of `x`'s shape except `len` along `axis`.
pub(crate) fn zeros_like_along(
    g: &mut Graph,
    x: NodeId,
    axis: usize,
    len: usize,
) -> Result<NodeId> {
    let mut dims = g.ty(x).shape.dims().to_vec();
    dims[axis] = Dim::Fixed(len);
    let z = c(g, 0.0);
    Ok(g.broadcast(z, Shape::new(dims))?)
}

/// The adjoint of a slice: `dy` placed at `start..end` of `axis`, zeros elsewhere.
pub(crate) fn pad(
    g: &mut Graph,
    dy: NodeId,
    x: NodeId,
    axis: usize,
    start: usize,
    end: usize,
) -> Result<NodeId> {
    let n = fixed(g, x, axis, "slice")?;
    let mut parts = Vec::new();
    if start > 0 {
        parts.push(zeros_like_along(g, x, axis, start)?);
    }
    parts.push(dy);
    if end < n {
        parts.push(zeros_like_along(g, x, axis, n - end)?);
    }
    if parts.len() == 1 {
        return Ok(dy);
    }
    Ok(g.concat(&parts, axis)?)
}

/// The adjoint of `patchify`: `[.., gh*gw, C*p*p]` back to `[.., C, H, W]`.
fn unpatchify(g: &mut Graph, dy: NodeId, x: NodeId, p: usize) -> Result<NodeId> {
    let xs = g.ty(x).shape.clone();
    let r = xs.rank();
    let lead = &xs.dims()[..r - 3];
    let (ch, h, w) = (
        fixed(g, x, r - 3, "patchify")?,
        fixed(g, x, r - 2, "patchify")?,
        fixed(g, x, r - 1, "patchify")?,
    );
    let (gh, gw) = (h / p, w / p);
    let mut dims = lead.to_vec();
    dims.extend([gh, gw, ch, p, p].map(Dim::Fixed));
    let t = g.reshape(dy, Shape::new(dims))?;
    let l = lead.len();
    let mut perm: Vec<usize> = (0..l).collect();
    perm.extend([l + 2, l, l + 3, l + 1, l + 4]);
    let t = g.permute(t, &perm)?;
    Ok(g.reshape(t, xs)?)
}

/// The weight of the sink in each row: `exp(z) / (sum_j exp(s_j) + exp(z))`
/// `= sigmoid(z - logsumexp(s))`, without cancellation.
fn sink_weight(g: &mut Graph, s: NodeId, z: NodeId) -> Result<NodeId> {
    let last = g.ty(s).shape.rank() - 1;
    let lse = g.reduce(ReduceOp::LogSumExp, s, &[last], true)?;
    let t = sub(g, z, lse)?;
    un(g, UnaryOp::Sigmoid, t)
}

/// `A = softmax_sink(s, z)`: with `delta = rowsum(dA * A)`, `ds = A * (dA - delta)` and
/// `dz = -w * delta`, `w` the sink's weight (DESIGN.md section 1).
fn softmax_sink(g: &mut Graph, a: NodeId, s: NodeId, z: NodeId, dy: NodeId) -> Result<Grads> {
    let t = mul(g, dy, a)?;
    let delta = row_sum(g, t)?;
    let d = sub(g, dy, delta)?;
    let ds = mul(g, a, d)?;
    let w = sink_weight(g, s, z)?;
    let wd = mul(g, w, delta)?;
    let dz = un(g, UnaryOp::Neg, wd)?;
    Ok(vec![Some(ds), Some(dz)])
}

/// `O = softmax_sink(scale * q k^T, z) v` (plain softmax without `z`). The attention
/// matrix is recomputed; `delta = rowsum(dO * O)` as a flash-attention backward has it;
/// `dS = A * (dO v^T - delta)`, `dq = scale dS k`, `dk = scale dS^T q`, `dv = A^T dO`,
/// `dz = -w * delta`.
fn attention(
    g: &mut Graph,
    o: NodeId,
    x: &[NodeId],
    sc: f32,
    sink: bool,
    dy: NodeId,
    needs: &[bool],
) -> Result<Grads> {
    let (q, k, v) = (x[0], x[1], x[2]);
    let qk = g.matmul(q, k, false, true)?;
    let s = scale(g, qk, sc)?;
    let a = if sink {
        g.softmax_sink(s, x[3])?
    } else {
        let last = g.ty(s).shape.rank() - 1;
        g.softmax(s, last)?
    };
    let t = mul(g, dy, o)?;
    let delta = row_sum(g, t)?;
    let mut out: Grads = vec![None; x.len()];
    if needs[2] {
        out[2] = Some(g.matmul(a, dy, true, false)?);
    }
    if needs[0] || needs[1] {
        let da = g.matmul(dy, v, false, true)?;
        let d = sub(g, da, delta)?;
        let ds = mul(g, a, d)?;
        let ds = scale(g, ds, sc)?;
        if needs[0] {
            out[0] = Some(g.matmul(ds, k, false, false)?);
        }
        if needs[1] {
            out[1] = Some(g.matmul(ds, q, true, false)?);
        }
    }
    if sink && needs[3] {
        let w = sink_weight(g, s, x[3])?;
        let wd = mul(g, w, delta)?;
        out[3] = Some(un(g, UnaryOp::Neg, wd)?);
    }
    Ok(out)
}

/// The attention's backward as fused ops (a flash-attention backward: no attention
/// matrix is materialised): `lse = attention_lse(q, k[, z])`, `delta = rowsum(dO * O)`,
/// `dq`, `dk`, `dv` from `attention_grad`, and the sink's `dz = -exp(z - lse) * delta`
/// (its weight `exp(z) / D` times `-delta`, DESIGN.md section 1).
fn attention_fused(
    g: &mut Graph,
    o: NodeId,
    x: &[NodeId],
    sc: f32,
    sink: bool,
    dy: NodeId,
    needs: &[bool],
) -> Result<Grads> {
    let (q, k, v) = (x[0], x[1], x[2]);
    let mut lse_ops = vec![q, k];
    if sink {
        lse_ops.push(x[3]);
    }
    let lse = g.add(Op::AttentionLse { scale: sc, sink }, &lse_ops)?;
    let t = mul(g, dy, o)?;
    let delta = row_sum(g, t)?;
    let mut out: Grads = vec![None; x.len()];
    for (i, wrt) in [AttnWrt::Q, AttnWrt::K, AttnWrt::V].into_iter().enumerate() {
        if needs[i] {
            let op = Op::AttentionGrad { scale: sc, wrt };
            out[i] = Some(g.add(op, &[q, k, v, lse, delta, dy])?);
        }
    }
    if sink && needs[3] {
        let d = sub(g, x[3], lse)?;
        let w = un(g, UnaryOp::Exp, d)?;
        let wd = mul(g, w, delta)?;
        out[3] = Some(un(g, UnaryOp::Neg, wd)?);
    }
    Ok(out)
}

/// `y = act(x w^T + b) + r`. A GELU epilogue recomputes the pre-activation (the pass
/// splits such linears first unless `Options::recompute_gelu`).
fn linear(
    g: &mut Graph,
    x: &[NodeId],
    bias: bool,
    act: Activation,
    residual: bool,
    dy: NodeId,
    needs: &[bool],
) -> Result<Grads> {
    let (xv, w) = (x[0], x[1]);
    let b = bias.then(|| x[2]);
    let dpre = match act {
        Activation::None => dy,
        Activation::Gelu => {
            // Recomputed here (`Options::recompute_gelu`): the pre-activation, and a
            // LayerNorm feeding it from that LayerNorm's input (which its own backward
            // keeps anyway), so the forward stores neither. Tagged so that `simplify`
            // does not share them with the forward's nodes.
            let prev = g.tag().map(str::to_owned);
            g.set_tag(Some(crate::RECOMPUTE_TAG));
            let src = match g.node(xv).op.clone() {
                op @ Op::LayerNorm { .. } => {
                    let ops = g.operands(xv);
                    g.add(op, &ops)?
                }
                _ => xv,
            };
            let pre = g.linear(src, w, b, Activation::None, None);
            g.set_tag(prev.as_deref());
            let d = un(g, UnaryOp::GeluDeriv, pre?)?;
            mul(g, dy, d)?
        }
    };
    if g.ty(xv).shape.rank() < 2 {
        return Err(AutodiffError::Unsupported {
            op: "linear".into(),
            node: xv.index(),
            why: "the gradient of a linear on a vector is not implemented".into(),
        });
    }
    let mut out: Grads = vec![None; x.len()];
    if needs[0] {
        out[0] = Some(g.matmul(dpre, w, false, false)?);
    }
    if needs[1] {
        out[1] = Some(g.matmul(dpre, xv, true, false)?);
    }
    if bias && needs[2] {
        out[2] = Some(dpre);
    }
    if residual {
        out[2 + usize::from(bias)] = Some(dy);
    }
    Ok(out)
}
