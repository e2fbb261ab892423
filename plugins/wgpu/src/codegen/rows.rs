//! One invocation per output row or reduced element, looping over the row: reductions,
//! softmax (any axis), softmax with a sink logit, LayerNorm and its input gradient.
//!
//! Sums are blocked ([`wgsl::blocked_sum`]); max/min propagate NaN like the CPU
//! reference; softmaxes subtract the row maximum. Elements are loaded as f32 from the
//! bindings' [`Storage`]; statistics and sums stay f32, only the stores convert back.

use eptc_ir::ReduceOp;

use super::wgsl::{
    self, blocked_sum, blocked_sum_with, entry_1d, launch_1d, lit, offsets, u, Func, Storage, NAN,
    NEG_INF, POS_INF,
};
use super::Kernel;

const WG: usize = 64;

fn kernel_rows(
    st: Storage,
    name: &str,
    what: &str,
    inputs: &[&str],
    funcs: &[Func],
    n: usize,
    body: &str,
) -> Kernel {
    let launch = launch_1d(n, WG);
    let mut src = st.preamble().to_string();
    src += &format!("// {name}: {what} ({n} invocations).\n");
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

/// Reduce `x` (shape `shape`) over `axes`; one invocation per output element.
pub fn reduce(st: Storage, name: &str, op: ReduceOp, shape: &[usize], axes: &[usize]) -> Kernel {
    let strides = wgsl::contiguous_strides(shape);
    let (mut kd, mut ks, mut rd, mut rs) = (vec![], vec![], vec![], vec![]);
    for (d, (&n, &s)) in shape.iter().zip(&strides).enumerate() {
        if axes.contains(&d) {
            rd.push(n);
            rs.push(s);
        } else {
            kd.push(n);
            ks.push(s);
        }
    }
    let outputs: usize = kd.iter().product();
    let count: usize = rd.iter().product();
    let mut body = offsets("k", "idx", &kd, &[ks], &["base"], "    ");
    // The element `i` (a u32 expression) of the reduced index space.
    let elem = |i: &str, pre: &str| -> (String, String) {
        let stmts = offsets(
            pre,
            i,
            &rd,
            &[rs.clone()],
            &[&format!("{pre}_off")],
            "            ",
        );
        (stmts, st.load(&format!("x[base + {pre}_off]")))
    };
    let mut funcs = vec![];
    let ind = "    ";
    // A loop over every reduced element folding with `fold` (a statement using `v`).
    let loop_over = |pre: &str, fold: &str| -> String {
        let (stmts, e) = elem(&format!("{pre}_j"), pre);
        format!(
            "{ind}for (var {pre}_j = 0u; {pre}_j < {c}; {pre}_j++) {{\n{stmts}            let v = {e};\n            {fold}\n{ind}}}\n",
            c = u(count)
        )
    };
    // A blocked sum of `f(x_j)` over the reduced elements into `acc`.
    let sum_over = |acc: &str, f: &dyn Fn(&str) -> String| -> String {
        blocked_sum_with(
            acc,
            count,
            &|i| {
                let (stmts, e) = elem(i, acc);
                (stmts, f(&e))
            },
            ind,
        )
    };
    match op {
        ReduceOp::Sum => {
            body += &sum_over("s", &|e| e.to_string());
            body += &format!("    out[idx] = {};\n", st.store("s"));
        }
        ReduceOp::Mean => {
            body += &sum_over("s", &|e| e.to_string());
            if count == 0 {
                // 0 / 0: written as NaN (drivers may fold arithmetic on NaN away).
                let v = format!("select(s, {NAN}, true)");
                body += &format!("    out[idx] = {};\n", st.store(&v));
            } else {
                let v = format!("s / {}", lit(count as f32));
                body += &format!("    out[idx] = {};\n", st.store(&v));
            }
        }
        ReduceOp::Max | ReduceOp::Min => {
            funcs.push(Func::MaxMinNan);
            let (init, f) = if op == ReduceOp::Max {
                (NEG_INF, "max_nan")
            } else {
                (POS_INF, "min_nan")
            };
            body += &format!("    var m = {init};\n");
            body += &loop_over("m", &format!("m = {f}(m, v);"));
            body += &format!("    out[idx] = {};\n", st.store("m"));
        }
        ReduceOp::LogSumExp => {
            funcs.extend([Func::MaxMinNan, Func::IsFinite]);
            body += &format!("    var m = {NEG_INF};\n");
            body += &loop_over("m", "m = max_nan(m, v);");
            body += &format!(
                "    if (!is_finite(m)) {{\n        out[idx] = {};\n        return;\n    }}\n",
                st.store("m")
            );
            body += &sum_over("s", &|e| format!("exp({e} - m)"));
            body += &format!("    out[idx] = {};\n", st.store("m + log(s)"));
        }
    }
    let what = format!("{} over {count} elements each", op.name());
    kernel_rows(st, name, &what, &["x"], &funcs, outputs, &body)
}

/// Softmax of `x` seen as `[outer, n, inner]` along the middle axis; one invocation per
/// `(outer, inner)` row.
pub fn softmax(st: Storage, name: &str, outer: usize, n: usize, inner: usize) -> Kernel {
    let rows = outer * inner;
    let el = |j: &str| st.load(&format!("x[base + {j} * {}]", u(inner)));
    let mut body = format!(
        "    let base = (idx / {inner}) * {row} + idx % {inner};\n",
        inner = u(inner),
        row = u(n * inner)
    );
    body += &row_max("m", n, &el);
    body += &blocked_sum("s", n, &|j| format!("exp({} - m)", el(j)), "    ");
    body += &format!(
        "    let r = 1.0f / s;\n    for (var j = 0u; j < {n}; j++) {{\n        let o = base + j * {inner};\n        out[o] = {v};\n    }}\n",
        n = u(n),
        inner = u(inner),
        v = st.store(&format!("exp({} - m) * r", st.load("x[o]"))),
    );
    kernel_rows(st, name, "softmax, one row each", &["x"], &[], rows, &body)
}

/// `var <m>` = the maximum of a row (NaN ignored: a NaN then poisons the sum of exps).
fn row_max(m: &str, n: usize, el: &dyn Fn(&str) -> String) -> String {
    let j = format!("{m}_j");
    format!(
        "    var {m} = {NEG_INF};\n    for (var {j} = 0u; {j} < {n}; {j}++) {{\n        let v = {e};\n        {m} = select({m}, v, v > {m});\n    }}\n",
        n = u(n),
        e = el(&j)
    )
}

/// `softmax_sink(s, z)` over rows of `m` elements: `rows` the shape of `s` without its
/// last axis, `zs` the strides reading `z` broadcast to `rows`.
pub fn softmax_sink(st: Storage, name: &str, rows: &[usize], m: usize, zs: &[usize]) -> Kernel {
    let count: usize = rows.iter().product();
    let el = |j: &str| st.load(&format!("s[base + {j}]"));
    let mut body = offsets("r", "idx", rows, &[zs.to_vec()], &["oz"], "    ");
    body += &format!("    let base = idx * {};\n", u(m));
    body += &row_max("mx", m, &el);
    body += &format!(
        "    let z = {};\n    let mm = select(mx, z, z > mx);\n",
        st.load("z_in[oz]")
    );
    body += &blocked_sum("t", m, &|j| format!("exp({} - mm)", el(j)), "    ");
    body += &format!(
        "    let r = 1.0f / (t + exp(z - mm));\n    for (var j = 0u; j < {}; j++) {{\n        out[base + j] = {};\n    }}\n",
        u(m),
        st.store(&format!("exp({} - mm) * r", el("j")))
    );
    kernel_rows(
        st,
        name,
        "softmax with a sink logit, one row each",
        &["s", "z_in"],
        &[],
        count,
        &body,
    )
}

/// LayerNorm over rows of `d` elements (`rows` of them), biased variance.
pub fn layernorm(st: Storage, name: &str, rows: usize, d: usize, eps: f32) -> Kernel {
    let mut body = format!("    let base = idx * {};\n", u(d));
    body += &stats(st, d, eps);
    body += &format!(
        "    for (var j = 0u; j < {}; j++) {{\n        let n = ({} - mean) * rstd;\n        out[base + j] = {};\n    }}\n",
        u(d),
        st.load("x[base + j]"),
        st.store(&format!(
            "n * {} + {}",
            st.load("gamma[j]"),
            st.load("beta[j]")
        ))
    );
    kernel_rows(
        st,
        name,
        "layernorm, one row each",
        &["x", "gamma", "beta"],
        &[],
        rows,
        &body,
    )
}

/// `mean`, `rstd` of the row `x[base..base + d]` (two passes, biased variance).
fn stats(st: Storage, d: usize, eps: f32) -> String {
    let x = |j: &str| st.load(&format!("x[base + {j}]"));
    let mut s = blocked_sum("sx", d, &|j| x(j), "    ");
    s += &format!("    let mean = sx / {};\n", lit(d as f32));
    s += &blocked_sum(
        "sv",
        d,
        &|j| format!("({} - mean) * ({} - mean)", x(j), x(j)),
        "    ",
    );
    s += &format!(
        "    let rstd = 1.0f / sqrt(sv / {} + {});\n",
        lit(d as f32),
        lit(eps)
    );
    s
}

/// `layernorm_grad(x, gamma, dy)` over rows of `d` elements.
pub fn layernorm_grad(st: Storage, name: &str, rows: usize, d: usize, eps: f32) -> Kernel {
    let x = |j: &str| st.load(&format!("x[base + {j}]"));
    let dy = |j: &str| st.load(&format!("dy[base + {j}]"));
    let gamma = |j: &str| st.load(&format!("gamma[{j}]"));
    let mut body = format!("    let base = idx * {};\n", u(d));
    body += &stats(st, d, eps);
    body += &blocked_sum("s1", d, &|j| format!("{} * {}", dy(j), gamma(j)), "    ");
    body += &blocked_sum(
        "s2",
        d,
        &|j| format!("{} * {} * (({} - mean) * rstd)", dy(j), gamma(j), x(j)),
        "    ",
    );
    body += &format!(
        "    let m1 = s1 / {dd};\n    let m2 = s2 / {dd};\n    for (var j = 0u; j < {d}; j++) {{\n        let g = {dyj} * {gj};\n        let xh = ({xj} - mean) * rstd;\n        out[base + j] = {v};\n    }}\n",
        dd = lit(d as f32),
        d = u(d),
        dyj = dy("j"),
        gj = gamma("j"),
        xj = x("j"),
        v = st.store("rstd * (g - m1 - xh * m2)"),
    );
    kernel_rows(
        st,
        name,
        "layernorm_grad, one row each",
        &["x", "gamma", "dy"],
        &[],
        rows,
        &body,
    )
}
