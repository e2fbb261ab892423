//! Building blocks of the CUDA C templates: literals, the index type, the entry line,
//! 1-D launches, index arithmetic over baked shapes and strides, and the prelude (the
//! storage type `T` with its `ld`/`st` conversions and the scalar library every kernel
//! may call).
//!
//! Index arithmetic is `unsigned` (32-bit: cheap division by the baked constants) when
//! every tensor a kernel touches has fewer than 2^31 elements, else `unsigned long long`
//! ([`Ix`]).

use std::fmt::Write;

use eptc_ir::DType;

pub use eptc_ir::strides::{contiguous_strides, merge_dims};

/// The most blocks along grid x (CUDA's limit).
pub const MAX_GRID_X: usize = (1 << 31) - 1;

/// An f32 literal that parses back to exactly `v`; non-finite values by their bits.
pub fn lit(v: f32) -> String {
    if v.is_finite() {
        // `{:?}` is the shortest representation that round-trips and always has a `.`
        // or an exponent (`1.0`, `1e-6`): both valid C float literals with `f`.
        format!("{v:?}f")
    } else {
        format!("__uint_as_float({:#010x}u)", v.to_bits())
    }
}

/// The integer type of a kernel's index arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ix {
    pub wide: bool,
}

impl Ix {
    /// 32-bit unless a tensor of `max_numel` elements (the largest the kernel touches)
    /// needs more.
    pub fn for_numel(max_numel: usize) -> Ix {
        Ix {
            wide: max_numel >= (1 << 31),
        }
    }

    pub fn ty(self) -> &'static str {
        if self.wide {
            "unsigned long long"
        } else {
            "unsigned"
        }
    }

    /// An integer literal of this type.
    pub fn lit(self, v: usize) -> String {
        if self.wide {
            format!("{v}ull")
        } else {
            format!("{v}u")
        }
    }

    /// `var * stride`, simplified for strides 0 and 1.
    pub fn scaled(self, var: &str, stride: usize) -> String {
        match stride {
            0 => self.lit(0),
            1 => var.to_string(),
            s => format!("{var} * {}", self.lit(s)),
        }
    }
}

/// The entry line: `extern "C" __global__ void name(const T* __restrict__ in.., T*
/// __restrict__ out) {` (one line; the tests parse it).
pub fn entry(name: &str, inputs: &[&str], out: &str) -> String {
    let mut params: Vec<String> = inputs
        .iter()
        .map(|n| format!("const T* __restrict__ {n}"))
        .collect();
    params.push(format!("T* __restrict__ {out}"));
    format!(
        "extern \"C\" __global__ void {name}({}) {{\n",
        params.join(", ")
    )
}

/// `const bool al`: whether every pointer of `ptrs` is 16-byte aligned (the uniform test
/// before a kernel's 16-byte accesses).
pub fn aligned_16(ptrs: &[&str]) -> String {
    let cast: Vec<String> = ptrs
        .iter()
        .map(|p| format!("reinterpret_cast<unsigned long long>({p})"))
        .collect();
    format!(
        "    const bool al = (({}) & 15ull) == 0ull;\n",
        cast.join(" | ")
    )
}

/// Blocks of `per_block` to cover `n` items (at least 1).
pub fn blocks(n: usize, per_block: usize) -> usize {
    n.div_ceil(per_block).max(1)
}

/// The grid of a 1-D launch of `blocks` blocks; `Err` past CUDA's limit.
pub fn grid_1d(blocks: usize) -> Result<[u32; 3], String> {
    if blocks > MAX_GRID_X {
        return Err(format!(
            "{blocks} blocks exceed CUDA's grid limit ({MAX_GRID_X})"
        ));
    }
    Ok([blocks as u32, 1, 1])
}

