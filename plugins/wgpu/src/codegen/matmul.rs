//! Tiled matrix product: a 16x16 workgroup per (output tile, batch entry); each
//! invocation computes an `RM x RN` block of the tile (register blocking, so the tile is
//! `16 RM x 16 RN`), the operands staged through workgroup memory one slab of
//! [`KS`] along K at a time. The fused `linear` is the same kernel with its epilogue
//! (bias, exact GELU, residual).
//!
//! `RM`, `RN` (1, 2 or 4) follow the matrix sizes, so small products do not waste
//! invocations on a large tile. Invocation `(x, y)` owns rows `y + 16 i` and columns
//! `x + 16 j` of the tile: neighbouring invocations read neighbouring workgroup-memory
//! words and write neighbouring output elements.
//!
//! With f16 [`Storage`] the operands are converted to f32 as they are staged: the slabs
//! in workgroup memory, the products and the accumulators are all f32.

use std::fmt::Write;

use super::wgsl::{self, offsets, scaled, u, Func, Storage};
use super::Kernel;

/// Invocations per workgroup along each axis.
pub const THREADS: usize = 16;
/// The depth of a K slab.
pub const KS: usize = 16;
/// The slabs of the largest tiles (4 outputs per invocation each way) fit WebGPU's
/// default 16 KiB of workgroup storage.
const _: () = assert!(2 * KS * THREADS * 4 * 4 <= 16 * 1024);

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
}

/// What follows the product, in order: `+ bias[n]`, exact GELU, `+ residual[m, n]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue {
    pub bias: bool,
    pub gelu: bool,
    pub residual: bool,
}

/// Outputs per invocation along an axis of `n` elements.
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
    st: Storage,
    name: &str,
    what: &str,
    lead: &[usize],
    m: usize,
    n: usize,
    k: usize,
    a: &Operand,
    b: &Operand,
    epi: Epilogue,
) -> Kernel {
    let nb: usize = lead.iter().product();
    let (rm, rn) = (per_thread(m), per_thread(n));
    let (tile_m, tile_n) = (THREADS * rm, THREADS * rn);
    let (tm, tn) = (m.div_ceil(tile_m), n.div_ceil(tile_n));
    let total = tm * tn * nb;
    let workgroups = wgsl::grid(total);
    let mut inputs = vec!["a", "b"];
    if epi.bias {
        inputs.push("bias");
    }
    if epi.residual {
        inputs.push("res");
    }
    let mut src = st.preamble().to_string();
    src += &format!(
        "// {name}: {what}; [{m} x {k}] x [{k} x {n}] for {nb} batch entries; {tile_m}x{tile_n} tiles, {rm}x{rn} outputs per invocation, K in slabs of {KS}.\n"
    );
    src += &wgsl::bindings(st, &inputs, "out");
    src += "\n";
    if epi.gelu {
        src += &wgsl::library(&[Func::Gelu]);
        src += "\n";
    }
    // Slabs stored k-major: ta[kk * tile_m + r], tb[kk * tile_n + c].
    let _ = writeln!(
        src,
        "var<workgroup> ta: array<f32, {}>;\nvar<workgroup> tb: array<f32, {}>;\n",
        KS * tile_m,
        KS * tile_n
    );
    let _ = writeln!(
        src,
        "@compute @workgroup_size({THREADS}, {THREADS})\nfn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {{"
    );
    // The workgroup's tile and batch entry (uniform across the workgroup, so the early
    // return keeps the barriers below in uniform control flow).
    let _ = writeln!(
        src,
        "    let wg = wid.x + wid.y * {};\n    if (wg >= {}) {{\n        return;\n    }}\n    let m0 = ((wg / {tn}) % {tm}) * {tile_m_u};\n    let n0 = (wg % {tn}) * {tile_n_u};\n    let entry = wg / {tmn};",
        u(workgroups[0] as usize),
        u(total),
        tn = u(tn),
        tm = u(tm),
        tmn = u(tm * tn),
        tile_m_u = u(tile_m),
        tile_n_u = u(tile_n),
    );
    src += &offsets(
        "e",
        "entry",
        lead,
        &[a.lead_strides.clone(), b.lead_strides.clone()],
        &["oa", "ob"],
        "    ",
    );
    src += "    let flat = lid.y * 16u + lid.x;\n";
    for i in 0..rm {
        for j in 0..rn {
            let _ = writeln!(src, "    var c{i}{j} = 0.0f;");
        }
    }
    let _ = writeln!(
        src,
        "    for (var k0 = 0u; k0 < {}; k0 += {}) {{",
        u(k),
        u(KS)
    );
    src += &stage(st, "ta", "a", "oa", a, "m0", m, tile_m, true, k);
    src += &stage(st, "tb", "b", "ob", b, "n0", n, tile_n, false, k);
    src += "        workgroupBarrier();\n";
    let _ = writeln!(src, "        for (var kk = 0u; kk < {}; kk++) {{", u(KS));
    for i in 0..rm {
        let _ = writeln!(
            src,
            "            let a{i} = ta[kk * {} + lid.y + {}];",
            u(tile_m),
            u(THREADS * i)
        );
    }
    for j in 0..rn {
        let _ = writeln!(
            src,
            "            let b{j} = tb[kk * {} + lid.x + {}];",
            u(tile_n),
            u(THREADS * j)
        );
    }
    for i in 0..rm {
        for j in 0..rn {
            let _ = writeln!(src, "            c{i}{j} += a{i} * b{j};");
        }
    }
    src += "        }\n        workgroupBarrier();\n    }\n";
    // The epilogue of each owned output.
    for i in 0..rm {
        let _ = writeln!(src, "    let row{i} = m0 + lid.y + {};", u(THREADS * i));
    }
    for j in 0..rn {
        let _ = writeln!(src, "    let col{j} = n0 + lid.x + {};", u(THREADS * j));
    }
    for i in 0..rm {
        for j in 0..rn {
            let o = format!("entry * {} + row{i} * {} + col{j}", u(m * n), u(n));
            let _ = writeln!(
                src,
                "    if (row{i} < {} && col{j} < {}) {{\n        var v = c{i}{j};",
                u(m),
                u(n)
            );
            if epi.bias {
                let _ = writeln!(
                    src,
                    "        v = v + {};",
                    st.load(&format!("bias[col{j}]"))
                );
            }
            if epi.gelu {
                src += "        v = gelu(v);\n";
            }
            if epi.residual {
                let _ = writeln!(src, "        v = v + {};", st.load(&format!("res[{o}]")));
            }
            let _ = writeln!(src, "        out[{o}] = {};\n    }}", st.store("v"));
        }
    }
    src += "}\n";
    Kernel {
        name: name.to_string(),
        source: src,
        entry: "main".into(),
        inputs: inputs.len(),
        workgroups,
    }
}

