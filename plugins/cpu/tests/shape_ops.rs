//! Data movement ops against direct index formulas: permute, concat, slice, broadcast,
//! reshape, patchify.

mod common;

use common::*;
use eptc_ir::Shape;
use rand::seq::SliceRandom;

#[test]
fn permute_random_permutations() {
    let mut r = rng(100);
    for rank in 1..=5 {
        for _ in 0..6 {
            let sh = shape(&mut r, rank, 7);
            let mut perm: Vec<usize> = (0..rank).collect();
            perm.shuffle(&mut r);
            let (x, v) = Nd::random(&mut r, &sh);
            let got = run(&[(&sh, &v)], |g, x| g.permute(x[0], &perm).unwrap());
            let out: Vec<usize> = perm.iter().map(|&p| sh[p]).collect();
            let want = Nd::build(&out, |i| {
                let mut src = vec![0; rank];
                for (d, &p) in perm.iter().enumerate() {
                    src[p] = i[d];
                }
                x.at(&src)
            });
            assert_close(&got, &want, 0.0);
        }
    }
}

#[test]
fn permute_attention_heads() {
    // [B, N, H, d] -> [B, H, N, d], big enough to split across threads.
    let sh = [2, 197, 12, 64];
    let mut r = rng(101);
    let (x, v) = Nd::random(&mut r, &sh);
    let got = run(&[(&sh, &v)], |g, x| g.permute(x[0], &[0, 2, 1, 3]).unwrap());
    let want = Nd::build(&[2, 12, 197, 64], |i| x.at(&[i[0], i[2], i[1], i[3]]));
    assert_close(&got, &want, 0.0);
}

#[test]
fn concat_three_operands_on_every_axis() {
    let mut r = rng(110);
    let base = [3, 4, 5];
    for axis in 0..3 {
        let sizes = [2, 1, 3];
        let shapes: Vec<Vec<usize>> = sizes
            .iter()
            .map(|&s| {
                let mut sh = base.to_vec();
                sh[axis] = s;
                sh
            })
            .collect();
        let parts: Vec<(Nd, Vec<f32>)> = shapes.iter().map(|s| Nd::random(&mut r, s)).collect();
        let inputs: Vec<(&[usize], &[f32])> = shapes
            .iter()
            .zip(&parts)
            .map(|(s, p)| (s.as_slice(), p.1.as_slice()))
            .collect();
        let got = run(&inputs, |g, x| g.concat(x, axis).unwrap());
        let mut out = base.to_vec();
        out[axis] = sizes.iter().sum();
        let want = Nd::build(&out, |i| {
            let (mut k, mut j) = (0, i[axis]);
            while j >= sizes[k] {
                j -= sizes[k];
                k += 1;
            }
            let mut idx = i.to_vec();
            idx[axis] = j;
            parts[k].0.at(&idx)
        });
        assert_close(&got, &want, 0.0);
    }
}

#[test]
fn concat_prompt_tokens() {
    // The EPT shape: [B, N, D] tokens and [B, L, D] prompts along the token axis.
    let mut r = rng(111);
    let (a, va) = Nd::random(&mut r, &[4, 197, 96]);
    let (b, vb) = Nd::random(&mut r, &[4, 10, 96]);
    let got = run(&[(&[4, 197, 96], &va), (&[4, 10, 96], &vb)], |g, x| {
        g.concat(x, 1).unwrap()
    });
    let want = Nd::build(&[4, 207, 96], |i| {
        if i[1] < 197 {
            a.at(i)
        } else {
            b.at(&[i[0], i[1] - 197, i[2]])
        }
    });
    assert_close(&got, &want, 0.0);
}

#[test]
fn slice_on_every_axis() {
    let mut r = rng(120);
    let sh = [4, 6, 5];
    let (x, v) = Nd::random(&mut r, &sh);
    for axis in 0..3 {
        for (start, end) in [(0, 1), (1, 3), (0, sh[axis]), (sh[axis] - 1, sh[axis])] {
            let got = run(&[(&sh, &v)], |g, x| {
                g.slice(x[0], axis, start, end).unwrap()
            });
            let mut out = sh.to_vec();
            out[axis] = end - start;
            let want = Nd::build(&out, |i| {
                let mut idx = i.to_vec();
                idx[axis] += start;
                x.at(&idx)
            });
            assert_close(&got, &want, 0.0);
        }
    }
}

