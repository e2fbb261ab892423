//! Training end to end through the command line: `grad` against PyTorch's gradients,
//! `train` learning on the generated data set, resume giving the same adapter as an
//! uninterrupted run, `eval` and `infer` outputs, and clear errors for bad data.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Compile the tiny timm fixture (LayerNorm eps 1e-6) with EPT.
fn compile(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let art = dir.join(name);
    let m = fixture("tiny_timm.safetensors");
    let mut a = vec![
        "compile",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "6",
        "-o",
        s(&art),
    ];
    a.extend(extra);
    let target = target_flags();
    a.extend(target.iter().map(String::as_str));
    eptc_ok(&a);
    art
}

#[test]
fn grad_matches_pytorch() {
    let worst = suites::grad_matches_pytorch(&target_flags());
    println!("worst relative gradient error against PyTorch: {worst:e}");
}

#[test]
fn grad_checks_its_labels() {
    let d = tempfile::tempdir().unwrap();
    let art = compile(d.path(), "art", &["--num-classes", "5"]);
    let bad = d.path().join("bad.safetensors");
    let (_, px) = tensor(&fixture("input_b3.safetensors"), "pixel_values");
    let px = eptc_ir::HostTensor::new(vec![3, 3, 32, 32], px);
    let ids = eptc_ir::HostTensor::new(vec![3], vec![0.0, 7.0, 1.0]);
    eptc_frontend::write_tensors(&bad, &[("pixel_values", &px), ("labels", &ids)], None).unwrap();
    let out = d.path().join("g.safetensors");
    let e = eptc_err(&["grad", s(&art), "--input", s(&bad), "--output", s(&out)]);
    assert!(
        e.contains("bad.safetensors") && e.contains("[1] = 7"),
        "{e}"
    );
}

/// Generate a data set with `gen-data`.
fn gen(dir: &Path, extra: &[&str]) -> PathBuf {
    let data = dir.join("data");
    let mut a = vec!["gen-data", "-o", s(&data)];
    a.extend(extra);
    eptc_ok(&a);
    data
}

fn train(art: &Path, data: &Path, run: &Path, extra: &[&str]) -> String {
    let train = data.join("train.txt");
    let val = data.join("val.txt");
    let mut a = vec![
        "train",
        s(art),
        "--data",
        s(data),
        "--train",
        s(&train),
        "--val",
        s(&val),
        "-o",
        s(run),
    ];
    a.extend(extra);
    eptc_ok(&a)
}

#[test]
fn training_improves_the_validation_metric() {
    // The demo's path: a random ViT, the generated stripes/disc data set, EPT deep.
    let d = tempfile::tempdir().unwrap();
    let out = eptc_ok(&["demo", "-o", s(d.path())]);
    assert!(out.contains("test accuracy after training"), "{out}");
    assert!(out.contains("trainable parameters"), "{out}");
    for f in [
        "artifact/train.eptc",
        "run/best.safetensors",
        "run/last.safetensors",
        "run/train.log",
        "eval-untrained.json",
        "predictions.csv",
    ] {
        assert!(d.path().join(f).exists(), "{f} missing:\n{out}");
    }
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.path().join(f)).unwrap()).unwrap()
    };
    let before = read("eval-untrained.json")["metrics"]["accuracy"]
        .as_f64()
        .unwrap();
    let after = read("eval-trained.json")["metrics"]["accuracy"]
        .as_f64()
        .unwrap();
    // Three balanced classes: chance is 33%.
    assert!(
        after >= 60.0 && after >= before + 20.0,
        "test accuracy {before} -> {after}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.path().join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 20);
    let first = lines[0]["val"]["accuracy"].as_f64().unwrap();
    let best = lines
        .iter()
        .map(|l| l["val"]["accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(best >= first + 20.0, "val accuracy {first} -> best {best}");
    // The loss comes down.
    let loss = |l: &serde_json::Value| l["train_loss"].as_f64().unwrap();
    assert!(loss(&lines[19]) < 0.5 * loss(&lines[0]));
    // The submission CSV: one line per test image, file name then 3 scores summing to 1.
    let csv = std::fs::read_to_string(d.path().join("predictions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 48);
    for line in csv.lines() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 4, "{line}");
        assert!(f[0].starts_with("images/test_"), "{line}");
        let sum: f64 = f[1..].iter().map(|v| v.parse::<f64>().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-5, "{line}");
    }
}

#[test]
fn resume_gives_the_same_adapter_as_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let data = gen(
        d.path(),
        &["--image-size", "32", "--shots", "3", "--val-per-class", "2"],
    );
    let art = compile(
        d.path(),
        "art",
        &["--num-classes", "3", "--ept-mode", "multi-cat"],
    );
    // The number of loader threads does not change the result.
    let opts = ["--epochs", "3", "--lr", "0.01"];
    let full = d.path().join("full");
    let mut all = opts.to_vec();
    all.extend(["--workers", "3"]);
    train(&art, &data, &full, &all);
    let parts = d.path().join("parts");
    let mut first = opts.to_vec();
    first.extend(["--stop-after", "1", "--workers", "1"]);
    let o = train(&art, &data, &parts, &first);
    assert!(o.contains("continue with --resume"), "{o}");
    assert!(parts.join("last.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(parts.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
    // Without --resume an existing run is not overwritten.
    let e = eptc_err(&[
        "train",
        s(&art),
        "--data",
        s(&data),
        "--train",
        s(&data.join("train.txt")),
        "--val",
        s(&data.join("val.txt")),
        "-o",
        s(&parts),
    ]);
    assert!(e.contains("--resume"), "{e}");
    // Other settings are refused on resume.
    let mut other = opts.to_vec();
    other.extend(["--resume", "--seed", "5"]);
    let e = eptc_err(
        &[
            &["train", s(&art), "--data", s(&data)][..],
            &["--train", s(&data.join("train.txt")), "--val"],
            &[s(&data.join("val.txt")), "-o", s(&parts)],
            &other,
        ]
        .concat(),
    );
    assert!(e.contains("other settings"), "{e}");
    let mut resume = opts.to_vec();
    resume.push("--resume");
    let o = train(&art, &data, &parts, &resume);
    assert!(o.contains("resuming"), "{o}");
    for f in ["last.safetensors", "best.safetensors"] {
        let a = std::fs::read(full.join(f)).unwrap();
        let b = std::fs::read(parts.join(f)).unwrap();
        assert!(
            a == b,
            "{f} differs between the interrupted and the full run"
        );
    }
    // The metrics agree too, except for the timings.
    let strip = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("train_seconds");
                o.remove("train_img_per_s");
                v
            })
            .collect()
    };
    assert_eq!(strip(&full), strip(&parts));
    assert_eq!(strip(&full).len(), 3);
}

