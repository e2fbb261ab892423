//! LoRA (`--peft lora`): a trainable low-rank update of the query and value projections
//! of every block, as Hugging Face `peft` and the common LoRA:
//!
//! `q = x W_qᵀ + b_q + (alpha / r) · (x Aᵀ) Bᵀ`, `A` `[r, D]`, `B` `[D, r]`; `v` alike,
//! `k` untouched.
//!
//! `A` starts Kaiming-uniform with `a = √5` (PyTorch's `nn.Linear` and peft's default:
//! uniform on `±1/√D`) from the seed, `B` at zero, so the initial model is the
//! checkpoint's. The config names the method `lora-<r>` (`lora-<r>-alpha-<A>` when
//! `alpha != r`); `alpha` defaults to `r` (scale 1).
//!
//! The projections are found from the graph's structure, not from key names: the query
//! (key, value) of a block is the first (second) operand of its attention scores
//! `matmul(Q, K, transpose_b)` (the value the second of `matmul(probs, V)`), followed back
//! through reshapes, permutes and slices to its projection `matmul(x, W, transpose_b)`
//! (plus a bias). Hugging Face layouts have separate query/key/value projections; timm
//! and mmcls a fused `qkv` `[3D, D]` whose output thirds are q, k, v (checked from the
//! slices that take them apart): there the update is `concat(dq, dk = 0, dv)` on the
//! fused output, taken apart as `q + dq`, `k`, `v + dv`.

use eptc_ir::{BinaryOp, Graph, Init, NodeId, Op, Shape, TensorType};

use crate::error::{PeftError, Result};

/// The tag of every node this pass inserts.
pub const TAG: &str = "lora";

/// The default rank (the paper uses 1, 4, 8, 32, 64).
pub const DEFAULT_RANK: usize = 8;

/// The config's method name for rank `r` and `alpha`.
pub fn method_name(rank: usize, alpha: f32) -> String {
    if alpha == rank as f32 {
        format!("lora-{rank}")
    } else {
        format!("lora-{rank}-alpha-{alpha}")
    }
}

/// `(rank, alpha)` of a `lora-<r>[-alpha-<A>]` method name.
pub fn parse_method(method: &str) -> Option<(usize, f32)> {
    let rest = method.strip_prefix("lora-")?;
    let (r, alpha) = match rest.split_once("-alpha-") {
        Some((r, a)) => (r.parse().ok()?, a.parse().ok()?),
        None => {
            let r: usize = rest.parse().ok()?;
            (r, r as f32)
        }
    };
    Some((r, alpha))
}

/// Check the rank and alpha of `--peft lora`.
pub fn check(rank: usize, alpha: f32) -> Result<()> {
    if rank == 0 {
        return Err(PeftError::Config("--rank must be at least 1".into()));
    }
    if !alpha.is_finite() || alpha <= 0.0 {
        return Err(PeftError::Config(format!(
            "--lora-alpha {alpha}: must be a positive number"
        )));
    }
    Ok(())
}

/// The names of the factors of block `i`'s projection `which` (`q` or `v`).
pub fn factor_names(i: usize, which: &str) -> (String, String) {
    (format!("lora.{i}.{which}.A"), format!("lora.{i}.{which}.B"))
}

/// A projection found from an attention operand: the node whose output the attention
/// reads (`matmul` or `matmul + bias`), its input `x`, and which third of a fused
/// output the operand takes (`None` if it reads the whole output).
struct Proj {
    out: NodeId,
    x: NodeId,
    third: Option<usize>,
}

fn is_param(g: &Graph, id: NodeId) -> bool {
    matches!(g.node(id).op, Op::Param { .. })
}

/// `matmul(x, W, transpose_b)` with `W` a param: `Some(x)`.
fn projection_input(g: &Graph, id: NodeId) -> Option<NodeId> {
    match g.node(id).op {
        Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        } => {
            let ops = g.operands(id);
            is_param(g, ops[1]).then_some(ops[0])
        }
        _ => None,
    }
}

/// Follow an attention operand back to its projection.
fn trace(g: &Graph, mut id: NodeId) -> Result<Proj> {
    let mut third = None;
    loop {
        if let Some(x) = projection_input(g, id) {
            return Ok(Proj { out: id, x, third });
        }
        let ops = g.operands(id);
        match g.node(id).op {
            Op::Binary(BinaryOp::Add) if ops.len() == 2 && is_param(g, ops[1]) => {
                if let Some(x) = projection_input(g, ops[0]) {
                    return Ok(Proj { out: id, x, third });
                }
                id = ops[0];
            }
            Op::Reshape { .. } | Op::Permute { .. } => id = ops[0],
            Op::Slice { start, end, .. } => {
                if third.is_none() && end == start + 1 {
                    third = Some(start);
                }
                id = ops[0];
            }
            _ => {
                return Err(PeftError::Pattern(format!(
                    "LoRA: no query/value projection behind an attention operand \
                     (reached {:?})",
                    g.node(id).op
                )))
            }
        }
    }
}

