//! The classification head: a linear layer on the final-norm class token (`features`).

use eptc_ir::{BinaryOp, Graph, HostTensor, Init, Shape, TensorType};

use crate::error::{PeftError, Result};

pub const TAG: &str = "head";
pub const WEIGHT: &str = "head.weight";
pub const BIAS: &str = "head.bias";

/// Where the head's initial values come from.
pub enum HeadInit {
    /// A new head: weight normal(0.01), bias zero (mmcls's `LinearClsHead`).
    New { classes: usize },
    /// The checkpoint's own head, trained further.
    Checkpoint {
        weight: HostTensor,
        bias: HostTensor,
    },
}

/// Replace the graph's `logits` by a trainable linear head on `features`.
pub fn apply(g: &mut Graph, init: &HeadInit) -> Result<()> {
    let features = g
        .output("features")
        .ok_or_else(|| PeftError::Pattern("no `features` output".into()))?;
    let dim = g.ty(features).shape.dims()[1]
        .fixed()
        .ok_or_else(|| PeftError::Pattern("features of unknown width".into()))?;
    let (classes, winit, binit) = match init {
        HeadInit::New { classes } => (*classes, Init::Normal(0.01), Init::Zeros),
        HeadInit::Checkpoint { weight, .. } => {
            (weight.shape[0], Init::Checkpoint, Init::Checkpoint)
        }
    };
    if classes == 0 {
        return Err(PeftError::Config("--num-classes must be at least 1".into()));
    }
    // The checkpoint's own head (if any) goes first so the new params can take the names.
    g.remove_output("logits");
    g.remove_dead();
    g.set_tag(Some(TAG));
    let dt = g.ty(features).dtype;
    let w = g.param(
        WEIGHT,
        true,
        winit,
        TensorType::new(dt, Shape::fixed(&[classes, dim])),
    );
    let b = g.param(
        BIAS,
        true,
        binit,
        TensorType::new(dt, Shape::fixed(&[classes])),
    );
    let y = g.matmul(features, w, false, true)?;
    let y = g.binary(BinaryOp::Add, y, b)?;
    g.set_tag(None);
    g.set_output("logits", y);
    Ok(())
}
