//! CUDA C kernels from typed templates: every node becomes (at most) one kernel whose
//! shapes, strides and attributes are baked in as constants for the node's concrete
//! shapes at a given batch size (the runtime regenerates the kernels per batch size).
//! The same op coverage and semantics as the wgpu backend's WGSL templates.
//!
//! The templates (Rust functions from shapes and attributes to CUDA C) live in the
//! submodules: `elementwise` (one thread per output element: unary, binary with numpy
//! broadcasting, permute / broadcast / patchify as a strided gather, slice, concat),
//! `rows` (one warp per row with shuffle reductions: reductions, softmax, softmax with a
//! sink, LayerNorm and its gradient; non-contiguous reductions 8 threads per output),
//! `matmul` (16x16 threads, tiles up to 64x64 staged in shared memory, up to 4x4 outputs
//! per thread; `linear` with its epilogue) and `attention` (one warp per query row, keys
//! and values staged in shared memory, online softmax with the optional sink logit;
//! `attention_mma` the same on the tensor cores for 16-bit storage); `attention_grad`
//! the flash-style backward (`attention_grad_mma` on the tensor cores); `cuda` holds the shared pieces (index arithmetic, the
//! prelude).
//!
//! # Conventions (what the runtime relies on)
//!
//! - Entry point: `extern "C" __global__ void <name>(const T* __restrict__ in0, ...,
//!   T* __restrict__ out)`: the operands in node order, then the output; nothing else
//!   (shapes, strides and attributes are compile-time constants). Operand and output
//!   buffers must not overlap.
//! - Launch with exactly [`Kernel::grid`], [`Kernel::block`] and
//!   [`Kernel::shared_bytes`] (always 0: the kernels use static shared memory only).
//!   Grid y and z are always 1.
//! - `T` is the storage type (`float` for f32, `unsigned short` holding the bits for bf16
//!   and f16); every kernel reads and writes through the prelude's `ld`/`st` and
//!   computes and accumulates in f32. With 16-bit storage the runtime keeps a few row
//!   statistics in f32 (`attention_lse`'s output, reductions that only kernels read):
//!   it declares those parameters `float*` ([`Kernel::widen`]) and the prelude's
//!   `ld`/`st` overloads take them, so no template knows. The prelude comes from [`module_source`], once per
//!   translation unit. The graph's own element types are not consulted: `dtype` decides.
//!   A kernel's source is the same for every storage type except those of `attention`,
//!   `attention_lse` and `attention_grad`, which for bf16 and f16 (the same source for
//!   both) are the tensor-core kernels where their shapes allow (`mma_t` and `pack_t` from the 16-bit
//!   prelude; sm_80 and newer).
//! - Every output element is written (no kernel relies on a zeroed output), and no
//!   kernel reads its output, except [`linear_epilogue`], which updates in place.
//! - No `#include`s: NVRTC needs no headers.

mod attention;
mod attention_grad;
mod attention_grad_mma;
mod attention_mma;
pub(crate) mod cuda;
mod elementwise;
pub mod fuse;
mod matmul;
mod rows;

use eptc_backend::dims;
use eptc_ir::{Activation, DType, Graph, NodeId, Op};
use thiserror::Error;

use cuda::contiguous_strides;

/// The output elements one thread of a vectorized element-wise kernel takes.
pub use elementwise::VEC;

/// One kernel for one node.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// Unique within a graph and a valid C identifier: `n<node>_<op kind>` (plus a suffix
    /// when a node needs several). It is also the name of the `extern "C" __global__`
    /// entry point in `source`.
    pub name: String,
    /// The kernel's CUDA C, without the shared prelude ([`module_source`] prepends it).
    pub source: String,
    /// Parameters of the entry point: operands `0..inputs` as `const T* __restrict__`,
    /// then the output as `T* __restrict__` (T the storage type; `float` for those
    /// [`Kernel::widen`] flags), nothing else.
    pub inputs: usize,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

impl Kernel {
    /// The source with the kernel's name masked: two kernels with the same masked
    /// source (and launch) compute the same thing, so one compiled function can serve
    /// both. The name appears in the source only in the header comment and the entry
    /// line.
    pub fn masked_source(&self) -> String {
        self.source.replace(&self.name, "@")
    }

