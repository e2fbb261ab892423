//! `eptc analyze` and `eptc plot` on the generated data set: a tiny EPT model trained
//! briefly, its features with and without the adapter, analysis.json checked for
//! consistency (class sizes against the annotation, Σ_W recomputed from the written
//! features with a formula that uses no centre), the untuned backbone checked against
//! `--peft linear`'s features, the plots decoded; clear errors.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn num(v: &Value) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    assert!(x.is_finite(), "{x}");
    x
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

/// Class of each line of a multi-class annotation file.
fn classes_of(ann: &Path) -> Vec<usize> {
    std::fs::read_to_string(ann)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// A PNG that decodes, has the size asked and more than a few colours (text, lines).
fn check_png(p: &Path) {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert!(img.width() >= 400 && img.height() >= 300);
    let mut colours = std::collections::HashSet::new();
    let mut dark = 0;
    for px in img.pixels() {
        colours.insert(px.0);
        if px.0.iter().all(|&c| c < 60) {
            dark += 1;
        }
    }
    assert!(
        colours.len() > 20,
        "{}: {} colours",
        p.display(),
        colours.len()
    );
    // Text and axes are drawn in black (the embedded font renders glyphs).
    assert!(dark > 500, "{}: {dark} dark pixels", p.display());
}

fn check_svg(p: &Path, needles: &[(&str, usize)]) {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(text.contains("<svg"), "{}", p.display());
    for (n, at_least) in needles {
        let k = text.matches(n).count();
        assert!(
            k >= *at_least,
            "{}: {k} x {n:?}, want {at_least}",
            p.display()
        );
    }
}

#[test]
fn analyze_and_plot_a_trained_ept_run() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    eptc_ok(&[
        "gen-data",
        "-o",
        s(&data),
        "--image-size",
        "32",
        "--shots",
        "4",
        "--val-per-class",
        "2",
        "--test-per-class",
        "5",
    ]);
    let m = fixture("tiny_timm.safetensors");
    let compile = |peft: &str, out: &Path| {
        let mut a = vec![
            "compile",
            s(&m),
            "--heads",
            "3",
            "--peft",
            peft,
            "--num-classes",
            "3",
            "-o",
            s(out),
        ];
        if peft == "ept" {
            a.extend(["--prompt-len", "4"]);
        }
        let target = target_flags();
        a.extend(target.iter().map(String::as_str));
        eptc_ok(&a);
    };
    let art = d.path().join("art");
    compile("ept", &art);
    let run = d.path().join("run");
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
        "0.05",
    ]);
    let ann = data.join("test.txt");
    let out = d.path().join("analysis");
    let best = run.join("best.safetensors");
    let stdout = eptc_ok(&[
        "analyze",
        s(&art),
        "--adapter",
        s(&best),
        "--init",
        "--data",
        s(&data),
        "--ann",
        s(&ann),
        "-o",
        s(&out),
        "--class-names",
        "stripes-h,stripes-v,disc",
    ]);
    assert!(stdout.contains("trΣW total"), "{stdout}");

    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("analysis.json")).unwrap()).unwrap();
    let labels = classes_of(&ann);
    let n = labels.len();
    assert_eq!(j["images"], n);
    assert_eq!(j["task"], "multiclass");
    let counts: Vec<usize> = (0..3)
        .map(|c| labels.iter().filter(|&&l| l == c).count())
        .collect();
    assert_eq!(j["class_counts"], serde_json::json!(counts));
    let dim = j["dim"].as_u64().unwrap() as usize;
    let models = j["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["backbone", "init", "run/best"]);
    let (fshape, _) = tensor(&out.join("features.safetensors"), "features.backbone");
    assert_eq!(fshape, [n, dim]);
    let mut traces = vec![];
    for md in models {
        let st = &md["stats"];
        let name = md["name"].as_str().unwrap();
        assert_eq!(st["images"], n);
        assert_eq!(st["memberships"], n);
        assert_eq!(st["unassigned"], 0);
        let classes = st["classes"].as_array().unwrap();
        assert_eq!(classes.len(), 3);
        let mut sum = 0.0;
        for (c, cs) in classes.iter().enumerate() {
            assert_eq!(cs["n"], counts[c], "{name} class {c}");
            assert_eq!(cs["centre"].as_array().unwrap().len(), dim);
            let tr = num(&cs["trace_sw"]);
            assert!(tr > 0.0);
            assert!(close(
                num(&cs["trace_sw_per_image"]),
                tr / counts[c] as f64,
                1e-12
            ));
            // Mean distance <= root mean square distance.
            assert!(num(&cs["mean_distance"]) <= (tr / counts[c] as f64).sqrt() * (1.0 + 1e-12));
            sum += tr;
        }
        let sw = num(&st["trace_sw"]);
        let sb = num(&st["trace_sb"]);
        assert!(close(sw, sum, 1e-12), "{name}: {sw} vs {sum}");
        assert!(close(num(&st["trace_st"]), sw + sb, 1e-9));
        let wf = num(&st["within_fraction"]);
        assert!(wf > 0.0 && wf <= 1.0);
        assert!(close(num(&st["separation"]), sb / sw, 1e-12));
        assert!(num(&st["centre_distance_min"]) <= num(&st["centre_distance_mean"]));
        let ratio: Vec<f64> = md["pca"]["explained_ratio"]
            .as_array()
            .unwrap()
            .iter()
            .map(num)
            .collect();
        assert!(ratio.windows(2).all(|w| w[0] >= w[1] - 1e-12));
        assert!(ratio.iter().sum::<f64>() <= 1.0 + 1e-9);

        // Σ_W from the written features, by the pairwise formula
        // tr Σ_W^c = (1 / 2n_c) Σ_{x,y ∈ c} ‖x − y‖² (no centre involved).
        let (_, f) = tensor(
            &out.join("features.safetensors"),
            &format!("features.{name}"),
        );
        let mut want = 0.0;
        for (c, cls) in classes.iter().enumerate() {
            let rows: Vec<usize> = (0..n).filter(|&i| labels[i] == c).collect();
            let mut t = 0.0;
            for &a in &rows {
                for &b in &rows {
                    t += (0..dim)
                        .map(|k| (f64::from(f[a * dim + k]) - f64::from(f[b * dim + k])).powi(2))
                        .sum::<f64>();
                }
            }
            let t = t / (2.0 * rows.len() as f64);
            assert!(close(num(&cls["trace_sw"]), t, 1e-9), "{name} {c}");
            want += t;
        }
        assert!(close(sw, want, 1e-9));
        traces.push(sw);
    }
    // EPT's prompts change the features (the softmax sink), even untrained.
    assert!(!close(traces[0], traces[1], 1e-6), "{traces:?}");

    for stem in ["pc1_hist", "pca_scatter"] {
        check_png(&out.join(format!("{stem}.png")));
    }
    check_svg(
        &out.join("pc1_hist.svg"),
        &[("<rect", 10), ("<text", 10), ("stripes-v", 3)],
    );
    // One circle per image per model, at least.
    check_svg(
        &out.join("pca_scatter.svg"),
        &[("<circle", 3 * n), ("<polyline", 10), ("<text", 10)],
    );

    // The untuned backbone is what `--peft linear` computes for the features (its head
    // does not touch them): analysing the linear artifact's initial adapter gives the
    // backbone's features again.
    let lin = d.path().join("lin");
    compile("linear", &lin);
    let out2 = d.path().join("analysis-linear");
    eptc_ok(&[
        "analyze",
        s(&lin),
        "--init",
        "--data",
        s(&data),
        "--ann",
        s(&ann),
        "-o",
        s(&out2),
        "--json",
    ]);
    let (_, b) = tensor(&out2.join("features.safetensors"), "features.backbone");
    let (_, l) = tensor(&out2.join("features.safetensors"), "features.init");
    let (_, b_ept) = tensor(&out.join("features.safetensors"), "features.backbone");
    assert!(rel_err(&l, &b) < 1e-4, "{}", rel_err(&l, &b));
    assert_eq!(
        b, b_ept,
        "the backbone does not depend on the artifact's method"
    );

    // Training curves.
    let o = eptc_ok(&["plot", s(&run)]);
    assert!(o.contains("2 epoch(s)"), "{o}");
    check_png(&run.join("plots/training.png"));
    check_svg(
        &run.join("plots/training.svg"),
        &[("<polyline", 3), ("epoch", 3)],
    );
    let custom = d.path().join("curves");
    eptc_ok(&["plot", s(&run), "-o", s(&custom)]);
    assert!(custom.join("training.svg").exists());

    // Errors: one line, exit 2.
    let x = d.path().join("x");
    let analyze_err = |ann: &Path, extra: &[&str]| {
        let mut a = vec!["analyze", s(&art), "--data", s(&data), "--ann", s(ann)];
        a.extend(["-o", s(&x)]);
        a.extend(extra);
        eptc_err(&a)
    };
    let e = analyze_err(&data.join("test_unlabeled.txt"), &[]);
    assert!(e.contains("unlabeled"), "{e}");
    let e = analyze_err(&data.join("nope.txt"), &[]);
    assert!(e.contains("nope.txt"), "{e}");
    let missing = d.path().join("missing.safetensors");
    let e = analyze_err(&ann, &["--adapter", s(&missing)]);
    assert!(e.contains("missing.safetensors"), "{e}");
    let e = analyze_err(&ann, &["--class-names", "a,b"]);
    assert!(
        e.contains("--class-names") && e.contains("3 classes"),
        "{e}"
    );
    let e = eptc_err(&["plot", s(&data)]);
    assert!(e.contains("metrics.jsonl"), "{e}");
}

