//! Shared by the benchmarks: random ViT weights in timm's layout.

use std::collections::BTreeMap;
use std::path::PathBuf;

use eptc_frontend::TensorFile;
use eptc_ir::HostTensor;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// Random timm-layout ViT weights.
pub fn vit(dim: usize, depth: usize, patch: usize, img: usize, rng: &mut StdRng) -> TensorFile {
    let mut tensors = BTreeMap::new();
    let mut t = |name: String, shape: &[usize], std: f32| {
        let d = Normal::new(0.0f32, std).unwrap();
        let n: usize = shape.iter().product();
        tensors.insert(
            name,
            HostTensor::new(shape.to_vec(), (0..n).map(|_| d.sample(rng)).collect()),
        );
    };
    let grid = img / patch;
    t("cls_token".into(), &[1, 1, dim], 1.0);
    t("pos_embed".into(), &[1, 1 + grid * grid, dim], 0.5);
    t(
        "patch_embed.proj.weight".into(),
        &[dim, 3, patch, patch],
        0.02,
    );
    t("patch_embed.proj.bias".into(), &[dim], 0.1);
    for i in 0..depth {
        for (n, o, k) in [
            ("attn.qkv", 3 * dim, dim),
            ("attn.proj", dim, dim),
            ("mlp.fc1", 4 * dim, dim),
            ("mlp.fc2", dim, 4 * dim),
        ] {
            t(
                format!("blocks.{i}.{n}.weight"),
                &[o, k],
                1.0 / (k as f32).sqrt(),
            );
            t(format!("blocks.{i}.{n}.bias"), &[o], 0.1);
        }
        for n in ["norm1", "norm2"] {
            t(format!("blocks.{i}.{n}.weight"), &[dim], 1.0);
            t(format!("blocks.{i}.{n}.bias"), &[dim], 0.1);
        }
    }
    t("norm.weight".into(), &[dim], 1.0);
    t("norm.bias".into(), &[dim], 0.1);
    TensorFile {
        path: PathBuf::from("<generated>"),
        tensors,
        metadata: Default::default(),
    }
}
