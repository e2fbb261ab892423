//! `eptc sample`: K-shot splits of a generated data set, deterministic for a seed, and
//! `eptc train` running on them; clear errors for impossible requests.

mod common;

use common::*;

#[test]
fn sample_then_train() {
    let d = tempfile::tempdir().unwrap();
    let data = gen_data(d.path(), 6, 2);
    let ann = data.join("train.txt");
    let tr = d.path().join("train_2shot.txt");
    let va = d.path().join("val_1.txt");
    let run = |seed: &str, out: &std::path::Path| {
        eptc_ok(&[
            "sample",
            "--ann",
            s(&ann),
            "--shots",
            "2",
            "--seed",
            seed,
            "-o",
            s(out),
            "--val-per-class",
            "1",
            "--val-out",
            s(&va),
        ])
    };
    let o = run("4", &tr);
    assert!(
        o.contains("6 training images") && o.contains("3 validation"),
        "{o}"
    );
    let train_text = std::fs::read_to_string(&tr).unwrap();
    let val_text = std::fs::read_to_string(&va).unwrap();
    let input = std::fs::read_to_string(&ann).unwrap();
    assert_eq!(train_text.lines().count(), 6);
    assert_eq!(val_text.lines().count(), 3);
    for c in 0..3 {
        let n = |t: &str| t.lines().filter(|l| l.ends_with(&format!(" {c}"))).count();
        assert_eq!((n(&train_text), n(&val_text)), (2, 1), "class {c}");
    }
    assert!(train_text.lines().all(|l| !val_text.contains(l)));
    assert!(train_text.lines().all(|l| input.lines().any(|i| i == l)));
    // Same seed, same split.
    let again = d.path().join("again.txt");
    run("4", &again);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), train_text);

    // `train` runs on the sampled split.
    let art = d.path().join("art");
    let m = fixture("tiny_timm.safetensors");
    let mut a = vec![
        "compile",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "6",
        "--num-classes",
        "3",
        "-o",
        s(&art),
    ];
    let target = target_flags();
    a.extend(target.iter().map(String::as_str));
    eptc_ok(&a);
    let runs = d.path().join("run");
    eptc_ok(&[
        "train",
        s(&art),
        "--data",
        s(&data),
        "--train",
        s(&tr),
        "--val",
        s(&va),
        "-o",
        s(&runs),
        "--epochs",
        "1",
    ]);
    assert!(runs.join("best.safetensors").exists());
}

#[test]
fn sample_errors() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    eptc_ok(&[
        "gen-data",
        "-o",
        s(&data),
        "--image-size",
        "16",
        "--shots",
        "3",
    ]);
    let ann = data.join("train.txt");
    let out = d.path().join("out.txt");
    let e = eptc_err(&["sample", "--ann", s(&ann), "--shots", "4", "-o", s(&out)]);
    assert!(
        e.contains("train.txt") && e.contains("class 0 has 3") && e.contains("lines"),
        "{e}"
    );
    let e = eptc_err(&["sample", "--ann", s(&ann), "--shots", "0", "-o", s(&out)]);
    assert!(e.contains("--shots 0"), "{e}");
    let missing = d.path().join("missing.txt");
    let e = eptc_err(&[
        "sample",
        "--ann",
        s(&missing),
        "--shots",
        "1",
        "-o",
        s(&out),
    ]);
    assert!(e.contains("missing.txt"), "{e}");
    assert!(!out.exists());
}
