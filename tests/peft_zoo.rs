//! The PEFT methods that choose which existing weights train (`--peft full | linear |
//! partial-k | bias`), LoRA (`--peft lora`), VPT (`--peft vpt`), AdaptFormer (`--peft
//! adapter`), MLP-3 (`--peft mlp-3`) and VP (`--peft vp`): trainable counts against formulas (tiny model in every layout,
//! ViT-B/16), the tensors each trains, gradients against PyTorch (float64, from
//! `scripts/make_fixtures.py`), trained values reaching the logits through the optimizer
//! (no fold may swallow a trainable weight), training, and the errors.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;
use eptc_frontend::{ImportOptions, TensorFile};
use eptc_ir::{HostTensor, WeightStore};
use eptc_peft::{PeftConfig, Task};

const METHODS: [&str; 9] = [
    "full",
    "linear",
    "partial-1",
    "bias",
    "lora",
    "vpt",
    "adapter",
    "mlp-3",
    "vp",
];

fn config(method: &str, classes: usize) -> PeftConfig {
    PeftConfig {
        method: method.into(),
        mode: None,
        layers: vec![],
        prompt_len: 0,
        prompt_init: None,
        num_classes: classes,
        task: Task::Multiclass,
    }
}

/// The trainable tensors (name -> scalars) after the pass, with the initial values'
/// scalars checked equal and every checkpoint param starting at its checkpoint value.
fn trainable(
    model: &eptc_frontend::Model,
    method: &str,
    classes: usize,
) -> BTreeMap<String, usize> {
    let mut g = model.graph.clone();
    let values =
        eptc_peft::apply_with_weights(&mut g, &config(method, classes), None, 0, &model.weights)
            .unwrap_or_else(|e| panic!("{method}: {e}"));
    let names: BTreeMap<String, usize> = g
        .params()
        .into_iter()
        .filter(|p| p.2)
        .map(|(id, n, _)| (n.to_string(), g.ty(id).shape.numel(1)))
        .collect();
    assert_eq!(
        names.keys().collect::<Vec<_>>(),
        values.keys().collect::<Vec<_>>()
    );
    for (k, v) in values.iter().filter(|(k, _)| !k.starts_with("head.")) {
        if let Some(w) = model.weights.get(k) {
            assert_eq!(
                w.data(),
                v.data(),
                "{method}: {k} starts at its checkpoint value"
            );
        }
    }
    assert_eq!(g.trainable_count(), names.values().sum::<usize>());
    names
}

/// Tiny ViT: D = 48, depth 2, MLP 192, 17 tokens, patch 8, 3 channels, 5 classes.
#[test]
fn tiny_counts_match_the_formulas_in_every_layout() {
    let (d, m, n, p, depth, c) = (48, 192, 17, 8, 2, 5);
    let head = c * (d + 1); // 245
                            // A block: 2 LayerNorms (2D each), qkv 3D·D + 3D, proj D² + D, fc1 M·D + M, fc2 D·M + D.
    let block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (m * d + m) + (d * m + d);
    let embed = (d * 3 * p * p + d) + d + n * d; // patch conv + bias, cls token, pos embed
    let final_norm = 2 * d;
    // Bias terms of a block: 2 LayerNorms, qkv, proj, fc1, fc2.
    let block_bias = 2 * d + 3 * d + d + m + d;
    let want = [
        ("full", embed + depth * block + final_norm + head),
        ("linear", head),
        ("partial-1", block + final_norm + head),
        ("partial-2", 2 * block + final_norm + head),
        ("bias", depth * block_bias + d + d + head),
    ];
    assert_eq!(block, 28_272);
    assert_eq!(
        want.map(|w| w.1),
        [67_013, 245, 28_613, 56_885, 1_397],
        "the formulas on the tiny model"
    );
    for file in [
        "tiny_timm.safetensors",
        "tiny_hf.safetensors",
        "tiny_hfcls.safetensors",
        "tiny_mmcls.safetensors",
    ] {
        let opts = ImportOptions {
            heads: Some(3),
            ..Default::default()
        };
        let model = eptc_frontend::import(&fixture(file), &opts).unwrap();
        for (method, count) in want {
            let t = trainable(&model, method, c);
            assert_eq!(t.values().sum::<usize>(), count, "{file} {method}");
        }
        // What partial-1 trains: the last block, the final norm, the head, by key names.
        let (last, norm) = match file {
            "tiny_timm.safetensors" => ("blocks.1.", "norm."),
            "tiny_hf.safetensors" => ("encoder.layer.1.", "layernorm."),
            "tiny_hfcls.safetensors" => ("vit.encoder.layer.1.", "vit.layernorm."),
            _ => ("backbone.layers.1.", "backbone.ln1."),
        };
        let t = trainable(&model, "partial-1", c);
        for k in t.keys() {
            assert!(
                k.starts_with(last) || k.starts_with(norm) || k.starts_with("head."),
                "{file}: partial-1 trains {k}"
            );
        }
        assert_eq!(
            t.keys().filter(|k| k.starts_with(norm)).count(),
            2,
            "{file}"
        );
        // bias: exactly the `.bias` tensors (+ head.weight).
        let t = trainable(&model, "bias", c);
        assert!(t.keys().all(|k| k.ends_with(".bias") || k == "head.weight"));
        // Bias tensors per block: 2 LayerNorms, qkv (q, k, v in Hugging Face), proj, fc1, fc2.
        let per_block = if file.contains("hf") { 8 } else { 6 };
        assert_eq!(
            t.len(),
            depth * per_block + 2 + 2,
            "{file}: + patch, norm, head"
        );
    }
}

/// ViT-B/16: D = 768, 12 blocks, MLP 3072, 197 tokens, patch 16; a new 19-class head.
#[test]
fn vit_b16_counts_match_the_formulas() {
    let model = eptc_frontend::import_file(&vit_b16(), &ImportOptions::default()).unwrap();
    let (d, m, n, p, depth, c) = (768, 3072, 197, 16, 12, 19);
    let head = c * (d + 1); // 14,611
    let block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (m * d + m) + (d * m + d);
    let embed = (d * 3 * p * p + d) + d + n * d;
    let final_norm = 2 * d;
    let block_bias = 2 * d + 3 * d + d + m + d;
    assert_eq!(block, 7_087_872);
    assert_eq!(embed, 742_656);
    assert_eq!(block_bias, 8_448);
    let want = [
        // timm's vit_base_patch16_224 without its 1000-class head: 85,798,656.
        (
            "full",
            embed + depth * block + final_norm + head,
            85_813_267,
        ),
        ("linear", head, 14_611),
        ("partial-1", block + final_norm + head, 7_104_019),
        ("partial-3", 3 * block + final_norm + head, 21_279_763),
        // 12 × 8,448 + patch-embedding bias 768 + final-norm bias 768 = 102,912.
        ("bias", depth * block_bias + d + d + head, 117_523),
    ];
    assert_eq!(
        model.param_count() - 1000 * (d + 1) + head,
        want[0].1,
        "full = every weight"
    );
    for (method, formula, literal) in want {
        assert_eq!(formula, literal, "{method}: formula");
        let t = trainable(&model, method, c);
        assert_eq!(t.values().sum::<usize>(), literal, "{method}");
    }
}

