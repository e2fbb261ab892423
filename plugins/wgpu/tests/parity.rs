//! The wgpu backend against the CPU reference: every op kind (with broadcasting, batch 1
//! and 3), a whole tiny ViT, and the runtime's contract (set_param, buffer reuse, limits,
//! errors instead of panics). Tests that need a device print why they are skipped and
//! pass where no adapter exists; the `runtime_*` tests run hand-written WGSL through the
//! executor (independent of the kernel generator).
//!
//! Parity bar: relative L2 error `‖wgpu − cpu‖ / ‖cpu‖ ≤ 1e-5`, and no NaN the CPU does
//! not produce.

use eptc_backend::{Backend, BackendError, CompileOptions, Executable};
use eptc_cpu::CpuBackend;
use eptc_ir::{
    Activation, BinaryOp, DType, Graph, HostTensor, Init, NodeId, Op, ReduceOp, Shape, TensorType,
    UnaryOp, WeightStore,
};
use eptc_wgpu::codegen::Kernel;
use eptc_wgpu::exec::{WgpuExecutable, WgpuOptions};
use eptc_wgpu::WgpuBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---- helpers ----------------------------------------------------------------------------

/// The backend with `opts`, or `None` (after saying why) where no adapter exists.
fn device(opts: WgpuOptions) -> Option<WgpuBackend> {
    quiet_loader();
    let be = WgpuBackend::with_options(opts);
    match be.availability() {
        eptc_backend::Availability::Available(_) => Some(be),
        eptc_backend::Availability::Unavailable(why) => {
            eprintln!("skipped: no wgpu adapter: {why}");
            None
        }
    }
}

/// The Vulkan loader complains on stderr without a valid XDG_RUNTIME_DIR.
fn quiet_loader() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            let dir = std::env::temp_dir().join(format!("eptc-xdg-{}", std::process::id()));
            if std::fs::create_dir_all(&dir).is_ok() {
                // SAFETY: set once, before any thread of ours reads the environment.
                unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir) };
            }
        }
    });
}

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// How an input's values are drawn.
#[derive(Clone, Copy)]
enum Gen {
    /// Uniform in [-2, 2).
    Any,
    /// Uniform in [0.1, 2.1): for log, sqrt, rsqrt, recip, div.
    Pos,
    /// Integers in -2..=2 (so `equal`, max and min meet ties).
    Int,
}

fn draw(r: &mut StdRng, n: usize, gen: Gen) -> Vec<f32> {
    (0..n)
        .map(|_| match gen {
            Gen::Any => r.random_range(-2.0f32..2.0),
            Gen::Pos => r.random_range(0.1f32..2.1),
            Gen::Int => r.random_range(-2i32..=2) as f32,
        })
        .collect()
}

/// `‖a − b‖ / ‖b‖` (0 when both are zero).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        num += (x - y) * (x - y);
        den += y * y;
    }
    if num == 0.0 {
        0.0
    } else {
        (num / den.max(1e-300)).sqrt()
    }
}

/// Compare two runs' outputs; `Err` describes the first difference.
fn compare(
    got: &[(String, HostTensor)],
    want: &[(String, HostTensor)],
    tol: f64,
) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("{} outputs, want {}", got.len(), want.len()));
    }
    let mut worst = 0.0f64;
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        if gn != wn || g.shape != w.shape {
            return Err(format!(
                "output {gn} {:?}, want {wn} {:?}",
                g.shape, w.shape
            ));
        }
        let (gd, wd) = (g.data(), w.data());
        for (i, (&a, &b)) in gd.iter().zip(wd).enumerate() {
            if a.is_nan() != b.is_nan() {
                return Err(format!("output {gn} element {i}: {a} vs {b}"));
            }
        }
        let clean = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|x| if x.is_nan() { 0.0 } else { *x })
                .collect()
        };
        let e = rel_err(&clean(gd), &clean(wd));
        if e.is_nan() || e > tol {
            return Err(format!(
                "output {gn}: relative L2 error {e:.3e} > {tol:.0e}"
            ));
        }
        worst = worst.max(e);
    }
    Ok(worst)
}

type Build = Box<dyn Fn(&mut Graph, &[NodeId], &[NodeId]) -> eptc_ir::Result<NodeId>>;

/// One op-level parity case: inputs `x0..` (shapes may contain `B`), params `p0..`
/// (fixed shapes), output `y = build(g, inputs, params)`.
struct Case {
    name: String,
    inputs: Vec<(Shape, Gen)>,
    params: Vec<Vec<usize>>,
    tol: f64,
    build: Build,
}

fn case(
    name: impl Into<String>,
    inputs: &[(Shape, Gen)],
    build: impl Fn(&mut Graph, &[NodeId], &[NodeId]) -> eptc_ir::Result<NodeId> + 'static,
) -> Case {
    Case {
        name: name.into(),
        inputs: inputs.to_vec(),
        params: vec![],
        tol: 1e-5,
        build: Box::new(build),
    }
}

fn b(dims: &[usize]) -> Shape {
    Shape::batched(dims)
}
fn f(dims: &[usize]) -> Shape {
    Shape::fixed(dims)
}

