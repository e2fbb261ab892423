//! The C ABI of an eptc backend plugin, version [`API_VERSION`].
//!
//! This module is the specification a plugin author implements, in C or in anything that
//! can export a C function; Rust plugins get all of it from [`crate::guest`] and
//! [`crate::export_backend!`]. The C declarations below are the Rust ones spelled in C;
//! `crates/eptc-plugin/include/eptc_plugin.h` is the header to include (the crate's tests
//! build a C plugin against it, `tests/c/negate_plugin.c`, and run it).
//!
//! # Loading
//!
//! A plugin is a dynamic library (`.so`) that exports one symbol, [`SYMBOL`]:
//!
//! ```c
//! const EptcPluginApi *eptc_plugin_api(void);
//! ```
//!
//! It returns a pointer to the plugin's function table, [`EptcPluginApi`], which must stay
//! valid (and unchanged) as long as the library is loaded — in practice a `static`. The
//! host then:
//!
//! 1. reads `struct_size` and refuses a table smaller than the header
//!    (`struct_size` + `api_version`);
//! 2. refuses an `api_version` other than its own [`API_VERSION`]
//!    (`"…/libfoo.so: API version 2, this eptc speaks 1"`);
//! 3. refuses a table whose `struct_size` does not cover every field of the version it
//!    speaks (`size_of::<EptcPluginApi>()`), and never reads past `struct_size`: later
//!    revisions of version 1 may only *append* fields, so a newer plugin works with an
//!    older host and the host can tell which appended fields an older plugin has. A change
//!    to the layout or the meaning of an existing field bumps [`API_VERSION`];
//! 4. refuses a table where a required entry is NULL (the optional ones say so);
//! 5. calls `init` once; a non-zero status refuses the plugin with the plugin's message;
//! 6. reads `name`, `version` and `capabilities` once and keeps copies.
//!
//! The host opens the library with `RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE`: it is never
//! unmapped, so threads the plugin started may outlive every handle safely.
//!
//! # Errors
//!
//! Every fallible entry returns an [`EptcStatus`]: [`EPTC_OK`] (0) or one of the
//! `EPTC_ERR_*` codes. On failure it also stores, through its last argument
//! (`char **error`), a NUL-terminated UTF-8 message allocated by the plugin, which the host
//! frees with `free_string`. The host passes a pointer to a NULL `char *`; the plugin
//! must accept a NULL `error` (then it writes no message) and writes nothing on success.
//! A message is a sentence for the user (`no value for parameter "head.weight"`), without
//! the plugin's name (the host adds it). Nothing may unwind or `longjmp` across the
//! boundary: a C++ exception or a Rust panic must be caught and returned as
//! [`EPTC_ERR_PANIC`] (or any other code) with a message.
//!
//! # Tensors
//!
//! Tensors cross the boundary as raw, dense, row-major buffers in native byte order, with a
//! dtype code (`EPTC_DTYPE_*`) and a shape of `u64` dimensions (rank 0 is a scalar with
//! one element; its shape pointer may be NULL). On the host side they are either
//! [`EptcTensorDesc`]s (host memory the plugin only reads during the call: weights,
//! parameter values) or *buffers*: opaque [`EptcBuffer`] handles of memory the plugin
//! owns (on its device), created by `buffer_alloc` or `run`, filled with `buffer_upload`,
//! read with `buffer_download`, and released with `buffer_free`.
//!
//! # Graphs
//!
//! A graph crosses as its text in the IR's text format (`ir-specs/README.md`; printed by
//! `eptc_ir::text::print`, parsed by `eptc_ir::text::parse`), whose first line carries the
//! format version (`eptc-ir 1 "name"`, `eptc_ir::text::FORMAT_VERSION`). A plugin refuses
//! a format version it does not read with [`EPTC_ERR_INVALID_ARGUMENT`]. The graph's
//! inputs have the symbolic batch dimension `B`, bound by the inputs of each `run`; its
//! `param` nodes are bound, by name, to the weights given to `compile`. Every op of the
//! graph is one the plugin listed in its capabilities (the host's optimizer only extracts
//! those, and lowers other fused ops to primitives); a plugin still refuses an op it
//! cannot run with [`EPTC_ERR_UNSUPPORTED`].
//!
//! # Ownership
//!
//! - Strings returned by `name` and `version` are static: never freed.
//! - Every other string the plugin returns (`error` messages, availability detail,
//!   capabilities, kernels) is the host's, freed with `free_string` exactly once.
//! - Executables (`compile`) are the host's, freed with `free_executable` exactly once.
//! - Buffers from `buffer_alloc` and the output buffers of `run` are the host's, freed with
//!   `buffer_free` exactly once (before or after the executable that made them).
//! - Everything the host passes in (IR text, descriptors, names, input buffers) stays the
//!   host's; the plugin copies what it keeps past the call.
//!
//! # Threads
//!
//! The host may call the table from any thread, and from several threads at once. It
//! never uses one executable or one buffer from two threads at the same time, but it may
//! use an executable or a buffer from a thread other than the one that created it.
//! `name`, `version`, `availability`, `capabilities`, `compile`, `kernels`, `buffer_*`,
//! `free_string` must be safe to call concurrently.

