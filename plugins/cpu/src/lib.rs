//! eptc's CPU reference backend: every op of the IR in f32, the reference every other
//! backend is tested against, and fast enough to serve where there is no GPU.
//!
//! Matrix products go to the `gemm` crate, and so do the fused ops' GEMMs (`linear` with
//! its bias / GELU / residual epilogue; `attention`, with or without the EPT sink, one
//! batch-and-head entry per task without materialising the scores); everything else is
//! a rayon-parallel loop over rows, with the transcendental loops (GELU, softmax,
//! layernorm) compiled per x86 instruction set level. Each executable owns a rayon pool of `CompileOptions::threads`
//! threads (default: all cores) and runs everything inside it; results do not depend on
//! the thread count. Reshapes and contiguous slices are views, parameters are never
//! copied, intermediates die after their last reader and their buffers are recycled by
//! the next run. With `EPTC_CPU_PROFILE` set when a graph is compiled, every run prints
//! the time spent per op kind to stderr.
//!
//! ```
//! use eptc_backend::{Backend, CompileOptions};
//! use eptc_cpu::CpuBackend;
//! use eptc_ir::{Graph, HostTensor, Shape, TensorType, UnaryOp, WeightStore};
//!
//! let mut g = Graph::new("relu");
//! let x = g.input("x", TensorType::f32(Shape::batched(&[3])));
//! let y = g.unary(UnaryOp::Relu, x).unwrap();
//! g.set_output("y", y);
//! let exe = CpuBackend::new().compile(&g, &WeightStore::new(), &CompileOptions::default());
//! let out = exe.unwrap().run(&[("x", HostTensor::new(vec![1, 3], vec![-1.0, 0.5, 2.0]))]);
//! assert_eq!(out.unwrap()[0].1.data(), &[0.0, 0.5, 2.0]);
//! ```

mod attention;
mod elementwise;
mod eval;
mod exec;
mod fastmath;
mod layout;
mod linear;
mod matmul;
mod norm;
mod pool;
mod reduce;
mod shape_ops;
mod value;

use std::sync::Arc;

use eptc_backend::{
    Availability, Backend, BackendError, Capabilities, CompileOptions, Executable, Result,
};
use eptc_ir::{DType, Graph, Op, WeightStore};

pub use exec::CpuExecutable;

/// The CPU backend. Always available.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Threads used when the options do not say: every core the process may use.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The widest vector instruction set this CPU offers (what gemm dispatches to).
fn simd_level() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
        if std::arch::is_x86_feature_detected!("avx") {
            return "avx";
        }
        "sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn availability(&self) -> Availability {
        Availability::Available(format!("{} threads, {}", default_threads(), simd_level()))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ops: Op::all_kinds()
                .into_iter()
                .filter(|k| !Op::fused_kinds().contains(k))
                .map(str::to_owned)
                .collect(),
            // The fused attention backward runs as its decomposition (matrix products).
            fused_ops: Op::fused_kinds()
                .into_iter()
                .filter(|k| !["attention_lse", "attention_grad"].contains(k))
                .map(str::to_owned)
                .collect(),
            dtypes: vec![DType::F32],
        }
    }

    fn compile(
        &self,
        graph: &Graph,
        weights: &WeightStore,
        opts: &CompileOptions,
    ) -> Result<Box<dyn Executable>> {
        let caps = self.capabilities();
        for id in graph.node_ids() {
            let kind = graph.node(id).op.kind();
            if !caps.supports(kind) {
                return Err(BackendError::Unsupported {
                    backend: self.name().into(),
                    op: kind.into(),
                    node: id.index(),
                });
            }
        }
        let threads = opts.threads.unwrap_or_else(default_threads).max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("eptc-cpu-{i}"))
            .build()
            .map_err(|e| BackendError::Other(format!("cannot start {threads} threads: {e}")))?;
        let exe = CpuExecutable::new(graph, weights, Arc::new(pool))?;
        Ok(Box::new(exe))
    }
}
