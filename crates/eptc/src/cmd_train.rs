//! `eptc grad`, `eptc train`, `eptc eval`, `eptc infer` and `eptc gen-data`: the
//! training runtime on top of an artifact's `train` (loss + gradients) and `optimized`
//! (forward) stages.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use eptc_backend::Executable;
use eptc_frontend::{write_tensors, TensorFile};
use eptc_ir::HostTensor;
use eptc_runtime::data::{self, Dataset, Entry, Label, LoaderConfig, Normalize, Task};
use eptc_runtime::metrics::{self, Metrics};
use eptc_runtime::optim::{cosine_lr, Kind, Optimizer};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::artifact::{self, Manifest, RUN_STAGE, TRAIN_STAGE};
use crate::cmd_compile::{load_parts, write_adapter, Parts};

fn task_of(m: &Manifest) -> Task {
    match m.peft.task {
        eptc_peft::Task::Multilabel => Task::MultiLabel,
        eptc_peft::Task::Multiclass => Task::MultiClass,
    }
}

// ---- eptc grad -------------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct GradArgs {
    /// Artifact folder written by `eptc compile`
    pub artifact: PathBuf,
    /// Batch file (safetensors): `pixel_values` f32 [B, 3, H, W] (normalised) and
    /// `labels`, multi-hot f32 [B, C] or class ids [B]
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write `loss` and `grad.<name>` for every trainable tensor (adapter layout:
    /// `grad.ept.prompts` [layers, N, L], `grad.head.weight`, `grad.head.bias`)
    #[arg(long)]
    pub output: PathBuf,
    /// Adapter to differentiate at [default: the artifact's adapter-init]
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Worker threads [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the summary as one JSON object
    #[arg(long)]
    pub json: bool,
}

/// Labels from a batch file as rows `[B, C]`: multi-hot rows as they are, class ids
/// turned into one-hot rows. Errors name the file.
fn label_rows(path: &Path, t: &HostTensor, batch: usize, classes: usize) -> Result<HostTensor> {
    let bad = |m: String| anyhow::anyhow!("{}: labels {m}", path.display());
    match t.shape.as_slice() {
        [b, c] if *b == batch && *c == classes => {
            if t.data().iter().any(|v| !v.is_finite()) {
                return Err(bad("contain NaN or Inf".into()));
            }
            Ok(t.clone())
        }
        [b] if *b == batch => {
            let mut rows = vec![0.0; batch * classes];
            for (i, &v) in t.data().iter().enumerate() {
                if v.fract() != 0.0 || v < 0.0 || v as usize >= classes {
                    return Err(bad(format!(
                        "[{i}] = {v} is not a class id in 0..{classes}"
                    )));
                }
                rows[i * classes + v as usize] = 1.0;
            }
            Ok(HostTensor::new(vec![batch, classes], rows))
        }
        s => Err(bad(format!(
            "have shape {s:?}: expected multi-hot [{batch}, {classes}] or class ids [{batch}]"
        ))),
    }
}

/// Gradients by graph param name, stacked into the adapter file layout and prefixed.
fn grads_to_file(outs: &[(String, HostTensor)]) -> Vec<(String, HostTensor)> {
    let by_param: BTreeMap<String, HostTensor> = outs
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("grad.").map(|p| (p.to_string(), v.clone())))
        .collect();
    eptc_peft::adapter::to_file(&by_param)
        .into_iter()
        .map(|(k, v)| (format!("grad.{k}"), v))
        .collect()
}

