//! The wgpu backend against the CPU reference: every op kind (with broadcasting, batch 1
//! and 3), a whole tiny ViT, and the runtime's contract (set_param, buffer reuse, limits,
//! errors instead of panics). Tests that need a device print why they are skipped and
//! pass where no adapter exists; the `runtime_*` tests run hand-written WGSL through the
//! executor (independent of the kernel generator).
//!
//! Parity bar: relative L2 error `‖wgpu − cpu‖ / ‖cpu‖ ≤ 1e-5`, and no NaN the CPU does
//! not produce. With f16 storage (where the adapter offers shader-f16): every op case
//! again on f16-rounded inputs within 2e-3, and the tiny ViT's logits and the training
//! graph's loss and gradients within 1e-2 of `max |cpu|`.

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
            assert!(
                std::env::var_os("EPTC_REQUIRE_WGPU").is_none(),
                "EPTC_REQUIRE_WGPU is set but wgpu is unavailable: {why}"
            );
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
    /// The tolerance with f16 storage.
    tol_f16: f64,
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
        tol_f16: F16_OP_TOL,
        build: Box::new(build),
    }
}

fn b(dims: &[usize]) -> Shape {
    Shape::batched(dims)
}
fn f(dims: &[usize]) -> Shape {
    Shape::fixed(dims)
}

/// `v` rounded to the nearest f16 (what f16 storage keeps of an input).
fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// The relative L2 error allowed per op case with f16 storage (unless the case says
/// otherwise): inputs are rounded to f16 for both backends, so what remains is the
/// rounding of the stored output (at most 2^-11 relative per element) and of the
/// intermediates of multi-node cases.
const F16_OP_TOL: f64 = 2e-3;

/// Run every case on both backends for batch 1 and 3, the wgpu one storing tensors as
/// `dtype` (with f16, inputs and parameters are rounded to f16 for both, and the
/// tolerance is the case's `tol_f16`); returns the failures.
fn run_cases(be: &WgpuBackend, cases: &[Case], dtype: DType) -> Vec<String> {
    let f16 = dtype == DType::F16;
    let prep = |v: Vec<f32>| if f16 { round_f16(&v) } else { v };
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
            let v = prep(draw(&mut r, s.iter().product(), Gen::Any));
            w.insert(format!("p{i}"), HostTensor::new(s.clone(), v));
        }
        let mut cpu = CpuBackend::new()
            .compile(&g, &w, &CompileOptions::default())
            .expect("cpu compiles");
        let opts = CompileOptions {
            dtype,
            ..Default::default()
        };
        let tol = if f16 { c.tol_f16 } else { c.tol };
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
                    let v = prep(draw(&mut r, shape.iter().product(), *gen));
                    (format!("x{i}"), HostTensor::new(shape, v))
                })
                .collect();
            let feed: Vec<(&str, HostTensor)> =
                feed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            let want = cpu.run(&feed).expect("cpu runs");
            match gpu.run(&feed) {
                Ok(got) => match compare(&got, &want, tol) {
                    Ok(e) if e > worst.0 => worst = (e, format!("{} (B={batch})", c.name)),
                    Ok(_) => {}
                    Err(e) => fails.push(format!("{} (B={batch}): {e}", c.name)),
                },
                Err(e) => fails.push(format!("{} (B={batch}): run: {e}", c.name)),
            }
        }
    }
    eprintln!(
        "{} cases x 2 batches, {dtype} storage, largest relative L2 error {:.2e} ({})",
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
    assert_no_failures(run_cases(&be, &cases, DType::F32), n);
}

// ---- op parity (generated kernels) -------------------------------------------------------

#[test]
fn binary_ops_with_broadcasting() {
    check(binary_ops_with_broadcasting_cases());
}

fn binary_ops_with_broadcasting_cases() -> Vec<Case> {
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
    cases
}

#[test]
fn unary_ops() {
    check(unary_ops_cases());
}