    /// Declare the parameters flagged in `f32` (operands in order, then the output) as
    /// `float*` instead of `T*`: the runtime keeps those values in f32 with 16-bit
    /// storage, and the body, which reads and writes only through `ld`/`st`, takes
    /// either (the 16-bit prelude overloads them for `float*`). Nothing changes where no
    /// flag is set. `Err` where the entry line or its parameter count is not what
    /// `flags` expects.
    pub fn widen(&mut self, f32: &[bool]) -> Result<(), String> {
        if !f32.iter().any(|&w| w) {
            return Ok(());
        }
        let head = format!("extern \"C\" __global__ void {}(", self.name);
        let start = self
            .source
            .find(&head)
            .ok_or_else(|| format!("kernel {}: no entry line", self.name))?;
        let from = start + head.len();
        let len = self.source[from..]
            .find(") {")
            .ok_or_else(|| format!("kernel {}: the entry line does not close", self.name))?;
        let params: Vec<&str> = self.source[from..from + len].split(", ").collect();
        if params.len() != f32.len() {
            return Err(format!(
                "kernel {}: {} parameters, {} flags",
                self.name,
                params.len(),
                f32.len()
            ));
        }
        let mut out = Vec::with_capacity(params.len());
        for (p, &w) in params.iter().zip(f32) {
            if !w {
                out.push(p.to_string());
            } else if let Some(rest) = p.strip_prefix("const T* ") {
                out.push(format!("const float* {rest}"));
            } else if let Some(rest) = p.strip_prefix("T* ") {
                out.push(format!("float* {rest}"));
            } else {
                return Err(format!("kernel {}: parameter `{p}` is not a T*", self.name));
            }
        }
        self.source.replace_range(from..from + len, &out.join(", "));
        Ok(())
    }
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

/// The largest tensor (in elements) a kernel indexes: within the grid's reach for one
/// thread per element (blocks of 256, at most 2^31 - 1 of them).
pub const MAX_ELEMS: usize = 1 << 39;

/// The kernels of node `id` with the batch bound to `batch` and tensors stored as `dtype`,
/// in launch order. Empty for leaves, for ops that are views of their operand
/// (`reshape`: the runtime aliases the operand's buffer) and for empty outputs.
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
    // Every storage type has a prelude; the match keeps a new one from slipping by.
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => {}
    }
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
    for s in &shapes {
        check_size(s).map_err(&err)?;
    }
    let out = node.ty.shape.resolve(batch);
    check_size(&out).map_err(&err)?;
    if out.iter().product::<usize>() == 0 {
        return Ok(Vec::new());
    }
    let name = format!("n{}_{}", id.index(), node.op.kind());
    // Attention and its gradient in 16-bit storage run on the tensor cores where their
    // shapes allow.
    let tensor = match &node.op {
        Op::Attention { scale, sink } => {
            let spec = attention_spec(&shapes, *scale, *sink, &out).map_err(&err)?;
            attention_mma::eligible(&spec, dtype)
                .then(|| attention_mma::attention(&name, &spec, dtype))
        }
        Op::AttentionGrad { scale, wrt } => {
            let spec = attention_grad_spec(&shapes, *scale, *wrt, &out).map_err(&err)?;
            attention_grad_mma::eligible(&spec, dtype)
                .then(|| attention_grad_mma::grad(&name, &spec, *wrt, dtype))
        }
        Op::AttentionLse { scale, sink } => {
            let l = attention_lse_spec(&shapes, *scale, *sink, &out).map_err(&err)?;
            let spec = lse_as_attention(l);
            attention_mma::eligible_lse(&spec, dtype)
                .then(|| attention_mma::lse(&name, &spec, dtype))
        }
        _ => None,
    };
    if let Some(k) = tensor {
        let mut k = k.map_err(err)?;
        k.source = format!(
            "{}{}",
            bound_comment_tensor(&node.op, &shapes, &out),
            k.source
        );
        return Ok(vec![k]);
    }
    let mut k = generate(&name, &node.op, &shapes, &out).map_err(err)?;
    k.source = format!("{}{}", bound_comment(&node.op, &shapes, &out), k.source);
    Ok(vec![k])
}

