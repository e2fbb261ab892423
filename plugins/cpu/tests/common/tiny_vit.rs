//! A tiny ViT for whole-graph tests: the graph, random weights, and the same forward
//! pass written out in f64.

use eptc_ir::{BinaryOp, Dim, Graph, HostTensor, Init, NodeId, ReduceOp, Shape};
use eptc_ir::{TensorType, UnaryOp, WeightStore};

use super::{rng, values};

pub const D: usize = 16;
pub const HID: usize = 32;
pub const CLASSES: usize = 3;

pub fn param(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.param(
        name,
        false,
        Init::Checkpoint,
        TensorType::f32(Shape::fixed(shape)),
    )
}

fn linear(g: &mut Graph, x: NodeId, name: &str, din: usize, dout: usize) -> NodeId {
    let w = param(g, &format!("{name}.weight"), &[dout, din]);
    let b = param(g, &format!("{name}.bias"), &[dout]);
    let y = g.matmul(x, w, false, true).unwrap();
    g.binary(BinaryOp::Add, y, b).unwrap()
}

/// Patch embedding, a class token, one pre-norm block with single-head attention and a
/// GELU MLP, a linear head on the class token; outputs `logits` and mean `features`.
pub fn tiny_vit() -> Graph {
    let mut g = Graph::new("tiny-vit");
    let x = g.input("pixel_values", TensorType::f32(Shape::batched(&[3, 8, 8])));
    let p = g.patchify(x, 4).unwrap();
    let t = linear(&mut g, p, "embed", 48, D);
    let cls = param(&mut g, "cls", &[1, 1, D]);
    let cls = g
        .broadcast(cls, Shape(vec![Dim::Batch, Dim::Fixed(1), Dim::Fixed(D)]))
        .unwrap();
    let t = g.concat(&[cls, t], 1).unwrap();
    let (gm, bt) = (param(&mut g, "ln1.g", &[D]), param(&mut g, "ln1.b", &[D]));
    let h = g.layernorm(t, gm, bt, 1e-6).unwrap();
    let q = linear(&mut g, h, "q", D, D);
    let k = linear(&mut g, h, "k", D, D);
    let v = linear(&mut g, h, "v", D, D);
    let s = g.matmul(q, k, false, true).unwrap();
    let scale = g.scalar(0.25);
    let s = g.binary(BinaryOp::Mul, s, scale).unwrap();
    let a = g.softmax(s, 2).unwrap();
    let o = g.matmul(a, v, false, false).unwrap();
    let t = g.binary(BinaryOp::Add, t, o).unwrap();
    let (gm, bt) = (param(&mut g, "ln2.g", &[D]), param(&mut g, "ln2.b", &[D]));
    let h = g.layernorm(t, gm, bt, 1e-6).unwrap();
    let h = linear(&mut g, h, "fc1", D, HID);
    let h = g.unary(UnaryOp::Gelu, h).unwrap();
    let h = linear(&mut g, h, "fc2", HID, D);
    let t = g.binary(BinaryOp::Add, t, h).unwrap();
    let c = g.slice(t, 1, 0, 1).unwrap();
    let c = g.reshape(c, Shape::batched(&[D])).unwrap();
    let logits = linear(&mut g, c, "head", D, CLASSES);
    let feats = g.reduce(ReduceOp::Mean, t, &[1], false).unwrap();
    g.set_output("logits", logits);
    g.set_output("features", feats);
    eptc_ir::verify(&g).unwrap();
    g
}

pub fn weights(g: &Graph, seed: u64) -> WeightStore {
    let mut r = rng(seed);
    let mut w = WeightStore::new();
    for (id, name, _) in g.params() {
        let shape = g.ty(id).shape.as_fixed().unwrap();
        let n = shape.iter().product();
        let v = values(&mut r, n).iter().map(|x| x * 0.5).collect();
        w.insert(name, HostTensor::new(shape, v));
    }
    w
}

fn f64s(w: &WeightStore, name: &str) -> Vec<f64> {
    w.get(name)
        .unwrap()
        .data()
        .iter()
        .map(|&x| f64::from(x))
        .collect()
}

/// `[rows, din] @ W^T + b` in f64.
fn lin(w: &WeightStore, name: &str, x: &[f64], din: usize) -> Vec<f64> {
    let (wt, b) = (
        f64s(w, &format!("{name}.weight")),
        f64s(w, &format!("{name}.bias")),
    );
    let dout = b.len();
    x.chunks(din)
        .flat_map(|row| {
            (0..dout).map(|o| (0..din).map(|i| row[i] * wt[o * din + i]).sum::<f64>() + b[o])
        })
        .collect::<Vec<_>>()
}

fn ln(w: &WeightStore, name: &str, x: &[f64]) -> Vec<f64> {
    let (g, b) = (f64s(w, &format!("{name}.g")), f64s(w, &format!("{name}.b")));
    x.chunks(D)
        .flat_map(|r| {
            let m = r.iter().sum::<f64>() / D as f64;
            let var = r.iter().map(|v| (v - m).powi(2)).sum::<f64>() / D as f64;
            (0..D).map(move |j| (r[j] - m) / (var + 1e-6).sqrt())
        })
        .enumerate()
        .map(|(i, v)| v * g[i % D] + b[i % D])
        .collect()
}

fn gelu(x: f64) -> f64 {
    // x * Phi(x) by Simpson's rule on the normal density: independent of any erf.
    let n = 2000;
    let (a, h) = (-12.0, (x + 12.0) / n as f64);
    let phi = |t: f64| (-t * t / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let s: f64 = (0..=n)
        .map(|i| {
            let c = if i == 0 || i == n {
                1.0
            } else if i % 2 == 1 {
                4.0
            } else {
                2.0
            };
            c * phi(a + i as f64 * h)
        })
        .sum();
    x * s * h / 3.0
}

/// The tiny ViT for one image in f64: (logits, features).
pub fn reference_one(w: &WeightStore, img: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut patches = vec![];
    for gy in 0..2 {
        for gx in 0..2 {
            for c in 0..3 {
                for ky in 0..4 {
                    for kx in 0..4 {
                        patches.push(img[c * 64 + (gy * 4 + ky) * 8 + gx * 4 + kx]);
                    }
                }
            }
        }
    }
    let mut t = f64s(w, "cls");
    t.extend(lin(w, "embed", &patches, 48));
    let n = 5;
    let h = ln(w, "ln1", &t);
    let (q, k, v) = (lin(w, "q", &h, D), lin(w, "k", &h, D), lin(w, "v", &h, D));
    for i in 0..n {
        let s: Vec<f64> = (0..n)
            .map(|j| (0..D).map(|e| q[i * D + e] * k[j * D + e]).sum::<f64>() * 0.25)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for e in 0..D {
            t[i * D + e] += (0..n)
                .map(|j| (s[j] - m).exp() / z * v[j * D + e])
                .sum::<f64>();
        }
    }
    let h = ln(w, "ln2", &t);
    let h: Vec<f64> = lin(w, "fc1", &h, D).into_iter().map(gelu).collect();
    let h = lin(w, "fc2", &h, HID);
    t.iter_mut().zip(&h).for_each(|(t, h)| *t += h);
    let logits = lin(w, "head", &t[..D], D);
    let feats = (0..D)
        .map(|e| (0..n).map(|i| t[i * D + e]).sum::<f64>() / n as f64)
        .collect();
    (logits, feats)
}
