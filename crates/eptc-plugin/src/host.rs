//! The host side: load a plugin library, check its table, and drive it as an
//! [`eptc_backend::Backend`], so a plugin goes through the same code path as a built-in
//! backend.

use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use eptc_backend::{
    Availability, Backend, BackendError, Capabilities, CompileOptions, Executable, KernelSource,
    Result,
};
use eptc_ir::{DType, Graph, HostTensor, WeightStore};
use half::{bf16, f16};
use thiserror::Error;

use crate::abi::*;

/// Why a plugin was refused: names the library and the reason
/// (`"…/libfoo.so: API version 2, this eptc speaks 1"`).
#[derive(Debug, Error)]
#[error("{}: {reason}", path.display())]
pub struct PluginError {
    /// The library's path, as given.
    pub path: PathBuf,
    /// What is wrong, in plain words.
    pub reason: String,
}

/// The loaded library, its table and what was read from it at load.
struct Inner {
    api: EptcPluginApi,
    path: PathBuf,
    name: String,
    version: String,
    capabilities: Capabilities,
    /// Keeps the code of `api` mapped while any backend or executable uses it (`None`
    /// for a table of this process, in tests).
    _library: Option<Arc<libloading::Library>>,
}

/// A backend plugin loaded from a dynamic library (see [`crate::abi`]).
#[derive(Clone)]
pub struct PluginBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for PluginBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginBackend")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("path", &self.inner.path)
            .finish()
    }
}

/// `dlopen` flags: resolve everything now, keep the plugin's symbols to itself, and never
/// unmap it (a plugin's worker threads may outlive its last handle).
#[cfg(unix)]
fn open(path: &Path) -> std::result::Result<libloading::Library, libloading::Error> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    const RTLD_NODELETE: std::os::raw::c_int = 0x80;
    #[cfg(not(any(target_os = "macos", target_os = "ios")))]
    const RTLD_NODELETE: std::os::raw::c_int = 0x1000;
    // SAFETY: loading a library runs its initialisers; loading a plugin means trusting it.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) }.map(Into::into)
}

#[cfg(not(unix))]
fn open(path: &Path) -> std::result::Result<libloading::Library, libloading::Error> {
    // SAFETY: as above.
    unsafe { libloading::Library::new(path) }
}

/// The names of the entries a version-1 host needs.
fn missing_entries(api: &EptcPluginApi) -> Vec<&'static str> {
    let required = [
        ("name", api.name.is_some()),
        ("version", api.version.is_some()),
        ("init", api.init.is_some()),
        ("availability", api.availability.is_some()),
        ("capabilities", api.capabilities.is_some()),
        ("compile", api.compile.is_some()),
        ("set_param", api.set_param.is_some()),
        ("run", api.run.is_some()),
        ("free_executable", api.free_executable.is_some()),
        ("buffer_alloc", api.buffer_alloc.is_some()),
        ("buffer_upload", api.buffer_upload.is_some()),
        ("buffer_download", api.buffer_download.is_some()),
        ("buffer_info", api.buffer_info.is_some()),
        ("buffer_free", api.buffer_free.is_some()),
        ("free_string", api.free_string.is_some()),
    ];
    required
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(n, _)| n)
        .collect()
}

/// A static string from the plugin (`name`, `version`).
///
/// # Safety
/// `f` is an entry of a validated table.
unsafe fn static_str(
    f: unsafe extern "C" fn() -> *const c_char,
    what: &str,
) -> Result<String, String> {
    // SAFETY: the table's contract.
    let p = unsafe { f() };
    if p.is_null() {
        return Err(format!("its {what} is NULL"));
    }
    // SAFETY: non-null, NUL-terminated by contract.
    let s = unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| format!("its {what} is not valid UTF-8"))?;
    if s.is_empty() {
        return Err(format!("its {what} is empty"));
    }
    Ok(s.to_owned())
}