fn compile(dir: &Path, name: &str, method: &str, extra: &[&str]) -> PathBuf {
    let art = dir.join(name);
    let m = fixture("tiny_timm.safetensors");
    let mut a = vec!["compile", s(&m), "--heads", "3", "-o", s(&art)];
    match method.strip_prefix("partial-") {
        Some(k) => a.extend(["--peft", "partial-k", "--k", k]),
        None => a.extend(["--peft", method]),
    }
    a.extend(extra);
    let target = target_flags();
    a.extend(target.iter().map(String::as_str));
    eptc_ok(&a);
    art
}

/// `eptc compile` prints the count and the JSON manifest names the method.
#[test]
fn compile_reports_each_method() {
    let d = tempfile::tempdir().unwrap();
    for (method, total, peft) in [
        ("full", "67,013", "66,768"),
        ("linear", "245", "0"),
        ("partial-1", "28,613", "28,368"),
        ("bias", "1,397", "1,152"),
    ] {
        let art = d.path().join(method);
        let m = fixture("tiny_timm.safetensors");
        let mut a = vec!["compile", s(&m), "--heads", "3", "-o", s(&art)];
        match method {
            "partial-1" => a.extend(["--peft", "partial-k"]), // --k defaults to 1
            _ => a.extend(["--peft", method]),
        }
        let out = eptc_ok(&a);
        let want = format!("trainable parameters: {total} = {peft} (PEFT) + 245 (head, 5 classes)");
        assert!(out.contains(&want), "{method}: {out}");
        let manifest = std::fs::read_to_string(art.join("manifest.json")).unwrap();
        assert!(
            manifest.contains(&format!("\"method\": \"{method}\"")),
            "{method}: {manifest}"
        );
    }
}

#[test]
fn bad_methods_and_k_give_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("tiny_timm.safetensors");
    let out = d.path().join("a");
    let base = ["compile", s(&m), "--heads", "3", "-o", s(&out)];
    for (k, msg) in [
        (
            "3",
            "--k 3: partial-k trains the last k blocks, k in 1..=2 for this model (2 blocks)",
        ),
        ("0", "--k 0: partial-k trains the last k blocks, k in 1..=2"),
    ] {
        let mut a = base.to_vec();
        a.extend(["--peft", "partial-k", "--k", k]);
        let e = eptc_err(&a);
        assert!(e.contains(msg), "{e}");
    }
    let mut a = base.to_vec();
    a.extend(["--peft", "lora9"]);
    let e = eptc_err(&a);
    assert!(
        e.contains("--peft \"lora9\"")
            && e.contains(
                "full, linear, partial-k, bias, lora, vpt, adapter, mlp-3, vp, ept, none"
            ),
        "{e}"
    );
}

/// `eptc grad` against PyTorch in float64: (method, task, adapter file or the
/// checkpoint's values).
#[test]
fn grad_matches_pytorch() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        ("bias", "multiclass", true),
        ("bias", "multilabel", true),
        ("partial-1", "multiclass", true),
        ("full", "multiclass", false),
    ];
    let mut worst = 0.0f64;
    for (method, task, adapter) in cases {
        let art = compile(
            d.path(),
            &format!("{method}-{task}"),
            method,
            &["--task", task],
        );
        let out = d.path().join(format!("g-{method}-{task}.safetensors"));
        let input = fixture(&format!("batch_{task}.safetensors"));
        let afile = fixture(&format!("adapter_{method}.safetensors"));
        let mut a = vec!["grad", s(&art), "--input", s(&input), "--output", s(&out)];
        if adapter {
            a.extend(["--adapter", s(&afile)]);
        }
        eptc_ok(&a);
        let want = fixture(&format!("grad_{method}_{task}.safetensors"));
        let got = TensorFile::read(&out).unwrap();
        let exp = TensorFile::read(&want).unwrap();
        let keys = |f: &TensorFile| -> BTreeSet<String> {
            f.tensors
                .keys()
                .filter(|k| k.starts_with("grad.") || *k == "loss")
                .cloned()
                .collect()
        };
        assert_eq!(
            keys(&got),
            keys(&exp),
            "{method} {task}: the gradients written"
        );
        for k in keys(&exp) {
            let (g, e) = (&got.tensors[&k], &exp.tensors[&k]);
            assert_eq!(g.shape, e.shape, "{method} {task} {k}");
            let err = rel_err(g.data(), e.data());
            assert!(err <= 1e-4, "{method} {task} {k}: relative error {err:e}");
            worst = worst.max(err);
        }
    }
    println!("worst relative gradient error against PyTorch (float64): {worst:e}");
}

fn run(art: &Path, adapter: Option<&Path>, out: &Path) -> Vec<f32> {
    let input = fixture("input_b3.safetensors");
    let mut a = vec!["run", s(art), "--input", s(&input), "--output", s(out)];
    if let Some(p) = adapter {
        a.extend(["--adapter", s(p)]);
    }
    eptc_ok(&a);
    tensor(out, "logits").1
}

/// `eptc compile --peft <peft> <extra>` on tiny timm prints `trainable parameters:
/// <total>…` and records `<method>` in the manifest, for each `(extra, method, total)`.
fn flags_reach_the_manifest(peft: &str, cases: &[(&[&str], &str, &str)]) {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("tiny_timm.safetensors");
    for &(extra, method, total) in cases {
        let art = d.path().join(method);
        let mut a = vec![
            "compile",
            s(&m),
            "--heads",
            "3",
            "-o",
            s(&art),
            "--peft",
            peft,
        ];
        a.extend(extra);
        let out = eptc_ok(&a);
        assert!(
            out.contains(&format!("trainable parameters: {total}")),
            "{out}"
        );
        let manifest = std::fs::read_to_string(art.join("manifest.json")).unwrap();
        assert!(
            manifest.contains(&format!("\"method\": \"{method}\"")),
            "{manifest}"
        );
    }
}

