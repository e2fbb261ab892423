//! The methods that add nothing to the backbone but choose which of its existing weights
//! train (the paper's Full, Partial-k and Bias baselines; Linear trains the head only).
//! A chosen param becomes trainable, starts at its checkpoint value (`Init::Checkpoint`)
//! and is tagged with the method's name, so the IR shows what the pass did. The adapter
//! holds these tensors under the checkpoint's own key names.
//!
//! Blocks are found from the graph's structure, not from key names, so every layout the
//! frontend reads (timm, Hugging Face, mmcls) is handled alike: along the residual stream
//! each transformer block has two LayerNorms and the final norm comes last, so an op
//! with `a` LayerNorms on its longest path from the input (itself included) belongs to
//! the embeddings (`a = 0`), to block `(a - 1) / 2` (`1 <= a <= 2 * depth`), or to the
//! final norm and what follows it (`a = 2 * depth + 1`). A param belongs where its users
//! are.

use std::collections::HashMap;

use eptc_ir::{Graph, Init, NodeId, Op};

use crate::error::{PeftError, Result};

/// Which existing weights train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every weight (Full fine-tuning).
    All,
    /// Every param whose name ends with `.bias`, LayerNorm and patch-embedding biases
    /// included (BitFit, as the paper's code: all bias terms).
    Biases,
    /// Every param of the last `k` blocks and the final norm (Partial-k).
    LastBlocks(usize),
}

/// Where a param sits in the ViT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Region {
    /// Patch embedding, class token, position embeddings.
    Embedding,
    /// Transformer block `i`.
    Block(usize),
    /// The final norm and anything after it (a checkpoint's head).
    Final,
}

/// The number of transformer blocks of `g` (its attention softmaxes).
pub fn depth(g: &Graph) -> Result<usize> {
    Ok(crate::ept::attention_softmaxes(g)?.len())
}

/// The region of every param of `g` (see the module's documentation).
pub fn regions(g: &Graph) -> Result<HashMap<NodeId, Region>> {
    let depth = depth(g)?;
    let order = g.topo_order()?;
    let mut lns: HashMap<NodeId, usize> = HashMap::new();
    let mut out = HashMap::new();
    let mut top = 0;
    for &id in &order {
        let n = g.node(id);
        if n.op.is_leaf() {
            continue;
        }
        let ops = g.operands(id);
        let mut a = ops
            .iter()
            .filter_map(|o| lns.get(o))
            .copied()
            .max()
            .unwrap_or(0);
        if matches!(n.op, Op::LayerNorm { .. }) {
            a += 1;
        }
        lns.insert(id, a);
        top = top.max(a);
        let region = match a {
            0 => Region::Embedding,
            a if a <= 2 * depth => Region::Block((a - 1) / 2),
            _ => Region::Final,
        };
        for &o in &ops {
            if matches!(g.node(o).op, Op::Param { .. }) {
                // A param used in two regions (none is, in a ViT) counts in the later.
                let r = out.entry(o).or_insert(region);
                *r = (*r).max(region);
            }
        }
    }
    if top != 2 * depth + 1 {
        return Err(PeftError::Pattern(format!(
            "{depth} attention blocks but {top} LayerNorms in a row on the residual stream \
             (expected two per block and a final one: {})",
            2 * depth + 1
        )));
    }
    Ok(out)
}

/// Whether the param `name` in `region` is chosen by `sel` in a ViT of `depth` blocks.
fn chosen(sel: Selection, name: &str, region: Region, depth: usize) -> bool {
    match sel {
        Selection::All => true,
        Selection::Biases => name.ends_with(".bias"),
        Selection::LastBlocks(k) => match region {
            Region::Block(i) => i + k >= depth,
            Region::Final => true,
            Region::Embedding => false,
        },
    }
}

/// Check `k` of Partial-k against the model's depth.
pub fn check_k(k: usize, depth: usize) -> Result<()> {
    if k == 0 || k > depth {
        return Err(PeftError::Config(format!(
            "--k {k}: partial-k trains the last k blocks, k in 1..={depth} for this model \
             ({depth} blocks)"
        )));
    }
    Ok(())
}

/// Make the frozen params `sel` chooses trainable, from their checkpoint values, tagged
/// `tag`. Returns them in topological order.
pub fn apply(g: &mut Graph, sel: Selection, tag: &str) -> Result<Vec<NodeId>> {
    let depth = depth(g)?;
    if let Selection::LastBlocks(k) = sel {
        check_k(k, depth)?;
    }
    let regions = regions(g)?;
    let picked: Vec<NodeId> = g
        .params()
        .into_iter()
        .filter(|&(id, name, trainable)| {
            !trainable
                && regions
                    .get(&id)
                    .is_some_and(|&r| chosen(sel, name, r, depth))
        })
        .map(|p| p.0)
        .collect();
    for &id in &picked {
        let n = g.node_mut(id);
        if let Op::Param {
            trainable, init, ..
        } = &mut n.op
        {
            *trainable = true;
            *init = Init::Checkpoint;
        }
        n.tag = Some(tag.to_string());
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_must_be_between_1_and_depth() {
        assert!(check_k(1, 12).is_ok() && check_k(12, 12).is_ok());
        for k in [0, 13] {
            let e = check_k(k, 12).unwrap_err().to_string();
            assert!(
                e.contains(&format!("--k {k}")) && e.contains("1..=12"),
                "{e}"
            );
        }
    }

    #[test]
    fn method_names() {
        assert_eq!(crate::selection("full"), Some(Selection::All));
        assert_eq!(crate::selection("bias"), Some(Selection::Biases));
        assert_eq!(
            crate::selection("partial-3"),
            Some(Selection::LastBlocks(3))
        );
        for m in ["ept", "none", "linear", "partial-", "partial-x"] {
            assert_eq!(crate::selection(m), None, "{m}");
        }
    }

    #[test]
    fn a_graph_without_blocks_is_refused() {
        let mut g = Graph::new("flat");
        let x = g.input("x", eptc_ir::TensorType::f32(eptc_ir::Shape::batched(&[4])));
        g.set_output("features", x);
        assert!(apply(&mut g, Selection::All, "full").is_err());
    }
}
