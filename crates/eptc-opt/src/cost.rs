//! The extraction cost: bytes moved plus flops, from the IR types, with the batch bound
//! to 1. An op the backend does not support costs infinity, so it is never extracted —
//! except in expressions over frozen weights only, which cost nothing: they are computed
//! once at compile time (`fold`).

use egg::{CostFunction, Id, Language, SymbolLang};
use eptc_ir::{Op, TensorType};

use crate::lang::{self, decode};

/// Flops per byte at which compute costs as much as memory traffic (a rough machine
/// balance; any value > 0 ranks the fusions the same way).
const FLOPS_PER_BYTE: f64 = 8.0;

pub struct Cost<'a> {
    pub eg: &'a lang::Graph,
    pub supports: &'a dyn Fn(&str) -> bool,
}

fn elems(t: &TensorType) -> f64 {
    t.shape.numel(1) as f64
}

fn bytes(t: &TensorType) -> f64 {
    elems(t) * t.dtype.size_bytes() as f64
}

/// Bytes moved and flops of one op, given its operand and output types.
pub fn op_cost(op: &Op, ins: &[&TensorType], out: &TensorType) -> f64 {
    let n_out = elems(out);
    let io: f64 = ins.iter().map(|t| bytes(t)).sum::<f64>() + bytes(out);
    let flops = match op {
        // Views cost (almost) nothing on any backend.
        Op::Reshape { .. } => return 1.0,
        Op::MatMul { transpose_a, .. } => {
            let a = ins[0].shape.dims();
            let k = a[if *transpose_a {
                a.len() - 2
            } else {
                a.len() - 1
            }]
            .resolve(1) as f64;
            2.0 * n_out * k
        }
        Op::Linear { .. } => {
            let k = ins[0].shape.dims().last().map_or(1, |d| d.resolve(1)) as f64;
            2.0 * n_out * k + 20.0 * n_out
        }
        Op::Attention { .. } => {
            // q [.., N, d], k [.., M, d], v [.., M, e]: two products and a softmax of N x M.
            let (q, k) = (ins[0].shape.dims(), ins[1].shape.dims());
            let d = q[q.len() - 1].resolve(1) as f64;
            let m = k[k.len() - 2].resolve(1) as f64;
            let e = out.shape.dims()[out.rank() - 1].resolve(1) as f64;
            let rows = n_out / e;
            2.0 * rows * m * (d + e) + 5.0 * rows * m
        }
        Op::AttentionLse { .. } => {
            // One product of N x M scores and their log-sum-exp.
            let (q, k) = (ins[0].shape.dims(), ins[1].shape.dims());
            let d = q[q.len() - 1].resolve(1) as f64;
            let m = k[k.len() - 2].resolve(1) as f64;
            n_out * m * (2.0 * d + 5.0)
        }
        Op::AttentionGrad { .. } => {
            // The scores, the probabilities, dO v^T and one more product, all N x M.
            let (q, k, v) = (
                ins[0].shape.dims(),
                ins[1].shape.dims(),
                ins[2].shape.dims(),
            );
            let n = q[q.len() - 2].resolve(1) as f64;
            let d = q[q.len() - 1].resolve(1) as f64;
            let m = k[k.len() - 2].resolve(1) as f64;
            let e = v[v.len() - 1].resolve(1) as f64;
            let entries: f64 = q[..q.len() - 2]
                .iter()
                .map(|x| x.resolve(1) as f64)
                .product();
            entries * n * m * (2.0 * d + 4.0 * e + 10.0)
        }
        Op::Softmax { .. } | Op::SoftmaxSink => 5.0 * n_out,
        Op::LayerNorm { .. } => 8.0 * n_out,
        Op::LayerNormGrad { .. } => 12.0 * n_out,
        Op::Unary(_) => 10.0 * n_out,
        Op::Reduce { .. } => ins.iter().map(|t| elems(t)).sum::<f64>() * 3.0,
        _ => n_out,
    };
    io + flops / FLOPS_PER_BYTE
}

impl Cost<'_> {
    /// Work a folded form saves: a LayerNorm without affine (gamma 1, beta 0 constants)
    /// skips a multiply and an add per element; an attention with scale 1 skips the
    /// scaling of its logits.
    fn savings(&self, op: &Op, operands: &[Id], out: &TensorType) -> f64 {
        let is_const = |id: Id, v: f32| matches!(lang::ir_leaf(self.eg, id), Some((Op::Const { values }, _, _)) if values.iter().all(|&x| x == v));
        match op {
            Op::LayerNorm { .. } if is_const(operands[1], 1.0) && is_const(operands[2], 0.0) => {
                2.0 * elems(out) / FLOPS_PER_BYTE
            }
            Op::Attention { scale, .. } if *scale == 1.0 => {
                let k = operands.get(1).and_then(|&k| lang::ty(self.eg, k));
                let m = k.map_or(1.0, |k| k.shape.dims()[k.rank() - 2].resolve(1) as f64);
                let e = out.shape.dims()[out.rank() - 1].resolve(1) as f64;
                elems(out) / e * m / FLOPS_PER_BYTE
            }
            _ => 0.0,
        }
    }
}

impl CostFunction<SymbolLang> for Cost<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &SymbolLang, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        if enode.children.is_empty() {
            return 0.0;
        }
        if enode.op.as_str() == "outputs" {
            return enode.fold(0.0, |s, c| s + costs(c));
        }
        let Some((op, operands)) = decode(self.eg, enode) else {
            return f64::INFINITY;
        };
        // Built from frozen weights only: computed once at compile time (`fold`).
        if operands.iter().all(|&o| lang::is_constant(self.eg, o)) {
            return enode.fold(0.0, |s, c| s + costs(c));
        }
        if !(self.supports)(op.kind()) {
            return f64::INFINITY;
        }
        let ins: Option<Vec<&TensorType>> =
            operands.iter().map(|&o| lang::ty(self.eg, o)).collect();
        let out = operands.first().and_then(|_| {
            let refs = ins.clone()?;
            eptc_ir::infer::infer(&op, &refs).ok()
        });
        let (Some(ins), Some(out)) = (ins, out) else {
            return f64::INFINITY;
        };
        let mut own = op_cost(&op, &ins, &out);
        own -= self.savings(&op, &operands, &out);
        enode.fold(own, |s, c| s + costs(c))
    }
}
