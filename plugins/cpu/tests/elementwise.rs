//! Binary ops with broadcasting and unary ops against naive f64 references.

mod common;

use common::*;
use eptc_ir::{BinaryOp, UnaryOp};
use rand::Rng;

fn reference_binary(op: BinaryOp, a: &Nd, b: &Nd, out: &[usize]) -> Nd {
    Nd::build(out, |i| {
        let (x, y) = (at_broadcast(a, i), at_broadcast(b, i));
        match op {
            BinaryOp::Add => x + y,
            BinaryOp::Sub => x - y,
            BinaryOp::Mul => x * y,
            BinaryOp::Div => x / y,
            BinaryOp::Maximum => x.max(y),
            BinaryOp::Minimum => x.min(y),
            BinaryOp::Equal => f64::from(u8::from(x == y)),
        }
    })
}

fn check_binary(seed: u64, sa: &[usize], sb: &[usize], out: &[usize]) {
    let mut r = rng(seed);
    let (a, va) = Nd::random(&mut r, sa);
    let (b, vb) = Nd::random(&mut r, sb);
    for op in BinaryOp::ALL {
        let got = run(&[(sa, &va), (sb, &vb)], |g, x| {
            g.binary(op, x[0], x[1]).unwrap()
        });
        let want = reference_binary(op, &a, &b, out);
        // Division by values near 0 amplifies f32 rounding of the quotient only.
        assert_close(&got, &want, 1e-6);
    }
}

#[test]
fn binary_same_shape() {
    check_binary(1, &[3, 5, 7], &[3, 5, 7], &[3, 5, 7]);
    // Large enough to be split across threads.
    check_binary(2, &[64, 1000], &[64, 1000], &[64, 1000]);
}

#[test]
fn binary_bias_along_leading_dims() {
    check_binary(3, &[4, 9, 16], &[16], &[4, 9, 16]);
    check_binary(4, &[16], &[4, 9, 16], &[4, 9, 16]);
    check_binary(5, &[8, 197, 96], &[1, 197, 96], &[8, 197, 96]);
    check_binary(6, &[1, 1, 5], &[300, 70, 5], &[300, 70, 5]);
}

#[test]
fn binary_scalar() {
    check_binary(7, &[6, 11], &[], &[6, 11]);
    check_binary(8, &[], &[6, 11], &[6, 11]);
    check_binary(9, &[1, 1], &[40000], &[1, 40000]);
    check_binary(10, &[], &[], &[]);
}

#[test]
fn binary_general_broadcast() {
    // Keepdim statistics against rows, both sides broadcast, rank mismatch.
    check_binary(11, &[4, 9, 1], &[4, 9, 16], &[4, 9, 16]);
    check_binary(12, &[1, 9, 1], &[4, 1, 16], &[4, 9, 16]);
    check_binary(13, &[3, 1, 5], &[4, 1], &[3, 4, 5]);
    check_binary(14, &[2, 1, 3, 1], &[1, 5, 1, 7], &[2, 5, 3, 7]);
    check_binary(15, &[20, 1, 300], &[20, 200, 1], &[20, 200, 300]);
}

#[test]
fn binary_random_broadcasts() {
    let mut r = rng(99);
    for case in 0..30 {
        let rank = r.random_range(0..=4usize);
        let out = shape(&mut r, rank, 6);
        let pick = |r: &mut rand::rngs::StdRng| -> Vec<usize> {
            let drop = r.random_range(0..=rank);
            out[drop..]
                .iter()
                .map(|&d| if r.random_bool(0.4) { 1 } else { d })
                .collect()
        };
        let (sa, sb) = (pick(&mut r), pick(&mut r));
        let full = eptc_ir::infer::broadcast_shapes(
            &eptc_ir::Shape::fixed(&sa),
            &eptc_ir::Shape::fixed(&sb),
        )
        .unwrap()
        .as_fixed()
        .unwrap();
        check_binary(100 + case, &sa, &sb, &full);
    }
}

fn erf_series(x: f64) -> f64 {
    // Maclaurin series; converges to f64 accuracy for |x| <= 3.
    let mut term = x;
    let mut sum = x;
    for n in 1..200 {
        term *= -x * x / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn reference_unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Gelu => 0.5 * x * (1.0 + erf_series(x / std::f64::consts::SQRT_2)),
        UnaryOp::Sign if x == 0.0 => 0.0,
        UnaryOp::Sign => x.signum(),
        UnaryOp::GeluDeriv => {
            let cdf = 0.5 * (1.0 + erf_series(x / std::f64::consts::SQRT_2));
            cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
        }
    }
}

