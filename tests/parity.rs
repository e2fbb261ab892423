//! Fidelity against PyTorch: `eptc compile` + `eptc run` on the CPU backend reproduce the
//! logits and features timm gives with EPT applied as the official code does
//! (fixtures from `scripts/make_fixtures.py`), for every checkpoint layout, EPT mode and
//! depth, batch 1 and 3, and a non-default image size.

mod common;

use common::*;

/// 1e-5 in f32; 1e-2 with 16-bit storage (`EPTC_TEST_DTYPE`, DESIGN.md's bound).
fn tol() -> f64 {
    if half_storage() {
        1e-2
    } else {
        1e-5
    }
}

/// Compile `model` with `flags`, run it on batch 3 and batch 1, and compare with `expected`.
fn check(model: &str, flags: &[&str], adapter: Option<&str>, expected: &str, input: &str) {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let mut args = vec!["compile", model, "--heads", "3", "-o", s(&art)];
    args.extend(flags);
    let target = target_flags();
    args.extend(target.iter().map(String::as_str));
    let model_path = fixture(model);
    args[1] = s(&model_path);
    eptc_ok(&args);
    let exp = fixture(expected);
    let inputs = [(input.to_string(), 3), (input.replace("_b3", "_b1"), 1)];
    for (inp, batch) in inputs {
        let inp = fixture(&inp);
        if !inp.exists() {
            continue;
        }
        let out = dir.path().join(format!("out{batch}.safetensors"));
        let mut run = vec!["run", s(&art), "--input", s(&inp), "--output", s(&out)];
        let ad = adapter.map(fixture);
        if let Some(a) = &ad {
            run.extend(["--adapter", s(a)]);
        }
        eptc_ok(&run);
        for key in ["logits", "features"] {
            let (shape, got) = tensor(&out, key);
            let (eshape, want) = tensor(&exp, key);
            assert_eq!(shape[0], batch);
            let n = got.len();
            assert_eq!(shape[1], eshape[1]);
            let err = rel_err(&got, &want[..n]);
            println!("{model} {flags:?} batch {batch} {key}: rel err {err:.2e}");
            let tol = tol();
            assert!(
                err <= tol,
                "{model} {flags:?} batch {batch} {key}: rel err {err:.3e} > {tol}"
            );
        }
    }
}

const LAYOUTS: [(&str, &str); 4] = [
    ("tiny_timm.safetensors", "ln6"),
    ("tiny_mmcls.safetensors", "ln6"),
    ("tiny_hf.safetensors", "ln12"),
    ("tiny_hfcls.safetensors", "ln12"),
];

fn ept_case(mode: &str, depth: &str) {
    for (model, eps) in LAYOUTS {
        let flags = [
            "--ept-mode",
            mode,
            "--depth",
            depth,
            "--prompt-len",
            "6",
            "--num-classes",
            "5",
        ];
        let adapter = format!("adapter_{mode}_{depth}.safetensors");
        let expected = format!("expected_{mode}_{depth}_{eps}.safetensors");
        check(
            model,
            &flags,
            Some(&adapter),
            &expected,
            "input_b3.safetensors",
        );
    }
}

#[test]
fn cat_deep() {
    ept_case("cat", "deep");
}

#[test]
fn cat_shallow() {
    ept_case("cat", "shallow");
}

#[test]
fn multi_cat_deep() {
    ept_case("multi-cat", "deep");
}

#[test]
fn multi_cat_shallow() {
    ept_case("multi-cat", "shallow");
}

/// The plain model with the checkpoint's own head (`--peft none`, no --num-classes).
#[test]
fn plain_model_with_checkpoint_head() {
    for (model, eps) in [
        ("tiny_timm.safetensors", "ln6"),
        ("tiny_mmcls.safetensors", "ln6"),
        ("tiny_hfcls.safetensors", "ln12"),
    ] {
        let expected = format!("expected_none_{eps}.safetensors");
        check(
            model,
            &["--peft", "none"],
            None,
            &expected,
            "input_b3.safetensors",
        );
    }
}

/// 48 px images on a 32 px checkpoint: position embeddings resized bicubically.
#[test]
fn non_default_image_size() {
    for model in ["tiny_timm.safetensors", "tiny_mmcls.safetensors"] {
        let flags = [
            "--image-size",
            "48",
            "--prompt-len",
            "6",
            "--num-classes",
            "5",
        ];
        check(
            model,
            &flags,
            Some("adapter48_cat_deep.safetensors"),
            "expected48_cat_deep_ln6.safetensors",
            "input48_b3.safetensors",
        );
    }
}
