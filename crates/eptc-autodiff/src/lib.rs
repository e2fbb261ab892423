//! The autodiff pass: reverse-mode differentiation over the IR.
//!
//! [`loss::add_loss`] appends the task's loss to a forward graph; [`differentiate`] then
//! adds, in the same graph, the gradient of that scalar with respect to every trainable
//! parameter, as graph outputs `grad.<param name>`. The result is one training graph: the
//! forward pass, the loss and the backward pass, which any backend runs like any graph.
//!
//! Only what is needed is built: a node gets an adjoint only if it lies on a path from a
//! trainable parameter to the loss, so no gradient of a frozen weight is ever computed.
//! Each op's vector-Jacobian product is one short rule in [`vjp`], written with IR ops; the
//! fused ops have their own (the attention with the EPT sink uses
//! `delta = rowsum(dO * O)` and the sink weight `exp(z)/D`, DESIGN.md section 1).

pub mod loss;
pub mod vjp;

use std::collections::{HashMap, HashSet};

use eptc_ir::{Activation, Graph, IrError, NodeId, Op, Shape};
use thiserror::Error;

/// The tag of the nodes this pass adds (the text format shows it).
pub const TAG: &str = "autodiff";

/// The tag of the forward nodes the backward recomputes (`Options::recompute_gelu`).
pub const RECOMPUTE_TAG: &str = "recompute";

/// The output name of the gradient of parameter `param`.
pub fn grad_output(param: &str) -> String {
    format!("grad.{param}")
}

#[derive(Debug, Error)]
pub enum AutodiffError {
    #[error("the graph has no output {0:?} to differentiate")]
    NoLoss(String),
    #[error("the loss {name:?} must be a scalar, it has shape {shape}")]
    NotScalar { name: String, shape: Shape },
    #[error("the graph has no trainable parameter")]
    NothingTrainable,
    #[error("no gradient rule for {op} (node %{node}): {why}")]
    Unsupported {
        op: String,
        node: usize,
        why: String,
    },
    #[error(transparent)]
    Ir(#[from] IrError),
}

pub type Result<T, E = AutodiffError> = std::result::Result<T, E>;

/// Ops whose output carries no gradient (masks, signs): nothing flows through them.
fn blocks_gradient(op: &Op) -> bool {
    matches!(
        op,
        Op::Binary(eptc_ir::BinaryOp::Equal) | Op::Unary(eptc_ir::UnaryOp::Sign)
    )
}

/// A copy of `graph` with the gradient of output `loss` (a scalar) with respect to every
/// trainable parameter added as output `grad.<name>` (the parameter's shape; zeros where
/// the parameter does not reach the loss). Existing outputs are kept.
///
/// A fused `linear` with a GELU epilogue on the gradient's path is first split into the
/// linear and a separate `gelu`, so the backward reads the pre-activation instead of
/// recomputing the matrix product.
pub fn differentiate(graph: &Graph, loss: &str) -> Result<Graph> {
    differentiate_with(graph, loss, &Options::default())
}

/// Choices of the pass.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Differentiate `attention` into the fused `attention_lse` and `attention_grad` ops
    /// (a flash-attention backward, for a backend that has kernels for them) instead of
    /// matrix products around the recomputed attention matrix (the default).
    pub fused_attention: bool,
    /// Keep a `linear` with a GELU epilogue fused in the forward and recompute its
    /// pre-activation in the backward (one more matrix product per such linear; a
    /// LayerNorm feeding it is recomputed from its input too) instead of storing it: in a
    /// ViT's training step the MLP's pre-activations are the largest saved values (4× the
    /// width of the others; 887 of the 2309 MiB alive at the start of ViT-B/16's backward
    /// at batch 64 in bf16). The default splits the linear so the backward reads the
    /// stored pre-activation. Recomputed nodes carry the tag [`RECOMPUTE_TAG`].
    pub recompute_gelu: bool,
}