fn unary_ops_cases() -> Vec<Case> {
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
    cases
}

#[test]
fn reductions() {
    check(reductions_cases());
}

fn reductions_cases() -> Vec<Case> {
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
    cases
}

#[test]
fn softmax_and_layernorm() {
    check(softmax_and_layernorm_cases());
}

fn softmax_and_layernorm_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for axis in 0..3 {
        cases.push(case(
            format!("softmax axis {axis}"),
            &[(b(&[4, 6]), Gen::Any)],
            move |g: &mut Graph, x: &[NodeId], _: &[NodeId]| g.softmax(x[0], axis),
        ));
    }
    let mut c = case(
        "softmax of large logits",
        &[(b(&[3, 300]), Gen::Any)],
        |g, x, _| {
            let k = g.scalar(50.0);
            let y = g.binary(BinaryOp::Mul, x[0], k)?;
            g.softmax(y, 2)
        },
    );
    // With f16 storage the logits (up to 100) are stored with steps of 1/16, so the
    // exponentials are off by up to 3% (1.3e-2 relative L2 measured).
    c.tol_f16 = 3e-2;
    cases.push(c);
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
    cases
}

#[test]
fn shape_ops() {
    check(shape_ops_cases());
}

fn shape_ops_cases() -> Vec<Case> {
    vec![
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
    ]
}

#[test]
fn matmul() {
    check(matmul_cases());
}

fn matmul_cases() -> Vec<Case> {
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
    cases
}

#[test]
fn fused_ops() {
    check(fused_ops_cases());
}

fn fused_ops_cases() -> Vec<Case> {
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
    cases
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
    let ks = eptc_wgpu::exec::kernels(&g, 2, DType::F32).unwrap();
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
    let ts = WgpuBackend::new().kernels(&g, 2, DType::F32).unwrap();
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
    assert_eq!(caps.dtypes, vec![DType::F32, DType::F16]);
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

// ---- f16 storage ------------------------------------------------------------------------

/// The worst error of f16 storage we accept for whole models: `max |wgpu − cpu|` over
/// `max |cpu|`, per output.
const F16_MODEL_TOL: f64 = 1e-2;

/// The backend where the adapter offers shader-f16, or `None` (after saying why).
fn device_f16() -> Option<WgpuBackend> {
    device_f16_with(WgpuOptions::default())
}

fn device_f16_with(opts: WgpuOptions) -> Option<WgpuBackend> {
    let be = device(opts)?;
    match be.availability() {
        eptc_backend::Availability::Available(d) if d.contains("offers shader-f16") => Some(be),
        a => {
            assert!(
                std::env::var_os("EPTC_REQUIRE_WGPU").is_none(),
                "EPTC_REQUIRE_WGPU is set but the adapter has no shader-f16: {a:?}"
            );
            eprintln!("skipped: the wgpu adapter has no shader-f16: {a:?}");
            None
        }
    }
}

fn f16_opts() -> CompileOptions {
    CompileOptions {
        dtype: DType::F16,
        ..Default::default()
    }
}

/// `max |a − b| / max |b|` of one output (NaN or infinity on either side, where the other
/// has none, is an error; so is a NaN error).
fn max_rel_err(name: &str, a: &HostTensor, b: &HostTensor) -> Result<f64, String> {
    if a.shape != b.shape {
        return Err(format!("{name}: shape {:?}, want {:?}", a.shape, b.shape));
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&x, &y)) in a.data().iter().zip(b.data()).enumerate() {
        if x.is_finite() != y.is_finite() || x.is_nan() != y.is_nan() {
            return Err(format!("{name} element {i}: {x} vs {y}"));
        }
        if x.is_finite() {
            num = num.max((f64::from(x) - f64::from(y)).abs());
            den = den.max(f64::from(y).abs());
        }
    }
    let e = if num == 0.0 { 0.0 } else { num / den };
    if e.is_nan() {
        return Err(format!("{name}: NaN error"));
    }
    Ok(e)
}

