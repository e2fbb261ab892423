//! Vectorisable transcendental functions for the hot element-wise loops (GELU, the
//! exponentials of softmax), and the runtime dispatch that compiles those loops for the
//! widest instruction set present.
//!
//! Everything here is straight-line arithmetic and selects (no calls, no branches), so
//! LLVM vectorises the loops that use it: `exp` by range reduction to `[-ln2/2, ln2/2]`
//! and a Taylor polynomial; the GELU in f64 from `erfc` by Numerical Recipes' `erfcc`
//! fit (fractional error below 1.2e-7 everywhere), so the f32 result is within about two
//! roundings of the exact value, also in the left tail.
//!
//! Compute bound (~30 f64 flops and one division per GELU): the functions take `FMA` to use fused
//! multiply-adds where the instruction set has them (the plain `mul_add` would be a slow
//! library call elsewhere).

// The fitted coefficients are printed by mpmath to more digits than an f64 holds.
#![allow(clippy::excessive_precision)]

/// `1.5 * 2^52`: adding it rounds an f64 to an integer kept in the low mantissa bits.
const ROUND_F64: f64 = 6_755_399_441_055_744.0;
/// `1.5 * 2^23`, the same for f32.
const ROUND_F32: f32 = 12_582_912.0;

/// `a * b + c`, fused when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn madd32<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^y` for `y` in `[-700, 0]` (callers clamp), about 1e-11 relative error.
#[inline(always)]
fn exp_neg_f64<const FMA: bool>(y: f64) -> f64 {
    const LN2_HI: f64 = 0.693_147_180_369_123_816_49;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let k = madd::<FMA>(y, std::f64::consts::LOG2_E, ROUND_F64);
    let n = k - ROUND_F64;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, y));
    // Taylor to degree 9 on |r| <= 0.347: truncation below 1e-11.
    let mut p = 1.0 / 362_880.0;
    for c in [
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = madd::<FMA>(p, r, c);
    }
    // 2^n from n's bits in k (n in [-1010, 0], a normal exponent).
    let scale = f64::from_bits(k.to_bits().wrapping_add(1023) << 52);
    p * scale
}

/// `e^x` in f32 for `x <= 0` (softmax after subtracting the max): within 2 ulp down to
/// the smallest normal; below it (`-inf` included) 0; NaN stays NaN.
#[inline(always)]
pub fn exp_nonpos_f32<const FMA: bool>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const LOWEST: f32 = -87.33; // ln of the smallest normal f32 is -87.3365
    let xc = if x < LOWEST { LOWEST } else { x };
    let k = madd32::<FMA>(xc, std::f32::consts::LOG2_E, ROUND_F32);
    let n = k - ROUND_F32;
    let r = madd32::<FMA>(-n, LN2_LO, madd32::<FMA>(-n, LN2_HI, xc));
    // Taylor to degree 7 on |r| <= 0.347: truncation below 6e-9.
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let scale = f32::from_bits(k.to_bits().wrapping_add(127) << 23);
    if x < LOWEST {
        0.0
    } else {
        p * scale
    }
}

/// `erfc(t) / 2` for `t >= 0` (`t <= 26`), branch-free: `erfc(t) = u e^(-t^2 + R(u))`,
/// `u = 1 / (1 + t/2)`, with the Chebyshev-fitted `R` of Numerical Recipes' `erfcc`
/// (fractional error below 1.2e-7).
#[inline(always)]
fn half_erfc_abs<const FMA: bool>(t: f64) -> f64 {
    const R: [f64; 10] = [
        0.170_872_77,
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_68,
        -1.265_512_23,
    ];
    let u = 1.0 / madd::<FMA>(0.5, t, 1.0);
    let mut r = R[0];
    for c in &R[1..] {
        r = madd::<FMA>(r, u, *c);
    }
    // The exponent is at most -1.27 and at least -(26^2) - 2: in exp_neg_f64's range.
    0.5 * u * exp_neg_f64::<FMA>(madd::<FMA>(-t, t, r).max(-700.0))
}

