//! Fused ops decompose into exactly the documented primitives, keep their tags, and
//! `lower_unsupported` lowers only what a backend lacks.

use eptc_ir::text::print;
use eptc_ir::{
    decompose, lower_unsupported, verify, Activation, DType, Graph, Init, IrError, NodeId, Op,
    Shape, TensorType,
};

fn tb(dims: &[usize]) -> TensorType {
    TensorType::f32(Shape::batched(dims))
}

fn tf(dims: &[usize]) -> TensorType {
    TensorType::f32(Shape::fixed(dims))
}

/// The printed graph after decomposing `id` (verified).
fn lowered(mut g: Graph, id: NodeId) -> String {
    verify(&g).unwrap();
    decompose(&mut g, id).unwrap();
    verify(&g).unwrap();
    assert!(!g.contains(id), "the fused node is removed");
    print(&g).unwrap()
}

#[test]
fn softmax_sink_is_eptc_concat_softmax_slice() {
    let mut g = Graph::new("g");
    let s = g.input("s", tb(&[3, 5, 7]));
    let z = g.param("z", true, Init::Zeros, tf(&[5, 1]));
    g.set_tag(Some("opt"));
    let y = g.softmax_sink(s, z).unwrap();
    g.set_tag(None);
    g.set_output("y", y);
    assert_eq!(
        lowered(g, y),
        "eptc-ir 1 \"g\"\n\
         %0 = param \"z\" trainable zeros : f32[5,1]\n\
         %1 = broadcast %0 : f32[B,3,5,1] @opt\n\
         %2 = input \"s\" : f32[B,3,5,7]\n\
         %3 = concat %1, %2 axis=3 : f32[B,3,5,8] @opt\n\
         %4 = softmax %3 axis=3 : f32[B,3,5,8] @opt\n\
         %5 = slice %4 axis=3 start=1 end=8 : f32[B,3,5,7] @opt\n\
         output \"y\" = %5\n"
    );
    // A z of the rows' shape needs no broadcast.
    let mut g = Graph::new("g");
    let s = g.input("s", tf(&[2, 4]));
    let z = g.input("z", tf(&[2, 1]));
    let y = g.softmax_sink(s, z).unwrap();
    g.set_output("y", y);
    let text = lowered(g, y);
    assert!(!text.contains("broadcast"), "{text}");
    assert!(text.contains("concat %0, %1 axis=1"), "{text}");
}

#[test]
fn attention_with_and_without_sink() {
    let mut g = Graph::new("g");
    let q = g.input("q", tb(&[2, 5, 4]));
    let k = g.input("k", tb(&[2, 6, 4]));
    let v = g.input("v", tb(&[2, 6, 3]));
    let z = g.param("z", true, Init::Zeros, tf(&[5, 1]));
    g.set_tag(Some("opt"));
    let a = g.attention(q, k, v, Some(z), 0.5).unwrap();
    g.set_tag(None);
    g.set_output("y", a);
    assert_eq!(
        lowered(g, a),
        "eptc-ir 1 \"g\"\n\
         %0 = param \"z\" trainable zeros : f32[5,1]\n\
         %1 = broadcast %0 : f32[B,2,5,1] @opt\n\
         %2 = input \"q\" : f32[B,2,5,4]\n\
         %3 = input \"k\" : f32[B,2,6,4]\n\
         %4 = matmul %2, %3 transpose_b : f32[B,2,5,6] @opt\n\
         %5 = const [0.5] : f32[] @opt\n\
         %6 = mul %4, %5 : f32[B,2,5,6] @opt\n\
         %7 = concat %1, %6 axis=3 : f32[B,2,5,7] @opt\n\
         %8 = softmax %7 axis=3 : f32[B,2,5,7] @opt\n\
         %9 = slice %8 axis=3 start=1 end=7 : f32[B,2,5,6] @opt\n\
         %10 = input \"v\" : f32[B,2,6,3]\n\
         %11 = matmul %9, %10 : f32[B,2,5,3] @opt\n\
         output \"y\" = %11\n"
    );
    let mut g = Graph::new("g");
    let q = g.input("q", tb(&[5, 4]));
    let a = g.attention(q, q, q, None, 0.25).unwrap();
    g.set_output("y", a);
    assert_eq!(
        lowered(g, a),
        "eptc-ir 1 \"g\"\n\
         %0 = input \"q\" : f32[B,5,4]\n\
         %1 = matmul %0, %0 transpose_b : f32[B,5,5]\n\
         %2 = const [0.25] : f32[]\n\
         %3 = mul %1, %2 : f32[B,5,5]\n\
         %4 = softmax %3 axis=2 : f32[B,5,5]\n\
         %5 = matmul %4, %0 : f32[B,5,4]\n\
         output \"y\" = %5\n"
    );
}

#[test]
fn attention_sink_with_axes_only_v_has() {
    // z [4,5,1] needs the leading axis v brings: the scores are broadcast first.
    let mut g = Graph::new("g");
    let q = g.input("q", tf(&[5, 2]));
    let k = g.input("k", tf(&[6, 2]));
    let v = g.input("v", tf(&[4, 6, 3]));
    let z = g.input("z", tf(&[4, 5, 1]));
    let a = g.attention(q, k, v, Some(z), 1.0).unwrap();
    g.set_output("y", a);
    let text = lowered(g, a);
    assert!(
        text.contains("%6 = broadcast %5 : f32[4,5,6]"),
        "the scores are broadcast:\n{text}"
    );
}

