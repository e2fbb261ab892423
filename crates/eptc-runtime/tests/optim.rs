//! The optimizers and schedule against PyTorch (`scripts/make_optim_fixtures.py` ->
//! `tests/fixtures/optim.json`): SGD (momentum 0.9, weight decay), AdamW, and
//! `CosineAnnealingLR`.

use std::collections::BTreeMap;

use eptc_runtime::optim::{cosine_lr, Kind, Optimizer};

fn fixtures() -> serde_json::Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/optim.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn optimizers_follow_pytorch() {
    for case in fixtures()["optimizers"].as_array().unwrap() {
        let f = |k: &str| case[k].as_f64().unwrap() as f32;
        let (name, lr) = (case["name"].as_str().unwrap(), f("lr"));
        let kind = match name {
            "sgd" => Kind::Sgd {
                momentum: f("momentum"),
                weight_decay: f("weight_decay"),
            },
            "adamw" => Kind::AdamW {
                beta1: f("beta1"),
                beta2: f("beta2"),
                eps: f("eps"),
                weight_decay: f("weight_decay"),
            },
            _ => unreachable!(),
        };
        let mut opt = Optimizer::new(kind);
        let mut params = BTreeMap::from([("p".to_string(), floats(&case["p0"]))]);
        let grads = case["grads"].as_array().unwrap();
        for (k, (g, want)) in grads
            .iter()
            .zip(case["params"].as_array().unwrap())
            .enumerate()
        {
            let grads = BTreeMap::from([("p".to_string(), floats(g))]);
            opt.step(lr, &mut params, &grads).unwrap();
            for (a, b) in params["p"].iter().zip(floats(want)) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{name} step {k}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn cosine_schedule_follows_pytorch() {
    let c = &fixtures()["cosine"];
    let (base, total) = (
        c["base"].as_f64().unwrap(),
        c["total"].as_u64().unwrap() as usize,
    );
    for (step, want) in c["lrs"].as_array().unwrap().iter().enumerate() {
        let got = cosine_lr(base, step, total, 0);
        assert!(
            (got - want.as_f64().unwrap()).abs() < 1e-15,
            "step {step}: {got} vs {want}"
        );
    }
    // Warm-up ramps linearly to the base, then anneals to 0.
    assert_eq!(cosine_lr(1.0, 0, 10, 4), 0.25);
    assert_eq!(cosine_lr(1.0, 3, 10, 4), 1.0);
    assert_eq!(cosine_lr(1.0, 4, 10, 4), 1.0);
    assert!(cosine_lr(1.0, 10, 10, 4).abs() < 1e-15);
}

#[test]
fn mismatched_gradients_are_errors() {
    let mut opt = Optimizer::paper_default();
    let mut params = BTreeMap::from([("w".to_string(), vec![1.0; 3])]);
    let e = opt
        .step(
            0.1,
            &mut params,
            &BTreeMap::from([("w".to_string(), vec![1.0; 2])]),
        )
        .unwrap_err();
    assert!(e.contains("\"w\""), "{e}");
    let e = opt
        .step(
            0.1,
            &mut params,
            &BTreeMap::from([("v".to_string(), vec![1.0])]),
        )
        .unwrap_err();
    assert!(e.contains("\"v\""), "{e}");
}