/// The exact GELU `x * Phi(x)`, `Phi(x) = erfc(-x / sqrt 2) / 2`, computed in f64 without
/// branches (so it vectorises): `erfc(t) = u e^(-t^2 + R(u))`, `u = 1 / (1 + t/2)`, with the
/// Chebyshev-fitted `R` of Numerical Recipes' `erfcc` (fractional error below 1.2e-7 for
/// every `t >= 0`), and `Phi(x) = 1 - erfc(t)/2` for `x >= 0`.
#[inline(always)]
pub fn gelu<const FMA: bool>(x: f32) -> f32 {
    // Below -20, Phi(x) < 3e-89: the product is -0 in f32 (and -inf gives -0, not NaN).
    let xd = if x < -20.0 { -20.0 } else { f64::from(x) };
    let half_erfc = half_erfc_abs::<FMA>(xd.abs() * std::f64::consts::FRAC_1_SQRT_2);
    let phi = if xd >= 0.0 {
        1.0 - half_erfc
    } else {
        half_erfc
    };
    // NaN fails the comparisons above but survives the product.
    (xd * phi) as f32
}

/// The derivative of the exact GELU, `Phi(x) + x phi(x)`, in f64 without branches (so
/// it vectorises): `Phi` from the same `erfc` fit as [`gelu`], `phi(x) = e^(-x^2/2) /
/// sqrt(2 pi)`. Compute bound, like [`gelu`] plus one exponential.
#[inline(always)]
pub fn gelu_deriv<const FMA: bool>(x: f32) -> f32 {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
    // Beyond +-20 the derivative is 0 or 1 to f32 precision; NaN passes the selects.
    let xd = f64::from(x).clamp(-20.0, 20.0);
    let half_erfc = half_erfc_abs::<FMA>(xd.abs() * std::f64::consts::FRAC_1_SQRT_2);
    let cdf = if xd >= 0.0 {
        1.0 - half_erfc
    } else {
        half_erfc
    };
    let pdf = exp_neg_f64::<FMA>(-0.5 * xd * xd) * INV_SQRT_2PI;
    madd::<FMA>(xd, pdf, cdf) as f32
}

/// `sum_j exp(row_j - m)` in f64 over 16 fixed lanes (the softmax's denominator) for
/// `m >= max(row)`, written to `out[0]`.
#[inline(always)]
fn sum_exp_shifted_generic<const FMA: bool>(row: &[f32], m: f32, out: &mut [f64]) {
    let mut lanes = [0.0f64; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f64::from(exp_nonpos_f32::<FMA>(v - m));
        }
    }
    for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += f64::from(exp_nonpos_f32::<FMA>(v - m));
    }
    out[0] = lanes.iter().sum();
}

#[inline(always)]
fn gelu_deriv_slice<const FMA: bool>(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = gelu_deriv::<FMA>(*x));
}

/// Define `pub fn $name(args)` calling `$imp::<FMA>(args)`, compiled once per x86
/// instruction set level, and pick the widest the CPU has at run time.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident: $ty:ty),*) => $imp:ident) => {
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) {
                    $imp::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) {
                    $imp::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the features were detected on this CPU.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $imp::<false>($($arg),*)
        }
    };
}

multiversion!(fn gelu_in_place(xs: &mut [f32]) => gelu_slice);
multiversion!(fn gelu_deriv_in_place(xs: &mut [f32]) => gelu_deriv_slice);
multiversion!(fn layernorm_grad_row(dy: &mut [f32], x: &[f32], gamma: &[f32], eps: f32) => layernorm_grad_row_generic);
multiversion!(fn sum_exp_shifted(row: &[f32], m: f32, out: &mut [f64]) => sum_exp_shifted_generic);
multiversion!(fn gelu_epilogue(row: &mut [f32], b: &[f32], r: &[f32]) => gelu_epilogue_generic);
multiversion!(fn softmax_row(row: &mut [f32]) => softmax_row_generic);
multiversion!(fn softmax_sink_row(row: &mut [f32], z: f32) => softmax_sink_row_generic);
multiversion!(fn layernorm_row(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) => layernorm_row_generic);

/// `sum f(x)` in f64 over 16 fixed lanes (vectorises; the order does not depend on
/// anything but the length).
#[inline(always)]
fn sum_lanes(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    const L: usize = 16;
    let mut acc = [0.0f64; L];
    let mut chunks = xs.chunks_exact(L);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(f64::from(v));
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
    acc.iter().sum::<f64>() + tail
}

