//! WGSL kernels from typed templates: every node becomes (at most) one compute kernel
//! whose shapes, strides and attributes are baked in as constants for the node's concrete
//! shapes at a given batch size (the runtime regenerates the kernels per batch size).
//!
//! The templates (Rust functions from shapes and attributes to WGSL) live in the
//! submodules: `elementwise` (one invocation per output element: unary, binary with
//! numpy broadcasting, permute / broadcast / patchify as a strided gather, slice,
//! concat), `rows` (one invocation per row or reduced element: reductions, softmax,
//! softmax with a sink, LayerNorm and its gradient), `matmul` (16x16 workgroups, tiles
//! staged in workgroup memory, up to 4x4 outputs per invocation; `linear` with its
//! epilogue) and `attention` (online softmax, one query row per invocation); `wgsl`
//! holds the shared pieces (index arithmetic, blocked sums, the erf-based GELU...).
//!
//! Binding convention: `@group(0) @binding(i)` is operand `i`, a read-only storage
//! `array<f32>` (`array<f16>` with f16 storage); `@binding(inputs)` is the output,
//! read-write. No uniforms. Every binding is used by the entry point (so a layout derived
//! from the shader has all of them).
//!
//! Storage type ([`Storage`], from `eptc compile --dtype`): the graph's tensors are f32;
//! with f16 storage every binding is an `array<f16>` (the module starts with
//! `enable f16;`), every element read is converted to f32 and every element written
//! converted back, while all arithmetic — sums, matmul tiles in workgroup memory,
//! softmax and LayerNorm statistics, attention's online softmax — stays f32. bf16 has no
//! WGSL type and is refused.
//! Dispatches keep each dimension at most 65535 workgroups (a 2-D grid, the excess
//! invocations return at once).

mod attention;
mod elementwise;
mod matmul;
mod rows;
pub(crate) mod wgsl;

use eptc_backend::dims;
use eptc_ir::{Activation, DType, Graph, NodeId, Op};
use thiserror::Error;

use wgsl::contiguous_strides;
pub use wgsl::Storage;

/// One compute kernel for one node.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// Unique, readable: `n<node>_<op kind>` (plus a suffix when a node needs several).
    pub name: String,
    /// A complete WGSL module.
    pub source: String,
    /// The entry point's name.
    pub entry: String,
    /// Bindings `0..inputs` (group 0) are the operands in order, read-only storage
    /// `array<f32>`; binding `inputs` is the output, read-write storage `array<f32>`
    /// (`array<f16>` for f16 storage).
    pub inputs: usize,
    /// The dispatch size in workgroups.
    pub workgroups: [u32; 3],
}

#[derive(Debug, Error)]
pub enum CodegenError {
    #[error("node %{node} ({op}): {msg}")]
    Unsupported {
        node: usize,
        op: String,
        msg: String,
    },
}

/// The largest tensor (in elements) a kernel indexes: offsets are `u32`, with room for
/// the rounding up of the last workgroup.
pub const MAX_ELEMS: usize = (1 << 31) - 1;

/// The kernels of node `id` of `g` with the batch bound to `batch` and tensors stored as
/// `dtype` (f32 or f16; the graph itself is f32), in dispatch order. Empty for leaves and
/// for ops that are views of their operand (`reshape`: the executor aliases the
/// operand's buffer).
pub fn node_kernels(
    g: &Graph,
    id: NodeId,
    batch: usize,
    dtype: DType,
) -> Result<Vec<Kernel>, CodegenError> {
    let node = g.node(id);
    let err = |msg: String| CodegenError::Unsupported {
        node: id.index(),
        op: node.op.kind().to_string(),
        msg,
    };
    let st = Storage::of(dtype).map_err(&err)?;
    if node.op.is_leaf() || matches!(node.op, Op::Reshape { .. }) {
        return Ok(Vec::new());
    }
    let operands = g.operands(id);
    if let Some(n) = node.op.arity() {
        if operands.len() != n {
            return Err(err(format!(
                "{} operands, the op takes {n}",
                operands.len()
            )));
        }
    } else if operands.len() < 2 {
        return Err(err(format!(
            "{} operands, the op takes at least 2",
            operands.len()
        )));
    }
    let shapes: Vec<Vec<usize>> = operands
        .iter()
        .map(|&o| g.ty(o).shape.resolve(batch))
        .collect();
    for (&o, s) in operands.iter().zip(&shapes) {
        let dt = g.ty(o).dtype;
        if dt != DType::F32 {
            return Err(err(format!(
                "operand %{} is {dt}, only f32 is supported",
                o.index()
            )));
        }
        check_size(s).map_err(&err)?;
    }
    if node.ty.dtype != DType::F32 {
        return Err(err(format!(
            "the output is {}, only f32 is supported",
            node.ty.dtype
        )));
    }
    let out = node.ty.shape.resolve(batch);
    check_size(&out).map_err(&err)?;
    if out.iter().product::<usize>() == 0 {
        return Ok(Vec::new());
    }
    let name = format!("n{}_{}", id.index(), node.op.kind());
    let k = generate(st, &name, &node.op, &shapes, &out).map_err(err)?;
    Ok(vec![k])
}

