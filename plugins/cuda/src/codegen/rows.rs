//! Row ops: reductions, softmax (any axis), softmax with a sink logit, LayerNorm and its
//! input gradient.
//!
//! One warp per row ([`WARPS`] rows per block of 256 threads): lane `l` takes the row's
//! elements `l, l + 32, ...`, partial results are combined by butterfly shuffles (every
//! lane gets the result, so no shared memory and no block barrier). Rows of at most
//! `32 * MAX_PER_LANE` elements are kept in registers between the passes (one read of
//! the input); longer ones are read again. A whole warp leaves together (`row` is
//! uniform across it), so the shuffles always see 32 lanes. LayerNorm and its gradient
//! over rows of a multiple of eight elements give each lane runs of eight consecutive
//! elements instead, read and written 16 bytes at a time ([`Runs`]).
//!
//! Reductions whose reduced elements are not contiguous (a sum over the batch of a
//! `[B, N, D]` gradient, say) use blocks of 32 x 8 threads instead: 32 neighbouring
//! outputs (neighbouring addresses) per block, each summed by 8 threads over interleaved
//! parts of its elements, the parts combined in shared memory in a fixed order.
//!
//! Max and min propagate NaN like the CPU reference; softmaxes subtract the row maximum
//! (NaN ignored there: a NaN then poisons the sum of exponentials).

use eptc_ir::ReduceOp;

use super::cuda::{
    aligned_16, blocks, contiguous_strides, entry, grid_1d, lit, merge_dims, offsets, Ix,
};
use super::elementwise::VEC;
use super::Kernel;

/// Rows (warps) per block of the warp-per-row kernels.
pub const WARPS: usize = 8;
/// The most row elements one lane keeps in registers.
pub const MAX_PER_LANE: usize = 32;

/// The elements of one row as this lane sees them: `n` elements, kept in registers when
/// there are few enough.
struct Row {
    n: usize,
    ix: Ix,
    cached: bool,
}

impl Row {
    fn new(n: usize, ix: Ix) -> Row {
        Row {
            n,
            ix,
            cached: n > 0 && n <= 32 * MAX_PER_LANE,
        }
    }

    fn per_lane(&self) -> usize {
        self.n.div_ceil(32)
    }

    /// A loop over this lane's elements; `body` sees `j` (the element's index in the row)
    /// and, when cached, `t` (its register slot).
    fn each(&self, body: &str) -> String {
        let t = self.ix.ty();
        let n = self.ix.lit(self.n);
        if self.cached {
            let guard = !self.n.is_multiple_of(32);
            let body = if guard {
                format!("        if (j < {n}) {{\n{}        }}\n", indent(body, 12))
            } else {
                indent(body, 8)
            };
            format!(
                "#pragma unroll\n    for (int t = 0; t < {p}; ++t) {{\n        const {t} j = lane + 32u * (unsigned)t;\n{body}    }}\n",
                p = self.per_lane()
            )
        } else {
            format!(
                "    for ({t} j = lane; j < {n}; j += 32u) {{\n{}    }}\n",
                indent(body, 8)
            )
        }
    }

    /// Declare the register array `arr` and fill it with `src` (an expression of `j`).
    fn cache(&self, arr: &str, src: &str) -> String {
        if !self.cached {
            return String::new();
        }
        let mut s = format!("    float {arr}[{}];\n", self.per_lane());
        s += &self.each(&format!("{arr}[t] = {src};\n"));
        s
    }

    /// The element `j`: from the register array when cached, else `src`.
    fn val(&self, arr: &str, src: &str) -> String {
        if self.cached {
            format!("{arr}[t]")
        } else {
            src.to_string()
        }
    }
}

/// `body` with every line indented by `n` spaces.
fn indent(body: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    body.lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("{pad}{l}\n")
            }
        })
        .collect()
}

