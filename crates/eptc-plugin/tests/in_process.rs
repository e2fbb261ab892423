//! The guest adapter and the host's checks, in one process: tables built by
//! `eptc_plugin::guest` (and `export_backend!`) handed to `PluginBackend::from_table`,
//! so the refusals (API version, table size, NULL entries, failing init) and the
//! handling of panics are tested without building a library for each case; and the raw
//! C surface (buffers, bad arguments) called as a C host would.

use std::ffi::{c_char, CStr};
use std::path::Path;
use std::ptr;

use eptc_backend::{
    Availability, Backend, BackendError, Capabilities, CompileOptions, Executable, Result,
};
use eptc_cpu::CpuBackend;
use eptc_ir::{Graph, HostTensor, Shape, TensorType, UnaryOp, WeightStore};
use eptc_plugin::abi::*;
use eptc_plugin::guest::{table, Guest, Slot};
use eptc_plugin::PluginBackend;

// The macro, as a plugin crate uses it (here it exports the symbol from the test binary).
eptc_plugin::export_backend!(
    name = "cpu-in-process",
    version = "9.9.9",
    backend = CpuBackend::new()
);

fn relu_graph(name: &str) -> Graph {
    let mut g = Graph::new(name);
    let x = g.input("x", TensorType::f32(Shape::batched(&[3])));
    let y = g.unary(UnaryOp::Relu, x).unwrap();
    g.set_output("y", y);
    g
}

/// SAFETY wrapper: load a table of this process.
fn from_table(path: &str, t: &EptcPluginApi) -> std::result::Result<PluginBackend, String> {
    // SAFETY: `t` is a complete table of this process.
    unsafe { PluginBackend::from_table(Path::new(path), t, None) }.map_err(|e| e.to_string())
}

fn cpu_table() -> EptcPluginApi {
    // SAFETY: the function the macro exported, called as the host would.
    unsafe { *eptc_plugin_api() }
}

#[test]
fn the_macro_exports_a_working_table() {
    let t = cpu_table();
    assert_eq!(t.struct_size, std::mem::size_of::<EptcPluginApi>());
    assert_eq!(t.api_version, API_VERSION);
    let be = from_table("/in-process/cpu", &t).unwrap();
    assert_eq!(be.name(), "cpu-in-process");
    assert_eq!(be.plugin_version(), "9.9.9");
    assert_eq!(be.capabilities(), CpuBackend::new().capabilities());
    let mut exe = be
        .compile(
            &relu_graph("relu"),
            &WeightStore::new(),
            &CompileOptions::default(),
        )
        .unwrap();
    let out = exe
        .run(&[(
            "x",
            HostTensor::new(vec![2, 3], vec![-1.0, 0.5, 2.0, 3.0, -0.0, -7.0]),
        )])
        .unwrap();
    assert_eq!(out[0].0, "y");
    assert_eq!(out[0].1.shape, vec![2, 3]);
    assert_eq!(out[0].1.data(), &[0.0, 0.5, 2.0, 3.0, 0.0, 0.0]);
}

// ---- refusals ----------------------------------------------------------------------

#[test]
fn another_api_version_is_refused() {
    let mut t = cpu_table();
    t.api_version = 2;
    let e = from_table("/opt/x/libfoo.so", &t).unwrap_err();
    assert_eq!(e, "/opt/x/libfoo.so: API version 2, this eptc speaks 1");
}

#[test]
fn a_table_smaller_than_version_1_is_refused() {
    let mut t = cpu_table();
    t.struct_size = V1_SIZE - std::mem::size_of::<usize>();
    let e = from_table("/opt/x/libfoo.so", &t).unwrap_err();
    assert!(
        e.starts_with("/opt/x/libfoo.so: its function table has"),
        "{e}"
    );
    assert!(e.contains("struct_size too small"), "{e}");

    t.struct_size = 4;
    let e = from_table("/opt/x/libfoo.so", &t).unwrap_err();
    assert!(e.contains("less than the"), "{e}");
}

#[test]
fn a_larger_table_of_a_newer_revision_is_accepted() {
    // A later revision of version 1 appends fields: the host reads what it knows.
    #[repr(C)]
    struct Newer {
        v1: EptcPluginApi,
        extra: usize,
    }
    let mut n = Newer {
        v1: cpu_table(),
        extra: 42,
    };
    n.v1.struct_size = std::mem::size_of::<Newer>();
    // SAFETY: a table followed by the appended field, `struct_size` bytes in all.
    let be = unsafe { PluginBackend::from_table(Path::new("newer"), &n.v1, None) }.unwrap();
    assert_eq!(be.name(), "cpu-in-process");
    assert_eq!(n.extra, 42);
}

