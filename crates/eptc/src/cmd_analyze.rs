//! `eptc analyze`: the paper's analysis ("prompt tuning is a distribution calibrator") on
//! a user's own model and data. The final CLS features (`features`, after the final
//! LayerNorm) of every image of an annotation file, from the untuned backbone and with
//! each given adapter; per class the centre, the trace of the within-class scatter Σ_W,
//! the mean distance to the centre, and the between-class separation
//! (`eptc_runtime::analysis` defines them); `analysis.json`, the features, and the plots
//! of the paper's Fig. 2 (per-class histograms of the first principal component, a 2-D
//! PCA scatter with per-class density contours) as PNG and SVG.
//!
//! **The untuned backbone** is the artifact's source checkpoint as imported (the
//! `imported` stage: no PEFT method, no head), run for `features` on the artifact's
//! target and storage type. It is not the artifact with its initial adapter: EPT with
//! any prompt — zeros included — adds a softmax sink to every prompted attention row
//! (DESIGN.md §1), so its features already differ from the backbone's; and methods
//! that change the backbone (`full`, `lora`, `vp`...) start from it too.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use eptc_backend::Executable;
use eptc_frontend::write_tensors;
use eptc_ir::HostTensor;
use eptc_runtime::analysis::{self, Analysis, Pca};
use eptc_runtime::data::{self, Dataset, Label, LoaderConfig, Task};
use indicatif::ProgressBar;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::json;

use crate::artifact::{self, RUN_STAGE};
use crate::cmd_compile::{load_parts, Parts};
use crate::cmd_plot::{colour, int_label, padded, perr, save, Figure, FAMILY};
use crate::cmd_train::{bar, open_dataset, DataArgs};
use crate::pipeline;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Artifact folder written by `eptc compile`
    pub artifact: PathBuf,
    /// A trained adapter of the artifact to analyse besides the untuned backbone;
    /// repeatable
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// Also analyse the artifact's initial adapter (adapter-init.safetensors)
    #[arg(long)]
    pub init: bool,
    #[command(flatten)]
    pub data: DataArgs,
    /// Annotation file of the images to analyse (every line labeled)
    #[arg(long)]
    pub ann: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Output folder: analysis.json, features.safetensors, pc1_hist.{png,svg},
    /// pca_scatter.{png,svg}
    #[arg(short, long)]
    pub output: PathBuf,
    /// Class names for the plots' legends, comma-separated, one per class
    /// [default: class 0, class 1, ...]
    #[arg(long, value_delimiter = ',')]
    pub class_names: Vec<String>,
    /// Print the summary as one JSON object
    #[arg(long)]
    pub json: bool,
}

/// One model's features and what was computed from them.
struct Model {
    name: String,
    adapter: Option<PathBuf>,
    features: Vec<f32>,
    stats: Analysis,
    pca: Pca,
    seconds: f64,
}

/// `features` `[n, dim]` of every image, in the data set's order (evaluation transform).
fn features_of(
    exe: &mut dyn Executable,
    ds: &Arc<Dataset>,
    cfg: &LoaderConfig,
    dim: usize,
    pb: &ProgressBar,
) -> Result<Vec<f32>> {
    let s = cfg.image_size as usize;
    let mut out = vec![0.0f32; ds.len() * dim];
    for batch in data::epoch(ds.clone(), cfg, 0) {
        let batch = batch?;
        let n = batch.len();
        let px = HostTensor::new(vec![n, 3, s, s], batch.pixels);
        let outs = exe.run(&[("pixel_values", px)])?;
        let f = outs
            .iter()
            .find(|(k, _)| k == "features")
            .context("the graph has no features output")?;
        if f.1.shape != [n, dim] {
            bail!("features have shape {:?}, expected [{n}, {dim}]", f.1.shape);
        }
        for (row, &i) in f.1.data().chunks_exact(dim).zip(&batch.indices) {
            out[i * dim..(i + 1) * dim].copy_from_slice(row);
        }
        pb.inc(n as u64);
    }
    Ok(out)
}

