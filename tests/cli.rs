//! The command line: bad input gets exit code 2 and one line naming the culprit, never a
//! panic; the commands that work print what they did.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use eptc_frontend::{write_tensors, TensorFile};
use eptc_ir::HostTensor;

/// A copy of the tiny timm model with `edit` applied to its tensors.
fn edited_model(dir: &Path, edit: impl FnOnce(&mut HashMap<String, HostTensor>)) -> PathBuf {
    let f = TensorFile::read(&fixture("tiny_timm.safetensors")).unwrap();
    let mut t: HashMap<String, HostTensor> = f.tensors.into_iter().collect();
    edit(&mut t);
    let p = dir.join("edited.safetensors");
    let refs: Vec<(&str, &HostTensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_tensors(&p, &refs, None).unwrap();
    p
}

fn compile_tiny(dir: &Path, extra: &[&str]) -> PathBuf {
    let art = dir.join("art");
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
        "-o",
        s(&art),
    ];
    a.extend(extra);
    eptc_ok(&a);
    art
}

#[test]
fn missing_model_file() {
    let e = eptc_err(&["inspect", "/nonexistent/vit.safetensors"]);
    assert!(e.contains("/nonexistent/vit.safetensors"), "{e}");
}

#[test]
fn not_a_safetensors_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("junk.safetensors");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap();
    let e = eptc_err(&["inspect", s(&p)]);
    assert!(
        e.contains("junk.safetensors") && e.contains("not a valid safetensors file"),
        "{e}"
    );
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
    let e = eptc_err(&["inspect", s(&p)]);
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn not_a_vit() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("resnet.safetensors");
    let t = HostTensor::zeros(vec![2, 2]);
    write_tensors(&p, &[("conv1.weight", &t)], None).unwrap();
    let e = eptc_err(&["inspect", s(&p)]);
    assert!(
        e.contains("resnet.safetensors") && e.contains("not a ViT checkpoint"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_model(d.path(), |t| {
        t.remove("blocks.1.mlp.fc2.bias");
    });
    let e = eptc_err(&[
        "compile",
        s(&p),
        "--heads",
        "3",
        "--num-classes",
        "2",
        "-o",
        s(&d.path().join("a")),
    ]);
    assert!(
        e.contains("edited.safetensors")
            && e.contains("\"blocks.1.mlp.fc2.bias\"")
            && e.contains("[48]"),
        "{e}"
    );
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let d = tempfile::tempdir().unwrap();
    let p = edited_model(d.path(), |t| {
        t.insert(
            "blocks.0.attn.proj.weight".into(),
            HostTensor::zeros(vec![48, 47]),
        );
    });
    let e = eptc_err(&[
        "compile",
        s(&p),
        "--heads",
        "3",
        "--num-classes",
        "2",
        "-o",
        s(&d.path().join("a")),
    ]);
    assert!(
        e.contains("\"blocks.0.attn.proj.weight\"")
            && e.contains("[48, 47]")
            && e.contains("[48, 48]"),
        "{e}"
    );
}

#[test]
fn bad_options_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("tiny_timm.safetensors");
    let o = d.path().join("a");
    let base = [
        "compile",
        s(&m),
        "--heads",
        "3",
        "--num-classes",
        "2",
        "-o",
        s(&o),
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend(extra);
        eptc_err(&a)
    };
    assert!(with(&["--image-size", "30"]).contains("multiple of the patch size 8"));
    assert!(with(&["--prompt-len", "0"]).contains("--prompt-len"));
    assert!(with(&["--layers", "0..5"]).contains("layer 2 out of range"));
    assert!(with(&["--layers", "1,1"]).contains("listed twice"));
    assert!(with(&["--layers", "x"]).contains("not a layer index"));
    assert!(with(&["--ept-mode", "concat"]).contains("unknown EPT mode"));
    assert!(with(&["--prompt-init", "token"]).contains("--init-input"));
    assert!(with(&["--target", "tpu"]).contains("eptc plugins"));
    assert!(with(&["--dtype", "bf16"]).contains("f32 only"));
    assert!(with(&["--target", "wgpu", "--dtype", "bf16"]).contains("f16"));
    let e = eptc_err(&[
        "compile",
        s(&m),
        "--heads",
        "5",
        "--num-classes",
        "2",
        "-o",
        s(&o),
    ]);
    assert!(e.contains("do not divide"), "{e}");
    assert!(with(&["--peft", "no-such-method"]).contains("--peft"));
    let hf = fixture("tiny_hf.safetensors");
    let e = eptc_err(&["compile", s(&hf), "--heads", "3", "-o", s(&o)]);
    assert!(
        e.contains("no classification head") && e.contains("--num-classes"),
        "{e}"
    );
    let e = eptc_err(&["inspect", s(&hf)]);
    assert!(e.contains("--heads"), "{e}");
}

