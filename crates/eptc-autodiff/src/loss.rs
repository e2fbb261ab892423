//! The losses of the classification head, built from IR ops.
//!
//! Both take the `logits` `[B, C]` and an input `labels` `[B, C]` (multi-hot for
//! multi-label tasks, one-hot for multi-class ones: the runtime turns class ids into rows)
//! and give a scalar, as the paper's code (mmcls 0.25) computes it:
//!
//! - multi-label: binary cross-entropy with logits, **summed over classes and averaged
//!   over the batch** (mmcls's `MultiLabelClsHead` passes `avg_factor = batch size`, and
//!   `weight_reduce_loss` then divides the sum over all elements by it);
//! - multi-class: cross-entropy with softmax, averaged over the batch.

use eptc_ir::{BinaryOp, Dim, Graph, NodeId, ReduceOp, Shape, TensorType, UnaryOp};

use crate::{AutodiffError, Result};

/// Name of the labels input.
pub const LABELS: &str = "labels";
/// Name of the loss output.
pub const LOSS: &str = "loss";

/// Which loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Sigmoid + binary cross-entropy (multi-label).
    BinaryCrossEntropy,
    /// Softmax + cross-entropy (multi-class).
    CrossEntropy,
}

/// Add input `labels` `[B, C]` and output `loss` (a scalar) computed from output `logits`.
pub fn add_loss(g: &mut Graph, logits: &str, loss: Loss) -> Result<NodeId> {
    let x = g
        .output(logits)
        .ok_or_else(|| AutodiffError::NoLoss(logits.to_string()))?;
    let shape = g.ty(x).shape.clone();
    let classes = match shape.dims() {
        [Dim::Batch, Dim::Fixed(c)] => *c,
        _ => {
            return Err(AutodiffError::Unsupported {
                op: "loss".into(),
                node: x.index(),
                why: format!("logits must be [B, C], found {shape}"),
            })
        }
    };
    let prev = g.tag().map(str::to_owned);
    g.set_tag(Some("loss"));
    let y = g.input(LABELS, TensorType::f32(Shape::batched(&[classes])));
    let per_sample = match loss {
        // max(x, 0) - x y + log(1 + exp(-|x|)), the stable form of PyTorch's
        // binary_cross_entropy_with_logits.
        Loss::BinaryCrossEntropy => {
            let r = g.unary(UnaryOp::Relu, x)?;
            let xy = g.binary(BinaryOp::Mul, x, y)?;
            let a = g.unary(UnaryOp::Abs, x)?;
            let na = g.unary(UnaryOp::Neg, a)?;
            let e = g.unary(UnaryOp::Exp, na)?;
            let one = g.scalar(1.0);
            let e1 = g.binary(BinaryOp::Add, one, e)?;
            let l = g.unary(UnaryOp::Log, e1)?;
            let t = g.binary(BinaryOp::Sub, r, xy)?;
            let t = g.binary(BinaryOp::Add, t, l)?;
            g.reduce(ReduceOp::Sum, t, &[1], false)?
        }
        // -sum(y * (x - logsumexp(x)))
        Loss::CrossEntropy => {
            let lse = g.reduce(ReduceOp::LogSumExp, x, &[1], true)?;
            let lp = g.binary(BinaryOp::Sub, x, lse)?;
            let t = g.binary(BinaryOp::Mul, y, lp)?;
            let s = g.reduce(ReduceOp::Sum, t, &[1], false)?;
            g.unary(UnaryOp::Neg, s)?
        }
    };
    let l = g.reduce(ReduceOp::Mean, per_sample, &[0], false)?;
    g.set_output(LOSS, l);
    g.set_tag(prev.as_deref());
    Ok(l)
}