/// The prologue of a kernel with one thread per item (`threads` items, blocks of `wg`):
/// defines `idx` (of type `ix`) and returns past the end.
pub fn prologue_1d(ix: Ix, threads: usize, wg: usize) -> String {
    format!(
        "    const unsigned long long gi = (unsigned long long)blockIdx.x * {wg}ull + threadIdx.x;\n    if (gi >= {threads}ull) return;\n    const {t} idx = ({t})gi;\n",
        t = ix.ty()
    )
}

/// C statements defining `const <ix> <name> = sum_d i_d * strides[k][d]` for each stride
/// set `k`, where `i` is the row-major multi-index of the linear index `index` (an
/// expression of type `ix`) over `dims`. Dims are merged first; `prefix` keeps the
/// temporaries' names unique.
pub fn offsets(
    ix: Ix,
    prefix: &str,
    index: &str,
    dims: &[usize],
    strides: &[Vec<usize>],
    names: &[&str],
    indent: &str,
) -> String {
    let (dims, st) = merge_dims(dims, strides);
    let t = ix.ty();
    let mut s = String::new();
    let mut terms: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    let n = dims.len();
    let _ = writeln!(s, "{indent}const {t} {prefix}_r{n} = {index};");
    // From the innermost dim outwards: i_d = rem % dim, rem = rem / dim; the outermost
    // takes what is left.
    for d in (0..n).rev() {
        let used = st.iter().any(|k| k[d] != 0);
        let i = format!("{prefix}_i{d}");
        let rem = format!("{prefix}_r{}", d + 1);
        if d == 0 {
            if used {
                let _ = writeln!(s, "{indent}const {t} {i} = {rem};");
            }
        } else {
            if used {
                let _ = writeln!(s, "{indent}const {t} {i} = {rem} % {};", ix.lit(dims[d]));
            }
            let _ = writeln!(
                s,
                "{indent}const {t} {prefix}_r{d} = {rem} / {};",
                ix.lit(dims[d])
            );
        }
        for (k, tm) in st.iter().zip(terms.iter_mut()) {
            match k[d] {
                0 => {}
                1 => tm.push(i.clone()),
                stride => tm.push(format!("{i} * {}", ix.lit(stride))),
            }
        }
    }
    for (name, tm) in names.iter().zip(terms) {
        let e = if tm.is_empty() {
            ix.lit(0)
        } else {
            tm.join(" + ")
        };
        let _ = writeln!(s, "{indent}const {t} {name} = {e};");
    }
    // Silence "declared but never referenced" for the outermost remainder when unused.
    let _ = writeln!(s, "{indent}(void){prefix}_r{n};");
    s
}

/// The storage type and its conversions.
pub(crate) fn storage(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => {
            "typedef float T;\n\
             __device__ __forceinline__ float ld(const T* p, long long i) { return p[i]; }\n\
             __device__ __forceinline__ void st(T* p, long long i, float v) { p[i] = v; }\n"
        }
        // bf16 by its bits: the upper half of an f32. Stores round to nearest even; a NaN
        // stays a (quiet) NaN rather than rounding into an infinity.
        DType::BF16 => {
            "typedef unsigned short T;\n\
             __device__ __forceinline__ float ld(const T* p, long long i) {\n    return __uint_as_float(((unsigned)p[i]) << 16);\n}\n\
             __device__ __forceinline__ unsigned short to_t(float v) {\n    const unsigned u = __float_as_uint(v);\n    if ((u & 0x7fffffffu) > 0x7f800000u) {\n        return (unsigned short)((u >> 16) | 0x40u);\n    }\n    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);\n}\n\
             __device__ __forceinline__ void st(T* p, long long i, float v) { p[i] = to_t(v); }\n"
        }
        // f16 through PTX's conversions (round to nearest even), no headers needed.
        DType::F16 => {
            "typedef unsigned short T;\n\
             __device__ __forceinline__ float ld(const T* p, long long i) {\n    float f;\n    asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(f) : \"h\"(p[i]));\n    return f;\n}\n\
             __device__ __forceinline__ unsigned short to_t(float v) {\n    unsigned short h;\n    asm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(h) : \"f\"(v));\n    return h;\n}\n\
             __device__ __forceinline__ void st(T* p, long long i, float v) { p[i] = to_t(v); }\n"
        }
    }
}

