//! The CUDA C code generator: properties that need no GPU (every node of many op
//! configurations and of whole ViT graphs gets kernels, launches cover the output, names
//! are unique identifiers, entry points follow the convention, bad shapes are errors),
//! snapshots of representative kernels, the op configurations compiled with NVRTC where
//! it is present, and every distinct kernel run against the f64 reference interpreter
//! (f32, bf16 and f16 storage) on the CPU emulator (`eptc_cuda::emulate`, needs a host C++
//! compiler) and, where a CUDA GPU is present, on the GPU.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use eptc_cuda::codegen::fuse;
use eptc_cuda::codegen::{
    linear_epilogue, module_source, node_kernels, supported_kinds, CodegenError, Kernel, MAX_ELEMS,
    VEC,
};
use eptc_cuda::{emulate, nvrtc};
use eptc_ir::{
    Activation, AttnWrt, BinaryOp, DType, Dim, Graph, Init, NodeId, Op, ReduceOp, Shape,
    TensorType, UnaryOp,
};

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

fn example(path: &str) -> Graph {
    // At run time when set (a test binary run outside cargo, on another machine).
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    let p = std::path::Path::new(&dir).join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    eptc_ir::text::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const TINY: [&str; 5] = [
    "../../ir-specs/examples/attention.eptc",
    "../../ir-specs/examples/fused.eptc",
    "../../ir-specs/examples/mlp.eptc",
    "../wgpu/tests/data/tiny_optimized.eptc",
    "../wgpu/tests/data/tiny_train.eptc",
];
const VIT_B16: [&str; 2] = [
    "../wgpu/tests/data/vit_b16_optimized.eptc",
    "../wgpu/tests/data/vit_b16_train.eptc",
];

// ---- the entry line ------------------------------------------------------------------

/// The entry point's name and parameters, parsed from the kernel's one entry line.
fn parse_entry(k: &Kernel) -> (String, Vec<String>) {
    let lines: Vec<&str> = k
        .source
        .lines()
        .filter(|l| l.contains("__global__"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{}: one __global__ line\n{}",
        k.name,
        k.source
    );
    let l = lines[0];
    let head = "extern \"C\" __global__ void ";
    assert!(l.starts_with(head), "{}: entry line {l:?}", k.name);
    let rest = &l[head.len()..];
    let open = rest.find('(').expect("(");
    let close = rest.rfind(')').expect(")");
    assert!(rest[close..].starts_with(") {"), "{l}");
    let name = rest[..open].trim().to_string();
    let params = rest[open + 1..close]
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    (name, params)
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The entry line follows the convention: the kernel's name, `inputs` operands as
/// `const T* __restrict__`, then the output as `T* __restrict__`.
fn check_entry(k: &Kernel) {
    let (name, params) = parse_entry(k);
    assert_eq!(name, k.name);
    assert!(is_identifier(&k.name), "{}", k.name);
    assert_eq!(params.len(), k.inputs + 1, "{}: {params:?}", k.name);
    for (i, p) in params.iter().enumerate() {
        let want = if i < k.inputs {
            "const T* __restrict__ "
        } else {
            "T* __restrict__ "
        };
        assert!(p.starts_with(want), "{}: parameter {i} is {p:?}", k.name);
        assert!(is_identifier(&p[want.len()..]), "{}: {p:?}", k.name);
    }
    assert!(!k.source.contains("#include"), "{}", k.name);
    assert!(k.source.ends_with("}\n"), "{}", k.name);
}

/// The launch covers the output: enough threads (or warps, tiles) for every element.
fn check_launch(g: &Graph, id: NodeId, batch: usize, k: &Kernel) {
    let out = g.ty(id).shape.resolve(batch);
    let numel: usize = out.iter().product();
    let threads_per_block: usize = k.block.iter().map(|&b| b as usize).product();
    assert!(
        (1..=1024).contains(&threads_per_block),
        "{}: block {:?}",
        k.name,
        k.block
    );
    assert!(k.grid[0] >= 1 && k.grid[1] == 1 && k.grid[2] == 1, "{k:?}");
    assert!((k.grid[0] as usize) < (1 << 31));
    assert_eq!(k.shared_bytes, 0, "{}: static shared memory only", k.name);
    let blocks = k.grid[0] as usize;
    let last = |s: &[usize]| *s.last().unwrap_or(&1);
    let op = &g.node(id).op;
    let covered = match op {
        // One thread per element.
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Broadcast { .. }
        | Op::Permute { .. }
        | Op::Patchify { .. }
        | Op::Slice { .. }
        | Op::Concat { .. } => {
            // Eight consecutive elements per thread where vectorized.
            let per = if k.source.contains("st8(") { VEC } else { 1 };
            assert!(
                blocks * threads_per_block < numel / per + threads_per_block,
                "{k:?}"
            );
            blocks * threads_per_block * per
        }
        // A warp per row (or 32 outputs per block of 32 x 8).
        Op::Reduce { .. } => {
            if k.block == [32, 8, 1] {
                blocks * 32
            } else {
                blocks * threads_per_block / 32
            }
        }
        Op::Softmax { axis } => {
            let s = g.ty(g.operands(id)[0]).shape.resolve(batch);
            blocks * threads_per_block / 32 * s[*axis]
        }
        Op::SoftmaxSink | Op::LayerNorm { .. } | Op::LayerNormGrad { .. } => {
            blocks * threads_per_block / 32 * last(&out)
        }
        // A warp per row, or (on the tensor cores: blocks of 4 warps) 16 rows per warp.
        Op::Attention { .. } | Op::AttentionLse { .. } | Op::AttentionGrad { .. }
            if k.source.contains("mma_t(") =>
        {
            assert_eq!(k.block, [128, 1, 1]);
            blocks * 4 * 16 * last(&out)
        }
        Op::Attention { .. } | Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            blocks * threads_per_block / 32 * last(&out)
        }
        // 16 x 16 threads, at most 4 x 4 outputs each.
        Op::MatMul { .. } | Op::Linear { .. } => {
            assert_eq!(k.block, [16, 16, 1]);
            blocks * 256 * 16
        }
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Reshape { .. } => {
            unreachable!()
        }
    };
    assert!(covered >= numel, "{}: covers {covered} of {numel}", k.name);
}

/// Generate the kernels of `id` at several batch sizes and check them; returns them all.
fn check(g: &Graph, id: NodeId, batches: &[usize]) -> Vec<Kernel> {
    let mut all = Vec::new();
    for &b in batches {
        let ks = node_kernels(g, id, b, DType::F32).unwrap_or_else(|e| {
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
            check_entry(k);
            check_launch(g, id, b, k);
            assert_eq!(k.inputs, g.operands(id).len(), "{}", k.name);
            assert_eq!(
                k.name,
                format!("n{}_{}", id.index(), g.node(id).op.kind()),
                "kernel name"
            );
            // The source does not depend on the storage type (the prelude does), except
            // attention's in 16-bit storage where the tensor-core kernel takes it: the
            // same for bf16 and f16.
            let k16 = node_kernels(g, id, b, DType::BF16).unwrap();
            assert_eq!(
                node_kernels(g, id, b, DType::F16).unwrap(),
                k16,
                "{}",
                k.name
            );
            if k16 != ks {
                assert!(
                    matches!(
                        g.node(id).op,
                        Op::Attention { .. } | Op::AttentionLse { .. } | Op::AttentionGrad { .. }
                    ),
                    "{}: only attention and its backward have 16-bit kernels of their own",
                    k.name
                );
                for k in &k16 {
                    assert!(k.source.contains("mma_t("), "{}", k.name);
                    check_entry(k);
                    check_launch(g, id, b, k);
                    assert_eq!(k.inputs, g.operands(id).len(), "{}", k.name);
                }
            }
        }
        all.extend(ks);
    }
    all
}

/// Every node of `g` checked at `batches`; names unique per batch; returns the kinds.
fn check_graph(g: &Graph, batches: &[usize]) -> (BTreeSet<&'static str>, usize) {
    eptc_ir::verify(g).unwrap_or_else(|e| panic!("graph {}: {e}", g.name));
    let mut kinds = BTreeSet::new();
    let mut count = 0;
    for &b in batches {
        let mut names = BTreeSet::new();
        for id in g.node_ids() {
            for k in check(g, id, &[b]) {
                assert!(names.insert(k.name.clone()), "duplicate name {}", k.name);
                count += 1;
            }
            kinds.insert(g.node(id).op.kind());
        }
    }
    (kinds, count)
}

/// q, k, v and the optional sink z of the attention configurations.
fn attention_cases() -> Vec<(Shape, Shape, Shape, Option<Shape>)> {
    vec![
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
        // Head dims beyond the registers: q in shared memory, several column slots.
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
        // ViT-B/16's heads: 197 tokens, 64 features, several key chunks.
        (
            batched(&[2, 197, 64]),
            batched(&[2, 197, 64]),
            batched(&[2, 197, 64]),
            Some(fixed(&[197, 1])),
        ),
        (
            batched(&[1, 40, 96]),
            batched(&[1, 70, 96]),
            batched(&[1, 70, 33]),
            Some(batched(&[1, 40, 1])),
        ),
        // The tensor-core kernel's head dims (80, 128) and lengths (224 and 384 px: 197
        // and 577 tokens; more keys than queries, a partial last tile of 1 key), the
        // sink per entry or shared; without the batch, to keep the emulator quick.
        (
            fixed(&[2, 197, 80]),
            fixed(&[2, 197, 80]),
            fixed(&[2, 197, 80]),
            Some(fixed(&[2, 197, 1])),
        ),
        (
            fixed(&[577, 128]),
            fixed(&[577, 128]),
            fixed(&[577, 128]),
            Some(fixed(&[577, 1])),
        ),
        (
            batched(&[1, 70, 32]),
            fixed(&[1, 129, 32]),
            fixed(&[1, 129, 8]),
            None,
        ),
    ]
}

/// The attention configurations as inputs `q<i>`, `k<i>`, `v<i>` and `z<i>` of `g`.
fn attention_inputs(g: &mut Graph) -> Vec<(NodeId, NodeId, NodeId, Option<NodeId>)> {
    attention_cases()
        .into_iter()
        .enumerate()
        .map(|(i, (q, k, v, z))| {
            (
                input(g, &format!("q{i}"), q),
                input(g, &format!("k{i}"), k),
                input(g, &format!("v{i}"), v),
                z.map(|z| input(g, &format!("z{i}"), z)),
            )
        })
        .collect()
}

/// Small graphs exercising every op kind over several configurations (the wgpu
/// backend's, plus the CUDA templates' own edge cases).
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
            (batched(&[130, 40]), batched(&[40, 70]), false, false),
            (batched(&[40, 130]), batched(&[70, 40]), true, true),
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
            (batched(&[40, 1000]), &[0, 1], false),
            (batched(&[3, 2000]), &[2], false),
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
            (batched(&[3, 5, 4]), 2),
            (fixed(&[2, 1500]), 1),
            (fixed(&[64]), 0),
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
            batched(&[3, 1100]),
            batched(&[5, 264]),
            fixed(&[2, 1024]),
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
        g.concat(&[e, f1], 0).unwrap();
        g.concat(&[f1, e], 0).unwrap();
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
            (batched(&[2, 1500]), batched(&[2, 1])),
        ];
        for (i, (s, z)) in cases.iter().enumerate() {
            let s = input(g, &format!("s{i}"), s.clone());
            let z = input(g, &format!("z{i}"), z.clone());
            g.softmax_sink(s, z).unwrap();
        }
    });
    new("attention", &|g| {
        for (q, k, v, z) in attention_inputs(g) {
            g.attention(q, k, v, z, 0.25).unwrap();
        }
    });
    // The fused backward on the same shapes: lse (with the sink where the case has
    // one), and the gradient wrt q, k and v from inputs lse, delta and dO.
    new("attention_backward", &|g| {
        for (i, (q, k, v, z)) in attention_inputs(g).into_iter().enumerate() {
            // 577 tokens: the forward only (the backward's SIMT kernels over it would
            // take minutes on the emulator).
            if g.ty(q).shape.resolve(1).iter().rev().nth(1) > Some(&300) {
                continue;
            }
            let mut ops = vec![q, k];
            ops.extend(z);
            let sink = z.is_some();
            let lse = g.add(Op::AttentionLse { scale: 0.25, sink }, &ops).unwrap();
            let out = g.attention(q, k, v, z, 0.25).unwrap();
            let rows = g.ty(lse).shape.clone();
            let lse_in = input(g, &format!("lse{i}"), rows.clone());
            let delta = input(g, &format!("delta{i}"), rows);
            let dout = input(g, &format!("do{i}"), g.ty(out).shape.clone());
            for wrt in AttnWrt::ALL {
                g.add(
                    Op::AttentionGrad { scale: 0.25, wrt },
                    &[q, k, v, lse_in, delta, dout],
                )
                .unwrap();
            }
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
            (batched(&[70, 100]), 90, true, Activation::Gelu, true),
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
fn every_op_kind_over_many_shapes() {
    let mut seen = BTreeSet::new();
    for g in op_graphs() {
        seen.extend(check_graph(&g, &[1, 3]).0);
    }
    let want: BTreeSet<&str> = supported_kinds().into_iter().collect();
    let missing: Vec<&&str> = want.difference(&seen).collect();
    assert!(missing.is_empty(), "kinds without a test case: {missing:?}");
    let all: BTreeSet<&str> = Op::all_kinds().into_iter().collect();
    assert_eq!(want, all, "every op of the IR is supported");
}

#[test]
fn whole_graphs_get_kernels() {
    let mut kernels = 0;
    for f in TINY {
        kernels += check_graph(&example(f), &[1, 4]).1;
    }
    assert!(kernels > 200, "{kernels} kernels");
    let (kinds, n) = check_graph(&example(TINY[4]), &[2]);
    for k in [
        "attention",
        "linear",
        "layernorm_grad",
        "softmax_sink",
        "patchify",
    ] {
        assert!(kinds.contains(k), "{k} missing from the training graph");
    }
    assert!(n > 50);
}

#[test]
fn vit_b16_graphs_get_kernels() {
    let mut kernels = 0;
    for f in VIT_B16 {
        kernels += check_graph(&example(f), &[4, 64]).1;
    }
    assert!(kernels > 1400, "{kernels} kernels");
}

/// `Kernel::widen` declares exactly the flagged parameters `float*`, leaves a kernel
/// without flags as it was, and refuses flags that do not fit the entry line.
#[test]
fn widen_declares_the_flagged_parameters_float() {
    let mut g = Graph::new("w");
    let a = input(&mut g, "a", fixed(&[4, 8]));
    let b = input(&mut g, "b", fixed(&[4, 1]));
    let y = g.binary(BinaryOp::Sub, a, b).unwrap();
    g.set_output("y", y);
    let k = node_kernels(&g, y, 1, DType::BF16).unwrap().remove(0);
    let entry = |k: &Kernel| {
        k.source
            .lines()
            .find(|l| l.starts_with("extern \"C\""))
            .unwrap()
            .to_string()
    };
    let mut same = k.clone();
    same.widen(&[false, false, false]).unwrap();
    assert_eq!(same, k);
    let mut w = k.clone();
    w.widen(&[false, true, false]).unwrap();
    assert_eq!(
        entry(&w),
        entry(&k).replace("const T* __restrict__ b", "const float* __restrict__ b")
    );
    assert_ne!(entry(&w), entry(&k));
    let mut o = k.clone();
    o.widen(&[false, false, true]).unwrap();
    assert!(
        entry(&o).ends_with("float* __restrict__ out) {"),
        "{}",
        entry(&o)
    );
    assert!(entry(&o).contains("const T* __restrict__ a, const T* __restrict__ b"));
    // Only the entry line changes.
    assert_eq!(
        w.source.lines().count(),
        k.source.lines().count(),
        "{}",
        w.source
    );
    let mut bad = k.clone();
    assert!(bad
        .widen(&[true, false])
        .unwrap_err()
        .contains("3 parameters, 2 flags"));
    let mut twice = w.clone();
    assert!(twice
        .widen(&[false, true, false])
        .unwrap_err()
        .contains("is not a T*"));
    // The prelude reads and writes either: the widened kernel compiles with NVRTC.
    if nvrtc::available().is_ok() {
        o.source = o.source.replace(&o.name, "widened_out");
        o.name = "widened_out".into();
        let src = module_source(&[&w, &o], DType::BF16);
        assert!(src.contains("widened_out(const T* __restrict__ a"));
        nvrtc::compile(&src, "sm_80").unwrap();
    }
}

#[test]
fn leaves_views_and_empty_outputs_have_no_kernel() {
    let mut g = Graph::new("v");
    let x = input(&mut g, "x", batched(&[0, 4]));
    let y = g.unary(UnaryOp::Exp, x).unwrap();
    let r = g.reshape(y, batched(&[4, 0])).unwrap();
    for id in [x, y, r] {
        assert!(node_kernels(&g, id, 3, DType::F32).unwrap().is_empty());
    }
    // Batch 0: nothing to do.
    let mut g = Graph::new("b0");
    let x = input(&mut g, "x", batched(&[4]));
    let y = g.unary(UnaryOp::Exp, x).unwrap();
    assert!(node_kernels(&g, y, 0, DType::F32).unwrap().is_empty());
}

/// Graphs whose declared types do not fit their ops (as a broken pass could leave
/// them): each is an error naming the node, never a panic.
#[test]
fn bad_shapes_are_errors() {
    let ty = |d: &[usize]| TensorType::f32(fixed(d));
    let mut cases: Vec<(Graph, NodeId)> = Vec::new();
    let mut case = |f: &dyn Fn(&mut Graph) -> NodeId| {
        let mut g = Graph::new("bad");
        let id = f(&mut g);
        cases.push((g, id));
    };
    case(&|g| {
        let a = input(g, "a", fixed(&[3, 4]));
        let b = input(g, "b", fixed(&[5, 6]));
        g.add_typed(
            Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            &[a, b],
            ty(&[3, 6]),
        )
        .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[3]));
        g.add_typed(
            Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            &[a, a],
            ty(&[3]),
        )
        .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[3, 4]));
        let b = input(g, "b", fixed(&[5]));
        g.add_typed(Op::Binary(BinaryOp::Add), &[a, b], ty(&[3, 4]))
            .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[1, 3, 10, 10]));
        g.add_typed(Op::Patchify { patch: 3 }, &[a], ty(&[1, 9, 27]))
            .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[1, 3, 10]));
        g.add_typed(Op::Patchify { patch: 5 }, &[a], ty(&[1, 2, 75]))
            .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[4, 5]));
        g.add_typed(Op::Permute { perm: vec![0, 0] }, &[a], ty(&[4, 4]))
            .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[4, 5]));
        g.add_typed(
            Op::Slice {
                axis: 1,
                start: 3,
                end: 9,
            },
            &[a],
            ty(&[4, 6]),
        )
        .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[4, 5]));
        let b = input(g, "b", fixed(&[3, 5]));
        g.add_typed(Op::Concat { axis: 1 }, &[a, b], ty(&[4, 10]))
            .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[4, 5]));
        g.add_typed(Op::Concat { axis: 0 }, &[a], ty(&[4, 5]))
            .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[4, 5]));
        let gm = input(g, "g", fixed(&[4]));
        g.add_typed(Op::LayerNorm { eps: 1e-5 }, &[a, gm, gm], ty(&[4, 5]))
            .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[4, 5]));
        let gm = input(g, "g", fixed(&[5]));
        let dy = input(g, "dy", fixed(&[5, 4]));
        g.add_typed(Op::LayerNormGrad { eps: 1e-5 }, &[a, gm, dy], ty(&[4, 5]))
            .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[4, 5]));
        g.add_typed(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![2],
                keepdim: false,
            },
            &[a],
            ty(&[4]),
        )
        .unwrap()
    });
    case(&|g| {
        let a = input(g, "a", fixed(&[4, 5]));
        g.add_typed(Op::Softmax { axis: 2 }, &[a], ty(&[4, 5]))
            .unwrap()
    });
    case(&|g| {
        let s = input(g, "s", fixed(&[4, 5]));
        let z = input(g, "z", fixed(&[3, 1]));
        g.add_typed(Op::SoftmaxSink, &[s, z], ty(&[4, 5])).unwrap()
    });
    case(&|g| {
        let q = input(g, "q", fixed(&[2, 5, 8]));
        let k = input(g, "k", fixed(&[2, 6, 7]));
        g.add_typed(
            Op::Attention {
                scale: 1.0,
                sink: false,
            },
            &[q, k, k],
            ty(&[2, 5, 7]),
        )
        .unwrap()
    });
    case(&|g| {
        let q = input(g, "q", fixed(&[2, 5, 8]));
        let z = input(g, "z", fixed(&[3, 5, 1]));
        g.add_typed(
            Op::Attention {
                scale: 1.0,
                sink: true,
            },
            &[q, q, q, z],
            ty(&[2, 5, 8]),
        )
        .unwrap()
    });
    // Head dims too large for the shared-memory staging.
    case(&|g| {
        let q = input(g, "q", fixed(&[2, 5, 400]));
        g.add_typed(
            Op::Attention {
                scale: 1.0,
                sink: false,
            },
            &[q, q, q],
            ty(&[2, 5, 400]),
        )
        .unwrap()
    });
    case(&|g| {
        let x = input(g, "x", fixed(&[4, 5]));
        let w = input(g, "w", fixed(&[6, 4]));
        g.add_typed(
            Op::Linear {
                bias: false,
                activation: Activation::None,
                residual: false,
            },
            &[x, w],
            ty(&[4, 6]),
        )
        .unwrap()
    });
    case(&|g| {
        let x = input(g, "x", fixed(&[4, 5]));
        let w = input(g, "w", fixed(&[6, 5]));
        let b = input(g, "b", fixed(&[5]));
        g.add_typed(
            Op::Linear {
                bias: true,
                activation: Activation::None,
                residual: false,
            },
            &[x, w, b],
            ty(&[4, 6]),
        )
        .unwrap()
    });
    case(&|g| {
        let x = input(g, "x", fixed(&[4, 5]));
        g.add_typed(Op::Unary(UnaryOp::Exp), &[x, x], ty(&[4, 5]))
            .unwrap()
    });
    case(&|g| {
        let x = input(g, "x", fixed(&[4, 5]));
        g.add_typed(Op::Unary(UnaryOp::Exp), &[x], ty(&[4, 6]))
            .unwrap()
    });
    // Too large to index.
    case(&|g| {
        let x = input(g, "x", fixed(&[1 << 20, 1 << 20]));
        g.unary(UnaryOp::Exp, x).unwrap()
    });
    case(&|g| {
        let x = input(g, "x", fixed(&[usize::MAX / 2, 4]));
        g.add_typed(Op::Unary(UnaryOp::Exp), &[x], ty(&[4]))
            .unwrap()
    });
    for (g, id) in cases {
        let r = std::panic::catch_unwind(|| node_kernels(&g, id, 2, DType::F32));
        let r = r.unwrap_or_else(|_| panic!("node %{} panicked", id.index()));
        let e = r.expect_err(&format!("node %{} ({})", id.index(), g.node(id).op.kind()));
        let CodegenError::Unsupported { node, op, msg } = &e;
        assert_eq!(*node, id.index());
        assert_eq!(op, g.node(id).op.kind());
        assert!(!msg.is_empty());
        assert!(
            e.to_string().starts_with(&format!("node %{}", id.index())),
            "{e}"
        );
    }
    const { assert!(MAX_ELEMS >= 1 << 32) };
}

