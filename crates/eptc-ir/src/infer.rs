//! Shape rules: the output type of an op from its operands' types.

use crate::op::Op;
use crate::types::{Dim, Shape, TensorType};

/// Numpy broadcasting of two shapes (aligned on the right).
pub fn broadcast_shapes(a: &Shape, b: &Shape) -> Result<Shape, String> {
    let r = a.rank().max(b.rank());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = if i + a.rank() >= r {
            a.0[i + a.rank() - r]
        } else {
            Dim::Fixed(1)
        };
        let db = if i + b.rank() >= r {
            b.0[i + b.rank() - r]
        } else {
            Dim::Fixed(1)
        };
        out.push(match (da, db) {
            (x, y) if x == y => x,
            (Dim::Fixed(1), y) => y,
            (x, Dim::Fixed(1)) => x,
            _ => return Err(format!("shapes {a} and {b} do not broadcast")),
        });
    }
    Ok(Shape(out))
}

/// Whether `from` broadcasts to exactly `to`.
pub fn broadcasts_to(from: &Shape, to: &Shape) -> bool {
    from.rank() <= to.rank() && broadcast_shapes(from, to).is_ok_and(|s| &s == to)
}

/// `(batch_power, fixed_product)` like [`Shape::symbolic_numel`], or `None` when the
/// fixed product overflows `usize` (a hostile or corrupt shape must not panic).
fn checked_symbolic_numel(s: &Shape) -> Option<(usize, usize)> {
    s.0.iter().try_fold((0usize, 1usize), |(p, n), d| match d {
        Dim::Batch => Some((p + 1, n)),
        Dim::Fixed(k) => n.checked_mul(*k).map(|n| (p, n)),
    })
}

/// `s` with its last dimension replaced by `d` (`s` has rank >= 1).
fn with_last(s: &Shape, d: Dim) -> Shape {
    let mut v = s.0.clone();
    if let Some(l) = v.last_mut() {
        *l = d;
    }
    Shape(v)
}

fn axis_ok(axis: usize, rank: usize, what: &str) -> Result<(), String> {
    if axis >= rank {
        Err(format!("{what} {axis} out of range for rank {rank}"))
    } else {
        Ok(())
    }
}

