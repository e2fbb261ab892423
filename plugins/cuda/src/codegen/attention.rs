//! Fused attention `softmax_sink(scale * q k^T, z) v`: one warp per query row, [`WARPS`]
//! rows of one batch entry per block. The block stages the keys and values through
//! shared memory [`KC`] keys at a time; in a chunk, lane `l` scores key `l` (a full dot
//! product with the query row, which is held in registers when short), the warp takes
//! the chunk's maximum by shuffles and rescales its running state (online softmax:
//! running maximum `mx`, per-lane partial sums `l`, the output row accumulated with
//! lane `l` owning columns `l, l + 32, ...`). With a sink the row starts from `mx = z`
//! and `l = exp(z - z)` (on one lane), so `z` takes part in the normalisation but has no
//! value vector. At the end `out = acc / sum(l)`.

use super::cuda::{entry, grid_1d, lit, offsets, Ix};
use super::Kernel;

/// Query rows (warps) per block.
pub const WARPS: usize = 8;
/// Keys per staged chunk (one per lane).
pub const KC: usize = 32;
/// The longest query row kept in registers (longer ones go to shared memory).
pub const MAX_Q_REGS: usize = 64;
/// The static shared memory a block may use.
pub const MAX_SHARED: usize = 48 * 1024;

/// Shapes and strides of one attention node.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The leading axes of the output.
    pub lead: Vec<usize>,
    /// Query rows, keys, feature dim of q and k, feature dim of v.
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub e: usize,
    pub scale: f32,
    /// Per operand (q, k, v), the strides between entries of `lead` (0 if broadcast).
    pub q_lead: Vec<usize>,
    pub k_lead: Vec<usize>,
    pub v_lead: Vec<usize>,
    /// With a sink: the strides reading z broadcast to `lead ++ [n]`.
    pub z: Option<Vec<usize>>,
    /// The largest operand's element count (for the index type).
    pub max_numel: usize,
}

/// Whether the scores read the keys with `float4` loads (query row in registers, `d` a
/// multiple of 4).
fn vector_keys(d: usize) -> bool {
    d > 0 && d <= MAX_Q_REGS && d.is_multiple_of(4)
}

/// The row length of the staged keys: `d + 1` (lane `l` reading word `i` of row `l`
/// hits bank `l + i`), or with `float4` loads the least multiple of 4 that is at least
/// `d` and 4 more than a multiple of 32 (the 8 lanes of each quarter-warp then read
/// disjoint banks).
fn key_stride(d: usize) -> usize {
    if vector_keys(d) {
        d + (36 - d % 32) % 32
    } else {
        d + 1
    }
}

/// Static shared memory of the kernel for `s`, in bytes.
pub fn shared_bytes(s: &Spec) -> usize {
    let q = if s.d > MAX_Q_REGS { WARPS * s.d } else { 0 };
    4 * (KC * key_stride(s.d) + KC * s.e.max(1) + q + WARPS * KC)
}

