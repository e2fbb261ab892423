//! The backend interface. A backend declares what it can run ([`Capabilities`]), says
//! whether its hardware is present ([`Availability`]), and turns a graph plus its weights
//! into an [`Executable`] that runs on named host tensors.
//!
//! Built-in backends (`cpu`, later `wgpu`, `cuda`) and dynamically loaded plugins all
//! implement [`Backend`], so the host has one code path whichever backend runs.

pub mod dims;
pub mod plan;

use eptc_ir::{DType, Graph, HostTensor, WeightStore};
use thiserror::Error;

/// What a backend can run. The optimizer only extracts ops listed here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capabilities {
    /// Primitive op kinds (names as in `ir-specs/ops.toml`).
    pub ops: Vec<String>,
    /// Fused op kinds (none before the optimizer exists).
    pub fused_ops: Vec<String>,
    pub dtypes: Vec<DType>,
}

impl Capabilities {
    pub fn supports(&self, kind: &str) -> bool {
        self.ops.iter().chain(&self.fused_ops).any(|k| k == kind)
    }
}

/// Whether a backend can run here, and why (not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// Usable; the string describes the device (e.g. "2 threads, avx512").
    Available(String),
    /// Not usable here; the string says why in plain words.
    Unavailable(String),
}

impl Availability {
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available(_))
    }
}

/// Options for compiling a graph.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Worker threads (CPU backends); `None`: all cores.
    pub threads: Option<usize>,
    /// Storage type of the device's tensors (`--dtype`); arithmetic accumulates in f32
    /// and the host always sees f32. Backends refuse a type their capabilities lack.
    pub dtype: DType,
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("backend {backend} does not support op {op} (node %{node})")]
    Unsupported {
        backend: String,
        op: String,
        node: usize,
    },
    #[error("no value for parameter {0:?}")]
    MissingParam(String),
    #[error("parameter {name:?}: expected shape {expected:?}, found {found:?}")]
    ParamShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("missing input {0:?}")]
    MissingInput(String),
    #[error("input {name:?}: expected shape {expected}, found {found:?}")]
    InputShape {
        name: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// A compiled graph, ready to run.
pub trait Executable: Send {
    /// Replace the value of a parameter (e.g. a new adapter); shapes must match.
    fn set_param(&mut self, name: &str, value: HostTensor) -> Result<()>;

    /// Run the graph on named inputs; returns every graph output by name, in the graph's
    /// output order. The batch size is taken from the inputs.
    fn run(&mut self, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>>;

    /// Seconds the device spent on the last `run`'s computation, without the copies of
    /// inputs and outputs between host and device (measured with device events), where
    /// the backend can tell; `None` otherwise (and for host backends, whose `run` is all
    /// computation).
    fn device_seconds(&self) -> Option<f64> {
        None
    }

    /// The most device memory the backend's allocations in this process held at once
    /// (weights, intermediates, scratch), in bytes, where the backend tracks it; `None`
    /// otherwise. Libraries' own workspaces (cuBLAS) and the context are not included.
    fn device_peak_bytes(&self) -> Option<u64> {
        None
    }
}

/// The source of one generated kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSource {
    /// Unique within a graph, usable as a file stem (`n42_matmul`).
    pub name: String,
    /// The file extension of the language (`wgsl`, `cu`).
    pub extension: String,
    pub source: String,
}

/// A backend: a compiler from graphs to executables, plus a description of itself.
pub trait Backend: Send + Sync {
    /// Short name used on the command line (`cpu`, `wgpu`, `cuda`, a plugin's name).
    fn name(&self) -> &str;
    fn availability(&self) -> Availability;
    fn capabilities(&self) -> Capabilities;
    /// Compile `graph`, reading the values of its parameters from `weights` (which must
    /// hold every param the graph names, with the declared shape).
    fn compile(
        &self,
        graph: &Graph,
        weights: &WeightStore,
        opts: &CompileOptions,
    ) -> Result<Box<dyn Executable>>;

    /// Whether training graphs for this backend recompute the MLP's GELU pre-activation in
    /// the backward instead of storing it (less memory, one more matrix product per
    /// layer: `eptc_autodiff::Options::recompute_gelu`).
    fn recompute_gelu(&self) -> bool {
        false
    }

    /// Every kernel the backend generates for `graph` with the batch bound to `batch` and
    /// tensors stored as `dtype`, in
    /// execution order, each checked by the backend's own validator (naga, NVRTC...). Must
    /// work without the device, so `eptc compile` checks a target's kernels anywhere.
    /// Backends that generate no code return an empty list.
    fn kernels(&self, graph: &Graph, batch: usize, dtype: DType) -> Result<Vec<KernelSource>> {
        let _ = (graph, batch, dtype);
        Ok(vec![])
    }
}

/// A parameter value must have exactly the declared shape (and hold that many values).
/// Shared by backends, so every backend words the error the same.
pub fn check_param(name: &str, expected: &[usize], t: &HostTensor) -> Result<()> {
    if t.shape != expected || t.data().len() != t.numel() {
        return Err(BackendError::ParamShape {
            name: name.into(),
            expected: expected.to_vec(),
            found: t.shape.clone(),
        });
    }
    Ok(())
}

/// Time per op kind, for a backend's `EPTC_<BACKEND>_PROFILE` printout.
#[derive(Debug, Default)]
pub struct Profile {
    rows: Vec<(&'static str, f64, usize)>,
}

impl Profile {
    /// Add `secs` spent in one op (or kernel) of `kind`.
    pub fn record(&mut self, kind: &'static str, secs: f64) {
        match self.rows.iter_mut().find(|p| p.0 == kind) {
            Some(p) => {
                p.1 += secs;
                p.2 += 1;
            }
            None => self.rows.push((kind, secs, 1)),
        }
    }

    /// Print to stderr, the costliest kind first: `<title>: <total> ms in <what>`, then
    /// one line per kind with its time and count of `unit`.
    pub fn print(&mut self, title: &str, what: &str, unit: &str) {
        self.rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = self.rows.iter().map(|p| p.1).sum();
        eprintln!("{title}: {:.1} ms in {what}", total * 1e3);
        for (kind, secs, n) in &self.rows {
            eprintln!("  {kind:<16} {:>9.2} ms {n:>5} {unit}", secs * 1e3);
        }
    }
}

/// Bind the batch size from the inputs and check each input against the graph's
/// declared types; returns the batch size. Shared by backends.
pub fn bind_batch(graph: &Graph, inputs: &[(&str, HostTensor)]) -> Result<usize> {
    let mut batch: Option<usize> = None;
    for id in graph.node_ids() {
        let eptc_ir::Op::Input { name } = &graph.node(id).op else {
            continue;
        };
        let ty = graph.ty(id);
        let t = inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| BackendError::MissingInput(name.clone()))?;
        let bad = || BackendError::InputShape {
            name: name.clone(),
            expected: ty.shape.to_string(),
            found: t.shape.clone(),
        };
        if t.shape.len() != ty.shape.rank() {
            return Err(bad());
        }
        for (d, &n) in ty.shape.dims().iter().zip(&t.shape) {
            match d {
                eptc_ir::Dim::Fixed(k) if *k != n => return Err(bad()),
                eptc_ir::Dim::Batch => match batch {
                    Some(b) if b != n => return Err(bad()),
                    _ => batch = Some(n),
                },
                _ => {}
            }
        }
    }
    let b = batch.unwrap_or(1);
    if b == 0 {
        return Err(BackendError::Other("batch size 0".into()));
    }
    Ok(b)
}