/// The `(query, value)` projections of every block, in layer order.
fn projections(g: &Graph) -> Result<Vec<(Proj, Proj)>> {
    let mut out = Vec::new();
    for sm in crate::ept::attention_softmaxes(g)? {
        let scores = g
            .operands(g.operands(sm)[0])
            .into_iter()
            .find(|&o| matches!(g.node(o).op, Op::MatMul { .. }))
            .expect("attention_softmaxes checked the scores");
        let q = g.operands(scores)[0];
        let av = g
            .users(sm)
            .into_iter()
            .find(|&u| {
                matches!(
                    g.node(u).op,
                    Op::MatMul {
                        transpose_b: false,
                        ..
                    }
                ) && g.operands(u)[0] == sm
            })
            .ok_or_else(|| {
                PeftError::Pattern("LoRA: attention probabilities not multiplied by V".into())
            })?;
        let v = g.operands(av)[1];
        out.push((trace(g, q)?, trace(g, v)?));
    }
    if out.is_empty() {
        return Err(PeftError::Pattern("LoRA: no attention block found".into()));
    }
    Ok(out)
}

/// Add `LoRA(rank, alpha)` to the query and value projections of every block. Returns
/// the factor params, block by block (`A_q, B_q, A_v, B_v`).
pub fn apply(g: &mut Graph, rank: usize, alpha: f32) -> Result<Vec<NodeId>> {
    check(rank, alpha)?;
    let projs = projections(g)?;
    g.set_tag(Some(TAG));
    let scale = alpha / rank as f32;
    let mut params = Vec::new();
    for (i, (q, v)) in projs.into_iter().enumerate() {
        let dt = g.ty(q.x).dtype;
        let d = g.ty(q.x).shape.dims().last().and_then(|d| d.fixed());
        let d = d.ok_or_else(|| PeftError::Pattern("LoRA: input of unknown width".into()))?;
        let mut delta = |g: &mut Graph, which: &str, x: NodeId, width: usize| {
            let (an, bn) = factor_names(i, which);
            // Kaiming-uniform, a = √5: bound = sqrt(6 / ((1 + 5) · fan_in)) = 1/√D.
            let a_ty = TensorType::new(dt, Shape::fixed(&[rank, d]));
            let a = g.param(&an, true, Init::Uniform(1.0 / (d as f32).sqrt()), a_ty);
            let b_ty = TensorType::new(dt, Shape::fixed(&[width, rank]));
            let b = g.param(&bn, true, Init::Zeros, b_ty);
            params.extend([a, b]);
            let xa = g.matmul(x, a, false, true)?;
            let y = g.matmul(xa, b, false, true)?;
            if scale == 1.0 {
                Ok::<_, PeftError>(y)
            } else {
                let s = g.scalar(scale);
                Ok(g.binary(BinaryOp::Mul, y, s)?)
            }
        };
        if q.out == v.out {
            // A fused qkv: thirds q, k, v of the last axis.
            if (q.third, v.third) != (Some(0), Some(2)) {
                return Err(PeftError::Pattern(format!(
                    "LoRA: block {i}'s fused projection gives q and v as parts {:?} and {:?} \
                     (expected 0 and 2 of q, k, v)",
                    q.third, v.third
                )));
            }
            let ty = g.ty(q.out).clone();
            let axis = ty.rank() - 1;
            let w = ty.shape.dims()[axis].fixed().unwrap_or(0);
            if w != 3 * d {
                return Err(PeftError::Pattern(format!(
                    "LoRA: block {i}'s fused projection is {w} wide, expected 3 x {d}"
                )));
            }
            let dq = delta(g, "q", q.x, d)?;
            let dv = delta(g, "v", v.x, d)?;
            let qp = g.slice(q.out, axis, 0, d)?;
            let kp = g.slice(q.out, axis, d, 2 * d)?;
            let vp = g.slice(q.out, axis, 2 * d, 3 * d)?;
            let qn = g.binary(BinaryOp::Add, qp, dq)?;
            let vn = g.binary(BinaryOp::Add, vp, dv)?;
            let cat = g.concat(&[qn, kp, vn], axis)?;
            g.replace_uses(q.out, cat, &[qp, kp, vp]);
        } else {
            for (p, which) in [(q, "q"), (v, "v")] {
                let w = g.ty(p.out).shape.dims().last().and_then(|d| d.fixed());
                let w = w.ok_or_else(|| PeftError::Pattern("LoRA: unknown width".into()))?;
                let dp = delta(g, which, p.x, w)?;
                let y = g.binary(BinaryOp::Add, p.out, dp)?;
                g.replace_uses(p.out, y, &[y]);
            }
        }
    }
    g.set_tag(None);
    eptc_ir::verify(g)?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        assert_eq!(method_name(8, 8.0), "lora-8");
        assert_eq!(method_name(4, 16.0), "lora-4-alpha-16");
        assert_eq!(method_name(4, 0.5), "lora-4-alpha-0.5");
        for (r, a) in [(8, 8.0), (4, 16.0), (1, 0.5), (64, 64.0)] {
            assert_eq!(parse_method(&method_name(r, a)), Some((r, a)));
        }
        for m in ["lora", "lora-", "lora-x", "lora-4-alpha-", "partial-1"] {
            assert_eq!(parse_method(m), None, "{m}");
        }
        assert!(check(0, 1.0).is_err() && check(4, 0.0).is_err() && check(4, 8.0).is_ok());
    }
}
