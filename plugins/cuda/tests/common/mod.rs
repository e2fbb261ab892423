//! Shared by the CUDA crate's whole-model tests (`parity.rs`, `emulated.rs`).

/// `‖a − b‖ / ‖b‖` (`‖a − b‖` where `b` is zero); NaN or infinity anywhere gives
/// infinity, so NaN never passes.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// The CPU emulator's compiler, or `None` after saying why there is none (a failure where
/// `EPTC_REQUIRE_EMULATOR` is set, as CI does).
pub fn emulator() -> Option<String> {
    match eptc_cuda::emulate::available() {
        Ok(cxx) => Some(cxx),
        Err(e) => {
            assert!(
                std::env::var_os("EPTC_REQUIRE_EMULATOR").is_none(),
                "EPTC_REQUIRE_EMULATOR is set but the emulator is unavailable: {e}"
            );
            eprintln!("skipped: {e}");
            None
        }
    }
}
