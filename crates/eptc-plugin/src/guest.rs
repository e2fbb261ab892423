//! The plugin side: any [`Backend`] behind the C function table.
//!
//! A Rust plugin is a `cdylib` crate with one line:
//!
//! ```ignore
//! eptc_plugin::export_backend!(name = "my-backend", version = "0.1.0", backend = MyBackend::new());
//! ```
//!
//! which implements [`Guest`] for a hidden type and exports `eptc_plugin_api`, returning
//! [`table`]`::<ThatType>()`. The backend is created by the table's `init`, once per
//! process. Every entry point runs inside [`std::panic::catch_unwind`]: a panic of the
//! backend becomes [`EPTC_ERR_PANIC`] with the panic's message, never an unwind across
//! the C boundary. Buffers live in host memory as f32 ([`HostTensor`]s, which the
//! wrapped backend's [`Executable::run`] takes); f16 and bf16 buffers and descriptors are
//! converted on upload and download.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use eptc_backend::{Availability, Backend, BackendError, CompileOptions, Executable};
use eptc_ir::{DType, HostTensor, WeightStore};
use half::{bf16, f16};

use crate::abi::*;

/// The largest rank a descriptor or a buffer may have (a sanity bound on C input).
pub const MAX_RANK: u32 = 64;

/// A plugin's identity and its backend. Implemented by [`crate::export_backend!`]; by hand
/// for a backend that needs fallible set-up.
pub trait Guest: 'static {
    /// The plugin's name (`--target NAME`).
    const NAME: &'static CStr;
    /// The plugin's version.
    const VERSION: &'static CStr;
    /// Create the backend (called by `init`, once per process); an error refuses the
    /// plugin with the message.
    fn create() -> Result<Box<dyn Backend>, String>;
    /// Where the backend lives once created: a `static` of the implementing crate.
    fn slot() -> &'static Slot;
}

/// The storage of a guest's backend (a `static Slot = Slot::new()`).
pub struct Slot(OnceLock<Box<dyn Backend>>);

impl Slot {
    pub const fn new() -> Self {
        Slot(OnceLock::new())
    }
}

impl Default for Slot {
    fn default() -> Self {
        Self::new()
    }
}

/// The function table of guest `G`, for a `static`.
pub const fn table<G: Guest>() -> EptcPluginApi {
    EptcPluginApi {
        struct_size: std::mem::size_of::<EptcPluginApi>(),
        api_version: API_VERSION,
        name: Some(name::<G>),
        version: Some(version::<G>),
        init: Some(init::<G>),
        availability: Some(availability::<G>),
        capabilities: Some(capabilities::<G>),
        compile: Some(compile::<G>),
        set_param: Some(set_param),
        run: Some(run),
        free_executable: Some(free_executable),
        buffer_alloc: Some(buffer_alloc),
        buffer_upload: Some(buffer_upload),
        buffer_download: Some(buffer_download),
        buffer_info: Some(buffer_info),
        buffer_free: Some(buffer_free),
        free_string: Some(free_string),
        device_seconds: Some(device_seconds),
        kernels: Some(kernels::<G>),
    }
}

/// Define a backend plugin: implements [`Guest`] and exports
/// `eptc_plugin_api` returning the table (see the crate's docs). Use once per `cdylib`.
///
/// ```ignore
/// eptc_plugin::export_backend!(name = "cpu-plugin", version = "0.1.0", backend = eptc_cpu::CpuBackend::new());
/// ```
#[macro_export]
macro_rules! export_backend {
    (name = $name:expr, version = $version:expr, backend = $backend:expr $(,)?) => {
        #[doc(hidden)]
        pub struct __EptcPluginGuest;

        impl $crate::guest::Guest for __EptcPluginGuest {
            const NAME: &'static ::std::ffi::CStr =
                match ::std::ffi::CStr::from_bytes_with_nul(concat!($name, "\0").as_bytes()) {
                    ::std::result::Result::Ok(s) => s,
                    ::std::result::Result::Err(_) => panic!("the plugin's name contains a NUL"),
                };
            const VERSION: &'static ::std::ffi::CStr =
                match ::std::ffi::CStr::from_bytes_with_nul(concat!($version, "\0").as_bytes()) {
                    ::std::result::Result::Ok(s) => s,
                    ::std::result::Result::Err(_) => {
                        panic!("the plugin's version contains a NUL")
                    }
                };
            fn create() -> ::std::result::Result<
                ::std::boxed::Box<dyn $crate::eptc_backend::Backend>,
                ::std::string::String,
            > {
                ::std::result::Result::Ok(::std::boxed::Box::new($backend))
            }
            fn slot() -> &'static $crate::guest::Slot {
                static SLOT: $crate::guest::Slot = $crate::guest::Slot::new();
                &SLOT
            }
        }

        /// The eptc plugin entry point: the function table (see `eptc_plugin::abi`).
        #[unsafe(no_mangle)]
        pub extern "C" fn eptc_plugin_api() -> *const $crate::abi::EptcPluginApi {
            static API: $crate::abi::EptcPluginApi = $crate::guest::table::<__EptcPluginGuest>();
            &API
        }
    };
}