/// Every output of an f16 run against the f32 CPU run: the worst [`max_rel_err`] of each,
/// failing above `tol`.
fn compare_f16(
    got: &[(String, HostTensor)],
    want: &[(String, HostTensor)],
    tol: f64,
) -> Result<Vec<(String, f64)>, String> {
    if got.len() != want.len() {
        return Err(format!("{} outputs, want {}", got.len(), want.len()));
    }
    let mut errs = Vec::new();
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        if gn != wn {
            return Err(format!("output {gn}, want {wn}"));
        }
        let e = max_rel_err(gn, g, w)?;
        if e > tol {
            return Err(format!(
                "output {gn}: max error {e:.3e} of max |ref| > {tol:.0e}"
            ));
        }
        errs.push((gn.clone(), e));
    }
    Ok(errs)
}

#[test]
fn f16_compare_catches_nan_and_large_errors() {
    let t = |v: Vec<f32>| vec![("y".to_string(), HostTensor::new(vec![v.len()], v))];
    let want = t(vec![1.0, -2.0, 4.0]);
    assert!(compare_f16(&t(vec![1.0, -2.0, 4.0]), &want, 1e-2).is_ok());
    let e = compare_f16(&t(vec![1.01, -2.0, 4.0]), &want, 1e-2).unwrap()[0].1;
    assert!((e - 0.0025).abs() < 1e-6, "{e}");
    assert!(compare_f16(&t(vec![1.0, -2.0, 4.1]), &want, 1e-2).is_err());
    assert!(compare_f16(&t(vec![f32::NAN, -2.0, 4.0]), &want, 1e-2).is_err());
    assert!(compare_f16(&t(vec![f32::INFINITY, -2.0, 4.0]), &want, 1e-2).is_err());
    let nan = t(vec![f32::NAN; 3]);
    assert!(compare_f16(&nan, &nan, 1e-2).is_ok());
}

