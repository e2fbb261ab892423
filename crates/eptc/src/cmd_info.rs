//! `eptc inspect`, `eptc ir`, `eptc plugins`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use crate::args::{ModelArgs, OptArgs, PeftArgs};
use crate::artifact::{Architecture, Manifest};
use crate::cmd_compile::fmt_count;
use crate::{backends, pipeline};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The ViT checkpoint (safetensors)
    pub model: PathBuf,
    #[command(flatten)]
    pub model_args: ModelArgs,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_inspect(a: &InspectArgs) -> Result<()> {
    let m = eptc_frontend::import(&a.model, &a.model_args.import_options())?;
    let ar = Architecture::from(&m.arch);
    let params = m.param_count();
    if a.json {
        println!(
            "{}",
            json!({"model": a.model, "architecture": ar, "params": params, "head": m.head_key})
        );
        return Ok(());
    }
    println!("{}", a.model.display());
    println!(
        "  layout      {}{}",
        ar.layout,
        prefix_note(m.arch.layout.prefix())
    );
    println!(
        "  width       {} ({} heads of {})",
        ar.dim,
        ar.heads,
        ar.dim / ar.heads
    );
    println!("  depth       {}", ar.depth);
    println!(
        "  patch       {} px, {} input channels",
        ar.patch, ar.in_chans
    );
    println!(
        "  image       {} px ({} tokens){}",
        ar.image_size,
        ar.tokens,
        if ar.image_size != ar.checkpoint_image_size {
            format!(", resized from {} px", ar.checkpoint_image_size)
        } else {
            String::new()
        }
    );
    println!("  mlp         {} hidden, GELU", ar.mlp_hidden);
    println!("  qkv bias    {}", ar.qkv_bias);
    println!("  layernorm   eps {:e}", ar.layernorm_eps);
    match (&m.head_key, ar.checkpoint_head_classes) {
        (Some(k), Some(c)) => println!("  head        {c} classes ({k})"),
        _ => println!("  head        none"),
    }
    println!("  parameters  {}", fmt_count(params));
    Ok(())
}

fn prefix_note(p: &str) -> String {
    if p.is_empty() {
        String::new()
    } else {
        format!(" (keys under {p:?})")
    }
}

#[derive(Args, Debug)]
pub struct IrArgs {
    /// A ViT checkpoint (safetensors) or an artifact folder from `eptc compile`
    pub model: PathBuf,
    #[command(flatten)]
    pub model_args: ModelArgs,
    #[command(flatten)]
    pub peft: PeftArgs,
    #[command(flatten)]
    pub opt: OptArgs,
    /// Backend whose capabilities the optimized stage is extracted for
    #[arg(long, default_value = "cpu")]
    pub target: String,
    /// Stage to print: imported (the checkpoint as read), peft (after the PEFT pass),
    /// optimized (after equality saturation, for --target), train (with gradients)
    #[arg(long, default_value = "peft")]
    pub stage: String,
}

pub fn cmd_ir(a: &IrArgs) -> Result<()> {
    match a.stage.as_str() {
        "imported" | "peft" | "optimized" | "train" => {}
        s => bail!("--stage {s:?}: expected imported, peft, train or optimized"),
    }
    let g = if a.model.is_dir() {
        Manifest::read(&a.model)?.stage_graph(&a.model, &a.stage)?
    } else if a.stage == "imported" {
        eptc_frontend::import(&a.model, &a.model_args.import_options())?.graph
    } else {
        // The PEFT stage needs no optimizer run (nor its weight folds).
        let opt = OptArgs {
            no_optimize: a.stage == "peft",
            ..a.opt.clone()
        };
        let c = pipeline::build(&a.model, &a.model_args, &a.peft, &opt, &a.target)?;
        match a.stage.as_str() {
            "peft" => c.peft,
            "train" => c.train,
            _ => c.optimized,
        }
    };
    print!("{}", eptc_ir::text::print(&g)?);
    Ok(())
}

/// Built-in backends and the plugins loaded with `--plugin PATH` / `EPTC_PLUGIN_PATH`
/// (e.g. `eptc plugins --plugin target/release/libeptc_cpu_plugin.so`).
#[derive(Args, Debug)]
pub struct PluginsArgs {
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_plugins(a: &PluginsArgs) -> Result<()> {
    let mut rows = Vec::new();
    for (b, origin) in backends::all_with_origin() {
        let (ok, why) = match b.availability() {
            eptc_backend::Availability::Available(d) => (true, d),
            eptc_backend::Availability::Unavailable(w) => (false, w),
        };
        let caps = b.capabilities();
        rows.push(
            json!({"name": b.name(), "kind": origin.kind, "available": ok, "detail": why,
                   "path": origin.path, "version": origin.version,
                   "dtypes": caps.dtypes.iter().map(|d| d.name()).collect::<Vec<_>>(),
                   "ops": caps.ops.len(), "fused_ops": caps.fused_ops}),
        );
    }
    if a.json {
        println!("{}", json!({ "backends": rows }));
    } else {
        for r in rows {
            println!(
                "{:<6} {:<10} {:<13} {}",
                r["name"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or(""),
                if r["available"].as_bool() == Some(true) {
                    "available"
                } else {
                    "unavailable"
                },
                r["detail"].as_str().unwrap_or("")
            );
            if let Some(p) = r["path"].as_str() {
                println!(
                    "       {} {}, {} ops + fused {}, dtypes {}",
                    p,
                    r["version"].as_str().unwrap_or(""),
                    r["ops"],
                    r["fused_ops"],
                    r["dtypes"]
                );
            }
        }
    }
    Ok(())
}
