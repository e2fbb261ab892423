//! The wgpu backend through the command line, against the CPU backend: compile (kernels
//! validated with naga, written with `--emit kernels`), run, grad and train; and f16
//! storage (`--dtype f16`) against the f32 artifact. Runs on any
//! Vulkan adapter (CI installs Mesa's lavapipe); skipped with a printed reason where none
//! exists, unless `EPTC_REQUIRE_WGPU` is set (CI sets it), which turns the skip into a
//! failure.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Whether the wgpu backend can run here; prints why not.
fn wgpu_here() -> bool {
    let out = eptc_ok(&["plugins", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let b = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "wgpu")
        .expect("wgpu is listed")
        .clone();
    if b["available"] == true {
        return true;
    }
    assert!(
        std::env::var_os("EPTC_REQUIRE_WGPU").is_none(),
        "EPTC_REQUIRE_WGPU is set but wgpu is unavailable: {}",
        b["detail"]
    );
    eprintln!("skipped: no wgpu adapter here: {}", b["detail"]);
    false
}

fn compile(dir: &Path, name: &str, target: &str, extra: &[&str]) -> PathBuf {
    let art = dir.join(name);
    let m = fixture("tiny_timm.safetensors");
    let mut a = vec![
        "compile",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "6",
        "--num-classes",
        "5",
        "--target",
        target,
        "-o",
        s(&art),
    ];
    a.extend(extra);
    eptc_ok(&a);
    art
}

#[test]
fn compile_validates_every_kernel_without_running() {
    // Works whether or not an adapter exists: naga validates the generated WGSL.
    let d = tempfile::tempdir().unwrap();
    let art = compile(
        d.path(),
        "w",
        "wgpu",
        &["--ept-mode", "multi-cat", "--emit", "ir,kernels"],
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    let files: Vec<&str> = m["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(files.len() > 50, "{files:?}");
    assert!(files.iter().any(|f| f.starts_with("kernels/train/")));
    for f in &files {
        let src = std::fs::read_to_string(art.join(f)).unwrap();
        assert!(src.contains("@compute"), "{f}");
    }
}

#[test]
fn run_grad_and_train_match_the_cpu_backend() {
    if !wgpu_here() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for mode in ["cat", "multi-cat"] {
        let extra = ["--ept-mode", mode, "--task", "multilabel"];
        let cpu = compile(d.path(), &format!("cpu-{mode}"), "cpu", &extra);
        let gpu = compile(d.path(), &format!("wgpu-{mode}"), "wgpu", &extra);
        let adapter = fixture(&format!("adapter_{mode}_deep.safetensors"));
        // Forward.
        let input = fixture("input_b3.safetensors");
        let mut outs = vec![];
        for (name, art) in [("cpu", &cpu), ("wgpu", &gpu)] {
            let o = d.path().join(format!("{mode}-{name}-run.safetensors"));
            eptc_ok(&[
                "run",
                s(art),
                "--input",
                s(&input),
                "--output",
                s(&o),
                "--adapter",
                s(&adapter),
            ]);
            outs.push(o);
        }
        for key in ["logits", "features"] {
            let (_, a) = tensor(&outs[1], key);
            let (_, b) = tensor(&outs[0], key);
            let e = rel_err(&a, &b);
            assert!(e <= 1e-5, "{mode} {key}: wgpu vs cpu {e:e}");
        }
        // Gradients.
        let batch = fixture("batch_multilabel.safetensors");
        let mut grads = vec![];
        for (name, art) in [("cpu", &cpu), ("wgpu", &gpu)] {
            let o = d.path().join(format!("{mode}-{name}-grad.safetensors"));
            eptc_ok(&[
                "grad",
                s(art),
                "--input",
                s(&batch),
                "--output",
                s(&o),
                "--adapter",
                s(&adapter),
            ]);
            grads.push(o);
        }
        for key in [
            "loss",
            "grad.ept.prompts",
            "grad.head.weight",
            "grad.head.bias",
        ] {
            let (_, a) = tensor(&grads[1], key);
            let (_, b) = tensor(&grads[0], key);
            let e = rel_err(&a, &b);
            assert!(e <= 1e-4, "{mode} {key}: wgpu vs cpu {e:e}");
        }
    }
    // A few training steps give (nearly) the same adapter.
    let data = d.path().join("data");
    eptc_ok(&[
        "gen-data",
        "-o",
        s(&data),
        "--image-size",
        "32",
        "--shots",
        "2",
        "--val-per-class",
        "1",
        "--classes",
        "3",
    ]);
    let extra = ["--num-classes", "3"];
    let m = fixture("tiny_timm.safetensors");
    let mut lasts = vec![];
    for target in ["cpu", "wgpu"] {
        let art = d.path().join(format!("t-{target}"));
        let mut a = vec![
            "compile",
            s(&m),
            "--heads",
            "3",
            "--prompt-len",
            "6",
            "--target",
            target,
            "-o",
            s(&art),
        ];
        a.extend(extra);
        eptc_ok(&a);
        let run = d.path().join(format!("run-{target}"));
        eptc_ok(&[
            "train",
            s(&art),
            "--data",
            s(&data),
            "--train",
            s(&data.join("train.txt")),
            "--val",
            s(&data.join("val.txt")),
            "-o",
            s(&run),
            "--epochs",
            "2",
            "--lr",
            "0.01",
        ]);
        lasts.push(run.join("last.safetensors"));
    }
    for key in ["ept.prompts", "head.weight", "head.bias"] {
        let (_, a) = tensor(&lasts[1], key);
        let (_, b) = tensor(&lasts[0], key);
        let e = rel_err(&a, &b);
        assert!(e <= 1e-4, "trained {key}: wgpu vs cpu {e:e}");
    }
}

/// `max |a − b| / max |b|`; infinite where either side has a NaN or an infinity, so those
/// never pass.
fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| f64::from(*y).abs()).fold(0.0, f64::max);
    if num == 0.0 {
        0.0
    } else {
        num / den
    }
}

#[test]
fn f16_kernels_validate_without_running_and_bf16_is_refused() {
    // Works whether or not an adapter (or its shader-f16) exists: naga validates.
    let d = tempfile::tempdir().unwrap();
    let art = compile(
        d.path(),
        "h",
        "wgpu",
        &["--dtype", "f16", "--emit", "kernels"],
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["dtype"], "f16");
    let files = m["kernels"].as_array().unwrap();
    assert!(files.len() > 50, "{files:?}");
    for f in files {
        let src = std::fs::read_to_string(art.join(f.as_str().unwrap())).unwrap();
        assert!(src.starts_with("enable f16;"), "{f}");
        assert!(!src.contains("array<f32>"), "{f}");
    }
    let m = fixture("tiny_timm.safetensors");
    let o = d.path().join("b");
    let err = eptc_err(&[
        "compile",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "6",
        "--num-classes",
        "5",
        "--target",
        "wgpu",
        "--dtype",
        "bf16",
        "-o",
        s(&o),
    ]);
    assert!(err.contains("bf16") && err.contains("f32, f16"), "{err}");
}

#[test]
fn f16_storage_matches_the_f32_artifact() {
    if !wgpu_here() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let extra = ["--ept-mode", "cat", "--task", "multilabel"];
    let f32_art = compile(d.path(), "f32", "wgpu", &extra);
    let f16_art = compile(
        d.path(),
        "f16",
        "wgpu",
        &[&extra[..], &["--dtype", "f16"]].concat(),
    );
    let adapter = fixture("adapter_cat_deep.safetensors");
    let input = fixture("input_b3.safetensors");
    let batch = fixture("batch_multilabel.safetensors");
    let mut runs = vec![];
    let mut grads = vec![];
    for (name, art) in [("f32", &f32_art), ("f16", &f16_art)] {
        let o = d.path().join(format!("{name}-run.safetensors"));
        eptc_ok(&[
            "run",
            s(art),
            "--input",
            s(&input),
            "--output",
            s(&o),
            "--adapter",
            s(&adapter),
        ]);
        runs.push(o);
        let o = d.path().join(format!("{name}-grad.safetensors"));
        eptc_ok(&[
            "grad",
            s(art),
            "--input",
            s(&batch),
            "--output",
            s(&o),
            "--adapter",
            s(&adapter),
        ]);
        grads.push(o);
    }
    for (files, keys) in [
        (&runs, &["logits", "features"][..]),
        (
            &grads,
            &[
                "loss",
                "grad.ept.prompts",
                "grad.head.weight",
                "grad.head.bias",
            ][..],
        ),
    ] {
        for key in keys {
            let (sa, a) = tensor(&files[1], key);
            let (sb, b) = tensor(&files[0], key);
            assert_eq!(sa, sb, "{key}");
            let e = max_rel_err(&a, &b);
            eprintln!("{key}: f16 vs f32 storage, max error {e:.2e} of max |f32|");
            assert!(e <= 1e-2, "{key}: f16 vs f32 storage {e:e}");
            // f16 storage really is f16.
            assert!(rel_err(&a, &b) > 1e-7, "{key}: f16 identical to f32");
        }
    }
}

/// Out of device memory (issue #9): a batch whose tensors exceed the adapter's limits is
/// refused with the node and both sizes, exit code 2, no panic.
#[test]
fn a_batch_too_large_for_the_adapter_is_refused_clearly() {
    if !wgpu_here() {
        return;
    }
    let plugins = eptc_ok(&["plugins"]);
    if !plugins.contains("llvmpipe") {
        eprintln!("skipped: the sizes below are lavapipe's limits");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let art = compile(d.path(), "art", "wgpu", &[]);
    // 20,000 images of 3 x 32 x 32 f32: 246 MB of input, above lavapipe's 128 MiB
    // storage-binding limit (and a typical discrete GPU's 2 GiB buffers are not at risk).
    let o = eptc(&["bench", s(&art), "--batch", "20000", "--iters", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("245760000 bytes exceed the adapter's"),
        "expected a size error: {err}"
    );
}