/// The scalar library, the same for every storage type. NaN handling follows the CPU
/// reference: comparisons by the bits where it matters, selects that let NaN through.
const LIBRARY: &str = r#"#define NEG_INF __uint_as_float(0xff800000u)
#define POS_INF __uint_as_float(0x7f800000u)
#define QNAN __uint_as_float(0x7fc00000u)
__device__ __forceinline__ bool is_nan_f(float x) {
    return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u;
}
__device__ __forceinline__ bool is_finite_f(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
// The running maximum / minimum `m` after seeing `v`: NaN, once seen, wins.
__device__ __forceinline__ float pick_max(float m, float v) {
    return is_nan_f(m) ? m : ((v > m || is_nan_f(v)) ? v : m);
}
__device__ __forceinline__ float pick_min(float m, float v) {
    return is_nan_f(m) ? m : ((v < m || is_nan_f(v)) ? v : m);
}
// The exact GELU x * Phi(x); below -20 the product is -0 in f32 (and -inf gives -0).
__device__ __forceinline__ float gelu_f(float x) {
    const float xc = x < -20.0f ? -20.0f : x;
    return xc * normcdff(xc);
}
// Phi(x) + x phi(x), x clamped to [-20, 20] (0 or 1 beyond), NaN kept.
__device__ __forceinline__ float gelu_deriv_f(float x) {
    const float xc = x > 20.0f ? 20.0f : (x < -20.0f ? -20.0f : x);
    const float pdf = expf(-0.5f * (xc * xc)) * 0.3989422804014327f;
    return normcdff(xc) + xc * pdf;
}
// exp of a non-positive number only: no overflow on either side; NaN kept.
__device__ __forceinline__ float sigmoid_f(float x) {
    if (x >= 0.0f) {
        return 1.0f / (1.0f + expf(-x));
    }
    const float e = expf(x);
    return e / (1.0f + e);
}
// -1 or 1 by the sign; +-0 and NaN are returned as they are.
__device__ __forceinline__ float sign_f(float x) {
    return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x);
}
__device__ __forceinline__ float relu_f(float x) {
    return x < 0.0f ? 0.0f : x;
}
// Butterfly reductions over a full warp: every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}
// The maximum of values that are not NaN.
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}
__device__ __forceinline__ float warp_pick_max(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v = pick_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}
__device__ __forceinline__ float warp_pick_min(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v = pick_min(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}
"#;

/// `mma_t(d, a, b)`: `d += A B` for one `mma.m16n8k16` (A 16 x 16 and B 16 x 8 in the
/// storage type, four and two registers of two elements; `d` the four f32 accumulators),
/// for the 16-bit storage types (sm_80 and newer). The CPU emulator replaces exactly
/// this text.
pub(crate) fn mma(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => None,
        DType::BF16 => Some(
            "__device__ __forceinline__ void mma_t(float* d, const unsigned* a, const unsigned* b) {\n    asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\"\n                 : \"+f\"(d[0]), \"+f\"(d[1]), \"+f\"(d[2]), \"+f\"(d[3])\n                 : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b[0]), \"r\"(b[1]));\n}\n",
        ),
        DType::F16 => Some(
            "__device__ __forceinline__ void mma_t(float* d, const unsigned* a, const unsigned* b) {\n    asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\"\n                 : \"+f\"(d[0]), \"+f\"(d[1]), \"+f\"(d[2]), \"+f\"(d[3])\n                 : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b[0]), \"r\"(b[1]));\n}\n",
        ),
    }
}

