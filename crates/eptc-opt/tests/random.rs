//! Property test: the optimizer never changes what a graph computes (beyond float
//! rounding), on random small well-typed graphs of primitive ops.
//!
//! The generator ([`Gen`]) is seeded and builds graphs of about 5 to 30 nodes (a
//! multi-head block makes some up to about 45) from "motifs": random unary, binary (with
//! broadcasting), reduce, softmax, layernorm, concat and slice ops, mixed with the
//! patterns the rules target, so that every rule fires on a good share of the graphs:
//! attention (`softmax(c · q kᵀ) v`), the EPT cat and multi-cat
//! (`slice(softmax(concat(R, S)))` with `R` a broadcast prompt, `alpha · P` or any
//! tensor), linear layers with bias, GELU and residual epilogues (both operand orders),
//! LayerNorms with frozen affine before linear layers, multi-head attention blocks
//! (pre-norm, q/k/v projections either separate or one fused `[3D, D]` linear, head
//! reshapes and permutes, EPT or not, output projection), reshape chains, permute pairs
//! (inverse and not) and broadcasts (identity and expanding). Near misses are generated on
//! purpose too (a softmax over another axis, a scale on the left, a slice of another
//! range, a bias added on the left, `x W` without the transpose, trainable weights where
//! a fold needs frozen ones), so the rules' conditions are exercised as well as their
//! rewrites. Values are reused (sharing), shapes come with and without the symbolic batch
//! `B`, leaves are inputs, frozen or trainable params with random names, and constants;
//! a few linear layers come already fused (`linear` ops, as a partly optimized input has
//! them). Every node with no user becomes an output, plus sometimes a shared
//! intermediate, an alias or a leaf.
//!
//! Every value carries an interval that bounds it (leaves are drawn from `[-1, 1]`),
//! so the generator only takes logs and roots of positive values, divides by values
//! away from zero and exponentiates moderate ones: the reference never has NaN or inf.
//!
//! Each graph is optimized for a backend with every op and for one without fused ops;
//! see [`check_graph`] for what must hold. Shapes that once exposed optimizer bugs (all
//! fixed) are switched by [`known_bugs`] and pinned down by regression tests at the end.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use eptc_backend::{Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_ir::{
    Activation, BinaryOp, Dim, Graph, HostTensor, Init, NodeId, Op, ReduceOp, Shape, TensorType,
    UnaryOp, WeightStore,
};
use eptc_opt::{fold, optimize, rules, Limits, Summary};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

/// Graphs checked by the property test (`EPTC_RANDOM_SEEDS` overrides, to search
/// longer).
const SEEDS: u64 = 200;

