//! Every VJP rule against central finite differences, both evaluated in f64 by the IR's
//! reference interpreter (`eptc_ir::reference`), so the comparison is of the math, not of
//! f32 rounding.
//!
//! Each case builds a graph whose trainable params (and inputs with a batch dimension)
//! feed one op; the loss is `sum(y * R)` with a fixed random `R`, so every output element
//! weighs differently.

use std::collections::HashMap;

use eptc_autodiff::{differentiate, differentiate_with, grad_output, loss, Options};
use eptc_ir::reference::{eval, Tensor64};
use eptc_ir::{
    Activation, BinaryOp, Dim, Graph, Init, NodeId, Op, ReduceOp, Shape, TensorType, UnaryOp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BATCH: usize = 2;

struct Case {
    g: Graph,
    /// Value ranges: positive-only leaves (for log, sqrt, ...).
    positive: bool,
}

fn new_case() -> Case {
    Case {
        g: Graph::new("fd"),
        positive: false,
    }
}

impl Case {
    fn p(&mut self, name: &str, shape: &[usize]) -> NodeId {
        self.g.param(
            name,
            true,
            Init::Zeros,
            TensorType::f32(Shape::fixed(shape)),
        )
    }
    fn frozen(&mut self, name: &str, shape: &[usize]) -> NodeId {
        self.g.param(
            name,
            false,
            Init::Checkpoint,
            TensorType::f32(Shape::fixed(shape)),
        )
    }
    fn x(&mut self, name: &str, shape: &[usize]) -> NodeId {
        self.g.input(name, TensorType::f32(Shape::batched(shape)))
    }
}

fn random(rng: &mut StdRng, shape: Vec<usize>, positive: bool) -> Tensor64 {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            let v: f64 = rng.random_range(-1.5..1.5);
            if positive {
                v.abs() + 0.3
            } else {
                v
            }
        })
        .collect();
    Tensor64::new(shape, data)
}

/// Finish the case: loss = sum(y * R); check d loss / d every trainable param.
fn check(mut case: Case, y: NodeId, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let g = &mut case.g;
    let yshape = g.ty(y).shape.clone();
    let r = g.input("R", TensorType::f32(yshape.clone()));
    let t = g.binary(BinaryOp::Mul, y, r).unwrap();
    let axes: Vec<usize> = (0..yshape.rank()).collect();
    let l = if axes.is_empty() {
        t
    } else {
        g.reduce(ReduceOp::Sum, t, &axes, false).unwrap()
    };
    g.set_output("loss", l);
    check_graph(&case.g, "loss", case.positive, &mut rng);
}

/// Both ways of differentiating attention (matrix products, or the fused
/// `attention_lse` / `attention_grad` ops) against finite differences.
fn check_graph(g: &Graph, loss_name: &str, positive: bool, rng: &mut StdRng) {
    let state = rng.clone();
    check_graph_with(g, loss_name, positive, rng, &Options::default());
    let has_attention = g
        .node_ids()
        .iter()
        .any(|&id| matches!(g.node(id).op, Op::Attention { .. }));
    if has_attention {
        let mut rng = state;
        let fused = Options {
            fused_attention: true,
            ..Default::default()
        };
        check_graph_with(g, loss_name, positive, &mut rng, &fused);
    }
}