#[test]
fn run_checks_its_inputs() {
    let d = tempfile::tempdir().unwrap();
    let art = compile_tiny(d.path(), &[]);
    let out = d.path().join("out.safetensors");
    // Wrong image size.
    let inp48 = fixture("input48_b3.safetensors");
    let e = eptc_err(&["run", s(&art), "--input", s(&inp48), "--output", s(&out)]);
    assert!(
        e.contains("input48_b3.safetensors") && e.contains("[B, 3, 32, 32]"),
        "{e}"
    );
    // No pixel_values.
    let adapter = fixture("adapter_cat_deep.safetensors");
    let e = eptc_err(&["run", s(&art), "--input", s(&adapter), "--output", s(&out)]);
    assert!(e.contains("\"pixel_values\""), "{e}");
    // An adapter made for another configuration.
    let inp = fixture("input_b3.safetensors");
    let shallow = fixture("adapter_cat_shallow.safetensors");
    let e = eptc_err(&[
        "run",
        s(&art),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--adapter",
        s(&shallow),
    ]);
    assert!(
        e.contains("adapter_cat_shallow.safetensors") && e.contains("layers [0]"),
        "{e}"
    );
    // Not an artifact.
    let e = eptc_err(&["run", s(d.path()), "--input", s(&inp), "--output", s(&out)]);
    assert!(e.contains("not an eptc artifact"), "{e}");
    assert!(!out.exists(), "no output is written on error");
}

#[test]
fn adapter_without_metadata_is_checked_by_shape() {
    let d = tempfile::tempdir().unwrap();
    let art = compile_tiny(d.path(), &[]);
    let bad = d.path().join("bad.safetensors");
    let p = HostTensor::zeros(vec![2, 17, 7]);
    let w = HostTensor::zeros(vec![5, 48]);
    let b = HostTensor::zeros(vec![5]);
    write_tensors(
        &bad,
        &[("ept.prompts", &p), ("head.weight", &w), ("head.bias", &b)],
        None,
    )
    .unwrap();
    let inp = fixture("input_b3.safetensors");
    let out = d.path().join("out.safetensors");
    let e = eptc_err(&[
        "run",
        s(&art),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--adapter",
        s(&bad),
    ]);
    assert!(
        e.contains("bad.safetensors") && e.contains("[2, 17, 7]") && e.contains("[2, 17, 6]"),
        "{e}"
    );
}

#[test]
fn compile_writes_a_complete_artifact() {
    let d = tempfile::tempdir().unwrap();
    let art = compile_tiny(d.path(), &["--json"]);
    for f in [
        "manifest.json",
        "imported.eptc",
        "peft.eptc",
        "plan.json",
        "adapter-init.safetensors",
    ] {
        assert!(art.join(f).exists(), "missing {f}");
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["trainable_params"], 2 * 17 * 6 + 5 * 48 + 5);
    assert_eq!(m["architecture"]["layout"], "timm");
    assert_eq!(m["architecture"]["layernorm_eps"], 1e-6);
    assert_eq!(m["peft"]["layers"], serde_json::json!([0, 1]));
    assert_eq!(m["source"]["sha256"].as_str().unwrap().len(), 64);
    // The adapter-init file has the documented layout and the config as metadata.
    let a = TensorFile::read(&art.join("adapter-init.safetensors")).unwrap();
    assert_eq!(a.tensors["ept.prompts"].shape, vec![2, 17, 6]);
    assert_eq!(a.tensors["head.weight"].shape, vec![5, 48]);
    let cfg: serde_json::Value = serde_json::from_str(&a.metadata["peft"]).unwrap();
    assert_eq!(cfg["mode"], "cat");
    // Normal(0.02) prompts, zero bias.
    let p = a.tensors["ept.prompts"].data();
    let std = (p.iter().map(|v| v * v).sum::<f32>() / p.len() as f32).sqrt();
    assert!((0.012..0.03).contains(&std), "prompt std {std}");
    assert!(a.tensors["head.bias"].data().iter().all(|&v| v == 0.0));
    // The same seed gives the same adapter; another seed another one.
    let art2 = d.path().join("art2");
    let m = fixture("tiny_timm.safetensors");
    eptc_ok(&[
        "compile",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "6",
        "--num-classes",
        "5",
        "-o",
        s(&art2),
        "--seed",
        "1",
    ]);
    let b = TensorFile::read(&art2.join("adapter-init.safetensors")).unwrap();
    assert_ne!(b.tensors["ept.prompts"].data(), p);
    let art3 = d.path().join("art3");
    eptc_ok(&[
        "compile",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "6",
        "--num-classes",
        "5",
        "-o",
        s(&art3),
    ]);
    let c = TensorFile::read(&art3.join("adapter-init.safetensors")).unwrap();
    assert_eq!(c.tensors["ept.prompts"].data(), p);
}

