//! The WGSL code generator without a GPU: every op kind's kernels parse and validate with
//! naga (and follow the binding convention) over many shapes and attributes, every node
//! of whole ViT graphs (forward, optimized, training) too — with f32 storage and with
//! f16 storage (every load and store converted, all arithmetic f32) — and the f32 erf /
//! GELU formulas the kernels use are accurate.

use std::collections::BTreeSet;

use eptc_ir::{
    Activation, BinaryOp, DType, Dim, Graph, Init, NodeId, Op, ReduceOp, Shape, TensorType, UnaryOp,
};
use eptc_wgpu::codegen::{node_kernels, supported_kinds, CodegenError, Kernel};
use eptc_wgpu::validate::{validate, validate_storage};

fn batched(d: &[usize]) -> Shape {
    Shape::batched(d)
}
fn fixed(d: &[usize]) -> Shape {
    Shape::fixed(d)
}
fn input(g: &mut Graph, name: &str, s: Shape) -> NodeId {
    g.input(name, TensorType::f32(s))
}
fn param(g: &mut Graph, name: &str, s: Shape) -> NodeId {
    g.param(name, false, Init::Checkpoint, TensorType::f32(s))
}

/// Generate and validate the kernels of `id` at several batch sizes; returns them all.
fn check(g: &Graph, id: NodeId, batches: &[usize]) -> Vec<Kernel> {
    check_as(g, id, batches, DType::F32)
}

/// [`check`] with tensors stored as `dtype`; with f16 also [`check_f16_kernel`].
fn check_as(g: &Graph, id: NodeId, batches: &[usize], dtype: DType) -> Vec<Kernel> {
    let mut all = Vec::new();
    for &b in batches {
        let ks = node_kernels(g, id, b, dtype).unwrap_or_else(|e| {
            panic!(
                "graph {}: node %{} ({}) at batch {b}: {e}",
                g.name,
                id.index(),
                g.node(id).op.kind()
            )
        });
        let numel = g.ty(id).shape.numel(b);
        let view = g.node(id).op.is_leaf() || matches!(g.node(id).op, Op::Reshape { .. });
        if view || numel == 0 {
            assert!(ks.is_empty(), "%{}: no kernel expected", id.index());
        } else {
            assert_eq!(ks.len(), 1, "%{}: one kernel per node", id.index());
        }
        for k in &ks {
            if let Err(e) = validate_storage(k, dtype) {
                panic!(
                    "graph {} at batch {b}: {e}\n--- source ---\n{}",
                    g.name, k.source
                );
            }
            if dtype == DType::F16 {
                check_f16_kernel(k);
            }
            assert_eq!(k.inputs, g.operands(id).len(), "{}", k.name);
            assert!(
                k.name.starts_with(&format!("n{}_", id.index())),
                "kernel name {}",
                k.name
            );
            assert!(
                k.workgroups.iter().all(|&w| (1..=65_535).contains(&w)),
                "{k:?}"
            );
        }
        all.extend(ks);
    }
    all
}

/// Every non-leaf node of `g` checked at batches 1 and 3; returns the kinds seen.
fn check_graph(g: &Graph) -> BTreeSet<&'static str> {
    eptc_ir::verify(g).unwrap_or_else(|e| panic!("graph {}: {e}", g.name));
    let mut kinds = BTreeSet::new();
    for id in g.node_ids() {
        check(g, id, &[1, 3]);
        kinds.insert(g.node(id).op.kind());
    }
    kinds
}