/// A warp-per-row kernel over `rows` rows; `body` runs with `lane` and `row` (of type
/// `ix`) defined.
fn kernel_rows(
    name: &str,
    what: &str,
    inputs: &[&str],
    rows: usize,
    ix: Ix,
    body: &str,
) -> Result<Kernel, String> {
    let grid = grid_1d(blocks(rows, WARPS))?;
    let mut src = format!("// {name}: {what}, one warp per row ({rows} rows).\n");
    src += &entry(name, inputs, "out");
    src += &format!(
        "    const unsigned lane = threadIdx.x & 31u;\n    const unsigned long long rg = (unsigned long long)blockIdx.x * {WARPS}ull + (threadIdx.x >> 5);\n    if (rg >= {rows}ull) return;\n    const {t} row = ({t})rg;\n",
        t = ix.ty()
    );
    src += body;
    src += "}\n";
    Ok(Kernel {
        name: name.to_string(),
        source: src,
        inputs: inputs.len(),
        grid,
        block: [(32 * WARPS) as u32, 1, 1],
        shared_bytes: 0,
    })
}

/// Reduce `x` (shape `shape`) over `axes`.
pub fn reduce(name: &str, op: ReduceOp, shape: &[usize], axes: &[usize]) -> Result<Kernel, String> {
    let strides = contiguous_strides(shape);
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
    let numel: usize = shape.iter().product();
    let ix = Ix::for_numel(numel.max(outputs));
    let (mrd, mrs) = merge_dims(&rd, &[rs.clone()]);
    let contiguous = mrs[0].last() == Some(&1) && !mrd.is_empty();
    let what = format!("{} over {count} elements each", op.name());
    if contiguous {
        reduce_warp(name, &what, op, ix, outputs, count, (&kd, &ks), (&rd, &rs))
    } else {
        reduce_columns(name, &what, op, ix, outputs, count, (&kd, &ks), (&rd, &rs))
    }
}

/// How partial results combine and what the output is.
struct Fold {
    init: &'static str,
    /// A statement folding `v` into `acc`.
    step: &'static str,
    /// `a` combined with `b` (partials).
    combine: &'static str,
    warp: &'static str,
}

fn fold_of(op: ReduceOp) -> Fold {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => Fold {
            init: "0.0f",
            step: "acc += v;",
            combine: "a + b",
            warp: "warp_sum",
        },
        ReduceOp::Max | ReduceOp::LogSumExp => Fold {
            init: "NEG_INF",
            step: "acc = pick_max(acc, v);",
            combine: "pick_max(a, b)",
            warp: "warp_pick_max",
        },
        ReduceOp::Min => Fold {
            init: "POS_INF",
            step: "acc = pick_min(acc, v);",
            combine: "pick_min(a, b)",
            warp: "warp_pick_min",
        },
    }
}

/// The output value from the folded `acc` (not for logsumexp).
fn finish(op: ReduceOp, count: usize) -> String {
    match op {
        // 0 / 0 is NaN, written as such.
        ReduceOp::Mean if count == 0 => "QNAN".into(),
        ReduceOp::Mean => format!("acc / {}", lit(count as f32)),
        _ => "acc".into(),
    }
}

/// A loop over the reduced elements `j = start, start + step, ...` of the output whose
/// input offset is `base`, running `stmt` with `v` the element.
fn reduce_loop(
    ix: Ix,
    start: &str,
    step: usize,
    count: usize,
    rd: &[usize],
    rs: &[usize],
    stmt: &str,
) -> String {
    let t = ix.ty();
    let off = offsets(ix, "e", "j", rd, &[rs.to_vec()], &["off"], "        ");
    format!(
        "    for ({t} j = {start}; j < {c}; j += {s}) {{\n{off}        const float v = ld(x, base + off);\n        {stmt}\n    }}\n",
        c = ix.lit(count),
        s = ix.lit(step)
    )
}