#[test]
fn a_null_table_or_entry_is_refused() {
    // SAFETY: NULL is checked first.
    let e = unsafe { PluginBackend::from_table(Path::new("/p/libnull.so"), ptr::null(), None) }
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "/p/libnull.so: eptc_plugin_api returned a NULL function table"
    );

    let mut t = cpu_table();
    t.run = None;
    t.buffer_free = None;
    let e = from_table("/p/libfoo.so", &t).unwrap_err();
    assert_eq!(
        e,
        "/p/libfoo.so: its function table lacks required entries: run, buffer_free"
    );

    // The optional entries may be NULL.
    let mut t = cpu_table();
    t.kernels = None;
    t.device_seconds = None;
    let be = from_table("/p/libfoo.so", &t).unwrap();
    assert!(be
        .kernels(&relu_graph("r"), 1, eptc_ir::DType::F32)
        .unwrap()
        .is_empty());
}

struct FailingGuest;
impl Guest for FailingGuest {
    const NAME: &'static CStr = c"failing";
    const VERSION: &'static CStr = c"0.0.1";
    fn create() -> std::result::Result<Box<dyn Backend>, String> {
        Err("no driver for the XPU 9000 (libxpu.so.3 not found)".into())
    }
    fn slot() -> &'static Slot {
        static SLOT: Slot = Slot::new();
        &SLOT
    }
}

struct PanickingInitGuest;
impl Guest for PanickingInitGuest {
    const NAME: &'static CStr = c"panicking-init";
    const VERSION: &'static CStr = c"0.0.1";
    fn create() -> std::result::Result<Box<dyn Backend>, String> {
        panic!("driver table corrupt")
    }
    fn slot() -> &'static Slot {
        static SLOT: Slot = Slot::new();
        &SLOT
    }
}

#[test]
fn a_failing_init_is_refused_with_its_message() {
    let e = from_table("/p/libxpu.so", &table::<FailingGuest>()).unwrap_err();
    assert_eq!(
        e,
        "/p/libxpu.so: plugin failing failed to initialise (internal error): \
         no driver for the XPU 9000 (libxpu.so.3 not found)"
    );
    let e = from_table("/p/libxpu.so", &table::<PanickingInitGuest>()).unwrap_err();
    assert_eq!(
        e,
        "/p/libxpu.so: plugin panicking-init failed to initialise (panic): driver table corrupt"
    );
}

#[test]
fn entries_called_before_init_fail_cleanly() {
    let t = table::<FailingGuest>();
    let mut json: *mut c_char = ptr::null_mut();
    let mut error: *mut c_char = ptr::null_mut();
    // SAFETY: valid out-pointers, as the ABI says.
    let status = unsafe { (t.capabilities.unwrap())(&mut json, &mut error) };
    assert_eq!(status, EPTC_ERR_UNAVAILABLE);
    assert!(json.is_null());
    let msg = take(&t, error);
    assert!(msg.contains("not initialised"), "{msg}");
}

// ---- panics ------------------------------------------------------------------------

/// A backend that panics everywhere it can.
struct Boom;

struct BoomExe;

impl Executable for BoomExe {
    fn set_param(&mut self, name: &str, _: HostTensor) -> Result<()> {
        panic!("set_param {name} exploded")
    }
    fn run(&mut self, _: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        panic!("index out of bounds: kernel n3 read past its buffer")
    }
}

impl Backend for Boom {
    fn name(&self) -> &str {
        "boom"
    }
    fn availability(&self) -> Availability {
        panic!("no availability today")
    }
    fn capabilities(&self) -> Capabilities {
        CpuBackend::new().capabilities()
    }
    fn compile(
        &self,
        g: &Graph,
        _: &WeightStore,
        _: &CompileOptions,
    ) -> Result<Box<dyn Executable>> {
        if g.name == "panic" {
            panic!("compile exploded on {}", g.name);
        }
        if g.name == "error" {
            return Err(BackendError::Unavailable("the XPU fell off the bus".into()));
        }
        Ok(Box::new(BoomExe))
    }
}