#[test]
fn analyze_multilabel_counts_an_image_in_each_of_its_classes() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    eptc_ok(&[
        "gen-data",
        "-o",
        s(&data),
        "--task",
        "multilabel",
        "--image-size",
        "32",
        "--shots",
        "2",
        "--val-per-class",
        "1",
        "--test-per-class",
        "4",
    ]);
    let art = d.path().join("art");
    let m = fixture("tiny_timm.safetensors");
    let mut a = vec![
        "compile",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "4",
        "--num-classes",
        "3",
        "--task",
        "multilabel",
        "-o",
        s(&art),
    ];
    let target = target_flags();
    a.extend(target.iter().map(String::as_str));
    eptc_ok(&a);
    let ann = data.join("test.txt");
    let out = d.path().join("an");
    eptc_ok(&[
        "analyze",
        s(&art),
        "--init",
        "--data",
        s(&data),
        "--ann",
        s(&ann),
        "-o",
        s(&out),
    ]);
    let rows: Vec<Vec<bool>> = std::fs::read_to_string(&ann)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.rsplit(' ')
                .next()
                .unwrap()
                .split(',')
                .map(|v| v == "1")
                .collect()
        })
        .collect();
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("analysis.json")).unwrap()).unwrap();
    assert_eq!(j["task"], "multilabel");
    let counts: Vec<usize> = (0..3)
        .map(|c| rows.iter().filter(|r| r[c]).count())
        .collect();
    assert_eq!(j["class_counts"], serde_json::json!(counts));
    for md in j["models"].as_array().unwrap() {
        let st = &md["stats"];
        assert_eq!(st["memberships"], counts.iter().sum::<usize>());
        assert_eq!(
            st["unassigned"],
            rows.iter().filter(|r| !r.contains(&true)).count()
        );
        let sum: f64 = st["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| num(&c["trace_sw"]))
            .sum();
        assert!(close(num(&st["trace_sw"]), sum, 1e-12));
        assert!(close(
            num(&st["trace_st"]),
            num(&st["trace_sw"]) + num(&st["trace_sb"]),
            1e-9
        ));
    }
    check_png(&out.join("pca_scatter.png"));
}
