//! The shape rule of every op (`infer`): a valid case and the invalid ones; and the
//! verifier's checks.

use eptc_ir::infer::{broadcast_shapes, broadcasts_to, infer};
use eptc_ir::text::{parse, print};
use eptc_ir::{
    verify, Activation, AttnWrt, BinaryOp, DType, Dim, Graph, Init, IrError, Op, ReduceOp, Shape,
    TensorType, UnaryOp,
};

const B: Dim = Dim::Batch;

fn f(d: usize) -> Dim {
    Dim::Fixed(d)
}

fn t(dims: &[Dim]) -> TensorType {
    TensorType::f32(Shape(dims.to_vec()))
}

fn tf(dims: &[usize]) -> TensorType {
    TensorType::f32(Shape::fixed(dims))
}

fn tb(dims: &[usize]) -> TensorType {
    TensorType::f32(Shape::batched(dims))
}

fn ok(op: Op, operands: &[TensorType]) -> TensorType {
    let refs: Vec<&TensorType> = operands.iter().collect();
    infer(&op, &refs).unwrap_or_else(|e| panic!("{op:?} on {operands:?}: {e}"))
}

/// The error of an invalid case; it must mention `needle`.
fn err(op: Op, operands: &[TensorType], needle: &str) -> String {
    let refs: Vec<&TensorType> = operands.iter().collect();
    match infer(&op, &refs) {
        Ok(ty) => panic!("{op:?} on {operands:?} should fail, gave {ty}"),
        Err(e) => {
            assert!(
                e.contains(needle),
                "error {e:?} of {op:?} should mention {needle:?}"
            );
            e
        }
    }
}

fn mm(ta: bool, tb_: bool) -> Op {
    Op::MatMul {
        transpose_a: ta,
        transpose_b: tb_,
    }
}

// ---- common rules -------------------------------------------------------------------

#[test]
fn arity_is_checked() {
    err(Op::Unary(UnaryOp::Relu), &[], "takes 1 operand");
    err(Op::Binary(BinaryOp::Add), &[tf(&[2])], "takes 2 operand");
    err(
        Op::LayerNorm { eps: 1e-5 },
        &[tf(&[2]), tf(&[2])],
        "takes 3",
    );
    err(Op::Concat { axis: 0 }, &[tf(&[2])], "at least 2");
    err(Op::Concat { axis: 0 }, &[], "at least 2");
}

#[test]
fn leaves_have_no_inferred_type() {
    err(Op::Input { name: "x".into() }, &[], "leaf");
    err(Op::Const { values: vec![1.0] }, &[], "leaf");
    err(
        Op::Param {
            name: "w".into(),
            trainable: true,
            init: Init::Zeros,
        },
        &[],
        "leaf",
    );
}

#[test]
fn mixed_element_types_are_rejected_and_dtype_propagates() {
    let h = TensorType::new(DType::F16, Shape::batched(&[4]));
    err(
        Op::Binary(BinaryOp::Add),
        &[h.clone(), tb(&[4])],
        "mixed element types",
    );
    let out = ok(Op::Binary(BinaryOp::Mul), &[h.clone(), h.clone()]);
    assert_eq!(out, h);
    let bf = TensorType::new(DType::BF16, Shape::batched(&[2, 3]));
    assert_eq!(
        ok(Op::Unary(UnaryOp::Gelu), std::slice::from_ref(&bf)).dtype,
        DType::BF16
    );
}

// ---- patchify -------------------------------------------------------------------------

#[test]
fn patchify() {
    let p = |patch| Op::Patchify { patch };
    assert_eq!(ok(p(8), &[tb(&[3, 32, 32])]), tb(&[16, 192]));
    assert_eq!(ok(p(4), &[tf(&[2, 1, 8, 12])]), tf(&[2, 6, 16]));
    assert_eq!(ok(p(1), &[tb(&[3, 2, 2])]), tb(&[4, 3]));
    err(
        p(5),
        &[tb(&[3, 32, 32])],
        "not a multiple of the patch size",
    );
    err(p(8), &[tb(&[3, 32, 36])], "not a multiple");
    err(p(0), &[tb(&[3, 32, 32])], "patch size 0");
    err(p(8), &[tb(&[32, 32])], "patchify wants [B,C,H,W]");
    err(p(8), &[t(&[B, B, f(32), f(32)])], "fixed C, H, W");
    // Overflowing sizes are an error, not a panic.
    err(p(usize::MAX), &[tb(&[2, 0, 0])], "overflows");
}

