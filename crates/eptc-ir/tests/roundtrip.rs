//! Property test of the text format: random well-typed graphs using every op kind print,
//! parse and print back identically, and the parsed graph is the same graph.

use std::collections::BTreeSet;

use eptc_ir::text::{parse, print};
use eptc_ir::{
    lower_unsupported, verify, Activation, AttnWrt, BinaryOp, DType, Dim, Graph, Init, NodeId, Op,
    ReduceOp, Shape, TensorType, UnaryOp,
};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

const SEEDS: u64 = 300;
const MAX_RANK: usize = 5;

/// Floats that are easy to print wrong.
const AWKWARD: [f32; 20] = [
    0.0,
    -0.0,
    1e-6,
    0.1,
    -0.1,
    1.0,
    0.35355338,
    1.0 / 3.0,
    3.4028235e38,
    -3.4028235e38,
    f32::MIN_POSITIVE,
    1e-45,
    -1e-45,
    1.1754942e-38,
    f32::EPSILON,
    16777216.0,
    1e16,
    123456.79,
    f32::INFINITY,
    f32::NEG_INFINITY,
];

/// Pieces of names: quotes, backslashes, escapes, unicode, format punctuation.
const NAME_PARTS: [&str; 22] = [
    "x",
    "w",
    "blocks.0.attn",
    "\"",
    "\\",
    "\\n",
    "\n",
    "\t",
    " ",
    "é",
    "日本",
    "🦀",
    "#",
    "%1",
    "=",
    ":",
    "@ept",
    "[B,4]",
    ",",
    "\r",
    "output",
    "\u{200b}",
];

const TAG_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-+";

struct Gen {
    rng: StdRng,
    g: Graph,
    dtype: DType,
    pool: Vec<NodeId>,
    names: usize,
}