/// `eptc compile --peft <peft> <extra>` on tiny timm fails with an error containing
/// `msg`, for each `(extra, msg)`.
fn flags_are_refused(peft: &str, cases: &[(&[&str], &str)]) {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("tiny_timm.safetensors");
    let out = d.path().join("bad");
    for &(extra, msg) in cases {
        let mut a = vec![
            "compile",
            s(&m),
            "--heads",
            "3",
            "-o",
            s(&out),
            "--peft",
            peft,
        ];
        a.extend(extra);
        let e = eptc_err(&a);
        assert!(e.contains(msg), "{e}");
    }
}

/// `eptc grad` of `art` with the fixture adapter `adapter` on the multi-class fixture
/// batch against the fixture `grad` (float64 PyTorch): the same `grad.*` tensors and loss
/// (`count` of them), each within 1e-4. Returns the adapter's and the fixture's paths.
fn grads_match_pytorch(
    art: &Path,
    name: &str,
    adapter: &str,
    grad: &str,
    count: usize,
) -> (PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("g.safetensors");
    let input = fixture("batch_multiclass.safetensors");
    let afile = fixture(adapter);
    eptc_ok(&[
        "grad",
        s(art),
        "--input",
        s(&input),
        "--adapter",
        s(&afile),
        "--output",
        s(&out),
    ]);
    let want = fixture(grad);
    let got = TensorFile::read(&out).unwrap();
    let exp = TensorFile::read(&want).unwrap();
    let keys = |f: &TensorFile| -> BTreeSet<String> {
        f.tensors
            .keys()
            .filter(|k| k.starts_with("grad.") || *k == "loss")
            .cloned()
            .collect()
    };
    assert_eq!(keys(&got), keys(&exp), "{name}: the gradients written");
    assert_eq!(keys(&exp).len(), count, "{name}");
    let mut worst = 0.0f64;
    for k in keys(&exp) {
        let (g, e) = (&got.tensors[&k], &exp.tensors[&k]);
        assert_eq!(g.shape, e.shape, "{name} {k}");
        let err = rel_err(g.data(), e.data());
        assert!(err <= 1e-4, "{name} {k}: relative error {err:e}");
        worst = worst.max(err);
    }
    println!("{name}: worst relative gradient error against PyTorch (float64): {worst:e}");
    (afile, want)
}

/// The trained values reach the logits of the optimized graph: the LayerNorm-affine and
/// attention-scale folds never consume a trainable weight. `bias` and `partial-1`
/// adapters (LayerNorm biases/weights, qkv bias and weight perturbed) give PyTorch's
/// logits, and so does `full` holding the same values.
#[test]
fn trained_values_reach_the_logits() {
    let d = tempfile::tempdir().unwrap();
    let full = compile(d.path(), "full", "full", &[]);
    let full_init = TensorFile::read(&full.join("adapter-init.safetensors")).unwrap();
    for method in ["bias", "partial-1"] {
        let art = compile(d.path(), method, method, &[]);
        let afile = fixture(&format!("adapter_{method}.safetensors"));
        let (_, want) = tensor(
            &fixture(&format!("grad_{method}_multiclass.safetensors")),
            "logits",
        );
        let init = run(
            &art,
            None,
            &d.path().join(format!("{method}-init.safetensors")),
        );
        let got = run(
            &art,
            Some(&afile),
            &d.path().join(format!("{method}.safetensors")),
        );
        assert!(
            rel_err(&init, &want) > 0.05,
            "{method}: the adapter moves the logits"
        );
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "{method}: logits relative error {err:e}");
        // Every LayerNorm and qkv bias on its own still moves the logits.
        let zoo = TensorFile::read(&afile).unwrap();
        for key in [
            "blocks.1.norm1.bias",
            "blocks.1.norm2.weight",
            "blocks.1.attn.qkv.bias",
        ] {
            let Some(v) = zoo.tensors.get(key) else {
                continue;
            };
            let mut one = full_init.tensors.clone();
            one.insert(key.to_string(), v.clone());
            let p = d.path().join(format!("one-{method}-{key}.safetensors"));
            write(&p, &one);
            let moved = run(&full, Some(&p), &d.path().join("one-out.safetensors"));
            let base = run(&full, None, &d.path().join("base-out.safetensors"));
            assert!(
                rel_err(&moved, &base) > 1e-3,
                "{method}: {key} alone does not change full's logits"
            );
        }
        // `full` with the same values.
        let mut all = full_init.tensors.clone();
        all.extend(zoo.tensors.clone());
        let p = d.path().join(format!("full-as-{method}.safetensors"));
        write(&p, &all);
        let got = run(&full, Some(&p), &d.path().join("full-out.safetensors"));
        let err = rel_err(&got, &want);
        assert!(
            err < 1e-5,
            "full as {method}: logits relative error {err:e}"
        );
    }
}

fn write(path: &Path, tensors: &BTreeMap<String, HostTensor>) {
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    eptc_frontend::write_tensors(path, &refs, None).unwrap();
}

/// `eptc train` learns with every method: the adapter moves and the loss comes down.
#[test]
fn train_each_method() {
    let d = tempfile::tempdir().unwrap();
    let data = gen_data(d.path(), 4, 0);
    for method in METHODS {
        let extra: &[&str] = match method {
            "vpt" => &["--num-classes", "3", "--prompt-len", "4"],
            "vp" => &["--num-classes", "3", "--pad-size", "4"],
            _ => &["--num-classes", "3"],
        };
        let art = compile(d.path(), method, method, extra);
        let run = d.path().join(format!("run-{method}"));
        let (train, val) = (data.join("train.txt"), data.join("val.txt"));
        eptc_ok(&[
            "train",
            s(&art),
            "--data",
            s(&data),
            "--train",
            s(&train),
            "--val",
            s(&val),
            "-o",
            s(&run),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--no-augment",
        ]);
        let init = TensorFile::read(&art.join("adapter-init.safetensors")).unwrap();
        let last = TensorFile::read(&run.join("last.safetensors")).unwrap();
        let keys: BTreeSet<_> = init.tensors.keys().collect();
        assert_eq!(
            keys,
            last.tensors.keys().collect(),
            "{method}: adapter tensors"
        );
        // Every trained tensor moved (the head, each checkpoint weight trained, LoRA's
        // factors: B from zero first, then A once B is non-zero).
        for (k, v) in &init.tensors {
            let moved = rel_err(last.tensors[k].data(), v.data());
            assert!(moved > 0.0, "{method}: {k} did not change");
        }
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{method}");
        let loss = |l: &serde_json::Value| l["train_loss"].as_f64().unwrap();
        assert!(
            loss(&lines[1]) < loss(&lines[0]),
            "{method}: train loss {} -> {}",
            loss(&lines[0]),
            loss(&lines[1])
        );
    }
}

