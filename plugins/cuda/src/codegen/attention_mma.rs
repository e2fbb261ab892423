//! Fused attention `softmax_sink(scale * q k^T, z) v` on the tensor cores, for 16-bit
//! storage (bf16 or f16): flash-attention style, the scores never leave registers.
//!
//! A block of [`WARPS`] warps takes [`BM`] query rows of one batch entry, 16 rows per
//! warp; it stages [`BN`] keys and values at a time in shared memory (16-bit, rows padded
//! by 8 elements so the fragment loads of a warp hit distinct banks) and each warp
//!
//! 1. computes its 16 x [`BN`] scores with `mma.sync.m16n8k16` (f32 accumulation), the
//!    query fragments held in registers for the whole kernel;
//! 2. takes the row maxima by two shuffles within each group of 4 lanes (the lanes that
//!    share a row), rescales its running state (online softmax) and exponentiates;
//! 3. feeds the probabilities, rounded to the storage type, straight back as the A
//!    operand of `P V` (the accumulator layout of the scores is the A layout of the
//!    next product), accumulating the 16 x e output in f32 registers.
//!
//! With a sink the row starts from `max = z` and `sum = exp(z - z)`, as the SIMT kernel
//! does ([`super::attention`]); the probabilities' sum is kept in f32 before rounding.
//! Keys past the end of the last tile score `-inf`; their 8-key column blocks and 16-key
//! steps are skipped. Needs `d` a multiple of 16, `e` a multiple of 8, both at most
//! [`MAX_DIM`], at least one key, and sm_80 or newer.
//!
//! Fragment layouts of `mma.m16n8k16` (PTX ISA, "Matrix Fragments for mma.m16n8k16"),
//! with `g = lane / 4` and `t = lane % 4`: A (16 x 16) registers hold the pairs `(g, 2t)`,
//! `(g + 8, 2t)`, `(g, 2t + 8)`, `(g + 8, 2t + 8)` (each with the next column in the high
//! half); B (16 x 8) registers the pairs of rows `(2t, g)` and `(2t + 8, g)` (with the
//! next row in the high half); the f32 accumulator `(g, 2t)`, `(g, 2t + 1)`, `(g + 8,
//! 2t)`, `(g + 8, 2t + 1)`.

use eptc_ir::DType;

use super::attention::Spec;
use super::cuda::{entry, grid_1d, lit, offsets, Ix};
use super::{Kernel, OperandView};

/// Warps per block.
pub const WARPS: usize = 4;
/// Query rows per block (16 per warp).
pub const BM: usize = 16 * WARPS;
/// Keys per staged tile.
pub const BN: usize = 64;
/// The largest head dim (q, k and v) the registers hold.
pub const MAX_DIM: usize = 128;
/// Elements of padding per staged row.
pub(super) const PAD: usize = 8;

/// Whether the tensor-core kernel takes attention `s` stored as `dtype`.
pub fn eligible(s: &Spec, dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
        && s.d > 0
        && s.d.is_multiple_of(16)
        && s.d <= MAX_DIM
        && s.e > 0
        && s.e.is_multiple_of(8)
        && s.e <= MAX_DIM
        && s.m > 0
}

/// Where the kernel reads q, k and v: per operand the element offset of its first row
/// and the stride between rows (the feature dim when contiguous). Rows themselves are
/// contiguous; [`Spec`]'s lead strides step between matrices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rows {
    pub offset: [usize; 3],
    pub row: [usize; 3],
}

impl Rows {
    /// The header comment's note on where the operands are read, empty when they are
    /// read as `plain` says (contiguous from their start).
    pub(super) fn note(&self, plain: &Rows) -> String {
        if self == plain {
            String::new()
        } else {
            format!(
                "; q, k, v read in place at offsets {:?}, rows {:?} apart",
                self.offset, self.row
            )
        }
    }

    /// Contiguous rows from the start of each operand.
    pub fn contiguous(s: &Spec) -> Rows {
        Rows {
            offset: [0; 3],
            row: [s.d, s.d, s.e],
        }
    }
}