/// LayerNorm of one row in place: mean and biased variance in f64 over two passes, the
/// row centred in f64 (a mean rounded to f32 would shift rows far from zero).
#[inline(always)]
fn layernorm_row_generic<const FMA: bool>(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = row.len() as f64;
    let mean = sum_lanes(row, |v| v) / d;
    let var = sum_lanes(row, |v| (v - mean) * (v - mean)) / d;
    let rstd = 1.0 / (var + f64::from(eps)).sqrt();
    for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
        let n = ((f64::from(*v) - mean) * rstd) as f32;
        *v = madd32::<FMA>(n, g, b);
    }
}

/// LayerNorm's input gradient of one row, in place of `dy`: with `g = dy * gamma`,
/// `xhat = (x - mean) * rstd`: `rstd * (g - mean(g) - xhat * mean(g * xhat))`, the
/// statistics and both means in f64 over 16 fixed lanes (independent of threading).
#[inline(always)]
fn layernorm_grad_row_generic<const FMA: bool>(dy: &mut [f32], x: &[f32], gamma: &[f32], eps: f32) {
    const L: usize = 16;
    let d = x.len() as f64;
    let mean = sum_lanes(x, |v| v) / d;
    let var = sum_lanes(x, |v| (v - mean) * (v - mean)) / d;
    let rstd = 1.0 / (var + f64::from(eps)).sqrt();
    let (mut a1, mut a2) = ([0.0f64; L], [0.0f64; L]);
    let term = |o: f32, xv: f32, gm: f32| {
        let g = f64::from(o) * f64::from(gm);
        (g, g * (f64::from(xv) - mean) * rstd)
    };
    let mut tail = (0.0, 0.0);
    let n = x.len() / L * L;
    for ((oc, xc), gc) in dy[..n]
        .chunks_exact(L)
        .zip(x[..n].chunks_exact(L))
        .zip(gamma[..n].chunks_exact(L))
    {
        for l in 0..L {
            let (g, gx) = term(oc[l], xc[l], gc[l]);
            a1[l] += g;
            a2[l] += gx;
        }
    }
    for j in n..x.len() {
        let (g, gx) = term(dy[j], x[j], gamma[j]);
        tail.0 += g;
        tail.1 += gx;
    }
    let m1 = (a1.iter().sum::<f64>() + tail.0) / d;
    let m2 = (a2.iter().sum::<f64>() + tail.1) / d;
    for ((o, &xv), &gm) in dy.iter_mut().zip(x).zip(gamma) {
        let g = f64::from(*o) * f64::from(gm);
        let xh = (f64::from(xv) - mean) * rstd;
        *o = (rstd * (g - m1 - xh * m2)) as f32;
    }
}

/// GELU in place.
#[inline(always)]
fn gelu_slice<const FMA: bool>(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = gelu::<FMA>(*x));
}

/// A linear layer's epilogue in one pass, in place: `gelu(x + b) + r`, each of `b` (one
/// value per element of `row`) and `r` skipped when empty. Rounds like the unfused ops:
/// the sum `x + b` in f32, then the GELU, then the residual add.
#[inline(always)]
fn gelu_epilogue_generic<const FMA: bool>(row: &mut [f32], b: &[f32], r: &[f32]) {
    match (b.is_empty(), r.is_empty()) {
        (true, true) => row.iter_mut().for_each(|x| *x = gelu::<FMA>(*x)),
        (false, true) => row
            .iter_mut()
            .zip(b)
            .for_each(|(x, &b)| *x = gelu::<FMA>(*x + b)),
        (true, false) => row
            .iter_mut()
            .zip(r)
            .for_each(|(x, &r)| *x = gelu::<FMA>(*x) + r),
        (false, false) => row
            .iter_mut()
            .zip(b)
            .zip(r)
            .for_each(|((x, &b), &r)| *x = gelu::<FMA>(*x + b) + r),
    }
}

