//! Visual Prompt Tuning (`--peft vpt`, Jia et al. 2022): `L` learnable prompt tokens
//! inserted after the class token, after the position embeddings were added:
//!
//! - shallow: at the input of the first block only, `[CLS, P_0, patches]`;
//! - deep: at every block's input; block `i > 0` drops the prompt outputs of block
//!   `i - 1` and inserts its own, so block `i` reads `[CLS, P_i, patches]`.
//!
//! The head reads the class token after the final norm, as before. The prompts are one
//! trainable tensor `vpt.prompts` `[layers, L, D]` (1 layer when shallow), initialised
//! as the VPT code does: uniform on `±√(6 / (3·patch² + D))` (Xavier-uniform of the
//! patch embedding's fan-in and the width). The config names the method `vpt-deep` or
//! `vpt-shallow` and keeps `L` in `prompt_len`.
//!
//! The block inputs are found from the graph's structure: the input of the LayerNorm
//! nearest before each attention's scores. Every node after the first insertion sees
//! `N + L` tokens: its type is inferred again, and the reshapes in the attention (whose
//! target shapes name the token count) are given `N + L` for `N`.

use std::collections::{HashSet, VecDeque};

use eptc_ir::{Dim, Graph, Init, NodeId, Op, Shape, TensorType};

use crate::error::{PeftError, Result};

/// The tag of every node this pass inserts.
pub const TAG: &str = "vpt";

/// The adapter key of the prompts `[layers, L, D]`.
pub const PROMPTS: &str = "vpt.prompts";

/// The config's method name: `vpt-deep` or `vpt-shallow`.
pub fn method_name(deep: bool) -> &'static str {
    if deep {
        "vpt-deep"
    } else {
        "vpt-shallow"
    }
}

/// `Some(deep)` of a `vpt-deep` / `vpt-shallow` method name.
pub fn parse_method(method: &str) -> Option<bool> {
    match method {
        "vpt-deep" => Some(true),
        "vpt-shallow" => Some(false),
        _ => None,
    }
}

/// VPT's prompt initialisation bound: `√(6 / (3·patch² + D))`.
pub fn init_bound(patch: usize, dim: usize) -> f32 {
    (6.0 / (3 * patch * patch + dim) as f64).sqrt() as f32
}

/// The input of every block (the operand of its first LayerNorm), in layer order.
fn block_inputs(g: &Graph) -> Result<Vec<NodeId>> {
    let mut out = Vec::new();
    for sm in crate::ept::attention_softmaxes(g)? {
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([sm]);
        let mut found = None;
        while let Some(id) = queue.pop_front() {
            if matches!(g.node(id).op, Op::LayerNorm { .. }) {
                found = Some(g.operands(id)[0]);
                break;
            }
            for o in g.operands(id) {
                if seen.insert(o) {
                    queue.push_back(o);
                }
            }
        }
        out.push(found.ok_or_else(|| {
            PeftError::Pattern("VPT: no LayerNorm before an attention block".into())
        })?);
    }
    if out.is_empty() {
        return Err(PeftError::Pattern("VPT: no attention block found".into()));
    }
    Ok(out)
}

fn patch_size(g: &Graph) -> Result<usize> {
    g.node_ids()
        .into_iter()
        .find_map(|id| match g.node(id).op {
            Op::Patchify { patch } => Some(patch),
            _ => None,
        })
        .ok_or_else(|| PeftError::Pattern("VPT: no patch embedding found".into()))
}

