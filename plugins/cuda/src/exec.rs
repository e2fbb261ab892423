//! The CUDA runtime: the `cuda` [`Backend`] and its [`CudaExecutable`].
//!
//! At compile time the parameters are checked against the weight store (the CPU
//! backend's errors) and uploaded once, in the storage type, with the constants. The
//! first run with a batch size `B` plans that batch: every live node's kernels are
//! generated for `B` ([`codegen::node_kernels`]); matrix products and `linear` go to
//! cuBLAS when it is there (a strided-batched GEMM, f32 accumulation, no TF32, then the
//! bias/GELU/residual epilogue as one kernel); identical kernels are compiled once, all
//! of them in one NVRTC module (PTX cached on disk, see [`crate::nvrtc`]); intermediates
//! live at offsets in one arena placed by their lifetimes
//! ([`eptc_backend::plan::plan_arena`]; `EPTC_CUDA_ARENA=0`: size-class pools). The whole step is
//! then captured once in a CUDA graph, and every later run with that batch copies the
//! inputs in, replays the graph, and copies the outputs out: no allocation, no
//! compilation, one launch. `reshape` is a view of its operand's buffer.
//!
//! `EPTC_CUDA_FUSE=1` fuses element-wise chains into one kernel each
//! ([`codegen::fuse`]); it is off by default until a GPU run has checked it (the fused
//! kernels themselves pass the reference on the CPU emulator in CI).
//! `EPTC_CUDA_VIEWS=1` lets the attention and matmul GEMMs read their operands in place
//! through strided views (pointer-array batched GEMMs), so `permute` and `slice` nodes
//! read only by GEMMs (those splitting the fused qkv projection, in the forward and the
//! training graph) copy nothing; off by default until a GPU run has checked it (the
//! mapping is checked on the CPU against the reference); with the fused attention in
//! 16-bit storage, the tensor-core attention kernels (forward, `attention_lse`,
//! `attention_grad`) read q, k, v in place the same way.
//! `EPTC_CUDA_LT=1`: a `linear` whose epilogue is a bias and / or a residual (no GELU)
//! runs as one cuBLASLt matmul with the bias in its epilogue and the residual as C
//! (`LtSpec`); off by default until a GPU run has checked it.
//! `EPTC_CUDA_PINNED=1`: inputs and outputs go through page-locked (pinned) staging
//! allocated with the plan: each input is converted into it and copied asynchronously
//! while the next is converted, and the outputs are copied back together before one
//! wait (off by default until a GPU run has checked it).
//! `EPTC_CUDA_GRAPH=0` launches kernel by kernel instead of replaying a graph;
//! `EPTC_CUDA_PROFILE=1` does too, waits after each launch, prints the device time per
//! op kind (CUDA events around each step) to stderr and names the kernel that failed. The switches are read once into
//! [`Switches`] by [`CudaBackend::new`]; [`CudaBackend::with_switches`] sets them directly.
//!
//! Without a GPU, [`CudaBackend::emulated`] (`EPTC_CUDA_EMULATE=1`) makes the same plan
//! and runs it on the host (`Device::Emulator`): buffers are host memory between guard
//! bytes (their addresses stand for device pointers, so every offset, view and pointer
//! array is the GPU's), kernels run on the CPU emulator ([`crate::emulate`]), and cuBLAS's
//! and cuBLASLt's calls are computed as documented (`host_gemm`, `host_lt`). Not
//! covered there: cuBLAS/cuBLASLt themselves, graph capture, pinned staging.

use std::collections::{HashMap, HashSet};
use std::ffi::{c_void, CString};
use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{result as br, sys as bs};
use cudarc::cublaslt::{result as ltr, sys as lts};
use cudarc::driver::{result as dr, sys as ds};
use eptc_backend::dims;
use eptc_backend::plan::{self, Loc, Role};
use eptc_backend::{
    bind_batch, check_param, Availability, Backend, BackendError, Capabilities, CompileOptions,
    Executable, KernelSource, Profile, Result,
};
use eptc_ir::{Activation, DType, Graph, HostTensor, NodeId, Op, Shape, WeightStore};

use crate::codegen::{self, Kernel};
use crate::gpu::{self, Gpu};

/// Batch sizes whose plans an executable keeps; the least recently used goes beyond.
const MAX_PLANS: usize = 4;

/// The `cuda` backend.
#[derive(Clone, Debug, Default)]
pub struct CudaBackend {
    switches: Switches,
    /// Run on the CPU emulator instead of a GPU ([`CudaBackend::emulated`]).
    emulate: bool,
}

/// The runtime's switches, all off by default (each read from its environment variable by
/// [`Switches::from_env`]): the new paths still to be checked on a GPU, and the ways back
/// to older ones (`no_cublas`, `pools`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Switches {
    /// `EPTC_CUDA_FUSE=1`: element-wise chains fused into one kernel each.
    pub fuse: bool,
    /// `EPTC_CUDA_VIEWS=1`: GEMMs (and the tensor-core attention) read q, k, v and other
    /// permuted or sliced operands in place.
    pub views: bool,
    /// `EPTC_CUDA_ATTENTION=fused`: attention as the generated fused kernels (and, in
    /// graphs compiled with it, the flash-style backward).
    pub fused_attention: bool,
    /// `EPTC_CUDA_LT=1`: a linear's bias and residual in cuBLASLt's epilogue.
    pub lt: bool,
    /// `EPTC_CUDA_PINNED=1`: pinned staging for the host copies.
    pub pinned: bool,
    /// `EPTC_CUDA_CUBLAS=0`: every product as a generated kernel instead of cuBLAS.
    pub no_cublas: bool,
    /// `EPTC_CUDA_ARENA=0`: intermediates in size-class pools (the planner before the
    /// arena; about a third more memory), not at offsets placed by lifetime.
    pub pools: bool,
    /// `EPTC_CUDA_RECOMPUTE=1` at compile: training graphs recompute the MLP's GELU
    /// pre-activation in the backward instead of storing it (ViT-B/16 at batch 64 in
    /// bf16: 665 MiB less, one more GEMM per layer).
    pub recompute: bool,
}

impl Switches {
    /// The switches the environment sets.
    pub fn from_env() -> Switches {
        let is = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x == v);
        Switches {
            fuse: is("EPTC_CUDA_FUSE", "1"),
            views: is("EPTC_CUDA_VIEWS", "1"),
            fused_attention: is("EPTC_CUDA_ATTENTION", "fused"),
            lt: is("EPTC_CUDA_LT", "1"),
            pinned: is("EPTC_CUDA_PINNED", "1"),
            no_cublas: is("EPTC_CUDA_CUBLAS", "0"),
            pools: is("EPTC_CUDA_ARENA", "0"),
            recompute: is("EPTC_CUDA_RECOMPUTE", "1"),
        }
    }

    /// Every switch on.
    pub fn all() -> Switches {
        Switches {
            fuse: true,
            views: true,
            fused_attention: true,
            lt: true,
            pinned: true,
            no_cublas: false,
            pools: false,
            recompute: true,
        }
    }
}

impl CudaBackend {
    /// The backend on the GPU, with the switches of the environment; on the CPU emulator
    /// instead where `EPTC_CUDA_EMULATE=1`.
    pub fn new() -> Self {
        CudaBackend {
            switches: Switches::from_env(),
            emulate: std::env::var("EPTC_CUDA_EMULATE").is_ok_and(|v| v == "1"),
        }
    }

    /// The same runtime without a GPU: its plan (kernels, buffers and their reuse, views,
    /// fused chains, the GEMMs' and cuBLASLt's operand mappings) runs on the host, the
    /// generated kernels on the CPU emulator ([`crate::emulate`]), cuBLAS's and cuBLASLt's
    /// products as their documentation defines them (f64 accumulation, rounded to the
    /// storage type). Every buffer has guard bytes, checked after every step, and starts
    /// as NaN. Slow (a tiny model's run takes seconds); for checking the runtime in CI.
    pub fn emulated() -> Self {
        CudaBackend {
            switches: Switches::from_env(),
            emulate: true,
        }
    }

    /// These switches instead of the environment's.
    pub fn with_switches(mut self, switches: Switches) -> Self {
        self.switches = switches;
        self
    }
}

/// Ops the executor handles itself, without kernels.
const RUNTIME_KINDS: [&str; 4] = ["input", "param", "const", "reshape"];

fn other(msg: impl std::fmt::Display) -> BackendError {
    BackendError::Other(format!("cuda: {msg}"))
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn availability(&self) -> Availability {
        if self.emulate {
            return match crate::emulate::available() {
                Ok(cxx) => Availability::Available(format!(
                    "CPU emulator of the CUDA runtime (EPTC_CUDA_EMULATE=1; kernels built by {cxx})"
                )),
                Err(e) => Availability::Unavailable(format!("EPTC_CUDA_EMULATE=1: {e}")),
            };
        }
        match gpu::gpu() {
            Ok(g) => Availability::Available(g.desc.clone()),
            Err(e) => Availability::Unavailable(e),
        }
    }

    fn capabilities(&self) -> Capabilities {
        let fused = Op::fused_kinds();
        let all = Op::all_kinds();
        let _ = RUNTIME_KINDS;
        Capabilities {
            ops: all
                .iter()
                .filter(|k| !fused.contains(k))
                .map(|k| k.to_string())
                .collect(),
            // The fused attention backward (`attention_lse`, `attention_grad`: SIMT
            // kernels) only with `EPTC_CUDA_ATTENTION=fused`; by default the training
            // graph differentiates attention into matrix products, which run on cuBLAS.
            fused_ops: fused
                .iter()
                .filter(|k| {
                    self.switches.fused_attention
                        || !["attention_lse", "attention_grad"].contains(k)
                })
                .map(|k| k.to_string())
                .collect(),
            dtypes: vec![DType::F32, DType::BF16, DType::F16],
        }
    }

    fn compile(
        &self,
        graph: &Graph,
        weights: &WeightStore,
        opts: &CompileOptions,
    ) -> Result<Box<dyn Executable>> {
        Ok(Box::new(self.compile_cuda(graph, weights, opts)?))
    }

    fn recompute_gelu(&self) -> bool {
        self.switches.recompute
    }

    fn kernels(&self, graph: &Graph, batch: usize, dtype: DType) -> Result<Vec<KernelSource>> {
        check_dtype(dtype)?;
        let order = graph.topo_order().map_err(other)?;
        let mut ks = Vec::new();
        for id in order {
            ks.extend(codegen::node_kernels(graph, id, batch, dtype).map_err(other)?);
        }
        // Checked by NVRTC where it can be loaded (it needs no GPU).
        if crate::nvrtc::available().is_ok() {
            let arch = gpu::gpu().map(|g| g.arch.clone()).unwrap_or("sm_90".into());
            // Identical kernels (the name aside) compile once.
            let mut seen = HashSet::new();
            let refs: Vec<&Kernel> = ks
                .iter()
                .filter(|k| seen.insert(k.masked_source()))
                .collect();
            crate::cache::compile_cached(&codegen::module_source(&refs, dtype), &arch)
                .map_err(|e| other(format!("NVRTC ({arch}): {e}")))?;
        }
        Ok(ks
            .into_iter()
            .map(|k| KernelSource {
                name: k.name,
                extension: "cu".into(),
                source: k.source,
            })
            .collect())
    }
}

fn check_dtype(dtype: DType) -> Result<()> {
    // Every storage type: f16 through PTX's conversions, its GEMMs on cuBLAS's
    // CUDA_R_16F with f32 accumulation.
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
    }
}

impl CudaBackend {
    /// [`Backend::compile`], returning the concrete executable.
    pub fn compile_cuda(
        &self,
        graph: &Graph,
        weights: &WeightStore,
        opts: &CompileOptions,
    ) -> Result<CudaExecutable> {
        check_dtype(opts.dtype)?;
        let dev = if self.emulate {
            crate::emulate::available()
                .map_err(|e| BackendError::Unavailable(format!("the CPU emulator: {e}")))?;
            Device::Emulator
        } else {
            Device::Gpu(gpu::gpu().map_err(BackendError::Unavailable)?)
        };
        CudaExecutable::new(dev, graph, weights, opts.dtype, self.switches)
    }
}

// ---- device memory ---------------------------------------------------------------------

/// Device memory owned by an executable, freed on drop; on the emulator, host memory
/// with guard bytes on both sides (`ptr` is its address).
struct DevMem {
    ptr: ds::CUdeviceptr,
    bytes: usize,
    host: Option<Box<[u128]>>,
}

/// Guard bytes before and after every emulated buffer (all-ones: NaN in every storage
/// type, as the buffers start).
const HOST_GUARD: usize = 64;

impl DevMem {
    /// Whether an emulated buffer's guards are intact (always, on a GPU).
    fn guards_intact(&self) -> bool {
        let Some(h) = &self.host else { return true };
        // SAFETY: u128 has no padding; any byte view of it is valid.
        let raw = unsafe { std::slice::from_raw_parts(h.as_ptr() as *const u8, h.len() * 16) };
        let end = HOST_GUARD + self.bytes;
        raw[..HOST_GUARD].iter().all(|&b| b == 0xff)
            && raw[end..end + HOST_GUARD].iter().all(|&b| b == 0xff)
    }
}

/// Where an executable runs.
#[derive(Clone)]
enum Device {
    Gpu(Arc<Gpu>),
    /// The host, kernels on the CPU emulator ([`CudaBackend::emulated`]).
    Emulator,
}

impl Device {
    fn gpu(&self) -> std::result::Result<&Gpu, String> {
        match self {
            Device::Gpu(g) => Ok(g),
            Device::Emulator => Err("internal: a GPU call on the emulator".into()),
        }
    }

    fn alloc(&self, bytes: usize, what: &str) -> Result<DevMem> {
        match self {
            Device::Gpu(_) => alloc(bytes, what),
            Device::Emulator => {
                let words = (HOST_GUARD + bytes.max(4) + HOST_GUARD).div_ceil(16);
                let mut host = vec![u128::MAX; words].into_boxed_slice();
                // 16-byte aligned past the guard, as cudaMalloc's 256 are for float4.
                let ptr = unsafe { (host.as_mut_ptr() as *mut u8).add(HOST_GUARD) } as u64;
                count_alloc(bytes.max(4));
                Ok(DevMem {
                    ptr,
                    bytes,
                    host: Some(host),
                })
            }
        }
    }

    /// Copy `bytes` to device memory at `ptr` (synchronously).
    ///
    /// # Safety
    /// `ptr` addresses at least `bytes.len()` bytes of this device's memory.
    unsafe fn htod(&self, ptr: u64, bytes: &[u8]) -> std::result::Result<(), String> {
        match self {
            Device::Gpu(_) => dr::memcpy_htod_sync(ptr, bytes).map_err(|e| e.to_string()),
            Device::Emulator => {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr as usize as *mut u8, bytes.len());
                Ok(())
            }
        }
    }

    /// Copy device memory at `ptr` into `out` (synchronously).
    ///
    /// # Safety
    /// `ptr` addresses at least `out.len()` bytes of this device's memory.
    unsafe fn dtoh(&self, out: &mut [u8], ptr: u64) -> std::result::Result<(), String> {
        match self {
            Device::Gpu(_) => dr::memcpy_dtoh_sync(out, ptr).map_err(|e| e.to_string()),
            Device::Emulator => {
                std::ptr::copy_nonoverlapping(
                    ptr as usize as *const u8,
                    out.as_mut_ptr(),
                    out.len(),
                );
                Ok(())
            }
        }
    }
}

/// Device bytes held by this process's `DevMem`s, now and at most (for
/// [`Executable::device_peak_bytes`]).
static DEVICE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DEVICE_PEAK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_alloc(bytes: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    let now = DEVICE_BYTES.fetch_add(bytes as u64, Relaxed) + bytes as u64;
    DEVICE_PEAK.fetch_max(now, Relaxed);
}

fn count_free(bytes: usize) {
    DEVICE_BYTES.fetch_sub(bytes as u64, std::sync::atomic::Ordering::Relaxed);
}

fn alloc(bytes: usize, what: &str) -> Result<DevMem> {
    let ptr = unsafe { dr::malloc_sync(bytes.max(4)) }.map_err(|e| {
        other(format!(
            "allocating {:.1} MiB for {what}: {e} (the model does not fit in the GPU's \
             memory at this batch size?)",
            bytes as f64 / (1u64 << 20) as f64
        ))
    })?;
    count_alloc(bytes.max(4));
    Ok(DevMem {
        ptr,
        bytes,
        host: None,
    })
}

fn event() -> Result<ds::CUevent> {
    dr::event::create(ds::CUevent_flags::CU_EVENT_DEFAULT)
        .map_err(|e| other(format!("creating an event: {e}")))
}

