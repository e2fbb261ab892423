//! eptc's PEFT passes. A pass rewrites the imported graph, adding trainable params
//! tagged with the pass's name so snapshots show what it did:
//!
//! - [`ept`]: Embedded Prompt Tuning (modes cat, multi-cat, add, mul; any layer set);
//! - [`select`]: the methods that choose which existing weights train: `full`,
//!   `partial-<k>` (the last k blocks and the final norm), `bias` (BitFit);
//! - [`lora`]: LoRA on the query and value projections (`lora-<r>`, `--rank`,
//!   `--lora-alpha`);
//! - [`vpt`]: Visual Prompt Tuning, deep or shallow (`vpt-deep`, `vpt-shallow`;
//!   `--prompt-len`, `--depth`);
//! - [`adaptformer`]: AdaptFormer's bottleneck beside every MLP (`adapter-<reduction>`,
//!   `--reduction`);
//! - [`mlp`]: MLP-3, a three-layer MLP in place of the linear head (`mlp-3-<hidden>`,
//!   `--hidden`);
//! - [`vp`]: visual prompting, a learnable pixel frame added to the image (`vp-<pad>`,
//!   `--pad-size`);
//! - [`head`]: the trainable classification head (all that trains with `linear`/`none`);
//! - [`apply`]: the pipeline: the method's pass, then `head`.

pub mod adapter;
pub mod adaptformer;
pub mod config;
pub mod ept;
pub mod error;
pub mod head;
pub mod lora;
pub mod mlp;
pub mod select;
pub mod vp;
pub mod vpt;

use std::collections::BTreeMap;

pub use config::{EptMode, PeftConfig, PromptInit, Task};
use eptc_ir::{Graph, HostTensor, Init, Op, WeightStore};
pub use error::{PeftError, Result};

/// The PEFT methods, as `--peft` and the config's `method` name them (`partial-<k>` in
/// the config, e.g. `partial-1`, the paper's Partial-1).
pub const METHODS: &str = "full, linear, partial-k, bias, lora, vpt, adapter, mlp-3, vp, ept, none";

/// `k` of a `partial-<k>` method name.
pub fn partial_k(method: &str) -> Option<usize> {
    method.strip_prefix("partial-")?.parse().ok()
}

/// The selection of existing weights a method trains, if it is one of those methods.
pub fn selection(method: &str) -> Option<select::Selection> {
    match method {
        "full" => Some(select::Selection::All),
        "bias" => Some(select::Selection::Biases),
        m => partial_k(m).map(select::Selection::LastBlocks),
    }
}

/// Apply the PEFT method of `cfg` and the head to `g`. `checkpoint_head` holds the
/// checkpoint's head `(weight, bias)` to start from when the head keeps its classes.
/// Returns the initial values of every trainable param. Methods that train checkpoint
/// weights (`full`, `partial-<k>`, `bias`) need them: see [`apply_with_weights`].
pub fn apply(
    g: &mut Graph,
    cfg: &PeftConfig,
    checkpoint_head: Option<(HostTensor, HostTensor)>,
    seed: u64,
) -> Result<BTreeMap<String, HostTensor>> {
    apply_with_weights(g, cfg, checkpoint_head, seed, &WeightStore::new())
}

/// [`apply`], with the checkpoint's weights (`Model::weights`) from which trained
/// checkpoint params start.
pub fn apply_with_weights(
    g: &mut Graph,
    cfg: &PeftConfig,
    checkpoint_head: Option<(HostTensor, HostTensor)>,
    seed: u64,
    weights: &WeightStore,
) -> Result<BTreeMap<String, HostTensor>> {
    let method = cfg.method.as_str();
    let sel = selection(method);
    let mut mlp_hidden = None;
    match method {
        "ept" => {
            let mode = cfg.mode.unwrap_or(EptMode::Cat);
            let init = cfg.prompt_init.unwrap_or(PromptInit::Normal);
            ept::apply(g, mode, &cfg.layers, cfg.prompt_len, init)?;
        }
        "none" | "linear" => {}
        m if m.starts_with("lora-") => {
            let (rank, alpha) = lora::parse_method(m).ok_or_else(|| {
                PeftError::Config(format!(
                    "LoRA method {m:?}: expected lora-<rank> or lora-<rank>-alpha-<alpha>"
                ))
            })?;
            lora::apply(g, rank, alpha)?;
        }
        m if m.starts_with("vpt-") => {
            let deep = vpt::parse_method(m).ok_or_else(|| {
                PeftError::Config(format!(
                    "VPT method {m:?}: expected vpt-deep or vpt-shallow"
                ))
            })?;
            vpt::apply(g, deep, cfg.prompt_len)?;
        }
        m if m.starts_with("adapter-") => {
            let reduction = adaptformer::parse_method(m).ok_or_else(|| {
                PeftError::Config(format!(
                    "adapter method {m:?}: expected adapter-<reduction>"
                ))
            })?;
            adaptformer::apply(g, reduction)?;
        }
        m if m.starts_with("mlp-3-") => {
            let hidden = mlp::parse_method(m).ok_or_else(|| {
                PeftError::Config(format!("MLP-3 method {m:?}: expected mlp-3-<hidden>"))
            })?;
            mlp_hidden = Some(hidden);
        }
        m if m.starts_with("vp-") => {
            let pad = vp::parse_method(m)
                .ok_or_else(|| PeftError::Config(format!("VP method {m:?}: expected vp-<pad>")))?;
            vp::apply(g, pad)?;
        }
        _ if sel.is_some() => {}
        m => {
            return Err(PeftError::Config(format!(
                "unknown PEFT method {m:?} ({METHODS})"
            )))
        }
    }
    let mut from_ckpt = BTreeMap::new();
    let head_init = match checkpoint_head {
        // MLP-3's last layer reads the hidden activations: a new one, never the checkpoint's.
        Some((w, b)) if w.shape[0] == cfg.num_classes && mlp_hidden.is_none() => {
            from_ckpt.insert(head::WEIGHT.to_string(), w.clone());
            from_ckpt.insert(head::BIAS.to_string(), b.clone());
            head::HeadInit::Checkpoint { weight: w, bias: b }
        }
        _ => head::HeadInit::New {
            classes: cfg.num_classes,
        },
    };
    match mlp_hidden {
        Some(hidden) => {
            mlp::apply(g, hidden, cfg.num_classes)?;
        }
        None => head::apply(g, &head_init)?,
    }
    // After the head, so a checkpoint head the new one replaced is gone.
    if let Some(sel) = sel {
        select::apply(g, sel, method)?;
    }
    eptc_ir::verify(g)?;
    for (id, name, trainable) in g.params() {
        let Op::Param { init, .. } = &g.node(id).op else {
            unreachable!()
        };
        if trainable && *init == Init::Checkpoint && !from_ckpt.contains_key(name) {
            if let Some(t) = weights.get(name) {
                from_ckpt.insert(name.to_string(), t.clone());
            }
        }
    }
    adapter::init_values(g, seed, &from_ckpt)
}