#[test]
fn broadcast_to_bigger_shapes() {
    let mut r = rng(130);
    for (from, to) in [
        (vec![5], vec![3, 4, 5]),
        (vec![3, 1, 5], vec![2, 3, 4, 5]),
        (vec![1, 1], vec![7, 9]),
        (vec![], vec![2, 3]),
        (vec![1, 768], vec![8, 1, 768]),
    ] {
        let (x, v) = Nd::random(&mut r, &from);
        let got = run(&[(&from, &v)], |g, x| {
            g.broadcast(x[0], Shape::fixed(&to)).unwrap()
        });
        let want = Nd::build(&to, |i| at_broadcast(&x, i));
        assert_close(&got, &want, 0.0);
    }
}

#[test]
fn reshape_keeps_row_major_order() {
    let mut r = rng(140);
    let (x, v) = Nd::random(&mut r, &[2, 3, 4]);
    let got = run(&[(&[2, 3, 4], &v)], |g, x| {
        g.reshape(x[0], Shape::fixed(&[6, 4])).unwrap()
    });
    assert_close(&got, &Nd::new(&[6, 4], x.data.clone()), 0.0);
}

#[test]
fn patchify_matches_index_formula() {
    let mut r = rng(150);
    for (b, c, h, w, p) in [
        (2, 3, 8, 12, 4),
        (1, 1, 4, 4, 1),
        (3, 2, 6, 6, 3),
        (1, 3, 32, 32, 16),
    ] {
        let sh = [b, c, h, w];
        let (x, v) = Nd::random(&mut r, &sh);
        let got = run(&[(&sh, &v)], |g, x| g.patchify(x[0], p).unwrap());
        let gw = w / p;
        let want = Nd::build(&[b, (h / p) * gw, c * p * p], |i| {
            let (bi, patch, f) = (i[0], i[1], i[2]);
            let (gy, gx) = (patch / gw, patch % gw);
            let (ci, ky, kx) = (f / (p * p), (f / p) % p, f % p);
            x.at(&[bi, ci, gy * p + ky, gx * p + kx])
        });
        assert_close(&got, &want, 0.0);
    }
}

#[test]
fn empty_tensors_do_not_panic() {
    use eptc_ir::{BinaryOp, ReduceOp, UnaryOp};
    let e: &[f32] = &[];
    let y = run(&[(&[3, 0], e), (&[0], e)], |g, x| {
        g.binary(BinaryOp::Add, x[0], x[1]).unwrap()
    });
    assert_eq!(y.shape, vec![3, 0]);
    let y = run(&[(&[2, 0, 4], e)], |g, x| {
        g.unary(UnaryOp::Gelu, x[0]).unwrap()
    });
    assert_eq!(y.shape, vec![2, 0, 4]);
    let y = run(&[(&[2, 0, 4], e)], |g, x| {
        g.reduce(ReduceOp::Sum, x[0], &[1], false).unwrap()
    });
    assert_eq!(y.data(), &[0.0; 8]);
    let y = run(&[(&[2, 0, 4], e)], |g, x| g.softmax(x[0], 1).unwrap());
    assert_eq!(y.shape, vec![2, 0, 4]);
    let y = run(&[(&[2, 0, 4], e)], |g, x| {
        g.permute(x[0], &[2, 1, 0]).unwrap()
    });
    assert_eq!(y.shape, vec![4, 0, 2]);
    let y = run(&[(&[3, 0], e), (&[0, 4], e)], |g, x| {
        g.matmul(x[0], x[1], false, false).unwrap()
    });
    assert_eq!(y.data(), &[0.0; 12], "k = 0 gives zeros");
    let y = run(&[(&[0, 5], e), (&[5, 4], &[1.0; 20])], |g, x| {
        g.matmul(x[0], x[1], false, false).unwrap()
    });
    assert_eq!(y.shape, vec![0, 4]);
    let y = run(&[(&[2, 0], e), (&[2, 3], &[1.0; 6])], |g, x| {
        g.concat(x, 1).unwrap()
    });
    assert_eq!(y.data(), &[1.0; 6]);
    let y = run(&[(&[2, 3], &[1.0; 6])], |g, x| {
        g.slice(x[0], 1, 1, 2).unwrap()
    });
    assert_eq!(y.shape, vec![2, 1]);
}
