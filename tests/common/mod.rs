//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use eptc_frontend::TensorFile;

/// The committed fixtures (made by `scripts/make_fixtures.py`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `‖a − b‖ / ‖b‖` in f64; NaN anywhere gives infinity, so NaN never passes.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The values of `key` in a tensor file, and its shape.
pub fn tensor(path: &Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    let f = TensorFile::read(path).unwrap_or_else(|e| panic!("{e}"));
    let t = f
        .tensors
        .get(key)
        .unwrap_or_else(|| panic!("{}: no {key}", path.display()));
    (t.shape.clone(), t.data().to_vec())
}

/// Run the `eptc` binary.
pub fn eptc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eptc"))
        .args(args)
        .output()
        .expect("the eptc binary runs")
}

/// Run `eptc` and require success; returns stdout.
pub fn eptc_ok(args: &[&str]) -> String {
    let o = eptc(args);
    assert!(
        o.status.success(),
        "eptc {args:?} failed with {:?}:\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run `eptc`, require exit code 2 and a one-line error without a panic; returns it.
pub fn eptc_err(args: &[&str]) -> String {
    let o = eptc(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(2),
        "eptc {args:?}: expected exit 2, stderr: {err}"
    );
    assert!(!err.contains("panicked"), "eptc {args:?} panicked: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "eptc {args:?}: expected one error line, got: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