#[test]
fn large_tensors_index_with_64_bits() {
    let mut g = Graph::new("big");
    let x = input(&mut g, "x", batched(&[1 << 16, 1 << 14]));
    let p = param(&mut g, "p", fixed(&[1 << 14]));
    let y = g.binary(BinaryOp::Add, x, p).unwrap();
    let s = g.softmax(y, 2).unwrap();
    for (id, b, wide) in [(y, 1, false), (y, 2, true), (s, 2, true)] {
        let k = node_kernels(&g, id, b, DType::F32).unwrap().remove(0);
        assert_eq!(
            k.source.contains("unsigned long long idx")
                || k.source.contains("unsigned long long row"),
            wide,
            "{}",
            k.source
        );
        check_launch(&g, id, b, &k);
    }
}

#[test]
fn module_source_has_one_prelude_and_each_kernel_once() {
    let g = example(TINY[4]);
    let ks: Vec<Kernel> = g
        .node_ids()
        .into_iter()
        .flat_map(|id| node_kernels(&g, id, 2, DType::F32).unwrap())
        .collect();
    let mut refs: Vec<&Kernel> = ks.iter().collect();
    refs.extend(ks.iter().take(5));
    for (dt, ty) in [
        (DType::F32, "typedef float T;"),
        (DType::BF16, "typedef unsigned short T;"),
        (DType::F16, "typedef unsigned short T;"),
    ] {
        let src = module_source(&refs, dt);
        assert_eq!(src.matches("typedef").count(), 1);
        assert!(src.contains(ty), "{dt}");
        assert!(!src.contains("#include"));
        for k in &ks {
            assert_eq!(
                src.matches(&format!(" {}(", k.name)).count(),
                1,
                "{}",
                k.name
            );
        }
    }
    // Kernels identical but for their names: the masked sources agree.
    let mut by_src: HashMap<String, Vec<&str>> = HashMap::new();
    for k in &ks {
        by_src.entry(k.masked_source()).or_default().push(&k.name);
    }
    assert!(
        by_src.len() < ks.len(),
        "the training graph repeats kernels"
    );
}

