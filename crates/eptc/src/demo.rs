//! `eptc demo`: the whole pipeline on an embedded default — a small generated ViT and a
//! generated few-shot data set — compiled with EPT for the best available backend,
//! trained, evaluated and used for inference.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use eptc_frontend::write_tensors;
use eptc_ir::HostTensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::args::{ModelArgs, OptArgs, PeftArgs};
use crate::cmd_compile::{self, CompileArgs};
use crate::cmd_train::{self, gen_data, DataArgs, EvalArgs, GenDataArgs, InferArgs, TrainArgs};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for the demo's model, data, artifact and outputs
    #[arg(short, long, default_value = "eptc-demo")]
    pub output: PathBuf,
    /// Seed of the generated model and images
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

const IMG: usize = 64;
const PATCH: usize = 16;
const DIM: usize = 96;
const DEPTH: usize = 4;
const HEADS: usize = 3;
const CLASSES: usize = 3;

/// A small timm-layout ViT with random, non-trivial weights.
pub fn tiny_vit(rng: &mut StdRng) -> Vec<(String, HostTensor)> {
    let mut out = Vec::new();
    let mut t = |name: &str, shape: &[usize], mean: f32, std: f32, rng: &mut StdRng| {
        let n = shape.iter().product();
        let d = Normal::new(mean, std).expect("finite std");
        out.push((
            name.to_string(),
            HostTensor::new(shape.to_vec(), (0..n).map(|_| d.sample(rng)).collect()),
        ));
    };
    let grid = IMG / PATCH;
    let inv = |fan: usize| 1.0 / (fan as f32).sqrt();
    t("cls_token", &[1, 1, DIM], 0.0, 1.0, rng);
    t("pos_embed", &[1, 1 + grid * grid, DIM], 0.0, 0.5, rng);
    t(
        "patch_embed.proj.weight",
        &[DIM, 3, PATCH, PATCH],
        0.0,
        inv(3 * PATCH * PATCH),
        rng,
    );
    t("patch_embed.proj.bias", &[DIM], 0.0, 0.1, rng);
    for i in 0..DEPTH {
        let b = format!("blocks.{i}.");
        for (n, o, k) in [
            ("attn.qkv", 3 * DIM, DIM),
            ("attn.proj", DIM, DIM),
            ("mlp.fc1", 4 * DIM, DIM),
            ("mlp.fc2", DIM, 4 * DIM),
        ] {
            t(&format!("{b}{n}.weight"), &[o, k], 0.0, inv(k), rng);
            t(&format!("{b}{n}.bias"), &[o], 0.0, 0.1, rng);
        }
        for n in ["norm1", "norm2"] {
            t(&format!("{b}{n}.weight"), &[DIM], 1.0, 0.2, rng);
            t(&format!("{b}{n}.bias"), &[DIM], 0.0, 0.2, rng);
        }
    }
    t("norm.weight", &[DIM], 1.0, 0.2, rng);
    t("norm.bias", &[DIM], 0.0, 0.2, rng);
    out
}