#[test]
fn linear_epilogue_order() {
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[5, 4]));
    let w = g.param("w", false, Init::Checkpoint, tf(&[3, 4]));
    let b = g.param("b", false, Init::Checkpoint, tf(&[3]));
    let r = g.input("r", tb(&[5, 3]));
    g.set_tag(Some("opt"));
    let y = g.linear(x, w, Some(b), Activation::Gelu, Some(r)).unwrap();
    g.set_tag(None);
    g.set_output("y", y);
    assert_eq!(
        lowered(g, y),
        "eptc-ir 1 \"g\"\n\
         %0 = input \"x\" : f32[B,5,4]\n\
         %1 = param \"w\" frozen checkpoint : f32[3,4]\n\
         %2 = matmul %0, %1 transpose_b : f32[B,5,3] @opt\n\
         %3 = param \"b\" frozen checkpoint : f32[3]\n\
         %4 = add %2, %3 : f32[B,5,3] @opt\n\
         %5 = gelu %4 : f32[B,5,3] @opt\n\
         %6 = input \"r\" : f32[B,5,3]\n\
         %7 = add %5, %6 : f32[B,5,3] @opt\n\
         output \"y\" = %7\n"
    );
    // Neither bias nor activation: a bare matmul (+ residual).
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    let w = g.input("w", tf(&[3, 4]));
    let r = g.input("r", tb(&[3]));
    let y = g.linear(x, w, None, Activation::None, Some(r)).unwrap();
    g.set_output("y", y);
    let text = lowered(g, y);
    assert!(text.contains("matmul %0, %1 transpose_b"), "{text}");
    assert!(text.contains("add %2, %3"), "{text}");
    assert!(!text.contains("gelu"), "{text}");
}

#[test]
fn users_and_the_current_tag_survive() {
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    let w = g.input("w", tf(&[4, 4]));
    let l = g.linear(x, w, None, Activation::Gelu, None).unwrap();
    let user = g.linear(l, w, None, Activation::None, Some(l)).unwrap();
    g.set_output("l", l);
    g.set_output("u", user);
    g.set_tag(Some("pass"));
    decompose(&mut g, l).unwrap();
    assert_eq!(g.tag(), Some("pass"), "the graph's tag is restored");
    verify(&g).unwrap();
    let gelu = g.output("l").unwrap();
    assert_eq!(g.node(gelu).op.kind(), "gelu");
    assert_eq!(
        g.node(gelu).tag,
        None,
        "new nodes carry the fused node's tag"
    );
    assert_eq!(g.operands(user)[0], gelu);
    assert_eq!(g.operands(user)[2], gelu);
}

#[test]
fn lower_unsupported_lowers_only_what_is_missing() {
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[5, 4]));
    let w = g.input("w", tf(&[4, 4]));
    let l = g.linear(x, w, None, Activation::Gelu, None).unwrap();
    let z = g.input("z", tf(&[5, 1]));
    let a = g.attention(l, l, l, Some(z), 0.5).unwrap();
    let s = g.softmax_sink(a, z).unwrap();
    g.set_output("y", s);
    let mut h = g.clone();
    let n = lower_unsupported(&mut h, &|k| k == "linear").unwrap();
    assert_eq!(n, 2);
    verify(&h).unwrap();
    let kinds: Vec<&str> = h.node_ids().iter().map(|&i| h.node(i).op.kind()).collect();
    assert!(kinds.contains(&"linear"));
    assert!(!kinds.contains(&"attention") && !kinds.contains(&"softmax_sink"));
    assert_eq!(lower_unsupported(&mut h, &|_| false).unwrap(), 1);
    assert_eq!(lower_unsupported(&mut g, &|_| true).unwrap(), 0);
}

#[test]
fn errors() {
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    let e = decompose(&mut g, x).unwrap_err();
    assert!(e.to_string().contains("not a fused op"), "{e}");
    let y = g.softmax_sink(x, x).unwrap_err();
    assert!(matches!(y, IrError::Shape { .. }));
    // Along the batch axis there is no concat/slice form; the graph is left as it was.
    let mut g = Graph::new("g");
    let s = g.input(
        "s",
        TensorType::f32(Shape(vec![eptc_ir::Dim::Fixed(2), eptc_ir::Dim::Batch])),
    );
    let z = g.input("z", tf(&[2, 1]));
    let y = g.softmax_sink(s, z).unwrap();
    g.set_output("y", y);
    let before = print(&g).unwrap();
    let e = decompose(&mut g, y).unwrap_err();
    assert!(e.to_string().contains("batch axis"), "{e}");
    assert_eq!(print(&g).unwrap(), before);
    assert_eq!(g.len(), 3);
    // A declared type that differs from the decomposition's.
    let mut g = Graph::new("g");
    let x = g.input("x", tb(&[4]));
    let w = g.input("w", tf(&[3, 4]));
    let op = Op::Linear {
        bias: false,
        activation: Activation::None,
        residual: false,
    };
    let y = g.add_typed(op, &[x, w], tb(&[4])).unwrap();
    let e = decompose(&mut g, y).unwrap_err();
    assert!(e.to_string().contains("declared type"), "{e}");
    assert_eq!(g.len(), 3, "nothing added");
}

#[test]
fn the_scale_const_has_the_graph_dtype() {
    let ty = |d: &[usize]| TensorType::new(DType::BF16, Shape::batched(d));
    let mut g = Graph::new("g");
    let q = g.input("q", ty(&[5, 4]));
    let a = g.attention(q, q, q, None, 0.5).unwrap();
    g.set_output("y", a);
    let text = lowered(g, a);
    assert!(text.contains("const [0.5] : bf16[]"), "{text}");
}