fn check_graph_with(g: &Graph, loss_name: &str, positive: bool, rng: &mut StdRng, opts: &Options) {
    eptc_ir::verify(g).unwrap();
    let train = differentiate_with(g, loss_name, opts).unwrap();
    eptc_ir::verify(&train).unwrap();
    let fused_nodes = train
        .node_ids()
        .iter()
        .filter(|&&id| {
            matches!(
                train.node(id).op,
                Op::AttentionGrad { .. } | Op::AttentionLse { .. }
            )
        })
        .count();
    assert_eq!(
        fused_nodes > 0,
        opts.fused_attention
            && g.node_ids()
                .iter()
                .any(|&id| matches!(g.node(id).op, Op::Attention { .. })),
        "fused attention backward nodes: {fused_nodes}"
    );
    let mut values: HashMap<String, Tensor64> = HashMap::new();
    for id in g.node_ids() {
        let (name, pos) = match &g.node(id).op {
            Op::Input { name } => (name.clone(), positive && name != "R"),
            Op::Param { name, .. } => (name.clone(), positive),
            _ => continue,
        };
        let shape = g.ty(id).shape.resolve(BATCH);
        values.insert(name, random(rng, shape, pos));
    }
    if let Some(lab) = g.find_input(loss::LABELS) {
        // Labels in [0, 1] (multi-hot / probabilities).
        let shape = g.ty(lab).shape.resolve(BATCH);
        let n = shape.iter().product();
        let data = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
        values.insert(loss::LABELS.into(), Tensor64::new(shape, data));
    }
    let outs = eval(&train, &values).unwrap();
    let get = |outs: &[(String, Tensor64)], n: &str| {
        outs.iter()
            .find(|(k, _)| k == n)
            .unwrap_or_else(|| panic!("no output {n}"))
            .1
            .clone()
    };
    let loss_of = |vals: &HashMap<String, Tensor64>| -> f64 {
        let o = eval(g, vals).unwrap();
        get(&o, loss_name).data[0]
    };
    let mut checked = 0;
    for (_, name, trainable) in g.params() {
        if !trainable {
            continue;
        }
        let grad = get(&outs, &grad_output(name));
        let p = values[name].clone();
        assert_eq!(grad.shape, p.shape, "gradient shape of {name}");
        let h = 1e-6;
        let mut num = vec![0.0; p.data.len()];
        for (i, n) in num.iter_mut().enumerate() {
            let mut v = values.clone();
            v.get_mut(name).unwrap().data[i] = p.data[i] + h;
            let up = loss_of(&v);
            v.get_mut(name).unwrap().data[i] = p.data[i] - h;
            let down = loss_of(&v);
            *n = (up - down) / (2.0 * h);
        }
        let diff: f64 = num
            .iter()
            .zip(&grad.data)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = num.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(
            norm > 1e-3,
            "gradient of {name} is ~0 ({norm:e}): the case tests nothing"
        );
        assert!(
            diff <= 1e-6 * norm.max(1.0),
            "{name}: |analytic - numeric| = {diff:e}, |numeric| = {norm:e}\nanalytic {:?}\nnumeric {:?}",
            &grad.data[..grad.data.len().min(8)],
            &num[..num.len().min(8)]
        );
        checked += 1;
    }
    assert!(checked > 0);
}

#[test]
fn binary_ops_with_broadcasting() {
    for (i, op) in BinaryOp::ALL.into_iter().enumerate() {
        if op == BinaryOp::Equal {
            continue;
        }
        let mut c = new_case();
        let a = c.p("a", &[3, 1, 4]);
        let b = c.p("b", &[5, 4]);
        let x = c.x("x", &[3, 5, 4]);
        c.positive = op == BinaryOp::Div;
        let t = c.g.binary(op, a, b).unwrap();
        let y = c.g.binary(BinaryOp::Mul, t, x).unwrap();
        check(c, y, i as u64);
    }
}

#[test]
fn unary_ops() {
    for (i, op) in UnaryOp::ALL.into_iter().enumerate() {
        if matches!(op, UnaryOp::Sign | UnaryOp::GeluDeriv) {
            continue;
        }
        let mut c = new_case();
        c.positive = matches!(
            op,
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip
        );
        let a = c.p("a", &[4, 6]);
        let y = c.g.unary(op, a).unwrap();
        check(c, y, 100 + i as u64);
    }
}

#[test]
fn matmul_all_transposes_and_broadcast_weights() {
    for (i, (ta, tb)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        let mut c = new_case();
        let a_shape = if ta { [4, 3] } else { [3, 4] };
        let b_shape = if tb { [5, 4] } else { [4, 5] };
        let a = c.p("a", &a_shape);
        let b = c.p("b", &b_shape);
        // a batched operand times a shared weight, and the weights' own product
        let xs = if ta { [4, 3] } else { [3, 4] };
        let x = c.x("x", &xs);
        let y1 = c.g.matmul(x, b, ta, tb).unwrap();
        let y2 = c.g.matmul(a, b, ta, tb).unwrap();
        let y = c.g.binary(BinaryOp::Add, y1, y2).unwrap();
        check(c, y, 200 + i as u64);
    }
}

#[test]
fn reductions_over_axes() {
    let mut seed = 300;
    for op in ReduceOp::ALL {
        for (axes, keepdim) in [(vec![1], true), (vec![0, 2], false), (vec![2], false)] {
            let mut c = new_case();
            let a = c.p("a", &[3, 4, 5]);
            let y = c.g.reduce(op, a, &axes, keepdim).unwrap();
            seed += 1;
            check(c, y, seed);
        }
    }
}

#[test]
fn mean_over_the_batch() {
    let mut c = new_case();
    let a = c.p("a", &[4]);
    let x = c.x("x", &[4]);
    let t = c.g.binary(BinaryOp::Mul, x, a).unwrap();
    let y = c.g.reduce(ReduceOp::Mean, t, &[0], false).unwrap();
    check(c, y, 350);
}

