//! `eptc compile` and `eptc run`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use eptc_frontend::{write_tensors, ImportOptions, TensorFile};
use eptc_ir::{Graph, HostTensor};
use serde_json::json;

use crate::args::{ModelArgs, OptArgs, PeftArgs};
use crate::artifact::{
    self, Architecture, Manifest, OptimizerInfo, Source, ADAPTER_INIT, RUN_STAGE, TRAIN_STAGE,
};
use crate::pipeline;

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The ViT checkpoint (safetensors; timm, Hugging Face or mmcls keys)
    pub model: PathBuf,
    #[command(flatten)]
    pub model_args: ModelArgs,
    #[command(flatten)]
    pub peft: PeftArgs,
    #[command(flatten)]
    pub opt: OptArgs,
    /// Backend: cpu, wgpu or cuda (built in), the name of a plugin loaded with --plugin,
    /// or the path of a plugin library (`eptc plugins` lists them)
    #[arg(long, default_value = "cpu")]
    pub target: String,
    /// Storage type of device tensors (arithmetic stays f32): f32; f16 on wgpu (adapters
    /// with shader-f16); bf16 or f16 on cuda
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Artifact folder to write [default: <model name>-eptc]
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// What to write besides the manifest and adapter: any of ir, plan, kernels
    #[arg(long, value_delimiter = ',', default_value = "ir,plan")]
    pub emit: Vec<String>,
    /// Print the summary as one JSON object
    #[arg(long)]
    pub json: bool,
}

/// What `compile` checked on the target.
pub struct TargetCheck {
    /// Kernels generated and validated (both stages).
    pub kernels: usize,
    /// Whether the target's device is here (then both stages were also compiled on it).
    pub availability: eptc_backend::Availability,
}