impl Gen {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let dtype = *DType::ALL.choose(&mut rng).unwrap();
        let mut gen = Gen {
            rng,
            g: Graph::new(""),
            dtype,
            pool: Vec::new(),
            names: 0,
        };
        gen.g.name = gen.name();
        gen
    }

    fn name(&mut self) -> String {
        let mut s = String::new();
        for _ in 0..self.rng.random_range(0..5) {
            s.push_str(NAME_PARTS.choose(&mut self.rng).unwrap());
        }
        // Unique, so inputs and params never clash.
        self.names += 1;
        if self.rng.random_bool(0.8) {
            s.push_str(&format!("#{}", self.names));
        } else {
            s = format!("{}{s}", self.names);
        }
        s
    }

    fn float(&mut self) -> f32 {
        match self.rng.random_range(0..4) {
            0 => {
                // Any bit pattern; NaN is printed as "NaN" and read back as the canonical
                // NaN, so canonicalise it here.
                let v = f32::from_bits(self.rng.random());
                if v.is_nan() {
                    f32::NAN
                } else {
                    v
                }
            }
            1 => self.rng.random_range(-10.0..10.0),
            2 if self.rng.random_bool(0.1) => f32::NAN,
            _ => *AWKWARD.choose(&mut self.rng).unwrap(),
        }
    }

    fn eps(&mut self) -> f32 {
        loop {
            let v = self.float().abs();
            let v = if self.rng.random_bool(0.1) { -0.0 } else { v };
            if v.is_finite() {
                return v;
            }
        }
    }

    /// Any finite float (attention scales).
    fn finite(&mut self) -> f32 {
        loop {
            let v = self.float();
            if v.is_finite() {
                return v;
            }
        }
    }

    /// `d` as an operand broadcasting to it: a suffix of it, some dims set to 1.
    fn broadcastable(&mut self, d: &[Dim]) -> Vec<Dim> {
        let keep = self.rng.random_range(0..=d.len());
        d[d.len() - keep..]
            .iter()
            .map(|&x| {
                if self.rng.random_bool(0.3) {
                    Dim::Fixed(1)
                } else {
                    x
                }
            })
            .collect()
    }

    fn set_random_tag(&mut self) {
        if self.rng.random_bool(0.6) {
            self.g.set_tag(None);
        } else {
            let n = self.rng.random_range(1..10);
            let t: String = (0..n)
                .map(|_| *TAG_CHARS.choose(&mut self.rng).unwrap() as char)
                .collect();
            self.g.set_tag(Some(&t));
        }
    }

    fn dim(&mut self) -> usize {
        self.rng.random_range(1..=5)
    }

    /// A random shape; the batch appears (anywhere) when `batch` allows it.
    fn shape(&mut self, rank: usize, batch: bool) -> Vec<Dim> {
        let mut v: Vec<Dim> = (0..rank).map(|_| Dim::Fixed(self.dim())).collect();
        if batch && rank > 0 && self.rng.random_bool(0.5) {
            let i = if self.rng.random_bool(0.7) {
                0
            } else {
                self.rng.random_range(0..rank)
            };
            v[i] = Dim::Batch;
        }
        v
    }

    fn init(&mut self) -> Init {
        match self.rng.random_range(0..7) {
            0 => Init::Checkpoint,
            1 => Init::Zeros,
            2 => Init::Ones,
            3 => Init::Normal(self.float()),
            4 => Init::Uniform(self.float()),
            5 => Init::Kaiming,
            _ => Init::Token,
        }
    }

    /// A new leaf of this shape: an input when it has the batch, else an input, a param or
    /// (when small) a const.
    fn leaf(&mut self, dims: Vec<Dim>) -> NodeId {
        self.set_random_tag();
        let shape = Shape(dims);
        let ty = TensorType::new(self.dtype, shape.clone());
        let id = match (shape.as_fixed(), self.rng.random_range(0..3)) {
            (None, _) | (Some(_), 0) => {
                let n = self.name();
                self.g.input(&n, ty)
            }
            (Some(f), 1) if f.iter().product::<usize>() <= 64 => {
                let n: usize = f.iter().product();
                let values = (0..n).map(|_| self.float()).collect();
                self.g.add_typed(Op::Const { values }, &[], ty).unwrap()
            }
            _ => {
                let n = self.name();
                let trainable = self.rng.random_bool(0.5);
                let init = self.init();
                self.g.param(&n, trainable, init, ty)
            }
        };
        self.pool.push(id);
        id
    }

    fn dims(&self, id: NodeId) -> Vec<Dim> {
        self.g.ty(id).shape.0.clone()
    }

    /// A node of the pool satisfying `ok`, or a new leaf of a random shape that does.
    fn pick(
        &mut self,
        ok: impl Fn(&[Dim]) -> bool,
        fresh: impl Fn(&mut Self) -> Vec<Dim>,
    ) -> NodeId {
        let fits: Vec<NodeId> = self
            .pool
            .iter()
            .copied()
            .filter(|&id| ok(&self.g.ty(id).shape.0))
            .collect();
        if !fits.is_empty() && self.rng.random_bool(0.75) {
            return *fits.choose(&mut self.rng).unwrap();
        }
        let d = fresh(self);
        assert!(ok(&d), "fresh shape {d:?} does not fit");
        self.leaf(d)
    }

    fn any(&mut self) -> NodeId {
        self.pick(
            |d| d.len() <= MAX_RANK,
            |s| {
                let r = s.rng.random_range(0..=3);
                s.shape(r, true)
            },
        )
    }

    fn add(&mut self, op: Op, operands: &[NodeId]) -> NodeId {
        self.set_random_tag();
        let id = self
            .g
            .add(op.clone(), operands)
            .unwrap_or_else(|e| panic!("generator bug: {op:?}: {e}"));
        self.pool.push(id);
        id
    }

    /// One node of kind `kind`, with operands and attributes that satisfy its rule.
    fn op(&mut self, kind: &str) -> NodeId {
        if let Some(&b) = BinaryOp::ALL.iter().find(|b| b.name() == kind) {
            return self.binary(b);
        }
        if let Some(&u) = UnaryOp::ALL.iter().find(|u| u.name() == kind) {
            let x = self.any();
            return self.add(Op::Unary(u), &[x]);
        }
        if let Some(&r) = ReduceOp::ALL.iter().find(|r| r.name() == kind) {
            let x = self.pick(
                |d| !d.is_empty(),
                |s| {
                    let r = s.rng.random_range(1..=4);
                    s.shape(r, true)
                },
            );
            let rank = self.g.ty(x).rank();
            let mut axes: Vec<usize> = (0..rank).collect();
            axes.shuffle(&mut self.rng);
            axes.truncate(self.rng.random_range(1..=rank));
            let keepdim = self.rng.random_bool(0.5);
            return self.add(
                Op::Reduce {
                    op: r,
                    axes,
                    keepdim,
                },
                &[x],
            );
        }
        match kind {
            "input" => {
                let r = self.rng.random_range(0..=4);
                let d = self.shape(r, true);
                self.set_random_tag();
                let n = self.name();
                let id = self.g.input(&n, TensorType::new(self.dtype, Shape(d)));
                self.pool.push(id);
                id
            }
            "param" => {
                let r = self.rng.random_range(0..=3);
                let d = self.shape(r, false);
                self.set_random_tag();
                let (n, t, i) = (self.name(), self.rng.random_bool(0.5), self.init());
                let id = self
                    .g
                    .param(&n, t, i, TensorType::new(self.dtype, Shape(d)));
                self.pool.push(id);
                id
            }
            "const" => {
                let r = self.rng.random_range(0..=3);
                let d = self.shape(r, false);
                let n: usize = d.iter().map(|d| d.fixed().unwrap()).product();
                let values = (0..n).map(|_| self.float()).collect();
                self.set_random_tag();
                let ty = TensorType::new(self.dtype, Shape(d));
                let id = self.g.add_typed(Op::Const { values }, &[], ty).unwrap();
                self.pool.push(id);
                id
            }
            "patchify" => {
                let p = self.rng.random_range(1..=3);
                let x = self.pick(
                    |d| {
                        d.len() == 4
                            && d[1..].iter().all(|x| x.fixed().is_some())
                            && d[2].fixed().unwrap() % p == 0
                            && d[3].fixed().unwrap() % p == 0
                    },
                    |s| {
                        let n = if s.rng.random_bool(0.7) {
                            Dim::Batch
                        } else {
                            Dim::Fixed(s.dim())
                        };
                        let c = s.rng.random_range(1..=3);
                        let h = p * s.rng.random_range(1..=3);
                        let w = p * s.rng.random_range(1..=3);
                        vec![n, Dim::Fixed(c), Dim::Fixed(h), Dim::Fixed(w)]
                    },
                );
                self.add(Op::Patchify { patch: p }, &[x])
            }
            "matmul" => {
                let a = self.pick(
                    |d| (2..=MAX_RANK).contains(&d.len()),
                    |s| {
                        let r = s.rng.random_range(2..=4);
                        s.shape(r, true)
                    },
                );
                let da = self.dims(a);
                let ra = da.len();
                let (ta, tb) = (self.rng.random_bool(0.5), self.rng.random_bool(0.5));
                let k = if ta { da[ra - 2] } else { da[ra - 1] };
                let n = if self.rng.random_bool(0.1) {
                    Dim::Batch
                } else {
                    Dim::Fixed(self.dim())
                };
                // b's leading axes: a suffix of a's, some set to 1, maybe one more axis.
                let lead = &da[..ra - 2];
                let keep = self.rng.random_range(0..=lead.len());
                let mut bl: Vec<Dim> = lead[lead.len() - keep..]
                    .iter()
                    .map(|&d| {
                        if self.rng.random_bool(0.3) {
                            Dim::Fixed(1)
                        } else {
                            d
                        }
                    })
                    .collect();
                if keep == lead.len() && ra < MAX_RANK && self.rng.random_bool(0.2) {
                    bl.insert(0, Dim::Fixed(self.dim()));
                }
                bl.extend(if tb { [n, k] } else { [k, n] });
                let b = self.leaf(bl);
                self.add(
                    Op::MatMul {
                        transpose_a: ta,
                        transpose_b: tb,
                    },
                    &[a, b],
                )
            }
            "softmax" => {
                let x = self.pick(
                    |d| !d.is_empty(),
                    |s| {
                        let r = s.rng.random_range(1..=4);
                        s.shape(r, true)
                    },
                );
                let axis = self.rng.random_range(0..self.g.ty(x).rank());
                self.add(Op::Softmax { axis }, &[x])
            }
            "layernorm" => {
                let x = self.pick(
                    |d| d.last().is_some_and(|l| l.fixed().is_some()),
                    |s| {
                        let r = s.rng.random_range(0..=3);
                        let mut d = s.shape(r, true);
                        d.push(Dim::Fixed(s.dim()));
                        d
                    },
                );
                let d = *self.dims(x).last().unwrap();
                let gamma = self.leaf(vec![d]);
                let beta = if self.rng.random_bool(0.2) {
                    gamma
                } else {
                    self.leaf(vec![d])
                };
                let eps = self.eps();
                self.add(Op::LayerNorm { eps }, &[x, gamma, beta])
            }
            "reshape" => {
                let x = self.any();
                let (p, mut n) = self.g.ty(x).shape.symbolic_numel();
                let mut d = Vec::new();
                while n > 1 && d.len() + p < MAX_RANK - 1 && self.rng.random_bool(0.7) {
                    let divs: Vec<usize> = (2..=n).filter(|k| n % k == 0).collect();
                    let k = *divs.choose(&mut self.rng).unwrap();
                    d.push(Dim::Fixed(k));
                    n /= k;
                }
                if n > 1 || self.rng.random_bool(0.3) {
                    d.push(Dim::Fixed(n));
                }
                for _ in 0..p {
                    let i = self.rng.random_range(0..=d.len());
                    d.insert(i, Dim::Batch);
                }
                d.shuffle(&mut self.rng);
                self.add(Op::Reshape { shape: Shape(d) }, &[x])
            }
            "permute" => {
                let x = self.any();
                let mut perm: Vec<usize> = (0..self.g.ty(x).rank()).collect();
                perm.shuffle(&mut self.rng);
                self.add(Op::Permute { perm }, &[x])
            }
            "concat" => {
                let x = self.pick(
                    |d| d.iter().any(|d| d.fixed().is_some()),
                    |s| {
                        let r = s.rng.random_range(1..=4);
                        let mut d = s.shape(r, true);
                        if d.iter().all(|d| d.fixed().is_none()) {
                            d.push(Dim::Fixed(2));
                        }
                        d
                    },
                );
                let dx = self.dims(x);
                let axes: Vec<usize> = (0..dx.len()).filter(|&i| dx[i].fixed().is_some()).collect();
                let axis = *axes.choose(&mut self.rng).unwrap();
                let mut parts = vec![x];
                for _ in 0..self.rng.random_range(1..=3) {
                    if self.rng.random_bool(0.3) {
                        parts.push(x);
                    } else {
                        let mut d = dx.clone();
                        d[axis] = Dim::Fixed(self.dim());
                        parts.push(self.leaf(d));
                    }
                }
                parts.shuffle(&mut self.rng);
                self.add(Op::Concat { axis }, &parts)
            }
            "slice" => {
                let x = self.pick(
                    |d| d.iter().any(|d| d.fixed().is_some()),
                    |s| {
                        let r = s.rng.random_range(1..=4);
                        let mut d = s.shape(r, true);
                        d.push(Dim::Fixed(s.dim()));
                        d
                    },
                );
                let dx = self.dims(x);
                let axes: Vec<usize> = (0..dx.len()).filter(|&i| dx[i].fixed().is_some()).collect();
                let axis = *axes.choose(&mut self.rng).unwrap();
                let n = dx[axis].fixed().unwrap();
                let start = self.rng.random_range(0..n);
                let end = self.rng.random_range(start + 1..=n);
                self.add(Op::Slice { axis, start, end }, &[x])
            }
            "broadcast" => {
                let x = self.any();
                let mut d: Vec<Dim> = self
                    .dims(x)
                    .into_iter()
                    .map(|d| match (d, self.rng.random_range(0..4)) {
                        (Dim::Fixed(1), 0) => Dim::Batch,
                        (Dim::Fixed(1), 1) => Dim::Fixed(self.dim()),
                        (d, _) => d,
                    })
                    .collect();
                while d.len() < MAX_RANK && self.rng.random_bool(0.4) {
                    let lead = if self.rng.random_bool(0.3) {
                        Dim::Batch
                    } else {
                        Dim::Fixed(self.dim())
                    };
                    d.insert(0, lead);
                }
                self.add(Op::Broadcast { shape: Shape(d) }, &[x])
            }
            "softmax_sink" => {
                let s = self.pick(
                    |d| !d.is_empty() && d.len() <= MAX_RANK,
                    |s| {
                        let r = s.rng.random_range(1..=4);
                        s.shape(r, true)
                    },
                );
                let mut rows = self.dims(s);
                *rows.last_mut().unwrap() = Dim::Fixed(1);
                let zd = self.broadcastable(&rows);
                let z = self.leaf(zd);
                self.add(Op::SoftmaxSink, &[s, z])
            }
            "attention" => {
                let q = self.pick(
                    |d| (2..=MAX_RANK).contains(&d.len()),
                    |s| {
                        let r = s.rng.random_range(2..=4);
                        s.shape(r, true)
                    },
                );
                let dq = self.dims(q);
                let r = dq.len();
                let (lead, n, d) = (dq[..r - 2].to_vec(), dq[r - 2], dq[r - 1]);
                let m = Dim::Fixed(self.dim());
                let e = Dim::Fixed(self.dim());
                let mut kd = self.broadcastable(&lead);
                kd.extend([m, d]);
                let mut vd = self.broadcastable(&lead);
                vd.extend([m, e]);
                let (k, v) = (self.leaf(kd), self.leaf(vd));
                let sink = self.rng.random_bool(0.6);
                let mut ops = vec![q, k, v];
                if sink {
                    let mut rows = lead.clone();
                    rows.extend([n, Dim::Fixed(1)]);
                    let zd = self.broadcastable(&rows);
                    ops.push(self.leaf(zd));
                }
                let scale = self.finite();
                self.add(Op::Attention { scale, sink }, &ops)
            }
            "linear" => {
                let x = self.pick(
                    |d| !d.is_empty() && d.len() <= MAX_RANK,
                    |s| {
                        let r = s.rng.random_range(1..=4);
                        s.shape(r, true)
                    },
                );
                let mut out = self.dims(x);
                let k = *out.last().unwrap();
                let o = Dim::Fixed(self.dim());
                *out.last_mut().unwrap() = o;
                let w = self.leaf(vec![o, k]);
                let mut ops = vec![x, w];
                let bias = self.rng.random_bool(0.5);
                if bias {
                    ops.push(self.leaf(vec![o]));
                }
                let residual = self.rng.random_bool(0.5);
                if residual {
                    ops.push(self.leaf(out));
                }
                let activation = *Activation::ALL.choose(&mut self.rng).unwrap();
                self.add(
                    Op::Linear {
                        bias,
                        activation,
                        residual,
                    },
                    &ops,
                )
            }
            "layernorm_grad" => {
                let x = self.pick(
                    |d| d.last().is_some_and(|l| l.fixed().is_some()),
                    |s| {
                        let r = s.rng.random_range(0..=3);
                        let mut d = s.shape(r, true);
                        d.push(Dim::Fixed(s.dim()));
                        d
                    },
                );
                let dx = self.dims(x);
                let d = *dx.last().unwrap();
                let gamma = self.leaf(vec![d]);
                let dy = self.leaf(dx);
                let eps = self.rng.random_range(0.0..1e-3);
                self.add(Op::LayerNormGrad { eps }, &[x, gamma, dy])
            }
            "attention_lse" | "attention_grad" => {
                let q = self.pick(
                    |d| (2..=MAX_RANK).contains(&d.len()),
                    |s| {
                        let r = s.rng.random_range(2..=4);
                        s.shape(r, true)
                    },
                );
                let dq = self.dims(q);
                let r = dq.len();
                let (lead, n, d) = (dq[..r - 2].to_vec(), dq[r - 2], dq[r - 1]);
                let m = Dim::Fixed(self.dim());
                let mut kd = self.broadcastable(&lead);
                kd.extend([m, d]);
                let k = self.leaf(kd);
                let scale = self.finite();
                if kind == "attention_lse" {
                    let sink = self.rng.random_bool(0.6);
                    let mut ops = vec![q, k];
                    if sink {
                        let mut rows = lead.clone();
                        rows.extend([n, Dim::Fixed(1)]);
                        let zd = self.broadcastable(&rows);
                        ops.push(self.leaf(zd));
                    }
                    return self.add(Op::AttentionLse { scale, sink }, &ops);
                }
                let e = Dim::Fixed(self.dim());
                let with = |s: &mut Self, a: Dim, b: Dim| {
                    let mut v = s.broadcastable(&lead);
                    v.extend([a, b]);
                    v
                };
                let vd = with(self, m, e);
                let ld = with(self, n, Dim::Fixed(1));
                let dd = with(self, n, Dim::Fixed(1));
                let od = with(self, n, e);
                let ops = vec![
                    q,
                    k,
                    self.leaf(vd),
                    self.leaf(ld),
                    self.leaf(dd),
                    self.leaf(od),
                ];
                let wrt = *AttnWrt::ALL.choose(&mut self.rng).unwrap();
                self.add(Op::AttentionGrad { scale, wrt }, &ops)
            }
            k => panic!("the generator does not know op {k:?}: teach it"),
        }
    }

    fn binary(&mut self, op: BinaryOp) -> NodeId {
        let a = self.any();
        let da = self.dims(a);
        let b = if self.rng.random_bool(0.2) {
            a
        } else {
            let keep = self.rng.random_range(0..=da.len());
            let mut d: Vec<Dim> = da[da.len() - keep..]
                .iter()
                .map(|&d| {
                    if self.rng.random_bool(0.3) {
                        Dim::Fixed(1)
                    } else {
                        d
                    }
                })
                .collect();
            if keep == da.len() && da.len() < MAX_RANK && self.rng.random_bool(0.2) {
                d.insert(0, Dim::Fixed(self.dim()));
            }
            self.leaf(d)
        };
        if self.rng.random_bool(0.5) {
            self.add(Op::Binary(op), &[a, b])
        } else {
            self.add(Op::Binary(op), &[b, a])
        }
    }

    /// Insert a same-typed unary node between a random node and one of its operands, so
    /// that index order and topological order differ.
    fn rewire(&mut self) {
        let users: Vec<NodeId> = self
            .pool
            .iter()
            .copied()
            .filter(|&id| !self.g.operands(id).is_empty())
            .collect();
        if let Some(&u) = users.choose(&mut self.rng) {
            let ops = self.g.operands(u);
            let pos = self.rng.random_range(0..ops.len());
            let f = *UnaryOp::ALL.choose(&mut self.rng).unwrap();
            let n = self.add(Op::Unary(f), &[ops[pos]]);
            self.g.set_operand(u, pos, n);
        }
    }

    fn build(mut self) -> Graph {
        let mut kinds = Op::all_kinds();
        for _ in 0..self.rng.random_range(0..20) {
            let k = *Op::all_kinds().choose(&mut self.rng).unwrap();
            kinds.push(k);
        }
        kinds.shuffle(&mut self.rng);
        for k in kinds {
            self.op(k);
            if self.rng.random_bool(0.05) {
                self.rewire();
            }
        }
        for _ in 0..self.rng.random_range(1..=4) {
            let id = *self.pool.choose(&mut self.rng).unwrap();
            let n = self.name();
            self.g.set_output(&n, id);
        }
        if self.rng.random_bool(0.3) {
            self.g.remove_dead();
        }
        self.g.set_tag(None);
        self.g
    }
}

