//! Adapters: the values of the trainable tensors, their initialisation, and the file
//! layout (DESIGN.md §6): `ept.prompts` `[layers, N, L]` stacked in `--layers` order,
//! `head.weight` `[classes, dim]`, `head.bias` `[classes]`; checkpoint weights that
//! `full`, `partial-<k>` and `bias` train, under the checkpoint's own key names; LoRA's
//! factors `lora.<block>.<q|v>.A` `[r, D]` and `.B` `[D, r]`; VPT's prompts
//! `vpt.prompts` `[layers, L, D]`; AdaptFormer's `adapter.<block>.<down|up>.<weight|bias>`;
//! MLP-3's hidden layers `mlp.<0|1>.<weight|bias>` (its last layer is `head.*`);
//! VP's pixel frame `vp.pad_<up|down|left|right>`.

use std::collections::BTreeMap;

use eptc_ir::{Graph, HostTensor, Init, Op};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::ept::prompt_name;
use crate::error::{PeftError, Result};

/// The file key of the stacked prompts.
pub const PROMPTS_KEY: &str = "ept.prompts";

/// Initial values of every trainable param of `g`, by name. `Init::Checkpoint` params
/// take their values from `from_checkpoint`; `Init::Token` ones start at zero (see
/// [`token_init`]). Deterministic for a seed.
pub fn init_values(
    g: &Graph,
    seed: u64,
    from_checkpoint: &BTreeMap<String, HostTensor>,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for (id, name, trainable) in g.params() {
        if !trainable {
            continue;
        }
        let Op::Param { init, .. } = &g.node(id).op else {
            unreachable!()
        };
        let shape = g.ty(id).shape.as_fixed().expect("params have fixed shapes");
        let n: usize = shape.iter().product();
        let normal = |rng: &mut StdRng, std: f32| -> Vec<f32> {
            let d = Normal::new(0.0f32, std).expect("finite std");
            (0..n).map(|_| d.sample(rng)).collect()
        };
        if *init == Init::Checkpoint {
            // The checkpoint's tensor itself (shared, not copied: `full` holds every weight).
            let t = from_checkpoint.get(name).ok_or_else(|| {
                PeftError::Config(format!("no checkpoint value for trainable {name:?}"))
            })?;
            if t.shape != shape {
                return Err(PeftError::Config(format!(
                    "checkpoint value of {name:?} has shape {:?}, the graph's param {shape:?}",
                    t.shape
                )));
            }
            out.insert(name.to_string(), t.clone());
            continue;
        }
        let data = match *init {
            Init::Zeros | Init::Token => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => normal(&mut rng, std),
            Init::Uniform(b) => (0..n).map(|_| rng.random_range(-b..=b)).collect(),
            // Fan-in of the official stacked [layers, N, L] tensor: N * L; gain sqrt(2).
            Init::Kaiming => normal(&mut rng, (2.0 / n as f32).sqrt()),
            Init::Checkpoint => unreachable!("handled above"),
        };
        out.insert(name.to_string(), HostTensor::new(shape, data));
    }
    Ok(out)
}

/// Token initialisation from the token embeddings `[B, N, D]` of the first batch:
/// `P[i, k] = m[k mod D]` with `m` the mean over batch and tokens. For `L = D` this is
/// exactly the official code's `prompt += x.mean([0, 1])` on zero prompts.
pub fn token_init(tokens: &HostTensor, n: usize, l: usize) -> HostTensor {
    let d = *tokens.shape.last().expect("rank 3");
    let rows = tokens.numel() / d;
    let mut m = vec![0.0f64; d];
    for r in tokens.data().chunks_exact(d) {
        for (a, &v) in m.iter_mut().zip(r) {
            *a += v as f64;
        }
    }
    let m: Vec<f32> = m.iter().map(|v| (v / rows as f64) as f32).collect();
    let data = (0..n)
        .flat_map(|_| (0..l).map(|k| m[k % d]))
        .collect::<Vec<_>>();
    HostTensor::new(vec![n, l], data)
}

/// The tensors to write to an adapter file: prompts stacked as `ept.prompts`.
pub fn to_file(values: &BTreeMap<String, HostTensor>) -> Vec<(String, HostTensor)> {
    let mut out = Vec::new();
    let mut prompts = Vec::new();
    while let Some(p) = values.get(&prompt_name(prompts.len())) {
        prompts.push(p);
    }
    if let Some(first) = prompts.first() {
        let mut shape = vec![prompts.len()];
        shape.extend(&first.shape);
        let data = prompts
            .iter()
            .flat_map(|p| p.data().iter().copied())
            .collect();
        out.push((PROMPTS_KEY.to_string(), HostTensor::new(shape, data)));
    }
    for (k, v) in values {
        if !k.starts_with("ept.prompts.") {
            out.push((k.clone(), v.clone()));
        }
    }
    out
}

/// Read adapter tensors back into per-param values, checked against the graph's
/// trainable params (every one present, shapes equal). `file` names the source in errors.
pub fn from_file(
    g: &Graph,
    tensors: &BTreeMap<String, HostTensor>,
    file: &str,
) -> Result<BTreeMap<String, HostTensor>> {
    let err = |msg: String| PeftError::Adapter {
        file: file.to_string(),
        msg,
    };
    let mut values = BTreeMap::new();
    let trainable: Vec<_> = g.params().into_iter().filter(|p| p.2).collect();
    let n_prompts = trainable
        .iter()
        .filter(|p| p.1.starts_with("ept.prompts."))
        .count();
    if n_prompts > 0 {
        let per = g
            .ty(g.find_param(&prompt_name(0)).expect("prompt 0"))
            .shape
            .as_fixed()
            .expect("fixed");
        let mut want = vec![n_prompts];
        want.extend(&per);
        let t = tensors.get(PROMPTS_KEY).ok_or_else(|| {
            err(format!(
                "missing tensor {PROMPTS_KEY:?} (expected shape {want:?})"
            ))
        })?;
        if t.shape != want {
            return Err(err(format!(
                "tensor {PROMPTS_KEY:?} has shape {:?}, expected {want:?}",
                t.shape
            )));
        }
        let size: usize = per.iter().product();
        for (j, chunk) in t.data().chunks_exact(size).enumerate() {
            values.insert(prompt_name(j), HostTensor::new(per.clone(), chunk.to_vec()));
        }
    }
    for (id, name, _) in trainable {
        if name.starts_with("ept.prompts.") {
            continue;
        }
        let want = g.ty(id).shape.as_fixed().expect("fixed");
        let t = tensors
            .get(name)
            .ok_or_else(|| err(format!("missing tensor {name:?} (expected shape {want:?})")))?;
        if t.shape != want {
            return Err(err(format!(
                "tensor {name:?} has shape {:?}, expected {want:?}",
                t.shape
            )));
        }
        values.insert(name.to_string(), t.clone());
    }
    Ok(values)
}
