//! Command-line arguments shared by several commands.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use eptc_frontend::{ImportOptions, VitArch};
use eptc_peft::config::{depth_layers, parse_layers};
use eptc_peft::{EptMode, PeftConfig, PromptInit, Task};

/// How to read the checkpoint where the file cannot tell.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// Attention heads [default: config.json beside a Hugging Face file, else width/64]
    #[arg(long)]
    pub heads: Option<usize>,
    /// LayerNorm epsilon [default: 1e-6 for timm and mmcls, 1e-12 for Hugging Face]
    #[arg(long)]
    pub eps: Option<f32>,
    /// Input image size in pixels; position embeddings are resized (bicubic) when it
    /// differs from the checkpoint's [default: the checkpoint's]
    #[arg(long)]
    pub image_size: Option<usize>,
}

impl ModelArgs {
    pub fn import_options(&self) -> ImportOptions {
        ImportOptions {
            heads: self.heads,
            eps: self.eps,
            image_size: self.image_size,
        }
    }
}

/// Bounds of the equality-saturation optimizer.
#[derive(Args, Debug, Clone)]
pub struct OptArgs {
    /// Run the graph as the PEFT pass left it, without the optimizer
    #[arg(long)]
    pub no_optimize: bool,
    /// Optimizer: most saturation iterations
    #[arg(long, default_value_t = 30)]
    pub opt_iter_limit: usize,
    /// Optimizer: most e-graph nodes
    #[arg(long, default_value_t = 200_000)]
    pub opt_node_limit: usize,
    /// Optimizer: most seconds of saturation
    #[arg(long, default_value_t = 10.0)]
    pub opt_time_limit: f64,
}

impl Default for OptArgs {
    fn default() -> Self {
        let l = eptc_opt::Limits::default();
        OptArgs {
            no_optimize: false,
            opt_iter_limit: l.iterations,
            opt_node_limit: l.nodes,
            opt_time_limit: l.time.as_secs_f64(),
        }
    }
}

impl OptArgs {
    pub fn limits(&self) -> Result<eptc_opt::Limits> {
        if !(self.opt_time_limit.is_finite() && self.opt_time_limit > 0.0) {
            bail!("--opt-time-limit must be a positive number of seconds");
        }
        Ok(eptc_opt::Limits {
            iterations: self.opt_iter_limit,
            nodes: self.opt_node_limit,
            time: std::time::Duration::from_secs_f64(self.opt_time_limit),
        })
    }
}