#[test]
fn eval_and_infer_outputs() {
    let d = tempfile::tempdir().unwrap();
    let data = gen(
        d.path(),
        &[
            "--task",
            "multilabel",
            "--image-size",
            "32",
            "--shots",
            "2",
            "--test-per-class",
            "2",
        ],
    );
    let art = compile(
        d.path(),
        "art",
        &["--num-classes", "3", "--task", "multilabel"],
    );
    let out = eptc_ok(&[
        "eval",
        s(&art),
        "--data",
        s(&data),
        "--ann",
        s(&data.join("test.txt")),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["images"], 6);
    assert_eq!(v["task"], "multilabel");
    let map = v["metrics"]["map"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&map));
    assert_eq!(v["metrics"]["auc_per_class"].as_array().unwrap().len(), 3);
    // Unlabeled test set: infer works, eval refuses.
    let unl = data.join("test_unlabeled.txt");
    let e = eptc_err(&["eval", s(&art), "--data", s(&data), "--ann", s(&unl)]);
    assert!(e.contains("test_unlabeled.txt"), "{e}");
    let csv = d.path().join("preds.csv");
    eptc_ok(&[
        "infer",
        s(&art),
        "--data",
        s(&data),
        "--ann",
        s(&unl),
        "-o",
        s(&csv),
    ]);
    let text = std::fs::read_to_string(&csv).unwrap();
    let names: Vec<String> = std::fs::read_to_string(&unl)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(text.lines().count(), names.len());
    for (line, name) in text.lines().zip(&names) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], *name);
        assert_eq!(f.len(), 4);
        // Sigmoid scores.
        assert!(f[1..]
            .iter()
            .all(|v| (0.0..=1.0).contains(&v.parse::<f64>().unwrap())));
    }
    // --images: the same scores for the same file.
    let first = data.join(&names[0]);
    let csv2 = d.path().join("one.csv");
    eptc_ok(&["infer", s(&art), "--images", s(&first), "-o", s(&csv2)]);
    let one = std::fs::read_to_string(&csv2).unwrap();
    let a: Vec<&str> = one.trim().split(',').skip(1).collect();
    let b: Vec<&str> = text.lines().next().unwrap().split(',').skip(1).collect();
    assert_eq!(a, b);
}

#[test]
fn bad_data_gives_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let data = gen(
        d.path(),
        &["--image-size", "32", "--shots", "2", "--val-per-class", "1"],
    );
    let art = compile(d.path(), "art", &["--num-classes", "3"]);
    let run = d.path().join("run");
    let t = |train_ann: &Path| {
        eptc_err(&[
            "train",
            s(&art),
            "--data",
            s(&data),
            "--train",
            s(train_ann),
            "--val",
            s(&data.join("val.txt")),
            "-o",
            s(&run),
            "--epochs",
            "1",
        ])
    };
    // A label outside the class range, with its line.
    let ann = d.path().join("bad_label.txt");
    std::fs::write(&ann, "images/train_0000.png 0\nimages/train_0001.png 9\n").unwrap();
    let e = t(&ann);
    assert!(e.contains("bad_label.txt") && e.contains(":2"), "{e}");
    // A missing image: the file and the annotation line.
    let ann = d.path().join("missing.txt");
    std::fs::write(&ann, "images/train_0000.png 0\nimages/nope.png 1\n").unwrap();
    let e = t(&ann);
    assert!(e.contains("nope.png") && e.contains("missing.txt:2"), "{e}");
    // A corrupt image.
    std::fs::write(
        data.join("images/broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let ann = d.path().join("corrupt.txt");
    std::fs::write(&ann, "images/broken.png 1\n").unwrap();
    let e = t(&ann);
    assert!(
        e.contains("broken.png") && e.contains("corrupt.txt:1"),
        "{e}"
    );
    // An empty data set.
    let ann = d.path().join("empty.txt");
    std::fs::write(&ann, "\n").unwrap();
    let e = t(&ann);
    assert!(e.contains("empty.txt"), "{e}");
    // Multi-hot labels for a multi-class artifact: wrong label form, named with the line.
    let ann = d.path().join("multihot.txt");
    std::fs::write(&ann, "images/train_0000.png 1,0,1\n").unwrap();
    let e = t(&ann);
    assert!(e.contains("multihot.txt") && e.contains(":1"), "{e}");
    // Nothing was left behind as a finished run.
    assert!(!run.join("state.safetensors").exists());
}