/// The loop that stages `rows` (at most [`BN`]) rows of `width` 16-bit elements of `src`,
/// `stride` apart from element `base`, into the shared array `dst`; rows past `rows` are
/// zero. 16-byte copies where `src + base` is 16-byte aligned and `stride` a multiple of
/// 8 (every row then is: `width` is a multiple of 8), else element by element.
pub(super) fn stage(
    ix: Ix,
    src: &str,
    base: &str,
    dst: &str,
    width: usize,
    stride: usize,
) -> String {
    let t = ix.ty();
    let v = width / 8;
    let sl = ix.lit(stride);
    let scalar = format!(
        "            for (unsigned f = threadIdx.x; f < {BN}u * {width}u; f += {bt}u) {{
                const unsigned r = f / {width}u, c = f % {width}u;
                {dst}[r][c] = r < kc ? {src}[{base} + ({t})r * {sl} + c] : (unsigned short)0u;
            }}
",
        bt = 32 * WARPS,
    );
    if !stride.is_multiple_of(8) {
        return format!(
            "        {{
{scalar}        }}
"
        );
    }
    format!(
        "        if ((reinterpret_cast<unsigned long long>({src} + {base}) & 15ull) == 0ull) {{
            for (unsigned f = threadIdx.x; f < {BN}u * {v}u; f += {bt}u) {{
                const unsigned r = f / {v}u, c = (f % {v}u) * 8u;
                uint4 x;
                x.x = 0u; x.y = 0u; x.z = 0u; x.w = 0u;
                if (r < kc) x = *reinterpret_cast<const uint4*>({src} + {base} + ({t})r * {sl} + c);
                *reinterpret_cast<uint4*>(&{dst}[r][c]) = x;
            }}
        }} else {{
{scalar}        }}
",
        bt = 32 * WARPS,
    )
}

/// A fragments of `dim / 16` k-steps for rows `ra`, `rb` of `src` (rows `row` apart from
/// element `base`), zero for rows past the end.
pub(super) fn a_fragments(
    ix: Ix,
    var: &str,
    src: &str,
    base: &str,
    dim: usize,
    row: usize,
) -> String {
    let t = ix.ty();
    format!(
        "    unsigned {var}[{k}][4];
#pragma unroll
    for (int kk = 0; kk < {k}; ++kk) {{
        const {t} c = ({t})(kk * 16) + 2u * tg;
        const {t} xa = {base} + ra * {dl} + c, xb = {base} + rb * {dl} + c;
        {var}[kk][0] = va ? ((unsigned){src}[xa] | ((unsigned){src}[xa + 1u] << 16)) : 0u;
        {var}[kk][1] = vb ? ((unsigned){src}[xb] | ((unsigned){src}[xb + 1u] << 16)) : 0u;
        {var}[kk][2] = va ? ((unsigned){src}[xa + 8u] | ((unsigned){src}[xa + 9u] << 16)) : 0u;
        {var}[kk][3] = vb ? ((unsigned){src}[xb + 8u] | ((unsigned){src}[xb + 9u] << 16)) : 0u;
    }}
",
        k = dim / 16,
        dl = ix.lit(row),
    )
}

/// The kernels' start: the lane's group `g` and place `tg` in it, the entry `e` of the
/// block (of `nt` per entry), the warp's first row `r0` and its rows `ra = r0 + g`, `rb =
/// ra + 8` (of `rows`), whether they exist (`va`, `vb`) and whether the warp has any
/// (`live`; a warp past the end only helps stage tiles).
pub(super) fn warp_rows(ix: Ix, nt: usize, rows: usize) -> String {
    let t = ix.ty();
    format!(
        "    const unsigned lane = threadIdx.x & 31u, w = threadIdx.x >> 5;
    const unsigned g = lane >> 2, tg = lane & 3u;
    const {t} blk = blockIdx.x;
    const {t} e = blk / {nt_l};
    const {t} r0 = (blk % {nt_l}) * {bm} + w * 16u;
    // The warp's rows g and g + 8 of its 16; a warp past the end only stages tiles.
    const {t} ra = r0 + g, rb = r0 + g + 8u;
    const bool va = ra < {r_l}, vb = rb < {r_l}, live = r0 < {r_l};
",
        nt_l = ix.lit(nt),
        bm = ix.lit(BM),
        r_l = ix.lit(rows),
    )
}

