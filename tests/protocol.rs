//! `eptc protocol` on generated data: the table equals the per-cell results' mean ± std,
//! a second run does nothing, a removed result or an interrupted training is redone
//! (and gives the same figure), a failing cell is reported and retried, and bad plans
//! stop with exit code 2 and a message naming the file and the key.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::*;

/// Two generated data sets in `root`: `mc` (3 classes) with its own K-shot split files
/// `mc/gen_{shot}-shot_{train,val}_exp{exp}.txt` for K = 1, 2 and samplings 1, 2, and
/// `ml` (3 labels) whose splits the protocol samples from its `train.txt`.
fn data(root: &Path) {
    let mc = root.join("mc");
    let ml = root.join("ml");
    let gen = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "gen-data",
            "-o",
            s(out),
            "--image-size",
            "32",
            "--shots",
            "4",
            "--val-per-class",
            "2",
            "--test-per-class",
            "4",
        ];
        a.extend_from_slice(extra);
        eptc_ok(&a);
    };
    gen(&mc, &[]);
    gen(&ml, &["--task", "multilabel", "--seed", "1"]);
    for shot in ["1", "2"] {
        for exp in ["1", "2"] {
            let f = |kind: &str| mc.join(format!("gen_{shot}-shot_{kind}_exp{exp}.txt"));
            eptc_ok(&[
                "sample",
                "--ann",
                s(&mc.join("train.txt")),
                "--shots",
                shot,
                "--seed",
                exp,
                "-o",
                s(&f("train")),
                "--val-per-class",
                "1",
                "--val-out",
                s(&f("val")),
            ]);
        }
    }
}

fn plan_text(epochs: usize) -> String {
    format!(
        r#"model = "{}"
shots = [1, 2]
samplings = 2

[compile]
heads = 3

[train]
epochs = {epochs}
lr = 0.01

[[datasets]]
name = "gen"
images = "mc"
task = "multiclass"
classes = 3
test = "mc/test.txt"
train = "mc/gen_{{shot}}-shot_train_exp{{exp}}.txt"
val = "mc/gen_{{shot}}-shot_val_exp{{exp}}.txt"

[[datasets]]
name = "genml"
images = "ml"
task = "multilabel"
classes = 3
test = "ml/test.txt"
pool = "ml/train.txt"
val_per_class = 1

[[methods]]
peft = "ept"
prompt_len = [2, 4]

[[methods]]
peft = "linear"
"#,
        fixture("tiny_timm.safetensors").display()
    )
}

fn protocol(plan: &Path, out: &Path) -> String {
    eptc_ok(&["protocol", s(plan), "-o", s(out)])
}

/// The lines of the per-cell progress (`[ i/n] ...`).
fn cell_lines(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with('[')).collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `result.json` under `out/runs`, by its folder.
fn results(out: &Path) -> BTreeMap<PathBuf, serde_json::Value> {
    let mut found = BTreeMap::new();
    let mut stack = vec![out.join("runs")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() == "result.json" {
                found.insert(p.parent().unwrap().to_path_buf(), json(&p));
            }
        }
    }
    found
}

fn mtimes(out: &Path, name: &str) -> BTreeMap<PathBuf, SystemTime> {
    let mut found = BTreeMap::new();
    let mut stack = vec![out.join("runs")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() == name {
                let t = fs::metadata(&p).unwrap().modified().unwrap();
                found.insert(p, t);
            }
        }
    }
    found
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    (
        m,
        (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt(),
    )
}