// ---- matmul ---------------------------------------------------------------------------

#[test]
fn matmul() {
    assert_eq!(
        ok(mm(false, false), &[tb(&[17, 48]), tf(&[48, 144])]),
        tb(&[17, 144])
    );
    assert_eq!(
        ok(mm(false, true), &[tb(&[17, 48]), tf(&[144, 48])]),
        tb(&[17, 144])
    );
    assert_eq!(
        ok(mm(true, false), &[tb(&[48, 17]), tf(&[48, 5])]),
        tb(&[17, 5])
    );
    assert_eq!(ok(mm(true, true), &[tf(&[4, 3]), tf(&[2, 4])]), tf(&[3, 2]));
    // Leading axes broadcast.
    assert_eq!(
        ok(mm(false, false), &[tb(&[3, 17, 16]), tb(&[3, 16, 17])]),
        tb(&[3, 17, 17])
    );
    assert_eq!(
        ok(mm(false, false), &[tf(&[1, 5, 2, 3]), tf(&[7, 1, 3, 4])]),
        tf(&[7, 5, 2, 4])
    );
    // The batch can be an inner dimension on both sides.
    assert_eq!(ok(mm(true, false), &[tb(&[5]), tb(&[7])]), tf(&[5, 7]));
    err(
        mm(false, false),
        &[tb(&[17, 48]), tf(&[47, 144])],
        "inner dimensions differ",
    );
    err(
        mm(false, true),
        &[tb(&[17, 48]), tf(&[48, 144])],
        "inner dimensions differ",
    );
    // B is a dimension of its own: it matches only B.
    assert_eq!(ok(mm(false, false), &[tb(&[5]), tf(&[5, 3])]), tb(&[3]));
    err(
        mm(false, false),
        &[t(&[f(5), B]), tf(&[5, 3])],
        "inner dimensions differ",
    );
    err(mm(false, false), &[tf(&[5]), tf(&[5, 3])], "rank >= 2");
    err(mm(false, false), &[tf(&[2, 5]), tf(&[5])], "rank >= 2");
    err(
        mm(false, false),
        &[tf(&[2, 4, 5]), tf(&[3, 5, 6])],
        "do not broadcast",
    );
}

// ---- elementwise ----------------------------------------------------------------------

#[test]
fn binary_broadcasts() {
    for b in BinaryOp::ALL {
        let op = Op::Binary(b);
        assert_eq!(ok(op.clone(), &[tb(&[17, 48]), tf(&[48])]), tb(&[17, 48]));
        assert_eq!(ok(op.clone(), &[tf(&[48]), tb(&[17, 48])]), tb(&[17, 48]));
        assert_eq!(ok(op.clone(), &[tb(&[17, 1]), tf(&[1, 48])]), tb(&[17, 48]));
        assert_eq!(ok(op.clone(), &[tf(&[]), tb(&[2])]), tb(&[2]));
        // 1 broadcasts to B.
        assert_eq!(ok(op.clone(), &[tf(&[1, 4]), tb(&[4])]), tb(&[4]));
        err(op.clone(), &[tb(&[17, 48]), tf(&[47])], "do not broadcast");
        // B is not a number: it broadcasts neither with 5 nor with another size.
        err(op.clone(), &[tb(&[3]), tf(&[5, 3])], "do not broadcast");
    }
}

#[test]
fn broadcast_helpers() {
    assert_eq!(
        broadcast_shapes(&Shape::fixed(&[3, 1]), &Shape::fixed(&[4])).unwrap(),
        Shape::fixed(&[3, 4])
    );
    assert!(broadcast_shapes(&Shape::fixed(&[3]), &Shape::fixed(&[4])).is_err());
    assert!(broadcasts_to(
        &Shape::fixed(&[1, 4]),
        &Shape::batched(&[2, 4])
    ));
    assert!(!broadcasts_to(&Shape::fixed(&[3, 4]), &Shape::fixed(&[4])));
    assert!(!broadcasts_to(
        &Shape::fixed(&[2, 4]),
        &Shape::fixed(&[1, 4])
    ));
}

#[test]
fn unary_keeps_the_type() {
    for u in UnaryOp::ALL {
        for ty in [tb(&[3, 4]), tf(&[]), t(&[f(2), B])] {
            assert_eq!(ok(Op::Unary(u), std::slice::from_ref(&ty)), ty);
        }
    }
}

// ---- reduce ---------------------------------------------------------------------------

