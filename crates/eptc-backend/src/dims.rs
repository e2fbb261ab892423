//! Shape analysis of the ops with structure — `matmul`, `linear`, `attention` — for the
//! backends that generate code for concrete shapes (wgpu, cuda): their dimensions, the
//! strides of broadcast leading dimensions, and the checks, each failure a message.
//! Shapes are concrete (the batch already bound); strides count elements, row-major.

use eptc_ir::strides::{broadcast_strides, contiguous_strides};

/// The strides that read a row-major tensor of shape `from` as `to` under numpy
/// broadcasting (0 along stretched or missing dimensions), or why it does not broadcast.
pub fn broadcast(from: &[usize], to: &[usize]) -> Result<Vec<usize>, String> {
    let ok = from.len() <= to.len()
        && from
            .iter()
            .rev()
            .zip(to.iter().rev())
            .all(|(&f, &t)| f == t || f == 1);
    if ok {
        Ok(broadcast_strides(from, to))
    } else {
        Err(format!("{from:?} does not broadcast to {to:?}"))
    }
}

fn rank_at_least(s: &[usize], r: usize, what: &str) -> Result<(), String> {
    if s.len() < r {
        Err(format!("{what} has rank {}, needs at least {r}", s.len()))
    } else {
        Ok(())
    }
}

/// How a kernel reads one matrix operand: element `(i, j)` of matrix number `l` (over the
/// leading dimensions) is at `Σ lead_index · lead_strides + i · rs + j · cs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatrixOperand {
    pub rs: usize,
    pub cs: usize,
    /// One stride per leading dimension of the output (0 where broadcast).
    pub lead_strides: Vec<usize>,
}

/// `matmul`: `out[.., M, N] = A[.., M, K] · B[.., K, N]` over broadcast leading dims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatMul {
    /// The output's leading dimensions.
    pub lead: Vec<usize>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A as `[M, K]` (stored `[K, M]` when transposed).
    pub a: MatrixOperand,
    /// B as `[K, N]` (stored `[N, K]` when transposed).
    pub b: MatrixOperand,
}

/// The dimensions of `matmul(a, b, transpose_a, transpose_b)` giving `out`.
pub fn matmul(
    a: &[usize],
    b: &[usize],
    transpose_a: bool,
    transpose_b: bool,
    out: &[usize],
) -> Result<MatMul, String> {
    rank_at_least(a, 2, "a")?;
    rank_at_least(b, 2, "b")?;
    let (ra, rb) = (a.len(), b.len());
    let (m, ka) = if transpose_a {
        (a[ra - 1], a[ra - 2])
    } else {
        (a[ra - 2], a[ra - 1])
    };
    let (kb, n) = if transpose_b {
        (b[rb - 1], b[rb - 2])
    } else {
        (b[rb - 2], b[rb - 1])
    };
    if ka != kb {
        return Err(format!("inner dims differ: {a:?} and {b:?}"));
    }
    if out.len() < 2 || out[out.len() - 2..] != [m, n] {
        return Err(format!("[{m}, {n}] products do not give {out:?}"));
    }
    let lead = out[..out.len() - 2].to_vec();
    let lead_of = |s: &[usize], r: usize| -> Result<Vec<usize>, String> {
        let mat = s[r - 2] * s[r - 1];
        Ok(broadcast(&s[..r - 2], &lead)?
            .iter()
            .map(|x| x * mat)
            .collect())
    };
    Ok(MatMul {
        a: MatrixOperand {
            rs: if transpose_a { 1 } else { ka },
            cs: if transpose_a { m } else { 1 },
            lead_strides: lead_of(a, ra)?,
        },
        b: MatrixOperand {
            rs: if transpose_b { 1 } else { n },
            cs: if transpose_b { kb } else { 1 },
            lead_strides: lead_of(b, rb)?,
        },
        lead,
        m,
        n,
        k: ka,
    })
}

/// `linear`: `out[rows, o] = x[rows, k] · w[o, k]ᵀ (+ bias[o]) (, GELU) (+ residual)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    /// Rows of x (every dimension but the last, flattened).
    pub rows: usize,
    /// Output features (`w`'s rows).
    pub o: usize,
    /// Input features.
    pub k: usize,
}

/// The dimensions of `linear(x, w[, bias][, residual])` (operand shapes `x`) giving `out`.
pub fn linear(
    x: &[Vec<usize>],
    bias: bool,
    residual: bool,
    out: &[usize],
) -> Result<Linear, String> {
    let (xs, w) = (&x[0], &x[1]);
    rank_at_least(xs, 1, "x")?;
    if w.len() != 2 || w[1] != *xs.last().unwrap_or(&0) {
        return Err(format!(
            "w {w:?} must be [out, {}]",
            xs.last().unwrap_or(&0)
        ));
    }
    let (o, k) = (w[0], w[1]);
    let mut want = xs.clone();
    if let Some(l) = want.last_mut() {
        *l = o;
    }
    if want != out {
        return Err(format!("x {xs:?} and w {w:?} do not give {out:?}"));
    }
    // Counted from the output: with K = 0 the rows of x are empty.
    let rows = out.iter().product::<usize>() / o.max(1);
    let mut next = 2;
    if bias {
        if x.get(next).map(Vec::as_slice) != Some(&[o][..]) {
            return Err(format!("bias {:?} must be [{o}]", x.get(next)));
        }
        next += 1;
    }
    if residual && x.get(next).map(Vec::as_slice) != Some(out) {
        return Err(format!("residual {:?} must be {out:?}", x.get(next)));
    }
    Ok(Linear { rows, o, k })
}

