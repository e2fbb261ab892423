//! Whole graphs: a tiny ViT end to end against a hand-written f64 forward pass, the
//! executable's contract (zero-copy reshape, set_param, errors instead of panics), and
//! results that do not depend on the thread count.

mod common;

use common::tiny_vit::*;
use common::*;
use eptc_backend::{Backend, BackendError, CompileOptions, Executable};
use eptc_cpu::CpuBackend;
use eptc_ir::WeightStore;
use eptc_ir::{BinaryOp, DType, Graph, HostTensor, ReduceOp, Shape, TensorType, UnaryOp};

fn compile(g: &Graph, w: &WeightStore, threads: usize) -> Box<dyn Executable> {
    let opts = CompileOptions {
        threads: Some(threads),
        ..Default::default()
    };
    CpuBackend::new().compile(g, w, &opts).unwrap()
}

fn image_batch(b: usize, seed: u64) -> HostTensor {
    HostTensor::new(vec![b, 3, 8, 8], values(&mut rng(seed), b * 192))
}

#[test]
fn tiny_vit_matches_f64_forward() {
    let g = tiny_vit();
    let w = weights(&g, 1);
    let mut exe = compile(&g, &w, 2);
    for b in [1, 3] {
        let x = image_batch(b, 2 + b as u64);
        let out = exe.run(&[("pixel_values", x.clone())]).unwrap();
        assert_eq!(out[0].0, "logits");
        assert_eq!(out[1].0, "features");
        assert_eq!(out[0].1.shape, vec![b, CLASSES]);
        assert_eq!(out[1].1.shape, vec![b, D]);
        let img: Vec<f64> = x.data().iter().map(|&v| f64::from(v)).collect();
        let (mut lw, mut fw) = (vec![], vec![]);
        for i in 0..b {
            let (l, f) = reference_one(&w, &img[i * 192..(i + 1) * 192]);
            lw.extend(l);
            fw.extend(f);
        }
        assert_close(&out[0].1, &Nd::new(&[b, CLASSES], lw), 1e-5);
        assert_close(&out[1].1, &Nd::new(&[b, D], fw), 1e-5);
    }
}

#[test]
fn results_do_not_depend_on_threads() {
    let g = tiny_vit();
    let w = weights(&g, 3);
    let x = image_batch(16, 4);
    let one = compile(&g, &w, 1)
        .run(&[("pixel_values", x.clone())])
        .unwrap();
    let two = compile(&g, &w, 2)
        .run(&[("pixel_values", x.clone())])
        .unwrap();
    let three = compile(&g, &w, 3).run(&[("pixel_values", x)]).unwrap();
    for ((a, b), c) in one.iter().zip(&two).zip(&three) {
        for ((&x, &y), &z) in a.1.data().iter().zip(b.1.data()).zip(c.1.data()) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
            assert!((x - z).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {z}");
        }
    }
}

#[test]
fn set_param_changes_results_and_checks_shape() {
    let g = tiny_vit();
    let w = weights(&g, 5);
    let mut exe = compile(&g, &w, 2);
    let x = image_batch(2, 6);
    let before = exe.run(&[("pixel_values", x.clone())]).unwrap();
    let bias = HostTensor::new(vec![CLASSES], vec![10.0, 20.0, 30.0]);
    let old = w.get("head.bias").unwrap().data().to_vec();
    exe.set_param("head.bias", bias).unwrap();
    let after = exe.run(&[("pixel_values", x)]).unwrap();
    for (i, (&a, &b)) in after[0].1.data().iter().zip(before[0].1.data()).enumerate() {
        let want = b - old[i % CLASSES] + [10.0, 20.0, 30.0][i % CLASSES];
        assert!((a - want).abs() < 1e-4, "{a} vs {want}");
    }
    assert_eq!(
        after[1].1.data(),
        before[1].1.data(),
        "features do not read the head"
    );
    let wrong = exe.set_param("head.bias", HostTensor::zeros(vec![CLASSES + 1]));
    assert!(
        matches!(wrong, Err(BackendError::ParamShape { .. })),
        "{wrong:?}"
    );
    assert!(exe.set_param("nope", HostTensor::zeros(vec![1])).is_err());
}