#[test]
fn reduce() {
    let r = |axes: &[usize], keepdim| Op::Reduce {
        op: ReduceOp::Sum,
        axes: axes.to_vec(),
        keepdim,
    };
    assert_eq!(ok(r(&[2], false), &[tb(&[17, 48])]), tb(&[17]));
    assert_eq!(ok(r(&[2], true), &[tb(&[17, 48])]), tb(&[17, 1]));
    assert_eq!(ok(r(&[0], false), &[tb(&[17])]), tf(&[17]));
    assert_eq!(ok(r(&[2, 0], true), &[tb(&[4, 5])]), tf(&[1, 4, 1]));
    assert_eq!(ok(r(&[0, 1], false), &[tb(&[4])]), tf(&[]));
    for op in ReduceOp::ALL {
        let o = Op::Reduce {
            op,
            axes: vec![1],
            keepdim: false,
        };
        assert_eq!(ok(o, &[tb(&[3])]), tb(&[]));
    }
    err(r(&[1, 1], false), &[tb(&[3, 4])], "axis 1 repeated");
    err(r(&[3], false), &[tb(&[3, 4])], "out of range");
    err(r(&[], false), &[tb(&[3, 4])], "no axis");
    err(r(&[0], false), &[tf(&[])], "out of range");
}

// ---- normalization --------------------------------------------------------------------

#[test]
fn softmax() {
    let s = |axis| Op::Softmax { axis };
    assert_eq!(ok(s(3), &[tb(&[3, 17, 17])]), tb(&[3, 17, 17]));
    assert_eq!(ok(s(0), &[tb(&[3])]), tb(&[3]));
    err(s(2), &[tb(&[3])], "out of range");
    err(s(0), &[tf(&[])], "out of range");
}

#[test]
fn layernorm() {
    let ln = |eps| Op::LayerNorm { eps };
    assert_eq!(
        ok(ln(1e-6), &[tb(&[17, 48]), tf(&[48]), tf(&[48])]),
        tb(&[17, 48])
    );
    assert_eq!(ok(ln(0.0), &[tf(&[5]), tf(&[5]), tf(&[5])]), tf(&[5]));
    err(
        ln(1e-6),
        &[tb(&[17, 48]), tf(&[47]), tf(&[48])],
        "layernorm gamma must be [48]",
    );
    err(
        ln(1e-6),
        &[tb(&[17, 48]), tf(&[48]), tf(&[1, 48])],
        "layernorm beta must be [48]",
    );
    err(
        ln(1e-6),
        &[tb(&[17, 48]), tf(&[17, 48]), tf(&[48])],
        "gamma",
    );
    err(ln(1e-6), &[tf(&[]), tf(&[]), tf(&[])], "scalar");
    err(ln(-1e-6), &[tf(&[4]), tf(&[4]), tf(&[4])], "eps");
    err(ln(f32::NAN), &[tf(&[4]), tf(&[4]), tf(&[4])], "eps");
    err(ln(f32::INFINITY), &[tf(&[4]), tf(&[4]), tf(&[4])], "eps");
}

// ---- shape ----------------------------------------------------------------------------

#[test]
fn reshape() {
    let rs = |s: Shape| Op::Reshape { shape: s };
    assert_eq!(
        ok(rs(Shape::batched(&[17, 3, 16])), &[tb(&[17, 48])]),
        tb(&[17, 3, 16])
    );
    assert_eq!(ok(rs(Shape::fixed(&[6])), &[tf(&[2, 3])]), tf(&[6]));
    assert_eq!(ok(rs(Shape::fixed(&[1, 1])), &[tf(&[])]), tf(&[1, 1]));
    // B is preserved, wherever it goes.
    assert_eq!(ok(rs(Shape(vec![f(4), B])), &[tb(&[4])]), t(&[f(4), B]));
    err(
        rs(Shape::fixed(&[5])),
        &[tf(&[2, 3])],
        "element counts differ",
    );
    err(
        rs(Shape::fixed(&[2, 3])),
        &[tb(&[2, 3])],
        "element counts differ",
    );
    err(
        rs(Shape::batched(&[])),
        &[tb(&[2])],
        "element counts differ",
    );
    err(rs(Shape(vec![B, B])), &[tb(&[1])], "element counts differ");
    // Overflowing element counts are an error, not a panic.
    err(
        rs(Shape::fixed(&[usize::MAX, 2])),
        &[tf(&[usize::MAX, 2])],
        "element counts",
    );
}

