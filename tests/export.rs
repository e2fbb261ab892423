//! `eptc export` (issue #8, DESIGN.md §6): adapters in the layouts PyTorch users load.
//!
//! The fixtures (`scripts/make_fixtures.py --export tests/fixtures/export`) were made by
//! running `eptc export` and loading its output in PyTorch: the official EPT forward fed
//! `backbone.prompt` / `head.fc.*` by those keys, and peft's `PeftModel.from_pretrained`
//! on the LoRA folder, for a timm (fused qkv) and a Hugging Face (transformers 5) ViT. The
//! expected files hold PyTorch's float64 logits and the exported tensors PyTorch loaded.
//! Here eptc exports again: the tensors must be the ones PyTorch loaded, bit for bit, and
//! `eptc run` with the same adapter must reproduce PyTorch's logits.

mod common;

use std::path::Path;

use common::{eptc_err, eptc_ok, fixture, rel_err, s, tensor};
use eptc_frontend::TensorFile;

fn export_fixture(name: &str) -> std::path::PathBuf {
    fixture(&format!("export/{name}"))
}

/// Every `export.<key>` of `expected` equals `<key>` of the exported file, bit for bit,
/// and the exported file holds nothing else.
fn same_tensors(exported: &Path, expected: &Path) {
    let got = TensorFile::read(exported).unwrap();
    let want = TensorFile::read(expected).unwrap();
    let mut keys: Vec<&String> = want
        .tensors
        .keys()
        .filter(|k| k.starts_with("export."))
        .collect();
    keys.sort();
    let mut got_keys: Vec<String> = got.tensors.keys().map(|k| format!("export.{k}")).collect();
    got_keys.sort();
    assert_eq!(
        got_keys,
        keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        "{}: keys",
        exported.display()
    );
    for k in keys {
        let w = &want.tensors[k];
        let g = &got.tensors[&k["export.".len()..]];
        assert_eq!(g.shape, w.shape, "{k}: shape");
        let same = g
            .data()
            .iter()
            .zip(w.data())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{k}: exported values differ from what PyTorch loaded");
    }
}

/// `eptc run` with `adapter` against PyTorch's logits in `expected`.
fn logits_match(art: &Path, adapter: &Path, expected: &Path, dir: &Path) -> f64 {
    let out = dir.join("out.safetensors");
    eptc_ok(&[
        "run",
        s(art),
        "--adapter",
        s(adapter),
        "--input",
        s(&fixture("input_b3.safetensors")),
        "--output",
        s(&out),
    ]);
    let (shape, got) = tensor(&out, "logits");
    let (want_shape, want) = tensor(expected, "logits");
    assert_eq!(shape, want_shape);
    rel_err(&got, &want)
}

#[test]
fn ept_official_layout_reproduces_the_official_forward() {
    let d = tempfile::tempdir().unwrap();
    let art = d.path().join("art");
    // Layers "2,0": out of order, and the official contiguous range [0, 2] spans the
    // unprompted layer 1, which gets a neutral prompt.
    eptc_ok(&[
        "compile",
        s(&export_fixture("model3.safetensors")),
        "--heads",
        "2",
        "--peft",
        "ept",
        "--layers",
        "2,0",
        "--prompt-len",
        "5",
        "--num-classes",
        "4",
        "--task",
        "multilabel",
        "-o",
        s(&art),
    ]);
    let adapter = export_fixture("ept_adapter.safetensors");
    let exp = d.path().join("exp");
    let out = eptc_ok(&["export", s(&art), "--adapter", s(&adapter), "-o", s(&exp)]);
    assert!(out.contains("ept-official"), "{out}");
    let expected = export_fixture("ept_expected.safetensors");
    same_tensors(&exp.join("adapter.safetensors"), &expected);
    let file = TensorFile::read(&exp.join("adapter.safetensors")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&file.metadata["ept_config"]).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&TensorFile::read(&expected).unwrap().metadata["ept_config"]).unwrap();
    assert_eq!(cfg["backbone"], want, "the config PyTorch was built from");
    assert_eq!(cfg["neutral_layers"], serde_json::json!([1]));
    assert_eq!(cfg["head"]["type"], "MultiLabelLinearClsHead");
    let py = std::fs::read_to_string(exp.join("ept_config.py")).unwrap();
    assert!(
        py.contains(
            "backbone=dict(type='EPT', prompt_length=5, prompt_layers=[0, 1, 2], img_size=32)"
        ),
        "{py}"
    );
    assert!(py.contains("num_classes=4, in_channels=24"), "{py}");
    let err = logits_match(&art, &adapter, &expected, d.path());
    eprintln!("ept-official: eptc vs the official forward on the export: {err:.2e}");
    assert!(err <= 1e-5, "logits rel err {err:.2e}");
}

/// An artifact of `checkpoint` with LoRA r = 4, alpha = 8, as `adapter_lora` was made.
fn compile_lora(dir: &Path, checkpoint: &str) -> std::path::PathBuf {
    let art = dir.join("art");
    eptc_ok(&[
        "compile",
        s(&fixture(checkpoint)),
        "--heads",
        "3",
        "--peft",
        "lora",
        "--rank",
        "4",
        "--lora-alpha",
        "8",
        "--num-classes",
        "5",
        "--task",
        "multiclass",
        "-o",
        s(&art),
    ]);
    art
}