/// Where the tensor-core attention reads one of q, k, v: the element offset of its first
/// row in the buffer, the strides between matrices along the output's leading axes, and
/// between rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperandView {
    pub offset: usize,
    pub lead_strides: Vec<usize>,
    pub row: usize,
}

/// The tensor-core kernel of node `id` (`attention`, `attention_lse` or
/// `attention_grad`; 16-bit `dtype`) reading q, k (and v: not for `attention_lse`)
/// through `views` (their buffers hold `buffer_numel` elements at most); `Ok(None)` where
/// the node's shapes or `dtype` do not take that kernel. With `out` (`attention` only)
/// the output rows are written where it says instead of contiguously.
pub fn attention_mma_views(
    g: &Graph,
    id: NodeId,
    batch: usize,
    dtype: DType,
    views: &[OperandView],
    buffer_numel: usize,
    out_view: Option<&OperandView>,
) -> Result<Option<Kernel>, CodegenError> {
    let node = g.node(id);
    let err = |msg: String| CodegenError::Unsupported {
        node: id.index(),
        op: node.op.kind().to_string(),
        msg,
    };
    let shapes: Vec<Vec<usize>> = g
        .operands(id)
        .iter()
        .map(|&o| g.ty(o).shape.resolve(batch))
        .collect();
    let out = node.ty.shape.resolve(batch);
    if out.iter().product::<usize>() == 0 {
        return Ok(None);
    }
    if out_view.is_some() && !matches!(node.op, Op::Attention { .. }) {
        return Err(err("an output view for an op other than attention".into()));
    }
    let want = if matches!(node.op, Op::AttentionLse { .. }) {
        2
    } else {
        3
    };
    if views.len() != want {
        return Err(err(format!("{} views, the op reads {want}", views.len())));
    }
    let rows = attention_mma::Rows {
        offset: [0, 1, 2].map(|i| views.get(i).map_or(0, |v| v.offset)),
        row: [0, 1, 2].map(|i| views.get(i).map_or(0, |v| v.row)),
    };
    let name = format!("n{}_{}", id.index(), node.op.kind());
    let lead_len = out.len() - 2;
    for v in views {
        if v.lead_strides.len() != lead_len {
            return Err(err(format!(
                "a view with {} lead strides for {lead_len} leading axes",
                v.lead_strides.len()
            )));
        }
    }
    let lead = |i: usize| views[i].lead_strides.clone();
    let k = match &node.op {
        Op::Attention { scale, sink } => {
            let mut spec = attention_spec(&shapes, *scale, *sink, &out).map_err(&err)?;
            if !attention_mma::eligible(&spec, dtype) {
                return Ok(None);
            }
            (spec.q_lead, spec.k_lead, spec.v_lead) = (lead(0), lead(1), lead(2));
            spec.max_numel = spec.max_numel.max(buffer_numel);
            attention_mma::attention_rows(&name, &spec, dtype, &rows, out_view)
        }
        Op::AttentionLse { scale, sink } => {
            let l = attention_lse_spec(&shapes, *scale, *sink, &out).map_err(&err)?;
            let mut spec = lse_as_attention(l);
            if !attention_mma::eligible_lse(&spec, dtype) {
                return Ok(None);
            }
            (spec.q_lead, spec.k_lead) = (lead(0), lead(1));
            spec.max_numel = spec.max_numel.max(buffer_numel);
            attention_mma::lse_rows(&name, &spec, dtype, &rows)
        }
        Op::AttentionGrad { scale, wrt } => {
            let mut spec = attention_grad_spec(&shapes, *scale, *wrt, &out).map_err(&err)?;
            if !attention_grad_mma::eligible(&spec, dtype) {
                return Ok(None);
            }
            for i in 0..3 {
                spec.leads[i] = lead(i);
            }
            spec.max_numel = spec.max_numel.max(buffer_numel);
            attention_grad_mma::grad_rows(&name, &spec, *wrt, dtype, &rows)
        }
        _ => return Err(err("not an attention op".into())),
    };
    let mut k = k.map_err(err)?;
    k.source = format!(
        "{}{}",
        bound_comment_tensor(&node.op, &shapes, &out),
        k.source
    );
    Ok(Some(k))
}