#[allow(clippy::too_many_arguments)]
fn reduce_warp(
    name: &str,
    what: &str,
    op: ReduceOp,
    ix: Ix,
    outputs: usize,
    count: usize,
    (kd, ks): (&[usize], &[usize]),
    (rd, rs): (&[usize], &[usize]),
) -> Result<Kernel, String> {
    let f = fold_of(op);
    let mut body = offsets(ix, "k", "row", kd, &[ks.to_vec()], &["base"], "    ");
    body += &format!("    float acc = {};\n", f.init);
    body += &reduce_loop(ix, "lane", 32, count, rd, rs, f.step);
    body += &format!("    acc = {}(acc);\n", f.warp);
    if op == ReduceOp::LogSumExp {
        body += "    const float m = acc;\n    if (!is_finite_f(m)) {\n        if (lane == 0u) st(out, row, m);\n        return;\n    }\n    float s = 0.0f;\n";
        body += &reduce_loop(ix, "lane", 32, count, rd, rs, "s += expf(v - m);");
        body += "    s = warp_sum(s);\n    if (lane == 0u) st(out, row, m + logf(s));\n";
    } else {
        body += &format!("    if (lane == 0u) st(out, row, {});\n", finish(op, count));
    }
    kernel_rows(name, what, &["x"], outputs, ix, &body)
}

/// Threads per output in the column reduction.
const PARTS: usize = 8;

#[allow(clippy::too_many_arguments)]
fn reduce_columns(
    name: &str,
    what: &str,
    op: ReduceOp,
    ix: Ix,
    outputs: usize,
    count: usize,
    (kd, ks): (&[usize], &[usize]),
    (rd, rs): (&[usize], &[usize]),
) -> Result<Kernel, String> {
    let grid = grid_1d(blocks(outputs, 32))?;
    let t = ix.ty();
    let f = fold_of(op);
    let mut src = format!(
        "// {name}: {what}, 32 outputs per block, each folded by {PARTS} threads ({outputs} outputs).\n"
    );
    src += &entry(name, &["x"], "out");
    src += &format!(
        "    __shared__ float part[{PARTS}][33];\n    const unsigned tx = threadIdx.x, ty = threadIdx.y;\n    const unsigned long long og = (unsigned long long)blockIdx.x * 32ull + tx;\n    const bool active = og < {outputs}ull;\n    const {t} o = active ? ({t})og : {z};\n",
        z = ix.lit(0)
    );
    src += &offsets(ix, "k", "o", kd, &[ks.to_vec()], &["base"], "    ");
    let combine_parts = |var: &str, combine: &str| -> String {
        format!(
            "float {var} = part[0][tx];\n        for (int p = 1; p < {PARTS}; ++p) {{\n            const float a = {var}, b = part[p][tx];\n            {var} = {combine};\n        }}\n"
        )
    };
    src += &format!("    float acc = {};\n    if (active) {{\n", f.init);
    src += &indent(&reduce_loop(ix, "ty", PARTS, count, rd, rs, f.step), 4);
    src += "    }\n    part[ty][tx] = acc;\n    __syncthreads();\n";
    if op == ReduceOp::LogSumExp {
        src += &format!("    {}", combine_parts("m", f.combine));
        src += "    __syncthreads();\n    float s = 0.0f;\n    if (active && is_finite_f(m)) {\n";
        src += &indent(
            &reduce_loop(ix, "ty", PARTS, count, rd, rs, "s += expf(v - m);"),
            4,
        );
        src +=
            "    }\n    part[ty][tx] = s;\n    __syncthreads();\n    if (ty == 0u && active) {\n";
        src += &format!("        {}", combine_parts("r", "a + b"));
        src += "        st(out, o, is_finite_f(m) ? m + logf(r) : m);\n    }\n";
    } else {
        src += "    if (ty == 0u && active) {\n";
        src += &format!(
            "        {}",
            combine_parts("acc", f.combine).replace("float acc", "acc")
        );
        src += &format!("        st(out, o, {});\n    }}\n", finish(op, count));
    }
    src += "}\n";
    Ok(Kernel {
        name: name.to_string(),
        source: src,
        inputs: 1,
        grid,
        block: [32, PARTS as u32, 1],
        shared_bytes: 0,
    })
}