/// Compile and write the artifact; returns the manifest.
pub fn compile(a: &CompileArgs) -> Result<(PathBuf, Manifest, TargetCheck)> {
    for e in &a.emit {
        if !["ir", "plan", "kernels"].contains(&e.as_str()) {
            bail!("--emit {e:?}: expected ir, plan or kernels");
        }
    }
    let backend = crate::backends::find(&a.target)?;
    // `--target PATH` loads a plugin: from here on it is its backend's name, and the
    // manifest records the library so `run`, `train`... load it again.
    let target = backend.name().to_string();
    let plugin = crate::backends::plugin_path(&target);
    let dtype = eptc_ir::DType::from_name(&a.dtype)
        .with_context(|| format!("--dtype {:?}: expected f32, f16 or bf16", a.dtype))?;
    if !backend.capabilities().dtypes.contains(&dtype) {
        bail!(
            "--dtype {}: the {} backend stores tensors as {} only",
            a.dtype,
            target,
            backend
                .capabilities()
                .dtypes
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (sha256, bytes) = artifact::hash_file(&a.model)?;
    let c = pipeline::build(&a.model, &a.model_args, &a.peft, &a.opt, &target)?;
    // Every kernel the target generates is checked by its validator, device or not.
    let mut kernels = Vec::new();
    for (stage, g) in [(RUN_STAGE, &c.optimized), (TRAIN_STAGE, &c.train)] {
        for k in pipeline::kernels(&target, g, 1, dtype)
            .with_context(|| format!("{} kernels of the {stage} stage", target))?
        {
            kernels.push((stage, k));
        }
    }
    // Compiling on the backend checks that it can run the graph with these weights.
    let availability = backend.availability();
    if availability.is_available() {
        let weights = pipeline::weights_with(&c.model, &c.folded, &c.adapter);
        pipeline::executable(&target, &c.optimized, &weights, None, dtype)?;
        pipeline::executable(&target, &c.train, &weights, None, dtype)
            .context("the backend cannot run the training graph")?;
    }

    let dir = a.output.clone().unwrap_or_else(|| {
        let stem = a
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        PathBuf::from(format!("{stem}-eptc"))
    });
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut stages = Vec::new();
    for (name, g) in [
        ("imported", &c.imported),
        ("peft", &c.peft),
        ("optimized", &c.optimized),
        ("train", &c.train),
    ] {
        let file = format!("{name}.eptc");
        if a.emit.iter().any(|e| e == "ir") || name == RUN_STAGE || name == TRAIN_STAGE {
            artifact::write_atomic(&dir.join(&file), eptc_ir::text::print(g)?.as_bytes())?;
        }
        stages.push((name.to_string(), file));
    }
    let plan = if a.emit.iter().any(|e| e == "plan") {
        artifact::write_atomic(
            &dir.join("plan.json"),
            serde_json::to_string_pretty(&plan_json(&c.optimized, &target)?)?.as_bytes(),
        )?;
        Some("plan.json".to_string())
    } else {
        None
    };
    let mut kernel_files = Vec::new();
    if a.emit.iter().any(|e| e == "kernels") {
        for (stage, k) in &kernels {
            let rel = format!("kernels/{stage}/{}.{}", k.name, k.extension);
            let path = dir.join(&rel);
            fs::create_dir_all(path.parent().expect("has a parent"))
                .with_context(|| format!("cannot create {}", path.display()))?;
            artifact::write_atomic(&path, k.source.as_bytes())?;
            kernel_files.push(rel);
        }
    }
    write_adapter(&dir.join(ADAPTER_INIT), &c.adapter, &c.config)?;
    let folded = if c.folded.is_empty() {
        None
    } else {
        let refs: Vec<(&str, &HostTensor)> =
            c.folded.iter().map(|(k, v)| (k.as_str(), v)).collect();
        write_tensors(&dir.join(artifact::FOLDED), &refs, None)?;
        Some(artifact::FOLDED.to_string())
    };
    let trainable = c.peft.trainable_count();
    let manifest = Manifest {
        format: artifact::FORMAT,
        eptc_version: env!("CARGO_PKG_VERSION").into(),
        source: Source {
            path: fs::canonicalize(&a.model).unwrap_or_else(|_| a.model.clone()),
            sha256,
            bytes,
        },
        architecture: Architecture::from(&c.model.arch),
        peft: c.config.clone(),
        seed: a.peft.seed,
        trainable_params: trainable,
        frozen_params: frozen_count(&c.peft),
        target: target.clone(),
        plugin,
        dtype: a.dtype.clone(),
        optimizer: OptimizerInfo {
            enabled: !a.opt.no_optimize,
            iter_limit: a.opt.opt_iter_limit,
            node_limit: a.opt.opt_node_limit,
            time_limit_s: a.opt.opt_time_limit,
            summary: c.opt_summary.clone(),
        },
        stages,
        plan,
        kernels: kernel_files,
        adapter_init: ADAPTER_INIT.into(),
        folded,
        outputs: c.optimized.outputs().iter().map(|o| o.0.clone()).collect(),
    };
    manifest.write(&dir)?;
    let check = TargetCheck {
        kernels: kernels.len(),
        availability,
    };
    Ok((dir, manifest, check))
}

pub fn cmd_compile(a: &CompileArgs) -> Result<()> {
    let t0 = Instant::now();
    let (dir, m, check) = compile(a)?;
    // The head reads the features, or the MLP's hidden units with `mlp-3-<H>`.
    let head_in = m
        .peft
        .method
        .strip_prefix("mlp-3-")
        .and_then(|h| h.parse().ok())
        .unwrap_or(m.architecture.dim);
    let head = m.peft.num_classes * (head_in + 1);
    if a.json {
        println!(
            "{}",
            json!({"artifact": dir, "trainable_params": m.trainable_params, "head_params": head,
                   "frozen_params": m.frozen_params, "target": m.target, "peft": m.peft,
                   "optimizer": m.optimizer.summary, "kernels_validated": check.kernels,
                   "target_available": check.availability.is_available(),
                   "seconds": t0.elapsed().as_secs_f64()})
        );
    } else {
        let ar = &m.architecture;
        println!(
            "compiled {} ({} layout, ViT dim {} depth {} heads {} patch {} at {} px, {} tokens)",
            a.model.display(),
            ar.layout,
            ar.dim,
            ar.depth,
            ar.heads,
            ar.patch,
            ar.image_size,
            ar.tokens
        );
        if m.peft.method == "ept" {
            println!(
                "EPT {} on layers {:?}, prompt length {}",
                m.peft.mode.map(|x| x.name()).unwrap_or("cat"),
                m.peft.layers,
                m.peft.prompt_len
            );
        }
        println!(
            "trainable parameters: {} = {} (PEFT) + {} (head, {} classes); frozen: {}",
            fmt_count(m.trainable_params),
            fmt_count(m.trainable_params - head),
            fmt_count(head),
            m.peft.num_classes,
            fmt_count(m.frozen_params)
        );
        match &m.optimizer.summary {
            Some(o) => {
                let fired: Vec<String> = o
                    .rules_fired
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect();
                println!(
                    "optimized: {} -> {} nodes in {:.2} s ({} iterations, {}); attention fused {} ({} with the EPT sink), linear fused {}, weights folded {}; rules: {}",
                    o.nodes_before,
                    o.nodes_after,
                    o.seconds,
                    o.iterations,
                    o.stop_reason,
                    o.attention_fused,
                    o.attention_with_sink,
                    o.linear_fused,
                    o.folded_weights,
                    if fired.is_empty() { "none".to_string() } else { fired.join(", ") }
                );
            }
            None => println!("not optimized (--no-optimize)"),
        }
        if check.kernels > 0 {
            println!(
                "{} kernels generated and validated for {}{}",
                check.kernels,
                m.target,
                if m.kernels.is_empty() {
                    String::new()
                } else {
                    format!(" (written to {}/kernels)", dir.display())
                }
            );
        }
        if let eptc_backend::Availability::Unavailable(why) = &check.availability {
            println!(
                "note: {} cannot run here ({why}); the artifact runs where it can",
                m.target
            );
        }
        println!(
            "target {} ({}), artifact {}",
            m.target,
            m.dtype,
            dir.display()
        );
    }
    Ok(())
}

/// Scalars in the frozen params a graph uses.
fn frozen_count(g: &Graph) -> usize {
    g.params()
        .into_iter()
        .filter(|p| !p.2)
        .map(|(id, _, _)| g.ty(id).shape.numel(1))
        .sum()
}

/// `1234567` -> `1,234,567`.
pub fn fmt_count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The execution plan: the schedule the backend follows, with each step's output type.
fn plan_json(g: &Graph, target: &str) -> Result<serde_json::Value> {
    let order = g.topo_order()?;
    let num: HashMap<_, _> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let steps: Vec<_> = order
        .iter()
        .filter(|&&id| !g.node(id).op.is_leaf())
        .map(|&id| {
            let n = g.node(id);
            json!({"node": num[&id], "op": n.op.kind(), "type": n.ty.to_string(),
                   "operands": g.operands(id).iter().map(|o| num[o]).collect::<Vec<_>>()})
        })
        .collect();
    Ok(
        json!({"target": target, "order": "topological; intermediates freed after their last use", "steps": steps}),
    )
}

/// Write adapter values in the file layout (prompts stacked), the config as metadata.
pub fn write_adapter(
    path: &Path,
    values: &BTreeMap<String, HostTensor>,
    cfg: &eptc_peft::PeftConfig,
) -> Result<()> {
    let tensors = eptc_peft::adapter::to_file(values);
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let meta = HashMap::from([("peft".to_string(), serde_json::to_string(cfg)?)]);
    write_tensors(path, &refs, Some(meta))?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Artifact folder written by `eptc compile`
    pub artifact: PathBuf,
    /// Tensor file (safetensors) with `pixel_values` f32 [B, 3, H, W], already normalised
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write `logits` [B, C] and `features` [B, dim] (safetensors)
    #[arg(long)]
    pub output: PathBuf,
    /// Trained adapter (ept.prompts, head.*) [default: the artifact's adapter-init]
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Worker threads [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run the forward pass this many times and report the timings (the first run warms
    /// up: page faults on the memory-mapped weights, thread start-up); the output is the
    /// last run's
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Print the summary as one JSON object
    #[arg(long)]
    pub json: bool,
}

/// An artifact's parts on the host: manifest, model, folded weights and adapter values.
pub struct Parts {
    pub manifest: Manifest,
    pub model: eptc_frontend::Model,
    pub folded: BTreeMap<String, HostTensor>,
    /// The trainable tensors by graph param name (`ept.prompts.<j>`, `head.*`).
    pub values: BTreeMap<String, HostTensor>,
    /// Where the values came from.
    pub adapter_path: PathBuf,
}

impl Parts {
    pub fn weights(&self) -> eptc_ir::WeightStore {
        pipeline::weights_with(&self.model, &self.folded, &self.values)
    }

    /// Compile stage `stage` of the artifact on its target.
    pub fn executable(
        &self,
        dir: &Path,
        stage: &str,
        threads: Option<usize>,
    ) -> Result<Box<dyn eptc_backend::Executable>> {
        let graph = self.manifest.stage_graph(dir, stage)?;
        let dtype = eptc_ir::DType::from_name(&self.manifest.dtype).with_context(|| {
            format!(
                "{}: dtype {:?} is not f32, f16 or bf16",
                dir.join("manifest.json").display(),
                self.manifest.dtype
            )
        })?;
        pipeline::executable(
            &self.manifest.target,
            &graph,
            &self.weights(),
            threads,
            dtype,
        )
    }
}

/// Read an artifact: its manifest, the model it was compiled from (checked unchanged),
/// its folded weights and an adapter (or its initial one), checked against the artifact.
pub fn load_parts(dir: &Path, adapter: Option<&Path>) -> Result<Parts> {
    let m = Manifest::read(dir)?;
    let graph = m.stage_graph(dir, RUN_STAGE)?;
    let src = &m.source.path;
    let meta = fs::metadata(src).with_context(|| {
        format!(
            "{}: the artifact's model is gone (recompile)",
            src.display()
        )
    })?;
    if meta.len() != m.source.bytes {
        bail!(
            "{}: the model changed since it was compiled ({} bytes, was {}): recompile",
            src.display(),
            meta.len(),
            m.source.bytes
        );
    }
    let ar = &m.architecture;
    let opts = ImportOptions {
        heads: Some(ar.heads),
        eps: Some(ar.layernorm_eps as f32),
        image_size: Some(ar.image_size),
    };
    let model = eptc_frontend::import(src, &opts)?;
    let apath = adapter
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join(ADAPTER_INIT));
    let values = read_adapter(&apath, &graph, &m)?;
    let folded = match &m.folded {
        Some(f) => TensorFile::read(&dir.join(f))?.tensors,
        None => Default::default(),
    };
    Ok(Parts {
        manifest: m,
        model,
        folded,
        values,
        adapter_path: apath,
    })
}

/// Read an adapter file and check it was made for this artifact.
pub fn read_adapter(
    apath: &Path,
    graph: &Graph,
    m: &Manifest,
) -> Result<BTreeMap<String, HostTensor>> {
    let file = TensorFile::read(apath)?;
    if let Some(cfg) = file.metadata.get("peft") {
        let cfg: eptc_peft::PeftConfig = serde_json::from_str(cfg)
            .with_context(|| format!("{}: malformed `peft` metadata", apath.display()))?;
        let (a, b) = (&cfg, &m.peft);
        if a.method != b.method
            || a.mode.unwrap_or(eptc_peft::EptMode::Cat)
                != b.mode.unwrap_or(eptc_peft::EptMode::Cat)
            || a.layers != b.layers
            || a.prompt_len != b.prompt_len
            || a.num_classes != b.num_classes
        {
            bail!(
                "{}: adapter made for {} (layers {:?}, prompt length {}, {} classes) but the artifact is {} (layers {:?}, prompt length {}, {} classes)",
                apath.display(), a.method, a.layers, a.prompt_len, a.num_classes, b.method, b.layers, b.prompt_len, b.num_classes
            );
        }
    }
    Ok(eptc_peft::adapter::from_file(
        graph,
        &file.tensors,
        &apath.display().to_string(),
    )?)
}

/// An artifact loaded for execution.
pub struct Loaded {
    pub manifest: Manifest,
    pub exe: Box<dyn eptc_backend::Executable>,
}

/// Load an artifact with an adapter (or its initial one) and compile it on its target.
pub fn load(dir: &Path, adapter: Option<&Path>, threads: Option<usize>) -> Result<Loaded> {
    let parts = load_parts(dir, adapter)?;
    let exe = parts.executable(dir, RUN_STAGE, threads)?;
    Ok(Loaded {
        manifest: parts.manifest,
        exe,
    })
}

pub fn cmd_run(a: &RunArgs) -> Result<()> {
    let mut l = load(&a.artifact, a.adapter.as_deref(), a.threads)?;
    let pixels = pipeline::read_pixels(&a.input)?;
    let ar = &l.manifest.architecture;
    let want = [ar.in_chans, ar.image_size, ar.image_size];
    if pixels.shape[1..] != want {
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
    let mut times = Vec::new();
    let mut outputs = Vec::new();
    for _ in 0..a.repeat {
        let t0 = Instant::now();
        outputs = l.exe.run(&[("pixel_values", pixels.clone())])?;
        times.push(t0.elapsed().as_secs_f64());
    }
    // With repeats, the first run is a warm-up and the figures are over the others.
    let warm = if times.len() > 1 {
        &times[1..]
    } else {
        &times[..]
    };
    let secs = warm.iter().sum::<f64>() / warm.len() as f64;
    let min = warm.iter().cloned().fold(f64::INFINITY, f64::min);
    let refs: Vec<(&str, &HostTensor)> = outputs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_tensors(&a.output, &refs, None)?;
    if a.json {
        println!(
            "{}",
            json!({"batch": batch, "seconds": secs, "min_seconds": min, "runs": times,
                   "threads": a.threads, "output": a.output, "target": l.manifest.target})
        );
    } else {
        println!(
            "ran {} image(s) on {} in {:.3} s{}; wrote {} ({})",
            batch,
            l.manifest.target,
            secs,
            if times.len() > 1 {
                format!(
                    " (mean of {} runs after a warm-up, min {min:.3} s)",
                    warm.len()
                )
            } else {
                String::new()
            },
            a.output.display(),
            outputs
                .iter()
                .map(|(k, v)| format!("{k} {:?}", v.shape))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