/// `acc[j] = A xᵀ` for the 64 staged rows of `x`, one 8-column block `j` at a time
/// (blocks at or past `kc` left 0): `x[j * 8 + g][...]` is the B fragment, the registers
/// `a` the A fragments of `dim / 16` k-steps.
pub(super) fn scores(acc: &str, a: &str, x: &str, dim: usize) -> String {
    format!(
        "#pragma unroll
            for (int j = 0; j < {nj}; ++j) {{
                {acc}[j][0] = 0.0f; {acc}[j][1] = 0.0f; {acc}[j][2] = 0.0f; {acc}[j][3] = 0.0f;
                if ((unsigned)(j * 8) < kc) {{
#pragma unroll
                    for (int kk = 0; kk < {k}; ++kk) {{
                        unsigned b[2];
                        b[0] = *reinterpret_cast<const unsigned*>(&{x}[j * 8 + g][kk * 16 + 2u * tg]);
                        b[1] = *reinterpret_cast<const unsigned*>(&{x}[j * 8 + g][kk * 16 + 2u * tg + 8u]);
                        mma_t({acc}[j], {a}[kk], b);
                    }}
                }}
            }}
",
        nj = BN / 8,
        k = dim / 16,
    )
}

/// `acc[j] += W y` over the staged rows, 16 per step (steps at or past `kc` skipped): the
/// weights `w[2kk]`, `w[2kk + 1]` (accumulator blocks of 8 columns, rounded to the
/// storage type) are the A fragment, rows `2t`, `2t + 1` (and `+ 8`) of the staged `y`
/// at column `g` of output block `j` (of `blocks`) the B fragment.
pub(super) fn weighted_sum(w: &str, y: &str, blocks: usize) -> String {
    format!(
        "#pragma unroll
            for (int kk = 0; kk < {nk}; ++kk) {{
                if ((unsigned)(kk * 16) < kc) {{
                    unsigned pf[4];
                    pf[0] = pack_t({w}[2 * kk][0], {w}[2 * kk][1]);
                    pf[1] = pack_t({w}[2 * kk][2], {w}[2 * kk][3]);
                    pf[2] = pack_t({w}[2 * kk + 1][0], {w}[2 * kk + 1][1]);
                    pf[3] = pack_t({w}[2 * kk + 1][2], {w}[2 * kk + 1][3]);
                    const unsigned kr = (unsigned)(kk * 16) + 2u * tg;
#pragma unroll
                    for (int j = 0; j < {blocks}; ++j) {{
                        const unsigned c = (unsigned)(j * 8) + g;
                        unsigned b[2];
                        b[0] = (unsigned){y}[kr][c] | ((unsigned){y}[kr + 1u][c] << 16);
                        b[1] = (unsigned){y}[kr + 8u][c] | ((unsigned){y}[kr + 9u][c] << 16);
                        mma_t(acc[j], pf, b);
                    }}
                }}
            }}
",
        nk = BN / 16,
    )
}

/// The kernel for attention `s` with contiguous operands.
pub fn attention(name: &str, s: &Spec, dtype: DType) -> Result<Kernel, String> {
    attention_rows(name, s, dtype, &Rows::contiguous(s), None)
}

/// The kernel for attention `s` reading q, k and v where `rows` says (`s.max_numel` must
/// cover every element read), and writing its output contiguously or, with `out`, each
/// output row at `out.offset + Σ lead index · out.lead_strides + row · out.row` (a
/// permuted layout: the runtime then skips the permute that would have copied it).
pub fn attention_rows(
    name: &str,
    s: &Spec,
    dtype: DType,
    rows: &Rows,
    out: Option<&OperandView>,
) -> Result<Kernel, String> {
    if rows.row[0] < s.d || rows.row[1] < s.d || rows.row[2] < s.e {
        return Err(format!("rows {:?} shorter than the head dims", rows.row));
    }
    if let Some(o) = out {
        if o.row < s.e || o.lead_strides.len() != s.lead.len() {
            return Err(format!(
                "output rows {} apart with {} lead strides for rows of {} and {} leading axes",
                o.row,
                o.lead_strides.len(),
                s.e,
                s.lead.len()
            ));
        }
    }
    if !eligible(s, dtype) {
        return Err(format!(
            "the tensor-core attention takes 16-bit storage, head dims that are multiples of 16 (q, k) and 8 (v) up to {MAX_DIM}, and keys; not {dtype} with d {}, e {}, {} keys",
            s.d, s.e, s.m
        ));
    }
    generate(name, s, rows, false, out)
}

