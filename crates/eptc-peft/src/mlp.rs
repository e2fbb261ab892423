//! MLP-3 (`--peft mlp-3`): the linear head replaced by a three-layer MLP on the class
//! token's feature (the final norm's output), the backbone frozen:
//!
//! `Linear(D, h) → ReLU → Linear(h, h) → ReLU → Linear(h, C)`.
//!
//! The paper (Table 1) names MLP-3 without its width or activation; eptc takes ReLU and
//! `h = D` by default (`--hidden H` otherwise; the config names the method
//! `mlp-3-<h>`). With `h = D` the last layer has the linear head's shape. The hidden
//! layers are `mlp.0.*` `[h, D]`, `mlp.1.*` `[h, h]`; the last layer keeps the head's
//! names `head.weight` `[C, h]`, `head.bias` `[C]`, so everything that reads the head by
//! name (eval, infer, export) finds it. Every layer starts as PyTorch's `nn.Linear`:
//! weights Kaiming-uniform with `a = √5` and biases both uniform on `±1/√fan_in`, drawn
//! from the seed. The checkpoint's own head is not used (it reads the feature, not the
//! MLP's hidden activations).

use eptc_ir::{BinaryOp, Graph, Init, NodeId, Shape, TensorType, UnaryOp};

use crate::error::{PeftError, Result};
use crate::head;

/// The tag of the hidden layers this pass inserts (the last one is tagged `head`).
pub const TAG: &str = "mlp";

/// The config's method name for a hidden width.
pub fn method_name(hidden: usize) -> String {
    format!("mlp-3-{hidden}")
}

/// The hidden width of an `mlp-3-<hidden>` method name.
pub fn parse_method(method: &str) -> Option<usize> {
    method.strip_prefix("mlp-3-")?.parse().ok()
}

/// Check `--hidden`.
pub fn check(hidden: usize) -> Result<()> {
    if hidden == 0 {
        return Err(PeftError::Config("--hidden must be at least 1".into()));
    }
    Ok(())
}

/// The names of hidden layer `i`'s tensors: weight, bias.
pub fn names(i: usize) -> [String; 2] {
    [format!("mlp.{i}.weight"), format!("mlp.{i}.bias")]
}

/// Replace the graph's `logits` by the MLP on `features` (in place of [`head::apply`]).
/// Returns the params in order (mlp.0 weight, bias, mlp.1 weight, bias, head weight,
/// bias).
pub fn apply(g: &mut Graph, hidden: usize, classes: usize) -> Result<Vec<NodeId>> {
    check(hidden)?;
    if classes == 0 {
        return Err(PeftError::Config("--num-classes must be at least 1".into()));
    }
    let features = g
        .output("features")
        .ok_or_else(|| PeftError::Pattern("no `features` output".into()))?;
    let dim = g.ty(features).shape.dims()[1]
        .fixed()
        .ok_or_else(|| PeftError::Pattern("features of unknown width".into()))?;
    let dt = g.ty(features).dtype;
    // The checkpoint's own head (if any) goes first so the new params can take the names.
    g.remove_output("logits");
    g.remove_dead();
    let mut params = Vec::new();
    let mut x = features;
    let mut fan_in = dim;
    for (i, out) in [hidden, hidden, classes].into_iter().enumerate() {
        let last = i == 2;
        g.set_tag(Some(if last { head::TAG } else { TAG }));
        let [wn, bn] = if last {
            [head::WEIGHT.to_string(), head::BIAS.to_string()]
        } else {
            names(i)
        };
        // nn.Linear: Kaiming-uniform, a = √5: bound = sqrt(6 / ((1 + 5) · fan_in)) =
        // 1/√fan_in; the bias uniform on ±1/√fan_in.
        let bound = 1.0 / (fan_in as f32).sqrt();
        let ty = |dims: &[usize]| TensorType::new(dt, Shape::fixed(dims));
        let w = g.param(&wn, true, Init::Uniform(bound), ty(&[out, fan_in]));
        let b = g.param(&bn, true, Init::Uniform(bound), ty(&[out]));
        params.extend([w, b]);
        x = g.matmul(x, w, false, true)?;
        x = g.binary(BinaryOp::Add, x, b)?;
        if !last {
            x = g.unary(UnaryOp::Relu, x)?;
        }
        fan_in = out;
    }
    g.set_tag(None);
    g.set_output("logits", x);
    eptc_ir::verify(g)?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        for h in [1, 48, 768, 1024] {
            assert_eq!(parse_method(&method_name(h)), Some(h));
        }
        for m in ["mlp-3", "mlp-3-", "mlp-3-x", "mlp-4", "adapter-8"] {
            assert_eq!(parse_method(m), None, "{m}");
        }
        assert!(check(0).is_err() && check(1).is_ok());
    }
}