/// `attention_lse`'s shapes as the attention kernel's (no values).
fn lse_as_attention(l: attention_grad::Spec) -> attention::Spec {
    attention::Spec {
        q_lead: l.leads[0].clone(),
        k_lead: l.leads[1].clone(),
        v_lead: vec![0; l.lead.len()],
        z: l.leads.get(2).map(|z| {
            let mut z = z.clone();
            z.push(l.z_row);
            z
        }),
        lead: l.lead,
        n: l.n,
        m: l.m,
        d: l.d,
        e: 0,
        scale: l.scale,
        max_numel: l.max_numel,
    }
}

/// [`bound_comment`] for a kernel on the tensor cores (bf16/f16 operands, f32
/// accumulation): the compute floor at the H100's dense rate.
fn bound_comment_tensor(op: &Op, x: &[Vec<usize>], out: &[usize]) -> String {
    let (elems, flops) = work(op, x, out);
    let m16 = elems * 2.0 / H100_BYTES_PER_S * 1e6;
    let compute_us = flops / H100_TENSOR_FLOPS * 1e6;
    let bound = if compute_us > m16 {
        "compute"
    } else {
        "memory"
    };
    format!(
        "// bound: {bound}. Moves {elems:.0} elements ({:.3} MB in bf16/f16): >= {m16:.2} us at \
         3.0 TB/s (H100 copy rate); {:.4} GFLOP: >= {compute_us:.2} us at 989 TFLOP/s dense \
         bf16/f16 tensor cores (H100 SXM).\n",
        elems * 2e-6,
        flops * 1e-9
    )
}

/// H100 SXM figures the kernels' comments are stated against: the device-to-device copy
/// rate measured on such a machine (3.0 TB/s, read + write) and the FP32 FMA rate of its
/// datasheet (67 TFLOP/s; these kernels use no tensor cores).
const H100_BYTES_PER_S: f64 = 3.0e12;
const H100_FP32_FLOPS: f64 = 67e12;
/// The H100 SXM's dense bf16/f16 tensor-core rate (datasheet).
const H100_TENSOR_FLOPS: f64 = 989e12;

/// The kernel's bound, stated as a comment: the fewest bytes it must move (every operand
/// read once, the output written once) and the floating-point operations it must do,
/// each over the H100's rate; the larger time is the floor no version beats by much.
fn bound_comment(op: &Op, x: &[Vec<usize>], out: &[usize]) -> String {
    let (elems, flops) = work(op, x, out);
    bound_line(elems, flops)
}

/// The elements a node's kernel must move (operands read once, the output written once)
/// and the floating-point operations it must do.
fn work(op: &Op, x: &[Vec<usize>], out: &[usize]) -> (f64, f64) {
    let numel = |s: &[usize]| s.iter().product::<usize>() as f64;
    let elems = x.iter().map(|s| numel(s)).sum::<f64>() + numel(out);
    let flops = match op {
        Op::MatMul {
            transpose_a,
            transpose_b: _,
        } => {
            let a = &x[0];
            let k = if *transpose_a {
                a[a.len() - 2]
            } else {
                a[a.len() - 1]
            };
            2.0 * numel(out) * k as f64
        }
        Op::Linear { .. } => 2.0 * numel(out) * *x[0].last().unwrap_or(&0) as f64,
        Op::Attention { .. } => {
            // Scores (d per score) and the weighted sum (e per score).
            let (q, k, v) = (&x[0], &x[1], &x[2]);
            let (d, m, e) = (q[q.len() - 1], k[k.len() - 2], v[v.len() - 1]);
            let scores = numel(out) / e.max(1) as f64 * m as f64;
            2.0 * scores * (d + e) as f64
        }
        Op::AttentionLse { .. } => {
            // A score per (row, key): d multiply-adds, then an exp.
            let (q, k) = (&x[0], &x[1]);
            let (d, m) = (q[q.len() - 1], k[k.len() - 2]);
            numel(out) * m as f64 * (2.0 * d as f64 + 2.0)
        }
        Op::AttentionGrad { wrt, .. } => {
            // Per (query, key) pair: the score (d), for q and k also dO . v (e), and the
            // accumulation into the output row (its width).
            let (q, k, v) = (&x[0], &x[1], &x[2]);
            let (n, d) = (q[q.len() - 2], q[q.len() - 1]);
            let (m, e) = (k[k.len() - 2], v[v.len() - 1]);
            let (r, w) = (out[out.len() - 2], out[out.len() - 1]);
            let entries = numel(out) / (r * w).max(1) as f64;
            let per_pair = match wrt {
                eptc_ir::AttnWrt::V => 2 * d + 2 * e,
                _ => 2 * d + 2 * e + 2 * d,
            };
            entries * (n * m * per_pair) as f64
        }
        // A handful of operations per element: far below the ridge point.
        _ => 4.0 * elems,
    };
    (elems, flops)
}