/// Run every case on both backends for batch 1 and 3; returns the failures.
fn run_cases(be: &WgpuBackend, cases: &[Case]) -> Vec<String> {
    let mut fails = Vec::new();
    let mut worst = (0.0f64, String::new());
    for (ci, c) in cases.iter().enumerate() {
        let mut g = Graph::new(c.name.clone());
        let xs: Vec<NodeId> = c
            .inputs
            .iter()
            .enumerate()
            .map(|(i, (s, _))| g.input(&format!("x{i}"), TensorType::f32(s.clone())))
            .collect();
        let ps: Vec<NodeId> = c
            .params
            .iter()
            .enumerate()
            .map(|(i, s)| {
                g.param(
                    &format!("p{i}"),
                    false,
                    Init::Checkpoint,
                    TensorType::f32(f(s)),
                )
            })
            .collect();
        let y = match (c.build)(&mut g, &xs, &ps) {
            Ok(y) => y,
            Err(e) => {
                fails.push(format!("{}: graph: {e}", c.name));
                continue;
            }
        };
        g.set_output("y", y);
        if let Err(e) = eptc_ir::verify(&g) {
            fails.push(format!("{}: verify: {e}", c.name));
            continue;
        }
        let mut r = rng(1000 + ci as u64);
        let mut w = WeightStore::new();
        for (i, s) in c.params.iter().enumerate() {
            let v = draw(&mut r, s.iter().product(), Gen::Any);
            w.insert(format!("p{i}"), HostTensor::new(s.clone(), v));
        }
        let opts = CompileOptions::default();
        let mut cpu = CpuBackend::new()
            .compile(&g, &w, &opts)
            .expect("cpu compiles");
        let mut gpu = match be.compile(&g, &w, &opts) {
            Ok(e) => e,
            Err(e) => {
                fails.push(format!("{}: compile: {e}", c.name));
                continue;
            }
        };
        for batch in [1, 3] {
            let feed: Vec<(String, HostTensor)> = c
                .inputs
                .iter()
                .enumerate()
                .map(|(i, (s, gen))| {
                    let shape = s.resolve(batch);
                    let v = draw(&mut r, shape.iter().product(), *gen);
                    (format!("x{i}"), HostTensor::new(shape, v))
                })
                .collect();
            let feed: Vec<(&str, HostTensor)> =
                feed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let want = cpu.run(&feed).expect("cpu runs");
            match gpu.run(&feed) {
                Ok(got) => match compare(&got, &want, c.tol) {
                    Ok(e) if e > worst.0 => worst = (e, format!("{} (B={batch})", c.name)),
                    Ok(_) => {}
                    Err(e) => fails.push(format!("{} (B={batch}): {e}", c.name)),
                },
                Err(e) => fails.push(format!("{} (B={batch}): run: {e}", c.name)),
            }
        }
    }
    eprintln!(
        "{} cases x 2 batches, largest relative L2 error {:.2e} ({})",
        cases.len(),
        worst.0,
        worst.1
    );
    fails
}

fn assert_no_failures(fails: Vec<String>, total: usize) {
    assert!(
        fails.is_empty(),
        "{} of {total} cases failed:\n  {}",
        fails.len(),
        fails.join("\n  ")
    );
}

fn check(cases: Vec<Case>) {
    let Some(be) = device(WgpuOptions::default()) else {
        return;
    };
    let n = cases.len();
    assert_no_failures(run_cases(&be, &cases), n);
}

// ---- op parity (generated kernels) -------------------------------------------------------

#[test]
fn binary_ops_with_broadcasting() {
    let mut cases = Vec::new();
    for op in BinaryOp::ALL {
        let gen = match op {
            BinaryOp::Div => Gen::Pos,
            BinaryOp::Equal | BinaryOp::Maximum | BinaryOp::Minimum => Gen::Int,
            _ => Gen::Any,
        };
        let shapes: [(&str, Shape, Shape); 5] = [
            ("same", b(&[3, 4]), b(&[3, 4])),
            ("trailing", b(&[3, 4]), f(&[4])),
            ("both ways", b(&[1, 4]), f(&[3, 1])),
            ("batch on the right", f(&[3, 1]), b(&[1, 1, 5])),
            ("scalar", b(&[2, 3]), f(&[])),
        ];
        for (what, sa, sb) in shapes {
            cases.push(case(
                format!("{} {what}", op.name()),
                &[(sa, gen), (sb, gen)],
                move |g: &mut Graph, x: &[NodeId], _: &[NodeId]| g.binary(op, x[0], x[1]),
            ));
        }
    }
    check(cases);
}

#[test]
fn unary_ops() {
    let mut cases = Vec::new();
    for op in UnaryOp::ALL {
        let gen = match op {
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip => Gen::Pos,
            UnaryOp::Sign => Gen::Int,
            _ => Gen::Any,
        };
        cases.push(case(
            op.name(),
            &[(b(&[5, 7]), gen)],
            move |g: &mut Graph, x: &[NodeId], _: &[NodeId]| g.unary(op, x[0]),
        ));
    }
    // Large arguments: saturation of tanh/sigmoid/exp without NaN.
    cases.push(case(
        "tanh sigmoid of large values",
        &[(b(&[64]), Gen::Any)],
        |g, x, _| {
            let k = g.scalar(40.0);
            let y = g.binary(BinaryOp::Mul, x[0], k)?;
            let t = g.unary(UnaryOp::Tanh, y)?;
            let s = g.unary(UnaryOp::Sigmoid, y)?;
            g.binary(BinaryOp::Add, t, s)
        },
    ));
    check(cases);
}

