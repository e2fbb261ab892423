//! The backends built into this eptc.

use anyhow::{bail, Result};
use eptc_backend::{Availability, Backend};

/// Every built-in backend.
pub fn all() -> Vec<Box<dyn Backend>> {
    vec![
        Box::new(eptc_cpu::CpuBackend::new()),
        Box::new(eptc_wgpu::WgpuBackend::new()),
        Box::new(eptc_cuda::CudaBackend::new()),
    ]
}

/// The backend called `name`, available here.
pub fn get(name: &str) -> Result<Box<dyn Backend>> {
    let b = find(name)?;
    if let Availability::Unavailable(why) = b.availability() {
        bail!("backend {name} is unavailable here: {why}");
    }
    Ok(b)
}

/// The built-in backend called `name`, whether or not it can run here (its capabilities
/// and kernel generation need no device).
pub fn find(name: &str) -> Result<Box<dyn Backend>> {
    if let Some(b) = all().into_iter().find(|b| b.name() == name) {
        return Ok(b);
    }
    if name.contains('/') || name.ends_with(".so") {
        bail!("--target {name}: loading backend plugins is not supported yet (issue #7)");
    }
    bail!("--target {name}: unknown backend (built in: cpu, wgpu, cuda; see `eptc plugins`)")
}
