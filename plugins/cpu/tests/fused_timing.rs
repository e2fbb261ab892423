//! ViT-B/16-sized fused ops against their decompositions, on 2 threads. A measurement,
//! not a test: run by hand in release,
//! `cargo test --release -p eptc-cpu --test fused_timing -- --ignored --nocapture`.

mod common;

use common::*;
use eptc_backend::{Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_ir::{lower_unsupported, Activation, Graph, HostTensor, WeightStore};

/// Runs alternate between the graphs (the machine may be shared); prints min and median.
#[test]
#[ignore = "timing, not a test: run by hand in release"]
fn vit_b_timing() {
    let q = vec![8, 12, 197, 64];
    let fc1 = vec![vec![8, 197, 768], vec![3072, 768], vec![3072]];
    let fc2 = vec![
        vec![8, 197, 3072],
        vec![768, 3072],
        vec![768],
        vec![8, 197, 768],
    ];
    let attn = vec![q.clone(), q.clone(), q, vec![197, 1]];
    let cases: Vec<(&str, Vec<Vec<usize>>, Graph)> = vec![
        (
            "attention [8,12,197,64] sink [197,1] scale 0.125",
            attn.clone(),
            graph_of(&attn, |g, x| {
                g.attention(x[0], x[1], x[2], Some(x[3]), 0.125).unwrap()
            }),
        ),
        (
            "linear [8,197,768] x [3072,768] bias gelu",
            fc1.clone(),
            graph_of(&fc1, |g, x| {
                g.linear(x[0], x[1], Some(x[2]), Activation::Gelu, None)
                    .unwrap()
            }),
        ),
        (
            "linear [8,197,3072] x [768,3072] bias residual",
            fc2.clone(),
            graph_of(&fc2, |g, x| {
                g.linear(x[0], x[1], Some(x[2]), Activation::None, Some(x[3]))
                    .unwrap()
            }),
        ),
    ];
    let opts = CompileOptions {
        threads: Some(2),
        ..Default::default()
    };
    for (name, shapes, g) in cases {
        let mut r = rng(1);
        let feed: Vec<(String, HostTensor)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = values(&mut r, s.iter().product());
                (format!("x{i}"), HostTensor::new(s.clone(), v))
            })
            .collect();
        let feed: Vec<(&str, HostTensor)> =
            feed.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let mut d = g.clone();
        lower_unsupported(&mut d, &|_| false).unwrap();
        let mut exes = [&g, &d].map(|g| {
            CpuBackend::new()
                .compile(g, &WeightStore::new(), &opts)
                .unwrap()
        });
        let mut times = [vec![], vec![]];
        for round in 0..13 {
            for (exe, t) in exes.iter_mut().zip(times.iter_mut()) {
                let t0 = std::time::Instant::now();
                exe.run(&feed).unwrap();
                if round > 0 {
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        for t in times.iter_mut() {
            t.sort_by(f64::total_cmp);
        }
        let (f, u) = (&times[0], &times[1]);
        println!(
            "{name}: fused {:.1} ms (median {:.1}), decomposed {:.1} ms (median {:.1}): {:.2}x",
            f[0],
            f[6],
            u[0],
            u[6],
            u[6] / f[6]
        );
    }
}