#[test]
fn hf_config_json_gives_the_heads() {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny_hf.safetensors"),
        d.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        d.path().join("config.json"),
        r#"{"num_attention_heads": 3, "layer_norm_eps": 1e-12}"#,
    )
    .unwrap();
    let out = eptc_ok(&["inspect", s(&d.path().join("model.safetensors")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"]["heads"], 3);
    assert_eq!(v["architecture"]["layout"], "hf");
}

/// `--prompt-init token`: every prompt row is the mean token embedding of the batch,
/// channel `k mod dim`; checked against the embeddings computed here from the weights.
#[test]
fn token_init_uses_the_mean_token_embedding() {
    let d = tempfile::tempdir().unwrap();
    let inp = fixture("input_b3.safetensors");
    let art = compile_tiny(
        d.path(),
        &["--prompt-init", "token", "--init-input", s(&inp)],
    );
    let a = TensorFile::read(&art.join("adapter-init.safetensors")).unwrap();
    let p = &a.tensors["ept.prompts"];
    assert_eq!(p.shape, vec![2, 17, 6]);

    // Independent mean token: (1/(B*N)) sum_b [cls + pos_0 + sum_p (W patch_bp + bias + pos_p)].
    let m = TensorFile::read(&fixture("tiny_timm.safetensors")).unwrap();
    let (_, x) = tensor(&inp, "pixel_values");
    let w = m.tensors["patch_embed.proj.weight"].data();
    let bias = m.tensors["patch_embed.proj.bias"].data();
    let cls = m.tensors["cls_token"].data();
    let pos = m.tensors["pos_embed"].data();
    let (dim, pch, img, n, batch) = (48, 8, 32, 17, 3);
    let mut mean = vec![0.0f64; dim];
    for b in 0..batch {
        for c in 0..dim {
            mean[c] += (cls[c] + pos[c]) as f64;
        }
        for py in 0..4 {
            for px in 0..4 {
                let tok = 1 + py * 4 + px;
                for o in 0..dim {
                    let mut acc = bias[o] as f64 + pos[tok * dim + o] as f64;
                    for ch in 0..3 {
                        for ky in 0..pch {
                            for kx in 0..pch {
                                let xv =
                                    x[((b * 3 + ch) * img + py * pch + ky) * img + px * pch + kx];
                                acc += w[((o * 3 + ch) * pch + ky) * pch + kx] as f64 * xv as f64;
                            }
                        }
                    }
                    mean[o] += acc;
                }
            }
        }
    }
    for v in &mut mean {
        *v /= (batch * n) as f64;
    }
    for row in p.data().chunks_exact(6) {
        for (k, v) in row.iter().enumerate() {
            assert!(
                (*v as f64 - mean[k % dim]).abs() < 1e-5,
                "P[.., {k}] = {v}, mean token {}",
                mean[k]
            );
        }
    }
}

#[test]
fn plugins_lists_the_backends() {
    let out = eptc_ok(&["plugins"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("cpu") && l.contains("available")),
        "{out}"
    );
    assert!(out.contains("wgpu") && out.contains("cuda"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&eptc_ok(&["plugins", "--json"])).unwrap();
    assert_eq!(v["backends"][0]["name"], "cpu");
    assert_eq!(v["backends"][0]["available"], true);
    // A plugin path that does not exist is refused, naming it (tests/plugins.rs loads a
    // real one).
    let e = eptc_err(&["plugins", "--plugin", "/tmp/no-such-dir/libfoo.so"]);
    assert!(e.contains("/tmp/no-such-dir/libfoo.so"), "{e}");
}

#[test]
fn help_teaches() {
    let out = eptc_ok(&["--help"]);
    for c in [
        "inspect", "compile", "run", "grad", "train", "eval", "infer", "gen-data", "ir", "plugins",
        "demo",
    ] {
        assert!(out.contains(c), "--help lacks {c}");
    }
    let out = eptc_ok(&["compile", "--help"]);
    for f in [
        "--ept-mode",
        "--layers",
        "--prompt-len",
        "--prompt-init",
        "--num-classes",
        "--image-size",
        "--target",
    ] {
        assert!(out.contains(f), "compile --help lacks {f}");
    }
}

#[test]
fn ir_stages() {
    let m = fixture("tiny_timm.safetensors");
    // An artifact's stages print too, identical to the file.
    let d = tempfile::tempdir().unwrap();
    let art = compile_tiny(d.path(), &[]);
    // The training stage straight from the model equals the artifact's.
    let train = eptc_ok(&[
        "ir",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "6",
        "--num-classes",
        "5",
        "--stage",
        "train",
    ]);
    assert!(train.contains("output \"grad.ept.prompts.1\""), "{train}");
    assert_eq!(
        train,
        std::fs::read_to_string(art.join("train.eptc")).unwrap()
    );
    for stage in ["imported", "peft", "optimized", "train"] {
        let out = eptc_ok(&["ir", s(&art), "--stage", stage]);
        assert_eq!(
            out,
            std::fs::read_to_string(art.join(format!("{stage}.eptc"))).unwrap()
        );
    }
}

#[test]
fn bench_times_the_forward_pass() {
    let d = tempfile::tempdir().unwrap();
    let art = compile_tiny(d.path(), &[]);
    let out = eptc_ok(&[
        "bench",
        s(&art),
        "--batch",
        "2",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["times_s"].as_array().unwrap().len(), 3);
    let (min, med, max) = (
        v["min_s"].as_f64().unwrap(),
        v["median_s"].as_f64().unwrap(),
        v["max_s"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= med && med <= max, "{v}");
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    let out = eptc_ok(&[
        "bench",
        s(&art),
        "--train",
        "--batch",
        "2",
        "--iters",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["what"], "training step");
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn compile_reports_the_optimizer() {
    let d = tempfile::tempdir().unwrap();
    let art = d.path().join("art");
    let m = fixture("tiny_timm.safetensors");
    let out = eptc_ok(&[
        "compile",
        s(&m),
        "--heads",
        "3",
        "--num-classes",
        "5",
        "--prompt-len",
        "6",
        "-o",
        s(&art),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["optimizer"]["attention_with_sink"], 2, "{v}");
    assert!(v["optimizer"]["nodes_after"].as_u64() < v["optimizer"]["nodes_before"].as_u64());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["optimizer"]["enabled"], true);
    assert_eq!(
        manifest["optimizer"]["summary"]["rules_fired"]["ept-sink"],
        2
    );
    assert!(art.join("optimized.eptc").exists());
    // Old artifacts are refused with a clear message.
    let mut old = manifest.clone();
    old["format"] = 1.into();
    std::fs::write(art.join("manifest.json"), old.to_string()).unwrap();
    let inp = fixture("input_b1.safetensors");
    let e = eptc_err(&[
        "run",
        s(&art),
        "--input",
        s(&inp),
        "--output",
        s(&d.path().join("o.safetensors")),
    ]);
    assert!(e.contains("recompile"), "{e}");
}

#[test]
fn cuda_compiles_without_a_gpu_and_says_why_it_cannot_run() {
    // `compile --target cuda` generates (and, where NVRTC loads, compiles) every kernel
    // on any machine; running needs the driver, and without one the error says so.
    let d = tempfile::tempdir().unwrap();
    let art = d.path().join("art");
    let m = fixture("tiny_timm.safetensors");
    eptc_ok(&[
        "compile",
        s(&m),
        "--heads",
        "3",
        "--target",
        "cuda",
        "--emit",
        "kernels",
        "-o",
        s(&art),
    ]);
    let cu: Vec<_> = std::fs::read_dir(art.join("kernels/optimized"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!cu.is_empty() && cu.iter().all(|p| p.extension().unwrap() == "cu"));
    let v: serde_json::Value = serde_json::from_str(&eptc_ok(&["plugins", "--json"])).unwrap();
    let cuda = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "cuda")
        .expect("cuda listed")
        .clone();
    if cuda["available"] == true {
        return; // A GPU machine: the parity suites cover running.
    }
    let out = d.path().join("out.safetensors");
    let inp = fixture("input_b1.safetensors");
    let e = eptc_err(&["run", s(&art), "--input", s(&inp), "--output", s(&out)]);
    let why = cuda["detail"].as_str().unwrap();
    assert!(e.contains("cuda") && e.contains(why), "{e}");
}