/// Parse the capabilities JSON (see [`EptcPluginApi::capabilities`]).
pub fn parse_capabilities(json: &str) -> std::result::Result<Capabilities, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not valid JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let list = |key: &str| -> std::result::Result<Vec<String>, String> {
        match obj.get(key) {
            None => Ok(vec![]),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{key:?} holds a non-string: {x}"))
                })
                .collect(),
            Some(other) => Err(format!("{key:?} is not a list: {other}")),
        }
    };
    Ok(Capabilities {
        ops: list("ops")?,
        fused_ops: list("fused_ops")?,
        dtypes: list("dtypes")?
            .iter()
            .filter_map(|d| DType::from_name(d))
            .collect(),
    })
}

impl Inner {
    /// Take a plugin-allocated string (may be null), freeing it.
    fn take_string(&self, p: *mut c_char) -> Option<String> {
        if p.is_null() {
            return None;
        }
        // SAFETY: a NUL-terminated string from the plugin, owned by us until freed.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: freed once, through the plugin's own allocator.
        unsafe { (self.api.free_string.unwrap())(p) };
        Some(s)
    }

    /// The message of a failed call, with the plugin's name.
    fn message(&self, status: EptcStatus, error: *mut c_char) -> String {
        let msg = self
            .take_string(error)
            .unwrap_or_else(|| format!("{} (no message)", status_name(status)));
        if status == EPTC_ERR_PANIC {
            format!("plugin {} panicked: {msg}", self.name)
        } else {
            format!("plugin {}: {msg}", self.name)
        }
    }

    /// Turn a call's status into a result.
    fn check(&self, status: EptcStatus, error: *mut c_char) -> Result<()> {
        if status == EPTC_OK {
            // A plugin that wrote a message anyway: do not leak it.
            self.take_string(error);
            return Ok(());
        }
        let msg = self.message(status, error);
        Err(if status == EPTC_ERR_UNAVAILABLE {
            BackendError::Unavailable(msg)
        } else {
            BackendError::Other(msg)
        })
    }
}

impl PluginBackend {
    /// Load the plugin at `path`: open the library, find [`SYMBOL`], check the table
    /// (size, [`API_VERSION`], required entries) and call its `init`. Every refusal is a
    /// [`PluginError`] naming the path and the reason.
    pub fn load(path: &Path) -> std::result::Result<PluginBackend, PluginError> {
        let err = |reason: String| PluginError {
            path: path.to_owned(),
            reason,
        };
        if path.components().count() > 1 && !path.exists() {
            return Err(err("no such file".into()));
        }
        let library = open(path).map_err(|e| err(format!("cannot load the library: {e}")))?;
        // SAFETY: the symbol's type is the ABI's; a library exporting the name with
        // another type is not a plugin and breaks its promise.
        let get: GetApiFn = match unsafe { library.get::<GetApiFn>(SYMBOL) } {
            Ok(f) => *f,
            Err(_) => {
                return Err(err(
                    "does not export eptc_plugin_api (not an eptc backend plugin)".into(),
                ))
            }
        };
        // SAFETY: the plugin's entry point, per the ABI.
        let table = unsafe { get() };
        // SAFETY: the table, if non-null, is the plugin's static (the ABI's contract), and
        // the library stays loaded as long as the backend lives.
        unsafe { Self::from_table(path, table, Some(Arc::new(library))) }
    }

