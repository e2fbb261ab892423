//! The fused attention backward (flash-attention style: no attention matrix in memory).
//!
//! `attention_lse(q, k[, z])`: one warp per query row, [`WARPS`] rows of one batch entry
//! per block; the block stages [`KC`] keys at a time in shared memory, lane `l` scores
//! key `l`, and the warp keeps a running maximum and per-lane sums (the forward kernel's
//! online softmax, with the sink `z` as the starting maximum); the row writes
//! `max + log(sum)`.
//!
//! `attention_grad(q, k, v, lse, delta, dO)`: one warp per output row, the row's vectors
//! in shared memory; the block stages [`KC`] rows of the other side at a time and lane
//! `l` takes pair `(row, l)`: the score `s = scale q . k`, `p = exp(s - lse)`, and the
//! pair's weight `w` (wrt q and k: `scale p (dO . v - delta)`; wrt v: `p`); the warp then
//! accumulates `sum_l w_l x_l` with lane `l` owning output columns `l, l + 32, ...`:
//!
//! | wrt | rows | staged per chunk | accumulated |
//! |---|---|---|---|
//! | q | query `i` (q_i, dO_i, lse_i, delta_i) | keys: k_j, v_j | k_j |
//! | k | key `j` (k_j, v_j) | queries: q_i, dO_i, lse_i, delta_i | q_i |
//! | v | key `j` (k_j) | queries: q_i, dO_i, lse_i | dO_i |
//!
//! Each of the three recomputes the scores (about 2 to 3 times the forward's work in
//! all); SIMT arithmetic, no tensor cores.

use eptc_ir::AttnWrt;

use super::cuda::{entry, grid_1d, lit, offsets, Ix};
use super::Kernel;

/// Rows (warps) per block.
pub const WARPS: usize = 8;
/// Rows of the other side per staged chunk (one per lane).
pub const KC: usize = 32;
/// The static shared memory a block may use.
pub const MAX_SHARED: usize = 48 * 1024;

/// Shapes and strides of one `attention_lse` or `attention_grad` node.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The leading axes of the output (all operands' broadcast).
    pub lead: Vec<usize>,
    /// Query rows, keys, feature dim of q and k, feature dim of v.
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub e: usize,
    pub scale: f32,
    /// Per operand, the strides between entries of `lead` (0 where broadcast): q, k and
    /// (for `attention_lse` with a sink) z; for `attention_grad` q, k, v, lse, delta, dO.
    pub leads: Vec<Vec<usize>>,
    /// With a sink: z's stride between query rows (0 when it broadcasts over them).
    pub z_row: usize,
    /// The largest tensor's element count (for the index type).
    pub max_numel: usize,
}

fn block_row(ix: Ix, rows: usize) -> (usize, String) {
    let nt = rows.div_ceil(WARPS);
    let t = ix.ty();
    (
        nt,
        format!(
            "    const unsigned lane = threadIdx.x & 31u, w = threadIdx.x >> 5;\n    const {t} blk = blockIdx.x;\n    const {t} e = blk / {nt_l};\n    const {t} row = (blk % {nt_l}) * {wl} + w;\n    const bool active = row < {r_l};\n",
            nt_l = ix.lit(nt),
            wl = ix.lit(WARPS),
            r_l = ix.lit(rows),
        ),
    )
}