/// Small graphs exercising every op kind over several configurations.
fn op_graphs() -> Vec<Graph> {
    let mut gs = Vec::new();
    let mut new = |name: &str, f: &dyn Fn(&mut Graph)| {
        let mut g = Graph::new(name);
        f(&mut g);
        gs.push(g);
    };
    new("leaves", &|g| {
        let x = input(g, "x", batched(&[3]));
        let p = param(g, "p", fixed(&[3]));
        let c = g.scalar(2.0);
        let y = g.binary(BinaryOp::Add, x, p).unwrap();
        let y = g.binary(BinaryOp::Mul, y, c).unwrap();
        let r = g.reshape(y, batched(&[1, 3])).unwrap();
        g.set_output("y", r);
    });
    new("patchify", &|g| {
        for (i, (c, h, w, p)) in [(3, 32, 32, 8), (1, 4, 6, 2), (2, 3, 3, 3), (1, 1, 1, 1)]
            .into_iter()
            .enumerate()
        {
            let x = input(g, &format!("x{i}"), batched(&[c, h, w]));
            g.patchify(x, p).unwrap();
        }
        let x = input(g, "fixed", fixed(&[2, 2, 6, 6]));
        g.patchify(x, 3).unwrap();
    });
    new("matmul", &|g| {
        let cases: &[(Shape, Shape, bool, bool)] = &[
            (batched(&[17, 48]), fixed(&[144, 48]), false, true),
            (batched(&[3, 17, 16]), batched(&[3, 17, 16]), false, true),
            (batched(&[3, 17, 17]), batched(&[3, 17, 16]), false, false),
            (batched(&[7, 5]), batched(&[7, 3]), true, false),
            (batched(&[7, 5]), batched(&[3, 7]), true, true),
            (fixed(&[2, 1, 5, 4]), fixed(&[3, 4, 6]), false, false),
            (fixed(&[5, 4]), batched(&[4, 6]), false, false),
            (fixed(&[1, 1]), fixed(&[1, 1]), false, false),
            (batched(&[33, 70]), fixed(&[70, 19]), false, false),
            (batched(&[17, 0]), fixed(&[0, 5]), false, false),
            (fixed(&[1, 3, 17, 16]), batched(&[1, 17, 16]), false, true),
        ];
        for (i, (a, b, ta, tb)) in cases.iter().enumerate() {
            let a = input(g, &format!("a{i}"), a.clone());
            let b = input(g, &format!("b{i}"), b.clone());
            g.matmul(a, b, *ta, *tb).unwrap();
        }
    });
    new("binary", &|g| {
        let pairs: &[(Shape, Shape)] = &[
            (batched(&[5]), batched(&[5])),
            (batched(&[17, 48]), fixed(&[48])),
            (batched(&[3, 17, 17]), fixed(&[])),
            (fixed(&[]), batched(&[3, 2])),
            (batched(&[5]), batched(&[1])),
            (fixed(&[4, 1, 3]), fixed(&[1, 5, 1])),
            (fixed(&[]), fixed(&[])),
            (fixed(&[3, 1]), batched(&[1, 4])),
            (batched(&[3, 17, 1]), batched(&[3, 17, 17])),
            (fixed(&[1]), fixed(&[1])),
            (batched(&[0, 4]), fixed(&[4])),
        ];
        for op in BinaryOp::ALL {
            for (i, (a, b)) in pairs.iter().enumerate() {
                let a = input(g, &format!("{}a{i}", op.name()), a.clone());
                let b = input(g, &format!("{}b{i}", op.name()), b.clone());
                g.binary(op, a, b).unwrap();
            }
        }
    });
    new("unary", &|g| {
        for op in UnaryOp::ALL {
            for (i, s) in [batched(&[5]), fixed(&[]), batched(&[17, 192]), fixed(&[1])]
                .into_iter()
                .enumerate()
            {
                let x = input(g, &format!("{}{i}", op.name()), s);
                g.unary(op, x).unwrap();
            }
        }
    });
    new("reduce", &|g| {
        let cases: &[(Shape, &[usize], bool)] = &[
            (batched(&[17, 48]), &[2], true),
            (batched(&[17, 48]), &[2], false),
            (batched(&[]), &[0], false),
            (batched(&[4, 4]), &[1, 2], false),
            (batched(&[4, 4]), &[2, 0], true),
            (batched(&[17, 48]), &[0, 1], false),
            (batched(&[5]), &[1], true),
            (batched(&[3, 4]), &[0, 1, 2], false),
            (batched(&[3, 4]), &[0, 1, 2], true),
            (fixed(&[1]), &[0], false),
            (fixed(&[2, 3, 4, 5]), &[1, 3], false),
            (batched(&[3, 17, 17]), &[3], true),
            (fixed(&[4, 0]), &[1], false),
        ];
        for op in ReduceOp::ALL {
            for (i, (s, axes, keep)) in cases.iter().enumerate() {
                let x = input(g, &format!("{}{i}", op.name()), s.clone());
                g.reduce(op, x, axes, *keep).unwrap();
            }
        }
    });
    new("softmax", &|g| {
        for (i, (s, axis)) in [
            (batched(&[3, 17, 17]), 3),
            (batched(&[5]), 0),
            (batched(&[4, 6]), 1),
            (fixed(&[7]), 0),
            (batched(&[1]), 1),
            (fixed(&[2, 300]), 1),
        ]
        .into_iter()
        .enumerate()
        {
            let x = input(g, &format!("x{i}"), s);
            g.softmax(x, axis).unwrap();
        }
    });
    new("layernorm", &|g| {
        for (i, s) in [
            batched(&[17, 48]),
            fixed(&[8]),
            batched(&[1]),
            batched(&[768]),
        ]
        .into_iter()
        .enumerate()
        {
            let d = match s.dims().last() {
                Some(Dim::Fixed(d)) => *d,
                _ => unreachable!(),
            };
            let x = input(g, &format!("x{i}"), s.clone());
            let gm = param(g, &format!("g{i}"), fixed(&[d]));
            let bt = param(g, &format!("b{i}"), fixed(&[d]));
            g.layernorm(x, gm, bt, 1e-6).unwrap();
            let dy = input(g, &format!("dy{i}"), s);
            g.add(Op::LayerNormGrad { eps: 1e-5 }, &[x, gm, dy])
                .unwrap();
        }
    });
    new("shape", &|g| {
        let x = input(g, "x", batched(&[17, 3, 16]));
        g.permute(x, &[0, 2, 1, 3]).unwrap();
        let y = input(g, "y", batched(&[4, 5]));
        g.permute(y, &[2, 0, 1]).unwrap();
        g.slice(y, 1, 1, 2).unwrap();
        g.slice(y, 2, 0, 5).unwrap();
        let s = input(g, "s", fixed(&[]));
        g.permute(s, &[]).unwrap();
        g.broadcast(s, batched(&[4])).unwrap();
        let v = input(g, "v", fixed(&[10]));
        g.permute(v, &[0]).unwrap();
        g.slice(v, 0, 3, 7).unwrap();
        g.reshape(v, fixed(&[2, 5])).unwrap();
        let p = param(g, "p", fixed(&[17, 6]));
        g.broadcast(p, batched(&[3, 17, 6])).unwrap();
        let c = param(g, "c", fixed(&[1, 1, 48]));
        let cb = g.broadcast(c, batched(&[1, 48])).unwrap();
        let t = input(g, "t", batched(&[16, 48]));
        g.concat(&[cb, t], 1).unwrap();
        g.concat(&[t, cb, t, cb], 1).unwrap();
        let q = param(g, "q", fixed(&[3, 1]));
        g.broadcast(q, fixed(&[2, 3, 4])).unwrap();
        let a = input(g, "a", batched(&[3, 17, 17]));
        let b = input(g, "b", batched(&[3, 17, 6]));
        let cat = g.concat(&[a, b], 3).unwrap();
        g.slice(cat, 3, 0, 17).unwrap();
        let f1 = input(g, "f1", fixed(&[2, 3]));
        let f2 = input(g, "f2", fixed(&[1, 3]));
        let f3 = input(g, "f3", fixed(&[4, 3]));
        g.concat(&[f1, f2, f3], 0).unwrap();
        let e = input(g, "e", fixed(&[0, 3]));
        g.concat(&[f1, e, f3], 0).unwrap();
        g.concat(&[f1, f1], 1).unwrap();
    });
    new("softmax_sink", &|g| {
        let cases: &[(Shape, Shape)] = &[
            (batched(&[3, 17, 17]), fixed(&[17, 1])),
            (batched(&[3, 17, 17]), fixed(&[3, 17, 1])),
            (batched(&[3, 17, 17]), batched(&[3, 17, 1])),
            (fixed(&[5]), fixed(&[1])),
            (batched(&[4]), fixed(&[])),
            (batched(&[3, 2, 300]), batched(&[1, 2, 1])),
        ];
        for (i, (s, z)) in cases.iter().enumerate() {
            let s = input(g, &format!("s{i}"), s.clone());
            let z = input(g, &format!("z{i}"), z.clone());
            g.softmax_sink(s, z).unwrap();
        }
    });
    new("attention", &|g| {
        let cases: &[(Shape, Shape, Shape, Option<Shape>)] = &[
            (
                batched(&[3, 17, 16]),
                batched(&[3, 17, 16]),
                batched(&[3, 17, 16]),
                Some(fixed(&[17, 1])),
            ),
            (
                batched(&[3, 17, 16]),
                batched(&[3, 17, 16]),
                batched(&[3, 17, 16]),
                None,
            ),
            (
                batched(&[3, 5, 8]),
                fixed(&[1, 3, 7, 8]),
                fixed(&[3, 7, 4]),
                Some(batched(&[1, 5, 1])),
            ),
            (fixed(&[5, 8]), fixed(&[6, 8]), fixed(&[6, 3]), None),
            (
                fixed(&[5, 8]),
                fixed(&[6, 8]),
                fixed(&[6, 3]),
                Some(fixed(&[])),
            ),
            // Head dims beyond the private arrays: q read from memory, output chunked.
            (
                batched(&[2, 9, 150]),
                batched(&[2, 11, 150]),
                batched(&[2, 11, 130]),
                Some(fixed(&[9, 1])),
            ),
            (
                batched(&[4, 64]),
                batched(&[4, 64]),
                batched(&[4, 128]),
                None,
            ),
            (batched(&[1, 1]), batched(&[1, 1]), batched(&[1, 1]), None),
            (batched(&[3, 4]), batched(&[0, 4]), batched(&[0, 2]), None),
        ];
        for (i, (q, k, v, z)) in cases.iter().enumerate() {
            let q = input(g, &format!("q{i}"), q.clone());
            let k = input(g, &format!("k{i}"), k.clone());
            let v = input(g, &format!("v{i}"), v.clone());
            let z = z.as_ref().map(|z| input(g, &format!("z{i}"), z.clone()));
            g.attention(q, k, v, z, 0.25).unwrap();
        }
    });
    new("linear", &|g| {
        for (i, (xs, o, bias, act, res)) in [
            (batched(&[17, 192]), 48, true, Activation::Gelu, true),
            (batched(&[17, 48]), 144, true, Activation::None, false),
            (fixed(&[8]), 4, true, Activation::None, false),
            (batched(&[5]), 3, false, Activation::Gelu, false),
            (batched(&[5]), 3, false, Activation::None, true),
            (batched(&[2, 33]), 17, true, Activation::Gelu, false),
        ]
        .into_iter()
        .enumerate()
        {
            let k = match xs.dims().last() {
                Some(Dim::Fixed(k)) => *k,
                _ => unreachable!(),
            };
            let x = input(g, &format!("x{i}"), xs.clone());
            let w = param(g, &format!("w{i}"), fixed(&[o, k]));
            let b = bias.then(|| param(g, &format!("b{i}"), fixed(&[o])));
            let mut out = xs.0.clone();
            *out.last_mut().unwrap() = Dim::Fixed(o);
            let r = res.then(|| input(g, &format!("r{i}"), Shape(out)));
            g.linear(x, w, b, act, r).unwrap();
        }
    });
    gs
}