#[test]
fn linear_epilogue_follows_the_convention() {
    for (bias, gelu, residual) in [
        (true, true, true),
        (true, false, false),
        (false, true, false),
        (false, false, true),
        (true, true, false),
    ] {
        let k = linear_epilogue("epi", 394, 3072, bias, gelu, residual, DType::BF16);
        check_entry(&k);
        assert_eq!(k.inputs, usize::from(bias) + usize::from(residual));
        let (_, params) = parse_entry(&k);
        let mut want = Vec::new();
        if bias {
            want.push("const T* __restrict__ bias");
        }
        if residual {
            want.push("const T* __restrict__ res");
        }
        want.push("T* __restrict__ out");
        assert_eq!(params, want);
        // 3072 columns: eight per thread.
        assert!(k.source.contains("st8(out, idx, y)"));
        assert_eq!(k.grid[0] as usize * k.block[0] as usize, 394 * 3072 / VEC);
        // Bias, then GELU, then the residual: the product is read first (v0), then the
        // bias (v1) and the residual (the last read).
        let (mut e, mut next) = ("v0".to_string(), 1);
        if bias {
            e = format!("{e} + v{next}");
            next += 1;
        }
        if gelu {
            e = format!("gelu_f({e})");
        }
        if residual {
            e = format!("{e} + v{next}");
        }
        assert!(
            k.source.contains(&format!("y[j] = {e};")),
            "{e}: {}",
            k.source
        );
        assert_eq!(k.source.contains("gelu_f("), gelu);
    }
}

/// The linear epilogue (the step after every cuBLAS `linear`) on the emulator, in place on
/// the product, against the reference `linear` (f32, bf16, f16; every flag combination),
/// element by element (70 columns) and eight elements per thread (72).
#[test]
fn emulated_linear_epilogue_matches_the_reference() {
    if !emulator_or_skip() {
        return;
    }
    for cols in [70, 72] {
        linear_epilogue_on_the_emulator(cols);
    }
}