/// The fine-tuning method and its options.
#[derive(Args, Debug, Clone)]
pub struct PeftArgs {
    /// Fine-tuning method: `ept` (Embedded Prompt Tuning); `full` (every weight),
    /// `linear` (the head only), `partial-k` (the last --k blocks, the final norm and the
    /// head), `bias` (every bias term and the head: BitFit), `lora` (rank --rank factors
    /// on the query and value projections of every block, and the head), `vpt` (Visual
    /// Prompt Tuning: --prompt-len prompt tokens after the class token, --depth deep or
    /// shallow, and the head), `adapter` (AdaptFormer: a width / --reduction bottleneck
    /// beside every block's MLP, and the head), `mlp-3` (the head replaced by
    /// Linear(D, --hidden) → ReLU → Linear → ReLU → Linear(--hidden, classes)), `vp` (visual prompting: a
    /// learnable --pad-size pixel frame added to the image, and the head); `none` (as
    /// `linear`)
    #[arg(long, default_value = "ept")]
    pub peft: String,
    /// Blocks `partial-k` trains (the last k; the paper's Partial-1 is k = 1)
    #[arg(long, default_value_t = 1)]
    pub k: usize,
    /// Rank r of `lora`'s factors (the paper uses 1, 4, 8, 32, 64)
    #[arg(long, default_value_t = eptc_peft::lora::DEFAULT_RANK)]
    pub rank: usize,
    /// `lora`'s alpha: the update is scaled by alpha / r [default: r, i.e. scale 1]
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// `adapter`'s reduction factor: the bottleneck is width / reduction wide
    #[arg(long, default_value_t = eptc_peft::adaptformer::DEFAULT_REDUCTION)]
    pub reduction: usize,
    /// `mlp-3`'s hidden width [default: the model's width D]
    #[arg(long)]
    pub hidden: Option<usize>,
    /// `vp`'s frame width in pixels (VP's 30 is for 224 px; it must be under half the
    /// image size)
    #[arg(long, default_value_t = eptc_peft::vp::DEFAULT_PAD)]
    pub pad_size: usize,
    /// How prompts enter the attention: cat (official EPT), multi-cat (prompt rows scaled
    /// by each logit row's max - min), add or mul (an [N, N] prompt added to / multiplied
    /// with the logits)
    #[arg(long, default_value = "cat")]
    pub ept_mode: String,
    /// Prompted layers: a range `a..b` (b excluded) or a list `0,2,5`; the adapter's
    /// prompts follow this order. Overrides --depth
    #[arg(long)]
    pub layers: Option<String>,
    /// `deep`: prompt every layer; `shallow`: the first only
    #[arg(long, default_value = "deep")]
    pub depth: String,
    /// Prompt length L (ignored by add/mul, whose prompt is [N, N])
    #[arg(long, default_value_t = 100)]
    pub prompt_len: usize,
    /// Prompt initialisation: normal (std 0.02), uniform (±0.08), zero, kaiming, token
    /// (from the mean token embedding of --init-input)
    #[arg(long, default_value = "normal")]
    pub prompt_init: String,
    /// A batch of `pixel_values` (safetensors) for `--prompt-init token`
    #[arg(long)]
    pub init_input: Option<PathBuf>,
    /// Classes of the new head [default: keep the checkpoint's head and its classes]
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// multilabel (sigmoid + BCE) or multiclass (softmax + cross-entropy)
    #[arg(long, default_value = "multiclass")]
    pub task: String,
    /// Seed of the adapter's random initialisation
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl PeftArgs {
    /// The PEFT configuration for a model of architecture `arch`.
    pub fn config(&self, arch: &VitArch) -> Result<PeftConfig> {
        let num_classes = match (self.num_classes, arch.head_classes) {
            (Some(c), _) => c,
            (None, Some(c)) => c,
            (None, None) => bail!("the checkpoint has no classification head: pass --num-classes"),
        };
        let task = match self.task.as_str() {
            "multilabel" => Task::Multilabel,
            "multiclass" => Task::Multiclass,
            t => bail!("--task {t:?}: expected multilabel or multiclass"),
        };
        if self.peft == "partial-k" {
            eptc_peft::select::check_k(self.k, arch.depth)?;
        }
        match self.peft.as_str() {
            m @ ("none" | "linear" | "full" | "bias" | "partial-k" | "lora" | "adapter"
            | "mlp-3" | "vp") => {
                Ok(PeftConfig {
                    // The config names Partial-k by its k (`partial-1`), LoRA by its rank and
                    // alpha (`lora-8`, `lora-8-alpha-16`).
                    method: match m {
                        "partial-k" => format!("partial-{}", self.k),
                        "lora" => {
                            let alpha = self.lora_alpha.unwrap_or(self.rank as f32);
                            eptc_peft::lora::check(self.rank, alpha)?;
                            eptc_peft::lora::method_name(self.rank, alpha)
                        }
                        "adapter" => {
                            eptc_peft::adaptformer::check(self.reduction, arch.dim)?;
                            eptc_peft::adaptformer::method_name(self.reduction)
                        }
                        "mlp-3" => {
                            let hidden = self.hidden.unwrap_or(arch.dim);
                            eptc_peft::mlp::check(hidden)?;
                            eptc_peft::mlp::method_name(hidden)
                        }
                        "vp" => {
                            let px = arch.image_size;
                            eptc_peft::vp::check(self.pad_size, px, px)?;
                            eptc_peft::vp::method_name(self.pad_size)
                        }
                        m => m.to_string(),
                    },
                    mode: None,
                    layers: vec![],
                    prompt_len: 0,
                    prompt_init: None,
                    num_classes,
                    task,
                })
            }
            "vpt" => {
                let deep = match self.depth.as_str() {
                    "deep" => true,
                    "shallow" => false,
                    d => bail!("--depth {d:?}: expected deep or shallow"),
                };
                if self.prompt_len == 0 {
                    bail!("--prompt-len must be at least 1");
                }
                Ok(PeftConfig {
                    method: eptc_peft::vpt::method_name(deep).into(),
                    mode: None,
                    layers: vec![],
                    prompt_len: self.prompt_len,
                    prompt_init: None,
                    num_classes,
                    task,
                })
            }
            "ept" => {
                let mode = EptMode::parse(&self.ept_mode)?;
                let layers = match &self.layers {
                    Some(spec) => parse_layers(spec, arch.depth)?,
                    None => depth_layers(&self.depth, arch.depth)?,
                };
                let prompt_len = match mode {
                    EptMode::Cat | EptMode::MultiCat => {
                        if self.prompt_len == 0 {
                            bail!("--prompt-len must be at least 1");
                        }
                        self.prompt_len
                    }
                    EptMode::Add | EptMode::Mul => arch.tokens(),
                };
                let init = PromptInit::parse(&self.prompt_init)?;
                if init == PromptInit::Token && self.init_input.is_none() {
                    bail!("--prompt-init token needs --init-input FILE: a batch of pixel_values whose mean token embedding initialises the prompts");
                }
                Ok(PeftConfig {
                    method: "ept".into(),
                    mode: Some(mode),
                    layers,
                    prompt_len,
                    prompt_init: Some(init),
                    num_classes,
                    task,
                })
            }
            _ => bail!(
                "--peft {:?}: expected one of {}",
                self.peft,
                eptc_peft::METHODS
            ),
        }
    }
}
