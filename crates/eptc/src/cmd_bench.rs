//! `eptc bench`: time a compiled artifact's forward pass or training step on its backend.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use eptc_ir::HostTensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::artifact::{RUN_STAGE, TRAIN_STAGE};
use crate::cmd_compile::load_parts;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Artifact folder written by `eptc compile`
    pub artifact: PathBuf,
    /// Images per batch (random pixel values)
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed iterations, after warm-up
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed warm-up iterations (page faults on the weights, buffer pools, caches)
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Worker threads [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Time a training step instead of the forward pass: the train stage (forward, loss,
    /// gradients of the trainable tensors) on random images and labels
    #[arg(long)]
    pub train: bool,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn cmd_bench(a: &BenchArgs) -> Result<()> {
    if a.batch == 0 || a.iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    let parts = load_parts(&a.artifact, None)?;
    let stage = if a.train { TRAIN_STAGE } else { RUN_STAGE };
    let mut exe = parts.executable(&a.artifact, stage, a.threads)?;
    let m = &parts.manifest;
    let ar = &m.architecture;
    let shape = vec![a.batch, ar.in_chans, ar.image_size, ar.image_size];
    let n: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(0);
    let x = HostTensor::new(
        shape,
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect(),
    );
    let mut inputs = vec![("pixel_values", x)];
    if a.train {
        // One positive label per image (valid for both losses).
        let c = m.peft.num_classes;
        let mut y = vec![0.0; a.batch * c];
        for i in 0..a.batch {
            y[i * c + rng.random_range(0..c)] = 1.0;
        }
        inputs.push(("labels", HostTensor::new(vec![a.batch, c], y)));
    }
    for _ in 0..a.warmup {
        exe.run(&inputs)?;
    }
    let mut times = Vec::with_capacity(a.iters);
    let mut device = Vec::with_capacity(a.iters);
    for _ in 0..a.iters {
        let t0 = Instant::now();
        exe.run(&inputs)?;
        times.push(t0.elapsed().as_secs_f64());
        device.extend(exe.device_seconds());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    let (median, p10, p90) = (q(0.5), q(0.1), q(0.9));
    // GPU backends also report the computation alone (device events, no host copies).
    let device_median = (device.len() == times.len()).then(|| {
        device.sort_by(f64::total_cmp);
        device[device.len() / 2]
    });
    let peak = peak_rss();
    let what = if a.train { "training step" } else { "forward" };
    if a.json {
        println!(
            "{}",
            json!({"artifact": a.artifact, "target": m.target, "what": what, "batch": a.batch, "iters": a.iters,
                   "warmup": a.warmup, "threads": a.threads, "median_s": median, "p10_s": p10, "p90_s": p90,
                   "min_s": sorted[0], "max_s": sorted[sorted.len() - 1], "images_per_s": a.batch as f64 / median,
                   "peak_rss_bytes": peak, "device_peak_bytes": exe.device_peak_bytes(),
                   "times_s": times, "device_median_s": device_median,
                   "device_images_per_s": device_median.map(|d| a.batch as f64 / d)})
        );
    } else {
        println!(
            "{} {what} on {}, batch {}, {} iterations after {} warm-up:",
            a.artifact.display(),
            m.target,
            a.batch,
            a.iters,
            a.warmup
        );
        println!(
            "  median {:.2} ms (p10 {:.2}, p90 {:.2}, min {:.2}, max {:.2}); {:.2} images/s",
            median * 1e3,
            p10 * 1e3,
            p90 * 1e3,
            sorted[0] * 1e3,
            sorted[sorted.len() - 1] * 1e3,
            a.batch as f64 / median
        );
        if let Some(d) = device_median {
            println!(
                "  on the device alone (no host copies): median {:.3} ms; {:.1} images/s",
                d * 1e3,
                a.batch as f64 / d
            );
        }
        if let Some(b) = exe.device_peak_bytes() {
            println!(
                "  device memory: peak {:.1} MiB held by eptc's allocations (without the CUDA context and library workspaces)",
                b as f64 / (1u64 << 20) as f64
            );
        }
        if let Some(p) = peak {
            println!(
                "  peak resident memory {:.1} MiB (memory-mapped weights included)",
                p as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(())
}