#[test]
fn reductions() {
    let mut cases = Vec::new();
    let axes: [(&[usize], bool); 5] = [
        (&[2], false),
        (&[1], true),
        (&[0, 2], false),
        (&[1, 2], true),
        (&[0], true),
    ];
    for op in ReduceOp::ALL {
        for (ax, keep) in axes {
            cases.push(case(
                format!("{} axes {ax:?} keepdim {keep}", op.name()),
                &[(b(&[4, 6]), Gen::Any)],
                move |g: &mut Graph, x: &[NodeId], _: &[NodeId]| g.reduce(op, x[0], ax, keep),
            ));
        }
        // Many elements in one reduction.
        let mut c = case(
            format!("{} over 6000 elements", op.name()),
            &[(b(&[2, 6000]), Gen::Any)],
            move |g: &mut Graph, x: &[NodeId], _: &[NodeId]| g.reduce(op, x[0], &[2], false),
        );
        c.tol = 1e-5;
        cases.push(c);
    }
    check(cases);
}

#[test]
fn softmax_and_layernorm() {
    let mut cases = Vec::new();
    for axis in 0..3 {
        cases.push(case(
            format!("softmax axis {axis}"),
            &[(b(&[4, 6]), Gen::Any)],
            move |g: &mut Graph, x: &[NodeId], _: &[NodeId]| g.softmax(x[0], axis),
        ));
    }
    cases.push(case(
        "softmax of large logits",
        &[(b(&[3, 300]), Gen::Any)],
        |g, x, _| {
            let k = g.scalar(50.0);
            let y = g.binary(BinaryOp::Mul, x[0], k)?;
            g.softmax(y, 2)
        },
    ));
    let mut c = case("layernorm", &[(b(&[5, 8]), Gen::Any)], |g, x, p| {
        g.layernorm(x[0], p[0], p[1], 1e-6)
    });
    c.params = vec![vec![8], vec![8]];
    cases.push(c);
    let mut c = case("layernorm wide", &[(b(&[3, 768]), Gen::Any)], |g, x, p| {
        g.layernorm(x[0], p[0], p[1], 1e-5)
    });
    c.params = vec![vec![768], vec![768]];
    cases.push(c);
    check(cases);
}

#[test]
fn shape_ops() {
    let cases = vec![
        case(
            "reshape then compute",
            &[(b(&[4, 6]), Gen::Any)],
            |g, x, _| {
                let r = g.reshape(x[0], b(&[24]))?;
                g.unary(UnaryOp::Neg, r)
            },
        ),
        case("reshape as output", &[(b(&[4, 6]), Gen::Any)], |g, x, _| {
            let n = g.unary(UnaryOp::Neg, x[0])?;
            g.reshape(n, b(&[2, 12]))
        }),
        case("permute", &[(b(&[2, 3, 4]), Gen::Any)], |g, x, _| {
            g.permute(x[0], &[0, 2, 3, 1])
        }),
        case(
            "permute moving B",
            &[(b(&[2, 3, 4]), Gen::Any)],
            |g, x, _| g.permute(x[0], &[3, 1, 0, 2]),
        ),
        case(
            "concat axis 1",
            &[
                (b(&[2, 4]), Gen::Any),
                (b(&[3, 4]), Gen::Any),
                (b(&[1, 4]), Gen::Any),
            ],
            |g, x, _| g.concat(&[x[0], x[1], x[2]], 1),
        ),
        case(
            "concat last axis",
            &[(b(&[2, 3]), Gen::Any), (b(&[2, 5]), Gen::Any)],
            |g, x, _| g.concat(&[x[0], x[1]], 2),
        ),
        case(
            "concat axis 0 of fixed",
            &[(f(&[2, 3]), Gen::Any), (f(&[1, 3]), Gen::Any)],
            |g, x, _| g.concat(&[x[0], x[1]], 0),
        ),
        case("slice axis 1", &[(b(&[6, 4]), Gen::Any)], |g, x, _| {
            g.slice(x[0], 1, 2, 5)
        }),
        case("slice last axis", &[(b(&[6, 4]), Gen::Any)], |g, x, _| {
            g.slice(x[0], 2, 1, 3)
        }),
        case(
            "broadcast fixed to B",
            &[(f(&[1, 4]), Gen::Any)],
            |g, x, _| g.broadcast(x[0], b(&[3, 4])),
        ),
        case("broadcast middle", &[(b(&[1, 4]), Gen::Any)], |g, x, _| {
            g.broadcast(x[0], b(&[3, 4]))
        }),
        case("patchify", &[(b(&[3, 8, 8]), Gen::Any)], |g, x, _| {
            g.patchify(x[0], 4)
        }),
        case("patchify 2", &[(b(&[2, 6, 4]), Gen::Any)], |g, x, _| {
            g.patchify(x[0], 2)
        }),
        case(
            "concat with an empty part",
            &[(b(&[0, 4]), Gen::Any), (b(&[2, 4]), Gen::Any)],
            |g, x, _| {
                let e = g.unary(UnaryOp::Exp, x[0])?;
                g.concat(&[e, x[1]], 1)
            },
        ),
        case(
            "empty matmul",
            &[(b(&[3, 0]), Gen::Any), (f(&[0, 2]), Gen::Any)],
            |g, x, _| g.matmul(x[0], x[1], false, false),
        ),
        case("const", &[(b(&[2, 3]), Gen::Any)], |g, x, _| {
            let c = g.constant(vec![1.0, -2.0, 0.5], &[3])?;
            g.binary(BinaryOp::Mul, x[0], c)
        }),
    ];
    check(cases);
}

