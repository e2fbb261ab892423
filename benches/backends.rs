//! Criterion benchmarks of the forward pass and the training step on every backend that
//! can run here (the CPU backend, and wgpu on whatever adapter it finds — Mesa's lavapipe
//! in CI): the tiny test ViT always, ViT-B/16 when `EPTC_BENCH_VIT_B16=1` (slow on
//! lavapipe). The graphs are what `eptc compile` makes: EPT cat deep, optimized, folded
//! weights computed on the CPU; the training step is the autodiff pass's graph (forward,
//! multi-class cross-entropy, gradients of prompts and head).
//!
//! `cargo bench --bench backends`; threads of the CPU backend: `EPTC_BENCH_THREADS`
//! (default 2).

mod common;

use common::vit;
use criterion::{criterion_group, criterion_main, Criterion};
use eptc_backend::{Backend, CompileOptions};
use eptc_frontend::{ImportOptions, TensorFile};
use eptc_ir::{Graph, HostTensor, WeightStore};
use eptc_peft::{EptMode, PeftConfig, PromptInit, Task};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// The optimized forward graph for `backend`, its training graph and the weights.
fn graphs(
    file: &TensorFile,
    heads: usize,
    prompt_len: usize,
    backend: &dyn Backend,
) -> (Graph, Graph, WeightStore) {
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
    let caps = backend.capabilities();
    let (opt, _) =
        eptc_opt::optimize(&g, &|k| caps.supports(k), &eptc_opt::Limits::default()).unwrap();
    let f = eptc_opt::fold::split_constants(&opt).unwrap();
    let mut w = model.weights.clone();
    let cpu = eptc_cpu::CpuBackend::new();
    if !f.constants.outputs().is_empty() {
        let mut exe = cpu
            .compile(&f.constants, &model.weights, &CompileOptions::default())
            .unwrap();
        for (k, v) in exe.run(&[]).unwrap() {
            w.insert(k, v);
        }
    }
    for (k, v) in adapter {
        w.insert(k, v);
    }
    let mut t = f.graph.clone();
    eptc_autodiff::loss::add_loss(&mut t, "logits", eptc_autodiff::loss::Loss::CrossEntropy)
        .unwrap();
    t.remove_output("features");
    let train = eptc_autodiff::differentiate(&t, eptc_autodiff::loss::LOSS).unwrap();
    (f.graph, train, w)
}

fn bench_model(
    c: &mut Criterion,
    name: &str,
    file: &TensorFile,
    heads: usize,
    prompt_len: usize,
    batch: usize,
    size: usize,
) {
    let threads = std::env::var("EPTC_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let d = Normal::new(0.0f32, 1.0).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let x = HostTensor::new(
        vec![batch, 3, size, size],
        (0..batch * 3 * size * size)
            .map(|_| d.sample(&mut rng))
            .collect(),
    );
    let mut y = vec![0.0; batch * 10];
    for i in 0..batch {
        y[i * 10 + i % 10] = 1.0;
    }
    let y = HostTensor::new(vec![batch, 10], y);
    let backends: Vec<Box<dyn Backend>> = vec![
        Box::new(eptc_cpu::CpuBackend::new()),
        Box::new(eptc_wgpu::WgpuBackend::new()),
    ];
    let mut group = c.benchmark_group("backends");
    group.sample_size(10);
    for b in backends {
        if let eptc_backend::Availability::Unavailable(why) = b.availability() {
            eprintln!("{}: skipped ({why})", b.name());
            continue;
        }
        let (fwd, train, w) = graphs(file, heads, prompt_len, b.as_ref());
        let caps = b.capabilities();
        let lower = |g: &Graph| {
            let mut g = g.clone();
            eptc_ir::decompose::lower_unsupported(&mut g, &|k| caps.supports(k)).unwrap();
            g
        };
        let opts = CompileOptions {
            threads: Some(threads),
            ..Default::default()
        };
        let mut f = b.compile(&lower(&fwd), &w, &opts).unwrap();
        let mut t = b.compile(&lower(&train), &w, &opts).unwrap();
        group.bench_function(format!("{}_{name}_forward_b{batch}", b.name()), |bn| {
            bn.iter(|| f.run(&[("pixel_values", x.clone())]).unwrap())
        });
        group.bench_function(format!("{}_{name}_train_step_b{batch}", b.name()), |bn| {
            bn.iter(|| {
                t.run(&[("pixel_values", x.clone()), ("labels", y.clone())])
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let tiny = vit(48, 2, 8, 32, &mut rng);
    bench_model(c, "tiny", &tiny, 3, 6, 8, 32);
    if std::env::var("EPTC_BENCH_VIT_B16").as_deref() == Ok("1") {
        let b16 = vit(768, 12, 16, 224, &mut rng);
        bench_model(c, "vit_b16", &b16, 12, 100, 4, 224);
    }
}

criterion_group!(backends, benches);
criterion_main!(backends);