#[test]
fn protocol_table_rerun_and_resume() {
    let d = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(d.path()).unwrap();
    data(&root);
    let plan = root.join("plan.toml");
    fs::write(&plan, plan_text(2)).unwrap();
    let out = root.join("out");

    // 1. The whole protocol: 2 data sets x 2 methods x 2 K x 2 samplings.
    let o = protocol(&plan, &out);
    let lines = cell_lines(&o);
    assert_eq!(lines.len(), 16, "{o}");
    assert!(
        lines[0].starts_with("[ 1/16] gen ept 1-shot exp1: prompt_len=2 val "),
        "{o}"
    );
    assert!(lines.iter().all(|l| l.contains(" test ")), "{o}");
    let res = results(&out);
    assert_eq!(res.len(), 16);
    // The choice: the best validation figure, the first on a tie.
    for r in res.values() {
        let v = r["variants"].as_array().unwrap();
        if r["method"] == "ept" {
            assert_eq!(v.len(), 2);
            let (a, b) = (v[0]["val"].as_f64().unwrap(), v[1]["val"].as_f64().unwrap());
            let want = if b > a {
                "prompt_len=4"
            } else {
                "prompt_len=2"
            };
            assert_eq!(r["chosen"], want, "{r}");
            assert_eq!(r["val"].as_f64().unwrap(), a.max(b));
        } else {
            assert_eq!(v.len(), 1);
            assert!(r["chosen"].is_null());
        }
        let metric = if r["dataset"] == "gen" {
            "accuracy"
        } else {
            "mAP"
        };
        assert_eq!(r["metric"], metric);
        let key = if metric == "mAP" { "map" } else { "accuracy" };
        assert_eq!(r["test"], r["test_metrics"][key]);
    }
    // The pool's splits were sampled: K images per label at least, and the validation
    // images apart from them.
    let split = fs::read_to_string(out.join("splits/genml/2-shot_train_exp1.txt")).unwrap();
    let val = fs::read_to_string(out.join("splits/genml/2-shot_val_exp1.txt")).unwrap();
    assert!(split.lines().count() >= 2 && !val.is_empty());
    assert!(split.lines().all(|l| !val.contains(l)));

    // The table: its figures are the results' mean and std over the samplings.
    let md = fs::read_to_string(out.join("table.md")).unwrap();
    let csv = fs::read_to_string(out.join("table.csv")).unwrap();
    assert!(
        md.contains("| method | gen 1-shot | gen 2-shot | genml 1-shot | genml 2-shot | avg |"),
        "{md}"
    );
    assert!(md.contains("accuracy (gen), mAP (genml)"), "{md}");
    let csv_lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        csv_lines[0],
        "method,dataset,metric,shot,samplings,done,failed,mean,std,values,chosen"
    );
    assert_eq!(csv_lines.len(), 1 + 2 * (4 + 1), "{csv}");
    for method in ["ept", "linear"] {
        let mut cols = Vec::new();
        for ds in ["gen", "genml"] {
            for shot in [1, 2] {
                let vals: Vec<f64> = (1..=2)
                    .map(|exp| {
                        let dir = out.join(format!("runs/{ds}/{method}/{shot}-shot/exp{exp}"));
                        res[&dir]["test"].as_f64().unwrap()
                    })
                    .collect();
                let (m, sd) = mean_std(&vals);
                cols.push((m, sd));
                let row = csv_lines
                    .iter()
                    .find(|l| {
                        l.starts_with(&format!("{method},{ds},"))
                            && l.split(',').nth(3) == Some(&shot.to_string())
                    })
                    .unwrap_or_else(|| panic!("no CSV row {method} {ds} {shot}: {csv}"));
                let f: Vec<&str> = row.split(',').collect();
                assert_eq!(f[4..7], ["2", "2", "0"], "{row}");
                let num = |s: &str| s.parse::<f64>().unwrap();
                assert!(
                    (num(f[7]) - m).abs() < 1e-4 && (num(f[8]) - sd).abs() < 1e-4,
                    "{row}: {m} {sd}"
                );
            }
        }
        let cells: Vec<String> = cols
            .iter()
            .map(|(m, sd)| format!("{m:.2} ± {sd:.2}"))
            .collect();
        let avg = cols.iter().map(|c| c.0).sum::<f64>() / cols.len() as f64;
        let row = format!("| {method} | {} | {avg:.2} |", cells.join(" | "));
        assert!(md.contains(&row), "expected {row} in\n{md}");
    }
    assert!(md.contains("Chosen on the validation set"), "{md}");
    let jsonl = fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 16);
    assert!(jsonl.lines().all(|l| l.contains("\"status\":\"done\"")));

    // 2. A second run finds every cell finished and touches none.
    let before = mtimes(&out, "result.json");
    let states = mtimes(&out, "state.safetensors");
    assert_eq!(states.len(), 24);
    let o = protocol(&plan, &out);
    let lines = cell_lines(&o);
    assert_eq!(lines.len(), 16);
    assert!(lines.iter().all(|l| l.contains("finished before")), "{o}");
    assert!(o.contains("16 finished before"), "{o}");
    assert_eq!(mtimes(&out, "result.json"), before);
    assert_eq!(mtimes(&out, "state.safetensors"), states);

    // 3. Without its result.json a cell is redone, alone, to the same figure.
    let cell = out.join("runs/genml/ept/2-shot/exp2");
    let old = res[&cell]["test"].clone();
    fs::remove_file(cell.join("result.json")).unwrap();
    let o = protocol(&plan, &out);
    let redone: Vec<&str> = cell_lines(&o)
        .into_iter()
        .filter(|l| !l.contains("finished before"))
        .collect();
    assert_eq!(redone.len(), 1, "{o}");
    assert!(redone[0].contains("genml ept 2-shot exp2"), "{o}");
    assert_eq!(json(&cell.join("result.json"))["test"], old);
    let after = mtimes(&out, "result.json");
    assert_eq!(
        before.iter().filter(|(p, t)| after[*p] != **t).count(),
        1,
        "only the removed result was written again"
    );

    // 4. An interrupted training (one epoch of two, as `eptc train --stop-after 1`
    //    leaves it) is continued, and gives what the uninterrupted run gave.
    let cell = out.join("runs/gen/linear/1-shot/exp1");
    let old = res[&cell]["test"].clone();
    fs::remove_file(cell.join("result.json")).unwrap();
    fs::remove_dir_all(cell.join("default")).unwrap();
    eptc_ok(&[
        "train",
        s(&out.join("artifacts/gen/linear/default")),
        "--data",
        s(&root.join("mc")),
        "--train",
        s(&root.join("mc/gen_1-shot_train_exp1.txt")),
        "--val",
        s(&root.join("mc/gen_1-shot_val_exp1.txt")),
        "-o",
        s(&cell.join("default")),
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--seed",
        "1",
        "--stop-after",
        "1",
    ]);
    let o = protocol(&plan, &out);
    assert_eq!(
        cell_lines(&o)
            .iter()
            .filter(|l| !l.contains("finished before"))
            .count(),
        1,
        "{o}"
    );
    let log = fs::read_to_string(cell.join("default/train.log")).unwrap();
    assert_eq!(log.matches("epoch ").count(), 2, "{log}");
    assert_eq!(json(&cell.join("result.json"))["test"], old);
}