#[test]
fn every_supported_kind_validates_over_many_shapes() {
    let mut seen = BTreeSet::new();
    for g in op_graphs() {
        seen.extend(check_graph(&g));
    }
    let want: BTreeSet<&str> = supported_kinds().into_iter().collect();
    let missing: Vec<&&str> = want.difference(&seen).collect();
    assert!(missing.is_empty(), "kinds without a test case: {missing:?}");
    // Every op of the IR but the flash-style attention backward, which runs as its
    // decomposition.
    let backward = ["attention_lse", "attention_grad"];
    let all: BTreeSet<&str> = Op::all_kinds()
        .into_iter()
        .filter(|k| !backward.contains(k))
        .collect();
    assert_eq!(
        want, all,
        "every op of the IR but the attention backward is supported"
    );
    for k in Op::fused_kinds() {
        assert_eq!(want.contains(k), !backward.contains(&k), "fused {k}");
    }
}

fn example(path: &str) -> Graph {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    eptc_ir::text::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn whole_graphs_validate_at_batch_1_and_4() {
    let files = [
        "../../ir-specs/examples/attention.eptc",
        "../../ir-specs/examples/fused.eptc",
        "../../ir-specs/examples/mlp.eptc",
        "tests/data/tiny_optimized.eptc",
        "tests/data/tiny_train.eptc",
    ];
    let mut kernels = 0;
    for f in files {
        let g = example(f);
        eptc_ir::verify(&g).unwrap();
        for id in g.node_ids() {
            kernels += check(&g, id, &[1, 4]).len();
        }
    }
    assert!(kernels > 200, "{kernels} kernels");
}

/// Every kernel of ViT-B/16 + EPT (cat deep, L = 100, 10 classes, 224 px): the forward and
/// the training graph as `eptc compile` writes them (`tests/data/vit_b16_*.eptc`, made
/// from a random timm ViT-B/16 checkpoint), at the paper's batch 4 and at 64.
#[test]
fn vit_b16_graphs_validate() {
    let mut kernels = 0;
    for f in [
        "tests/data/vit_b16_optimized.eptc",
        "tests/data/vit_b16_train.eptc",
    ] {
        let g = example(f);
        eptc_ir::verify(&g).unwrap();
        for id in g.node_ids() {
            kernels += check(&g, id, &[4, 64]).len();
        }
    }
    assert!(kernels > 1000, "{kernels} kernels");
}

/// The structure of an f16 kernel: it starts with `enable f16;`, every binding is an
/// `array<f16>`, every element of an operand is read as `f32(x[..])` and every element
/// of the output written as `out[..] = f16(..)`, and `f16` appears nowhere else (all
/// arithmetic, locals and workgroup memory are f32).
fn check_f16_kernel(k: &Kernel) {
    let src = &k.source;
    let fail = |msg: String| -> ! { panic!("kernel {}: {msg}\n--- source ---\n{src}", k.name) };
    let Some(body) = src.strip_prefix("enable f16;\n") else {
        fail("does not start with `enable f16;`".into());
    };
    let mut names = Vec::new();
    for line in body.lines().filter(|l| l.starts_with("@group(0)")) {
        let decl = line.split("> ").nth(1).unwrap_or_default();
        let Some(name) = decl.strip_suffix(": array<f16>;") else {
            fail(format!("binding `{line}` is not an array<f16>"));
        };
        names.push(name.to_string());
    }
    assert_eq!(names.len(), k.inputs + 1, "{}", k.name);
    let mut rest = body.replace(": array<f16>;", ": array<_>;");
    for (b, name) in names.iter().enumerate() {
        let is_out = b == k.inputs;
        let pat = format!("{name}[");
        let mut from = 0;
        while let Some(p) = rest[from..].find(&pat) {
            let at = from + p;
            from = at + pat.len();
            // Only whole identifiers.
            let prev = rest[..at].chars().last().unwrap_or(' ');
            if prev.is_alphanumeric() || prev == '_' {
                continue;
            }
            // The matching `]`.
            let mut depth = 1;
            let mut end = from;
            for (i, c) in rest[from..].char_indices() {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = from + i + 1;
                    break;
                }
            }
            if is_out {
                if !rest[end..].starts_with(" = f16(") {
                    fail(format!("a write of `{name}` is not `= f16(..)`"));
                }
            } else if !rest[..at].ends_with("f32(") || !rest[end..].starts_with(')') {
                fail(format!("a read of `{name}` is not `f32({name}[..])`"));
            }
        }
    }
    rest = rest.replace(" = f16(", " = _(");
    if let Some(p) = rest.find("f16") {
        fail(format!(
            "f16 outside loads and stores: `{}`",
            &rest[p.saturating_sub(40)..(p + 20).min(rest.len())]
        ));
    }
}

