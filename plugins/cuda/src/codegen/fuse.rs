//! Element-wise chains fused into one kernel. A unary or binary node whose only user is
//! another unary or binary node of the same shape, and which is not a graph output, is
//! computed inside its user's kernel instead of being written to memory and read back:
//! each group of such nodes becomes one kernel (one thread per element of the group's
//! root, or per eight consecutive ones: [`super::elementwise::map_kernel`]) that loads
//! each leaf operand once (through broadcast strides), evaluates the chain in registers
//! and stores the root. On the ViT-B/16 training graph this joins,
//! per layer, `sub` and `mul` of the attention backward (`A * (dA - delta)`, B x 12 x 197
//! x 197 elements) and the GELU derivative with its product (B x 197 x 3072).

use std::collections::{HashMap, HashSet};

use eptc_ir::{Graph, NodeId, Op};

use super::elementwise::{binary_expr_of, map_kernel, unary_expr, Read};
use super::{CodegenError, Kernel};
use eptc_backend::dims::broadcast as bstrides;

/// The most nodes and leaves one fused kernel takes (the rest start a new group).
pub const MAX_NODES: usize = 16;
pub const MAX_LEAVES: usize = 8;

/// One fused chain: `nodes` in evaluation order (the last is the root, the only value
/// written), `leaves` the values read from memory, in parameter order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub nodes: Vec<NodeId>,
    pub leaves: Vec<NodeId>,
}

impl Group {
    pub fn root(&self) -> NodeId {
        *self.nodes.last().expect("a group has a root")
    }
}

fn elementwise(g: &Graph, id: NodeId) -> bool {
    matches!(g.node(id).op, Op::Unary(_) | Op::Binary(_))
}

/// The groups of two or more nodes among `live` (the nodes that are computed), in the
/// order of their roots in `order` (a topological order). A node is absorbed by its user when it is
/// element-wise, has exactly that one user, is not an output, and has the user's shape.
pub fn elementwise_groups(g: &Graph, order: &[NodeId], live: &HashSet<NodeId>) -> Vec<Group> {
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|o| o.1).collect();
    let absorbed_by = |id: NodeId| -> Option<NodeId> {
        if !elementwise(g, id) || outputs.contains(&id) {
            return None;
        }
        let users: Vec<NodeId> = g
            .users(id)
            .into_iter()
            .filter(|u| live.contains(u))
            .collect();
        match users[..] {
            [u] if elementwise(g, u) && g.ty(u).shape == g.ty(id).shape => Some(u),
            _ => None,
        }
    };
    // From the last node back: a node's user is visited before it, so a chain is taken
    // whole from its root; a node left out for the size limits starts its own group.
    let mut groups = Vec::new();
    let mut taken: HashSet<NodeId> = HashSet::new();
    for &root in order.iter().rev() {
        if !live.contains(&root) || !elementwise(g, root) || taken.contains(&root) {
            continue;
        }
        let mut nodes: Vec<NodeId> = Vec::new();
        let mut leaves: Vec<NodeId> = Vec::new();
        let mut inside: HashSet<NodeId> = HashSet::new();
        collect(g, root, &absorbed_by, &mut nodes, &mut leaves, &mut inside);
        if nodes.len() >= 2 {
            taken.extend(nodes.iter().copied());
            groups.push(Group { nodes, leaves });
        }
    }
    groups.reverse();
    groups
}

fn collect(
    g: &Graph,
    id: NodeId,
    absorbed_by: &dyn Fn(NodeId) -> Option<NodeId>,
    nodes: &mut Vec<NodeId>,
    leaves: &mut Vec<NodeId>,
    inside: &mut HashSet<NodeId>,
) {
    inside.insert(id);
    for o in g.operands(id) {
        if inside.contains(&o) || leaves.contains(&o) {
            continue;
        }
        let fits = nodes.len() + 2 <= MAX_NODES && leaves.len() + 2 <= MAX_LEAVES;
        if fits && absorbed_by(o) == Some(id) {
            collect(g, o, absorbed_by, nodes, leaves, inside);
        } else {
            leaves.push(o);
        }
    }
    nodes.push(id);
}

/// The kernel of `group` at `batch`: parameters are the leaves in order, then the root's
/// output.
pub fn fused_kernel(
    g: &Graph,
    group: &Group,
    batch: usize,
    name: &str,
) -> Result<Kernel, CodegenError> {
    let root = group.root();
    let err = |msg: String| CodegenError::Unsupported {
        node: root.index(),
        op: "fused elementwise".into(),
        msg,
    };
    let out = g.ty(root).shape.resolve(batch);
    let n: usize = out.iter().product();
    let mut strides = Vec::new();
    let mut max_numel = n;
    for &l in &group.leaves {
        let s = g.ty(l).shape.resolve(batch);
        max_numel = max_numel.max(s.iter().product());
        strides.push(bstrides(&s, &out).map_err(&err)?);
    }
    let params: Vec<String> = (0..group.leaves.len()).map(|j| format!("x{j}")).collect();
    let param_refs: Vec<&str> = params.iter().map(String::as_str).collect();
    let reads: Vec<Read> = params
        .iter()
        .zip(strides)
        .map(|(p, s)| Read::new(p, s))
        .collect();

    let kinds: Vec<&str> = group.nodes.iter().map(|&id| g.node(id).op.kind()).collect();
    // Each leaf read once, the root written once; a few operations per node and element.
    let elems: usize = n + group
        .leaves
        .iter()
        .map(|&l| g.ty(l).shape.resolve(batch).iter().product::<usize>())
        .sum::<usize>();
    let what = format!(
        "fused element-wise chain {} ({} nodes, {} leaves)",
        kinds.join(" -> "),
        group.nodes.len(),
        group.leaves.len()
    );
    // The chain's statements from the leaves' values: `t<k>` per node, the root last.
    let chain = |v: &[String]| -> Result<(String, String), CodegenError> {
        let mut value: HashMap<NodeId, String> = HashMap::new();
        for (j, &l) in group.leaves.iter().enumerate() {
            value.insert(l, v[j].clone());
        }
        let mut stmts = String::new();
        for (k, &id) in group.nodes.iter().enumerate() {
            let ops: Vec<String> = g
                .operands(id)
                .iter()
                .map(|o| {
                    value
                        .get(o)
                        .cloned()
                        .ok_or_else(|| err(format!("%{} has no value", o.index())))
                })
                .collect::<Result<_, _>>()?;
            let e = match &g.node(id).op {
                Op::Unary(u) => unary_expr(*u, &ops[0]),
                Op::Binary(b) => binary_expr_of(*b, &ops[0], &ops[1]),
                other => return Err(err(format!("{} is not element-wise", other.kind()))),
            };
            stmts += &format!("    const float t{k} = {e};\n");
            value.insert(id, format!("t{k}"));
        }
        Ok((stmts, format!("t{}", group.nodes.len() - 1)))
    };
    let names: Vec<String> = (0..group.leaves.len()).map(|j| format!("v{j}")).collect();
    chain(&names)?;
    let eval = |v: &[String]| chain(v).expect("checked above");
    let mut k =
        map_kernel(name, &what, &param_refs, &reads, &out, max_numel, &eval).map_err(err)?;
    k.source = super::bound_line(elems as f64, 4.0 * (n * group.nodes.len()) as f64) + &k.source;
    Ok(k)
}