#[test]
fn compile_errors_name_the_problem() {
    let g = tiny_vit();
    let mut w = weights(&g, 7);
    w.remove("ln2.g");
    let e = CpuBackend::new().compile(&g, &w, &CompileOptions::default());
    assert!(matches!(&e, Err(BackendError::MissingParam(n)) if n == "ln2.g"));
    w.insert("ln2.g", HostTensor::zeros(vec![D, 1]));
    let e = CpuBackend::new().compile(&g, &w, &CompileOptions::default());
    assert!(
        matches!(&e, Err(BackendError::ParamShape { name, found, .. }) if name == "ln2.g" && found == &vec![D, 1])
    );
    // A graph in bf16 is not for this backend.
    let mut h = Graph::new("bf16");
    let x = h.input("x", TensorType::new(DType::BF16, Shape::fixed(&[2])));
    let y = h.unary(UnaryOp::Neg, x).unwrap();
    h.set_output("y", y);
    let e = CpuBackend::new().compile(&h, &WeightStore::new(), &CompileOptions::default());
    assert!(matches!(e, Err(BackendError::Unsupported { .. })));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let g = tiny_vit();
    let mut exe = compile(&g, &weights(&g, 8), 2);
    let e = exe.run(&[("pixel_values", HostTensor::zeros(vec![2, 3, 8, 9]))]);
    assert!(matches!(e, Err(BackendError::InputShape { .. })), "{e:?}");
    let e = exe.run(&[("pixel_values", HostTensor::zeros(vec![3, 8, 8]))]);
    assert!(matches!(e, Err(BackendError::InputShape { .. })), "{e:?}");
    let e = exe.run(&[("other", HostTensor::zeros(vec![1, 3, 8, 8]))]);
    assert!(matches!(e, Err(BackendError::MissingInput(_))), "{e:?}");
    // A tensor whose shape was edited after construction no longer matches its data.
    let mut t = HostTensor::zeros(vec![1, 3, 8, 8]);
    t.shape = vec![2, 3, 8, 8];
    assert!(exe.run(&[("pixel_values", t)]).is_err());
    // Still usable afterwards.
    assert!(exe.run(&[("pixel_values", image_batch(1, 9))]).is_ok());
}

#[test]
fn mistyped_graph_is_an_error_at_run_time() {
    // A node whose declared type disagrees with its op (built with add_typed).
    let mut g = Graph::new("bad");
    let x = g.input("x", TensorType::f32(Shape::fixed(&[2, 3])));
    let op = eptc_ir::Op::Unary(UnaryOp::Neg);
    let y = g
        .add_typed(op, &[x], TensorType::f32(Shape::fixed(&[3, 2])))
        .unwrap();
    g.set_output("y", y);
    let mut exe = CpuBackend::new()
        .compile(&g, &WeightStore::new(), &CompileOptions::default())
        .unwrap();
    let e = exe.run(&[("x", HostTensor::zeros(vec![2, 3]))]);
    assert!(matches!(e, Err(BackendError::Other(_))), "{e:?}");
}

#[test]
fn reshape_is_zero_copy_and_params_are_not_copied() {
    let mut g = Graph::new("views");
    let x = g.input("x", TensorType::f32(Shape::batched(&[4, 6])));
    let y = g.reshape(x, Shape::batched(&[24])).unwrap();
    let p = param(&mut g, "p", &[2, 3]);
    let q = g.reshape(p, Shape::fixed(&[6])).unwrap();
    g.set_output("y", y);
    g.set_output("q", q);
    g.set_output("p", p);
    let mut w = WeightStore::new();
    let pv = HostTensor::new(vec![2, 3], (0..6).map(|i| i as f32).collect());
    w.insert("p", pv.clone());
    let mut exe = compile(&g, &w, 2);
    let xv = image_batch(1, 10);
    let xv = HostTensor::new(vec![2, 4, 6], xv.data()[..48].to_vec());
    let out = exe.run(&[("x", xv.clone())]).unwrap();
    assert_eq!(out[0].1.shape, vec![2, 24]);
    assert_eq!(
        out[0].1.data().as_ptr(),
        xv.data().as_ptr(),
        "reshape copied"
    );
    assert_eq!(out[1].1.shape, vec![6]);
    assert_eq!(out[1].1.data().as_ptr(), pv.data().as_ptr(), "param copied");
    assert_eq!(out[2].1.data().as_ptr(), pv.data().as_ptr(), "param copied");
}

