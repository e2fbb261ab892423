//! The backends this eptc knows, built in or not (yet).

use anyhow::{bail, Result};
use eptc_backend::{Availability, Backend};

/// Backends planned but not built into this eptc, with the reason shown to users.
pub const NOT_BUILT: &[(&str, &str)] = &[(
    "cuda",
    "not built into this eptc yet: the CUDA backend is planned (issue #6)",
)];

/// Every built-in backend.
pub fn all() -> Vec<Box<dyn Backend>> {
    vec![
        Box::new(eptc_cpu::CpuBackend::new()),
        Box::new(eptc_wgpu::WgpuBackend::new()),
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
    if let Some((_, why)) = NOT_BUILT.iter().find(|(n, _)| *n == name) {
        bail!("--target {name}: {why}; run `eptc plugins` to see what is available");
    }
    if name.contains('/') || name.ends_with(".so") {
        bail!("--target {name}: loading backend plugins is not supported yet (issue #7)");
    }
    bail!("--target {name}: unknown backend (built in: cpu, wgpu; see `eptc plugins`)")
}