#[test]
fn unary_ops_match_f64() {
    let mut r = rng(20);
    let sh = [5, 7, 300];
    let mut v = values(&mut r, sh.iter().product());
    v.extend([-4.0, -3.0, 0.0, 3.0, 4.0]);
    v.truncate(sh.iter().product());
    let x = Nd::from_f32(&sh, &v);
    let pos: Vec<f32> = v.iter().map(|x| x.abs() + 0.01).collect();
    let xp = Nd::from_f32(&sh, &pos);
    for op in UnaryOp::ALL {
        let positive = matches!(
            op,
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip
        );
        let (input, nd) = if positive { (&pos, &xp) } else { (&v, &x) };
        let got = run(&[(&sh, input)], |g, x| g.unary(op, x[0]).unwrap());
        let want = Nd::new(
            &sh,
            nd.data.iter().map(|&x| reference_unary(op, x)).collect(),
        );
        // Relative error of one f32 rounding (a few ulp for the libm functions).
        let tol = if op == UnaryOp::Gelu { 2e-7 } else { 1e-6 };
        for (i, (&g, &w)) in got.data().iter().zip(&want.data).enumerate() {
            // The GELU derivative crosses 0 near x = -0.75: absolute error there.
            let scale = if op == UnaryOp::GeluDeriv {
                1.0
            } else {
                w.abs()
            };
            let err = (f64::from(g) - w).abs() / scale.max(1e-30);
            assert!(
                err <= tol || (w.abs() < 1e-6 && (f64::from(g) - w).abs() < 1e-12),
                "{op:?} at {i}: x={} got {g} want {w}",
                nd.data[i]
            );
        }
    }
}

#[test]
fn gelu_tails_and_specials() {
    // x * Phi(x) with Phi of the normal CDF at -6 and -10 (tables), keeping relative
    // precision where `1 + erf` would cancel.
    let xs = [-10.0f32, -6.0, 0.0, 6.0, f32::NAN, f32::INFINITY];
    let got = run(&[(&[6], &xs)], |g, x| g.unary(UnaryOp::Gelu, x[0]).unwrap());
    let d = got.data();
    let rel = |g: f32, w: f64| ((f64::from(g) - w) / w).abs();
    assert!(
        rel(d[0], -10.0 * 7.619_853_024_160_527e-24) < 1e-6,
        "{}",
        d[0]
    );
    assert!(
        rel(d[1], -6.0 * 9.865_876_450_376_982e-10) < 1e-6,
        "{}",
        d[1]
    );
    assert_eq!(d[2], 0.0);
    assert!(rel(d[3], 6.0 * (1.0 - 9.865_876_450_376_982e-10)) < 1e-7);
    assert!(d[4].is_nan());
    assert_eq!(d[5], f32::INFINITY);
}

#[test]
fn relu_and_max_keep_nan_semantics() {
    let xs = [f32::NAN, -1.0, 2.0];
    let got = run(&[(&[3], &xs)], |g, x| g.unary(UnaryOp::Relu, x[0]).unwrap());
    assert!(got.data()[0].is_nan(), "NaN must not be hidden by relu");
    assert_eq!(&got.data()[1..], &[0.0, 2.0]);
    let sig = run(&[(&[3], &[-200.0f32, 0.0, 200.0])], |g, x| {
        g.unary(UnaryOp::Sigmoid, x[0]).unwrap()
    });
    assert_eq!(sig.data(), &[0.0, 0.5, 1.0]);
}

#[test]
fn in_place_chain_gives_same_values() {
    // A chain of ops whose intermediates are free to be overwritten in place.
    let mut r = rng(21);
    let sh = [33, 129];
    let (x, v) = Nd::random(&mut r, &sh);
    let (b, vb) = Nd::random(&mut r, &[129]);
    let got = run(&[(&sh, &v), (&[129], &vb)], |g, x| {
        let e = g.unary(UnaryOp::Exp, x[0]).unwrap();
        let s = g.binary(BinaryOp::Add, e, x[1]).unwrap();
        let t = g.unary(UnaryOp::Tanh, s).unwrap();
        let u = g.binary(BinaryOp::Mul, x[1], t).unwrap();
        // x0 is read again here: the in-place writes must not have touched it.
        g.binary(BinaryOp::Sub, u, x[0]).unwrap()
    });
    let want = Nd::build(&sh, |i| {
        let bv = b.at(&[i[1]]);
        bv * (x.at(i).exp() + bv).tanh() - x.at(i)
    });
    assert_close(&got, &want, 1e-5);
}
