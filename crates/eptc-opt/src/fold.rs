//! Folding frozen weights at compile time. Rules such as the LayerNorm-affine and
//! attention-scale folds leave expressions over frozen params only (`W · diag(g)`,
//! `b + W β`, ...). [`split_constants`] cuts every such expression out of the graph into
//! a separate graph that computes it once; the main graph reads the results as new
//! frozen params `folded.<k>`.

use std::collections::{HashMap, HashSet};

use eptc_ir::{Graph, Init, NodeId, Op, Result, Shape, TensorType};

/// A graph with its compile-time constants cut out.
pub struct Folded {
    /// The graph to run: folded expressions replaced by frozen params `folded.<k>`.
    pub graph: Graph,
    /// Computes the folded params: one output per param, named like it. No inputs.
    pub constants: Graph,
}

/// The name of the `k`-th folded param.
pub fn folded_name(k: usize) -> String {
    format!("folded.{k}")
}

/// Cut out every maximal constant expression that does real work (anything beyond a
/// `reshape`, which backends do without copying).
pub fn split_constants(g: &Graph) -> Result<Folded> {
    let order = g.topo_order()?;
    // Constant: a frozen param, a const, or an op on constants only.
    let mut constant: HashSet<NodeId> = HashSet::new();
    let mut work: HashSet<NodeId> = HashSet::new();
    for &id in &order {
        let n = g.node(id);
        let ops = g.operands(id);
        let c = match &n.op {
            Op::Param { trainable, .. } => !trainable,
            Op::Const { .. } => true,
            Op::Input { .. } => false,
            // A value with the batch dimension is per run, whatever it is made of.
            _ => !n.ty.shape.has_batch() && ops.iter().all(|o| constant.contains(o)),
        };
        if c {
            constant.insert(id);
            if !n.op.is_leaf()
                && (!matches!(n.op, Op::Reshape { .. }) || ops.iter().any(|o| work.contains(o)))
            {
                work.insert(id);
            }
        }
    }
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|o| o.1).collect();
    // Roots of folding: constant, doing work, used by a non-constant node or an output.
    let roots: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|id| work.contains(id))
        .filter(|&id| outputs.contains(&id) || g.users(id).iter().any(|u| !constant.contains(u)))
        .collect();
    let mut consts = Graph::new(format!("{}-constants", g.name));
    let mut graph = g.clone();
    let mut copied: HashMap<NodeId, NodeId> = HashMap::new();
    for (k, &root) in roots.iter().enumerate() {
        // Copy the root's constant subgraph into `consts`.
        let mut stack = vec![(root, false)];
        while let Some((id, done)) = stack.pop() {
            if copied.contains_key(&id) {
                continue;
            }
            let ops = g.operands(id);
            if !done {
                stack.push((id, true));
                stack.extend(ops.iter().rev().map(|&o| (o, false)));
                continue;
            }
            let n = g.node(id);
            consts.set_tag(n.tag.as_deref());
            let new_ops: Vec<NodeId> = ops.iter().map(|o| copied[o]).collect();
            copied.insert(id, consts.add_typed(n.op.clone(), &new_ops, n.ty.clone())?);
        }
        let name = folded_name(k);
        consts.set_output(&name, copied[&root]);
        let ty = g.ty(root);
        let shape = ty
            .shape
            .as_fixed()
            .map(|s| Shape::fixed(&s))
            .unwrap_or_else(|| ty.shape.clone());
        graph.set_tag(Some(crate::convert::TAG));
        let p = graph.param(
            &name,
            false,
            Init::Checkpoint,
            TensorType::new(ty.dtype, shape),
        );
        graph.set_tag(None);
        graph.replace_uses(root, p, &[]);
    }
    consts.set_tag(None);
    graph.remove_dead();
    let graph = graph.compacted()?;
    eptc_ir::verify(&graph)?;
    eptc_ir::verify(&consts)?;
    Ok(Folded {
        graph,
        constants: consts,
    })
}
