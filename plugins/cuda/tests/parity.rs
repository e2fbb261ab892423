//! The CUDA backend against the CPU reference on a whole tiny ViT (f32, bf16 and f16 storage)
//! and the runtime's contract (set_param, plans per batch size, CUDA graph replay).
//! Without a GPU they run on the CPU emulator of the runtime ([`CudaBackend::emulated`]);
//! `EPTC_REQUIRE_CUDA` (set by `scripts/gpu-check.sh`) makes a missing GPU a failure.
//! The EPT graphs themselves (fused attention with the sink, the training graphs) are
//! checked against PyTorch by the workspace's `parity` and `training` suites run with
//! `EPTC_TEST_TARGET=cuda` (on the emulator too, with `EPTC_CUDA_EMULATE=1`), and with
//! every switch in `tests/emulated.rs`.
//!
//! Bars: relative L2 error `‖cuda − cpu‖ / ‖cpu‖ ≤ 1e-5` in f32, `≤ 1e-2` with bf16 or f16
//! storage; NaN never passes.

use eptc_backend::{Backend, CompileOptions, Executable};
use eptc_cpu::CpuBackend;
use eptc_cuda::{CudaBackend, CudaExecutable};
use eptc_ir::{DType, Graph, HostTensor, WeightStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../../cpu/tests/common/mod.rs"]
mod cpu_common;
use cpu_common::tiny_vit::{tiny_vit, weights, CLASSES, D};

mod common;
use common::rel_err;

/// The GPU; without one, the same runtime on the CPU emulator (which checks the plan,
/// the kernels and the GEMM mappings, not cuBLAS or the CUDA graph themselves); without
/// either, `None` (a failure where `EPTC_REQUIRE_CUDA` is set, as `scripts/gpu-check.sh`
/// does).
fn device() -> Option<CudaBackend> {
    let be = CudaBackend::new();
    match be.availability() {
        eptc_backend::Availability::Available(d) => {
            eprintln!("cuda: {d}");
            Some(be)
        }
        eptc_backend::Availability::Unavailable(why) => {
            assert!(
                std::env::var_os("EPTC_REQUIRE_CUDA").is_none(),
                "EPTC_REQUIRE_CUDA is set but the cuda backend is unavailable: {why}"
            );
            let cxx = common::emulator()?;
            eprintln!("no GPU ({why}): on the CPU emulator ({cxx})");
            Some(CudaBackend::emulated())
        }
    }
}

fn images(batch: usize, seed: u64) -> HostTensor {
    let mut r = StdRng::seed_from_u64(seed);
    let v = (0..batch * 192)
        .map(|_| r.random_range(-2.0f32..2.0))
        .collect();
    HostTensor::new(vec![batch, 3, 8, 8], v)
}

fn cpu(g: &Graph, w: &WeightStore) -> Box<dyn Executable> {
    CpuBackend::new()
        .compile(g, w, &CompileOptions::default())
        .unwrap()
}

fn cuda(be: &CudaBackend, g: &Graph, w: &WeightStore, dtype: DType) -> CudaExecutable {
    let opts = CompileOptions {
        dtype,
        ..Default::default()
    };
    be.compile_cuda(g, w, &opts).unwrap()
}

fn check(got: &[(String, HostTensor)], want: &[(String, HostTensor)], tol: f64, what: &str) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut worst: f64 = 0.0;
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        assert_eq!((gn, &g.shape), (wn, &w.shape), "{what}");
        let e = rel_err(g.data(), w.data());
        assert!(e <= tol, "{what} {gn}: relative L2 error {e:.3e} > {tol:e}");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn tiny_vit_matches_cpu_f32() {
    let Some(be) = device() else { return };
    let g = tiny_vit();
    let w = weights(&g, 1);
    let mut want = cpu(&g, &w);
    let mut got = cuda(&be, &g, &w, DType::F32);
    // Batch 3 twice: the second run replays the captured plan.
    for batch in [1, 3, 3, 5] {
        let x = [("pixel_values", images(batch, 10 + batch as u64))];
        let out = got.run(&x).unwrap();
        assert_eq!(out[0].1.shape, vec![batch, CLASSES]);
        assert_eq!(out[1].1.shape, vec![batch, D]);
        let e = check(&out, &want.run(&x).unwrap(), 1e-5, "f32");
        eprintln!("tiny ViT f32, batch {batch}: relative L2 error {e:.2e}");
    }
    let s = got.plan_stats(3).expect("batch 3 planned");
    eprintln!("plan for batch 3: {s:?}");
    assert!(s.kernels > 0);
}

#[test]
fn tiny_vit_matches_cpu_bf16() {
    let Some(be) = device() else { return };
    let g = tiny_vit();
    let w = weights(&g, 2);
    let mut want = cpu(&g, &w);
    let mut got = cuda(&be, &g, &w, DType::BF16);
    for batch in [1, 4] {
        let x = [("pixel_values", images(batch, 20 + batch as u64))];
        let e = check(&got.run(&x).unwrap(), &want.run(&x).unwrap(), 1e-2, "bf16");
        eprintln!("tiny ViT bf16, batch {batch}: relative L2 error {e:.2e}");
    }
}

#[test]
fn tiny_vit_matches_cpu_f16() {
    // f16 storage: more mantissa than bf16, less range; the same bar.
    let Some(be) = device() else { return };
    let g = tiny_vit();
    let w = weights(&g, 2);
    let mut want = cpu(&g, &w);
    let mut got = cuda(&be, &g, &w, DType::F16);
    for batch in [1, 4] {
        let x = [("pixel_values", images(batch, 20 + batch as u64))];
        let e = check(&got.run(&x).unwrap(), &want.run(&x).unwrap(), 1e-2, "f16");
        eprintln!("tiny ViT f16, batch {batch}: relative L2 error {e:.2e}");
    }
}

#[test]
fn set_param_changes_the_result_of_a_replayed_plan() {
    let Some(be) = device() else { return };
    let g = tiny_vit();
    let (w1, w2) = (weights(&g, 3), weights(&g, 4));
    let mut got = cuda(&be, &g, &w1, DType::F32);
    let x = [("pixel_values", images(2, 5))];
    let before = got.run(&x).unwrap();
    check(&before, &cpu(&g, &w1).run(&x).unwrap(), 1e-5, "before");
    let head = "head.weight";
    got.set_param(head, w2.get(head).unwrap().clone()).unwrap();
    let mut w = w1.clone();
    w.insert(head.to_string(), w2.get(head).unwrap().clone());
    let after = got.run(&x).unwrap();
    check(
        &after,
        &cpu(&g, &w).run(&x).unwrap(),
        1e-5,
        "after set_param",
    );
    assert!(rel_err(after[0].1.data(), before[0].1.data()) > 1e-3);
    // A wrong shape is an error, not a panic.
    assert!(got
        .set_param(head, HostTensor::new(vec![1], vec![0.0]))
        .is_err());
}

#[test]
fn no_driver_is_an_error_not_a_panic() {
    // Wherever this runs, availability answers (the probe never panics) and compiling
    // either works or says why.
    let be = CudaBackend::new();
    let g = tiny_vit();
    let w = weights(&g, 1);
    match be.availability() {
        eptc_backend::Availability::Available(_) => {
            assert!(be.compile(&g, &w, &CompileOptions::default()).is_ok())
        }
        eptc_backend::Availability::Unavailable(why) => {
            let e = be
                .compile(&g, &w, &CompileOptions::default())
                .err()
                .expect("no device: compile fails");
            assert!(e.to_string().contains(&why), "{e} / {why}");
        }
    }
}
