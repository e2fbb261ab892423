//! One invocation per output element: unary and binary ops, and the data movement ops
//! (a strided gather for permute, broadcast and patchify; slice; concat). Every template
//! takes the bindings' [`Storage`]: elements are loaded as f32 and stored back.

use eptc_ir::{BinaryOp, UnaryOp};

use super::wgsl::{self, entry_1d, launch_1d, offsets, u, Func, Storage};
use super::Kernel;

const WG: usize = 256;

/// A 1-D kernel over `n` output elements whose body (given `idx`) ends by writing
/// `out[idx]`.
fn kernel_1d(
    st: Storage,
    name: &str,
    inputs: &[&str],
    funcs: &[Func],
    n: usize,
    body: &str,
) -> Kernel {
    let launch = launch_1d(n, WG);
    let mut src = st.preamble().to_string();
    src += &format!("// {name}: one invocation per output element ({n}).\n");
    src += &wgsl::bindings(st, inputs, "out");
    src += "\n";
    if !funcs.is_empty() {
        src += &wgsl::library(funcs);
        src += "\n";
    }
    src += &entry_1d(WG);
    src += &launch.prologue;
    src += body;
    src += "}\n";
    Kernel {
        name: name.to_string(),
        source: src,
        entry: "main".into(),
        inputs: inputs.len(),
        workgroups: launch.workgroups,
    }
}

/// The expression of `op` applied to `x` and the functions it needs.
pub fn unary_expr(op: UnaryOp, x: &str) -> (String, Vec<Func>) {
    let f = |s: String| (s, vec![]);
    match op {
        UnaryOp::Neg => f(format!("-{x}")),
        UnaryOp::Exp => f(format!("exp({x})")),
        UnaryOp::Log => f(format!("log({x})")),
        UnaryOp::Sqrt => f(format!("sqrt({x})")),
        UnaryOp::Rsqrt => f(format!("1.0f / sqrt({x})")),
        UnaryOp::Recip => f(format!("1.0f / {x}")),
        UnaryOp::Abs => f(format!("abs({x})")),
        UnaryOp::Tanh => (format!("tanh_f({x})"), vec![Func::Tanh]),
        UnaryOp::Sigmoid => (format!("sigmoid({x})"), vec![Func::Sigmoid]),
        // `x < 0` is false for NaN: NaN passes.
        UnaryOp::Relu => f(format!("select({x}, 0.0f, {x} < 0.0f)")),
        UnaryOp::Gelu => (format!("gelu({x})"), vec![Func::Gelu]),
        UnaryOp::Sign => (format!("sign_f({x})"), vec![Func::Sign]),
        UnaryOp::GeluDeriv => (format!("gelu_deriv({x})"), vec![Func::GeluDeriv]),
    }
}

/// `out = op(x)` over `n` elements.
pub fn unary(st: Storage, name: &str, op: UnaryOp, n: usize) -> Kernel {
    let (e, funcs) = unary_expr(op, "v");
    let body = format!(
        "    let v = {};\n    out[idx] = {};\n",
        st.load("x[idx]"),
        st.store(&e)
    );
    kernel_1d(st, name, &["x"], &funcs, n, &body)
}

/// `out = op(a, b)` with `a` and `b` read through broadcast strides `sa`, `sb` over the
/// output shape `out`.
pub fn binary(
    st: Storage,
    name: &str,
    op: BinaryOp,
    out: &[usize],
    sa: &[usize],
    sb: &[usize],
) -> Kernel {
    let n: usize = out.iter().product();
    let (e, funcs) = match op {
        BinaryOp::Add => ("va + vb".to_string(), vec![]),
        BinaryOp::Sub => ("va - vb".into(), vec![]),
        BinaryOp::Mul => ("va * vb".into(), vec![]),
        BinaryOp::Div => ("va / vb".into(), vec![]),
        BinaryOp::Maximum => ("max_num(va, vb)".into(), vec![Func::MaxMinNum]),
        BinaryOp::Minimum => ("min_num(va, vb)".into(), vec![Func::MaxMinNum]),
        BinaryOp::Equal => ("select(0.0f, 1.0f, va == vb)".into(), vec![]),
    };
    let mut body = offsets(
        "o",
        "idx",
        out,
        &[sa.to_vec(), sb.to_vec()],
        &["oa", "ob"],
        "    ",
    );
    body += &format!(
        "    let va = {};\n    let vb = {};\n    out[idx] = {};\n",
        st.load("a[oa]"),
        st.load("b[ob]"),
        st.store(&e)
    );
    kernel_1d(st, name, &["a", "b"], &funcs, n, &body)
}

/// `out[i] = x[sum_d i_d * strides[d]]` over the row-major index space `shape`
/// (permute, broadcast, patchify).
pub fn gather(st: Storage, name: &str, shape: &[usize], strides: &[usize]) -> Kernel {
    let n: usize = shape.iter().product();
    let mut body = offsets("o", "idx", shape, &[strides.to_vec()], &["ox"], "    ");
    body += &format!("    out[idx] = {};\n", st.store(&st.load("x[ox]")));
    kernel_1d(st, name, &["x"], &[], n, &body)
}

/// Elements `start..end` along an axis: `x` seen as `[outer, n, inner]`, the output as
/// `[outer, end - start, inner]`.
pub fn slice(
    st: Storage,
    name: &str,
    outer: usize,
    n: usize,
    inner: usize,
    start: usize,
    len: usize,
) -> Kernel {
    let total = outer * len * inner;
    let read = format!(
        "x[(o * {n} + a + {start}) * {inner} + i]",
        inner = u(inner),
        n = u(n),
        start = u(start),
    );
    let body = format!(
        "    let i = idx % {inner};\n    let t = idx / {inner};\n    let a = t % {len};\n    let o = t / {len};\n    out[idx] = {v};\n",
        inner = u(inner),
        len = u(len),
        v = st.store(&st.load(&read)),
    );
    kernel_1d(st, name, &["x"], &[], total, &body)
}

/// The parts (sizes `sizes` along the axis) joined along an axis: each part seen as
/// `[outer, sizes[p], inner]`.
pub fn concat(st: Storage, name: &str, outer: usize, sizes: &[usize], inner: usize) -> Kernel {
    let total_axis: usize = sizes.iter().sum();
    let total = outer * total_axis * inner;
    let names: Vec<String> = (0..sizes.len()).map(|p| format!("p{p}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut body = format!(
        "    let i = idx % {inner};\n    let t = idx / {inner};\n    let a = t % {ta};\n    let o = t / {ta};\n",
        inner = u(inner),
        ta = u(total_axis),
    );
    // Every part gets a branch (a part of size 0 an unreachable one), so that every
    // binding is used.
    let mut start = 0;
    for (p, &sz) in sizes.iter().enumerate() {
        let elem = format!(
            "p{p}[(o * {} + (a - {})) * {} + i]",
            u(sz),
            u(start),
            u(inner)
        );
        let read = format!("out[idx] = {};", st.store(&st.load(&elem)));
        let end = start + sz;
        if p == 0 {
            body += &format!("    if (a < {}) {{\n        {read}\n    }}", u(end));
        } else if p + 1 == sizes.len() {
            body += &format!(" else {{\n        {read}\n    }}\n");
        } else {
            body += &format!(" else if (a < {}) {{\n        {read}\n    }}", u(end));
        }
        start = end;
    }
    kernel_1d(st, name, &refs, &[], total, &body)
}
