//! `eptc export`: a trained adapter in the layouts PyTorch users load directly
//! (DESIGN.md §6).
//!
//! - `ept-official`: the official EPT code's (zuwenqiang/EPT, mmcls 0.25) keys,
//!   `backbone.prompt` `[layers, N, L]` and `head.fc.weight` / `head.fc.bias`, in
//!   `adapter.safetensors`, with the matching mmcls config fragment in `ept_config.py`.
//!   The official backbone indexes its prompts by `layer − first prompted layer`, so the
//!   export always spans a contiguous ascending range: eptc's layers are put in
//!   ascending order and a layer inside the range that eptc does not prompt gets a prompt
//!   of −10⁴ everywhere, which the softmax turns into exact zeros — that layer computes
//!   as an unprompted one.
//! - `hf-peft` (LoRA): Hugging Face peft's `adapter_model.safetensors` +
//!   `adapter_config.json`, with module names of the checkpoint's family. HF ViTs
//!   (`ViTForImageClassification`) have separate q / v projections, which peft targets
//!   as eptc does; transformers 5 names them `vit.layers.N.attention.q_proj` / `v_proj`,
//!   transformers 4 `vit.encoder.layer.N.attention.attention.query` / `value`
//!   (`--transformers 4|5`, default 5). timm and mmcls ViTs have one fused `qkv` linear: there
//!   the export targets `qkv` with rank 2r — `lora_A = [A_q; A_v]`, `lora_B` block
//!   diagonal on the q and v thirds, zero on k — and `lora_alpha` 2α, so peft's scaling
//!   `lora_alpha / r` is eptc's α/r and the update is exactly eptc's.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use eptc_frontend::write_tensors;
use eptc_ir::HostTensor;
use eptc_peft::{EptMode, Task};
use serde_json::json;

use crate::artifact::{Manifest, ADAPTER_INIT, RUN_STAGE};
use crate::cmd_compile::read_adapter;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Artifact folder written by `eptc compile`
    pub artifact: PathBuf,
    /// The adapter to export, e.g. a run's best.safetensors [default: the artifact's
    /// adapter-init]
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// ept-official (EPT, the official code's keys and an mmcls config fragment),
    /// hf-peft (LoRA, Hugging Face peft's adapter folder), or auto (ept-official for EPT,
    /// hf-peft for LoRA)
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// hf-peft module names for Hugging Face ViTs: 5 for transformers 5
    /// (`vit.layers.N.attention.q_proj` / `v_proj`), 4 for transformers 4
    /// (`vit.encoder.layer.N.attention.attention.query` / `value`)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(4..=5))]
    pub transformers: u8,
    /// Output folder (created; files in it are replaced)
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Written for prompts of layers the official range spans but eptc does not prompt:
/// `exp(−10⁴ − max)` is 0 in f32 and f64, so the sink adds nothing.
const NEUTRAL_PROMPT: f32 = -1.0e4;

pub fn cmd_export(a: &ExportArgs) -> Result<()> {
    let m = Manifest::read(&a.artifact)?;
    let graph = m.stage_graph(&a.artifact, RUN_STAGE)?;
    let apath = a
        .adapter
        .clone()
        .unwrap_or_else(|| a.artifact.join(ADAPTER_INIT));
    let values = read_adapter(&apath, &graph, &m)?;
    let is_lora = eptc_peft::lora::parse_method(&m.peft.method).is_some();
    let format = match a.format.as_str() {
        "auto" if m.peft.method == "ept" => "ept-official",
        "auto" if is_lora => "hf-peft",
        "auto" => bail!(
            "--format auto: no PyTorch layout is defined for method {:?} (ept exports as \
             ept-official, lora as hf-peft); its eptc adapter file is already safetensors",
            m.peft.method
        ),
        f @ ("ept-official" | "hf-peft") => f,
        f => bail!("--format {f:?}: expected ept-official, hf-peft or auto"),
    };
    fs::create_dir_all(&a.output)
        .with_context(|| format!("{}: cannot create the folder", a.output.display()))?;
    let files = match format {
        "ept-official" => export_ept(&m, &values, &apath, &a.output)?,
        _ => export_peft(&m, &values, &apath, &a.output, a.transformers)?,
    };
    println!(
        "exported {} ({}) as {format}: {}",
        apath.display(),
        m.peft.method,
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn value<'a>(
    values: &'a BTreeMap<String, HostTensor>,
    key: &str,
    apath: &Path,
) -> Result<&'a HostTensor> {
    values
        .get(key)
        .with_context(|| format!("{}: the adapter has no {key:?}", apath.display()))
}

