//! Class-wise statistics of a model's features, for `eptc analyze`: the paper's claim
//! that prompt tuning is a *distribution calibrator* (it shrinks the intra-class distance
//! Σ_W of its Eq. 11) checked on a user's own model and data.
//!
//! Everything is computed in `f64` from `f32` feature rows `[n, dim]`.
//!
//! **Classes and memberships.** An image counts in every class it carries (multi-label),
//! so a class is a list of row indices; rows may be in several classes or in none.
//!
//! **Normalisation.** The within-class scatter is the *unnormalised* sum of Fisher's
//! linear discriminant analysis,
//!
//! ```text
//! Σ_W = Σ_c Σ_{x ∈ c} (x − μ_c)(x − μ_c)ᵀ        μ_c = mean of class c
//! ```
//!
//! which is how the paper writes its Eq. 11 (a sum over classes of the scatter around
//! each class centre; PAPER.md records no division by the class or sample count). Its
//! trace is the sum of the per-class traces `tr Σ_W^c = Σ_{x∈c} ‖x − μ_c‖²`, so the
//! per-class numbers add up to the total. Because the sum grows with the number of
//! images, [`ClassStats`] also gives `tr Σ_W^c / n_c` (the class's mean squared distance
//! to its centre, the trace of its biased covariance) and the mean distance, and
//! [`Analysis::within_fraction`] gives `tr Σ_W / tr Σ_T`, which does not depend on the
//! number of images or on the scale of the features: two models with differently scaled
//! features compare by it.
//!
//! The between-class scatter is `Σ_B = Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ` with `μ` the mean
//! over memberships (a row counted once per class it is in), and the total scatter
//! `Σ_T = Σ_c Σ_{x∈c} (x − μ)(x − μ)ᵀ` over the same memberships, so that
//! `Σ_T = Σ_W + Σ_B` holds exactly, for multi-label data too.
//!
//! **PCA** ([`pca`]) is the eigen-decomposition of the covariance of the rows (each row
//! once, divided by `n`), by `nalgebra`'s symmetric eigensolver; components are sorted by
//! decreasing eigenvalue and each is signed so that its largest-magnitude entry is
//! positive (a deterministic choice of the sign PCA leaves free).

use serde::Serialize;

/// Statistics of one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassStats {
    pub class: usize,
    /// Rows in the class.
    pub n: usize,
    /// The class centre μ_c (empty when `n` is 0).
    pub centre: Vec<f64>,
    /// `tr Σ_W^c = Σ_{x∈c} ‖x − μ_c‖²`.
    pub trace_sw: f64,
    /// `tr Σ_W^c / n_c`: the mean squared distance to the centre.
    pub trace_sw_per_image: f64,
    /// Mean Euclidean distance `‖x − μ_c‖` of the class's rows to its centre.
    pub mean_distance: f64,
}

/// Statistics of all classes of one set of features.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub dim: usize,
    /// Rows analysed.
    pub images: usize,
    /// Sum of the class sizes (rows counted once per class they carry).
    pub memberships: usize,
    /// Rows in no class.
    pub unassigned: usize,
    pub classes: Vec<ClassStats>,
    /// `tr Σ_W`, the sum of the classes' `trace_sw`.
    pub trace_sw: f64,
    /// `tr Σ_B = Σ_c n_c ‖μ_c − μ‖²`.
    pub trace_sb: f64,
    /// `tr Σ_T` over the memberships (= `trace_sw + trace_sb`).
    pub trace_st: f64,
    /// `tr Σ_W / tr Σ_T`: the share of the feature variance that lies within classes
    /// (0 = every class collapsed to its centre; scale-free).
    pub within_fraction: f64,
    /// `tr Σ_B / tr Σ_W` (Fisher's separation: larger is better separated).
    pub separation: f64,
    /// Smallest and mean Euclidean distance between two class centres (classes with
    /// rows only; `None` with fewer than two).
    pub centre_distance_min: Option<f64>,
    pub centre_distance_mean: Option<f64>,
}