pub fn cmd_grad(a: &GradArgs) -> Result<()> {
    let parts = load_parts(&a.artifact, a.adapter.as_deref())?;
    let m = &parts.manifest;
    let f = TensorFile::read(&a.input)?;
    let pixels = f.get("pixel_values", "[B, 3, H, W]")?;
    let ar = &m.architecture;
    let want = [ar.in_chans, ar.image_size, ar.image_size];
    if pixels.shape.len() != 4 || pixels.shape[1..] != want {
        bail!(
            "{}: pixel_values has shape {:?}, the artifact takes [B, {}, {}, {}]",
            a.input.display(),
            pixels.shape,
            want[0],
            want[1],
            want[2]
        );
    }
    let batch = pixels.shape[0];
    let labels = f.get("labels", "[B, C] or [B]")?;
    let labels = label_rows(&a.input, labels, batch, m.peft.num_classes)?;
    let mut exe = parts.executable(&a.artifact, TRAIN_STAGE, a.threads)?;
    let t0 = Instant::now();
    let outs = exe.run(&[("pixel_values", pixels.clone()), ("labels", labels)])?;
    let secs = t0.elapsed().as_secs_f64();
    let loss = outs
        .iter()
        .find(|(k, _)| k == eptc_autodiff::loss::LOSS)
        .map(|(_, v)| v.clone())
        .context("the train stage has no loss output")?;
    let mut tensors = vec![("loss".to_string(), loss.clone())];
    tensors.extend(grads_to_file(&outs));
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_tensors(&a.output, &refs, None)?;
    let norms: Vec<(String, f64)> = tensors[1..]
        .iter()
        .map(|(k, v)| {
            let n = v.data().iter().map(|x| f64::from(*x).powi(2)).sum::<f64>();
            (k.clone(), n.sqrt())
        })
        .collect();
    if a.json {
        let norms: serde_json::Map<String, serde_json::Value> =
            norms.into_iter().map(|(k, v)| (k, json!(v))).collect();
        println!(
            "{}",
            json!({"loss": loss.data()[0], "batch": batch, "seconds": secs,
                   "grad_norms": norms, "output": a.output, "target": m.target})
        );
    } else {
        println!(
            "loss {:.6} on {batch} image(s) ({} on {}, {:.3} s); wrote {}",
            loss.data()[0],
            if m.peft.task == eptc_peft::Task::Multilabel {
                "sigmoid + BCE"
            } else {
                "softmax + cross-entropy"
            },
            m.target,
            secs,
            a.output.display()
        );
        for (k, n) in norms {
            println!("  {k:24} |g| = {n:.6e}");
        }
    }
    Ok(())
}

// ---- shared: data options, prediction ---------------------------------------------------

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Folder the annotation files' image paths are relative to
    #[arg(long)]
    pub data: PathBuf,
    /// Per-channel mean for normalisation (RGB, pixels in [0, 1])
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [0.485, 0.456, 0.406])]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation for normalisation
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [0.229, 0.224, 0.225])]
    pub std: Vec<f32>,
    /// Threads decoding and transforming images (ahead of the backend)
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Backend worker threads [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
}

impl DataArgs {
    pub(crate) fn normalize(&self) -> Result<Normalize> {
        if self.std.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
            bail!("--std {:?}: every value must be positive", self.std);
        }
        Ok(Normalize {
            mean: [self.mean[0], self.mean[1], self.mean[2]],
            std: [self.std[0], self.std[1], self.std[2]],
        })
    }
}

pub(crate) fn open_dataset(dir: &Path, ann: &Path, m: &Manifest) -> Result<Arc<Dataset>> {
    Ok(Arc::new(Dataset::open(
        dir,
        ann,
        task_of(m),
        m.peft.num_classes,
    )?))
}

/// Scores as the task reads them: sigmoid (multi-label) or softmax (multi-class) of the
/// logits, row by row.
fn scores(logits: &[f32], classes: usize, task: Task) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        match task {
            Task::MultiLabel => out.extend(row.iter().map(|&x| 1.0 / (1.0 + (-x).exp()))),
            Task::MultiClass => {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
                let s: f32 = e.iter().sum();
                out.extend(e.iter().map(|v| v / s));
            }
        }
    }
    out
}

/// Run the forward graph over a data set (evaluation transform, in order); returns the
/// logits `[n, C]`.
fn predict(
    exe: &mut dyn Executable,
    ds: &Arc<Dataset>,
    cfg: &LoaderConfig,
    progress: Option<&ProgressBar>,
) -> Result<Vec<f32>> {
    let s = cfg.image_size as usize;
    let mut logits = Vec::with_capacity(ds.len() * ds.classes);
    for batch in data::epoch(ds.clone(), cfg, 0) {
        let batch = batch?;
        let n = batch.len();
        let px = HostTensor::new(vec![n, 3, s, s], batch.pixels);
        let outs = exe.run(&[("pixel_values", px)])?;
        let l = outs
            .iter()
            .find(|(k, _)| k == "logits")
            .context("the artifact has no logits output")?;
        logits.extend_from_slice(l.1.data());
        if let Some(p) = progress {
            p.inc(n as u64);
        }
    }
    Ok(logits)
}