#[test]
fn permute() {
    let p = |perm: &[usize]| Op::Permute {
        perm: perm.to_vec(),
    };
    assert_eq!(ok(p(&[0, 2, 1, 3]), &[tb(&[17, 3, 16])]), tb(&[3, 17, 16]));
    assert_eq!(ok(p(&[1, 0]), &[tb(&[5])]), t(&[f(5), B]));
    assert_eq!(ok(p(&[]), &[tf(&[])]), tf(&[]));
    err(p(&[0, 0, 1]), &[tb(&[3, 4])], "not a permutation");
    err(p(&[0, 1, 3]), &[tb(&[3, 4])], "not a permutation");
    err(p(&[0, 1]), &[tb(&[3, 4])], "permutation [0, 1] for rank 3");
}

#[test]
fn concat() {
    let c = |axis| Op::Concat { axis };
    assert_eq!(
        ok(c(3), &[tb(&[3, 17, 17]), tb(&[3, 17, 6])]),
        tb(&[3, 17, 23])
    );
    assert_eq!(
        ok(c(0), &[tf(&[1, 2]), tf(&[2, 2]), tf(&[3, 2])]),
        tf(&[6, 2])
    );
    err(c(2), &[tb(&[3, 17]), tb(&[4, 6])], "concat along 2");
    err(c(1), &[tb(&[3, 17]), tb(&[3])], "concat of ranks 3 and 2");
    err(c(3), &[tb(&[3, 4]), tb(&[3, 4])], "out of range");
    err(c(0), &[tb(&[3]), tb(&[3])], "batch axis");
    err(c(0), &[tf(&[usize::MAX]), tf(&[1])], "overflows");
}

#[test]
fn slice() {
    let s = |axis, start, end| Op::Slice { axis, start, end };
    assert_eq!(ok(s(3, 0, 17), &[tb(&[3, 17, 23])]), tb(&[3, 17, 17]));
    assert_eq!(ok(s(0, 4, 5), &[tf(&[5])]), tf(&[1]));
    err(s(1, 0, 6), &[tb(&[5])], "out of range for size 5");
    err(s(1, 3, 3), &[tb(&[5])], "slice 3..3 out of range");
    err(s(1, 4, 2), &[tb(&[5])], "out of range");
    err(s(2, 0, 1), &[tb(&[5])], "axis 2 out of range");
    err(s(0, 0, 1), &[tb(&[5])], "batch axis");
}

#[test]
fn broadcast() {
    let b = |s: Shape| Op::Broadcast { shape: s };
    assert_eq!(
        ok(b(Shape::batched(&[3, 17, 6])), &[tf(&[17, 6])]),
        tb(&[3, 17, 6])
    );
    assert_eq!(ok(b(Shape::batched(&[4])), &[tf(&[1, 4])]), tb(&[4]));
    assert_eq!(ok(b(Shape::fixed(&[2, 3])), &[tf(&[])]), tf(&[2, 3]));
    err(
        b(Shape::fixed(&[4])),
        &[tf(&[2, 4])],
        "does not broadcast to",
    );
    err(
        b(Shape::fixed(&[2, 4])),
        &[tf(&[3, 4])],
        "does not broadcast to",
    );
    err(
        b(Shape::fixed(&[1, 4])),
        &[tf(&[2, 4])],
        "does not broadcast to",
    );
    err(b(Shape::fixed(&[5])), &[tb(&[])], "does not broadcast to");
}

// ---- fused ----------------------------------------------------------------------------

fn attn(scale: f32, sink: bool) -> Op {
    Op::Attention { scale, sink }
}

fn lin(bias: bool, activation: Activation, residual: bool) -> Op {
    Op::Linear {
        bias,
        activation,
        residual,
    }
}

#[test]
fn softmax_sink() {
    let s = || Op::SoftmaxSink;
    let scores = tb(&[3, 17, 19]);
    for z in [
        tf(&[17, 1]),
        tb(&[3, 17, 1]),
        tf(&[3, 17, 1]),
        tf(&[1]),
        tf(&[]),
        tf(&[1, 1, 17, 1]),
        tb(&[1, 17, 1]),
    ] {
        assert_eq!(ok(s(), &[scores.clone(), z]), scores);
    }
    assert_eq!(ok(s(), &[tf(&[5]), tf(&[1])]), tf(&[5]));
    err(
        s(),
        &[scores.clone(), tf(&[17, 19])],
        "does not broadcast to",
    );
    err(s(), &[scores.clone(), tf(&[17])], "does not broadcast to");
    err(
        s(),
        &[scores.clone(), tf(&[4, 17, 1])],
        "does not broadcast to",
    );
    err(
        s(),
        &[scores.clone(), tf(&[2, 3, 17, 1])],
        "does not broadcast to",
    );
    // More axes than s.
    err(
        s(),
        &[scores.clone(), t(&[f(2), B, f(3), f(17), f(1)])],
        "does not broadcast to",
    );
    err(s(), &[tf(&[]), tf(&[])], "scalar");
    err(s(), std::slice::from_ref(&scores), "takes 2 operand");
    err(
        s(),
        &[scores, TensorType::new(DType::F16, Shape::fixed(&[17, 1]))],
        "mixed element types",
    );
}

