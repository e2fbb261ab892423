//! Tiled matrix product: a block of 16 x 16 threads per (output tile, batch entry); each
//! thread computes an `RM x RN` block of the tile (register blocking, so the tile is
//! `16 RM x 16 RN`, at most 64 x 64), the operands staged through shared memory (as f32)
//! one slab of [`KS`] along K at a time; accumulation in f32. The fused `linear` is the
//! same kernel with its epilogue (bias, exact GELU, residual, in that order).
//!
//! `RM`, `RN` (1, 2 or 4) follow the matrix sizes, so small products do not waste
//! threads on a large tile. Thread `(x, y)` owns rows `y RM + i` and columns `x RN + j`
//! of the tile, so each step along K reads its `RM` values of A and `RN` values of B
//! with one vector load each (`float4` for 4) from the slabs, which are stored k-major
//! with rows padded to keep them 16-byte aligned; the 16 threads of a half-warp read
//! one broadcast A vector and 16 neighbouring B vectors (no bank conflicts).
//!
//! One block per tile: `grid.x = tiles * entries` (no early exit, so every thread
//! reaches both barriers of every slab).

use std::fmt::Write;

use super::cuda::{entry, grid_1d, offsets, Ix};
use super::Kernel;

/// Threads per block along each axis.
pub const THREADS: usize = 16;
/// The depth of a K slab.
pub const KS: usize = 16;

/// One operand of the product as the kernel reads it.
#[derive(Clone, Debug)]
pub struct Operand {
    /// Element `(row, col)` of the logical matrix (`A` is `[M, K]`, `B` is `[K, N]`) is
    /// at `row * rs + col * cs` from the batch entry's start.
    pub rs: usize,
    pub cs: usize,
    /// Per dim of the output's leading (batch) axes, the stride between entries
    /// (0 where the operand is broadcast).
    pub lead_strides: Vec<usize>,
    /// The operand's element count (for the index type).
    pub numel: usize,
}

/// What follows the product, in order: `+ bias[n]`, exact GELU, `+ residual[m, n]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue {
    pub bias: bool,
    pub gelu: bool,
    pub residual: bool,
}

/// Outputs per thread along an axis of `n` elements.
fn per_thread(n: usize) -> usize {
    if n > 2 * THREADS {
        4
    } else if n > THREADS {
        2
    } else {
        1
    }
}

/// `out[l, m, n] = epilogue(sum_k A[l, m, k] B[l, k, n])` for the leading axes `lead`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    name: &str,
    what: &str,
    lead: &[usize],
    m: usize,
    n: usize,
    k: usize,
    a: &Operand,
    b: &Operand,
    epi: Epilogue,
) -> Result<Kernel, String> {
    let nb: usize = lead.iter().product();
    let (rm, rn) = (per_thread(m), per_thread(n));
    let (tile_m, tile_n) = (THREADS * rm, THREADS * rn);
    let (tm, tn) = (m.div_ceil(tile_m), n.div_ceil(tile_n));
    let total = tm * tn * nb;
    let grid = grid_1d(total)?;
    let ix = Ix::for_numel((nb * m * n).max(a.numel).max(b.numel));
    let t = ix.ty();
    let mut inputs = vec!["a", "b"];
    if epi.bias {
        inputs.push("bias");
    }
    if epi.residual {
        inputs.push("res");
    }
    let mut src = format!(
        "// {name}: {what}; [{m} x {k}] x [{k} x {n}] for {nb} batch entries; {tile_m}x{tile_n} tiles, {rm}x{rn} outputs per thread, K in slabs of {KS}.\n"
    );
    src += &entry(name, &inputs, "out");
    // Slabs stored k-major: ta[kk][r], tb[kk][c], rows padded by 4 words (16-byte
    // aligned for the vector loads).
    let _ = writeln!(
        src,
        "    __shared__ __align__(16) float ta[{KS}][{}];\n    __shared__ __align__(16) float tb[{KS}][{}];",
        tile_m + PAD,
        tile_n + PAD
    );
    let _ = writeln!(
        src,
        "    const unsigned tx = threadIdx.x, ty = threadIdx.y;\n    const {t} wg = blockIdx.x;\n    const {t} m0 = ((wg / {tn}) % {tm}) * {tile_m_l};\n    const {t} n0 = (wg % {tn}) * {tile_n_l};\n    const {t} e = wg / {tmn};",
        tn = ix.lit(tn),
        tm = ix.lit(tm),
        tmn = ix.lit(tm * tn),
        tile_m_l = ix.lit(tile_m),
        tile_n_l = ix.lit(tile_n),
    );
    src += &offsets(
        ix,
        "l",
        "e",
        lead,
        &[a.lead_strides.clone(), b.lead_strides.clone()],
        &["oa", "ob"],
        "    ",
    );
    let _ = writeln!(src, "    const unsigned flat = ty * {THREADS}u + tx;");
    for i in 0..rm {
        for j in 0..rn {
            let _ = writeln!(src, "    float c{i}{j} = 0.0f;");
        }
    }
    let _ = writeln!(
        src,
        "    for ({t} k0 = 0; k0 < {}; k0 += {KS}u) {{",
        ix.lit(k)
    );
    src += &stage("ta", "a", "oa", a, "m0", m, tile_m, true, k, ix);
    src += &stage("tb", "b", "ob", b, "n0", n, tile_n, false, k, ix);
    src += "        __syncthreads();\n";
    let _ = writeln!(
        src,
        "#pragma unroll\n        for (int kk = 0; kk < {KS}; ++kk) {{"
    );
    src += &vector_load("a", "ta", "ty", rm);
    src += &vector_load("b", "tb", "tx", rn);
    for i in 0..rm {
        for j in 0..rn {
            let _ = writeln!(src, "            c{i}{j} += a{i} * b{j};");
        }
    }
    src += "        }\n        __syncthreads();\n    }\n";
    // The epilogue of each owned output.
    for i in 0..rm {
        let _ = writeln!(src, "    const {t} row{i} = m0 + ty * {rm}u + {i}u;");
    }
    for j in 0..rn {
        let _ = writeln!(src, "    const {t} col{j} = n0 + tx * {rn}u + {j}u;");
    }
    for i in 0..rm {
        for j in 0..rn {
            let o = format!("e * {} + row{i} * {} + col{j}", ix.lit(m * n), ix.lit(n));
            let _ = writeln!(
                src,
                "    if (row{i} < {} && col{j} < {}) {{\n        float v = c{i}{j};",
                ix.lit(m),
                ix.lit(n)
            );
            if epi.bias {
                let _ = writeln!(src, "        v = v + ld(bias, col{j});");
            }
            if epi.gelu {
                src += "        v = gelu_f(v);\n";
            }
            if epi.residual {
                let _ = writeln!(src, "        v = v + ld(res, {o});");
            }
            let _ = writeln!(src, "        st(out, {o}, v);\n    }}");
        }
    }
    src += "}\n";
    Ok(Kernel {
        name: name.to_string(),
        source: src,
        inputs: inputs.len(),
        grid,
        block: [THREADS as u32, THREADS as u32, 1],
        shared_bytes: 0,
    })
}