#[test]
fn every_supported_kind_validates_in_f16() {
    let mut kernels = 0;
    for g in op_graphs() {
        for id in g.node_ids() {
            kernels += check_as(&g, id, &[1, 3], DType::F16).len();
        }
    }
    assert!(kernels > 100, "{kernels} kernels");
}

#[test]
fn whole_graphs_validate_in_f16() {
    let mut kernels = 0;
    for f in [
        "../../ir-specs/examples/attention.eptc",
        "../../ir-specs/examples/fused.eptc",
        "../../ir-specs/examples/mlp.eptc",
        "tests/data/tiny_optimized.eptc",
        "tests/data/tiny_train.eptc",
        "tests/data/vit_b16_optimized.eptc",
        "tests/data/vit_b16_train.eptc",
    ] {
        let g = example(f);
        for id in g.node_ids() {
            kernels += check_as(&g, id, &[4], DType::F16).len();
        }
    }
    assert!(kernels > 700, "{kernels} kernels");
}

#[test]
fn f16_structure_check_catches_f16_arithmetic() {
    let mut g = Graph::new("s");
    let x = input(&mut g, "x", batched(&[4]));
    let y = g.unary(UnaryOp::Exp, x).unwrap();
    let k = node_kernels(&g, y, 2, DType::F16).unwrap().remove(0);
    check_f16_kernel(&k);
    for (from, to) in [
        ("f32(x[idx])", "x[idx]"),
        ("= f16(exp(v))", "= exp(f16(v))"),
        (
            "let v = f32(x[idx]);",
            "let v = f32(x[idx]);\n    let h: f16 = f16(v);",
        ),
    ] {
        let mut bad = k.clone();
        bad.source = bad.source.replace(from, to);
        assert_ne!(bad.source, k.source, "{from}");
        let r = std::panic::catch_unwind(|| check_f16_kernel(&bad));
        assert!(r.is_err(), "{from} -> {to} passed");
    }
}

#[test]
fn training_graph_has_the_fused_ops() {
    let g = example("tests/data/tiny_train.eptc");
    let kinds: BTreeSet<&str> = g
        .node_ids()
        .iter()
        .map(|&id| g.node(id).op.kind())
        .collect();
    for k in [
        "attention",
        "linear",
        "layernorm_grad",
        "softmax_sink",
        "patchify",
    ] {
        assert!(kinds.contains(k), "{k} missing from the training graph");
    }
}

