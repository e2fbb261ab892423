//! One thread per output element: unary and binary ops, and the data movement ops (a
//! strided gather for permute, broadcast and patchify; slice; concat). Blocks of
//! [`WG`] threads on a 1-D grid.

use eptc_ir::{BinaryOp, UnaryOp};

use super::cuda::{blocks, entry, grid_1d, offsets, prologue_1d, Ix};
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
    let e = unary_expr(op, "v");
    kernel_1d(name, op.name(), &["x"], n, Ix::for_numel(n), &|_| {
        format!("    const float v = ld(x, idx);\n    st(out, idx, {e});\n")
    })
}

/// The C expression of `op` on `va`, `vb`.
fn binary_expr(op: BinaryOp) -> String {
    binary_expr_of(op, "va", "vb")
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
    let n: usize = out.iter().product();
    let e = binary_expr(op);
    let ix = Ix::for_numel(n.max(na).max(nb));
    kernel_1d(name, op.name(), &["a", "b"], n, ix, &|ix| {
        let mut body = offsets(
            ix,
            "o",
            "idx",
            out,
            &[sa.to_vec(), sb.to_vec()],
            &["oa", "ob"],
            "    ",
        );
        body += &format!(
            "    const float va = ld(a, oa);\n    const float vb = ld(b, ob);\n    st(out, idx, {e});\n"
        );
        body
    })
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
    let n: usize = shape.iter().product();
    let ix = Ix::for_numel(n.max(nx));
    kernel_1d(name, what, &["x"], n, ix, &|ix| {
        let mut body = offsets(ix, "o", "idx", shape, &[strides.to_vec()], &["ox"], "    ");
        body += "    st(out, idx, ld(x, ox));\n";
        body
    })
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
    let total = outer * len * inner;
    let ix = Ix::for_numel(outer * n * inner);
    kernel_1d(name, "slice", &["x"], total, ix, &|ix| {
        let t = ix.ty();
        format!(
            "    const {t} i = idx % {inner};\n    const {t} r = idx / {inner};\n    const {t} a = r % {len};\n    const {t} o = r / {len};\n    st(out, idx, ld(x, (o * {n} + a + {start}) * {inner} + i));\n",
            inner = ix.lit(inner),
            len = ix.lit(len),
            n = ix.lit(n),
            start = ix.lit(start),
        )
    })
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