pub fn cmd_demo(a: &DemoArgs) -> Result<()> {
    let dir = &a.output;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let t0 = Instant::now();

    let model_path = dir.join("vit-demo.safetensors");
    let weights = tiny_vit(&mut rng);
    let refs: Vec<(&str, &HostTensor)> = weights.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_tensors(
        &model_path,
        &refs,
        Some(HashMap::from([("format".into(), "pt".into())])),
    )?;
    println!("1. generated a ViT with random weights ({DEPTH} layers, width {DIM}, {HEADS} heads, {PATCH}px patches, {IMG}px images) -> {}", model_path.display());

    let data_dir = dir.join("data");
    let gen = GenDataArgs {
        output: data_dir.clone(),
        task: "multiclass".into(),
        classes: CLASSES,
        image_size: IMG as u32,
        shots: 16,
        val_per_class: 16,
        test_per_class: 16,
        seed: a.seed,
    };
    let synth = gen_data(&gen)?;
    println!(
        "2. generated a few-shot data set: {} images of {CLASSES} classes ({}), 16 per class in each of train / val / test -> {}",
        synth.images,
        synth.class_names.join(", "),
        data_dir.display()
    );

    let target = best_target();
    let artifact = dir.join("artifact");
    let compile = CompileArgs {
        model: model_path.clone(),
        model_args: ModelArgs {
            heads: Some(HEADS),
            ..Default::default()
        },
        peft: PeftArgs {
            peft: "ept".into(),
            ept_mode: "cat".into(),
            layers: None,
            depth: "deep".into(),
            prompt_len: 8,
            prompt_init: "normal".into(),
            k: 1,
            rank: eptc_peft::lora::DEFAULT_RANK,
            lora_alpha: None,
            reduction: eptc_peft::adaptformer::DEFAULT_REDUCTION,
            hidden: None,
            pad_size: eptc_peft::vp::DEFAULT_PAD,
            init_input: None,
            num_classes: Some(CLASSES),
            task: "multiclass".into(),
            seed: a.seed,
        },
        opt: OptArgs::default(),
        target: target.clone(),
        dtype: "f32".into(),
        output: Some(artifact.clone()),
        emit: vec!["ir".into(), "plan".into()],
        json: false,
    };
    print!("3. ");
    cmd_compile::cmd_compile(&compile)?;

    let data = DataArgs {
        data: data_dir.clone(),
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
        workers: 2,
        threads: None,
    };
    let eval = |adapter: Option<PathBuf>, out: &str| -> Result<f64> {
        let o = dir.join(out);
        cmd_train::eval_to(&EvalArgs {
            artifact: artifact.clone(),
            adapter,
            data: data.clone(),
            ann: synth.test.clone(),
            batch_size: 16,
            output: Some(o),
        })
    };
    let before = eval(None, "eval-untrained.json")?;
    println!("4. test accuracy before training (random prompts and head): {before:.1}%");

    let run = dir.join("run");
    if run.exists() {
        std::fs::remove_dir_all(&run).with_context(|| format!("cannot clear {}", run.display()))?;
    }
    println!("5. training EPT prompts + head (SGD, cosine lr, RandomResizedCrop + flip):");
    cmd_train::cmd_train(&TrainArgs {
        artifact: artifact.clone(),
        data: data.clone(),
        train: synth.train.clone(),
        val: synth.val.clone(),
        output: run.clone(),
        adapter: None,
        epochs: 20,
        batch_size: 4,
        lr: 0.05,
        optimizer: "sgd".into(),
        momentum: 0.9,
        weight_decay: 1e-4,
        schedule: "cosine".into(),
        warmup: 0,
        seed: a.seed,
        no_augment: false,
        resume: false,
        stop_after: None,
        eval_batch_size: 16,
    })?;
    let best = run.join("best.safetensors");
    let after = eval(Some(best.clone()), "eval-trained.json")?;
    println!("6. test accuracy after training (best epoch on val): {after:.1}% (was {before:.1}%)");

    let preds = dir.join("predictions.csv");
    cmd_train::cmd_infer(&InferArgs {
        artifact: artifact.clone(),
        adapter: Some(best),
        data: data_dir.clone(),
        ann: Some(synth.test_unlabeled.clone()),
        images: vec![],
        output: preds.clone(),
        batch_size: 16,
        mean: data.mean.clone(),
        std: data.std.clone(),
        workers: 2,
        threads: None,
    })
    .map(|_| ())?;
    println!(
        "7. wrote the MedFMC-style submission CSV {}",
        preds.display()
    );
    println!(
        "done in {:.1} s. Files: {1}/artifact (train.eptc is the training graph, optimized.eptc what inference runs), {1}/run (adapters, metrics.jsonl, train.log), {1}/eval-*.json.",
        t0.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// The best backend available here.
fn best_target() -> String {
    crate::backends::all()
        .into_iter()
        .find(|b| b.availability().is_available())
        .map(|b| b.name().to_string())
        .unwrap_or_else(|| "cpu".into())
}
