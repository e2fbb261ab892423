//! PTX cached on disk, keyed by the module's source, the target architecture and the
//! NVRTC build, so a second run of the same artifact and batch skips NVRTC. The folder
//! is `EPTC_CUDA_CACHE`, else `$XDG_CACHE_HOME/eptc/cuda`, else `~/.cache/eptc/cuda`;
//! a cache that cannot be read or written is skipped silently (it is only a cache).

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

fn dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EPTC_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("eptc/cuda"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/eptc/cuda"))
}

/// [`crate::nvrtc::compile`], through the cache.
pub fn compile_cached(source: &str, arch: &str) -> Result<String, String> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (source, arch, env!("CARGO_PKG_VERSION")).hash(&mut h);
    let file = dir().map(|d| d.join(format!("{:016x}-{arch}.ptx", h.finish())));
    if let Some(f) = &file {
        if let Ok(ptx) = std::fs::read_to_string(f) {
            return Ok(ptx);
        }
    }
    let ptx = crate::nvrtc::compile(source, arch)?;
    if let Some(f) = &file {
        if let Some(d) = f.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        // Written whole, then renamed: a concurrent reader never sees half a file.
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
    Ok(ptx)
}