/// The bound comment for a kernel that moves `elems` elements (read once or written
/// once) and does `flops` floating-point operations.
pub(crate) fn bound_line(elems: f64, flops: f64) -> String {
    let us = |bytes_per_elem: f64| elems * bytes_per_elem / H100_BYTES_PER_S * 1e6;
    let compute_us = flops / H100_FP32_FLOPS * 1e6;
    let (m32, m16) = (us(4.0), us(2.0));
    let bound = if compute_us > m16 {
        "compute"
    } else {
        "memory"
    };
    format!(
        "// bound: {bound}. Moves {elems:.0} elements ({:.3} MB in f32, {:.3} MB in bf16/f16): \
         >= {m32:.2} / {m16:.2} us at 3.0 TB/s (H100 copy rate); {:.4} GFLOP: >= {compute_us:.2} \
         us at 67 TFLOP/s FP32 FMA (H100).\n",
        elems * 4e-6,
        elems * 2e-6,
        flops * 1e-9
    )
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
/// `out` (non-empty).
fn generate(name: &str, op: &Op, x: &[Vec<usize>], out: &[usize]) -> Result<Kernel, String> {
    let rank_at_least = |s: &[usize], r: usize, what: &str| {
        if s.len() < r {
            Err(format!("{what} has rank {}, needs at least {r}", s.len()))
        } else {
            Ok(())
        }
    };
    let bstrides = dims::broadcast;
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let same_numel = |what: &str, shape: &[usize]| {
        if numel(shape) == numel(out) {
            Ok(())
        } else {
            Err(format!(
                "{what} {shape:?} does not have the output's {} elements ({out:?})",
                numel(out)
            ))
        }
    };
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Reshape { .. } => {
            Err("no kernel for a leaf or a view".into())
        }
        Op::Unary(u) => {
            same_numel("the operand", &x[0])?;
            elementwise::unary(name, *u, numel(out))
        }
        Op::Binary(b) => {
            let sa = bstrides(&x[0], out)?;
            let sb = bstrides(&x[1], out)?;
            elementwise::binary(name, *b, out, &sa, &sb, numel(&x[0]), numel(&x[1]))
        }
        Op::Broadcast { .. } => {
            elementwise::gather(name, "broadcast", out, &bstrides(&x[0], out)?, numel(&x[0]))
        }
        Op::Permute { perm } => {
            let own = contiguous_strides(&x[0]);
            let mut seen = vec![false; own.len()];
            let valid = perm.len() == x[0].len()
                && perm
                    .iter()
                    .all(|&p| p < own.len() && !std::mem::replace(&mut seen[p], true));
            if !valid {
                return Err(format!("permutation {perm:?} for shape {:?}", x[0]));
            }
            let shape: Vec<usize> = perm.iter().map(|&p| x[0][p]).collect();
            if shape != out {
                return Err(format!(
                    "permuted shape {shape:?} is not the output's {out:?}"
                ));
            }
            let strides: Vec<usize> = perm.iter().map(|&p| own[p]).collect();
            elementwise::gather(name, "permute", &shape, &strides, numel(&x[0]))
        }
        Op::Patchify { patch } => {
            let p = *patch;
            let &[b, c, h, w] = x[0].as_slice() else {
                return Err(format!("patchify wants rank 4, got {:?}", x[0]));
            };
            if p == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
                return Err(format!("patch {p} does not tile {h}x{w}"));
            }
            same_numel("the image", &x[0])?;
            let (gh, gw) = (h / p, w / p);
            let shape = [b, gh, gw, c, p, p];
            let strides = [c * h * w, p * w, p, h * w, w, 1];
            elementwise::gather(name, "patchify", &shape, &strides, numel(&x[0]))
        }
        Op::Slice { axis, start, end } => {
            let s = &x[0];
            if *axis >= s.len() || start >= end || *end > s[*axis] {
                return Err(format!("slice {start}..{end} along {axis} of {s:?}"));
            }
            let outer = numel(&s[..*axis]);
            let inner = numel(&s[axis + 1..]);
            if outer * (end - start) * inner != numel(out) {
                return Err(format!("slice of {s:?} does not give {out:?}"));
            }
            elementwise::slice(name, outer, s[*axis], inner, *start, end - start)
        }
        Op::Concat { axis } => {
            let a = *axis;
            if a >= out.len() || x.iter().any(|s| s.len() != out.len()) {
                return Err(format!("concat along {a} of {x:?}"));
            }
            let fits = x.iter().all(|s| {
                s.iter()
                    .zip(out)
                    .enumerate()
                    .all(|(d, (&n, &o))| d == a || n == o)
            });
            let sizes: Vec<usize> = x.iter().map(|s| s[a]).collect();
            if !fits || sizes.iter().sum::<usize>() != out[a] {
                return Err(format!("concat along {a} of {x:?} does not give {out:?}"));
            }
            elementwise::concat(name, numel(&out[..a]), &sizes, numel(&out[a + 1..]))
        }
        Op::AttentionLse { scale, sink } => {
            attention_grad::lse(name, &attention_lse_spec(x, *scale, *sink, out)?)
        }
        Op::AttentionGrad { scale, wrt } => {
            attention_grad::grad(name, &attention_grad_spec(x, *scale, *wrt, out)?, *wrt)
        }
        Op::Reduce { op, axes, .. } => {
            if axes.iter().any(|&a| a >= x[0].len()) {
                return Err(format!("axes {axes:?} out of range for {:?}", x[0]));
            }
            let kept: usize = x[0]
                .iter()
                .enumerate()
                .filter(|(d, _)| !axes.contains(d))
                .map(|(_, &n)| n)
                .product();
            if kept != numel(out) {
                return Err(format!(
                    "reducing {:?} over {axes:?} does not give {out:?}",
                    x[0]
                ));
            }
            rows::reduce(name, *op, &x[0], axes)
        }
        Op::Softmax { axis } => {
            let s = &x[0];
            if *axis >= s.len() {
                return Err(format!("axis {axis} out of range for {s:?}"));
            }
            same_numel("the operand", s)?;
            rows::softmax(name, numel(&s[..*axis]), s[*axis], numel(&s[axis + 1..]))
        }
        Op::SoftmaxSink => {
            let s = &x[0];
            rank_at_least(s, 1, "s")?;
            same_numel("s", s)?;
            let row_shape = &s[..s.len() - 1];
            let mut rows1 = row_shape.to_vec();
            rows1.push(1);
            let zs = bstrides(&x[1], &rows1)?;
            rows::softmax_sink(
                name,
                row_shape,
                s[s.len() - 1],
                &zs[..zs.len() - 1],
                numel(&x[1]),
            )
        }
        Op::LayerNorm { eps } | Op::LayerNormGrad { eps } => {
            rank_at_least(&x[0], 1, "x")?;
            same_numel("x", &x[0])?;
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
                rows::layernorm(name, rows, d, *eps)
            } else {
                rows::layernorm_grad(name, rows, d, *eps)
            }
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let (a, b) = (&x[0], &x[1]);
            let mm = dims::matmul(a, b, *transpose_a, *transpose_b, out)?;
            let (lead, m, n, ka) = (&mm.lead[..], mm.m, mm.n, mm.k);
            let opa = matmul::Operand {
                rs: mm.a.rs,
                cs: mm.a.cs,
                lead_strides: mm.a.lead_strides,
                numel: numel(a),
            };
            let opb = matmul::Operand {
                rs: mm.b.rs,
                cs: mm.b.cs,
                lead_strides: mm.b.lead_strides,
                numel: numel(b),
            };
            let what = format!(
                "matmul{}{}",
                if *transpose_a { " transpose_a" } else { "" },
                if *transpose_b { " transpose_b" } else { "" }
            );
            matmul::matmul(
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
            let (xs, w) = (&x[0], &x[1]);
            let dims::Linear { rows, o, k } = dims::linear(x, *bias, *residual, out)?;
            let opx = matmul::Operand {
                rs: k,
                cs: 1,
                lead_strides: vec![],
                numel: numel(xs),
            };
            let opw = matmul::Operand {
                rs: 1,
                cs: k,
                lead_strides: vec![],
                numel: numel(w),
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
            matmul::matmul(name, &what, &[], rows, o, k, &opx, &opw, epi)
        }
        Op::Attention { scale, sink } => {
            attention::attention(name, &attention_spec(x, *scale, *sink, out)?)
        }
    }
}