#[test]
fn attention() {
    // ViT: [B, H, N, d] q, k, v; a sink shared by heads and batch.
    let (q, k, v) = (tb(&[3, 17, 16]), tb(&[3, 19, 16]), tb(&[3, 19, 8]));
    assert_eq!(
        ok(attn(0.25, false), &[q.clone(), k.clone(), v.clone()]),
        tb(&[3, 17, 8])
    );
    for z in [tf(&[17, 1]), tb(&[3, 17, 1]), tf(&[1]), tf(&[3, 1, 1])] {
        assert_eq!(
            ok(attn(0.25, true), &[q.clone(), k.clone(), v.clone(), z]),
            tb(&[3, 17, 8])
        );
    }
    // Leading axes broadcast: k and v shared by the heads, q without the batch.
    assert_eq!(
        ok(
            attn(1.0, false),
            &[tf(&[3, 17, 16]), tb(&[1, 19, 16]), tb(&[1, 19, 8])]
        ),
        tb(&[3, 17, 8])
    );
    // z may use axes only v brings.
    assert_eq!(
        ok(
            attn(1.0, true),
            &[
                tf(&[17, 16]),
                tf(&[19, 16]),
                tf(&[4, 19, 8]),
                tf(&[4, 17, 1])
            ]
        ),
        tf(&[4, 17, 8])
    );
    assert_eq!(
        ok(attn(-0.0, false), &[tf(&[1, 2]), tf(&[3, 2]), tf(&[3, 0])]),
        tf(&[1, 0])
    );
    err(
        attn(0.25, false),
        &[q.clone(), tb(&[3, 19, 15]), v.clone()],
        "q and k feature dims differ",
    );
    err(
        attn(0.25, false),
        &[q.clone(), k.clone(), tb(&[3, 18, 8])],
        "k and v token counts differ",
    );
    err(
        attn(0.25, false),
        &[q.clone(), tb(&[4, 19, 16]), v.clone()],
        "do not broadcast",
    );
    err(
        attn(0.25, false),
        &[tf(&[16]), k.clone(), v.clone()],
        "rank >= 2",
    );
    err(
        attn(0.25, true),
        &[q.clone(), k.clone(), v.clone(), tf(&[17, 8])],
        "sink z [17,8] does not broadcast to [B,3,17,1]",
    );
    err(
        attn(0.25, true),
        &[q.clone(), k.clone(), v.clone(), tf(&[19, 1])],
        "does not broadcast",
    );
    err(
        attn(0.25, true),
        &[q.clone(), k.clone(), v.clone()],
        "attention takes 4 operand(s), got 3",
    );
    err(
        attn(0.25, false),
        &[q.clone(), k.clone(), v.clone(), tf(&[17, 1])],
        "attention takes 3 operand(s), got 4",
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        err(
            attn(bad, false),
            &[q.clone(), k.clone(), v.clone()],
            "scale must be finite",
        );
    }
}