#[test]
fn backend_describes_itself() {
    let be = CpuBackend::new();
    assert_eq!(be.name(), "cpu");
    assert!(be.availability().is_available());
    let caps = be.capabilities();
    // Every op but the flash-style attention backward (run as its decomposition).
    for k in eptc_ir::Op::all_kinds() {
        let backward = k == "attention_lse" || k == "attention_grad";
        assert_eq!(caps.supports(k), !backward, "{k}");
    }
    assert_eq!(caps.dtypes, vec![DType::F32]);
}

#[test]
fn repeated_runs_with_changing_batch_reuse_buffers_safely() {
    // Buffers freed by one run are handed out again in the next: values must not leak
    // between runs whatever the batch.
    let g = tiny_vit();
    let w = weights(&g, 11);
    let mut exe = compile(&g, &w, 2);
    let x3 = image_batch(3, 12);
    let first = exe.run(&[("pixel_values", x3.clone())]).unwrap();
    for b in [1, 5, 2] {
        let out = exe.run(&[("pixel_values", image_batch(b, 13))]).unwrap();
        assert_eq!(out[0].1.shape, vec![b, CLASSES]);
    }
    let again = exe.run(&[("pixel_values", x3)]).unwrap();
    for (a, b) in first.iter().zip(&again) {
        assert_eq!(a.1.data(), b.1.data());
    }
}

#[test]
fn elementwise_kernels_are_bit_identical_across_threads() {
    // Big enough that every kernel splits its work: each element must still be computed
    // the same way.
    let sh = [4, 300, 256];
    let n: usize = sh.iter().product();
    let (v, b) = (values(&mut rng(14), n), values(&mut rng(15), 256));
    let go = |threads| {
        run_with(&[(&sh, &v), (&[256], &b), (&[256], &b)], threads, |g, x| {
            let h = g.layernorm(x[0], x[1], x[2], 1e-5).unwrap();
            let h = g.binary(BinaryOp::Add, h, x[1]).unwrap();
            let h = g.unary(UnaryOp::Gelu, h).unwrap();
            let s = g.softmax(h, 2).unwrap();
            let t = g.softmax(h, 1).unwrap();
            let u = g.binary(BinaryOp::Mul, s, t).unwrap();
            let p = g.permute(u, &[2, 0, 1]).unwrap();
            g.reduce(ReduceOp::Sum, p, &[1], true).unwrap()
        })
    };
    let (one, two) = (go(1), go(2));
    assert_eq!(one.data(), two.data());
}

#[test]
fn dead_nodes_are_not_run() {
    // A node no output depends on would fail (its declared type is wrong), but is never
    // evaluated.
    let mut g = Graph::new("dead");
    let x = g.input("x", TensorType::f32(Shape::fixed(&[2, 3])));
    let op = eptc_ir::Op::Unary(UnaryOp::Exp);
    let _dead = g
        .add_typed(op, &[x], TensorType::f32(Shape::fixed(&[7])))
        .unwrap();
    let y = g.unary(UnaryOp::Neg, x).unwrap();
    g.set_output("y", y);
    let mut exe = compile(&g, &WeightStore::new(), 1);
    let out = exe.run(&[("x", HostTensor::zeros(vec![2, 3]))]).unwrap();
    assert_eq!(out[0].1.shape, vec![2, 3]);
}
