//! Building blocks of the WGSL templates: literals, the binding header, the dispatch
//! geometry, index arithmetic over baked shapes and strides, blocked sums, and the
//! library of scalar functions (NaN-aware max/min, erf-based GELU, stable tanh and
//! sigmoid) a kernel includes when it uses them.
//!
//! Everything is `u32` index arithmetic: [`super::MAX_ELEMS`] keeps every offset in range.

use std::fmt::Write;

use eptc_ir::DType;

/// The most workgroups along one dispatch dimension (WebGPU's default limit).
pub const MAX_GROUPS: usize = 65_535;

/// An f32 literal that parses back to exactly `v` (`f` suffix: no abstract-float double
/// rounding); non-finite values as a bit pattern.
pub fn lit(v: f32) -> String {
    if v.is_finite() {
        // `{:?}` is the shortest representation that round-trips and always has a `.`
        // or an exponent (`1.0`, `1e-6`), both valid WGSL decimal float literals.
        format!("{v:?}f")
    } else {
        format!("bitcast<f32>({:#010x}u)", v.to_bits())
    }
}

/// A `u32` literal.
pub fn u(v: usize) -> String {
    format!("{v}u")
}

/// `var * stride` as a WGSL `u32` expression, simplified for strides 0 and 1.
pub fn scaled(var: &str, stride: usize) -> String {
    match stride {
        0 => "0u".to_string(),
        1 => var.to_string(),
        s => format!("{var} * {}", u(s)),
    }
}

/// The element type of every tensor binding (`eptc compile --dtype`). Only storage:
/// every load converts to f32 ([`Storage::load`]), all arithmetic and accumulation is
/// f32, and every store converts back ([`Storage::store`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Storage {
    #[default]
    F32,
    /// `array<f16>` bindings; the module enables WGSL's `f16` extension.
    F16,
}

impl Storage {
    /// The storage type for an IR dtype, or why there is none (bf16: WGSL has no such
    /// type).
    pub fn of(dtype: DType) -> Result<Self, String> {
        match dtype {
            DType::F32 => Ok(Storage::F32),
            DType::F16 => Ok(Storage::F16),
            DType::BF16 => Err("wgpu has no bf16 storage; use f16 or f32".into()),
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::F16 => DType::F16,
        }
    }

    /// The WGSL scalar type of a binding's elements.
    pub fn scalar(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::F16 => 2,
        }
    }

    /// What a module starts with: the `enable` directive its storage type needs.
    pub fn preamble(self) -> &'static str {
        match self {
            Storage::F32 => "",
            Storage::F16 => "enable f16;\n",
        }
    }

    /// The f32 value of the stored element `elem` (an expression such as `x[i]`).
    pub fn load(self, elem: &str) -> String {
        match self {
            Storage::F32 => elem.to_string(),
            Storage::F16 => format!("f32({elem})"),
        }
    }

    /// The expression storing the f32 value `v` into an element.
    pub fn store(self, v: &str) -> String {
        match self {
            Storage::F32 => v.to_string(),
            Storage::F16 => format!("f16({v})"),
        }
    }
}

/// The storage bindings: operand `i` read-only at binding `i`, the output read-write at
/// binding `inputs.len()`, every one an `array` of `st`'s scalar.
pub fn bindings(st: Storage, inputs: &[&str], out: &str) -> String {
    let t = st.scalar();
    let mut s = String::new();
    for (i, name) in inputs.iter().enumerate() {
        let _ = writeln!(
            s,
            "@group(0) @binding({i}) var<storage, read> {name}: array<{t}>;"
        );
    }
    let _ = writeln!(
        s,
        "@group(0) @binding({}) var<storage, read_write> {out}: array<{t}>;",
        inputs.len()
    );
    s
}