#[test]
fn matmul() {
    let mut cases = Vec::new();
    let shapes: [(&str, Shape, Shape, bool, bool); 7] = [
        ("plain", b(&[5, 8]), f(&[8, 6]), false, false),
        ("transpose b", b(&[5, 8]), f(&[6, 8]), false, true),
        ("transpose a", b(&[8, 5]), b(&[8, 6]), true, false),
        ("transpose both", b(&[8, 5]), b(&[6, 8]), true, true),
        (
            "broadcast heads",
            b(&[2, 5, 8]),
            f(&[2, 8, 3]),
            false,
            false,
        ),
        ("fixed by batched", f(&[5, 8]), b(&[8, 3]), false, false),
        ("large", b(&[70, 96]), f(&[130, 96]), false, true),
    ];
    for (what, sa, sb, ta, tb) in shapes {
        cases.push(case(
            format!("matmul {what}"),
            &[(sa, Gen::Any), (sb, Gen::Any)],
            move |g: &mut Graph, x: &[NodeId], _: &[NodeId]| g.matmul(x[0], x[1], ta, tb),
        ));
    }
    check(cases);
}

#[test]
fn fused_ops() {
    let mut cases = vec![
        case(
            "softmax_sink",
            &[(b(&[2, 5, 7]), Gen::Any), (f(&[5, 1]), Gen::Any)],
            |g, x, _| g.softmax_sink(x[0], x[1]),
        ),
        case(
            "softmax_sink batched z",
            &[(b(&[2, 5, 7]), Gen::Any), (b(&[1, 5, 1]), Gen::Any)],
            |g, x, _| g.softmax_sink(x[0], x[1]),
        ),
        case(
            "attention",
            &[
                (b(&[2, 5, 8]), Gen::Any),
                (b(&[2, 6, 8]), Gen::Any),
                (b(&[2, 6, 4]), Gen::Any),
            ],
            |g, x, _| g.attention(x[0], x[1], x[2], None, 0.35),
        ),
        case(
            "attention with sink",
            &[
                (b(&[2, 5, 8]), Gen::Any),
                (b(&[2, 5, 8]), Gen::Any),
                (b(&[2, 5, 8]), Gen::Any),
                (f(&[5, 1]), Gen::Any),
            ],
            |g, x, _| g.attention(x[0], x[1], x[2], Some(x[3]), 0.35),
        ),
        case(
            "attention long",
            &[
                (b(&[2, 50, 16]), Gen::Any),
                (b(&[2, 50, 16]), Gen::Any),
                (b(&[2, 50, 16]), Gen::Any),
                (f(&[50, 1]), Gen::Any),
            ],
            |g, x, _| g.attention(x[0], x[1], x[2], Some(x[3]), 0.25),
        ),
        case(
            "layernorm_grad",
            &[
                (b(&[5, 8]), Gen::Any),
                (f(&[8]), Gen::Any),
                (b(&[5, 8]), Gen::Any),
            ],
            |g, x, _| g.add(Op::LayerNormGrad { eps: 1e-6 }, &[x[0], x[1], x[2]]),
        ),
    ];
    for act in Activation::ALL {
        for (bias, res) in [(false, false), (true, false), (true, true), (false, true)] {
            let mut c = case(
                format!("linear {} bias {bias} residual {res}", act.name()),
                &[(b(&[5, 8]), Gen::Any), (b(&[5, 6]), Gen::Any)],
                move |g: &mut Graph, x: &[NodeId], p: &[NodeId]| {
                    g.linear(x[0], p[0], bias.then_some(p[1]), act, res.then_some(x[1]))
                },
            );
            c.params = vec![vec![6, 8], vec![6]];
            cases.push(c);
        }
    }
    check(cases);
}

// ---- a whole tiny ViT ---------------------------------------------------------------

// The CPU backend tests' tiny ViT (graph and random weights), shared, not copied.
#[path = "../../cpu/tests/common/mod.rs"]
mod cpu_common;
use cpu_common::tiny_vit::{param, tiny_vit, weights, CLASSES, D};

fn images(batch: usize, seed: u64) -> HostTensor {
    let v = draw(&mut rng(seed), batch * 192, Gen::Any);
    HostTensor::new(vec![batch, 3, 8, 8], v)
}