/// Whether the tensor-core kernel takes `attention_lse` of `s` (its `e` and `v_lead`
/// unused) stored as `dtype`.
pub fn eligible_lse(s: &Spec, dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
        && s.d > 0
        && s.d.is_multiple_of(16)
        && s.d <= MAX_DIM
        && s.m > 0
}

/// `attention_lse`: the forward's scores and online softmax without the values, writing
/// each row's `max + log(sum)` (the sink included), as the SIMT kernel does
/// ([`super::attention_grad::lse`]). `s.e` and `s.v_lead` are not used.
pub fn lse(name: &str, s: &Spec, dtype: DType) -> Result<Kernel, String> {
    if !eligible_lse(s, dtype) {
        return Err(format!(
            "the tensor-core attention_lse takes 16-bit storage, a head dim that is a multiple of 16 up to {MAX_DIM}, and keys; not {dtype} with d {}, {} keys",
            s.d, s.m
        ));
    }
    let s = Spec {
        e: 0,
        v_lead: vec![0; s.lead.len()],
        ..s.clone()
    };
    generate(name, &s, &Rows::contiguous(&s), true, None)
}

/// [`lse`] reading q and k where `rows` says (its v entries unused).
pub fn lse_rows(name: &str, s: &Spec, dtype: DType, rows: &Rows) -> Result<Kernel, String> {
    if rows.row[0] < s.d || rows.row[1] < s.d {
        return Err(format!("rows {:?} shorter than the head dim", rows.row));
    }
    if !eligible_lse(s, dtype) {
        return lse(name, s, dtype);
    }
    let s = Spec {
        e: 0,
        v_lead: vec![0; s.lead.len()],
        ..s.clone()
    };
    let rows = Rows {
        offset: [rows.offset[0], rows.offset[1], 0],
        row: [rows.row[0], rows.row[1], 0],
    };
    generate(name, &s, &rows, true, None)
}

