//! NVRTC: CUDA C to PTX, without a GPU. libnvrtc is loaded at run time (cudarc's dynamic
//! loading): where it is missing, [`available`] says so and nothing panics.
//!
//! Options: `--gpu-architecture=<arch>`, `--std=c++17`, `-default-device`, and no fast
//! math (IEEE division and square root, denormals kept), so results match the CPU
//! reference; NVRTC's default contraction of `a * b + c` into fused multiply-adds stays.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

/// What to tell a user whose machine lacks NVRTC.
const MISSING: &str = "NVRTC (libnvrtc.so.13) not found; install the nvidia-cuda-nvrtc wheel \
     (CUDA 13) and put its nvidia/cu13/lib on LD_LIBRARY_PATH";

/// Whether NVRTC can be loaded; `Err` says plainly what is missing.
pub fn available() -> Result<(), String> {
    // SAFETY: only tries to open the library (libloading); no symbol is called.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(MISSING.to_string());
    }
    // The library opens: ask it its version (a symbol missing would panic in the loader).
    let v = catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r, major, minor)
    });
    match v {
        Ok((cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS, _, _)) => Ok(()),
        Ok((r, _, _)) => Err(format!("NVRTC was found but does not answer: {r:?}")),
        Err(_) => Err(format!("{MISSING} (the library found lacks nvrtcVersion)")),
    }
}

/// NVRTC's version, `(major, minor)`, where it loads.
pub fn version() -> Result<(i32, i32), String> {
    available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers; the library is present (checked above).
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    Ok((major, minor))
}

/// The architectures [`compile`] accepts.
pub const ARCHS: [&str; 10] = [
    "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_100a", "sm_120",
];

/// `arch` as a `'static` string (cudarc's option type), if known.
fn static_arch(arch: &str) -> Option<&'static str> {
    ARCHS.iter().copied().find(|&a| a == arch)
}

/// Compile a translation unit to PTX for `arch` (`"sm_80"`, `"sm_90"`); the error holds
/// NVRTC's log.
pub fn compile(source: &str, arch: &str) -> Result<String, String> {
    available()?;
    let Some(arch) = static_arch(arch) else {
        return Err(format!(
            "unknown GPU architecture {arch:?} (known: {})",
            ARCHS.join(", ")
        ));
    };
    if source.contains('\0') {
        return Err("the source contains a NUL byte".into());
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into(), "-default-device".into()],
        ..Default::default()
    };
    let r = catch_unwind(AssertUnwindSafe(|| compile_ptx_with_opts(source, opts)));
    match r {
        Ok(Ok(ptx)) => Ok(ptx.to_src()),
        Ok(Err(CompileError::CompileError { nvrtc, log, .. })) => Err(format!(
            "NVRTC failed ({nvrtc:?}):\n{}",
            log.to_string_lossy()
        )),
        Ok(Err(e)) => Err(format!("NVRTC failed: {e:?}")),
        Err(_) => Err("NVRTC panicked (see the message above)".into()),
    }
}