/// How `groups` workgroups are laid out on a 2-D grid with at most [`MAX_GROUPS`] per
/// dimension: `[x, y, 1]`, `x * y >= groups` (the kernel guards the excess).
pub fn grid(groups: usize) -> [u32; 3] {
    if groups == 0 {
        return [0, 0, 0];
    }
    let x = groups.min(MAX_GROUPS);
    let y = groups.div_ceil(x);
    [x as u32, y as u32, 1]
}

/// A 1-D launch of `threads` invocations in workgroups of `wg`: the dispatch size, and
/// the WGSL prologue that defines `idx` (the invocation's linear index) from
/// `gid: vec3<u32>` (the global invocation id) and returns when `idx >= threads`.
pub struct Launch {
    pub workgroups: [u32; 3],
    pub prologue: String,
}

pub fn launch_1d(threads: usize, wg: usize) -> Launch {
    let groups = threads.div_ceil(wg);
    let workgroups = grid(groups);
    let row = workgroups[0] as usize * wg;
    let prologue = format!(
        "    let idx = gid.x + gid.y * {};\n    if (idx >= {}) {{\n        return;\n    }}\n",
        u(row),
        u(threads)
    );
    Launch {
        workgroups,
        prologue,
    }
}

/// The entry point's header for a 1-D kernel with workgroups of `wg`.
pub fn entry_1d(wg: usize) -> String {
    format!(
        "@compute @workgroup_size({wg})\nfn main(@builtin(global_invocation_id) gid: vec3<u32>) {{\n"
    )
}

pub use eptc_ir::strides::{contiguous_strides, merge_dims};

/// WGSL statements defining `let <name> = sum_d i_d * strides[k][d]` for each stride set
/// `k`, where `i` is the row-major multi-index of the linear index `index` (an expression)
/// over `dims`. Dims are merged first; `prefix` keeps the temporaries' names unique.
pub fn offsets(
    prefix: &str,
    index: &str,
    dims: &[usize],
    strides: &[Vec<usize>],
    names: &[&str],
    indent: &str,
) -> String {
    let (dims, st) = merge_dims(dims, strides);
    let mut s = String::new();
    let mut terms: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let n = dims.len();
    let _ = writeln!(s, "{indent}let {prefix}_r{n} = {index};");
    // From the innermost dim outwards: i_d = rem % dim, rem = rem / dim; the outermost
    // takes what is left.
    for d in (0..n).rev() {
        let used = st.iter().any(|k| k[d] != 0);
        let i = format!("{prefix}_i{d}");
        let rem = format!("{prefix}_r{}", d + 1);
        if d == 0 {
            if used {
                let _ = writeln!(s, "{indent}let {i} = {rem};");
            }
        } else {
            if used {
                let _ = writeln!(s, "{indent}let {i} = {rem} % {};", u(dims[d]));
            }
            let _ = writeln!(s, "{indent}let {prefix}_r{d} = {rem} / {};", u(dims[d]));
        }
        for (k, t) in st.iter().zip(terms.iter_mut()) {
            match k[d] {
                0 => {}
                1 => t.push(i.clone()),
                stride => t.push(format!("{i} * {}", u(stride))),
            }
        }
    }
    for (name, t) in names.iter().zip(terms) {
        let e = if t.is_empty() {
            "0u".to_string()
        } else {
            t.join(" + ")
        };
        let _ = writeln!(s, "{indent}let {name} = {e};");
    }
    s
}

/// A summation over `count` terms in two levels (blocks of about `sqrt(count)` summed on
/// their own, then the block sums), so the rounding error grows like `sqrt(count)`
/// rather than `count`: declares `var <acc>: f32` and adds `term(<i>)` for every
/// `<i> = 0..count` (`i` a `u32` named `<acc>_i`).
pub fn blocked_sum(acc: &str, count: usize, term: &dyn Fn(&str) -> String, indent: &str) -> String {
    blocked_sum_with(acc, count, &|i| (String::new(), term(i)), indent)
}