fn same_init(a: &Init, b: &Init) -> bool {
    match (a, b) {
        (Init::Normal(x), Init::Normal(y)) | (Init::Uniform(x), Init::Uniform(y)) => {
            x.to_bits() == y.to_bits()
        }
        _ => a == b,
    }
}

/// Op equality with floats compared bit for bit (so -0.0 != 0.0 and NaN == NaN).
fn same_op(a: &Op, b: &Op) -> bool {
    match (a, b) {
        (Op::Const { values: x }, Op::Const { values: y }) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        }
        (Op::LayerNorm { eps: x }, Op::LayerNorm { eps: y }) => x.to_bits() == y.to_bits(),
        (Op::Attention { scale: x, sink: s }, Op::Attention { scale: y, sink: t }) => {
            x.to_bits() == y.to_bits() && s == t
        }
        (
            Op::Param {
                name: n1,
                trainable: t1,
                init: i1,
            },
            Op::Param {
                name: n2,
                trainable: t2,
                init: i2,
            },
        ) => n1 == n2 && t1 == t2 && same_init(i1, i2),
        _ => a == b,
    }
}

/// `a` and `b` are the same graph: node by node once compacted.
fn assert_same_graph(a: &Graph, b: &Graph, ctx: &str) {
    let (a, b) = (a.compacted().unwrap(), b.compacted().unwrap());
    assert_eq!(a.name, b.name, "{ctx}: graph name");
    assert_eq!(a.len(), b.len(), "{ctx}: node count");
    let (ia, ib) = (a.node_ids(), b.node_ids());
    for (&x, &y) in ia.iter().zip(&ib) {
        assert_eq!(x.index(), y.index(), "{ctx}: compacted ids");
        let (nx, ny) = (a.node(x), b.node(y));
        assert!(
            same_op(&nx.op, &ny.op),
            "{ctx}: node {}: {:?} vs {:?}",
            x.index(),
            nx.op,
            ny.op
        );
        assert_eq!(nx.ty, ny.ty, "{ctx}: type of node {}", x.index());
        assert_eq!(nx.tag, ny.tag, "{ctx}: tag of node {}", x.index());
        let oa: Vec<usize> = a.operands(x).iter().map(|o| o.index()).collect();
        let ob: Vec<usize> = b.operands(y).iter().map(|o| o.index()).collect();
        assert_eq!(oa, ob, "{ctx}: operands of node {}", x.index());
    }
    let outs = |g: &Graph| -> Vec<(String, usize)> {
        g.outputs()
            .iter()
            .map(|(n, id)| (n.clone(), id.index()))
            .collect()
    };
    assert_eq!(outs(&a), outs(&b), "{ctx}: outputs");
}