fn check_size(s: &[usize]) -> Result<(), String> {
    let n = s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n {
        Some(n) if n <= MAX_ELEMS => Ok(()),
        _ => Err(format!(
            "a tensor of shape {s:?} is too large (at most {MAX_ELEMS} elements)"
        )),
    }
}

/// The one kernel of a non-leaf, non-view op with operand shapes `x` and output shape
/// `out` (non-empty), tensors stored as `st`.
fn generate(
    st: Storage,
    name: &str,
    op: &Op,
    x: &[Vec<usize>],
    out: &[usize],
) -> Result<Kernel, String> {
    let rank_at_least = |s: &[usize], r: usize, what: &str| {
        if s.len() < r {
            Err(format!("{what} has rank {}, needs at least {r}", s.len()))
        } else {
            Ok(())
        }
    };
    let bstrides = dims::broadcast;
    let numel = |s: &[usize]| s.iter().product::<usize>();
    Ok(match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Reshape { .. } => {
            return Err("no kernel for a leaf or a view".into())
        }
        Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            return Err(format!(
                "{} has no WGSL kernel: the wgpu backend runs its decomposition",
                op.kind()
            ))
        }
        Op::Unary(u) => elementwise::unary(st, name, *u, numel(out)),
        Op::Binary(b) => {
            let sa = bstrides(&x[0], out)?;
            let sb = bstrides(&x[1], out)?;
            elementwise::binary(st, name, *b, out, &sa, &sb)
        }
        Op::Broadcast { .. } => elementwise::gather(st, name, out, &bstrides(&x[0], out)?),
        Op::Permute { perm } => {
            let own = contiguous_strides(&x[0]);
            if perm.len() != x[0].len() || perm.iter().any(|&p| p >= own.len()) {
                return Err(format!("permutation {perm:?} for shape {:?}", x[0]));
            }
            let shape: Vec<usize> = perm.iter().map(|&p| x[0][p]).collect();
            let strides: Vec<usize> = perm.iter().map(|&p| own[p]).collect();
            elementwise::gather(st, name, &shape, &strides)
        }
        Op::Patchify { patch } => {
            let p = *patch;
            let &[b, c, h, w] = x[0].as_slice() else {
                return Err(format!("patchify wants rank 4, got {:?}", x[0]));
            };
            if p == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
                return Err(format!("patch {p} does not tile {h}x{w}"));
            }
            let (gh, gw) = (h / p, w / p);
            let shape = [b, gh, gw, c, p, p];
            let strides = [c * h * w, p * w, p, h * w, w, 1];
            elementwise::gather(st, name, &shape, &strides)
        }
        Op::Slice { axis, start, end } => {
            let s = &x[0];
            if *axis >= s.len() || start >= end || *end > s[*axis] {
                return Err(format!("slice {start}..{end} along {axis} of {s:?}"));
            }
            let outer = numel(&s[..*axis]);
            let inner = numel(&s[axis + 1..]);
            elementwise::slice(st, name, outer, s[*axis], inner, *start, end - start)
        }
        Op::Concat { axis } => {
            let a = *axis;
            if a >= out.len() || x.iter().any(|s| s.len() != out.len()) {
                return Err(format!("concat along {a} of {x:?}"));
            }
            let sizes: Vec<usize> = x.iter().map(|s| s[a]).collect();
            elementwise::concat(st, name, numel(&out[..a]), &sizes, numel(&out[a + 1..]))
        }
        Op::Reduce { op, axes, .. } => {
            if axes.iter().any(|&a| a >= x[0].len()) {
                return Err(format!("axes {axes:?} out of range for {:?}", x[0]));
            }
            rows::reduce(st, name, *op, &x[0], axes)
        }
        Op::Softmax { axis } => {
            let s = &x[0];
            if *axis >= s.len() {
                return Err(format!("axis {axis} out of range for {s:?}"));
            }
            rows::softmax(
                st,
                name,
                numel(&s[..*axis]),
                s[*axis],
                numel(&s[axis + 1..]),
            )
        }
        Op::SoftmaxSink => {
            let s = &x[0];
            rank_at_least(s, 1, "s")?;
            let row_shape = &s[..s.len() - 1];
            let mut rows1 = row_shape.to_vec();
            rows1.push(1);
            let zs = bstrides(&x[1], &rows1)?;
            rows::softmax_sink(st, name, row_shape, s[s.len() - 1], &zs[..zs.len() - 1])
        }
        Op::LayerNorm { eps } | Op::LayerNormGrad { eps } => {
            rank_at_least(&x[0], 1, "x")?;
            let d = *x[0].last().unwrap_or(&1);
            let want = [d];
            if x[1] != want || (matches!(op, Op::LayerNorm { .. }) && x[2] != want) {
                return Err(format!("gamma/beta must be [{d}], got {:?}", &x[1..]));
            }
            if matches!(op, Op::LayerNormGrad { .. }) && x[2] != x[0] {
                return Err(format!("dy {:?} must have the shape of x {:?}", x[2], x[0]));
            }
            let rows = numel(&x[0]) / d;
            if matches!(op, Op::LayerNorm { .. }) {
                rows::layernorm(st, name, rows, d, *eps)
            } else {
                rows::layernorm_grad(st, name, rows, d, *eps)
            }
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let mm = dims::matmul(&x[0], &x[1], *transpose_a, *transpose_b, out)?;
            let (lead, m, n, ka) = (&mm.lead[..], mm.m, mm.n, mm.k);
            let opa = matmul::Operand {
                rs: mm.a.rs,
                cs: mm.a.cs,
                lead_strides: mm.a.lead_strides,
            };
            let opb = matmul::Operand {
                rs: mm.b.rs,
                cs: mm.b.cs,
                lead_strides: mm.b.lead_strides,
            };
            let what = format!(
                "matmul{}{}",
                if *transpose_a { " transpose_a" } else { "" },
                if *transpose_b { " transpose_b" } else { "" }
            );
            matmul::matmul(
                st,
                name,
                &what,
                lead,
                m,
                n,
                ka,
                &opa,
                &opb,
                matmul::Epilogue::default(),
            )
        }
        Op::Linear {
            bias,
            activation,
            residual,
        } => {
            let dims::Linear { rows, o, k } = dims::linear(x, *bias, *residual, out)?;
            let opx = matmul::Operand {
                rs: k,
                cs: 1,
                lead_strides: vec![],
            };
            let opw = matmul::Operand {
                rs: 1,
                cs: k,
                lead_strides: vec![],
            };
            let epi = matmul::Epilogue {
                bias: *bias,
                gelu: *activation == Activation::Gelu,
                residual: *residual,
            };
            let what = format!(
                "linear{}{}{}",
                if *bias { " bias" } else { "" },
                if epi.gelu { " act=gelu" } else { "" },
                if *residual { " residual" } else { "" }
            );
            matmul::matmul(st, name, &what, &[], rows, o, k, &opx, &opw, epi)
        }
        Op::Attention { scale, sink } => {
            let at = dims::attention(x, *sink, out)?;
            let spec = attention::Spec {
                q_lead: at.q_lead,
                k_lead: at.k_lead,
                v_lead: at.v_lead,
                lead: at.lead,
                n: at.n,
                m: at.m,
                d: at.d,
                e: at.e,
                scale: *scale,
                z: at.z,
            };
            attention::attention(st, name, &spec)
        }
    })
}

/// The op kinds (`Op::kind`) this backend generates kernels for, primitives and fused.
pub fn supported_kinds() -> Vec<&'static str> {
    // Every op of the IR but the fused attention backward (run as its decomposition):
    // leaves and reshape need no kernel, the rest one each.
    Op::all_kinds()
        .into_iter()
        .filter(|k| !["attention_lse", "attention_grad"].contains(k))
        .collect()
}