/// The untuned backbone: the imported checkpoint's graph, `features` only, on the
/// artifact's target and dtype.
fn backbone(parts: &Parts, threads: Option<usize>) -> Result<Box<dyn Executable>> {
    let mut g = parts.model.graph.clone();
    if g.output("features").is_none() {
        bail!(
            "{}: the imported model has no features output",
            parts.manifest.source.path.display()
        );
    }
    for (name, _) in g.outputs().to_vec() {
        if name != "features" {
            g.remove_output(&name);
        }
    }
    g.remove_dead();
    let dtype = eptc_ir::DType::from_name(&parts.manifest.dtype)
        .with_context(|| format!("dtype {:?} is not f32, f16 or bf16", parts.manifest.dtype))?;
    pipeline::executable(
        &parts.manifest.target,
        &g,
        &parts.model.weights,
        threads,
        dtype,
    )
}

/// A short name for an adapter file: `RUN/best.safetensors` -> `RUN/best`.
fn adapter_name(p: &Path) -> String {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string());
    match p
        .parent()
        .and_then(|d| d.file_name())
        .map(|d| d.to_string_lossy())
    {
        Some(d) if !d.is_empty() => format!("{d}/{stem}"),
        _ => stem,
    }
}

/// The rows of each class: an image counts in every class it carries.
fn memberships(ds: &Dataset) -> Result<Vec<Vec<usize>>> {
    let mut m = vec![Vec::new(); ds.classes];
    for (i, e) in ds.entries.iter().enumerate() {
        match &e.label {
            Label::Class(k) => m[*k].push(i),
            Label::MultiHot(h) => h
                .iter()
                .enumerate()
                .filter(|(_, &b)| b)
                .for_each(|(k, _)| m[k].push(i)),
            Label::None => bail!(
                "{}:{}: unlabeled line; the analysis needs every image's class",
                ds.ann.display(),
                e.line
            ),
        }
    }
    Ok(m)
}