#[test]
fn random_graphs_round_trip() {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for seed in 0..SEEDS {
        let g = Gen::new(seed).build();
        let ctx = format!("seed {seed}");
        verify(&g).unwrap_or_else(|e| panic!("{ctx}: the generated graph is invalid: {e}"));
        let p1 = print(&g).unwrap();
        let g2 = parse(&p1).unwrap_or_else(|e| panic!("{ctx}: {e}\n{p1}"));
        let p2 = print(&g2).unwrap();
        assert_eq!(p1, p2, "{ctx}: print(parse(print(g))) != print(g)");
        assert_same_graph(&g, &g2, &ctx);
        // The compacted copy prints the same too.
        assert_eq!(
            print(&g.compacted().unwrap()).unwrap(),
            p1,
            "{ctx}: compacted"
        );
        assert_eq!(g.trainable_count(), g2.trainable_count(), "{ctx}");
        for id in g2.node_ids() {
            seen.insert(g2.node(id).op.kind());
        }
    }
    let missing: Vec<&str> = Op::all_kinds()
        .into_iter()
        .filter(|k| !seen.contains(k))
        .collect();
    assert!(missing.is_empty(), "no random graph used {missing:?}");
}

#[test]
fn awkward_floats_survive_exactly() {
    let mut vals: Vec<f32> = AWKWARD.to_vec();
    vals.extend([
        f32::NAN,
        f32::MAX,
        f32::MIN,
        1.0e-40,
        -2.5e-42,
        0.3,
        1e7,
        1e-7,
    ]);
    let mut g = Graph::new("floats");
    let c = g.constant(vals.clone(), &[vals.len()]).unwrap();
    let x = g.input("x", TensorType::f32(Shape::batched(&[vals.len()])));
    let gamma = g.param(
        "g",
        true,
        Init::Normal(1e-45),
        TensorType::f32(Shape::fixed(&[vals.len()])),
    );
    let beta = g.param(
        "b",
        true,
        Init::Uniform(-0.0),
        TensorType::f32(Shape::fixed(&[vals.len()])),
    );
    let y = g.binary(BinaryOp::Mul, x, c).unwrap();
    let z = g.layernorm(y, gamma, beta, 1.1754942e-38).unwrap();
    g.set_output("z", z);
    let text = print(&g).unwrap();
    assert!(text.contains("-0.0"), "{text}");
    assert!(text.contains("3.4028235e38"), "{text}");
    assert!(text.contains("1e-45"), "{text}");
    assert!(text.contains("NaN"), "{text}");
    assert!(text.contains("eps=1.1754942e-38"), "{text}");
    let g2 = parse(&text).unwrap();
    assert_eq!(print(&g2).unwrap(), text);
    assert_same_graph(&g, &g2, "floats");
}

