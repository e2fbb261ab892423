//! The flash-style attention backward (`attention_grad`) on the tensor cores, for 16-bit
//! storage: the SIMT kernels' math ([`super::attention_grad`]) with every product on
//! `mma.sync.m16n8k16` (f32 accumulation), the forward's tiling
//! ([`super::attention_mma`]).
//!
//! A block of 4 warps owns 64 rows of the gradient (16 per warp): query rows for `wrt =
//! q`, key rows for `k` and `v`. It stages the other side 64 rows at a time in shared
//! memory and each warp, with its rows' operands held as A fragments in registers,
//!
//! 1. computes the scores `S = scale A1 X1ᵀ` of its 16 rows against the 64 staged ones
//!    (`wrt = q`: A1 = q, X1 = k; else A1 = k, X1 = q, so `S` is the transposed score
//!    block) and `p = exp(S - lse)` (`lse` per query: per row for q, per staged column
//!    for k and v);
//! 2. for q and k, `dP = A2 X2ᵀ` (q: A2 = dO, X2 = v; k: A2 = v, X2 = dO) and the weight
//!    `w = scale p (dP - delta)`; for v the weight is `p`;
//! 3. accumulates `w Y` with the weights, rounded to the storage type, as the A operand
//!    straight from the accumulators and Y the staged rows read as B (q: Y = k; k: Y = q;
//!    v: Y = dO).
//!
//! | wrt | rows | A1, A2 | staged X1, X2 | accumulated Y | lse, delta |
//! |---|---|---|---|---|---|
//! | q | queries | q, dO | k, v | k | per row |
//! | k | keys | k, v | q, dO | q | per staged column |
//! | v | keys | k | q, dO | dO | per staged column (lse) |
//!
//! Needs both head dims multiples of 16 up to [`MAX_DIM`] and at least one query and key.

use eptc_ir::{AttnWrt, DType};

use super::attention_grad::Spec;
// The forward's tiling: warps and rows per block, staged rows per tile, the largest head
// dim, the padding of staged rows.
use super::attention_mma::{a_fragments, scores, stage, warp_rows, weighted_sum, Rows};
use super::attention_mma::{BM, BN, MAX_DIM, PAD, WARPS};
use super::cuda::{entry, grid_1d, lit, offsets, Ix};
use super::Kernel;

/// Whether the tensor-core kernel takes this `attention_grad` stored as `dtype`.
pub fn eligible(s: &Spec, dtype: DType) -> bool {
    let dim = |x: usize| x > 0 && x.is_multiple_of(16) && x <= MAX_DIM;
    matches!(dtype, DType::BF16 | DType::F16) && dim(s.d) && dim(s.e) && s.n > 0 && s.m > 0
}

/// The kernel for `s` with contiguous operands.
pub fn grad(name: &str, s: &Spec, wrt: AttnWrt, dtype: DType) -> Result<Kernel, String> {
    let rows = Rows {
        offset: [0; 3],
        row: [s.d, s.d, s.e],
    };
    grad_rows(name, s, wrt, dtype, &rows)
}