#[test]
fn storage_is_f32_or_f16_and_the_graph_f32() {
    let mut g = Graph::new("f16");
    let x = input(&mut g, "x", batched(&[4]));
    let y = g.unary(UnaryOp::Exp, x).unwrap();
    let e = node_kernels(&g, y, 2, DType::BF16).unwrap_err();
    let CodegenError::Unsupported { node, op, msg } = &e;
    assert_eq!((*node, op.as_str()), (y.index(), "exp"));
    assert!(msg.contains("no bf16 storage; use f16 or f32"), "{e}");
    let k = node_kernels(&g, y, 2, DType::F16).unwrap().remove(0);
    assert!(k.source.starts_with("enable f16;\n"), "{}", k.source);
    assert!(k.source.contains("out[idx] = f16(exp(v));"), "{}", k.source);
    assert!(k.source.contains("let v = f32(x[idx]);"), "{}", k.source);
    // The validators keep the two apart.
    validate_storage(&k, DType::F16).unwrap();
    // (f16 needs the SHADER_FLOAT16 capability, which f32 validation does not grant.)
    let e = validate(&k).unwrap_err();
    assert!(e.contains("does not validate"), "{e}");
    let k32 = node_kernels(&g, y, 2, DType::F32).unwrap().remove(0);
    assert!(validate_storage(&k32, DType::F16)
        .unwrap_err()
        .contains("array<f16>"));
    assert!(validate_storage(&k32, DType::BF16)
        .unwrap_err()
        .contains("bf16"));
    // The graph's own tensors are f32 whatever the storage.
    let mut g = Graph::new("f16 node");
    let x = g.input("x", TensorType::new(DType::F16, batched(&[4])));
    let y = g.unary(UnaryOp::Exp, x).unwrap();
    let e = node_kernels(&g, y, 2, DType::F32).unwrap_err();
    assert!(e.to_string().contains("f16"), "{e}");
}

#[test]
fn leaves_views_and_empty_outputs_have_no_kernel() {
    let mut g = Graph::new("none");
    let x = input(&mut g, "x", batched(&[0, 3]));
    let p = param(&mut g, "p", fixed(&[3]));
    let c = g.scalar(1.0);
    let y = g.binary(BinaryOp::Add, x, p).unwrap();
    let r = g.reshape(p, fixed(&[3, 1])).unwrap();
    for id in [x, p, c, y, r] {
        assert!(node_kernels(&g, id, 3, DType::F32).unwrap().is_empty());
    }
    // A batch of 0 empties everything batched.
    let z = input(&mut g, "z", batched(&[3]));
    let z = g.unary(UnaryOp::Exp, z).unwrap();
    assert!(node_kernels(&g, z, 0, DType::F32).unwrap().is_empty());
    assert_eq!(node_kernels(&g, z, 2, DType::F32).unwrap().len(), 1);
}

#[test]
fn large_dispatches_stay_within_the_grid_limit() {
    let mut g = Graph::new("large");
    let x = input(&mut g, "x", batched(&[4096, 4097]));
    let y = g.unary(UnaryOp::Gelu, x).unwrap();
    let ks = check(&g, y, &[2]);
    let [gx, gy, gz] = ks[0].workgroups;
    assert_eq!(gz, 1);
    assert!(gy > 1 && gx == 65_535, "{:?}", ks[0].workgroups);
    assert!(u64::from(gx) * u64::from(gy) * 256 >= 2 * 4096 * 4097);
    // Many matmul tiles / entries.
    let a = input(&mut g, "a", batched(&[70_000, 2, 2]));
    let b = param(&mut g, "b", fixed(&[2, 2]));
    let m = g.matmul(a, b, false, false).unwrap();
    let ks = check(&g, m, &[1, 2]);
    assert!(ks.iter().all(|k| k.workgroups[1] >= 2));
    // Reductions and rows.
    let s = g.softmax(x, 2).unwrap();
    check(&g, s, &[2]);
}

#[test]
fn validation_errors_name_the_kernel_and_quote_naga() {
    let mut g = Graph::new("v");
    let x = input(&mut g, "x", batched(&[4]));
    let y = g.unary(UnaryOp::Exp, x).unwrap();
    let good = node_kernels(&g, y, 2, DType::F32).unwrap().remove(0);
    validate(&good).unwrap();

    let mut bad = good.clone();
    bad.source = bad.source.replace("exp(", "expp(");
    let e = validate(&bad).unwrap_err();
    assert!(e.contains(&good.name) && e.contains("expp"), "{e}");

    let mut bad = good.clone();
    bad.source = bad
        .source
        .replace("let v = x[idx];", "let v = 1.0f + f32(idx);");
    let e = validate(&bad).unwrap_err();
    assert!(e.contains("not used"), "{e}");

    let mut bad = good.clone();
    bad.inputs = 2;
    let e = validate(&bad).unwrap_err();
    assert!(e.contains(&good.name) && e.contains("read-only"), "{e}");
    bad.source = bad.source.replace("@binding(1)", "@binding(2)");
    let e = validate(&bad).unwrap_err();
    assert!(e.contains("binding 1 is missing"), "{e}");

    let mut bad = good.clone();
    bad.entry = "nope".into();
    assert!(validate(&bad).unwrap_err().contains("nope"));

    let mut bad = good.clone();
    bad.workgroups = [70_000, 1, 1];
    assert!(validate(&bad).unwrap_err().contains("65535"));

    // A type error is naga's validator's to report (the parser accepts it).
    let mut bad = good;
    bad.source = bad.source.replace(
        "out[idx] = exp(v);",
        "out[idx] = exp(v);\n    var w = 1.0f;\n    w = 2u;",
    );
    let e = validate(&bad).unwrap_err();
    assert!(e.contains("kernel") && e.contains("w = 2u"), "{e}");
}

