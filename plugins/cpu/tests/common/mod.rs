//! Helpers for the CPU backend's tests: a seeded generator, naive f64 tensors, and
//! running a graph.
#![allow(dead_code)]

pub mod tiny_vit;

use eptc_backend::{Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_ir::{Graph, HostTensor, NodeId, Shape, TensorType, WeightStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn values(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect()
}

/// A naive f64 tensor for reference computations.
#[derive(Clone, Debug)]
pub struct Nd {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Nd {
    pub fn new(shape: &[usize], data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Nd {
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn from_f32(shape: &[usize], v: &[f32]) -> Self {
        Nd::new(shape, v.iter().map(|&x| f64::from(x)).collect())
    }
    pub fn random(r: &mut StdRng, shape: &[usize]) -> (Self, Vec<f32>) {
        let v = values(r, shape.iter().product());
        (Nd::from_f32(shape, &v), v)
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn at(&self, idx: &[usize]) -> f64 {
        self.data[flat(&self.shape, idx)]
    }
    /// Build a tensor of `shape` from a function of the multi-index.
    pub fn build(shape: &[usize], f: impl Fn(&[usize]) -> f64) -> Self {
        let n = shape.iter().product();
        let data = (0..n).map(|i| f(&unravel(shape, i))).collect();
        Nd::new(shape, data)
    }
}

pub fn flat(shape: &[usize], idx: &[usize]) -> usize {
    assert_eq!(shape.len(), idx.len());
    idx.iter().zip(shape).fold(0, |acc, (&i, &n)| {
        assert!(i < n);
        acc * n + i
    })
}

pub fn unravel(shape: &[usize], mut i: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

/// Read `t` at the output index `idx` with numpy broadcasting (right-aligned).
pub fn at_broadcast(t: &Nd, idx: &[usize]) -> f64 {
    let lead = idx.len() - t.shape.len();
    let i: Vec<usize> = t
        .shape
        .iter()
        .enumerate()
        .map(|(d, &n)| if n == 1 { 0 } else { idx[lead + d] })
        .collect();
    t.at(&i)
}

/// `|got - want| <= tol * (1 + |want|)` everywhere, and no NaN unless expected.
pub fn assert_close(got: &HostTensor, want: &Nd, tol: f64) {
    assert_eq!(got.shape, want.shape, "shape");
    let g = got.data();
    assert_eq!(g.len(), want.data.len());
    for (i, (&g, &w)) in g.iter().zip(&want.data).enumerate() {
        let g = f64::from(g);
        if w.is_nan() {
            assert!(g.is_nan(), "element {i}: got {g}, want NaN");
            continue;
        }
        let ok = if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= tol * (1.0 + w.abs())
        };
        assert!(
            ok,
            "element {i} ({:?}): got {g}, want {w}",
            unravel(&want.shape, i)
        );
    }
}

/// Build a graph with fixed-shape inputs `x0, x1, ...`, let `f` add the op(s), run it
/// on the CPU backend with `threads`, and return the single output.
pub fn run_with(
    inputs: &[(&[usize], &[f32])],
    threads: usize,
    f: impl FnOnce(&mut Graph, &[NodeId]) -> NodeId,
) -> HostTensor {
    let mut g = Graph::new("t");
    let ids: Vec<NodeId> = inputs
        .iter()
        .enumerate()
        .map(|(i, (s, _))| g.input(&format!("x{i}"), TensorType::f32(Shape::fixed(s))))
        .collect();
    let out = f(&mut g, &ids);
    g.set_output("y", out);
    eptc_ir::verify(&g).expect("valid graph");
    let opts = CompileOptions {
        threads: Some(threads),
        ..Default::default()
    };
    let mut exe = CpuBackend::new()
        .compile(&g, &WeightStore::new(), &opts)
        .expect("compiles");
    let names: Vec<String> = (0..inputs.len()).map(|i| format!("x{i}")).collect();
    let feed: Vec<(&str, HostTensor)> = inputs
        .iter()
        .zip(&names)
        .map(|((s, v), n)| (n.as_str(), HostTensor::new(s.to_vec(), v.to_vec())))
        .collect();
    let mut out = exe.run(&feed).expect("runs");
    assert_eq!(out.len(), 1);
    out.pop().expect("one output").1
}

/// [`run_with`] on two threads.
pub fn run(
    inputs: &[(&[usize], &[f32])],
    f: impl FnOnce(&mut Graph, &[NodeId]) -> NodeId,
) -> HostTensor {
    run_with(inputs, 2, f)
}

/// A random shape of `rank` dims, each in `1..=max`.
pub fn shape(r: &mut StdRng, rank: usize, max: usize) -> Vec<usize> {
    (0..rank).map(|_| r.random_range(1..=max)).collect()
}

/// `‖a − b‖ / ‖b‖`.
pub fn rel_err(a: &HostTensor, b: &HostTensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.data().iter().zip(b.data()) {
        let (x, y) = (f64::from(x), f64::from(y));
        num += (x - y) * (x - y);
        den += y * y;
    }
    (num / den.max(1e-300)).sqrt()
}

/// A graph of inputs `x0..` with one fused node made by `f`, output "y".
pub fn graph_of(shapes: &[Vec<usize>], f: impl FnOnce(&mut Graph, &[NodeId]) -> NodeId) -> Graph {
    let mut g = Graph::new("fused");
    let ids: Vec<NodeId> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| g.input(&format!("x{i}"), TensorType::f32(Shape::fixed(s))))
        .collect();
    let y = f(&mut g, &ids);
    g.set_output("y", y);
    eptc_ir::verify(&g).unwrap();
    g
}