pub fn cmd_analyze(a: &AnalyzeArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let norm = a.data.normalize()?;
    let t0 = Instant::now();
    let parts = load_parts(&a.artifact, None)?;
    let m = parts.manifest.clone();
    if !m.outputs.iter().any(|o| o == "features") {
        bail!(
            "{}: the artifact's graph has no features output",
            a.artifact.join(artifact::MANIFEST).display()
        );
    }
    let dim = m.architecture.dim;
    let task = match m.peft.task {
        eptc_peft::Task::Multilabel => Task::MultiLabel,
        eptc_peft::Task::Multiclass => Task::MultiClass,
    };
    let ds = open_dataset(&a.data.data, &a.ann, &m)?;
    let members = memberships(&ds)?;
    let names: Vec<String> = if a.class_names.is_empty() {
        (0..ds.classes).map(|c| format!("class {c}")).collect()
    } else if a.class_names.len() == ds.classes {
        a.class_names.clone()
    } else {
        bail!(
            "--class-names: {} names for the artifact's {} classes",
            a.class_names.len(),
            ds.classes
        );
    };
    let mut cfg = LoaderConfig::eval(a.batch_size, m.architecture.image_size as u32);
    cfg.norm = norm;
    cfg.workers = a.data.workers;
    fs::create_dir_all(&a.output)
        .with_context(|| format!("cannot create {}", a.output.display()))?;

    // The models: the backbone, then the artifact's initial adapter (with --init) and
    // each --adapter, in order.
    let mut jobs: Vec<(String, Option<PathBuf>)> = vec![("backbone".into(), None)];
    if a.init {
        jobs.push(("init".into(), Some(a.artifact.join(artifact::ADAPTER_INIT))));
    }
    for p in &a.adapter {
        jobs.push((adapter_name(p), Some(p.clone())));
    }
    let mut seen = BTreeSet::new();
    for (i, j) in jobs.iter_mut().enumerate() {
        if !seen.insert(j.0.clone()) {
            j.0 = format!("{} ({})", j.0, i);
        }
    }
    let mut models = Vec::new();
    for (name, adapter) in jobs {
        let t = Instant::now();
        let mut exe = match &adapter {
            None => backbone(&parts, a.data.threads)?,
            Some(p) => {
                let parts = load_parts(&a.artifact, Some(p))?;
                parts.executable(&a.artifact, RUN_STAGE, a.data.threads)?
            }
        };
        let pb = bar(ds.len() as u64, format!("features: {name}"));
        let features = features_of(exe.as_mut(), &ds, &cfg, dim, &pb)?;
        pb.finish_and_clear();
        let stats = analysis::analyze(&features, dim, &members)
            .with_context(|| format!("features of {name}"))?;
        let pca = analysis::pca(&features, dim, 10.min(dim))
            .with_context(|| format!("features of {name}"))?;
        models.push(Model {
            name,
            adapter,
            features,
            stats,
            pca,
            seconds: t.elapsed().as_secs_f64(),
        });
    }

    // Features, for users' own analyses.
    let tensors: Vec<(String, HostTensor)> = models
        .iter()
        .map(|md| {
            (
                format!("features.{}", md.name),
                HostTensor::new(vec![ds.len(), dim], md.features.clone()),
            )
        })
        .collect();
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_tensors(&a.output.join("features.safetensors"), &refs, None)?;

    // Plots.
    let projections: Vec<Vec<Vec<f64>>> = models
        .iter()
        .map(|md| md.pca.project(&md.features))
        .collect();
    let panels: Vec<Panel> = models
        .iter()
        .zip(&projections)
        .map(|(md, p)| Panel {
            name: md.name.clone(),
            ratio: md.pca.explained_ratio(),
            points: p
                .iter()
                .map(|r| [r[0], r.get(1).copied().unwrap_or(0.0)])
                .collect(),
            trace_sw: md.stats.trace_sw,
            within: md.stats.within_fraction,
        })
        .collect();
    let mut plots = Vec::new();
    plots.extend(save(
        &Hist {
            panels: &panels,
            members: &members,
            names: &names,
        },
        &a.output.join("pc1_hist"),
    )?);
    plots.extend(save(
        &Scatter {
            panels: &panels,
            members: &members,
            names: &names,
        },
        &a.output.join("pca_scatter"),
    )?);

    let out = json!({
        "artifact": a.artifact,
        "method": m.peft.method,
        "target": m.target,
        "dtype": m.dtype,
        "data": a.data.data,
        "annotations": a.ann,
        "task": if task == Task::MultiLabel { "multilabel" } else { "multiclass" },
        "images": ds.len(),
        "dim": dim,
        "class_counts": members.iter().map(Vec::len).collect::<Vec<_>>(),
        "features": "final class token after the final LayerNorm (the head's input)",
        "normalisation": "trace_sw = sum over classes c and images x in c of |x - mu_c|^2 (unnormalised, as Eq. 11 sums); trace_sw_per_image = class trace / n_c; within_fraction = trace_sw / trace_st; an image counts in every class it carries",
        "models": models.iter().map(|md| json!({
            "name": md.name,
            "adapter": md.adapter,
            "seconds": md.seconds,
            "stats": md.stats,
            "pca": {
                "explained_ratio": md.pca.explained_ratio(),
                "eigenvalues": md.pca.eigenvalues.iter().take(md.pca.components.len()).collect::<Vec<_>>(),
            },
        })).collect::<Vec<_>>(),
        "files": std::iter::once(a.output.join("features.safetensors")).chain(plots.iter().cloned()).collect::<Vec<_>>(),
        "seconds": t0.elapsed().as_secs_f64(),
    });
    artifact::write_atomic(
        &a.output.join("analysis.json"),
        format!("{}\n", serde_json::to_string_pretty(&out)?).as_bytes(),
    )?;
    if a.json {
        println!("{out}");
    } else {
        print!("{}", table(&models, &members));
        println!(
            "wrote {}/analysis.json, features.safetensors, pc1_hist.png/.svg, pca_scatter.png/.svg ({} images, {:.1} s)",
            a.output.display(),
            ds.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The summary table: per class n and tr Σ_W^c for each model, then the totals.
fn table(models: &[Model], members: &[Vec<usize>]) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:<10} {:>6}", "class", "n");
    for md in models {
        let _ = write!(s, " {:>16}", trunc(&format!("trΣW {}", md.name), 16));
    }
    s.push('\n');
    for (c, rows) in members.iter().enumerate() {
        let _ = write!(s, "{:<10} {:>6}", c, rows.len());
        for md in models {
            let _ = write!(s, " {:>16.4}", md.stats.classes[c].trace_sw);
        }
        s.push('\n');
    }
    let mut line = |label: &str, f: &dyn Fn(&Analysis) -> Option<f64>| {
        let _ = write!(s, "{label:<17}");
        for md in models {
            match f(&md.stats) {
                Some(v) => {
                    let _ = write!(s, " {v:>16.4}");
                }
                None => {
                    let _ = write!(s, " {:>16}", "-");
                }
            }
        }
        s.push('\n');
    };
    line("trΣW total", &|a| Some(a.trace_sw));
    line("trΣB", &|a| Some(a.trace_sb));
    line("trΣW / trΣT", &|a| Some(a.within_fraction));
    line("trΣB / trΣW", &|a| Some(a.separation));
    line("min centre dist", &|a| a.centre_distance_min);
    s
}

/// Three significant digits.
fn sig3(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let digits = (2 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.digits$}")
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n - 1).collect();
        format!("{t}…")
    }
}