#[test]
fn awkward_names_survive_exactly() {
    let names = [
        "",
        "\"",
        "\\",
        "\\\"",
        "a\nb",
        "\\n",
        "tab\there",
        "# not a comment",
        "%0 = input",
        "日本語 🦀",
        " leading and trailing ",
        "cr\r",
        "\r\n",
    ];
    let mut g = Graph::new("\"quoted\" \\ name\n");
    for (i, n) in names.iter().enumerate() {
        g.set_tag(Some(&format!("t{i}")));
        let x = g.input(n, TensorType::f32(Shape::batched(&[1])));
        let w = g.param(
            n,
            i % 2 == 0,
            Init::Kaiming,
            TensorType::f32(Shape::fixed(&[1])),
        );
        let y = g.binary(BinaryOp::Add, x, w).unwrap();
        g.set_output(n, y);
    }
    g.set_tag(None);
    verify(&g).unwrap();
    let text = print(&g).unwrap();
    let g2 = parse(&text).unwrap();
    assert_eq!(print(&g2).unwrap(), text);
    assert_same_graph(&g, &g2, "names");
    for n in names {
        assert!(
            g2.find_input(n).is_some() && g2.find_param(n).is_some(),
            "{n:?}"
        );
        assert!(g2.output(n).is_some(), "{n:?}");
    }
}