use std::ffi::{c_char, c_void};

/// The ABI version this crate defines (the plugin's `api_version` must equal it).
pub const API_VERSION: u32 = 1;

/// The one exported symbol: `const EptcPluginApi *eptc_plugin_api(void)`, NUL-terminated.
pub const SYMBOL: &[u8] = b"eptc_plugin_api\0";

/// The signature of [`SYMBOL`].
pub type GetApiFn = unsafe extern "C" fn() -> *const EptcPluginApi;

/// A status code: [`EPTC_OK`] or one of the `EPTC_ERR_*` constants (C: `int32_t`).
pub type EptcStatus = i32;

/// Success.
pub const EPTC_OK: EptcStatus = 0;
/// An argument is malformed: a NULL pointer where one is required, an unknown dtype code,
/// a byte length that does not match the shape, IR text that does not parse (or of an
/// unknown format version), an input missing or named twice, a wrong output count.
pub const EPTC_ERR_INVALID_ARGUMENT: EptcStatus = 1;
/// The graph uses an op (or the options a dtype) the plugin cannot run.
pub const EPTC_ERR_UNSUPPORTED: EptcStatus = 2;
/// The device is not usable here (driver missing, no device, out of device memory at
/// start-up). From `availability`, the normal "not available" answer.
pub const EPTC_ERR_UNAVAILABLE: EptcStatus = 3;
/// A `param` of the graph has no value among the weights given to `compile`, or
/// `set_param` names a parameter the graph does not have.
pub const EPTC_ERR_MISSING_PARAM: EptcStatus = 4;
/// A tensor's shape does not match the declared one (a weight, a parameter value, an
/// input of `run`, a buffer).
pub const EPTC_ERR_SHAPE_MISMATCH: EptcStatus = 5;
/// Anything else that went wrong inside the plugin (a device error, out of memory).
pub const EPTC_ERR_INTERNAL: EptcStatus = 6;
/// The plugin caught a panic / an exception; the message says what it was. The object
/// the call was working on (an executable, a buffer) may be left in any state but must
/// still be safe to free.
pub const EPTC_ERR_PANIC: EptcStatus = 7;

/// A short name for a status code (`"invalid argument"`, …; `"unknown"` for other codes).
pub fn status_name(status: EptcStatus) -> &'static str {
    match status {
        EPTC_OK => "ok",
        EPTC_ERR_INVALID_ARGUMENT => "invalid argument",
        EPTC_ERR_UNSUPPORTED => "unsupported",
        EPTC_ERR_UNAVAILABLE => "unavailable",
        EPTC_ERR_MISSING_PARAM => "missing parameter",
        EPTC_ERR_SHAPE_MISMATCH => "shape mismatch",
        EPTC_ERR_INTERNAL => "internal error",
        EPTC_ERR_PANIC => "panic",
        _ => "unknown",
    }
}

/// Dtype code (C: `uint32_t`): IEEE 754 binary32, 4 bytes.
pub const EPTC_DTYPE_F32: u32 = 0;
/// Dtype code: IEEE 754 binary16, 2 bytes.
pub const EPTC_DTYPE_F16: u32 = 1;
/// Dtype code: bfloat16 (the upper half of an f32), 2 bytes.
pub const EPTC_DTYPE_BF16: u32 = 2;

/// The dtype code of an IR dtype.
pub fn dtype_code(d: eptc_ir::DType) -> u32 {
    match d {
        eptc_ir::DType::F32 => EPTC_DTYPE_F32,
        eptc_ir::DType::F16 => EPTC_DTYPE_F16,
        eptc_ir::DType::BF16 => EPTC_DTYPE_BF16,
    }
}

/// The IR dtype of a dtype code, `None` for an unknown code.
pub fn dtype_from_code(code: u32) -> Option<eptc_ir::DType> {
    match code {
        EPTC_DTYPE_F32 => Some(eptc_ir::DType::F32),
        EPTC_DTYPE_F16 => Some(eptc_ir::DType::F16),
        EPTC_DTYPE_BF16 => Some(eptc_ir::DType::BF16),
        _ => None,
    }
}