/// Every op case of the f32 tests above, with f16 storage.
#[test]
fn f16_every_op_matches_cpu() {
    let Some(be) = device_f16() else {
        return;
    };
    let cases: Vec<Case> = [
        binary_ops_with_broadcasting_cases(),
        unary_ops_cases(),
        reductions_cases(),
        softmax_and_layernorm_cases(),
        shape_ops_cases(),
        matmul_cases(),
        fused_ops_cases(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let n = cases.len();
    assert_no_failures(run_cases(&be, &cases, DType::F16), n);
}

#[test]
fn tiny_vit_f16_matches_cpu() {
    let Some(be) = device_f16() else {
        return;
    };
    let g = tiny_vit();
    let w = weights(&g, 1);
    let mut cpu = cpu_exe(&g, &w);
    let mut gpu = be.compile_wgpu(&g, &w, &f16_opts()).unwrap();
    let mut worst = 0.0f64;
    // Odd element counts (3 classes x 1, 3, 5 images) exercise the 4-byte padding.
    for batch in [1, 3, 5] {
        let x = [("pixel_values", images(batch, 10 + batch as u64))];
        let want = cpu.run(&x).unwrap();
        let got = gpu.run(&x).unwrap();
        assert_eq!(got[0].1.shape, vec![batch, CLASSES]);
        let errs = compare_f16(&got, &want, F16_MODEL_TOL).unwrap();
        eprintln!("tiny ViT, f16 storage, batch {batch}: max errors {errs:?}");
        worst = errs.iter().fold(worst, |m, e| m.max(e.1));
        // f16 really is f16: the outputs are not the f32 results.
        assert!(rel_err(got[0].1.data(), want[0].1.data()) > 1e-6);
    }
    eprintln!("tiny ViT, f16 storage: worst max error {worst:.2e} of max |ref|");
    // set_param converts to f16 as well.
    let bias = HostTensor::new(vec![CLASSES], vec![10.0, 20.0, 30.0]);
    gpu.set_param("head.bias", bias.clone()).unwrap();
    cpu.set_param("head.bias", bias).unwrap();
    let x = [("pixel_values", images(3, 21))];
    compare_f16(&gpu.run(&x).unwrap(), &cpu.run(&x).unwrap(), F16_MODEL_TOL).unwrap();
}

#[test]
fn f16_storage_halves_the_buffers() {
    let Some(be) = device_f16() else {
        return;
    };
    let g = tiny_vit();
    let w = weights(&g, 4);
    let x = [("pixel_values", images(3, 1))];
    let mut a = gpu_exe(&be, &g, &w);
    let mut h = be.compile_wgpu(&g, &w, &f16_opts()).unwrap();
    a.run(&x).unwrap();
    h.run(&x).unwrap();
    let (s32, s16) = (a.plan_stats(3).unwrap(), h.plan_stats(3).unwrap());
    eprintln!("tiny ViT, batch 3: f32 {s32:?}, f16 {s16:?}");
    assert_eq!(s16.dispatches, s32.dispatches);
    // 2 bytes an element, each tensor padded to a multiple of 4 bytes.
    assert!(
        2 * s16.unpooled_bytes >= s32.unpooled_bytes
            && 2 * s16.unpooled_bytes <= s32.unpooled_bytes + 4 * s16.compute_nodes as u64,
        "{s32:?} {s16:?}"
    );
    assert!(s16.intermediate_bytes < s32.intermediate_bytes);
}

#[test]
fn f16_limits_count_two_bytes_an_element() {
    let Some(be) = device_f16_with(WgpuOptions {
        max_binding_bytes: Some(1024),
        ..Default::default()
    }) else {
        return;
    };
    // A parameter of 300 elements: 1200 bytes in f32, 600 in f16.
    let mut g = Graph::new("limits");
    let x = g.input("x", TensorType::f32(b(&[171])));
    let p = param(&mut g, "p", &[171]);
    let y = g.binary(BinaryOp::Add, x, p).unwrap();
    let q = param(&mut g, "q", &[300]);
    let z = g.unary(UnaryOp::Neg, q).unwrap();
    g.set_output("y", y);
    g.set_output("z", z);
    let mut w = WeightStore::new();
    w.insert("p", HostTensor::new(vec![171], vec![0.5; 171]));
    w.insert("q", HostTensor::new(vec![300], vec![0.25; 300]));
    let e = match be.compile(&g, &w, &CompileOptions::default()) {
        Ok(_) => panic!("1200 bytes of f32 fit in 1024"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.ends_with("(param): 1200 bytes exceed the adapter's storage-binding limit of 1024 bytes"),
        "{e}"
    );
    let mut exe = be.compile(&g, &w, &f16_opts()).unwrap();
    // 2 x 171 elements: 684 bytes fit.
    let out = exe
        .run(&[("x", HostTensor::new(vec![2, 171], vec![1.0; 342]))])
        .unwrap();
    assert!(out[0].1.data().iter().all(|&v| v == 1.5));
    assert!(out[1].1.data().iter().all(|&v| v == -0.25));
    // 3 x 171 elements: 1026 bytes, 1028 with the padding, do not.
    let e = exe
        .run(&[("x", HostTensor::zeros(vec![3, 171]))])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "node %{} (input): 1028 bytes exceed the adapter's storage-binding limit of 1024 bytes",
            x.index()
        )
    );
}

/// Random weights for every parameter of `g`, uniform with a variance of about
/// `1 / fan_in` (fan_in: the product of all dims but the first; 0.1 for vectors).
fn scaled_weights(g: &Graph, seed: u64) -> WeightStore {
    let mut r = rng(seed);
    let mut w = WeightStore::new();
    for (id, name, _) in g.params() {
        let shape = g.ty(id).shape.as_fixed().unwrap();
        let fan_in: usize = shape.iter().skip(1).product();
        let scale = if shape.len() < 2 {
            0.1
        } else {
            (3.0 / fan_in.max(1) as f32).sqrt()
        };
        let n = shape.iter().product();
        let v = (0..n).map(|_| r.random_range(-scale..scale)).collect();
        w.insert(name, HostTensor::new(shape, v));
    }
    w
}

/// The training graph `eptc compile` writes for a tiny ViT with EPT (logits, loss and the
/// gradients of the prompts and the head), f16 storage against the f32 CPU backend.
#[test]
fn training_graph_f16_gradients_match_cpu() {
    let Some(be) = device_f16() else {
        return;
    };
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny_train.eptc");
    let g = eptc_ir::text::parse(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let w = scaled_weights(&g, 7);
    let mut cpu = cpu_exe(&g, &w);
    let mut gpu = be.compile_wgpu(&g, &w, &f16_opts()).unwrap();
    let mut worst: Vec<(String, f64)> = Vec::new();
    for batch in [2, 3] {
        let px = draw(&mut rng(30 + batch as u64), batch * 3 * 32 * 32, Gen::Any);
        // Multi-label targets in {0, 1}.
        let labels: Vec<f32> = (0..batch * 5)
            .map(|i| ((i * 7 + batch) % 3 == 0) as u8 as f32)
            .collect();
        let x = [
            ("pixel_values", HostTensor::new(vec![batch, 3, 32, 32], px)),
            ("labels", HostTensor::new(vec![batch, 5], labels)),
        ];
        let want = cpu.run(&x).unwrap();
        let got = gpu.run(&x).unwrap();
        let names: Vec<&str> = got.iter().map(|o| o.0.as_str()).collect();
        assert!(
            names.iter().any(|n| n.starts_with("grad.ept.prompts")),
            "{names:?}"
        );
        for (_, t) in &want {
            assert!(t.data().iter().any(|&v| v != 0.0), "an all-zero reference");
        }
        let errs = compare_f16(&got, &want, F16_MODEL_TOL).unwrap();
        eprintln!("training graph, f16 storage, batch {batch}: max errors {errs:?}");
        for (n, e) in errs {
            match worst.iter_mut().find(|w| w.0 == n) {
                Some(w) => w.1 = w.1.max(e),
                None => worst.push((n, e)),
            }
        }
    }
    eprintln!("training graph, f16 storage: worst max errors of max |ref| {worst:?}");
}

#[test]
fn f16_kernels_need_no_device() {
    let g = tiny_vit();
    let k32 = eptc_wgpu::exec::kernels(&g, 2, DType::F32).unwrap();
    let k16 = eptc_wgpu::exec::kernels(&g, 2, DType::F16).unwrap();
    assert_eq!(k16.len(), k32.len());
    for (h, s) in k16.iter().zip(&k32) {
        assert_eq!(
            (&h.name, h.inputs, h.workgroups),
            (&s.name, s.inputs, s.workgroups)
        );
        assert!(h.source.starts_with("enable f16;\n"), "{}", h.source);
        assert!(h.source.contains("array<f16>") && !h.source.contains("array<f32>"));
        eptc_wgpu::validate::validate_storage(h, DType::F16).unwrap();
        // An f16 module is not an f32 one.
        assert!(eptc_wgpu::validate::validate(h).is_err(), "{}", h.name);
    }
    let ts = WgpuBackend::new().kernels(&g, 2, DType::F16).unwrap();
    assert!(ts
        .iter()
        .zip(&k16)
        .all(|(t, k)| t.name == k.name && t.source == k.source));
}

#[test]
fn bf16_is_refused() {
    let g = tiny_vit();
    let be = WgpuBackend::new();
    let e = be.kernels(&g, 2, DType::BF16).unwrap_err().to_string();
    assert!(e.contains("no bf16") && e.contains("f16 or f32"), "{e}");
    let opts = CompileOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    // Refused before any device is looked for.
    let e = match be.compile(&g, &weights(&g, 1), &opts) {
        Ok(_) => panic!("bf16 compiled"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("no bf16"), "{e}");
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