fn lora_case(layout: &str, checkpoint: &str) {
    let d = tempfile::tempdir().unwrap();
    let art = compile_lora(d.path(), checkpoint);
    let adapter = fixture("adapter_lora.safetensors");
    let exp = d.path().join("exp");
    eptc_ok(&[
        "export",
        s(&art),
        "--adapter",
        s(&adapter),
        "--format",
        "hf-peft",
        "-o",
        s(&exp),
    ]);
    let expected = export_fixture(&format!("lora_{layout}_expected.safetensors"));
    same_tensors(&exp.join("adapter_model.safetensors"), &expected);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("adapter_config.json")).unwrap())
            .unwrap();
    assert!(cfg["base_model_name_or_path"]
        .as_str()
        .unwrap()
        .ends_with(checkpoint));
    cfg.as_object_mut()
        .unwrap()
        .remove("base_model_name_or_path");
    let want: serde_json::Value =
        serde_json::from_str(&TensorFile::read(&expected).unwrap().metadata["adapter_config"])
            .unwrap();
    assert_eq!(cfg, want, "the adapter_config.json peft loaded");
    let err = logits_match(&art, &adapter, &expected, d.path());
    eprintln!("hf-peft {layout}: eptc vs PeftModel.from_pretrained: {err:.2e}");
    assert!(err <= 1e-5, "logits rel err {err:.2e}");
}

#[test]
fn lora_exports_as_hf_peft_for_timm() {
    lora_case("timm", "tiny_timm.safetensors");
}

#[test]
fn lora_exports_as_hf_peft_for_hugging_face() {
    lora_case("hf", "tiny_hfcls.safetensors");
}

/// transformers 4 names the HF projections differently; the tensors are the same.
#[test]
fn transformers_4_module_names() {
    let d = tempfile::tempdir().unwrap();
    let art = compile_lora(d.path(), "tiny_hfcls.safetensors");
    let exp = d.path().join("exp");
    let adapter = fixture("adapter_lora.safetensors");
    eptc_ok(&[
        "export",
        s(&art),
        "--adapter",
        s(&adapter),
        "--transformers",
        "4",
        "-o",
        s(&exp),
    ]);
    let got = TensorFile::read(&exp.join("adapter_model.safetensors")).unwrap();
    let v5 = TensorFile::read(&export_fixture("lora_hf_expected.safetensors")).unwrap();
    for (k, t) in &got.tensors {
        let k5 = k
            .replace("vit.encoder.layer.", "vit.layers.")
            .replace(".attention.attention.query.", ".attention.q_proj.")
            .replace(".attention.attention.value.", ".attention.v_proj.");
        if !k.contains(".classifier.") {
            assert_ne!(&k5, k, "{k}: not a transformers 4 name");
        }
        let w = &v5.tensors[&format!("export.{k5}")];
        assert_eq!(t.data(), w.data(), "{k}");
    }
    let cfg = std::fs::read_to_string(exp.join("adapter_config.json")).unwrap();
    assert!(
        cfg.contains("\"query\"") && cfg.contains("\"value\""),
        "{cfg}"
    );
}

#[test]
fn export_refuses_what_a_layout_cannot_hold() {
    let d = tempfile::tempdir().unwrap();
    let model = fixture("tiny_timm.safetensors");
    let compile = |name: &str, extra: &[&str]| {
        let art = d.path().join(name);
        let mut a = vec![
            "compile",
            s(&model),
            "--heads",
            "3",
            "--num-classes",
            "5",
            "-o",
        ];
        a.push(s(&art));
        a.extend(extra);
        eptc_ok(&a);
        art
    };
    let mc = compile(
        "mc",
        &[
            "--peft",
            "ept",
            "--ept-mode",
            "multi-cat",
            "--prompt-len",
            "3",
        ],
    );
    let out = d.path().join("o");
    let err = eptc_err(&["export", s(&mc), "-o", s(&out)]);
    assert!(
        err.contains("`cat` mode only") && err.contains("multi-cat"),
        "{err}"
    );
    let bias = compile("bias", &["--peft", "bias"]);
    let err = eptc_err(&["export", s(&bias), "-o", s(&out)]);
    assert!(err.contains("\"bias\""), "{err}");
    let err = eptc_err(&["export", s(&bias), "--format", "hf-peft", "-o", s(&out)]);
    assert!(err.contains("LoRA"), "{err}");
    let err = eptc_err(&["export", s(&mc), "--format", "onnx", "-o", s(&out)]);
    assert!(err.contains("\"onnx\""), "{err}");
    // An adapter of another artifact is refused, naming the file.
    let other = fixture("adapter_lora.safetensors");
    let err = eptc_err(&["export", s(&mc), "--adapter", s(&other), "-o", s(&out)]);
    assert!(err.contains("adapter_lora.safetensors"), "{err}");
}