// ---- errors ------------------------------------------------------------------------

/// A failed call: a status and its message.
struct Fail(EptcStatus, String);

impl Fail {
    fn arg(msg: impl Into<String>) -> Self {
        Fail(EPTC_ERR_INVALID_ARGUMENT, msg.into())
    }
}

impl From<BackendError> for Fail {
    fn from(e: BackendError) -> Self {
        let status = match &e {
            BackendError::Unsupported { .. } => EPTC_ERR_UNSUPPORTED,
            BackendError::MissingParam(_) => EPTC_ERR_MISSING_PARAM,
            BackendError::ParamShape { .. } | BackendError::InputShape { .. } => {
                EPTC_ERR_SHAPE_MISMATCH
            }
            BackendError::MissingInput(_) => EPTC_ERR_INVALID_ARGUMENT,
            BackendError::Unavailable(why) => return Fail(EPTC_ERR_UNAVAILABLE, why.clone()),
            BackendError::Other(_) => EPTC_ERR_INTERNAL,
        };
        Fail(status, e.to_string())
    }
}

/// A plugin-allocated C string (NULs replaced), for the host to free with `free_string`.
fn c_string(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', "\\0"))
        .expect("NULs were replaced")
        .into_raw()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Run `f` catching panics; store the message of a failure in `*error` (if non-null).
///
/// # Safety
/// `error` is null or valid for one write.
unsafe fn guard(error: *mut *mut c_char, f: impl FnOnce() -> Result<(), Fail>) -> EptcStatus {
    let r = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(Fail(EPTC_ERR_PANIC, panic_message(&*payload))),
    };
    match r {
        Ok(()) => EPTC_OK,
        Err(Fail(status, msg)) => {
            if !error.is_null() {
                // SAFETY: the caller passes a valid out-pointer (documented in the ABI).
                unsafe { *error = c_string(&msg) };
            }
            status
        }
    }
}

fn backend<G: Guest>() -> Result<&'static dyn Backend, Fail> {
    G::slot().0.get().map(|b| &**b).ok_or_else(|| {
        Fail(
            EPTC_ERR_UNAVAILABLE,
            "the plugin was not initialised (init not called or it failed)".into(),
        )
    })
}

// ---- reading C arguments -----------------------------------------------------------

/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL")));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Fail::arg(format!("{what} is not valid UTF-8")))
}

/// # Safety
/// `out` is null or valid for one write.
unsafe fn out_arg<'a, T>(out: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: caller's contract.
    unsafe { out.as_mut() }.ok_or_else(|| Fail::arg(format!("{what} is NULL")))
}

fn dtype_arg(code: u32) -> Result<DType, Fail> {
    dtype_from_code(code).ok_or_else(|| Fail::arg(format!("unknown dtype code {code}")))
}

/// # Safety
/// `shape` is null or valid for `rank` reads.
unsafe fn shape_arg(rank: u32, shape: *const u64) -> Result<Vec<usize>, Fail> {
    if rank > MAX_RANK {
        return Err(Fail::arg(format!("rank {rank} is above {MAX_RANK}")));
    }
    if rank == 0 {
        return Ok(vec![]);
    }
    if shape.is_null() {
        return Err(Fail::arg(format!("rank {rank} with a NULL shape")));
    }
    // SAFETY: non-null, `rank` elements by the caller's contract.
    let dims = unsafe { std::slice::from_raw_parts(shape, rank as usize) };
    let shape: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| Fail::arg(format!("dimension {d} too large"))))
        .collect::<Result<_, _>>()?;
    numel(&shape)?;
    Ok(shape)
}