fn cpu_exe(g: &Graph, w: &WeightStore) -> Box<dyn Executable> {
    CpuBackend::new()
        .compile(g, w, &CompileOptions::default())
        .unwrap()
}

fn gpu_exe(be: &WgpuBackend, g: &Graph, w: &WeightStore) -> WgpuExecutable {
    be.compile_wgpu(g, w, &CompileOptions::default()).unwrap()
}

#[test]
fn tiny_vit_matches_cpu() {
    let Some(be) = device(WgpuOptions::default()) else {
        return;
    };
    let g = tiny_vit();
    let w = weights(&g, 1);
    let mut cpu = cpu_exe(&g, &w);
    let mut gpu = gpu_exe(&be, &g, &w);
    for batch in [1, 3, 1, 5] {
        let x = [("pixel_values", images(batch, 10 + batch as u64))];
        let want = cpu.run(&x).unwrap();
        let got = gpu.run(&x).unwrap();
        assert_eq!(got[0].1.shape, vec![batch, CLASSES]);
        assert_eq!(got[1].1.shape, vec![batch, D]);
        let e = compare(&got, &want, 1e-5).unwrap();
        eprintln!("tiny ViT, batch {batch}: relative L2 error {e:.2e}");
    }
}

#[test]
fn tiny_vit_set_param_changes_the_result() {
    let Some(be) = device(WgpuOptions::default()) else {
        return;
    };
    let g = tiny_vit();
    let w = weights(&g, 2);
    let mut cpu = cpu_exe(&g, &w);
    let mut gpu = gpu_exe(&be, &g, &w);
    let x = [("pixel_values", images(3, 20))];
    let before = gpu.run(&x).unwrap();
    let bias = HostTensor::new(vec![CLASSES], vec![10.0, 20.0, 30.0]);
    gpu.set_param("head.bias", bias.clone()).unwrap();
    cpu.set_param("head.bias", bias).unwrap();
    let q = weights(&g, 3).get("q.weight").unwrap().clone();
    gpu.set_param("q.weight", q.clone()).unwrap();
    cpu.set_param("q.weight", q).unwrap();
    let after = gpu.run(&x).unwrap();
    assert!(
        compare(&after, &before, 1e-3).is_err(),
        "set_param had no effect"
    );
    compare(&after, &cpu.run(&x).unwrap(), 1e-5).unwrap();
    let wrong = gpu.set_param("head.bias", HostTensor::zeros(vec![CLASSES + 1]));
    assert!(
        matches!(wrong, Err(BackendError::ParamShape { .. })),
        "{wrong:?}"
    );
    assert!(gpu.set_param("nope", HostTensor::zeros(vec![1])).is_err());
}

#[test]
fn tiny_vit_second_run_allocates_nothing() {
    let Some(be) = device(WgpuOptions::default()) else {
        return;
    };
    let g = tiny_vit();
    let w = weights(&g, 4);
    let mut gpu = gpu_exe(&be, &g, &w);
    gpu.run(&[("pixel_values", images(3, 1))]).unwrap();
    let n = gpu.buffers_created();
    let stats = gpu.plan_stats(3).unwrap();
    eprintln!("tiny ViT, batch 3: {stats:?}");
    assert!(
        stats.intermediate_buffers < stats.compute_nodes,
        "{stats:?}"
    );
    assert!(stats.intermediate_bytes < stats.unpooled_bytes, "{stats:?}");
    gpu.run(&[("pixel_values", images(3, 2))]).unwrap();
    assert_eq!(
        gpu.buffers_created(),
        n,
        "second run with the same batch allocated"
    );
    gpu.run(&[("pixel_values", images(1, 2))]).unwrap();
    let m = gpu.buffers_created();
    gpu.run(&[("pixel_values", images(3, 3))]).unwrap();
    gpu.run(&[("pixel_values", images(1, 3))]).unwrap();
    assert_eq!(
        gpu.buffers_created(),
        m,
        "switching between planned batches allocated"
    );
}

#[test]
fn identical_kernels_share_a_pipeline() {
    let Some(be) = device(WgpuOptions::default()) else {
        return;
    };
    let mut g = Graph::new("repeated");
    let mut x = g.input("x", TensorType::f32(b(&[8, 16])));
    let w = param(&mut g, "w", &[16, 16]);
    for _ in 0..4 {
        let y = g.matmul(x, w, false, true).unwrap();
        x = g.unary(UnaryOp::Gelu, y).unwrap();
    }
    g.set_output("y", x);
    let mut wt = WeightStore::new();
    wt.insert(
        "w",
        HostTensor::new(vec![16, 16], draw(&mut rng(9), 256, Gen::Any)),
    );
    let mut gpu = gpu_exe(&be, &g, &wt);
    let x = [(
        "x",
        HostTensor::new(vec![2, 8, 16], draw(&mut rng(8), 256, Gen::Any)),
    )];
    let got = gpu.run(&x).unwrap();
    assert_eq!(gpu.plan_stats(2).unwrap().dispatches, 8);
    assert_eq!(
        gpu.pipelines_created(),
        2,
        "one matmul and one gelu pipeline"
    );
    compare(&got, &cpu_exe(&g, &wt).run(&x).unwrap(), 1e-5).unwrap();
}