    /// Check a function table and initialise its plugin, as [`PluginBackend::load`] does
    /// after finding the symbol (exposed for tests of the validation).
    ///
    /// # Safety
    /// `table` is null or points to at least `HEADER_SIZE` readable bytes and then to
    /// as many as its `struct_size` says, and its entries follow the ABI; `library`
    /// holds the code they point to (or it is this process's).
    #[doc(hidden)]
    pub unsafe fn from_table(
        path: &Path,
        table: *const EptcPluginApi,
        library: Option<Arc<libloading::Library>>,
    ) -> std::result::Result<PluginBackend, PluginError> {
        let err = |reason: String| PluginError {
            path: path.to_owned(),
            reason,
        };
        if table.is_null() {
            return Err(err("eptc_plugin_api returned a NULL function table".into()));
        }
        // SAFETY: at least the header is readable (caller's contract).
        let size = unsafe { ptr::addr_of!((*table).struct_size).read_unaligned() };
        if size < HEADER_SIZE {
            return Err(err(format!(
                "its function table declares {size} bytes, less than the {HEADER_SIZE}-byte header \
                 (struct_size and api_version)"
            )));
        }
        // SAFETY: within the header.
        let version = unsafe { ptr::addr_of!((*table).api_version).read_unaligned() };
        if version != API_VERSION {
            return Err(err(format!(
                "API version {version}, this eptc speaks {API_VERSION}"
            )));
        }
        if size < V1_SIZE {
            return Err(err(format!(
                "its function table has {size} bytes, API version {API_VERSION} needs {V1_SIZE} \
                 (struct_size too small: built against an incomplete header?)"
            )));
        }
        // SAFETY: `size >= V1_SIZE` bytes are readable; the table is a `repr(C)` struct of
        // integers and nullable function pointers, valid for any bits a C plugin may
        // put there in the fields we read.
        let api = unsafe { ptr::read_unaligned(table) };
        let missing = missing_entries(&api);
        if !missing.is_empty() {
            return Err(err(format!(
                "its function table lacks required entries: {}",
                missing.join(", ")
            )));
        }
        // SAFETY: the entries were checked non-null; they follow the ABI.
        let name = unsafe { static_str(api.name.unwrap(), "name") }.map_err(err)?;
        // SAFETY: as above.
        let plugin_version = unsafe { static_str(api.version.unwrap(), "version") }.map_err(err)?;
        let mut inner = Inner {
            api,
            path: path.to_owned(),
            name,
            version: plugin_version,
            capabilities: Capabilities::default(),
            _library: library,
        };
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: init with a valid out-pointer.
        let status = unsafe { (api.init.unwrap())(&mut error) };
        if status != EPTC_OK {
            let msg = inner
                .take_string(error)
                .unwrap_or_else(|| "no message".into());
            return Err(err(format!(
                "plugin {} failed to initialise ({}): {msg}",
                inner.name,
                status_name(status)
            )));
        }
        inner.take_string(error);
        let mut json: *mut c_char = ptr::null_mut();
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: valid out-pointers.
        let status = unsafe { (api.capabilities.unwrap())(&mut json, &mut error) };
        if status != EPTC_OK {
            inner.take_string(json);
            let msg = inner.message(status, error);
            return Err(err(format!("cannot read its capabilities: {msg}")));
        }
        inner.take_string(error);
        let json = inner
            .take_string(json)
            .ok_or_else(|| err("its capabilities are NULL".into()))?;
        inner.capabilities = parse_capabilities(&json)
            .map_err(|e| err(format!("its capabilities are malformed: {e}")))?;
        Ok(PluginBackend {
            inner: Arc::new(inner),
        })
    }

    /// The library's path, as given to [`PluginBackend::load`].
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The plugin's own version string.
    pub fn plugin_version(&self) -> &str {
        &self.inner.version
    }
}

/// Descriptors of host tensors, with the storage their pointers point into.
struct Descs {
    _names: Vec<CString>,
    _shapes: Vec<Vec<u64>>,
    descs: Vec<EptcTensorDesc>,
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8; same length in bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn c_name(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| BackendError::Other(format!("name {name:?} contains a NUL")))
}