/// Insert VPT (deep or shallow, `prompt_len` tokens) into `g`. Returns the prompt param.
pub fn apply(g: &mut Graph, deep: bool, prompt_len: usize) -> Result<NodeId> {
    if prompt_len == 0 {
        return Err(PeftError::Config("--prompt-len must be at least 1".into()));
    }
    let inputs = block_inputs(g)?;
    let patch = patch_size(g)?;
    let x0 = inputs[0];
    let ty0 = g.ty(x0).clone();
    let dims = ty0.shape.dims().to_vec();
    let (n, d) = match dims.as_slice() {
        [Dim::Batch, Dim::Fixed(n), Dim::Fixed(d)] => (*n, *d),
        _ => {
            return Err(PeftError::Pattern(format!(
                "VPT: block input {} is not [B, N, D]",
                ty0.shape.dims().len()
            )))
        }
    };
    let l = prompt_len;
    let layers = if deep { inputs.len() } else { 1 };
    g.set_tag(Some(TAG));
    let p_ty = TensorType::new(ty0.dtype, Shape::fixed(&[layers, l, d]));
    let prompts = g.param(PROMPTS, true, Init::Uniform(init_bound(patch, d)), p_ty);
    let mut inserted = Vec::new();
    for (i, &x) in inputs.iter().enumerate().take(layers) {
        // Before the insertion at block 0, every block input has N tokens; the re-typing
        // below gives the later ones N + L.
        let cls = g.add_typed(
            Op::Slice {
                axis: 1,
                start: 0,
                end: 1,
            },
            &[x],
            TensorType::new(ty0.dtype, Shape::new([Dim::Batch, 1.into(), d.into()])),
        )?;
        let skip = if i == 0 { 1 } else { 1 + l };
        let total = if i == 0 { n } else { n + l };
        let rest = g.add_typed(
            Op::Slice {
                axis: 1,
                start: skip,
                end: total,
            },
            &[x],
            TensorType::new(
                ty0.dtype,
                Shape::new([Dim::Batch, (n - 1).into(), d.into()]),
            ),
        )?;
        let pi = g.slice(prompts, 0, i, i + 1)?;
        let pb = g.broadcast(pi, Shape::new([Dim::Batch, l.into(), d.into()]))?;
        let cat = g.concat(&[cls, pb, rest], 1)?;
        g.replace_uses(x, cat, &[cls, rest]);
        inserted.extend([cls, rest, pi, pb, cat]);
    }
    g.set_tag(None);
    retype(g, n, n + l, &inserted)?;
    eptc_ir::verify(g)?;
    Ok(prompts)
}

/// Infer again the type of every node downstream of the insertions, the token count
/// `n` becoming `n2` in the target shape of each reshape whose operand changed.
fn retype(g: &mut Graph, n: usize, n2: usize, inserted: &[NodeId]) -> Result<()> {
    let fixed: HashSet<NodeId> = inserted.iter().copied().collect();
    let mut changed: HashSet<NodeId> = HashSet::new();
    for id in g.topo_order()? {
        let ops = g.operands(id);
        if ops.is_empty() {
            continue;
        }
        if fixed.contains(&id) {
            // The slices of the insertions were typed for the final token counts, but
            // their operand is re-typed: only the concat's output changes downstream.
            if matches!(g.node(id).op, Op::Concat { .. }) {
                changed.insert(id);
            }
            continue;
        }
        if !ops.iter().any(|o| changed.contains(o)) {
            continue;
        }
        let mut op = g.node(id).op.clone();
        if let Op::Reshape { shape } = &mut op {
            let hits = shape.0.iter().filter(|&&dm| dm == Dim::Fixed(n)).count();
            if hits != 1 {
                return Err(PeftError::Pattern(format!(
                    "VPT: a reshape to {shape:?} names the token count {n} {hits} times"
                )));
            }
            for dm in &mut shape.0 {
                if *dm == Dim::Fixed(n) {
                    *dm = Dim::Fixed(n2);
                }
            }
        }
        let tys: Vec<TensorType> = ops.iter().map(|&o| g.ty(o).clone()).collect();
        let refs: Vec<&TensorType> = tys.iter().collect();
        let ty = eptc_ir::infer::infer(&op, &refs)
            .map_err(|m| PeftError::Pattern(format!("VPT: re-typing {}: {m}", op.kind())))?;
        let node = g.node_mut(id);
        node.op = op;
        if node.ty != ty {
            node.ty = ty;
            changed.insert(id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_and_bound() {
        for deep in [true, false] {
            assert_eq!(parse_method(method_name(deep)), Some(deep));
        }
        assert_eq!(parse_method("vpt"), None);
        // ViT-B/16: sqrt(6 / (3 * 256 + 768)).
        assert!((init_bound(16, 768) - (6.0f32 / 1536.0).sqrt()).abs() < 1e-7);
    }
}