/// Two values rounded to the 16-bit storage type, packed as one register of an `mma`
/// operand (`lo` in the low half).
const PACK: &str = "__device__ __forceinline__ unsigned pack_t(float lo, float hi) {\n    return (unsigned)to_t(lo) | ((unsigned)to_t(hi) << 16);\n}\n";

/// With 16-bit storage, `ld`/`st` for the values the runtime keeps in f32 whatever the
/// storage type (row statistics: see [`crate::codegen::Kernel::widen`]); overloads by
/// the pointer's type, so a kernel's body is the same for either.
const F32_VALUES: &str =
    "__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }\n\
     __device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }\n";

/// `ld8`/`st8`: eight consecutive values at `p + i` (16-byte aligned) in f32, as two
/// `float4`s. The storage type's own for f32; with 16-bit storage, for the values kept
/// in f32 (overloads by the pointer's type, as `ld`/`st`).
const VEC_F32: &str = "__device__ __forceinline__ void ld8(const float* p, long long i, float* v) {\n    const float4 a = *reinterpret_cast<const float4*>(p + i);\n    const float4 b = *reinterpret_cast<const float4*>(p + i + 4);\n    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;\n    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;\n}\n\
__device__ __forceinline__ void st8(float* p, long long i, const float* v) {\n    float4 a, b;\n    a.x = v[0]; a.y = v[1]; a.z = v[2]; a.w = v[3];\n    b.x = v[4]; b.y = v[5]; b.z = v[6]; b.w = v[7];\n    *reinterpret_cast<float4*>(p + i) = a;\n    *reinterpret_cast<float4*>(p + i + 4) = b;\n}\n";

/// `ld8`/`st8` for a 16-bit storage type: eight values in one 16-byte access (`uint4`),
/// each converted by `ld` / `to_t` (so f16 and bf16 share the text, and the CPU
/// emulator's replacement of the f16 conversions covers it).
const VEC_16: &str = "__device__ __forceinline__ void ld8(const T* p, long long i, float* v) {\n    const uint4 u = *reinterpret_cast<const uint4*>(p + i);\n    const unsigned w[4] = {u.x, u.y, u.z, u.w};\n#pragma unroll\n    for (int k = 0; k < 4; ++k) {\n        const T h[2] = {(T)(w[k] & 0xffffu), (T)(w[k] >> 16)};\n        v[2 * k] = ld(h, 0);\n        v[2 * k + 1] = ld(h, 1);\n    }\n}\n\
__device__ __forceinline__ void st8(T* p, long long i, const float* v) {\n    uint4 u;\n    u.x = (unsigned)to_t(v[0]) | ((unsigned)to_t(v[1]) << 16);\n    u.y = (unsigned)to_t(v[2]) | ((unsigned)to_t(v[3]) << 16);\n    u.z = (unsigned)to_t(v[4]) | ((unsigned)to_t(v[5]) << 16);\n    u.w = (unsigned)to_t(v[6]) | ((unsigned)to_t(v[7]) << 16);\n    *reinterpret_cast<uint4*>(p + i) = u;\n}\n";

/// The prelude of a module: the storage type `T`, `ld`/`st` (every kernel reads and
/// writes through them, computing in f32; with 16-bit storage also for `float*`),
/// `ld8`/`st8` (eight values in 16-byte accesses, for the vectorized element-wise
/// kernels), the
/// scalar library and, for the 16-bit types, the tensor-core helpers (`pack_t`,
/// `mma_t`).
pub fn prelude(dtype: DType) -> String {
    let tensor = mma(dtype).map_or(String::new(), |m| format!("{PACK}{m}"));
    let wide = if dtype == DType::F32 {
        VEC_F32.to_string()
    } else {
        format!("{F32_VALUES}{VEC_F32}{VEC_16}")
    };
    format!(
        "// eptc CUDA kernels: storage type {dtype}, arithmetic in f32.\n{}{wide}{LIBRARY}{tensor}\n",
        storage(dtype)
    )
}