#[test]
fn kernels_need_no_device() {
    let g = tiny_vit();
    let ks = eptc_wgpu::exec::kernels(&g, 2).unwrap();
    // Every non-leaf, non-reshape node has at least one kernel.
    let compute = g
        .node_ids()
        .into_iter()
        .filter(|&id| {
            let op = &g.node(id).op;
            !op.is_leaf() && !matches!(op, Op::Reshape { .. })
        })
        .count();
    assert!(
        ks.len() >= compute,
        "{} kernels for {compute} nodes",
        ks.len()
    );
    let mut names: Vec<&str> = ks.iter().map(|k| k.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), ks.len(), "kernel names are unique");
    // The same through the Backend trait.
    let ts = WgpuBackend::new()
        .kernels(&g, 2, eptc_ir::DType::F32)
        .unwrap();
    assert_eq!(ts.len(), ks.len());
    assert!(ts
        .iter()
        .zip(&ks)
        .all(|(t, k)| t.name == k.name && t.source == k.source && t.extension == "wgsl"));
}

#[test]
fn capabilities() {
    let be = WgpuBackend::new();
    assert_eq!(be.name(), "wgpu");
    let caps = be.capabilities();
    assert_eq!(caps.dtypes, vec![DType::F32]);
    for k in ["input", "param", "const", "reshape"] {
        assert!(caps.ops.iter().any(|o| o == k), "{k}");
    }
    for k in &caps.fused_ops {
        assert!(Op::fused_kinds().contains(&k.as_str()));
        assert!(!caps.ops.contains(k));
    }
    match be.availability() {
        eptc_backend::Availability::Available(d) => eprintln!("wgpu adapter: {d}"),
        eptc_backend::Availability::Unavailable(why) => {
            assert!(why.contains("adapter") || why.contains("wgpu"), "{why}")
        }
    }
}

// ---- the runtime with hand-written kernels (no code generator involved) ---------------

/// Elementwise `neg`, `relu`, `add`, `mul`, where every operand broadcasts as a suffix of
/// the output (`a[i % len(a)]`).
fn hand_kernels(g: &Graph, id: NodeId, batch: usize) -> Result<Vec<Kernel>, String> {
    let node = g.node(id);
    let n = node.ty.shape.numel(batch);
    let (inputs, expr) = match &node.op {
        Op::Unary(UnaryOp::Neg) => (1, "-v0"),
        Op::Unary(UnaryOp::Relu) => (1, "max(v0, 0.0)"),
        Op::Binary(BinaryOp::Add) => (2, "v0 + v1"),
        Op::Binary(BinaryOp::Mul) => (2, "v0 * v1"),
        op => return Err(format!("hand kernels: no {}", op.kind())),
    };
    let ops = g.operands(id);
    let mut src = String::new();
    let mut body = String::new();
    for (k, o) in ops.iter().enumerate() {
        let len = g.ty(*o).shape.numel(batch).max(1);
        src += &format!("@group(0) @binding({k}) var<storage, read> a{k}: array<f32>;\n");
        body += &format!("    let v{k} = a{k}[i % {len}u];\n");
    }
    src += &format!("@group(0) @binding({inputs}) var<storage, read_write> out: array<f32>;\n");
    src += &format!(
        "@compute @workgroup_size(64)\nfn main(@builtin(global_invocation_id) gid: vec3<u32>) {{\n    let i = gid.x;\n    if (i >= {n}u) {{ return; }}\n{body}    out[i] = {expr};\n}}\n"
    );
    Ok(vec![Kernel {
        name: format!("n{}_{}", id.index(), node.op.kind()),
        source: src,
        entry: "main".into(),
        inputs,
        workgroups: [n.div_ceil(64) as u32, 1, 1],
    }])
}

/// A kernel that does not compile.
fn broken_kernels(g: &Graph, id: NodeId, _batch: usize) -> Result<Vec<Kernel>, String> {
    Ok(vec![Kernel {
        name: format!("n{}_broken", id.index()),
        source: "@compute @workgroup_size(1) fn main() { let x: f32 = ; }".into(),
        entry: "main".into(),
        inputs: g.operands(id).len(),
        workgroups: [1, 1, 1],
    }])
}

fn hand() -> WgpuOptions {
    WgpuOptions {
        kernel_source: Some(hand_kernels),
        ..Default::default()
    }
}

/// `y = relu(-(x * w) + x)` reshaped to `[B, 12]`, plus `z = x * x` and `w` itself.
fn hand_graph() -> Graph {
    let mut g = Graph::new("hand");
    let x = g.input("x", TensorType::f32(b(&[3, 4])));
    let w = param(&mut g, "w", &[4]);
    let m = g.binary(BinaryOp::Mul, x, w).unwrap();
    let n = g.unary(UnaryOp::Neg, m).unwrap();
    let a = g.binary(BinaryOp::Add, n, x).unwrap();
    let r = g.unary(UnaryOp::Relu, a).unwrap();
    let y = g.reshape(r, b(&[12])).unwrap();
    let z = g.binary(BinaryOp::Mul, x, x).unwrap();
    // A dead node: never computed.
    let _dead = g.unary(UnaryOp::Neg, z).unwrap();
    g.set_output("y", y);
    g.set_output("z", z);
    g.set_output("w", w);
    g.set_output("y again", y);
    g
}

