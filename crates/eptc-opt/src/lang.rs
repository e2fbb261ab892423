//! The e-graph language: IR ops as egg `SymbolLang` nodes whose first children are
//! attribute leaves (`"3"`, `"s:B,17,48"`, `"f:0.125"`, ...), then the operands. Leaves of
//! the IR (inputs, params, consts) are symbols `$k`, indices into a [`LeafTable`].
//!
//! The analysis gives every e-class the IR type of its value (`None` for attribute
//! leaves), computed by the IR's own shape rules, so rules can ask for shapes.

use egg::{Analysis, DidMerge, EGraph, Id, Symbol, SymbolLang};
use eptc_ir::{Activation, BinaryOp, Dim, Op, ReduceOp, Shape, TensorType, UnaryOp};

/// The IR leaves of the graph being optimized: op, type and tag, by `$k` index.
#[derive(Clone, Debug, Default)]
pub struct LeafTable {
    pub leaves: Vec<(Op, TensorType, Option<String>)>,
}

/// The analysis: a type per e-class; merging classes of different types is a rule bug,
/// counted in `conflicts` and reported as an error after the run.
#[derive(Clone, Debug, Default)]
pub struct Types {
    pub table: LeafTable,
    pub conflicts: usize,
}

pub type Graph = EGraph<SymbolLang, Types>;

fn int_list(v: &[usize]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Attribute symbol of a shape: `s:B,17,48`.
pub fn shape_str(s: &Shape) -> String {
    let d: Vec<String> = s.dims().iter().map(|d| d.to_string()).collect();
    format!("s:{}", d.join(","))
}

/// The shape of an `s:` attribute symbol.
pub fn parse_shape(s: &str) -> Option<Shape> {
    let body = s.strip_prefix("s:")?;
    if body.is_empty() {
        return Some(Shape(vec![]));
    }
    body.split(',')
        .map(|d| {
            if d == "B" {
                Some(Dim::Batch)
            } else {
                d.parse().ok().map(Dim::Fixed)
            }
        })
        .collect::<Option<Vec<_>>>()
        .map(Shape)
}

/// A comma-separated list of integers.
pub fn parse_list(s: &str) -> Option<Vec<usize>> {
    s.split(',').map(|x| x.parse().ok()).collect()
}

/// Attribute symbol of a float.
pub fn float_attr(v: f32) -> String {
    format!("f:{v:?}")
}

fn parse_float(s: &str) -> Option<f32> {
    s.strip_prefix("f:")?.parse().ok()
}

fn linear_attr(bias: bool, act: Activation, residual: bool) -> String {
    format!("lin:{}:{}:{}", bias as u8, act.name(), residual as u8)
}

/// The attribute children (as symbols) and op symbol of a non-leaf IR op.
pub fn encode(op: &Op) -> (&'static str, Vec<String>) {
    let b = |x: bool| (x as u8).to_string();
    let attrs = match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => {
            unreachable!("leaves are $k symbols")
        }
        Op::Patchify { patch } => vec![patch.to_string()],
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => vec![b(*transpose_a), b(*transpose_b)],
        Op::Binary(_) | Op::Unary(_) | Op::SoftmaxSink => vec![],
        Op::Reduce { axes, keepdim, .. } => vec![int_list(axes), b(*keepdim)],
        Op::Softmax { axis } | Op::Concat { axis } => vec![axis.to_string()],
        Op::LayerNorm { eps } | Op::LayerNormGrad { eps } => vec![float_attr(*eps)],
        Op::Reshape { shape } | Op::Broadcast { shape } => vec![shape_str(shape)],
        Op::Permute { perm } => vec![format!("p:{}", int_list(perm))],
        Op::Slice { axis, start, end } => {
            vec![axis.to_string(), start.to_string(), end.to_string()]
        }
        Op::Attention { scale, .. } | Op::AttentionLse { scale, .. } => vec![float_attr(*scale)],
        Op::AttentionGrad { scale, wrt } => vec![float_attr(*scale), format!("w:{}", wrt.name())],
        Op::Linear {
            bias,
            activation,
            residual,
        } => vec![linear_attr(*bias, *activation, *residual)],
    };
    (op.kind(), attrs)
}

