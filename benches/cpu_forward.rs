//! Criterion benchmarks of the CPU backend: the forward pass of a ViT with EPT.
//!
//! `cargo bench --bench cpu_forward` — ViT-B/16 (224 px, EPT cat deep L = 100, batch 8)
//! and the tiny test ViT. Threads: `EPTC_BENCH_THREADS` (default 2, the CI machine's
//! cores). The side-by-side comparison with PyTorch is `benches/compare_pytorch.py`.

mod common;

use common::vit;
use criterion::{criterion_group, criterion_main, Criterion};
use eptc_backend::{Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_frontend::{ImportOptions, TensorFile};
use eptc_ir::HostTensor;
use eptc_peft::{EptMode, PeftConfig, PromptInit, Task};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

fn bench_model(
    c: &mut Criterion,
    name: &str,
    file: &TensorFile,
    heads: usize,
    prompt_len: usize,
    batch: usize,
) {
    let threads = std::env::var("EPTC_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let opts = ImportOptions {
        heads: Some(heads),
        ..Default::default()
    };
    let model = eptc_frontend::import_file(file, &opts).unwrap();
    let mut g = model.graph.clone();
    let cfg = PeftConfig {
        method: "ept".into(),
        mode: Some(EptMode::Cat),
        layers: (0..model.arch.depth).collect(),
        prompt_len,
        prompt_init: Some(PromptInit::Normal),
        num_classes: 10,
        task: Task::Multiclass,
    };
    let adapter = eptc_peft::apply(&mut g, &cfg, None, 0).unwrap();
    let mut w = model.weights.clone();
    for (k, v) in adapter {
        w.insert(k, v);
    }
    let mut exe = CpuBackend::new()
        .compile(
            &g,
            &w,
            &CompileOptions {
                threads: Some(threads),
                ..Default::default()
            },
        )
        .unwrap();
    let s = model.arch.image_size;
    let d = Normal::new(0.0f32, 1.0).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let x = HostTensor::new(
        vec![batch, 3, s, s],
        (0..batch * 3 * s * s).map(|_| d.sample(&mut rng)).collect(),
    );
    let mut group = c.benchmark_group("cpu_forward");
    group.sample_size(10);
    group.bench_function(format!("{name}_ept_cat_deep_b{batch}_t{threads}"), |b| {
        b.iter(|| exe.run(&[("pixel_values", x.clone())]).unwrap())
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let tiny = vit(48, 2, 8, 32, &mut rng);
    bench_model(c, "tiny", &tiny, 3, 6, 8);
    let b16 = vit(768, 12, 16, 224, &mut rng);
    bench_model(c, "vit_b16", &b16, 12, 100, 8);
}

criterion_group!(cpu, benches);
criterion_main!(cpu);