/// Softmax of a contiguous row in place: max, `exp(x - max)`, sum in f64 lanes, scale.
/// Partial maxima and sums go over 16 fixed lanes so the loops vectorise and the result
/// does not depend on how rows are split among threads.
#[inline(always)]
fn softmax_row_generic<const FMA: bool>(row: &mut [f32]) {
    let m = max_lanes(row);
    // A NaN or +inf anywhere makes the sum, hence every output, NaN (as the exact
    // formula does); -inf entries (masks) give 0.
    for v in row.iter_mut() {
        *v = exp_nonpos_f32::<FMA>(*v - m);
    }
    let r = (1.0 / sum_lanes(row, |v| v)) as f32;
    for v in row.iter_mut() {
        *v *= r;
    }
}

/// Softmax of a row with one extra logit `z` that is normalised with the row but not
/// written: `exp(x_j - m) / (sum_j' exp(x_j' - m) + exp(z - m))`, `m = max(max x, z)`.
/// The same arithmetic as [`softmax_row_generic`] on the row `[z, x...]`.
#[inline(always)]
fn softmax_sink_row_generic<const FMA: bool>(row: &mut [f32], z: f32) {
    let m = max_lanes(row);
    let m = if z > m { z } else { m };
    for v in row.iter_mut() {
        *v = exp_nonpos_f32::<FMA>(*v - m);
    }
    let ez = f64::from(exp_nonpos_f32::<FMA>(z - m));
    let r = (1.0 / (sum_lanes(row, |v| v) + ez)) as f32;
    for v in row.iter_mut() {
        *v *= r;
    }
}

/// The maximum of a row over 16 fixed lanes (NaN ignored; -inf for an empty row).
#[inline(always)]
fn max_lanes(row: &[f32]) -> f32 {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for &l in &lanes {
        m = if l > m { l } else { m };
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        for i in 0..20000 {
            let x = -(i as f32) * 0.005;
            let (a, b) = (exp_nonpos_f32::<false>(x), x.exp());
            if x >= -87.33 {
                assert!((a - b).abs() <= 2.5e-7 * b, "{x}: {a} vs {b}");
            } else {
                assert!(a <= f32::MIN_POSITIVE, "{x}: {a}");
            }
            let y = f64::from(x) * 7.0;
            let (a, b) = (exp_neg_f64::<false>(y), y.exp());
            assert!((a - b).abs() <= 1e-11 * b, "{y}: {a} vs {b}");
        }
        assert_eq!(exp_nonpos_f32::<false>(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpos_f32::<false>(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_matches_erfc_f64() {
        for i in -200_000..200_000 {
            let x = i as f32 * 1e-4;
            let want = 0.5 * f64::from(x) * libm::erfc(-f64::from(x) / std::f64::consts::SQRT_2);
            let got = f64::from(gelu::<false>(x));
            let fused = f64::from(gelu::<true>(x));
            // About 2 ulp of f32 (the f64 approximation is within 1.2e-7, then rounded);
            // results far below f32's normal range only need to be that small.
            let tol = 2e-7 * want.abs() + 1e-30;
            assert!((fused - want).abs() <= tol, "{x}: {fused} vs {want}");
            assert!((got - want).abs() <= tol, "{x}: {got} vs {want}");
        }
        assert_eq!(gelu::<false>(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu::<false>(f32::NEG_INFINITY), 0.0);
        assert!(gelu::<false>(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_deriv_matches_erfc_f64() {
        for i in -250_000..250_000 {
            let x = i as f32 * 1e-4;
            let xd = f64::from(x);
            let want = 0.5 * libm::erfc(-xd / std::f64::consts::SQRT_2)
                + xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            for got in [gelu_deriv::<false>(x), gelu_deriv::<true>(x)] {
                // Absolute: the derivative crosses 0 near -0.75.
                let err = (f64::from(got) - want).abs();
                assert!(err <= 3e-7, "{x}: {got} vs {want}");
            }
        }
        assert_eq!(gelu_deriv::<false>(f32::INFINITY), 1.0);
        assert_eq!(gelu_deriv::<false>(f32::NEG_INFINITY), 0.0);
        assert!(gelu_deriv::<false>(f32::NAN).is_nan());
    }

    #[test]
    fn sum_exp_shifted_matches_std() {
        let row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut got = [0.0];
        sum_exp_shifted(&row, m, &mut got);
        let want: f64 = row
            .iter()
            .map(|&v| (f64::from(v) - f64::from(m)).exp())
            .sum();
        assert!((got[0] - want).abs() <= 1e-6 * want, "{} vs {want}", got[0]);
    }
}
