//! Visual prompting (`--peft vp`, Bahng et al. 2022, "Exploring Visual Prompts for
//! Adapting Large-Scale Models"), the padding prompter: a learnable pixel-space frame of
//! width `p` added to the input image, zero in the centre `(H − 2p) × (W − 2p)`, as the
//! VP code's `PadPrompter`:
//!
//! `prompt = cat_H[pad_up, cat_W[pad_left, 0, pad_right], pad_down]`, `x' = x + prompt`,
//!
//! `vp.pad_up`, `vp.pad_down` `[1, 3, p, W]`, `vp.pad_left`, `vp.pad_right`
//! `[1, 3, H − 2p, p]` (`2·3·p·W + 2·3·(H − 2p)·p` scalars), each `N(0, 1)` as the VP
//! code's `torch.randn`. The prompt is added to the image the patch embedding reads
//! (found from the graph's structure: the `patchify` node's input), in the same
//! normalised pixel space as the VP code (its prompter follows the normalising
//! transform). The head trains too. The config names the method `vp-<p>`; the default
//! `p = 30` is VP's at 224 px, and a frame that would cover the image (`2p ≥ H` or
//! `2p ≥ W`) is refused.

use eptc_ir::{BinaryOp, Graph, Init, NodeId, Op, Shape, TensorType};

use crate::error::{PeftError, Result};

/// The tag of every node this pass inserts.
pub const TAG: &str = "vp";

/// VP's default pad width at 224 px.
pub const DEFAULT_PAD: usize = 30;

/// The param names, in the order [`apply`] returns them.
pub const NAMES: [&str; 4] = ["vp.pad_up", "vp.pad_down", "vp.pad_left", "vp.pad_right"];

/// The config's method name for a pad width.
pub fn method_name(pad: usize) -> String {
    format!("vp-{pad}")
}

/// The pad width of a `vp-<p>` method name.
pub fn parse_method(method: &str) -> Option<usize> {
    method.strip_prefix("vp-")?.parse().ok()
}

/// Check `--pad-size` against an `h × w` image.
pub fn check(pad: usize, h: usize, w: usize) -> Result<()> {
    if pad == 0 {
        return Err(PeftError::Config("--pad-size must be at least 1".into()));
    }
    if 2 * pad >= h.min(w) {
        return Err(PeftError::Config(format!(
            "--pad-size {pad}: the prompt frame must leave the image's centre untouched, \
             pad < {} for {h}×{w} px images (VP's 30 is for 224 px)",
            h.min(w).div_ceil(2)
        )));
    }
    Ok(())
}

/// The number of trainable scalars of a `pad`-wide frame on `h × w` RGB images.
pub fn count(pad: usize, h: usize, w: usize) -> usize {
    2 * 3 * pad * w + 2 * 3 * (h - 2 * pad) * pad
}

/// Add the padding prompter of width `pad` to the image input. Returns the params (up,
/// down, left, right).
pub fn apply(g: &mut Graph, pad: usize) -> Result<Vec<NodeId>> {
    let pf = g
        .node_ids()
        .into_iter()
        .find(|&id| matches!(g.node(id).op, Op::Patchify { .. }))
        .ok_or_else(|| PeftError::Pattern("VP: no patch embedding found".into()))?;
    let x = g.operands(pf)[0];
    let ty = g.ty(x).clone();
    let dims = ty.shape.dims();
    let fixed = |i: usize| dims.get(i).and_then(|d| d.fixed());
    let (Some(c), Some(h), Some(w)) = (fixed(1), fixed(2), fixed(3)) else {
        return Err(PeftError::Pattern(format!(
            "VP: the image {} is not [B, C, H, W] with fixed C, H, W",
            ty.shape
        )));
    };
    check(pad, h, w)?;
    let dt = ty.dtype;
    g.set_tag(Some(TAG));
    let t = |dims: &[usize]| TensorType::new(dt, Shape::fixed(dims));
    let (ch, cw) = (h - 2 * pad, w - 2 * pad);
    let up = g.param(NAMES[0], true, Init::Normal(1.0), t(&[1, c, pad, w]));
    let down = g.param(NAMES[1], true, Init::Normal(1.0), t(&[1, c, pad, w]));
    let left = g.param(NAMES[2], true, Init::Normal(1.0), t(&[1, c, ch, pad]));
    let right = g.param(NAMES[3], true, Init::Normal(1.0), t(&[1, c, ch, pad]));
    // The untouched centre: a zero scalar broadcast (not an (H − 2p)·(W − 2p)·3 constant).
    let zero = g.scalar(0.0);
    let base = g.broadcast(zero, Shape::fixed(&[1, c, ch, cw]))?;
    let row = g.concat(&[left, base, right], 3)?;
    let prompt = g.concat(&[up, row, down], 2)?;
    let out = g.binary(BinaryOp::Add, x, prompt)?;
    g.set_operand(pf, 0, out);
    g.set_tag(None);
    eptc_ir::verify(g)?;
    Ok(vec![up, down, left, right])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        for p in [1, 4, 30] {
            assert_eq!(parse_method(&method_name(p)), Some(p));
        }
        for m in ["vp", "vp-", "vp-x", "vpt-deep", "mlp-3-48"] {
            assert_eq!(parse_method(m), None, "{m}");
        }
        assert_eq!(count(30, 224, 224), 69_840);
        assert_eq!(count(4, 32, 32), 1_344);
        assert!(check(30, 224, 224).is_ok() && check(15, 32, 32).is_ok());
        assert!(check(0, 32, 32).is_err() && check(16, 32, 32).is_err());
        assert!(check(30, 32, 32).is_err());
    }
}
