//! Each rule on a minimal graph: the rewrite fires, the result has the expected ops, and
//! the optimized graph computes what the original did (CPU backend, random values).

use eptc_backend::{Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_ir::{
    BinaryOp, Graph, HostTensor, Init, NodeId, Op, Shape, TensorType, UnaryOp, WeightStore,
};
use eptc_opt::{optimize, Limits, Summary};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn all(_: &str) -> bool {
    true
}

fn random(shape: &[usize], rng: &mut StdRng) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(
        shape.to_vec(),
        (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect(),
    )
}

/// Run `g` on random inputs and params (batch 2), returning the outputs.
fn run(g: &Graph, seed: u64) -> Vec<(String, HostTensor)> {
    let (w, inputs) = values(g, seed);
    run_with(g, &w, &inputs)
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Optimize for a backend supporting everything; check equivalence; return the result.
fn check(g: &Graph) -> (Graph, Summary) {
    let (o, s) = optimize(g, &all, &Limits::default()).unwrap();
    eptc_ir::verify(&o).unwrap();
    let (a, b) = (run(g, 1), run(&o, 1));
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(ta.shape, tb.shape);
        let e = rel(tb.data(), ta.data());
        assert!(
            e <= 1e-5,
            "{na}: optimized differs by {e:e}\n{}",
            eptc_ir::text::print(&o).unwrap()
        );
    }
    (o, s)
}

fn count(g: &Graph, f: impl Fn(&Op) -> bool) -> usize {
    g.node_ids()
        .into_iter()
        .filter(|&id| f(&g.node(id).op))
        .count()
}

/// q, k, v `[B, 2, 5, 4]` and the scaled logits.
fn scores(g: &mut Graph) -> (NodeId, NodeId, NodeId, NodeId) {
    let t = TensorType::f32(Shape::batched(&[2, 5, 4]));
    let (q, k, v) = (
        g.input("q", t.clone()),
        g.input("k", t.clone()),
        g.input("v", t),
    );
    let qk = g.matmul(q, k, false, true).unwrap();
    let c = g.scalar(0.5);
    let s = g.binary(BinaryOp::Mul, qk, c).unwrap();
    (q, k, v, s)
}

#[test]
fn attention_is_fused() {
    let mut g = Graph::new("t");
    let (_, _, v, s) = scores(&mut g);
    let p = g.softmax(s, 3).unwrap();
    let o = g.matmul(p, v, false, false).unwrap();
    g.set_output("o", o);
    let (o, sum) = check(&g);
    assert_eq!(
        count(
            &o,
            |op| matches!(op, Op::Attention { scale, sink: false } if *scale == 0.5)
        ),
        1
    );
    assert_eq!(count(&o, |op| matches!(op, Op::Softmax { .. })), 0);
    assert_eq!(sum.rules_fired["attention"], 1);
}

/// EPT cat: `softmax(concat(broadcast(P), S))[.., L:]` becomes the sink, then attention.
#[test]
fn ept_cat_becomes_attention_with_sink() {
    let mut g = Graph::new("t");
    let (_, _, v, s) = scores(&mut g);
    let p = g.param(
        "ept.prompts.0",
        true,
        Init::Zeros,
        TensorType::f32(Shape::fixed(&[5, 3])),
    );
    let pb = g.broadcast(p, Shape::batched(&[2, 5, 3])).unwrap();
    let cat = g.concat(&[pb, s], 3).unwrap();
    let sm = g.softmax(cat, 3).unwrap();
    let a = g.slice(sm, 3, 3, 8).unwrap();
    let o = g.matmul(a, v, false, false).unwrap();
    g.set_output("o", o);
    let (o, sum) = check(&g);
    assert_eq!(
        count(&o, |op| matches!(op, Op::Attention { sink: true, .. })),
        1
    );
    assert_eq!(
        count(&o, |op| matches!(
            op,
            Op::Concat { .. } | Op::Slice { .. } | Op::Softmax { .. }
        )),
        0
    );
    // The sink is logsumexp over the prompt itself ([N, 1]), not over its broadcast.
    let lse: Vec<_> = o
        .node_ids()
        .into_iter()
        .filter(|&id| matches!(o.node(id).op, Op::Reduce { .. }))
        .collect();
    assert_eq!(lse.len(), 1);
    assert_eq!(o.ty(lse[0]).shape, Shape::fixed(&[5, 1]));
    for r in [
        "ept-sink",
        "lse-of-broadcast",
        "sink-drop-broadcast",
        "attention-sink",
    ] {
        assert!(
            sum.rules_fired.get(r).copied().unwrap_or(0) >= 1,
            "{r} did not fire: {:?}",
            sum.rules_fired
        );
    }
}

/// EPT multi-cat: the prompt row is scaled by each logit row's range; the sink is
/// logsumexp(alpha * P) per batch, head and row.
#[test]
fn ept_multi_cat_becomes_attention_with_sink() {
    let mut g = Graph::new("t");
    let (_, _, v, s) = scores(&mut g);
    let p = g.param(
        "ept.prompts.0",
        true,
        Init::Zeros,
        TensorType::f32(Shape::fixed(&[5, 3])),
    );
    let mx = g.reduce(eptc_ir::ReduceOp::Max, s, &[3], true).unwrap();
    let mn = g.reduce(eptc_ir::ReduceOp::Min, s, &[3], true).unwrap();
    let alpha = g.binary(BinaryOp::Sub, mx, mn).unwrap();
    let row = g.binary(BinaryOp::Mul, alpha, p).unwrap();
    let cat = g.concat(&[row, s], 3).unwrap();
    let sm = g.softmax(cat, 3).unwrap();
    let a = g.slice(sm, 3, 3, 8).unwrap();
    let o = g.matmul(a, v, false, false).unwrap();
    g.set_output("o", o);
    let (o, _) = check(&g);
    assert_eq!(
        count(&o, |op| matches!(op, Op::Attention { sink: true, .. })),
        1
    );
    assert_eq!(count(&o, |op| matches!(op, Op::Concat { .. })), 0);
}

/// Linear with bias, GELU and residual epilogues.
#[test]
fn linear_epilogues_are_fused() {
    let mut g = Graph::new("t");
    let x = g.input("x", TensorType::f32(Shape::batched(&[3, 6])));
    let f = TensorType::f32;
    let w1 = g.param("w1", false, Init::Checkpoint, f(Shape::fixed(&[8, 6])));
    let b1 = g.param("b1", false, Init::Checkpoint, f(Shape::fixed(&[8])));
    let w2 = g.param("w2", false, Init::Checkpoint, f(Shape::fixed(&[6, 8])));
    let b2 = g.param("b2", false, Init::Checkpoint, f(Shape::fixed(&[6])));
    let h = g.matmul(x, w1, false, true).unwrap();
    let h = g.binary(BinaryOp::Add, h, b1).unwrap();
    let h = g.unary(UnaryOp::Gelu, h).unwrap();
    let y = g.matmul(h, w2, false, true).unwrap();
    let y = g.binary(BinaryOp::Add, y, b2).unwrap();
    let y = g.binary(BinaryOp::Add, x, y).unwrap();
    g.set_output("y", y);
    let (o, _) = check(&g);
    assert_eq!(
        count(&o, |op| matches!(
            op,
            Op::Linear {
                bias: true,
                activation: eptc_ir::Activation::Gelu,
                residual: false
            }
        )),
        1
    );
    assert_eq!(
        count(&o, |op| matches!(
            op,
            Op::Linear {
                bias: true,
                activation: eptc_ir::Activation::None,
                residual: true
            }
        )),
        1
    );
    assert_eq!(
        count(&o, |op| matches!(
            op,
            Op::Binary(_) | Op::Unary(_) | Op::MatMul { .. }
        )),
        0
    );
}

/// Reshape chains collapse; a permute undone by its inverse disappears.
#[test]
fn layout_simplifications() {
    let mut g = Graph::new("t");
    let x = g.input("x", TensorType::f32(Shape::batched(&[4, 6])));
    let r = g.reshape(x, Shape::batched(&[24])).unwrap();
    let r = g.reshape(r, Shape::batched(&[2, 12])).unwrap();
    let p = g.permute(r, &[0, 2, 1]).unwrap();
    let p = g.permute(p, &[0, 2, 1]).unwrap();
    let y = g.unary(UnaryOp::Exp, p).unwrap();
    g.set_output("y", y);
    let (o, _) = check(&g);
    assert_eq!(count(&o, |op| matches!(op, Op::Reshape { .. })), 1);
    assert_eq!(count(&o, |op| matches!(op, Op::Permute { .. })), 0);
}

/// A backend without fused ops gets none: extraction respects capabilities.
#[test]
fn unsupported_fused_ops_are_never_extracted() {
    let mut g = Graph::new("t");
    let (_, _, v, s) = scores(&mut g);
    let p = g.softmax(s, 3).unwrap();
    let o = g.matmul(p, v, false, false).unwrap();
    g.set_output("o", o);
    let fused = Op::fused_kinds();
    let (o, _) = optimize(&g, &|k| !fused.contains(&k), &Limits::default()).unwrap();
    assert_eq!(count(&o, |op| op.is_fused()), 0);
    assert_eq!(count(&o, |op| matches!(op, Op::Softmax { .. })), 1);
}

/// Sharing survives: a value used twice is computed once after optimization.
#[test]
fn sharing_is_preserved_and_output_is_deterministic() {
    let mut g = Graph::new("t");
    let x = g.input("x", TensorType::f32(Shape::batched(&[4])));
    let e = g.unary(UnaryOp::Exp, x).unwrap();
    let a = g.binary(BinaryOp::Mul, e, e).unwrap();
    let b = g.binary(BinaryOp::Add, a, e).unwrap();
    g.set_output("b", b);
    let (o1, _) = check(&g);
    assert_eq!(count(&o1, |op| matches!(op, Op::Unary(UnaryOp::Exp))), 1);
    let (o2, _) = optimize(&g, &all, &Limits::default()).unwrap();
    assert_eq!(
        eptc_ir::text::print(&o1).unwrap(),
        eptc_ir::text::print(&o2).unwrap()
    );
}

/// Random values for every param and input of `g` (batch 2), drawn by name.
fn values(g: &Graph, seed: u64) -> (WeightStore, Vec<(String, HostTensor)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = WeightStore::new();
    let mut inputs = Vec::new();
    let mut ids = g.node_ids();
    ids.sort_by_key(|&id| match &g.node(id).op {
        Op::Param { name, .. } | Op::Input { name } => name.clone(),
        _ => String::new(),
    });
    for id in ids {
        let shape = g.ty(id).shape.resolve(2);
        match &g.node(id).op {
            Op::Param { name, .. } => w.insert(name.clone(), random(&shape, &mut rng)),
            Op::Input { name } => inputs.push((name.clone(), random(&shape, &mut rng))),
            _ => {}
        }
    }
    (w, inputs)
}

fn run_with(
    g: &Graph,
    w: &WeightStore,
    inputs: &[(String, HostTensor)],
) -> Vec<(String, HostTensor)> {
    let mut exe = CpuBackend::new()
        .compile(g, w, &CompileOptions::default())
        .unwrap();
    let refs: Vec<(&str, HostTensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    exe.run(&refs).unwrap()
}

/// Optimize, cut the constants out, compute them, and run: same results as `g`.
fn check_folded(g: &Graph) -> (Graph, Summary) {
    let (o, s) = optimize(g, &all, &Limits::default()).unwrap();
    let f = eptc_opt::fold::split_constants(&o).unwrap();
    let (mut w, inputs) = values(g, 5);
    let want = run_with(g, &w, &inputs);
    for (name, t) in run_with(&f.constants, &w, &[]) {
        w.insert(name, t);
    }
    let got = run_with(&f.graph, &w, &inputs);
    for ((n, a), (_, b)) in want.iter().zip(&got) {
        let e = rel(b.data(), a.data());
        assert!(
            e <= 1e-5,
            "{n}: folded graph differs by {e:e}\n{}",
            eptc_ir::text::print(&f.graph).unwrap()
        );
    }
    // What remains reads folded params, not expressions over frozen weights.
    assert!(
        f.graph.params().iter().any(|p| p.1.starts_with("folded.")),
        "nothing folded"
    );
    (f.graph, s)
}

fn frozen(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.param(
        name,
        false,
        Init::Checkpoint,
        TensorType::f32(Shape::fixed(shape)),
    )
}

#[test]
fn layernorm_affine_folds_into_the_next_linear() {
    let mut g = Graph::new("t");
    let x = g.input("x", TensorType::f32(Shape::batched(&[3, 6])));
    let (gamma, beta) = (frozen(&mut g, "g", &[6]), frozen(&mut g, "beta", &[6]));
    let (w, b) = (frozen(&mut g, "w", &[4, 6]), frozen(&mut g, "b", &[4]));
    let n = g.layernorm(x, gamma, beta, 1e-6).unwrap();
    let y = g.matmul(n, w, false, true).unwrap();
    let y = g.binary(BinaryOp::Add, y, b).unwrap();
    g.set_output("y", y);
    let (o, s) = check_folded(&g);
    assert_eq!(s.rules_fired["layernorm-affine-fold"], 1);
    // The LayerNorm left has gamma 1 and beta 0.
    let ln = o
        .node_ids()
        .into_iter()
        .find(|&id| matches!(o.node(id).op, Op::LayerNorm { .. }))
        .unwrap();
    let ops = o.operands(ln);
    assert!(matches!(&o.node(ops[1]).op, Op::Const { values } if values.iter().all(|&v| v == 1.0)));
    assert!(matches!(&o.node(ops[2]).op, Op::Const { values } if values.iter().all(|&v| v == 0.0)));
}

/// A timm-style block: fused qkv `[3D, D]`, reshape, permute, slices, scaled logits.
fn fused_qkv_attention(g: &mut Graph) -> NodeId {
    let (n, h, hd) = (5, 2, 4);
    let d = h * hd;
    let x = g.input("x", TensorType::f32(Shape::batched(&[n, d])));
    let (w, b) = (
        frozen(g, "qkv.w", &[3 * d, d]),
        frozen(g, "qkv.b", &[3 * d]),
    );
    let y = g.matmul(x, w, false, true).unwrap();
    let y = g.binary(BinaryOp::Add, y, b).unwrap();
    let y = g.reshape(y, Shape::batched(&[n, 3, h, hd])).unwrap();
    let t = g.permute(y, &[2, 0, 3, 1, 4]).unwrap();
    let mut parts = Vec::new();
    for j in 0..3 {
        let s = g.slice(t, 0, j, j + 1).unwrap();
        parts.push(g.reshape(s, Shape::batched(&[h, n, hd])).unwrap());
    }
    let qk = g.matmul(parts[0], parts[1], false, true).unwrap();
    let c = g.scalar(0.35);
    let s = g.binary(BinaryOp::Mul, qk, c).unwrap();
    let p = g.softmax(s, 3).unwrap();
    let o = g.matmul(p, parts[2], false, false).unwrap();
    g.set_output("o", o);
    s
}

#[test]
fn attention_scale_folds_into_fused_query_rows() {
    let mut g = Graph::new("t");
    fused_qkv_attention(&mut g);
    let (o, s) = check_folded(&g);
    assert_eq!(s.rules_fired["scale-fold-qkv"], 1);
    assert_eq!(
        count(
            &o,
            |op| matches!(op, Op::Attention { scale, .. } if *scale == 1.0)
        ),
        1
    );
    assert_eq!(
        count(&o, |op| matches!(op, Op::Linear { .. })),
        1,
        "one qkv projection"
    );
}

/// When the scaled logits are also read (multi-cat's alpha), they use the folded
/// projection too: still one qkv projection.
#[test]
fn scale_fold_keeps_one_projection_when_logits_are_read() {
    let mut g = Graph::new("t");
    let s = fused_qkv_attention(&mut g);
    let m = g.reduce(eptc_ir::ReduceOp::Max, s, &[3], true).unwrap();
    g.set_output("m", m);
    let (o, sum) = check_folded(&g);
    assert_eq!(sum.rules_fired["scale-fold-qkv-scores"], 1);
    assert_eq!(
        count(&o, |op| matches!(op, Op::Linear { .. })),
        1,
        "{}",
        eptc_ir::text::print(&o).unwrap()
    );
}

#[test]
fn attention_scale_folds_into_a_separate_query_projection() {
    let mut g = Graph::new("t");
    let (n, h, hd) = (5, 2, 4);
    let d = h * hd;
    let x = g.input("x", TensorType::f32(Shape::batched(&[n, d])));
    let mut heads = Vec::new();
    for name in ["q", "k", "v"] {
        let (w, b) = (
            frozen(&mut g, &format!("{name}.w"), &[d, d]),
            frozen(&mut g, &format!("{name}.b"), &[d]),
        );
        let y = g.matmul(x, w, false, true).unwrap();
        let y = g.binary(BinaryOp::Add, y, b).unwrap();
        let y = g.reshape(y, Shape::batched(&[n, h, hd])).unwrap();
        heads.push(g.permute(y, &[0, 2, 1, 3]).unwrap());
    }
    let qk = g.matmul(heads[0], heads[1], false, true).unwrap();
    let c = g.scalar(0.35);
    let s = g.binary(BinaryOp::Mul, qk, c).unwrap();
    let p = g.softmax(s, 3).unwrap();
    let o = g.matmul(p, heads[2], false, false).unwrap();
    g.set_output("o", o);
    let (o, sum) = check_folded(&g);
    assert_eq!(sum.rules_fired["scale-fold-q"], 1);
    assert_eq!(
        count(
            &o,
            |op| matches!(op, Op::Attention { scale, .. } if *scale == 1.0)
        ),
        1
    );
    assert_eq!(count(&o, |op| matches!(op, Op::Linear { .. })), 3);
}