/// `var mx` = the maximum over the row (NaN ignored), every lane.
fn row_max(row: &Row, val: &str) -> String {
    let mut s = "    float mx = NEG_INF;\n".to_string();
    s += &row.each(&format!("const float v = {val};\nmx = v > mx ? v : mx;\n"));
    s += "    mx = warp_max(mx);\n";
    s
}

/// Softmax of `x` seen as `[outer, n, inner]` along the middle axis, one warp per
/// `(outer, inner)` row.
pub fn softmax(name: &str, outer: usize, n: usize, inner: usize) -> Result<Kernel, String> {
    let rows = outer * inner;
    let numel = rows * n;
    let ix = Ix::for_numel(numel);
    let row = Row::new(n, ix);
    let mut body = if inner == 1 {
        format!("    const {} base = row * {};\n", ix.ty(), ix.lit(n))
    } else {
        format!(
            "    const {t} base = (row / {inner}) * {rowlen} + row % {inner};\n",
            t = ix.ty(),
            inner = ix.lit(inner),
            rowlen = ix.lit(n * inner)
        )
    };
    let el = format!("base + {}", ix.scaled("j", inner));
    let src = format!("ld(x, {el})");
    body += &row.cache("xv", &src);
    body += &row_max(&row, &row.val("xv", &src));
    body += "    float s = 0.0f;\n";
    body += &if row.cached {
        row.each("xv[t] = expf(xv[t] - mx);\ns += xv[t];\n")
    } else {
        row.each(&format!("s += expf({src} - mx);\n"))
    };
    body += "    s = warp_sum(s);\n    const float r = 1.0f / s;\n";
    body += &row.each(&if row.cached {
        format!("st(out, {el}, xv[t] * r);\n")
    } else {
        format!("st(out, {el}, expf({src} - mx) * r);\n")
    });
    kernel_rows(name, "softmax", &["x"], rows, ix, &body)
}

/// `softmax_sink(s, z)` over rows of `m` elements: `rows` the shape of `s` without its
/// last axis, `zs` the strides reading `z` broadcast to `rows`, `nz` z's element count.
pub fn softmax_sink(
    name: &str,
    rows: &[usize],
    m: usize,
    zs: &[usize],
    nz: usize,
) -> Result<Kernel, String> {
    let count: usize = rows.iter().product();
    let ix = Ix::for_numel((count * m).max(nz));
    let row = Row::new(m, ix);
    let mut body = offsets(ix, "r", "row", rows, &[zs.to_vec()], &["oz"], "    ");
    body += &format!("    const {} base = row * {};\n", ix.ty(), ix.lit(m));
    let src = "ld(s, base + j)";
    body += &row.cache("xv", src);
    body += &row_max(&row, &row.val("xv", src));
    body += "    const float z = ld(z_in, oz);\n    const float mm = z > mx ? z : mx;\n    float sum = 0.0f;\n";
    body += &if row.cached {
        row.each("xv[t] = expf(xv[t] - mm);\nsum += xv[t];\n")
    } else {
        row.each(&format!("sum += expf({src} - mm);\n"))
    };
    body += "    sum = warp_sum(sum);\n    const float r = 1.0f / (sum + expf(z - mm));\n";
    body += &row.each(&if row.cached {
        "st(out, base + j, xv[t] * r);\n".to_string()
    } else {
        format!("st(out, base + j, expf({src} - mm) * r);\n")
    });
    kernel_rows(
        name,
        "softmax with a sink logit",
        &["s", "z_in"],
        count,
        ix,
        &body,
    )
}

