//! Optimizers and the learning-rate schedule of the paper's protocol, with PyTorch's
//! update rules (checked against `torch.optim` trajectories in `tests/optim.rs`):
//!
//! - SGD with momentum (dampening 0, not Nesterov) and L2 weight decay added to the
//!   gradient: `b = μ b + (g + λ p)` (`b = g + λ p` on the first step), `p -= lr · b`;
//! - AdamW with decoupled weight decay: `p *= 1 − lr λ`, then Adam with bias correction;
//! - cosine annealing to 0, with an optional linear warm-up.
//!
//! Parameters and gradients are named f32 slices; state is kept per name, so the
//! optimizer can be saved and restored for `--resume`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which optimizer, with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Kind {
    Sgd {
        momentum: f32,
        weight_decay: f32,
    },
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

/// An optimizer and its state (momentum buffers or Adam moments, and the step count).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    pub kind: Kind,
    pub steps: u64,
    /// Per parameter: SGD's momentum buffer, or Adam's first and second moments
    /// concatenated.
    pub state: BTreeMap<String, Vec<f32>>,
}

impl Optimizer {
    pub fn new(kind: Kind) -> Self {
        Optimizer {
            kind,
            steps: 0,
            state: BTreeMap::new(),
        }
    }

    /// The paper's default: SGD, momentum 0.9, weight decay 1e-4.
    pub fn paper_default() -> Self {
        Optimizer::new(Kind::Sgd {
            momentum: 0.9,
            weight_decay: 1e-4,
        })
    }

    /// One update of every parameter that has a gradient. Errors (naming the parameter)
    /// when a gradient's length differs from its parameter's.
    pub fn step(
        &mut self,
        lr: f32,
        params: &mut BTreeMap<String, Vec<f32>>,
        grads: &BTreeMap<String, Vec<f32>>,
    ) -> Result<(), String> {
        self.steps += 1;
        let t = self.steps as i32;
        for (name, g) in grads {
            let p = params
                .get_mut(name)
                .ok_or_else(|| format!("gradient for unknown parameter {name:?}"))?;
            if p.len() != g.len() {
                return Err(format!(
                    "parameter {name:?}: {} values but {} gradients",
                    p.len(),
                    g.len()
                ));
            }
            match self.kind {
                Kind::Sgd {
                    momentum,
                    weight_decay,
                } => {
                    let first = !self.state.contains_key(name);
                    let buf = self
                        .state
                        .entry(name.clone())
                        .or_insert_with(|| vec![0.0; p.len()]);
                    for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
                        let d = g + weight_decay * *p;
                        *b = if first || momentum == 0.0 {
                            d
                        } else {
                            momentum * *b + d
                        };
                        *p -= lr * *b;
                    }
                }
                Kind::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let n = p.len();
                    let st = self
                        .state
                        .entry(name.clone())
                        .or_insert_with(|| vec![0.0; 2 * n]);
                    let (m, v) = st.split_at_mut(n);
                    let c1 = 1.0 - beta1.powi(t);
                    let c2_sqrt = (1.0 - beta2.powi(t)).sqrt();
                    for i in 0..n {
                        p[i] *= 1.0 - lr * weight_decay;
                        m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
                        v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
                        let denom = v[i].sqrt() / c2_sqrt + eps;
                        p[i] -= lr / c1 * m[i] / denom;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The learning rate at `step` of `total` (0-based): a linear warm-up over the first
/// `warmup` steps from `base / warmup` to `base`, then cosine annealing to 0 at `total`
/// (PyTorch's `CosineAnnealingLR` with `eta_min = 0` when `warmup` is 0).
pub fn cosine_lr(base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = (step - warmup).min(total.saturating_sub(warmup)) as f64;
    base * (1.0 + (std::f64::consts::PI * t / span).cos()) / 2.0
}