/// Metrics of logits against a labeled data set.
fn evaluate(logits: &[f32], ds: &Dataset) -> Result<Metrics> {
    if !ds.labeled() {
        bail!(
            "{}: has unlabeled lines; evaluation needs a label on every line",
            ds.ann.display()
        );
    }
    let (rows, ids) = ds.targets();
    let onehot: Vec<bool> = rows.iter().map(|&v| v > 0.5).collect();
    let sc = scores(logits, ds.classes, ds.task);
    Ok(metrics::evaluate(&sc, &onehot, ds.classes, ids.as_deref()))
}

/// The figure that picks the best epoch: mAP (multi-label) or accuracy (multi-class).
fn headline(m: &Metrics, task: Task) -> f64 {
    match task {
        Task::MultiLabel => m.map,
        Task::MultiClass => m.accuracy.unwrap_or(0.0),
    }
}

fn metric_name(task: Task) -> &'static str {
    match task {
        Task::MultiLabel => "mAP",
        Task::MultiClass => "accuracy",
    }
}

/// Console output of `train` and `eval` (progress bars, epoch lines) switched off:
/// `eptc protocol` runs many of them and prints one line per cell instead. The run
/// folder's files (`train.log`, `metrics.jsonl`...) are written as always.
static QUIET: AtomicBool = AtomicBool::new(false);

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// `print!` / `println!` unless [`set_quiet`].
macro_rules! say {
    ($($t:tt)*) => { if !quiet() { print!($($t)*); } };
}
macro_rules! sayln {
    ($($t:tt)*) => { if !quiet() { println!($($t)*); } };
}

pub(crate) fn bar(len: u64, prefix: String) -> ProgressBar {
    if quiet() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

// ---- eptc train ------------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Artifact folder written by `eptc compile`
    pub artifact: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Annotation file of the training images (MedFMC layout)
    #[arg(long)]
    pub train: PathBuf,
    /// Annotation file of the validation images, evaluated after every epoch
    #[arg(long)]
    pub val: PathBuf,
    /// Run folder: best.safetensors, last.safetensors, metrics.jsonl, train.log, state
    #[arg(short, long)]
    pub output: PathBuf,
    /// Adapter to start from [default: the artifact's adapter-init]
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Passes over the training images (the paper: 20)
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Images per step (the paper: 4); the last batch of an epoch may be smaller
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Base learning rate (the paper: 6e-4)
    #[arg(long, default_value_t = 6e-4)]
    pub lr: f64,
    /// sgd (momentum, L2 weight decay) or adamw (decoupled weight decay)
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// SGD momentum (the paper: 0.9)
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// Weight decay on every trainable tensor (the paper: 1e-4)
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f32,
    /// cosine (annealed to 0 over the run) or constant
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Linear warm-up over this many steps (batches)
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Seed of the shuffling and the augmentation (runs on the CPU backend are
    /// bit-reproducible)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train on resized images without RandomResizedCrop and flips
    #[arg(long)]
    pub no_augment: bool,
    /// Continue the run in --output from its last completed epoch
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many epochs of this invocation (continue later with --resume)
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Batch size of the validation pass
    #[arg(long, default_value_t = 16)]
    pub eval_batch_size: usize,
}

/// What a run's settings must keep across `--resume`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct RunConfig {
    artifact_sha256: String,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    optimizer: Kind,
    schedule: String,
    warmup: usize,
    seed: u64,
    augment: bool,
    train: PathBuf,
}

/// The resumable state, written atomically after every epoch.
#[derive(Serialize, Deserialize, Debug)]
struct RunState {
    config: RunConfig,
    /// Epochs completed.
    epoch: usize,
    step: usize,
    best: Option<(usize, f64)>,
    optimizer_steps: u64,
    history: Vec<serde_json::Value>,
}