/// The attention kernel, or with `lse` the log-normaliser kernel; `out` places the
/// attention's output rows ([`attention_rows`]).
fn generate(
    name: &str,
    s: &Spec,
    rows: &Rows,
    lse: bool,
    out: Option<&OperandView>,
) -> Result<Kernel, String> {
    let (n, m, d, e) = (s.n, s.m, s.d, s.e);
    let nb: usize = s.lead.iter().product();
    let nt = n.div_ceil(BM);
    let grid = grid_1d(nb * nt)?;
    let ix = Ix::for_numel(s.max_numel.max(nb * n * e.max(1)));
    let t = ix.ty();
    let mut inputs = if lse {
        vec!["q", "k"]
    } else {
        vec!["q", "k", "v"]
    };
    if s.z.is_some() {
        inputs.push("z");
    }
    let (nj, ne) = (BN / 8, e / 8);
    // The first element of tile j0 of k or v.
    let base = |i: usize, o: &str| {
        let first = if rows.offset[i] == 0 {
            String::new()
        } else {
            format!("{} + ", ix.lit(rows.offset[i]))
        };
        format!("{first}{o} + j0 * {}", ix.lit(rows.row[i]))
    };
    let what = if lse {
        "attention log-normaliser".to_string()
    } else {
        "attention".to_string()
    };
    let outs = if lse {
        String::new()
    } else {
        format!(", {e} outputs")
    };
    let out = out.filter(|_| !lse);
    let out_note = out.map_or(String::new(), |o| {
        format!(
            "; output rows written {} apart, matrices at strides {:?} (permuted)",
            o.row, o.lead_strides
        )
    });
    let mut src = format!(
        "// {name}: {what} on the tensor cores (mma.m16n8k16, 16-bit operands, f32 accumulation), {BM} query rows per block of {WARPS} warps, keys in tiles of {BN} ({nb} entries of {n} rows of {d} against {m} keys{outs}){}{}{out_note}.\n",
        if s.z.is_some() { ", with a sink logit" } else { "" },
        rows.note(&Rows::contiguous(s)),
    );
    src += &entry(name, &inputs, "out");
    src += &format!(
        "    __shared__ __align__(16) unsigned short ks[{BN}][{}];\n",
        d + PAD
    );
    if !lse {
        src += &format!(
            "    __shared__ __align__(16) unsigned short vs[{BN}][{}];\n",
            e + PAD
        );
    }
    src += &warp_rows(ix, nt, n);
    let mut sets = vec![s.q_lead.clone(), s.k_lead.clone()];
    let mut names = vec!["oq", "ok"];
    if !lse {
        sets.push(s.v_lead.clone());
        names.push("ov");
    }
    if let Some(z) = &s.z {
        sets.push(z[..s.lead.len()].to_vec());
        names.push("oz");
    }
    if let Some(o) = out {
        sets.push(o.lead_strides.clone());
        names.push("oo");
    }
    src += &offsets(ix, "l", "e", &s.lead, &sets, &names, "    ");
    // The query fragments (A operand of the scores), zero past the last row.
    let qbase = if rows.offset[0] == 0 {
        "oq".to_string()
    } else {
        format!("{} + oq", ix.lit(rows.offset[0]))
    };
    src += &a_fragments(ix, "qf", "q", &qbase, d, rows.row[0]);
    // The running state of rows a (g) and b (g + 8): maximum, this lane's partial sum.
    match &s.z {
        Some(z) => {
            let zr = z[s.lead.len()];
            src += &format!(
                "    const float za = va ? ld(z, oz + {}) : 0.0f;
    const float zb = vb ? ld(z, oz + {}) : 0.0f;
    float ma = za, mb = zb;
    // exp(z - z) once per row (on lane t = 0): 1 for a finite z, NaN for +inf or NaN, 0
    // for -inf (no sink).
    float la = tg != 0u ? 0.0f : (za == NEG_INF ? 0.0f : (is_finite_f(za) ? 1.0f : QNAN));
    float lb = tg != 0u ? 0.0f : (zb == NEG_INF ? 0.0f : (is_finite_f(zb) ? 1.0f : QNAN));
",
                ix.scaled("ra", zr),
                ix.scaled("rb", zr)
            );
        }
        None => {
            src += "    float ma = NEG_INF, mb = NEG_INF;\n    float la = 0.0f, lb = 0.0f;\n";
        }
    }
    if !lse {
        src += &format!(
            "    float acc[{ne}][4];
#pragma unroll
    for (int j = 0; j < {ne}; ++j) {{
        acc[j][0] = 0.0f; acc[j][1] = 0.0f; acc[j][2] = 0.0f; acc[j][3] = 0.0f;
    }}
"
        );
    }
    let stage_v = if lse {
        String::new()
    } else {
        stage(ix, "v", &base(2, "ov"), "vs", e, rows.row[2])
    };
    // Rescale the output and add this tile's P V (the attention; not the normaliser).
    let pv = if lse {
        String::new()
    } else {
        format!(
            "#pragma unroll
            for (int j = 0; j < {ne}; ++j) {{
                acc[j][0] *= ca; acc[j][1] *= ca; acc[j][2] *= cb; acc[j][3] *= cb;
            }}
            // P V: P's accumulator blocks as the A fragment, V's rows as the B fragment.
{}",
            weighted_sum("sc", "vs", ne)
        )
    };
    let finish = if lse {
        format!(
            "        // The row's log-normaliser, once per row.
        if (tg == 0u) {{
            if (va) st(out, e * {n_l} + ra, ma + logf(la));
            if (vb) st(out, e * {n_l} + rb, mb + logf(lb));
        }}
",
            n_l = ix.lit(n)
        )
    } else {
        let rows_at = match out {
            Some(o) => {
                let first = if o.offset == 0 {
                    String::new()
                } else {
                    format!("{} + ", ix.lit(o.offset))
                };
                format!(
                    "oa = {first}oo + {}, ob = {first}oo + {}",
                    ix.scaled("ra", o.row),
                    ix.scaled("rb", o.row)
                )
            }
            None => format!(
                "oa = (e * {n_l} + ra) * {el}, ob = (e * {n_l} + rb) * {el}",
                n_l = ix.lit(n),
                el = ix.lit(e)
            ),
        };
        format!(
            "        const float ia = 1.0f / la, ib = 1.0f / lb;
        const {t} {rows_at};
#pragma unroll
        for (int j = 0; j < {ne}; ++j) {{
            const unsigned c = (unsigned)(j * 8) + 2u * tg;
            if (va) {{
                st(out, oa + c, acc[j][0] * ia);
                st(out, oa + c + 1u, acc[j][1] * ia);
            }}
            if (vb) {{
                st(out, ob + c, acc[j][2] * ib);
                st(out, ob + c + 1u, acc[j][3] * ib);
            }}
        }}
"
        )
    };
    src += &format!(
        "    for ({t} j0 = 0; j0 < {m_l}; j0 += {BN}u) {{
        const unsigned kc = ({m_l} - j0) < {BN}u ? (unsigned)({m_l} - j0) : {BN}u;
        __syncthreads();
{stage_k}{stage_v}        __syncthreads();
        if (live) {{
            // Scores: 8 key columns per accumulator block, blocks past kc skipped.
            float sc[{nj}][4];
{sc_src}            float xa = NEG_INF, xb = NEG_INF;
#pragma unroll
            for (int j = 0; j < {nj}; ++j) {{
#pragma unroll
                for (int i = 0; i < 4; ++i) {{
                    const unsigned col = (unsigned)(j * 8) + 2u * tg + (unsigned)(i & 1);
                    const float s = col < kc ? sc[j][i] * {scale} : NEG_INF;
                    sc[j][i] = s;
                    // The maximum ignores NaN (a NaN score poisons the sum through p).
                    if (i < 2) xa = fmaxf(xa, s > NEG_INF ? s : NEG_INF);
                    else xb = fmaxf(xb, s > NEG_INF ? s : NEG_INF);
                }}
            }}
            xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 1));
            xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 2));
            xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 1));
            xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 2));
            const float na = xa > ma ? xa : ma, nbm = xb > mb ? xb : mb;
            const float ca = ma == na ? 1.0f : expf(ma - na);
            const float cb = mb == nbm ? 1.0f : expf(mb - nbm);
            la *= ca;
            lb *= cb;