fn numel(shape: &[usize]) -> Result<usize, Fail> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n.checked_mul(4).is_some())
        .ok_or_else(|| Fail::arg(format!("shape {shape:?} is too large")))
}

/// Decode `bytes` of `dtype` into f32 values.
fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => {
            let mut v = vec![0f32; bytes.len() / 4];
            // SAFETY: `v` holds `bytes.len()` bytes (a multiple of 4, checked by the
            // callers); any bits are a valid f32. A plain copy, alignment-agnostic.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    v.as_mut_ptr().cast::<u8>(),
                    v.len() * 4,
                )
            };
            v
        }
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Encode f32 values as `dtype` into `out` (exactly `values.len() * size` bytes).
fn encode(dtype: DType, values: &[f32], out: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&v.to_ne_bytes());
            }
        }
        DType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_ne_bytes());
            }
        }
        DType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_ne_bytes());
            }
        }
    }
}

/// # Safety
/// `data` is null or valid for `len` reads.
unsafe fn bytes_arg<'a>(data: *const c_void, len: usize) -> Result<&'a [u8], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(Fail::arg(format!("data is NULL with {len} bytes")));
    }
    // SAFETY: non-null, `len` bytes by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) })
}

fn check_len(shape: &[usize], dtype: DType, len: usize, what: &str) -> Result<(), Fail> {
    let want = numel(shape)? * dtype.size_bytes();
    if len != want {
        return Err(Fail(
            EPTC_ERR_SHAPE_MISMATCH,
            format!("{what}: {len} bytes for {dtype}{shape:?}, which takes {want}"),
        ));
    }
    Ok(())
}

/// A descriptor's name (if it must have one) and its value as an f32 host tensor.
///
/// # Safety
/// `d` follows the ABI's contract for [`EptcTensorDesc`].
unsafe fn tensor_arg(d: &EptcTensorDesc, named: bool) -> Result<(String, HostTensor), Fail> {
    let name = if named {
        // SAFETY: contract.
        unsafe { str_arg(d.name, "a tensor's name") }?.to_owned()
    } else {
        String::new()
    };
    let what = if named { name.as_str() } else { "the value" };
    let dtype = dtype_arg(d.dtype)?;
    // SAFETY: contract.
    let shape = unsafe { shape_arg(d.rank, d.shape) }?;
    check_len(&shape, dtype, d.byte_len, what)?;
    // SAFETY: contract.
    let bytes = unsafe { bytes_arg(d.data, d.byte_len) }?;
    Ok((name, HostTensor::new(shape, decode(dtype, bytes))))
}

/// What `compile` reads from its C arguments: the graph (the IR text, parsed and
/// verified) and the weights (descriptors checked and decoded to f32).
///
/// # Safety
/// The pointers follow the ABI's contract for `compile`.
unsafe fn compile_args(
    ir_text: *const c_char,
    weights: *const EptcTensorDesc,
    n_weights: usize,
) -> Result<(eptc_ir::Graph, WeightStore), Fail> {
    // SAFETY: contract.
    let text = unsafe { str_arg(ir_text, "the IR text") }?;
    let graph = eptc_ir::text::parse(text).map_err(|e| Fail::arg(format!("IR: {e}")))?;
    let descs = if n_weights == 0 {
        &[][..]
    } else if weights.is_null() {
        return Err(Fail::arg(format!(
            "weights is NULL with {n_weights} weights"
        )));
    } else {
        // SAFETY: non-null, `n_weights` descriptors by the caller's contract.
        unsafe { std::slice::from_raw_parts(weights, n_weights) }
    };
    let mut store = WeightStore::new();
    for d in descs {
        // SAFETY: contract.
        let (name, t) = unsafe { tensor_arg(d, true) }?;
        store.insert(name, t);
    }
    Ok((graph, store))
}

/// One weight as `compile` receives it, in safe form: the parts of an
/// [`EptcTensorDesc`] (its rank is `shape.len()`, its `byte_len` is `data.len()`).
#[derive(Clone, Copy, Debug)]
pub struct TensorArg<'a> {
    pub name: &'a CStr,
    /// `EPTC_DTYPE_*` (any value: unknown codes are refused).
    pub dtype: u32,
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