/// `attention_lse` (`s.leads`: q, k[, z]).
pub fn lse(name: &str, s: &Spec) -> Result<Kernel, String> {
    let sink = s.leads.len() == 3;
    let (n, m, d) = (s.n, s.m, s.d);
    let d1 = d.max(1);
    let shared = 4 * (KC * (d1 + 1) + WARPS * d1);
    if shared > MAX_SHARED {
        return Err(format!(
            "head dim {d} needs {shared} bytes of shared memory, more than {MAX_SHARED}"
        ));
    }
    let nb: usize = s.lead.iter().product();
    let ix = Ix::for_numel(s.max_numel.max(nb * n));
    let t = ix.ty();
    let mut inputs = vec!["q", "k"];
    if sink {
        inputs.push("z");
    }
    let mut src = format!(
        "// {name}: attention log-normaliser, one warp per query row, {WARPS} rows per block ({nb} entries of {n} rows of {d} against {m} keys){}.\n",
        if sink { ", with a sink logit" } else { "" }
    );
    src += &entry(name, &inputs, "out");
    src += &format!(
        "    __shared__ float ks[{KC}][{}];\n    __shared__ float qs[{WARPS}][{d1}];\n",
        d1 + 1
    );
    let (nt, head) = block_row(ix, n);
    src += &head;
    let names = ["oq", "ok", "oz"];
    src += &offsets(
        ix,
        "l",
        "e",
        &s.lead,
        &s.leads,
        &names[..s.leads.len()],
        "    ",
    );
    src += &format!(
        "    if (active) {{\n        for (unsigned i = lane; i < {d}u; i += 32u) qs[w][i] = ld(q, oq + row * {dl} + i);\n    }}\n",
        dl = ix.lit(d)
    );
    if sink {
        src += &format!(
            "    const float z0 = active ? ld(z, oz + {}) : 0.0f;\n    float mx = z0;\n    // exp(z - z): 1 for a finite z, NaN for +inf or NaN, 0 for -inf (no sink).\n    float l = lane != 0u ? 0.0f : (z0 == NEG_INF ? 0.0f : (is_finite_f(z0) ? 1.0f : QNAN));\n",
            ix.scaled("row", s.z_row)
        );
    } else {
        src += "    float mx = NEG_INF;\n    float l = 0.0f;\n";
    }
    src += &format!(
        "    for ({t} j0 = 0; j0 < {m_l}; j0 += {KC}u) {{
        const unsigned kc = ({m_l} - j0) < {KC}u ? (unsigned)({m_l} - j0) : {KC}u;
        __syncthreads();
        for (unsigned f = threadIdx.x; f < kc * {d}u; f += {bt}u) {{
            ks[f / {d1}u][f % {d1}u] = ld(k, ok + j0 * {dl} + f);
        }}
        __syncthreads();
        if (active) {{
            float sc = NEG_INF;
            if (lane < kc) {{
                float dot = 0.0f;
                for (unsigned i = 0; i < {d}u; ++i) dot += qs[w][i] * ks[lane][i];
                sc = dot * {scale};
            }}
            const float cm = warp_max(sc > NEG_INF ? sc : NEG_INF);
            const float mn = cm > mx ? cm : mx;
            const float corr = mx == mn ? 1.0f : expf(mx - mn);
            const float p = (lane < kc && sc != NEG_INF) ? expf(sc - mn) : 0.0f;
            l = l * corr + p;
            mx = mn;
        }}
    }}
    if (active) {{
        l = warp_sum(l);
        if (lane == 0u) st(out, e * {n_l} + row, mx + logf(l));
    }}
}}
",
        m_l = ix.lit(m),
        dl = ix.lit(d),
        bt = 32 * WARPS,
        scale = lit(s.scale),
        n_l = ix.lit(n),
    );
    Ok(Kernel {
        name: name.to_string(),
        source: src,
        inputs: inputs.len(),
        grid: grid_1d(nb * nt)?,
        block: [(32 * WARPS) as u32, 1, 1],
        shared_bytes: 0,
    })
}