fn linear_epilogue_on_the_emulator(cols: usize) {
    let (rows, k) = (37, 9);
    let combos = [
        (true, true, true),
        (true, false, false),
        (false, true, false),
        (false, false, true),
        (true, true, false),
        (false, false, false),
    ];
    for dtype in ALL_DTYPES {
        let ks: Vec<Kernel> = combos
            .iter()
            .enumerate()
            .map(|(i, &(b, gl, r))| {
                linear_epilogue(&format!("epi{i}"), rows, cols, b, gl, r, dtype)
            })
            .collect();
        for k in &ks {
            assert_eq!(
                k.source.contains("st8("),
                cols.is_multiple_of(VEC),
                "{}",
                k.source
            );
        }
        let m = emulate::Module::compile(&ks.iter().collect::<Vec<_>>(), dtype).unwrap();
        for (i, &(bias, gelu, residual)) in combos.iter().enumerate() {
            let mut g = Graph::new("lin");
            let x = input(&mut g, "x0", fixed(&[rows, k]));
            let w = input(&mut g, "x1", fixed(&[cols, k]));
            let b = bias.then(|| input(&mut g, "x2", fixed(&[cols])));
            let res = residual.then(|| input(&mut g, "x3", fixed(&[rows, cols])));
            let act = if gelu {
                Activation::Gelu
            } else {
                Activation::None
            };
            let y = g.linear(x, w, b, act, res).unwrap();
            g.set_output("y", y);
            let vals: Vec<(String, Vec<usize>, Vec<f32>)> = [
                ("x0", vec![rows, k]),
                ("x1", vec![cols, k]),
                ("x2", vec![cols]),
                ("x3", vec![rows, cols]),
            ]
            .into_iter()
            .enumerate()
            .filter(|(j, _)| *j < 2 || (*j == 2 && bias) || (*j == 3 && residual))
            .map(|(j, (n, s))| {
                let len = s.iter().product();
                (n.to_string(), s, draw(100 + j as u64, len, false))
            })
            .collect();
            // Everything as the storage type holds it; the product (cuBLAS's, rounded to
            // the storage type) computed on the host.
            let held: HashMap<String, Vec<f64>> = vals
                .iter()
                .map(|(n, _, v)| (n.clone(), store(v, dtype).1))
                .collect();
            let mut product = vec![0.0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    let dot: f64 = (0..k)
                        .map(|p| held["x0"][r * k + p] * held["x1"][c * k + p])
                        .sum();
                    product[r * cols + c] = dot as f32;
                }
            }
            let (out0, _) = store(&product, dtype);
            let mut inputs: Vec<Vec<u8>> = Vec::new();
            for n in ["x2", "x3"] {
                if let Some((_, _, v)) = vals.iter().find(|(m, _, _)| m == n) {
                    inputs.push(store(v, dtype).0);
                }
            }
            let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
            let got = load_back(&m.run_on(&ks[i], &refs, out0).unwrap(), dtype);
            // The reference `linear` on the held values (its exact product differs from the
            // stored one by the storage type's rounding, within the bar).
            let env: HashMap<String, eptc_ir::reference::Tensor64> = vals
                .iter()
                .map(|(n, shape, _)| {
                    let t = eptc_ir::reference::Tensor64::new(shape.clone(), held[n].clone());
                    (n.clone(), t)
                })
                .collect();
            let want = eptc_ir::reference::eval(&g, &env).unwrap().remove(0).1.data;
            let err = compare(&got, &want, dtype).unwrap();
            assert!(
                err <= tolerance(dtype),
                "{dtype} bias {bias} gelu {gelu} residual {residual}: {err:e}"
            );
        }
    }
}

// ---- snapshots ---------------------------------------------------------------------------

/// The kernel of the first node of `kind` in ViT-B/16's optimized forward graph at batch 4.
fn vit_kernel(kind: &str, pick: &dyn Fn(&Graph, NodeId) -> bool) -> Kernel {
    let g = example(VIT_B16[0]);
    let id = g
        .node_ids()
        .into_iter()
        .find(|&id| g.node(id).op.kind() == kind && pick(&g, id))
        .unwrap_or_else(|| panic!("no {kind}"));
    node_kernels(&g, id, 4, DType::F32).unwrap().remove(0)
}

fn described(k: &Kernel) -> String {
    format!(
        "name {}, inputs {}, grid {:?}, block {:?}, shared {}\n\n{}",
        k.name, k.inputs, k.grid, k.block, k.shared_bytes, k.source
    )
}

#[test]
fn snapshot_layernorm() {
    let k = vit_kernel("layernorm", &|_, _| true);
    insta::assert_snapshot!("layernorm_vit_b16", described(&k));
}

#[test]
fn snapshot_attention_with_sink() {
    let k = vit_kernel("attention", &|g, id| g.operands(id).len() == 4);
    insta::assert_snapshot!("attention_sink_vit_b16", described(&k));
}

#[test]
fn snapshot_linear_gelu() {
    let k = vit_kernel("linear", &|g, id| {
        matches!(
            g.node(id).op,
            Op::Linear {
                activation: Activation::Gelu,
                ..
            }
        )
    });
    insta::assert_snapshot!("linear_gelu_vit_b16", described(&k));
}

/// The epilogue after cuBLAS's product of ViT-B/16's first MLP layer at batch 4 (+ bias,
/// GELU): eight elements per thread.
#[test]
fn snapshot_linear_epilogue_vectorized() {
    let k = linear_epilogue(
        "fc1_epilogue",
        4 * 197,
        3072,
        true,
        true,
        false,
        DType::BF16,
    );
    insta::assert_snapshot!("linear_epilogue_vit_b16", described(&k));
}

// ---- NVRTC -------------------------------------------------------------------------------

/// Whether a tool a test needs is there (`found`: what to print, or why not); without
/// it the test is skipped, unless `var` is set (as `.ci/run` does), which makes that a
/// failure.
fn present_or_skip(found: Result<String, String>, var: &str) -> bool {
    match found {
        Ok(what) => {
            if !what.is_empty() {
                eprintln!("{what}");
            }
            true
        }
        Err(e) if std::env::var_os(var).is_some() => panic!("{var} is set, but: {e}"),
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn nvrtc_or_skip() -> bool {
    present_or_skip(
        nvrtc::available().map(|()| String::new()),
        "EPTC_REQUIRE_NVRTC",
    )
}

/// The op configurations' distinct kernels at batch 3 (and the linear epilogues) compile,
/// in one module per storage type.
#[test]
fn op_graphs_compile_with_nvrtc() {
    if !nvrtc_or_skip() {
        return;
    }
    let graphs = op_graphs();
    for dt in ALL_DTYPES {
        let mut unique: BTreeMap<String, Kernel> = BTreeMap::new();
        for g in &graphs {
            for id in g.node_ids() {
                for mut k in node_kernels(g, id, 3, dt).unwrap() {
                    // Names are unique per graph only: prefix the graph's.
                    let name = format!("{}_{}", g.name, k.name);
                    k.source = k.source.replace(&k.name, &name);
                    k.name = name;
                    unique.entry(k.masked_source()).or_insert(k);
                }
            }
        }
        for (i, (b, gl, r)) in [
            (true, true, true),
            (false, false, true),
            (true, false, false),
        ]
        .into_iter()
        .enumerate()
        {
            let k = linear_epilogue(&format!("epi{i}"), 5, 7, b, gl, r, dt);
            unique.insert(k.masked_source(), k);
        }
        let refs: Vec<&Kernel> = unique.values().collect();
        let tensor = refs.iter().filter(|k| k.source.contains("mma_t(")).count();
        assert_eq!(
            tensor > 0,
            dt != DType::F32,
            "{dt}: {tensor} tensor-core kernels"
        );
        let src = module_source(&refs, dt);
        if let Err(log) = nvrtc::compile(&src, "sm_80") {
            panic!("{dt}: {log}");
        }
    }
}

// ---- on a GPU ----------------------------------------------------------------------------

mod gpu {
    use std::sync::Arc;

    use cudarc::driver::{
        CudaContext, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
    };
    use eptc_cuda::codegen::Kernel;

    pub struct Gpu {
        pub ctx: Arc<CudaContext>,
        pub stream: Arc<CudaStream>,
    }

    impl Gpu {
        pub fn open() -> Result<Gpu, String> {
            // SAFETY: only tries to open the library.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("no CUDA driver (libcuda.so.1)".into());
            }
            let ctx = std::panic::catch_unwind(|| CudaContext::new(0))
                .map_err(|_| "the CUDA driver panicked".to_string())?
                .map_err(|e| format!("no CUDA device: {e:?}"))?;
            let stream = ctx.default_stream();
            Ok(Gpu { ctx, stream })
        }

        pub fn load(&self, ptx: String) -> Arc<CudaModule> {
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .expect("PTX loads")
        }

        pub fn upload(&self, bytes: &[u8]) -> CudaSlice<u8> {
            let b: &[u8] = if bytes.is_empty() { &[0; 4] } else { bytes };
            self.stream.clone_htod(b).expect("upload")
        }

        /// Launch `k` on `inputs`; the output buffer starts as all-ones bits (NaN).
        pub fn launch(
            &self,
            m: &Arc<CudaModule>,
            k: &Kernel,
            inputs: &[CudaSlice<u8>],
            out: &mut CudaSlice<u8>,
        ) -> Result<(), String> {
            let f = m
                .load_function(&k.name)
                .map_err(|e| format!("{}: {e:?}", k.name))?;
            let mut lb = self.stream.launch_builder(&f);
            for b in inputs {
                lb.arg(b);
            }
            lb.arg(out);
            let cfg = LaunchConfig {
                grid_dim: (k.grid[0], k.grid[1], k.grid[2]),
                block_dim: (k.block[0], k.block[1], k.block[2]),
                shared_mem_bytes: k.shared_bytes,
            };
            // SAFETY: the kernel takes `inputs.len()` operand pointers and the output,
            // each buffer as large as the node's tensors (the test sizes them).
            unsafe { lb.launch(cfg) }.map_err(|e| format!("{}: launch: {e:?}", k.name))?;
            Ok(())
        }

        pub fn run(
            &self,
            m: &Arc<CudaModule>,
            k: &Kernel,
            inputs: &[Vec<u8>],
            out_bytes: usize,
        ) -> Result<Vec<u8>, String> {
            let bufs: Vec<CudaSlice<u8>> = inputs.iter().map(|b| self.upload(b)).collect();
            let mut out = self.upload(&vec![0xff; out_bytes.max(4)]);
            self.launch(m, k, &bufs, &mut out)?;
            let v = self
                .stream
                .clone_dtoh(&out)
                .map_err(|e| format!("{}: {e:?}", k.name))?;
            Ok(v[..out_bytes].to_vec())
        }
    }
}

/// Values stored as `dtype`: the bytes, and the values they hold.
fn store(v: &[f32], dtype: DType) -> (Vec<u8>, Vec<f64>) {
    match dtype {
        DType::F32 => (
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            v.iter().map(|&x| f64::from(x)).collect(),
        ),
        DType::BF16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| f64::from(x.to_f32())).collect(),
            )
        }
        DType::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| f64::from(x.to_f32())).collect(),
            )
        }
    }
}