pub fn attention(name: &str, s: &Spec) -> Result<Kernel, String> {
    let shared = shared_bytes(s);
    if shared > MAX_SHARED {
        return Err(format!(
            "head dims {} (q, k) and {} (v) need {shared} bytes of shared memory, more than {MAX_SHARED}",
            s.d, s.e
        ));
    }
    let nb: usize = s.lead.iter().product();
    let nt = s.n.div_ceil(WARPS);
    let grid = grid_1d(nb * nt)?;
    let out_numel = nb * s.n * s.e;
    let ix = Ix::for_numel(s.max_numel.max(out_numel));
    let t = ix.ty();
    let mut inputs = vec!["q", "k", "v"];
    if s.z.is_some() {
        inputs.push("z");
    }
    let (d, m, e) = (s.d, s.m, s.e);
    let mut src = format!(
        "// {name}: attention, one warp per query row, {WARPS} rows per block ({nb} entries of {n} rows of {d} against {m} keys, {e} outputs){}.\n",
        if s.z.is_some() { ", with a sink logit" } else { "" },
        n = s.n,
    );
    src += &entry(name, &inputs, "out");
    let q_regs = d <= MAX_Q_REGS;
    src += &format!(
        "    __shared__ __align__(16) float ks[{KC}][{}];\n    __shared__ float vs[{KC}][{}];\n    __shared__ float ps[{WARPS}][{KC}];\n",
        key_stride(d),
        e.max(1)
    );
    if !q_regs {
        src += &format!("    __shared__ float qs[{WARPS}][{d}];\n");
    }
    src += &format!(
        "    const unsigned lane = threadIdx.x & 31u, w = threadIdx.x >> 5;\n    const {t} blk = blockIdx.x;\n    const {t} e = blk / {nt_l};\n    const {t} row = (blk % {nt_l}) * {wl} + w;\n    const bool active = row < {n_l};\n",
        nt_l = ix.lit(nt),
        wl = ix.lit(WARPS),
        n_l = ix.lit(s.n),
    );
    let mut sets = vec![s.q_lead.clone(), s.k_lead.clone(), s.v_lead.clone()];
    let mut names = vec!["oq", "ok", "ov"];
    if let Some(z) = &s.z {
        sets.push(z[..s.lead.len()].to_vec());
        names.push("oz");
    }
    src += &offsets(ix, "l", "e", &s.lead, &sets, &names, "    ");
    src += &format!("    const {t} qrow = oq + row * {};\n", ix.lit(d));
    // The query row.
    if d > 0 {
        if q_regs {
            src += &format!(
                "    float qr[{d}];\n#pragma unroll\n    for (int i = 0; i < {d}; ++i) {{\n        qr[i] = active ? ld(q, qrow + i) : 0.0f;\n    }}\n"
            );
        } else {
            src += &format!(
                "    if (active) {{\n        for (unsigned i = lane; i < {d}u; i += 32u) {{\n            qs[w][i] = ld(q, qrow + i);\n        }}\n    }}\n"
            );
        }
    }
    // The running state.
    match &s.z {
        Some(z) => {
            let zn = z[s.lead.len()];
            src += &format!(
                "    const float z0 = active ? ld(z, oz + {}) : 0.0f;\n    float mx = z0;\n    // exp(z - z): 1 for a finite z, NaN for +inf or NaN, 0 for -inf (no sink).\n    float l = lane != 0u ? 0.0f : (z0 == NEG_INF ? 0.0f : (is_finite_f(z0) ? 1.0f : QNAN));\n",
                ix.scaled("row", zn)
            );
        }
        None => src += "    float mx = NEG_INF;\n    float l = 0.0f;\n",
    }
    let et = e.div_ceil(32).max(1);
    src += &format!(
        "    float acc[{et}];\n#pragma unroll\n    for (int t = 0; t < {et}; ++t) {{\n        acc[t] = 0.0f;\n    }}\n"
    );
    let dot_src = if d == 0 {
        String::new()
    } else if vector_keys(d) {
        format!(
            "#pragma unroll\n                for (int i = 0; i < {d}; i += 4) {{\n                    const float4 k4 = *reinterpret_cast<const float4*>(&ks[lane][i]);\n                    dot += qr[i] * k4.x;\n                    dot += qr[i + 1] * k4.y;\n                    dot += qr[i + 2] * k4.z;\n                    dot += qr[i + 3] * k4.w;\n                }}\n"
        )
    } else if q_regs {
        format!(
            "#pragma unroll\n                for (int i = 0; i < {d}; ++i) {{\n                    dot += qr[i] * ks[lane][i];\n                }}\n"
        )
    } else {
        format!(
            "                for (int i = 0; i < {d}; ++i) {{\n                    dot += qs[w][i] * ks[lane][i];\n                }}\n"
        )
    };
    let col_guard = !e.is_multiple_of(32);
    let acc_step = if col_guard {
        format!(
            "const unsigned c = lane + 32u * (unsigned)t;\n                    if (c < {e}u) acc[t] += pj * vs[j][c];"
        )
    } else {
        "acc[t] += pj * vs[j][lane + 32u * (unsigned)t];".to_string()
    };
    src += &format!(
        "    for ({t} j0 = 0; j0 < {m_l}; j0 += {KC}u) {{
        const unsigned kc = ({m_l} - j0) < {KC}u ? (unsigned)({m_l} - j0) : {KC}u;
        __syncthreads();
        for (unsigned f = threadIdx.x; f < kc * {d}u; f += {bt}u) {{
            ks[f / {d1}u][f % {d1}u] = ld(k, ok + j0 * {d_l} + f);
        }}
        for (unsigned f = threadIdx.x; f < kc * {e}u; f += {bt}u) {{
            vs[f / {e}u][f % {e}u] = ld(v, ov + j0 * {e_l} + f);
        }}
        __syncthreads();
        if (active) {{
            float sc = NEG_INF;
            if (lane < kc) {{
                float dot = 0.0f;
{dot_src}                sc = dot * {scale};
            }}
            // The chunk's maximum, NaN ignored (a NaN score poisons l through p).
            const float cm = warp_max(sc > NEG_INF ? sc : NEG_INF);
            const float mn = cm > mx ? cm : mx;
            const float corr = mx == mn ? 1.0f : expf(mx - mn);
            // -inf scores (masks) contribute 0 even while the running max is -inf.
            const float p = (lane < kc && sc != NEG_INF) ? expf(sc - mn) : 0.0f;
            l = l * corr + p;
            ps[w][lane] = p;
            __syncwarp();
#pragma unroll
            for (int t = 0; t < {et}; ++t) {{
                acc[t] *= corr;
            }}
            for (unsigned j = 0; j < kc; ++j) {{
                const float pj = ps[w][j];
#pragma unroll
                for (int t = 0; t < {et}; ++t) {{
                    {acc_step}
                }}
            }}
            __syncwarp();
            mx = mn;
        }}
    }}
",
        m_l = ix.lit(m),
        d1 = d.max(1),
        d_l = ix.lit(d),
        e_l = ix.lit(e),
        bt = 32 * WARPS,
        scale = lit(s.scale),
    );
    // No keys: the product with an empty v is 0 (as the CPU reference computes it).
    let inv = if m == 0 { "0.0f" } else { "1.0f / l" };
    let store = if col_guard {
        format!(
            "const unsigned c = lane + 32u * (unsigned)t;\n            if (c < {e}u) st(out, ob + c, acc[t] * inv);"
        )
    } else {
        "st(out, ob + lane + 32u * (unsigned)t, acc[t] * inv);".to_string()
    };
    src += &format!(
        "    if (active) {{
        l = warp_sum(l);
        const float inv = {inv};
        const {t} ob = (e * {n_l} + row) * {e_l};
#pragma unroll
        for (int t = 0; t < {et}; ++t) {{
            {store}
        }}
    }}
}}
",
        n_l = ix.lit(s.n),
        e_l = ix.lit(e),
    );
    Ok(Kernel {
        name: name.to_string(),
        source: src,
        inputs: inputs.len(),
        grid,
        block: [(32 * WARPS) as u32, 1, 1],
        shared_bytes: 0,
    })
}