/// `mean`, `rstd` of the row (two passes, biased variance); `val` the element.
fn stats(row: &Row, val: &str, d: usize, eps: f32) -> String {
    let mut s = "    float sx = 0.0f;\n".to_string();
    s += &row.each(&format!("sx += {val};\n"));
    s += &format!(
        "    sx = warp_sum(sx);\n    const float mean = sx / {};\n    float sv = 0.0f;\n",
        lit(d as f32)
    );
    s += &row.each(&format!("const float c = {val} - mean;\nsv += c * c;\n"));
    s += &format!(
        "    sv = warp_sum(sv);\n    const float rstd = 1.0f / sqrtf(sv / {} + {});\n",
        lit(d as f32),
        lit(eps)
    );
    s
}

/// LayerNorm over rows of `d` elements (`rows` of them), biased variance.
pub fn layernorm(name: &str, rows: usize, d: usize, eps: f32) -> Result<Kernel, String> {
    let ix = Ix::for_numel(rows * d);
    if let Some(runs) = Runs::new(d, ix) {
        return layernorm_runs(name, rows, &runs, eps);
    }
    let row = Row::new(d, ix);
    let mut body = format!("    const {} base = row * {};\n", ix.ty(), ix.lit(d));
    let src = "ld(x, base + j)";
    body += &row.cache("xv", src);
    let val = row.val("xv", src);
    body += &stats(&row, &val, d, eps);
    body += &row.each(&format!(
        "const float nv = ({val} - mean) * rstd;\nst(out, base + j, nv * ld(gamma, j) + ld(beta, j));\n"
    ));
    kernel_rows(name, "layernorm", &["x", "gamma", "beta"], rows, ix, &body)
}

/// A row of a multiple of [`VEC`] elements (at most `32 * MAX_PER_LANE`) as each lane
/// sees it in the vectorized row kernels: runs of [`VEC`] consecutive elements (run `c =
/// lane + 32 r` holds elements `8c .. 8c + 8`), read and written with 16-byte accesses
/// (`ld8`, `st8`) where every pointer is 16-byte aligned (`al`, a uniform branch; element
/// by element otherwise), kept in registers between the passes.
struct Runs {
    d: usize,
    ix: Ix,
    runs: usize,
    /// Whether a lane's last run can lie past the row (not when the row is a multiple
    /// of 256 elements).
    guard: bool,
}

impl Runs {
    fn new(d: usize, ix: Ix) -> Option<Runs> {
        (d > 0 && d.is_multiple_of(VEC) && d <= 32 * MAX_PER_LANE).then(|| Runs {
            d,
            ix,
            runs: d.div_ceil(32 * VEC),
            guard: !d.is_multiple_of(32 * VEC),
        })
    }

    /// A loop over this lane's runs `r`; `c` (the run's first element in the row) is
    /// defined where the body (`uses_c`) or the guard uses it.
    fn each(&self, body: &str, uses_c: bool) -> String {
        let t = self.ix.ty();
        let c = if uses_c || self.guard {
            format!("        const {t} c = {VEC}u * (lane + 32u * (unsigned)r);\n")
        } else {
            String::new()
        };
        let body = if self.guard {
            format!(
                "        if (c < {}) {{\n{}        }}\n",
                self.ix.lit(self.d),
                indent(body, 12)
            )
        } else {
            indent(body, 8)
        };
        format!(
            "#pragma unroll\n    for (int r = 0; r < {}; ++r) {{\n{c}{body}    }}\n",
            self.runs
        )
    }

    /// Declare the register array `arr` (the lane's elements; zero past the row) and
    /// fill it from `ptr` at `base + c`.
    fn cache(&self, arr: &str, ptr: &str) -> String {
        let n = self.runs * VEC;
        let mut s = format!("    float {arr}[{n}];\n");
        if self.guard {
            s += &format!("    for (int k = 0; k < {n}; ++k) {arr}[k] = 0.0f;\n");
        }
        s += &self.each(
            &format!(
                "if (al) {{\n    ld8({ptr}, base + c, &{arr}[{VEC} * r]);\n}} else {{\n    for (int k = 0; k < {VEC}; ++k) {arr}[{VEC} * r + k] = ld({ptr}, base + c + k);\n}}\n"
            ),
            true,
        );
        s
    }

