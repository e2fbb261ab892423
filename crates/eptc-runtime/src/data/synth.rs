//! A generator of small few-shot image data sets in the MedFMC layout (DESIGN.md §6),
//! whose classes differ in texture and shape: a learnable signal for `eptc demo`, for
//! generating data from the command line, and for training tests.
//!
//! Multi-class (2 to 4 classes): 0 horizontal stripes, 1 vertical stripes, 2 a filled
//! disc, 3 a checkerboard. Multi-label (2 to 4 labels), each the independent presence
//! of a feature: 0 horizontal stripes, 1 a disc, 2 a square, 3 a red tint.
//!
//! Every image varies in background colour and gradient, foreground colour, period,
//! phase, a small rotation, position, size and pixel noise, so no two are alike, but
//! the classes stay clearly separable. The files are a function of the [`SynthSpec`]
//! alone: the same spec gives byte-identical files (on a given platform).
//!
//! Layout written under `dir`: `images/{train,val,test}_NNNN.png` (RGB, 8-bit),
//! `train.txt`, `val.txt`, `test.txt` (labeled: `images/train_0003.png 2` or
//! `images/val_0001.png 1,0,1`) and `test_unlabeled.txt` (the test images' names only).
//! Paths in the annotation files are relative to `dir`.

use std::f32::consts::{PI, TAU};
use std::fs;
use std::path::{Path, PathBuf};

use ::image::codecs::png::{CompressionType, FilterType, PngEncoder};
use ::image::{ExtendedColorType, ImageEncoder};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::loader::mix_seed;
use super::{DataError, Task};

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub task: Task,
    /// Classes (multi-class) or labels (multi-label): 2 to 4.
    pub classes: usize,
    /// Side length of the square images, 8 to 4096.
    pub image_size: u32,
    /// Images per class in each split (multi-label: a split has `classes * n` images,
    /// each label present in half of them). At least 1 each.
    pub train_per_class: usize,
    pub val_per_class: usize,
    pub test_per_class: usize,
    pub seed: u64,
}

