//! Fused ops rewritten into primitives, so that any backend runs any graph: a backend
//! that lacks a fused kind gets the graph with those nodes decomposed
//! ([`lower_unsupported`]).
//!
//! | fused | decomposition |
//! |---|---|
//! | `softmax_sink(s, z)` | `slice(softmax(concat([broadcast(z), s], -1), -1), -1, 1..1+M)`: EPT's concat / softmax / slice with one prompt column |
//! | `attention(q, k, v[, z])` | `matmul(q, k, transpose_b)` → `mul` by `const [scale]` → `softmax` (or the `softmax_sink` decomposition with `z`) → `matmul(·, v)` |
//! | `attention_lse(q, k[, z])` | `reduce_logsumexp(concat([broadcast(z), scale · q kᵀ], -1), -1, keepdim)` (no concat without `z`) |
//! | `attention_grad(q, k, v, lse, delta, dO)` | `P = exp(scale · q kᵀ − lse)`; wrt v `Pᵀ dO`; else `dS = scale · P ∘ (dO vᵀ − delta)`, wrt q `dS k`, wrt k `dSᵀ q` |
//! | `linear(x, w[, b][, r])` | `matmul(x, w, transpose_b)` → `add b` → `gelu` → `add r` (each step only when present; a vector `x` is reshaped to `[1, K]` for the matmul and back) |
//!
//! New nodes carry the fused node's tag.

use crate::error::{IrError, Result};
use crate::graph::{Graph, NodeId};
use crate::infer::broadcasts_to;
use crate::op::{Activation, BinaryOp, Op, ReduceOp, UnaryOp};
use crate::types::{Dim, Shape, TensorType};

/// Replace fused node `id` by its decomposition into primitive ops (uses and outputs
/// redirected, the fused node removed); new nodes keep the fused node's tag.
pub fn decompose(g: &mut Graph, id: NodeId) -> Result<()> {
    if !g.contains(id) {
        return Err(IrError::Invalid(format!(
            "cannot decompose %{}: no such node",
            id.index()
        )));
    }
    let node = g.node(id).clone();
    let bad = |msg: String| IrError::Shape {
        op: node.op.kind().to_string(),
        node: id.index(),
        msg,
    };
    if !node.op.is_fused() {
        return Err(bad("not a fused op: nothing to decompose".into()));
    }
    let operands = g.operands(id);
    if node.op.arity() != Some(operands.len()) {
        return Err(bad(format!(
            "{} operands, the op takes {:?}",
            operands.len(),
            node.op.arity()
        )));
    }
    let saved = g.tag().map(str::to_owned);
    g.set_tag(node.tag.as_deref());
    let mut e = Emit {
        g: &mut *g,
        new: Vec::new(),
    };
    let built = e.fused(&node.op, &operands, &node.ty);
    let new = e.new;
    g.set_tag(saved.as_deref());
    let checked = match built {
        Ok(out) if g.ty(out) == &node.ty => Ok(out),
        Ok(out) => Err(format!(
            "declared type {} but the decomposition gives {}",
            node.ty,
            g.ty(out)
        )),
        Err(e) => Err(format!("cannot decompose: {e}")),
    };
    let out = match checked {
        Ok(out) => out,
        Err(msg) => {
            // Leave the graph as it was.
            for n in new {
                g.remove_node(n);
            }
            return Err(bad(msg));
        }
    };
    g.replace_uses(id, out, &[]);
    g.remove_node(id);
    Ok(())
}

/// Decompose every fused node whose kind `supports` rejects; returns how many.
pub fn lower_unsupported(g: &mut Graph, supports: &dyn Fn(&str) -> bool) -> Result<usize> {
    let todo: Vec<NodeId> = g
        .topo_order()?
        .into_iter()
        .filter(|&id| {
            let op = &g.node(id).op;
            op.is_fused() && !supports(op.kind())
        })
        .collect();
    for &id in &todo {
        decompose(g, id)?;
    }
    Ok(todo.len())
}

/// Adds nodes to the graph, remembering them (to undo a failed decomposition).
struct Emit<'a> {
    g: &'a mut Graph,
    new: Vec<NodeId>,
}

