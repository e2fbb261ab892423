//! Reductions, softmax and layernorm against naive f64 references.

mod common;

use common::*;
use eptc_ir::ReduceOp;

fn reference_reduce(op: ReduceOp, x: &Nd, axes: &[usize], keepdim: bool) -> Nd {
    let out_full: Vec<usize> = (0..x.shape.len())
        .map(|d| if axes.contains(&d) { 1 } else { x.shape[d] })
        .collect();
    let red: Vec<usize> = axes.iter().map(|&a| x.shape[a]).collect();
    let count: usize = red.iter().product();
    let full = Nd::build(&out_full, |o| {
        let vals: Vec<f64> = (0..count)
            .map(|k| {
                let r = unravel(&red, k);
                let mut idx = o.to_vec();
                for (&a, &i) in axes.iter().zip(&r) {
                    idx[a] = i;
                }
                x.at(&idx)
            })
            .collect();
        match op {
            ReduceOp::Sum => vals.iter().sum(),
            ReduceOp::Mean => vals.iter().sum::<f64>() / count as f64,
            ReduceOp::Max => vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            ReduceOp::Min => vals.iter().cloned().fold(f64::INFINITY, f64::min),
            ReduceOp::LogSumExp => vals.iter().map(|v| v.exp()).sum::<f64>().ln(),
        }
    });
    if keepdim {
        full
    } else {
        let sh: Vec<usize> = (0..x.shape.len())
            .filter(|d| !axes.contains(d))
            .map(|d| x.shape[d])
            .collect();
        Nd::new(&sh, full.data)
    }
}

#[test]
fn reduce_over_axis_sets() {
    let sh = [3, 4, 5, 6];
    let mut r = rng(30);
    let (x, v) = Nd::random(&mut r, &sh);
    let sets: [&[usize]; 9] = [
        &[3],
        &[0],
        &[1],
        &[1, 2],
        &[0, 2],
        &[3, 1],
        &[0, 1, 2, 3],
        &[2, 3],
        &[0, 3],
    ];
    for axes in sets {
        for keepdim in [false, true] {
            for op in ReduceOp::ALL {
                let got = run(&[(&sh, &v)], |g, x| {
                    g.reduce(op, x[0], axes, keepdim).unwrap()
                });
                let want = reference_reduce(op, &x, axes, keepdim);
                assert_close(&got, &want, 1e-6);
            }
        }
    }
}

#[test]
fn reduce_large_rows_and_tokens() {
    // Mean over tokens (a middle axis) and a long sum over the last axis.
    let mut r = rng(31);
    let sh = [4, 197, 64];
    let (x, v) = Nd::random(&mut r, &sh);
    for (axes, op) in [(&[1usize][..], ReduceOp::Mean), (&[2][..], ReduceOp::Sum)] {
        let got = run(&[(&sh, &v)], |g, x| {
            g.reduce(op, x[0], axes, false).unwrap()
        });
        assert_close(&got, &reference_reduce(op, &x, axes, false), 1e-6);
    }
    let sh = [3, 50000];
    let (x, v) = Nd::random(&mut r, &sh);
    for op in ReduceOp::ALL {
        let got = run(&[(&sh, &v)], |g, x| {
            g.reduce(op, x[0], &[0, 1], true).unwrap()
        });
        assert_close(&got, &reference_reduce(op, &x, &[0, 1], true), 1e-6);
    }
}

#[test]
fn reduce_max_propagates_nan_and_logsumexp_is_stable() {
    let v = [1.0f32, f32::NAN, 3.0, 1000.0, 1000.0, f32::NEG_INFINITY];
    let max = run(&[(&[2, 3], &v)], |g, x| {
        g.reduce(ReduceOp::Max, x[0], &[1], false).unwrap()
    });
    assert!(max.data()[0].is_nan());
    assert_eq!(max.data()[1], 1000.0);
    let lse = run(&[(&[2, 3], &v)], |g, x| {
        g.reduce(ReduceOp::LogSumExp, x[0], &[1], false).unwrap()
    });
    assert!((lse.data()[1] - (1000.0 + 2f32.ln())).abs() < 1e-3);
    let ninf = [f32::NEG_INFINITY; 2];
    let lse = run(&[(&[2], &ninf)], |g, x| {
        g.reduce(ReduceOp::LogSumExp, x[0], &[0], false).unwrap()
    });
    assert_eq!(lse.data()[0], f32::NEG_INFINITY);
}

fn reference_softmax(x: &Nd, axis: usize) -> Nd {
    Nd::build(&x.shape, |i| {
        let row: Vec<f64> = (0..x.shape[axis])
            .map(|k| {
                let mut j = i.to_vec();
                j[axis] = k;
                x.at(&j)
            })
            .collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
        (x.at(i) - m).exp() / s
    })
}

#[test]
fn softmax_along_every_axis() {
    let mut r = rng(40);
    for sh in [vec![3, 5, 7], vec![2, 12, 197, 30], vec![1000, 3]] {
        let (x, v) = Nd::random(&mut r, &sh);
        for axis in 0..sh.len() {
            let got = run(&[(&sh, &v)], |g, x| g.softmax(x[0], axis).unwrap());
            assert_close(&got, &reference_softmax(&x, axis), 1e-6);
        }
    }
}

#[test]
fn softmax_is_stable_for_large_logits() {
    let v = [1000.0f32, 1001.0, -1000.0, 0.0];
    let got = run(&[(&[4], &v)], |g, x| g.softmax(x[0], 0).unwrap());
    let x = Nd::from_f32(&[4], &v);
    assert_close(&got, &reference_softmax(&x, 0), 1e-6);
}

fn reference_layernorm(x: &Nd, g: &Nd, b: &Nd, eps: f64) -> Nd {
    let d = *x.shape.last().unwrap();
    let mut out = x.clone();
    for row in out.data.chunks_mut(d) {
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
        for (j, v) in row.iter_mut().enumerate() {
            *v = (*v - mean) / (var + eps).sqrt() * g.data[j] + b.data[j];
        }
    }
    out
}

#[test]
fn layernorm_matches_biased_variance() {
    let mut r = rng(50);
    for (sh, eps) in [
        (vec![2, 9, 768], 1e-6f32),
        (vec![5, 3], 1e-5),
        (vec![64], 0.1),
    ] {
        let d = *sh.last().unwrap();
        let (_, mut v) = Nd::random(&mut r, &sh);
        // A large offset: a one-pass variance in f32 would lose it.
        v.iter_mut().for_each(|t| *t += 100.0);
        let x = Nd::from_f32(&sh, &v);
        let (gm, vg) = Nd::random(&mut r, &[d]);
        let (bt, vb) = Nd::random(&mut r, &[d]);
        let got = run(&[(&sh, &v), (&[d], &vg), (&[d], &vb)], |g, x| {
            g.layernorm(x[0], x[1], x[2], eps).unwrap()
        });
        let want = reference_layernorm(&x, &gm, &bt, f64::from(eps));
        assert_close(&got, &want, 1e-6);
    }
}
