//! Resizing position embeddings to another patch grid: bicubic like PyTorch's
//! `F.interpolate(mode="bicubic", align_corners=False)` without antialiasing (what
//! mmcls's `resize_pos_embed`, used by the EPT reference code, calls), the class-token
//! positions untouched.

/// PyTorch's cubic convolution coefficient.
const A: f64 = -0.75;

fn cubic1(x: f64) -> f64 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic2(x: f64) -> f64 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// The four source indices (clamped) and weights for output index `o`.
fn taps(o: usize, n_in: usize, n_out: usize) -> ([usize; 4], [f64; 4]) {
    let scale = n_in as f64 / n_out as f64;
    let real = (o as f64 + 0.5) * scale - 0.5;
    let i0 = real.floor();
    let t = real - i0;
    let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
    let clamp = |d: i64| (i0 as i64 + d).clamp(0, n_in as i64 - 1) as usize;
    ([clamp(-1), clamp(0), clamp(1), clamp(2)], w)
}

/// Resize a `[extra + gh*gw, dim]` table of position embeddings (row-major grid) to a
/// `new_h x new_w` grid, keeping the first `extra` rows (class token) as they are.
pub fn resize(
    table: &[f32],
    dim: usize,
    extra: usize,
    old: (usize, usize),
    new: (usize, usize),
) -> Vec<f32> {
    let (gh, gw) = old;
    let (nh, nw) = new;
    assert_eq!(table.len(), (extra + gh * gw) * dim, "position table size");
    let mut out = Vec::with_capacity((extra + nh * nw) * dim);
    out.extend_from_slice(&table[..extra * dim]);
    let grid = &table[extra * dim..];
    let at = |y: usize, x: usize, c: usize| grid[(y * gw + x) * dim + c] as f64;
    for oy in 0..nh {
        let (ys, wy) = taps(oy, gh, nh);
        for ox in 0..nw {
            let (xs, wx) = taps(ox, gw, nw);
            for c in 0..dim {
                let mut acc = 0.0;
                for (j, &y) in ys.iter().enumerate() {
                    let row: f64 = xs.iter().zip(&wx).map(|(&x, w)| at(y, x, c) * w).sum();
                    acc += row * wy[j];
                }
                out.push(acc as f32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let t: Vec<f32> = (0..(1 + 9) * 2).map(|i| (i as f32).sin()).collect();
        let r = resize(&t, 2, 1, (3, 3), (3, 3));
        for (a, b) in t.iter().zip(&r) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn constant_grid_stays_constant() {
        // Cubic weights sum to one, so a constant grid resizes to the same constant.
        let t = vec![0.5f32; (1 + 16) * 3];
        let r = resize(&t, 3, 1, (4, 4), (7, 7));
        assert_eq!(r.len(), (1 + 49) * 3);
        assert!(r.iter().all(|v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn cls_rows_untouched() {
        let mut t = vec![0.0f32; (1 + 4) * 2];
        t[0] = 7.0;
        t[1] = -3.0;
        let r = resize(&t, 2, 1, (2, 2), (5, 5));
        assert_eq!(&r[..2], &[7.0, -3.0]);
    }
}