fn load_back(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// `w` rounded to the storage type.
fn round_to(w: f64, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => w as f32,
        DType::BF16 => half::bf16::from_f64(w).to_f32(),
        DType::F16 => half::f16::from_f64(w).to_f32(),
    }
}

/// The relative L2 error of `got` against `want` (rounded to the storage type first);
/// NaN and infinities must agree exactly, except that a finite reference that rounds to
/// an infinity may be met by the largest finite value of that sign.
fn compare(got: &[f32], want: &[f64], dtype: DType) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("{} values, want {}", got.len(), want.len()));
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let max_finite = match dtype {
        DType::F32 => f32::MAX,
        DType::BF16 => half::bf16::MAX.to_f32(),
        DType::F16 => half::f16::MAX.to_f32(),
    };
    for (i, (&g, &w64)) in got.iter().zip(want).enumerate() {
        let w = round_to(w64, dtype);
        // A finite reference just past the type's range rounds to infinity; a kernel
        // whose f32 value fell just short of the rounding boundary stores the largest
        // finite value instead: the same result within rounding.
        if w.is_infinite() && w64.is_finite() && g == max_finite.copysign(w) {
            continue;
        }
        if w.is_nan() || g.is_nan() || w.is_infinite() || g.is_infinite() {
            if !(w.is_nan() && g.is_nan()) && g != w {
                return Err(format!("element {i}: got {g}, want {w}"));
            }
            continue;
        }
        num += (f64::from(g) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    Ok(if den > 0.0 {
        (num / den).sqrt()
    } else {
        (num / got.len().max(1) as f64).sqrt()
    })
}

/// Node `id` alone, its operands as fixed-shape inputs `x0, x1, ...` (batch bound).
fn single_op_graph(g: &Graph, id: NodeId, batch: usize) -> Graph {
    let mut h = Graph::new("one");
    let ins: Vec<NodeId> = g
        .operands(id)
        .iter()
        .enumerate()
        .map(|(i, &o)| {
            let s = g.ty(o).shape.resolve(batch);
            h.input(&format!("x{i}"), TensorType::f32(fixed(&s)))
        })
        .collect();
    let out = g.ty(id).shape.resolve(batch);
    let mut op = g.node(id).op.clone();
    if let Op::Broadcast { shape } = &mut op {
        *shape = fixed(&out);
    }
    let y = h
        .add_typed(op, &ins, TensorType::f32(fixed(&out)))
        .expect("adds");
    h.set_output("y", y);
    h
}

/// Deterministic values in [-2, 2]; with `special`, about one in eight is NaN, +-inf or
/// +-0.
fn draw(seed: u64, n: usize, special: bool) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let v: f32 = r.random_range(-2.0..2.0);
            if special && r.random_range(0..8) == 0 {
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0][r.random_range(0..5)]
            } else {
                v
            }
        })
        .collect()
}

/// One kernel of a node to check: the node alone as a graph, and where its kernel is.
struct Case {
    what: String,
    kernel: Kernel,
    /// The kernel for 16-bit storage where it is another (attention on the tensor cores).
    kernel16: Option<Kernel>,
    one: Graph,
    special: bool,
}

impl Case {
    fn kernel_for(&self, dtype: DType) -> &Kernel {
        match (&self.kernel16, dtype) {
            (Some(k), DType::BF16 | DType::F16) => k,
            _ => &self.kernel,
        }
    }
}

/// The distinct kernels of `g` at `batch` (names made unique with `tag`).
fn cases_of(g: &Graph, batch: usize, tag: &str, special: bool) -> Vec<Case> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for id in g.node_ids() {
        let k16 = node_kernels(g, id, batch, DType::BF16).unwrap();
        for (j, mut k) in node_kernels(g, id, batch, DType::F32)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            if !seen.insert(k.masked_source()) {
                continue;
            }
            let rename = |k: &mut Kernel| {
                let name = format!("{tag}_{}", k.name);
                k.source = k.source.replace(&k.name, &name);
                k.name = name;
            };
            let mut kernel16 = (k16[j] != k).then(|| k16[j].clone());
            rename(&mut k);
            if let Some(k) = &mut kernel16 {
                rename(k);
            }
            // Special values where the spec defines them element by element.
            let op = &g.node(id).op;
            let sp = special
                && matches!(
                    op,
                    Op::Unary(_)
                        | Op::Binary(_)
                        | Op::Reduce { .. }
                        | Op::Softmax { .. }
                        | Op::SoftmaxSink
                        | Op::Broadcast { .. }
                        | Op::Permute { .. }
                        | Op::Slice { .. }
                        | Op::Concat { .. }
                );
            out.push(Case {
                what: format!("{} %{} ({})", g.name, id.index(), op.kind()),
                kernel: k,
                kernel16,
                one: single_op_graph(g, id, batch),
                special: sp,
            });
        }
    }
    out
}

/// Each case's inputs stored as `dtype` and its reference output on them, computed on
/// the CPU's cores in parallel.
#[allow(clippy::type_complexity)]
fn prepare(cases: &[Case], dtype: DType) -> Vec<(Vec<Vec<u8>>, Result<Vec<f64>, String>)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<_>>> =
        cases.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                let mut bytes = Vec::new();
                let mut vals = HashMap::new();
                // The inputs `x0, x1, ...` in order (the kernel's parameters).
                let mut ins: Vec<(usize, NodeId)> = c
                    .one
                    .node_ids()
                    .into_iter()
                    .filter_map(|n| match &c.one.node(n).op {
                        Op::Input { name } => Some((name[1..].parse().unwrap(), n)),
                        _ => None,
                    })
                    .collect();
                ins.sort();
                for (j, &(_, o)) in ins.iter().enumerate() {
                    let shape = c.one.ty(o).shape.resolve(1);
                    let n = shape.iter().product();
                    let v = draw(i as u64 * 31 + j as u64, n, c.special);
                    let (b, held) = store(&v, dtype);
                    bytes.push(b);
                    vals.insert(
                        format!("x{j}"),
                        eptc_ir::reference::Tensor64::new(shape, held),
                    );
                }
                // attention_grad's lse: the true log-normaliser of q and k (the softmax
                // weights then stay at most 1, as in a real backward; a random lse would
                // make them up to e^60, past f16's range once rounded for the tensor
                // cores).
                let y = c.one.outputs()[0].1;
                if let Op::AttentionGrad { scale, .. } = c.one.node(y).op {
                    let mut h = Graph::new("lse");
                    let q = h.input("x0", c.one.ty(ins[0].1).clone());
                    let k = h.input("x1", c.one.ty(ins[1].1).clone());
                    let l = h
                        .add(Op::AttentionLse { scale, sink: false }, &[q, k])
                        .unwrap();
                    h.set_output("lse", l);
                    let lse = eptc_ir::reference::eval(&h, &vals).unwrap().remove(0).1;
                    let v: Vec<f32> = lse.data.iter().map(|&x| x as f32).collect();
                    let (b, held) = store(&v, dtype);
                    let shape = c.one.ty(ins[3].1).shape.resolve(1);
                    assert_eq!(shape.iter().product::<usize>(), held.len());
                    bytes[3] = b;
                    vals.insert(
                        "x3".to_string(),
                        eptc_ir::reference::Tensor64::new(shape, held),
                    );
                }
                let want = eptc_ir::reference::eval(&c.one, &vals).map(|mut o| o.remove(0).1.data);
                *slots[i].lock().unwrap() = Some((bytes, want));
            });
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().unwrap().expect("prepared"))
        .collect()
}

/// The GPU harness's CPU side without a GPU: every case of the op configurations and the
/// tiny graphs has a reference, and the comparison accepts the reference itself.
#[test]
fn gpu_harness_references_evaluate() {
    let mut cases = Vec::new();
    for (i, g) in op_graphs().iter().enumerate() {
        cases.extend(cases_of(g, 2, &format!("s{i}"), true));
    }
    for (i, f) in TINY.iter().enumerate() {
        cases.extend(cases_of(&example(f), 3, &format!("t{i}"), false));
    }
    for dtype in [DType::F32, DType::BF16] {
        for (c, (inputs, want)) in cases.iter().zip(prepare(&cases, dtype)) {
            let want = want.unwrap_or_else(|e| panic!("{}: {e}", c.what));
            assert_eq!(inputs.len(), c.kernel.inputs);
            let got: Vec<f32> = want.iter().map(|&w| round_to(w, dtype)).collect();
            assert_eq!(compare(&got, &want, dtype), Ok(0.0), "{}", c.what);
        }
    }
}

/// Where the cases run: the GPU through NVRTC, or the CPU emulator of the kernels.
trait Runner {
    type Module;
    fn module(&self, kernels: &[&Kernel], dtype: DType) -> Result<Self::Module, String>;
    fn run(
        &self,
        m: &Self::Module,
        k: &Kernel,
        inputs: &[Vec<u8>],
        out_bytes: usize,
    ) -> Result<Vec<u8>, String>;
}