/// The IR pass marks the chosen checkpoint params, nothing else.
#[test]
fn the_pass_only_flips_trainability() {
    let opts = ImportOptions {
        heads: Some(3),
        ..Default::default()
    };
    let model = eptc_frontend::import(&fixture("tiny_timm.safetensors"), &opts).unwrap();
    let mut g = model.graph.clone();
    eptc_peft::apply_with_weights(&mut g, &config("none", 5), None, 0, &WeightStore::new())
        .unwrap();
    for method in ["full", "partial-2", "bias"] {
        let mut h = model.graph.clone();
        eptc_peft::apply_with_weights(&mut h, &config(method, 5), None, 0, &model.weights).unwrap();
        assert_eq!(g.len(), h.len(), "{method}: same nodes as `none`");
        for (id, name, trainable) in h.params() {
            let tag = h.node(id).tag.as_deref();
            match (trainable, tag) {
                (true, Some("head")) => assert!(name.starts_with("head.")),
                (true, t) => assert_eq!(t, Some(method), "{name}"),
                (false, t) => assert_eq!(t, None, "{name}"),
            }
        }
    }
    // Without the checkpoint's weights, a method that trains them says so.
    let mut h = model.graph.clone();
    let e = eptc_peft::apply(&mut h, &config("bias", 5), None, 0).unwrap_err();
    assert!(e.to_string().contains("no checkpoint value"), "{e}");
}

/// LoRA's trainable scalars: `depth × 2 (q, v) × (r·D + D·r)` plus the head.
fn lora_count(depth: usize, d: usize, r: usize) -> usize {
    depth * 2 * (r * d + d * r)
}

fn lora_config(rank: usize, alpha: f32, classes: usize) -> PeftConfig {
    config(&eptc_peft::lora::method_name(rank, alpha), classes)
}

/// The factors of every block's q and v, whatever the layout (fused qkv in timm and
/// mmcls, separate query/key/value in Hugging Face); A Kaiming-uniform, B zero.
#[test]
fn lora_counts_match_the_formula_in_every_layout() {
    let (d, depth, c) = (48, 2, 5);
    let head = c * (d + 1);
    assert_eq!(lora_count(depth, d, 8) + head, 3_317);
    assert_eq!(lora_count(depth, d, 1) + head, 629);
    for file in [
        "tiny_timm.safetensors",
        "tiny_hf.safetensors",
        "tiny_hfcls.safetensors",
        "tiny_mmcls.safetensors",
    ] {
        let opts = ImportOptions {
            heads: Some(3),
            ..Default::default()
        };
        let model = eptc_frontend::import(&fixture(file), &opts).unwrap();
        for (r, alpha) in [(1, 1.0), (4, 8.0), (8, 8.0)] {
            let mut g = model.graph.clone();
            let values = eptc_peft::apply_with_weights(
                &mut g,
                &lora_config(r, alpha, c),
                None,
                0,
                &model.weights,
            )
            .unwrap_or_else(|e| panic!("{file} r={r}: {e}"));
            assert_eq!(
                g.trainable_count(),
                lora_count(depth, d, r) + head,
                "{file} r={r}"
            );
            let mut want: BTreeSet<String> = (0..depth)
                .flat_map(|i| {
                    ["q", "v"]
                        .into_iter()
                        .flat_map(move |w| ["A", "B"].map(|f| format!("lora.{i}.{w}.{f}")))
                })
                .collect();
            want.extend(["head.weight".to_string(), "head.bias".to_string()]);
            assert_eq!(
                values.keys().cloned().collect::<BTreeSet<_>>(),
                want,
                "{file}"
            );
            let bound = 1.0 / (d as f32).sqrt();
            for (k, v) in &values {
                if k.ends_with(".A") {
                    assert_eq!(v.shape, vec![r, d], "{k}");
                    assert!(v.data().iter().all(|x| x.abs() <= bound), "{k}");
                    assert!(v.data().iter().any(|&x| x != 0.0), "{k}");
                } else if k.ends_with(".B") {
                    assert_eq!(v.shape, vec![d, r], "{k}");
                    assert!(v.data().iter().all(|&x| x == 0.0), "{k} starts at zero");
                }
            }
            // The nodes the pass adds carry its tag; no checkpoint param trains.
            for (id, name, trainable) in g.params() {
                let tag = g.node(id).tag.as_deref();
                match (trainable, name.starts_with("lora.")) {
                    (true, true) => assert_eq!(tag, Some("lora"), "{name}"),
                    (true, false) => assert!(name.starts_with("head."), "{name}"),
                    (false, _) => assert_eq!(tag, None, "{name}"),
                }
            }
        }
    }
}

/// ViT-B/16 at r = 8: 12 × 2 × (8·768 + 768·8) = 294,912 + the head.
#[test]
fn vit_b16_lora_count() {
    let model = eptc_frontend::import_file(&vit_b16(), &ImportOptions::default()).unwrap();
    let (d, depth, c) = (768, 12, 19);
    let head = c * (d + 1);
    assert_eq!(lora_count(depth, d, 8), 294_912);
    for (r, lora) in [(1, 36_864), (8, 294_912), (64, 2_359_296)] {
        assert_eq!(lora_count(depth, d, r), lora, "r={r}: formula");
        let mut g = model.graph.clone();
        eptc_peft::apply_with_weights(&mut g, &lora_config(r, 16.0, c), None, 0, &model.weights)
            .unwrap();
        assert_eq!(g.trainable_count(), lora + head, "r={r}");
    }
}

/// `--rank` and `--lora-alpha` reach the manifest; bad values are refused.
#[test]
fn lora_flags() {
    flags_reach_the_manifest(
        "lora",
        &[
            (&[][..], "lora-8", "3,317 = 3,072 (PEFT)"),
            (
                &["--rank", "4", "--lora-alpha", "8"][..],
                "lora-4-alpha-8",
                "1,781 = 1,536 (PEFT)",
            ),
            (
                &["--rank", "1", "--lora-alpha", "1"][..],
                "lora-1",
                "629 = 384 (PEFT)",
            ),
        ],
    );
    flags_are_refused(
        "lora",
        &[
            (&["--rank", "0"][..], "--rank must be at least 1"),
            (
                &["--lora-alpha", "0"][..],
                "--lora-alpha 0: must be a positive number",
            ),
        ],
    );
}