#[test]
fn linear() {
    let (x, w, b) = (tb(&[17, 48]), tf(&[192, 48]), tf(&[192]));
    let out = tb(&[17, 192]);
    for act in Activation::ALL {
        assert_eq!(ok(lin(false, act, false), &[x.clone(), w.clone()]), out);
        assert_eq!(
            ok(lin(true, act, false), &[x.clone(), w.clone(), b.clone()]),
            out
        );
        assert_eq!(
            ok(lin(false, act, true), &[x.clone(), w.clone(), out.clone()]),
            out
        );
        assert_eq!(
            ok(
                lin(true, act, true),
                &[x.clone(), w.clone(), b.clone(), out.clone()]
            ),
            out
        );
    }
    // Any rank >= 1.
    assert_eq!(
        ok(
            lin(false, Activation::None, false),
            &[tf(&[4]), tf(&[3, 4])]
        ),
        tf(&[3])
    );
    let g = Activation::Gelu;
    err(
        lin(false, g, false),
        &[x.clone(), tf(&[192, 47])],
        "inner dimensions differ",
    );
    err(
        lin(false, g, false),
        &[x.clone(), tf(&[48])],
        "w must be [out, in]",
    );
    err(
        lin(false, g, false),
        &[x.clone(), tf(&[1, 192, 48])],
        "w must be [out, in]",
    );
    err(lin(false, g, false), &[tf(&[]), w.clone()], "scalar");
    err(
        lin(true, g, false),
        &[x.clone(), w.clone(), tf(&[1, 192])],
        "bias must be [192]",
    );
    err(
        lin(true, g, false),
        &[x.clone(), w.clone(), tf(&[48])],
        "bias must be [192]",
    );
    // The residual must be exactly the output shape: no broadcasting.
    err(
        lin(false, g, true),
        &[x.clone(), w.clone(), tf(&[192])],
        "residual must be [B,17,192]",
    );
    err(
        lin(true, g, true),
        &[x.clone(), w.clone(), b.clone(), tb(&[1, 192])],
        "residual must be",
    );
    // Operand counts follow the flags, and b comes before r.
    err(
        lin(true, g, true),
        &[x.clone(), w.clone(), b.clone()],
        "takes 4 operand",
    );
    err(
        lin(false, g, false),
        &[x.clone(), w.clone(), b.clone()],
        "takes 2 operand",
    );
    err(
        lin(true, g, true),
        &[x.clone(), w.clone(), out.clone(), b.clone()],
        "bias must be",
    );
}

#[test]
fn activation_names() {
    for a in Activation::ALL {
        assert_eq!(Activation::from_name(a.name()), Some(a));
    }
    assert_eq!(Activation::from_name("relu"), None);
    assert_eq!(Activation::None.name(), "none");
    assert_eq!(Activation::Gelu.name(), "gelu");
}

#[test]
fn attention_backward() {
    let lse = |sink| Op::AttentionLse { scale: 0.25, sink };
    let grad = |wrt| Op::AttentionGrad { scale: 0.25, wrt };
    let (q, k) = (tb(&[3, 17, 16]), tf(&[19, 16]));
    assert_eq!(ok(lse(false), &[q.clone(), k.clone()]), tb(&[3, 17, 1]));
    assert_eq!(
        ok(lse(true), &[q.clone(), k.clone(), tf(&[17, 1])]),
        tb(&[3, 17, 1])
    );
    err(lse(false), &[q.clone(), tf(&[19, 15])], "feature dims");
    err(
        lse(true),
        &[q.clone(), k.clone(), tf(&[18, 1])],
        "does not broadcast",
    );
    err(
        Op::AttentionLse {
            scale: f32::NAN,
            sink: false,
        },
        &[q.clone(), k.clone()],
        "finite",
    );
    let v = tb(&[1, 19, 8]);
    let rows = tb(&[3, 17, 1]);
    let dout = tb(&[3, 17, 8]);
    let ops = [
        q.clone(),
        k.clone(),
        v.clone(),
        rows.clone(),
        rows.clone(),
        dout.clone(),
    ];
    assert_eq!(ok(grad(AttnWrt::Q), &ops), tb(&[3, 17, 16]));
    assert_eq!(ok(grad(AttnWrt::K), &ops), tb(&[3, 19, 16]));
    assert_eq!(ok(grad(AttnWrt::V), &ops), tb(&[3, 19, 8]));
    // The leading axes of all six broadcast (here only dO has the 2).
    let wide = [
        q.clone(),
        k.clone(),
        v.clone(),
        rows.clone(),
        rows.clone(),
        tf(&[2, 1, 3, 17, 8]),
    ];
    assert_eq!(
        ok(grad(AttnWrt::K), &wide),
        t(&[f(2), B, f(3), f(19), f(16)])
    );
    let mut bad = ops.clone();
    bad[3] = tb(&[3, 17, 2]);
    err(grad(AttnWrt::Q), &bad, "do not fit");
    let mut bad = ops.clone();
    bad[5] = tb(&[3, 17, 9]);
    err(grad(AttnWrt::V), &bad, "do not fit");
    err(grad(AttnWrt::Q), &ops[..5], "operand");
    for w in AttnWrt::ALL {
        assert_eq!(AttnWrt::from_name(w.name()), Some(w));
    }
    assert_eq!(AttnWrt::from_name("z"), None);
}