const STATE: &str = "state.safetensors";

/// Named f32 vectors (parameters, optimizer buffers).
type Named = BTreeMap<String, Vec<f32>>;

fn save_state(
    dir: &Path,
    st: &RunState,
    params: &BTreeMap<String, Vec<f32>>,
    opt: &Optimizer,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<()> {
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    for (k, v) in params {
        tensors.push((
            format!("param.{k}"),
            HostTensor::new(shapes[k].clone(), v.clone()),
        ));
    }
    for (k, v) in &opt.state {
        tensors.push((
            format!("optim.{k}"),
            HostTensor::new(vec![v.len()], v.clone()),
        ));
    }
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let meta = HashMap::from([("run".to_string(), serde_json::to_string(st)?)]);
    write_tensors(&dir.join(STATE), &refs, Some(meta))?;
    Ok(())
}

fn load_state(dir: &Path) -> Result<(RunState, Named, Named)> {
    let path = dir.join(STATE);
    if !path.exists() {
        bail!(
            "{}: nothing to resume (no completed epoch was saved there)",
            path.display()
        );
    }
    let f = TensorFile::read(&path)?;
    let st: RunState = serde_json::from_str(
        f.metadata
            .get("run")
            .with_context(|| format!("{}: no run metadata", path.display()))?,
    )
    .with_context(|| format!("{}: malformed run metadata", path.display()))?;
    let mut params = BTreeMap::new();
    let mut optim = BTreeMap::new();
    for (k, v) in &f.tensors {
        if let Some(p) = k.strip_prefix("param.") {
            params.insert(p.to_string(), v.data().to_vec());
        } else if let Some(p) = k.strip_prefix("optim.") {
            optim.insert(p.to_string(), v.data().to_vec());
        }
    }
    Ok((st, params, optim))
}

fn to_values(
    params: &BTreeMap<String, Vec<f32>>,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> BTreeMap<String, HostTensor> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), HostTensor::new(shapes[k].clone(), v.clone())))
        .collect()
}

