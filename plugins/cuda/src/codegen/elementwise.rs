//! Unary and binary ops, and the data movement ops (a strided gather for permute,
//! broadcast and patchify; slice; concat). Blocks of [`WG`] threads on a 1-D grid.
//!
//! Memory-bound, so the access width matters: where the output's innermost run (after
//! merging dims) is a multiple of [`VEC`] and every operand either steps by one along it
//! or is constant along it, a thread takes [`VEC`] consecutive outputs, with one index
//! computation and 16-byte loads and stores ([`map_kernel`]). Else (concat, a permute
//! that moves the last axis, rows of odd length) one thread per output element.

use eptc_ir::{BinaryOp, UnaryOp};

use super::cuda::{aligned_16, blocks, entry, grid_1d, merge_dims, offsets, prologue_1d, Ix};
use super::Kernel;

pub const WG: usize = 256;

/// A 1-D kernel over `n` output elements whose body (given `idx`) ends by writing
/// `out[idx]`. `max_numel`: the largest tensor it touches (for the index type).
fn kernel_1d(
    name: &str,
    what: &str,
    inputs: &[&str],
    n: usize,
    ix: Ix,
    body: &dyn Fn(Ix) -> String,
) -> Result<Kernel, String> {
    let grid = grid_1d(blocks(n, WG))?;
    let mut src = format!("// {name}: {what}, one thread per output element ({n}).\n");
    src += &entry(name, inputs, "out");
    src += &prologue_1d(ix, n, WG);
    src += &body(ix);
    src += "}\n";
    Ok(Kernel {
        name: name.to_string(),
        source: src,
        inputs: inputs.len(),
        grid,
        block: [WG as u32, 1, 1],
        shared_bytes: 0,
    })
}

/// The C expression of `op` applied to `x` (an f32 expression without side effects).
pub fn unary_expr(op: UnaryOp, x: &str) -> String {
    match op {
        UnaryOp::Neg => format!("-{x}"),
        UnaryOp::Exp => format!("expf({x})"),
        UnaryOp::Log => format!("logf({x})"),
        UnaryOp::Sqrt => format!("sqrtf({x})"),
        UnaryOp::Rsqrt => format!("1.0f / sqrtf({x})"),
        UnaryOp::Recip => format!("1.0f / {x}"),
        UnaryOp::Abs => format!("fabsf({x})"),
        UnaryOp::Tanh => format!("tanhf({x})"),
        UnaryOp::Sigmoid => format!("sigmoid_f({x})"),
        // `x < 0` is false for NaN: NaN passes.
        UnaryOp::Relu => format!("relu_f({x})"),
        UnaryOp::Gelu => format!("gelu_f({x})"),
        UnaryOp::Sign => format!("sign_f({x})"),
        UnaryOp::GeluDeriv => format!("gelu_deriv_f({x})"),
    }
}

/// `out = op(x)` over `n` elements.
pub fn unary(name: &str, op: UnaryOp, n: usize) -> Result<Kernel, String> {
    let e = |v: &[String]| (String::new(), unary_expr(op, &v[0]));
    map_kernel(
        name,
        op.name(),
        &["x"],
        &[Read::new("x", vec![1])],
        &[n],
        n,
        &e,
    )
}

/// The C expression of `op` on `a` and `b` (identifiers or parenthesised f32
/// expressions). Maximum and minimum ignore a NaN on one side (as f32::max and f32::min
/// do): `fmaxf`, `fminf`.
pub fn binary_expr_of(op: BinaryOp, a: &str, b: &str) -> String {
    match op {
        BinaryOp::Add => format!("{a} + {b}"),
        BinaryOp::Sub => format!("{a} - {b}"),
        BinaryOp::Mul => format!("{a} * {b}"),
        BinaryOp::Div => format!("{a} / {b}"),
        BinaryOp::Maximum => format!("fmaxf({a}, {b})"),
        BinaryOp::Minimum => format!("fminf({a}, {b})"),
        BinaryOp::Equal => format!("({a} == {b} ? 1.0f : 0.0f)"),
    }
}

/// `out = op(a, b)` with `a` and `b` read through broadcast strides `sa`, `sb` over the
/// output shape `out` (`na`, `nb`: the operands' element counts).
pub fn binary(
    name: &str,
    op: BinaryOp,
    out: &[usize],
    sa: &[usize],
    sb: &[usize],
    na: usize,
    nb: usize,
) -> Result<Kernel, String> {
    let reads = [Read::new("a", sa.to_vec()), Read::new("b", sb.to_vec())];
    let e = |v: &[String]| (String::new(), binary_expr_of(op, &v[0], &v[1]));
    map_kernel(name, op.name(), &["a", "b"], &reads, out, na.max(nb), &e)
}

