//! The fused ops (`softmax_sink`, `attention`, `linear`) against naive f64 references,
//! against their own decompositions into primitives (`eptc_ir::decompose`), and across
//! thread counts.

mod common;

use common::*;
use eptc_backend::{Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_ir::{lower_unsupported, Activation, Graph, HostTensor, WeightStore};
use rand::rngs::StdRng;
use rand::Rng;

/// The numpy broadcast of shapes (fixed).
fn bshape(shapes: &[&[usize]]) -> Vec<usize> {
    shapes.iter().fold(vec![], |acc, s| {
        eptc_ir::infer::broadcast_shapes(&eptc_ir::Shape::fixed(&acc), &eptc_ir::Shape::fixed(s))
            .unwrap()
            .as_fixed()
            .unwrap()
    })
}

/// `s` as an operand broadcasting to it: a suffix of it, some dims set to 1.
fn broadcastable(r: &mut StdRng, s: &[usize]) -> Vec<usize> {
    let keep = r.random_range(0..=s.len());
    s[s.len() - keep..]
        .iter()
        .map(|&d| if r.random_bool(0.3) { 1 } else { d })
        .collect()
}

// ---- references -------------------------------------------------------------------------

/// `softmax_sink(s, z)` in f64 (z broadcast to s's shape with the last dim 1).
fn ref_softmax_sink(s: &Nd, z: &Nd) -> Nd {
    let m = *s.shape.last().unwrap();
    Nd::build(&s.shape, |idx| {
        let mut row = idx.to_vec();
        let last = row.len() - 1;
        let zi = at_broadcast(z, &{
            let mut r = row.clone();
            r[last] = 0;
            r
        });
        let vals: Vec<f64> = (0..m)
            .map(|j| {
                row[last] = j;
                s.at(&row)
            })
            .collect();
        let mx = vals.iter().copied().fold(zi, f64::max);
        let den: f64 = vals.iter().map(|v| (v - mx).exp()).sum::<f64>() + (zi - mx).exp();
        (vals[idx[last]] - mx).exp() / den
    })
}

/// `softmax_sink(scale q k^T, z) v` in f64 (plain softmax without z).
fn ref_attention(q: &Nd, k: &Nd, v: &Nd, z: Option<&Nd>, scale: f64) -> Nd {
    let (rq, rk, rv) = (q.shape.len(), k.shape.len(), v.shape.len());
    let (n, d, m, e) = (
        q.shape[rq - 2],
        q.shape[rq - 1],
        k.shape[rk - 2],
        v.shape[rv - 1],
    );
    let mut out = bshape(&[&q.shape[..rq - 2], &k.shape[..rk - 2], &v.shape[..rv - 2]]);
    out.extend([n, e]);
    Nd::build(&out, |idx| {
        let lead = &idx[..idx.len() - 2];
        let (i, c) = (idx[idx.len() - 2], idx[idx.len() - 1]);
        let at = |t: &Nd, a: usize, b: usize| {
            let mut x = lead.to_vec();
            x.extend([a, b]);
            at_broadcast(t, &x)
        };
        let s: Vec<f64> = (0..m)
            .map(|j| scale * (0..d).map(|p| at(q, i, p) * at(k, j, p)).sum::<f64>())
            .collect();
        let zi = z.map_or(f64::NEG_INFINITY, |z| at(z, i, 0));
        let mx = s.iter().copied().fold(zi, f64::max);
        let ez = if zi == f64::NEG_INFINITY {
            0.0
        } else {
            (zi - mx).exp()
        };
        let den: f64 = s.iter().map(|x| (x - mx).exp()).sum::<f64>() + ez;
        (0..m).map(|j| (s[j] - mx).exp() / den * at(v, j, c)).sum()
    })
}

fn gelu64(x: f64) -> f64 {
    0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// `act(x w^T + b) + r` in f64.
fn ref_linear(x: &Nd, w: &Nd, b: Option<&Nd>, r: Option<&Nd>, act: Activation) -> Nd {
    let k = *x.shape.last().unwrap();
    let o = w.shape[0];
    let mut out = x.shape.clone();
    *out.last_mut().unwrap() = o;
    Nd::build(&out, |idx| {
        let j = idx[idx.len() - 1];
        let mut xi = idx.to_vec();
        let last = xi.len() - 1;
        let mut y: f64 = (0..k)
            .map(|p| {
                xi[last] = p;
                x.at(&xi) * w.at(&[j, p])
            })
            .sum();
        if let Some(b) = b {
            y += b.at(&[j]);
        }
        if act == Activation::Gelu {
            y = gelu64(y);
        }
        if let Some(r) = r {
            y += r.at(idx);
        }
        y
    })
}

// ---- kernels against the references --------------------------------------------------------

#[test]
fn softmax_sink_matches_f64() {
    for seed in 0..40 {
        let mut r = rng(seed);
        let rank = r.random_range(1..=4);
        let s_shape = shape(&mut r, rank, 6);
        let mut rows = s_shape.clone();
        *rows.last_mut().unwrap() = 1;
        let z_shape = broadcastable(&mut r, &rows);
        let (s, sv) = Nd::random(&mut r, &s_shape);
        let (mut z, mut zv) = Nd::random(&mut r, &z_shape);
        // Sinks that dominate, vanish (-inf: the plain softmax) or sit among the scores.
        for (i, v) in zv.iter_mut().enumerate() {
            *v = match (seed + i as u64) % 4 {
                0 => f32::NEG_INFINITY,
                1 => *v * 10.0,
                _ => *v,
            };
            z.data[i] = f64::from(*v);
        }
        let want = ref_softmax_sink(&s, &z);
        for threads in [1, 2] {
            let got = run_with(&[(&s_shape, &sv), (&z_shape, &zv)], threads, |g, x| {
                g.softmax_sink(x[0], x[1]).unwrap()
            });
            assert_close(&got, &want, 1e-6);
        }
    }
}

#[test]
fn softmax_sink_specials() {
    // z = -inf is the plain softmax; a huge z swallows the row; NaN spreads over its row.
    let s = [1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5];
    let z = [f32::NEG_INFINITY, 1e30];
    let got = run(&[(&[2, 3], &s), (&[2, 1], &z)], |g, x| {
        g.softmax_sink(x[0], x[1]).unwrap()
    });
    let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
    let sum: f64 = e.iter().sum();
    let want = Nd::new(
        &[2, 3],
        vec![e[0] / sum, e[1] / sum, e[2] / sum, 0.0, 0.0, 0.0],
    );
    assert_close(&got, &want, 1e-6);
    let got = run(&[(&[2, 3], &s), (&[2, 1], &[f32::NAN, 0.0])], |g, x| {
        g.softmax_sink(x[0], x[1]).unwrap()
    });
    assert!(got.data()[..3].iter().all(|v| v.is_nan()));
    assert!(got.data()[3..].iter().all(|v| v.is_finite()));
    // Rows sum to 1 - exp(z)/D.
    let got = run(&[(&[1, 3], &[0.0, 0.0, 0.0]), (&[1], &[0.0])], |g, x| {
        g.softmax_sink(x[0], x[1]).unwrap()
    });
    assert_close(&got, &Nd::new(&[1, 3], vec![0.25; 3]), 1e-7);
}

/// Random attention operands: (shapes of q, k, v, z?, the scale).
fn attention_case(r: &mut StdRng, sink: bool) -> (Vec<Vec<usize>>, f32) {
    let lead_rank = r.random_range(0..=2);
    let lead = shape(r, lead_rank, 3);
    let (n, d, m, e) = (
        r.random_range(1..=7),
        r.random_range(1..=6),
        r.random_range(1..=7),
        r.random_range(1..=5),
    );
    let with = |mut l: Vec<usize>, a, b| {
        l.extend([a, b]);
        l
    };
    let mut shapes = vec![
        with(lead.clone(), n, d),
        with(broadcastable(r, &lead), m, d),
        with(broadcastable(r, &lead), m, e),
    ];
    if r.random_bool(0.3) {
        // q with broadcast dims too.
        let ql = broadcastable(r, &lead);
        shapes[0] = with(ql, n, d);
    }
    let full = bshape(&[
        &shapes[0][..shapes[0].len() - 2],
        &shapes[1][..shapes[1].len() - 2],
        &shapes[2][..shapes[2].len() - 2],
    ]);
    if sink {
        let rows = with(full, n, 1);
        shapes.push(broadcastable(r, &rows));
    }
    (shapes, r.random_range(0.1f32..1.0))
}

#[test]
fn attention_matches_f64() {
    for seed in 0..40 {
        let mut r = rng(100 + seed);
        let sink = seed % 3 != 0;
        let (shapes, scale) = attention_case(&mut r, sink);
        let data: Vec<(Nd, Vec<f32>)> = shapes.iter().map(|s| Nd::random(&mut r, s)).collect();
        let want = ref_attention(
            &data[0].0,
            &data[1].0,
            &data[2].0,
            data.get(3).map(|d| &d.0),
            f64::from(scale),
        );
        let inputs: Vec<(&[usize], &[f32])> = shapes
            .iter()
            .zip(&data)
            .map(|(s, d)| (s.as_slice(), d.1.as_slice()))
            .collect();
        for threads in [1, 3] {
            let got = run_with(&inputs, threads, |g, x| {
                g.attention(x[0], x[1], x[2], x.get(3).copied(), scale)
                    .unwrap()
            });
            assert_close(&got, &want, 2e-6);
        }
    }
}

#[test]
fn attention_sink_shared_by_heads_and_batch() {
    // The ViT layout: q, k, v [B,H,N,d], the sink [N,1] or [B,H,N,1]; and z with an axis
    // only v has.
    let cases: [&[&[usize]]; 3] = [
        &[&[2, 3, 9, 4], &[2, 3, 9, 4], &[2, 3, 9, 4], &[9, 1]],
        &[&[2, 3, 9, 4], &[2, 3, 11, 4], &[2, 3, 11, 5], &[2, 3, 9, 1]],
        &[&[9, 4], &[11, 4], &[3, 11, 5], &[3, 9, 1]],
    ];
    for (c, shapes) in cases.iter().enumerate() {
        let mut r = rng(200 + c as u64);
        let data: Vec<(Nd, Vec<f32>)> = shapes.iter().map(|s| Nd::random(&mut r, s)).collect();
        let want = ref_attention(&data[0].0, &data[1].0, &data[2].0, Some(&data[3].0), 0.125);
        let inputs: Vec<(&[usize], &[f32])> = shapes
            .iter()
            .zip(&data)
            .map(|(s, d)| (*s, d.1.as_slice()))
            .collect();
        let got = run(&inputs, |g, x| {
            g.attention(x[0], x[1], x[2], Some(x[3]), 0.125).unwrap()
        });
        assert_close(&got, &want, 2e-6);
    }
}

#[test]
fn linear_matches_f64() {
    let mut case = 0;
    for bias in [false, true] {
        for residual in [false, true] {
            for act in Activation::ALL {
                for rank in 1..=3 {
                    case += 1;
                    let mut r = rng(300 + case);
                    let mut xs = shape(&mut r, rank, 5);
                    *xs.last_mut().unwrap() = r.random_range(1..=40);
                    let (o, k) = (r.random_range(1..=20), *xs.last().unwrap());
                    let mut out = xs.clone();
                    *out.last_mut().unwrap() = o;
                    let (x, xv) = Nd::random(&mut r, &xs);
                    let (w, wv) = Nd::random(&mut r, &[o, k]);
                    let (b, bv) = Nd::random(&mut r, &[o]);
                    let (res, rv) = Nd::random(&mut r, &out);
                    let want =
                        ref_linear(&x, &w, bias.then_some(&b), residual.then_some(&res), act);
                    let (ws, bs) = ([o, k], [o]);
                    let mut inputs: Vec<(&[usize], &[f32])> = vec![(&xs, &xv), (&ws, &wv)];
                    if bias {
                        inputs.push((&bs, &bv));
                    }
                    if residual {
                        inputs.push((&out, &rv));
                    }
                    for threads in [1, 2] {
                        let got = run_with(&inputs, threads, |g, ids| {
                            let bi = bias.then(|| ids[2]);
                            let ri = residual.then(|| ids[ids.len() - 1]);
                            g.linear(ids[0], ids[1], bi, act, ri).unwrap()
                        });
                        assert_close(&got, &want, 1e-5);
                    }
                }
            }
        }
    }
}

#[test]
fn linear_residual_buffers() {
    // The residual an intermediate nobody else reads (written in place), one read again
    // later (copied), and x itself (shared storage).
    let mut r = rng(400);
    let (x, xv) = Nd::random(&mut r, &[3, 8]);
    let (w, wv) = Nd::random(&mut r, &[8, 8]);
    let relu = Nd::build(&[3, 8], |i| x.at(i).max(0.0));
    for (again, from_x) in [(false, false), (true, false), (false, true)] {
        let got = run(&[(&[3, 8], &xv), (&[8, 8], &wv)], |g, ids| {
            let res = if from_x {
                ids[0]
            } else {
                g.unary(eptc_ir::UnaryOp::Relu, ids[0]).unwrap()
            };
            let y = g
                .linear(ids[0], ids[1], None, Activation::None, Some(res))
                .unwrap();
            if again {
                g.binary(eptc_ir::BinaryOp::Sub, y, res).unwrap()
            } else {
                y
            }
        });
        let res = if from_x { &x } else { &relu };
        let mut want = ref_linear(&x, &w, None, Some(res), Activation::None);
        if again {
            for (v, r) in want.data.iter_mut().zip(&res.data) {
                *v -= r;
            }
        }
        assert_close(&got, &want, 1e-5);
    }
}

#[test]
fn degenerate_sizes() {
    // K = 0: the linear is its bias (and residual); M = 0: attention outputs zeros.
    let got = run(
        &[(&[2, 0], &[]), (&[3, 0], &[]), (&[3], &[1.0, 2.0, 3.0])],
        |g, x| {
            g.linear(x[0], x[1], Some(x[2]), Activation::None, None)
                .unwrap()
        },
    );
    assert_eq!(got.data(), &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let got = run(
        &[(&[2, 3], &[0.5; 6]), (&[0, 3], &[]), (&[0, 2], &[])],
        |g, x| g.attention(x[0], x[1], x[2], None, 1.0).unwrap(),
    );
    assert_eq!(got.data(), &[0.0; 4]);
}

// ---- fused = decomposed, threads -------------------------------------------------------------

fn exec(g: &Graph, inputs: &[Vec<f32>], shapes: &[Vec<usize>], threads: usize) -> HostTensor {
    let opts = CompileOptions {
        threads: Some(threads),
        ..Default::default()
    };
    let mut exe = CpuBackend::new()
        .compile(g, &WeightStore::new(), &opts)
        .unwrap();
    let names: Vec<String> = (0..inputs.len()).map(|i| format!("x{i}")).collect();
    let feed: Vec<(&str, HostTensor)> = names
        .iter()
        .zip(inputs.iter().zip(shapes))
        .map(|(n, (v, s))| (n.as_str(), HostTensor::new(s.clone(), v.clone())))
        .collect();
    exe.run(&feed).unwrap().pop().unwrap().1
}

/// The fused graph and its decomposition agree (≤ 1e-6 relative), and the fused one
/// gives the same bits on 1 to 4 threads.
fn check_against_decomposition(seed: u64, shapes: &[Vec<usize>], g: Graph) {
    let mut r = rng(seed);
    let inputs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| values(&mut r, s.iter().product()))
        .collect();
    let mut d = g.clone();
    let n = lower_unsupported(&mut d, &|_| false).unwrap();
    assert_eq!(n, 1);
    eptc_ir::verify(&d).unwrap();
    assert!(d.node_ids().iter().all(|&i| !d.node(i).op.is_fused()));
    let fused = exec(&g, &inputs, shapes, 2);
    let unfused = exec(&d, &inputs, shapes, 2);
    let err = rel_err(&fused, &unfused);
    assert!(err <= 1e-6, "seed {seed}: fused vs decomposed: {err:e}");
    for threads in [1, 3, 4] {
        let other = exec(&g, &inputs, shapes, threads);
        assert_eq!(
            other.data(),
            fused.data(),
            "seed {seed}: {threads} threads differ from 2"
        );
    }
}

#[test]
fn softmax_sink_equals_its_decomposition() {
    for seed in 0..10 {
        let mut r = rng(500 + seed);
        let rank = r.random_range(1..=4);
        let s = shape(&mut r, rank, 9);
        let mut rows = s.clone();
        *rows.last_mut().unwrap() = 1;
        let shapes = vec![s, broadcastable(&mut r, &rows)];
        let g = graph_of(&shapes, |g, x| g.softmax_sink(x[0], x[1]).unwrap());
        check_against_decomposition(500 + seed, &shapes, g);
    }
}

#[test]
fn attention_equals_its_decomposition() {
    for seed in 0..12 {
        let mut r = rng(600 + seed);
        let sink = seed % 2 == 0;
        let (shapes, scale) = attention_case(&mut r, sink);
        let g = graph_of(&shapes, |g, x| {
            g.attention(x[0], x[1], x[2], x.get(3).copied(), scale)
                .unwrap()
        });
        check_against_decomposition(600 + seed, &shapes, g);
    }
    // Bigger: several entries per thread, rows longer than a vector, the ViT sink layout.
    let shapes = vec![
        vec![2, 4, 37, 16],
        vec![2, 4, 37, 16],
        vec![2, 4, 37, 16],
        vec![37, 1],
    ];
    let g = graph_of(&shapes, |g, x| {
        g.attention(x[0], x[1], x[2], Some(x[3]), 0.25).unwrap()
    });
    check_against_decomposition(650, &shapes, g);
}

#[test]
fn linear_equals_its_decomposition() {
    let mut seed = 700;
    for bias in [false, true] {
        for residual in [false, true] {
            for act in Activation::ALL {
                seed += 1;
                let mut r = rng(seed);
                let (rows, k, o) = (
                    r.random_range(1..=70),
                    r.random_range(1..=90),
                    r.random_range(1..=70),
                );
                let mut shapes = vec![vec![2, rows, k], vec![o, k]];
                if bias {
                    shapes.push(vec![o]);
                }
                if residual {
                    shapes.push(vec![2, rows, o]);
                }
                let g = graph_of(&shapes, |g, x| {
                    let b = bias.then(|| x[2]);
                    let res = residual.then(|| x[x.len() - 1]);
                    g.linear(x[0], x[1], b, act, res).unwrap()
                });
                check_against_decomposition(seed, &shapes, g);
            }
        }
    }
}

#[test]
fn fused_example_block_equals_its_decomposition() {
    // ir-specs/examples/fused.eptc: an EPT transformer block written with fused ops.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../ir-specs/examples/fused.eptc"
    );
    let g = eptc_ir::text::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let w = common::tiny_vit::weights(&g, 7);
    let mut d = g.clone();
    assert_eq!(lower_unsupported(&mut d, &|_| false).unwrap(), 7);
    let mut r = rng(8);
    let x = HostTensor::new(vec![3, 5, 8], values(&mut r, 3 * 5 * 8));
    let run_on = |g: &Graph, threads| {
        let opts = CompileOptions {
            threads: Some(threads),
            ..Default::default()
        };
        let mut exe = CpuBackend::new().compile(g, &w, &opts).unwrap();
        exe.run(&[("x", x.clone())]).unwrap().pop().unwrap().1
    };
    let (fused, unfused) = (run_on(&g, 2), run_on(&d, 2));
    let err = rel_err(&fused, &unfused);
    assert!(err <= 1e-6, "fused vs decomposed: {err:e}");
    assert_eq!(run_on(&g, 1).data(), fused.data());
}

#[test]
fn capabilities_list_the_fused_ops() {
    let caps = CpuBackend::new().capabilities();
    // Every fused op but the flash-style attention backward, which the CPU runs as its
    // decomposition (so training graphs for the CPU differentiate attention into matrix
    // products).
    let backward = ["attention_lse", "attention_grad"];
    let want: Vec<&str> = eptc_ir::Op::fused_kinds()
        .into_iter()
        .filter(|k| !backward.contains(k))
        .collect();
    assert_eq!(caps.fused_ops, want);
    for k in eptc_ir::Op::fused_kinds() {
        assert!(!caps.ops.iter().any(|o| o == k), "{k} listed as primitive");
        assert_eq!(caps.supports(k), !backward.contains(&k), "{k}");
    }
}