struct BoomGuest;
impl Guest for BoomGuest {
    const NAME: &'static CStr = c"boom";
    const VERSION: &'static CStr = c"1.0.0";
    fn create() -> std::result::Result<Box<dyn Backend>, String> {
        Ok(Box::new(Boom))
    }
    fn slot() -> &'static Slot {
        static SLOT: Slot = Slot::new();
        &SLOT
    }
}

static BOOM: EptcPluginApi = table::<BoomGuest>();

#[test]
fn a_panic_in_the_plugin_is_an_error() {
    let be = from_table("/p/libboom.so", &BOOM).unwrap();
    let w = WeightStore::new();
    let o = CompileOptions::default();

    let e = be
        .compile(&relu_graph("panic"), &w, &o)
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "plugin boom panicked: compile exploded on panic");

    let e = be.compile(&relu_graph("error"), &w, &o).err().unwrap();
    assert!(matches!(e, BackendError::Unavailable(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "backend unavailable: plugin boom: the XPU fell off the bus"
    );

    let mut exe = be.compile(&relu_graph("ok"), &w, &o).unwrap();
    let e = exe
        .run(&[("x", HostTensor::zeros(vec![1, 3]))])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("plugin boom panicked: index out of bounds"),
        "{e}"
    );
    let e = exe
        .set_param("p", HostTensor::zeros(vec![1]))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "plugin boom panicked: set_param p exploded");
    // Still safe to use and to free after the panics.
    assert!(exe.run(&[]).is_err());
    drop(exe);

    match be.availability() {
        Availability::Unavailable(why) => assert_eq!(why, "panic: no availability today"),
        a => panic!("{a:?}"),
    }
}

// ---- the raw C surface -------------------------------------------------------------

fn take(t: &EptcPluginApi, s: *mut c_char) -> String {
    assert!(!s.is_null(), "no message");
    // SAFETY: a plugin string, freed once.
    let m = unsafe { CStr::from_ptr(s) }.to_str().unwrap().to_owned();
    unsafe { (t.free_string.unwrap())(s) };
    m
}

#[test]
fn buffers_round_trip_every_dtype() {
    let t = cpu_table();
    let values = [1.5f32, -2.25, 0.0, 1024.0, 3.0e-3, -7.0];
    for (code, size) in [
        (EPTC_DTYPE_F32, 4),
        (EPTC_DTYPE_F16, 2),
        (EPTC_DTYPE_BF16, 2),
    ] {
        let shape = [2u64, 3];
        let mut buf: *mut EptcBuffer = ptr::null_mut();
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: every call below follows the ABI.
        unsafe {
            assert_eq!(
                (t.buffer_alloc.unwrap())(code, 2, shape.as_ptr(), &mut buf, &mut error),
                EPTC_OK
            );
            let bytes: Vec<u8> = match code {
                EPTC_DTYPE_F32 => values.iter().flat_map(|v| v.to_ne_bytes()).collect(),
                EPTC_DTYPE_F16 => values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_bits().to_ne_bytes())
                    .collect(),
                _ => values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_ne_bytes())
                    .collect(),
            };
            assert_eq!(bytes.len(), 6 * size);
            let st =
                (t.buffer_upload.unwrap())(buf, bytes.as_ptr().cast(), bytes.len(), &mut error);
            assert_eq!(st, EPTC_OK);
            // A wrong length is a shape mismatch with a message.
            let st =
                (t.buffer_upload.unwrap())(buf, bytes.as_ptr().cast(), bytes.len() - 1, &mut error);
            assert_eq!(st, EPTC_ERR_SHAPE_MISMATCH);
            let m = take(&t, error);
            error = ptr::null_mut();
            assert!(m.contains("bytes"), "{m}");

            let (mut dt, mut rank, mut dims) = (99u32, 99u32, [0u64; 1]);
            let st =
                (t.buffer_info.unwrap())(buf, &mut dt, &mut rank, dims.as_mut_ptr(), 1, &mut error);
            assert_eq!((st, dt, rank, dims), (EPTC_OK, code, 2, [2]));

            let mut back = vec![0u8; bytes.len()];
            let st =
                (t.buffer_download.unwrap())(buf, back.as_mut_ptr().cast(), back.len(), &mut error);
            assert_eq!(st, EPTC_OK);
            assert_eq!(back, bytes, "dtype {code}");
            (t.buffer_free.unwrap())(buf);
        }
    }
}