/// `attention(q, k, v[, z])`: `out[.., n, e] = softmax(scale · q kᵀ [, z]) v` over
/// broadcast leading dimensions, with the optional sink logit `z` per query row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attention {
    /// The output's leading dimensions.
    pub lead: Vec<usize>,
    /// Queries, keys, head dim of q and k, head dim of v.
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub e: usize,
    /// Per leading dimension, the stride of q's, k's and v's matrices (0: broadcast).
    pub q_lead: Vec<usize>,
    pub k_lead: Vec<usize>,
    pub v_lead: Vec<usize>,
    /// With a sink: the strides of z over `[lead.., n]`.
    pub z: Option<Vec<usize>>,
}

/// The dimensions of `attention` (operand shapes `x`: q, k, v[, z]) giving `out`.
pub fn attention(x: &[Vec<usize>], sink: bool, out: &[usize]) -> Result<Attention, String> {
    let (q, k, v) = (&x[0], &x[1], &x[2]);
    for (s, w) in [(q, "q"), (k, "k"), (v, "v")] {
        rank_at_least(s, 2, w)?;
    }
    let last2 = |s: &[usize]| (s[s.len() - 2], s[s.len() - 1]);
    let ((n, d), (m, dk), (mv, e)) = (last2(q), last2(k), last2(v));
    if d != dk || m != mv {
        return Err(format!("q {q:?}, k {k:?}, v {v:?} do not fit"));
    }
    if out.len() < 2 || out[out.len() - 2..] != [n, e] {
        return Err(format!("attention rows [{n}, {e}] do not give {out:?}"));
    }
    let lead = out[..out.len() - 2].to_vec();
    let ls = |s: &[usize], mat: usize| -> Result<Vec<usize>, String> {
        Ok(broadcast(&s[..s.len() - 2], &lead)?
            .iter()
            .map(|x| x * mat)
            .collect())
    };
    let z = if sink {
        let zs = x.get(3).ok_or("the sink logit z is missing")?;
        let mut rows1 = lead.clone();
        rows1.extend([n, 1]);
        let st = broadcast(zs, &rows1)?;
        Some(st[..st.len() - 1].to_vec())
    } else {
        None
    };
    Ok(Attention {
        q_lead: ls(q, n * d)?,
        k_lead: ls(k, m * d)?,
        v_lead: ls(v, m * e)?,
        lead,
        n,
        m,
        d,
        e,
        z,
    })
}

/// Row-major strides of the output's leading dimensions for matrices of `mat` elements.
pub fn lead_contiguous(lead: &[usize], mat: usize) -> Vec<usize> {
    contiguous_strides(lead).iter().map(|s| s * mat).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_dims_and_broadcast_strides() {
        let mm = matmul(&[2, 3, 4, 5], &[3, 6, 5], false, true, &[2, 3, 4, 6]).unwrap();
        assert_eq!((mm.m, mm.n, mm.k), (4, 6, 5));
        assert_eq!(mm.lead, vec![2, 3]);
        assert_eq!(mm.a.lead_strides, vec![60, 20]);
        // B has no batch dim: broadcast along it.
        assert_eq!(mm.b.lead_strides, vec![0, 30]);
        assert_eq!((mm.b.rs, mm.b.cs), (1, 5));
        assert!(matmul(&[4, 5], &[4, 6], false, false, &[4, 6]).is_err());
        assert!(matmul(&[4, 5], &[5, 6], false, false, &[4, 7]).is_err());
    }

    #[test]
    fn linear_checks_bias_and_residual() {
        let x = vec![vec![2, 3, 5], vec![4, 5], vec![4], vec![2, 3, 4]];
        assert_eq!(
            linear(&x, true, true, &[2, 3, 4]).unwrap(),
            Linear {
                rows: 6,
                o: 4,
                k: 5
            }
        );
        let bad = vec![vec![2, 3, 5], vec![4, 5], vec![3]];
        assert!(linear(&bad, true, false, &[2, 3, 4]).is_err());
        assert!(linear(&x[..2], false, true, &[2, 3, 4]).is_err());
    }

    #[test]
    fn attention_dims_with_a_sink() {
        let x = vec![
            vec![2, 3, 5, 4],
            vec![3, 7, 4],
            vec![2, 3, 7, 6],
            vec![5, 1],
        ];
        let a = attention(&x, true, &[2, 3, 5, 6]).unwrap();
        assert_eq!((a.n, a.m, a.d, a.e), (5, 7, 4, 6));
        assert_eq!(a.k_lead, vec![0, 28]);
        assert_eq!(a.z, Some(vec![0, 0, 1]));
        assert!(attention(&x[..3], true, &[2, 3, 5, 6]).is_err());
    }
}