/// The shapes and strides of an `attention_lse` node.
fn attention_lse_spec(
    x: &[Vec<usize>],
    scale: f32,
    sink: bool,
    out: &[usize],
) -> Result<attention_grad::Spec, String> {
    let bstrides = dims::broadcast;
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let (q, k) = (&x[0], &x[1]);
    if q.len() < 2 || k.len() < 2 || out.len() < 2 {
        return Err(format!("q {q:?}, k {k:?} and {out:?} need rank >= 2"));
    }
    let (n, d, m) = (q[q.len() - 2], q[q.len() - 1], k[k.len() - 2]);
    let lead = out[..out.len() - 2].to_vec();
    if k[k.len() - 1] != d || out[out.len() - 2..] != [n, 1] {
        return Err(format!("q {q:?}, k {k:?} do not give {out:?}"));
    }
    let ls = |s: &[usize], mat: usize| -> Result<Vec<usize>, String> {
        Ok(bstrides(&s[..s.len() - 2], &lead)?
            .iter()
            .map(|v| v * mat)
            .collect())
    };
    let mut leads = vec![ls(q, n * d)?, ls(k, m * d)?];
    let mut z_row = 0;
    if sink {
        let st = bstrides(&x[2], out)?;
        z_row = st[lead.len()];
        leads.push(st[..lead.len()].to_vec());
    }
    let spec = attention_grad::Spec {
        lead,
        n,
        m,
        d,
        e: 0,
        scale,
        leads,
        z_row,
        max_numel: x.iter().map(|s| numel(s)).max().unwrap_or(0),
    };
    Ok(spec)
}