/// Words of padding per slab row (keeps rows 16-byte aligned).
const PAD: usize = 4;

/// `const float <v>0 .. <v>{w-1}`: a thread's `w` consecutive slab entries from
/// `<arr>[kk][<t> * w ..]`, in one vector load where `w` is 2 or 4.
fn vector_load(v: &str, arr: &str, t: &str, w: usize) -> String {
    let at = format!("&{arr}[kk][{t} * {w}u]");
    match w {
        4 => format!(
            "            const float4 {v}4 = *reinterpret_cast<const float4*>({at});\n            const float {v}0 = {v}4.x, {v}1 = {v}4.y, {v}2 = {v}4.z, {v}3 = {v}4.w;\n"
        ),
        2 => format!(
            "            const float2 {v}2 = *reinterpret_cast<const float2*>({at});\n            const float {v}0 = {v}2.x, {v}1 = {v}2.y;\n"
        ),
        _ => format!("            const float {v}0 = {arr}[kk][{t}];\n"),
    }
}

/// Statements staging one slab: `KS x tile` elements of operand `op` (its rows or
/// columns `t0..t0 + tile` along the tile's axis, `k0..k0 + KS` along K) into `dst`,
/// k-major, zero outside the matrix. `is_a`: the tile axis is A's rows (else B's
/// columns). Consecutive threads read consecutive addresses: the flat index runs along
/// whichever of the two axes is contiguous in memory.
#[allow(clippy::too_many_arguments)]
fn stage(
    dst: &str,
    buf: &str,
    off: &str,
    op: &Operand,
    t0: &str,
    tmax: usize,
    tile: usize,
    is_a: bool,
    k: usize,
    ix: Ix,
) -> String {
    // Strides along the tile axis and along K.
    let (ts, ks) = if is_a { (op.rs, op.cs) } else { (op.cs, op.rs) };
    let along_k = ks == 1 && ts != 1;
    let per = KS * tile / (THREADS * THREADS);
    let t = ix.ty();
    let mut s = String::new();
    for e in 0..per {
        let li = format!("flat + {}u", THREADS * THREADS * e);
        let (tt, kk) = if along_k {
            (format!("({li}) / {KS}u"), format!("({li}) % {KS}u"))
        } else {
            (format!("({li}) % {tile}u"), format!("({li}) / {tile}u"))
        };
        let _ = write!(
            s,
            "        {{\n            const unsigned t = {tt};\n            const unsigned kk = {kk};\n            const {t} tg = {t0} + t;\n            const {t} kg = k0 + kk;\n            float v = 0.0f;\n            if (tg < {tmax} && kg < {k}) {{\n                v = ld({buf}, {off} + {} + {});\n            }}\n            {dst}[kk][t] = v;\n        }}\n",
            ix.scaled("tg", ts),
            ix.scaled("kg", ks),
            tmax = ix.lit(tmax),
            k = ix.lit(k),
        );
    }
    s
}
