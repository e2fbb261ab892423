//! Fused attention `softmax_sink(scale * q k^T, z) v`: one invocation per query row (per
//! entry of the leading axes), an online softmax over the keys with a running maximum
//! `m`, sum `l` and an accumulator of the output row in a private array. With a sink the
//! row starts from `m = z`, `l = exp(z - z)`, `acc = 0`. Output rows longer than
//! [`MAX_ACC`] are done [`MAX_ACC`] columns at a time (the scores recomputed per chunk).
//! q, k, v and z are loaded as f32 from the bindings' [`Storage`]: the scores, the online
//! softmax and the accumulator are f32 whatever the storage.

use super::wgsl::{self, entry_1d, launch_1d, lit, offsets, u, Func, Storage, NAN, NEG_INF};
use super::Kernel;

const WG: usize = 64;
/// The most output columns accumulated at once (a private array of this many f32).
pub const MAX_ACC: usize = 64;
/// The longest query row kept in a private array (longer ones are read from memory).
pub const MAX_Q: usize = 128;

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
}

pub fn attention(st: Storage, name: &str, s: &Spec) -> Kernel {
    let rows = s.lead.iter().product::<usize>() * s.n;
    let launch = launch_1d(rows, WG);
    let mut inputs = vec!["q", "k", "v"];
    if s.z.is_some() {
        inputs.push("z");
    }
    let mut src = st.preamble().to_string();
    src += &format!(
        "// {name}: attention, one query row per invocation ({rows} rows of {d} against {m} keys, {e} outputs){}.\n",
        if s.z.is_some() { ", with a sink logit" } else { "" },
        d = s.d,
        m = s.m,
        e = s.e
    );
    src += &wgsl::bindings(st, &inputs, "out");
    src += "\n";
    if s.z.is_some() {
        src += &wgsl::library(&[Func::IsFinite]);
        src += "\n";
    }
    src += &entry_1d(WG);
    src += &launch.prologue;
    // The row's offsets in q, k, v (and z) from its multi-index over lead ++ [n].
    let mut dims = s.lead.clone();
    dims.push(s.n);
    let with_n = |lead: &[usize], n_stride: usize| {
        let mut v = lead.to_vec();
        v.push(n_stride);
        v
    };
    let mut sets = vec![
        with_n(&s.q_lead, s.d),
        with_n(&s.k_lead, 0),
        with_n(&s.v_lead, 0),
    ];
    let mut names = vec!["oq", "ok", "ov"];
    if let Some(z) = &s.z {
        sets.push(z.clone());
        names.push("oz");
    }
    src += &offsets("r", "idx", &dims, &sets, &names, "    ");
    let (d, m, e) = (u(s.d), u(s.m), u(s.e));
    // The query row, in registers when short.
    let q_priv = s.d > 0 && s.d <= MAX_Q;
    let qi = if q_priv {
        src += &format!(
            "    var qr: array<f32, {}>;\n    for (var i = 0u; i < {d}; i++) {{\n        qr[i] = {};\n    }}\n",
            s.d,
            st.load("q[oq + i]")
        );
        "qr[i]".to_string()
    } else {
        st.load("q[oq + i]")
    };
    let (m0, l0) = match &s.z {
        // l = exp(z - z): 1 for a finite z, NaN for +inf or NaN, except that z = -inf
        // (no sink) contributes nothing. By classification: drivers may fold z - z to 0.
        Some(_) => (
            st.load("z[oz]"),
            format!("select(select({NAN}, 1.0f, is_finite(m0)), 0.0f, m0 == {NEG_INF})"),
        ),
        None => (NEG_INF.to_string(), "0.0f".to_string()),
    };
    let ch = s.e.clamp(1, MAX_ACC);
    let guard = !s.e.is_multiple_of(ch);
    let col_ok = |body: &str| {
        if guard {
            format!("if (c0 + t < {e}) {{ {body} }}")
        } else {
            body.to_string()
        }
    };
    src += &format!("    let m0 = {m0};\n");
    src += &format!("    for (var c0 = 0u; c0 < {e}; c0 += {}) {{\n", u(ch));
    src += &format!(
        "        var acc: array<f32, {ch}>;\n        var mx = m0;\n        var l = {l0};\n"
    );
    src += &format!(
        "        for (var j = 0u; j < {m}; j++) {{\n            var dot = 0.0f;\n            for (var i = 0u; i < {d}; i++) {{\n                dot += {qi} * {kj};\n            }}\n            let sc = dot * {scale};\n",
        scale = lit(s.scale),
        kj = st.load(&format!("k[ok + j * {d} + i]")),
    );
    // A NaN score is ignored by the max but poisons l through p; -inf scores (masks)
    // contribute 0 even while the running max is -inf.
    src += &format!(
        "            let mn = select(mx, sc, sc > mx);\n            let corr = select(exp(mx - mn), 1.0f, mx == mn);\n            let p = select(exp(sc - mn), 0.0f, sc == {NEG_INF});\n            l = l * corr + p;\n            let vb = ov + j * {e} + c0;\n            for (var t = 0u; t < {}; t++) {{\n                {}\n            }}\n            mx = mn;\n        }}\n",
        u(ch),
        col_ok(&format!(
            "acc[t] = acc[t] * corr + p * {};",
            st.load("v[vb + t]")
        ))
    );
    // No keys: the product with an empty v is 0 (as the CPU reference computes it).
    let inv = if s.m == 0 {
        "0.0f".to_string()
    } else {
        "1.0f / l".to_string()
    };
    src += &format!(
        "        let inv = {inv};\n        for (var t = 0u; t < {}; t++) {{\n            {}\n        }}\n    }}\n}}\n",
        u(ch),
        col_ok(&format!(
            "out[idx * {e} + c0 + t] = {};",
            st.store("acc[t] * inv")
        ))
    );
    Kernel {
        name: name.to_string(),
        source: src,
        entry: "main".into(),
        inputs: inputs.len(),
        workgroups: launch.workgroups,
    }
}