/// The symbol of a leaf e-class (an attribute or a `$k` IR leaf), if it is one.
pub fn leaf_symbol(eg: &Graph, id: Id) -> Option<Symbol> {
    eg[id]
        .nodes
        .iter()
        .find(|n| n.children.is_empty())
        .map(|n| n.op)
}

/// The number of attribute children an op symbol takes.
pub fn attr_count(op: &str) -> usize {
    match op {
        "patchify" | "softmax" | "concat" | "layernorm" | "layernorm_grad" | "reshape"
        | "broadcast" | "permute" | "attention" | "linear" | "attention_lse" => 1,
        "matmul" | "attention_grad" => 2,
        "slice" => 3,
        k if k.starts_with("reduce_") => 2,
        _ => 0,
    }
}

/// Decode an e-node back into an IR op and its operand classes. `None` when the node is
/// a leaf or its attributes do not decode.
pub fn decode(eg: &Graph, n: &SymbolLang) -> Option<(Op, Vec<Id>)> {
    let op = n.op.as_str();
    let na = attr_count(op);
    if n.children.len() < na || n.children.is_empty() {
        return None;
    }
    let attr = |i: usize| leaf_symbol(eg, n.children[i]).map(|s| s.as_str().to_string());
    let int = |i: usize| attr(i).and_then(|s| s.parse::<usize>().ok());
    let flag = |i: usize| int(i).map(|v| v == 1);
    let operands = n.children[na..].to_vec();
    let decoded = if let Some(b) = BinaryOp::ALL.iter().find(|b| b.name() == op) {
        Op::Binary(*b)
    } else if let Some(u) = UnaryOp::ALL.iter().find(|u| u.name() == op) {
        Op::Unary(*u)
    } else if let Some(r) = ReduceOp::ALL.iter().find(|r| r.name() == op) {
        Op::Reduce {
            op: *r,
            axes: parse_list(&attr(0)?)?,
            keepdim: flag(1)?,
        }
    } else {
        match op {
            "patchify" => Op::Patchify { patch: int(0)? },
            "matmul" => Op::MatMul {
                transpose_a: flag(0)?,
                transpose_b: flag(1)?,
            },
            "softmax" => Op::Softmax { axis: int(0)? },
            "concat" => Op::Concat { axis: int(0)? },
            "layernorm" => Op::LayerNorm {
                eps: parse_float(&attr(0)?)?,
            },
            "layernorm_grad" => Op::LayerNormGrad {
                eps: parse_float(&attr(0)?)?,
            },
            "reshape" => Op::Reshape {
                shape: parse_shape(&attr(0)?)?,
            },
            "broadcast" => Op::Broadcast {
                shape: parse_shape(&attr(0)?)?,
            },
            "permute" => Op::Permute {
                perm: parse_list(attr(0)?.strip_prefix("p:")?)?,
            },
            "slice" => Op::Slice {
                axis: int(0)?,
                start: int(1)?,
                end: int(2)?,
            },
            "softmax_sink" => Op::SoftmaxSink,
            "attention" => Op::Attention {
                scale: parse_float(&attr(0)?)?,
                sink: operands.len() == 4,
            },
            "attention_lse" => Op::AttentionLse {
                scale: parse_float(&attr(0)?)?,
                sink: operands.len() == 3,
            },
            "attention_grad" => Op::AttentionGrad {
                scale: parse_float(&attr(0)?)?,
                wrt: eptc_ir::AttnWrt::from_name(attr(1)?.strip_prefix("w:")?)?,
            },
            "linear" => {
                let a = attr(0)?;
                let mut it = a.strip_prefix("lin:")?.split(':');
                let bias = it.next()? == "1";
                let activation = Activation::from_name(it.next()?)?;
                let residual = it.next()? == "1";
                Op::Linear {
                    bias,
                    activation,
                    residual,
                }
            }
            _ => return None,
        }
    };
    Some((decoded, operands))
}