impl Runner for gpu::Gpu {
    type Module = std::sync::Arc<cudarc::driver::CudaModule>;
    fn module(&self, kernels: &[&Kernel], dtype: DType) -> Result<Self::Module, String> {
        let ptx = nvrtc::compile(&module_source(kernels, dtype), "sm_90")?;
        Ok(self.load(ptx))
    }
    fn run(
        &self,
        m: &Self::Module,
        k: &Kernel,
        inputs: &[Vec<u8>],
        out_bytes: usize,
    ) -> Result<Vec<u8>, String> {
        gpu::Gpu::run(self, m, k, inputs, out_bytes)
    }
}

struct Emulator;

impl Runner for Emulator {
    type Module = emulate::Module;
    fn module(&self, kernels: &[&Kernel], dtype: DType) -> Result<Self::Module, String> {
        emulate::Module::compile(kernels, dtype)
    }
    fn run(
        &self,
        m: &Self::Module,
        k: &Kernel,
        inputs: &[Vec<u8>],
        out_bytes: usize,
    ) -> Result<Vec<u8>, String> {
        let refs: Vec<&[u8]> = inputs.iter().map(|b| b.as_slice()).collect();
        m.run(k, &refs, out_bytes)
    }
}

/// Run every case for each storage type in `dtypes` and compare with the f64 reference
/// on the same (rounded) inputs; prints the worst error per op kind and dtype and
/// returns the failures.
fn run_cases<R: Runner>(
    runner: &R,
    cases: &[Case],
    dtypes: &[DType],
    tol: &dyn Fn(DType) -> f64,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut worst: BTreeMap<(String, String), f64> = BTreeMap::new();
    for &dtype in dtypes {
        let refs: Vec<&Kernel> = cases.iter().map(|c| c.kernel_for(dtype)).collect();
        let module = match runner.module(&refs, dtype) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{dtype}: {e}"));
                continue;
            }
        };
        let prepared = prepare(cases, dtype);
        for (c, (inputs, want)) in cases.iter().zip(prepared) {
            let want = match want {
                Ok(w) => w,
                Err(e) => {
                    failures.push(format!("{}: reference: {e}", c.what));
                    continue;
                }
            };
            let out_bytes = want.len() * dtype.size_bytes();
            let got = match runner.run(&module, c.kernel_for(dtype), &inputs, out_bytes) {
                Ok(b) => load_back(&b, dtype),
                Err(e) => {
                    failures.push(format!("{} {dtype}: {e}", c.what));
                    // A failed launch may leave the context unusable.
                    return failures;
                }
            };
            match compare(&got, &want, dtype) {
                Ok(e) if e <= tol(dtype) => {
                    let mut kind = c.one.node(c.one.outputs()[0].1).op.kind().to_string();
                    if c.kernel_for(dtype).source.contains("mma_t(") {
                        kind += " (mma)";
                    }
                    let key = (dtype.to_string(), kind);
                    let w = worst.entry(key).or_insert(0.0);
                    *w = w.max(e);
                }
                Ok(e) => failures.push(format!(
                    "{} {dtype}: relative error {e:.3e} (tolerance {:.1e})",
                    c.what,
                    tol(dtype)
                )),
                Err(e) => failures.push(format!("{} {dtype}: {e}", c.what)),
            }
        }
    }
    for ((dt, kind), e) in &worst {
        eprintln!("{dt:>5} {kind:<18} worst relative error {e:.2e}");
    }
    failures
}

const ALL_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// Every distinct kernel of the op configurations (at batch 3, and at batch 2 with special
/// values where the spec defines them per element) and of the tiny graphs.
fn kernel_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, g) in op_graphs().iter().enumerate() {
        cases.extend(cases_of(g, 3, &format!("o{i}"), false));
        cases.extend(cases_of(g, 2, &format!("s{i}"), true));
    }
    for (i, f) in TINY.iter().enumerate() {
        cases.extend(cases_of(&example(f), 3, &format!("t{i}"), false));
    }
    cases
}

/// The host C++ compiler the emulator needs; `EPTC_REQUIRE_EMULATOR` (set by `.ci/run`)
/// makes its absence a failure.
fn emulator_or_skip() -> bool {
    let found = emulate::available().map(|v| format!("emulating with {v}"));
    present_or_skip(found, "EPTC_REQUIRE_EMULATOR")
}

/// Without a GPU: every distinct kernel of the op configurations (with special values
/// where the spec defines them per element) and of the tiny graphs, run by the CPU
/// emulator against the f64 reference interpreter, in all three storage types. The same
/// cases and bars as `gpu_kernels_match_the_reference`.
#[test]
fn emulated_kernels_match_the_reference() {
    if !emulator_or_skip() {
        return;
    }
    let cases = kernel_cases();
    eprintln!("{} distinct kernels", cases.len());
    let failures = run_cases(&Emulator, &cases, &ALL_DTYPES, &tolerance);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A vectorized element-wise kernel takes 16-byte accesses only where every pointer it
/// vectorizes is 16-byte aligned: with its operands one element off the alignment it
/// goes element by element and gives the same bytes (and the reference). Every
/// vectorized kernel of the op configurations, the tiny graphs and the fused chains, in
/// all three storage types.
#[test]
fn emulated_vectorized_kernels_take_unaligned_operands() {
    if !emulator_or_skip() {
        return;
    }
    let cases: Vec<Case> = kernel_cases()
        .into_iter()
        .chain(fused_cases())
        .filter(|c| c.kernel.source.contains("st8("))
        .collect();
    let kinds: BTreeSet<&str> = cases
        .iter()
        .map(|c| c.one.node(c.one.outputs()[0].1).op.kind())
        .collect();
    eprintln!("{} vectorized kernels: {kinds:?}", cases.len());
    for kind in [
        "gelu",
        "add",
        "mul",
        "broadcast",
        "permute",
        "slice",
        "layernorm",
        "layernorm_grad",
    ] {
        assert!(kinds.contains(kind), "no vectorized {kind} among {kinds:?}");
    }
    for dtype in ALL_DTYPES {
        let refs: Vec<&Kernel> = cases.iter().map(|c| c.kernel_for(dtype)).collect();
        let m = emulate::Module::compile(&refs, dtype).unwrap();
        for (c, (inputs, want)) in cases.iter().zip(prepare(&cases, dtype)) {
            let want = want.unwrap();
            let k = c.kernel_for(dtype);
            let ins: Vec<&[u8]> = inputs.iter().map(|b| b.as_slice()).collect();
            let out = vec![0xff; want.len() * dtype.size_bytes()];
            let aligned = m.run_shifted(k, &ins, out.clone(), 0).unwrap();
            let shifted = m.run_shifted(k, &ins, out, dtype.size_bytes()).unwrap();
            assert!(
                aligned == shifted,
                "{} {dtype}: shifted operands differ",
                c.what
            );
            let e = compare(&load_back(&shifted, dtype), &want, dtype).unwrap();
            assert!(e <= tolerance(dtype), "{} {dtype}: {e:.3e}", c.what);
        }
    }
}

// ---- fused element-wise chains ----------------------------------------------------------

fn live_of(g: &Graph) -> std::collections::HashSet<NodeId> {
    let mut live = std::collections::HashSet::new();
    let mut stack: Vec<NodeId> = g.outputs().iter().map(|o| o.1).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    live
}

fn groups_of(g: &Graph) -> Vec<fuse::Group> {
    fuse::elementwise_groups(g, &g.topo_order().unwrap(), &live_of(g))
}

/// The groups' rules hold on every example graph: each node of a group but the root is
/// element-wise, has the root's shape, is no output, and its only live user is in the
/// group; no node is in two groups; leaves are not in the group.
#[test]
fn fusion_groups_follow_the_rules() {
    let mut total = BTreeMap::new();
    for f in TINY.iter().chain(VIT_B16.iter()) {
        let g = example(f);
        let live = live_of(&g);
        let outputs: BTreeSet<NodeId> = g.outputs().iter().map(|o| o.1).collect();
        let mut seen = BTreeSet::new();
        for gr in groups_of(&g) {
            assert!(
                gr.nodes.len() >= 2 && gr.nodes.len() <= fuse::MAX_NODES,
                "{f}: {gr:?}"
            );
            assert!(gr.leaves.len() <= fuse::MAX_LEAVES, "{f}: {gr:?}");
            let root = gr.root();
            for &n in &gr.nodes {
                assert!(seen.insert(n), "{f}: %{} in two groups", n.index());
                assert!(matches!(g.node(n).op, Op::Unary(_) | Op::Binary(_)));
                assert_eq!(g.ty(n).shape, g.ty(root).shape);
                if n != root {
                    assert!(!outputs.contains(&n));
                    let users: Vec<NodeId> = g
                        .users(n)
                        .into_iter()
                        .filter(|u| live.contains(u))
                        .collect();
                    assert_eq!(users.len(), 1, "{f}: %{}", n.index());
                    assert!(gr.nodes.contains(&users[0]));
                }
                for o in g.operands(n) {
                    assert!(gr.nodes.contains(&o) || gr.leaves.contains(&o));
                }
            }
            for l in &gr.leaves {
                assert!(!gr.nodes.contains(l));
            }
            let kinds: Vec<&str> = gr.nodes.iter().map(|&n| g.node(n).op.kind()).collect();
            *total.entry((*f, kinds.join(">"))).or_insert(0) += 1;
        }
    }
    for ((f, k), n) in &total {
        eprintln!("{f}: {n} x {k}");
    }
    // ViT-B/16 training: dy * gelu'(x) in every layer, and A * (dA - delta) wherever the
    // graph has it (11 sub nodes of shape [B,12,197,197]).
    let train = VIT_B16[1];
    assert!(
        total
            .get(&(train, "sub>mul".to_string()))
            .copied()
            .unwrap_or(0)
            >= 11
    );
    assert!(
        total
            .get(&(train, "gelu_deriv>mul".to_string()))
            .copied()
            .unwrap_or(0)
            >= 12
    );
}

/// Hand-made chains: broadcast leaves, a leaf used twice, a node used twice by one user,
/// an output inside a chain (not fused), a chain longer than the limit.
fn chain_graphs() -> Vec<Graph> {
    use BinaryOp::*;
    let mut out = Vec::new();
    let mut g = Graph::new("chain_bcast");
    let x = input(&mut g, "x", batched(&[5, 7]));
    let r = input(&mut g, "r", batched(&[5, 1]));
    let c = param(&mut g, "c", fixed(&[7]));
    let a = g.binary(Sub, x, r).unwrap();
    let b = g.unary(UnaryOp::Exp, a).unwrap();
    let m = g.binary(Mul, b, c).unwrap();
    let d = g.binary(Div, m, x).unwrap();
    let e = g.binary(Maximum, d, r).unwrap();
    g.set_output("y", e);
    out.push(g);

    let mut g = Graph::new("chain_twice");
    let x = input(&mut g, "x", batched(&[33]));
    let a = g.unary(UnaryOp::Tanh, x).unwrap();
    let b = g.binary(Mul, a, a).unwrap();
    let s = g.unary(UnaryOp::Sigmoid, x).unwrap();
    let c = g.binary(Add, b, s).unwrap();
    let d = g.unary(UnaryOp::GeluDeriv, c).unwrap();
    let e = g.binary(Equal, d, x).unwrap();
    let f = g.binary(Add, d, e).unwrap();
    g.set_output("y", f);
    out.push(g);

    let mut g = Graph::new("chain_output");
    let x = input(&mut g, "x", batched(&[4, 9]));
    let a = g.unary(UnaryOp::Relu, x).unwrap();
    let b = g.unary(UnaryOp::Sqrt, a).unwrap();
    let c = g.binary(Minimum, b, x).unwrap();
    let d = g.unary(UnaryOp::Neg, c).unwrap();
    g.set_output("b", b);
    g.set_output("y", d);
    out.push(g);

    let mut g = Graph::new("chain_long");
    let x = input(&mut g, "x", batched(&[300]));
    let mut v = x;
    for i in 0..40 {
        let u = [UnaryOp::Sigmoid, UnaryOp::Gelu, UnaryOp::Abs, UnaryOp::Log][i % 4];
        v = g.unary(u, v).unwrap();
        v = g.binary(Add, v, x).unwrap();
    }
    g.set_output("y", v);
    out.push(g);
    out
}

/// The group as a graph of its own: the leaves as fixed-shape inputs `x0, x1, ...`.
fn group_graph(g: &Graph, gr: &fuse::Group, batch: usize) -> Graph {
    let mut h = Graph::new("group");
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for (j, &l) in gr.leaves.iter().enumerate() {
        let s = g.ty(l).shape.resolve(batch);
        map.insert(l, h.input(&format!("x{j}"), TensorType::f32(fixed(&s))));
    }
    for &n in &gr.nodes {
        let ins: Vec<NodeId> = g.operands(n).iter().map(|o| map[o]).collect();
        let s = g.ty(n).shape.resolve(batch);
        let y = h
            .add_typed(g.node(n).op.clone(), &ins, TensorType::f32(fixed(&s)))
            .unwrap();
        map.insert(n, y);
    }
    h.set_output("y", map[&gr.root()]);
    h
}

/// The distinct fused kernels of the hand-made chains (with special values) and of the
/// tiny and ViT-B/16 graphs, each with its group as a graph.
fn fused_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut graphs: Vec<(Graph, usize, bool)> =
        chain_graphs().into_iter().map(|g| (g, 3, true)).collect();
    for f in TINY.iter().chain(VIT_B16.iter()) {
        graphs.push((example(f), 1, false));
    }
    let mut seen = BTreeSet::new();
    for (i, (g, batch, special)) in graphs.iter().enumerate() {
        for (j, gr) in groups_of(g).iter().enumerate() {
            let k = fuse::fused_kernel(g, gr, *batch, &format!("f{i}_{j}")).unwrap();
            check_entry(&k);
            if !seen.insert(k.masked_source()) {
                continue;
            }
            cases.push(Case {
                what: format!("{} group of %{}", g.name, gr.root().index()),
                kernel: k,
                kernel16: None,
                one: group_graph(g, gr, *batch),
                special: *special,
            });
        }
    }
    cases
}

