//! Vectorisable transcendental functions for the hot element-wise loops (GELU, the
//! exponentials of softmax), and the runtime dispatch that compiles those loops for the
//! widest instruction set present.
//!
//! Everything here is straight-line arithmetic and selects (no calls, no branches), so
//! LLVM vectorises the loops that use it: `exp` by range reduction to `[-ln2/2, ln2/2]`
//! and a Taylor polynomial; the GELU in f64 from `erf` (a polynomial in `t^2`, `|t| < 2`)
//! and `erfc` (`exp(-t^2)/t` times a polynomial in `1/t^2`, `t >= 2`), fitted with
//! mpmath's `chebyfit` (max abs errors 2.5e-12 and 4.2e-10), so the f32 result is within
//! about one rounding of the exact value, also in the left tail.
//!
//! Compute bound (~40 f64 flops per GELU): the functions take `FMA` to use fused
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

/// `erf(t) / t` for `t^2 = s` in `[0, 4]`, highest degree first.
const ERF_SMALL: [f64; 13] = [
    1.586_720_104_084_632e-11,
    -5.924_570_969_775_962e-10,
    1.125_821_292_952_754_2e-8,
    -1.499_173_917_374_337_2e-7,
    1.608_893_824_670_095_6e-6,
    -1.485_452_712_622_196_6e-5,
    1.204_592_664_375_566_1e-4,
    -8.547_485_697_872_320_7e-4,
    5.223_929_003_443_631_6e-3,
    -2.686_615_383_757_036e-2,
    0.112_837_913_678_385_41,
    -0.376_126_388_816_274,
    1.128_379_167_092_963_8,
];

/// `erfc(t) * e^(t^2) * t * sqrt(pi)` for `v = 1/t^2` in `[1/676, 1/4]`.
const ERFC_LARGE: [f64; 11] = [
    639.217_417_872_517_7,
    -997.011_593_963_930_5,
    707.669_051_966_283_5,
    -309.269_918_094_401_36,
    97.106_140_872_214_21,
    -25.186_957_374_958_515,
    6.361_956_698_872_583,
    -1.869_161_140_031_090_5,
    0.749_906_012_965_594_6,
    -0.499_999_334_841_356_56,
    0.999_999_998_772_545_7,
];

#[inline(always)]
fn horner<const FMA: bool, const N: usize>(c: &[f64; N], x: f64) -> f64 {
    let mut p = 0.0;
    for &c in c {
        p = madd::<FMA>(p, x, c);
    }
    p
}

/// The exact GELU `x * Phi(x)`, `Phi(x) = (1 + erf(x/sqrt 2)) / 2`, computed in f64.
#[inline(always)]
pub fn gelu<const FMA: bool>(x: f32) -> f32 {
    // Below -20, Phi(x) < 3e-89: the product is -0 in f32 (and -inf gives -0, not NaN).
    let xd = if x < -20.0 { -20.0 } else { f64::from(x) };
    let z = xd * std::f64::consts::FRAC_1_SQRT_2;
    let t = z.abs();
    // Near zero: erf(t) = t * P(t^2).
    let ts = if t < 2.0 { t } else { 2.0 };
    let erf = ts * horner::<FMA, 13>(&ERF_SMALL, ts * ts);
    // Tail: erfc(t) = e^(-t^2) / (t sqrt(pi)) * Q(1/t^2), t clamped to [2, 26].
    let tl = t.clamp(2.0, 26.0);
    let inv_sqrt_pi = 0.564_189_583_547_756_3;
    let inv = 1.0 / tl;
    let q = horner::<FMA, 11>(&ERFC_LARGE, inv * inv);
    let erfc = exp_neg_f64::<FMA>(-tl * tl) * (inv_sqrt_pi * inv) * q;
    let phi = match (t < 2.0, z < 0.0) {
        (true, false) => 0.5 + 0.5 * erf,
        (true, true) => 0.5 - 0.5 * erf,
        (false, false) => 1.0 - 0.5 * erfc,
        (false, true) => 0.5 * erfc,
    };
    // NaN fails every comparison above but survives the product.
    (xd * phi) as f32
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
multiversion!(fn softmax_row(row: &mut [f32]) => softmax_row_generic);
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

/// Where `|x| < SMALL` the GELU needs only the `erf` polynomial (`|x / sqrt 2| < 2`).
const SMALL: f32 = 2.828;

/// [`gelu`] for `|x| < SMALL` only: `x * (1 + erf(z)) / 2`, `erf(z) = z * P(z^2)`.
#[inline(always)]
fn gelu_small<const FMA: bool>(x: f32) -> f32 {
    let xd = f64::from(x);
    let z = xd * std::f64::consts::FRAC_1_SQRT_2;
    let erf = z * horner::<FMA, 13>(&ERF_SMALL, z * z);
    (xd * madd::<FMA>(0.5, erf, 0.5)) as f32
}

/// GELU in place, 16 values at a time: blocks with no value in the tails (most of them
/// for activations of trained networks) skip the `erfc` branch.
#[inline(always)]
fn gelu_slice<const FMA: bool>(xs: &mut [f32]) {
    let mut blocks = xs.chunks_exact_mut(16);
    for b in &mut blocks {
        // NaN fails the comparison: its block takes the full path.
        if b.iter().fold(true, |ok, &x| ok & (x.abs() < SMALL)) {
            b.iter_mut().for_each(|x| *x = gelu_small::<FMA>(*x));
        } else {
            b.iter_mut().for_each(|x| *x = gelu::<FMA>(*x));
        }
    }
    for x in blocks.into_remainder() {
        *x = gelu::<FMA>(*x);
    }
}

/// Softmax of a contiguous row in place: max, `exp(x - max)`, sum in f64 lanes, scale.
/// Partial maxima and sums go over 16 fixed lanes so the loops vectorise and the result
/// does not depend on how rows are split among threads.
#[inline(always)]
fn softmax_row_generic<const FMA: bool>(row: &mut [f32]) {
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
    fn gelu_matches_libm_erfc() {
        for i in -200_000..200_000 {
            let x = i as f32 * 1e-4;
            let want = 0.5 * f64::from(x) * libm::erfc(-f64::from(x) / std::f64::consts::SQRT_2);
            let got = f64::from(gelu::<false>(x));
            let fused = f64::from(gelu::<true>(x));
            assert!(
                (fused - want).abs() <= 1.2e-7 * want.abs() + 1e-37,
                "{x}: {fused}"
            );
            assert!(
                (got - want).abs() <= 1.2e-7 * want.abs() + 1e-37,
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(gelu::<false>(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu::<false>(f32::NEG_INFINITY), 0.0);
        assert!(gelu::<false>(f32::NAN).is_nan());
    }
}
