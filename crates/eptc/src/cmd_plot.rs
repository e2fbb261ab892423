//! `eptc plot`: a run's training curves (loss, learning rate, validation metrics per
//! epoch, from `RUN/metrics.jsonl`) as PNG and SVG; and the plotting helpers that
//! `eptc analyze` shares.
//!
//! Plots are drawn with `plotters` without system fonts: text is rendered with the
//! DejaVu Sans font embedded in the binary (`assets/fonts/`, Bitstream Vera license), so
//! a machine without fontconfig draws the same PNG. The SVG names the font family
//! (`sans-serif`) and leaves the glyphs to the viewer.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::artifact;

const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
pub(crate) const FAMILY: &str = "sans-serif";

/// Register the embedded font (once per process).
fn fonts() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            plotters::style::register_font(FAMILY, style, FONT)
                .map_err(|_| "the embedded DejaVu Sans font does not load".to_string())?;
        }
        Ok(())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Ten distinguishable colours (matplotlib's `tab10`), repeated for more classes.
pub(crate) fn colour(i: usize) -> RGBColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = TAB10[i % 10];
    RGBColor(r, g, b)
}

/// A figure drawn the same way on any plotters backend.
pub(crate) trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// Turn a plotters error into an anyhow one.
pub(crate) fn perr<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

/// Draw `fig` to `STEM.png` and `STEM.svg`; returns both paths.
pub(crate) fn save(fig: &impl Figure, stem: &Path) -> Result<Vec<PathBuf>> {
    fonts()?;
    let (w, h) = fig.size();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        fig.draw(&root)
            .with_context(|| format!("drawing {}", png.display()))?;
        root.present().map_err(perr)?;
    }
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(&buf, w, h, image::ExtendedColorType::Rgb8)
        .with_context(|| format!("encoding {}", png.display()))?;
    artifact::write_atomic(&png, &bytes)?;
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        fig.draw(&root)
            .with_context(|| format!("drawing {}", svg.display()))?;
        root.present().map_err(perr)?;
    }
    artifact::write_atomic(&svg, text.as_bytes())?;
    Ok(vec![png, svg])
}

use image::ImageEncoder as _;

/// Tick labels for integer axes (epochs, image counts): integers only, others blank.
pub(crate) fn int_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round())
    } else {
        String::new()
    }
}

/// `[lo, hi]` padded by 5% (and widened when empty or a single value).
pub(crate) fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 * (1.0 + lo.abs()) {
        let d = 0.5 * (1.0 + lo.abs());
        return (lo - d, hi + d);
    }
    let p = 0.05 * (hi - lo);
    (lo - p, hi + p)
}

// ---- eptc plot -------------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run folder written by `eptc train` (reads its metrics.jsonl)
    pub run: PathBuf,
    /// Folder for training.png and training.svg [default: RUN/plots]
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

/// One epoch of a run, as `metrics.jsonl` records it.
#[derive(Debug, Clone)]
struct Epoch {
    epoch: f64,
    loss: f64,
    lr: f64,
    /// Validation figures by name (mAP, AUC, accuracy), percent.
    val: Vec<(&'static str, f64)>,
    best: bool,
}

fn read_metrics(path: &Path) -> Result<Vec<Epoch>> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "{}: cannot read the run's metrics (is this a run folder written by `eptc train`?)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let num = |k: &str| -> Result<f64> {
            v.get(k)
                .and_then(|x| x.as_f64())
                .with_context(|| format!("{}:{}: no number {k:?}", path.display(), i + 1))
        };
        let mut val = Vec::new();
        for (key, name) in [("map", "mAP"), ("auc", "AUC"), ("accuracy", "accuracy")] {
            if let Some(x) = v
                .get("val")
                .and_then(|m| m.get(key))
                .and_then(|x| x.as_f64())
            {
                val.push((name, x));
            }
        }
        out.push(Epoch {
            epoch: num("epoch")?,
            loss: num("train_loss")?,
            lr: num("lr")?,
            val,
            best: v.get("best").and_then(|b| b.as_bool()).unwrap_or(false),
        });
    }
    if out.is_empty() {
        bail!("{}: no epoch recorded yet", path.display());
    }
    Ok(out)
}

/// Three panels side by side: training loss, learning rate, validation metrics.
struct Curves {
    title: String,
    epochs: Vec<Epoch>,
}

type Series = (String, Vec<(f64, f64)>);