#[test]
fn fused_kinds() {
    assert_eq!(
        Op::fused_kinds(),
        vec![
            "softmax_sink",
            "attention",
            "linear",
            "layernorm_grad",
            "attention_lse",
            "attention_grad"
        ]
    );
    let all = Op::all_kinds();
    for k in Op::fused_kinds() {
        assert!(all.contains(&k), "{k}");
    }
}

// ---- the graph API uses the rules -----------------------------------------------------

#[test]
fn graph_add_reports_shape_errors() {
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[17, 48]));
    let w = g.param("w", false, Init::Checkpoint, tf(&[47, 144]));
    match g.matmul(x, w, false, false) {
        Err(IrError::Shape { op, msg, .. }) => {
            assert_eq!(op, "matmul");
            assert!(msg.contains("inner dimensions differ"), "{msg}");
        }
        r => panic!("expected a shape error, got {r:?}"),
    }
    let y = g.matmul(x, w, false, true);
    assert!(y.is_err());
    assert!(g.constant(vec![1.0, 2.0], &[3]).is_err());
}

// ---- verifier -------------------------------------------------------------------------

/// A small valid graph: x -> relu -> relu, output "y".
fn chain() -> (Graph, [eptc_ir::NodeId; 3]) {
    let mut g = Graph::new("chain");
    let x = g.input("x", tb(&[4]));
    let r1 = g.unary(UnaryOp::Relu, x).unwrap();
    let r2 = g.unary(UnaryOp::Relu, r1).unwrap();
    g.set_output("y", r2);
    verify(&g).unwrap();
    (g, [x, r1, r2])
}

fn verify_err(g: &Graph, needle: &str) {
    match verify(g) {
        Ok(()) => panic!("verify should fail with {needle:?}"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "verify error {e} should mention {needle:?}"
        ),
    }
}

#[test]
fn verifier_rejects_a_cycle() {
    let (mut g, [_, r1, r2]) = chain();
    g.set_operand(r1, 0, r2);
    assert!(matches!(verify(&g), Err(IrError::Invalid(_))));
    verify_err(&g, "cycle");
    assert!(print(&g).is_err(), "a cyclic graph cannot be printed");
    assert!(g.compacted().is_err());
    // A self-loop too.
    let (mut g, [_, r1, _]) = chain();
    g.set_operand(r1, 0, r1);
    verify_err(&g, "cycle");
}

#[test]
fn verifier_rejects_a_declared_type_that_differs_from_the_rule() {
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    let y = g
        .add_typed(Op::Unary(UnaryOp::Exp), &[x], tb(&[5]))
        .unwrap();
    g.set_output("y", y);
    verify_err(
        &g,
        "declared type f32[B,5] but the shape rule gives f32[B,4]",
    );
    // The element type counts too.
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    g.add_typed(
        Op::Unary(UnaryOp::Exp),
        &[x],
        TensorType::new(DType::F16, Shape::batched(&[4])),
    )
    .unwrap();
    verify_err(&g, "declared type");
    // And via the text format.
    let text = "eptc-ir 1 \"g\"\n%0 = input \"x\" : f32[B,4]\n%1 = exp %0 : f32[B,4,1]\n";
    assert!(matches!(parse(text), Err(IrError::Shape { .. })));
}

#[test]
fn verifier_rejects_duplicate_names() {
    let mut g = Graph::new("g");
    g.param("w", true, Init::Zeros, tf(&[4]));
    g.param("w", false, Init::Checkpoint, tf(&[4]));
    verify_err(&g, "param \"w\" declared twice");
    let mut g = Graph::new("g");
    g.input("x", tb(&[4]));
    g.input("x", tb(&[4]));
    verify_err(&g, "input \"x\" declared twice");
    // An input and a param may share a name: they live in different namespaces.
    let mut g = Graph::new("g");
    g.input("x", tb(&[4]));
    g.param("x", true, Init::Zeros, tf(&[4]));
    verify(&g).unwrap();
}

#[test]
fn duplicate_outputs_cannot_be_built() {
    // `set_output` replaces an output of the same name, so a graph never holds two...
    let (mut g, [x, r1, _]) = chain();
    g.set_output("y", r1);
    g.set_output("z", x);
    assert_eq!(g.outputs().len(), 2);
    assert_eq!(g.output("y"), Some(r1));
    verify(&g).unwrap();
    // ...and the parser refuses a file that names one twice.
    let text =
        "eptc-ir 1 \"g\"\n%0 = input \"x\" : f32[B,4]\noutput \"y\" = %0\noutput \"y\" = %0\n";
    match parse(text) {
        Err(IrError::Parse { line, msg }) => {
            assert_eq!(line, 4);
            assert!(msg.contains("output \"y\" defined twice"), "{msg}");
        }
        r => panic!("expected a parse error, got {r:?}"),
    }
    // Two names for one node are fine.
    let text =
        "eptc-ir 1 \"g\"\n%0 = input \"x\" : f32[B,4]\noutput \"y\" = %0\noutput \"z\" = %0\n";
    assert_eq!(print(&parse(text).unwrap()).unwrap(), text);
}