#[test]
fn protocol_failed_cells() {
    let d = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(d.path()).unwrap();
    data(&root);
    // One data set, one method, K = 1, two samplings; the test file names an image that
    // is not there, so both cells fail after training.
    let text = plan_text(1)
        .replace("shots = [1, 2]", "shots = [1]")
        .replace("test = \"mc/test.txt\"", "test = \"mc/test_broken.txt\"");
    let text = text[..text.find("[[datasets]]\nname = \"genml\"").unwrap()].to_string()
        + "[[methods]]\npeft = \"linear\"\n";
    let plan = root.join("plan.toml");
    fs::write(&plan, text).unwrap();
    let test = fs::read_to_string(root.join("mc/test.txt")).unwrap();
    fs::write(
        root.join("mc/test_broken.txt"),
        format!("{test}images/missing.png 0\n"),
    )
    .unwrap();
    let out = root.join("out");
    let e = eptc_err(&["protocol", s(&plan), "-o", s(&out)]);
    assert!(
        e.contains("2 of 2 cells failed") && e.contains("missing.png"),
        "{e}"
    );
    let md = fs::read_to_string(out.join("table.md")).unwrap();
    assert!(md.contains("| linear | failed (2 of 2) | – |"), "{md}");
    let jsonl = fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(jsonl.matches("\"status\":\"failed\"").count(), 2, "{jsonl}");
    // Mended, the cells are retried; their training runs had finished and are kept.
    let states = mtimes(&out, "state.safetensors");
    assert_eq!(states.len(), 2);
    fs::write(root.join("mc/test_broken.txt"), test).unwrap();
    let o = protocol(&plan, &out);
    assert_eq!(cell_lines(&o).len(), 2);
    assert!(
        cell_lines(&o).iter().all(|l| l.contains("test accuracy")),
        "{o}"
    );
    assert_eq!(mtimes(&out, "state.safetensors"), states);
    let md = fs::read_to_string(out.join("table.md")).unwrap();
    assert!(!md.contains("failed"), "{md}");
}