#[test]
fn max_shares_ties_like_amax() {
    // A row with a tie: the gradient is split evenly (torch.amax).
    let mut g = Graph::new("tie");
    let a = g.param(
        "a",
        true,
        Init::Zeros,
        TensorType::f32(Shape::fixed(&[1, 3])),
    );
    let m = g.reduce(ReduceOp::Max, a, &[1], false).unwrap();
    let l = g.reduce(ReduceOp::Sum, m, &[0], false).unwrap();
    g.set_output("loss", l);
    let t = differentiate(&g, "loss").unwrap();
    let v = HashMap::from([(
        "a".to_string(),
        Tensor64::new(vec![1, 3], vec![2.0, 0.5, 2.0]),
    )]);
    let o = eval(&t, &v).unwrap();
    let grad = &o.iter().find(|(k, _)| k == "grad.a").unwrap().1;
    assert_eq!(grad.data, vec![0.5, 0.0, 0.5]);
}

#[test]
fn softmax_and_layernorm() {
    for axis in [0, 1] {
        let mut c = new_case();
        let a = c.p("a", &[3, 5]);
        let y = c.g.softmax(a, axis).unwrap();
        check(c, y, 400 + axis as u64);
    }
    let mut c = new_case();
    let x = c.x("x", &[3, 6]);
    let p = c.p("p", &[3, 6]);
    let gamma = c.p("gamma", &[6]);
    let beta = c.p("beta", &[6]);
    let xp = c.g.binary(BinaryOp::Add, x, p).unwrap();
    let y = c.g.layernorm(xp, gamma, beta, 1e-5).unwrap();
    check(c, y, 410);
}

#[test]
fn shape_ops() {
    // reshape, permute, concat, slice, broadcast
    let mut c = new_case();
    let a = c.p("a", &[2, 6]);
    let b = c.p("b", &[3, 6]);
    let r = c.g.reshape(a, Shape::fixed(&[3, 4])).unwrap();
    let r = c.g.permute(r, &[1, 0]).unwrap(); // [4, 3]
    let r = c.g.reshape(r, Shape::fixed(&[2, 6])).unwrap();
    let cat = c.g.concat(&[b, r, b], 0).unwrap(); // [8, 6]
    let s = c.g.slice(cat, 0, 2, 7).unwrap(); // [5, 6]
    let s = c.g.slice(s, 1, 1, 5).unwrap(); // [5, 4]
    let bc =
        c.g.broadcast(s, Shape::new([Dim::Batch, Dim::Fixed(5), Dim::Fixed(4)]))
            .unwrap();
    let x = c.x("x", &[5, 4]);
    let y = c.g.binary(BinaryOp::Mul, bc, x).unwrap();
    check(c, y, 500);
}

#[test]
fn patchify() {
    let mut c = new_case();
    let a = c.p("a", &[3, 4, 6]);
    let x = c.x("x", &[3, 4, 6]);
    let t = c.g.binary(BinaryOp::Add, x, a).unwrap();
    let y = c.g.patchify(t, 2).unwrap(); // [B, 6, 12]
    check(c, y, 600);
}

#[test]
fn softmax_sink() {
    let mut c = new_case();
    let s = c.p("s", &[2, 3, 5]);
    let z = c.p("z", &[3, 1]);
    let y = c.g.softmax_sink(s, z).unwrap();
    check(c, y, 700);
}

#[test]
fn attention_with_and_without_sink() {
    for (i, sink) in [false, true].into_iter().enumerate() {
        let mut c = new_case();
        let q = c.p("q", &[2, 5, 4]);
        let k = c.p("k", &[2, 5, 4]);
        let v = c.p("v", &[2, 5, 3]);
        let x = c.x("x", &[2, 5, 4]);
        let qx = c.g.binary(BinaryOp::Add, q, x).unwrap(); // [B, 2, 5, 4]
        let z = sink.then(|| c.p("z", &[5, 1]));
        let y = c.g.attention(qx, k, v, z, 0.7).unwrap();
        check(c, y, 800 + i as u64);
    }
}

#[test]
fn attention_sink_gradient_from_frozen_qkv() {
    // The EPT case: only the sink logit (from the prompts) trains.
    let mut c = new_case();
    let q = c.x("q", &[2, 5, 4]);
    let k = c.frozen("k", &[2, 5, 4]);
    let v = c.frozen("v", &[2, 5, 3]);
    let p = c.p("prompt", &[5, 3]);
    let z = c.g.reduce(ReduceOp::LogSumExp, p, &[1], true).unwrap();
    let y = c.g.attention(q, k, v, Some(z), 0.5).unwrap();
    check(c, y, 850);
}