    /// Statements (for a body of [`Runs::each`]) declaring `float arr[8]` with the run's
    /// elements of `ptr` at `at` (an expression of `c`).
    fn load(&self, arr: &str, ptr: &str, at: &str) -> String {
        format!(
            "float {arr}[{VEC}];\nif (al) {{\n    ld8({ptr}, {at}, {arr});\n}} else {{\n    for (int k = 0; k < {VEC}; ++k) {arr}[k] = ld({ptr}, {at} + k);\n}}\n"
        )
    }

    /// `mean` and `rstd` of the row cached in `xv` (two passes, biased variance), in
    /// f32 or (`f64`) in f64 from the loads on.
    fn stats(&self, f64: bool, eps: f32) -> String {
        let (ty, zero, cast, warp) = if f64 {
            ("double", "0.0", "(double)", "warp_sum_d")
        } else {
            ("float", "0.0f", "", "warp_sum")
        };
        let (d, e) = (self.d, VEC);
        let dl = if f64 { format!("{d}.0") } else { lit(d as f32) };
        let rstd = if f64 {
            format!("1.0 / sqrt(sv / {dl} + (double){})", lit(eps))
        } else {
            format!("1.0f / sqrtf(sv / {dl} + {})", lit(eps))
        };
        let mut s = format!("    {ty} sx = {zero};\n");
        s += &self.each(
            &format!("for (int k = 0; k < {e}; ++k) sx += {cast}xv[{e} * r + k];\n"),
            false,
        );
        s += &format!(
            "    sx = {warp}(sx);\n    const {ty} mean = sx / {dl};\n    {ty} sv = {zero};\n"
        );
        s += &self.each(
            &format!(
                "for (int k = 0; k < {e}; ++k) {{\n    const {ty} c0 = {cast}xv[{e} * r + k] - mean;\n    sv += c0 * c0;\n}}\n"
            ),
            false,
        );
        s += &format!("    sv = {warp}(sv);\n    const {ty} rstd = {rstd};\n");
        s
    }

    /// Statements storing `float y[8]` as the run's elements of `out` (at `base + c`).
    fn store(&self) -> String {
        format!(
            "if (al) {{\n    st8(out, base + c, y);\n}} else {{\n    for (int k = 0; k < {VEC}; ++k) st(out, base + c + k, y[k]);\n}}\n"
        )
    }
}

/// [`layernorm`] over [`Runs`].
fn layernorm_runs(name: &str, rows: usize, row: &Runs, eps: f32) -> Result<Kernel, String> {
    let (d, ix, e) = (row.d, row.ix, VEC);
    let mut body = format!("    const {} base = row * {};\n", ix.ty(), ix.lit(d));
    body += &aligned_16(&["x", "gamma", "beta", "out"]);
    body += &row.cache("xv", "x");
    body += &row.stats(false, eps);
    let mut last = row.load("g", "gamma", "c") + &row.load("b", "beta", "c");
    last += &format!(
        "float y[{e}];\nfor (int k = 0; k < {e}; ++k) {{\n    const float nv = (xv[{e} * r + k] - mean) * rstd;\n    y[k] = nv * g[k] + b[k];\n}}\n"
    );
    last += &row.store();
    body += &row.each(&last, true);
    let what = format!(
        "layernorm, {VEC} consecutive elements per lane and run, 16-byte accesses where aligned"
    );
    kernel_rows(name, &what, &["x", "gamma", "beta"], rows, ix, &body)
}

