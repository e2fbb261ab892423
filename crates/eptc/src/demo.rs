//! `eptc demo`: the whole pipeline on an embedded default — a small generated ViT and
//! generated images — compiled with EPT for the best available backend and run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use eptc_frontend::write_tensors;
use eptc_ir::HostTensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::args::{ModelArgs, OptArgs, PeftArgs};
use crate::cmd_compile::{self, CompileArgs, RunArgs};

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
const CLASSES: usize = 2;

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

/// Generated "few-shot" images: class 0 has horizontal stripes, class 1 vertical ones,
/// plus noise; ImageNet-normalised. Returns `(pixel_values, labels)`.
pub fn images(rng: &mut StdRng, per_class: usize) -> (HostTensor, Vec<usize>) {
    let noise = Normal::new(0.0f32, 0.15).expect("finite std");
    let mean = [0.485f32, 0.456, 0.406];
    let std = [0.229f32, 0.224, 0.225];
    let mut data = Vec::new();
    let mut labels = Vec::new();
    for i in 0..CLASSES * per_class {
        let class = i % CLASSES;
        labels.push(class);
        let period = 4.0 + (i / CLASSES) as f32;
        for c in 0..3 {
            for y in 0..IMG {
                for x in 0..IMG {
                    let u = if class == 0 { y } else { x } as f32;
                    let v =
                        0.5 + 0.4 * (u * std::f32::consts::TAU / period).sin() + noise.sample(rng);
                    data.push((v.clamp(0.0, 1.0) - mean[c]) / std[c]);
                }
            }
        }
    }
    (
        HostTensor::new(vec![CLASSES * per_class, 3, IMG, IMG], data),
        labels,
    )
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
    println!("1. generated a ViT ({DEPTH} layers, width {DIM}, {HEADS} heads, {PATCH}px patches, {IMG}px images) -> {}", model_path.display());

    let (pixels, labels) = images(&mut rng, 4);
    let input = dir.join("images.safetensors");
    write_tensors(&input, &[("pixel_values", &pixels)], None)?;
    println!(
        "2. generated {} images of {CLASSES} classes (horizontal / vertical stripes) -> {}",
        labels.len(),
        input.display()
    );

    let target = best_target();
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
            init_input: None,
            num_classes: Some(CLASSES),
            task: "multiclass".into(),
            seed: a.seed,
        },
        opt: OptArgs::default(),
        target: target.clone(),
        dtype: "f32".into(),
        output: Some(dir.join("artifact")),
        emit: vec!["ir".into(), "plan".into()],
        json: false,
    };
    print!("3. ");
    cmd_compile::cmd_compile(&compile)?;

    let out = dir.join("outputs.safetensors");
    let run = RunArgs {
        artifact: dir.join("artifact"),
        input: input.clone(),
        output: out.clone(),
        adapter: None,
        threads: None,
        repeat: 1,
        json: false,
    };
    print!("4. ");
    cmd_compile::cmd_run(&run)?;
    report(&out, &labels)?;
    println!(
        "done in {:.2} s. Look at {}/artifact/peft.eptc for the EPT graph and optimized.eptc for what runs.",
        t0.elapsed().as_secs_f64(),
        dir.display()
    );
    println!("(Training the prompts comes with `eptc train`, not built yet: issue #4. The head is untrained, so predictions are chance.)");
    Ok(())
}

fn report(out: &Path, labels: &[usize]) -> Result<()> {
    let f = eptc_frontend::TensorFile::read(out)?;
    let logits = f.get("logits", "[B, C]")?;
    let c = logits.shape[1];
    for (i, row) in logits.data().chunks_exact(c).enumerate() {
        let pred = row
            .iter()
            .enumerate()
            .fold(0, |b, (j, v)| if *v > row[b] { j } else { b });
        println!(
            "   image {i}: class {} logits {:?} -> predicted {pred}",
            labels[i],
            row.iter()
                .map(|v| (v * 1e4).round() / 1e4)
                .collect::<Vec<_>>()
        );
    }
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