/// [`blocked_sum`] where the term needs statements first: `term(i)` gives the
/// statements (indented for the inner loop) and the term's expression.
pub fn blocked_sum_with(
    acc: &str,
    count: usize,
    term: &dyn Fn(&str) -> (String, String),
    indent: &str,
) -> String {
    let blk = ((count as f64).sqrt().ceil() as usize).max(1);
    let i = format!("{acc}_i");
    let (stmts, t) = term(&i);
    format!(
        "{indent}var {acc} = 0.0f;\n\
         {indent}for (var {acc}_b = 0u; {acc}_b < {n}; {acc}_b += {blk}) {{\n\
         {indent}    var {acc}_p = 0.0f;\n\
         {indent}    let {acc}_e = min({acc}_b + {blk}, {n});\n\
         {indent}    for (var {i} = {acc}_b; {i} < {acc}_e; {i}++) {{\n\
         {stmts}\
         {indent}        {acc}_p += {t};\n\
         {indent}    }}\n\
         {indent}    {acc} += {acc}_p;\n\
         {indent}}}\n",
        n = u(count),
        blk = u(blk),
    )
}

/// Scalar functions a kernel may call; [`library`] writes the ones asked for (and what
/// they depend on) once each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Func {
    /// `is_nan(x)`, by the bits (immune to fast-math assumptions).
    IsNan,
    /// `is_finite(x)`, by the bits.
    IsFinite,
    /// `max_num(a, b)` / `min_num(a, b)`: like f32::max/min, NaN on one side gives the
    /// other.
    MaxMinNum,
    /// `max_nan(m, v)` / `min_nan(m, v)`: the running extremum, NaN once seen wins.
    MaxMinNan,
    /// `half_erfc(t)` for `t >= 0`: `erfc(t) / 2` (Numerical Recipes' erfcc fit).
    HalfErfc,
    /// `norm_cdf(x)`: the standard normal CDF.
    NormCdf,
    Gelu,
    GeluDeriv,
    Tanh,
    Sigmoid,
    /// `sign_f(x)`: -1, 1, or x itself for +-0 and NaN (no arithmetic on NaN, which
    /// drivers may fold away).
    Sign,
}