/// What the guest's `compile` does with its arguments before it calls the backend:
/// parse and verify the IR text, check and decode the weight descriptors. The same code
/// as the C entry point, for tests and fuzzing; an error is the status `compile` would
/// return and its message.
pub fn read_compile_args(
    ir_text: &CStr,
    weights: &[TensorArg],
) -> Result<(eptc_ir::Graph, WeightStore), (EptcStatus, String)> {
    let mut descs = Vec::with_capacity(weights.len());
    for w in weights {
        let rank = u32::try_from(w.shape.len())
            .map_err(|_| (EPTC_ERR_INVALID_ARGUMENT, "rank too large".to_string()))?;
        descs.push(EptcTensorDesc {
            name: w.name.as_ptr(),
            dtype: w.dtype,
            rank,
            shape: w.shape.as_ptr(),
            data: w.data.as_ptr().cast(),
            byte_len: w.data.len(),
        });
    }
    // SAFETY: every pointer comes from a live borrow of the length it is given with.
    unsafe { compile_args(ir_text.as_ptr(), descs.as_ptr(), descs.len()) }
        .map_err(|Fail(status, msg)| (status, msg))
}

// ---- handles -----------------------------------------------------------------------

/// What an [`EptcExecutable`] handle points to.
struct GuestExecutable {
    exe: Box<dyn Executable>,
    /// The graph's outputs, in the IR text's order.
    outputs: Vec<String>,
}

/// What an [`EptcBuffer`] handle points to: an f32 host tensor and the dtype the host
/// reads and writes it in.
struct GuestBuffer {
    dtype: DType,
    tensor: HostTensor,
}

/// # Safety
/// `p` is null or a live executable handle of this plugin, not used elsewhere meanwhile.
unsafe fn exe_arg<'a>(p: *mut EptcExecutable) -> Result<&'a mut GuestExecutable, Fail> {
    // SAFETY: contract.
    unsafe { p.cast::<GuestExecutable>().as_mut() }
        .ok_or_else(|| Fail::arg("the executable is NULL"))
}

/// # Safety
/// `p` is null or a live buffer handle of this plugin.
unsafe fn buffer_arg<'a>(p: *const EptcBuffer) -> Result<&'a GuestBuffer, Fail> {
    // SAFETY: contract.
    unsafe { p.cast::<GuestBuffer>().as_ref() }.ok_or_else(|| Fail::arg("a buffer is NULL"))
}

fn new_buffer(dtype: DType, tensor: HostTensor) -> *mut EptcBuffer {
    Box::into_raw(Box::new(GuestBuffer { dtype, tensor })).cast()
}

// ---- the entry points --------------------------------------------------------------

unsafe extern "C" fn name<G: Guest>() -> *const c_char {
    G::NAME.as_ptr()
}

unsafe extern "C" fn version<G: Guest>() -> *const c_char {
    G::VERSION.as_ptr()
}

unsafe extern "C" fn init<G: Guest>(error: *mut *mut c_char) -> EptcStatus {
    // SAFETY: ABI contract on `error`.
    unsafe {
        guard(error, || {
            let slot = &G::slot().0;
            if slot.get().is_some() {
                return Ok(());
            }
            let backend = G::create().map_err(|e| Fail(EPTC_ERR_INTERNAL, e))?;
            // A concurrent init may have won the race: either backend will do.
            let _ = slot.set(backend);
            Ok(())
        })
    }
}

unsafe extern "C" fn availability<G: Guest>(detail: *mut *mut c_char) -> EptcStatus {
    let (status, text) = match catch_unwind(|| backend::<G>().map(|b| b.availability())) {
        Ok(Ok(Availability::Available(d))) => (EPTC_OK, d),
        Ok(Ok(Availability::Unavailable(why))) => (EPTC_ERR_UNAVAILABLE, why),
        Ok(Err(Fail(status, msg))) => (status, msg),
        Err(payload) => (EPTC_ERR_PANIC, panic_message(&*payload)),
    };
    if !detail.is_null() {
        // SAFETY: valid out-pointer by contract.
        unsafe { *detail = c_string(&text) };
    }
    status
}

unsafe extern "C" fn capabilities<G: Guest>(
    json: *mut *mut c_char,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on the out-pointers.
    unsafe {
        guard(error, || {
            let out = out_arg(json, "json")?;
            let caps = backend::<G>()?.capabilities();
            let value = serde_json::json!({
                "ops": caps.ops,
                "fused_ops": caps.fused_ops,
                "dtypes": caps.dtypes.iter().map(|d| d.name()).collect::<Vec<_>>(),
            });
            *out = c_string(&value.to_string());
            Ok(())
        })
    }
}