/// An opaque compiled graph, owned by the plugin's allocator (C: `typedef struct
/// EptcExecutable EptcExecutable;`). Freed with `free_executable`.
#[repr(C)]
pub struct EptcExecutable {
    _opaque: [u8; 0],
}

/// An opaque tensor in the plugin's memory (C: `typedef struct EptcBuffer EptcBuffer;`).
/// Freed with `buffer_free`.
#[repr(C)]
pub struct EptcBuffer {
    _opaque: [u8; 0],
}

/// A named tensor in host memory, read by the plugin during the call only.
///
/// ```c
/// typedef struct {
///     const char *name;      /* NUL-terminated UTF-8 (the param's name) */
///     uint32_t dtype;        /* EPTC_DTYPE_* */
///     uint32_t rank;
///     const uint64_t *shape; /* rank dims; may be NULL when rank == 0 */
///     const void *data;      /* byte_len bytes, dense, row-major, native byte order */
///     size_t byte_len;       /* = product(shape) * size of dtype */
/// } EptcTensorDesc;
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EptcTensorDesc {
    /// The tensor's name (a `param`'s name for weights); NULL where the call names the
    /// tensor otherwise (`set_param`).
    pub name: *const c_char,
    /// `EPTC_DTYPE_*`. The host sends f32 today.
    pub dtype: u32,
    /// Number of dimensions.
    pub rank: u32,
    /// `rank` dimensions (NULL allowed when `rank` is 0).
    pub shape: *const u64,
    /// The elements; may be NULL when `byte_len` is 0.
    pub data: *const c_void,
    /// Length of `data` in bytes; must equal the element count times the dtype's size.
    pub byte_len: usize,
}

/// Options of `compile`.
///
/// ```c
/// typedef struct {
///     uint64_t threads; /* worker threads for host-side work; 0 = the plugin's default */
///     uint32_t dtype;   /* EPTC_DTYPE_*: storage type of the device's tensors */
/// } EptcCompileOptions;
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EptcCompileOptions {
    /// Worker threads (CPU-side work); 0: the plugin's default.
    pub threads: u64,
    /// Storage type of the device's tensors (`--dtype`); arithmetic accumulates in f32
    /// and buffers the host uploads and downloads are f32 regardless. A plugin refuses a
    /// dtype its capabilities lack with [`EPTC_ERR_UNSUPPORTED`].
    pub dtype: u32,
}

