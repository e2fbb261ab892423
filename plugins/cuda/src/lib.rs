//! eptc's CUDA backend: one CUDA C kernel per node from typed templates ([`codegen`]),
//! compiled with NVRTC ([`nvrtc`], PTX cached on disk), run through cudarc's driver API
//! ([`exec`]), matrix products through cuBLAS. Every CUDA library is loaded dynamically:
//! the crate builds and the binary starts on machines without CUDA, and says plainly
//! what is missing.

mod cache;
pub mod codegen;
pub mod emulate;
pub mod exec;
mod gpu;
pub mod nvrtc;

pub use exec::{CudaBackend, CudaExecutable, PlanStats};