fn descs<'a>(
    tensors: impl IntoIterator<Item = (Option<&'a str>, &'a HostTensor)>,
) -> Result<Descs> {
    let mut d = Descs {
        _names: vec![],
        _shapes: vec![],
        descs: vec![],
    };
    for (name, t) in tensors {
        let name_ptr = match name {
            Some(n) => {
                let c = c_name(n)?;
                let p = c.as_ptr();
                d._names.push(c);
                p
            }
            None => ptr::null(),
        };
        let shape: Vec<u64> = t.shape.iter().map(|&x| x as u64).collect();
        let data = t.data();
        d.descs.push(EptcTensorDesc {
            name: name_ptr,
            dtype: EPTC_DTYPE_F32,
            rank: shape.len() as u32,
            shape: if shape.is_empty() {
                ptr::null()
            } else {
                shape.as_ptr()
            },
            data: data.as_ptr().cast::<c_void>(),
            byte_len: std::mem::size_of_val(data),
        });
        // Moving the Vec keeps its heap buffer where `shape.as_ptr()` points.
        d._shapes.push(shape);
    }
    Ok(d)
}

impl Backend for PluginBackend {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn availability(&self) -> Availability {
        let mut detail: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: a valid out-pointer.
        let status = unsafe { (self.inner.api.availability.unwrap())(&mut detail) };
        let detail = self.inner.take_string(detail).unwrap_or_default();
        match status {
            EPTC_OK => Availability::Available(detail),
            EPTC_ERR_UNAVAILABLE if !detail.is_empty() => Availability::Unavailable(detail),
            s => Availability::Unavailable(if detail.is_empty() {
                status_name(s).to_owned()
            } else {
                format!("{}: {detail}", status_name(s))
            }),
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities.clone()
    }

    fn compile(
        &self,
        graph: &Graph,
        weights: &WeightStore,
        opts: &CompileOptions,
    ) -> Result<Box<dyn Executable>> {
        let text = eptc_ir::text::print(graph)
            .map_err(|e| BackendError::Other(format!("cannot print the graph: {e}")))?;
        let text = CString::new(text)
            .map_err(|_| BackendError::Other("the graph's text contains a NUL".into()))?;
        // The values of the graph's params, each once; a missing one is the plugin's to
        // report (its message names it).
        let mut names: Vec<&str> = graph.params().into_iter().map(|(_, n, _)| n).collect();
        names.sort_unstable();
        names.dedup();
        let values = names
            .into_iter()
            .filter_map(|n| weights.get(n).map(|t| (Some(n), t)));
        let d = descs(values)?;
        let options = EptcCompileOptions {
            threads: opts.threads.map_or(0, |t| t as u64),
            dtype: dtype_code(opts.dtype),
        };
        let mut exe: *mut EptcExecutable = ptr::null_mut();
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: every pointer valid for the call.
        let status = unsafe {
            (self.inner.api.compile.unwrap())(
                text.as_ptr(),
                if d.descs.is_empty() {
                    ptr::null()
                } else {
                    d.descs.as_ptr()
                },
                d.descs.len(),
                &options,
                &mut exe,
                &mut error,
            )
        };
        self.inner.check(status, error)?;
        let exe = NonNull::new(exe).ok_or_else(|| {
            BackendError::Other(format!(
                "plugin {}: compile succeeded without an executable",
                self.inner.name
            ))
        })?;
        Ok(Box::new(PluginExecutable {
            inner: self.inner.clone(),
            exe,
            outputs: graph.outputs().iter().map(|(n, _)| n.clone()).collect(),
        }))
    }