/// LoRA (r = 4, alpha = 8: scale 2) on the fused qkv of tiny timm with a perturbed
/// adapter (B non-zero, so A gets gradients): `eptc grad` against PyTorch in float64, and
/// `eptc run` gives PyTorch's logits (the factors reach the optimized graph). With B = 0
/// the model is the checkpoint's (`linear`'s logits).
#[test]
fn lora_matches_pytorch() {
    let d = tempfile::tempdir().unwrap();
    let art = compile(
        d.path(),
        "lora",
        "lora",
        &["--rank", "4", "--lora-alpha", "8"],
    );
    let (afile, want) = grads_match_pytorch(
        &art,
        "lora",
        "adapter_lora.safetensors",
        "grad_lora_multiclass.safetensors",
        2 * 4 + 2 + 1,
    );

    let (_, want) = tensor(&want, "logits");
    let init = run(&art, None, &d.path().join("init.safetensors"));
    let got = run(&art, Some(&afile), &d.path().join("out.safetensors"));
    assert!(rel_err(&init, &want) > 0.05, "the adapter moves the logits");
    let err = rel_err(&got, &want);
    assert!(err < 1e-5, "lora: logits relative error {err:e}");
    // B = 0 (the initial adapter): the checkpoint's model, as `linear` with the same head.
    let linear = compile(d.path(), "linear", "linear", &[]);
    let lin = run(&linear, None, &d.path().join("linear.safetensors"));
    let err = rel_err(&init, &lin);
    assert!(err < 1e-6, "lora at init vs linear: {err:e}");
}

/// VPT's trainable scalars: `layers × L × D` (every block when deep, the first when
/// shallow) plus the head.
fn vpt_count(layers: usize, l: usize, d: usize) -> usize {
    layers * l * d
}

fn vpt_config(deep: bool, l: usize, classes: usize) -> PeftConfig {
    PeftConfig {
        prompt_len: l,
        ..config(eptc_peft::vpt::method_name(deep), classes)
    }
}

/// The prompts `[layers, L, D]`, whatever the layout, VPT's Xavier-uniform bound
/// `√(6 / (3·patch² + D))`; every block sees `N + L` tokens and the checkpoint trains
/// nothing.
#[test]
fn vpt_counts_match_the_formula_in_every_layout() {
    let (d, depth, c, n, patch) = (48, 2, 5, 17, 8);
    let head = c * (d + 1);
    assert_eq!(vpt_count(depth, 4, d) + head, 629);
    let bound = (6.0f32 / (3 * patch * patch + d) as f32).sqrt();
    assert!((eptc_peft::vpt::init_bound(patch, d) - bound).abs() < 1e-7);
    for file in [
        "tiny_timm.safetensors",
        "tiny_hf.safetensors",
        "tiny_hfcls.safetensors",
        "tiny_mmcls.safetensors",
    ] {
        let opts = ImportOptions {
            heads: Some(3),
            ..Default::default()
        };
        let model = eptc_frontend::import(&fixture(file), &opts).unwrap();
        for (deep, l) in [(true, 4), (false, 4), (true, 1), (false, 10)] {
            let mut g = model.graph.clone();
            let values = eptc_peft::apply_with_weights(
                &mut g,
                &vpt_config(deep, l, c),
                None,
                0,
                &model.weights,
            )
            .unwrap_or_else(|e| panic!("{file} deep={deep} L={l}: {e}"));
            let layers = if deep { depth } else { 1 };
            assert_eq!(
                g.trainable_count(),
                vpt_count(layers, l, d) + head,
                "{file} deep={deep} L={l}"
            );
            let keys: BTreeSet<String> = values.keys().cloned().collect();
            let want: BTreeSet<String> = ["vpt.prompts", "head.weight", "head.bias"]
                .map(String::from)
                .into();
            assert_eq!(keys, want, "{file}");
            let p = &values["vpt.prompts"];
            assert_eq!(p.shape, vec![layers, l, d]);
            assert!(p.data().iter().all(|x| x.abs() <= bound), "{file}");
            assert!(p.data().iter().any(|&x| x != 0.0), "{file}");
            // Every attention is over N + L tokens.
            let sms = eptc_peft::ept::attention_softmaxes(&g).unwrap();
            assert_eq!(sms.len(), depth);
            for sm in sms {
                let dims = g.ty(sm).shape.dims().to_vec();
                assert_eq!(dims[3].fixed(), Some(n + l), "{file}");
            }
            for (id, name, trainable) in g.params() {
                let tag = g.node(id).tag.as_deref();
                match (trainable, name) {
                    (true, "vpt.prompts") => assert_eq!(tag, Some("vpt")),
                    (true, _) => assert!(name.starts_with("head."), "{name}"),
                    (false, _) => assert_eq!(tag, None, "{name}"),
                }
            }
        }
    }
}

/// ViT-B/16, deep, L = 50: 12 × 50 × 768 = 460,800 + the head; shallow 38,400.
#[test]
fn vit_b16_vpt_count() {
    let model = eptc_frontend::import_file(&vit_b16(), &ImportOptions::default()).unwrap();
    let (d, depth, c) = (768, 12, 19);
    let head = c * (d + 1);
    assert_eq!(vpt_count(depth, 50, d), 460_800);
    for (deep, layers) in [(true, depth), (false, 1)] {
        let mut g = model.graph.clone();
        eptc_peft::apply_with_weights(&mut g, &vpt_config(deep, 50, c), None, 0, &model.weights)
            .unwrap();
        assert_eq!(
            g.trainable_count(),
            vpt_count(layers, 50, d) + head,
            "deep={deep}"
        );
    }
}

/// `--depth` and `--prompt-len` reach the manifest; bad values are refused.
#[test]
fn vpt_flags() {
    flags_reach_the_manifest(
        "vpt",
        &[
            (&["--prompt-len", "4"][..], "vpt-deep", "629 = 384 (PEFT)"),
            (
                &["--depth", "shallow", "--prompt-len", "10"][..],
                "vpt-shallow",
                "725 = 480 (PEFT)",
            ),
        ],
    );
    flags_are_refused(
        "vpt",
        &[
            (
                &["--prompt-len", "0"][..],
                "--prompt-len must be at least 1",
            ),
            (
                &["--depth", "middle"][..],
                "--depth \"middle\": expected deep or shallow",
            ),
        ],
    );
}

/// VPT-deep (L = 4) on tiny timm with random prompts (VPT's initialisation) and a
/// perturbed head: `eptc grad` against PyTorch in float64 (VPT written by hand on timm's
/// blocks), and `eptc run` gives PyTorch's logits through the optimized graph.
#[test]
fn vpt_matches_pytorch() {
    let d = tempfile::tempdir().unwrap();
    let art = compile(d.path(), "vpt", "vpt", &["--prompt-len", "4"]);
    let (afile, want) = grads_match_pytorch(
        &art,
        "vpt",
        "adapter_vpt.safetensors",
        "grad_vpt_multiclass.safetensors",
        3 + 1,
    );

    let (_, want) = tensor(&want, "logits");
    let got = run(&art, Some(&afile), &d.path().join("out.safetensors"));
    let err = rel_err(&got, &want);
    println!("vpt: logits relative error against PyTorch (float64): {err:e}");
    assert!(err < 1e-5, "vpt: logits relative error {err:e}");
    // The prompts matter: the checkpoint's model (`linear`, same head) differs.
    let linear = compile(d.path(), "linear", "linear", &[]);
    let adapter = TensorFile::read(&afile).unwrap();
    let mut head = BTreeMap::new();
    for k in ["head.weight", "head.bias"] {
        head.insert(k.to_string(), adapter.tensors[k].clone());
    }
    let p = d.path().join("head.safetensors");
    write(&p, &head);
    let lin = run(&linear, Some(&p), &d.path().join("linear.safetensors"));
    assert!(rel_err(&lin, &want) > 0.02, "the prompts move the logits");
}