fn head_type(task: Task) -> &'static str {
    match task {
        Task::Multilabel => "MultiLabelLinearClsHead",
        Task::Multiclass => "LinearClsHead",
    }
}

/// The official EPT layout: `backbone.prompt`, `head.fc.*`, and an mmcls config fragment.
fn export_ept(
    m: &Manifest,
    values: &BTreeMap<String, HostTensor>,
    apath: &Path,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let p = &m.peft;
    if p.method != "ept" {
        bail!(
            "--format ept-official holds EPT adapters; this artifact's method is {:?}",
            p.method
        );
    }
    let mode = p.mode.unwrap_or(EptMode::Cat);
    if mode != EptMode::Cat {
        bail!(
            "--format ept-official: the official EPT code implements the `cat` mode only; \
             this adapter is `{}`",
            mode.name()
        );
    }
    let (Some(&first), Some(&last)) = (p.layers.iter().min(), p.layers.iter().max()) else {
        bail!("{}: the artifact prompts no layer", apath.display());
    };
    let (n, l) = (m.architecture.tokens, p.prompt_len);
    let span = last - first + 1;
    let mut data = vec![NEUTRAL_PROMPT; span * n * l];
    for (j, &layer) in p.layers.iter().enumerate() {
        let t = value(values, &eptc_peft::ept::prompt_name(j), apath)?;
        if t.shape != [n, l] {
            bail!(
                "{}: prompt {j} has shape {:?}, expected [{n}, {l}]",
                apath.display(),
                t.shape
            );
        }
        let at = (layer - first) * n * l;
        data[at..at + n * l].copy_from_slice(t.data());
    }
    let prompt = HostTensor::new(vec![span, n, l], data);
    let w = value(values, "head.weight", apath)?;
    let b = value(values, "head.bias", apath)?;
    let layers: Vec<usize> = (first..=last).collect();
    let neutral: Vec<usize> = layers
        .iter()
        .copied()
        .filter(|i| !p.layers.contains(i))
        .collect();
    let cfg = json!({
        "format": "ept-official",
        "backbone": {"type": "EPT", "prompt_length": l, "prompt_layers": layers,
                     "img_size": m.architecture.image_size},
        "head": {"type": head_type(p.task), "num_classes": p.num_classes,
                 "in_channels": m.architecture.dim},
        "neutral_layers": neutral,
        "source": {"artifact_method": p.method, "eptc_layers": p.layers,
                   "eptc_version": env!("CARGO_PKG_VERSION")},
    });
    let file = out.join("adapter.safetensors");
    let meta = HashMap::from([("ept_config".to_string(), cfg.to_string())]);
    write_tensors(
        &file,
        &[
            ("backbone.prompt", &prompt),
            ("head.fc.weight", w),
            ("head.fc.bias", b),
        ],
        Some(meta),
    )?;
    let py = out.join("ept_config.py");
    let list = |v: &[usize]| {
        v.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = format!(
        "# mmcls 0.25 config fragment for the official EPT code (zuwenqiang/EPT), written by\n\
         # eptc {} from {}. Merge it into your config, build the model, then\n\
         #   model.load_state_dict(safetensors.torch.load_file('adapter.safetensors'), strict=False)\n\
         # (the frozen backbone comes from your pretrained checkpoint as usual).\n",
        env!("CARGO_PKG_VERSION"),
        apath.display()
    );
    if !neutral.is_empty() {
        text += &format!(
            "# eptc prompted layers {:?}; layers [{}] inside the official contiguous range carry\n\
             # prompts of -1e4, which the softmax turns into exact zeros (unprompted layers).\n",
            p.layers,
            list(&neutral)
        );
    }
    text += &format!(
        "model = dict(\n    type='ImageClassifier',\n    backbone=dict(type='EPT', prompt_length={l}, prompt_layers=[{}], img_size={}),\n    head=dict(type='{}', num_classes={}, in_channels={}))\n",
        list(&layers),
        m.architecture.image_size,
        head_type(p.task),
        p.num_classes,
        m.architecture.dim
    );
    crate::artifact::write_atomic(&py, text.as_bytes())?;
    Ok(vec![file, py])
}

/// Module paths of the checkpoint family, as a peft-wrapped model names them.
struct PeftNames {
    /// `{i}` is the block index.
    block: &'static str,
    targets: &'static [&'static str],
    head: &'static str,
    fused: bool,
}

