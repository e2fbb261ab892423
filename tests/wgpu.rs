//! The wgpu backend through the command line, against the CPU backend: compile (kernels
//! validated with naga, written with `--emit kernels`), run, grad and train. Runs on any
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