/// The function table, version 1. Every entry is a C function pointer; an entry the host
/// requires is refused when NULL. In C:
///
/// ```c
/// typedef struct {
///     size_t struct_size;   /* sizeof(EptcPluginApi) as the plugin was built */
///     uint32_t api_version; /* EPTC_API_VERSION, 1 */
///     const char *(*name)(void);
///     const char *(*version)(void);
///     int32_t (*init)(char **error);
///     int32_t (*availability)(char **detail);
///     int32_t (*capabilities)(char **json, char **error);
///     int32_t (*compile)(const char *ir_text, const EptcTensorDesc *weights,
///                        size_t n_weights, const EptcCompileOptions *options,
///                        EptcExecutable **executable, char **error);
///     int32_t (*set_param)(EptcExecutable *executable, const char *name,
///                          const EptcTensorDesc *value, char **error);
///     int32_t (*run)(EptcExecutable *executable, const char *const *input_names,
///                    EptcBuffer *const *inputs, size_t n_inputs,
///                    EptcBuffer **outputs, size_t n_outputs, char **error);
///     void (*free_executable)(EptcExecutable *executable);
///     int32_t (*buffer_alloc)(uint32_t dtype, uint32_t rank, const uint64_t *shape,
///                             EptcBuffer **buffer, char **error);
///     int32_t (*buffer_upload)(EptcBuffer *buffer, const void *data, size_t byte_len,
///                              char **error);
///     int32_t (*buffer_download)(const EptcBuffer *buffer, void *data, size_t byte_len,
///                                char **error);
///     int32_t (*buffer_info)(const EptcBuffer *buffer, uint32_t *dtype, uint32_t *rank,
///                            uint64_t *shape, uint32_t shape_capacity, char **error);
///     void (*buffer_free)(EptcBuffer *buffer);
///     void (*free_string)(char *s);
///     double (*device_seconds)(const EptcExecutable *executable);      /* optional */
///     int32_t (*kernels)(const char *ir_text, uint64_t batch, uint32_t dtype,
///                        char **json, char **error);                    /* optional */
/// } EptcPluginApi;
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EptcPluginApi {
    /// `sizeof(EptcPluginApi)` as the plugin was compiled. The host refuses a table too
    /// small for the fields of the version it speaks and never reads past it.
    pub struct_size: usize,
    /// Must equal [`API_VERSION`] (1).
    pub api_version: u32,

    /// The plugin's name, the backend's name on the command line (`--target NAME`): a
    /// static NUL-terminated UTF-8 string, short, without spaces (`"cpu-plugin"`).
    /// Required.
    pub name: Option<unsafe extern "C" fn() -> *const c_char>,
    /// The plugin's own version (`"0.1.0"`), static, NUL-terminated. Required.
    pub version: Option<unsafe extern "C" fn() -> *const c_char>,
    /// Called once right after loading, before any other entry but `name` and `version`
    /// (again if the library is loaded again: must be idempotent). Set up what every
    /// later call needs; a non-zero status refuses the plugin, with the message. Not
    /// finding a device is *not* a failure: report it through `availability`. Required.
    pub init: Option<unsafe extern "C" fn(error: *mut *mut c_char) -> EptcStatus>,
    /// Whether the plugin can run here: [`EPTC_OK`] when it can, `*detail` describing the
    /// device (`"NVIDIA H100, 80 GiB"`); [`EPTC_ERR_UNAVAILABLE`] when it cannot,
    /// `*detail` saying why in plain words (`"no device found"`). Any other code is read as
    /// unavailable. `*detail` (may be left NULL) is freed with `free_string`. Required.
    pub availability: Option<unsafe extern "C" fn(detail: *mut *mut c_char) -> EptcStatus>,
    /// What the plugin can run, as a JSON object in a NUL-terminated string stored in
    /// `*json` (freed with `free_string`):
    ///
    /// ```json
    /// {"ops": ["input", "param", "matmul", "add", ...],
    ///  "fused_ops": ["linear", "attention", ...],
    ///  "dtypes": ["f32", "bf16"]}
    /// ```
    ///
    /// `ops`: primitive op kinds, `fused_ops`: fused op kinds, both named as in
    /// `ir-specs/ops.toml`; `dtypes`: storage types for `EptcCompileOptions::dtype`
    /// (`"f32"`, `"f16"`, `"bf16"`). The optimizer extracts only listed ops. Missing keys
    /// read as empty lists; unknown keys and unknown dtype names are ignored (so the format
    /// can grow). Read once, at load. Required.
    pub capabilities:
        Option<unsafe extern "C" fn(json: *mut *mut c_char, error: *mut *mut c_char) -> EptcStatus>,
    /// Compile a graph: `ir_text` (NUL-terminated, the IR text format), the values of its
    /// parameters as `n_weights` descriptors (`weights` may be NULL when `n_weights` is 0;
    /// every descriptor named, the host sends those the graph's `param`s name, in f32),
    /// and `options` (never NULL). Stores a new executable in `*executable`.
    /// A `param` without a value is [`EPTC_ERR_MISSING_PARAM`], a value of the wrong shape
    /// [`EPTC_ERR_SHAPE_MISMATCH`]. The plugin copies (or uploads) the weights it needs:
    /// the descriptors' memory is only valid during the call. Required.
    pub compile: Option<
        unsafe extern "C" fn(
            ir_text: *const c_char,
            weights: *const EptcTensorDesc,
            n_weights: usize,
            options: *const EptcCompileOptions,
            executable: *mut *mut EptcExecutable,
            error: *mut *mut c_char,
        ) -> EptcStatus,
    >,
    /// Replace the value of parameter `name` (e.g. a new adapter) in an executable.
    /// `value->name` is ignored; the shape must be the declared one
    /// ([`EPTC_ERR_SHAPE_MISMATCH`] otherwise; [`EPTC_ERR_MISSING_PARAM`] for an unknown
    /// name). Later runs use the new value. Required.
    pub set_param: Option<
        unsafe extern "C" fn(
            executable: *mut EptcExecutable,
            name: *const c_char,
            value: *const EptcTensorDesc,
            error: *mut *mut c_char,
        ) -> EptcStatus,
    >,
    /// Run the graph once. `input_names[i]` (NUL-terminated) names the graph input whose
    /// value is `inputs[i]`, for `i < n_inputs`; the batch `B` is bound from their shapes.
    /// An input that is missing or named twice is [`EPTC_ERR_INVALID_ARGUMENT`]; one of the
    /// wrong shape [`EPTC_ERR_SHAPE_MISMATCH`]. The input buffers stay the host's (the
    /// plugin only reads them). On success the plugin stores `n_outputs` new buffers in
    /// `outputs`, one per graph output **in the order of the IR text's `output` lines**;
    /// `n_outputs` must equal their count ([`EPTC_ERR_INVALID_ARGUMENT`] otherwise). The
    /// output buffers are the host's (freed with `buffer_free`); their dtype may be any
    /// `EPTC_DTYPE_*` (the host converts to f32). On failure no output is stored. Required.
    pub run: Option<
        unsafe extern "C" fn(
            executable: *mut EptcExecutable,
            input_names: *const *const c_char,
            inputs: *const *mut EptcBuffer,
            n_inputs: usize,
            outputs: *mut *mut EptcBuffer,
            n_outputs: usize,
            error: *mut *mut c_char,
        ) -> EptcStatus,
    >,
    /// Free an executable (NULL: nothing). Buffers it made stay valid. Required.
    pub free_executable: Option<unsafe extern "C" fn(executable: *mut EptcExecutable)>,
    /// Allocate an uninitialised buffer of `dtype` and `shape` (`rank` dims; NULL allowed
    /// when `rank` is 0) in the plugin's memory; stores it in `*buffer`. Required.
    pub buffer_alloc: Option<
        unsafe extern "C" fn(
            dtype: u32,
            rank: u32,
            shape: *const u64,
            buffer: *mut *mut EptcBuffer,
            error: *mut *mut c_char,
        ) -> EptcStatus,
    >,
    /// Copy `byte_len` bytes from host memory into the whole buffer, in the buffer's dtype;
    /// `byte_len` must equal the buffer's size ([`EPTC_ERR_SHAPE_MISMATCH`] otherwise).
    /// Required.
    pub buffer_upload: Option<
        unsafe extern "C" fn(
            buffer: *mut EptcBuffer,
            data: *const c_void,
            byte_len: usize,
            error: *mut *mut c_char,
        ) -> EptcStatus,
    >,
    /// Copy the whole buffer into `byte_len` bytes of host memory, in the buffer's dtype;
    /// `byte_len` must equal the buffer's size. Returns when the data is there. Required.
    pub buffer_download: Option<
        unsafe extern "C" fn(
            buffer: *const EptcBuffer,
            data: *mut c_void,
            byte_len: usize,
            error: *mut *mut c_char,
        ) -> EptcStatus,
    >,
    /// A buffer's dtype and rank (stored in `*dtype`, `*rank`) and its first
    /// `min(rank, shape_capacity)` dims (stored in `shape[..]`, which may be NULL when
    /// `shape_capacity` is 0). A caller that got a rank above its capacity calls again
    /// with a larger array. Required.
    pub buffer_info: Option<
        unsafe extern "C" fn(
            buffer: *const EptcBuffer,
            dtype: *mut u32,
            rank: *mut u32,
            shape: *mut u64,
            shape_capacity: u32,
            error: *mut *mut c_char,
        ) -> EptcStatus,
    >,
    /// Free a buffer (NULL: nothing). Required.
    pub buffer_free: Option<unsafe extern "C" fn(buffer: *mut EptcBuffer)>,
    /// Free a string the plugin returned (NULL: nothing). Required.
    pub free_string: Option<unsafe extern "C" fn(s: *mut c_char)>,
    /// Seconds the device spent computing during the executable's last `run`, without the
    /// host copies, where the plugin can tell; a negative value when it cannot. Optional
    /// (NULL: never known).
    pub device_seconds: Option<unsafe extern "C" fn(executable: *const EptcExecutable) -> f64>,
    /// The kernels the plugin generates for a graph (`ir_text`) with the batch bound to
    /// `batch` and tensors stored as `dtype`, each checked by the plugin's own compiler,
    /// without needing the device: a JSON array in `*json` (freed with `free_string`) of
    /// `{"name": "n42_matmul", "extension": "cu", "source": "..."}` in execution order
    /// (`[]` for plugins that generate no code). `eptc compile --emit kernels` writes them.
    /// Optional (NULL: no kernels).
    pub kernels: Option<
        unsafe extern "C" fn(
            ir_text: *const c_char,
            batch: u64,
            dtype: u32,
            json: *mut *mut c_char,
            error: *mut *mut c_char,
        ) -> EptcStatus,
    >,
}

/// The size of the header every version shares (`struct_size` and `api_version`).
pub const HEADER_SIZE: usize =
    std::mem::offset_of!(EptcPluginApi, api_version) + std::mem::size_of::<u32>();

/// The size of a version-1 table with every field this crate knows.
pub const V1_SIZE: usize = std::mem::size_of::<EptcPluginApi>();
