//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod suites;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use eptc_frontend::TensorFile;

/// The committed fixtures (made by `scripts/make_fixtures.py`); `EPTC_FIXTURES` points
/// elsewhere (a test binary carried to another machine, as `scripts/gpu-check.sh` does).
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("EPTC_FIXTURES") {
        Some(d) => PathBuf::from(d).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    }
}

/// Extra `eptc compile` flags selecting the backend under test: `EPTC_TEST_TARGET`
/// (default: the CPU backend) and `EPTC_TEST_DTYPE`. The parity and gradient suites run
/// unchanged on any backend this way (`scripts/gpu-check.sh` runs them on CUDA).
pub fn target_flags() -> Vec<String> {
    let mut f = Vec::new();
    if let Ok(t) = std::env::var("EPTC_TEST_TARGET") {
        f.extend(["--target".to_string(), t]);
    }
    if let Ok(d) = std::env::var("EPTC_TEST_DTYPE") {
        f.extend(["--dtype".to_string(), d]);
    }
    f
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
    // `EPTC_BIN`: a binary elsewhere (see `fixture`).
    let bin = std::env::var_os("EPTC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_eptc")));
    Command::new(bin)
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

/// Whether `EPTC_TEST_DTYPE` selects a 16-bit storage type (looser tolerances).
pub fn half_storage() -> bool {
    std::env::var("EPTC_TEST_DTYPE").is_ok_and(|d| d != "f32")
}

/// ViT-B/16 at 224 px with zero weights (shapes only; calloc'd, so cheap).
pub fn vit_b16() -> TensorFile {
    let mut t = std::collections::BTreeMap::new();
    let mut z = |k: String, s: &[usize]| {
        t.insert(k, eptc_ir::HostTensor::zeros(s.to_vec()));
    };
    let d = 768;
    z("cls_token".into(), &[1, 1, d]);
    z("pos_embed".into(), &[1, 197, d]);
    z("patch_embed.proj.weight".into(), &[d, 3, 16, 16]);
    z("patch_embed.proj.bias".into(), &[d]);
    for i in 0..12 {
        for (n, o, k) in [
            ("attn.qkv", 3 * d, d),
            ("attn.proj", d, d),
            ("mlp.fc1", 4 * d, d),
            ("mlp.fc2", d, 4 * d),
        ] {
            z(format!("blocks.{i}.{n}.weight"), &[o, k]);
            z(format!("blocks.{i}.{n}.bias"), &[o]);
        }
        for n in ["norm1", "norm2"] {
            z(format!("blocks.{i}.{n}.weight"), &[d]);
            z(format!("blocks.{i}.{n}.bias"), &[d]);
        }
    }
    z("norm.weight".into(), &[d]);
    z("norm.bias".into(), &[d]);
    z("head.weight".into(), &[1000, d]);
    z("head.bias".into(), &[1000]);
    TensorFile {
        path: PathBuf::from("vit_b16"),
        tensors: t,
        metadata: Default::default(),
    }
}

/// A generated data set (`eptc gen-data`, 32 px images, 3 classes) in `dir/data`:
/// `shots` training and `val` validation images per class (`val` 0: gen-data's default).
pub fn gen_data(dir: &Path, shots: usize, val: usize) -> PathBuf {
    let data = dir.join("data");
    let (shots, val) = (shots.to_string(), val.to_string());
    let mut a = vec!["gen-data", "-o", s(&data), "--image-size", "32"];
    a.extend(["--shots", &shots]);
    if val != "0" {
        a.extend(["--val-per-class", &val]);
    }
    eptc_ok(&a);
    data
}