/// Every fused kernel on the emulator against the reference of its group, in all three
/// storage types; the kernels also compile with NVRTC where it is present.
#[test]
fn fused_chains_match_the_reference() {
    let cases = fused_cases();
    eprintln!("{} distinct fused kernels", cases.len());
    assert!(cases.len() >= 8);
    if nvrtc_or_skip() {
        let refs: Vec<&Kernel> = cases.iter().map(|c| &c.kernel).collect();
        for dt in ALL_DTYPES {
            if let Err(log) = nvrtc::compile(&module_source(&refs, dt), "sm_80") {
                panic!("{dt}: {log}");
            }
        }
    }
    if !emulator_or_skip() {
        return;
    }
    let failures = run_cases(&Emulator, &cases, &ALL_DTYPES, &tolerance);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same fused kernels on a GPU.
#[test]
fn gpu_fused_chains_match_the_reference() {
    let Some(gpu) = gpu_or_skip() else { return };
    let failures = run_cases(&gpu, &fused_cases(), &ALL_DTYPES, &tolerance);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- whole graphs on the emulator -------------------------------------------------------

/// Run every node's kernel of `g` at `batch` in order on the emulator (no cuBLAS: the
/// generated matmul, linear and attention kernels), each reading its operands' outputs,
/// `reshape` aliasing its operand; with `fused`, element-wise chains run as their fused
/// kernels. Returns the graph's outputs and the f64 reference on the same (rounded)
/// inputs and params.
fn emulate_graph(
    g: &Graph,
    batch: usize,
    dtype: DType,
    fused: bool,
) -> Vec<(String, Vec<f32>, Vec<f64>)> {
    let order = g.topo_order().unwrap();
    let live = live_of(g);
    let groups = if fused {
        fuse::elementwise_groups(g, &order, &live)
    } else {
        Vec::new()
    };
    let mut interior = BTreeSet::new();
    let mut root_of: HashMap<NodeId, usize> = HashMap::new();
    for (k, gr) in groups.iter().enumerate() {
        interior.extend(gr.nodes[..gr.nodes.len() - 1].iter().copied());
        root_of.insert(gr.root(), k);
    }
    // The kernels, in launch order.
    let mut steps: Vec<(NodeId, Vec<Kernel>)> = Vec::new();
    for &id in &order {
        if !live.contains(&id) || interior.contains(&id) {
            continue;
        }
        let mut ks = match root_of.get(&id) {
            Some(&k) => {
                vec![
                    fuse::fused_kernel(g, &groups[k], batch, &format!("n{}_fused", id.index()))
                        .unwrap(),
                ]
            }
            None => node_kernels(g, id, batch, dtype).unwrap(),
        };
        for k in &mut ks {
            let name = format!("e_{}", k.name);
            k.source = k.source.replace(&k.name, &name);
            k.name = name;
        }
        steps.push((id, ks));
    }
    let all: Vec<&Kernel> = steps.iter().flat_map(|(_, ks)| ks.iter()).collect();
    let module = emulate::Module::compile(&all, dtype).unwrap();
    // Leaves: random values (params scaled down, labels one-hot), as the storage holds them.
    let mut bytes: HashMap<NodeId, Vec<u8>> = HashMap::new();
    let mut env: HashMap<String, eptc_ir::reference::Tensor64> = HashMap::new();
    for &id in &order {
        if !live.contains(&id) {
            continue;
        }
        let shape = g.ty(id).shape.resolve(batch);
        let n: usize = shape.iter().product();
        let (name, vals) = match &g.node(id).op {
            Op::Input { name } if name == "labels" => {
                let c = shape[1];
                let v = (0..n)
                    .map(|i| if i % c == (i / c) % c { 1.0 } else { 0.0 })
                    .collect();
                (name.clone(), v)
            }
            Op::Input { name } => (name.clone(), draw(id.index() as u64 + 500, n, false)),
            Op::Param { name, .. } => {
                let v = draw(id.index() as u64 + 900, n, false)
                    .iter()
                    .map(|x| x * 0.25)
                    .collect();
                (name.clone(), v)
            }
            Op::Const { values } => {
                let (b, _) = store(values, dtype);
                bytes.insert(id, b);
                continue;
            }
            _ => continue,
        };
        let (b, held) = store(&vals, dtype);
        bytes.insert(id, b);
        env.insert(name, eptc_ir::reference::Tensor64::new(shape, held));
    }
    for (id, ks) in &steps {
        let node = g.node(*id);
        if node.op.is_leaf() {
            continue;
        }
        if matches!(node.op, Op::Reshape { .. }) {
            let b = bytes[&g.operands(*id)[0]].clone();
            bytes.insert(*id, b);
            continue;
        }
        let operands: Vec<NodeId> = match root_of.get(id) {
            Some(&k) => groups[k].leaves.clone(),
            None => g.operands(*id),
        };
        let n = g.ty(*id).shape.numel(batch);
        let ins: Vec<&[u8]> = operands.iter().map(|o| bytes[o].as_slice()).collect();
        let out = if n == 0 {
            Vec::new()
        } else {
            assert_eq!(ks.len(), 1, "%{}", id.index());
            module
                .run(&ks[0], &ins, n * dtype.size_bytes())
                .unwrap_or_else(|e| panic!("%{} ({}): {e}", id.index(), node.op.kind()))
        };
        bytes.insert(*id, out);
    }
    let want = eptc_ir::reference::eval(g, &env).unwrap();
    g.outputs()
        .iter()
        .zip(want)
        .map(|((name, id), (_, w))| (name.clone(), load_back(&bytes[id], dtype), w.data))
        .collect()
}

/// The tiny ViT's forward and training graphs (EPT deep with the sink; loss and every
/// gradient) run kernel after kernel on the emulator, each reading what the previous
/// ones wrote, with and without fused element-wise chains, against the f64 reference of
/// the whole graph: the kernels composed, not only one by one.
#[test]
fn emulated_graphs_match_the_reference() {
    if !emulator_or_skip() {
        return;
    }
    // The forward's training graph with the flash-style attention backward
    // (`attention_lse` / `attention_grad` kernels), as `EPTC_CUDA_ATTENTION=fused` makes it.
    let flash = {
        use eptc_autodiff::loss::{add_loss, Loss, LOSS};
        let mut g = example(TINY[3]);
        add_loss(&mut g, "logits", Loss::CrossEntropy).unwrap();
        g.remove_output("features");
        let opts = eptc_autodiff::Options {
            fused_attention: true,
            ..Default::default()
        };
        let t = eptc_autodiff::differentiate_with(&g, LOSS, &opts).unwrap();
        let grads = t
            .node_ids()
            .into_iter()
            .filter(|&id| matches!(t.node(id).op, Op::AttentionGrad { .. }))
            .count();
        assert!(grads > 0);
        t
    };
    // f32 for every graph; 16-bit storage for the forward (through a whole backward
    // bf16's rounding compounds past any useful bar: 8e-2 on a prompt gradient here).
    for (f, dtypes) in [
        (
            TINY[3],
            &[(DType::F32, 1e-4), (DType::BF16, 3e-2), (DType::F16, 1e-2)][..],
        ),
        (TINY[4], &[(DType::F32, 1e-4)][..]),
        ("flash backward", &[(DType::F32, 1e-4)][..]),
    ] {
        let g = if f == "flash backward" {
            flash.clone()
        } else {
            example(f)
        };
        if f == TINY[4] {
            assert!(
                groups_of(&g).len() >= 5,
                "the training graph has chains to fuse"
            );
        }
        for &(dtype, bar) in dtypes {
            for fused in [false, true] {
                for (name, got, want) in emulate_graph(&g, 2, dtype, fused) {
                    let err = compare(&got, &want, DType::F32).unwrap();
                    eprintln!("{f} {dtype} fused={fused} {name}: {err:.2e}");
                    assert!(
                        err <= bar,
                        "{f} {dtype} fused={fused} {name}: {err:e} > {bar:e}"
                    );
                }
            }
        }
    }
}

fn gpu_or_skip() -> Option<gpu::Gpu> {
    if nvrtc::available().is_err() {
        eprintln!("skipped: no NVRTC");
        return None;
    }
    match gpu::Gpu::open() {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("EPTC_REQUIRE_CUDA").is_some() => {
            panic!("EPTC_REQUIRE_CUDA is set, but: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
    }
}

/// Every distinct kernel of the op configurations (with special values where the spec
/// defines them per element) and of the tiny graphs, on the GPU against the f64
/// reference interpreter.
#[test]
fn gpu_kernels_match_the_reference() {
    let Some(gpu) = gpu_or_skip() else { return };
    let cases = kernel_cases();
    eprintln!("{} distinct kernels", cases.len());
    let failures = run_cases(&gpu, &cases, &ALL_DTYPES, &tolerance);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every distinct kernel of ViT-B/16 + EPT forward and training at batch 2 against the
/// reference, then their times at batch 64.
#[test]
fn gpu_vit_b16_kernels_match_the_reference() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut cases = Vec::new();
    for (i, f) in VIT_B16.iter().enumerate() {
        cases.extend(cases_of(&example(f), 2, &format!("v{i}"), false));
    }
    eprintln!("{} distinct kernels", cases.len());
    let failures = run_cases(&gpu, &cases, &ALL_DTYPES, &tolerance);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Times at batch 64 (f32 and bf16), each kernel's mean over 5 launches after one.
    let mut timed = Vec::new();
    for (i, f) in VIT_B16.iter().enumerate() {
        for c in cases_of(&example(f), 64, &format!("b{i}"), false) {
            timed.push(c);
        }
    }
    for dtype in [DType::F32, DType::BF16] {
        let refs: Vec<&Kernel> = timed.iter().map(|c| c.kernel_for(dtype)).collect();
        let module = gpu.load(nvrtc::compile(&module_source(&refs, dtype), "sm_90").unwrap());
        let mut rows = Vec::new();
        let mut total = 0.0;
        for c in &timed {
            let y = c.one.outputs()[0].1;
            let bufs: Vec<_> = c
                .one
                .operands(y)
                .iter()
                .map(|&o| {
                    let n = c.one.ty(o).shape.numel(1);
                    gpu.upload(&vec![0x3c; n * dtype.size_bytes()])
                })
                .collect();
            let mut out = gpu.upload(&vec![0; c.one.ty(y).shape.numel(1) * dtype.size_bytes()]);
            let k = c.kernel_for(dtype);
            gpu.launch(&module, k, &bufs, &mut out).unwrap();
            gpu.stream.synchronize().unwrap();
            let t = std::time::Instant::now();
            for _ in 0..5 {
                gpu.launch(&module, k, &bufs, &mut out).unwrap();
            }
            gpu.stream.synchronize().unwrap();
            let us = t.elapsed().as_secs_f64() * 1e6 / 5.0;
            total += us;
            rows.push((us, c.what.clone(), k.grid, k.block));
        }
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        eprintln!(
            "{dtype}, batch 64: {} kernels, {total:.0} us in all; slowest:",
            rows.len()
        );
        for (us, what, grid, block) in rows.iter().take(12) {
            eprintln!("  {us:>9.1} us  {what}  grid {grid:?} block {block:?}");
        }
    }
}

// ---- attention on the tensor cores --------------------------------------------------------

/// ViT-B/16 (64 per head) and the issue's other head dims (80, 128) at 224 and 384 px
/// (197 and 577 tokens) take the tensor-core kernel in both 16-bit storage types, and
/// the f32 kernel stays the SIMT one.
#[test]
fn attention_in_16_bit_storage_runs_on_the_tensor_cores() {
    for (d, n) in [
        (64, 197),
        (80, 197),
        (128, 197),
        (64, 577),
        (80, 577),
        (128, 577),
    ] {
        let mut g = Graph::new("heads");
        let q = input(&mut g, "q", batched(&[12, n, d]));
        let k = input(&mut g, "k", batched(&[12, n, d]));
        let v = input(&mut g, "v", batched(&[12, n, d]));
        let z = input(&mut g, "z", fixed(&[12, n, 1]));
        let y = g.attention(q, k, v, Some(z), 1.0).unwrap();
        let f32k = node_kernels(&g, y, 64, DType::F32).unwrap();
        assert!(!f32k[0].source.contains("mma_t("), "d {d}, n {n}");
        for dt in [DType::BF16, DType::F16] {
            let k = node_kernels(&g, y, 64, dt).unwrap();
            assert!(k[0].source.contains("mma_t("), "d {d}, n {n}, {dt}");
            // 64 rows per block of 128 threads over 64 x 12 heads.
            assert_eq!(k[0].grid[0] as usize, 64 * 12 * n.div_ceil(64));
        }
    }
}

#[test]
fn snapshot_attention_tensor_cores() {
    let g = example(VIT_B16[0]);
    let id = g
        .node_ids()
        .into_iter()
        .find(|&id| g.node(id).op.kind() == "attention")
        .expect("an attention node");
    let k = node_kernels(&g, id, 4, DType::BF16).unwrap().remove(0);
    insta::assert_snapshot!("attention_mma_vit_b16", described(&k));
}

/// The tensor-core kernel stages keys and values with 16-byte copies where they are
/// aligned and element by element where not: operands 2 bytes off the alignment give
/// the same result as aligned ones, and both the reference.
#[test]
fn emulated_tensor_core_attention_reads_unaligned_operands() {
    if !emulator_or_skip() {
        return;
    }
    let mut g = Graph::new("unaligned");
    let q = input(&mut g, "q", fixed(&[2, 70, 32]));
    let k = input(&mut g, "k", fixed(&[2, 130, 32]));
    let v = input(&mut g, "v", fixed(&[2, 130, 16]));
    let z = input(&mut g, "z", fixed(&[2, 70, 1]));
    g.attention(q, k, v, Some(z), 0.3).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let cases = cases_of(&g, 1, "u", false);
        assert_eq!(cases.len(), 1);
        let c = &cases[0];
        let kern = c.kernel_for(dtype);
        assert!(kern.source.contains("mma_t("));
        let m = emulate::Module::compile(&[kern], dtype).unwrap();
        let (inputs, want) = prepare(&cases, dtype).remove(0);
        let want = want.unwrap();
        let refs: Vec<&[u8]> = inputs.iter().map(|b| b.as_slice()).collect();
        let out = vec![0xff; want.len() * dtype.size_bytes()];
        let aligned = m.run_shifted(kern, &refs, out.clone(), 0).unwrap();
        let shifted = m.run_shifted(kern, &refs, out, 2).unwrap();
        assert_eq!(aligned, shifted, "{dtype}");
        let e = compare(&load_back(&shifted, dtype), &want, dtype).unwrap();
        assert!(e <= tolerance(dtype), "{dtype}: {e:.3e}");
    }
}
