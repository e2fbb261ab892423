//! `eptc_ir::reference` (the f64 interpreter) against the f32 CPU backend: every op on
//! random inputs, the fused ops against their decompositions, the whole tiny ViT, and a
//! few hand-computed values.

mod common;

use std::collections::HashMap;

use common::tiny_vit::{self, tiny_vit};
use common::*;
use eptc_backend::{Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_ir::reference::{self, eval, eval_host, Tensor64};
use eptc_ir::{lower_unsupported, Activation, BinaryOp, Dim, Graph, HostTensor, Init};
use eptc_ir::{NodeId, ReduceOp, Shape, TensorType, UnaryOp, WeightStore};
use rand::rngs::StdRng;
use rand::Rng;

/// Every output of `g` on the CPU backend (two threads).
fn cpu(g: &Graph, inputs: &[(&str, HostTensor)], w: &WeightStore) -> Vec<(String, HostTensor)> {
    let opts = CompileOptions {
        threads: Some(2),
        ..Default::default()
    };
    let mut exe = CpuBackend::new().compile(g, w, &opts).expect("compiles");
    exe.run(inputs).expect("runs")
}

/// `‖got − want‖ / ‖want‖`, in f64 (0 when both are 0); NaN/inf must agree exactly.
fn rel_l2(got: &HostTensor, want: &Tensor64) -> f64 {
    assert_eq!(got.shape, want.shape, "shape");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.data().iter().zip(&want.data) {
        let g = f64::from(g);
        if !w.is_finite() {
            assert!(g == w || (g.is_nan() && w.is_nan()), "got {g}, want {w}");
            continue;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if num == 0.0 {
        0.0
    } else {
        (num / den).sqrt()
    }
}

/// Named random inputs for every input of `g` (batch `b`), values from `gen`.
fn random_inputs(
    g: &Graph,
    b: usize,
    r: &mut StdRng,
    gen: &dyn Fn(&mut StdRng) -> f32,
) -> Vec<(String, HostTensor)> {
    g.node_ids()
        .into_iter()
        .filter_map(|id| match &g.node(id).op {
            eptc_ir::Op::Input { name } => {
                let shape = g.ty(id).shape.resolve(b);
                let n = shape.iter().product();
                let v = (0..n).map(|_| gen(r)).collect();
                Some((name.clone(), HostTensor::new(shape, v)))
            }
            _ => None,
        })
        .collect()
}

fn uniform(r: &mut StdRng) -> f32 {
    r.random_range(-2.0f32..2.0)
}

/// Run `g` on the CPU and in f64 on the same inputs and weights; assert every output is
/// within `tol` relative L2 and return the worst error.
fn compare_inputs(
    g: &Graph,
    inputs: &[(String, HostTensor)],
    w: &WeightStore,
    tol: f64,
    what: &str,
) -> f64 {
    let feed: Vec<(&str, HostTensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let got = cpu(g, &feed, w);
    let want = eval_host(g, &feed, w).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for ((gn, gt), (wn, wt)) in got.iter().zip(&want) {
        assert_eq!(gn, wn);
        let e = rel_l2(gt, wt);
        assert!(
            e <= tol,
            "{what}, output {gn}: relative L2 error {e:e} > {tol:e}"
        );
        worst = worst.max(e);
    }
    worst
}

fn compare(g: &Graph, b: usize, seed: u64, gen: &dyn Fn(&mut StdRng) -> f32, what: &str) -> f64 {
    let inputs = random_inputs(g, b, &mut rng(seed), gen);
    compare_inputs(g, &inputs, &WeightStore::new(), 1e-5, what)
}

/// A graph with fixed-shape inputs `x0..` and the single output `f` builds.
fn one_op(shapes: &[&[usize]], f: impl FnOnce(&mut Graph, &[NodeId]) -> NodeId) -> Graph {
    let shapes: Vec<Vec<usize>> = shapes.iter().map(|s| s.to_vec()).collect();
    graph_of(&shapes, f)
}

fn values_of(pairs: &[(&str, Tensor64)]) -> HashMap<String, Tensor64> {
    pairs
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect()
}

// ---- hand-computed values ------------------------------------------------------------------

#[test]
fn hand_computed_values() {
    assert!((reference::erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-16);
    assert!((reference::gelu_deriv(1.0) - 1.083_315_470_587_686_4).abs() < 1e-15);
    // The error function agrees with libm's everywhere on a fine grid.
    for i in -8000..=8000 {
        let x = f64::from(i) * 1e-3;
        assert!(
            (reference::erf(x) - libm::erf(x)).abs() <= 2.3e-16,
            "erf({x})"
        );
        let (c, lc) = (reference::erfc(x), libm::erfc(x));
        assert!((c - lc).abs() <= 1e-15 * lc, "erfc({x}): {c} vs {lc}");
    }

    // softmax([1, 2, 3]) = e^i / (e + e^2 + e^3).
    let mut g = Graph::new("softmax");
    let x = g.input("x", TensorType::f32(Shape::fixed(&[3])));
    let y = g.softmax(x, 0).unwrap();
    g.set_output("y", y);
    let out = eval(
        &g,
        &values_of(&[("x", Tensor64::new(vec![3], vec![1.0, 2.0, 3.0]))]),
    )
    .unwrap();
    let want = [
        0.090_030_573_170_380_46,
        0.244_728_471_054_797_64,
        0.665_240_955_774_821_9,
    ];
    assert_eq!(out[0].0, "y");
    for (g, w) in out[0].1.data.iter().zip(want) {
        assert!((g - w).abs() < 3e-16, "{g} vs {w}");
    }

    // gelu and gelu_deriv through the graph, and the CPU agrees to f32 precision.
    let mut g = Graph::new("gelu");
    let x = g.input("x", TensorType::f32(Shape::fixed(&[3])));
    let a = g.unary(UnaryOp::Gelu, x).unwrap();
    let d = g.unary(UnaryOp::GeluDeriv, x).unwrap();
    g.set_output("gelu", a);
    g.set_output("deriv", d);
    let xs = HostTensor::new(vec![3], vec![1.0, -1.0, 0.5]);
    let out = eval_host(&g, &[("x", xs.clone())], &WeightStore::new()).unwrap();
    let want_gelu = [
        0.841_344_746_068_542_9,
        -0.158_655_253_931_457_05,
        0.345_731_230_637_006_56,
    ];
    let want_deriv = [
        1.083_315_470_587_686_4,
        -0.083_315_470_587_686_3,
        0.867_495_124_656_162_9,
    ];
    for i in 0..3 {
        assert!((out[0].1.data[i] - want_gelu[i]).abs() < 1e-15);
        assert!((out[1].1.data[i] - want_deriv[i]).abs() < 1e-15);
    }
    compare_inputs(&g, &[("x".into(), xs)], &WeightStore::new(), 1e-6, "gelu");

    // Round trips and scalars.
    let t = HostTensor::new(vec![2], vec![0.1, -3.0]);
    assert_eq!(Tensor64::from_host(&t).to_host().data(), t.data());
    assert_eq!(Tensor64::scalar(2.5), Tensor64::new(vec![], vec![2.5]));
}

// ---- every primitive op ----------------------------------------------------------------------

#[test]
fn leaves_and_patchify() {
    let mut g = Graph::new("leaves");
    let x = g.input("x", TensorType::f32(Shape::batched(&[3, 8, 12])));
    let p = g.patchify(x, 4).unwrap();
    let w = g.param(
        "w",
        false,
        Init::Checkpoint,
        TensorType::f32(Shape::fixed(&[48])),
    );
    let c = g
        .constant((0..48).map(|i| i as f32 * 0.25 - 3.0).collect(), &[48])
        .unwrap();
    let y = g.binary(BinaryOp::Mul, p, w).unwrap();
    let y = g.binary(BinaryOp::Add, y, c).unwrap();
    g.set_output("patches", p);
    g.set_output("y", y);
    let mut ws = WeightStore::new();
    ws.insert("w", HostTensor::new(vec![48], values(&mut rng(5), 48)));
    let inputs = random_inputs(&g, 2, &mut rng(6), &uniform);
    // Patchify moves values: exact.
    let e = compare_inputs(&g, &inputs, &ws, 1e-7, "leaves/patchify");
    assert!(e <= 1e-7);
    let feed: Vec<(&str, HostTensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let out = eval_host(&g, &feed, &ws).unwrap();
    assert_eq!(out[0].1.shape, vec![2, 6, 48]);
    // Token 4 = grid (1, 1); feature 17 = (c 1, kh 0, kw 1): pixel (1, 4, 5).
    let img = &inputs[0].1;
    assert_eq!(
        out[0].1.data[4 * 48 + 17],
        f64::from(img.data()[96 + 4 * 12 + 5])
    );
}

#[test]
fn matmul_transposes_and_broadcasting() {
    let cases: [(&[usize], &[usize], bool, bool); 8] = [
        (&[3, 4], &[4, 5], false, false),
        (&[4, 3], &[4, 5], true, false),
        (&[3, 4], &[5, 4], false, true),
        (&[4, 3], &[5, 4], true, true),
        (&[2, 1, 3, 4], &[5, 4, 6], false, false),
        (&[7, 3, 4], &[4, 6], false, false),
        (&[3, 4], &[2, 6, 4], false, true),
        (&[2, 1, 4, 3], &[1, 3, 6, 4], true, true),
    ];
    for (i, (a, b, ta, tb)) in cases.into_iter().enumerate() {
        let g = one_op(&[a, b], |g, x| g.matmul(x[0], x[1], ta, tb).unwrap());
        compare(
            &g,
            1,
            10 + i as u64,
            &uniform,
            &format!("matmul {a:?} {b:?} {ta} {tb}"),
        );
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    let shapes: [(&[usize], &[usize]); 5] = [
        (&[3, 4], &[3, 4]),
        (&[2, 3, 4], &[4]),
        (&[3, 1, 5], &[4, 1]),
        (&[], &[2, 3]),
        (&[1, 4], &[3, 1]),
    ];
    for op in BinaryOp::ALL {
        for (i, (a, b)) in shapes.into_iter().enumerate() {
            let g = one_op(&[a, b], |g, x| g.binary(op, x[0], x[1]).unwrap());
            // Small integers make `equal` (and ties of max/min) happen often; no
            // integers for div (x / 0).
            let ints = |r: &mut StdRng| r.random_range(-2i32..=2) as f32;
            let use_ints = op == BinaryOp::Equal || (i % 2 == 1 && op != BinaryOp::Div);
            let gen: &dyn Fn(&mut StdRng) -> f32 = if use_ints { &ints } else { &uniform };
            compare(
                &g,
                1,
                20 + i as u64,
                gen,
                &format!("{} {a:?} {b:?}", op.name()),
            );
        }
    }
}

#[test]
fn unary_ops() {
    let shape: &[usize] = &[5, 37];
    for op in UnaryOp::ALL {
        let g = one_op(&[shape], |g, x| g.unary(op, x[0]).unwrap());
        let positive = |r: &mut StdRng| r.random_range(0.05f32..4.0);
        // A wide range reaching the GELU's tails; a few exact zeros for sign and relu.
        let wide = |r: &mut StdRng| {
            if r.random_bool(0.1) {
                0.0
            } else {
                r.random_range(-9.0f32..9.0)
            }
        };
        let gen: &dyn Fn(&mut StdRng) -> f32 = match op {
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => &positive,
            _ => &wide,
        };
        compare(&g, 1, 30, gen, op.name());
    }
}

#[test]
fn reductions() {
    let axes_cases: [&[usize]; 5] = [&[0], &[2], &[1, 2], &[2, 0], &[0, 1, 2]];
    for op in ReduceOp::ALL {
        for (i, axes) in axes_cases.into_iter().enumerate() {
            for keepdim in [false, true] {
                let g = one_op(&[&[3, 4, 5]], |g, x| {
                    g.reduce(op, x[0], axes, keepdim).unwrap()
                });
                compare(
                    &g,
                    1,
                    40 + i as u64,
                    &uniform,
                    &format!("{} {axes:?} {keepdim}", op.name()),
                );
            }
        }
    }
    // Over the batch: the mean divides by the bound batch.
    let mut g = Graph::new("batch-mean");
    let x = g.input("x", TensorType::f32(Shape::batched(&[4])));
    let y = g.reduce(ReduceOp::Mean, x, &[0], false).unwrap();
    g.set_output("y", y);
    compare(&g, 3, 47, &uniform, "reduce_mean over B");
}

#[test]
fn softmax_and_layernorm() {
    for axis in 0..3 {
        let g = one_op(&[&[3, 4, 5]], |g, x| g.softmax(x[0], axis).unwrap());
        compare(
            &g,
            1,
            50 + axis as u64,
            &|r: &mut StdRng| uniform(r) * 5.0,
            &format!("softmax {axis}"),
        );
    }
    for eps in [0.0f32, 1e-6, 0.5] {
        let g = one_op(&[&[2, 3, 16], &[16], &[16]], |g, x| {
            g.layernorm(x[0], x[1], x[2], eps).unwrap()
        });
        compare(&g, 1, 55, &uniform, &format!("layernorm eps {eps}"));
    }
}

#[test]
fn shape_ops() {
    let g = one_op(&[&[2, 3, 4]], |g, x| {
        g.reshape(x[0], Shape::fixed(&[4, 6])).unwrap()
    });
    compare(&g, 1, 60, &uniform, "reshape");
    for perm in [[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1]] {
        let g = one_op(&[&[2, 3, 4]], |g, x| g.permute(x[0], &perm).unwrap());
        compare(&g, 1, 61, &uniform, &format!("permute {perm:?}"));
    }
    for axis in 0..3 {
        let mut s = [vec![2, 3, 4], vec![2, 3, 4], vec![2, 3, 4]];
        s[1][axis] = 1;
        s[2][axis] = 5;
        let g = one_op(&[&s[0], &s[1], &s[2]], |g, x| g.concat(x, axis).unwrap());
        compare(&g, 1, 62, &uniform, &format!("concat {axis}"));
        let g = one_op(&[&[4, 5, 6]], |g, x| {
            g.slice(x[0], axis, 1, 3 + axis).unwrap()
        });
        compare(&g, 1, 63, &uniform, &format!("slice {axis}"));
    }
    let g = one_op(&[&[3, 1]], |g, x| {
        g.broadcast(x[0], Shape::fixed(&[2, 3, 5])).unwrap()
    });
    compare(&g, 1, 64, &uniform, "broadcast");
    // Broadcast to the batch and reshape keeping it.
    let mut g = Graph::new("batched-shapes");
    let x = g.input("x", TensorType::f32(Shape::batched(&[6])));
    let p = g.param(
        "p",
        false,
        Init::Checkpoint,
        TensorType::f32(Shape::fixed(&[1, 6])),
    );
    let pb = g
        .broadcast(p, Shape(vec![Dim::Batch, Dim::Fixed(6)]))
        .unwrap();
    let y = g.binary(BinaryOp::Sub, x, pb).unwrap();
    let y = g.reshape(y, Shape::batched(&[2, 3])).unwrap();
    g.set_output("y", y);
    let mut w = WeightStore::new();
    w.insert("p", HostTensor::new(vec![1, 6], values(&mut rng(65), 6)));
    let inputs = random_inputs(&g, 4, &mut rng(66), &uniform);
    compare_inputs(&g, &inputs, &w, 1e-7, "batched shapes");
}

// ---- fused ops -----------------------------------------------------------------------------

/// The graphs of a few fused nodes of each kind (with their decompositions checked
/// separately): (name, graph).
fn fused_graphs() -> Vec<(String, Graph)> {
    let mut v = vec![];
    for (s, z) in [
        (vec![2, 3, 4], vec![3, 1]),
        (vec![2, 3, 4], vec![2, 3, 1]),
        (vec![5], vec![1]),
        (vec![2, 3, 4], vec![]),
    ] {
        v.push((
            format!("softmax_sink {s:?} {z:?}"),
            one_op(&[&s, &z], |g, x| g.softmax_sink(x[0], x[1]).unwrap()),
        ));
    }
    // q, k, v and (with a sink) z.
    let att: [&[&[usize]]; 5] = [
        &[&[2, 5, 8], &[2, 6, 8], &[2, 6, 3]],
        &[&[2, 5, 8], &[2, 6, 8], &[2, 6, 3], &[5, 1]],
        &[&[3, 1, 5, 8], &[2, 6, 8], &[6, 4], &[3, 2, 5, 1]],
        &[&[5, 8], &[6, 8], &[2, 6, 4], &[2, 5, 1]],
        &[&[4, 5, 8], &[4, 6, 8], &[4, 6, 8], &[4, 1, 1]],
    ];
    for (i, shapes) in att.into_iter().enumerate() {
        v.push((
            format!("attention {i}"),
            one_op(shapes, |g, x| {
                g.attention(x[0], x[1], x[2], x.get(3).copied(), 0.35)
                    .unwrap()
            }),
        ));
    }
    for x_shape in [vec![2, 3, 6], vec![6]] {
        for bias in [false, true] {
            for act in Activation::ALL {
                for residual in [false, true] {
                    let mut out = x_shape.clone();
                    *out.last_mut().unwrap() = 5;
                    let shapes = [x_shape.clone(), vec![5, 6], vec![5], out];
                    let g = one_op(&[&shapes[0], &shapes[1], &shapes[2], &shapes[3]], |g, x| {
                        g.linear(
                            x[0],
                            x[1],
                            bias.then_some(x[2]),
                            act,
                            residual.then_some(x[3]),
                        )
                        .unwrap()
                    });
                    v.push((
                        format!(
                            "linear {x_shape:?} bias {bias} {} residual {residual}",
                            act.name()
                        ),
                        g,
                    ));
                }
            }
        }
    }
    // x, gamma, dy (rows of 37 exercise the 16-lane sums' tail).
    for x_shape in [vec![2, 3, 6], vec![4, 37], vec![48]] {
        let d = *x_shape.last().unwrap();
        v.push((
            format!("layernorm_grad {x_shape:?}"),
            one_op(&[&x_shape, &[d], &x_shape], |g, x| {
                g.add(
                    eptc_ir::Op::LayerNormGrad { eps: 1e-5 },
                    &[x[0], x[1], x[2]],
                )
                .unwrap()
            }),
        ));
    }
    v
}

#[test]
fn fused_ops_match_cpu_and_their_decompositions() {
    for (i, (what, g)) in fused_graphs().into_iter().enumerate() {
        let inputs = random_inputs(&g, 1, &mut rng(70 + i as u64), &|r: &mut StdRng| {
            uniform(r) * 1.5
        });
        let w = WeightStore::new();
        // The CPU's fused kernels against the f64 definitions.
        compare_inputs(&g, &inputs, &w, 1e-5, &what);
        // The f64 definitions against the f64 decompositions (nearly exact).
        let mut d = g.clone();
        assert!(
            lower_unsupported(&mut d, &|_| false).unwrap() >= 1,
            "{what}"
        );
        let feed: Vec<(&str, HostTensor)> = inputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let fused = eval_host(&g, &feed, &w).unwrap();
        let prim = eval_host(&d, &feed, &w).unwrap();
        for ((_, a), (_, b)) in fused.iter().zip(&prim) {
            assert_eq!(a.shape, b.shape, "{what}");
            let e = rel_l2(&b.to_host(), a);
            assert!(e <= 1e-7, "{what}: decomposition differs by {e:e}");
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!(
                    (x - y).abs() <= 1e-13 * (1.0 + y.abs()),
                    "{what}: {x} vs {y}"
                );
            }
        }
        // And the CPU running the decomposition.
        compare_inputs(&d, &inputs, &w, 1e-5, &format!("{what}, decomposed"));
    }
}

#[test]
fn softmax_sink_specials() {
    // z = -inf is the plain softmax; a NaN in a row makes the row NaN.
    let g = one_op(&[&[2, 3], &[2, 1]], |g, x| {
        g.softmax_sink(x[0], x[1]).unwrap()
    });
    let s = Tensor64::new(vec![2, 3], vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
    let z = Tensor64::new(vec![2, 1], vec![f64::NEG_INFINITY, f64::NAN]);
    let out = eval(&g, &values_of(&[("x0", s), ("x1", z)])).unwrap();
    let e = 1.0 + 1f64.exp() + 2f64.exp();
    let want = [1.0 / e, 1f64.exp() / e, 2f64.exp() / e];
    for (g, w) in out[0].1.data[..3].iter().zip(want) {
        assert!((g - w).abs() < 3e-16);
    }
    assert!(out[0].1.data[3..].iter().all(|v| v.is_nan()));
}

// ---- whole graphs --------------------------------------------------------------------------

#[test]
fn tiny_vit_matches_cpu_and_the_hand_written_forward() {
    let g = tiny_vit();
    let w = tiny_vit::weights(&g, 7);
    let b = 3;
    let inputs = random_inputs(&g, b, &mut rng(8), &uniform);
    let worst = compare_inputs(&g, &inputs, &w, 1e-5, "tiny ViT");
    eprintln!("tiny ViT: worst relative L2 error of the CPU {worst:e}");

    // The test suite's own f64 forward (GELU by Simpson's rule) agrees closely.
    let feed: Vec<(&str, HostTensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let out = eval_host(&g, &feed, &w).unwrap();
    let img = &inputs[0].1;
    let per = 3 * 8 * 8;
    for n in 0..b {
        let px: Vec<f64> = img.data()[n * per..(n + 1) * per]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let (logits, feats) = tiny_vit::reference_one(&w, &px);
        let c = tiny_vit::CLASSES;
        let d = tiny_vit::D;
        for (got, want) in out[0].1.data[n * c..(n + 1) * c].iter().zip(&logits) {
            assert!(
                (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
                "{got} vs {want}"
            );
        }
        for (got, want) in out[1].1.data[n * d..(n + 1) * d].iter().zip(&feats) {
            assert!(
                (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
                "{got} vs {want}"
            );
        }
    }
}

#[test]
fn fused_vit_block_matches_cpu() {
    // A transformer block written with the fused ops, batched, with a trainable sink.
    let (n, dm, hid) = (5, 8, 16);
    let mut g = Graph::new("fused-block");
    let x = g.input("x", TensorType::f32(Shape::batched(&[n, dm])));
    let p = |g: &mut Graph, name: &str, s: &[usize]| {
        g.param(
            name,
            false,
            Init::Checkpoint,
            TensorType::f32(Shape::fixed(s)),
        )
    };
    let (g1, b1) = (p(&mut g, "ln1.g", &[dm]), p(&mut g, "ln1.b", &[dm]));
    let h = g.layernorm(x, g1, b1, 1e-6).unwrap();
    let mut qkv = vec![];
    for name in ["q", "k", "v"] {
        let w = p(&mut g, &format!("{name}.w"), &[dm, dm]);
        let b = p(&mut g, &format!("{name}.b"), &[dm]);
        let y = g.linear(h, w, Some(b), Activation::None, None).unwrap();
        let y = g.reshape(y, Shape::batched(&[n, 2, 4])).unwrap();
        qkv.push(g.permute(y, &[0, 2, 1, 3]).unwrap());
    }
    let z = g.param(
        "sink",
        true,
        Init::Zeros,
        TensorType::f32(Shape::fixed(&[n, 1])),
    );
    let a = g.attention(qkv[0], qkv[1], qkv[2], Some(z), 0.5).unwrap();
    let a = g.permute(a, &[0, 2, 1, 3]).unwrap();
    let a = g.reshape(a, Shape::batched(&[n, dm])).unwrap();
    let wo = p(&mut g, "o.w", &[dm, dm]);
    let t = g.linear(a, wo, None, Activation::None, Some(x)).unwrap();
    let (g2, b2) = (p(&mut g, "ln2.g", &[dm]), p(&mut g, "ln2.b", &[dm]));
    let h = g.layernorm(t, g2, b2, 1e-6).unwrap();
    let (w1, bb1) = (p(&mut g, "fc1.w", &[hid, dm]), p(&mut g, "fc1.b", &[hid]));
    let h = g.linear(h, w1, Some(bb1), Activation::Gelu, None).unwrap();
    let (w2, bb2) = (p(&mut g, "fc2.w", &[dm, hid]), p(&mut g, "fc2.b", &[dm]));
    let y = g
        .linear(h, w2, Some(bb2), Activation::None, Some(t))
        .unwrap();
    let loss = g.reduce(ReduceOp::LogSumExp, y, &[1, 2], false).unwrap();
    g.set_output("y", y);
    g.set_output("loss", loss);
    eptc_ir::verify(&g).unwrap();
    let mut w = WeightStore::new();
    let mut r = rng(90);
    for (id, name, _) in g.params() {
        let shape = g.ty(id).shape.as_fixed().unwrap();
        let v = values(&mut r, shape.iter().product());
        w.insert(name, HostTensor::new(shape, v));
    }
    let inputs = random_inputs(&g, 2, &mut rng(91), &uniform);
    compare_inputs(&g, &inputs, &w, 1e-5, "fused block");
    let mut d = g.clone();
    assert_eq!(lower_unsupported(&mut d, &|_| false).unwrap(), 7);
    compare_inputs(&d, &inputs, &w, 1e-5, "fused block, decomposed");
}

// ---- errors --------------------------------------------------------------------------------

#[test]
fn errors_name_the_problem() {
    let g = tiny_vit();
    let w = tiny_vit::weights(&g, 1);
    let img = HostTensor::new(vec![1, 3, 8, 8], vec![0.0; 192]);
    // A missing param is named.
    let mut partial = w.clone();
    partial.remove("fc1.weight");
    let err = eval_host(&g, &[("pixel_values", img.clone())], &partial).unwrap_err();
    assert!(err.contains("fc1.weight"), "{err}");
    // A missing input, a wrong input shape, a wrong param shape.
    let err = eval_host(&g, &[], &w).unwrap_err();
    assert!(err.contains("pixel_values"), "{err}");
    let bad = HostTensor::new(vec![1, 3, 8, 4], vec![0.0; 96]);
    let err = eval_host(&g, &[("pixel_values", bad)], &w).unwrap_err();
    assert!(err.contains("pixel_values"), "{err}");
    let mut wrong = w.clone();
    wrong.insert("cls", HostTensor::zeros(vec![1, tiny_vit::D]));
    let err = eval_host(&g, &[("pixel_values", img.clone())], &wrong).unwrap_err();
    assert!(err.contains("cls"), "{err}");
    // Batch 0 is refused; inputs disagreeing on the batch too.
    let empty = HostTensor::new(vec![0, 3, 8, 8], vec![]);
    assert!(eval_host(&g, &[("pixel_values", empty)], &w).is_err());
    let mut g2 = Graph::new("two");
    let a = g2.input("a", TensorType::f32(Shape::batched(&[2])));
    let b = g2.input("b", TensorType::f32(Shape::batched(&[2])));
    let c = g2.binary(BinaryOp::Add, a, b).unwrap();
    g2.set_output("c", c);
    let err = eval(
        &g2,
        &values_of(&[
            ("a", Tensor64::zeros(vec![2, 2])),
            ("b", Tensor64::zeros(vec![3, 2])),
        ]),
    )
    .unwrap_err();
    assert!(err.contains("\"b\"") || err.contains("\"a\""), "{err}");
}
