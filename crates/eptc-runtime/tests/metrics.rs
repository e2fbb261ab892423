//! The metrics against values computed independently with numpy (mmcls's AP formula)
//! and scikit-learn (`scripts/make_metric_fixtures.py` -> `tests/fixtures/metrics.json`).

use eptc_runtime::metrics::{average_precision, evaluate, roc_auc};

fn fixtures() -> serde_json::Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/metrics.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn match_numpy_and_scikit_learn() {
    for case in fixtures()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let rows = case["scores"].as_array().unwrap();
        let classes = rows[0].as_array().unwrap().len();
        let scores: Vec<f32> = rows
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        let onehot: Vec<bool> = case["onehot"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64() == Some(1)))
            .collect();
        let ids: Option<Vec<usize>> = case.get("labels").map(|l| {
            l.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect()
        });
        let m = evaluate(&scores, &onehot, classes, ids.as_deref());
        if let Some(want) = case.get("map") {
            assert!(
                close(m.map, want.as_f64().unwrap()),
                "{name}: mAP {} vs {want}",
                m.map
            );
        }
        let want = case["auc_mean"].as_f64().unwrap();
        assert!(
            close(m.auc.unwrap(), want),
            "{name}: AUC {:?} vs {want}",
            m.auc
        );
        for (c, w) in case["auc_per_class"].as_array().unwrap().iter().enumerate() {
            match (m.auc_per_class[c], w.as_f64()) {
                (Some(a), Some(b)) => assert!(close(a, 100.0 * b), "{name} class {c}: {a} vs {b}"),
                (None, None) => {}
                (a, b) => panic!("{name} class {c}: {a:?} vs {b:?}"),
            }
        }
        let skipped: Vec<usize> = case["auc_skipped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(m.auc_skipped, skipped, "{name}");
        if let Some(want) = case.get("accuracy") {
            assert!(
                close(m.accuracy.unwrap(), want.as_f64().unwrap()),
                "{name}: accuracy"
            );
        }
    }
}

#[test]
fn small_cases_by_hand() {
    // Positives ranked 1st and 3rd: AP = (1/1 + 2/3) / 2.
    let ap = average_precision(&[0.9, 0.8, 0.7, 0.1], &[true, false, true, false]);
    assert!((ap - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    assert_eq!(average_precision(&[0.3, 0.2], &[false, false]), 0.0);
    // Perfect, inverted and tied rankings.
    assert_eq!(roc_auc(&[0.9, 0.1], &[true, false]), Some(1.0));
    assert_eq!(roc_auc(&[0.1, 0.9], &[true, false]), Some(0.0));
    assert_eq!(roc_auc(&[0.5, 0.5], &[true, false]), Some(0.5));
    assert_eq!(roc_auc(&[0.5, 0.5], &[true, true]), None);
}