/// [`differentiate`] with options.
pub fn differentiate_with(graph: &Graph, loss: &str, opts: &Options) -> Result<Graph> {
    let mut g = graph.clone();
    let loss_id = g
        .output(loss)
        .ok_or_else(|| AutodiffError::NoLoss(loss.to_string()))?;
    if g.ty(loss_id).shape.rank() != 0 {
        return Err(AutodiffError::NotScalar {
            name: loss.to_string(),
            shape: g.ty(loss_id).shape.clone(),
        });
    }
    let trainable: Vec<(NodeId, String)> = g
        .params()
        .into_iter()
        .filter(|p| p.2)
        .map(|(id, n, _)| (id, n.to_string()))
        .collect();
    if trainable.is_empty() {
        return Err(AutodiffError::NothingTrainable);
    }
    let prev_tag = g.tag().map(str::to_owned);
    g.set_tag(Some(TAG));
    let relevant = relevant_nodes(&g, loss_id)?;
    if !opts.recompute_gelu {
        split_activations(&mut g, &relevant)?;
    }
    // Splitting made new nodes on the path: recompute.
    let relevant = relevant_nodes(&g, loss_id)?;

    let order = g.topo_order()?;
    let mut contributions: HashMap<NodeId, Vec<Part>> = HashMap::new();
    let one = g.scalar(1.0);
    contributions.insert(loss_id, vec![Part::Full(one)]);
    let mut adjoint: HashMap<NodeId, NodeId> = HashMap::new();
    for &id in order.iter().rev() {
        if !relevant.contains(&id) {
            continue;
        }
        let Some(parts) = contributions.remove(&id) else {
            continue;
        };
        let dy = sum(&mut g, id, &parts)?;
        adjoint.insert(id, dy);
        if is_leaf(&g.node(id).op) {
            continue;
        }
        let operands = g.operands(id);
        let needs: Vec<bool> = operands.iter().map(|o| relevant.contains(o)).collect();
        if !needs.iter().any(|&n| n) {
            continue;
        }
        // A slice's gradient is kept as the piece it is: the pieces of one tensor (the
        // q, k, v of a fused projection) become one concat instead of zero-padded sums.
        if let Op::Slice { axis, start, end } = g.node(id).op {
            let piece = Part::Slice {
                axis,
                start,
                end,
                dy,
            };
            contributions.entry(operands[0]).or_default().push(piece);
            continue;
        }
        let grads = vjp::vjp_with(&mut g, id, dy, &needs, opts)?;
        for ((o, need), gr) in operands.iter().zip(&needs).zip(grads) {
            if let (true, Some(gr)) = (*need, gr) {
                debug_assert_eq!(g.ty(gr).shape, g.ty(*o).shape);
                contributions.entry(*o).or_default().push(Part::Full(gr));
            }
        }
    }
    for (id, name) in &trainable {
        let grad = match adjoint.get(id) {
            Some(&d) => d,
            None => {
                let zero = g.scalar(0.0);
                let shape = g.ty(*id).shape.clone();
                g.broadcast(zero, shape)?
            }
        };
        g.set_output(&grad_output(name), grad);
    }
    g.set_tag(prev_tag.as_deref());
    simplify(&mut g)?;
    g.remove_dead();
    Ok(g.compacted()?)
}

/// Share identical nodes (same op, attributes, operands and type: the VJP rules recompute
/// what another rule already built, e.g. the same constant or `x - logsumexp(x)`) and drop
/// multiplications by the scalar constant 1.
fn simplify(g: &mut Graph) -> Result<()> {
    let mut seen: HashMap<String, NodeId> = HashMap::new();
    for id in g.topo_order()? {
        let node = g.node(id);
        // (A recomputed node is identical to the forward's on purpose.)
        if matches!(node.op, Op::Input { .. } | Op::Param { .. })
            || node.tag.as_deref() == Some(RECOMPUTE_TAG)
        {
            continue;
        }
        // x * 1 (the scalar on either side, the result typed as x).
        if let Op::Binary(eptc_ir::BinaryOp::Mul) = node.op {
            let ops = g.operands(id);
            let one = |n: NodeId| {
                matches!(&g.node(n).op, Op::Const { values } if values.as_slice() == [1.0])
                    && g.ty(n).shape.rank() == 0
            };
            let keep = if one(ops[1]) {
                Some(ops[0])
            } else if one(ops[0]) {
                Some(ops[1])
            } else {
                None
            };
            if let Some(x) = keep.filter(|&x| g.ty(x) == g.ty(id)) {
                g.replace_uses(id, x, &[]);
                continue;
            }
        }
        let node = g.node(id);
        let key = format!("{:?}|{:?}|{:?}", node.op, g.operands(id), node.ty);
        match seen.get(&key) {
            Some(&first) => g.replace_uses(id, first, &[]),
            None => {
                seen.insert(key, id);
            }
        }
    }
    Ok(())
}

fn is_leaf(op: &Op) -> bool {
    matches!(op, Op::Input { .. } | Op::Param { .. } | Op::Const { .. })
}