// ---- the f32 erf / GELU the kernels compute, mirrored in Rust -----------------------

/// `erfc(t) / 2` for `t >= 0`, as the WGSL `half_erfc` (f32 throughout).
fn half_erfc(t: f32, tt: f32) -> f32 {
    let u = 1.0f32 / (1.0 + 0.5 * t);
    let mut r = 0.170_872_77f32;
    for c in [
        -0.822_152_23f32,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        r = r * u + c;
    }
    0.5 * u * (r - tt).exp()
}

fn norm_cdf(x: f32) -> f32 {
    // As the WGSL's selects: NaN stays NaN.
    let xc = x.clamp(-20.0, 20.0);
    let h = half_erfc(xc.abs() * 0.707_106_77, 0.5 * (xc * xc));
    if xc >= 0.0 {
        1.0 - h
    } else {
        h
    }
}

fn gelu(x: f32) -> f32 {
    let xc = if x < -20.0 { -20.0 } else { x };
    xc * norm_cdf(xc)
}

fn gelu_deriv(x: f32) -> f32 {
    let xc = x.clamp(-20.0, 20.0);
    norm_cdf(xc) + xc * (-0.5 * (xc * xc)).exp() * 0.398_942_3
}

#[test]
fn erf_gelu_formulas_are_accurate_in_f32() {
    use eptc_ir::reference;
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for i in -120_000..=120_000 {
        let x = i as f32 * 1e-4;
        let xd = f64::from(x);
        let e = (f64::from(gelu(x)) - reference::gelu(xd)).abs();
        let ed = (f64::from(gelu_deriv(x)) - reference::gelu_deriv(xd)).abs();
        let ec = (f64::from(norm_cdf(x)) - reference::normal_cdf(xd)).abs();
        worst = (worst.0.max(e), worst.1.max(ed), worst.2.max(ec));
        assert!(e <= 1e-6 * xd.abs().max(1.0), "gelu({x}): {e}");
        assert!(ed <= 1e-6, "gelu_deriv({x}): {ed}");
        assert!(ec <= 1e-6, "Phi({x}): {ec}");
        // Relative accuracy in the lower tail, where the GELU is tiny.
        if x < -1.0 {
            let r = e / reference::gelu(xd).abs();
            assert!(r <= 2e-5, "gelu({x}) relative {r}");
        }
    }
    eprintln!(
        "worst abs errors: gelu {:.2e}, gelu' {:.2e}, Phi {:.2e}",
        worst.0, worst.1, worst.2
    );
    assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
    assert_eq!(gelu(f32::NEG_INFINITY), 0.0);
    assert!(gelu(f32::NAN).is_nan() && gelu_deriv(f32::NAN).is_nan());
    assert_eq!(gelu_deriv(f32::INFINITY), 1.0);
    assert_eq!(gelu_deriv(f32::NEG_INFINITY), 0.0);
}

#[test]
fn wgsl_constants_match_the_rust_mirror() {
    // The mirror above must follow the WGSL: same constants in the generated source.
    let mut g = Graph::new("gelu");
    let x = input(&mut g, "x", batched(&[4]));
    let y = g.unary(UnaryOp::GeluDeriv, x).unwrap();
    let src = node_kernels(&g, y, 1, DType::F32).unwrap().remove(0).source;
    for c in [
        "0.17087277",
        "0.82215223",
        "1.48851587",
        "1.13520398",
        "0.27886807",
        "0.18628806",
        "0.09678418",
        "0.37409196",
        "1.00002368",
        "1.26551223",
        "0.70710678",
        "0.39894228",
    ] {
        assert!(src.contains(c), "{c} not in\n{src}");
    }
}

// ---- numerics on a real adapter (lavapipe in CI); skipped without one ----------------

mod gpu {
    use std::collections::HashMap;
    use std::sync::OnceLock;

    use eptc_ir::reference::{self, Tensor64};
    use eptc_ir::{DType, Graph, NodeId, Op};
    use eptc_wgpu::codegen::{node_kernels, Kernel};

    pub struct Gpu {
        device: wgpu::Device,
        queue: wgpu::Queue,
    }