#[test]
fn protocol_bad_plans() {
    let d = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(d.path()).unwrap();
    data(&root);
    let plan = root.join("bad-plan.toml");
    let out = root.join("out");
    let good = plan_text(1);
    let check = |text: String, want: &[&str]| {
        fs::write(&plan, &text).unwrap();
        let e = eptc_err(&["protocol", s(&plan), "-o", s(&out)]);
        assert!(e.contains("bad-plan.toml"), "{e}");
        for w in want {
            assert!(e.contains(w), "expected {w:?} in: {e}");
        }
    };
    check(
        good.replace("prompt_len = [2, 4]", "promt_len = [2, 4]"),
        &["[[methods]] ept", "unknown key `promt_len`"],
    );
    check(
        good.replace("prompt_len = [2, 4]", "prompt_len = [2, \"four\"]"),
        &["[[methods]] ept", "`prompt_len`", "four"],
    );
    check(
        good.replace("epochs = 1", "epochs = 1\noptimizer = \"sgdd\""),
        &["`optimizer`", "sgdd"],
    );
    check(
        good.replace(
            "prompt_len = [2, 4]",
            "prompt_len = [2, 4]\nept_mode = \"sideways\"",
        ),
        &["[[methods]] ept", "sideways"],
    );
    check(
        good.replace("gen_{shot}-shot_train", "gen_{shot}-shots_train"),
        &["[[datasets]] gen", "`train`", "gen_1-shots_train_exp1.txt"],
    );
    check(
        good.replace("val_per_class = 1", "val_per_class = 9"),
        &["[[datasets]] genml", "`pool`", "train.txt", "class 0"],
    );
    check(
        good.replace("tiny_timm.safetensors", "nothing.safetensors"),
        &["`model`", "nothing.safetensors"],
    );
    check(
        good.replace("classes = 3\ntest", "classes = \"3\"\ntest"),
        &["`classes`"],
    );
    check(good.replace("[[methods]]", "[[method]]"), &["method"]);
    check(good.replace("samplings = 2", "samplings = "), &["line 3"]);
    // Nothing was run or written.
    assert!(!out.join("runs").exists());
    assert!(!out.join("table.md").exists());
}

/// Every row of the paper's Table 1 (the methods of examples/medfmc-plan.toml, sized for
/// the tiny model) trains through the protocol and gets its row.
#[test]
fn protocol_every_method() {
    let d = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(d.path()).unwrap();
    data(&root);
    let base = plan_text(1)
        .replace("shots = [1, 2]", "shots = [1]")
        .replace("samplings = 2", "samplings = 1");
    let mut text = base[..base.find("[[methods]]").unwrap()].to_string();
    let methods = [
        ("Full", "full", ""),
        ("Linear", "linear", ""),
        ("Partial-1", "partial-k", "k = 1"),
        ("MLP-3", "mlp-3", ""),
        ("LoRA", "lora", "rank = 2"),
        ("Bias", "bias", ""),
        ("Adapter", "adapter", "reduction = 8"),
        ("VP", "vp", "pad_size = 4"),
        ("VPT", "vpt", "prompt_len = 2"),
        ("EPT", "ept", "prompt_len = [2, 4]"),
    ];
    for (name, peft, opts) in methods {
        text += &format!("[[methods]]\nname = \"{name}\"\npeft = \"{peft}\"\n{opts}\n");
    }
    let plan = root.join("plan.toml");
    fs::write(&plan, text).unwrap();
    let out = root.join("out");
    let o = protocol(&plan, &out);
    assert_eq!(cell_lines(&o).len(), 2 * methods.len(), "{o}");
    let md = fs::read_to_string(out.join("table.md")).unwrap();
    let rows: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("| method |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(rows.len(), methods.len(), "{md}");
    for (row, (name, _, _)) in rows.iter().zip(methods) {
        assert!(row.starts_with(&format!("| {name} | ")), "{row}");
        assert_eq!(row.matches(" ± 0.00 |").count(), 2, "{row}");
        assert!(!row.ends_with("| – |"), "{row}");
    }
}