impl Default for SynthSpec {
    /// Multi-class, 3 classes, 64 px, 8 / 4 / 4 images per class, seed 0.
    fn default() -> Self {
        SynthSpec {
            task: Task::MultiClass,
            classes: 3,
            image_size: 64,
            train_per_class: 8,
            val_per_class: 4,
            test_per_class: 4,
            seed: 0,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    /// Image files written.
    pub images: usize,
    /// `dir/train.txt`.
    pub train: PathBuf,
    /// `dir/val.txt`.
    pub val: PathBuf,
    /// `dir/test.txt`.
    pub test: PathBuf,
    /// `dir/test_unlabeled.txt`.
    pub test_unlabeled: PathBuf,
    /// One name per class / label, e.g. `horizontal_stripes`.
    pub class_names: Vec<String>,
}

const MULTICLASS_NAMES: [&str; 4] = [
    "horizontal_stripes",
    "vertical_stripes",
    "disc",
    "checkerboard",
];
const MULTILABEL_NAMES: [&str; 4] = ["stripes", "disc", "square", "red_tint"];

const LABEL_STREAM: u64 = 0x4c41_4245;
const IMAGE_STREAM: u64 = 0x494d_4147;

/// The label of one generated image.
enum SynthLabel {
    Class(usize),
    Set(Vec<bool>),
}

impl SynthLabel {
    fn annotation(&self) -> String {
        match self {
            SynthLabel::Class(c) => c.to_string(),
            SynthLabel::Set(hot) => hot
                .iter()
                .map(|&h| if h { "1" } else { "0" })
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// Writes the data set described by `spec` into `dir` (created if needed).
pub fn generate(dir: &Path, spec: &SynthSpec) -> Result<SynthSummary, DataError> {
    validate(spec)?;
    let images_dir = dir.join("images");
    fs::create_dir_all(&images_dir).map_err(|source| DataError::Write {
        path: images_dir.clone(),
        source,
    })?;
    let splits = [
        ("train", spec.train_per_class),
        ("val", spec.val_per_class),
        ("test", spec.test_per_class),
    ];
    let mut images = 0;
    let mut texts = Vec::new();
    let mut test_names = String::new();
    for (split_id, &(split, per_class)) in splits.iter().enumerate() {
        let labels = split_labels(spec, split_id as u64, per_class);
        let mut text = String::new();
        for (index, label) in labels.iter().enumerate() {
            let name = format!("images/{split}_{index:04}.png");
            let mut rng = StdRng::seed_from_u64(mix_seed(&[
                IMAGE_STREAM,
                spec.seed,
                split_id as u64,
                index as u64,
            ]));
            let pixels = render(label, spec.image_size, &mut rng);
            write_png(&dir.join(&name), &pixels, spec.image_size)?;
            images += 1;
            text.push_str(&format!("{name} {}\n", label.annotation()));
            if split == "test" {
                test_names.push_str(&format!("{name}\n"));
            }
        }
        texts.push((format!("{split}.txt"), text));
    }
    texts.push(("test_unlabeled.txt".to_string(), test_names));
    for (file, text) in &texts {
        let path = dir.join(file);
        fs::write(&path, text).map_err(|source| DataError::Write { path, source })?;
    }
    let names: &[&str] = match spec.task {
        Task::MultiClass => &MULTICLASS_NAMES,
        Task::MultiLabel => &MULTILABEL_NAMES,
    };
    Ok(SynthSummary {
        images,
        train: dir.join("train.txt"),
        val: dir.join("val.txt"),
        test: dir.join("test.txt"),
        test_unlabeled: dir.join("test_unlabeled.txt"),
        class_names: names[..spec.classes]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    })
}

fn validate(spec: &SynthSpec) -> Result<(), DataError> {
    let bad = |msg: String| Err(DataError::InvalidSpec(msg));
    if !(2..=4).contains(&spec.classes) {
        return bad(format!(
            "{} classes requested; the generator makes 2 to 4",
            spec.classes
        ));
    }
    if !(8..=4096).contains(&spec.image_size) {
        return bad(format!(
            "image size {} is out of range (8 to 4096 pixels)",
            spec.image_size
        ));
    }
    for (split, n) in [
        ("train", spec.train_per_class),
        ("val", spec.val_per_class),
        ("test", spec.test_per_class),
    ] {
        if n == 0 {
            return bad(format!(
                "the {split} split needs at least 1 image per class"
            ));
        }
    }
    Ok(())
}

/// The labels of one split, in file order.
fn split_labels(spec: &SynthSpec, split_id: u64, per_class: usize) -> Vec<SynthLabel> {
    let mut rng = StdRng::seed_from_u64(mix_seed(&[LABEL_STREAM, spec.seed, split_id]));
    let k = spec.classes;
    let n = per_class * k;
    match spec.task {
        Task::MultiClass => {
            let mut classes: Vec<usize> = (0..n).map(|i| i % k).collect();
            classes.shuffle(&mut rng);
            classes.into_iter().map(SynthLabel::Class).collect()
        }
        Task::MultiLabel => {
            // Subsets in complement pairs: every label is present in exactly half of
            // each pair, so each split has both values of every label.
            let full = (1u32 << k) - 1;
            let mut pairs: Vec<u32> = (0..1u32 << (k - 1)).collect();
            let mut sets = Vec::with_capacity(n);
            while sets.len() < n {
                pairs.shuffle(&mut rng);
                for &a in &pairs {
                    let (first, second) = if rng.random_bool(0.5) {
                        (a, full ^ a)
                    } else {
                        (full ^ a, a)
                    };
                    sets.push(first);
                    sets.push(second);
                }
            }
            sets.truncate(n);
            sets.shuffle(&mut rng);
            sets.into_iter()
                .map(|s| SynthLabel::Set((0..k).map(|j| s >> j & 1 == 1).collect()))
                .collect()
        }
    }
}

fn uniform(rng: &mut StdRng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// A colour clearly apart from `base`: each channel moved by a random amount in one
/// shared direction (lighter or darker), clamped to `[0, 1]`.
fn contrasting(base: [f32; 3], rng: &mut StdRng) -> [f32; 3] {
    let d = uniform(rng, 0.28, 0.45)
        * if base[0] + base[1] + base[2] < 1.35 {
            1.0
        } else {
            -1.0
        };
    let mut c = [0.0; 3];
    for (ch, b) in c.iter_mut().zip(base) {
        *ch = (b + d * uniform(rng, 0.55, 1.0)).clamp(0.0, 1.0);
    }
    c
}

/// A smooth band mask from a value in `[-1, 1]` (a sine): flat bands, soft edges.
fn band(s: f32) -> f32 {
    (0.5 + 1.6 * s).clamp(0.0, 1.0)
}

/// A mask edge: 1 inside (`d > 0`), 0 outside, about one pixel of anti-aliasing.
fn edge(d: f32) -> f32 {
    (0.5 + d).clamp(0.0, 1.0)
}

/// A periodic wave along direction `angle` (radians): `sin(2 pi u / period + phase)`.
struct Wave {
    cos: f32,
    sin: f32,
    k: f32,
    phase: f32,
}

impl Wave {
    fn new(angle: f32, period: f32, rng: &mut StdRng) -> Wave {
        Wave {
            cos: angle.cos(),
            sin: angle.sin(),
            k: TAU / period,
            phase: uniform(rng, 0.0, TAU),
        }
    }

    fn at(&self, x: f32, y: f32) -> f32 {
        ((x * self.cos + y * self.sin) * self.k + self.phase).sin()
    }
}

/// The features one image shows; each is a mask in `[0, 1]` blended with its colour.
struct Scene {
    size: f32,
    background: [f32; 3],
    gradient: (f32, f32),
    layers: Vec<(Shape, [f32; 3], f32)>,
    tint: Option<[f32; 3]>,
    noise: f32,
}

enum Shape {
    Stripes(Wave),
    Checker(Wave, Wave),
    Disc { cx: f32, cy: f32, r: f32 },
    Square { cx: f32, cy: f32, half: f32 },
}

impl Shape {
    fn mask(&self, x: f32, y: f32) -> f32 {
        match self {
            Shape::Stripes(w) => band(w.at(x, y)),
            Shape::Checker(a, b) => band(a.at(x, y) * b.at(x, y) * 1.5),
            Shape::Disc { cx, cy, r } => edge(r - ((x - cx).powi(2) + (y - cy).powi(2)).sqrt()),
            Shape::Square { cx, cy, half } => edge(half - (x - cx).abs().max((y - cy).abs())),
        }
    }
}

/// A stripe period in pixels, scaled with the image size (at least 3 pixels).
fn period(size: f32, rng: &mut StdRng) -> f32 {
    (size / 64.0 * uniform(rng, 7.0, 14.0)).max(3.0)
}

fn render(label: &SynthLabel, size: u32, rng: &mut StdRng) -> Vec<u8> {
    let s = size as f32;
    let grey = uniform(rng, 0.25, 0.6);
    let background = [0; 3].map(|_| (grey + uniform(rng, -0.07, 0.07)).clamp(0.0, 1.0));
    let gradient = (uniform(rng, -0.12, 0.12), uniform(rng, -0.12, 0.12));
    let tilt = |rng: &mut StdRng| uniform(rng, -0.15, 0.15);
    let mut scene = Scene {
        size: s,
        background,
        gradient,
        layers: Vec::new(),
        tint: None,
        noise: uniform(rng, 0.04, 0.1),
    };
    match label {
        SynthLabel::Class(c) => {
            let colour = contrasting(background, rng);
            let shape = match c {
                0 => Shape::Stripes(Wave::new(PI / 2.0 + tilt(rng), period(s, rng), rng)),
                1 => Shape::Stripes(Wave::new(tilt(rng), period(s, rng), rng)),
                2 => Shape::Disc {
                    cx: s * uniform(rng, 0.32, 0.68),
                    cy: s * uniform(rng, 0.32, 0.68),
                    r: s * uniform(rng, 0.16, 0.3),
                },
                _ => {
                    let (a, p) = (tilt(rng), period(s, rng) * 1.4);
                    Shape::Checker(Wave::new(a, p, rng), Wave::new(a + PI / 2.0, p, rng))
                }
            };
            scene.layers.push((shape, colour, uniform(rng, 0.75, 1.0)));
        }
        SynthLabel::Set(hot) => {
            let present = |j: usize| hot.get(j).copied().unwrap_or(false);
            if present(0) {
                let colour = contrasting(background, rng);
                let wave = Wave::new(PI / 2.0 + tilt(rng), period(s, rng), rng);
                scene
                    .layers
                    .push((Shape::Stripes(wave), colour, uniform(rng, 0.45, 0.65)));
            }
            // The disc and the square sit in different halves (left / right, either
            // way round) so they never hide each other.
            let disc_left = rng.random_bool(0.5);
            let place = |left: bool, extent: f32, rng: &mut StdRng| {
                let x0 = if left { 0.0 } else { 0.5 * s };
                let cx = x0 + uniform(rng, extent, 0.5 * s - extent);
                let cy = uniform(rng, extent, s - extent);
                (cx, cy)
            };
            if present(1) {
                let r = s * uniform(rng, 0.11, 0.19);
                let (cx, cy) = place(disc_left, r + 1.0, rng);
                let colour = contrasting(background, rng);
                scene.layers.push((Shape::Disc { cx, cy, r }, colour, 1.0));
            }
            if present(2) {
                let half = s * uniform(rng, 0.09, 0.17);
                let (cx, cy) = place(!disc_left, half * 1.2 + 1.0, rng);
                let colour = contrasting(background, rng);
                scene
                    .layers
                    .push((Shape::Square { cx, cy, half }, colour, 1.0));
            }
            if present(3) {
                let t = uniform(rng, 0.16, 0.26);
                scene.tint = Some([t, -0.35 * t, -0.5 * t]);
            }
        }
    }
    scene.draw(size as usize, rng)
}

impl Scene {
    fn draw(&self, size: usize, rng: &mut StdRng) -> Vec<u8> {
        let mut out = Vec::with_capacity(size * size * 3);
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                let shade = self.gradient.0 * (fx / self.size - 0.5)
                    + self.gradient.1 * (fy / self.size - 0.5);
                let mut px = self.background.map(|b| b + shade);
                for (shape, colour, opacity) in &self.layers {
                    let m = shape.mask(fx, fy) * opacity;
                    if m > 0.0 {
                        for (p, c) in px.iter_mut().zip(colour) {
                            *p += m * (c - *p);
                        }
                    }
                }
                if let Some(tint) = self.tint {
                    for (p, t) in px.iter_mut().zip(tint) {
                        *p += t;
                    }
                }
                for p in px {
                    let v = p + uniform(rng, -self.noise, self.noise);
                    out.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
                }
            }
        }
        out
    }
}

fn write_png(path: &Path, rgb: &[u8], size: u32) -> Result<(), DataError> {
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Fast, FilterType::Adaptive)
        .write_image(rgb, size, size, ExtendedColorType::Rgb8)
        .map_err(|e| DataError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    fs::write(path, bytes).map_err(|source| DataError::Write {
        path: path.to_path_buf(),
        source,
    })
}
