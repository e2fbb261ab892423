//! The optimizer on the tiny ViT and on ViT-B/16 shapes: optimized and unoptimized graphs
//! agree on the CPU backend, the fused attention with the EPT sink appears once per
//! prompted layer, and snapshots of the optimized IR (reviewed).

mod common;

use common::*;

fn compile_and_run(dir: &std::path::Path, name: &str, flags: &[&str]) -> (Vec<f32>, Vec<f32>) {
    let art = dir.join(name);
    let m = fixture("tiny_timm.safetensors");
    let mut a = vec![
        "compile",
        s(&m),
        "--heads",
        "3",
        "--num-classes",
        "5",
        "-o",
        s(&art),
    ];
    a.extend(flags);
    eptc_ok(&a);
    let inp = fixture("input_b3.safetensors");
    let out = dir.join(format!("{name}.out.safetensors"));
    eptc_ok(&["run", s(&art), "--input", s(&inp), "--output", s(&out)]);
    (tensor(&out, "logits").1, tensor(&out, "features").1)
}

/// Differential: every EPT mode, optimized vs `--no-optimize`, on the CPU backend.
#[test]
fn optimized_matches_unoptimized_for_every_mode() {
    let d = tempfile::tempdir().unwrap();
    let cases: [&[&str]; 7] = [
        &["--ept-mode", "cat", "--prompt-len", "6"],
        &["--ept-mode", "multi-cat", "--prompt-len", "6"],
        &["--ept-mode", "add"],
        &["--ept-mode", "mul", "--prompt-init", "uniform"],
        &[
            "--ept-mode",
            "cat",
            "--layers",
            "1",
            "--prompt-len",
            "3",
            "--prompt-init",
            "uniform",
        ],
        &[
            "--ept-mode",
            "multi-cat",
            "--depth",
            "shallow",
            "--prompt-len",
            "9",
            "--prompt-init",
            "kaiming",
        ],
        &["--peft", "none"],
    ];
    for (i, flags) in cases.iter().enumerate() {
        let (lo, fo) = compile_and_run(d.path(), &format!("o{i}"), flags);
        let mut plain = flags.to_vec();
        plain.push("--no-optimize");
        let (lp, fp) = compile_and_run(d.path(), &format!("p{i}"), &plain);
        let (el, ef) = (rel_err(&lo, &lp), rel_err(&fo, &fp));
        println!("{flags:?}: logits {el:.2e} features {ef:.2e}");
        assert!(
            el <= 1e-5 && ef <= 1e-5,
            "{flags:?}: optimized differs: logits {el:e}, features {ef:e}"
        );
    }
}

/// The optimized graph still matches PyTorch.
#[test]
fn optimized_matches_pytorch() {
    let d = tempfile::tempdir().unwrap();
    for mode in ["cat", "multi-cat"] {
        let art = d.path().join(mode);
        let m = fixture("tiny_timm.safetensors");
        eptc_ok(&[
            "compile",
            s(&m),
            "--heads",
            "3",
            "--num-classes",
            "5",
            "--prompt-len",
            "6",
            "--ept-mode",
            mode,
            "-o",
            s(&art),
        ]);
        let inp = fixture("input_b3.safetensors");
        let ad = fixture(&format!("adapter_{mode}_deep.safetensors"));
        let out = d.path().join(format!("{mode}.safetensors"));
        eptc_ok(&[
            "run",
            s(&art),
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--adapter",
            s(&ad),
        ]);
        let (_, got) = tensor(&out, "logits");
        let (_, want) = tensor(
            &fixture(&format!("expected_{mode}_deep_ln6.safetensors")),
            "logits",
        );
        let e = rel_err(&got, &want);
        assert!(e <= 1e-5, "{mode}: {e:e}");
    }
}

/// Lines of fused attention ops in printed IR, with or without the EPT sink.
fn attention_lines(ir: &str, sink: bool) -> usize {
    ir.lines()
        .filter(|l| l.contains("= attention ") && l.contains(" sink ") == sink)
        .count()
}

fn optimized_ir(args: &[&str]) -> String {
    let m = fixture("tiny_timm.safetensors");
    let mut a = vec![
        "ir",
        s(&m),
        "--heads",
        "3",
        "--num-classes",
        "5",
        "--stage",
        "optimized",
    ];
    a.extend(args);
    eptc_ok(&a)
}

#[test]
fn snapshot_optimized_cat() {
    let ir = optimized_ir(&["--prompt-len", "6"]);
    assert_eq!(ir.matches("= attention ").count(), 2, "{ir}");
    assert_eq!(attention_lines(&ir, true), 2, "{ir}");
    insta::assert_snapshot!(ir);
}