/// The shapes and strides of an `attention_grad` node.
fn attention_grad_spec(
    x: &[Vec<usize>],
    scale: f32,
    wrt: eptc_ir::AttnWrt,
    out: &[usize],
) -> Result<attention_grad::Spec, String> {
    let bstrides = dims::broadcast;
    let numel = |s: &[usize]| s.iter().product::<usize>();
    if x.iter().any(|s| s.len() < 2) || out.len() < 2 {
        return Err(format!("operands {x:?} need rank >= 2"));
    }
    let last2 = |s: &[usize]| (s[s.len() - 2], s[s.len() - 1]);
    let ((n, d), (m, dk), (mv, e)) = (last2(&x[0]), last2(&x[1]), last2(&x[2]));
    let fits = d == dk
        && m == mv
        && last2(&x[3]) == (n, 1)
        && last2(&x[4]) == (n, 1)
        && last2(&x[5]) == (n, e);
    let want = match wrt {
        eptc_ir::AttnWrt::Q => (n, d),
        eptc_ir::AttnWrt::K => (m, d),
        eptc_ir::AttnWrt::V => (m, e),
    };
    if !fits || last2(out) != want {
        return Err(format!("operands {x:?} do not give {out:?}"));
    }
    let lead = out[..out.len() - 2].to_vec();
    let mats = [n * d, m * d, m * e, n, n, n * e];
    let leads = x
        .iter()
        .zip(mats)
        .map(|(s, mat)| {
            Ok(bstrides(&s[..s.len() - 2], &lead)?
                .iter()
                .map(|v| v * mat)
                .collect())
        })
        .collect::<Result<Vec<Vec<usize>>, String>>()?;
    let spec = attention_grad::Spec {
        lead,
        n,
        m,
        d,
        e,
        scale,
        leads,
        z_row: 0,
        max_numel: x.iter().map(|s| numel(s)).max().unwrap_or(0),
    };
    Ok(spec)
}