/// AdaptFormer's trainable scalars: `depth × (2·D·h + h + D)` with `h = D / reduction`,
/// plus the head.
fn adapter_count(depth: usize, d: usize, reduction: usize) -> usize {
    let h = d / reduction;
    depth * (2 * d * h + h + d)
}

/// The bottleneck beside every block's MLP, whatever the layout; down Kaiming-uniform,
/// up and the biases zero.
#[test]
fn adapter_counts_match_the_formula_in_every_layout() {
    let (d, depth, c) = (48, 2, 5);
    let head = c * (d + 1);
    assert_eq!(adapter_count(depth, d, 4) + head, 2_669);
    assert_eq!(adapter_count(depth, d, 8) + head, 1_505);
    for file in [
        "tiny_timm.safetensors",
        "tiny_hf.safetensors",
        "tiny_hfcls.safetensors",
        "tiny_mmcls.safetensors",
    ] {
        let opts = ImportOptions {
            heads: Some(3),
            ..Default::default()
        };
        let model = eptc_frontend::import(&fixture(file), &opts).unwrap();
        for reduction in [1, 4, 8] {
            let mut g = model.graph.clone();
            let method = eptc_peft::adaptformer::method_name(reduction);
            let values =
                eptc_peft::apply_with_weights(&mut g, &config(&method, c), None, 0, &model.weights)
                    .unwrap_or_else(|e| panic!("{file} {method}: {e}"));
            assert_eq!(
                g.trainable_count(),
                adapter_count(depth, d, reduction) + head,
                "{file} {method}"
            );
            let mut want: BTreeSet<String> = (0..depth)
                .flat_map(|i| eptc_peft::adaptformer::names(i).into_iter())
                .collect();
            want.extend(["head.weight".to_string(), "head.bias".to_string()]);
            assert_eq!(
                values.keys().cloned().collect::<BTreeSet<_>>(),
                want,
                "{file}"
            );
            let h = d / reduction;
            let bound = 1.0 / (d as f32).sqrt();
            for (k, v) in &values {
                if k.ends_with(".down.weight") {
                    assert_eq!(v.shape, vec![h, d], "{k}");
                    assert!(v.data().iter().all(|x| x.abs() <= bound), "{k}");
                    assert!(v.data().iter().any(|&x| x != 0.0), "{k}");
                } else if k.starts_with("adapter.") {
                    assert!(v.data().iter().all(|&x| x == 0.0), "{k} starts at zero");
                }
            }
            for (id, name, trainable) in g.params() {
                let tag = g.node(id).tag.as_deref();
                match (trainable, name.starts_with("adapter.")) {
                    (true, true) => assert_eq!(tag, Some("adapter"), "{name}"),
                    (true, false) => assert!(name.starts_with("head."), "{name}"),
                    (false, _) => assert_eq!(tag, None, "{name}"),
                }
            }
        }
    }
}

/// ViT-B/16: reduction 8 (h = 96): 12 × (2·768·96 + 96 + 768) = 1,779,840 + the head.
#[test]
fn vit_b16_adapter_count() {
    let model = eptc_frontend::import_file(&vit_b16(), &ImportOptions::default()).unwrap();
    let (d, depth, c) = (768, 12, 19);
    let head = c * (d + 1);
    for (reduction, n) in [(8, 1_779_840), (64, 230_544), (1, 14_174_208)] {
        assert_eq!(
            adapter_count(depth, d, reduction),
            n,
            "reduction {reduction}"
        );
        let mut g = model.graph.clone();
        let method = eptc_peft::adaptformer::method_name(reduction);
        eptc_peft::apply_with_weights(&mut g, &config(&method, c), None, 0, &model.weights)
            .unwrap();
        assert_eq!(g.trainable_count(), n + head, "reduction {reduction}");
    }
}

/// `--reduction` reaches the manifest; one that does not divide the width is refused.
#[test]
fn adapter_flags() {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("tiny_timm.safetensors");
    flags_reach_the_manifest(
        "adapter",
        &[
            (&[][..], "adapter-8", "1,505 = 1,260 (PEFT)"),
            (
                &["--reduction", "4"][..],
                "adapter-4",
                "2,669 = 2,424 (PEFT)",
            ),
        ],
    );
    let out = d.path().join("bad");
    for r in ["0", "32"] {
        let e = eptc_err(&[
            "compile",
            s(&m),
            "--heads",
            "3",
            "-o",
            s(&out),
            "--peft",
            "adapter",
            "--reduction",
            r,
        ]);
        assert!(
            e.contains(&format!("--reduction {r}: must divide the width 48")),
            "{e}"
        );
    }
}

/// AdaptFormer (reduction 4, s = 0.1) on tiny timm with a perturbed adapter (up and the
/// biases non-zero, so down gets gradients): `eptc grad` against PyTorch in float64
/// (written by hand on timm's blocks), and `eptc run` gives PyTorch's logits (the
/// adapter reaches the optimized graph; no fold consumes it). With up = 0 (the initial
/// adapter) the model is the checkpoint's.
#[test]
fn adapter_matches_pytorch() {
    let d = tempfile::tempdir().unwrap();
    let art = compile(d.path(), "adapter", "adapter", &["--reduction", "4"]);
    let (afile, want) = grads_match_pytorch(
        &art,
        "adapter",
        "adapter_adapter.safetensors",
        "grad_adapter_multiclass.safetensors",
        2 * 4 + 2 + 1,
    );

    let (_, want) = tensor(&want, "logits");
    let init = run(&art, None, &d.path().join("init.safetensors"));
    let got = run(&art, Some(&afile), &d.path().join("out.safetensors"));
    assert!(rel_err(&init, &want) > 0.05, "the adapter moves the logits");
    let err = rel_err(&got, &want);
    println!("adapter: logits relative error against PyTorch (float64): {err:e}");
    assert!(err < 1e-5, "adapter: logits relative error {err:e}");
    let linear = compile(d.path(), "linear", "linear", &[]);
    let lin = run(&linear, None, &d.path().join("linear.safetensors"));
    let err = rel_err(&init, &lin);
    assert!(err < 1e-6, "adapter at init vs linear: {err:e}");
}