unsafe extern "C" fn compile<G: Guest>(
    ir_text: *const c_char,
    weights: *const EptcTensorDesc,
    n_weights: usize,
    options: *const EptcCompileOptions,
    executable: *mut *mut EptcExecutable,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on every pointer.
    unsafe {
        guard(error, || {
            let out = out_arg(executable, "executable")?;
            let opts = options
                .as_ref()
                .ok_or_else(|| Fail::arg("the options are NULL"))?;
            let (graph, store) = compile_args(ir_text, weights, n_weights)?;
            let opts = CompileOptions {
                threads: (opts.threads != 0).then(|| opts.threads.min(usize::MAX as u64) as usize),
                dtype: dtype_arg(opts.dtype)?,
            };
            let exe = backend::<G>()?.compile(&graph, &store, &opts)?;
            let outputs = graph.outputs().iter().map(|(n, _)| n.clone()).collect();
            let handle = Box::new(GuestExecutable { exe, outputs });
            *out = Box::into_raw(handle).cast();
            Ok(())
        })
    }
}

unsafe extern "C" fn set_param(
    executable: *mut EptcExecutable,
    name: *const c_char,
    value: *const EptcTensorDesc,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on every pointer.
    unsafe {
        guard(error, || {
            let exe = exe_arg(executable)?;
            let name = str_arg(name, "the parameter's name")?;
            let value = value
                .as_ref()
                .ok_or_else(|| Fail::arg("the value is NULL"))?;
            let (_, t) = tensor_arg(value, false)?;
            exe.exe.set_param(name, t)?;
            Ok(())
        })
    }
}

unsafe extern "C" fn run(
    executable: *mut EptcExecutable,
    input_names: *const *const c_char,
    inputs: *const *mut EptcBuffer,
    n_inputs: usize,
    outputs: *mut *mut EptcBuffer,
    n_outputs: usize,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on every pointer.
    unsafe {
        guard(error, || {
            let exe = exe_arg(executable)?;
            if n_outputs != exe.outputs.len() {
                return Err(Fail::arg(format!(
                    "{n_outputs} outputs asked for, the graph has {}",
                    exe.outputs.len()
                )));
            }
            if n_outputs > 0 && outputs.is_null() {
                return Err(Fail::arg("outputs is NULL"));
            }
            let (names, bufs) = if n_inputs == 0 {
                (&[][..], &[][..])
            } else if input_names.is_null() || inputs.is_null() {
                return Err(Fail::arg("input_names or inputs is NULL"));
            } else {
                (
                    std::slice::from_raw_parts(input_names, n_inputs),
                    std::slice::from_raw_parts(inputs, n_inputs),
                )
            };
            let mut args: Vec<(&str, HostTensor)> = Vec::with_capacity(n_inputs);
            for (&n, &b) in names.iter().zip(bufs) {
                let n = str_arg(n, "an input's name")?;
                if args.iter().any(|(m, _)| *m == n) {
                    return Err(Fail::arg(format!("input {n:?} given twice")));
                }
                args.push((n, buffer_arg(b)?.tensor.clone()));
            }
            let mut results = exe.exe.run(&args)?;
            let mut ordered = Vec::with_capacity(n_outputs);
            for name in &exe.outputs {
                let i = results
                    .iter()
                    .position(|(n, _)| n == name)
                    .ok_or_else(|| Fail(EPTC_ERR_INTERNAL, format!("no output {name:?}")))?;
                ordered.push(results.swap_remove(i).1);
            }
            for (i, t) in ordered.into_iter().enumerate() {
                *outputs.add(i) = new_buffer(DType::F32, t);
            }
            Ok(())
        })
    }
}

unsafe extern "C" fn free_executable(executable: *mut EptcExecutable) {
    if executable.is_null() {
        return;
    }
    // A panicking Drop must not unwind into C; the executable is lost either way.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: made by `compile` with Box::into_raw; freed once by contract.
        drop(unsafe { Box::from_raw(executable.cast::<GuestExecutable>()) });
    }));
}