/// Errors of the analysis: inputs that do not fit.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AnalysisError {
    #[error("features have {len} values, not a multiple of the width {dim}")]
    Shape { len: usize, dim: usize },
    #[error("class {class} lists row {row}, but there are {rows} rows")]
    Row {
        class: usize,
        row: usize,
        rows: usize,
    },
    #[error("feature row {row} has a value that is not finite")]
    NotFinite { row: usize },
    #[error("no rows to analyse")]
    Empty,
}

fn check(features: &[f32], dim: usize) -> Result<usize, AnalysisError> {
    if dim == 0 || !features.len().is_multiple_of(dim) {
        return Err(AnalysisError::Shape {
            len: features.len(),
            dim,
        });
    }
    let n = features.len() / dim;
    if n == 0 {
        return Err(AnalysisError::Empty);
    }
    if let Some(row) = features
        .chunks_exact(dim)
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        return Err(AnalysisError::NotFinite { row });
    }
    Ok(n)
}

/// Mean of the rows at `idx` (a zero-length vector when `idx` is empty).
fn mean_of(features: &[f32], dim: usize, idx: &[usize]) -> Vec<f64> {
    if idx.is_empty() {
        return vec![];
    }
    let mut m = vec![0.0f64; dim];
    for &i in idx {
        for (a, &x) in m.iter_mut().zip(&features[i * dim..(i + 1) * dim]) {
            *a += f64::from(x);
        }
    }
    let k = idx.len() as f64;
    m.iter_mut().for_each(|a| *a /= k);
    m
}

fn dist2(row: &[f32], c: &[f64]) -> f64 {
    row.iter()
        .zip(c)
        .map(|(&x, &m)| (f64::from(x) - m).powi(2))
        .sum()
}