/// Statements staging one slab: `KS x tile` elements of operand `op` (its rows or
/// columns `t0..t0 + tile` along the tile's axis, `k0..k0 + KS` along K) into `dst`,
/// k-major, zero outside the matrix. `is_a`: the tile axis is A's rows (else B's
/// columns). Consecutive invocations read consecutive addresses: the flat index runs
/// along whichever of the two axes is contiguous in memory.
#[allow(clippy::too_many_arguments)]
fn stage(
    st: Storage,
    dst: &str,
    buf: &str,
    off: &str,
    op: &Operand,
    t0: &str,
    tmax: usize,
    tile: usize,
    is_a: bool,
    k: usize,
) -> String {
    // Strides along the tile axis and along K.
    let (ts, ks) = if is_a { (op.rs, op.cs) } else { (op.cs, op.rs) };
    let along_k = ks == 1 && ts != 1;
    let per = KS * tile / (THREADS * THREADS);
    let mut s = String::new();
    for e in 0..per {
        let li = format!("flat + {}", u(THREADS * THREADS * e));
        let (t, kk) = if along_k {
            (format!("({li}) / {}", u(KS)), format!("({li}) % {}", u(KS)))
        } else {
            (
                format!("({li}) % {}", u(tile)),
                format!("({li}) / {}", u(tile)),
            )
        };
        let _ = write!(
            s,
            "        {{\n            let t = {t};\n            let kk = {kk};\n            let tt = {t0} + t;\n            let kg = k0 + kk;\n            var v = 0.0f;\n            if (tt < {tmax} && kg < {k}) {{\n                v = {};\n            }}\n            {dst}[kk * {} + t] = v;\n        }}\n",
            st.load(&format!(
                "{buf}[{off} + {} + {}]",
                scaled("tt", ts),
                scaled("kg", ks)
            )),
            u(tile),
            tmax = u(tmax),
            k = u(k),
        );
    }
    s
}
