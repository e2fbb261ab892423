//! The verifier: types, shapes, operand counts, acyclicity, unique names, printable tags.

use std::collections::HashSet;

use crate::error::{IrError, Result};
use crate::graph::Graph;
use crate::infer::infer;
use crate::op::Op;

/// Check every invariant of `g`; the error names the first offending node.
pub fn verify(g: &Graph) -> Result<()> {
    let order = g.topo_order()?;
    let mut inputs = HashSet::new();
    let mut params = HashSet::new();
    for &id in &order {
        let n = g.node(id);
        let ops = g.operands(id);
        let bad = |msg: String| IrError::Shape {
            op: n.op.kind().to_string(),
            node: id.index(),
            msg,
        };
        match &n.op {
            Op::Input { name } => {
                if !inputs.insert(name.clone()) {
                    return Err(bad(format!("input {name:?} declared twice")));
                }
            }
            Op::Param { name, .. } => {
                if !params.insert(name.clone()) {
                    return Err(bad(format!("param {name:?} declared twice")));
                }
                if n.ty.shape.has_batch() {
                    return Err(bad(format!("param {name:?} cannot depend on the batch")));
                }
            }
            Op::Const { values } => {
                let fixed =
                    n.ty.shape
                        .as_fixed()
                        .ok_or_else(|| bad("const with a batch dimension".into()))?;
                let want = fixed.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                if want != Some(values.len()) {
                    let want = want.map_or("too many".to_string(), |w| w.to_string());
                    return Err(bad(format!("{} values for {want} elements", values.len())));
                }
            }
            op => {
                let tys: Vec<_> = ops.iter().map(|&o| g.ty(o)).collect();
                let ty = infer(op, &tys).map_err(bad)?;
                if ty != n.ty {
                    return Err(bad(format!(
                        "declared type {} but the shape rule gives {ty}",
                        n.ty
                    )));
                }
            }
        }
        // The text format prints a tag as a bare word after `@`: anything else would not
        // parse back.
        if let Some(t) = &n.tag {
            if t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-+".contains(c))
            {
                return Err(bad(format!("tag {t:?} is not a word of [A-Za-z0-9_.+-]")));
            }
        }
        if n.op.is_leaf() && !ops.is_empty() {
            return Err(bad("a leaf has operands".into()));
        }
        // Operand positions must be exactly 0..n.
        let mut pos: Vec<u32> = g
            .petgraph()
            .edges_directed(id, petgraph::Direction::Incoming)
            .map(|e| *e.weight())
            .collect();
        pos.sort();
        if pos.iter().enumerate().any(|(i, &p)| p as usize != i) {
            return Err(bad(format!(
                "operand positions {pos:?} are not 0..{}",
                pos.len()
            )));
        }
    }
    let mut names = HashSet::new();
    for (name, id) in g.outputs() {
        if !g.contains(*id) {
            return Err(IrError::Invalid(format!(
                "output {name:?} names a missing node"
            )));
        }
        if !names.insert(name) {
            return Err(IrError::Invalid(format!("output {name:?} named twice")));
        }
    }
    Ok(())
}