// ---- plots -----------------------------------------------------------------------------

/// One model's points in its own first two principal components.
struct Panel {
    name: String,
    ratio: Vec<f64>,
    points: Vec<[f64; 2]>,
    trace_sw: f64,
    within: f64,
}

const PANEL_W: u32 = 440;
const PANEL_H: u32 = 380;

fn grid_of(n: usize) -> (usize, usize) {
    let cols = n.clamp(1, 3);
    (n.div_ceil(cols).max(1), cols)
}

/// Fig. 2a: per-class histograms of the first principal component, a panel per model.
struct Hist<'a> {
    panels: &'a [Panel],
    members: &'a [Vec<usize>],
    names: &'a [String],
}

impl Figure for Hist<'_> {
    fn size(&self) -> (u32, u32) {
        let (r, c) = grid_of(self.panels.len());
        (PANEL_W * c as u32, PANEL_H * r as u32 + 40)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let root = root
            .titled(
                "First principal component per class",
                (FAMILY, 20).into_font().style(FontStyle::Bold),
            )
            .map_err(perr)?;
        let areas = root.split_evenly(grid_of(self.panels.len()));
        const BINS: usize = 24;
        for (p, area) in self.panels.iter().zip(&areas) {
            let xs: Vec<f64> = p.points.iter().map(|q| q[0]).collect();
            let (lo, hi) = padded(xs.iter().copied());
            let w = (hi - lo) / BINS as f64;
            let hists: Vec<Vec<usize>> = self
                .members
                .iter()
                .map(|rows| {
                    let v: Vec<f64> = rows.iter().map(|&i| xs[i]).collect();
                    analysis::histogram(&v, lo, hi, BINS)
                })
                .collect();
            let ymax = hists.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!(
                        "{} (PC1 {:.0}% of variance)",
                        trunc(&p.name, 28),
                        100.0 * p.ratio.first().copied().unwrap_or(0.0)
                    ),
                    (FAMILY, 15),
                )
                .margin(8)
                .x_label_area_size(34)
                .y_label_area_size(44)
                .build_cartesian_2d(lo..hi, 0.0..ymax * 1.1)
                .map_err(perr)?;
            chart
                .configure_mesh()
                .x_desc("PC1")
                .y_desc("images")
                .y_label_formatter(&int_label)
                .label_style((FAMILY, 11))
                .axis_desc_style((FAMILY, 13))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(perr)?;
            for (c, h) in hists.iter().enumerate() {
                let col = colour(c);
                chart
                    .draw_series(h.iter().enumerate().filter(|(_, &k)| k > 0).map(|(b, &k)| {
                        let x0 = lo + b as f64 * w;
                        Rectangle::new([(x0, 0.0), (x0 + w, k as f64)], col.mix(0.35).filled())
                    }))
                    .map_err(perr)?;
                // The outline as a step line.
                let mut step = vec![(lo, 0.0)];
                for (b, &k) in h.iter().enumerate() {
                    let x0 = lo + b as f64 * w;
                    step.push((x0, k as f64));
                    step.push((x0 + w, k as f64));
                }
                step.push((hi, 0.0));
                chart
                    .draw_series(LineSeries::new(step, col.stroke_width(2)))
                    .map_err(perr)?
                    .label(trunc(&self.names[c], 24))
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled())
                    });
            }
            chart
                .configure_series_labels()
                .label_font((FAMILY, 11))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.4))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(perr)?;
        }
        Ok(())
    }
}