/// The kernel for `s` reading q, k and v where `rows` says (lse, delta and dO
/// contiguous; `s.max_numel` must cover every element read).
pub fn grad_rows(
    name: &str,
    s: &Spec,
    wrt: AttnWrt,
    dtype: DType,
    rows_of: &Rows,
) -> Result<Kernel, String> {
    if rows_of.row[0] < s.d || rows_of.row[1] < s.d || rows_of.row[2] < s.e {
        return Err(format!("rows {:?} shorter than the head dims", rows_of.row));
    }
    if !eligible(s, dtype) {
        return Err(format!(
            "the tensor-core attention gradient takes 16-bit storage and head dims that are multiples of 16 up to {MAX_DIM}; not {dtype} with d {}, e {}",
            s.d, s.e
        ));
    }
    let (n, m, d, e) = (s.n, s.m, s.d, s.e);
    let by_query = wrt == AttnWrt::Q;
    let with_dp = wrt != AttnWrt::V;
    let (rows, cols, width) = match wrt {
        AttnWrt::Q => (n, m, d),
        AttnWrt::K => (m, n, d),
        AttnWrt::V => (m, n, e),
    };
    let nb: usize = s.lead.iter().product();
    let nt = rows.div_ceil(BM);
    let ix = Ix::for_numel(s.max_numel.max(nb * rows * width));
    let t = ix.ty();
    let inputs = ["q", "k", "v", "lse", "delta", "dout"];
    let mut src = format!(
        "// {name}: attention gradient wrt {} on the tensor cores (mma.m16n8k16, 16-bit operands, f32 accumulation), {BM} rows per block of {WARPS} warps, the other side in tiles of {BN} ({nb} entries of {rows} rows of {width}; {n} queries, {m} keys, head dims {d} and {e}){}.\n",
        wrt.name(),
        rows_of.note(&Rows {
            offset: [0; 3],
            row: [d, d, e],
        })
    );
    src += &entry(name, &inputs, "out");
    // X1 (width d) and X2 (width e): k and v by query, q and dO by key.
    src += &format!(
        "    __shared__ __align__(16) unsigned short x1[{BN}][{}];\n    __shared__ __align__(16) unsigned short x2[{BN}][{}];\n",
        d + PAD,
        e + PAD
    );
    if !by_query {
        src += &format!("    __shared__ float sl[{BN}];\n    __shared__ float sd[{BN}];\n");
    }
    src += &warp_rows(ix, nt, rows);
    src += &offsets(
        ix,
        "l",
        "e",
        &s.lead,
        &s.leads,
        &["oq", "ok", "ov", "olse", "odl", "odo"],
        "    ",
    );
    // Each operand: its pointer, its entry's first element, the stride between its rows.
    let at = |i: usize, o: &str| {
        if rows_of.offset[i] == 0 {
            o.to_string()
        } else {
            format!("{} + {o}", ix.lit(rows_of.offset[i]))
        }
    };
    let (q, k, v) = (
        ("q", at(0, "oq"), rows_of.row[0]),
        ("k", at(1, "ok"), rows_of.row[1]),
        ("v", at(2, "ov"), rows_of.row[2]),
    );
    let dout = ("dout", "odo".to_string(), e);
    let (a1, a2, x1, x2) = if by_query {
        (q, dout, k, v)
    } else {
        (k, v, q, dout)
    };
    src += &a_fragments(ix, "f1", a1.0, &a1.1, d, a1.2);
    if with_dp {
        src += &a_fragments(ix, "f2", a2.0, &a2.1, e, a2.2);
    }
    if by_query {
        src += "    const float la = va ? ld(lse, olse + ra) : 0.0f, lb = vb ? ld(lse, olse + rb) : 0.0f;\n    const float da = va ? ld(delta, odl + ra) : 0.0f, db = vb ? ld(delta, odl + rb) : 0.0f;\n";
    }
    let nw = width / 8;
    src += &format!(
        "    float acc[{nw}][4];
#pragma unroll
    for (int j = 0; j < {nw}; ++j) {{
        acc[j][0] = 0.0f; acc[j][1] = 0.0f; acc[j][2] = 0.0f; acc[j][3] = 0.0f;
    }}
"
    );
    let stage_x1 = stage(
        ix,
        x1.0,
        &format!("{} + c0 * {}", x1.1, ix.lit(x1.2)),
        "x1",
        d,
        x1.2,
    );
    let stage_x2 = stage(
        ix,
        x2.0,
        &format!("{} + c0 * {}", x2.1, ix.lit(x2.2)),
        "x2",
        e,
        x2.2,
    );
    let stage_vec = if by_query {
        String::new()
    } else {
        format!(
            "        if (threadIdx.x < {BN}u) {{
            sl[threadIdx.x] = threadIdx.x < kc ? ld(lse, olse + c0 + threadIdx.x) : 0.0f;
            sd[threadIdx.x] = {};
        }}
",
            if with_dp {
                "threadIdx.x < kc ? ld(delta, odl + c0 + threadIdx.x) : 0.0f"
            } else {
                "0.0f"
            }
        )
    };
    // lse and delta of element i of block j.
    let (lse_of, dl_of) = if by_query {
        ("(i < 2 ? la : lb)", "(i < 2 ? da : db)")
    } else {
        ("sl[col]", "sd[col]")
    };
    let dp_src = if with_dp {
        format!(
            "            float dp[{nj}][4];\n{}",
            scores("dp", "f2", "x2", e),
            nj = BN / 8
        )
    } else {
        String::new()
    };
    let weight = if with_dp {
        format!("{scale} * p * (dp[j][i] - {dl_of})", scale = lit(s.scale))
    } else {
        "p".to_string()
    };
    // Y, the staged rows the weights multiply: x1 (k or q) for q and k, x2 (dO) for v.
    let y = if wrt == AttnWrt::V { "x2" } else { "x1" };
    src += &format!(
        "    for ({t} c0 = 0; c0 < {c_l}; c0 += {BN}u) {{
        const unsigned kc = ({c_l} - c0) < {BN}u ? (unsigned)({c_l} - c0) : {BN}u;
        __syncthreads();
{stage_x1}{stage_x2}{stage_vec}        __syncthreads();
        if (live) {{
            float sc[{nj}][4];
{sc_src}{dp_src}            // The weights, in place of the scores; columns past kc weigh 0.
#pragma unroll
            for (int j = 0; j < {nj}; ++j) {{
#pragma unroll
                for (int i = 0; i < 4; ++i) {{
                    const unsigned col = (unsigned)(j * 8) + 2u * tg + (unsigned)(i & 1);
                    float wt = 0.0f;
                    if (col < kc) {{
                        const float p = expf(sc[j][i] * {scale} - {lse_of});
                        wt = {weight};
                    }}
                    sc[j][i] = wt;
                }}
            }}
{wy}        }}
    }}
    if (live) {{
        const {t} oa = (e * {r_l} + ra) * {w_l}, ob = (e * {r_l} + rb) * {w_l};
#pragma unroll
        for (int j = 0; j < {nw}; ++j) {{
            const unsigned c = (unsigned)(j * 8) + 2u * tg;
            if (va) {{
                st(out, oa + c, acc[j][0]);
                st(out, oa + c + 1u, acc[j][1]);
            }}
            if (vb) {{
                st(out, ob + c, acc[j][2]);
                st(out, ob + c + 1u, acc[j][3]);
            }}
        }}
    }}
}}
",
        c_l = ix.lit(cols),
        nj = BN / 8,
        sc_src = scores("sc", "f1", "x1", d),
        wy = weighted_sum("sc", y, nw),
        scale = lit(s.scale),
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
