//! One op on concrete values: check the operands against the op's shape rule, then call
//! the kernel.

use eptc_ir::infer::{broadcasts_to, infer};
use eptc_ir::{Op, Shape, TensorType};

use crate::value::Value;
use crate::{attention, elementwise, linear, matmul, norm, reduce, shape_ops};

/// Evaluate the non-leaf `op` on `args`, with the batch bound to `batch`; `declared` is
/// the node's declared output shape. Errors (as text) on operands the op cannot take.
pub fn eval(op: &Op, args: Vec<Value>, batch: usize, declared: &Shape) -> Result<Value, String> {
    let out_shape = output_shape(op, &args, batch)?;
    let want = declared.resolve(batch);
    if out_shape != want {
        return Err(format!(
            "computes shape {out_shape:?} but the node declares {declared} = {want:?}"
        ));
    }
    if let Op::Concat { axis } = op {
        return Ok(shape_ops::concat(&args, *axis, out_shape));
    }
    let mut it = args.into_iter();
    let mut next = || it.next().ok_or_else(|| "missing operand".to_string());
    Ok(match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => {
            return Err("a leaf is not evaluated".into())
        }
        Op::Patchify { patch } => shape_ops::patchify(&next()?, *patch),
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let (a, b) = (next()?, next()?);
            matmul::matmul(&a, &b, *transpose_a, *transpose_b, out_shape)
        }
        Op::Binary(b) => {
            let (x, y) = (next()?, next()?);
            elementwise::binary(*b, x, y, out_shape)
        }
        Op::Unary(u) => elementwise::unary(*u, next()?),
        Op::Reduce { op, axes, .. } => reduce::reduce(*op, &next()?, axes, out_shape),
        Op::Softmax { axis } => norm::softmax(next()?, *axis),
        Op::LayerNorm { eps } => {
            let (x, g, b) = (next()?, next()?, next()?);
            norm::layernorm(x, g.data(), b.data(), *eps)
        }
        Op::LayerNormGrad { eps } => {
            let (x, g, dy) = (next()?, next()?, next()?);
            norm::layernorm_grad(&x, g.data(), dy, *eps)
        }
        Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            return Err(format!(
                "{} is not a CPU kernel: the CPU backend runs its decomposition",
                op.kind()
            ))
        }
        Op::Reshape { .. } => next()?.reshaped(out_shape),
        Op::Permute { perm } => shape_ops::permute(&next()?, perm),
        Op::Concat { .. } => unreachable!("handled above"),
        Op::Slice { axis, start, end } => shape_ops::slice(&next()?, *axis, *start, *end),
        Op::Broadcast { .. } => shape_ops::broadcast(&next()?, out_shape),
        Op::SoftmaxSink => {
            let (s, z) = (next()?, next()?);
            attention::softmax_sink(s, &z)
        }
        Op::Attention { scale, sink } => {
            let (q, k, v) = (next()?, next()?, next()?);
            let z = if *sink { Some(next()?) } else { None };
            attention::attention(&q, &k, &v, z.as_ref(), *scale, out_shape)
        }
        Op::Linear {
            bias,
            activation,
            residual,
        } => {
            let (x, w) = (next()?, next()?);
            let b = if *bias { Some(next()?) } else { None };
            let r = if *residual { Some(next()?) } else { None };
            linear::linear(&x, &w, b.as_ref(), r, *activation, out_shape)
        }
    })
}

/// The output shape of `op` on these concrete operands, by the IR's own shape rules.
fn output_shape(op: &Op, args: &[Value], batch: usize) -> Result<Vec<usize>, String> {
    let types: Vec<TensorType> = args
        .iter()
        .map(|a| TensorType::f32(Shape::fixed(a.shape())))
        .collect();
    match op {
        Op::Reshape { shape } => {
            let (x, target) = (one(args)?, shape.resolve(batch));
            if x.numel() != target.iter().product::<usize>() {
                return Err(format!("cannot reshape {:?} to {target:?}", x.shape()));
            }
            Ok(target)
        }
        Op::Broadcast { shape } => {
            let (x, target) = (one(args)?, shape.resolve(batch));
            if !broadcasts_to(&types[0].shape, &Shape::fixed(&target)) {
                return Err(format!("{:?} does not broadcast to {target:?}", x.shape()));
            }
            Ok(target)
        }
        _ => {
            let refs: Vec<&TensorType> = types.iter().collect();
            let ty = infer(op, &refs)?;
            ty.shape
                .as_fixed()
                .ok_or_else(|| "symbolic output shape".to_string())
        }
    }
}

fn one(args: &[Value]) -> Result<&Value, String> {
    match args {
        [x] => Ok(x),
        _ => Err(format!("takes 1 operand, got {}", args.len())),
    }
}
