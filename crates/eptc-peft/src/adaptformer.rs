//! AdaptFormer (`--peft adapter`, Chen et al. 2022): a bottleneck beside each block's
//! MLP, reading the MLP's input (the block's second LayerNorm), scaled and added to the
//! residual stream, as the AdaptFormer paper's equation:
//!
//! `x_out = x + MLP(LN2(x)) + s · up(ReLU(down(LN2(x))))`, `s = 0.1`,
//!
//! `down` `[D/reduction, D]` (+ bias), `up` `[D, D/reduction]` (+ bias). Initialised as
//! AdaptFormer's `lora` option: `down` Kaiming-uniform with `a = √5` (uniform on
//! `±1/√D`), `up` and both biases zero, so the initial model is the checkpoint's. The
//! config names the method `adapter-<reduction>`: the bottleneck is `D / reduction` wide
//! (the reduction factor of bottleneck adapters), which must divide `D`.
//!
//! The MLPs are found from the graph's structure: a `gelu` between two projections,
//! the first reading a LayerNorm, the second's output added to that LayerNorm's input.

use eptc_ir::{BinaryOp, Graph, Init, NodeId, Op, Shape, TensorType, UnaryOp};

use crate::error::{PeftError, Result};

/// The tag of every node this pass inserts.
pub const TAG: &str = "adapter";

/// The default reduction factor (the bottleneck `D / 8`).
pub const DEFAULT_REDUCTION: usize = 8;

/// AdaptFormer's scale `s` of the bottleneck's output.
pub const SCALE: f32 = 0.1;

/// The config's method name for a reduction factor.
pub fn method_name(reduction: usize) -> String {
    format!("adapter-{reduction}")
}

/// The reduction factor of an `adapter-<reduction>` method name.
pub fn parse_method(method: &str) -> Option<usize> {
    method.strip_prefix("adapter-")?.parse().ok()
}

/// Check `--reduction` against the width `dim`; returns the bottleneck width.
pub fn check(reduction: usize, dim: usize) -> Result<usize> {
    if reduction == 0 || !dim.is_multiple_of(reduction) {
        return Err(PeftError::Config(format!(
            "--reduction {reduction}: must divide the width {dim} (the bottleneck is \
             width / reduction)"
        )));
    }
    Ok(dim / reduction)
}

/// The names of block `i`'s adapter tensors: down weight, down bias, up weight, up bias.
pub fn names(i: usize) -> [String; 4] {
    [
        format!("adapter.{i}.down.weight"),
        format!("adapter.{i}.down.bias"),
        format!("adapter.{i}.up.weight"),
        format!("adapter.{i}.up.bias"),
    ]
}

fn is_param(g: &Graph, id: NodeId) -> bool {
    matches!(g.node(id).op, Op::Param { .. })
}

/// `matmul(x, W, transpose_b)` (plus a bias) with `W` a param: `Some(x)`.
fn linear_input(g: &Graph, id: NodeId) -> Option<NodeId> {
    let mut id = id;
    if matches!(g.node(id).op, Op::Binary(BinaryOp::Add)) {
        let ops = g.operands(id);
        if ops.len() == 2 && is_param(g, ops[1]) {
            id = ops[0];
        }
    }
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

/// The MLP of every block, in layer order: `(LN2 output, residual add)`.
fn mlps(g: &Graph) -> Result<Vec<(NodeId, NodeId)>> {
    let mut out = Vec::new();
    for id in g.topo_order()? {
        if !matches!(g.node(id).op, Op::Unary(UnaryOp::Gelu)) {
            continue;
        }
        let Some(y) = linear_input(g, g.operands(id)[0]) else {
            continue;
        };
        if !matches!(g.node(y).op, Op::LayerNorm { .. }) {
            continue;
        }
        let x = g.operands(y)[0];
        // fc2 (and its bias), then the residual add with the LayerNorm's input.
        let mut cur = id;
        let mut residual = None;
        for _ in 0..3 {
            let users = g.users(cur);
            if let Some(&r) = users.iter().find(|&&u| {
                matches!(g.node(u).op, Op::Binary(BinaryOp::Add)) && g.operands(u).contains(&x)
            }) {
                residual = Some(r);
                break;
            }
            match users.as_slice() {
                [u] => cur = *u,
                _ => break,
            }
        }
        let r = residual.ok_or_else(|| {
            PeftError::Pattern("adapter: an MLP whose output is not added to its input".into())
        })?;
        out.push((y, r));
    }
    if out.is_empty() {
        return Err(PeftError::Pattern("adapter: no MLP block found".into()));
    }
    Ok(out)
}

/// Add AdaptFormer with `reduction` beside every block's MLP. Returns the params, block
/// by block (down weight, down bias, up weight, up bias).
pub fn apply(g: &mut Graph, reduction: usize) -> Result<Vec<NodeId>> {
    let blocks = mlps(g)?;
    g.set_tag(Some(TAG));
    let mut params = Vec::new();
    for (i, (y, r)) in blocks.into_iter().enumerate() {
        let dt = g.ty(y).dtype;
        let d = g.ty(y).shape.dims().last().and_then(|d| d.fixed());
        let d = d.ok_or_else(|| PeftError::Pattern("adapter: input of unknown width".into()))?;
        let h = check(reduction, d)?;
        let [dw, db, uw, ub] = names(i);
        let ty = |dims: &[usize]| TensorType::new(dt, Shape::fixed(dims));
        // Kaiming-uniform, a = √5: bound = sqrt(6 / ((1 + 5) · fan_in)) = 1/√D.
        let down_w = g.param(
            &dw,
            true,
            Init::Uniform(1.0 / (d as f32).sqrt()),
            ty(&[h, d]),
        );
        let down_b = g.param(&db, true, Init::Zeros, ty(&[h]));
        let up_w = g.param(&uw, true, Init::Zeros, ty(&[d, h]));
        let up_b = g.param(&ub, true, Init::Zeros, ty(&[d]));
        params.extend([down_w, down_b, up_w, up_b]);
        let z = g.matmul(y, down_w, false, true)?;
        let z = g.binary(BinaryOp::Add, z, down_b)?;
        let z = g.unary(UnaryOp::Relu, z)?;
        let z = g.matmul(z, up_w, false, true)?;
        let z = g.binary(BinaryOp::Add, z, up_b)?;
        let s = g.scalar(SCALE);
        let z = g.binary(BinaryOp::Mul, z, s)?;
        let out = g.binary(BinaryOp::Add, r, z)?;
        g.replace_uses(r, out, &[out]);
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
        for r in [1, 4, 8, 32, 64] {
            assert_eq!(parse_method(&method_name(r)), Some(r));
        }
        for m in ["adapter", "adapter-", "adapter-x", "lora-4"] {
            assert_eq!(parse_method(m), None, "{m}");
        }
        assert_eq!(check(8, 768).unwrap(), 96);
        assert!(check(0, 48).is_err() && check(32, 48).is_err());
    }
}