pub fn cmd_train(a: &TrainArgs) -> Result<()> {
    if a.batch_size == 0 || a.eval_batch_size == 0 {
        bail!("--batch-size and --eval-batch-size must be at least 1");
    }
    if a.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr {}: must be a positive number", a.lr);
    }
    let kind = match a.optimizer.as_str() {
        "sgd" => Kind::Sgd {
            momentum: a.momentum,
            weight_decay: a.weight_decay,
        },
        "adamw" => Kind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: a.weight_decay,
        },
        o => bail!("--optimizer {o:?}: expected sgd or adamw"),
    };
    if !["cosine", "constant"].contains(&a.schedule.as_str()) {
        bail!("--schedule {:?}: expected cosine or constant", a.schedule);
    }
    let parts = load_parts(&a.artifact, a.adapter.as_deref())?;
    let m = parts.manifest.clone();
    let task = task_of(&m);
    let norm = a.data.normalize()?;
    let size = m.architecture.image_size as u32;
    let train_ds = open_dataset(&a.data.data, &a.train, &m)?;
    let val_ds = open_dataset(&a.data.data, &a.val, &m)?;
    if !train_ds.labeled() {
        bail!(
            "{}: training needs a label on every line",
            a.train.display()
        );
    }
    let mut train_cfg = LoaderConfig::train(a.batch_size, size, a.seed);
    train_cfg.norm = norm;
    train_cfg.augment = !a.no_augment;
    train_cfg.workers = a.data.workers;
    let mut val_cfg = LoaderConfig::eval(a.eval_batch_size, size);
    val_cfg.norm = norm;
    val_cfg.workers = a.data.workers;

    let config = RunConfig {
        artifact_sha256: artifact::hash_file(&a.artifact.join(artifact::MANIFEST))?.0,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        optimizer: kind,
        schedule: a.schedule.clone(),
        warmup: a.warmup,
        seed: a.seed,
        augment: !a.no_augment,
        train: a.train.clone(),
    };
    let shapes: BTreeMap<String, Vec<usize>> = parts
        .values
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    fs::create_dir_all(&a.output)
        .with_context(|| format!("cannot create the run folder {}", a.output.display()))?;
    let mut params: BTreeMap<String, Vec<f32>> = parts
        .values
        .iter()
        .map(|(k, v)| (k.clone(), v.data().to_vec()))
        .collect();
    let mut opt = Optimizer::new(kind);
    let mut st = RunState {
        config: config.clone(),
        epoch: 0,
        step: 0,
        best: None,
        optimizer_steps: 0,
        history: vec![],
    };
    if a.resume {
        let (saved, p, o) = load_state(&a.output)?;
        if saved.config != config {
            bail!(
                "{}: the run was started with other settings ({}); resume with the same artifact, data and options",
                a.output.join(STATE).display(),
                serde_json::to_string(&saved.config)?
            );
        }
        for (k, v) in &p {
            match params.get(k) {
                Some(cur) if cur.len() == v.len() => {}
                _ => bail!(
                    "{}: parameter {k:?} does not fit the artifact",
                    a.output.join(STATE).display()
                ),
            }
        }
        params = p;
        opt.state = o;
        opt.steps = saved.optimizer_steps;
        st = saved;
        if st.epoch >= a.epochs {
            sayln!(
                "{}: all {} epochs are done; nothing to resume",
                a.output.display(),
                a.epochs
            );
            return Ok(());
        }
        sayln!("resuming {} after epoch {}", a.output.display(), st.epoch);
    } else if a.output.join(STATE).exists() {
        bail!(
            "{}: already holds a run; pass --resume to continue it, or choose another --output",
            a.output.display()
        );
    }

    let mut train_exe = parts.executable(&a.artifact, TRAIN_STAGE, a.data.threads)?;
    let mut eval_exe = parts.executable(&a.artifact, RUN_STAGE, a.data.threads)?;
    let steps_per_epoch = data::epoch(train_ds.clone(), &train_cfg, 0).num_batches();
    let total = steps_per_epoch * a.epochs;
    let metric_name = metric_name(task);
    let mut log = fs::read_to_string(a.output.join("train.log")).unwrap_or_default();
    if !a.resume {
        log.clear();
        let _ = writeln!(
            log,
            "eptc train {} | {} train / {} val images | {} epochs x {} steps, batch {}, {} lr {} ({}), seed {}",
            a.artifact.display(),
            train_ds.len(),
            val_ds.len(),
            a.epochs,
            steps_per_epoch,
            a.batch_size,
            a.optimizer,
            a.lr,
            a.schedule,
            a.seed
        );
        say!("{log}");
    }
    let s = size as usize;
    let classes = m.peft.num_classes;
    let first_epoch = st.epoch;
    let mut run_epochs = 0;
    // Fault injection for the tests of the non-finite-loss path (tests/robustness.rs):
    // the loss of this (1-based, run-wide) step reads as NaN.
    let fault_nan_at: Option<usize> = std::env::var("EPTC_FAULT_NAN_LOSS_AT_STEP")
        .ok()
        .and_then(|v| v.parse().ok());
    for epoch in first_epoch..a.epochs {
        let t0 = Instant::now();
        let pb = bar(
            steps_per_epoch as u64,
            format!("epoch {:>2}/{}", epoch + 1, a.epochs),
        );
        let mut loss_sum = 0.0f64;
        let mut seen = 0usize;
        let mut lr = a.lr;
        for batch in data::epoch(train_ds.clone(), &train_cfg, epoch as u64) {
            let batch = batch?;
            let n = batch.len();
            lr = match a.schedule.as_str() {
                "cosine" => cosine_lr(a.lr, st.step, total, a.warmup),
                _ if st.step < a.warmup => a.lr * (st.step + 1) as f64 / a.warmup as f64,
                _ => a.lr,
            };
            for (k, v) in &params {
                train_exe.set_param(k, HostTensor::new(shapes[k].clone(), v.clone()))?;
            }
            let px = HostTensor::new(vec![n, 3, s, s], batch.pixels);
            let lab = HostTensor::new(vec![n, classes], batch.labels);
            let outs = train_exe.run(&[("pixel_values", px), ("labels", lab)])?;
            let mut grads = BTreeMap::new();
            let mut loss = f64::NAN;
            for (k, v) in outs {
                if k == eptc_autodiff::loss::LOSS {
                    loss = f64::from(v.data()[0]);
                } else if let Some(p) = k.strip_prefix("grad.") {
                    grads.insert(p.to_string(), v.data().to_vec());
                }
            }
            if fault_nan_at == Some(st.step + 1) {
                loss = f64::NAN;
            }
            if !loss.is_finite() || grads.values().flatten().any(|g| !g.is_finite()) {
                pb.abandon();
                bail!(
                    "the loss or a gradient is not finite at epoch {} step {} (lr {lr:.3e}); stopped. {}",
                    epoch + 1,
                    st.step + 1,
                    if st.epoch > 0 {
                        format!(
                            "The last good checkpoint is {} (epoch {}).",
                            a.output.join("last.safetensors").display(),
                            st.epoch
                        )
                    } else {
                        "No epoch had completed, so no checkpoint was written.".into()
                    }
                );
            }
            opt.step(lr as f32, &mut params, &grads)
                .map_err(|e| anyhow::anyhow!("optimizer: {e}"))?;
            st.step += 1;
            loss_sum += loss * n as f64;
            seen += n;
            let ips = seen as f64 / t0.elapsed().as_secs_f64();
            pb.set_message(format!(
                "loss {:.4} lr {lr:.2e} {ips:.1} img/s",
                loss_sum / seen as f64
            ));
            pb.inc(1);
        }
        pb.finish_and_clear();
        let train_secs = t0.elapsed().as_secs_f64();
        // Validation.
        let values = to_values(&params, &shapes);
        for (k, v) in &values {
            eval_exe.set_param(k, v.clone())?;
        }
        let logits = predict(eval_exe.as_mut(), &val_ds, &val_cfg, None)?;
        let met = evaluate(&logits, &val_ds)?;
        let score = headline(&met, task);
        st.epoch = epoch + 1;
        st.optimizer_steps = opt.steps;
        let improved = st.best.is_none_or(|(_, b)| score > b);
        // Adapters first, then the state that points past them: a crash in between
        // resumes from the previous epoch and rewrites the same files.
        write_adapter(&a.output.join("last.safetensors"), &values, &m.peft)?;
        if improved {
            st.best = Some((st.epoch, score));
            write_adapter(&a.output.join("best.safetensors"), &values, &m.peft)?;
        }
        let line = json!({
            "epoch": st.epoch, "steps": st.step, "train_loss": loss_sum / seen.max(1) as f64,
            "lr": lr, "train_seconds": train_secs, "train_img_per_s": seen as f64 / train_secs,
            "val": met, "best": improved,
        });
        st.history.push(line.clone());
        save_state(&a.output, &st, &params, &opt, &shapes)?;
        let jsonl: String = st.history.iter().map(|l| format!("{l}\n")).collect();
        artifact::write_atomic(&a.output.join("metrics.jsonl"), jsonl.as_bytes())?;
        let msg = format!(
            "epoch {:>2}/{}: loss {:.4}, lr {lr:.2e}, {:.1} img/s | val {metric_name} {score:.2}{}{}\n",
            st.epoch,
            a.epochs,
            loss_sum / seen.max(1) as f64,
            seen as f64 / train_secs,
            met.auc.map(|x| format!(", AUC {x:.2}")).unwrap_or_default(),
            if improved { " (best)" } else { "" }
        );
        say!("{msg}");
        log.push_str(&msg);
        artifact::write_atomic(&a.output.join("train.log"), log.as_bytes())?;
        run_epochs += 1;
        if a.stop_after == Some(run_epochs) && st.epoch < a.epochs {
            sayln!("stopped after {run_epochs} epoch(s) as asked; continue with --resume");
            return Ok(());
        }
    }
    let (be, bs) = st.best.unwrap_or((0, 0.0));
    sayln!(
        "done: best val {metric_name} {bs:.2} at epoch {be}; wrote {}/best.safetensors, last.safetensors, metrics.jsonl",
        a.output.display()
    );
    Ok(())
}