#[test]
fn print_order_does_not_depend_on_build_order() {
    let ty = |d: &[usize]| TensorType::f32(Shape::fixed(d));
    // The same graph built twice, its leaves and an unused node created in other orders.
    let build = |reverse: bool| {
        let mut g = Graph::new("order");
        let (x, w, b) = if reverse {
            let b = g.param("b", false, Init::Checkpoint, ty(&[3]));
            let w = g.param("w", false, Init::Checkpoint, ty(&[3, 2]));
            let x = g.input("x", TensorType::f32(Shape::batched(&[2])));
            (x, w, b)
        } else {
            let x = g.input("x", TensorType::f32(Shape::batched(&[2])));
            let w = g.param("w", false, Init::Checkpoint, ty(&[3, 2]));
            let b = g.param("b", false, Init::Checkpoint, ty(&[3]));
            (x, w, b)
        };
        let y = g.matmul(x, w, false, true).unwrap();
        let z = g.binary(BinaryOp::Add, y, b).unwrap();
        g.set_output("z", z);
        g
    };
    let (a, b) = (build(false), build(true));
    let text = print(&a).unwrap();
    assert_eq!(text, print(&b).unwrap());
    assert_eq!(
        text,
        "eptc-ir 1 \"order\"\n\
         %0 = input \"x\" : f32[B,2]\n\
         %1 = param \"w\" frozen checkpoint : f32[3,2]\n\
         %2 = matmul %0, %1 transpose_b : f32[B,3]\n\
         %3 = param \"b\" frozen checkpoint : f32[3]\n\
         %4 = add %2, %3 : f32[B,3]\n\
         output \"z\" = %4\n"
    );
    assert_same_graph(&a, &b, "build order");
    // Nodes no output reaches are printed after the others.
    let mut c = build(true);
    let x = c.find_input("x").unwrap();
    c.unary(UnaryOp::Exp, x).unwrap();
    let tc = print(&c).unwrap();
    assert!(
        tc.ends_with("%5 = exp %0 : f32[B,2]\noutput \"z\" = %4\n"),
        "{tc}"
    );
    assert_eq!(print(&parse(&tc).unwrap()).unwrap(), tc);
}