/// MLP-3's trainable scalars: `D·h + h + h·h + h + h·C + C` (the last layer is the head).
fn mlp_count(d: usize, h: usize, c: usize) -> usize {
    d * h + h + h * h + h + h * c + c
}

/// Three layers on the class token's feature, whatever the layout; every layer as
/// nn.Linear initialises it (uniform on ±1/√fan_in, from the seed); the backbone and the
/// checkpoint's head stay out.
#[test]
fn mlp_counts_match_the_formula_in_every_layout() {
    let (d, c) = (48, 5);
    assert_eq!(mlp_count(d, 48, c), 4_949);
    assert_eq!(mlp_count(d, 16, c), 1_141);
    for file in [
        "tiny_timm.safetensors",
        "tiny_hf.safetensors",
        "tiny_hfcls.safetensors",
        "tiny_mmcls.safetensors",
    ] {
        let opts = ImportOptions {
            heads: Some(3),
            ..Default::default()
        };
        let model = eptc_frontend::import(&fixture(file), &opts).unwrap();
        for h in [48, 16, 1] {
            let mut g = model.graph.clone();
            let method = eptc_peft::mlp::method_name(h);
            let values =
                eptc_peft::apply_with_weights(&mut g, &config(&method, c), None, 0, &model.weights)
                    .unwrap_or_else(|e| panic!("{file} {method}: {e}"));
            assert_eq!(g.trainable_count(), mlp_count(d, h, c), "{file} {method}");
            let shapes: BTreeMap<&str, Vec<usize>> = values
                .iter()
                .map(|(k, v)| (k.as_str(), v.shape.clone()))
                .collect();
            let want: BTreeMap<&str, Vec<usize>> = [
                ("mlp.0.weight", vec![h, d]),
                ("mlp.0.bias", vec![h]),
                ("mlp.1.weight", vec![h, h]),
                ("mlp.1.bias", vec![h]),
                ("head.weight", vec![c, h]),
                ("head.bias", vec![c]),
            ]
            .into_iter()
            .collect();
            assert_eq!(shapes, want, "{file} {method}");
            for (k, v) in &values {
                let fan_in = if k.starts_with("mlp.0.") { d } else { h };
                let bound = 1.0 / (fan_in as f32).sqrt();
                assert!(v.data().iter().all(|x| x.abs() <= bound), "{k}");
                assert!(v.data().iter().any(|&x| x != 0.0), "{k}");
            }
            for (id, name, trainable) in g.params() {
                let tag = g.node(id).tag.as_deref();
                match (trainable, name.starts_with("mlp.")) {
                    (true, true) => assert_eq!(tag, Some("mlp"), "{name}"),
                    (true, false) => assert_eq!(tag, Some("head"), "{name}"),
                    (false, _) => assert_eq!(tag, None, "{name}"),
                }
            }
        }
        // The checkpoint's head (timm, mmcls and HF's classifier carry one) is not reused,
        // even with its class count.
        let mut g = model.graph.clone();
        let ckpt = (
            HostTensor::new(vec![c, d], vec![0.5; c * d]),
            HostTensor::new(vec![c], vec![0.5; c]),
        );
        let values = eptc_peft::apply_with_weights(
            &mut g,
            &config(&eptc_peft::mlp::method_name(d), c),
            Some(ckpt),
            0,
            &model.weights,
        )
        .unwrap();
        assert!(values["head.weight"].data().iter().all(|&x| x != 0.5));
    }
}

/// ViT-B/16, hidden = D = 768, 19 classes: 768² + 768 + 768² + 768 + 768·19 + 19.
#[test]
fn vit_b16_mlp_count() {
    let model = eptc_frontend::import_file(&vit_b16(), &ImportOptions::default()).unwrap();
    let (d, c) = (768, 19);
    for (h, n) in [(768, 1_195_795), (256, 267_539)] {
        assert_eq!(mlp_count(d, h, c), n, "hidden {h}");
        let mut g = model.graph.clone();
        let method = eptc_peft::mlp::method_name(h);
        eptc_peft::apply_with_weights(&mut g, &config(&method, c), None, 0, &model.weights)
            .unwrap();
        assert_eq!(g.trainable_count(), n, "hidden {h}");
    }
}

/// `--hidden` reaches the manifest (default: the width D); 0 is refused.
#[test]
fn mlp_flags() {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("tiny_timm.safetensors");
    flags_reach_the_manifest(
        "mlp-3",
        &[
            (&[][..], "mlp-3-48", "4,949 = 4,704 (PEFT)"),
            (
                &["--hidden", "16"][..],
                "mlp-3-16",
                "1,141 = 1,056 (PEFT) + 85 (head",
            ),
        ],
    );
    let out = d.path().join("bad");
    let e = eptc_err(&[
        "compile",
        s(&m),
        "--heads",
        "3",
        "-o",
        s(&out),
        "--peft",
        "mlp-3",
        "--hidden",
        "0",
    ]);
    assert!(e.contains("--hidden must be at least 1"), "{e}");
}

/// MLP-3 (hidden 16) on tiny timm with nn.Linear-like weights scaled by 3 (so the ReLUs
/// and logits are far from zero): `eptc grad` against PyTorch in float64, and `eptc run`
/// gives PyTorch's logits.
#[test]
fn mlp_matches_pytorch() {
    let d = tempfile::tempdir().unwrap();
    let art = compile(
        d.path(),
        "mlp",
        "mlp-3",
        &["--hidden", "16", "--num-classes", "5"],
    );
    let (afile, want) = grads_match_pytorch(
        &art,
        "mlp",
        "adapter_mlp.safetensors",
        "grad_mlp_multiclass.safetensors",
        6 + 1,
    );

    let (_, want) = tensor(&want, "logits");
    let init = run(&art, None, &d.path().join("init.safetensors"));
    let got = run(&art, Some(&afile), &d.path().join("out.safetensors"));
    assert!(rel_err(&init, &want) > 0.05, "the adapter moves the logits");
    let err = rel_err(&got, &want);
    println!("mlp-3: logits relative error against PyTorch (float64): {err:e}");
    assert!(err < 1e-5, "mlp-3: logits relative error {err:e}");
}

