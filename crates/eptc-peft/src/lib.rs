//! eptc's PEFT passes. A pass rewrites the imported graph, adding trainable params
//! tagged with the pass's name so snapshots show what it did:
//!
//! - [`ept`]: Embedded Prompt Tuning (modes cat, multi-cat, add, mul; any layer set);
//! - [`head`]: the trainable classification head;
//! - [`apply`]: the pipeline `ept` (or nothing, for `none`) then `head`.

pub mod adapter;
pub mod config;
pub mod ept;
pub mod error;
pub mod head;

use std::collections::BTreeMap;

pub use config::{EptMode, PeftConfig, PromptInit, Task};
use eptc_ir::{Graph, HostTensor};
pub use error::{PeftError, Result};

/// Apply the PEFT method of `cfg` and the head to `g`. `checkpoint_head` holds the
/// checkpoint's head `(weight, bias)` to start from when the head keeps its classes.
/// Returns the initial values of every trainable param.
pub fn apply(
    g: &mut Graph,
    cfg: &PeftConfig,
    checkpoint_head: Option<(HostTensor, HostTensor)>,
    seed: u64,
) -> Result<BTreeMap<String, HostTensor>> {
    match cfg.method.as_str() {
        "ept" => {
            let mode = cfg.mode.unwrap_or(EptMode::Cat);
            let init = cfg.prompt_init.unwrap_or(PromptInit::Normal);
            ept::apply(g, mode, &cfg.layers, cfg.prompt_len, init)?;
        }
        "none" => {}
        m => {
            return Err(PeftError::Config(format!(
                "unknown PEFT method {m:?} (ept, none)"
            )))
        }
    }
    let mut from_ckpt = BTreeMap::new();
    let head_init = match checkpoint_head {
        Some((w, b)) if w.shape[0] == cfg.num_classes => {
            from_ckpt.insert(head::WEIGHT.to_string(), w.clone());
            from_ckpt.insert(head::BIAS.to_string(), b.clone());
            head::HeadInit::Checkpoint { weight: w, bias: b }
        }
        _ => head::HeadInit::New {
            classes: cfg.num_classes,
        },
    };
    head::apply(g, &head_init)?;
    eptc_ir::verify(g)?;
    adapter::init_values(g, seed, &from_ckpt)
}