#[test]
fn snapshot_optimized_multi_cat() {
    let ir = optimized_ir(&["--ept-mode", "multi-cat", "--prompt-len", "6"]);
    assert_eq!(attention_lines(&ir, true), 2, "{ir}");
    insta::assert_snapshot!(ir);
}

#[test]
fn snapshot_optimized_no_peft() {
    let ir = optimized_ir(&["--peft", "none"]);
    assert_eq!(attention_lines(&ir, false), 2, "{ir}");
    insta::assert_snapshot!(ir);
}

/// ViT-B/16 shapes with random weights (EPT cat deep, L = 100): optimized vs unoptimized
/// graph through the library, batch 1.
#[test]
fn vit_b16_optimized_matches_unoptimized() {
    use eptc_backend::{Backend, CompileOptions};
    use eptc_ir::HostTensor;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    let mut rng = StdRng::seed_from_u64(3);
    let mut t = BTreeMap::new();
    let mut put = |k: String, s: &[usize], std: f32, mean: f32, rng: &mut StdRng| {
        let n: usize = s.iter().product();
        let v = (0..n)
            .map(|_| mean + std * (rng.random::<f32>() * 2.0 - 1.0) * 1.732)
            .collect();
        t.insert(k, HostTensor::new(s.to_vec(), v));
    };
    let d = 768;
    put("cls_token".into(), &[1, 1, d], 1.0, 0.0, &mut rng);
    put("pos_embed".into(), &[1, 197, d], 0.5, 0.0, &mut rng);
    put(
        "patch_embed.proj.weight".into(),
        &[d, 3, 16, 16],
        0.036,
        0.0,
        &mut rng,
    );
    put("patch_embed.proj.bias".into(), &[d], 0.1, 0.0, &mut rng);
    for i in 0..12 {
        for (n, o, k) in [
            ("attn.qkv", 3 * d, d),
            ("attn.proj", d, d),
            ("mlp.fc1", 4 * d, d),
            ("mlp.fc2", d, 4 * d),
        ] {
            put(
                format!("blocks.{i}.{n}.weight"),
                &[o, k],
                1.0 / (k as f32).sqrt(),
                0.0,
                &mut rng,
            );
            put(format!("blocks.{i}.{n}.bias"), &[o], 0.1, 0.0, &mut rng);
        }
        for n in ["norm1", "norm2"] {
            put(format!("blocks.{i}.{n}.weight"), &[d], 0.2, 1.0, &mut rng);
            put(format!("blocks.{i}.{n}.bias"), &[d], 0.2, 0.0, &mut rng);
        }
    }
    put("norm.weight".into(), &[d], 0.2, 1.0, &mut rng);
    put("norm.bias".into(), &[d], 0.2, 0.0, &mut rng);
    let file = eptc_frontend::TensorFile {
        path: "vit_b16".into(),
        tensors: t,
        metadata: Default::default(),
    };
    let model = eptc_frontend::import_file(&file, &Default::default()).unwrap();
    let mut g = model.graph.clone();
    let cfg = eptc_peft::PeftConfig {
        method: "ept".into(),
        mode: Some(eptc_peft::EptMode::Cat),
        layers: (0..12).collect(),
        prompt_len: 100,
        prompt_init: Some(eptc_peft::PromptInit::Uniform),
        num_classes: 10,
        task: eptc_peft::Task::Multiclass,
    };
    let mut w = model.weights.clone();
    for (k, v) in eptc_peft::apply(&mut g, &cfg, None, 0).unwrap() {
        // Larger prompts than the init so the sink matters.
        let scaled = v.data().iter().map(|x| x * 25.0).collect();
        w.insert(k, HostTensor::new(v.shape.clone(), scaled));
    }
    let cpu = eptc_cpu::CpuBackend::new();
    let caps = cpu.capabilities();
    let (o, sum) = eptc_opt::optimize(&g, &|k| caps.supports(k), &Default::default()).unwrap();
    assert_eq!(sum.attention_with_sink, 12, "{sum:?}");
    let x = HostTensor::new(
        vec![1, 3, 224, 224],
        (0..3 * 224 * 224)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect(),
    );
    let run = |g: &eptc_ir::Graph| {
        let mut exe = cpu.compile(g, &w, &CompileOptions::default()).unwrap();
        exe.run(&[("pixel_values", x.clone())]).unwrap()
    };
    let (a, b) = (run(&g), run(&o));
    for ((n, ta), (_, tb)) in a.iter().zip(&b) {
        let e = rel_err(tb.data(), ta.data());
        println!("{n}: rel err {e:.2e}");
        assert!(e <= 1e-5, "{n}: {e:e}");
    }
}