/// `attention_grad` with respect to `wrt` (`s.leads`: q, k, v, lse, delta, dO).
pub fn grad(name: &str, s: &Spec, wrt: AttnWrt) -> Result<Kernel, String> {
    let (n, m, d, e) = (s.n, s.m, s.d, s.e);
    let (d1, e1) = (d.max(1), e.max(1));
    // Rows, their width, and the row vectors: (name, dim, operand, its offset, its
    // row length).
    let (rows, width) = match wrt {
        AttnWrt::Q => (n, d),
        AttnWrt::K => (m, d),
        AttnWrt::V => (m, e),
    };
    let by_query = wrt == AttnWrt::Q;
    let with_dp = wrt != AttnWrt::V;
    let shared = 4
        * (KC * (d1 + 1)
            + KC * (e1 + 1)
            + 2 * KC
            + WARPS * (d1 + if with_dp { e1 } else { 0 })
            + WARPS * KC);
    if shared > MAX_SHARED {
        return Err(format!(
            "head dims {d} (q, k) and {e} (v) need {shared} bytes of shared memory, more than {MAX_SHARED}"
        ));
    }
    let nb: usize = s.lead.iter().product();
    let ix = Ix::for_numel(s.max_numel.max(nb * rows * width));
    let t = ix.ty();
    let inputs = ["q", "k", "v", "lse", "delta", "dout"];
    let mut src = format!(
        "// {name}: attention gradient wrt {}, one warp per row of the gradient, {WARPS} rows per block ({nb} entries of {rows} rows of {width}; {n} queries, {m} keys, head dims {d} and {e}).\n",
        wrt.name()
    );
    src += &entry(name, &inputs, "out");
    src += &format!(
        "    __shared__ float sa[{KC}][{}];\n    __shared__ float sb[{KC}][{}];\n    __shared__ float sl[{KC}];\n    __shared__ float sd[{KC}];\n    __shared__ float ra[{WARPS}][{d1}];\n    __shared__ float ps[{WARPS}][{KC}];\n",
        d1 + 1,
        e1 + 1
    );
    if with_dp {
        src += &format!("    __shared__ float rb[{WARPS}][{e1}];\n");
    }
    let (nt, head) = block_row(ix, rows);
    src += &head;
    src += &offsets(
        ix,
        "l",
        "e",
        &s.lead,
        &s.leads,
        &["oq", "ok", "ov", "olse", "odl", "odo"],
        "    ",
    );
    let (dl, el) = (ix.lit(d), ix.lit(e));
    // The row's vectors (and, by query, its lse and delta).
    let (ra_src, rb_src, sa_src, sb_src) = if by_query {
        (
            format!("ld(q, oq + row * {dl} + i)"),
            format!("ld(dout, odo + row * {el} + i)"),
            format!("ld(k, ok + c0 * {dl} + f)"),
            format!("ld(v, ov + c0 * {el} + f)"),
        )
    } else {
        (
            format!("ld(k, ok + row * {dl} + i)"),
            format!("ld(v, ov + row * {el} + i)"),
            format!("ld(q, oq + c0 * {dl} + f)"),
            format!("ld(dout, odo + c0 * {el} + f)"),
        )
    };
    src += &format!(
        "    if (active) {{\n        for (unsigned i = lane; i < {d}u; i += 32u) ra[w][i] = {ra_src};\n"
    );
    if with_dp {
        src +=
            &format!("        for (unsigned i = lane; i < {e}u; i += 32u) rb[w][i] = {rb_src};\n");
    }
    src += "    }\n";
    if by_query {
        src += "    const float lse_r = active ? ld(lse, olse + row) : 0.0f;\n    const float dl_r = active ? ld(delta, odl + row) : 0.0f;\n";
    }
    let et = width.div_ceil(32).max(1);
    src += &format!(
        "    float acc[{et}];\n#pragma unroll\n    for (int t = 0; t < {et}; ++t) acc[t] = 0.0f;\n"
    );
    let cols = if by_query { m } else { n };
    // The pair's weight.
    let (lse_c, dl_c) = if by_query {
        ("lse_r", "dl_r")
    } else {
        ("sl[lane]", "sd[lane]")
    };
    let weight = if with_dp {
        format!(
            "float dp = 0.0f;\n                for (unsigned i = 0; i < {e}u; ++i) dp += rb[w][i] * sb[lane][i];\n                wt = {scale} * p * (dp - {dl_c});",
            scale = lit(s.scale)
        )
    } else {
        "wt = p;".to_string()
    };
    // What the weights multiply: sa (k or q rows, width d) or sb (dO rows, width e).
    let acc_src = if wrt == AttnWrt::V { "sb" } else { "sa" };
    let acc_step = if width.is_multiple_of(32) {
        format!("acc[t] += pj * {acc_src}[j][lane + 32u * (unsigned)t];")
    } else {
        format!(
            "const unsigned c = lane + 32u * (unsigned)t;\n                    if (c < {width}u) acc[t] += pj * {acc_src}[j][c];"
        )
    };
    let stage_rows = if by_query {
        String::new()
    } else {
        format!(
            "        if (threadIdx.x < kc) {{\n            sl[threadIdx.x] = ld(lse, olse + c0 + threadIdx.x);\n            sd[threadIdx.x] = {};\n        }}\n",
            if with_dp {
                "ld(delta, odl + c0 + threadIdx.x)"
            } else {
                "0.0f"
            }
        )
    };
    src += &format!(
        "    for ({t} c0 = 0; c0 < {c_l}; c0 += {KC}u) {{
        const unsigned kc = ({c_l} - c0) < {KC}u ? (unsigned)({c_l} - c0) : {KC}u;
        __syncthreads();
        for (unsigned f = threadIdx.x; f < kc * {d}u; f += {bt}u) {{
            sa[f / {d1}u][f % {d1}u] = {sa_src};
        }}
        for (unsigned f = threadIdx.x; f < kc * {e}u; f += {bt}u) {{
            sb[f / {e1}u][f % {e1}u] = {sb_src};
        }}
{stage_rows}        __syncthreads();
        if (active) {{
            float wt = 0.0f;
            if (lane < kc) {{
                float dot = 0.0f;
                for (unsigned i = 0; i < {d}u; ++i) dot += ra[w][i] * sa[lane][i];
                const float p = expf(dot * {scale} - {lse_c});
                {weight}
            }}
            ps[w][lane] = wt;
            __syncwarp();
            for (unsigned j = 0; j < kc; ++j) {{
                const float pj = ps[w][j];
#pragma unroll
                for (int t = 0; t < {et}; ++t) {{
                    {acc_step}
                }}
            }}
            __syncwarp();
        }}
    }}
",
        c_l = ix.lit(cols),
        bt = 32 * WARPS,
        scale = lit(s.scale),
    );
    let store = if width.is_multiple_of(32) {
        "st(out, ob + lane + 32u * (unsigned)t, acc[t]);".to_string()
    } else {
        format!(
            "const unsigned c = lane + 32u * (unsigned)t;\n            if (c < {width}u) st(out, ob + c, acc[t]);"
        )
    };
    src += &format!(
        "    if (active) {{
        const {t} ob = (e * {r_l} + row) * {w_l};
#pragma unroll
        for (int t = 0; t < {et}; ++t) {{
            {store}
        }}
    }}
}}
",
        r_l = ix.lit(rows),
        w_l = ix.lit(width),
    );
    Ok(Kernel {
        name: name.to_string(),
        source: src,
        inputs: inputs.len(),
        grid: grid_1d(nb * nt)?,
        block: [(32 * WARPS) as u32, 1, 1],
        shared_bytes: 0,
    })
}