#[test]
fn bad_arguments_are_invalid_argument_errors() {
    let t = cpu_table();
    let mut error: *mut c_char = ptr::null_mut();
    let mut buf: *mut EptcBuffer = ptr::null_mut();
    let mut exe: *mut EptcExecutable = ptr::null_mut();
    let opts = EptcCompileOptions::default();
    // SAFETY: every call below follows the ABI's rules on pointers (NULLs where allowed
    // to be passed, to be refused).
    unsafe {
        let st = (t.buffer_alloc.unwrap())(77, 0, ptr::null(), &mut buf, &mut error);
        assert_eq!(st, EPTC_ERR_INVALID_ARGUMENT);
        assert_eq!(take(&t, error), "unknown dtype code 77");
        error = ptr::null_mut();

        let st = (t.buffer_alloc.unwrap())(0, 2, ptr::null(), &mut buf, ptr::null_mut());
        assert_eq!(
            st, EPTC_ERR_INVALID_ARGUMENT,
            "a NULL error pointer is allowed"
        );

        let text = c"eptc-ir 2 \"future\"\n";
        let st = (t.compile.unwrap())(text.as_ptr(), ptr::null(), 0, &opts, &mut exe, &mut error);
        assert_eq!(st, EPTC_ERR_INVALID_ARGUMENT);
        let m = take(&t, error);
        error = ptr::null_mut();
        assert!(m.contains("format version 2, this eptc reads 1"), "{m}");
        assert!(exe.is_null());

        let st = (t.compile.unwrap())(ptr::null(), ptr::null(), 0, &opts, &mut exe, &mut error);
        assert_eq!(st, EPTC_ERR_INVALID_ARGUMENT);
        assert_eq!(take(&t, error), "the IR text is NULL");
        error = ptr::null_mut();

        // A run asking for the wrong number of outputs.
        let text = std::ffi::CString::new(eptc_ir::text::print(&relu_graph("r")).unwrap()).unwrap();
        let st = (t.compile.unwrap())(text.as_ptr(), ptr::null(), 0, &opts, &mut exe, &mut error);
        assert_eq!(st, EPTC_OK);
        let mut outs = [ptr::null_mut(); 2];
        let st = (t.run.unwrap())(
            exe,
            ptr::null(),
            ptr::null(),
            0,
            outs.as_mut_ptr(),
            2,
            &mut error,
        );
        assert_eq!(st, EPTC_ERR_INVALID_ARGUMENT);
        assert_eq!(take(&t, error), "2 outputs asked for, the graph has 1");
        error = ptr::null_mut();
        assert!(outs.iter().all(|p| p.is_null()));

        // An input named twice.
        let shape = [1u64, 3];
        assert_eq!(
            (t.buffer_alloc.unwrap())(0, 2, shape.as_ptr(), &mut buf, &mut error),
            EPTC_OK
        );
        let names = [c"x".as_ptr(), c"x".as_ptr()];
        let bufs = [buf, buf];
        let st = (t.run.unwrap())(
            exe,
            names.as_ptr(),
            bufs.as_ptr(),
            2,
            outs.as_mut_ptr(),
            1,
            &mut error,
        );
        assert_eq!(st, EPTC_ERR_INVALID_ARGUMENT);
        assert_eq!(take(&t, error), "input \"x\" given twice");
        error = ptr::null_mut();

        // And the right call.
        let st = (t.run.unwrap())(
            exe,
            names.as_ptr(),
            bufs.as_ptr(),
            1,
            outs.as_mut_ptr(),
            1,
            &mut error,
        );
        assert_eq!(
            st,
            EPTC_OK,
            "{}",
            if error.is_null() {
                String::new()
            } else {
                take(&t, error)
            }
        );
        assert!(!outs[0].is_null());
        assert!(
            (t.device_seconds.unwrap())(exe) < 0.0,
            "the CPU backend does not tell"
        );
        (t.buffer_free.unwrap())(outs[0]);
        (t.buffer_free.unwrap())(buf);
        (t.free_executable.unwrap())(exe);
        (t.free_executable.unwrap())(ptr::null_mut());
        (t.buffer_free.unwrap())(ptr::null_mut());
        (t.free_string.unwrap())(ptr::null_mut());
    }
}