fn peft_names(layout: &str, transformers: u8) -> Result<PeftNames> {
    Ok(match layout {
        "timm" => PeftNames {
            block: "blocks.{i}.attn",
            targets: &["qkv"],
            head: "head",
            fused: true,
        },
        "mmcls" => PeftNames {
            block: "backbone.layers.{i}.attn",
            targets: &["qkv"],
            head: "head.fc",
            fused: true,
        },
        "hf" if transformers >= 5 => PeftNames {
            block: "vit.layers.{i}.attention",
            targets: &["q_proj", "v_proj"],
            head: "classifier",
            fused: false,
        },
        "hf" => PeftNames {
            block: "vit.encoder.layer.{i}.attention.attention",
            targets: &["query", "value"],
            head: "classifier",
            fused: false,
        },
        l => bail!("--format hf-peft: no module names are known for the {l:?} layout"),
    })
}

/// Hugging Face peft's LoRA folder: `adapter_model.safetensors` + `adapter_config.json`.
fn export_peft(
    m: &Manifest,
    values: &BTreeMap<String, HostTensor>,
    apath: &Path,
    out: &Path,
    transformers: u8,
) -> Result<Vec<PathBuf>> {
    let Some((r, alpha)) = eptc_peft::lora::parse_method(&m.peft.method) else {
        bail!(
            "--format hf-peft holds LoRA adapters; this artifact's method is {:?}",
            m.peft.method
        );
    };
    let names = peft_names(&m.architecture.layout, transformers)?;
    let d = m.architecture.dim;
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    let factor = |i: usize, w: &str| -> Result<(&HostTensor, &HostTensor)> {
        let (ka, kb) = eptc_peft::lora::factor_names(i, w);
        let (a, b) = (value(values, &ka, apath)?, value(values, &kb, apath)?);
        if a.shape != [r, d] || b.shape != [d, r] {
            bail!(
                "{}: {ka} / {kb} have shapes {:?} / {:?}, expected [{r}, {d}] / [{d}, {r}]",
                apath.display(),
                a.shape,
                b.shape
            );
        }
        Ok((a, b))
    };
    for i in 0..m.architecture.depth {
        let (aq, bq) = factor(i, "q")?;
        let (av, bv) = factor(i, "v")?;
        let block = names.block.replace("{i}", &i.to_string());
        let key =
            |module: &str, f: &str| format!("base_model.model.{block}.{module}.lora_{f}.weight");
        if names.fused {
            // lora_A [2r, D] = [A_q; A_v]; lora_B [3D, 2r]: rows 0..D (q) read A_q's
            // coordinates, rows 2D..3D (v) A_v's, rows D..2D (k) are zero.
            let mut a = aq.data().to_vec();
            a.extend_from_slice(av.data());
            let mut b = vec![0.0f32; 3 * d * 2 * r];
            for row in 0..d {
                for c in 0..r {
                    b[row * 2 * r + c] = bq.data()[row * r + c];
                    b[(2 * d + row) * 2 * r + r + c] = bv.data()[row * r + c];
                }
            }
            tensors.push((key("qkv", "A"), HostTensor::new(vec![2 * r, d], a)));
            tensors.push((key("qkv", "B"), HostTensor::new(vec![3 * d, 2 * r], b)));
        } else {
            for (module, (a, b)) in names.targets.iter().zip([(aq, bq), (av, bv)]) {
                tensors.push((key(module, "A"), a.clone()));
                tensors.push((key(module, "B"), b.clone()));
            }
        }
    }
    for p in ["weight", "bias"] {
        let t = value(values, &format!("head.{p}"), apath)?;
        tensors.push((format!("base_model.model.{}.{p}", names.head), t.clone()));
    }
    let (peft_r, peft_alpha) = if names.fused {
        (2 * r, 2.0 * alpha)
    } else {
        (r, alpha)
    };
    let module_to_save = names.head.rsplit('.').next().unwrap_or(names.head);
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": m.source.path,
        "r": peft_r,
        "lora_alpha": peft_alpha,
        "lora_dropout": 0.0,
        "target_modules": names.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": [module_to_save],
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
    });
    let file = out.join("adapter_model.safetensors");
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_tensors(&file, &refs, Some(meta))?;
    let json_path = out.join("adapter_config.json");
    crate::artifact::write_atomic(
        &json_path,
        (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes(),
    )?;
    Ok(vec![file, json_path])
}
