//! Compile time of ViT-B/16 + EPT (cat, deep, L = 100): from a safetensors file in timm
//! layout (random weights, written by the bench) to the optimized IR, and with the
//! frozen-weight folds computed and the graph lowered onto the CPU backend. `cargo bench --bench compile`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use eptc_backend::{Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_frontend::{write_tensors, ImportOptions};
use eptc_ir::HostTensor;
use eptc_peft::{EptMode, PeftConfig, PromptInit, Task};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vit_b16.safetensors");
    let file = common::vit(768, 12, 16, 224, &mut StdRng::seed_from_u64(0));
    let refs: Vec<(&str, &HostTensor)> =
        file.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_tensors(&path, &refs, None).unwrap();
    drop(file);
    let cfg = PeftConfig {
        method: "ept".into(),
        mode: Some(EptMode::Cat),
        layers: (0..12).collect(),
        prompt_len: 100,
        prompt_init: Some(PromptInit::Normal),
        num_classes: 10,
        task: Task::Multiclass,
    };
    let cpu = CpuBackend::new();
    let caps = cpu.capabilities();
    let to_ir = || {
        let model = eptc_frontend::import(&path, &ImportOptions::default()).unwrap();
        let mut g = model.graph.clone();
        let adapter = eptc_peft::apply(&mut g, &cfg, None, 0).unwrap();
        let (o, _) = eptc_opt::optimize(&g, &|k| caps.supports(k), &Default::default()).unwrap();
        (model, o, adapter)
    };
    let mut group = c.benchmark_group("compile_vit_b16_ept");
    group.sample_size(10);
    group.bench_function("safetensors_to_optimized_ir", |b| b.iter(to_ir));
    group.bench_function("with_folding_and_cpu_lowering", |b| {
        b.iter(|| {
            let (model, o, adapter) = to_ir();
            // Frozen-weight folds computed once (as `eptc compile` does), then lowering.
            let f = eptc_opt::fold::split_constants(&o).unwrap();
            let mut w = model.weights.clone();
            let mut consts = cpu
                .compile(&f.constants, &w, &CompileOptions::default())
                .unwrap();
            for (k, v) in consts.run(&[]).unwrap().into_iter().chain(adapter) {
                w.insert(k, v);
            }
            cpu.compile(&f.graph, &w, &CompileOptions::default())
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(compile, bench);
criterion_main!(compile);