/// `out[i] = x[sum_d i_d * strides[d]]` over the row-major index space `shape`
/// (permute, broadcast, patchify); `nx` is x's element count.
pub fn gather(
    name: &str,
    what: &str,
    shape: &[usize],
    strides: &[usize],
    nx: usize,
) -> Result<Kernel, String> {
    let reads = [Read::new("x", strides.to_vec())];
    let e = |v: &[String]| (String::new(), v[0].clone());
    map_kernel(name, what, &["x"], &reads, shape, nx, &e)
}

/// Elements `start..start + len` along an axis: `x` seen as `[outer, n, inner]`, the
/// output as `[outer, len, inner]`.
pub fn slice(
    name: &str,
    outer: usize,
    n: usize,
    inner: usize,
    start: usize,
    len: usize,
) -> Result<Kernel, String> {
    let read = Read {
        param: "x".into(),
        strides: vec![n * inner, inner, 1],
        base: start * inner,
    };
    let e = |v: &[String]| (String::new(), v[0].clone());
    map_kernel(
        name,
        "slice",
        &["x"],
        &[read],
        &[outer, len, inner],
        outer * n * inner,
        &e,
    )
}

/// The parts (sizes `sizes` along the axis) joined along an axis: each part seen as
/// `[outer, sizes[p], inner]`.
pub fn concat(name: &str, outer: usize, sizes: &[usize], inner: usize) -> Result<Kernel, String> {
    let total_axis: usize = sizes.iter().sum();
    let total = outer * total_axis * inner;
    let names: Vec<String> = (0..sizes.len()).map(|p| format!("p{p}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let ix = Ix::for_numel(total);
    kernel_1d(name, "concat", &refs, total, ix, &|ix| {
        let t = ix.ty();
        let mut body = format!(
            "    const {t} i = idx % {inner};\n    const {t} r = idx / {inner};\n    const {t} a = r % {ta};\n    const {t} o = r / {ta};\n",
            inner = ix.lit(inner),
            ta = ix.lit(total_axis),
        );
        // A branch per non-empty part (an empty one is never read); the last non-empty
        // part takes what is left.
        let parts: Vec<(usize, usize, usize)> = {
            let mut start = 0;
            let mut v = Vec::new();
            for (p, &sz) in sizes.iter().enumerate() {
                if sz > 0 {
                    v.push((p, start, sz));
                }
                start += sz;
            }
            v
        };
        for (k, &(p, start, sz)) in parts.iter().enumerate() {
            let read = format!(
                "st(out, idx, ld(p{p}, (o * {} + (a - {})) * {} + i));",
                ix.lit(sz),
                ix.lit(start),
                ix.lit(inner)
            );
            let last = k + 1 == parts.len();
            let cond = format!("a < {}", ix.lit(start + sz));
            body += &match (k == 0, last) {
                (true, true) => format!("    {read}\n"),
                (true, false) => format!("    if ({cond}) {{\n        {read}\n    }}"),
                (false, false) => format!(" else if ({cond}) {{\n        {read}\n    }}"),
                (false, true) => format!(" else {{\n        {read}\n    }}\n"),
            };
        }
        body
    })
}

/// The elements one thread of a vectorized element-wise kernel takes: 16 bytes of a
/// 16-bit storage type (one `uint4`), 32 of f32 (two `float4`s).
pub const VEC: usize = 8;

/// One operand an element-wise kernel reads: the parameter `param`, element `i` of the
/// output (row-major multi-index over the output's shape) at `base + sum_d i_d *
/// strides[d]`.
#[derive(Clone, Debug)]
pub struct Read {
    pub param: String,
    pub strides: Vec<usize>,
    pub base: usize,
}

impl Read {
    pub fn new(param: &str, strides: Vec<usize>) -> Read {
        Read {
            param: param.to_string(),
            strides,
            base: 0,
        }
    }
}

/// Whether `VEC` consecutive outputs can share one index computation: after merging
/// dims, the innermost is a multiple of [`VEC`] (a thread's elements lie in one row) and
/// every read either steps by 1 along it (then its base and every other stride are
/// multiples of [`VEC`], so its first element is 16-byte aligned where the buffer is)
/// or is constant along it. Per read: `Some(true)` for a vector read, `Some(false)` for
/// one value for all eight.
fn vector_reads(out: &[usize], reads: &[Read]) -> Option<Vec<bool>> {
    let strides: Vec<Vec<usize>> = reads.iter().map(|r| r.strides.clone()).collect();
    let (dims, st) = merge_dims(out, &strides);
    let last = *dims.last()?;
    if !last.is_multiple_of(VEC) {
        return None;
    }
    let k = dims.len() - 1;
    reads
        .iter()
        .zip(&st)
        .map(|(r, s)| match s[k] {
            0 => Some(false),
            1 if r.base.is_multiple_of(VEC) && s[..k].iter().all(|x| x.is_multiple_of(VEC)) => {
                Some(true)
            }
            _ => None,
        })
        .collect()
}

/// A kernel computing `out[i] = f(reads at i)` over the output shape `out` (written
/// contiguously): `eval(values)` gives the statements and the f32 expression of `f`
/// from each read's value (`v0`, `v1`, ...). `params`: the entry's inputs (a read may
/// also name `out`, for an update in place). `max_numel`: the largest tensor touched.
///
/// Where [`vector_reads`] allows, each thread takes [`VEC`] consecutive outputs: one
/// index computation, 16-byte loads and stores (`ld8`, `st8`) when every pointer it
/// vectorizes is 16-byte aligned (a uniform branch; element by element otherwise). Else
/// one thread per element.
#[allow(clippy::too_many_arguments)]
pub fn map_kernel(
    name: &str,
    what: &str,
    params: &[&str],
    reads: &[Read],
    out: &[usize],
    max_numel: usize,
    eval: &dyn Fn(&[String]) -> (String, String),
) -> Result<Kernel, String> {
    let n: usize = out.iter().product();
    let ix = Ix::for_numel(n.max(max_numel));
    let t = ix.ty();
    let values: Vec<String> = (0..reads.len()).map(|j| format!("v{j}")).collect();
    let (stmts, result) = eval(&values);
    let strides: Vec<Vec<usize>> = reads.iter().map(|r| r.strides.clone()).collect();
    let offs: Vec<String> = (0..reads.len()).map(|j| format!("o{j}")).collect();
    let off_refs: Vec<&str> = offs.iter().map(String::as_str).collect();
    let at = |j: usize| {
        let b = reads[j].base;
        if b == 0 {
            offs[j].clone()
        } else {
            format!("{} + {}", offs[j], ix.lit(b))
        }
    };
    let vector = vector_reads(out, reads);
    let per = if vector.is_some() { VEC } else { 1 };
    let threads = n / per;
    let grid = grid_1d(blocks(threads, WG))?;
    let mut src = if per == 1 {
        format!("// {name}: {what}, one thread per output element ({n}).\n")
    } else {
        format!(
            "// {name}: {what}, {VEC} consecutive output elements per thread ({n}), 16-byte accesses where aligned.\n"
        )
    };
    src += &entry(name, params, "out");
    match &vector {
        None => {
            src += &prologue_1d(ix, n, WG);
            src += &offsets(ix, "p", "idx", out, &strides, &off_refs, "    ");
            for (j, r) in reads.iter().enumerate() {
                src += &format!("    const float v{j} = ld({}, {});\n", r.param, at(j));
            }
            src += &stmts;
            src += &format!("    st(out, idx, {result});\n");
        }
        Some(vec) => {
            src += &format!(
                "    const unsigned long long gi = (unsigned long long)blockIdx.x * {WG}ull + threadIdx.x;\n    if (gi >= {threads}ull) return;\n    const {t} idx = ({t})gi * {};\n",
                ix.lit(VEC)
            );
            src += &offsets(ix, "p", "idx", out, &strides, &off_refs, "    ");
            let mut ptrs = vec!["out".to_string()];
            for (r, &v) in reads.iter().zip(vec) {
                if v && !ptrs.contains(&r.param) {
                    ptrs.push(r.param.clone());
                }
            }
            let refs: Vec<&str> = ptrs.iter().map(String::as_str).collect();
            src += &aligned_16(&refs);
            for (j, (r, &v)) in reads.iter().zip(vec).enumerate() {
                let p = &r.param;
                let o = at(j);
                if v {
                    src += &format!(
                        "    float in{j}[{VEC}];\n    if (al) {{\n        ld8({p}, {o}, in{j});\n    }} else {{\n        for (int j = 0; j < {VEC}; ++j) in{j}[j] = ld({p}, {o} + j);\n    }}\n"
                    );
                } else {
                    src += &format!("    const float in{j} = ld({p}, {o});\n");
                }
            }
            src += &format!(
                "    float y[{VEC}];\n#pragma unroll\n    for (int j = 0; j < {VEC}; ++j) {{\n"
            );
            for (j, &v) in vec.iter().enumerate() {
                if v {
                    src += &format!("        const float v{j} = in{j}[j];\n");
                } else {
                    src += &format!("        const float v{j} = in{j};\n");
                }
            }
            for line in stmts.lines() {
                src += &format!("    {line}\n");
            }
            src += &format!("        y[j] = {result};\n    }}\n");
            src += &format!(
                "    if (al) {{\n        st8(out, idx, y);\n    }} else {{\n        for (int j = 0; j < {VEC}; ++j) st(out, idx + j, y[j]);\n    }}\n"
            );
        }
    }
    src += "}\n";
    Ok(Kernel {
        name: name.to_string(),
        source: src,
        inputs: params.len(),
        grid,
        block: [WG as u32, 1, 1],
        shared_bytes: 0,
    })
}
