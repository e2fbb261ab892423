//! The operations of the IR and their attributes.
//!
//! Every op has a stable lower-case name (`Op::kind`) used by the text format and by the
//! machine-readable spec in `ir-specs/ops.toml`; a test keeps the two in agreement.

use crate::types::Shape;

/// Element-wise binary operations, with numpy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    /// `1.0` where `a == b`, else `0.0` (a mask; its gradient is zero).
    Equal,
}

/// Element-wise unary operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Abs,
    Tanh,
    Sigmoid,
    Relu,
    /// The exact GELU, `x * Phi(x)` with the error function (PyTorch's default).
    Gelu,
    /// `-1`, `0` or `1` by the sign of `x` (NaN stays NaN); the derivative of `abs`.
    Sign,
    /// The derivative of the exact GELU, `Phi(x) + x * phi(x)` (its backward).
    GeluDeriv,
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    /// `log(sum(exp(x)))`, computed stably.
    LogSumExp,
}

/// The activation a fused `linear` applies to `x w^T + b` (before any residual add).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    None,
    /// The exact GELU, as [`UnaryOp::Gelu`].
    Gelu,
}

impl Activation {
    pub const ALL: [Activation; 2] = [Activation::None, Activation::Gelu];

    /// The name in the text format (`act=gelu`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Gelu => "gelu",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Activation::ALL.into_iter().find(|a| a.name() == s)
    }
}

/// The operand whose gradient an `attention_grad` node computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnWrt {
    Q,
    K,
    V,
}

impl AttnWrt {
    pub const ALL: [AttnWrt; 3] = [AttnWrt::Q, AttnWrt::K, AttnWrt::V];

    /// The name in the text format (`wrt=q`).
    pub fn name(self) -> &'static str {
        match self {
            AttnWrt::Q => "q",
            AttnWrt::K => "k",
            AttnWrt::V => "v",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        AttnWrt::ALL.into_iter().find(|a| a.name() == s)
    }
}

/// How a parameter gets its initial value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Read from the model checkpoint (frozen weights).
    Checkpoint,
    Zeros,
    Ones,
    /// Normal distribution with mean 0 and this standard deviation.
    Normal(f32),
    /// Uniform distribution on `[-bound, bound]`.
    Uniform(f32),
    /// Kaiming-normal (fan-in, gain sqrt(2)), fan-in as the official EPT code computes it
    /// on the stacked `[layers, N, L]` prompt tensor: `N * L`.
    Kaiming,
    /// From the token embeddings of the first batch (see DESIGN.md and README).
    Token,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
        BinaryOp::Equal,
    ];
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::Equal => "equal",
        }
    }
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Maximum => a.max(b),
            BinaryOp::Minimum => a.min(b),
            BinaryOp::Equal => f32::from(u8::from(a == b)),
        }
    }
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 13] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Abs,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::Sign,
        UnaryOp::GeluDeriv,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Abs => "abs",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::Sign => "sign",
            UnaryOp::GeluDeriv => "gelu_deriv",
        }
    }
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Mean,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::LogSumExp,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Mean => "reduce_mean",
            ReduceOp::Max => "reduce_max",
            ReduceOp::Min => "reduce_min",
            ReduceOp::LogSumExp => "reduce_logsumexp",
        }
    }
}

/// One operation of the graph. Leaves (`Input`, `Param`, `Const`) have no operands.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A run-time input tensor, bound by name.
    Input {
        name: String,
    },
    /// A weight: frozen (from the checkpoint) or trainable (an adapter tensor).
    Param {
        name: String,
        trainable: bool,
        init: Init,
    },
    /// A constant with its values inline (row-major; fixed shapes only).
    Const {
        values: Vec<f32>,
    },
    /// `[.., C, H, W] -> [.., (H/p)*(W/p), C*p*p]`: non-overlapping patches, row-major over
    /// the patch grid, features ordered `(c, kh, kw)` like a flattened conv kernel.
    Patchify {
        patch: usize,
    },
    /// Batched matrix product over the last two axes, leading axes broadcast.
    MatMul {
        transpose_a: bool,
        transpose_b: bool,
    },
    Binary(BinaryOp),
    Unary(UnaryOp),
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdim: bool,
    },
    /// Softmax along one axis.
    Softmax {
        axis: usize,
    },
    /// LayerNorm over the last axis with affine `gamma`, `beta` (operands 1 and 2).
    LayerNorm {
        eps: f32,
    },
    /// Same elements, new shape (the output type's shape).
    Reshape {
        shape: Shape,
    },
    Permute {
        perm: Vec<usize>,
    },
    /// Concatenation of two or more operands along an axis.
    Concat {
        axis: usize,
    },
    /// Elements `start..end` along an axis.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Numpy-style broadcast to the output type's shape.
    Broadcast {
        shape: Shape,
    },
    // ---- fused ops: produced by the optimizer, each with a decomposition into the
    // primitives above (`crate::decompose`).
    /// `softmax_sink(s, z)`: softmax along the last axis of `s` with one extra logit
    /// `z_i` per row that takes part in the normalisation but is not output:
    /// `out_ij = exp(s_ij) / (sum_j' exp(s_ij') + exp(z_i))`. `z` broadcasts to `s`'s
    /// shape with the last dim 1.
    SoftmaxSink,
    /// `attention(q, k, v[, z])`: `softmax_sink(scale * q k^T, z) v` over the last two
    /// axes, leading axes broadcast; plain softmax (no `z` operand) when `!sink`.
    Attention {
        scale: f32,
        sink: bool,
    },
    /// `linear(x, w[, b][, r])`: `act(x w^T + b) + r`, with `w` `[out, in]` (PyTorch's
    /// `nn.Linear` layout); `b` present iff `bias`, `r` iff `residual`.
    Linear {
        bias: bool,
        activation: Activation,
        residual: bool,
    },
    /// `layernorm_grad(x, gamma, dy)`: the gradient with respect to `x` of
    /// `layernorm(x, gamma, beta)` (any beta) given the output's gradient `dy`:
    /// `rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * gamma`,
    /// `xhat = (x - mean(x)) * rstd`, `rstd = 1 / sqrt(var(x) + eps)`, over the last axis.
    /// Made by the autodiff pass (the backward of `layernorm`).
    LayerNormGrad {
        eps: f32,
    },
    /// `attention_lse(q, k[, z])`: per query row, the log of the normaliser of
    /// `attention(q, k, v[, z])`: `lse_i = log(sum_j exp(scale q_i . k_j) + exp(z_i))`
    /// (without the `z` term when `!sink`), shape `[.., n, 1]` with the leading axes of
    /// the operands broadcast. Made by the autodiff pass for a fused attention backward:
    /// the probabilities are `P_ij = exp(scale q_i . k_j - lse_i)`, the sink's weight
    /// `exp(z_i - lse_i)`.
    AttentionLse {
        scale: f32,
        sink: bool,
    },
    /// `attention_grad(q, k, v, lse, delta, dO)`: the gradient of `attention` with respect
    /// to one of q, k, v (`wrt`), given the output's gradient `dO` `[.., n, e]`, the row
    /// normaliser `lse` (`attention_lse`, sink included) and `delta = rowsum(dO * O)`,
    /// both `[.., n, 1]`. With `P_ij = exp(scale q_i . k_j - lse_i)` and
    /// `dS_ij = P_ij (dO_i . v_j - delta_i)`: wrt q `scale dS k` `[.., n, d]`; wrt k
    /// `scale dS^T q` `[.., m, d]`; wrt v `P^T dO` `[.., m, e]`; the leading axes of all
    /// operands broadcast. A sink enters only through `lse`. Made by the autodiff pass
    /// (the flash-attention backward, DESIGN.md section 1).
    AttentionGrad {
        scale: f32,
        wrt: AttnWrt,
    },
}