/// Fig. 2b/c: the 2-D PCA projection, with each class's density contours.
struct Scatter<'a> {
    panels: &'a [Panel],
    members: &'a [Vec<usize>],
    names: &'a [String],
}

impl Figure for Scatter<'_> {
    fn size(&self) -> (u32, u32) {
        let (r, c) = grid_of(self.panels.len());
        (PANEL_W * c as u32, (PANEL_H + 20) * r as u32 + 40)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let root = root
            .titled(
                "PCA of the features, with per-class density contours",
                (FAMILY, 20).into_font().style(FontStyle::Bold),
            )
            .map_err(perr)?;
        let areas = root.split_evenly(grid_of(self.panels.len()));
        // Smaller points when there are many.
        let radius = if self.panels.first().map_or(0, |p| p.points.len()) > 200 {
            2
        } else {
            3
        };
        for (p, area) in self.panels.iter().zip(&areas) {
            let xr = padded(p.points.iter().map(|q| q[0]));
            let yr = padded(p.points.iter().map(|q| q[1]));
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!(
                        "{}: trΣW {}, ΣW/ΣT {:.2}",
                        trunc(&p.name, 22),
                        sig3(p.trace_sw),
                        p.within
                    ),
                    (FAMILY, 15),
                )
                .margin(8)
                .x_label_area_size(34)
                .y_label_area_size(44)
                .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)
                .map_err(perr)?;
            chart
                .configure_mesh()
                .x_desc(format!(
                    "PC1 ({:.0}%)",
                    100.0 * p.ratio.first().copied().unwrap_or(0.0)
                ))
                .y_desc(format!(
                    "PC2 ({:.0}%)",
                    100.0 * p.ratio.get(1).copied().unwrap_or(0.0)
                ))
                .label_style((FAMILY, 11))
                .axis_desc_style((FAMILY, 13))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(perr)?;
            for (c, rows) in self.members.iter().enumerate() {
                let col = colour(c);
                let pts: Vec<[f64; 2]> = rows.iter().map(|&i| p.points[i]).collect();
                if pts.len() >= 2 {
                    let g = analysis::kde2d(&pts, xr, yr, 60);
                    let max = g.iter().flatten().copied().fold(0.0, f64::max);
                    for (li, level) in [0.3, 0.65].into_iter().enumerate() {
                        let segs = analysis::contour(&g, xr, yr, level * max);
                        chart
                            .draw_series(segs.into_iter().map(|s| {
                                PathElement::new(
                                    vec![s[0], s[1]],
                                    col.mix(0.45 + 0.25 * li as f64)
                                        .stroke_width(1 + li as u32 / 2),
                                )
                            }))
                            .map_err(perr)?;
                    }
                }
                chart
                    .draw_series(
                        pts.iter()
                            .map(|q| Circle::new((q[0], q[1]), radius, col.mix(0.7).filled())),
                    )
                    .map_err(perr)?
                    .label(trunc(&self.names[c], 24))
                    .legend(move |(x, y)| Circle::new((x + 6, y), 4, col.filled()));
            }
            chart
                .configure_series_labels()
                .label_font((FAMILY, 11))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.4))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(perr)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analyze_names_and_grid() {
        assert_eq!(
            adapter_name(Path::new("runs/r1/best.safetensors")),
            "r1/best"
        );
        assert_eq!(adapter_name(Path::new("best.safetensors")), "best");
        assert_eq!(grid_of(1), (1, 1));
        assert_eq!(grid_of(2), (1, 2));
        assert_eq!(grid_of(4), (2, 3));
        assert_eq!(trunc("abcdef", 4), "abc…");
        assert_eq!(sig3(1234.6), "1235");
        assert_eq!(sig3(0.012345), "0.0123");
        assert_eq!(sig3(5.0), "5.00");
    }
}