// ---- eptc eval -------------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Artifact folder written by `eptc compile`
    pub artifact: PathBuf,
    /// Trained adapter [default: the artifact's adapter-init]
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Annotation file of the images to evaluate (every line labeled)
    #[arg(long)]
    pub ann: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Also write the JSON to this file
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

/// Load the forward stage with an adapter, and a data set for it.
fn forward_on(
    artifact: &Path,
    adapter: Option<&Path>,
    threads: Option<usize>,
) -> Result<(Parts, Box<dyn Executable>)> {
    let parts = load_parts(artifact, adapter)?;
    let exe = parts.executable(artifact, RUN_STAGE, threads)?;
    Ok((parts, exe))
}

pub fn cmd_eval(a: &EvalArgs) -> Result<()> {
    let out = eval_json(a)?;
    println!("{out}");
    Ok(())
}

/// Evaluate and write the JSON to `--output`; returns the headline figure (mAP or
/// accuracy), for the demo.
pub fn eval_to(a: &EvalArgs) -> Result<f64> {
    let out = eval_json(a)?;
    let key = if out["task"] == "multilabel" {
        "map"
    } else {
        "accuracy"
    };
    Ok(out["metrics"][key].as_f64().unwrap_or(f64::NAN))
}

fn eval_json(a: &EvalArgs) -> Result<serde_json::Value> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (parts, mut exe) = forward_on(&a.artifact, a.adapter.as_deref(), a.data.threads)?;
    let m = &parts.manifest;
    let ds = open_dataset(&a.data.data, &a.ann, m)?;
    if !ds.labeled() {
        bail!(
            "{}: has unlabeled lines; evaluation needs a label on every line",
            a.ann.display()
        );
    }
    let mut cfg = LoaderConfig::eval(a.batch_size, m.architecture.image_size as u32);
    cfg.norm = a.data.normalize()?;
    cfg.workers = a.data.workers;
    let t0 = Instant::now();
    let pb = bar(ds.len() as u64, "eval".into());
    let logits = predict(exe.as_mut(), &ds, &cfg, Some(&pb))?;
    pb.finish_and_clear();
    let met = evaluate(&logits, &ds)?;
    let out = json!({
        "images": ds.len(), "task": if ds.task == Task::MultiLabel { "multilabel" } else { "multiclass" },
        "adapter": parts.adapter_path, "annotations": a.ann, "seconds": t0.elapsed().as_secs_f64(),
        "metrics": met,
    });
    if let Some(o) = &a.output {
        artifact::write_atomic(o, format!("{out}\n").as_bytes())?;
    }
    Ok(out)
}

