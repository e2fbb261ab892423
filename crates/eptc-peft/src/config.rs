//! The PEFT configuration: what the user asked for, as recorded in manifests and in the
//! adapter's safetensors metadata (key `peft`, a JSON object).

use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// How the EPT prompt enters the attention logits (DESIGN.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EptMode {
    /// `softmax(concat(P, S))[:, L:]`: the official EPT.
    Cat,
    /// As `cat`, with the prompt row scaled by `max_j S_ij - min_j S_ij`.
    MultiCat,
    /// `softmax(S + P)`, `P` of shape `[N, N]`.
    Add,
    /// `softmax(S * P)`, `P` of shape `[N, N]`, initialised at 1.
    Mul,
}

impl EptMode {
    pub fn name(self) -> &'static str {
        match self {
            EptMode::Cat => "cat",
            EptMode::MultiCat => "multi-cat",
            EptMode::Add => "add",
            EptMode::Mul => "mul",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "cat" => EptMode::Cat,
            "multi-cat" => EptMode::MultiCat,
            "add" => EptMode::Add,
            "mul" => EptMode::Mul,
            _ => {
                return Err(PeftError::Config(format!(
                    "unknown EPT mode {s:?} (cat, multi-cat, add, mul)"
                )))
            }
        })
    }
}

/// How prompts are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptInit {
    /// Normal, std 0.02 (the official default).
    Normal,
    /// Uniform on [-0.08, 0.08].
    Uniform,
    Zero,
    /// Kaiming-normal with the official fan-in `N * L`.
    Kaiming,
    /// From the first batch's token embeddings: `P[i, k] = m[k mod dim]`, `m` the mean
    /// token embedding (equals the official code's when `L = dim`).
    Token,
}

impl PromptInit {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "normal" => PromptInit::Normal,
            "uniform" => PromptInit::Uniform,
            "zero" => PromptInit::Zero,
            "kaiming" => PromptInit::Kaiming,
            "token" => PromptInit::Token,
            _ => {
                return Err(PeftError::Config(format!(
                    "unknown prompt init {s:?} (normal, uniform, zero, kaiming, token)"
                )))
            }
        })
    }
}

/// The task the head is trained for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Sigmoid + binary cross-entropy per class.
    Multilabel,
    /// Softmax + cross-entropy.
    Multiclass,
}

/// The PEFT configuration of a compiled model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// `ept`, or `none` (the checkpoint as it is, plus the head).
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<EptMode>,
    /// Prompted layers, in the order the adapter's prompts follow.
    #[serde(default)]
    pub layers: Vec<usize>,
    #[serde(default)]
    pub prompt_len: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_init: Option<PromptInit>,
    pub num_classes: usize,
    pub task: Task,
}

/// Parse `--layers`: `a..b` (b excluded) or a comma list `0,2,5`; checked against `depth`.
pub fn parse_layers(spec: &str, depth: usize) -> Result<Vec<usize>> {
    let bad = |m: String| PeftError::Config(format!("--layers {spec:?}: {m}"));
    let num = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("{s:?} is not a layer index")))
    };
    let layers: Vec<usize> = if let Some((a, b)) = spec.split_once("..") {
        let (a, b) = (num(a)?, num(b)?);
        if a >= b {
            return Err(bad(format!("empty range {a}..{b}")));
        }
        (a..b).collect()
    } else {
        spec.split(',').map(num).collect::<Result<_>>()?
    };
    check_layers(&layers, depth).map_err(|e| bad(e.to_string()))?;
    Ok(layers)
}

/// Layers of `--depth`: `deep` = all, `shallow` = the first.
pub fn depth_layers(depth_flag: &str, depth: usize) -> Result<Vec<usize>> {
    match depth_flag {
        "deep" => Ok((0..depth).collect()),
        "shallow" => Ok(vec![0]),
        _ => Err(PeftError::Config(format!(
            "--depth {depth_flag:?}: expected shallow or deep"
        ))),
    }
}

/// Layers must be non-empty, distinct and below `depth`.
pub fn check_layers(layers: &[usize], depth: usize) -> Result<()> {
    if layers.is_empty() {
        return Err(PeftError::Config("no layer to prompt".into()));
    }
    for (i, &l) in layers.iter().enumerate() {
        if l >= depth {
            return Err(PeftError::Config(format!(
                "layer {l} out of range: the model has {depth} layers (0..{depth})"
            )));
        }
        if layers[..i].contains(&l) {
            return Err(PeftError::Config(format!("layer {l} listed twice")));
        }
    }
    Ok(())
}
