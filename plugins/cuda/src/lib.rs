//! eptc's CUDA backend: one CUDA C kernel per node from typed templates ([`codegen`]),
//! compiled with NVRTC ([`nvrtc`], PTX cached on disk), run through cudarc's driver API
//! ([`exec`]), matrix products through cuBLAS. Every CUDA library is loaded dynamically:
//! the crate builds and the binary starts on machines without CUDA, and says plainly
//! what is missing.
//!
//! Without a GPU the generated kernels still run: [`emulate`] compiles the same CUDA C
//! with the host's C++ compiler and runs it on the CPU (one fiber per thread), which is
//! how CI checks every kernel against the reference; [`CudaBackend::emulated`] runs the
//! whole runtime (plan, buffers, views, GEMM mappings) that way too.
//!
//! Switches still being checked on a GPU (off by default): `EPTC_CUDA_FUSE=1`
//! (element-wise chains in one kernel, [`codegen::fuse`]), `EPTC_CUDA_VIEWS=1` (GEMMs read
//! operands in place through strided views), `EPTC_CUDA_PINNED=1` (pinned staging),
//! `EPTC_CUDA_LT=1` (a linear's bias and residual in cuBLASLt's GEMM epilogue),
//! `EPTC_CUDA_ATTENTION=fused` (the fused attention kernels: the forward, on the tensor
//! cores for bf16 / f16 storage, and, set at compile, the flash-style backward) and
//! `EPTC_CUDA_RECOMPUTE=1` (set at compile: the backward recomputes the MLP's
//! pre-activation instead of storing it); see [`exec`] and [`Switches`].

mod cache;
pub mod codegen;
pub mod emulate;
pub mod exec;
mod gpu;
pub mod nvrtc;

pub use exec::{CudaBackend, CudaExecutable, PlanStats, Switches};