    fn kernels(&self, graph: &Graph, batch: usize, dtype: DType) -> Result<Vec<KernelSource>> {
        let Some(kernels) = self.inner.api.kernels else {
            return Ok(vec![]);
        };
        let text = eptc_ir::text::print(graph)
            .map_err(|e| BackendError::Other(format!("cannot print the graph: {e}")))?;
        let text = CString::new(text)
            .map_err(|_| BackendError::Other("the graph's text contains a NUL".into()))?;
        let mut json: *mut c_char = ptr::null_mut();
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: valid pointers.
        let status = unsafe {
            kernels(
                text.as_ptr(),
                batch as u64,
                dtype_code(dtype),
                &mut json,
                &mut error,
            )
        };
        if let Err(e) = self.inner.check(status, error) {
            self.inner.take_string(json);
            return Err(e);
        }
        let json = self.inner.take_string(json).unwrap_or_else(|| "[]".into());
        let bad = |why: String| {
            BackendError::Other(format!(
                "plugin {}: malformed kernels: {why}",
                self.inner.name
            ))
        };
        let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
        let list = v.as_array().ok_or_else(|| bad("not a JSON array".into()))?;
        list.iter()
            .map(|k| {
                let field = |f: &str| {
                    k.get(f)
                        .and_then(|x| x.as_str())
                        .map(str::to_owned)
                        .ok_or_else(|| bad(format!("an entry lacks {f:?}")))
                };
                Ok(KernelSource {
                    name: field("name")?,
                    extension: field("extension")?,
                    source: field("source")?,
                })
            })
            .collect()
    }
}

/// A buffer of the plugin, freed on drop.
struct Buffer<'a> {
    inner: &'a Inner,
    ptr: *mut EptcBuffer,
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        // SAFETY: a live buffer of this plugin, freed once.
        unsafe { (self.inner.api.buffer_free.unwrap())(self.ptr) }
    }
}

impl Inner {
    fn upload(&self, t: &HostTensor) -> Result<Buffer<'_>> {
        let shape: Vec<u64> = t.shape.iter().map(|&x| x as u64).collect();
        let mut ptr: *mut EptcBuffer = ptr::null_mut();
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: valid pointers.
        let status = unsafe {
            (self.api.buffer_alloc.unwrap())(
                EPTC_DTYPE_F32,
                shape.len() as u32,
                if shape.is_empty() {
                    ptr::null()
                } else {
                    shape.as_ptr()
                },
                &mut ptr,
                &mut error,
            )
        };
        self.check(status, error)?;
        if ptr.is_null() {
            return Err(BackendError::Other(format!(
                "plugin {}: buffer_alloc succeeded without a buffer",
                self.name
            )));
        }
        let buf = Buffer { inner: self, ptr };
        let bytes = f32_bytes(t.data());
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: `bytes` valid for the call.
        let status = unsafe {
            (self.api.buffer_upload.unwrap())(
                buf.ptr,
                bytes.as_ptr().cast(),
                bytes.len(),
                &mut error,
            )
        };
        self.check(status, error)?;
        Ok(buf)
    }

    fn download(&self, buf: &Buffer<'_>) -> Result<HostTensor> {
        let mut dtype = 0u32;
        let mut rank = 0u32;
        let mut shape = vec![0u64; 8];
        loop {
            let mut error: *mut c_char = ptr::null_mut();
            // SAFETY: the ABI: valid out-pointers, `shape` has `shape.len()` slots.
            let status = unsafe {
                (self.api.buffer_info.unwrap())(
                    buf.ptr,
                    &mut dtype,
                    &mut rank,
                    shape.as_mut_ptr(),
                    shape.len() as u32,
                    &mut error,
                )
            };
            self.check(status, error)?;
            if rank as usize <= shape.len() {
                shape.truncate(rank as usize);
                break;
            }
            shape = vec![0; rank as usize];
        }
        let bad = |why: String| BackendError::Other(format!("plugin {}: {why}", self.name));
        let dt =
            dtype_from_code(dtype).ok_or_else(|| bad(format!("unknown dtype code {dtype}")))?;
        let shape: Vec<usize> = shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("output shape {shape:?} too large")))?;
        let n = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|n| n.checked_mul(4).is_some())
            .ok_or_else(|| bad(format!("output shape {shape:?} too large")))?;
        let mut values = vec![0f32; n];
        let byte_len = n * dt.size_bytes();
        // f32 lands in place; f16/bf16 go to the front of the same allocation, then widen.
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: `values` holds at least `byte_len` bytes.
        let status = unsafe {
            (self.api.buffer_download.unwrap())(
                buf.ptr,
                values.as_mut_ptr().cast(),
                byte_len,
                &mut error,
            )
        };
        self.check(status, error)?;
        if dt != DType::F32 {
            let halves: Vec<u16> = f32_bytes(&values)[..byte_len]
                .chunks_exact(2)
                .map(|c| u16::from_ne_bytes([c[0], c[1]]))
                .collect();
            for (v, h) in values.iter_mut().zip(halves) {
                *v = if dt == DType::F16 {
                    f16::from_bits(h).to_f32()
                } else {
                    bf16::from_bits(h).to_f32()
                };
            }
        }
        Ok(HostTensor::new(shape, values))
    }
}