// ---- eptc infer ------------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Artifact folder written by `eptc compile`
    pub artifact: PathBuf,
    /// Trained adapter [default: the artifact's adapter-init]
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Folder the annotation file's image paths are relative to (default: the current one)
    #[arg(long, default_value = ".")]
    pub data: PathBuf,
    /// Annotation file listing the images (labels, if any, are checked but not used)
    #[arg(long, conflicts_with = "images", required_unless_present = "images")]
    pub ann: Option<PathBuf>,
    /// Image files to score, instead of --ann
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// The CSV to write: `filename,score_1,...,score_C` per image, no header (MedFMC
    /// submission format; sigmoid scores for multi-label, softmax for multi-class)
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Per-channel mean for normalisation (RGB, pixels in [0, 1])
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [0.485, 0.456, 0.406])]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation for normalisation
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [0.229, 0.224, 0.225])]
    pub std: Vec<f32>,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn cmd_infer(a: &InferArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (parts, mut exe) = forward_on(&a.artifact, a.adapter.as_deref(), a.threads)?;
    let m = &parts.manifest;
    let task = task_of(m);
    let classes = m.peft.num_classes;
    let ds = match &a.ann {
        Some(ann) => {
            // Labels do not matter here: read the file names whatever the lines carry.
            let text = fs::read_to_string(ann)
                .with_context(|| format!("cannot read {}", ann.display()))?;
            let entries = infer_entries(&text, ann, task, classes)?;
            Dataset {
                dir: a.data.clone(),
                ann: ann.clone(),
                entries,
                task,
                classes,
            }
        }
        None => Dataset {
            dir: PathBuf::from("."),
            ann: PathBuf::from("<--images>"),
            entries: a
                .images
                .iter()
                .enumerate()
                .map(|(i, p)| Entry {
                    file: p.to_string_lossy().into_owned(),
                    label: Label::None,
                    line: i + 1,
                })
                .collect(),
            task,
            classes,
        },
    };
    if ds.is_empty() {
        bail!("{}: no images to score", ds.ann.display());
    }
    let ds = Arc::new(ds);
    let dargs = DataArgs {
        data: a.data.clone(),
        mean: a.mean.clone(),
        std: a.std.clone(),
        workers: a.workers,
        threads: a.threads,
    };
    let mut cfg = LoaderConfig::eval(a.batch_size, m.architecture.image_size as u32);
    cfg.norm = dargs.normalize()?;
    cfg.workers = a.workers;
    let pb = bar(ds.len() as u64, "infer".into());
    let logits = predict(exe.as_mut(), &ds, &cfg, Some(&pb))?;
    pb.finish_and_clear();
    let sc = scores(&logits, classes, task);
    let mut csv = String::new();
    for (e, row) in ds.entries.iter().zip(sc.chunks_exact(classes)) {
        csv.push_str(&e.file);
        for v in row {
            let _ = write!(csv, ",{v}");
        }
        csv.push('\n');
    }
    artifact::write_atomic(&a.output, csv.as_bytes())?;
    println!(
        "scored {} image(s) ({} scores each); wrote {}",
        ds.len(),
        classes,
        a.output.display()
    );
    Ok(())
}