fn line_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    ylabel: &str,
    xmax: f64,
    series: &[Series],
    marks: &[(f64, f64)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (ylo, yhi) = padded(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5..xmax + 0.5, ylo..yhi)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&int_label)
        .y_desc(ylabel)
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(perr)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(perr)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(perr)?;
    }
    if !marks.is_empty() {
        chart
            .draw_series(
                marks
                    .iter()
                    .map(|&p| Circle::new(p, 6, BLACK.stroke_width(1))),
            )
            .map_err(perr)?;
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(perr)?;
    }
    Ok(())
}

impl Figure for Curves {
    fn size(&self) -> (u32, u32) {
        (1260, 420)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let root = root
            .titled(&self.title, (FAMILY, 20).into_font().style(FontStyle::Bold))
            .map_err(perr)?;
        let panels = root.split_evenly((1, 3));
        let e = &self.epochs;
        let xmax = e.iter().map(|x| x.epoch).fold(1.0, f64::max);
        let pts = |f: &dyn Fn(&Epoch) -> f64| -> Vec<(f64, f64)> {
            e.iter().map(|x| (x.epoch, f(x))).collect()
        };
        line_panel(
            &panels[0],
            "training loss",
            "loss (epoch mean)",
            xmax,
            &[("loss".into(), pts(&|x| x.loss))],
            &[],
        )?;
        line_panel(
            &panels[1],
            "learning rate",
            "lr (epoch's last step)",
            xmax,
            &[("lr".into(), pts(&|x| x.lr))],
            &[],
        )?;
        let mut names: Vec<&'static str> = vec![];
        for x in e {
            for (n, _) in &x.val {
                if !names.contains(n) {
                    names.push(n);
                }
            }
        }
        let series: Vec<Series> = names
            .iter()
            .map(|&n| {
                let p = e
                    .iter()
                    .filter_map(|x| x.val.iter().find(|v| v.0 == n).map(|v| (x.epoch, v.1)))
                    .collect();
                (n.to_string(), p)
            })
            .collect();
        // The epochs that improved the best figure (the headline: accuracy or mAP).
        let head = if names.contains(&"accuracy") {
            "accuracy"
        } else {
            "mAP"
        };
        let marks: Vec<(f64, f64)> = e
            .iter()
            .filter(|x| x.best)
            .filter_map(|x| x.val.iter().find(|v| v.0 == head).map(|v| (x.epoch, v.1)))
            .collect();
        line_panel(
            &panels[2],
            "validation (o = new best)",
            "percent",
            xmax,
            &series,
            &marks,
        )?;
        Ok(())
    }
}

pub fn cmd_plot(a: &PlotArgs) -> Result<()> {
    let epochs = read_metrics(&a.run.join("metrics.jsonl"))?;
    let out = a.output.clone().unwrap_or_else(|| a.run.join("plots"));
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let fig = Curves {
        title: format!("eptc train: {}", a.run.display()),
        epochs,
    };
    let files = save(&fig, &out.join("training"))?;
    println!(
        "plotted {} epoch(s) of {}: {}",
        fig.epochs.len(),
        a.run.display(),
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analyze_plot_metrics_parse_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        fs::write(
            &p,
            "{\"epoch\":1,\"train_loss\":1.5,\"lr\":0.1,\"val\":{\"map\":50.0,\"auc\":60.0,\"accuracy\":40.0},\"best\":true}\n\
             {\"epoch\":2,\"train_loss\":1.0,\"lr\":0.05,\"val\":{\"map\":55.0,\"auc\":null,\"accuracy\":45.0},\"best\":true}\n",
        )
        .unwrap();
        let e = read_metrics(&p).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].val, vec![("mAP", 55.0), ("accuracy", 45.0)]);
        let fig = Curves {
            title: "t".into(),
            epochs: e,
        };
        let files = save(&fig, &d.path().join("c")).unwrap();
        let png = fs::read(&files[0]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = fs::read_to_string(&files[1]).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<polyline") && svg.contains("epoch"));

        fs::write(&p, "{\"epoch\":1}\n").unwrap();
        let err = format!("{:#}", read_metrics(&p).unwrap_err());
        assert!(
            err.contains("metrics.jsonl:1") && err.contains("train_loss"),
            "{err}"
        );
        fs::write(&p, "").unwrap();
        assert!(format!("{:#}", read_metrics(&p).unwrap_err()).contains("no epoch"));
        let err = format!("{:#}", read_metrics(&d.path().join("nope")).unwrap_err());
        assert!(err.contains("run folder"), "{err}");
    }
}
