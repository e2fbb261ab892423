//! The `wgpu` backend: every op (and the fused ops it declares) becomes one WGSL compute
//! kernel generated from a typed template for the node's concrete shapes
//! ([`codegen`]), parsed and validated with naga ([`validate`]) — also on machines without
//! any adapter, so `eptc compile --target wgpu` checks every kernel there — and run with
//! wgpu ([`exec`]): frozen weights uploaded once, buffers planned and reused, one command
//! encoder and one submission per run, readback of the outputs only.

pub mod codegen;
pub mod exec;
pub mod validate;

pub use exec::WgpuBackend;