fn seeds() -> u64 {
    std::env::var("EPTC_RANDOM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS)
}
/// Largest relative error `‖opt − ref‖ / ‖ref‖` accepted per output.
const TOLERANCE: f64 = 1e-5;
/// The batch size graphs run with.
const BATCH: usize = 2;

// ---- the generator ------------------------------------------------------------------

/// A value of the graph under construction: its node, an interval `[lo, hi]` bounding
/// every element, and whether it may be constant along its last axis because of some
/// broadcast upstream (a layernorm of such rows amplifies rounding by `1/sqrt(eps)`).
#[derive(Clone, Copy, Debug)]
struct V {
    id: NodeId,
    lo: f64,
    hi: f64,
    flat: bool,
}

impl V {
    fn mag(&self) -> f64 {
        self.lo.abs().max(self.hi.abs())
    }
    fn away_from_zero(&self) -> bool {
        self.lo >= 0.05 || self.hi <= -0.05
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Bounds of a unary op's output on `[lo, hi]` (the op's domain is the caller's care).
fn unary_range(op: UnaryOp, lo: f64, hi: f64) -> (f64, f64) {
    match op {
        UnaryOp::Neg => (-hi, -lo),
        UnaryOp::Exp => (lo.exp(), hi.exp()),
        UnaryOp::Log => (lo.ln(), hi.ln()),
        UnaryOp::Sqrt => (lo.sqrt(), hi.sqrt()),
        UnaryOp::Rsqrt => (1.0 / hi.sqrt(), 1.0 / lo.sqrt()),
        UnaryOp::Recip => (1.0 / hi, 1.0 / lo),
        UnaryOp::Abs if lo >= 0.0 => (lo, hi),
        UnaryOp::Abs if hi <= 0.0 => (-hi, -lo),
        UnaryOp::Abs => (0.0, hi.max(-lo)),
        UnaryOp::Tanh => (lo.tanh(), hi.tanh()),
        UnaryOp::Sigmoid => (sigmoid(lo), sigmoid(hi)),
        UnaryOp::Relu => (lo.max(0.0), hi.max(0.0)),
        UnaryOp::Gelu => (-0.17, hi.max(0.0)),
        UnaryOp::Sign => (lo.signum().min(0.0), hi.signum().max(0.0)),
        UnaryOp::GeluDeriv => (-0.13, 1.13),
    }
}

fn product_range(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    let p = [a.0 * b.0, a.0 * b.1, a.1 * b.0, a.1 * b.1];
    (
        p.iter().copied().fold(f64::INFINITY, f64::min),
        p.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

fn binary_range(op: BinaryOp, a: V, b: V) -> (f64, f64) {
    match op {
        BinaryOp::Add => (a.lo + b.lo, a.hi + b.hi),
        BinaryOp::Sub => (a.lo - b.hi, a.hi - b.lo),
        BinaryOp::Mul => product_range((a.lo, a.hi), (b.lo, b.hi)),
        BinaryOp::Div => product_range((a.lo, a.hi), (1.0 / b.hi, 1.0 / b.lo)),
        BinaryOp::Maximum => (a.lo.max(b.lo), a.hi.max(b.hi)),
        BinaryOp::Minimum => (a.lo.min(b.lo), a.hi.min(b.hi)),
        BinaryOp::Equal => (0.0, 1.0),
    }
}

fn shape_of(lead: &[Dim], tail: &[usize]) -> Shape {
    Shape(
        lead.iter()
            .copied()
            .chain(tail.iter().map(|&d| Dim::Fixed(d)))
            .collect(),
    )
}

fn fixed_at(s: &Shape, axis: usize) -> Option<usize> {
    s.dims().get(axis)?.fixed()
}

/// The prime factors of `n`, smallest first.
fn factors(mut n: usize) -> Vec<usize> {
    let mut f = Vec::new();
    let mut p = 2;
    while p * p <= n {
        while n.is_multiple_of(p) {
            f.push(p);
            n /= p;
        }
        p += 1;
    }
    if n > 1 {
        f.push(n);
    }
    f
}

struct Gen {
    rng: StdRng,
    g: Graph,
    /// Every value built so far (leaves included), for reuse.
    vals: Vec<V>,
    /// Counter for unique leaf names.
    names: usize,
}

/// Small sizes, 2 and 3 most often.
const SIZES: [usize; 6] = [1, 2, 2, 3, 3, 4];

impl Gen {
    fn new(seed: u64) -> Self {
        Gen {
            rng: StdRng::seed_from_u64(seed),
            g: Graph::new(format!("random{seed}")),
            vals: Vec::new(),
            names: 0,
        }
    }

    fn p(&mut self, prob: f64) -> bool {
        self.rng.random_bool(prob)
    }

    fn int(&mut self, lo: usize, hi: usize) -> usize {
        self.rng.random_range(lo..=hi)
    }

    fn size(&mut self) -> usize {
        *SIZES.choose(&mut self.rng).expect("sizes")
    }

    fn shape(&self, v: V) -> Shape {
        self.g.ty(v.id).shape.clone()
    }

    fn rank(&self, v: V) -> usize {
        self.g.ty(v.id).rank()
    }

    fn push_node(&mut self, op: Op, ins: &[V], lo: f64, hi: f64, flat: bool) -> V {
        let ids: Vec<NodeId> = ins.iter().map(|v| v.id).collect();
        let id = self
            .g
            .add(op.clone(), &ids)
            .unwrap_or_else(|e| panic!("the generator built an ill-typed {op:?}: {e}"));
        let v = V {
            id,
            lo,
            hi,
            flat: flat || ins.iter().any(|v| v.flat),
        };
        self.vals.push(v);
        v
    }

    fn push(&mut self, op: Op, ins: &[V], lo: f64, hi: f64) -> V {
        self.push_node(op, ins, lo, hi, false)
    }

    // ---- leaves ---------------------------------------------------------------------

    fn param_name(&mut self, n: usize) -> String {
        const A: [&str; 8] = [
            "blocks",
            "encoder.layer",
            "vit",
            "head",
            "ept",
            "lora",
            "mlp",
            "attn",
        ];
        const B: [&str; 9] = [
            "weight", "bias", "prompts", "scale", "proj", "qkv", "fc1", "fc2", "norm",
        ];
        let a = *A.choose(&mut self.rng).expect("names");
        let b = *B.choose(&mut self.rng).expect("names");
        let layer = self.int(0, 11);
        format!("{a}.{layer}.{b}_{n}")
    }

    fn new_param(&mut self, shape: Shape, trainable: bool) -> V {
        let n = self.names;
        self.names += 1;
        let name = self.param_name(n);
        let init = if trainable {
            *[
                Init::Zeros,
                Init::Normal(0.02),
                Init::Kaiming,
                Init::Uniform(0.1),
            ]
            .choose(&mut self.rng)
            .expect("inits")
        } else {
            Init::Checkpoint
        };
        let id = self.g.param(&name, trainable, init, TensorType::f32(shape));
        self.leaf_value(id)
    }

    /// A fresh leaf: an input if the shape has the batch, else an input, a frozen or
    /// trainable param, or a constant.
    fn leaf(&mut self, shape: Shape) -> V {
        if shape.has_batch() || self.p(0.25) {
            let n = self.names;
            self.names += 1;
            let id = self.g.input(&format!("x{n}"), TensorType::f32(shape));
            return self.leaf_value(id);
        }
        let fixed = shape.as_fixed().expect("no batch");
        let numel: usize = fixed.iter().product();
        if numel <= 12 && self.p(0.2) {
            let values = (0..numel)
                .map(|_| self.rng.random_range(-1.0f32..1.0))
                .collect();
            let id = self.g.constant(values, &fixed).expect("one value each");
            return self.leaf_value(id);
        }
        let trainable = self.p(0.4);
        self.new_param(shape, trainable)
    }

    fn leaf_value(&mut self, id: NodeId) -> V {
        let v = V {
            id,
            lo: -1.0,
            hi: 1.0,
            flat: false,
        };
        self.vals.push(v);
        v
    }

    /// A constant `x` of shape `[1; rank]`.
    fn scalar(&mut self, x: f32, rank: usize) -> V {
        let id = self.g.constant(vec![x], &vec![1; rank]).expect("one value");
        let v = V {
            id,
            lo: x as f64,
            hi: x as f64,
            flat: false,
        };
        self.vals.push(v);
        v
    }

    /// A weight of a fixed shape: mostly a fresh frozen param (so the folds of frozen
    /// weights apply), sometimes a trainable one, sometimes any value of the shape.
    fn weight(&mut self, shape: &[usize]) -> V {
        match self.int(0, 19) {
            0..=13 => self.new_param(Shape::fixed(shape), false),
            14..=16 => self.new_param(Shape::fixed(shape), true),
            _ => self.get(&Shape::fixed(shape)),
        }
    }

    /// A random shape of rank `min_rank..=4`, batched (`B` first) half the time.
    fn rand_shape(&mut self, min_rank: usize) -> Shape {
        let rank = self.int(min_rank.max(1), 4);
        let mut d = Vec::new();
        if self.p(0.5) {
            d.push(Dim::Batch);
        }
        while d.len() < rank {
            let s = self.size();
            d.push(Dim::Fixed(s));
        }
        Shape(d)
    }

    // ---- picking operands -----------------------------------------------------------

    fn pick(&mut self, f: impl Fn(&Graph, &V) -> bool) -> Option<V> {
        let c: Vec<V> = self
            .vals
            .iter()
            .copied()
            .filter(|v| f(&self.g, v))
            .collect();
        c.choose(&mut self.rng).copied()
    }

    /// An existing value of rank `>= min_rank` (mostly), or a fresh leaf.
    fn any(&mut self, min_rank: usize) -> V {
        if self.p(0.8) {
            if let Some(v) = self.pick(|g, v| g.ty(v.id).rank() >= min_rank) {
                return v;
            }
        }
        let s = self.rand_shape(min_rank);
        self.leaf(s)
    }

    /// A value of shape `s`: an existing one half the time, if any, else a fresh leaf.
    fn get(&mut self, s: &Shape) -> V {
        if self.p(0.5) {
            if let Some(v) = self.pick(|g, v| g.ty(v.id).shape == *s) {
                return v;
            }
        }
        self.leaf(s.clone())
    }

    // ---- single ops -----------------------------------------------------------------

    fn un(&mut self, op: UnaryOp, v: V) -> V {
        let (lo, hi) = unary_range(op, v.lo, v.hi);
        self.push(Op::Unary(op), &[v], lo, hi)
    }

    fn bin(&mut self, op: BinaryOp, a: V, b: V) -> V {
        let (lo, hi) = binary_range(op, a, b);
        let broadcasting =
            self.shape(a) != self.shape(b) || matches!(op, BinaryOp::Maximum | BinaryOp::Minimum);
        self.push_node(Op::Binary(op), &[a, b], lo, hi, broadcasting)
    }

    fn matmul(&mut self, a: V, b: V, ta: bool, tb: bool) -> V {
        let sa = self.shape(a);
        let k = sa.dims()[sa.rank() - if ta { 2 } else { 1 }].resolve(BATCH) as f64;
        let m = k * a.mag() * b.mag();
        self.push_node(
            Op::MatMul {
                transpose_a: ta,
                transpose_b: tb,
            },
            &[a, b],
            -m,
            m,
            true,
        )
    }

    fn reduce(&mut self, op: ReduceOp, v: V, axes: &[usize], keepdim: bool) -> V {
        let s = self.shape(v);
        let n: usize = axes.iter().map(|&a| s.dims()[a].resolve(BATCH)).product();
        let (lo, hi) = match op {
            ReduceOp::Sum => (v.lo * n as f64, v.hi * n as f64),
            ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min => (v.lo, v.hi),
            ReduceOp::LogSumExp => (v.lo + (n as f64).ln(), v.hi + (n as f64).ln()),
        };
        self.push(
            Op::Reduce {
                op,
                axes: axes.to_vec(),
                keepdim,
            },
            &[v],
            lo,
            hi,
        )
    }

    fn softmax(&mut self, v: V, axis: usize) -> V {
        let n = self.shape(v).dims()[axis].resolve(BATCH) as f64;
        let lo = (-(v.hi - v.lo)).exp() / n;
        self.push(Op::Softmax { axis }, &[v], lo, 1.0)
    }

    fn reshape(&mut self, v: V, shape: Shape) -> V {
        self.push(Op::Reshape { shape }, &[v], v.lo, v.hi)
    }

    fn permute(&mut self, v: V, perm: &[usize]) -> V {
        let op = Op::Permute {
            perm: perm.to_vec(),
        };
        self.push(op, &[v], v.lo, v.hi)
    }

    fn broadcast(&mut self, v: V, shape: Shape) -> V {
        let expands = self.shape(v) != shape;
        self.push_node(Op::Broadcast { shape }, &[v], v.lo, v.hi, expands)
    }

    fn concat(&mut self, parts: &[V], axis: usize) -> V {
        let lo = parts.iter().map(|v| v.lo).fold(f64::INFINITY, f64::min);
        let hi = parts.iter().map(|v| v.hi).fold(f64::NEG_INFINITY, f64::max);
        self.push(Op::Concat { axis }, parts, lo, hi)
    }

    fn slice(&mut self, v: V, axis: usize, start: usize, end: usize) -> V {
        self.push(Op::Slice { axis, start, end }, &[v], v.lo, v.hi)
    }

    /// `v`, squashed by `tanh` if it may exceed `m` in magnitude.
    fn tame(&mut self, v: V, m: f64) -> V {
        if v.mag() <= m {
            v
        } else {
            self.un(UnaryOp::Tanh, v)
        }
    }

    /// A value `>= 0.05` made from `v`.
    fn positive(&mut self, v: V) -> V {
        match self.int(0, 2) {
            0 => {
                let t = self.tame(v, 2.5);
                self.un(UnaryOp::Sigmoid, t)
            }
            1 => {
                let t = self.tame(v, 2.0);
                self.un(UnaryOp::Exp, t)
            }
            _ => {
                let a = self.un(UnaryOp::Abs, v);
                let c = self.rng.random_range(0.5f32..1.0);
                let c = self.scalar(c, 0);
                self.bin(BinaryOp::Add, a, c)
            }
        }
    }

    // ---- shapes ---------------------------------------------------------------------

    /// A shape that broadcasts to `s`: some dims set to 1, some leading dims dropped.
    fn sub_shape(&mut self, s: &Shape) -> Shape {
        let mut d: Vec<Dim> = s
            .dims()
            .iter()
            .map(|&x| if self.p(0.3) { Dim::Fixed(1) } else { x })
            .collect();
        let drop = self.int(0, d.len());
        d.drain(..drop);
        Shape(d)
    }

    /// A shape `s` broadcasts to, with one more leading dim (`B` if `s` has none).
    fn super_shape(&mut self, s: &Shape) -> Shape {
        if s.rank() >= 4 {
            return s.clone();
        }
        let first = if !s.has_batch() && self.p(0.5) {
            Dim::Batch
        } else {
            Dim::Fixed(self.int(2, 3))
        };
        Shape(std::iter::once(first).chain(s.0.iter().copied()).collect())
    }

    /// A random shape with the same symbolic element count as `s`.
    fn reshape_of(&mut self, s: &Shape) -> Shape {
        let (batches, n) = s.symbolic_numel();
        let mut f = factors(n);
        f.shuffle(&mut self.rng);
        let groups = self.int(1, f.len().clamp(1, 3));
        let mut d = vec![1usize; groups];
        for x in f {
            let i = self.int(0, groups - 1);
            d[i] *= x;
        }
        if self.p(0.15) {
            let at = self.int(0, d.len());
            d.insert(at, 1);
        }
        let mut dims: Vec<Dim> = d.into_iter().map(Dim::Fixed).collect();
        for _ in 0..batches {
            let at = if self.p(0.8) {
                0
            } else {
                self.int(0, dims.len())
            };
            dims.insert(at, Dim::Batch);
        }
        Shape(dims)
    }

    // ---- motifs ---------------------------------------------------------------------

    fn m_unary(&mut self) {
        let v = self.any(0);
        let op = *UnaryOp::ALL.choose(&mut self.rng).expect("ops");
        let v = match op {
            UnaryOp::Exp => self.tame(v, 3.0),
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt if v.lo < 0.05 => self.positive(v),
            UnaryOp::Recip if !v.away_from_zero() => self.positive(v),
            _ => v,
        };
        self.un(op, v);
    }

    fn m_binary(&mut self) {
        let a = self.any(0);
        let s = self.shape(a);
        let b = match self.int(0, 4) {
            0 => self.get(&s),
            1 => {
                let t = self.sub_shape(&s);
                self.get(&t)
            }
            2 => {
                let x = self.rng.random_range(-1.0f32..1.0);
                self.scalar(x, 0)
            }
            3 => a,
            _ => {
                let t = self.super_shape(&s);
                self.get(&t)
            }
        };
        let op = *BinaryOp::ALL.choose(&mut self.rng).expect("ops");
        let (mut x, mut y) = if self.p(0.5) { (a, b) } else { (b, a) };
        match op {
            BinaryOp::Mul => {
                x = self.tame(x, 8.0);
                y = self.tame(y, 8.0);
            }
            BinaryOp::Div if !y.away_from_zero() => y = self.positive(y),
            _ => {}
        }
        self.bin(op, x, y);
    }

    fn m_reduce(&mut self) {
        let v = self.any(1);
        let r = self.rank(v);
        let k = if r >= 2 && self.p(0.3) { 2 } else { 1 };
        let mut axes: Vec<usize> = (0..r).collect();
        axes.shuffle(&mut self.rng);
        axes.truncate(k);
        if self.p(0.7) {
            axes.sort();
        }
        let keep = self.p(0.5);
        let op = *ReduceOp::ALL.choose(&mut self.rng).expect("ops");
        let v = if op == ReduceOp::Sum {
            self.tame(v, 10.0)
        } else {
            v
        };
        self.reduce(op, v, &axes, keep);
    }

    fn m_softmax(&mut self) {
        let v = self.any(1);
        let r = self.rank(v);
        let axis = if self.p(0.6) {
            r - 1
        } else {
            self.int(0, r - 1)
        };
        self.softmax(v, axis);
    }

    fn m_layernorm(&mut self) {
        let ok = |g: &Graph, v: &V| {
            let s = &g.ty(v.id).shape;
            s.rank() >= 1 && fixed_at(s, s.rank() - 1).is_some_and(|d| d >= 2)
        };
        let v = match self.pick(ok).filter(|_| self.rng.random_bool(0.8)) {
            Some(v) => v,
            None => {
                let mut s = self.rand_shape(1);
                let last = s.0.len() - 1;
                s.0[last] = Dim::Fixed(self.int(2, 4));
                self.leaf(s)
            }
        };
        let frozen = self.p(0.3);
        self.layernorm(v, frozen);
    }

    /// LayerNorm over the last axis (fixed, >= 2) with gamma and beta weights (`frozen`:
    /// as a checkpoint has them) or any values of the shape.
    fn layernorm(&mut self, v: V, frozen: bool) -> V {
        let s = self.shape(v);
        let d = fixed_at(&s, s.rank() - 1).expect("fixed last dim");
        let mut affine = Vec::new();
        for _ in 0..2 {
            let a = if frozen && self.p(0.9) {
                self.new_param(Shape::fixed(&[d]), false)
            } else if frozen {
                self.weight(&[d])
            } else {
                self.get(&Shape::fixed(&[d]))
            };
            affine.push(self.tame(a, 2.0));
        }
        let (gamma, beta) = (affine[0], affine[1]);
        let eps = if v.flat {
            1e-2
        } else {
            *[1e-5f32, 1e-3].choose(&mut self.rng).expect("eps")
        };
        let m = (d as f64).sqrt() * gamma.mag() + beta.mag();
        self.push(Op::LayerNorm { eps }, &[v, gamma, beta], -m, m)
    }

    /// A LayerNorm with frozen affine feeding a linear layer (the LayerNorm fold).
    fn m_ln_linear(&mut self) {
        let ok = |g: &Graph, v: &V| {
            let s = &g.ty(v.id).shape;
            s.rank() >= 2 && fixed_at(s, s.rank() - 1).is_some_and(|d| d >= 2)
        };
        let x = match self.pick(ok).filter(|_| self.rng.random_bool(0.6)) {
            Some(x) => x,
            None => {
                let (t, d) = (self.size(), self.int(2, 5));
                let s = if self.p(0.6) {
                    Shape::batched(&[t, d])
                } else {
                    Shape::fixed(&[t, d])
                };
                self.get(&s)
            }
        };
        let h = self.layernorm(x, true);
        let out = self.int(1, 5);
        self.linear(h, out, true, true);
    }

    fn m_concat(&mut self) {
        let v = self.any(1);
        let s = self.shape(v);
        let axes: Vec<usize> = (0..s.rank())
            .filter(|&a| fixed_at(&s, a).is_some())
            .collect();
        let Some(&axis) = axes.choose(&mut self.rng) else {
            return;
        };
        let n = self.int(2, 3);
        let mut parts = Vec::new();
        for _ in 0..n {
            if self.p(0.4) {
                parts.push(v);
            } else {
                let mut t = s.clone();
                t.0[axis] = Dim::Fixed(self.int(1, 3));
                parts.push(self.get(&t));
            }
        }
        parts.shuffle(&mut self.rng);
        self.concat(&parts, axis);
    }

    fn m_slice(&mut self) {
        let ok = |g: &Graph, v: &V| {
            let s = &g.ty(v.id).shape;
            (0..s.rank()).any(|a| fixed_at(s, a).is_some_and(|d| d >= 2))
        };
        let v = match self.pick(ok) {
            Some(v) => v,
            None => {
                let k = self.int(2, 4);
                self.leaf(Shape::batched(&[k]))
            }
        };
        let s = self.shape(v);
        let axes: Vec<usize> = (0..s.rank())
            .filter(|&a| fixed_at(&s, a).is_some_and(|d| d >= 2))
            .collect();
        let axis = *axes.choose(&mut self.rng).expect("a sliceable axis");
        let n = fixed_at(&s, axis).expect("fixed");
        let start = self.int(0, n - 2);
        let end = self.int(start + 1, n);
        self.slice(v, axis, start, end);
    }

    /// One to three reshapes: to random shapes, to the same shape, back to the first.
    fn m_reshapes(&mut self) {
        let v = self.any(0);
        let s0 = self.shape(v);
        let mut cur = v;
        for i in 0..self.int(1, 3) {
            let target = match self.int(0, 5) {
                0 => self.shape(cur),
                1 if i > 0 => s0.clone(),
                _ => self.reshape_of(&s0),
            };
            cur = self.reshape(cur, target);
        }
    }

    /// A permute, an inverse pair, or a non-inverse pair (sometimes via the identity).
    fn m_permutes(&mut self) {
        let v = self.any(2);
        let r = self.rank(v);
        let mut p1: Vec<usize> = (0..r).collect();
        p1.shuffle(&mut self.rng);
        let mode = self.int(0, 3);
        if mode == 3 {
            p1 = (0..r).collect();
        }
        let a = self.permute(v, &p1);
        let p2: Vec<usize> = match mode {
            0 => return,
            1 => {
                let mut inv = vec![0; r];
                for (i, &p) in p1.iter().enumerate() {
                    inv[p] = i;
                }
                inv
            }
            _ => {
                let mut p: Vec<usize> = (0..r).collect();
                p.shuffle(&mut self.rng);
                p
            }
        };
        self.permute(a, &p2);
    }

    /// A broadcast to the same shape, or one that expands size-1 dims and prepends dims.
    fn m_broadcast(&mut self) {
        let v = self.any(0);
        let s = self.shape(v);
        if self.p(0.3) {
            self.broadcast(v, s);
            return;
        }
        let mut d: Vec<Dim> = s
            .dims()
            .iter()
            .map(|&x| {
                if x == Dim::Fixed(1) && self.p(0.6) {
                    Dim::Fixed(self.int(2, 3))
                } else {
                    x
                }
            })
            .collect();
        let mut batch = s.has_batch();
        for _ in 0..self.int(0, 2) {
            if d.len() >= 5 {
                break;
            }
            let first = if !batch && self.p(0.5) {
                batch = true;
                Dim::Batch
            } else {
                Dim::Fixed(self.int(2, 3))
            };
            d.insert(0, first);
        }
        if d == s.0 {
            d.insert(0, Dim::Fixed(2));
        }
        self.broadcast(v, Shape(d));
    }

    /// `x Wᵀ + b` (mostly; sometimes `b + x Wᵀ`, `x W`, or no bias), then with
    /// `epilogue` maybe a GELU and a residual on either side; sometimes (with
    /// `epilogue`) the fused `linear` op itself, as a partly optimized input has it.
    /// `frozen`: W and b are fresh frozen params (as in a checkpoint's attention).
    fn linear(&mut self, x: V, out: usize, epilogue: bool, frozen: bool) -> V {
        let xs = self.shape(x);
        let inn = fixed_at(&xs, xs.rank() - 1).expect("fixed in-features");
        let x = self.tame(x, 5.0);
        let weight = |g: &mut Gen, shape: &[usize]| {
            let w = if frozen && g.p(0.95) {
                g.new_param(Shape::fixed(shape), false)
            } else {
                g.weight(shape)
            };
            g.tame(w, 1.0)
        };
        if epilogue && self.p(if frozen { 0.3 } else { 0.1 }) {
            let (w, b) = (weight(self, &[out, inn]), weight(self, &[out]));
            let act = *Activation::ALL.choose(&mut self.rng).expect("acts");
            let ys = shape_of(&xs.dims()[..xs.rank() - 1], &[out]);
            let r = if self.p(0.5) {
                Some(self.get(&ys))
            } else {
                None
            };
            let mut m = inn as f64 * x.mag() * w.mag() + b.mag();
            let mut ins = vec![x, w, b];
            if let Some(r) = r {
                m += r.mag();
                ins.push(r);
            }
            let op = Op::Linear {
                bias: true,
                activation: act,
                residual: r.is_some(),
            };
            return self.push_node(op, &ins, -m, m, true);
        }
        let transposed = self.p(if frozen { 0.97 } else { 0.9 });
        let ws = if transposed { [out, inn] } else { [inn, out] };
        let w = weight(self, &ws);
        let mut y = self.matmul(x, w, false, transposed);
        if self.p(if frozen { 0.97 } else { 0.9 }) {
            let b = weight(self, &[out]);
            y = if self.p(if frozen { 0.95 } else { 0.85 }) {
                self.bin(BinaryOp::Add, y, b)
            } else {
                self.bin(BinaryOp::Add, b, y)
            };
        }
        if epilogue {
            if self.p(0.4) {
                y = self.un(UnaryOp::Gelu, y);
            }
            if self.p(0.45) {
                let ys = self.shape(y);
                let r = if xs == ys && self.p(0.5) {
                    x
                } else if self.p(0.1) {
                    let t = self.sub_shape(&ys);
                    self.get(&t)
                } else {
                    self.get(&ys)
                };
                y = if self.p(0.5) {
                    self.bin(BinaryOp::Add, r, y)
                } else {
                    self.bin(BinaryOp::Add, y, r)
                };
            }
        }
        y
    }

    fn m_linear(&mut self) {
        let ok = |g: &Graph, v: &V| {
            let s = &g.ty(v.id).shape;
            s.rank() >= 2 && fixed_at(s, s.rank() - 1).is_some()
        };
        let x = match self.pick(ok).filter(|_| self.rng.random_bool(0.7)) {
            Some(x) => x,
            None => {
                let (t, inn) = (self.size(), self.int(1, 5));
                let s = if self.p(0.6) {
                    Shape::batched(&[t, inn])
                } else {
                    Shape::fixed(&[t, inn])
                };
                self.get(&s)
            }
        };
        let out = self.int(1, 5);
        self.linear(x, out, true, false);
    }

    /// Attention probabilities `softmax(c · q kᵀ)`, or with `ept` the EPT row:
    /// `slice(softmax(concat(R, c · q kᵀ)), L..L+M)` with `R` a broadcast prompt, a
    /// prompt scaled per row by the logits' range (multi-cat), or any tensor; mostly in
    /// the form the rules look for, sometimes a near miss.
    fn probabilities(&mut self, q: V, k: V, ept: bool) -> V {
        let qs = self.shape(q);
        let d = fixed_at(&qs, qs.rank() - 1).expect("fixed d");
        let s = self.matmul(q, k, false, true);
        let c = if self.p(0.7) {
            1.0 / (d as f32).sqrt()
        } else {
            self.rng.random_range(0.1f32..1.0)
        };
        let c_rank = if !known_bugs::SCALE_RANK {
            0
        } else {
            *[0, 0, 0, 0, 0, 0, 0, 0, 1, 3]
                .choose(&mut self.rng)
                .expect("ranks")
        };
        let c = self.scalar(c, c_rank);
        let s = if self.p(0.9) {
            self.bin(BinaryOp::Mul, s, c)
        } else {
            self.bin(BinaryOp::Mul, c, s)
        };
        let ss = self.shape(s);
        let r = ss.rank();
        let other_axis = |g: &mut Gen| g.int(0, r - 2);
        if !ept {
            let axis = if self.p(0.85) {
                r - 1
            } else {
                other_axis(self)
            };
            return self.softmax(s, axis);
        }
        let lead = ss.dims()[..r - 2].to_vec();
        let n = fixed_at(&ss, r - 2).expect("fixed N");
        let m = fixed_at(&ss, r - 1).expect("fixed M");
        let l = self.int(1, 3);
        let prompt = |g: &mut Gen, shape: &[usize]| {
            if g.p(0.8) {
                g.new_param(Shape::fixed(shape), true)
            } else {
                g.get(&Shape::fixed(shape))
            }
        };
        let rr = match self.int(0, 5) {
            0..=2 => {
                let p = if self.p(0.85) {
                    prompt(self, &[n, l])
                } else {
                    prompt(self, &[l])
                };
                self.broadcast(p, shape_of(&lead, &[n, l]))
            }
            3 | 4 => {
                let mx = self.reduce(ReduceOp::Max, s, &[r - 1], true);
                let mn = self.reduce(ReduceOp::Min, s, &[r - 1], true);
                let alpha = self.bin(BinaryOp::Sub, mx, mn);
                let p = prompt(self, &[n, l]);
                if self.p(0.7) {
                    self.bin(BinaryOp::Mul, alpha, p)
                } else {
                    self.bin(BinaryOp::Mul, p, alpha)
                }
            }
            _ => {
                let t = shape_of(&lead, &[n, l]);
                self.get(&t)
            }
        };
        let parts = if self.p(0.9) { [rr, s] } else { [s, rr] };
        let cat = self.concat(&parts, r - 1);
        let axis = if self.p(0.92) {
            r - 1
        } else {
            other_axis(self)
        };
        let sm = self.softmax(cat, axis);
        let (start, end) = if self.p(0.88) || (l == 1 && m == 1) {
            (l, l + m)
        } else if self.p(0.5) || m == 1 {
            (0, l)
        } else {
            (l, l + m - 1)
        };
        self.slice(sm, r - 1, start, end)
    }

    /// `probs · v`, with a fresh `v` if the token counts do not agree.
    fn apply(&mut self, probs: V, v: V) -> V {
        let (ps, mut vs) = (self.shape(probs), self.shape(v));
        let pm = ps.dims()[ps.rank() - 1];
        let vr = vs.rank();
        let v = if vs.dims()[vr - 2] == pm {
            v
        } else {
            vs.0[vr - 2] = pm;
            self.leaf(vs)
        };
        let m = v.mag();
        self.push_node(
            Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            &[probs, v],
            -m,
            m,
            true,
        )
    }

    /// Attention on random q, k, v whose leading dims broadcast (`[]`, `[H]`, `[B]`,
    /// `[B, H]`; q or v sometimes with fewer).
    fn m_attention(&mut self, ept: bool) {
        let h = self.int(1, 3);
        let lead: Vec<Dim> = match self.int(0, 4) {
            0 => vec![],
            1 => vec![Dim::Fixed(h)],
            2 => vec![Dim::Batch],
            _ => vec![Dim::Batch, Dim::Fixed(h)],
        };
        let suffix = |g: &mut Gen, p: f64| -> Vec<Dim> {
            if !lead.is_empty() && g.p(p) {
                let keep = g.int(0, lead.len() - 1);
                lead[lead.len() - keep..].to_vec()
            } else {
                lead.clone()
            }
        };
        let lq = suffix(
            self,
            if known_bugs::ATTENTION_AXIS {
                0.15
            } else {
                0.0
            },
        );
        let lk = suffix(self, 0.1);
        let lv = suffix(self, 0.15);
        let (n, m, d, e) = (
            self.int(1, 4),
            self.int(1, 4),
            self.int(1, 4),
            self.int(1, 4),
        );
        let q = self.get(&shape_of(&lq, &[n, d]));
        let q = self.tame(q, 2.0);
        let k = self.get(&shape_of(&lk, &[m, d]));
        let k = self.tame(k, 2.0);
        let v = self.get(&shape_of(&lv, &[m, e]));
        let probs = self.probabilities(q, k, ept);
        if self.p(0.9) {
            self.apply(probs, v);
        }
    }

    /// A multi-head attention block on `x [B?, T, D]`: maybe a pre-norm with frozen
    /// affine, q, k, v projections split into heads, either separate (Hugging Face:
    /// linear, reshape, permute) or fused (timm: one `[3D, D]` linear, reshape to
    /// `[B, T, 3, H, hd]`, permute, three slices), attention (maybe EPT), heads merged
    /// back (the inverse permute, reshape), an output projection, maybe a residual.
    fn m_mha(&mut self) {
        let (h, dh, t) = (self.int(1, 2), self.int(1, 3), self.int(2, 4));
        let d = h * dh;
        let lead: Vec<Dim> = if self.p(0.6) {
            vec![Dim::Batch]
        } else {
            vec![]
        };
        let x = self.get(&shape_of(&lead, &[t, d]));
        let x = self.tame(x, 2.0);
        let xn = if d >= 2 && self.p(0.5) {
            self.layernorm(x, true)
        } else {
            x
        };
        let (q, k, v) = if self.p(0.55) {
            self.qkv_fused(xn, &lead, t, h, dh)
        } else {
            self.qkv_split(xn, &lead, t, h, dh)
        };
        let ept = self.p(0.6);
        let probs = self.probabilities(q, k, ept);
        let o = self.apply(probs, v);
        let os = self.shape(o);
        let r = os.rank();
        let hh = fixed_at(&os, r - 3).expect("heads");
        let tt = fixed_at(&os, r - 2).expect("tokens");
        let ee = fixed_at(&os, r - 1).expect("features");
        let o = self.permute(o, &swap_tokens_and_heads(&lead));
        let o = self.reshape(o, shape_of(&lead, &[tt, hh * ee]));
        let y = self.linear(o, d, true, true);
        if self.shape(y) == self.shape(x) && self.p(0.5) {
            self.bin(BinaryOp::Add, x, y);
        }
    }

    /// Separate q, k, v projections of `x`, each split into heads `[B?, H, T, hd]`.
    fn qkv_split(&mut self, x: V, lead: &[Dim], t: usize, h: usize, dh: usize) -> (V, V, V) {
        let mut heads = Vec::new();
        for _ in 0..3 {
            let mut y = self.linear(x, h * dh, false, true);
            if known_bugs::SCALE_FOLD_THROUGH_GELU && self.p(0.15) {
                y = self.un(UnaryOp::Gelu, y);
            }
            let y = self.reshape(y, shape_of(lead, &[t, h, dh]));
            heads.push(self.permute(y, &swap_tokens_and_heads(lead)));
        }
        (heads[0], heads[1], heads[2])
    }

    /// One fused `[3D, D]` projection of `x`, reshaped to `[B?, T, 3, H, hd]`, permuted
    /// so the 3 leads, and sliced into q, k, v `[B?, H, T, hd]`.
    fn qkv_fused(&mut self, x: V, lead: &[Dim], t: usize, h: usize, dh: usize) -> (V, V, V) {
        let mut y = self.linear(x, 3 * h * dh, false, true);
        if known_bugs::SCALE_FOLD_THROUGH_GELU && self.p(0.15) {
            y = self.un(UnaryOp::Gelu, y);
        }
        let (t, h, dh) = if known_bugs::SCALE_FOLD_QKV_RESHAPE && self.p(0.2) {
            self.odd_split(t, h, dh)
        } else {
            (t, h, dh)
        };
        let y = self.reshape(y, shape_of(lead, &[t, 3, h, dh]));
        let perm = if lead.is_empty() {
            vec![1, 2, 0, 3]
        } else {
            vec![2, 0, 3, 1, 4]
        };
        let y = self.permute(y, &perm);
        let mut parts = Vec::new();
        for j in 0..3 {
            let s = self.slice(y, 0, j, j + 1);
            parts.push(self.reshape(s, shape_of(lead, &[h, t, dh])));
        }
        (parts[0], parts[1], parts[2])
    }

    /// Another `(tokens, heads, head dim)` with the product of `(t, h, dh)` and a token
    /// count other than `t`: a reshape that mixes tokens with features.
    fn odd_split(&mut self, t: usize, h: usize, dh: usize) -> (usize, usize, usize) {
        let n = t * h * dh;
        let mut options = Vec::new();
        for a in (1..=n).filter(|&a| n.is_multiple_of(a) && a != t) {
            for b in (1..=n / a).filter(|&b| (n / a).is_multiple_of(b)) {
                options.push((a, b, n / a / b));
            }
        }
        options.choose(&mut self.rng).copied().unwrap_or((t, h, dh))
    }

    /// Name outputs: every non-leaf value nobody uses, sometimes also a shared value, an
    /// alias of an output, or a leaf; drop what no output needs.
    fn finish(mut self) -> Graph {
        let mut outs: Vec<NodeId> = Vec::new();
        for v in &self.vals {
            let leaf = self.g.node(v.id).op.is_leaf();
            if !leaf && self.g.users(v.id).is_empty() && !outs.contains(&v.id) {
                outs.push(v.id);
            }
        }
        if self.p(0.3) {
            if let Some(v) =
                self.pick(|g, v| !g.node(v.id).op.is_leaf() && !g.users(v.id).is_empty())
            {
                outs.push(v.id);
            }
        }
        if self.p(0.1) {
            if let Some(&o) = outs.choose(&mut self.rng) {
                outs.push(o);
            }
        }
        if self.p(0.05) {
            if let Some(v) = self.pick(|g, v| g.node(v.id).op.is_leaf()) {
                outs.push(v.id);
            }
        }
        for (i, id) in outs.into_iter().enumerate() {
            self.g.set_output(&format!("y{i}"), id);
        }
        // Leaves drawn but left unused (a `v` never multiplied, ...) go: an unused
        // batched input would be the only thing binding `B` for the reference, and the
        // optimizer drops dead inputs.
        self.g.remove_dead();
        self.g
    }
}

/// `[B?, H, T, e] <-> [B?, T, H, e]`.
fn swap_tokens_and_heads(lead: &[Dim]) -> Vec<usize> {
    if lead.is_empty() {
        vec![1, 0, 2]
    } else {
        vec![0, 2, 1, 3]
    }
}

/// Graph shapes that exposed optimizer bugs, each pinned down by a regression test
/// below. All four bugs are fixed, so every flag is on; turn one off only to bisect a
/// regression.
mod known_bugs {
    /// q with fewer dims than the logits, so a softmax over a non-last axis can pass for
    /// the last (`attention_rule_checks_the_softmax_axis_of_the_logits`).
    pub const ATTENTION_AXIS: bool = true;
    /// A one-element scale of higher rank than the logits
    /// (`attention_rules_check_the_rank_of_the_scale`).
    pub const SCALE_RANK: bool = true;
    /// A GELU between a frozen q (or qkv) projection and the attention
    /// (`scale_fold_stops_at_an_activation`).
    pub const SCALE_FOLD_THROUGH_GELU: bool = true;
    /// A fused-qkv reshape that mixes tokens and features
    /// (`scale_fold_qkv_checks_the_reshape_splits_only_features`).
    pub const SCALE_FOLD_QKV_RESHAPE: bool = true;
}

/// A random graph of about 5 to 30 nodes.
fn generate(seed: u64) -> Graph {
    let mut g = Gen::new(seed);
    let target = g.int(5, 30);
    if target >= 15 && g.p(0.5) {
        g.m_mha();
    }
    while g.g.len() < target {
        let room = target - g.g.len();
        match g.int(0, 36) {
            0..=3 => g.m_attention(false),
            4..=7 => g.m_attention(true),
            8 if room >= 18 => g.m_mha(),
            8..=12 => g.m_linear(),
            13..=15 => g.m_reshapes(),
            16..=18 => g.m_permutes(),
            19..=21 => g.m_broadcast(),
            22..=24 => g.m_unary(),
            25..=27 => g.m_binary(),
            28..=29 => g.m_reduce(),
            30 => g.m_softmax(),
            31 => g.m_layernorm(),
            32..=33 => g.m_ln_linear(),
            34 => g.m_concat(),
            _ => g.m_slice(),
        }
    }
    g.finish()
}

// ---- running and comparing ----------------------------------------------------------

/// Random values in `[-1, 1]` for every input and param of `g`, by name.
fn random_values(g: &Graph, seed: u64) -> BTreeMap<String, HostTensor> {
    let mut leaves: Vec<(String, Vec<usize>)> = g
        .node_ids()
        .into_iter()
        .filter_map(|id| match &g.node(id).op {
            Op::Param { name, .. } | Op::Input { name } => {
                Some((name.clone(), g.ty(id).shape.resolve(BATCH)))
            }
            _ => None,
        })
        .collect();
    leaves.sort();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    leaves
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            (name, HostTensor::new(shape, data))
        })
        .collect()
}

/// Run `g` on the CPU backend with the named values.
fn run(
    g: &Graph,
    values: &BTreeMap<String, HostTensor>,
) -> Result<Vec<(String, HostTensor)>, String> {
    let mut w = WeightStore::new();
    let mut inputs = Vec::new();
    for id in g.node_ids() {
        match &g.node(id).op {
            Op::Param { name, .. } => w.insert(name.clone(), values[name].clone()),
            Op::Input { name } => inputs.push((name.as_str(), values[name].clone())),
            _ => {}
        }
    }
    let opts = CompileOptions {
        threads: Some(1),
        ..Default::default()
    };
    let mut exe = CpuBackend::new()
        .compile(g, &w, &opts)
        .map_err(|e| format!("cpu compile: {e}"))?;
    exe.run(&inputs).map_err(|e| format!("cpu run: {e}"))
}

/// `‖a − b‖ / ‖b‖ <= TOLERANCE` (NaN never passes).
fn close(a: &[f32], b: &[f32]) -> Result<(), String> {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if num.sqrt() <= TOLERANCE * den.sqrt() {
        Ok(())
    } else {
        Err(format!(
            "relative error {:e} (norm of the difference {:e}, of the reference {:e})",
            (num / den).sqrt(),
            num.sqrt(),
            den.sqrt()
        ))
    }
}

fn fused_count(g: &Graph) -> usize {
    g.node_ids()
        .into_iter()
        .filter(|&id| g.node(id).op.is_fused())
        .count()
}

fn print(g: &Graph) -> String {
    eptc_ir::text::print(g).unwrap_or_else(|e| format!("<unprintable: {e}>"))
}

/// Everything the property promises about one graph, for a backend with every op and
/// one without fused ops: `optimize` succeeds, the result verifies, keeps the outputs'
/// names and types, is printed the same when optimized again (determinism), and computes
/// the same outputs on the CPU backend (batch 2, random inputs and params, relative error
/// at most [`TOLERANCE`] per output). Then, as the pipeline does, its compile-time
/// constants are cut out (`fold::split_constants`): the graph left to run has no fused
/// op when the backend has none, and run with the folded weights the constants graph
/// computes, it gives the same outputs again. Returns the summary of the run with fused
/// ops.
fn check_graph(g: &Graph, seed: u64) -> Result<Summary, String> {
    eptc_ir::verify(g).map_err(|e| format!("generator: the graph does not verify: {e}"))?;
    let values = random_values(g, seed);
    let reference = run(g, &values).map_err(|e| format!("generator: reference: {e}"))?;
    for (name, t) in &reference {
        if !t.data().iter().all(|x| x.is_finite()) {
            return Err(format!("generator: reference output {name} is not finite"));
        }
    }
    let fused = Op::fused_kinds();
    let all = |_: &str| true;
    let primitive = |k: &str| !fused.contains(&k);
    let limits = Limits::default();
    let mut first = None;
    for (label, supports) in [
        ("all ops", &all as &dyn Fn(&str) -> bool),
        ("no fused ops", &primitive),
    ] {
        let fail = |what: String, o: Option<&Graph>| {
            let o = o.map(|o| format!("\noptimized:\n{}", print(o)));
            format!("{label}: {what}{}", o.unwrap_or_default())
        };
        // A backend without fused ops gets the input's own fused ops decomposed first
        // (the optimizer extracts only what the backend runs, and no rule decomposes).
        let mut input = g.clone();
        eptc_ir::lower_unsupported(&mut input, supports)
            .map_err(|e| fail(format!("lower_unsupported: {e}"), None))?;
        let g = &input;
        let (o, summary) =
            optimize(g, supports, &limits).map_err(|e| fail(format!("optimize: {e}"), None))?;
        eptc_ir::verify(&o).map_err(|e| fail(format!("does not verify: {e}"), Some(&o)))?;
        let sig = |g: &Graph| -> Vec<(String, TensorType)> {
            g.outputs()
                .iter()
                .map(|(n, id)| (n.clone(), g.ty(*id).clone()))
                .collect()
        };
        if sig(&o) != sig(g) {
            return Err(fail(
                format!("outputs {:?} became {:?}", sig(g), sig(&o)),
                Some(&o),
            ));
        }
        // What the backend runs: the graph with its compile-time constants (frozen
        // weights only) cut out, which the CPU computes once (`fold`).
        let folded = fold::split_constants(&o)
            .map_err(|e| fail(format!("split_constants: {e}"), Some(&o)))?;
        if label == "no fused ops" && fused_count(&folded.graph) > 0 {
            return Err(fail(
                "the graph to run has a fused op".into(),
                Some(&folded.graph),
            ));
        }
        let (o2, _) = optimize(g, supports, &limits)
            .map_err(|e| fail(format!("second optimize: {e}"), None))?;
        if print(&o2) != print(&o) {
            return Err(fail(
                format!("not deterministic; the second run gave\n{}", print(&o2)),
                Some(&o),
            ));
        }
        let got = run(&o, &values).map_err(|e| fail(e, Some(&o)))?;
        for ((name, want), (got_name, t)) in reference.iter().zip(&got) {
            if name != got_name || want.shape != t.shape {
                return Err(fail(
                    format!(
                        "output {name} {:?} came back as {got_name} {:?}",
                        want.shape, t.shape
                    ),
                    Some(&o),
                ));
            }
            close(t.data(), want.data())
                .map_err(|e| fail(format!("output {name}: {e}"), Some(&o)))?;
        }
        let mut with_folded = values.clone();
        let constants = run(&folded.constants, &values)
            .map_err(|e| fail(format!("constants: {e}"), Some(&folded.constants)))?;
        with_folded.extend(constants);
        let got = run(&folded.graph, &with_folded).map_err(|e| fail(e, Some(&folded.graph)))?;
        for ((name, want), (_, t)) in reference.iter().zip(&got) {
            close(t.data(), want.data()).map_err(|e| {
                fail(
                    format!("output {name} with folded constants: {e}"),
                    Some(&folded.graph),
                )
            })?;
        }
        first.get_or_insert(summary);
    }
    Ok(first.expect("two runs"))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "<non-string panic>".into())
}

#[test]
fn optimization_preserves_random_graphs() {
    let names: Vec<String> = rules::rules().iter().map(|r| r.name.to_string()).collect();
    // Applications per rule over all graphs, and the number of graphs each fired on.
    let mut fired: BTreeMap<String, (usize, usize)> =
        names.iter().map(|n| (n.clone(), (0, 0))).collect();
    let (mut nodes, mut changed, mut fused) = (0, 0, 0);
    let mut failures = Vec::new();
    let seeds = seeds();
    for seed in 0..seeds {
        let g = generate(seed);
        nodes += g.len();
        match catch_unwind(AssertUnwindSafe(|| check_graph(&g, seed))) {
            Ok(Ok(s)) => {
                for (rule, &n) in &s.rules_fired {
                    let e = fired.entry(rule.clone()).or_default();
                    e.0 += n;
                    e.1 += usize::from(n > 0);
                }
                changed += usize::from(s.rules_fired.values().any(|&n| n > 0));
                fused += usize::from(s.attention_fused + s.linear_fused > 0);
            }
            Ok(Err(msg)) => failures.push(format!("seed {seed}: {msg}\ngraph:\n{}", print(&g))),
            Err(p) => failures.push(format!(
                "seed {seed}: panicked: {}\ngraph:\n{}",
                panic_message(p.as_ref()),
                print(&g)
            )),
        }
    }
    println!(
        "{seeds} graphs, {:.1} nodes on average; rules fired on {changed}, fused ops extracted on {fused}",
        nodes as f64 / seeds as f64
    );
    println!("{:<32} {:>8} {:>8}", "rule", "applied", "graphs");
    for (rule, (n, graphs)) in &fired {
        println!("{rule:<32} {n:>8} {graphs:>8}");
    }
    for f in &failures {
        println!("FAILED {}", f.lines().next().unwrap_or_default());
    }
    assert!(
        failures.is_empty(),
        "{} of {seeds} graphs failed; the first:\n{}",
        failures.len(),
        failures[0]
    );
    let idle: Vec<&String> = names.iter().filter(|n| fired[*n].0 == 0).collect();
    assert!(idle.is_empty(), "rules that never fired: {idle:?}");
}

#[test]
fn the_generator_is_deterministic() {
    for seed in [0, 7, 123] {
        assert_eq!(print(&generate(seed)), print(&generate(seed)));
    }
}

// ---- regression tests: minimal graphs on which the optimizer broke -------------------

/// Panics with the failure and the graph unless `check_graph` passes.
fn assert_preserved(g: &Graph) {
    eptc_ir::verify(g).expect("the test graph verifies");
    if let Err(e) = check_graph(g, 0) {
        panic!("{e}\ngraph:\n{}", print(g));
    }
}

fn f32_input(g: &mut Graph, name: &str, shape: Shape) -> NodeId {
    g.input(name, TensorType::f32(shape))
}

fn frozen(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.param(
        name,
        false,
        Init::Checkpoint,
        TensorType::f32(Shape::fixed(shape)),
    )
}

/// `attention` checks the softmax axis against `q`'s rank, not the logits': with `q`
/// `[3, 2]` and `k` `[2, 4, 2]` the logits are `[2, 3, 4]`, and a softmax over axis 1
/// (the queries, `rank(q) - 1`) is fused as if it were over the keys.
#[test]
fn attention_rule_checks_the_softmax_axis_of_the_logits() {
    let mut g = Graph::new("t");
    let q = f32_input(&mut g, "q", Shape::fixed(&[3, 2]));
    let k = f32_input(&mut g, "k", Shape::fixed(&[2, 4, 2]));
    let v = f32_input(&mut g, "v", Shape::fixed(&[2, 4, 2]));
    let s = g.matmul(q, k, false, true).unwrap();
    let c = g.scalar(0.5);
    let s = g.binary(BinaryOp::Mul, s, c).unwrap();
    let p = g.softmax(s, 1).unwrap();
    let o = g.matmul(p, v, false, false).unwrap();
    g.set_output("o", o);
    assert_preserved(&g);
}

/// The scale is read by `scalar_const`, which takes any one-element constant: a `[1, 1, 1]`
/// scale lifts the `[3, 4]` logits to `[1, 3, 4]`, but the fused attention keeps the
/// rank of q, k, v (`[3, 2]`, not `[1, 3, 2]`), so the merge joins values of different
/// types and `optimize` fails. (The `scale-fold-*-scores` rules read the scale the
/// same way.)
#[test]
fn attention_rules_check_the_rank_of_the_scale() {
    let mut g = Graph::new("t");
    let q = f32_input(&mut g, "q", Shape::fixed(&[3, 2]));
    let k = f32_input(&mut g, "k", Shape::fixed(&[4, 2]));
    let v = f32_input(&mut g, "v", Shape::fixed(&[4, 2]));
    let s = g.matmul(q, k, false, true).unwrap();
    let c = g.constant(vec![0.5], &[1, 1, 1]).unwrap();
    let s = g.binary(BinaryOp::Mul, s, c).unwrap();
    let p = frozen(&mut g, "prompt", &[3, 2]);
    let r = g.broadcast(p, Shape::fixed(&[1, 3, 2])).unwrap();
    let cat = g.concat(&[r, s], 2).unwrap();
    let sm = g.softmax(cat, 2).unwrap();
    let a = g.slice(sm, 2, 2, 6).unwrap();
    let o = g.matmul(a, v, false, false).unwrap();
    g.set_output("o", o);
    assert_preserved(&g);
}

/// `scale-fold-q` (and `-sink`, `-scores`, and the `qkv` ones) match the projection's
/// linear with any `?spec`, GELU included, and scale its W and b:
/// `c · gelu(x Wᵀ + b) != gelu(x (c W)ᵀ + c b)`.
#[test]
fn scale_fold_stops_at_an_activation() {
    let mut g = Graph::new("t");
    let x = f32_input(&mut g, "x", Shape::batched(&[2, 2]));
    let w = frozen(&mut g, "wq", &[2, 2]);
    let b = frozen(&mut g, "bq", &[2]);
    let y = g.matmul(x, w, false, true).unwrap();
    let y = g.binary(BinaryOp::Add, y, b).unwrap();
    let y = g.unary(UnaryOp::Gelu, y).unwrap();
    let y = g.reshape(y, Shape::batched(&[2, 1, 2])).unwrap();
    let q = g.permute(y, &[0, 2, 1, 3]).unwrap();
    let k = f32_input(&mut g, "k", Shape::batched(&[1, 2, 2]));
    let v = f32_input(&mut g, "v", Shape::batched(&[1, 2, 2]));
    let s = g.matmul(q, k, false, true).unwrap();
    let c = g.scalar(0.25);
    let s = g.binary(BinaryOp::Mul, s, c).unwrap();
    let p = g.softmax(s, 3).unwrap();
    let o = g.matmul(p, v, false, false).unwrap();
    g.set_output("o", o);
    assert_preserved(&g);
}

/// `scale-fold-qkv` checks that the reshape gives 5 dims with a 3 in the middle, not
/// that it splits only the feature axis: `[B, 2, 6] -> [B, 4, 3, 1, 1]` interleaves
/// features into tokens, so "q" (index 0 of the 3) is features 0 and 3 of each token and
/// "k" features 1 and 4, not the first and second thirds of W's rows: scaling rows 0..2
/// scales some logits by `c²` and others not at all.
#[test]
fn scale_fold_qkv_checks_the_reshape_splits_only_features() {
    let mut g = Graph::new("t");
    let x = f32_input(&mut g, "x", Shape::batched(&[2, 2]));
    let w = frozen(&mut g, "wqkv", &[6, 2]);
    let b = frozen(&mut g, "bqkv", &[6]);
    let y = g.matmul(x, w, false, true).unwrap();
    let y = g.binary(BinaryOp::Add, y, b).unwrap();
    let y = g.reshape(y, Shape::batched(&[4, 3, 1, 1])).unwrap();
    let t = g.permute(y, &[2, 0, 3, 1, 4]).unwrap();
    let mut qkv = Vec::new();
    for j in 0..3 {
        let part = g.slice(t, 0, j, j + 1).unwrap();
        qkv.push(g.reshape(part, Shape::batched(&[1, 4, 1])).unwrap());
    }
    let s = g.matmul(qkv[0], qkv[1], false, true).unwrap();
    let c = g.scalar(0.5);
    let s = g.binary(BinaryOp::Mul, s, c).unwrap();
    let p = g.softmax(s, 3).unwrap();
    let o = g.matmul(p, qkv[2], false, false).unwrap();
    g.set_output("o", o);
    assert_preserved(&g);
}