impl Emit<'_> {
    fn add(&mut self, op: Op, operands: &[NodeId]) -> Result<NodeId> {
        let id = self.g.add(op, operands)?;
        self.new.push(id);
        Ok(id)
    }

    /// A scalar constant of `like`'s element type.
    fn add_const(&mut self, v: f32, like: NodeId) -> Result<NodeId> {
        let ty = TensorType::new(self.g.ty(like).dtype, Shape(vec![]));
        let c = self.g.add_typed(Op::Const { values: vec![v] }, &[], ty)?;
        self.new.push(c);
        Ok(c)
    }

    fn shape(&self, id: NodeId) -> Shape {
        self.g.ty(id).shape.clone()
    }

    /// The decomposition of fused `op` on `ops` (arity checked); `ty` is its type.
    fn fused(&mut self, op: &Op, ops: &[NodeId], ty: &TensorType) -> Result<NodeId> {
        match *op {
            Op::SoftmaxSink => self.softmax_sink(ops[0], ops[1]),
            Op::Attention { scale, sink } => {
                let z = sink.then(|| ops[3]);
                self.attention(ops[0], ops[1], ops[2], z, scale, ty)
            }
            Op::Linear {
                bias,
                activation,
                residual,
            } => {
                let mm = Op::MatMul {
                    transpose_a: false,
                    transpose_b: true,
                };
                let xs = self.shape(ops[0]);
                let mut y = if xs.rank() == 1 {
                    // A vector: matmul wants a matrix, so [K] -> [1, K] and back.
                    let mut row = vec![Dim::Fixed(1)];
                    row.extend_from_slice(&xs.0);
                    let x = self.add(Op::Reshape { shape: Shape(row) }, &[ops[0]])?;
                    let y = self.add(mm, &[x, ops[1]])?;
                    let o = self.shape(y).0[1];
                    self.add(
                        Op::Reshape {
                            shape: Shape(vec![o]),
                        },
                        &[y],
                    )?
                } else {
                    self.add(mm, &ops[..2])?
                };
                let mut next = 2;
                if bias {
                    y = self.add(Op::Binary(BinaryOp::Add), &[y, ops[next]])?;
                    next += 1;
                }
                match activation {
                    Activation::None => {}
                    Activation::Gelu => y = self.add(Op::Unary(UnaryOp::Gelu), &[y])?,
                }
                if residual {
                    y = self.add(Op::Binary(BinaryOp::Add), &[y, ops[next]])?;
                }
                Ok(y)
            }
            Op::LayerNormGrad { eps } => self.layernorm_grad(ops[0], ops[1], ops[2], eps),
            Op::AttentionLse { scale, sink } => {
                let s = self.scores(ops[0], ops[1], scale)?;
                let last = self.shape(s).rank() - 1;
                let s = match sink {
                    true => {
                        let mut rows = self.shape(s).0;
                        rows[last] = Dim::Fixed(1);
                        let rows = Shape(rows);
                        let zb = if self.shape(ops[2]) == rows {
                            ops[2]
                        } else {
                            self.add(Op::Broadcast { shape: rows }, &[ops[2]])?
                        };
                        self.add(Op::Concat { axis: last }, &[zb, s])?
                    }
                    false => s,
                };
                let lse = self.add(
                    Op::Reduce {
                        op: ReduceOp::LogSumExp,
                        axes: vec![last],
                        keepdim: true,
                    },
                    &[s],
                )?;
                self.fit(lse, ty)
            }
            Op::AttentionGrad { scale, wrt } => {
                let (q, k, v, lse, delta, dout) = (ops[0], ops[1], ops[2], ops[3], ops[4], ops[5]);
                let mm = |ta, tb| Op::MatMul {
                    transpose_a: ta,
                    transpose_b: tb,
                };
                let s = self.scores(q, k, scale)?;
                let t = self.add(Op::Binary(BinaryOp::Sub), &[s, lse])?;
                let p = self.add(Op::Unary(UnaryOp::Exp), &[t])?;
                let out = if wrt == crate::op::AttnWrt::V {
                    self.add(mm(true, false), &[p, dout])?
                } else {
                    let dp = self.add(mm(false, true), &[dout, v])?;
                    let d = self.add(Op::Binary(BinaryOp::Sub), &[dp, delta])?;
                    let ds = self.add(Op::Binary(BinaryOp::Mul), &[p, d])?;
                    let ds = self.scaled(ds, scale)?;
                    match wrt {
                        crate::op::AttnWrt::Q => self.add(mm(false, false), &[ds, k])?,
                        _ => self.add(mm(true, false), &[ds, q])?,
                    }
                };
                self.fit(out, ty)
            }
            _ => Err(IrError::Invalid(format!("{} is not fused", op.kind()))),
        }
    }

    /// `scale * q k^T` (no multiply for a scale of 1).
    fn scores(&mut self, q: NodeId, k: NodeId, scale: f32) -> Result<NodeId> {
        let s = self.add(
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            &[q, k],
        )?;
        self.scaled(s, scale)
    }

    fn scaled(&mut self, x: NodeId, scale: f32) -> Result<NodeId> {
        if scale == 1.0 {
            return Ok(x);
        }
        let c = self.add_const(scale, x)?;
        self.add(Op::Binary(BinaryOp::Mul), &[x, c])
    }

    /// `x` broadcast to the declared type's shape where an operand that did not take
    /// part (v's leading axes for the gradient wrt v, say) widens it.
    fn fit(&mut self, x: NodeId, ty: &TensorType) -> Result<NodeId> {
        if self.shape(x) == ty.shape {
            Ok(x)
        } else {
            self.add(
                Op::Broadcast {
                    shape: ty.shape.clone(),
                },
                &[x],
            )
        }
    }

    /// `rstd * (g - mean(g) - xhat * mean(g * xhat))`, `g = dy * gamma`, over the last
    /// axis, with `xhat` and `rstd` recomputed from `x`.
    fn layernorm_grad(&mut self, x: NodeId, gamma: NodeId, dy: NodeId, eps: f32) -> Result<NodeId> {
        let last = self
            .shape(x)
            .rank()
            .checked_sub(1)
            .ok_or_else(|| IrError::Invalid("layernorm_grad of a scalar".into()))?;
        let mean = |e: &mut Self, a: NodeId| {
            e.add(
                Op::Reduce {
                    op: ReduceOp::Mean,
                    axes: vec![last],
                    keepdim: true,
                },
                &[a],
            )
        };
        let bin = |e: &mut Self, op: BinaryOp, a: NodeId, b: NodeId| e.add(Op::Binary(op), &[a, b]);
        let mu = mean(self, x)?;
        let xc = bin(self, BinaryOp::Sub, x, mu)?;
        let sq = bin(self, BinaryOp::Mul, xc, xc)?;
        let var = mean(self, sq)?;
        let e = self.add_const(eps, x)?;
        let ve = bin(self, BinaryOp::Add, var, e)?;
        let rstd = self.add(Op::Unary(UnaryOp::Rsqrt), &[ve])?;
        let xhat = bin(self, BinaryOp::Mul, xc, rstd)?;
        let g = bin(self, BinaryOp::Mul, dy, gamma)?;
        let m1 = mean(self, g)?;
        let gx = bin(self, BinaryOp::Mul, g, xhat)?;
        let m2 = mean(self, gx)?;
        let t = bin(self, BinaryOp::Mul, xhat, m2)?;
        let u = bin(self, BinaryOp::Sub, g, m1)?;
        let u = bin(self, BinaryOp::Sub, u, t)?;
        bin(self, BinaryOp::Mul, rstd, u)
    }

    /// `slice(softmax(concat([broadcast(z), s], last), last), last, 1..1+M)`.
    fn softmax_sink(&mut self, s: NodeId, z: NodeId) -> Result<NodeId> {
        let shape = self.shape(s);
        let last = shape
            .rank()
            .checked_sub(1)
            .ok_or_else(|| IrError::Invalid("softmax_sink of a scalar".into()))?;
        let m = shape.0[last].fixed().ok_or_else(|| {
            IrError::Invalid("softmax_sink along the batch axis cannot be decomposed".into())
        })?;
        if m == 0 {
            // No columns: the result is s itself (empty).
            return Ok(s);
        }
        let mut rows = shape.0.clone();
        rows[last] = Dim::Fixed(1);
        let rows = Shape(rows);
        let zb = if self.shape(z) == rows {
            z
        } else {
            self.add(Op::Broadcast { shape: rows }, &[z])?
        };
        let c = self.add(Op::Concat { axis: last }, &[zb, s])?;
        let p = self.add(Op::Softmax { axis: last }, &[c])?;
        self.add(
            Op::Slice {
                axis: last,
                start: 1,
                end: 1 + m,
            },
            &[p],
        )
    }

    fn attention(
        &mut self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        z: Option<NodeId>,
        scale: f32,
        ty: &TensorType,
    ) -> Result<NodeId> {
        let mm = |transpose_b| Op::MatMul {
            transpose_a: false,
            transpose_b,
        };
        let s = self.add(mm(true), &[q, k])?;
        let scalar = TensorType::new(self.g.ty(q).dtype, Shape(vec![]));
        let c = self.g.add_typed(
            Op::Const {
                values: vec![scale],
            },
            &[],
            scalar,
        )?;
        self.new.push(c);
        let mut s = self.add(Op::Binary(BinaryOp::Mul), &[s, c])?;
        let last = self.shape(s).rank() - 1;
        let p = match z {
            None => self.add(Op::Softmax { axis: last }, &[s])?,
            Some(z) => {
                let ss = self.shape(s);
                let mut rows = ss.0.clone();
                rows[last] = Dim::Fixed(1);
                if !broadcasts_to(&self.shape(z), &Shape(rows)) {
                    // z has leading axes only v brings: give the scores the output's.
                    let r = ty.shape.rank();
                    let mut full = ty.shape.0[..r - 2].to_vec();
                    full.extend_from_slice(&ss.0[last - 1..]);
                    s = self.add(Op::Broadcast { shape: Shape(full) }, &[s])?;
                }
                self.softmax_sink(s, z)?
            }
        };
        self.add(mm(false), &[p, v])
    }
}