#[test]
fn verifier_rejects_a_param_with_the_batch_dim() {
    let mut g = Graph::new("g");
    g.param("w", true, Init::Normal(0.02), tb(&[4]));
    verify_err(&g, "param \"w\" cannot depend on the batch");
    let text = "eptc-ir 1 \"g\"\n%0 = param \"w\" frozen checkpoint : f32[4,B]\n";
    assert!(parse(text).is_err());
}

#[test]
fn verifier_rejects_bad_consts() {
    let mut g = Graph::new("g");
    g.add_typed(
        Op::Const {
            values: vec![1.0; 3],
        },
        &[],
        tf(&[2, 2]),
    )
    .unwrap();
    verify_err(&g, "3 values for 4 elements");
    let mut g = Graph::new("g");
    g.add_typed(Op::Const { values: vec![1.0] }, &[], tb(&[]))
        .unwrap();
    verify_err(&g, "batch dimension");
    // A shape whose element count overflows is an error, not a panic.
    let mut g = Graph::new("g");
    g.add_typed(
        Op::Const { values: vec![1.0] },
        &[],
        tf(&[usize::MAX, usize::MAX]),
    )
    .unwrap();
    verify_err(&g, "values for too many elements");
}

#[test]
fn verifier_rejects_operand_trouble() {
    // A leaf with operands.
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    g.add_typed(Op::Input { name: "y".into() }, &[x], tb(&[4]))
        .unwrap();
    verify_err(&g, "a leaf has operands");
    // The wrong operand count.
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    g.add_typed(Op::Binary(BinaryOp::Add), &[x], tb(&[4]))
        .unwrap();
    verify_err(&g, "add takes 2 operand(s), got 1");
    // A gap in the operand positions.
    let (mut g, [x, _, r2]) = chain();
    g.set_operand(r2, 1, x);
    verify_err(&g, "takes 1 operand");
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    let y = g.input("y", tb(&[4]));
    let s = g.binary(BinaryOp::Add, x, y).unwrap();
    g.set_operand(s, 2, y);
    verify_err(&g, "takes 2 operand");
    // Operands that do not exist are refused when building.
    let mut other = Graph::new("o");
    let a = other.input("a", tb(&[1]));
    let _ = other.input("b", tb(&[1]));
    let b = other.unary(UnaryOp::Neg, a).unwrap();
    let mut g = Graph::new("g");
    g.input("x", tb(&[1]));
    assert!(matches!(
        g.add_typed(Op::Unary(UnaryOp::Neg), &[b], tb(&[1])),
        Err(IrError::Invalid(_))
    ));
}

#[test]
fn verifier_rejects_unprintable_tags() {
    for bad in ["", "two words", "ept:prompt", "é"] {
        let mut g = Graph::new("g");
        g.set_tag(Some(bad));
        g.input("x", tb(&[4]));
        verify_err(&g, "is not a word");
    }
    let mut g = Graph::new("g");
    g.set_tag(Some("ept.expand-v2+x_y"));
    g.input("x", tb(&[4]));
    verify(&g).unwrap();
    assert_eq!(
        print(&parse(&print(&g).unwrap()).unwrap()).unwrap(),
        print(&g).unwrap()
    );
}

#[test]
fn rewiring_keeps_operand_order() {
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    let y = g.input("y", tb(&[4]));
    let s = g.binary(BinaryOp::Sub, x, y).unwrap();
    g.set_operand(s, 0, y);
    g.set_operand(s, 1, x);
    assert_eq!(g.operands(s), vec![y, x]);
    verify(&g).unwrap();
    g.set_output("d", s);
    let text = print(&g).unwrap();
    // Printed depth-first from the output, operands in operand order: y first.
    assert_eq!(
        text,
        "eptc-ir 1 \"g\"\n%0 = input \"y\" : f32[B,4]\n%1 = input \"x\" : f32[B,4]\n\
         %2 = sub %0, %1 : f32[B,4]\noutput \"d\" = %2\n"
    );
}