/// Host values in the storage type, as bytes.
fn to_storage(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// [`to_storage`] for a run's inputs: into `out` (exactly the storage's size), split
/// over the machine's cores for large inputs (a batch of 256 images at 224 px is 38.5 M
/// values: tens of milliseconds on one core, most of the wall time beyond the device's).
fn to_storage_par(values: &[f32], dtype: DType, out: &mut [u8]) {
    const MIN_PER_THREAD: usize = 1 << 20;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(values.len() / MIN_PER_THREAD)
        .max(1);
    if threads == 1 {
        return to_storage_into(values, dtype, out);
    }
    let per = values.len().div_ceil(threads);
    let eb = dtype.size_bytes();
    std::thread::scope(|s| {
        for (v, o) in values.chunks(per).zip(out.chunks_mut(per * eb)) {
            s.spawn(move || to_storage_into(v, dtype, o));
        }
    });
}

/// [`to_storage`] into `out` (exactly the storage's size).
fn to_storage_into(values: &[f32], dtype: DType, out: &mut [u8]) {
    match dtype {
        DType::BF16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::F16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

fn from_storage(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

// ---- the executable -------------------------------------------------------------------

enum Kind {
    Input(String),
    Param(String),
    Const(Option<DevMem>),
    View(usize),
    Compute(Vec<usize>),
}

struct Slot {
    id: NodeId,
    op: &'static str,
    shape: Shape,
    kind: Kind,
}

/// A strided-batched GEMM in cuBLAS's column-major terms, repeated at `offsets`
/// (element offsets of A, B, C).
#[derive(Clone, Debug)]
struct Gemm {
    transa: bool,
    transb: bool,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
    stride_a: i64,
    stride_b: i64,
    stride_c: i64,
    batch: i32,
    offsets: Vec<(usize, usize, usize)>,
    /// C = alpha · op(A) op(B).
    alpha: f32,
    /// Device pointers of A, B (cuBLAS's operands) and C.
    a: u64,
    b: u64,
    c: u64,
    /// Run every entry of `offsets` (each a batch of 1) as one pointer-array batched GEMM
    /// (`cublasGemmBatchedEx`) instead of a loop of calls: for operands read through
    /// strided views whose leading strides merge into no single batch stride.
    pointer_arrays: bool,
    /// With `pointer_arrays`: the device arrays of A, B and C pointers (built once the
    /// plan's buffers are known).
    ptrs: Option<(u64, u64, u64)>,
}

enum Action {
    Launch {
        /// Index into the plan's functions.
        func: usize,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        args: Vec<u64>,
    },
    Gemm(Gemm),
    /// A `linear` with its bias and residual on cuBLASLt (`EPTC_CUDA_LT=1`).
    Lt(Box<LtGemm>),
    /// The same on the emulator: the spec and the pointers.
    HostLt(Box<HostLt>),
}

struct Step {
    kind: &'static str,
    name: String,
    action: Action,
    /// On the emulator: the output's address and bytes in the arena, with
    /// [`ARENA_PAD`] guard bytes on either side.
    guard: Option<(u64, usize)>,
}

/// [`plan::plan`]'s pooled buffers laid out one after another in one arena (256-byte
/// aligned): the planner before the arena, for `EPTC_CUDA_ARENA=0`.
fn pooled_arena(bp: plan::BufferPlan) -> plan::ArenaPlan {
    let mut offsets = Vec::with_capacity(bp.slots.len());
    let mut at = 0u64;
    for &b in &bp.slots {
        offsets.push(at);
        at += b.next_multiple_of(256);
    }
    plan::ArenaPlan {
        loc: bp.loc,
        offsets,
        bytes: bp.slots,
        arena: at,
    }
}

/// Guard bytes around every intermediate in the emulator's arena (256: the values stay
/// 256-byte aligned, as on a device).
const ARENA_PAD: u64 = 256;

struct BatchPlan {
    batch: usize,
    inputs: Vec<(String, Option<DevMem>)>,
    /// Pooled intermediates (kept alive for the plan's life).
    _slots: Vec<DevMem>,
    steps: Vec<Step>,
    outputs: Vec<(String, Vec<usize>, Option<u64>)>,
    module: Option<ds::CUmodule>,
    functions: Vec<ds::CUfunction>,
    graph: Option<(ds::CUgraph, ds::CUgraphExec)>,
    stats: PlanStats,
    /// Pinned staging for the inputs (in `inputs` order) then the outputs, each at its
    /// offset; `None` where page-locked memory was refused.
    staging: Option<(Pinned, Vec<usize>)>,
    /// On the emulator: the kernels built for the host, and each function's kernel name.
    emulated: Option<(crate::emulate::Module, Vec<String>)>,
}

/// What a batch plan holds (for tests and diagnostics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub kernels: usize,
    pub unique_kernels: usize,
    pub gemms: usize,
    pub intermediate_bytes: u64,
    /// Every device byte the plan holds: the intermediates, the inputs, the attention
    /// GEMMs' scores and probabilities, the GEMM pointer arrays (the parameters and
    /// constants are the executable's: [`CudaExecutable::param_bytes`]).
    pub device_bytes: u64,
    pub captured: bool,
    /// Kernels that each compute a fused element-wise chain (`EPTC_CUDA_FUSE=1`).
    pub fused: usize,
}

/// A graph compiled for CUDA.
pub struct CudaExecutable {
    dev: Device,
    switches: Switches,
    graph: Graph,
    dtype: DType,
    slots: Vec<Slot>,
    outputs: Vec<(String, usize)>,
    params: HashMap<String, (Vec<usize>, Option<DevMem>)>,
    plans: Vec<BatchPlan>,
    /// The element-wise chains computed by one kernel each (empty unless
    /// `EPTC_CUDA_FUSE=1`).
    fusion: Vec<codegen::fuse::Group>,
    /// The slot of each live node.
    slot_of: HashMap<NodeId, usize>,
    /// The slots kept in f32 whatever the storage type ([`f32_slots`]).
    f32: Vec<bool>,
    profile: bool,
    use_graph: bool,
    /// `EPTC_CUDA_TF32=1`: f32 GEMMs on the tensor cores' TF32 mode (about 3e-4 relative
    /// error instead of f32's 1e-6); off unless asked.
    tf32: bool,
    /// Events around the computation of a run (start, end; none on the emulator), and
    /// its last duration.
    events: Option<(ds::CUevent, ds::CUevent)>,
    last_device: Option<f64>,
}

// Raw driver handles are plain pointers; the executable is used by one thread at a time
// and binds the context on every call.
unsafe impl Send for CudaExecutable {}

impl Drop for CudaExecutable {
    fn drop(&mut self) {
        let Device::Gpu(gpu) = &self.dev else {
            return;
        };
        if gpu.bind().is_err() {
            return;
        }
        let _ = gpu.stream.synchronize();
        for p in self.plans.drain(..) {
            drop_plan(p);
        }
        if let Some((a, b)) = self.events {
            unsafe {
                let _ = dr::event::destroy(a);
                let _ = dr::event::destroy(b);
            }
        }
        // DevMem values are freed by their own Drop below.
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if self.host.is_none() {
            unsafe {
                let _ = dr::free_sync(self.ptr);
            }
        }
        count_free(self.bytes.max(4));
    }
}

/// Page-locked host memory (`cuMemHostAlloc`) for a plan's input and output copies: they
/// run at the bus's full rate and asynchronously on the stream, so the host converts the
/// next input while the previous one is on its way, and the outputs come back in one go.
struct Pinned {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the memory is owned by this value; the plan that holds it writes and reads it
// only from the thread running the step, after the stream has finished with it.
unsafe impl Send for Pinned {}
unsafe impl Sync for Pinned {}

impl Pinned {
    fn new(bytes: usize) -> Option<Pinned> {
        if bytes == 0 {
            return None;
        }
        // Without it (a driver refusing page-locked memory), plain copies are used.
        let ptr = unsafe { dr::malloc_host(bytes, 0) }.ok()?;
        Some(Pinned {
            ptr: ptr as *mut u8,
            bytes,
        })
    }

    /// The bytes `off..off + len`.
    ///
    /// # Safety
    /// No copy on the stream may be reading or writing them, and no other slice of the
    /// same bytes may be alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn region(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.bytes);
        std::slice::from_raw_parts_mut(self.ptr.add(off), len)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        unsafe {
            let _ = dr::free_host(self.ptr as *mut c_void);
        }
    }
}

/// The GEMMs (or, for the fused attention, the kernel) of a node that reads its operands
/// through strided views.
enum ViewGemms {
    Attention(Box<AttentionGemms>),
    MatMul(Gemm),
    /// A tensor-core attention kernel (`attention`, `attention_lse` or `attention_grad`)
    /// reading q, k (and v) in place.
    Fused(Box<Kernel>),
}

/// The attentions and matmuls that read their operands through strided views (by slot,
/// with their GEMMs), and the `permute` and `slice` slots they make views (no kernel, no
/// buffer): a node qualifies when [`attention_view_gemms`] or [`matmul_view_gemm`] maps
/// it and every node on its operands' view chains is used only by such chains or by
/// qualifying nodes (an attention as q, k or v) and is no graph output.
fn attention_views(
    g: &Graph,
    slots: &[Slot],
    batch: usize,
    fused: Option<DType>,
) -> (HashMap<usize, ViewGemms>, HashSet<usize>) {
    let slot_of: HashMap<NodeId, usize> =
        slots.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|o| o.1).collect();
    // The tensor-core attention writes its output in the layout of the permute that is
    // its only reader, which then copies nothing.
    let out_perm: HashMap<NodeId, (NodeId, codegen::OperandView)> = match fused {
        Some(_) => slots
            .iter()
            .filter(|s| matches!(g.node(s.id).op, Op::Attention { .. }))
            .filter_map(|s| output_permute(g, s.id, batch, &slot_of, &outputs).map(|p| (s.id, p)))
            .collect(),
        None => HashMap::new(),
    };
    // Nodes that must stay copies (a permute or slice some other op reads), grown until
    // every remaining chain is read only by GEMMs.
    let mut stop: HashSet<NodeId> = HashSet::new();
    let mut cands: HashMap<NodeId, (ViewGemms, Vec<NodeId>)>;
    loop {
        cands = slots
            .iter()
            .filter_map(|s| match g.node(s.id).op {
                Op::Attention { .. } => match fused {
                    Some(dt) => {
                        let out = out_perm.get(&s.id).map(|p| &p.1);
                        attention_view_fused(g, s.id, batch, &stop, dt, out)
                            .map(|(k, t)| (s.id, (ViewGemms::Fused(Box::new(k)), t)))
                    }
                    None => attention_view_gemms(g, s.id, batch, &stop)
                        .map(|(at, t)| (s.id, (ViewGemms::Attention(Box::new(at)), t))),
                },
                // The flash-style backward's kernels (fused training graphs).
                Op::AttentionLse { .. } | Op::AttentionGrad { .. } => fused.and_then(|dt| {
                    attention_view_fused(g, s.id, batch, &stop, dt, None)
                        .map(|(k, t)| (s.id, (ViewGemms::Fused(Box::new(k)), t)))
                }),
                Op::MatMul { .. } => matmul_view_gemm(g, s.id, batch, &stop)
                    .map(|(mm, t)| (s.id, (ViewGemms::MatMul(mm), t))),
                _ => None,
            })
            .collect();
        let chain: HashSet<NodeId> = cands.values().flat_map(|c| c.1.iter().copied()).collect();
        let fine = |c: NodeId| {
            !outputs.contains(&c)
                && g.users(c)
                    .into_iter()
                    .filter(|u| slot_of.contains_key(u))
                    .all(|u| {
                        chain.contains(&u)
                            || cands.get(&u).is_some_and(|(v, _)| {
                                // Attention reads q, k, v (not z) in place, lse q and k,
                                // a matmul both operands.
                                let max = match v {
                                    ViewGemms::Attention(_) => 3,
                                    ViewGemms::Fused(_) => view_count(g, u),
                                    ViewGemms::MatMul(_) => 2,
                                };
                                g.operands(u)
                                    .iter()
                                    .enumerate()
                                    .all(|(pos, &o)| o != c || pos < max)
                            })
                    })
        };
        // A chain node read elsewhere is materialised where its copy is made: itself if
        // it is a permute or slice, else (a reshape) the nearest one below it.
        let mut grew = false;
        for &c in &chain {
            if fine(c) {
                continue;
            }
            let mut m = c;
            while matches!(g.node(m).op, Op::Reshape { .. }) {
                m = g.operands(m)[0];
            }
            if matches!(g.node(m).op, Op::Permute { .. } | Op::Slice { .. }) {
                grew |= stop.insert(m);
            }
        }
        if !grew {
            break;
        }
    }
    // What is left unfine is a reshape of a computed buffer: already a view, no copy.
    // The permutes the attention kernels write for are views of their outputs.
    let virtual_slots = cands
        .values()
        .flat_map(|c| c.1.iter().copied())
        .filter(|&n| matches!(g.node(n).op, Op::Permute { .. } | Op::Slice { .. }))
        .chain(cands.keys().filter_map(|a| out_perm.get(a).map(|p| p.0)))
        .map(|n| slot_of[&n])
        .collect();
    let gemms = cands
        .into_iter()
        .map(|(a, (at, _))| (slot_of[&a], at))
        .collect();
    (gemms, virtual_slots)
}

/// The buffer roles of a plan's slots and which slots fused chains replace.
struct Layout {
    /// Per slot: its role for the buffer planner and its bytes (0: no buffer).
    roles: Vec<(Role, u64)>,
    /// Slots computed inside a fused chain's kernel: no buffer, no kernel.
    interior: HashSet<usize>,
    /// The slots whose kernel is a fused chain's, with the chain's index in `fusion`.
    fused_root: HashMap<usize, usize>,
}

/// The slots kept in f32 whatever the storage type: with 16-bit storage, the row
/// statistics (`attention_lse`'s output, the flash backward's `delta = rowsum(dO * O)` and
/// every other reduction) that only generated kernels read, and through `ld` (element-wise
/// ops, reductions, broadcasts, `attention_grad`'s `lse` and `delta`; views of them
/// likewise), and that are not graph outputs. FlashAttention keeps `lse` and `delta` in
/// f32 for the same reason: `exp(s - lse)` with `lse` rounded to bf16 (about 8 bits) is
/// off by up to `|lse| / 512` relative, and `dP - delta` cancels. They are a few values
/// per row, so the memory is negligible. A value a GEMM, cuBLASLt or a tensor-core
/// operand reads stays in the storage type. All `false` for f32 storage.
fn f32_slots(graph: &Graph, slots: &[Slot], outputs: &[usize], dtype: DType) -> Vec<bool> {
    let mut f32 = vec![false; slots.len()];
    if dtype == DType::F32 {
        return f32;
    }
    // Who reads each slot, and as which operand.
    let mut readers: Vec<Vec<(usize, usize)>> = vec![Vec::new(); slots.len()];
    for (i, s) in slots.iter().enumerate() {
        match &s.kind {
            Kind::View(o) => readers[*o].push((i, 0)),
            Kind::Compute(ops) => {
                for (p, &o) in ops.iter().enumerate() {
                    readers[o].push((i, p));
                }
            }
            _ => {}
        }
    }
    let outs: HashSet<usize> = outputs.iter().copied().collect();
    // Every reader of `i` (and of its views) reads through `ld` in a generated kernel.
    fn read_by_kernels(
        i: usize,
        graph: &Graph,
        slots: &[Slot],
        readers: &[Vec<(usize, usize)>],
        outs: &HashSet<usize>,
    ) -> bool {
        !outs.contains(&i)
            && readers[i].iter().all(|&(r, p)| match &slots[r].kind {
                Kind::View(_) => read_by_kernels(r, graph, slots, readers, outs),
                _ => match graph.node(slots[r].id).op {
                    Op::Binary(_) | Op::Unary(_) | Op::Reduce { .. } | Op::Broadcast { .. } => true,
                    Op::AttentionGrad { .. } => p == 3 || p == 4,
                    _ => false,
                },
            })
    }
    for (i, s) in slots.iter().enumerate() {
        f32[i] = match &s.kind {
            Kind::View(o) => f32[*o],
            Kind::Compute(_) => {
                matches!(
                    graph.node(s.id).op,
                    Op::AttentionLse { .. } | Op::Reduce { .. }
                ) && read_by_kernels(i, graph, slots, &readers, &outs)
            }
            _ => false,
        };
    }
    f32
}

/// The roles at `batch` with `eb` bytes per element. A fused chain's root reads the
/// chain's leaves (so the planner keeps them alive until the root runs); the chain's
/// other nodes get no buffer.
fn layout(
    slots: &[Slot],
    fusion: &[codegen::fuse::Group],
    virtual_slots: &HashSet<usize>,
    batch: usize,
    eb: u64,
    f32: &[bool],
) -> Layout {
    let slot_of: HashMap<NodeId, usize> =
        slots.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let mut interior = HashSet::new();
    let mut fused_root = HashMap::new();
    for (k, gr) in fusion.iter().enumerate() {
        for n in &gr.nodes[..gr.nodes.len() - 1] {
            interior.insert(slot_of[n]);
        }
        fused_root.insert(slot_of[&gr.root()], k);
    }
    let roles = slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let role = match &s.kind {
                Kind::View(o) => Role::View(*o),
                // A permute or slice read in place by its users: a view of its operand.
                Kind::Compute(ops) if virtual_slots.contains(&i) => Role::View(ops[0]),
                Kind::Compute(_) if fused_root.contains_key(&i) => Role::Compute(
                    fusion[fused_root[&i]]
                        .leaves
                        .iter()
                        .map(|l| slot_of[l])
                        .collect(),
                ),
                Kind::Compute(ops) => Role::Compute(ops.clone()),
                _ => Role::Leaf,
            };
            let bytes = if interior.contains(&i) {
                0
            } else {
                let b = if f32.get(i) == Some(&true) { 4 } else { eb };
                s.shape.resolve(batch).iter().product::<usize>() as u64 * b
            };
            (role, bytes)
        })
        .collect();
    Layout {
        roles,
        interior,
        fused_root,
    }
}

fn drop_plan(p: BatchPlan) {
    unsafe {
        if let Some((g, e)) = p.graph {
            let _ = dr::graph::exec_destroy(e);
            let _ = dr::graph::destroy(g);
        }
        if let Some(m) = p.module {
            let _ = dr::module::unload(m);
        }
    }
}