/// [`layernorm_grad`] over [`Runs`] (the same f64 arithmetic).
fn layernorm_grad_runs(name: &str, rows: usize, row: &Runs, eps: f32) -> Result<Kernel, String> {
    let (d, ix, e) = (row.d, row.ix, VEC);
    let mut body = format!("    const {} base = row * {};\n", ix.ty(), ix.lit(d));
    body += &aligned_16(&["x", "gamma", "dy", "out"]);
    body += &row.cache("xv", "x");
    body += &row.cache("dv", "dy");
    let dd = format!("{d}.0");
    body += &row.stats(true, eps);
    let terms = format!(
        "    const double g = (double)dv[{e} * r + k] * (double)gm[k];\n    const double xh = ((double)xv[{e} * r + k] - mean) * rstd;\n"
    );
    body += "    double s1 = 0.0, s2 = 0.0;\n";
    body += &row.each(
        &format!(
            "{}for (int k = 0; k < {e}; ++k) {{\n{terms}    s1 += g;\n    s2 += g * xh;\n}}\n",
            row.load("gm", "gamma", "c")
        ),
        true,
    );
    body += &format!(
        "    s1 = warp_sum_d(s1);\n    s2 = warp_sum_d(s2);\n    const double m1 = s1 / {dd};\n    const double m2 = s2 / {dd};\n"
    );
    body += &row.each(
        &format!(
            "{}float y[{e}];\nfor (int k = 0; k < {e}; ++k) {{\n{terms}    y[k] = (float)(rstd * (g - m1 - xh * m2));\n}}\n{}",
            row.load("gm", "gamma", "c"),
            row.store()
        ),
        true,
    );
    let what = format!(
        "layernorm_grad, {VEC} consecutive elements per lane and run, 16-byte accesses where aligned"
    );
    kernel_rows(name, &what, &["x", "gamma", "dy"], rows, ix, &body)
}

/// `layernorm_grad(x, gamma, dy)` over rows of `d` elements. In f64 from the loads on,
/// as the CPU reference computes it: the result is a difference of terms of the size of
/// `dy * gamma` and may be much smaller.
pub fn layernorm_grad(name: &str, rows: usize, d: usize, eps: f32) -> Result<Kernel, String> {
    let ix = Ix::for_numel(rows * d);
    if let Some(runs) = Runs::new(d, ix) {
        return layernorm_grad_runs(name, rows, &runs, eps);
    }
    let row = Row::new(d, ix);
    let mut body = format!("    const {} base = row * {};\n", ix.ty(), ix.lit(d));
    let (sx, sdy) = ("ld(x, base + j)", "ld(dy, base + j)");
    body += &row.cache("xv", sx);
    body += &row.cache("dv", sdy);
    let (vx, vdy) = (row.val("xv", sx), row.val("dv", sdy));
    let dd = format!("{d}.0");
    body += "    double sx = 0.0;\n";
    body += &row.each(&format!("sx += (double){vx};\n"));
    body += &format!(
        "    sx = warp_sum_d(sx);\n    const double mean = sx / {dd};\n    double sv = 0.0;\n"
    );
    body += &row.each(&format!(
        "const double c = (double){vx} - mean;\nsv += c * c;\n"
    ));
    body += &format!(
        "    sv = warp_sum_d(sv);\n    const double rstd = 1.0 / sqrt(sv / {dd} + (double){});\n",
        lit(eps)
    );
    let terms = format!(
        "const double g = (double){vdy} * (double)ld(gamma, j);\nconst double xh = ((double){vx} - mean) * rstd;\n"
    );
    body += "    double s1 = 0.0, s2 = 0.0;\n";
    body += &row.each(&format!("{terms}s1 += g;\ns2 += g * xh;\n"));
    body += &format!(
        "    s1 = warp_sum_d(s1);\n    s2 = warp_sum_d(s2);\n    const double m1 = s1 / {dd};\n    const double m2 = s2 / {dd};\n"
    );
    body += &row.each(&format!(
        "{terms}st(out, base + j, (float)(rstd * (g - m1 - xh * m2)));\n"
    ));
    kernel_rows(
        name,
        "layernorm_grad",
        &["x", "gamma", "dy"],
        rows,
        ix,
        &body,
    )
}