/// What the analysis knows of an e-class: the IR type of its value (`None` for attribute
/// leaves) and whether it is a compile-time constant (built only from frozen params and
/// consts, so the optimizer may fold it into new frozen weights).
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub ty: Option<TensorType>,
    pub constant: bool,
}

impl Analysis<SymbolLang> for Types {
    type Data = Info;

    fn make(eg: &mut Graph, n: &SymbolLang, _id: Id) -> Self::Data {
        if n.children.is_empty() {
            let s = n.op.as_str();
            let leaf = s
                .strip_prefix('$')
                .and_then(|k| k.parse::<usize>().ok())
                .and_then(|k| eg.analysis.table.leaves.get(k));
            return match leaf {
                Some((op, ty, _)) => Info {
                    ty: Some(ty.clone()),
                    constant: matches!(
                        op,
                        Op::Param {
                            trainable: false,
                            ..
                        } | Op::Const { .. }
                    ),
                },
                // An attribute.
                None => Info {
                    ty: None,
                    constant: true,
                },
            };
        }
        let untyped = Info {
            ty: None,
            constant: false,
        };
        let Some((op, operands)) = decode(eg, n) else {
            return untyped;
        };
        let constant = operands.iter().all(|&o| eg[o].data.constant);
        let tys: Option<Vec<TensorType>> =
            operands.iter().map(|&o| eg[o].data.ty.clone()).collect();
        let Some(tys) = tys else {
            return untyped;
        };
        let refs: Vec<&TensorType> = tys.iter().collect();
        let ty = eptc_ir::infer::infer(&op, &refs).ok();
        // A value with the batch dimension is per run, whatever it is made of.
        let constant = constant && ty.as_ref().is_some_and(|t| !t.shape.has_batch());
        Info { ty, constant }
    }

    fn merge(&mut self, a: &mut Self::Data, b: Self::Data) -> DidMerge {
        let mut changed_a = false;
        let changed_b;
        match (a.ty.as_ref(), b.ty) {
            (None, Some(t)) => {
                a.ty = Some(t);
                changed_a = true;
                changed_b = false;
            }
            (Some(x), Some(y)) if *x != y => {
                self.conflicts += 1;
                changed_b = true;
            }
            (Some(_), Some(_)) => changed_b = false,
            (_, None) => changed_b = a.ty.is_some(),
        }
        // A value is a compile-time constant if any of its forms is.
        let b_const = b.constant;
        if b_const && !a.constant {
            a.constant = true;
            changed_a = true;
        }
        DidMerge(changed_a, changed_b || (a.constant && !b_const))
    }
}

/// The type of an e-class's value.
pub fn ty(eg: &Graph, id: Id) -> Option<&TensorType> {
    eg[id].data.ty.as_ref()
}

/// Whether an e-class is a compile-time constant.
pub fn is_constant(eg: &Graph, id: Id) -> bool {
    eg[id].data.constant
}

/// The IR leaf behind an e-class, if it is one.
pub fn ir_leaf(eg: &Graph, id: Id) -> Option<&(Op, TensorType, Option<String>)> {
    let s = leaf_symbol(eg, id)?;
    let k: usize = s.as_str().strip_prefix('$')?.parse().ok()?;
    eg.analysis.table.leaves.get(k)
}

/// Whether an e-class is a frozen parameter (or a constant): data known at compile time.
pub fn is_frozen_leaf(eg: &Graph, id: Id) -> bool {
    matches!(
        ir_leaf(eg, id),
        Some((
            Op::Param {
                trainable: false,
                ..
            },
            _,
            _
        )) | Some((Op::Const { .. }, _, _))
    )
}

/// The value of a scalar constant e-class.
pub fn scalar_const(eg: &Graph, id: Id) -> Option<f32> {
    match ir_leaf(eg, id)? {
        // Rank 0 only: a one-element `[1, 1]` would broadcast the value it scales.
        (Op::Const { values }, ty, _) if values.len() == 1 && ty.rank() == 0 => Some(values[0]),
        _ => None,
    }
}