fn hand_weights(seed: u64) -> WeightStore {
    let mut w = WeightStore::new();
    w.insert(
        "w",
        HostTensor::new(vec![4], draw(&mut rng(seed), 4, Gen::Any)),
    );
    w
}

fn xs(batch: usize, seed: u64) -> [(&'static str, HostTensor); 1] {
    let v = draw(&mut rng(seed), batch * 12, Gen::Any);
    [("x", HostTensor::new(vec![batch, 3, 4], v))]
}

#[test]
fn runtime_matches_cpu_with_views_and_repeated_outputs() {
    let Some(be) = device(hand()) else { return };
    let g = hand_graph();
    let w = hand_weights(1);
    let mut cpu = cpu_exe(&g, &w);
    let mut gpu = gpu_exe(&be, &g, &w);
    for batch in [1, 3, 2, 3] {
        let x = xs(batch, batch as u64);
        let got = gpu.run(&x).unwrap();
        let want = cpu.run(&x).unwrap();
        let names: Vec<&str> = got.iter().map(|o| o.0.as_str()).collect();
        assert_eq!(names, ["y", "z", "w", "y again"]);
        assert_eq!(got[0].1.shape, vec![batch, 12]);
        // Elementwise f32 ops: bit-exact.
        compare(&got, &want, 0.0).unwrap();
    }
}

#[test]
fn runtime_second_run_allocates_nothing_and_reuses_buffers() {
    let Some(be) = device(hand()) else { return };
    let g = hand_graph();
    let w = hand_weights(2);
    let mut gpu = gpu_exe(&be, &g, &w);
    let compiled = gpu.buffers_created();
    assert_eq!(compiled, 1, "one buffer for the one live parameter");
    gpu.run(&xs(3, 1)).unwrap();
    let n = gpu.buffers_created();
    let s = gpu.plan_stats(3).unwrap();
    assert_eq!(s.compute_nodes, 5);
    assert_eq!(s.dispatches, 5);
    // m, n, a, r (the y output), z (an output): m -> n -> a -> r ping-pongs, so 4 slots
    // would be enough... the outputs pin two, the chain needs two more at most.
    assert!(s.intermediate_buffers <= 4, "{s:?}");
    // input + slots + 4 staging buffers.
    assert_eq!(n - compiled, 1 + s.intermediate_buffers + 4);
    for seed in 0..3 {
        gpu.run(&xs(3, seed)).unwrap();
    }
    assert_eq!(gpu.buffers_created(), n);
    // At most four batch plans are kept: the least recently used goes, and comes back.
    for batch in [1, 2, 4, 5] {
        gpu.run(&xs(batch, 7)).unwrap();
    }
    assert!(
        gpu.plan_stats(3).is_none(),
        "batch 3 was least recently used"
    );
    assert!(gpu.plan_stats(1).is_some());
    let x = xs(3, 8);
    let w = hand_weights(2);
    compare(
        &gpu.run(&x).unwrap(),
        &cpu_exe(&g, &w).run(&x).unwrap(),
        0.0,
    )
    .unwrap();
}

#[test]
fn runtime_set_param_writes_in_place() {
    let Some(be) = device(hand()) else { return };
    let g = hand_graph();
    let mut gpu = gpu_exe(&be, &g, &hand_weights(3));
    let x = xs(2, 4);
    let before = gpu.run(&x).unwrap();
    let n = gpu.buffers_created();
    let w2 = hand_weights(5);
    gpu.set_param("w", w2.get("w").unwrap().clone()).unwrap();
    let after = gpu.run(&x).unwrap();
    assert_eq!(gpu.buffers_created(), n, "set_param allocated");
    assert_eq!(after[2].1.data(), w2.get("w").unwrap().data());
    assert_ne!(after[0].1.data(), before[0].1.data());
    compare(&after, &cpu_exe(&g, &w2).run(&x).unwrap(), 0.0).unwrap();
    let e = gpu.set_param("w", HostTensor::zeros(vec![5]));
    assert!(matches!(e, Err(BackendError::ParamShape { .. })), "{e:?}");
}

#[test]
fn runtime_limit_error_names_the_node() {
    let opts = WgpuOptions {
        max_binding_bytes: Some(1024),
        ..hand()
    };
    let Some(be) = device(opts) else { return };
    let mut g = Graph::new("big");
    let x = g.input("x", TensorType::f32(b(&[100])));
    let y = g.unary(UnaryOp::Neg, x).unwrap();
    g.set_output("y", y);
    let mut exe = be
        .compile(&g, &WeightStore::new(), &CompileOptions::default())
        .unwrap();
    // 2 x 100 x 4 = 800 bytes fit.
    exe.run(&[("x", HostTensor::zeros(vec![2, 100]))]).unwrap();
    // 3 x 100 x 4 = 1200 bytes do not.
    let e = exe
        .run(&[("x", HostTensor::zeros(vec![3, 100]))])
        .unwrap_err();
    let msg = e.to_string();
    assert_eq!(
        msg,
        format!(
            "node %{} (input): 1200 bytes exceed the adapter's storage-binding limit of 1024 bytes",
            x.index()
        )
    );
    // A parameter too large fails at compile time.
    let mut g = Graph::new("big param");
    let x = g.input("x", TensorType::f32(b(&[300])));
    let p = param(&mut g, "p", &[300]);
    let y = g.binary(BinaryOp::Add, x, p).unwrap();
    g.set_output("y", y);
    let mut w = WeightStore::new();
    w.insert("p", HostTensor::zeros(vec![300]));
    let e = be
        .compile(&g, &w, &CompileOptions::default())
        .err()
        .unwrap();
    assert!(
        e.to_string().ends_with(
            "(param): 1200 bytes exceed the adapter's storage-binding limit of 1024 bytes"
        ),
        "{e}"
    );
}

#[test]
fn runtime_errors_are_errors_not_panics() {
    let Some(be) = device(hand()) else { return };
    let g = hand_graph();
    let mut w = hand_weights(6);
    let mut gpu = be.compile(&g, &w, &CompileOptions::default()).unwrap();
    let e = gpu.run(&[("x", HostTensor::zeros(vec![2, 3, 5]))]);
    assert!(matches!(e, Err(BackendError::InputShape { .. })), "{e:?}");
    let e = gpu.run(&[("other", HostTensor::zeros(vec![1, 3, 4]))]);
    assert!(matches!(e, Err(BackendError::MissingInput(_))), "{e:?}");
    let mut t = HostTensor::zeros(vec![1, 3, 4]);
    t.shape = vec![2, 3, 4];
    assert!(gpu.run(&[("x", t)]).is_err());
    assert!(gpu.run(&xs(1, 1)).is_ok(), "still usable");

    w.insert("w", HostTensor::zeros(vec![4, 1]));
    let e = be.compile(&g, &w, &CompileOptions::default()).err();
    assert!(
        matches!(&e, Some(BackendError::ParamShape { name, .. }) if name == "w"),
        "{e:?}"
    );
    w.remove("w");
    let e = be.compile(&g, &w, &CompileOptions::default()).err();
    assert!(
        matches!(&e, Some(BackendError::MissingParam(n)) if n == "w"),
        "{e:?}"
    );

    // bf16 graphs are not for this backend.
    let mut h = Graph::new("bf16");
    let x = h.input("x", TensorType::new(DType::BF16, f(&[2])));
    let y = h.unary(UnaryOp::Neg, x).unwrap();
    h.set_output("y", y);
    let e = be
        .compile(&h, &WeightStore::new(), &CompileOptions::default())
        .err();
    assert!(matches!(e, Some(BackendError::Unsupported { .. })), "{e:?}");

    // A kernel that does not compile: an error naming it, and the device stays usable.
    let broken = device(WgpuOptions {
        kernel_source: Some(broken_kernels),
        ..Default::default()
    })
    .unwrap();
    let mut exe = broken
        .compile(&g, &hand_weights(7), &CompileOptions::default())
        .unwrap();
    let e = exe.run(&xs(1, 1)).unwrap_err().to_string();
    eprintln!("broken kernel: {e}");
    assert!(e.contains("_broken"), "{e}");
    assert!(gpu.run(&xs(1, 2)).is_ok(), "the device survived");
    // An op the kernel source lacks.
    let mut h = Graph::new("no kernel");
    let x = h.input("x", TensorType::f32(f(&[2])));
    let y = h.unary(UnaryOp::Exp, x).unwrap();
    h.set_output("y", y);
    let mut exe = be
        .compile(&h, &WeightStore::new(), &CompileOptions::default())
        .unwrap();
    let e = exe.run(&[("x", HostTensor::zeros(vec![2]))]).unwrap_err();
    assert!(e.to_string().contains("no exp"), "{e}");
}

#[test]
fn runtime_zero_size_tensors() {
    let Some(be) = device(hand()) else { return };
    let mut g = Graph::new("empty");
    let x = g.input("x", TensorType::f32(b(&[0, 4])));
    let e = param(&mut g, "e", &[0]);
    let y = g.unary(UnaryOp::Neg, x).unwrap();
    let y = g.binary(BinaryOp::Add, y, x).unwrap();
    g.set_output("y", y);
    g.set_output("e", e);
    let mut w = WeightStore::new();
    w.insert("e", HostTensor::zeros(vec![0]));
    let mut exe = be.compile_wgpu(&g, &w, &CompileOptions::default()).unwrap();
    let out = exe.run(&[("x", HostTensor::zeros(vec![2, 0, 4]))]).unwrap();
    assert_eq!(out[0].1.shape, vec![2, 0, 4]);
    assert_eq!(out[1].1.shape, vec![0]);
    assert_eq!(exe.buffers_created(), 0, "zero-size tensors get no buffer");
    assert_eq!(exe.plan_stats(2).unwrap().dispatches, 0);
    exe.set_param("e", HostTensor::zeros(vec![0])).unwrap();
}