#[test]
fn linear_with_epilogues() {
    let mut seed = 900;
    for act in Activation::ALL {
        for (bias, residual) in [(false, false), (true, false), (true, true), (false, true)] {
            let mut c = new_case();
            let x = c.x("x", &[3, 4]);
            let p = c.p("p", &[3, 4]);
            let w = c.p("w", &[5, 4]);
            let b = bias.then(|| c.p("b", &[5]));
            // The residual operand must have the output's exact shape.
            let r = residual.then(|| {
                let rp = c.p("r", &[3, 5]);
                let rx = c.x("rx", &[3, 5]);
                c.g.binary(BinaryOp::Add, rx, rp).unwrap()
            });
            let xp = c.g.binary(BinaryOp::Add, x, p).unwrap();
            let y = c.g.linear(xp, w, b, act, r).unwrap();
            seed += 1;
            check(c, y, seed);
        }
    }
}

#[test]
fn losses() {
    for (i, kind) in [loss::Loss::BinaryCrossEntropy, loss::Loss::CrossEntropy]
        .into_iter()
        .enumerate()
    {
        let mut g = Graph::new("loss");
        let x = g.input("x", TensorType::f32(Shape::batched(&[4])));
        let w = g.param(
            "w",
            true,
            Init::Zeros,
            TensorType::f32(Shape::fixed(&[3, 4])),
        );
        let b = g.param("b", true, Init::Zeros, TensorType::f32(Shape::fixed(&[3])));
        let logits = g.linear(x, w, Some(b), Activation::None, None).unwrap();
        g.set_output("logits", logits);
        loss::add_loss(&mut g, "logits", kind).unwrap();
        let mut rng = StdRng::seed_from_u64(1000 + i as u64);
        check_graph(&g, loss::LOSS, false, &mut rng);
    }
}

#[test]
fn frozen_weights_get_no_gradient_nodes() {
    // A frozen linear before the trainable part: no matmul produces a [5, 4] gradient.
    let mut g = Graph::new("frozen");
    let x = g.input("x", TensorType::f32(Shape::batched(&[4])));
    let w = g.param(
        "w",
        false,
        Init::Checkpoint,
        TensorType::f32(Shape::fixed(&[5, 4])),
    );
    let h = g.param(
        "h",
        true,
        Init::Zeros,
        TensorType::f32(Shape::fixed(&[2, 5])),
    );
    let y = g.linear(x, w, None, Activation::Gelu, None).unwrap();
    let y = g.linear(y, h, None, Activation::None, None).unwrap();
    let l = g.reduce(ReduceOp::Sum, y, &[0, 1], false).unwrap();
    g.set_output("loss", l);
    let t = differentiate(&g, "loss").unwrap();
    for id in t.node_ids() {
        if matches!(t.node(id).op, Op::Param { .. }) {
            continue;
        }
        assert_ne!(
            t.ty(id).shape,
            Shape::fixed(&[5, 4]),
            "{:?} computes a frozen weight's gradient",
            t.node(id).op
        );
        // Nothing before the trainable head is differentiated: no gelu_deriv.
        assert!(!matches!(t.node(id).op, Op::Unary(UnaryOp::GeluDeriv)));
    }
    assert!(t.output("grad.h").is_some());
}

#[test]
fn slices_of_one_tensor_disjoint_gapped_and_overlapping() {
    // q, k, v from one projection (disjoint pieces: one concat), a gap, and overlaps
    // (padded sums).
    for (i, ranges) in [
        vec![(0, 2), (2, 4), (4, 6)],
        vec![(4, 6), (0, 1)],
        vec![(0, 4), (2, 6), (1, 3)],
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = new_case();
        let a = c.p("a", &[6, 4]);
        let x = c.x("x", &[1, 4]);
        let ax = c.g.binary(BinaryOp::Mul, a, x).unwrap(); // [B, 6, 4]
        let mut acc: Option<NodeId> = None;
        for (j, (s, e)) in ranges.into_iter().enumerate() {
            let piece = c.g.slice(ax, 1, s, e).unwrap();
            let piece = c.g.reduce(ReduceOp::Sum, piece, &[1], false).unwrap(); // [B, 4]
            let w = c.x(&format!("w{j}"), &[4]);
            let t = c.g.binary(BinaryOp::Mul, piece, w).unwrap();
            acc = Some(match acc {
                None => t,
                Some(p) => c.g.binary(BinaryOp::Add, p, t).unwrap(),
            });
        }
        check(c, acc.unwrap(), 1100 + i as u64);
    }
}