    pub fn gpu() -> Option<&'static Gpu> {
        static G: OnceLock<Option<Gpu>> = OnceLock::new();
        G.get_or_init(|| {
            pollster::block_on(async {
                let instance = wgpu::Instance::new(
                    wgpu::InstanceDescriptor::new_without_display_handle_from_env(),
                );
                let adapter = instance
                    .request_adapter(&wgpu::RequestAdapterOptions::default())
                    .await
                    .ok()?;
                eprintln!("adapter: {:?}", adapter.get_info().name);
                let (device, queue) = adapter
                    .request_device(&wgpu::DeviceDescriptor::default())
                    .await
                    .ok()?;
                Some(Gpu { device, queue })
            })
        })
        .as_ref()
    }

    impl Gpu {
        /// Run one kernel on `inputs`, returning `out_len` output values.
        pub fn run(&self, k: &Kernel, inputs: &[Vec<f32>], out_len: usize) -> Vec<f32> {
            use wgpu::BufferUsages as U;
            let d = &self.device;
            let buf = |data: &[f32], usage| {
                let b = d.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: (data.len().max(1) * 4) as u64,
                    usage,
                    mapped_at_creation: false,
                });
                if !data.is_empty() {
                    self.queue.write_buffer(&b, 0, bytemuck::cast_slice(data));
                }
                b
            };
            let mut bufs: Vec<wgpu::Buffer> = inputs
                .iter()
                .map(|x| buf(x, U::STORAGE | U::COPY_DST))
                .collect();
            let nan = vec![f32::NAN; out_len];
            bufs.push(buf(&nan, U::STORAGE | U::COPY_SRC | U::COPY_DST));
            let staging = d.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: (out_len.max(1) * 4) as u64,
                usage: U::MAP_READ | U::COPY_DST,
                mapped_at_creation: false,
            });
            let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&k.name),
                source: wgpu::ShaderSource::Wgsl(k.source.as_str().into()),
            });
            let pipe = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&k.name),
                layout: None,
                module: &module,
                entry_point: Some(&k.entry),
                compilation_options: Default::default(),
                cache: None,
            });
            let entries: Vec<wgpu::BindGroupEntry> = bufs
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: b.as_entire_binding(),
                })
                .collect();
            let bg = d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipe.get_bind_group_layout(0),
                entries: &entries,
            });
            let mut enc = d.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipe);
                pass.set_bind_group(0, &bg, &[]);
                let [x, y, z] = k.workgroups;
                pass.dispatch_workgroups(x, y, z);
            }
            let out = bufs.last().expect("output");
            enc.copy_buffer_to_buffer(out, 0, &staging, 0, (out_len.max(1) * 4) as u64);
            self.queue.submit([enc.finish()]);
            staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
            d.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
            let v: Vec<f32> =
                bytemuck::cast_slice(&staging.get_mapped_range(..).expect("mapped")).to_vec();
            v[..out_len].to_vec()
        }
    }

    /// Deterministic values in `[-r, r]`.
    pub fn values(seed: u64, n: usize, r: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * r
            })
            .collect()
    }

    /// Run every non-leaf node's kernel of `g` at `batch` on the reference values of its
    /// operands and compare with the reference value of the node: NaN where the
    /// reference is NaN, the same infinities, and `|a - b|_2 <= tol |b|_2` elsewhere.
    /// `fill(name, shape)` gives the leaves' values. Returns the number of kernels run.
    pub fn check_graph(
        gpu: &Gpu,
        g: &Graph,
        batch: usize,
        tol: f64,
        fill: &dyn Fn(&str, &[usize]) -> Vec<f32>,
    ) -> usize {
        let mut g = g.clone();
        let mut values: HashMap<String, Tensor64> = HashMap::new();
        for id in g.node_ids() {
            let node = g.node(id);
            let name = match &node.op {
                Op::Input { name } | Op::Param { name, .. } => name.clone(),
                _ => continue,
            };
            let shape = node.ty.shape.resolve(batch);
            let data = fill(&name, &shape);
            values.insert(
                name,
                Tensor64::new(shape, data.iter().map(|&v| f64::from(v)).collect()),
            );
        }
        let ids: Vec<NodeId> = g.node_ids();
        for &id in &ids {
            g.set_output(&format!("node{}", id.index()), id);
        }
        // Inputs bind the batch; a graph without any gets it from here.
        let env = reference::eval_nodes(&g, &values).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        let mut ran = 0;
        for id in ids {
            let ks = node_kernels(&g, id, batch, DType::F32).unwrap();
            let Some(k) = ks.first() else { continue };
            let ins: Vec<Vec<f32>> = g
                .operands(id)
                .iter()
                .map(|o| env[o].data.iter().map(|&v| v as f32).collect())
                .collect();
            let want: Vec<f32> = env[&id].data.iter().map(|&v| v as f32).collect();
            let got = gpu.run(k, &ins, want.len());
            ran += 1;
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                let bad = if b.is_nan() {
                    !a.is_nan()
                } else if b.is_infinite() {
                    a != b
                } else if !a.is_finite() {
                    true
                } else {
                    num += (f64::from(a) - f64::from(b)).powi(2);
                    den += f64::from(b).powi(2);
                    false
                };
                assert!(
                    !bad,
                    "{} (graph {}, batch {batch}): element {i}: got {a}, want {b}\n{}",
                    k.name, g.name, k.source
                );
            }
            let rel = (num.sqrt() / den.sqrt().max(1e-30)).min(num.sqrt());
            assert!(
                rel <= tol,
                "{} (graph {}, batch {batch}): relative error {rel:.3e}\ngot  {:?}\nwant {:?}",
                k.name,
                g.name,
                &got[..got.len().min(16)],
                &want[..want.len().min(16)]
            );
        }
        ran
    }
}

/// Random values in [-2, 2] (names starting with `pos` get (0, 2]).
fn plain_fill(name: &str, shape: &[usize]) -> Vec<f32> {
    let n = shape.iter().product();
    let seed = name
        .bytes()
        .fold(7u64, |h, c| h.wrapping_mul(31).wrapping_add(u64::from(c)));
    gpu::values(seed, n, 2.0)
}

#[test]
fn gpu_every_op_matches_the_reference() {
    let Some(gpu) = gpu::gpu() else {
        eprintln!("no wgpu adapter: skipped");
        return;
    };
    let mut ran = 0;
    for g in op_graphs() {
        for b in [1, 3] {
            ran += gpu::check_graph(gpu, &g, b, 1e-5, &plain_fill);
        }
    }
    eprintln!("{ran} kernels checked");
}

