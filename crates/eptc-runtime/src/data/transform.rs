//! Image transforms (DESIGN.md §7 defaults):
//!
//! - evaluation: bicubic resize to `size x size`;
//! - training: torchvision's `RandomResizedCrop` (scale 0.08–1, ratio 3/4–4/3 sampled in
//!   log space, 10 attempts then a center-crop fallback, bicubic to `size x size`) and a
//!   horizontal flip with probability 0.5, driven by a caller-provided RNG (a seeded
//!   `StdRng` gives the same crops for the same seed);
//! - normalisation with a per-channel mean / std (ImageNet by default), producing CHW
//!   `f32` (`3 * size * size` values).
//!
//! Bicubic is `image::imageops::resize` with `FilterType::CatmullRom` (Catmull-Rom cubic,
//! `a = -0.5`, the kernel of PIL's bicubic, with the support widened when downscaling
//! (antialiasing) as PIL does). Results are clamped to `[0, 1]`.

use ::image::imageops::{self, FilterType};
use rand::Rng;

use super::Image;

/// Per-channel normalisation: `(x - mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// ImageNet mean / std, the default.
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize::IMAGENET
    }
}

/// A crop rectangle in pixels (torchvision's `i, j, h, w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropParams {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// torchvision's `RandomResizedCrop` with bicubic interpolation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomResizedCrop {
    /// Output side length.
    pub size: u32,
    /// Range of the crop's area as a fraction of the image's area.
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio (width / height), sampled in log space.
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// Default scale `(0.08, 1.0)` and ratio `(3/4, 4/3)`.
    pub fn new(size: u32) -> Self {
        RandomResizedCrop {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// torchvision's `get_params`: up to 10 random attempts, then a center crop with
    /// the aspect ratio clamped to the allowed range.
    pub fn params<R: Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> CropParams {
        let area = f64::from(width) * f64::from(height);
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, log_lo, log_hi).exp();
            let w = (target_area * aspect).sqrt().round_ties_even();
            let h = (target_area / aspect).sqrt().round_ties_even();
            if w > 0.0 && w <= f64::from(width) && h > 0.0 && h <= f64::from(height) {
                let (w, h) = (w as u32, h as u32);
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropParams {
                    top,
                    left,
                    height: h,
                    width: w,
                };
            }
        }
        // Fallback: central crop.
        let in_ratio = f64::from(width) / f64::from(height);
        let (min_r, max_r) = (
            self.ratio.0.min(self.ratio.1),
            self.ratio.0.max(self.ratio.1),
        );
        let (w, h) = if in_ratio < min_r {
            let h = (f64::from(width) / min_r).round_ties_even() as u32;
            (width, h.clamp(1, height))
        } else if in_ratio > max_r {
            let w = (f64::from(height) * max_r).round_ties_even() as u32;
            (w.clamp(1, width), height)
        } else {
            (width, height)
        };
        CropParams {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }

    /// Crops with random parameters and resizes (bicubic) to `size x size`.
    pub fn apply<R: Rng + ?Sized>(&self, image: &Image, rng: &mut R) -> Image {
        let p = self.params(image.width(), image.height(), rng);
        let crop = imageops::crop_imm(image, p.left, p.top, p.width, p.height).to_image();
        resize(&crop, self.size)
    }
}

/// `lo + (hi - lo) * U[0, 1)`; never panics on an empty range.
fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Bicubic (Catmull-Rom) resize to `size x size`.
pub fn resize(image: &Image, size: u32) -> Image {
    imageops::resize(image, size, size, FilterType::CatmullRom)
}

/// Mirrors the image left to right.
pub fn hflip(image: &Image) -> Image {
    imageops::flip_horizontal(image)
}

/// Normalises an RGB image into CHW `f32`: `3 * height * width` values.
pub fn to_chw_normalized(image: &Image, norm: &Normalize) -> Vec<f32> {
    let plane = image.width() as usize * image.height() as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px.0[c] - norm.mean[c]) / norm.std[c];
        }
    }
    out
}

/// The evaluation transform: bicubic resize to `size x size`, then normalisation.
pub fn eval_transform(image: &Image, size: u32, norm: &Normalize) -> Vec<f32> {
    to_chw_normalized(&resize(image, size), norm)
}

/// The training transform: RandomResizedCrop to `size x size` (default scale / ratio),
/// horizontal flip with probability 0.5, then normalisation.
pub fn train_transform<R: Rng + ?Sized>(
    image: &Image,
    size: u32,
    norm: &Normalize,
    rng: &mut R,
) -> Vec<f32> {
    let mut out = RandomResizedCrop::new(size).apply(image, rng);
    if rng.random_bool(0.5) {
        out = hflip(&out);
    }
    to_chw_normalized(&out, norm)
}
