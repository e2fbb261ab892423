//! Matrix products on the `gemm` crate: compute bound, so the work is to hand gemm the
//! biggest matrices possible. Transpose flags become strides (gemm reads any row/column
//! stride), a linear layer folds every leading dim of `a` into M for one GEMM split
//! across the pool's threads, and a batched product runs its entries in parallel, one
//! single-threaded GEMM each.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::layout::{broadcast_strides, Odometer};
use crate::pool;
use crate::value::Value;

/// How to read one matrix operand: element `(i, j)` lives at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// A row-major `[rows, cols]` matrix read as is.
    pub fn rows(cols: usize) -> Mat {
        Mat {
            rs: cols as isize,
            cs: 1,
        }
    }

    /// A row-major `[rows, cols]` matrix read transposed.
    pub fn transposed(cols: usize) -> Mat {
        Mat {
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// What a GEMM does with its destination: `dst = acc * dst + scale * a @ b`, with
/// `acc` 1 (accumulate into what is there) or 0 (overwrite).
#[derive(Clone, Copy)]
pub(crate) struct Epilogue {
    pub accumulate: bool,
    pub scale: f32,
}

impl Epilogue {
    pub const OVERWRITE: Epilogue = Epilogue {
        accumulate: false,
        scale: 1.0,
    };
}

/// `a @ b` over the last two axes with leading axes broadcast. Shapes are already
/// checked; `out_shape` is `[lead.., m, n]`.
pub fn matmul(a: &Value, b: &Value, ta: bool, tb: bool, out_shape: Vec<usize>) -> Value {
    let (ash, bsh) = (a.shape(), b.shape());
    let (ra, rb, ro) = (ash.len(), bsh.len(), out_shape.len());
    let (m, n) = (out_shape[ro - 2], out_shape[ro - 1]);
    let k = if ta { ash[ra - 2] } else { ash[ra - 1] };
    // Operand layouts of one batch entry (row-major storage of the stored matrix).
    let la = if ta {
        Mat {
            rs: 1,
            cs: m as isize,
        }
    } else {
        Mat {
            rs: k as isize,
            cs: 1,
        }
    };
    let lb = if tb {
        Mat {
            rs: 1,
            cs: k as isize,
        }
    } else {
        Mat {
            rs: n as isize,
            cs: 1,
        }
    };
    let lead: &[usize] = &out_shape[..ro - 2];
    let batches: usize = lead.iter().product();
    let mut out = pool::alloc(batches * m * n);
    if out.is_empty() || k == 0 {
        out.fill(0.0);
        return Value::new(out_shape, out);
    }
    let (av, bv) = (a.data(), b.data());
    let threads = rayon::current_num_threads().max(1);
    let b_batches: usize = bsh[..rb - 2].iter().product();

    if b_batches == 1 && !ta {
        // A linear layer: `[.., m, k] @ [k, n]` is one `[batches*m, k] @ [k, n]` GEMM
        // (a's leading dims are exactly the output's when b has none).
        // gemm splits the tiles among the threads; its k-blocking depends on `k` only,
        // so every element is summed in the same order whatever the thread count.
        // SAFETY: dst is `[batches*m, n]` row-major, a holds `batches*m` rows of `k`
        // (rows `k` apart, not transposed), b holds `k*n`.
        unsafe {
            gemm_one(
                batches * m,
                n,
                k,
                &mut out,
                av.as_ptr(),
                la,
                bv.as_ptr(),
                lb,
                Parallelism::Rayon(threads),
                Epilogue::OVERWRITE,
            )
        };
        return Value::new(out_shape, out);
    }

    // Batched: offsets of each operand's matrix for every entry of the output's lead.
    let (sa, sb) = (
        broadcast_strides(&ash[..ra - 2], lead),
        broadcast_strides(&bsh[..rb - 2], lead),
    );
    let (sa, sb): (Vec<usize>, Vec<usize>) = (
        sa.iter().map(|s| s * ash[ra - 2] * ash[ra - 1]).collect(),
        sb.iter().map(|s| s * bsh[rb - 2] * bsh[rb - 1]).collect(),
    );
    // The odometer walks "rows" of a space whose last dim is 1: one row per entry.
    let mut dims = lead.to_vec();
    dims.push(1);
    let (mut sa1, mut sb1) = (sa, sb);
    sa1.push(0);
    sb1.push(0);
    let offsets: Vec<[usize; 2]> = {
        let mut odo = Odometer::new(&dims, [&sa1, &sb1], 0);
        (0..batches)
            .map(|_| {
                let o = odo.offs;
                odo.advance();
                o
            })
            .collect()
    };
    let per = m * n;
    let run = |entry: &mut [f32], off: [usize; 2], par: Parallelism| {
        // SAFETY: `off` is the start of one stored matrix of each operand (strides above
        // come from their shapes), and `entry` is one `[m, n]` output matrix.
        unsafe {
            gemm_one(
                m,
                n,
                k,
                entry,
                av.as_ptr().add(off[0]),
                la,
                bv.as_ptr().add(off[1]),
                lb,
                par,
                Epilogue::OVERWRITE,
            )
        }
    };
    if batches >= threads {
        out.par_chunks_mut(per)
            .zip(offsets.par_iter())
            .for_each(|(entry, &off)| run(entry, off, Parallelism::None));
    } else {
        for (entry, &off) in out.chunks_mut(per).zip(&offsets) {
            run(entry, off, Parallelism::Rayon(threads));
        }
    }
    Value::new(out_shape, out)
}

/// `dst[m, n] = a[m, k] @ b[k, n]` (or as `epi` says) with `dst` row-major and
/// contiguous. gemm blocks `k` the same way whatever the parallelism, so every element is
/// summed in the same order on any number of threads.
///
/// # Safety
/// `a` and `b` must point at matrices readable through the given strides for the given
/// sizes, and `dst` must hold `m * n` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_one(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: *const f32,
    la: Mat,
    b: *const f32,
    lb: Mat,
    par: Parallelism,
    epi: Epilogue,
) {
    debug_assert_eq!(dst.len(), m * n);
    // gemm computes dst = alpha*dst + beta*lhs*rhs; read_dst = false ignores dst (and
    // k = 0 then writes zeros).
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        epi.accumulate,
        a,
        la.cs,
        la.rs,
        b,
        lb.cs,
        lb.rs,
        if epi.accumulate { 1.0f32 } else { 0.0 },
        epi.scale,
        false,
        false,
        false,
        par,
    );
}