/// The nodes on a path from a trainable parameter to `loss` (both ends included).
fn relevant_nodes(g: &Graph, loss: NodeId) -> Result<HashSet<NodeId>> {
    let order = g.topo_order()?;
    let mut from_param: HashSet<NodeId> = HashSet::new();
    for &id in &order {
        let op = &g.node(id).op;
        let carries = match op {
            Op::Param { trainable, .. } => *trainable,
            _ if blocks_gradient(op) => false,
            _ => g.operands(id).iter().any(|o| from_param.contains(o)),
        };
        if carries {
            from_param.insert(id);
        }
    }
    let mut to_loss: HashSet<NodeId> = HashSet::new();
    let mut stack = vec![loss];
    while let Some(id) = stack.pop() {
        if to_loss.insert(id) {
            stack.extend(g.operands(id));
        }
    }
    Ok(from_param.intersection(&to_loss).copied().collect())
}

/// Replace each relevant `linear` with a GELU epilogue by `linear` (no activation), `gelu`
/// and, if it had one, the residual `add`.
fn split_activations(g: &mut Graph, relevant: &HashSet<NodeId>) -> Result<()> {
    let targets: Vec<NodeId> = g
        .topo_order()?
        .into_iter()
        .filter(|id| {
            relevant.contains(id)
                && matches!(
                    g.node(*id).op,
                    Op::Linear {
                        activation: Activation::Gelu,
                        ..
                    }
                )
        })
        .collect();
    for id in targets {
        let Op::Linear { bias, residual, .. } = g.node(id).op.clone() else {
            unreachable!("filtered above")
        };
        let ops = g.operands(id);
        let b = bias.then(|| ops[2]);
        let r = residual.then(|| ops[2 + usize::from(bias)]);
        let pre = g.linear(ops[0], ops[1], b, Activation::None, None)?;
        let mut y = g.unary(eptc_ir::UnaryOp::Gelu, pre)?;
        if let Some(r) = r {
            y = g.binary(eptc_ir::BinaryOp::Add, y, r)?;
        }
        g.replace_uses(id, y, &[]);
    }
    Ok(())
}

/// One gradient contribution to a node: a tensor of its shape, or the gradient of a
/// slice of it (`dy` covering `start..end` of `axis`, zero elsewhere).
#[derive(Clone, Copy)]
enum Part {
    Full(NodeId),
    Slice {
        axis: usize,
        start: usize,
        end: usize,
        dy: NodeId,
    },
}

/// The sum of the gradient contributions to node `x` (full ones in the order given).
/// Slice pieces along one axis that do not overlap become a single concat (zeros in the
/// gaps); otherwise each is padded with zeros and added.
fn sum(g: &mut Graph, x: NodeId, parts: &[Part]) -> Result<NodeId> {
    let mut full: Vec<NodeId> = Vec::new();
    let mut pieces: Vec<(usize, usize, usize, NodeId)> = Vec::new();
    for p in parts {
        match *p {
            Part::Full(n) => full.push(n),
            Part::Slice {
                axis,
                start,
                end,
                dy,
            } => pieces.push((axis, start, end, dy)),
        }
    }
    pieces.sort_by_key(|p| (p.0, p.1));
    let one_axis = pieces
        .windows(2)
        .all(|w| w[0].0 == w[1].0 && w[0].2 <= w[1].1);
    if !pieces.is_empty() && one_axis {
        let axis = pieces[0].0;
        let n = g.ty(x).shape.dims()[axis]
            .fixed()
            .ok_or_else(|| AutodiffError::Unsupported {
                op: "slice".into(),
                node: x.index(),
                why: "a slice along the batch axis".into(),
            })?;
        let mut cat = Vec::new();
        let mut at = 0;
        for &(_, start, end, dy) in &pieces {
            if start > at {
                cat.push(vjp::zeros_like_along(g, x, axis, start - at)?);
            }
            cat.push(dy);
            at = end;
        }
        if at < n {
            cat.push(vjp::zeros_like_along(g, x, axis, n - at)?);
        }
        full.push(if cat.len() == 1 {
            cat[0]
        } else {
            g.concat(&cat, axis)?
        });
    } else {
        for (axis, start, end, dy) in pieces {
            full.push(vjp::pad(g, dy, x, axis, start, end)?);
        }
    }
    let mut acc = full[0];
    for &p in &full[1..] {
        acc = g.binary(eptc_ir::BinaryOp::Add, acc, p)?;
    }
    Ok(acc)
}
