//! The artifact folder `eptc compile` writes and `eptc run` reads.
//!
//! ```text
//! ARTIFACT/
//!   manifest.json              what was compiled, from what, for which target
//!   imported.eptc  peft.eptc   the IR of each stage (text format, ir-specs/)
//!   optimized.eptc             what `run`, `eval` and `infer` execute
//!   train.eptc                 what `grad` and `train` execute (loss and gradients)
//!   plan.json                  the execution plan (schedule of the backend)
//!   adapter-init.safetensors   initial trainable tensors
//! ```

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use eptc_frontend::VitArch;
use eptc_ir::Graph;
use eptc_peft::PeftConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "manifest.json";
pub const ADAPTER_INIT: &str = "adapter-init.safetensors";
/// Frozen weights the optimizer folded, computed at compile time.
pub const FOLDED: &str = "folded.safetensors";
/// The stage the runtime executes.
pub const RUN_STAGE: &str = "optimized";
/// The stage training executes (forward, loss, gradients).
pub const TRAIN_STAGE: &str = "train";
/// Version of the artifact layout; 2 added the optimized stage, 3 the train stage.
pub const FORMAT: u32 = 3;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Architecture {
    pub layout: String,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub patch: usize,
    pub in_chans: usize,
    pub mlp_hidden: usize,
    pub qkv_bias: bool,
    pub layernorm_eps: f64,
    pub checkpoint_image_size: usize,
    pub image_size: usize,
    pub tokens: usize,
    pub checkpoint_head_classes: Option<usize>,
}

impl From<&VitArch> for Architecture {
    fn from(a: &VitArch) -> Self {
        Architecture {
            layout: a.layout.to_string(),
            dim: a.dim,
            depth: a.depth,
            heads: a.heads,
            patch: a.patch,
            in_chans: a.in_chans,
            mlp_hidden: a.mlp_hidden,
            qkv_bias: a.qkv_bias,
            // Through the shortest decimal so 1e-6 reads 1e-6 in the manifest.
            layernorm_eps: a.eps.to_string().parse().unwrap_or(a.eps as f64),
            checkpoint_image_size: a.checkpoint_image_size,
            image_size: a.image_size,
            tokens: a.tokens(),
            checkpoint_head_classes: a.head_classes,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OptimizerInfo {
    pub enabled: bool,
    pub iter_limit: usize,
    pub node_limit: usize,
    pub time_limit_s: f64,
    pub summary: Option<eptc_opt::Summary>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Manifest {
    pub format: u32,
    pub eptc_version: String,
    pub source: Source,
    pub architecture: Architecture,
    pub peft: PeftConfig,
    pub seed: u64,
    pub trainable_params: usize,
    pub frozen_params: usize,
    pub target: String,
    /// The plugin library of a plugin target (absolute path); `run`, `train`... load it
    /// from there. Absent for built-in backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PathBuf>,
    pub dtype: String,
    pub optimizer: OptimizerInfo,
    /// Stage name -> IR file in the artifact.
    pub stages: Vec<(String, String)>,
    pub plan: Option<String>,
    pub kernels: Vec<String>,
    pub adapter_init: String,
    /// The optimizer's folded weights, when it folded any.
    pub folded: Option<String>,
    pub outputs: Vec<String>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let p = dir.join(MANIFEST);
        let text = fs::read_to_string(&p).with_context(|| {
            format!(
                "{}: not an eptc artifact folder (no readable {MANIFEST})",
                dir.display()
            )
        })?;
        let bad = || format!("{}: malformed manifest", p.display());
        let v: serde_json::Value = serde_json::from_str(&text).with_context(bad)?;
        let format = v["format"].as_u64().unwrap_or(0);
        if format != FORMAT as u64 {
            bail!(
                "{}: artifact format {format}, this eptc reads {FORMAT}: recompile the model",
                p.display()
            );
        }
        let m: Manifest = serde_json::from_value(v).with_context(bad)?;
        // A plugin target: load its library again (the path the user named at compile).
        if let Some(lib) = &m.plugin {
            crate::backends::load_plugin(lib).with_context(|| {
                format!(
                    "{}: the artifact was compiled for plugin {:?}",
                    p.display(),
                    m.target
                )
            })?;
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(
            &dir.join(MANIFEST),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    /// The graph of stage `stage`, parsed from the artifact.
    pub fn stage_graph(&self, dir: &Path, stage: &str) -> Result<Graph> {
        let file = self
            .stages
            .iter()
            .find(|(s, _)| s == stage)
            .map(|(_, f)| dir.join(f))
            .with_context(|| format!("{}: the artifact has no {stage} stage", dir.display()))?;
        let text = fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
        eptc_ir::text::parse(&text).with_context(|| format!("{}", file.display()))
    }
}

/// Write a file atomically: a temporary file beside it, flushed to the disk, then renamed
/// over `path`. A crash or a full disk leaves the previous `path` as it was, and a failed
/// write removes its temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot write {} (the previous file, if any, is intact)",
                path.display()
            )
        });
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    eptc_frontend::sync_parent(path);
    Ok(())
}

/// SHA-256 and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("{}", path.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, n))
}
