//! The PEFT passes on full-size graphs: trainable parameter counts against the formula,
//! initialisers' statistics, and the structure EPT inserts.

use std::path::PathBuf;

mod common;

use common::vit_b16;
use eptc_frontend::ImportOptions;
use eptc_ir::Op;
use eptc_peft::{EptMode, PeftConfig, PromptInit, Task};

fn ept(
    mode: EptMode,
    layers: Vec<usize>,
    prompt_len: usize,
    init: PromptInit,
    classes: usize,
) -> PeftConfig {
    PeftConfig {
        method: "ept".into(),
        mode: Some(mode),
        layers,
        prompt_len,
        prompt_init: Some(init),
        num_classes: classes,
        task: Task::Multilabel,
    }
}

#[test]
fn vit_b16_trainable_counts_match_the_formula() {
    let file = vit_b16();
    let model = eptc_frontend::import_file(&file, &ImportOptions::default()).unwrap();
    assert_eq!(model.arch.heads, 12);
    assert_eq!(model.arch.tokens(), 197);
    assert_eq!(
        model.param_count(),
        86_567_656,
        "timm's vit_base_patch16_224 has 86,567,656 parameters"
    );
    let head = |c: usize| c * 768 + c;
    let cases = [
        (
            ept(EptMode::Cat, (0..12).collect(), 100, PromptInit::Normal, 19),
            236_400 + head(19),
        ),
        (
            ept(EptMode::MultiCat, vec![0], 100, PromptInit::Normal, 19),
            19_700 + head(19),
        ),
        (
            ept(EptMode::Cat, vec![3, 7, 11], 10, PromptInit::Zero, 2),
            3 * 1970 + head(2),
        ),
        (
            ept(EptMode::Add, (0..12).collect(), 197, PromptInit::Normal, 4),
            12 * 197 * 197 + head(4),
        ),
    ];
    for (cfg, want) in cases {
        let mut g = model.graph.clone();
        let values = eptc_peft::apply(&mut g, &cfg, None, 0).unwrap();
        assert_eq!(g.trainable_count(), want, "{cfg:?}");
        assert_eq!(values.values().map(|t| t.numel()).sum::<usize>(), want);
        // One concat (or add) per prompted layer, each tagged by the pass.
        let tagged = g
            .node_ids()
            .into_iter()
            .filter(|&id| g.node(id).tag.as_deref() == Some("ept"))
            .count();
        assert!(tagged >= cfg.layers.len() * 2, "{tagged} ept nodes");
        // The checkpoint's 1000-class head is gone; the new one is trainable.
        assert!(g.params().iter().all(|p| p.1 != "head.weight" || p.2));
    }
}

#[test]
fn initialisers_have_the_documented_statistics() {
    let model = eptc_frontend::import_file(&vit_b16(), &ImportOptions::default()).unwrap();
    let stats = |init: PromptInit, mode: EptMode| {
        let mut g = model.graph.clone();
        let v =
            eptc_peft::apply(&mut g, &ept(mode, (0..12).collect(), 100, init, 2), None, 7).unwrap();
        let p: Vec<f32> = (0..12)
            .flat_map(|j| v[&format!("ept.prompts.{j}")].data().to_vec())
            .collect();
        let n = p.len() as f64;
        let mean = p.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (p.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let max = p.iter().fold(0f32, |m, x| m.max(x.abs()));
        (mean, std, max, v)
    };
    let (mean, std, _, v) = stats(PromptInit::Normal, EptMode::Cat);
    assert!(
        mean.abs() < 1e-3 && (std - 0.02).abs() < 5e-4,
        "normal: {mean} {std}"
    );
    let w = v["head.weight"].data();
    let hstd = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    assert!((hstd - 0.01).abs() < 1e-3, "head std {hstd}");
    let (_, std, max, _) = stats(PromptInit::Uniform, EptMode::Cat);
    assert!(
        max <= 0.08 && (std - 0.08 / 3f64.sqrt()).abs() < 1e-3,
        "uniform: {std} {max}"
    );
    let (_, _, max, _) = stats(PromptInit::Zero, EptMode::Cat);
    assert_eq!(max, 0.0);
    let (_, std, _, _) = stats(PromptInit::Kaiming, EptMode::Cat);
    let want = (2.0f64 / (197.0 * 100.0)).sqrt();
    assert!((std - want).abs() < want * 0.02, "kaiming: {std} vs {want}");
    // mul starts at one whatever the initialiser.
    let mut g = model.graph.clone();
    let v = eptc_peft::apply(
        &mut g,
        &ept(EptMode::Mul, vec![0], 0, PromptInit::Normal, 2),
        None,
        0,
    )
    .unwrap();
    assert!(v["ept.prompts.0"].data().iter().all(|&x| x == 1.0));
    assert_eq!(v["ept.prompts.0"].shape, vec![197, 197]);
}

#[test]
fn ept_replaces_every_prompted_softmax() {
    let model = eptc_frontend::import_file(&vit_b16(), &ImportOptions::default()).unwrap();
    let mut g = model.graph.clone();
    eptc_peft::apply(
        &mut g,
        &ept(EptMode::Cat, vec![0, 5], 100, PromptInit::Normal, 2),
        None,
        0,
    )
    .unwrap();
    let softmaxes: Vec<_> = g
        .topo_order()
        .unwrap()
        .into_iter()
        .filter(|&id| matches!(g.node(id).op, Op::Softmax { .. }))
        .collect();
    assert_eq!(softmaxes.len(), 12);
    let widths: Vec<usize> = softmaxes
        .iter()
        .map(|&id| g.ty(id).shape.dims()[3].fixed().unwrap())
        .collect();
    let mut want = vec![197; 12];
    want[0] = 297;
    want[5] = 297;
    assert_eq!(
        widths, want,
        "prompted layers 0 and 5 softmax over L + N = 297 columns"
    );
}

/// Frozen weights are memory-mapped from the checkpoint, not copied.
#[test]
fn frozen_weights_stay_memory_mapped() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_timm.safetensors");
    let model = eptc_frontend::import(
        &path,
        &ImportOptions {
            heads: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    let mapped = model.weights.iter().filter(|(_, t)| t.is_mapped()).count();
    assert_eq!(
        mapped,
        model.weights.len(),
        "every f32 weight of the fixture is mapped"
    );
    // A resized position table is computed, so it is owned.
    let opts = ImportOptions {
        heads: Some(3),
        image_size: Some(48),
        ..Default::default()
    };
    let model = eptc_frontend::import(&path, &opts).unwrap();
    assert!(!model.weights.get("pos_embed").unwrap().is_mapped());
    assert_eq!(
        model.weights.get("pos_embed").unwrap().shape,
        vec![1, 37, 48]
    );
}