impl CudaExecutable {
    fn new(
        dev: Device,
        graph: &Graph,
        weights: &WeightStore,
        dtype: DType,
        switches: Switches,
    ) -> Result<Self> {
        let events = match &dev {
            Device::Gpu(gpu) => {
                gpu.bind().map_err(other)?;
                Some((event()?, event()?))
            }
            Device::Emulator => None,
        };
        let order = graph.topo_order().map_err(other)?;
        let mut live: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = graph.outputs().iter().map(|o| o.1).collect();
        while let Some(n) = stack.pop() {
            if !graph.contains(n) {
                return Err(other(format!("output node %{} missing", n.index())));
            }
            if live.insert(n) {
                stack.extend(graph.operands(n));
            }
        }
        let mut exe = CudaExecutable {
            dev,
            switches,
            graph: graph.clone(),
            dtype,
            slots: Vec::new(),
            outputs: Vec::new(),
            params: HashMap::new(),
            plans: Vec::new(),
            fusion: Vec::new(),
            slot_of: HashMap::new(),
            f32: Vec::new(),
            profile: std::env::var("EPTC_CUDA_PROFILE").is_ok_and(|v| v != "0"),
            use_graph: std::env::var("EPTC_CUDA_GRAPH").map_or(true, |v| v != "0"),
            tf32: std::env::var("EPTC_CUDA_TF32").is_ok_and(|v| v == "1"),
            events,
            last_device: None,
        };
        let mut pos: HashMap<NodeId, usize> = HashMap::new();
        for &id in &order {
            let node = graph.node(id);
            let (op, n) = (node.op.kind(), id.index());
            if node.ty.dtype != DType::F32 {
                return Err(BackendError::Unsupported {
                    backend: "cuda".into(),
                    op: format!("{op} in {}", node.ty.dtype),
                    node: n,
                });
            }
            let fixed = || {
                node.ty.shape.as_fixed().ok_or_else(|| {
                    other(format!(
                        "node %{n} ({op}): a leaf's shape cannot depend on B"
                    ))
                })
            };
            if let Op::Param { name, .. } = &node.op {
                let t = weights
                    .get(name)
                    .ok_or_else(|| BackendError::MissingParam(name.clone()))?;
                check_param(name, &fixed()?, t)?;
                let have = exe.params.get(name).is_some_and(|p| p.1.is_some());
                let mem = if live.contains(&id) && !have {
                    exe.upload(&format!("param {name}"), t.data())?
                } else {
                    None
                };
                let p = exe
                    .params
                    .entry(name.clone())
                    .or_insert((t.shape.clone(), None));
                if mem.is_some() {
                    p.1 = mem;
                }
            }
            if !live.contains(&id) {
                continue;
            }
            let operands: Vec<usize> = graph
                .operands(id)
                .iter()
                .map(|o| {
                    pos.get(o).copied().ok_or_else(|| {
                        other(format!(
                            "node %{n} ({op}): operand is not computed before its user"
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            let kind = match &node.op {
                Op::Input { name } => Kind::Input(name.clone()),
                Op::Param { name, .. } => Kind::Param(name.clone()),
                Op::Const { values } => {
                    if values.len() != fixed()?.iter().product::<usize>() {
                        return Err(other(format!(
                            "node %{n} (const): value count does not match shape"
                        )));
                    }
                    Kind::Const(exe.upload(&format!("const %{n}"), values)?)
                }
                Op::Reshape { .. } => {
                    if operands.len() != 1 {
                        return Err(other(format!("node %{n} (reshape): operand count")));
                    }
                    Kind::View(operands[0])
                }
                _ => Kind::Compute(operands),
            };
            pos.insert(id, exe.slots.len());
            exe.slots.push(Slot {
                id,
                op,
                shape: node.ty.shape.clone(),
                kind,
            });
        }
        exe.outputs = graph
            .outputs()
            .iter()
            .map(|(name, id)| (name.clone(), pos[id]))
            .collect();
        exe.slot_of = pos;
        let outs: Vec<usize> = exe.outputs.iter().map(|o| o.1).collect();
        exe.f32 = f32_slots(graph, &exe.slots, &outs, dtype);
        if exe.switches.fuse {
            exe.fusion = codegen::fuse::elementwise_groups(graph, &order, &live);
        }
        Ok(exe)
    }

    /// Upload f32 values in the storage type; `None` for zero elements.
    fn upload(&self, what: &str, values: &[f32]) -> Result<Option<DevMem>> {
        if values.is_empty() {
            return Ok(None);
        }
        let bytes = to_storage(values, self.dtype);
        let mem = self.dev.alloc(bytes.len(), what)?;
        unsafe { self.dev.htod(mem.ptr, &bytes) }
            .map_err(|e| other(format!("uploading {what}: {e}")))?;
        Ok(Some(mem))
    }

    /// Device bytes of the parameters and constants (uploaded once, shared by every
    /// batch size's plan).
    pub fn param_bytes(&self) -> u64 {
        let params = self.params.values().filter_map(|p| p.1.as_ref());
        let consts = self.slots.iter().filter_map(|s| match &s.kind {
            Kind::Const(m) => m.as_ref(),
            _ => None,
        });
        params.chain(consts).map(|m| m.bytes as u64).sum()
    }

    /// Plan `batch` (kernels compiled, buffers allocated, the step captured) without
    /// running it, as the first run of that batch size would; its stats.
    pub fn prepare(&mut self, batch: usize) -> Result<PlanStats> {
        if let Device::Gpu(gpu) = &self.dev {
            gpu.bind().map_err(other)?;
        }
        if let Some(s) = self.plan_stats(batch) {
            return Ok(s);
        }
        if self.plans.len() >= MAX_PLANS {
            let old = self.plans.remove(0);
            if let Device::Gpu(gpu) = &self.dev {
                gpu.stream.synchronize().map_err(other)?;
            }
            drop_plan(old);
        }
        let p = self.make_plan(batch)?;
        let s = p.stats;
        self.plans.push(p);
        Ok(s)
    }

    /// On the emulator, the CUDA C of `batch`'s plan (its kernels as the runtime built
    /// them, in one module with the prelude) as a GPU would compile it; `None` elsewhere
    /// or where that batch is not planned.
    pub fn emulated_source(&self, batch: usize) -> Option<&str> {
        let p = self.plans.iter().find(|p| p.batch == batch)?;
        p.emulated.as_ref().map(|(m, _)| m.cuda_source())
    }

    /// The plan of a batch size already run, if still kept.
    pub fn plan_stats(&self, batch: usize) -> Option<PlanStats> {
        self.plans
            .iter()
            .find(|p| p.batch == batch)
            .map(|p| p.stats)
    }

    fn elem_bytes(&self) -> usize {
        self.dtype.size_bytes()
    }

    /// Build the plan for `batch`: kernels, GEMMs, buffers, the module, the graph.
    fn make_plan(&mut self, batch: usize) -> Result<BatchPlan> {
        let eb = self.elem_bytes() as u64;
        let numel = |s: &Slot| -> usize { s.shape.resolve(batch).iter().product() };
        // `EPTC_CUDA_VIEWS=1`: q, k, v read in place by the attention GEMMs.
        let sw = self.switches;
        // On the emulator, cuBLAS's products are computed on the host.
        let blas = !sw.no_cublas
            && match &self.dev {
                Device::Gpu(g) => g.blas.is_some(),
                Device::Emulator => true,
            };
        let attention_gemm = !sw.fused_attention;
        // With the fused attention, q, k, v are read in place by the tensor-core kernel
        // (16-bit storage; the f32 kernel reads contiguous operands only).
        let fused_views = (!attention_gemm && matches!(self.dtype, DType::BF16 | DType::F16))
            .then_some(self.dtype);
        let (mut view_att, virtual_slots) =
            if blas && (attention_gemm || fused_views.is_some()) && sw.views {
                attention_views(&self.graph, &self.slots, batch, fused_views)
            } else {
                (HashMap::new(), HashSet::new())
            };
        let Layout {
            roles,
            interior,
            fused_root,
        } = layout(
            &self.slots,
            &self.fusion,
            &virtual_slots,
            batch,
            eb,
            &self.f32,
        );
        // A kernel reading or writing a slot kept in f32 declares that parameter
        // `float*` (`params`: its operands' slots, then its output's).
        let widen = |mut k: Kernel, params: &[usize]| -> Result<Kernel> {
            let flags: Vec<bool> = params.iter().map(|&p| self.f32[p]).collect();
            k.widen(&flags)
                .map_err(|e| other(format!("internal: {e}")))?;
            Ok(k)
        };
        let leaves_of = |gr: &codegen::fuse::Group| -> Vec<usize> {
            gr.leaves.iter().map(|l| self.slot_of[l]).collect()
        };
        let fused_root: HashMap<usize, &codegen::fuse::Group> = fused_root
            .into_iter()
            .map(|(i, g)| (i, &self.fusion[g]))
            .collect();
        let outs: Vec<usize> = self.outputs.iter().map(|o| o.1).collect();
        // Every intermediate at an offset in one arena, placed by lifetime (a freed range
        // serves a value of any size). On the emulator each value has guard bytes around
        // it, checked around every step that writes it.
        // `EPTC_CUDA_ARENA=0`: the size-class pools instead (wgpu's planner; each pool's
        // buffer at its own offset, no guards), as before the arena.
        let pad = match (&self.dev, sw.pools) {
            (Device::Emulator, false) => ARENA_PAD,
            _ => 0,
        };
        let ap = if sw.pools {
            pooled_arena(plan::plan(&roles, &outs, u64::MAX))
        } else {
            plan::plan_arena(&roles, &outs, 256, pad)
        };
        let mut slot_mem = Vec::new();
        if ap.arena > 0 {
            slot_mem.push(
                self.dev
                    .alloc(ap.arena as usize, "the intermediates' arena")?,
            );
        }
        let arena = slot_mem.first().map_or(0, |m| m.ptr);
        let mut inputs: Vec<(String, Option<DevMem>)> = Vec::new();
        let mut input_ptr: HashMap<usize, u64> = HashMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Kind::Input(name) = &s.kind {
                let bytes = numel(s) * eb as usize;
                let mem = if bytes > 0 {
                    Some(self.dev.alloc(bytes, &format!("input {name}"))?)
                } else {
                    None
                };
                if let Some(m) = &mem {
                    input_ptr.insert(i, m.ptr);
                }
                inputs.push((name.clone(), mem));
            }
        }
        // The device pointer of each slot's value (0: empty).
        let ptr_of = |i: usize| -> u64 {
            match ap.loc[i] {
                Loc::Empty => 0,
                Loc::Slot(k) => arena + ap.offsets[k],
                Loc::Leaf(l) => match &self.slots[l].kind {
                    Kind::Input(_) => input_ptr.get(&l).copied().unwrap_or(0),
                    Kind::Param(name) => self
                        .params
                        .get(name)
                        .and_then(|p| p.1.as_ref())
                        .map_or(0, |m| m.ptr),
                    Kind::Const(m) => m.as_ref().map_or(0, |m| m.ptr),
                    _ => 0,
                },
            }
        };
        // Steps.
        let mut kernels: Vec<Kernel> = Vec::new();
        let mut pending: Vec<(usize, &'static str, String, PendingAction)> = Vec::new();
        let mut gemms = 0;
        let mut fused = 0;
        // `attention` as two cuBLAS GEMMs around a softmax kernel (the default), or the
        // generated fused kernel (`EPTC_CUDA_ATTENTION=fused`, or without cuBLAS).
        let mut scratch_elems = 0usize;
        for (i, s) in self.slots.iter().enumerate() {
            let Kind::Compute(ops) = &s.kind else {
                continue;
            };
            if numel(s) == 0 || interior.contains(&i) || virtual_slots.contains(&i) {
                continue;
            }
            let out = ptr_of(i);
            if let Some(gr) = fused_root.get(&i) {
                let name = format!("n{}_fused", s.id.index());
                let k =
                    codegen::fuse::fused_kernel(&self.graph, gr, batch, &name).map_err(other)?;
                let params: Vec<usize> = leaves_of(gr).into_iter().chain([i]).collect();
                let k = widen(k, &params)?;
                let args: Vec<u64> = params.iter().map(|&p| ptr_of(p)).collect();
                fused += 1;
                pending.push((i, "fused", name, PendingAction::Kernel(kernels.len(), args)));
                kernels.push(k);
                continue;
            }
            let args: Vec<u64> = ops.iter().map(|&o| ptr_of(o)).chain([out]).collect();
            let node = self.graph.node(s.id);
            if matches!(view_att.get(&i), Some(ViewGemms::Fused(_))) {
                if let Some(ViewGemms::Fused(k)) = view_att.remove(&i) {
                    // q, k, v: the pointers of the buffers the views read (a view slot
                    // shares its root's location); the offsets are in the kernel.
                    pending.push((
                        i,
                        s.op,
                        k.name.clone(),
                        PendingAction::Kernel(kernels.len(), args),
                    ));
                    let params: Vec<usize> = ops.iter().copied().chain([i]).collect();
                    kernels.push(widen(*k, &params)?);
                }
                continue;
            }
            if blas && attention_gemm {
                let at = if let Some(ViewGemms::Attention(_)) = view_att.get(&i) {
                    match view_att.remove(&i) {
                        Some(ViewGemms::Attention(at)) => Some(*at),
                        _ => None,
                    }
                } else {
                    attention_for(&self.graph, s.id, batch)
                };
                if let Some(at) = at {
                    let id = s.id.index();
                    gemms += 2;
                    scratch_elems = scratch_elems.max(at.s_elems);
                    let (q, k, v) = (args[0], args[1], args[2]);
                    // Scratch pointers are patched in once the scratch is allocated.
                    pending.push((
                        i,
                        s.op,
                        format!("n{id}_attention_qk"),
                        PendingAction::Gemm(Gemm {
                            a: k,
                            b: q,
                            c: SCRATCH_S,
                            ..at.qk
                        }),
                    ));
                    let mut kargs = vec![SCRATCH_S];
                    if at.sink {
                        kargs.push(args[3]);
                    }
                    kargs.push(SCRATCH_P);
                    let mut kk = at.softmax;
                    let name = format!("n{id}_attention_softmax");
                    kk.source = kk.source.replace(&kk.name, &name);
                    kk.name = name.clone();
                    pending.push((i, s.op, name, PendingAction::Kernel(kernels.len(), kargs)));
                    kernels.push(kk);
                    pending.push((
                        i,
                        s.op,
                        format!("n{id}_attention_pv"),
                        PendingAction::Gemm(Gemm {
                            a: v,
                            b: SCRATCH_P,
                            c: out,
                            ..at.pv
                        }),
                    ));
                    continue;
                }
            }
            if let Some(ViewGemms::MatMul(g)) = view_att.remove(&i) {
                gemms += 1;
                pending.push((
                    i,
                    s.op,
                    format!("n{}_{}_gemm", s.id.index(), s.op),
                    PendingAction::Gemm(Gemm {
                        a: args[1],
                        b: args[0],
                        c: out,
                        ..g
                    }),
                ));
                continue;
            }
            if blas {
                if let Some((g, epi)) = gemm_for(&self.graph, s.id, batch) {
                    gemms += 1;
                    let (a_op, b_op) = (args[0], args[1]);
                    // `EPTC_CUDA_LT=1`: bias and residual in cuBLASLt's epilogue.
                    let spec = epi.as_ref().filter(|_| sw.lt).and_then(|e| lt_spec(&g, e));
                    let bias_res = |spec: &LtSpec| {
                        let bias = if spec.bias { args[2] } else { 0 };
                        let res = if spec.residual {
                            args[if spec.bias { 3 } else { 2 }]
                        } else {
                            0
                        };
                        (bias, res)
                    };
                    // (The handle is there only where `EPTC_CUDA_LT=1` was set when the
                    // device was opened.)
                    let gpu_lt = match &self.dev {
                        Device::Gpu(g) => g.lt.as_ref().ok(),
                        Device::Emulator => None,
                    };
                    let lt = match (gpu_lt, &self.dev, spec) {
                        (Some(lt), _, Some(spec)) => {
                            let lt = lt.lock().map_err(|_| other("cuBLASLt handle poisoned"))?;
                            let (bias, res) = bias_res(&spec);
                            // cuBLAS's A is our B (the weight). Where cuBLASLt refuses,
                            // the GEMM and the epilogue kernel, as without it.
                            match LtGemm::new(&lt, &spec, self.dtype, b_op, a_op, bias, res, out) {
                                Ok(l) => Some(PendingAction::Lt(Box::new(l))),
                                Err(e) => {
                                    static SAID: std::sync::Once = std::sync::Once::new();
                                    SAID.call_once(|| {
                                        eprintln!(
                                            "eptc: {e}; this linear's epilogue runs as a kernel"
                                        )
                                    });
                                    None
                                }
                            }
                        }
                        (None, Device::Emulator, Some(spec)) => {
                            let (bias, c) = bias_res(&spec);
                            Some(PendingAction::HostLt(Box::new(HostLt {
                                a: b_op,
                                b: a_op,
                                bias,
                                c: if spec.residual { c } else { out },
                                d: out,
                                spec,
                            })))
                        }
                        _ => None,
                    };
                    if let Some(l) = lt {
                        pending.push((i, s.op, format!("n{}_{}_lt", s.id.index(), s.op), l));
                        continue;
                    }
                    // cuBLAS computes C^T = B^T A^T: its A is our B.
                    pending.push((
                        i,
                        s.op,
                        format!("n{}_{}_gemm", s.id.index(), s.op),
                        PendingAction::Gemm(Gemm {
                            a: b_op,
                            b: a_op,
                            c: out,
                            ..g
                        }),
                    ));
                    if let Some(e) = epi {
                        let name = format!("n{}_{}_epilogue", s.id.index(), s.op);
                        let k = codegen::linear_epilogue(
                            &name, e.rows, e.cols, e.bias, e.gelu, e.residual, self.dtype,
                        );
                        let mut eargs = Vec::new();
                        if e.bias {
                            eargs.push(args[2]);
                        }
                        if e.residual {
                            eargs.push(args[if e.bias { 3 } else { 2 }]);
                        }
                        eargs.push(out);
                        pending.push((i, s.op, name, PendingAction::Kernel(kernels.len(), eargs)));
                        kernels.push(k);
                    }
                    continue;
                }
            }
            let _ = node;
            let params: Vec<usize> = ops.iter().copied().chain([i]).collect();
            for k in codegen::node_kernels(&self.graph, s.id, batch, self.dtype).map_err(other)? {
                let k = widen(k, &params)?;
                pending.push((
                    i,
                    s.op,
                    k.name.clone(),
                    PendingAction::Kernel(kernels.len(), args.clone()),
                ));
                kernels.push(k);
            }
        }
        // Every node planned to read through views did (their operands have no copy).
        if !view_att.is_empty() {
            return Err(other(format!(
                "internal: {} nodes planned to read through views got other steps",
                view_att.len()
            )));
        }
        // The scores and probabilities of the attention GEMMs: one pair for the plan (the
        // attention nodes run one after another).
        let mut scratch = Vec::new();
        if scratch_elems > 0 {
            let bytes = scratch_elems * eb as usize;
            let sm = self.dev.alloc(bytes, "attention scores")?;
            let pm = self.dev.alloc(bytes, "attention probabilities")?;
            let patch = |p: &mut u64| {
                if *p == SCRATCH_S {
                    *p = sm.ptr;
                } else if *p == SCRATCH_P {
                    *p = pm.ptr;
                }
            };
            for (_, _, _, a) in pending.iter_mut() {
                match a {
                    PendingAction::Gemm(g) => {
                        patch(&mut g.a);
                        patch(&mut g.b);
                        patch(&mut g.c);
                    }
                    PendingAction::Kernel(_, args) => args.iter_mut().for_each(patch),
                    PendingAction::Lt(_) | PendingAction::HostLt(_) => {}
                }
            }
            scratch.push(sm);
            scratch.push(pm);
        }
        // The pointer arrays of the GEMMs that read through views, now that every
        // pointer is known: A's, B's and C's, one after another in one buffer.
        for (_, _, name, a) in pending.iter_mut() {
            let PendingAction::Gemm(g) = a else { continue };
            if !g.pointer_arrays {
                continue;
            }
            let count = g.offsets.len() as u64;
            let mut host: Vec<u8> = Vec::with_capacity(24 * g.offsets.len());
            for (k, base) in [g.a, g.b, g.c].into_iter().enumerate() {
                for o in &g.offsets {
                    let off = [o.0, o.1, o.2][k] as u64;
                    host.extend((base + off * eb).to_le_bytes());
                }
            }
            let mem = self
                .dev
                .alloc(host.len(), &format!("{name}: GEMM pointer arrays"))?;
            unsafe { self.dev.htod(mem.ptr, &host) }
                .map_err(|e| other(format!("uploading {name}'s pointer arrays: {e}")))?;
            g.ptrs = Some((mem.ptr, mem.ptr + 8 * count, mem.ptr + 16 * count));
            scratch.push(mem);
        }
        // One module of the distinct kernels (the name masked), compiled once.
        let mut unique: Vec<usize> = Vec::new();
        let mut canon: HashMap<String, usize> = HashMap::new();
        let mut func_of: Vec<usize> = Vec::with_capacity(kernels.len());
        for (j, k) in kernels.iter().enumerate() {
            let key = format!(
                "{}|{:?}|{:?}|{}",
                k.source.replace(&k.name, "@"),
                k.grid,
                k.block,
                k.shared_bytes
            );
            let f = *canon.entry(key).or_insert_with(|| {
                unique.push(j);
                unique.len() - 1
            });
            func_of.push(f);
        }
        let mut emulated = None;
        let (module, functions) = if unique.is_empty() {
            (None, Vec::new())
        } else if let Device::Emulator = self.dev {
            let refs: Vec<&Kernel> = unique.iter().map(|&j| &kernels[j]).collect();
            let m = crate::emulate::Module::compile(&refs, self.dtype)
                .map_err(|e| other(format!("the CPU emulator: {e}")))?;
            let names = refs.iter().map(|k| k.name.clone()).collect();
            emulated = Some((m, names));
            (None, Vec::new())
        } else {
            let gpu = self.dev.gpu().map_err(other)?;
            let refs: Vec<&Kernel> = unique.iter().map(|&j| &kernels[j]).collect();
            let src = codegen::module_source(&refs, self.dtype);
            let ptx = crate::cache::compile_cached(&src, &gpu.arch)
                .map_err(|e| other(format!("NVRTC ({}): {e}", gpu.arch)))?;
            let c = CString::new(ptx).map_err(|_| other("PTX holds a NUL byte"))?;
            let module = unsafe { dr::module::load_data(c.as_ptr() as *const c_void) }
                .map_err(|e| other(format!("loading the PTX module: {e}")))?;
            let mut fs = Vec::new();
            for &j in &unique {
                let name = &kernels[j].name;
                let f = unsafe {
                    dr::module::get_function(module, CString::new(name.as_str()).unwrap())
                }
                .map_err(|e| other(format!("kernel {name} not in the module: {e}")))?;
                fs.push(f);
            }
            (Some(module), fs)
        };
        let steps: Vec<Step> = pending
            .into_iter()
            .map(|(i, kind, name, a)| Step {
                kind,
                name,
                guard: match (pad, ap.loc[i]) {
                    (1.., Loc::Slot(k)) => Some((arena + ap.offsets[k], ap.bytes[k] as usize)),
                    _ => None,
                },
                action: match a {
                    PendingAction::Gemm(g) => Action::Gemm(g),
                    PendingAction::Lt(l) => Action::Lt(l),
                    PendingAction::HostLt(l) => Action::HostLt(l),
                    PendingAction::Kernel(j, args) => {
                        let k = &kernels[j];
                        Action::Launch {
                            func: func_of[j],
                            grid: k.grid,
                            block: k.block,
                            shared: k.shared_bytes,
                            args,
                        }
                    }
                },
            })
            .collect();
        let outputs: Vec<(String, Vec<usize>, Option<u64>)> = self
            .outputs
            .iter()
            .map(|(name, i)| {
                let s = &self.slots[*i];
                let p = ptr_of(*i);
                (name.clone(), s.shape.resolve(batch), (p != 0).then_some(p))
            })
            .collect();
        let stats = PlanStats {
            kernels: kernels.len(),
            unique_kernels: unique.len(),
            gemms,
            intermediate_bytes: ap.arena,
            device_bytes: slot_mem
                .iter()
                .chain(&scratch)
                .chain(inputs.iter().filter_map(|i| i.1.as_ref()))
                .map(|m| m.bytes as u64)
                .sum(),
            captured: false,
            fused,
        };
        // Pinned staging: every input's and output's bytes, 256-byte aligned.
        let mut offs = Vec::new();
        let mut total = 0usize;
        let in_bytes: Vec<usize> = inputs
            .iter()
            .map(|(_, m)| m.as_ref().map_or(0, |m| m.bytes))
            .collect();
        let out_bytes: Vec<usize> = outputs
            .iter()
            .map(|(_, shape, _)| shape.iter().product::<usize>() * eb as usize)
            .collect();
        for b in in_bytes.iter().chain(&out_bytes) {
            offs.push(total);
            total += b.div_ceil(256) * 256;
        }
        // `EPTC_CUDA_PINNED=1` (off until a GPU run has checked it).
        let staging = if sw.pinned && matches!(self.dev, Device::Gpu(_)) {
            Pinned::new(total).map(|m| (m, offs))
        } else {
            None
        };
        let mut p = BatchPlan {
            staging,
            batch,
            inputs,
            _slots: slot_mem.into_iter().chain(scratch).collect(),
            steps,
            outputs,
            module,
            functions,
            graph: None,
            stats,
            emulated,
        };
        if self.use_graph && !self.profile && matches!(self.dev, Device::Gpu(_)) {
            match self.capture(&p) {
                Ok(g) => {
                    p.graph = Some(g);
                    p.stats.captured = true;
                }
                Err(e) => eprintln!("eptc cuda: not using a CUDA graph: {e}"),
            }
        }
        Ok(p)
    }

    /// Enqueue one step on the shared stream.
    fn enqueue(&self, p: &BatchPlan, s: &Step) -> Result<()> {
        let stream = self.dev.gpu().map_err(other)?.stream.cu_stream();
        match &s.action {
            Action::Launch {
                func,
                grid,
                block,
                shared,
                args,
            } => {
                let mut vals = args.clone();
                let mut params: Vec<*mut c_void> = vals
                    .iter_mut()
                    .map(|v| v as *mut u64 as *mut c_void)
                    .collect();
                unsafe {
                    dr::launch_kernel(
                        p.functions[*func],
                        (grid[0], grid[1], grid[2]),
                        (block[0], block[1], block[2]),
                        *shared,
                        stream,
                        &mut params,
                    )
                }
                .map_err(|e| other(format!("launching {}: {e}", s.name)))
            }
            Action::Gemm(g) => self.gemm(g).map_err(|e| other(format!("{}: {e}", s.name))),
            Action::Lt(l) => self
                .lt_gemm(l)
                .map_err(|e| other(format!("{}: {e}", s.name))),
            Action::HostLt(_) => Err(other(format!("{}: internal: an emulated step", s.name))),
        }
    }

    fn lt_gemm(&self, l: &LtGemm) -> std::result::Result<(), String> {
        let gpu = self.dev.gpu()?;
        let lt = gpu.lt.as_ref().map_err(|e| format!("cuBLASLt: {e}"))?;
        let lt = lt.lock().map_err(|_| "cuBLASLt handle poisoned")?;
        let (alpha, beta) = (1.0f32, l.beta);
        // SAFETY: the descriptors are alive (owned by `l`), the pointers are the plan's
        // buffers, the workspace is the handle's.
        unsafe {
            ltr::matmul(
                lt.handle,
                l.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                l.a as *const c_void,
                l.layouts[0],
                l.b as *const c_void,
                l.layouts[1],
                l.c as *const c_void,
                l.layouts[2],
                l.d as *mut c_void,
                l.layouts[2],
                &l.algo,
                lt.workspace as *mut c_void,
                lt.workspace_bytes,
                gpu.stream.cu_stream() as lts::cudaStream_t,
            )
        }
        .map_err(|e| format!("cuBLASLt matmul: {e}"))
    }

    fn gemm(&self, g: &Gemm) -> std::result::Result<(), String> {
        let blas = self.dev.gpu()?.blas.as_ref().ok_or("no cuBLAS")?;
        let blas = blas.lock().map_err(|_| "cuBLAS handle poisoned")?;
        let (ty, eb) = match self.dtype {
            DType::BF16 => (bs::cudaDataType::CUDA_R_16BF, 2),
            DType::F16 => (bs::cudaDataType::CUDA_R_16F, 2),
            DType::F32 => (bs::cudaDataType::CUDA_R_32F, 4),
        };
        let op = |t: bool| {
            if t {
                bs::cublasOperation_t::CUBLAS_OP_T
            } else {
                bs::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (g.alpha, 0.0f32);
        let compute = if self.tf32 && self.dtype == DType::F32 {
            bs::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            bs::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        if let Some((pa, pb, pc)) = g.ptrs {
            let count = i32::try_from(g.offsets.len()).map_err(|_| "too many GEMMs")?;
            // SAFETY: the three arrays hold `count` device pointers each, into buffers of
            // the plan that hold every matrix the offsets address.
            let st = unsafe {
                bs::cublasGemmBatchedEx(
                    blas.handle,
                    op(g.transa),
                    op(g.transb),
                    g.m,
                    g.n,
                    g.k,
                    &alpha as *const f32 as *const c_void,
                    pa as *const *const c_void,
                    ty,
                    g.lda,
                    pb as *const *const c_void,
                    ty,
                    g.ldb,
                    &beta as *const f32 as *const c_void,
                    pc as *const *mut c_void,
                    ty,
                    g.ldc,
                    count,
                    compute,
                    bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            };
            if st != bs::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(format!("cuBLAS batched GEMM: {st:?}"));
            }
            return Ok(());
        }
        for &(oa, ob, oc) in &g.offsets {
            unsafe {
                br::gemm_strided_batched_ex(
                    blas.handle,
                    op(g.transa),
                    op(g.transb),
                    g.m,
                    g.n,
                    g.k,
                    &alpha as *const f32 as *const c_void,
                    (g.a + (oa * eb) as u64) as *const c_void,
                    ty,
                    g.lda,
                    g.stride_a,
                    (g.b + (ob * eb) as u64) as *const c_void,
                    ty,
                    g.ldb,
                    g.stride_b,
                    &beta as *const f32 as *const c_void,
                    (g.c + (oc * eb) as u64) as *mut c_void,
                    ty,
                    g.ldc,
                    g.stride_c,
                    g.batch,
                    compute,
                    bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| format!("cuBLAS GEMM: {e}"))?;
        }
        Ok(())
    }

    /// Capture the plan's steps in a CUDA graph.
    fn capture(&self, p: &BatchPlan) -> Result<(ds::CUgraph, ds::CUgraphExec)> {
        let stream = self.dev.gpu().map_err(other)?.stream.cu_stream();
        unsafe {
            dr::stream::begin_capture(
                stream,
                ds::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| other(format!("beginning the capture: {e}")))?;
        let mut failed = None;
        for s in &p.steps {
            if let Err(e) = self.enqueue(p, s) {
                failed = Some(e);
                break;
            }
        }
        let graph = unsafe { dr::stream::end_capture(stream) };
        if let Some(e) = failed {
            if let Ok(g) = graph {
                unsafe {
                    let _ = dr::graph::destroy(g);
                }
            }
            return Err(e);
        }
        let graph = graph.map_err(|e| other(format!("ending the capture: {e}")))?;
        let exec = unsafe { dr::graph::instantiate(graph, ds::CUgraphInstantiate_flags_enum(0)) }
            .map_err(|e| {
            unsafe {
                let _ = dr::graph::destroy(graph);
            }
            other(format!("instantiating the graph: {e}"))
        })?;
        Ok((graph, exec))
    }
}

/// A run's outputs, by name.
type Outputs = Vec<(String, HostTensor)>;

enum PendingAction {
    Gemm(Gemm),
    /// Kernel index, launch arguments.
    Kernel(usize, Vec<u64>),
    Lt(Box<LtGemm>),
    HostLt(Box<HostLt>),
}

/// An [`LtSpec`] on the emulator: `D = op(A) op(B) + bias + C` on the host.
struct HostLt {
    spec: LtSpec,
    a: u64,
    b: u64,
    /// 0 without a bias.
    bias: u64,
    /// The residual, or (without one) D itself, read with `beta = 0`.
    c: u64,
    d: u64,
}

/// A `linear` as one cuBLASLt matmul in cuBLAS's column-major terms (the [`Gemm`] of
/// [`gemm_for`]: `D = op(A) op(B)`, A our weight, B our input): the bias added per row of
/// D (per output feature) by the `BIAS` epilogue, the residual as C with `beta = 1`
/// (`D = op(A) op(B) + bias + C`). Not for GELU: cuBLASLt's is the tanh approximation,
/// the IR's the exact one.
#[derive(Clone, Debug, PartialEq)]
struct LtSpec {
    transa: bool,
    transb: bool,
    m: u64,
    n: u64,
    k: u64,
    lda: i64,
    ldb: i64,
    ldc: i64,
    bias: bool,
    residual: bool,
}

/// The cuBLASLt form of a linear's GEMM and epilogue, where it has one: a single GEMM
/// (no batch), bias and / or residual, no GELU.
fn lt_spec(g: &Gemm, e: &Epi) -> Option<LtSpec> {
    if e.gelu || !(e.bias || e.residual) || g.batch != 1 || g.offsets.len() != 1 || g.pointer_arrays
    {
        return None;
    }
    if g.offsets[0] != (0, 0, 0) || g.alpha != 1.0 {
        return None;
    }
    Some(LtSpec {
        transa: g.transa,
        transb: g.transb,
        m: g.m as u64,
        n: g.n as u64,
        k: g.k as u64,
        lda: i64::from(g.lda),
        ldb: i64::from(g.ldb),
        ldc: i64::from(g.ldc),
        bias: e.bias,
        residual: e.residual,
    })
}

/// An [`LtSpec`] ready to run: its descriptors, the algorithm cuBLASLt's heuristic chose
/// (outside any capture), and the device pointers.
struct LtGemm {
    desc: lts::cublasLtMatmulDesc_t,
    /// A, B, and C = D.
    layouts: [lts::cublasLtMatrixLayout_t; 3],
    algo: lts::cublasLtMatmulAlgo_t,
    a: u64,
    b: u64,
    /// The residual (with `beta = 1`), or the output (`beta = 0`).
    c: u64,
    d: u64,
    beta: f32,
}

// The descriptors are plain host objects, used only under the plan's owner.
unsafe impl Send for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        unsafe {
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = ltr::destroy_matrix_layout(l);
            }
            let _ = ltr::destroy_matmul_desc(self.desc);
        }
    }
}

impl LtGemm {
    /// Descriptors and algorithm for `spec` with storage `dtype` (`bias` and `residual`
    /// 0 where absent).
    #[allow(clippy::too_many_arguments)]
    fn new(
        lt: &gpu::Lt,
        spec: &LtSpec,
        dtype: DType,
        a: u64,
        b: u64,
        bias: u64,
        residual: u64,
        out: u64,
    ) -> std::result::Result<LtGemm, String> {
        let ty = match dtype {
            DType::BF16 => lts::cudaDataType::CUDA_R_16BF,
            DType::F16 => lts::cudaDataType::CUDA_R_16F,
            DType::F32 => lts::cudaDataType::CUDA_R_32F,
        };
        fn err(what: &'static str) -> impl Fn(ltr::CublasError) -> String {
            move |e| format!("cuBLASLt: {what}: {e}")
        }
        let desc = ltr::create_matmul_desc(
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lts::cudaDataType::CUDA_R_32F,
        )
        .map_err(err("creating the matmul descriptor"))?;
        // From here on `g` owns what is created and frees it on an early return.
        let mut g = LtGemm {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: unsafe { std::mem::zeroed() },
            a,
            b,
            c: if spec.residual { residual } else { out },
            d: out,
            beta: if spec.residual { 1.0 } else { 0.0 },
        };
        let set = |attr: lts::cublasLtMatmulDescAttributes_t, v: *const c_void, n: usize| unsafe {
            ltr::set_matmul_desc_attribute(desc, attr, v, n)
        };
        // cublasOperation_t: N = 0, T = 1.
        let (ta, tb) = (i32::from(spec.transa), i32::from(spec.transb));
        set(
            lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &ta as *const i32 as *const c_void,
            4,
        )
        .map_err(err("setting TRANSA"))?;
        set(
            lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &tb as *const i32 as *const c_void,
            4,
        )
        .map_err(err("setting TRANSB"))?;
        if spec.bias {
            let epi = lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epi as *const lts::cublasLtEpilogue_t as *const c_void,
                std::mem::size_of::<lts::cublasLtEpilogue_t>(),
            )
            .map_err(err("setting the epilogue"))?;
            let p = bias as *const c_void;
            set(
                lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &p as *const *const c_void as *const c_void,
                std::mem::size_of::<*const c_void>(),
            )
            .map_err(err("setting the bias pointer"))?;
        }
        let (ar, ac) = if spec.transa {
            (spec.k, spec.m)
        } else {
            (spec.m, spec.k)
        };
        let (br_, bc) = if spec.transb {
            (spec.n, spec.k)
        } else {
            (spec.k, spec.n)
        };
        for (i, (r, c, ld)) in [
            (ar, ac, spec.lda),
            (br_, bc, spec.ldb),
            (spec.m, spec.n, spec.ldc),
        ]
        .into_iter()
        .enumerate()
        {
            g.layouts[i] =
                ltr::create_matrix_layout(ty, r, c, ld).map_err(err("creating a matrix layout"))?;
        }
        let pref = ltr::create_matmul_pref().map_err(err("creating the preference"))?;
        let ws = lt.workspace_bytes as u64;
        let found = unsafe {
            ltr::set_matmul_pref_attribute(
                pref,
                lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .and_then(|_| {
                ltr::get_matmul_algo_heuristic(
                    lt.handle,
                    desc,
                    g.layouts[0],
                    g.layouts[1],
                    g.layouts[2],
                    g.layouts[2],
                    pref,
                )
            })
        };
        unsafe {
            let _ = ltr::destroy_matmul_pref(pref);
        }
        g.algo = found.map_err(err("finding an algorithm"))?.algo;
        Ok(g)
    }
}

/// The bias / GELU / residual epilogue of a `linear` run as a GEMM.
struct Epi {
    rows: usize,
    cols: usize,
    bias: bool,
    gelu: bool,
    residual: bool,
}

/// Our row-major `C[.., M, N] = alpha · A[.., M, K] B[.., K, N]` (A stored `[K, M]` when
/// `ta`, B stored `[N, K]` when `tb`) over leading dims `lead` with the operands' lead
/// strides, as a cuBLAS (column-major) GEMM: `Cᵀ = Bᵀ Aᵀ`, so cuBLAS's A is our B
/// (`[K, N]` row-major is `[N, K]` column-major, ld N; transposed when stored `[N, K]`)
/// and its B is our A. Operand pointers are left 0 for the caller.
#[allow(clippy::too_many_arguments)]
fn cublas_gemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lead: &[usize],
    sa: &[usize],
    sb: &[usize],
    alpha: f32,
) -> Option<Gemm> {
    let fits = |v: usize| i32::try_from(v).ok();
    let sc = dims::lead_contiguous(lead, m * n);
    let (sa, sb) = (sa.to_vec(), sb.to_vec());
    let (count, [st_a, st_b, st_c], offsets) = batching(lead, &[&sa, &sb, &sc]);
    // A batch sharing B, whose A (not transposed) and C entries lie one after another:
    // one product of `count * m` rows instead, which cuBLAS tiles better than `count`
    // products of `m` rows (the backward's `dX = dY W` over B images of 197 tokens);
    // only while the rows fit cuBLAS's 32-bit sizes.
    let fold = count > 1
        && offsets.len() == 1
        && !ta
        && st_b == 0
        && st_a == m * k
        && st_c == m * n
        && fits(m * count).is_some();
    let (m, count, st_a, st_c) = if fold {
        (m * count, 1, 0, 0)
    } else {
        (m, count, st_a, st_c)
    };
    Some(Gemm {
        transa: tb,
        transb: ta,
        m: fits(n)?,
        n: fits(m)?,
        k: fits(k)?,
        lda: fits(if tb { k } else { n })?,
        ldb: fits(if ta { m } else { k })?,
        ldc: fits(n)?,
        stride_a: st_b as i64,
        stride_b: st_a as i64,
        stride_c: st_c as i64,
        batch: fits(count)?,
        // (our A, our B, C) offsets → (cuBLAS A = our B, cuBLAS B = our A, C).
        offsets: offsets.into_iter().map(|[a, b, c]| (b, a, c)).collect(),
        alpha,
        a: 0,
        b: 0,
        c: 0,
        pointer_arrays: false,
        ptrs: None,
    })
}

/// The GEMM computing node `id` (a `matmul` or `linear`), if cuBLAS can (operand pointers
/// left 0, filled by the caller; cuBLAS's A is our B), and the epilogue a `linear` needs
/// after it.
fn gemm_for(g: &Graph, id: NodeId, batch: usize) -> Option<(Gemm, Option<Epi>)> {
    let node = g.node(id);
    let ops = g.operands(id);
    let x: Vec<Vec<usize>> = ops.iter().map(|&o| g.ty(o).shape.resolve(batch)).collect();
    let out = node.ty.shape.resolve(batch);
    match &node.op {
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let mm = dims::matmul(&x[0], &x[1], *transpose_a, *transpose_b, &out).ok()?;
            if mm.k == 0 {
                return None;
            }
            let gm = cublas_gemm(
                *transpose_a,
                *transpose_b,
                mm.m,
                mm.n,
                mm.k,
                &mm.lead,
                &mm.a.lead_strides,
                &mm.b.lead_strides,
                1.0,
            )?;
            Some((gm, None))
        }
        Op::Linear {
            bias,
            activation,
            residual,
        } => {
            let dims::Linear { rows, o, k } = dims::linear(&x, *bias, *residual, &out).ok()?;
            if k == 0 {
                return None;
            }
            let gm = cublas_gemm(false, true, rows, o, k, &[], &[], &[], 1.0)?;
            let gelu = *activation == Activation::Gelu;
            let epi = (*bias || gelu || *residual).then_some(Epi {
                rows,
                cols: o,
                bias: *bias,
                gelu,
                residual: *residual,
            });
            Some((gm, epi))
        }
        _ => None,
    }
}

/// Placeholders for the attention scratch buffers in pending launches (never valid
/// device addresses: odd).
const SCRATCH_S: u64 = 1;
const SCRATCH_P: u64 = 3;

/// `attention` as GEMMs: `S = scale · Q Kᵀ`, `P = softmax(S [, z])` (a generated kernel),
/// `O = P V`.
struct AttentionGemms {
    qk: Gemm,
    softmax: Kernel,
    pv: Gemm,
    sink: bool,
    /// Elements of S (and of P).
    s_elems: usize,
}

fn attention_for(g: &Graph, id: NodeId, batch: usize) -> Option<AttentionGemms> {
    let node = g.node(id);
    let Op::Attention { scale, sink } = &node.op else {
        return None;
    };
    let ops = g.operands(id);
    let x: Vec<Vec<usize>> = ops.iter().map(|&o| g.ty(o).shape.resolve(batch)).collect();
    let out = node.ty.shape.resolve(batch);
    let at = dims::attention(&x, *sink, &out).ok()?;
    let (n, m, d, e) = (at.n, at.m, at.d, at.e);
    if d == 0 || m == 0 {
        return None;
    }
    // S[n, m] = scale · Q[n, d] K[m, d]ᵀ, then O[n, e] = P[n, m] V[m, e].
    let qk = cublas_gemm(
        false, true, n, m, d, &at.lead, &at.q_lead, &at.k_lead, *scale,
    )?;
    let sp = dims::lead_contiguous(&at.lead, n * m);
    let pv = cublas_gemm(false, false, n, e, m, &at.lead, &sp, &at.v_lead, 1.0)?;
    // The softmax over the last axis of S (with the sink logit z), generated from a graph
    // of that one op.
    let mut sg = Graph::new("attention-softmax");
    let mut s_shape = at.lead.clone();
    s_shape.extend([n, m]);
    let si = sg.input("s", eptc_ir::TensorType::f32(Shape::fixed(&s_shape)));
    let y = if *sink {
        let zi = sg.input("z", eptc_ir::TensorType::f32(Shape::fixed(&x[3])));
        sg.softmax_sink(si, zi).ok()?
    } else {
        sg.softmax(si, s_shape.len() - 1).ok()?
    };
    let mut ks = codegen::node_kernels(&sg, y, batch, DType::F32).ok()?;
    if ks.len() != 1 {
        return None;
    }
    Some(AttentionGemms {
        qk,
        softmax: ks.pop()?,
        pv,
        sink: *sink,
        s_elems: s_shape.iter().product(),
    })
}

/// A tensor read in place from another node's buffer: `value[idx] = root[offset + Σ idx ·
/// strides]`.
#[derive(Clone, Debug, PartialEq)]
struct StridedView {
    root: NodeId,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
    /// The `reshape`, `permute` and `slice` nodes walked from the node to the root.
    through: Vec<NodeId>,
}

/// `id` as a strided view of the nearest node that is not a `reshape`, `permute` or
/// `slice` (or is in `stop`: materialised); `None` where a reshape of a non-contiguous
/// view is not just the insertion or removal of size-1 axes.
fn strided_view(
    g: &Graph,
    id: NodeId,
    batch: usize,
    stop: &HashSet<NodeId>,
) -> Option<StridedView> {
    let shape = g.ty(id).shape.resolve(batch);
    let node = g.node(id);
    let inner = || {
        let mut v = strided_view(g, g.operands(id)[0], batch, stop)?;
        v.through.push(id);
        Some(v)
    };
    if stop.contains(&id) {
        // Materialised: a contiguous buffer of its own.
        return Some(StridedView {
            root: id,
            offset: 0,
            strides: eptc_ir::strides::contiguous_strides(&shape),
            shape,
            through: Vec::new(),
        });
    }
    Some(match &node.op {
        Op::Reshape { .. } => {
            let v = inner()?;
            let strides = if v.strides == eptc_ir::strides::contiguous_strides(&v.shape) {
                eptc_ir::strides::contiguous_strides(&shape)
            } else {
                // Only size-1 axes come and go: the others keep their strides in order.
                let kept: Vec<usize> = (0..v.shape.len()).filter(|&i| v.shape[i] != 1).collect();
                let new_kept: Vec<usize> = (0..shape.len()).filter(|&i| shape[i] != 1).collect();
                let same = kept.len() == new_kept.len()
                    && kept
                        .iter()
                        .zip(&new_kept)
                        .all(|(&a, &b)| v.shape[a] == shape[b]);
                if !same {
                    return None;
                }
                let mut st = vec![0; shape.len()];
                for (&a, &b) in kept.iter().zip(&new_kept) {
                    st[b] = v.strides[a];
                }
                st
            };
            StridedView {
                shape,
                strides,
                ..v
            }
        }
        Op::Permute { perm } => {
            let v = inner()?;
            if perm.len() != v.shape.len() || perm.iter().any(|&p| p >= v.shape.len()) {
                return None;
            }
            StridedView {
                shape: perm.iter().map(|&p| v.shape[p]).collect(),
                strides: perm.iter().map(|&p| v.strides[p]).collect(),
                ..v
            }
        }
        Op::Slice { axis, start, .. } => {
            let v = inner()?;
            if *axis >= v.shape.len() {
                return None;
            }
            StridedView {
                offset: v.offset + start * v.strides[*axis],
                shape,
                ..v
            }
        }
        _ => StridedView {
            root: id,
            offset: 0,
            strides: eptc_ir::strides::contiguous_strides(&shape),
            shape,
            through: Vec::new(),
        },
    })
}

/// `C = alpha · op(A) op(B)` over the leading dims `lead`, C contiguous, A and B read
/// through views: `a = (offset, lead strides, row stride)` (rows of the stored matrix are
/// contiguous), likewise `b`. One entry per leading index, run as one pointer-array
/// batched GEMM.
#[allow(clippy::too_many_arguments)]
fn view_gemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lead: &[usize],
    a: (usize, &[usize], usize),
    b: (usize, &[usize], usize),
    alpha: f32,
) -> Option<Gemm> {
    let fits = |v: usize| i32::try_from(v).ok();
    let sc = dims::lead_contiguous(lead, m * n);
    let total: usize = lead.iter().product();
    let mut offsets = Vec::with_capacity(total);
    for flat in 0..total {
        let (mut rem, mut oa, mut ob, mut oc) = (flat, a.0, b.0, 0);
        for d in (0..lead.len()).rev() {
            let i = rem % lead[d];
            rem /= lead[d];
            oa += i * a.1[d];
            ob += i * b.1[d];
            oc += i * sc[d];
        }
        // (cuBLAS A = our B, cuBLAS B = our A, C).
        offsets.push((ob, oa, oc));
    }
    Some(Gemm {
        transa: tb,
        transb: ta,
        m: fits(n)?,
        n: fits(m)?,
        k: fits(k)?,
        lda: fits(b.2)?,
        ldb: fits(a.2)?,
        ldc: fits(n)?,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
        batch: 1,
        offsets,
        alpha,
        a: 0,
        b: 0,
        c: 0,
        pointer_arrays: true,
        ptrs: None,
    })
}

/// The attention `id` as GEMMs reading q, k and v in place through strided views (the
/// `slice`s and `permute` that split a fused qkv projection then need no copy), with the
/// view nodes walked; `None` unless every operand's view has contiguous rows, the
/// output's leading dims, and at least one of them goes through a `permute` or `slice`.
/// The strided views of attention `id`'s q, k and v (each with the output's leading axes
/// and contiguous rows) and the nodes they pass through, where at least one of those is
/// a copy (`permute` or `slice`) a view saves.
fn qkv_views(
    g: &Graph,
    id: NodeId,
    batch: usize,
    stop: &HashSet<NodeId>,
) -> Option<(Vec<StridedView>, Vec<NodeId>)> {
    let ops = g.operands(id);
    let out = g.ty(id).shape.resolve(batch);
    let count = view_count(g, id);
    if out.iter().product::<usize>() == 0 || ops.len() < count {
        return None;
    }
    let lead = &out[..out.len() - 2];
    let mut views = Vec::new();
    let mut through = Vec::new();
    for &o in &ops[..count] {
        let v = strided_view(g, o, batch, stop)?;
        let r = v.shape.len();
        if r < 2 || v.shape[..r - 2] != *lead || (v.shape[r - 1] > 1 && v.strides[r - 1] != 1) {
            return None;
        }
        through.extend(v.through.iter().copied());
        views.push(v);
    }
    let copies = through
        .iter()
        .any(|&t| matches!(g.node(t).op, Op::Permute { .. } | Op::Slice { .. }));
    copies.then_some((views, through))
}

/// How many leading operands of an attention op are q, k (and v): read through views.
fn view_count(g: &Graph, id: NodeId) -> usize {
    match g.node(id).op {
        Op::AttentionLse { .. } => 2,
        _ => 3,
    }
}

/// The stride between the rows of a view's matrices (its feature count where it has a
/// single row).
fn view_row(v: &StridedView) -> usize {
    v.strides[v.strides.len() - 2].max(v.shape[v.shape.len() - 1])
}

/// The permute that is attention `id`'s only reader, and the layout the attention's
/// output takes so that the permute's (contiguous) output is already in its buffer: its
/// rows and matrices at the permute's strides. Only where the permute keeps the feature
/// axis last, neither is a graph output, and nothing reads the permute (through
/// reshapes) that could trace a view through it back to the attention's buffer (a
/// product, an attention, a permute or a slice): those would assume a contiguous
/// attention output.
fn output_permute(
    g: &Graph,
    id: NodeId,
    batch: usize,
    slot_of: &HashMap<NodeId, usize>,
    outputs: &HashSet<NodeId>,
) -> Option<(NodeId, codegen::OperandView)> {
    let live = |n: &NodeId| slot_of.contains_key(n);
    let users: Vec<NodeId> = g.users(id).into_iter().filter(live).collect();
    let [p] = users[..] else { return None };
    let Op::Permute { perm } = &g.node(p).op else {
        return None;
    };
    let r = perm.len();
    if r < 2 || perm[r - 1] != r - 1 || outputs.contains(&id) || outputs.contains(&p) {
        return None;
    }
    // Every reader of the permute, through reshapes, reads its buffer as it is.
    let mut stack = vec![p];
    while let Some(n) = stack.pop() {
        for u in g.users(n).into_iter().filter(live) {
            match g.node(u).op {
                Op::Reshape { .. } => {
                    if outputs.contains(&u) {
                        return None;
                    }
                    stack.push(u)
                }
                Op::MatMul { .. }
                | Op::Attention { .. }
                | Op::AttentionLse { .. }
                | Op::AttentionGrad { .. }
                | Op::Permute { .. }
                | Op::Slice { .. } => return None,
                _ => {}
            }
        }
    }
    let pshape = g.ty(p).shape.resolve(batch);
    let cs = eptc_ir::strides::contiguous_strides(&pshape);
    let mut st = vec![0; r];
    for (j, &a) in perm.iter().enumerate() {
        st[a] = cs[j];
    }
    Some((
        p,
        codegen::OperandView {
            offset: 0,
            lead_strides: st[..r - 2].to_vec(),
            row: st[r - 2],
        },
    ))
}

/// The tensor-core attention kernel of `id` reading q, k, v in place (16-bit `dtype`),
/// and the nodes its views pass through; `None` where the views or the kernel do not
/// apply. With `out` it writes its output there ([`output_permute`]).
fn attention_view_fused(
    g: &Graph,
    id: NodeId,
    batch: usize,
    stop: &HashSet<NodeId>,
    dtype: DType,
    out: Option<&codegen::OperandView>,
) -> Option<(Kernel, Vec<NodeId>)> {
    let (views, mut through) = qkv_views(g, id, batch, stop)?;
    let ov = |v: &StridedView| codegen::OperandView {
        offset: v.offset,
        lead_strides: v.strides[..v.strides.len() - 2].to_vec(),
        row: view_row(v),
    };
    let buffer_numel = views
        .iter()
        .map(|v| g.ty(v.root).shape.numel(batch))
        .max()
        .unwrap_or(0);
    let ovs: Vec<codegen::OperandView> = views.iter().map(ov).collect();
    let k = codegen::attention_mma_views(g, id, batch, dtype, &ovs, buffer_numel, out).ok()??;
    through.sort();
    through.dedup();
    Some((k, through))
}

fn attention_view_gemms(
    g: &Graph,
    id: NodeId,
    batch: usize,
    stop: &HashSet<NodeId>,
) -> Option<(AttentionGemms, Vec<NodeId>)> {
    let base = attention_for(g, id, batch)?;
    let out = g.ty(id).shape.resolve(batch);
    let lead = &out[..out.len() - 2];
    let (n, e) = (out[out.len() - 2], out[out.len() - 1]);
    let (views, mut through) = qkv_views(g, id, batch, stop)?;
    let (q, k, v) = (&views[0], &views[1], &views[2]);
    let (m, d) = (k.shape[k.shape.len() - 2], k.shape[k.shape.len() - 1]);
    let row = view_row;
    let lead_st = |v: &StridedView| v.strides[..v.strides.len() - 2].to_vec();
    let scale = match g.node(id).op {
        Op::Attention { scale, .. } => scale,
        _ => return None,
    };
    // S = scale · Q Kᵀ; O = P V (P contiguous in the scratch).
    let qk = view_gemm(
        false,
        true,
        n,
        m,
        d,
        lead,
        (q.offset, &lead_st(q), row(q)),
        (k.offset, &lead_st(k), row(k)),
        scale,
    )?;
    let sp = dims::lead_contiguous(lead, n * m);
    let pv = view_gemm(
        false,
        false,
        n,
        e,
        m,
        lead,
        (0, &sp, m),
        (v.offset, &lead_st(v), row(v)),
        1.0,
    )?;
    through.sort();
    through.dedup();
    Some((AttentionGemms { qk, pv, ..base }, through))
}

/// `matmul` `id` as one pointer-array batched GEMM reading both operands through strided
/// views, with the view nodes walked; `None` unless each operand's stored rows are
/// contiguous and at least one operand goes through a `permute` or `slice`.
fn matmul_view_gemm(
    g: &Graph,
    id: NodeId,
    batch: usize,
    stop: &HashSet<NodeId>,
) -> Option<(Gemm, Vec<NodeId>)> {
    let Op::MatMul {
        transpose_a: ta,
        transpose_b: tb,
    } = g.node(id).op
    else {
        return None;
    };
    let ops = g.operands(id);
    let out = g.ty(id).shape.resolve(batch);
    if out.len() < 2 || out.iter().product::<usize>() == 0 {
        return None;
    }
    let lead = &out[..out.len() - 2];
    let (m, n) = (out[out.len() - 2], out[out.len() - 1]);
    let mut through = Vec::new();
    let mut parts = Vec::new();
    for &o in &ops {
        let v = strided_view(g, o, batch, stop)?;
        let r = v.shape.len();
        if r < 2 || (v.shape[r - 1] > 1 && v.strides[r - 1] != 1) || r - 2 > lead.len() {
            return None;
        }
        // The operand's leading strides broadcast to the output's leading dims.
        let skip = lead.len() - (r - 2);
        let mut ls = vec![0; lead.len()];
        for (i, l) in ls.iter_mut().enumerate().skip(skip) {
            let j = i - skip;
            *l = if v.shape[j] == 1 { 0 } else { v.strides[j] };
            if v.shape[j] != 1 && v.shape[j] != lead[i] {
                return None;
            }
        }
        let ld = v.strides[r - 2].max(v.shape[r - 1]).max(1);
        through.extend(v.through.iter().copied());
        parts.push((v.offset, ls, ld, v.shape[r - 2], v.shape[r - 1]));
    }
    let copies = through
        .iter()
        .any(|&t| matches!(g.node(t).op, Op::Permute { .. } | Op::Slice { .. }));
    if !copies || m == 0 || n == 0 {
        return None;
    }
    let (a, b) = (&parts[0], &parts[1]);
    let k = if ta { a.3 } else { a.4 };
    if k == 0 || (if tb { b.4 } else { b.3 }) != k {
        return None;
    }
    let gm = view_gemm(
        ta,
        tb,
        m,
        n,
        k,
        lead,
        (a.0, &a.1, a.2),
        (b.0, &b.1, b.2),
        1.0,
    )?;
    through.sort();
    through.dedup();
    Some((gm, through))
}

/// Split the lead dims into one strided batch (the innermost dims that merge for every
/// operand) and a host loop over the rest: (batch count, its strides, per-loop offsets).
fn batching(lead: &[usize], strides: &[&Vec<usize>; 3]) -> (usize, [usize; 3], Vec<[usize; 3]>) {
    if lead.is_empty() {
        return (1, [0; 3], vec![[0; 3]]);
    }
    let r = lead.len();
    let mut first = r - 1;
    let mut count = lead[r - 1];
    while first > 0 {
        let i = first - 1;
        let merges = strides.iter().all(|s| s[i] == s[first] * lead[first]);
        if !merges {
            break;
        }
        count *= lead[i];
        first = i;
    }
    let st = [strides[0][r - 1], strides[1][r - 1], strides[2][r - 1]];
    let outer = &lead[..first];
    let n_outer: usize = outer.iter().product();
    let mut offsets = Vec::with_capacity(n_outer);
    for flat in 0..n_outer {
        let mut rem = flat;
        let mut off = [0usize; 3];
        for d in (0..first).rev() {
            let idx = rem % lead[d];
            rem /= lead[d];
            for (o, s) in off.iter_mut().zip(strides) {
                *o += idx * s[d];
            }
        }
        offsets.push(off);
    }
    (count, st, offsets)
}

impl Executable for CudaExecutable {
    fn set_param(&mut self, name: &str, value: HostTensor) -> Result<()> {
        let (shape, mem) = self
            .params
            .get(name)
            .ok_or_else(|| BackendError::MissingParam(name.into()))?;
        check_param(name, shape, &value)?;
        if let Some(m) = mem {
            if let Device::Gpu(gpu) = &self.dev {
                gpu.bind().map_err(other)?;
                // Replayed graphs read the same buffer: order the copy after earlier work.
                gpu.stream.synchronize().map_err(other)?;
            }
            let bytes = to_storage(value.data(), self.dtype);
            debug_assert_eq!(bytes.len(), m.bytes);
            unsafe { self.dev.htod(m.ptr, &bytes) }
                .map_err(|e| other(format!("uploading param {name}: {e}")))?;
        }
        Ok(())
    }

    fn run(&mut self, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let batch = bind_batch(&self.graph, inputs)?;
        // (Binds the context; plans the batch on its first run.)
        self.prepare(batch)?;
        let i = self
            .plans
            .iter()
            .position(|p| p.batch == batch)
            .ok_or_else(|| other("internal: the batch's plan is gone"))?;
        let p = self.plans.remove(i);
        let r = self.run_plan(&p, inputs);
        self.plans.push(p);
        let (out, secs) = r?;
        self.last_device = secs;
        Ok(out)
    }

    fn device_seconds(&self) -> Option<f64> {
        self.last_device
    }

    fn device_peak_bytes(&self) -> Option<u64> {
        Some(DEVICE_PEAK.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl CudaExecutable {
    fn run_plan(
        &self,
        p: &BatchPlan,
        inputs: &[(&str, HostTensor)],
    ) -> Result<(Outputs, Option<f64>)> {
        let gpu = match &self.dev {
            Device::Gpu(g) => g,
            Device::Emulator => return self.run_emulated(p, inputs).map(|o| (o, None)),
        };
        let (ev0, ev1) = self.events.ok_or_else(|| other("internal: no events"))?;
        let stream = gpu.stream.cu_stream();
        let sync = || {
            gpu.stream
                .synchronize()
                .map_err(|e| other(format!("running the step: {e}")))
        };
        // Inputs, converted to the storage type into the pinned staging (or vectors held
        // until the copies are done), each copied while the next is converted.
        let mut staged = Vec::new();
        for (k, (name, mem)) in p.inputs.iter().enumerate() {
            let Some(mem) = mem else { continue };
            let t = &inputs.iter().find(|(n, _)| n == name).expect("bound").1;
            match &p.staging {
                Some((pin, offs)) => {
                    // SAFETY: this input's region; the stream touches it only after this
                    // write, and the last step's copies were waited for.
                    let dst = unsafe { pin.region(offs[k], mem.bytes) };
                    to_storage_par(t.data(), self.dtype, dst);
                    unsafe { dr::memcpy_htod_async(mem.ptr, &*dst, stream) }
                        .map_err(|e| other(format!("copying input {name}: {e}")))?;
                }
                None => {
                    let mut bytes = vec![0u8; mem.bytes];
                    to_storage_par(t.data(), self.dtype, &mut bytes);
                    unsafe { dr::memcpy_htod_async(mem.ptr, &bytes, stream) }
                        .map_err(|e| other(format!("copying input {name}: {e}")))?;
                    staged.push(bytes);
                }
            }
        }
        let ev = |e: ds::CUevent| {
            unsafe { dr::event::record(e, stream) }.map_err(|e| other(format!("event: {e}")))
        };
        ev(ev0)?;
        if let Some((_, exec)) = p.graph {
            unsafe { dr::graph::launch(exec, stream) }
                .map_err(|e| other(format!("launching the graph: {e}")))?;
        } else if self.profile {
            sync()?;
            // Each step's device time, between two events of its own (not the launch's
            // host overhead, which a replayed graph does not pay).
            let (a, b) = (event()?, event()?);
            let mut prof = Profile::default();
            let mut timed = || -> Result<()> {
                for s in &p.steps {
                    ev(a)?;
                    self.enqueue(p, s)?;
                    ev(b)?;
                    gpu.stream
                        .synchronize()
                        .map_err(|e| other(format!("{} failed: {e}", s.name)))?;
                    let ms = unsafe { dr::event::elapsed(a, b) }
                        .map_err(|e| other(format!("timing {}: {e}", s.name)))?;
                    prof.record(s.kind, f64::from(ms) / 1e3);
                }
                Ok(())
            };
            let r = timed();
            unsafe {
                let _ = dr::event::destroy(a);
                let _ = dr::event::destroy(b);
            }
            r?;
            prof.print(
                "eptc cuda profile (device time per step)",
                "kernels and GEMMs",
                "launches",
            );
        } else {
            for s in &p.steps {
                self.enqueue(p, s)?;
            }
        }
        ev(ev1)?;
        let eb = self.elem_bytes();
        let mut out = Vec::new();
        if let Some((pin, offs)) = &p.staging {
            // Every output copied back on the stream, then one wait.
            for (j, (name, shape, ptr)) in p.outputs.iter().enumerate() {
                let n: usize = shape.iter().product();
                if let (Some(ptr), true) = (ptr, n > 0) {
                    // SAFETY: this output's region, read only after the wait below.
                    let dst = unsafe { pin.region(offs[p.inputs.len() + j], n * eb) };
                    unsafe { dr::memcpy_dtoh_async(dst, *ptr, stream) }
                        .map_err(|e| other(format!("reading output {name}: {e}")))?;
                }
            }
            sync()?;
            for (j, (name, shape, ptr)) in p.outputs.iter().enumerate() {
                let n: usize = shape.iter().product();
                let data = match ptr {
                    Some(_) if n > 0 => {
                        // SAFETY: the copies are done (waited for above).
                        let src = unsafe { pin.region(offs[p.inputs.len() + j], n * eb) };
                        from_storage(src, self.dtype)
                    }
                    _ => vec![0.0; n],
                };
                out.push((name.clone(), HostTensor::new(shape.clone(), data)));
            }
        } else {
            sync()?;
            drop(staged);
            for (name, shape, ptr) in &p.outputs {
                let n: usize = shape.iter().product();
                let data = match ptr {
                    Some(ptr) if n > 0 => {
                        let mut bytes = vec![0u8; n * eb];
                        unsafe { dr::memcpy_dtoh_sync(&mut bytes, *ptr) }
                            .map_err(|e| other(format!("reading output {name}: {e}")))?;
                        from_storage(&bytes, self.dtype)
                    }
                    _ => vec![0.0; n],
                };
                out.push((name.clone(), HostTensor::new(shape.clone(), data)));
            }
        }
        let secs = unsafe { dr::event::elapsed(ev0, ev1) }
            .ok()
            .map(|ms| f64::from(ms) / 1e3);
        Ok((out, secs))
    }
}

impl CudaExecutable {
    /// [`Self::run_plan`] on the emulator: the plan's steps one after another on the host,
    /// every buffer's guard bytes checked after each step.
    fn run_emulated(&self, p: &BatchPlan, inputs: &[(&str, HostTensor)]) -> Result<Outputs> {
        for (name, mem) in &p.inputs {
            let Some(mem) = mem else { continue };
            let t = &inputs.iter().find(|(n, _)| n == name).expect("bound").1;
            let mut bytes = vec![0u8; mem.bytes];
            to_storage_par(t.data(), self.dtype, &mut bytes);
            // SAFETY: the input's buffer holds its bytes.
            unsafe { self.dev.htod(mem.ptr, &bytes) }
                .map_err(|e| other(format!("copying input {name}: {e}")))?;
        }
        let mut prof = Profile::default();
        let pads = |ptr: u64, bytes: usize| {
            let pad = ARENA_PAD as usize;
            // SAFETY: the arena holds `pad` bytes on either side of every value.
            unsafe {
                [
                    std::slice::from_raw_parts_mut((ptr as usize - pad) as *mut u8, pad),
                    std::slice::from_raw_parts_mut((ptr as usize + bytes) as *mut u8, pad),
                ]
            }
        };
        for s in &p.steps {
            if let Some((ptr, bytes)) = s.guard {
                for g in pads(ptr, bytes) {
                    g.fill(0xff);
                }
            }
            let t = Instant::now();
            // SAFETY: every pointer of a step is into the plan's, the params' or the
            // constants' buffers, alive while the executable is; the guards catch a step
            // writing past them.
            let r = match &s.action {
                Action::Launch {
                    func,
                    grid,
                    block,
                    args,
                    ..
                } => match &p.emulated {
                    Some((m, names)) => unsafe { m.launch_raw(&names[*func], args, *grid, *block) },
                    None => Err("internal: no emulated kernels".into()),
                },
                Action::Gemm(g) => unsafe { host_gemm(g, self.dtype) },
                Action::HostLt(l) => unsafe { host_lt(l, self.dtype) },
                Action::Lt(_) => Err("internal: a cuBLASLt step on the emulator".into()),
            };
            r.map_err(|e| other(format!("{} (emulated): {e}", s.name)))?;
            prof.record(s.kind, t.elapsed().as_secs_f64());
            if let Some((ptr, bytes)) = s.guard {
                if pads(ptr, bytes)
                    .iter()
                    .any(|g| g.iter().any(|&b| b != 0xff))
                {
                    return Err(other(format!(
                        "{} (emulated) wrote outside its output's {bytes} bytes",
                        s.name
                    )));
                }
            }
            if let Some(what) = self.broken_guard(p) {
                return Err(other(format!("{} (emulated) wrote outside {what}", s.name)));
            }
        }
        if self.profile {
            prof.print(
                "eptc cuda profile (CPU emulator)",
                "kernels and GEMMs",
                "launches",
            );
        }
        let eb = self.elem_bytes();
        let mut out = Vec::new();
        for (name, shape, ptr) in &p.outputs {
            let n: usize = shape.iter().product();
            let data = match ptr {
                Some(ptr) if n > 0 => {
                    let mut bytes = vec![0u8; n * eb];
                    // SAFETY: the output's buffer holds its bytes.
                    unsafe { self.dev.dtoh(&mut bytes, *ptr) }
                        .map_err(|e| other(format!("reading output {name}: {e}")))?;
                    from_storage(&bytes, self.dtype)
                }
                _ => vec![0.0; n],
            };
            out.push((name.clone(), HostTensor::new(shape.clone(), data)));
        }
        Ok(out)
    }

    /// The first emulated buffer whose guard bytes were overwritten.
    fn broken_guard(&self, p: &BatchPlan) -> Option<String> {
        for (name, m) in &p.inputs {
            if m.as_ref().is_some_and(|m| !m.guards_intact()) {
                return Some(format!("input {name}"));
            }
        }
        for (k, m) in p._slots.iter().enumerate() {
            if !m.guards_intact() {
                return Some(format!("the plan's buffer {k}"));
            }
        }
        for (name, (_, m)) in &self.params {
            if m.as_ref().is_some_and(|m| !m.guards_intact()) {
                return Some(format!("param {name}"));
            }
        }
        for s in &self.slots {
            if let Kind::Const(Some(m)) = &s.kind {
                if !m.guards_intact() {
                    return Some(format!("const %{}", s.id.index()));
                }
            }
        }
        None
    }
}

/// Element `i` of a storage-type array at `p` on the emulator's host memory.
///
/// # Safety
/// `p` addresses at least `i + 1` elements.
unsafe fn host_ld(p: u64, i: usize, dtype: DType) -> f64 {
    let at = p as usize + i * dtype.size_bytes();
    match dtype {
        DType::F32 => f64::from(std::ptr::read_unaligned(at as *const f32)),
        DType::BF16 => {
            f64::from(half::bf16::from_bits(std::ptr::read_unaligned(at as *const u16)).to_f32())
        }
        DType::F16 => {
            f64::from(half::f16::from_bits(std::ptr::read_unaligned(at as *const u16)).to_f32())
        }
    }
}

/// Store `v` (rounded through f32, as cuBLAS's f32 result is) at element `i`.
///
/// # Safety
/// `p` addresses at least `i + 1` elements.
unsafe fn host_st(p: u64, i: usize, v: f64, dtype: DType) {
    let at = p as usize + i * dtype.size_bytes();
    let v = v as f32;
    match dtype {
        DType::F32 => std::ptr::write_unaligned(at as *mut f32, v),
        DType::BF16 => std::ptr::write_unaligned(at as *mut u16, half::bf16::from_f32(v).to_bits()),
        DType::F16 => std::ptr::write_unaligned(at as *mut u16, half::f16::from_f32(v).to_bits()),
    }
}

/// Element `(row, col)` of `op(X)` for a column-major X with leading dimension `ld`.
///
/// # Safety
/// As [`host_ld`].
unsafe fn host_op(p: u64, trans: bool, row: usize, col: usize, ld: usize, dtype: DType) -> f64 {
    if trans {
        host_ld(p, col + row * ld, dtype)
    } else {
        host_ld(p, row + col * ld, dtype)
    }
}

/// cuBLAS's strided-batched (or, with pointer arrays, batched) GEMM as its documentation
/// defines it, on the emulator's host memory: column-major `C = alpha · op(A) op(B)`,
/// f64 accumulation, rounded to the storage type. The pointer arrays are read back from
/// the buffer the plan uploaded them to.
///
/// # Safety
/// The GEMM's pointers (and those of its arrays) address the matrices it describes.
unsafe fn host_gemm(g: &Gemm, dtype: DType) -> std::result::Result<(), String> {
    let eb = dtype.size_bytes() as i64;
    let mut mats: Vec<(u64, u64, u64)> = Vec::new();
    if let Some((pa, pb, pc)) = g.ptrs {
        let at =
            |arr: u64, i: usize| std::ptr::read_unaligned((arr as usize + 8 * i) as *const u64);
        for i in 0..g.offsets.len() {
            mats.push((at(pa, i), at(pb, i), at(pc, i)));
        }
    } else {
        for &(oa, ob, oc) in &g.offsets {
            for i in 0..i64::from(g.batch) {
                let off = |base: u64, o: usize, stride: i64| {
                    (base as i64 + (o as i64 + i * stride) * eb) as u64
                };
                mats.push((
                    off(g.a, oa, g.stride_a),
                    off(g.b, ob, g.stride_b),
                    off(g.c, oc, g.stride_c),
                ));
            }
        }
    }
    let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
    let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
    for (a, b, c) in mats {
        if a == 0 || b == 0 || c == 0 {
            return Err("a null operand".into());
        }
        let d = host_product(
            (a, g.transa, lda),
            (b, g.transb, ldb),
            (m, n, k),
            f64::from(g.alpha),
            dtype,
        );
        for col in 0..n {
            for row in 0..m {
                host_st(c, row + col * ldc, d[row + col * m], dtype);
            }
        }
    }
    Ok(())
}

/// `alpha · op(A) op(B)` (column-major operands `(pointer, transposed, leading dim)`) in
/// f64, as a dense column-major `m × n` matrix.
///
/// # Safety
/// As [`host_ld`], for every element the product reads.
unsafe fn host_product(
    (a, ta, lda): (u64, bool, usize),
    (b, tb, ldb): (u64, bool, usize),
    (m, n, k): (usize, usize, usize),
    alpha: f64,
    dtype: DType,
) -> Vec<f64> {
    let mut pa = vec![0.0f64; m * k];
    for p in 0..k {
        for row in 0..m {
            pa[row + p * m] = host_op(a, ta, row, p, lda, dtype);
        }
    }
    let mut pb = vec![0.0f64; k * n];
    for col in 0..n {
        for p in 0..k {
            pb[p + col * k] = host_op(b, tb, p, col, ldb, dtype);
        }
    }
    let mut d = vec![0.0f64; m * n];
    if m * n > 0 {
        // dst = beta · lhs · rhs, column-major (column stride = rows, row stride 1).
        gemm::gemm(
            m,
            n,
            k,
            d.as_mut_ptr(),
            m as isize,
            1,
            false,
            pa.as_ptr(),
            m as isize,
            1,
            pb.as_ptr(),
            k as isize,
            1,
            0.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    d
}

/// cuBLASLt's matmul with the `BIAS` epilogue as its documentation defines it, on the
/// emulator's host memory: `D = op(A) op(B) + bias (one value per row of D) + C` (C only
/// with a residual: `beta = 1`).
///
/// # Safety
/// The pointers address the matrices and the bias the spec describes.
unsafe fn host_lt(l: &HostLt, dtype: DType) -> std::result::Result<(), String> {
    let s = &l.spec;
    let (m, n, k) = (s.m as usize, s.n as usize, s.k as usize);
    let (lda, ldb, ldc) = (s.lda as usize, s.ldb as usize, s.ldc as usize);
    if l.a == 0 || l.b == 0 || l.d == 0 || (s.bias && l.bias == 0) || (s.residual && l.c == 0) {
        return Err("a null operand".into());
    }
    let d = host_product(
        (l.a, s.transa, lda),
        (l.b, s.transb, ldb),
        (m, n, k),
        1.0,
        dtype,
    );
    for col in 0..n {
        for row in 0..m {
            let mut acc = d[row + col * m];
            if s.bias {
                acc += host_ld(l.bias, row, dtype);
            }
            if s.residual {
                acc += host_ld(l.c, row + col * ldc, dtype);
            }
            host_st(l.d, row + col * ldc, acc, dtype);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use eptc_ir::reference::{eval_nodes, eval_op, Tensor64};
    use eptc_ir::{BinaryOp, TensorType, UnaryOp};

    /// The slots `CudaExecutable::new` builds, without a device (no uploads).
    fn slots_of(g: &Graph) -> (Vec<Slot>, Vec<usize>, HashSet<NodeId>, Vec<NodeId>) {
        let order = g.topo_order().unwrap();
        let mut live = HashSet::new();
        let mut stack: Vec<NodeId> = g.outputs().iter().map(|o| o.1).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(g.operands(n));
            }
        }
        let mut pos = HashMap::new();
        let mut slots = Vec::new();
        for &id in &order {
            if !live.contains(&id) {
                continue;
            }
            let node = g.node(id);
            let ops: Vec<usize> = g.operands(id).iter().map(|o| pos[o]).collect();
            let kind = match &node.op {
                Op::Input { name } => Kind::Input(name.clone()),
                Op::Param { name, .. } => Kind::Param(name.clone()),
                Op::Const { .. } => Kind::Const(None),
                Op::Reshape { .. } => Kind::View(ops[0]),
                _ => Kind::Compute(ops),
            };
            pos.insert(id, slots.len());
            slots.push(Slot {
                id,
                op: node.op.kind(),
                shape: node.ty.shape.clone(),
                kind,
            });
        }
        let outs = g.outputs().iter().map(|o| pos[&o.1]).collect();
        (slots, outs, live, order)
    }

    /// Run the plan's steps in order on the CPU with the planner's buffer assignment:
    /// every value lives in its planned buffer (shared buffers really are shared), a
    /// fused root computes its chain from the leaves' buffers, and chain interiors run
    /// nothing. Returns the outputs, to compare with the reference of the whole graph.
    fn simulate(
        g: &Graph,
        fused: bool,
        values: &HashMap<String, Tensor64>,
        batch: usize,
    ) -> Vec<Vec<f64>> {
        let (slots, outs, live, order) = slots_of(g);
        let fusion = if fused {
            codegen::fuse::elementwise_groups(g, &order, &live)
        } else {
            Vec::new()
        };
        assert!(!fused || !fusion.is_empty(), "the graph has chains to fuse");
        let lay = layout(&slots, &fusion, &HashSet::new(), batch, 4, &[]);
        let bp = plan::plan(&lay.roles, &outs, u64::MAX);
        let mut buffers: Vec<Vec<f64>> = bp.slots.iter().map(|_| Vec::new()).collect();
        let mut leaf: HashMap<usize, Vec<f64>> = HashMap::new();
        let read =
            |buffers: &Vec<Vec<f64>>, leaf: &HashMap<usize, Vec<f64>>, i: usize| -> Tensor64 {
                let shape = slots[i].shape.resolve(batch);
                let n: usize = shape.iter().product();
                let data = match bp.loc[i] {
                    Loc::Slot(k) => buffers[k][..n].to_vec(),
                    Loc::Leaf(l) => leaf[&l].clone(),
                    Loc::Empty => vec![0.0; n],
                };
                Tensor64 { shape, data }
            };
        for (i, s) in slots.iter().enumerate() {
            let node = g.node(s.id);
            let want = s.shape.resolve(batch);
            let value = match &s.kind {
                Kind::Input(_) | Kind::Param(_) | Kind::Const(_) => {
                    let t = eval_op(&node.op, &[], &want, values).unwrap();
                    leaf.insert(i, t.data);
                    continue;
                }
                Kind::View(_) => continue,
                Kind::Compute(_) if lay.interior.contains(&i) => continue,
                Kind::Compute(ops) => match lay.fused_root.get(&i) {
                    Some(&k) => {
                        let gr = &fusion[k];
                        let mut env: HashMap<NodeId, Tensor64> = HashMap::new();
                        for l in &gr.leaves {
                            env.insert(
                                *l,
                                read(
                                    &buffers,
                                    &leaf,
                                    slots.iter().position(|s| s.id == *l).unwrap(),
                                ),
                            );
                        }
                        for &n in &gr.nodes {
                            let args: Vec<Tensor64> =
                                g.operands(n).iter().map(|o| env[o].clone()).collect();
                            let refs: Vec<&Tensor64> = args.iter().collect();
                            let t = eval_op(&g.node(n).op, &refs, &want, values).unwrap();
                            env.insert(n, t);
                        }
                        env.remove(&gr.root()).unwrap()
                    }
                    None => {
                        let args: Vec<Tensor64> =
                            ops.iter().map(|&o| read(&buffers, &leaf, o)).collect();
                        let refs: Vec<&Tensor64> = args.iter().collect();
                        eval_op(&node.op, &refs, &want, values).unwrap()
                    }
                },
            };
            if let Loc::Slot(k) = bp.loc[i] {
                let b = &mut buffers[k];
                b.resize(b.len().max(value.data.len()), f64::NAN);
                b[..value.data.len()].copy_from_slice(&value.data);
            }
        }
        outs.iter()
            .map(|&o| read(&buffers, &leaf, o).data)
            .collect()
    }

    /// A chain whose nodes are far apart in the schedule: `exp(softmax(x)) * softmax(z)`.
    /// Unless the planner keeps `softmax(x)` alive until the fused root, `softmax(z)`
    /// takes its buffer and the root reads the wrong values.
    fn spread_chain() -> Graph {
        let mut g = Graph::new("spread");
        let x = g.input("x", TensorType::f32(Shape::batched(&[6, 16])));
        let z = g.input("z", TensorType::f32(Shape::batched(&[6, 16])));
        let sx = g.softmax(x, 2).unwrap();
        let a = g.unary(UnaryOp::Exp, sx).unwrap();
        let sz = g.softmax(z, 2).unwrap();
        let sz2 = g.unary(UnaryOp::Neg, sz).unwrap();
        let sz3 = g.softmax(sz2, 2).unwrap();
        let b = g.binary(BinaryOp::Mul, a, sz3).unwrap();
        let c = g.binary(BinaryOp::Sub, b, x).unwrap();
        g.set_output("y", c);
        g
    }

    fn values_for(g: &Graph, batch: usize) -> HashMap<String, Tensor64> {
        let mut out = HashMap::new();
        for id in g.node_ids() {
            let (Op::Input { name } | Op::Param { name, .. }) = &g.node(id).op else {
                continue;
            };
            let shape = g.ty(id).shape.resolve(batch);
            let n: usize = shape.iter().product();
            let data = values(n, id.index() as u64 + 7);
            out.insert(name.clone(), Tensor64 { shape, data });
        }
        out
    }

    /// `x = tanh(input "x" [b, n, 3 h dh])` split as ViT splits its fused qkv projection:
    /// reshape `[b, n, 3, h, dh]`, permute `[3, b, h, n, dh]`, slice, reshape `[b, h, n,
    /// dh]`; the first `count` of q, k, v.
    fn split_qkv(
        g: &mut Graph,
        b: usize,
        n: usize,
        h: usize,
        dh: usize,
        count: usize,
    ) -> (NodeId, Vec<NodeId>) {
        use eptc_ir::TensorType;
        let xin = g.input("x", TensorType::f32(Shape::fixed(&[b, n, 3 * h * dh])));
        let x = g.unary(UnaryOp::Tanh, xin).unwrap();
        let r = g.reshape(x, Shape::fixed(&[b, n, 3, h, dh])).unwrap();
        let p = g.permute(r, &[2, 0, 3, 1, 4]).unwrap();
        let parts = (0..count)
            .map(|i| {
                let sl = g.slice(p, 0, i, i + 1).unwrap();
                g.reshape(sl, Shape::fixed(&[b, h, n, dh])).unwrap()
            })
            .collect();
        (x, parts)
    }

    /// ViT's attention on a fused qkv projection: `x [b, n, 3d]` → reshape `[b, n, 3, h,
    /// dh]` → permute `[3, b, h, n, dh]` → slice q, k, v → reshape → attention with a sink
    /// `z` that needs a buffer of x's size (`y = exp(w)`) while x must still live.
    fn qkv_graph(b: usize, n: usize, h: usize, dh: usize) -> (Graph, NodeId, NodeId, NodeId) {
        use eptc_ir::TensorType;
        let dm = h * dh;
        let mut g = Graph::new("qkv");
        let (x, qkv) = split_qkv(&mut g, b, n, h, dh, 3);
        let w = g.input("w", TensorType::f32(Shape::fixed(&[b, n, 3 * dm])));
        let y = g.unary(UnaryOp::Exp, w).unwrap();
        let l = g
            .reduce(eptc_ir::ReduceOp::LogSumExp, y, &[2], true)
            .unwrap();
        let z = g.reshape(l, Shape::fixed(&[b, 1, n, 1])).unwrap();
        let a = g.attention(qkv[0], qkv[1], qkv[2], Some(z), 0.35).unwrap();
        g.set_output("y", a);
        (g, x, y, a)
    }

    /// The tensor-core attention writes its output in the layout of the permute that
    /// alone reads it (ViT's `[b, h, n, dh] -> [b, n, h, dh]` before the projection),
    /// which becomes a view: not where a product reads the permute, whose operand views
    /// would trace back to the attention's buffer as if it were contiguous.
    #[test]
    fn attention_writes_for_its_output_permute() {
        let (b, n, h, dh) = (2, 5, 3, 16);
        for product in [false, true] {
            let mut g = Graph::new("out");
            let (_, qkv) = split_qkv(&mut g, b, n, h, dh, 3);
            let a = g.attention(qkv[0], qkv[1], qkv[2], None, 0.25).unwrap();
            let p = g.permute(a, &[0, 2, 1, 3]).unwrap();
            let r = g.reshape(p, Shape::fixed(&[b, n, h * dh])).unwrap();
            let y = if product {
                g.matmul(r, r, false, true).unwrap()
            } else {
                g.unary(UnaryOp::Exp, r).unwrap()
            };
            g.set_output("y", y);
            let (slots, _, _, _) = slots_of(&g);
            let slot_of: HashMap<NodeId, usize> =
                slots.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
            let outputs: HashSet<NodeId> = [y].into();
            let got = output_permute(&g, a, 1, &slot_of, &outputs);
            let (_, virt) = attention_views(&g, &slots, 1, Some(DType::BF16));
            if product {
                assert_eq!(got, None);
                assert!(!virt.contains(&slot_of[&p]));
                continue;
            }
            let (pp, view) = got.expect("the permute");
            assert_eq!(pp, p);
            // Element (bi, hi, i, c) of the attention at ((bi n + i) h + hi) dh + c.
            assert_eq!(view.lead_strides, vec![n * h * dh, dh]);
            assert_eq!(view.row, h * dh);
            assert_eq!(view.offset, 0);
            assert!(virt.contains(&slot_of[&p]), "{virt:?}");
            // Nor when the attention is an output.
            let outputs: HashSet<NodeId> = [y, a].into();
            assert_eq!(output_permute(&g, a, 1, &slot_of, &outputs), None);
        }
    }

    /// With 16-bit storage, row statistics only kernels read stay in f32; one that
    /// attention reads as its sink (a tensor-core or GEMM-path operand) does not.
    #[test]
    fn row_statistics_read_by_kernels_are_kept_in_f32() {
        let (g, _, y, _) = qkv_graph(2, 5, 3, 4);
        let (slots, outs, _, _) = slots_of(&g);
        assert!(matches!(g.node(g.users(y)[0]).op, Op::Reduce { .. }));
        let f = f32_slots(&g, &slots, &outs, DType::BF16);
        assert!(
            f.iter().all(|&w| !w),
            "the sink's logsumexp feeds attention"
        );

        let flash = flash_vit_b16();
        let (slots, outs, _, _) = slots_of(&flash);
        assert!(f32_slots(&flash, &slots, &outs, DType::F32)
            .iter()
            .all(|&w| !w));
        let f = f32_slots(&flash, &slots, &outs, DType::BF16);
        let count = |kind: &str| {
            (0..slots.len())
                .filter(|&i| f[i] && slots[i].op == kind)
                .count()
        };
        let lse = slots.iter().filter(|s| s.op == "attention_lse").count();
        assert_eq!(lse, 12);
        assert_eq!(count("attention_lse"), 12);
        // delta = rowsum(dO * O) of each layer among the reductions.
        assert!(count("reduce_sum") >= 12, "{}", count("reduce_sum"));
        // Every reader of an f32 slot reads it through `ld` in a kernel.
        for (i, s) in slots.iter().enumerate() {
            if let Kind::Compute(ops) = &s.kind {
                for (p, &o) in ops.iter().enumerate() {
                    if f[o] {
                        let op = &flash.node(s.id).op;
                        assert!(
                            matches!(
                                op,
                                Op::Binary(_)
                                    | Op::Unary(_)
                                    | Op::Reduce { .. }
                                    | Op::Broadcast { .. }
                            ) || (matches!(op, Op::AttentionGrad { .. }) && (p == 3 || p == 4)),
                            "slot {i} ({}) reads an f32 value as operand {p}",
                            s.op
                        );
                    }
                }
            }
        }
        // Graph outputs keep the storage type.
        assert!(outs.iter().all(|&o| !f[o]));
    }

    #[test]
    fn attention_reads_q_k_v_through_views() {
        let (b, n, h, dh) = (2, 5, 3, 4);
        let (g, x, y, a) = qkv_graph(b, n, h, dh);
        let (slots, outs, _, _) = slots_of(&g);
        let (gemms, virt) = attention_views(&g, &slots, 1, None);
        let slot = |id: NodeId| slots.iter().position(|s| s.id == id).unwrap();
        assert_eq!(gemms.len(), 1);
        let ViewGemms::Attention(at) = &gemms[&slot(a)] else {
            panic!("an attention")
        };
        // The permute and the three slices become views: no kernel, no buffer.
        let kinds: Vec<&str> = virt.iter().map(|&i| slots[i].op).collect();
        assert_eq!(virt.len(), 4, "{kinds:?}");
        assert!(kinds.iter().all(|k| *k == "permute" || *k == "slice"));
        // The planner keeps x alive until the attention: exp(w), of x's size and made in
        // between, gets another buffer; the views read x's.
        let lay = layout(&slots, &[], &virt, 1, 4, &[]);
        let bp = plan::plan(&lay.roles, &outs, u64::MAX);
        assert_ne!(bp.loc[slot(y)], bp.loc[slot(x)]);
        for &v in &virt {
            assert_eq!(bp.loc[v], bp.loc[slot(x)]);
        }
        // The GEMMs on the host (cuBLAS's column-major semantics, one entry per head and
        // image) give the reference's attention from x's buffer.
        let dm = h * dh;
        let xin = values(b * n * 3 * dm, 11);
        let w = values(b * n * 3 * dm, 12);
        let want = reference(
            &g,
            &[
                ("x", vec![b, n, 3 * dm], xin.clone()),
                ("w", vec![b, n, 3 * dm], w.clone()),
            ],
        );
        let xv: Vec<f64> = xin.iter().map(|v| v.tanh()).collect();
        let zv: Vec<f64> = (0..b * n)
            .map(|r| {
                let row = &w[r * 3 * dm..(r + 1) * 3 * dm];
                let e: Vec<f64> = row.iter().map(|v| v.exp()).collect();
                let mx = e.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                mx + e.iter().map(|v| (v - mx).exp()).sum::<f64>().ln()
            })
            .collect();
        assert!(at.qk.pointer_arrays && at.pv.pointer_arrays);
        assert_eq!(at.qk.offsets.len(), b * h);
        let mut sc = vec![f64::NAN; at.s_elems];
        emulate(&at.qk, &xv, &xv, &mut sc);
        let mut p = vec![0.0; sc.len()];
        for r in 0..b * h * n {
            let row = &sc[r * n..(r + 1) * n];
            let z = zv[(r / (h * n)) * n + r % n];
            let mx = row.iter().cloned().fold(z, f64::max);
            let den: f64 = row.iter().map(|x| (x - mx).exp()).sum::<f64>() + (z - mx).exp();
            for j in 0..n {
                p[r * n + j] = (row[j] - mx).exp() / den;
            }
        }
        if let Some(pk) = emulated_softmax(&at.softmax, &sc, Some(&zv)) {
            for (i, (a, b)) in pk.iter().zip(&p).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1e-3 + b.abs()),
                    "p[{i}]: {a} vs {b}"
                );
            }
        }
        let mut o = vec![f64::NAN; b * h * n * dh];
        emulate(&at.pv, &xv, &p, &mut o);
        close(&o, &want);
    }

    /// Matmuls read through views too: `q kᵀ`, `dS k` and `dSᵀ q` with q, k sliced from
    /// one projection (the training graph's recomputed scores and gradients), against
    /// the reference.
    #[test]
    fn matmuls_read_through_views() {
        use eptc_ir::TensorType;
        let (b, n, h, dh) = (2, 5, 3, 4);
        let dm = h * dh;
        let mut g = Graph::new("mm");
        let (_, qk) = split_qkv(&mut g, b, n, h, dh, 2);
        let ds = g.input("ds", TensorType::f32(Shape::fixed(&[b, h, n, n])));
        let s = g.matmul(qk[0], qk[1], false, true).unwrap();
        let dq = g.matmul(ds, qk[1], false, false).unwrap();
        let dk = g.matmul(ds, qk[0], true, false).unwrap();
        // A weight without the leading dims (broadcast over images and heads).
        let wm = g.input("w", TensorType::f32(Shape::fixed(&[dh, 7])));
        let qw = g.matmul(qk[0], wm, false, false).unwrap();
        for (name, y) in [("s", s), ("dq", dq), ("dk", dk), ("qw", qw)] {
            g.set_output(name, y);
        }
        let (slots, ..) = slots_of(&g);
        let (gemms, virt) = attention_views(&g, &slots, 1, None);
        assert_eq!(gemms.len(), 4);
        assert_eq!(virt.len(), 3, "the permute and two slices");
        let xin_v = values(b * n * 3 * dm, 21);
        let dsv = values(b * h * n * n, 22);
        let xv: Vec<f64> = xin_v.iter().map(|v| v.tanh()).collect();
        let wv = values(dh * 7, 23);
        let inputs = [
            ("x", vec![b, n, 3 * dm], xin_v.clone()),
            ("ds", vec![b, h, n, n], dsv.clone()),
            ("w", vec![dh, 7], wv.clone()),
        ];
        let env = {
            let mut vals = HashMap::new();
            for (name, shape, data) in &inputs {
                vals.insert(
                    name.to_string(),
                    Tensor64 {
                        shape: shape.clone(),
                        data: data.clone(),
                    },
                );
            }
            eval_nodes(&g, &vals).unwrap()
        };
        for (y, a_buf, b_buf) in [
            (s, &xv, &xv),
            (dq, &dsv, &xv),
            (dk, &dsv, &xv),
            (qw, &xv, &wv),
        ] {
            let i = slots.iter().position(|s| s.id == y).unwrap();
            let ViewGemms::MatMul(gm) = &gemms[&i] else {
                panic!("a matmul")
            };
            let want = &env[&y].data;
            let mut c = vec![f64::NAN; want.len()];
            // cuBLAS's A is our B.
            emulate(gm, b_buf, a_buf, &mut c);
            close(&c, want);
        }
    }

    #[test]
    fn views_stay_off_where_a_copy_is_read_elsewhere() {
        // The training graph: the forward's permute and slices feed attentions and the
        // backward's matmuls, all GEMMs: views; the backward's dO permute feeds an
        // element-wise product too: a copy.
        for f in ["tiny_train", "vit_b16_train"] {
            let g = test_graph(&format!("{f}.eptc"));
            let (slots, ..) = slots_of(&g);
            let (gemms, virt) = attention_views(&g, &slots, 2, None);
            let attentions = slots.iter().filter(|s| s.op == "attention").count();
            let count = |k: &str| virt.iter().filter(|&&i| slots[i].op == k).count();
            eprintln!(
                "{f}: {} nodes read through views, {} permutes and {} slices become views, {attentions} attentions",
                gemms.len(),
                count("permute"),
                count("slice")
            );
            // At least each layer's q, k, v slices and their permute (ViT-B/16 also
            // slices the class token for the head's matmul).
            assert!(count("slice") >= 3 * attentions, "{f}");
            assert!(count("permute") >= attentions, "{f}");
            // A view is read only by views and GEMMs (the dO permute, which an
            // element-wise product reads too, stays a copy).
            for &i in &virt {
                for u in g.users(slots[i].id) {
                    let op = &g.node(u).op;
                    assert!(
                        matches!(
                            op,
                            Op::Reshape { .. }
                                | Op::Permute { .. }
                                | Op::Slice { .. }
                                | Op::Attention { .. }
                                | Op::MatMul { .. }
                        ),
                        "{f}: %{} read by {}",
                        slots[i].id.index(),
                        op.kind()
                    );
                }
            }
        }
        // The forward graphs' attentions all qualify (ViT-B/16: 12).
        for (f, want) in [("tiny_optimized", 0), ("vit_b16_optimized", 12)] {
            let g = test_graph(&format!("{f}.eptc"));
            let (slots, ..) = slots_of(&g);
            let (gemms, virt) = attention_views(&g, &slots, 2, None);
            let attentions = slots.iter().filter(|s| s.op == "attention").count();
            assert!(attentions > 0 && (want == 0 || attentions == want), "{f}");
            assert_eq!(gemms.len(), attentions, "{f}");
            assert_eq!(virt.len(), 4 * attentions, "{f}");
            // The fused tensor-core attention (16-bit storage) reads them in place too.
            let (fused, fvirt) = attention_views(&g, &slots, 2, Some(DType::BF16));
            let n = fused
                .values()
                .filter(|v| matches!(v, ViewGemms::Fused(_)))
                .count();
            assert_eq!(n, attentions, "{f}");
            // And each writes its output in the layout of the permute after it, which
            // becomes a view too.
            assert!(fvirt.is_superset(&virt), "{f}");
            let extra: Vec<&str> = fvirt.difference(&virt).map(|&i| slots[i].op).collect();
            assert_eq!(extra, vec!["permute"; attentions], "{f}");
            for i in fvirt.difference(&virt) {
                let Kind::Compute(ops) = &slots[*i].kind else {
                    panic!("{f}: a permute computes")
                };
                assert_eq!(slots[ops[0]].op, "attention", "{f}");
            }
        }
        // ViT-B/16's training graph with the flash-style backward: every attention,
        // attention_lse and attention_grad reads q, k, v in place (16-bit storage).
        let t = flash_vit_b16();
        let (slots, ..) = slots_of(&t);
        let (fused, virt) = attention_views(&t, &slots, 2, Some(DType::BF16));
        let count = |k: &str| slots.iter().filter(|s| s.op == k).count();
        let ops = count("attention") + count("attention_lse") + count("attention_grad");
        // (Per layer an attention, an lse and up to three gradients: 57 in all.)
        assert!(ops > 12 * 4, "{ops}");
        let n = fused
            .values()
            .filter(|v| matches!(v, ViewGemms::Fused(_)))
            .count();
        assert_eq!(n, ops);
        let vcount = |k: &str| virt.iter().filter(|&&i| slots[i].op == k).count();
        // Per layer the permute and three slices, and the class token's slice (read by
        // the head's matmul).
        assert_eq!((vcount("permute"), vcount("slice")), (12, 37));
    }

    /// ViT-B/16's training graph with the flash-style attention backward.
    /// A graph of the wgpu crate's test data (`file` under `tests/data`).
    fn test_graph(file: &str) -> Graph {
        let dir = env!("CARGO_MANIFEST_DIR");
        let text = std::fs::read_to_string(format!("{dir}/../wgpu/tests/data/{file}")).unwrap();
        eptc_ir::text::parse(&text).unwrap()
    }

    fn flash_vit_b16() -> Graph {
        let mut g = test_graph("vit_b16_optimized.eptc");
        eptc_autodiff::loss::add_loss(&mut g, "logits", eptc_autodiff::loss::Loss::CrossEntropy)
            .unwrap();
        g.remove_output("features");
        let opts = eptc_autodiff::Options {
            fused_attention: true,
            ..Default::default()
        };
        eptc_autodiff::differentiate_with(&g, eptc_autodiff::loss::LOSS, &opts).unwrap()
    }

    /// Where the ViT-B/16 training step's device memory goes at batch 64 in bf16: the
    /// planner's total against the live peak (the floor for this order), and the largest
    /// values alive at the peak by op kind. By hand (`--ignored --nocapture`).
    #[test]
    #[ignore]
    fn vit_b16_training_memory_breakdown() {
        let default = test_graph("vit_b16_train.eptc");
        let flash = flash_vit_b16();
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        for (g, fused) in [(&default, false), (&default, true), (&flash, true)] {
            let (slots, outs, live, order) = slots_of(g);
            eprintln!(
                "{} graph:",
                if std::ptr::eq(g, &flash) {
                    "flash-style"
                } else {
                    "default"
                }
            );
            let fusion = if fused {
                codegen::fuse::elementwise_groups(g, &order, &live)
            } else {
                Vec::new()
            };
            let f32 = f32_slots(g, &slots, &outs, DType::BF16);
            let lay = layout(&slots, &fusion, &HashSet::new(), 64, 2, &f32);
            let bp = plan::plan(&lay.roles, &outs, u64::MAX);
            let (peak, at) = plan::live_peak(&lay.roles, &outs);
            eprintln!(
                "fused chains {fused}: planned {:.0} MiB in {} buffers; live peak {:.0} MiB at slot {at} of {} ({} %{})",
                mib(bp.slots.iter().sum()),
                bp.slots.len(),
                mib(peak),
                slots.len(),
                slots[at].op,
                slots[at].id.index()
            );
            // Alive at the peak: computed at or before it, last read at or after it.
            let (root, last) = plan::lifetimes(&lay.roles, &outs);
            let mut by_kind: HashMap<String, (u64, usize)> = HashMap::new();
            for (i, (role, bytes)) in lay.roles.iter().enumerate() {
                if matches!(role, Role::Compute(_)) && root[i] == i && i <= at && last[i] >= at {
                    // The value's op and shape, and the ops reading it last.
                    let readers: Vec<&str> = g
                        .users(slots[i].id)
                        .iter()
                        .map(|&u| g.node(u).op.kind())
                        .collect();
                    let key = format!(
                        "{} {:?} -> {:?}",
                        slots[i].op,
                        slots[i].shape.resolve(64),
                        readers
                    );
                    let e = by_kind.entry(key).or_default();
                    e.0 += bytes;
                    e.1 += 1;
                }
            }
            let mut v: Vec<_> = by_kind.into_iter().collect();
            v.sort_by_key(|x| std::cmp::Reverse(x.1 .0));
            for (k, (b, n)) in v.iter().take(14) {
                eprintln!("  {:8.1} MiB in {n:2} values: {k}", mib(*b));
            }
        }
    }

    #[test]
    fn fused_plans_compute_what_the_graph_does() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let mut graphs = vec![spread_chain()];
        for f in [
            "../wgpu/tests/data/tiny_train.eptc",
            "../../ir-specs/examples/mlp.eptc",
        ] {
            let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
            graphs.push(eptc_ir::text::parse(&text).unwrap());
        }
        for g in &graphs {
            let batch = 3;
            let vals = values_for(g, batch);
            let env = eval_nodes(g, &vals).unwrap();
            for fused in [false, true] {
                let got = simulate(g, fused, &vals, batch);
                for ((name, id), got) in g.outputs().iter().zip(&got) {
                    close(got, &env[id].data);
                    let _ = name;
                }
            }
        }
    }

    #[test]
    fn batching_merges_contiguous_lead_dims() {
        // [2, 3] lead, A contiguous, B broadcast over both, C contiguous.
        let lead = [2, 3];
        let sa = vec![3 * 10, 10];
        let sb = vec![0, 0];
        let sc = vec![3 * 4, 4];
        let (n, st, offs) = batching(&lead, &[&sa, &sb, &sc]);
        assert_eq!(n, 6);
        assert_eq!(st, [10, 0, 4]);
        assert_eq!(offs, vec![[0, 0, 0]]);
    }

    #[test]
    fn batching_loops_over_dims_that_do_not_merge() {
        // B broadcast over the outer dim only: [0, 7].
        let lead = [2, 3];
        let sa = vec![30, 10];
        let sb = vec![0, 7];
        let sc = vec![12, 4];
        let (n, st, offs) = batching(&lead, &[&sa, &sb, &sc]);
        assert_eq!(n, 3);
        assert_eq!(st, [10, 7, 4]);
        assert_eq!(offs, vec![[0, 0, 0], [30, 0, 12]]);
    }

    /// cuBLAS's strided-batched GEMM on the host (column-major, f64 accumulation).
    fn emulate(g: &Gemm, a: &[f64], b: &[f64], c: &mut [f64]) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        for &(oa, ob, oc) in &g.offsets {
            for i in 0..g.batch as usize {
                let a0 = oa + i * g.stride_a as usize;
                let b0 = ob + i * g.stride_b as usize;
                let c0 = oc + i * g.stride_c as usize;
                for r in 0..m {
                    for q in 0..n {
                        let mut acc = 0.0;
                        for p in 0..k {
                            let av = if g.transa {
                                a[a0 + p + r * lda]
                            } else {
                                a[a0 + r + p * lda]
                            };
                            let bv = if g.transb {
                                b[b0 + q + p * ldb]
                            } else {
                                b[b0 + p + q * ldb]
                            };
                            acc += av * bv;
                        }
                        c[c0 + r + q * ldc] = f64::from(g.alpha) * acc;
                    }
                }
            }
        }
    }

    /// The attention GEMM path's softmax kernel on the CPU emulator (f32): the scores and
    /// the sink logits in, the probabilities out; `None` without a host C++ compiler
    /// (unless `EPTC_REQUIRE_EMULATOR` is set).
    fn emulated_softmax(k: &Kernel, s: &[f64], z: Option<&[f64]>) -> Option<Vec<f64>> {
        if let Err(e) = crate::emulate::available() {
            assert!(
                std::env::var_os("EPTC_REQUIRE_EMULATOR").is_none(),
                "EPTC_REQUIRE_EMULATOR is set, but: {e}"
            );
            return None;
        }
        let m = crate::emulate::Module::compile(&[k], DType::F32).unwrap();
        let bytes =
            |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect() };
        let mut ins = vec![bytes(s)];
        ins.extend(z.map(bytes));
        let refs: Vec<&[u8]> = ins.iter().map(|v| v.as_slice()).collect();
        let out = m.run(k, &refs, 4 * s.len()).unwrap();
        Some(
            from_storage(&out, DType::F32)
                .into_iter()
                .map(f64::from)
                .collect(),
        )
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        // A small deterministic generator (no rand dependency in the library).
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(g: &Graph, inputs: &[(&str, Vec<usize>, Vec<f64>)]) -> Vec<f64> {
        let vals = inputs
            .iter()
            .map(|(n, s, v)| {
                (
                    n.to_string(),
                    eptc_ir::reference::Tensor64::new(s.clone(), v.clone()),
                )
            })
            .collect();
        eptc_ir::reference::eval(g, &vals).unwrap()[0]
            .1
            .data
            .clone()
    }

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
                "element {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn matmul_gemm_mapping_matches_the_reference() {
        use eptc_ir::TensorType;
        // Every transpose combination, a broadcast lead dim on either side, a lead dim
        // that is not merged ([0, x] strides) and none.
        let cases: &[(&[usize], &[usize], bool, bool)] = &[
            (&[2, 3, 4, 5], &[2, 3, 5, 6], false, false),
            (&[2, 3, 5, 4], &[3, 5, 6], true, false),
            (&[3, 4, 5], &[2, 3, 6, 5], false, true),
            (&[1, 3, 5, 4], &[2, 1, 6, 5], true, true),
            (&[4, 5], &[5, 6], false, false),
            // B shared by the batch, A and C entries one after another: one product of
            // 2 * 4 * 3 rows (B as stored or transposed); not where A is transposed.
            (&[2, 4, 3, 5], &[5, 6], false, false),
            (&[4, 3, 5], &[6, 5], false, true),
            (&[4, 5, 3], &[5, 6], true, false),
        ];
        let folded = |ci: usize| ci == 5 || ci == 6;
        for (ci, &(sa, sb, ta, tb)) in cases.iter().enumerate() {
            let mut g = Graph::new("mm");
            let a = g.input("a", TensorType::f32(Shape::fixed(sa)));
            let b = g.input("b", TensorType::f32(Shape::fixed(sb)));
            let y = g.matmul(a, b, ta, tb).unwrap();
            g.set_output("y", y);
            let out = g.ty(y).shape.resolve(1);
            let (va, vb) = (
                values(sa.iter().product(), ci as u64),
                values(sb.iter().product(), 100 + ci as u64),
            );
            let want = reference(
                &g,
                &[
                    ("a", sa.to_vec(), va.clone()),
                    ("b", sb.to_vec(), vb.clone()),
                ],
            );
            let (gm, epi) = gemm_for(&g, y, 1).expect("a GEMM");
            assert!(epi.is_none());
            let rows: usize = out[..out.len() - 1].iter().product();
            assert_eq!(
                (gm.batch == 1 && gm.n as usize == rows),
                folded(ci) || sa.len() == 2,
                "case {ci}: {gm:?}"
            );
            let mut c = vec![f64::NAN; out.iter().product()];
            // cuBLAS's A is our B.
            emulate(&gm, &vb, &va, &mut c);
            close(&c, &want);
        }
    }

    /// The ViT-B/16 training step's products of the backward through each frozen linear
    /// layer (`dX = dY W`: [B, 197, o] x [o, i]) are one GEMM of B * 197 rows each, not
    /// B batched GEMMs of 197 rows.
    #[test]
    fn backward_products_over_the_batch_are_one_gemm() {
        let g = test_graph("vit_b16_train.eptc");
        let mut one = 0;
        for id in g.node_ids() {
            let Op::MatMul { transpose_a, .. } = g.node(id).op else {
                continue;
            };
            let ops = g.operands(id);
            let (a, b) = (g.ty(ops[0]).shape.rank(), g.ty(ops[1]).shape.rank());
            if transpose_a || a != 3 || b != 2 {
                continue;
            }
            let (gm, _) = gemm_for(&g, id, 64).expect("a GEMM");
            assert_eq!((gm.batch, gm.n), (1, 64 * 197), "%{}", id.index());
            one += 1;
        }
        // Four frozen linear layers per block, twelve blocks, less the first block's qkv,
        // whose input gradient nothing trainable needs.
        assert_eq!(one, 47, "{one} products");
    }

    #[test]
    fn linear_gemm_mapping_matches_the_reference() {
        use eptc_ir::TensorType;
        let mut g = Graph::new("lin");
        let x = g.input("x", TensorType::f32(Shape::fixed(&[2, 3, 5])));
        let w = g.input("w", TensorType::f32(Shape::fixed(&[4, 5])));
        let y = g.linear(x, w, None, Activation::None, None).unwrap();
        g.set_output("y", y);
        let (vx, vw) = (values(30, 1), values(20, 2));
        let want = reference(
            &g,
            &[
                ("x", vec![2, 3, 5], vx.clone()),
                ("w", vec![4, 5], vw.clone()),
            ],
        );
        let (gm, _) = gemm_for(&g, y, 1).unwrap();
        let mut c = vec![f64::NAN; 24];
        emulate(&gm, &vw, &vx, &mut c);
        close(&c, &want);
    }

    /// cuBLASLt's matmul as its documentation defines it, in column-major terms from an
    /// [`LtSpec`]: `D = op(A) op(B) + bias (one value per row of D) + C`.
    fn emulate_lt(l: &LtSpec, a: &[f64], b: &[f64], bias: &[f64], c: &[f64]) -> Vec<f64> {
        let (m, n, k) = (l.m as usize, l.n as usize, l.k as usize);
        let (lda, ldb, ldc) = (l.lda as usize, l.ldb as usize, l.ldc as usize);
        let mut d = vec![f64::NAN; ldc * n];
        for col in 0..n {
            for row in 0..m {
                let mut acc = 0.0;
                for p in 0..k {
                    let av = if l.transa {
                        a[p + row * lda]
                    } else {
                        a[row + p * lda]
                    };
                    let bv = if l.transb {
                        b[col + p * ldb]
                    } else {
                        b[p + col * ldb]
                    };
                    acc += av * bv;
                }
                if l.bias {
                    acc += bias[row];
                }
                if l.residual {
                    acc += c[row + col * ldc];
                }
                d[row + col * ldc] = acc;
            }
        }
        d
    }

    /// `EPTC_CUDA_LT=1`: a linear's bias and residual (not GELU) go into cuBLASLt's
    /// epilogue; the matmul its documentation defines then gives the reference.
    #[test]
    fn linear_lt_mapping_matches_the_reference() {
        use eptc_ir::TensorType;
        for (bias, gelu, residual) in [
            (true, false, false),
            (false, false, true),
            (true, false, true),
            (true, true, false),
            (false, false, false),
        ] {
            let (rows, o, k) = (6, 4, 5);
            let mut g = Graph::new("lin");
            let x = g.input("x", TensorType::f32(Shape::fixed(&[2, 3, k])));
            let w = g.input("w", TensorType::f32(Shape::fixed(&[o, k])));
            let bn = g.input("b", TensorType::f32(Shape::fixed(&[o])));
            let rn = g.input("r", TensorType::f32(Shape::fixed(&[2, 3, o])));
            let act = if gelu {
                Activation::Gelu
            } else {
                Activation::None
            };
            let y = g
                .linear(x, w, bias.then_some(bn), act, residual.then_some(rn))
                .unwrap();
            g.set_output("y", y);
            let (vx, vw, vb, vr) = (
                values(rows * k, 1),
                values(o * k, 2),
                values(o, 3),
                values(rows * o, 4),
            );
            let mut inputs = vec![
                ("x", vec![2, 3, k], vx.clone()),
                ("w", vec![o, k], vw.clone()),
            ];
            if bias {
                inputs.push(("b", vec![o], vb.clone()));
            }
            if residual {
                inputs.push(("r", vec![2, 3, o], vr.clone()));
            }
            let want = reference(&g, &inputs);
            let (gm, epi) = gemm_for(&g, y, 1).unwrap();
            let spec = epi.as_ref().and_then(|e| lt_spec(&gm, e));
            if gelu || !(bias || residual) {
                assert_eq!(spec, None, "bias {bias} gelu {gelu} residual {residual}");
                continue;
            }
            let spec = spec.expect("a cuBLASLt form");
            // cuBLAS's A is our weight, B our input.
            let d = emulate_lt(&spec, &vw, &vx, &vb, &vr);
            close(&d, &want);
        }
    }

    /// `v` as stored in `dt` and read back.
    fn held_as(v: &[f64], dt: DType) -> Vec<f64> {
        from_storage(&stored_as(v, dt), dt)
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// `v`'s bytes in storage type `dt`.
    fn stored_as(v: &[f64], dt: DType) -> Vec<u8> {
        let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        to_storage(&v32, dt)
    }

    /// q, k, v `[b, h, n, dh]` split from the input `x [b, n, 3 h dh]` as ViT splits its
    /// qkv projection (reshape, permute, three slices, reshapes).
    fn qkv_of_input(g: &mut Graph, b: usize, n: usize, h: usize, dh: usize) -> Vec<NodeId> {
        use eptc_ir::TensorType;
        let x = g.input("x", TensorType::f32(Shape::fixed(&[b, n, 3 * h * dh])));
        let r = g.reshape(x, Shape::fixed(&[b, n, 3, h, dh])).unwrap();
        let p = g.permute(r, &[2, 0, 3, 1, 4]).unwrap();
        (0..3)
            .map(|i| {
                let sl = g.slice(p, 0, i, i + 1).unwrap();
                g.reshape(sl, Shape::fixed(&[b, h, n, dh])).unwrap()
            })
            .collect()
    }

    /// With the fused attention in 16-bit storage and views on, ViT's q, k, v (a permute
    /// and three slices of the qkv projection) are read in place by the tensor-core
    /// kernel, which gives the reference on the CPU emulator.
    #[test]
    fn fused_attention_reads_q_k_v_in_place() {
        use eptc_ir::TensorType;
        let (b, n, h, dh) = (2, 70, 2, 32);
        let dm = h * dh;
        let mut g = Graph::new("qkv-fused");
        let qkv = qkv_of_input(&mut g, b, n, h, dh);
        let z = g.input("z", TensorType::f32(Shape::fixed(&[b, 1, n, 1])));
        let a = g.attention(qkv[0], qkv[1], qkv[2], Some(z), 0.3).unwrap();
        g.set_output("y", a);
        let (slots, _, _, _) = slots_of(&g);
        let slot = |id: NodeId| slots.iter().position(|s| s.id == id).unwrap();
        // In f32 the attention keeps its GEMM views.
        let (gemms, _) = attention_views(&g, &slots, 1, None);
        assert!(matches!(gemms[&slot(a)], ViewGemms::Attention(_)));
        let emulate = match crate::emulate::available() {
            Ok(_) => true,
            Err(e) => {
                assert!(
                    std::env::var_os("EPTC_REQUIRE_EMULATOR").is_none(),
                    "EPTC_REQUIRE_EMULATOR is set, but: {e}"
                );
                false
            }
        };
        for dt in [DType::BF16, DType::F16] {
            let (gemms, virt) = attention_views(&g, &slots, 1, Some(dt));
            assert_eq!(gemms.len(), 1);
            let ViewGemms::Fused(k) = &gemms[&slot(a)] else {
                panic!("the fused kernel")
            };
            assert!(k.source.contains("mma_t(") && k.source.contains("in place"));
            assert_eq!(virt.len(), 4, "the permute and the three slices are views");
            if !emulate {
                continue;
            }
            // The stored values, and the reference on exactly those.
            let held = |v: Vec<f64>| held_as(&v, dt);
            let xv = held(values(b * n * 3 * dm, 5));
            let zv = held(values(b * n, 6));
            let want = reference(
                &g,
                &[
                    ("x", vec![b, n, 3 * dm], xv.clone()),
                    ("z", vec![b, 1, n, 1], zv.clone()),
                ],
            );
            let bytes = |v: &[f64]| stored_as(v, dt);
            let (xb, zb) = (bytes(&xv), bytes(&zv));
            let m = crate::emulate::Module::compile(&[k], dt).unwrap();
            let out = m
                .run(k, &[&xb, &xb, &xb, &zb], want.len() * dt.size_bytes())
                .unwrap();
            let got = from_storage(&out, dt);
            let num: f64 = got
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (f64::from(a) - b).powi(2))
                .sum();
            let den: f64 = want.iter().map(|b| b * b).sum();
            let e = (num / den).sqrt();
            let bar = if dt == DType::BF16 { 1e-2 } else { 2e-3 };
            assert!(e <= bar, "{dt}: relative error {e:.3e}");
        }
    }

    /// The flash-style backward's kernels (`attention_lse`, `attention_grad` wrt q, k, v)
    /// read q, k, v in place too (16-bit storage, views on), and give the reference on
    /// the CPU emulator.
    #[test]
    fn fused_backward_reads_q_k_v_in_place() {
        use eptc_ir::{AttnWrt, TensorType};
        let (b, n, h, dh) = (2, 70, 2, 32);
        let dm = h * dh;
        let fixed = |s: &[usize]| TensorType::f32(Shape::fixed(s));
        let mut g = Graph::new("qkv-backward");
        let qkv = qkv_of_input(&mut g, b, n, h, dh);
        let z = g.input("z", fixed(&[b, 1, n, 1]));
        let lse = g
            .add(
                Op::AttentionLse {
                    scale: 0.3,
                    sink: true,
                },
                &[qkv[0], qkv[1], z],
            )
            .unwrap();
        g.set_output("lse", lse);
        let lse_in = g.input("lse_in", fixed(&[b, h, n, 1]));
        let delta = g.input("delta", fixed(&[b, h, n, 1]));
        let dout = g.input("dout", fixed(&[b, h, n, dh]));
        let grads: Vec<NodeId> = AttnWrt::ALL
            .iter()
            .map(|&wrt| {
                let y = g
                    .add(
                        Op::AttentionGrad { scale: 0.3, wrt },
                        &[qkv[0], qkv[1], qkv[2], lse_in, delta, dout],
                    )
                    .unwrap();
                g.set_output(&format!("grad_{}", wrt.name()), y);
                y
            })
            .collect();
        let (slots, _, _, _) = slots_of(&g);
        let slot = |id: NodeId| slots.iter().position(|s| s.id == id).unwrap();
        let emulate = crate::emulate::available().is_ok();
        for dt in [DType::BF16, DType::F16] {
            let (mut views, virt) = attention_views(&g, &slots, 1, Some(dt));
            assert_eq!(views.len(), 4, "lse and three gradients");
            assert_eq!(virt.len(), 4, "the permute and the three slices are views");
            let mut kernel = |id: NodeId| match views.remove(&slot(id)) {
                Some(ViewGemms::Fused(k)) => {
                    assert!(k.source.contains("mma_t(") && k.source.contains("in place"));
                    *k
                }
                _ => panic!("%{}: a fused kernel", id.index()),
            };
            let lk = kernel(lse);
            let gks: Vec<Kernel> = grads.iter().map(|&y| kernel(y)).collect();
            if !emulate {
                continue;
            }
            let held = |v: Vec<f64>| held_as(&v, dt);
            let bytes = |v: &[f64]| stored_as(v, dt);
            let xv = held(values(b * n * 3 * dm, 11));
            let zv = held(values(b * n, 12));
            let dv = held(values(b * h * n, 13));
            let ov = held(values(b * h * n * dh, 14));
            let m = crate::emulate::Module::compile(&[&lk, &gks[0], &gks[1], &gks[2]], dt).unwrap();
            let (xb, zb) = (bytes(&xv), bytes(&zv));
            let lse_bytes = m
                .run(&lk, &[&xb, &xb, &zb], b * h * n * dt.size_bytes())
                .unwrap();
            // The gradients' reference takes the kernel's lse, as the kernels do.
            let lv: Vec<f64> = from_storage(&lse_bytes, dt)
                .into_iter()
                .map(f64::from)
                .collect();
            let t = |name: &str, shape: Vec<usize>, data: &[f64]| {
                (
                    name.to_string(),
                    eptc_ir::reference::Tensor64::new(shape, data.to_vec()),
                )
            };
            let vals = [
                t("x", vec![b, n, 3 * dm], &xv),
                t("z", vec![b, 1, n, 1], &zv),
                t("lse_in", vec![b, h, n, 1], &lv),
                t("delta", vec![b, h, n, 1], &dv),
                t("dout", vec![b, h, n, dh], &ov),
            ]
            .into_iter()
            .collect();
            let want = eptc_ir::reference::eval(&g, &vals).unwrap();
            let rel = |got: &[u8], want: &[f64]| {
                let got = from_storage(got, dt);
                let num: f64 = got
                    .iter()
                    .zip(want)
                    .map(|(&a, &b)| (f64::from(a) - b).powi(2))
                    .sum();
                (num / want.iter().map(|b| b * b).sum::<f64>()).sqrt()
            };
            let bar = if dt == DType::BF16 { 1e-2 } else { 2e-3 };
            let e = rel(&lse_bytes, &want[0].1.data);
            assert!(e <= bar, "{dt} lse: {e:.3e}");
            let (db, ob, lb) = (bytes(&dv), bytes(&ov), bytes(&lv));
            for (k, (name, w)) in gks.iter().zip(&want[1..]) {
                let out = m
                    .run(
                        k,
                        &[&xb, &xb, &xb, &lb, &db, &ob],
                        w.data.len() * dt.size_bytes(),
                    )
                    .unwrap();
                let e = rel(&out, &w.data);
                assert!(e <= bar, "{dt} {name}: {e:.3e}");
            }
        }
    }

    #[test]
    fn attention_gemm_mapping_matches_the_reference() {
        use eptc_ir::TensorType;
        for sink in [false, true] {
            let (b, h, n, m, d, e) = (2, 3, 5, 7, 4, 6);
            let mut g = Graph::new("att");
            let q = g.input("q", TensorType::f32(Shape::fixed(&[b, h, n, d])));
            // K shared across the batch (a broadcast lead dim).
            let k = g.input("k", TensorType::f32(Shape::fixed(&[h, m, d])));
            let v = g.input("v", TensorType::f32(Shape::fixed(&[b, h, m, e])));
            let z = g.input("z", TensorType::f32(Shape::fixed(&[n, 1])));
            let y = g.attention(q, k, v, sink.then_some(z), 0.37).unwrap();
            g.set_output("y", y);
            let inputs = [
                ("q", vec![b, h, n, d], values(b * h * n * d, 1)),
                ("k", vec![h, m, d], values(h * m * d, 2)),
                ("v", vec![b, h, m, e], values(b * h * m * e, 3)),
                ("z", vec![n, 1], values(n, 4)),
            ];
            let want = reference(&g, if sink { &inputs[..] } else { &inputs[..3] });
            let at = attention_for(&g, y, 1).expect("attention as GEMMs");
            assert_eq!(at.sink, sink);
            assert_eq!(at.s_elems, b * h * n * m);
            let mut sc = vec![f64::NAN; at.s_elems];
            emulate(&at.qk, &inputs[1].2, &inputs[0].2, &mut sc);
            // The softmax (with the sink) on the host, as the kernel computes it.
            let zv = &inputs[3].2;
            let mut p = vec![0.0; sc.len()];
            for r in 0..b * h * n {
                let row = &sc[r * m..(r + 1) * m];
                let z = if sink { zv[r % n] } else { f64::NEG_INFINITY };
                let mx = row.iter().cloned().fold(z, f64::max);
                let den: f64 = row.iter().map(|x| (x - mx).exp()).sum::<f64>() + (z - mx).exp();
                for j in 0..m {
                    p[r * m + j] = (row[j] - mx).exp() / den;
                }
            }
            // The runtime's own softmax kernel, run by the CPU emulator, gives the same.
            if let Some(pk) = emulated_softmax(&at.softmax, &sc, sink.then_some(zv)) {
                for (i, (a, b)) in pk.iter().zip(&p).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * (1e-3 + b.abs()),
                        "p[{i}]: {a} vs {b}"
                    );
                }
            }
            let mut o = vec![f64::NAN; b * h * n * e];
            emulate(&at.pv, &inputs[2].2, &p, &mut o);
            close(&o, &want);
            // The kernel's entry takes (s[, z], out).
            let entry = at
                .softmax
                .source
                .lines()
                .find(|l| l.contains("__global__"))
                .unwrap();
            assert_eq!(at.softmax.inputs, if sink { 2 } else { 1 }, "{entry}");
        }
    }

    #[test]
    fn parallel_conversion_matches_the_serial_one() {
        // Sizes around the per-thread minimum and an odd length.
        for n in [0, 5, (1 << 20) + 3, 3 * (1 << 20) + 1] {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let mut out = vec![0u8; n * dt.size_bytes()];
                to_storage_par(&v, dt, &mut out);
                assert!(out == to_storage(&v, dt), "{n} {dt}");
            }
        }
    }

    #[test]
    fn storage_round_trips() {
        let v = [1.0f32, -2.5, 0.1, 3.0e-3];
        assert_eq!(from_storage(&to_storage(&v, DType::F32), DType::F32), v);
        let b = from_storage(&to_storage(&v, DType::BF16), DType::BF16);
        for (x, y) in v.iter().zip(&b) {
            assert!((x - y).abs() <= x.abs() / 128.0, "{x} {y}");
        }
        // Into the pinned staging: the same bytes as the vector path.
        let w: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.731).collect();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let want = to_storage(&w, dt);
            let mut got = vec![0xa5u8; want.len()];
            to_storage_into(&w, dt, &mut got);
            assert_eq!(got, want, "{dt}");
        }
    }
}