/// The output type of a non-leaf op applied to operands of the given types.
pub fn infer(op: &Op, operands: &[&TensorType]) -> Result<TensorType, String> {
    match op.arity() {
        Some(n) if operands.len() != n => {
            return Err(format!(
                "{} takes {n} operand(s), got {}",
                op.kind(),
                operands.len()
            ))
        }
        None if operands.len() < 2 => {
            return Err(format!(
                "{} takes at least 2 operands, got {}",
                op.kind(),
                operands.len()
            ))
        }
        _ => {}
    }
    if op.is_leaf() {
        return Err(format!(
            "{} is a leaf: its type is declared, not inferred",
            op.kind()
        ));
    }
    let dtype = operands[0].dtype;
    if let Some(o) = operands.iter().find(|o| o.dtype != dtype) {
        return Err(format!("mixed element types {} and {}", dtype, o.dtype));
    }
    let x = &operands[0].shape;
    let shape = match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => {
            unreachable!("leaves handled above")
        }
        Op::Patchify { patch } => {
            let p = *patch;
            if p == 0 {
                return Err("patch size 0".into());
            }
            if x.rank() != 4 {
                return Err(format!("patchify wants [B,C,H,W], got {x}"));
            }
            let fixed = |i: usize| {
                x.0[i]
                    .fixed()
                    .ok_or_else(|| format!("patchify needs fixed C, H, W, got {x}"))
            };
            let (c, h, w) = (fixed(1)?, fixed(2)?, fixed(3)?);
            if h % p != 0 || w % p != 0 {
                return Err(format!(
                    "image {h}x{w} is not a multiple of the patch size {p}"
                ));
            }
            let too_big = || format!("patchify of {x} with patch {p}: size overflows");
            let tokens = (h / p).checked_mul(w / p).ok_or_else(too_big)?;
            let features = c
                .checked_mul(p)
                .and_then(|n| n.checked_mul(p))
                .ok_or_else(too_big)?;
            Shape(vec![x.0[0], Dim::Fixed(tokens), Dim::Fixed(features)])
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let (a, b) = (&operands[0].shape, &operands[1].shape);
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!("matmul needs rank >= 2, got {a} and {b}"));
            }
            let (ra, rb) = (a.rank(), b.rank());
            let (m, ka) = if *transpose_a {
                (a.0[ra - 1], a.0[ra - 2])
            } else {
                (a.0[ra - 2], a.0[ra - 1])
            };
            let (kb, n) = if *transpose_b {
                (b.0[rb - 1], b.0[rb - 2])
            } else {
                (b.0[rb - 2], b.0[rb - 1])
            };
            if ka != kb {
                return Err(format!("matmul inner dimensions differ: {a} and {b}"));
            }
            let lead = broadcast_shapes(
                &Shape(a.0[..ra - 2].to_vec()),
                &Shape(b.0[..rb - 2].to_vec()),
            )?;
            let mut out = lead.0;
            out.push(m);
            out.push(n);
            Shape(out)
        }
        Op::Binary(_) => broadcast_shapes(x, &operands[1].shape)?,
        Op::Unary(_) => x.clone(),
        Op::Reduce { axes, keepdim, .. } => {
            if axes.is_empty() {
                return Err("reduce over no axis".into());
            }
            for (i, &a) in axes.iter().enumerate() {
                axis_ok(a, x.rank(), "axis")?;
                if axes[..i].contains(&a) {
                    return Err(format!("axis {a} repeated"));
                }
            }
            let mut out = Vec::new();
            for (i, d) in x.0.iter().enumerate() {
                if axes.contains(&i) {
                    if *keepdim {
                        out.push(Dim::Fixed(1));
                    }
                } else {
                    out.push(*d);
                }
            }
            Shape(out)
        }
        Op::Softmax { axis } => {
            axis_ok(*axis, x.rank(), "axis")?;
            x.clone()
        }
        Op::LayerNorm { eps } => {
            if !(eps.is_finite() && *eps >= 0.0) {
                return Err(format!("layernorm eps must be finite and >= 0, got {eps}"));
            }
            let d = x.0.last().copied().ok_or("layernorm of a scalar")?;
            let want = Shape(vec![d]);
            for (i, o) in operands[1..].iter().enumerate() {
                if o.shape != want {
                    let what = if i == 0 { "gamma" } else { "beta" };
                    return Err(format!("layernorm {what} must be {want}, got {}", o.shape));
                }
            }
            x.clone()
        }
        Op::LayerNormGrad { eps } => {
            if !(eps.is_finite() && *eps >= 0.0) {
                return Err(format!(
                    "layernorm_grad eps must be finite and >= 0, got {eps}"
                ));
            }
            let d = x.0.last().copied().ok_or("layernorm_grad of a scalar")?;
            if operands[1].shape != Shape(vec![d]) {
                return Err(format!(
                    "layernorm_grad gamma must be [{d}], got {}",
                    operands[1].shape
                ));
            }
            if operands[2].shape != *x {
                return Err(format!(
                    "layernorm_grad dy must be {x} (the shape of x), got {}",
                    operands[2].shape
                ));
            }
            x.clone()
        }
        Op::Reshape { shape } => {
            let (from, to) = (checked_symbolic_numel(x), checked_symbolic_numel(shape));
            if from.is_none() || from != to {
                return Err(format!(
                    "cannot reshape {x} to {shape}: element counts differ"
                ));
            }
            shape.clone()
        }
        Op::Permute { perm } => {
            if perm.len() != x.rank() {
                return Err(format!("permutation {perm:?} for rank {}", x.rank()));
            }
            let mut seen = vec![false; perm.len()];
            for &p in perm {
                if p >= perm.len() || seen[p] {
                    return Err(format!("{perm:?} is not a permutation"));
                }
                seen[p] = true;
            }
            Shape(perm.iter().map(|&p| x.0[p]).collect())
        }
        Op::Concat { axis } => {
            axis_ok(*axis, x.rank(), "axis")?;
            let mut total = 0;
            for o in operands {
                let s = &o.shape;
                if s.rank() != x.rank() {
                    return Err(format!("concat of ranks {} and {}", x.rank(), s.rank()));
                }
                for i in 0..x.rank() {
                    if i != *axis && s.0[i] != x.0[i] {
                        return Err(format!("concat along {axis} of {x} and {s}"));
                    }
                }
                let n = s.0[*axis]
                    .fixed()
                    .ok_or("concat along the batch axis is not supported")?;
                total = usize::checked_add(total, n).ok_or("concat size overflows")?;
            }
            let mut out = x.0.clone();
            out[*axis] = Dim::Fixed(total);
            Shape(out)
        }
        Op::Slice { axis, start, end } => {
            axis_ok(*axis, x.rank(), "axis")?;
            let n = x.0[*axis].fixed().ok_or("slice along the batch axis")?;
            if start >= end || *end > n {
                return Err(format!("slice {start}..{end} out of range for size {n}"));
            }
            let mut out = x.0.clone();
            out[*axis] = Dim::Fixed(end - start);
            Shape(out)
        }
        Op::Broadcast { shape } => {
            if !broadcasts_to(x, shape) {
                return Err(format!("{x} does not broadcast to {shape}"));
            }
            shape.clone()
        }
        Op::SoftmaxSink => {
            let z = &operands[1].shape;
            if x.rank() == 0 {
                return Err("softmax_sink of a scalar".into());
            }
            let rows = with_last(x, Dim::Fixed(1));
            if !broadcasts_to(z, &rows) {
                return Err(format!(
                    "softmax_sink z {z} does not broadcast to {rows} (s {x} with the last dim 1)"
                ));
            }
            x.clone()
        }
        Op::Attention { scale, sink } => {
            if !scale.is_finite() {
                return Err(format!("attention scale must be finite, got {scale}"));
            }
            let (q, k, v) = (x, &operands[1].shape, &operands[2].shape);
            if q.rank() < 2 || k.rank() < 2 || v.rank() < 2 {
                return Err(format!(
                    "attention needs rank >= 2, got q {q}, k {k}, v {v}"
                ));
            }
            let last2 = |s: &Shape| (s.0[s.rank() - 2], s.0[s.rank() - 1]);
            let lead = |s: &Shape| Shape(s.0[..s.rank() - 2].to_vec());
            let ((n, d), (m, dk), (mv, e)) = (last2(q), last2(k), last2(v));
            if d != dk {
                return Err(format!(
                    "attention q and k feature dims differ: q {q}, k {k}"
                ));
            }
            if m != mv {
                return Err(format!(
                    "attention k and v token counts differ: k {k}, v {v}"
                ));
            }
            let l = broadcast_shapes(&broadcast_shapes(&lead(q), &lead(k))?, &lead(v))?;
            if *sink {
                let z = &operands[3].shape;
                let mut rows = l.0.clone();
                rows.extend([n, Dim::Fixed(1)]);
                let rows = Shape(rows);
                if !broadcasts_to(z, &rows) {
                    return Err(format!("attention sink z {z} does not broadcast to {rows}"));
                }
            }
            let mut out = l.0;
            out.extend([n, e]);
            Shape(out)
        }
        Op::AttentionLse { scale, sink } => {
            if !scale.is_finite() {
                return Err(format!("attention_lse scale must be finite, got {scale}"));
            }
            let (q, k) = (x, &operands[1].shape);
            if q.rank() < 2 || k.rank() < 2 {
                return Err(format!("attention_lse needs rank >= 2, got q {q}, k {k}"));
            }
            let (n, d) = (q.0[q.rank() - 2], q.0[q.rank() - 1]);
            if d != k.0[k.rank() - 1] {
                return Err(format!(
                    "attention_lse q and k feature dims differ: q {q}, k {k}"
                ));
            }
            let lead = |s: &Shape| Shape(s.0[..s.rank() - 2].to_vec());
            let mut rows = broadcast_shapes(&lead(q), &lead(k))?.0;
            rows.extend([n, Dim::Fixed(1)]);
            let rows = Shape(rows);
            if *sink {
                let z = &operands[2].shape;
                if !broadcasts_to(z, &rows) {
                    return Err(format!(
                        "attention_lse sink z {z} does not broadcast to {rows}"
                    ));
                }
            }
            rows
        }
        Op::AttentionGrad { scale, wrt } => {
            if !scale.is_finite() {
                return Err(format!("attention_grad scale must be finite, got {scale}"));
            }
            let names = ["q", "k", "v", "lse", "delta", "dO"];
            for (o, name) in operands.iter().zip(names) {
                if o.shape.rank() < 2 {
                    return Err(format!(
                        "attention_grad needs rank >= 2, got {name} {}",
                        o.shape
                    ));
                }
            }
            let last2 = |s: &Shape| (s.0[s.rank() - 2], s.0[s.rank() - 1]);
            let lead = |s: &Shape| Shape(s.0[..s.rank() - 2].to_vec());
            let sh: Vec<&Shape> = operands.iter().map(|o| &o.shape).collect();
            let ((n, d), (m, dk), (mv, e)) = (last2(sh[0]), last2(sh[1]), last2(sh[2]));
            let one = Dim::Fixed(1);
            let fits = d == dk
                && m == mv
                && last2(sh[3]) == (n, one)
                && last2(sh[4]) == (n, one)
                && last2(sh[5]) == (n, e);
            if !fits {
                return Err(format!(
                    "attention_grad shapes do not fit: q {} [n, d], k {} [m, d], v {} [m, e], lse {} and delta {} [n, 1], dO {} [n, e]",
                    sh[0], sh[1], sh[2], sh[3], sh[4], sh[5]
                ));
            }
            let mut l = lead(sh[0]);
            for s in &sh[1..] {
                l = broadcast_shapes(&l, &lead(s))?;
            }
            let mut out = l.0;
            out.extend(match wrt {
                crate::op::AttnWrt::Q => [n, d],
                crate::op::AttnWrt::K => [m, d],
                crate::op::AttnWrt::V => [m, e],
            });
            Shape(out)
        }
        Op::Linear { bias, residual, .. } => {
            let w = &operands[1].shape;
            let kx = *x.0.last().ok_or("linear of a scalar x")?;
            if w.rank() != 2 {
                return Err(format!("linear w must be [out, in], got {w}"));
            }
            if w.0[1] != kx {
                return Err(format!("linear inner dimensions differ: x {x}, w {w}"));
            }
            let out = with_last(x, w.0[0]);
            let mut next = 2;
            if *bias {
                let b = &operands[next].shape;
                if *b != Shape(vec![w.0[0]]) {
                    return Err(format!("linear bias must be [{}], got {b}", w.0[0]));
                }
                next += 1;
            }
            if *residual {
                let r = &operands[next].shape;
                if *r != out {
                    return Err(format!("linear residual must be {out}, got {r}"));
                }
            }
            out
        }
    };
    Ok(TensorType::new(dtype, shape))
}