#[test]
fn random_graphs_decompose() {
    let mut lowered = 0;
    for seed in 0..SEEDS {
        let mut g = Gen::new(seed).build();
        let ctx = format!("seed {seed}");
        let fused = g
            .node_ids()
            .into_iter()
            .filter(|&id| g.node(id).op.is_fused())
            .count();
        let types: Vec<TensorType> = g.outputs().iter().map(|o| g.ty(o.1).clone()).collect();
        match lower_unsupported(&mut g, &|_| false) {
            Ok(n) => {
                assert_eq!(n, fused, "{ctx}");
                lowered += n;
                verify(&g).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!(
                    g.node_ids().iter().all(|&id| !g.node(id).op.is_fused()),
                    "{ctx}: fused nodes left"
                );
                let after: Vec<TensorType> =
                    g.outputs().iter().map(|o| g.ty(o.1).clone()).collect();
                assert_eq!(types, after, "{ctx}: output types changed");
                let p = print(&g).unwrap();
                assert_eq!(print(&parse(&p).unwrap()).unwrap(), p, "{ctx}");
            }
            // A softmax_sink whose last axis is the batch has no concat/slice form.
            Err(e) => assert!(e.to_string().contains("batch axis"), "{ctx}: {e}"),
        }
    }
    assert!(
        lowered > SEEDS as usize,
        "only {lowered} fused nodes lowered"
    );
}