#pragma unroll
            for (int j = 0; j < {nj}; ++j) {{
                // -inf scores (masks, keys past the tile) contribute 0.
                sc[j][0] = sc[j][0] != NEG_INF ? expf(sc[j][0] - na) : 0.0f;
                sc[j][1] = sc[j][1] != NEG_INF ? expf(sc[j][1] - na) : 0.0f;
                sc[j][2] = sc[j][2] != NEG_INF ? expf(sc[j][2] - nbm) : 0.0f;
                sc[j][3] = sc[j][3] != NEG_INF ? expf(sc[j][3] - nbm) : 0.0f;
                la += sc[j][0] + sc[j][1];
                lb += sc[j][2] + sc[j][3];
            }}
{pv}            ma = na;
            mb = nbm;
        }}
    }}
    if (live) {{
        la += __shfl_xor_sync(0xffffffffu, la, 1);
        la += __shfl_xor_sync(0xffffffffu, la, 2);
        lb += __shfl_xor_sync(0xffffffffu, lb, 1);
        lb += __shfl_xor_sync(0xffffffffu, lb, 2);
{finish}    }}
}}
",
        m_l = ix.lit(m),
        stage_k = stage(ix, "k", &base(1, "ok"), "ks", d, rows.row[1]),
        sc_src = scores("sc", "qf", "ks", d),
        scale = lit(s.scale),
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