unsafe extern "C" fn buffer_alloc(
    dtype: u32,
    rank: u32,
    shape: *const u64,
    buffer: *mut *mut EptcBuffer,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on every pointer.
    unsafe {
        guard(error, || {
            let out = out_arg(buffer, "buffer")?;
            let dtype = dtype_arg(dtype)?;
            let shape = shape_arg(rank, shape)?;
            *out = new_buffer(dtype, HostTensor::zeros(shape));
            Ok(())
        })
    }
}

unsafe extern "C" fn buffer_upload(
    buffer: *mut EptcBuffer,
    data: *const c_void,
    byte_len: usize,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on every pointer.
    unsafe {
        guard(error, || {
            let b = buffer
                .cast::<GuestBuffer>()
                .as_mut()
                .ok_or_else(|| Fail::arg("the buffer is NULL"))?;
            check_len(&b.tensor.shape, b.dtype, byte_len, "upload")?;
            let bytes = bytes_arg(data, byte_len)?;
            b.tensor = HostTensor::new(b.tensor.shape.clone(), decode(b.dtype, bytes));
            Ok(())
        })
    }
}

unsafe extern "C" fn buffer_download(
    buffer: *const EptcBuffer,
    data: *mut c_void,
    byte_len: usize,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on every pointer.
    unsafe {
        guard(error, || {
            let b = buffer_arg(buffer)?;
            check_len(&b.tensor.shape, b.dtype, byte_len, "download")?;
            if byte_len == 0 {
                return Ok(());
            }
            if data.is_null() {
                return Err(Fail::arg("data is NULL"));
            }
            let out = std::slice::from_raw_parts_mut(data.cast::<u8>(), byte_len);
            encode(b.dtype, b.tensor.data(), out);
            Ok(())
        })
    }
}

unsafe extern "C" fn buffer_info(
    buffer: *const EptcBuffer,
    dtype: *mut u32,
    rank: *mut u32,
    shape: *mut u64,
    shape_capacity: u32,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on every pointer.
    unsafe {
        guard(error, || {
            let b = buffer_arg(buffer)?;
            *out_arg(dtype, "dtype")? = dtype_code(b.dtype);
            *out_arg(rank, "rank")? = b.tensor.shape.len() as u32;
            let n = b.tensor.shape.len().min(shape_capacity as usize);
            if n > 0 {
                if shape.is_null() {
                    return Err(Fail::arg("shape is NULL"));
                }
                for (i, &d) in b.tensor.shape[..n].iter().enumerate() {
                    *shape.add(i) = d as u64;
                }
            }
            Ok(())
        })
    }
}

unsafe extern "C" fn buffer_free(buffer: *mut EptcBuffer) {
    if buffer.is_null() {
        return;
    }
    // SAFETY: made by `new_buffer` with Box::into_raw; freed once by contract.
    drop(unsafe { Box::from_raw(buffer.cast::<GuestBuffer>()) });
}

unsafe extern "C" fn free_string(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: made by `c_string` with CString::into_raw; freed once by contract.
        drop(unsafe { CString::from_raw(s) });
    }
}

unsafe extern "C" fn device_seconds(executable: *const EptcExecutable) -> f64 {
    // SAFETY: null or a live handle by contract.
    let Some(exe) = (unsafe { executable.cast::<GuestExecutable>().as_ref() }) else {
        return -1.0;
    };
    catch_unwind(AssertUnwindSafe(|| exe.exe.device_seconds()))
        .ok()
        .flatten()
        .unwrap_or(-1.0)
}

unsafe extern "C" fn kernels<G: Guest>(
    ir_text: *const c_char,
    batch: u64,
    dtype: u32,
    json: *mut *mut c_char,
    error: *mut *mut c_char,
) -> EptcStatus {
    // SAFETY: ABI contract on every pointer.
    unsafe {
        guard(error, || {
            let out = out_arg(json, "json")?;
            let text = str_arg(ir_text, "the IR text")?;
            let graph = eptc_ir::text::parse(text).map_err(|e| Fail::arg(format!("IR: {e}")))?;
            let batch = usize::try_from(batch).map_err(|_| Fail::arg("batch too large"))?;
            let ks = backend::<G>()?.kernels(&graph, batch, dtype_arg(dtype)?)?;
            let list: Vec<serde_json::Value> = ks
                .into_iter()
                .map(|k| {
                    serde_json::json!({"name": k.name, "extension": k.extension, "source": k.source})
                })
                .collect();
            *out = c_string(&serde_json::Value::Array(list).to_string());
            Ok(())
        })
    }
}
