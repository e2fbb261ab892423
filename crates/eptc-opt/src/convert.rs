//! IR graph <-> e-graph. The IR's DAG goes in with its sharing (one e-node per IR node);
//! the extracted program comes back as a DAG too (one IR node per chosen e-class), with
//! the tags of nodes that existed before and the tag `opt` on nodes the rules made.

use std::collections::HashMap;

use egg::{Id, Language, SymbolLang};
use eptc_ir::{Graph, NodeId, Result as IrResult};

use crate::lang::{self, decode, LeafTable, Types};

/// The tag of nodes the optimizer creates.
pub const TAG: &str = "opt";

/// What conversion into the e-graph remembers: the root (`outputs` node), the output
/// names, and the tag of every original e-node.
pub struct Loaded {
    pub egraph: lang::Graph,
    pub root: Id,
    pub outputs: Vec<String>,
    pub tags: HashMap<SymbolLang, Option<String>>,
    pub name: String,
}

/// Put `g` into a fresh e-graph.
pub fn load(g: &Graph) -> IrResult<Loaded> {
    let mut table = LeafTable::default();
    let order = g.topo_order()?;
    // Leaves first, so the analysis can type them when they are added.
    for &id in &order {
        let n = g.node(id);
        if n.op.is_leaf() {
            table
                .leaves
                .push((n.op.clone(), n.ty.clone(), n.tag.clone()));
        }
    }
    let mut eg = lang::Graph::new(Types {
        table,
        conflicts: 0,
    });
    let mut ids: HashMap<NodeId, Id> = HashMap::new();
    let mut tags = HashMap::new();
    let mut k = 0;
    for &id in &order {
        let n = g.node(id);
        let enode = if n.op.is_leaf() {
            k += 1;
            SymbolLang::leaf(format!("${}", k - 1))
        } else {
            let (sym, attrs) = lang::encode(&n.op);
            let mut children: Vec<Id> = attrs
                .into_iter()
                .map(|a| eg.add(SymbolLang::leaf(a)))
                .collect();
            children.extend(g.operands(id).iter().map(|o| ids[o]));
            SymbolLang::new(sym, children)
        };
        tags.insert(enode.clone(), n.tag.clone());
        ids.insert(id, eg.add(enode));
    }
    let outs: Vec<Id> = g.outputs().iter().map(|(_, id)| ids[id]).collect();
    let root = eg.add(SymbolLang::new("outputs", outs));
    eg.rebuild();
    Ok(Loaded {
        egraph: eg,
        root,
        outputs: g.outputs().iter().map(|o| o.0.clone()).collect(),
        tags,
        name: g.name.clone(),
    })
}

/// Rebuild an IR graph from the e-node `choose` picks in each e-class reachable from the
/// root.
pub fn extract(l: &Loaded, choose: &dyn Fn(Id) -> SymbolLang) -> IrResult<Graph> {
    let eg = &l.egraph;
    let mut g = Graph::new(l.name.clone());
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    // Canonical tags: original e-nodes with canonical children.
    let tags: HashMap<SymbolLang, Option<String>> = l
        .tags
        .iter()
        .map(|(n, t)| (n.clone().map_children(|c| eg.find(c)), t.clone()))
        .collect();
    let root = choose(eg.find(l.root));
    // Iterative post-order over chosen nodes.
    let mut stack: Vec<(Id, bool)> = root
        .children
        .iter()
        .rev()
        .map(|&c| (eg.find(c), false))
        .collect();
    while let Some((class, expanded)) = stack.pop() {
        if built.contains_key(&class) {
            continue;
        }
        let node = choose(class);
        if let Some((leaf_op, ty, tag)) =
            lang::ir_leaf(eg, class).filter(|_| node.children.is_empty())
        {
            g.set_tag(tag.as_deref());
            let id = g.add_typed(leaf_op.clone(), &[], ty.clone())?;
            built.insert(class, id);
            continue;
        }
        let (op, operands) = decode(eg, &node).ok_or_else(|| {
            eptc_ir::IrError::Invalid(format!("optimizer: cannot decode e-node {node:?}"))
        })?;
        let operands: Vec<Id> = operands.iter().map(|&o| eg.find(o)).collect();
        if !expanded {
            stack.push((class, true));
            for &o in operands.iter().rev() {
                if !built.contains_key(&o) {
                    stack.push((o, false));
                }
            }
            continue;
        }
        let canon = node.clone().map_children(|c| eg.find(c));
        let tag = match tags.get(&canon) {
            Some(t) => t.clone(),
            None => Some(TAG.to_string()),
        };
        g.set_tag(tag.as_deref());
        let ins: Vec<NodeId> = operands.iter().map(|o| built[o]).collect();
        let ty = lang::ty(eg, class).cloned().ok_or_else(|| {
            eptc_ir::IrError::Invalid(format!("optimizer: untyped e-class for {node:?}"))
        })?;
        let id = g.add_typed(op, &ins, ty)?;
        built.insert(class, id);
    }
    // Inputs no output reads any more still bind the batch size: keep them.
    for (op, ty, tag) in &eg.analysis.table.leaves {
        if let eptc_ir::Op::Input { name } = op {
            if g.find_input(name).is_none() {
                g.set_tag(tag.as_deref());
                g.add_typed(op.clone(), &[], ty.clone())?;
            }
        }
    }
    g.set_tag(None);
    for (name, &c) in l.outputs.iter().zip(&root.children) {
        g.set_output(name, built[&eg.find(c)]);
    }
    // Leaves are created on first use; put the graph in canonical order.
    let g = g.compacted()?;
    eptc_ir::verify(&g)?;
    Ok(g)
}