#[test]
fn gpu_special_values_follow_the_spec() {
    let Some(gpu) = gpu::gpu() else {
        eprintln!("no wgpu adapter: skipped");
        return;
    };
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
        1.0,
        -1.0,
        30.0,
        -30.0,
        1e-30,
        -7.5,
        88.0,
    ];
    let fill = |name: &str, shape: &[usize]| -> Vec<f32> {
        let n: usize = shape.iter().product();
        let off = name.len() % specials.len();
        (0..n)
            .map(|i| specials[(i * 7 + off) % specials.len()])
            .collect()
    };
    let mut g = Graph::new("specials");
    let a = input(&mut g, "a", batched(&[12]));
    let b = input(&mut g, "bb", batched(&[12]));
    let c = input(&mut g, "ccc", batched(&[12, 1]));
    for op in UnaryOp::ALL {
        g.unary(op, a).unwrap();
    }
    for op in BinaryOp::ALL {
        g.binary(op, a, b).unwrap();
    }
    // Rows containing NaN, +-inf or finite values only.
    let r = input(&mut g, "rows", fixed(&[4, 3]));
    for op in ReduceOp::ALL {
        g.reduce(op, a, &[1], false).unwrap();
        g.reduce(op, r, &[1], false).unwrap();
    }
    g.softmax(r, 1).unwrap();
    g.softmax_sink(r, c).unwrap_or_else(|_| {
        let z = input(&mut g, "zz", fixed(&[4, 1]));
        g.softmax_sink(r, z).unwrap()
    });
    let mut n = 0;
    for batch in [1, 2] {
        n += gpu::check_graph(gpu, &g, batch, 1e-5, &fill);
    }
    // Finite rows with -inf entries and sinks of -inf / finite values.
    let fill2 = |name: &str, shape: &[usize]| -> Vec<f32> {
        let n: usize = shape.iter().product();
        match name {
            "z" => (0..n)
                .map(|i| [f32::NEG_INFINITY, 0.5, -3.0][i % 3])
                .collect(),
            _ => (0..n)
                .map(|i| {
                    if i % 5 == 2 {
                        f32::NEG_INFINITY
                    } else {
                        (i as f32 * 0.37).sin() * 3.0
                    }
                })
                .collect(),
        }
    };
    let mut g = Graph::new("masks");
    let s = input(&mut g, "s", batched(&[3, 6]));
    let z = input(&mut g, "z", fixed(&[3, 1]));
    g.softmax_sink(s, z).unwrap();
    g.softmax(s, 2).unwrap();
    g.softmax(s, 1).unwrap();
    g.reduce(ReduceOp::LogSumExp, s, &[2], true).unwrap();
    let q = input(&mut g, "q", batched(&[3, 4]));
    let k = input(&mut g, "k", batched(&[6, 4]));
    let v = input(&mut g, "v", batched(&[6, 5]));
    g.attention(q, k, v, Some(z), 0.5).unwrap();
    g.attention(q, k, v, None, 0.5).unwrap();
    for batch in [1, 2] {
        n += gpu::check_graph(gpu, &g, batch, 1e-5, &fill2);
    }
    eprintln!("{n} kernels checked");
}

#[test]
fn gpu_whole_graphs_match_the_reference_node_by_node() {
    let Some(gpu) = gpu::gpu() else {
        eprintln!("no wgpu adapter: skipped");
        return;
    };
    let fill = |name: &str, shape: &[usize]| -> Vec<f32> {
        let n: usize = shape.iter().product();
        let seed = name
            .bytes()
            .fold(7u64, |h, c| h.wrapping_mul(31).wrapping_add(u64::from(c)));
        if name == "labels" {
            return (0..n)
                .map(|i| ((i * 7 + 3) % 3 == 0) as u8 as f32)
                .collect();
        }
        let r = if name.contains("weight") || name.contains("folded") {
            0.2
        } else {
            1.0
        };
        gpu::values(seed, n, r)
    };
    let mut n = 0;
    for f in [
        "../../ir-specs/examples/attention.eptc",
        "../../ir-specs/examples/fused.eptc",
        "../../ir-specs/examples/mlp.eptc",
        "tests/data/tiny_optimized.eptc",
        "tests/data/tiny_train.eptc",
    ] {
        let g = example(f);
        for batch in [1, 3] {
            n += gpu::check_graph(gpu, &g, batch, 1e-5, &fill);
        }
    }
    eprintln!("{n} kernels checked");
}

#[test]
fn gpu_two_dimensional_dispatches_cover_every_element() {
    let Some(gpu) = gpu::gpu() else {
        eprintln!("no wgpu adapter: skipped");
        return;
    };
    let mut g = Graph::new("grid");
    // More than 65535 workgroups of 256 elements, of 64 rows, of matmul tiles.
    let x = input(&mut g, "x", batched(&[65_535 * 256 + 300]));
    g.unary(UnaryOp::Neg, x).unwrap();
    let r = input(&mut g, "r", batched(&[65_535 * 64 + 5, 2]));
    g.softmax(r, 2).unwrap();
    let a = input(&mut g, "a", batched(&[70_000, 2, 3]));
    let b = param(&mut g, "b", fixed(&[3, 2]));
    g.matmul(a, b, false, false).unwrap();
    let n = gpu::check_graph(gpu, &g, 1, 1e-6, &plain_fill);
    assert_eq!(n, 3);
    for id in g.node_ids() {
        for k in node_kernels(&g, id, 1, DType::F32).unwrap() {
            assert!(k.workgroups[1] > 1, "{} {:?}", k.name, k.workgroups);
        }
    }
}

/// Print the kernels of the training graph (`cargo test -p eptc-wgpu --test codegen
/// dump_kernels -- --ignored --nocapture`).
#[test]
#[ignore]
fn dump_kernels() {
    let g = example("tests/data/tiny_train.eptc");
    for id in g.node_ids() {
        for k in node_kernels(&g, id, 2, DType::F32).unwrap() {
            println!("==== {} {:?}\n{}", k.name, k.workgroups, k.source);
        }
    }
}