/// The shapes and strides of an `attention` node.
fn attention_spec(
    x: &[Vec<usize>],
    scale: f32,
    sink: bool,
    out: &[usize],
) -> Result<attention::Spec, String> {
    let at = dims::attention(x, sink, out)?;
    Ok(attention::Spec {
        q_lead: at.q_lead,
        k_lead: at.k_lead,
        v_lead: at.v_lead,
        lead: at.lead,
        n: at.n,
        m: at.m,
        d: at.d,
        e: at.e,
        scale,
        z: at.z,
        max_numel: x.iter().map(|s| s.iter().product()).max().unwrap_or(0),
    })
}

/// The epilogue of a linear layer whose product `x w^T` is already in `out` (from
/// cuBLAS, say), applied in place: `out[r * cols + c] = gelu?(out[r * cols + c] +
/// bias[c]) (+ residual[r * cols + c])`, in that order (bias, then the exact GELU, then
/// the residual), as the fused `linear` kernel does. The entry point takes
/// `(const T* bias, const T* residual, T* out)` with only the present operands, in that
/// order (so `inputs` is `bias + residual`); `residual` must not overlap `out`. One
/// thread per element, blocks of 256. With a 16-bit storage type the product is read
/// back from `out` already rounded to it (the fused kernel keeps it in f32).
/// `rows * cols` must be non-zero and at most [`MAX_ELEMS`].
pub fn linear_epilogue(
    name: &str,
    rows: usize,
    cols: usize,
    bias: bool,
    gelu: bool,
    residual: bool,
    dtype: DType,
) -> Kernel {
    let _ = dtype; // The source is the same for every storage type (`T`, `ld`, `st`).
    let n = rows * cols;
    let mut params = Vec::new();
    let mut reads = vec![elementwise::Read::new("out", vec![cols, 1])];
    if bias {
        params.push("bias");
        reads.push(elementwise::Read::new("bias", vec![0, 1]));
    }
    if residual {
        params.push("res");
        reads.push(elementwise::Read::new("res", vec![cols, 1]));
    }
    let what = format!(
        "linear epilogue in place over [{rows} x {cols}]:{}{}{}",
        if bias { " + bias" } else { "" },
        if gelu { ", gelu" } else { "" },
        if residual { ", + residual" } else { "" }
    );
    let eval = |v: &[String]| {
        let mut e = v[0].clone();
        let mut next = 1;
        if bias {
            e = format!("{e} + {}", v[next]);
            next += 1;
        }
        if gelu {
            e = format!("gelu_f({e})");
        }
        if residual {
            e = format!("{e} + {}", v[next]);
        }
        (String::new(), e)
    };
    elementwise::map_kernel(name, &what, &params, &reads, &[rows, cols], n, &eval)
        .expect("rows * cols is at most MAX_ELEMS")
}

/// A complete translation unit: the prelude for `dtype` once, then each kernel's source
/// (a kernel whose name was already seen is left out: a name is one kernel).
pub fn module_source(kernels: &[&Kernel], dtype: DType) -> String {
    let mut src = cuda::prelude(dtype);
    let mut seen = std::collections::HashSet::new();
    for k in kernels {
        if seen.insert(k.name.as_str()) {
            src.push('\n');
            src += &k.source;
        }
    }
    src
}

/// The op kinds (`Op::kind`) this backend generates kernels for, primitives and fused.
pub fn supported_kinds() -> Vec<&'static str> {
    // Every op of the IR: leaves and reshape need no kernel, the rest one each.
    Op::all_kinds()
}

/// The storage types the kernels support.
pub fn supported_dtypes() -> Vec<DType> {
    vec![DType::F32, DType::BF16, DType::F16]
}