/// The entries of an annotation file for inference: labeled lines keep their labels (and
/// are checked), unlabeled ones are taken as they are.
fn infer_entries(text: &str, ann: &Path, task: Task, classes: usize) -> Result<Vec<Entry>> {
    Ok(data::parse_annotations(text, ann, task, classes)?)
}

// ---- eptc gen-data ---------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct GenDataArgs {
    /// Folder to write: images/, train.txt, val.txt, test.txt, test_unlabeled.txt
    #[arg(short, long)]
    pub output: PathBuf,
    /// multiclass (stripes, disc, checkerboard...) or multilabel (independent features)
    #[arg(long, default_value = "multiclass")]
    pub task: String,
    /// Classes (multi-class) or labels (multi-label), 2 to 4
    #[arg(long, default_value_t = 3)]
    pub classes: usize,
    /// Image side in pixels
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// Training images per class (the "shots")
    #[arg(long, default_value_t = 8)]
    pub shots: usize,
    #[arg(long, default_value_t = 4)]
    pub val_per_class: usize,
    #[arg(long, default_value_t = 8)]
    pub test_per_class: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn gen_data(a: &GenDataArgs) -> Result<data::synth::SynthSummary> {
    let task = match a.task.as_str() {
        "multiclass" => Task::MultiClass,
        "multilabel" => Task::MultiLabel,
        t => bail!("--task {t:?}: expected multiclass or multilabel"),
    };
    let spec = data::synth::SynthSpec {
        task,
        classes: a.classes,
        image_size: a.image_size,
        train_per_class: a.shots,
        val_per_class: a.val_per_class,
        test_per_class: a.test_per_class,
        seed: a.seed,
    };
    Ok(data::synth::generate(&a.output, &spec)?)
}

pub fn cmd_gen_data(a: &GenDataArgs) -> Result<()> {
    let s = gen_data(a)?;
    println!(
        "wrote {} images of {} {} ({}) to {}: {}, {}, {}, {}",
        s.images,
        s.class_names.len(),
        if a.task == "multilabel" {
            "labels"
        } else {
            "classes"
        },
        s.class_names.join(", "),
        a.output.display(),
        s.train.display(),
        s.val.display(),
        s.test.display(),
        s.test_unlabeled.display()
    );
    Ok(())
}
