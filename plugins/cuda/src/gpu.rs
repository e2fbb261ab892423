//! The process's CUDA device: found once, without panicking when there is none.
//!
//! cudarc loads `libcuda`, `libnvrtc`, `libcublas` (and, with `EPTC_CUDA_LT=1`,
//! `libcublasLt`) dynamically and panics at the first call into a library it cannot
//! load, so each library is probed first. The device is
//! ordinal 0 (or `EPTC_CUDA_DEVICE`); its primary context, one non-blocking stream and,
//! when `libcublas` loads, one cuBLAS handle on that stream (with its own workspace, so
//! its calls can be captured in a CUDA graph) are shared by every executable.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as br, sys as bs};
use cudarc::driver::{result as dr, CudaContext, CudaStream};

/// cuBLAS's workspace (what it would allocate by default on Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

/// A cuBLAS handle bound to the shared stream.
pub(crate) struct Blas {
    pub handle: bs::cublasHandle_t,
}

// The handle is only used under the `Gpu::blas` mutex.
unsafe impl Send for Blas {}

/// A cuBLASLt handle and its workspace (`EPTC_CUDA_LT=1`: linear layers with their bias
/// and residual in the GEMM's epilogue).
pub(crate) struct Lt {
    pub handle: cudarc::cublaslt::sys::cublasLtHandle_t,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

// The handle is only used under the `Gpu::lt` mutex.
unsafe impl Send for Lt {}

pub(crate) struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// NVRTC's target for this device, e.g. `sm_90`.
    pub arch: String,
    /// For `eptc plugins`: the card, its architecture and memory, the libraries found.
    pub desc: String,
    pub blas: Option<Mutex<Blas>>,
    /// With `EPTC_CUDA_LT=1` where `libcublasLt` loads; else why not (for `eptc plugins`).
    pub lt: Result<Mutex<Lt>, String>,
}

impl Gpu {
    /// Make the context current on the calling thread.
    pub fn bind(&self) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| format!("cuda: binding the context: {e}"))
    }
}

/// The shared device, or why there is none (the same answer for the whole process).
pub(crate) fn gpu() -> Result<Arc<Gpu>, String> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    GPU.get_or_init(|| open().map(Arc::new)).clone()
}

/// Whether the driver library loads, without touching it otherwise.
pub(crate) fn driver_present() -> bool {
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn open() -> Result<Gpu, String> {
    if !driver_present() {
        return Err(
            "no NVIDIA driver found (libcuda.so could not be loaded): this machine has no \
             CUDA GPU, or its driver library is not on the loader's path"
                .into(),
        );
    }
    let count = CudaContext::device_count()
        .map_err(|e| format!("the CUDA driver is installed but does not answer: {e}"))?;
    let ordinal: usize = match std::env::var("EPTC_CUDA_DEVICE") {
        Ok(s) => s
            .parse()
            .map_err(|_| format!("EPTC_CUDA_DEVICE={s:?} is not a device number"))?,
        Err(_) => 0,
    };
    if count <= 0 {
        return Err("the CUDA driver found no GPU".into());
    }
    if ordinal >= count as usize {
        return Err(format!(
            "EPTC_CUDA_DEVICE={ordinal}, but the driver sees {count} GPU(s)"
        ));
    }
    crate::nvrtc::available()?;
    let ctx = CudaContext::new(ordinal).map_err(|e| format!("cuda: creating a context: {e}"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| format!("cuda: reading the compute capability: {e}"))?;
    let name = ctx.name().unwrap_or_else(|_| "CUDA GPU".into());
    let mem = ctx.total_mem().unwrap_or(0);
    let stream = ctx
        .new_stream()
        .map_err(|e| format!("cuda: creating a stream: {e}"))?;
    let arch = format!("sm_{major}{minor}");
    let blas = if unsafe { bs::is_culib_present() } {
        Some(open_blas(&stream)?)
    } else {
        None
    };
    let lt = if std::env::var("EPTC_CUDA_LT").is_ok_and(|v| v == "1") {
        if blas.is_none() {
            Err("EPTC_CUDA_LT=1, but there is no cuBLAS".to_string())
        } else if unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            open_lt()
        } else {
            Err("EPTC_CUDA_LT=1, but libcublasLt could not be loaded".to_string())
        }
    } else {
        Err("off (EPTC_CUDA_LT=1 turns it on)".to_string())
    };
    let desc = format!(
        "{name}, {arch}, {:.0} GiB; {}{}",
        mem as f64 / (1u64 << 30) as f64,
        if blas.is_some() {
            "GEMMs on cuBLAS"
        } else {
            "libcublas not found: GEMMs on eptc's own kernels"
        },
        match &lt {
            Ok(_) => "; linear epilogues on cuBLASLt".to_string(),
            Err(e) if std::env::var_os("EPTC_CUDA_LT").is_some() => format!("; cuBLASLt: {e}"),
            Err(_) => String::new(),
        }
    );
    Ok(Gpu {
        ctx,
        stream,
        arch,
        desc,
        blas: blas.map(Mutex::new),
        lt: lt.map(Mutex::new),
    })
}

fn open_lt() -> Result<Lt, String> {
    let handle = cudarc::cublaslt::result::create_handle()
        .map_err(|e| format!("cuBLASLt: creating a handle: {e}"))?;
    let workspace = unsafe { dr::malloc_sync(BLAS_WORKSPACE) }
        .map_err(|e| format!("cuBLASLt: allocating its workspace: {e}"))?;
    Ok(Lt {
        handle,
        workspace,
        workspace_bytes: BLAS_WORKSPACE,
    })
}

fn open_blas(stream: &CudaStream) -> Result<Blas, String> {
    let handle = br::create_handle().map_err(|e| format!("cuBLAS: creating a handle: {e}"))?;
    unsafe {
        br::set_stream(handle, stream.cu_stream() as bs::cudaStream_t)
            .map_err(|e| format!("cuBLAS: setting the stream: {e}"))?;
        let ws = dr::malloc_sync(BLAS_WORKSPACE)
            .map_err(|e| format!("cuBLAS: allocating its workspace: {e}"))?;
        bs::cublasSetWorkspace_v2(handle, ws as *mut std::ffi::c_void, BLAS_WORKSPACE)
            .result()
            .map_err(|e| format!("cuBLAS: setting its workspace: {e}"))?;
    }
    Ok(Blas { handle })
}