impl Op {
    /// The op's name in the text format and the spec.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Const { .. } => "const",
            Op::Patchify { .. } => "patchify",
            Op::MatMul { .. } => "matmul",
            Op::Binary(b) => b.name(),
            Op::Unary(u) => u.name(),
            Op::Reduce { op, .. } => op.name(),
            Op::Softmax { .. } => "softmax",
            Op::LayerNorm { .. } => "layernorm",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Concat { .. } => "concat",
            Op::Slice { .. } => "slice",
            Op::Broadcast { .. } => "broadcast",
            Op::SoftmaxSink => "softmax_sink",
            Op::Attention { .. } => "attention",
            Op::Linear { .. } => "linear",
            Op::LayerNormGrad { .. } => "layernorm_grad",
            Op::AttentionLse { .. } => "attention_lse",
            Op::AttentionGrad { .. } => "attention_grad",
        }
    }

    /// Whether the op is a fused op (one the optimizer makes; see [`Op::fused_kinds`]).
    pub fn is_fused(&self) -> bool {
        matches!(
            self,
            Op::SoftmaxSink
                | Op::Attention { .. }
                | Op::Linear { .. }
                | Op::LayerNormGrad { .. }
                | Op::AttentionLse { .. }
                | Op::AttentionGrad { .. }
        )
    }

    /// The names of the fused ops, in a fixed order (the tail of [`Op::all_kinds`]).
    pub fn fused_kinds() -> Vec<&'static str> {
        vec![
            "softmax_sink",
            "attention",
            "linear",
            "layernorm_grad",
            "attention_lse",
            "attention_grad",
        ]
    }

    /// Every op name the IR knows, in a fixed order: primitives, then the fused ops.
    pub fn all_kinds() -> Vec<&'static str> {
        let mut v = vec!["input", "param", "const", "patchify", "matmul"];
        v.extend(BinaryOp::ALL.iter().map(|b| b.name()));
        v.extend(UnaryOp::ALL.iter().map(|u| u.name()));
        v.extend(ReduceOp::ALL.iter().map(|r| r.name()));
        v.extend([
            "softmax",
            "layernorm",
            "reshape",
            "permute",
            "concat",
            "slice",
            "broadcast",
        ]);
        v.extend(Op::fused_kinds());
        v
    }

    /// The number of operands the op takes: `Some(n)` exactly, `None` for variadic
    /// (at least two, `concat`). The fused ops' optional operands count when their
    /// attribute says they are present.
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => Some(0),
            Op::Patchify { .. }
            | Op::Unary(_)
            | Op::Reduce { .. }
            | Op::Softmax { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Slice { .. }
            | Op::Broadcast { .. } => Some(1),
            Op::MatMul { .. } | Op::Binary(_) | Op::SoftmaxSink => Some(2),
            Op::Attention { sink, .. } => Some(3 + usize::from(*sink)),
            Op::AttentionLse { sink, .. } => Some(2 + usize::from(*sink)),
            Op::AttentionGrad { .. } => Some(6),
            Op::Linear { bias, residual, .. } => {
                Some(2 + usize::from(*bias) + usize::from(*residual))
            }
            Op::LayerNorm { .. } | Op::LayerNormGrad { .. } => Some(3),
            Op::Concat { .. } => None,
        }
    }

    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. } | Op::Const { .. })
    }
}