/// VP's frame on the tiny model's 32 px images, in every layout: `2·3·p·32 + 2·3·(32 −
/// 2p)·p` plus the head; N(0, 1) values; the frame's params and nodes tagged `vp`.
#[test]
fn vp_counts_match_the_formula_in_every_layout() {
    let (d, c, px) = (48, 5, 32);
    let head = c * (d + 1);
    assert_eq!(eptc_peft::vp::count(4, px, px) + head, 1_589);
    assert_eq!(eptc_peft::vp::count(1, px, px) + head, 617);
    for file in [
        "tiny_timm.safetensors",
        "tiny_hf.safetensors",
        "tiny_hfcls.safetensors",
        "tiny_mmcls.safetensors",
    ] {
        let opts = ImportOptions {
            heads: Some(3),
            ..Default::default()
        };
        let model = eptc_frontend::import(&fixture(file), &opts).unwrap();
        for p in [1, 4, 15] {
            let mut g = model.graph.clone();
            let method = eptc_peft::vp::method_name(p);
            let values =
                eptc_peft::apply_with_weights(&mut g, &config(&method, c), None, 0, &model.weights)
                    .unwrap_or_else(|e| panic!("{file} {method}: {e}"));
            assert_eq!(
                g.trainable_count(),
                eptc_peft::vp::count(p, px, px) + head,
                "{file} {method}"
            );
            let shapes: BTreeMap<&str, Vec<usize>> = values
                .iter()
                .filter(|(k, _)| k.starts_with("vp."))
                .map(|(k, v)| (k.as_str(), v.shape.clone()))
                .collect();
            let ch = px - 2 * p;
            let want: BTreeMap<&str, Vec<usize>> = [
                ("vp.pad_up", vec![1, 3, p, px]),
                ("vp.pad_down", vec![1, 3, p, px]),
                ("vp.pad_left", vec![1, 3, ch, p]),
                ("vp.pad_right", vec![1, 3, ch, p]),
            ]
            .into_iter()
            .collect();
            assert_eq!(shapes, want, "{file} {method}");
            for (k, v) in values.iter().filter(|(k, _)| k.starts_with("vp.")) {
                let n = v.data().len() as f64;
                let mean = v.data().iter().map(|&x| x as f64).sum::<f64>() / n;
                let var = v
                    .data()
                    .iter()
                    .map(|&x| (x as f64 - mean).powi(2))
                    .sum::<f64>()
                    / n;
                if n >= 96.0 {
                    assert!(
                        mean.abs() < 0.5 && (0.5..2.0).contains(&var),
                        "{k}: N(0, 1)"
                    );
                }
            }
            for (id, name, trainable) in g.params() {
                let tag = g.node(id).tag.as_deref();
                match (trainable, name.starts_with("vp.")) {
                    (true, true) => assert_eq!(tag, Some("vp"), "{name}"),
                    (true, false) => assert!(name.starts_with("head."), "{name}"),
                    (false, _) => assert_eq!(tag, None, "{name}"),
                }
            }
        }
        for p in [0, 16, 30] {
            let mut g = model.graph.clone();
            let method = eptc_peft::vp::method_name(p);
            assert!(
                eptc_peft::apply_with_weights(&mut g, &config(&method, c), None, 0, &model.weights)
                    .is_err(),
                "{file} {method}"
            );
        }
    }
}

/// ViT-B/16 at 224 px, VP's default p = 30: 2·3·30·224 + 2·3·164·30 = 69,840 + the head.
#[test]
fn vit_b16_vp_count() {
    let model = eptc_frontend::import_file(&vit_b16(), &ImportOptions::default()).unwrap();
    let (d, c) = (768, 19);
    let head = c * (d + 1);
    for (p, n) in [(30, 69_840), (1, 2_676), (111, 150_516)] {
        assert_eq!(eptc_peft::vp::count(p, 224, 224), n, "pad {p}");
        let mut g = model.graph.clone();
        let method = eptc_peft::vp::method_name(p);
        eptc_peft::apply_with_weights(&mut g, &config(&method, c), None, 0, &model.weights)
            .unwrap();
        assert_eq!(g.trainable_count(), n + head, "pad {p}");
    }
}

/// `--pad-size` reaches the manifest; VP's default 30 does not fit 32 px images, nor does
/// any frame that would cover the centre, and the error says so.
#[test]
fn vp_flags() {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("tiny_timm.safetensors");
    let art = d.path().join("vp");
    let out = eptc_ok(&[
        "compile",
        s(&m),
        "--heads",
        "3",
        "-o",
        s(&art),
        "--peft",
        "vp",
        "--pad-size",
        "4",
    ]);
    assert!(
        out.contains("trainable parameters: 1,589 = 1,344 (PEFT)"),
        "{out}"
    );
    let manifest = std::fs::read_to_string(art.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"method\": \"vp-4\""), "{manifest}");
    let out = d.path().join("bad");
    for (extra, msg) in [
        (
            &[][..],
            "--pad-size 30: the prompt frame must leave the image's centre untouched, pad < 16 for 32×32 px images",
        ),
        (&["--pad-size", "16"][..], "--pad-size 16: the prompt frame"),
        (&["--pad-size", "0"][..], "--pad-size must be at least 1"),
    ] {
        let mut a = vec![
            "compile",
            s(&m),
            "--heads",
            "3",
            "-o",
            s(&out),
            "--peft",
            "vp",
        ];
        a.extend(extra);
        let e = eptc_err(&a);
        assert!(e.contains(msg), "{e}");
    }
}

/// VP (p = 4 on 32 px) on tiny timm with N(0, 1) frames and a perturbed head: `eptc
/// grad` against PyTorch in float64 (the VP code's PadPrompter on timm's model), and
/// `eptc run` gives PyTorch's logits.
#[test]
fn vp_matches_pytorch() {
    let d = tempfile::tempdir().unwrap();
    let art = compile(d.path(), "vp", "vp", &["--pad-size", "4"]);
    let (afile, want) = grads_match_pytorch(
        &art,
        "vp",
        "adapter_vp.safetensors",
        "grad_vp_multiclass.safetensors",
        4 + 2 + 1,
    );

    let (_, want) = tensor(&want, "logits");
    let got = run(&art, Some(&afile), &d.path().join("out.safetensors"));
    let err = rel_err(&got, &want);
    println!("vp: logits relative error against PyTorch (float64): {err:e}");
    assert!(err < 1e-5, "vp: logits relative error {err:e}");
    // Only the frame changed: the same head without it is PyTorch's logits minus the frame.
    let mut no_frame = TensorFile::read(&afile).unwrap().tensors;
    for (k, v) in no_frame.iter_mut() {
        if k.starts_with("vp.") {
            *v = HostTensor::zeros(v.shape.clone());
        }
    }
    let p = d.path().join("no-frame.safetensors");
    write(&p, &no_frame);
    let base = run(&art, Some(&p), &d.path().join("base.safetensors"));
    assert!(rel_err(&got, &base) > 0.05, "the frame moves the logits");
}
