//! The Embedded Prompt Tuning pass (DESIGN.md §1): for each prompted layer, a trainable
//! prompt `P` of shape `[N, L]` (shared by heads and batch) is concatenated to the
//! attention logits `S` before the softmax and its columns dropped after it.

use eptc_ir::{BinaryOp, Graph, Init, NodeId, Op, ReduceOp, Shape, TensorType};

use crate::config::{EptMode, PromptInit};
use crate::error::{PeftError, Result};

/// The tag of every node this pass inserts.
pub const TAG: &str = "ept";

/// The attention softmaxes of a ViT graph, in topological (= layer) order: softmax over
/// the last axis of `mul(matmul(Q, K, transpose_b), scale)`, rank 4 `[B, H, N, N]`.
pub fn attention_softmaxes(g: &Graph) -> Result<Vec<NodeId>> {
    let mut found = Vec::new();
    for id in g.topo_order()? {
        let Op::Softmax { axis } = g.node(id).op else {
            continue;
        };
        let ty = g.ty(id);
        if ty.rank() != 4 || axis != 3 {
            continue;
        }
        let s = g.operands(id)[0];
        let is_scores = matches!(g.node(s).op, Op::Binary(BinaryOp::Mul))
            && g.operands(s).iter().any(|&o| {
                matches!(
                    g.node(o).op,
                    Op::MatMul {
                        transpose_b: true,
                        ..
                    }
                )
            });
        if is_scores {
            found.push(id);
        }
    }
    Ok(found)
}

/// The name of the prompt param of the `j`-th prompted layer (in `--layers` order).
pub fn prompt_name(j: usize) -> String {
    format!("ept.prompts.{j}")
}

fn init_of(init: PromptInit, mode: EptMode) -> Init {
    if mode == EptMode::Mul {
        return Init::Ones;
    }
    match init {
        PromptInit::Normal => Init::Normal(0.02),
        PromptInit::Uniform => Init::Uniform(0.08),
        PromptInit::Zero => Init::Zeros,
        PromptInit::Kaiming => Init::Kaiming,
        PromptInit::Token => Init::Token,
    }
}

/// Insert EPT into `g` at `layers` (indices of attention blocks, in the adapter's order).
/// Returns the prompt params, in that order.
pub fn apply(
    g: &mut Graph,
    mode: EptMode,
    layers: &[usize],
    prompt_len: usize,
    init: PromptInit,
) -> Result<Vec<NodeId>> {
    let softmaxes = attention_softmaxes(g)?;
    crate::config::check_layers(layers, softmaxes.len())?;
    if prompt_len == 0 && matches!(mode, EptMode::Cat | EptMode::MultiCat) {
        return Err(PeftError::Config("--prompt-len must be at least 1".into()));
    }
    g.set_tag(Some(TAG));
    let mut prompts = Vec::with_capacity(layers.len());
    for (j, &layer) in layers.iter().enumerate() {
        let sm = softmaxes[layer];
        let s = g.operands(sm)[0];
        let dims = g.ty(s).shape.dims().to_vec();
        let n = dims[3]
            .fixed()
            .ok_or_else(|| PeftError::Pattern("attention over a batch-sized axis".into()))?;
        let l = match mode {
            EptMode::Cat | EptMode::MultiCat => prompt_len,
            EptMode::Add | EptMode::Mul => n,
        };
        let ty = TensorType::new(g.ty(s).dtype, Shape::fixed(&[n, l]));
        let p = g.param(&prompt_name(j), true, init_of(init, mode), ty);
        let probs = match mode {
            EptMode::Cat | EptMode::MultiCat => {
                let row = if mode == EptMode::MultiCat {
                    // alpha_i = max_j S_ij - min_j S_ij, per batch, head and row.
                    let mx = g.reduce(ReduceOp::Max, s, &[3], true)?;
                    let mn = g.reduce(ReduceOp::Min, s, &[3], true)?;
                    let alpha = g.binary(BinaryOp::Sub, mx, mn)?;
                    g.binary(BinaryOp::Mul, alpha, p)?
                } else {
                    let mut shape = dims.clone();
                    shape[3] = l.into();
                    g.broadcast(p, Shape(shape))?
                };
                let cat = g.concat(&[row, s], 3)?;
                let soft = g.softmax(cat, 3)?;
                g.slice(soft, 3, l, l + n)?
            }
            EptMode::Add | EptMode::Mul => {
                let op = if mode == EptMode::Add {
                    BinaryOp::Add
                } else {
                    BinaryOp::Mul
                };
                let z = g.binary(op, s, p)?;
                g.softmax(z, 3)?
            }
        };
        g.replace_uses(sm, probs, &[]);
        prompts.push(p);
    }
    g.set_tag(None);
    g.remove_dead();
    Ok(prompts)
}
