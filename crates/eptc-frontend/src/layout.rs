//! Checkpoint key layouts: timm, Hugging Face (ViTModel / ViTForImageClassification),
//! mmcls/mmpretrain. Each maps the logical weights of a ViT to the file's keys.

use std::fmt;

/// The key layout of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// timm `VisionTransformer` (`blocks.N.attn.qkv`, ...), with an optional prefix.
    Timm { prefix: String },
    /// Hugging Face `ViTModel` (prefix "") or `ViTForImageClassification` (prefix "vit.").
    Hf { prefix: String },
    /// mmcls / mmpretrain `VisionTransformer` (`backbone.layers.N.ln1`, ...).
    Mmcls { prefix: String },
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Timm { .. } => f.write_str("timm"),
            Layout::Hf { .. } => f.write_str("hf"),
            Layout::Mmcls { .. } => f.write_str("mmcls"),
        }
    }
}

/// Query, key and value projections: fused in one linear layer or three.
pub enum Qkv {
    Fused(String),
    Split([String; 3]),
}

/// The keys (without `.weight` / `.bias`) of one transformer block.
pub struct BlockKeys {
    pub norm1: String,
    pub qkv: Qkv,
    pub proj: String,
    pub norm2: String,
    pub fc1: String,
    pub fc2: String,
}

impl Layout {
    /// Detect the layout from the key names; `None` if none matches.
    pub fn detect<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Option<Layout> {
        let find = |suffix: &str| -> Option<String> {
            keys.clone()
                .find(|k| k.ends_with(suffix))
                .map(|k| k[..k.len() - suffix.len()].to_string())
        };
        if let Some(p) = find("encoder.layer.0.layernorm_before.weight") {
            return Some(Layout::Hf { prefix: p });
        }
        if let Some(p) = find("layers.0.ln1.weight") {
            return Some(Layout::Mmcls { prefix: p });
        }
        if let Some(p) = find("blocks.0.norm1.weight") {
            return Some(Layout::Timm { prefix: p });
        }
        None
    }

    pub fn prefix(&self) -> &str {
        match self {
            Layout::Timm { prefix } | Layout::Hf { prefix } | Layout::Mmcls { prefix } => prefix,
        }
    }

    /// The LayerNorm epsilon the layout's library uses by default.
    pub fn default_eps(&self) -> f32 {
        match self {
            Layout::Hf { .. } => 1e-12,
            _ => 1e-6,
        }
    }

    fn k(&self, s: &str) -> String {
        format!("{}{s}", self.prefix())
    }

    pub fn cls_token(&self) -> String {
        self.k(match self {
            Layout::Hf { .. } => "embeddings.cls_token",
            _ => "cls_token",
        })
    }

    pub fn pos_embed(&self) -> String {
        self.k(match self {
            Layout::Hf { .. } => "embeddings.position_embeddings",
            _ => "pos_embed",
        })
    }

    /// The patch-embedding convolution (without `.weight`).
    pub fn patch_embed(&self) -> String {
        self.k(match self {
            Layout::Timm { .. } => "patch_embed.proj",
            Layout::Hf { .. } => "embeddings.patch_embeddings.projection",
            Layout::Mmcls { .. } => "patch_embed.projection",
        })
    }

    /// The key prefix of block `i`, used to count blocks.
    pub fn block_probe(&self, i: usize) -> String {
        match self {
            Layout::Timm { .. } => self.k(&format!("blocks.{i}.norm1.weight")),
            Layout::Hf { .. } => self.k(&format!("encoder.layer.{i}.layernorm_before.weight")),
            Layout::Mmcls { .. } => self.k(&format!("layers.{i}.ln1.weight")),
        }
    }

    pub fn block(&self, i: usize) -> BlockKeys {
        match self {
            Layout::Timm { .. } => {
                let b = self.k(&format!("blocks.{i}."));
                BlockKeys {
                    norm1: format!("{b}norm1"),
                    qkv: Qkv::Fused(format!("{b}attn.qkv")),
                    proj: format!("{b}attn.proj"),
                    norm2: format!("{b}norm2"),
                    fc1: format!("{b}mlp.fc1"),
                    fc2: format!("{b}mlp.fc2"),
                }
            }
            Layout::Hf { .. } => {
                let b = self.k(&format!("encoder.layer.{i}."));
                BlockKeys {
                    norm1: format!("{b}layernorm_before"),
                    qkv: Qkv::Split([
                        format!("{b}attention.attention.query"),
                        format!("{b}attention.attention.key"),
                        format!("{b}attention.attention.value"),
                    ]),
                    proj: format!("{b}attention.output.dense"),
                    norm2: format!("{b}layernorm_after"),
                    fc1: format!("{b}intermediate.dense"),
                    fc2: format!("{b}output.dense"),
                }
            }
            Layout::Mmcls { .. } => {
                let b = self.k(&format!("layers.{i}."));
                BlockKeys {
                    norm1: format!("{b}ln1"),
                    qkv: Qkv::Fused(format!("{b}attn.qkv")),
                    proj: format!("{b}attn.proj"),
                    norm2: format!("{b}ln2"),
                    fc1: format!("{b}ffn.layers.0.0"),
                    fc2: format!("{b}ffn.layers.1"),
                }
            }
        }
    }

    /// The final LayerNorm.
    pub fn final_norm(&self) -> String {
        self.k(match self {
            Layout::Timm { .. } => "norm",
            Layout::Hf { .. } => "layernorm",
            Layout::Mmcls { .. } => "ln1",
        })
    }

    /// Candidate keys of the classification head (without `.weight`), most likely first.
    /// Heads live outside the backbone prefix in HF and mmcls files.
    pub fn head_candidates(&self) -> Vec<String> {
        match self {
            Layout::Timm { prefix } => vec![format!("{prefix}head")],
            Layout::Hf { .. } => vec!["classifier".into()],
            Layout::Mmcls { .. } => vec!["head.layers.head".into(), "head.fc".into()],
        }
    }
}