/// A graph compiled by a plugin; frees its handle on drop. Holds the plugin (and its
/// library) alive.
struct PluginExecutable {
    inner: Arc<Inner>,
    exe: NonNull<EptcExecutable>,
    /// The graph's outputs in order (the order of the IR text's `output` lines).
    outputs: Vec<String>,
}

// SAFETY: the ABI allows an executable to be used from any thread, one at a time; the
// `&mut self` methods give exactly that.
unsafe impl Send for PluginExecutable {}

impl Drop for PluginExecutable {
    fn drop(&mut self) {
        // SAFETY: a live executable of this plugin, freed once.
        unsafe { (self.inner.api.free_executable.unwrap())(self.exe.as_ptr()) }
    }
}

impl Executable for PluginExecutable {
    fn set_param(&mut self, name: &str, value: HostTensor) -> Result<()> {
        let cname = c_name(name)?;
        let d = descs([(None, &value)])?;
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: valid pointers for the call.
        let status = unsafe {
            (self.inner.api.set_param.unwrap())(
                self.exe.as_ptr(),
                cname.as_ptr(),
                &d.descs[0],
                &mut error,
            )
        };
        self.inner.check(status, error)
    }

    fn run(&mut self, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let inner = &*self.inner;
        let names = inputs
            .iter()
            .map(|(n, _)| c_name(n))
            .collect::<Result<Vec<_>>>()?;
        let bufs = inputs
            .iter()
            .map(|(_, t)| inner.upload(t))
            .collect::<Result<Vec<_>>>()?;
        let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let buf_ptrs: Vec<*mut EptcBuffer> = bufs.iter().map(|b| b.ptr).collect();
        let mut outs: Vec<*mut EptcBuffer> = vec![ptr::null_mut(); self.outputs.len()];
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: the ABI: arrays of `n_inputs` / `n_outputs` valid entries.
        let status = unsafe {
            (inner.api.run.unwrap())(
                self.exe.as_ptr(),
                name_ptrs.as_ptr(),
                buf_ptrs.as_ptr(),
                inputs.len(),
                outs.as_mut_ptr(),
                outs.len(),
                &mut error,
            )
        };
        inner.check(status, error)?;
        // Own every output before anything can fail, so none leaks.
        let outs: Vec<Option<Buffer<'_>>> = outs
            .into_iter()
            .map(|ptr| (!ptr.is_null()).then_some(Buffer { inner, ptr }))
            .collect();
        drop(bufs);
        self.outputs
            .iter()
            .zip(&outs)
            .map(|(name, b)| {
                let b = b.as_ref().ok_or_else(|| {
                    BackendError::Other(format!(
                        "plugin {}: no buffer for output {name:?}",
                        inner.name
                    ))
                })?;
                Ok((name.clone(), inner.download(b)?))
            })
            .collect()
    }

    fn device_seconds(&self) -> Option<f64> {
        let f = self.inner.api.device_seconds?;
        // SAFETY: the ABI: a live executable.
        let s = unsafe { f(self.exe.as_ptr()) };
        (s >= 0.0 && s.is_finite()).then_some(s)
    }
}