impl Func {
    fn deps(self) -> &'static [Func] {
        match self {
            Func::IsNan | Func::IsFinite | Func::HalfErfc | Func::Sigmoid | Func::Sign => &[],
            Func::MaxMinNum | Func::MaxMinNan | Func::Tanh => &[Func::IsNan],
            Func::NormCdf => &[Func::HalfErfc],
            Func::Gelu | Func::GeluDeriv => &[Func::NormCdf],
        }
    }

    fn source(self) -> &'static str {
        match self {
            Func::IsNan => {
                "fn is_nan(x: f32) -> bool {\n    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;\n}\n"
            }
            Func::IsFinite => {
                "fn is_finite(x: f32) -> bool {\n    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;\n}\n"
            }
            Func::MaxMinNum => {
                "fn max_num(a: f32, b: f32) -> f32 {\n    if (is_nan(a)) {\n        return b;\n    }\n    if (is_nan(b)) {\n        return a;\n    }\n    return select(b, a, a > b);\n}\n\
                 fn min_num(a: f32, b: f32) -> f32 {\n    if (is_nan(a)) {\n        return b;\n    }\n    if (is_nan(b)) {\n        return a;\n    }\n    return select(b, a, a < b);\n}\n"
            }
            Func::MaxMinNan => {
                "fn max_nan(m: f32, v: f32) -> f32 {\n    if (is_nan(m)) {\n        return m;\n    }\n    return select(m, v, v > m || is_nan(v));\n}\n\
                 fn min_nan(m: f32, v: f32) -> f32 {\n    if (is_nan(m)) {\n        return m;\n    }\n    return select(m, v, v < m || is_nan(v));\n}\n"
            }
            // erfc(t) = u exp(-t^2 + R(u)), u = 1 / (1 + t/2), R the Chebyshev fit of
            // Numerical Recipes' erfcc (fractional error < 1.2e-7 for t >= 0), here in
            // f32. `tt` is t^2, passed in so callers can form it with one rounding.
            Func::HalfErfc => {
                "fn half_erfc(t: f32, tt: f32) -> f32 {\n    let u = 1.0f / (1.0f + 0.5f * t);\n    var r = 0.17087277f;\n    r = r * u - 0.82215223f;\n    r = r * u + 1.48851587f;\n    r = r * u - 1.13520398f;\n    r = r * u + 0.27886807f;\n    r = r * u - 0.18628806f;\n    r = r * u + 0.09678418f;\n    r = r * u + 0.37409196f;\n    r = r * u + 1.00002368f;\n    r = r * u - 1.26551223f;\n    return 0.5f * u * exp(r - tt);\n}\n"
            }
            // Phi(x) = erfc(-x / sqrt 2) / 2, from the upper tail's half_erfc on both sides;
            // x clamped to [-20, 20] (beyond it Phi is 0 or 1 in f32), NaN kept.
            Func::NormCdf => {
                "fn norm_cdf(x: f32) -> f32 {\n    let xc = select(select(x, 20.0f, x > 20.0f), -20.0f, x < -20.0f);\n    let h = half_erfc(abs(xc) * 0.70710678f, 0.5f * (xc * xc));\n    return select(h, 1.0f - h, xc >= 0.0f);\n}\n"
            }
            Func::Gelu => {
                "fn gelu(x: f32) -> f32 {\n    let xc = select(x, -20.0f, x < -20.0f);\n    return xc * norm_cdf(xc);\n}\n"
            }
            Func::GeluDeriv => {
                "fn gelu_deriv(x: f32) -> f32 {\n    let xc = select(select(x, 20.0f, x > 20.0f), -20.0f, x < -20.0f);\n    let pdf = exp(-0.5f * (xc * xc)) * 0.39894228f;\n    return norm_cdf(xc) + xc * pdf;\n}\n"
            }
            // Cephes' tanhf: an odd polynomial below 0.625, 1 - 2 / (e^2|x| + 1) above
            // (|x| clamped to 9, where tanh is 1 in f32); NaN kept.
            Func::Tanh => {
                "fn tanh_f(x: f32) -> f32 {\n    if (is_nan(x)) {\n        return x;\n    }\n    let a = min(abs(x), 9.0f);\n    var r: f32;\n    if (a < 0.625f) {\n        let z = x * x;\n        r = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * a + a;\n    } else {\n        r = 1.0f - 2.0f / (exp(2.0f * a) + 1.0f);\n    }\n    return select(r, -r, x < 0.0f);\n}\n"
            }
            // exp of a non-positive number only: no overflow on either side; NaN kept.
            Func::Sigmoid => {
                "fn sigmoid(x: f32) -> f32 {\n    let e = exp(-abs(x));\n    return select(e / (1.0f + e), 1.0f / (1.0f + e), x >= 0.0f);\n}\n"
            }
            Func::Sign => {
                "fn sign_f(x: f32) -> f32 {\n    return select(select(x, -1.0f, x < 0.0f), 1.0f, x > 0.0f);\n}\n"
            }
        }
    }
}

/// The source of `funcs` and their dependencies, each once, dependencies first.
pub fn library(funcs: &[Func]) -> String {
    let mut all: Vec<Func> = Vec::new();
    fn add(f: Func, all: &mut Vec<Func>) {
        for &d in f.deps() {
            add(d, all);
        }
        if !all.contains(&f) {
            all.push(f);
        }
    }
    for &f in funcs {
        add(f, &mut all);
    }
    all.iter()
        .map(|f| f.source())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `-inf` and `+inf` as WGSL expressions.
pub const NEG_INF: &str = "bitcast<f32>(0xff800000u)";
pub const POS_INF: &str = "bitcast<f32>(0x7f800000u)";
pub const NAN: &str = "bitcast<f32>(0x7fc00000u)";
