//! Matrix products against a naive f64 reference: transpose flags, linear layers,
//! batched products with broadcast leading dims.

mod common;

use common::*;

/// `a @ b` with the flags, leading dims broadcast, in f64.
fn reference(a: &Nd, b: &Nd, ta: bool, tb: bool) -> Nd {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k) = if ta {
        (a.shape[ra - 1], a.shape[ra - 2])
    } else {
        (a.shape[ra - 2], a.shape[ra - 1])
    };
    let n = if tb { b.shape[rb - 2] } else { b.shape[rb - 1] };
    let lead = eptc_ir::infer::broadcast_shapes(
        &eptc_ir::Shape::fixed(&a.shape[..ra - 2]),
        &eptc_ir::Shape::fixed(&b.shape[..rb - 2]),
    )
    .unwrap()
    .as_fixed()
    .unwrap();
    let mut out = lead.clone();
    out.extend([m, n]);
    let pick = |t: &Nd, l: &[usize], r: usize, c: usize| {
        let lt = &t.shape[..t.shape.len() - 2];
        let off = l.len() - lt.len();
        let mut idx: Vec<usize> = lt
            .iter()
            .enumerate()
            .map(|(d, &s)| if s == 1 { 0 } else { l[off + d] })
            .collect();
        idx.extend([r, c]);
        t.at(&idx)
    };
    Nd::build(&out, |i| {
        let l = &i[..i.len() - 2];
        let (row, col) = (i[i.len() - 2], i[i.len() - 1]);
        (0..k)
            .map(|p| {
                let x = if ta {
                    pick(a, l, p, row)
                } else {
                    pick(a, l, row, p)
                };
                let y = if tb {
                    pick(b, l, col, p)
                } else {
                    pick(b, l, p, col)
                };
                x * y
            })
            .sum()
    })
}

fn check(seed: u64, sa: &[usize], sb: &[usize], ta: bool, tb: bool) {
    let mut r = rng(seed);
    let (a, va) = Nd::random(&mut r, sa);
    let (b, vb) = Nd::random(&mut r, sb);
    let want = reference(&a, &b, ta, tb);
    for threads in [1, 2] {
        let got = run_with(&[(sa, &va), (sb, &vb)], threads, |g, x| {
            g.matmul(x[0], x[1], ta, tb).unwrap()
        });
        // Sums of k products of values in [-2, 2]: f32 accumulation error ~ sqrt(k) ulp.
        let k = if ta {
            sa[sa.len() - 2]
        } else {
            sa[sa.len() - 1]
        };
        assert_close(&got, &want, 1e-6 * (k as f64).sqrt().max(1.0) * 4.0);
    }
}

#[test]
fn rank2_all_transpose_flags() {
    for (i, (ta, tb)) in [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let (m, k, n) = (37, 53, 29);
        let sa = if ta { [k, m] } else { [m, k] };
        let sb = if tb { [n, k] } else { [k, n] };
        check(60 + i as u64, &sa, &sb, ta, tb);
    }
}

#[test]
fn linear_layer_folds_leading_dims() {
    // [B, N, D] x W^T with W [out, D], and x W with W [D, out].
    check(70, &[3, 17, 64], &[48, 64], false, true);
    check(71, &[2, 3, 5, 40], &[40, 33], false, false);
    // b with leading ones is still a linear layer.
    check(72, &[4, 9, 16], &[1, 16, 8], false, false);
    // a transposed cannot be folded: a batched product against one b.
    check(73, &[3, 16, 9], &[16, 8], true, false);
}

#[test]
fn batched_attention_shapes() {
    // q k^T and p v with [B, H, N, d].
    check(80, &[2, 3, 21, 16], &[2, 3, 21, 16], false, true);
    check(81, &[2, 3, 21, 21], &[2, 3, 21, 16], false, false);
    check(82, &[2, 3, 16, 21], &[2, 3, 16, 21], true, false);
}

#[test]
fn batched_with_broadcast_leading_dims() {
    check(90, &[2, 1, 7, 5], &[3, 5, 6], false, false);
    check(91, &[7, 5], &[4, 5, 6], false, false);
    check(92, &[4, 1, 5, 7], &[1, 3, 6, 5], true, true);
    // One batch entry (fewer than the threads): gemm parallelises inside.
    check(93, &[1, 40, 30], &[1, 20, 30], false, true);
}

#[test]
fn degenerate_sizes() {
    check(95, &[1, 1], &[1, 1], false, false);
    check(96, &[5, 1], &[1, 4], false, false);
    check(97, &[1, 9], &[9, 1], false, false);
}

#[test]
fn vit_sized_linear_layer() {
    // One head-sized slice of a ViT-B linear layer, checked on a sample of entries.
    let (m, k, n) = (2 * 197, 768, 96);
    let mut r = rng(98);
    let (a, va) = Nd::random(&mut r, &[m, k]);
    let (b, vb) = Nd::random(&mut r, &[n, k]);
    let got = run(&[(&[m, k], &va), (&[n, k], &vb)], |g, x| {
        g.matmul(x[0], x[1], false, true).unwrap()
    });
    for (row, col) in [(0, 0), (m - 1, n - 1), (123, 45), (200, 7)] {
        let want: f64 = (0..k).map(|p| a.at(&[row, p]) * b.at(&[col, p])).sum();
        let g = f64::from(got.data()[row * n + col]);
        assert!(
            (g - want).abs() < 1e-4 * (1.0 + want.abs()),
            "{g} vs {want}"
        );
    }
}

#[test]
fn thread_count_does_not_change_a_large_gemm() {
    // Large enough that gemm splits it across threads.
    let (m, k, n) = (394, 768, 512);
    let mut r = rng(99);
    let (va, vb) = (values(&mut r, m * k), values(&mut r, n * k));
    let go = |t| {
        run_with(&[(&[2, 197, k], &va), (&[n, k], &vb)], t, |g, x| {
            g.matmul(x[0], x[1], false, true).unwrap()
        })
    };
    let (one, two) = (go(1), go(2));
    for (&x, &y) in one.data().iter().zip(two.data()) {
        assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
    }
}