/// Class statistics of `features` `[n, dim]`, with `members[c]` the rows of class `c`.
pub fn analyze(
    features: &[f32],
    dim: usize,
    members: &[Vec<usize>],
) -> Result<Analysis, AnalysisError> {
    let n = check(features, dim)?;
    for (class, rows) in members.iter().enumerate() {
        if let Some(&row) = rows.iter().find(|&&r| r >= n) {
            return Err(AnalysisError::Row {
                class,
                row,
                rows: n,
            });
        }
    }
    let all: Vec<usize> = members.iter().flatten().copied().collect();
    let mut in_any = vec![false; n];
    all.iter().for_each(|&i| in_any[i] = true);
    let mu = mean_of(features, dim, &all);
    let mut classes = Vec::with_capacity(members.len());
    let (mut sw, mut sb, mut st) = (0.0, 0.0, 0.0);
    for (class, rows) in members.iter().enumerate() {
        let centre = mean_of(features, dim, rows);
        let mut tr = 0.0;
        let mut dsum = 0.0;
        for &i in rows {
            let row = &features[i * dim..(i + 1) * dim];
            let d2 = dist2(row, &centre);
            tr += d2;
            dsum += d2.sqrt();
            st += dist2(row, &mu);
        }
        let k = rows.len() as f64;
        if !rows.is_empty() {
            sb += k * centre
                .iter()
                .zip(&mu)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>();
        }
        sw += tr;
        classes.push(ClassStats {
            class,
            n: rows.len(),
            trace_sw: tr,
            trace_sw_per_image: if rows.is_empty() { 0.0 } else { tr / k },
            mean_distance: if rows.is_empty() { 0.0 } else { dsum / k },
            centre,
        });
    }
    let mut dists = Vec::new();
    let filled: Vec<&ClassStats> = classes.iter().filter(|c| c.n > 0).collect();
    for (a, ca) in filled.iter().enumerate() {
        for cb in &filled[a + 1..] {
            let d: f64 = ca
                .centre
                .iter()
                .zip(&cb.centre)
                .map(|(x, y)| (x - y).powi(2))
                .sum();
            dists.push(d.sqrt());
        }
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    Ok(Analysis {
        dim,
        images: n,
        memberships: all.len(),
        unassigned: in_any.iter().filter(|&&b| !b).count(),
        classes,
        trace_sw: sw,
        trace_sb: sb,
        trace_st: st,
        within_fraction: ratio(sw, st),
        separation: ratio(sb, sw),
        centre_distance_min: dists.iter().cloned().reduce(f64::min),
        centre_distance_mean: if dists.is_empty() {
            None
        } else {
            Some(dists.iter().sum::<f64>() / dists.len() as f64)
        },
    })
}

/// The full within-class scatter matrix Σ_W `[dim, dim]` (row-major), as the module
/// documentation defines it. [`analyze`] only needs its trace; this is for users who
/// want the matrix, and for the tests.
pub fn within_scatter(
    features: &[f32],
    dim: usize,
    members: &[Vec<usize>],
) -> Result<Vec<f64>, AnalysisError> {
    let n = check(features, dim)?;
    let mut s = vec![0.0f64; dim * dim];
    for (class, rows) in members.iter().enumerate() {
        if let Some(&row) = rows.iter().find(|&&r| r >= n) {
            return Err(AnalysisError::Row {
                class,
                row,
                rows: n,
            });
        }
        let c = mean_of(features, dim, rows);
        for &i in rows {
            let d: Vec<f64> = features[i * dim..(i + 1) * dim]
                .iter()
                .zip(&c)
                .map(|(&x, &m)| f64::from(x) - m)
                .collect();
            for a in 0..dim {
                for b in 0..dim {
                    s[a * dim + b] += d[a] * d[b];
                }
            }
        }
    }
    Ok(s)
}

/// A principal component analysis.
#[derive(Debug, Clone, Serialize)]
pub struct Pca {
    /// Mean of the rows.
    pub mean: Vec<f64>,
    /// All eigenvalues of the covariance, decreasing (variance along each component).
    pub eigenvalues: Vec<f64>,
    /// The first `k` components, unit vectors `[k][dim]`.
    pub components: Vec<Vec<f64>>,
}

impl Pca {
    /// Share of the total variance along each of the first `k` components.
    pub fn explained_ratio(&self) -> Vec<f64> {
        let total: f64 = self.eigenvalues.iter().map(|v| v.max(0.0)).sum();
        self.components
            .iter()
            .zip(&self.eigenvalues)
            .map(|(_, &v)| if total > 0.0 { v.max(0.0) / total } else { 0.0 })
            .collect()
    }

    /// Coordinates of every row on the components: `[n][k]`.
    pub fn project(&self, features: &[f32]) -> Vec<Vec<f64>> {
        let dim = self.mean.len();
        features
            .chunks_exact(dim)
            .map(|row| {
                self.components
                    .iter()
                    .map(|c| {
                        row.iter()
                            .zip(&self.mean)
                            .zip(c)
                            .map(|((&x, &m), &w)| (f64::from(x) - m) * w)
                            .sum()
                    })
                    .collect()
            })
            .collect()
    }
}

/// PCA of `features` `[n, dim]` keeping `k` components (at most `dim`).
pub fn pca(features: &[f32], dim: usize, k: usize) -> Result<Pca, AnalysisError> {
    let n = check(features, dim)?;
    let all: Vec<usize> = (0..n).collect();
    let mean = mean_of(features, dim, &all);
    let mut cov = nalgebra::DMatrix::<f64>::zeros(dim, dim);
    let mut d = vec![0.0f64; dim];
    for row in features.chunks_exact(dim) {
        for ((t, &x), &m) in d.iter_mut().zip(row).zip(&mean) {
            *t = f64::from(x) - m;
        }
        for a in 0..dim {
            let da = d[a];
            for b in a..dim {
                cov[(a, b)] += da * d[b];
            }
        }
    }
    for a in 0..dim {
        for b in a..dim {
            let v = cov[(a, b)] / n as f64;
            cov[(a, b)] = v;
            cov[(b, a)] = v;
        }
    }
    let eig = nalgebra::SymmetricEigen::new(cov);
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let eigenvalues: Vec<f64> = order.iter().map(|&i| eig.eigenvalues[i]).collect();
    let components = order
        .iter()
        .take(k.min(dim))
        .map(|&i| {
            let mut v: Vec<f64> = eig.eigenvectors.column(i).iter().copied().collect();
            let big = v
                .iter()
                .copied()
                .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
            if big < 0.0 {
                v.iter_mut().for_each(|x| *x = -*x);
            }
            v
        })
        .collect();
    Ok(Pca {
        mean,
        eigenvalues,
        components,
    })
}

/// A Gaussian kernel density estimate of 2-D points on a `res × res` grid over
/// `[x0, x1] × [y0, y1]`: `grid[j][i]` is the density at
/// `(x0 + i·(x1−x0)/(res−1), y0 + j·(y1−y0)/(res−1))`. The bandwidth per axis is Scott's
/// rule, `σ · n^(−1/6)` (σ the axis's standard deviation; a small floor keeps a class
/// whose points coincide drawable).
pub fn kde2d(points: &[[f64; 2]], x: (f64, f64), y: (f64, f64), res: usize) -> Vec<Vec<f64>> {
    let n = points.len();
    let res = res.max(2);
    let mut grid = vec![vec![0.0; res]; res];
    if n == 0 {
        return grid;
    }
    let sd = |k: usize| {
        let m = points.iter().map(|p| p[k]).sum::<f64>() / n as f64;
        (points.iter().map(|p| (p[k] - m).powi(2)).sum::<f64>() / n as f64).sqrt()
    };
    let floor = 1e-3 * ((x.1 - x.0).abs() + (y.1 - y.0).abs()).max(1e-12);
    let f = (n as f64).powf(-1.0 / 6.0);
    let (hx, hy) = ((sd(0) * f).max(floor), (sd(1) * f).max(floor));
    let norm = 1.0 / (n as f64 * 2.0 * std::f64::consts::PI * hx * hy);
    for (j, row) in grid.iter_mut().enumerate() {
        let gy = y.0 + (y.1 - y.0) * j as f64 / (res - 1) as f64;
        for (i, v) in row.iter_mut().enumerate() {
            let gx = x.0 + (x.1 - x.0) * i as f64 / (res - 1) as f64;
            *v = norm
                * points
                    .iter()
                    .map(|p| {
                        (-0.5 * (((gx - p[0]) / hx).powi(2) + ((gy - p[1]) / hy).powi(2))).exp()
                    })
                    .sum::<f64>();
        }
    }
    grid
}

/// The level set `grid = level` as line segments (marching squares), in the grid's
/// coordinates over `[x0, x1] × [y0, y1]` (the layout of [`kde2d`]).
pub fn contour(
    grid: &[Vec<f64>],
    x: (f64, f64),
    y: (f64, f64),
    level: f64,
) -> Vec<[(f64, f64); 2]> {
    let rows = grid.len();
    let cols = grid.first().map_or(0, Vec::len);
    let mut segs = Vec::new();
    if rows < 2 || cols < 2 {
        return segs;
    }
    let px = |i: f64| x.0 + (x.1 - x.0) * i / (cols - 1) as f64;
    let py = |j: f64| y.0 + (y.1 - y.0) * j / (rows - 1) as f64;
    for j in 0..rows - 1 {
        for i in 0..cols - 1 {
            // Corners counter-clockwise: (i,j) (i+1,j) (i+1,j+1) (i,j+1).
            let c = [
                (i as f64, j as f64, grid[j][i]),
                (i as f64 + 1.0, j as f64, grid[j][i + 1]),
                (i as f64 + 1.0, j as f64 + 1.0, grid[j + 1][i + 1]),
                (i as f64, j as f64 + 1.0, grid[j + 1][i]),
            ];
            // Where the level crosses each edge.
            let mut pts = Vec::with_capacity(4);
            for e in 0..4 {
                let (a, b) = (c[e], c[(e + 1) % 4]);
                if (a.2 >= level) != (b.2 >= level) {
                    let t = (level - a.2) / (b.2 - a.2);
                    pts.push((px(a.0 + t * (b.0 - a.0)), py(a.1 + t * (b.1 - a.1))));
                }
            }
            match pts.len() {
                2 => segs.push([pts[0], pts[1]]),
                // A saddle: pair the crossings by the cell's mean.
                4 => {
                    let centre = c.iter().map(|p| p.2).sum::<f64>() / 4.0;
                    if (centre >= level) == (c[0].2 >= level) {
                        segs.push([pts[0], pts[3]]);
                        segs.push([pts[1], pts[2]]);
                    } else {
                        segs.push([pts[0], pts[1]]);
                        segs.push([pts[2], pts[3]]);
                    }
                }
                _ => {}
            }
        }
    }
    segs
}

/// Histogram of `values` in `bins` equal bins over `[lo, hi]` (values outside are
/// clamped into the end bins).
pub fn histogram(values: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<usize> {
    let bins = bins.max(1);
    let mut h = vec![0usize; bins];
    let w = (hi - lo) / bins as f64;
    for &v in values {
        let b = if w > 0.0 {
            (((v - lo) / w).floor().max(0.0) as usize).min(bins - 1)
        } else {
            0
        };
        h[b] += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approx(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn hand_computed_two_classes() {
        // Class 0: (0,0), (2,0) -> centre (1,0), scatter 1 + 1 = 2.
        // Class 1: (0,4), (0,6), (0,8) -> centre (0,6), scatter 4 + 0 + 4 = 8.
        let f = [0., 0., 2., 0., 0., 4., 0., 6., 0., 8.];
        let members = vec![vec![0, 1], vec![2, 3, 4]];
        let a = analyze(&f, 2, &members).unwrap();
        assert_eq!(a.images, 5);
        assert_eq!(a.memberships, 5);
        assert_eq!(a.unassigned, 0);
        assert_eq!(a.classes[0].centre, vec![1.0, 0.0]);
        assert_eq!(a.classes[1].centre, vec![0.0, 6.0]);
        assert!(approx(a.classes[0].trace_sw, 2.0, 1e-15));
        assert!(approx(a.classes[1].trace_sw, 8.0, 1e-15));
        assert!(approx(a.trace_sw, 10.0, 1e-15));
        assert!(approx(a.classes[0].trace_sw_per_image, 1.0, 1e-15));
        assert!(approx(a.classes[1].trace_sw_per_image, 8.0 / 3.0, 1e-15));
        assert!(approx(a.classes[0].mean_distance, 1.0, 1e-15));
        assert!(approx(a.classes[1].mean_distance, 4.0 / 3.0, 1e-15));
        // μ = (2/5, 18/5); Σ_B = 2‖(3/5, −18/5)‖² + 3‖(−2/5, 12/5)‖² = 2·13.32 + 3·5.92.
        assert!(approx(a.trace_sb, 2.0 * 13.32 + 3.0 * 5.92, 1e-12));
        assert!(approx(a.trace_st, a.trace_sw + a.trace_sb, 1e-12));
        assert!(approx(a.centre_distance_min.unwrap(), 37f64.sqrt(), 1e-15));
        assert!(approx(a.within_fraction, 10.0 / (10.0 + 44.4), 1e-12));
        // The full matrix: class 0 contributes diag(2, 0), class 1 diag(0, 8).
        let s = within_scatter(&f, 2, &members).unwrap();
        assert_eq!(s, vec![2.0, 0.0, 0.0, 8.0]);
    }

    /// A small deterministic generator (no dependency on `rand`'s stream).
    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f64 / (1u64 << 31) as f64 * 4.0 - 2.0) as f32
    }

    #[test]
    fn random_multilabel_against_pairwise_formula() {
        // tr Σ_W^c = (1 / (2 n_c)) Σ_{x,y ∈ c} ‖x − y‖²: an independent O(n²) formula
        // that uses no centre.
        let (n, dim) = (37, 5);
        let mut s = 7;
        let f: Vec<f32> = (0..n * dim).map(|_| lcg(&mut s)).collect();
        // Overlapping classes and one row in none.
        let members: Vec<Vec<usize>> = vec![
            (0..n).filter(|i| i % 3 == 0).collect(),
            (0..n).filter(|i| i % 2 == 0).collect(),
            (1..n).filter(|i| i % 5 == 1).collect(),
            vec![],
        ];
        let a = analyze(&f, dim, &members).unwrap();
        let d2 = |i: usize, j: usize| -> f64 {
            (0..dim)
                .map(|k| (f64::from(f[i * dim + k]) - f64::from(f[j * dim + k])).powi(2))
                .sum()
        };
        let mut total = 0.0;
        for (c, rows) in members.iter().enumerate() {
            let mut s = 0.0;
            for &i in rows {
                for &j in rows {
                    s += d2(i, j);
                }
            }
            let want = if rows.is_empty() {
                0.0
            } else {
                s / (2.0 * rows.len() as f64)
            };
            assert!(approx(a.classes[c].trace_sw, want, 1e-12), "class {c}");
            assert_eq!(a.classes[c].n, rows.len());
            total += want;
        }
        assert!(approx(a.trace_sw, total, 1e-12));
        assert_eq!(a.memberships, members.iter().map(Vec::len).sum::<usize>());
        let in_none = (0..n)
            .filter(|i| !members.iter().any(|m| m.contains(i)))
            .count();
        assert_eq!(a.unassigned, in_none);
        // Σ_T = Σ_W + Σ_B on memberships, and the trace of the full Σ_W matrix.
        assert!(approx(a.trace_st, a.trace_sw + a.trace_sb, 1e-12));
        let m = within_scatter(&f, dim, &members).unwrap();
        let tr: f64 = (0..dim).map(|k| m[k * dim + k]).sum();
        assert!(approx(tr, a.trace_sw, 1e-12));
        // Symmetric.
        for x in 0..dim {
            for y in 0..dim {
                assert_eq!(m[x * dim + y], m[y * dim + x]);
            }
        }
        // Centre distances by brute force.
        let filled: Vec<&ClassStats> = a.classes.iter().filter(|c| c.n > 0).collect();
        let mut ds = vec![];
        for i in 0..filled.len() {
            for j in i + 1..filled.len() {
                let d: f64 = (0..dim)
                    .map(|k| (filled[i].centre[k] - filled[j].centre[k]).powi(2))
                    .sum();
                ds.push(d.sqrt());
            }
        }
        let min = ds.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(approx(a.centre_distance_min.unwrap(), min, 1e-15));
    }

    #[test]
    fn errors_are_reported() {
        assert_eq!(
            analyze(&[1.0, 2.0, 3.0], 2, &[]).unwrap_err(),
            AnalysisError::Shape { len: 3, dim: 2 }
        );
        assert_eq!(
            analyze(&[1.0, 2.0], 2, &[vec![1]]).unwrap_err(),
            AnalysisError::Row {
                class: 0,
                row: 1,
                rows: 1
            }
        );
        assert_eq!(
            analyze(&[1.0, f32::NAN], 2, &[vec![0]]).unwrap_err(),
            AnalysisError::NotFinite { row: 0 }
        );
        assert_eq!(analyze(&[], 2, &[]).unwrap_err(), AnalysisError::Empty);
    }

    #[test]
    fn pca_of_a_known_covariance() {
        // Points (±3, ±1) rotated by 30°: variances 9 and 1 along u = (cos30, sin30) and
        // v = (−sin30, cos30).
        let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
        let mut f = vec![];
        for (a, b) in [(3.0, 1.0), (3.0, -1.0), (-3.0, 1.0), (-3.0, -1.0)] {
            f.push((a * c - b * s + 5.0) as f32);
            f.push((a * s + b * c - 2.0) as f32);
        }
        let p = pca(&f, 2, 2).unwrap();
        assert!(approx(p.mean[0], 5.0, 1e-6) && approx(p.mean[1], -2.0, 1e-6));
        assert!(approx(p.eigenvalues[0], 9.0, 1e-6), "{:?}", p.eigenvalues);
        assert!(approx(p.eigenvalues[1], 1.0, 1e-6));
        assert!(approx(p.components[0][0], c, 1e-6) && approx(p.components[0][1], s, 1e-6));
        // Second component signed so its largest entry is positive: (−sin, cos).
        assert!(approx(p.components[1][0], -s, 1e-6) && approx(p.components[1][1], c, 1e-6));
        let r = p.explained_ratio();
        assert!(approx(r[0], 0.9, 1e-6) && approx(r[1], 0.1, 1e-6));
        let proj = p.project(&f);
        assert!(approx(proj[0][0], 3.0, 1e-5) && approx(proj[0][1], 1.0, 1e-5));
    }

    /// Checked against numpy (`np.linalg.eigh(np.cov(X.T, bias=True))`) on the rows the
    /// deterministic generator makes; the values below were printed by numpy.
    #[test]
    fn pca_matches_numpy() {
        let (n, dim) = (20, 4);
        let mut s = 11;
        let f: Vec<f32> = (0..n * dim).map(|_| lcg(&mut s)).collect();
        let p = pca(&f, dim, 4).unwrap();
        let want = NUMPY_EIGENVALUES;
        for (k, w) in want.iter().enumerate() {
            assert!(
                approx(p.eigenvalues[k], *w, 1e-9),
                "{k}: {:?}",
                p.eigenvalues
            );
        }
        for (k, w) in NUMPY_PC1.iter().enumerate() {
            assert!(
                approx(p.components[0][k], *w, 1e-7),
                "{:?}",
                p.components[0]
            );
        }
        // Orthonormal components.
        for a in 0..4 {
            for b in 0..4 {
                let d: f64 = (0..dim)
                    .map(|k| p.components[a][k] * p.components[b][k])
                    .sum();
                assert!(approx(d, if a == b { 1.0 } else { 0.0 }, 1e-12));
            }
        }
    }

    const NUMPY_EIGENVALUES: [f64; 4] = [
        1.859711107284549,
        1.4489778326096225,
        1.259906384054105,
        0.4529675253427372,
    ];
    const NUMPY_PC1: [f64; 4] = [
        -0.5966622640443949,
        0.601255986798719,
        -0.10916011126944841,
        -0.5201629082429429,
    ];

    #[test]
    fn kde_contour_and_histogram() {
        // The density at a grid point against the formula, for points of known spread.
        let pts = [[-1.0, 0.0], [1.0, 0.0], [-1.0, 2.0], [1.0, 2.0]];
        let g = kde2d(&pts, (-2.0, 2.0), (-1.0, 3.0), 5);
        // sd = 1 on both axes, n = 4: h = 4^(-1/6).
        let h = 4f64.powf(-1.0 / 6.0);
        let at = |x: f64, y: f64| -> f64 {
            pts.iter()
                .map(|p| (-0.5 * (((x - p[0]) / h).powi(2) + ((y - p[1]) / h).powi(2))).exp())
                .sum::<f64>()
                / (4.0 * 2.0 * std::f64::consts::PI * h * h)
        };
        for (j, i) in [(0, 0), (2, 2), (1, 3), (4, 4)] {
            let (x, y) = (-2.0 + i as f64, -1.0 + j as f64);
            assert!(approx(g[j][i], at(x, y), 1e-12), "{i} {j}");
        }
        // Marching squares on f = x² + y²: the level r² is the circle of radius r; the
        // crossings are linear interpolations along cell edges, within a cell's error.
        let res = 41;
        let f: Vec<Vec<f64>> = (0..res)
            .map(|j| {
                (0..res)
                    .map(|i| {
                        let (x, y) = (-1.0 + 0.05 * i as f64, -1.0 + 0.05 * j as f64);
                        x * x + y * y
                    })
                    .collect()
            })
            .collect();
        let segs = contour(&f, (-1.0, 1.0), (-1.0, 1.0), 0.36);
        assert!(segs.len() > 40, "{}", segs.len());
        for p in segs.iter().flatten() {
            let r = (p.0 * p.0 + p.1 * p.1).sqrt();
            assert!((r - 0.6).abs() < 0.01, "{r}");
        }
        // Closed curve: every endpoint is shared by exactly two segments.
        let key = |p: &(f64, f64)| ((p.0 * 1e6).round() as i64, (p.1 * 1e6).round() as i64);
        let mut count = std::collections::HashMap::new();
        for p in segs.iter().flatten() {
            *count.entry(key(p)).or_insert(0) += 1;
        }
        assert!(count.values().all(|&c| c == 2));
        assert!(contour(&f, (-1.0, 1.0), (-1.0, 1.0), 5.0).is_empty());
        assert_eq!(
            histogram(&[0.0, 0.5, 0.99, 1.0, -3.0, 7.0], 0.0, 1.0, 2),
            vec![2, 4]
        );
    }
}
