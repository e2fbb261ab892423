//! The generated kernels on the CPU, without a GPU: the same CUDA C that NVRTC compiles
//! (the module source of [`crate::codegen::module_source`]), compiled by the host's C++
//! compiler against a small shim (`emulate_shim.h`) and loaded as a shared library.
//! Each thread of a block is a fiber; barriers and warp shuffles are honoured, static
//! shared memory starts as NaN in every block, output buffers start as NaN, and a write
//! outside a buffer is caught by guard bytes around it.
//!
//! This checks a kernel's arithmetic and its use of threads, barriers and shared memory
//! in CI, where there is no GPU. It does not check timing, the runtime (cuBLAS calls,
//! memory plan, CUDA graphs), races between blocks, or code that assumes warp lock-step;
//! those need a GPU (`scripts/gpu-check.sh`).
//!
//! The host compiler is `$EPTC_EMU_CXX`, else `$CXX`, else `c++` (g++ 12 and later or
//! clang 15 and later: f16 storage uses `_Float16`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use eptc_ir::DType;

use crate::codegen::{module_source, Kernel};

const SHIM: &str = include_str!("emulate_shim.h");

/// Guard bytes before and after every buffer (all-ones: NaN in every storage type).
const GUARD: usize = 64;

fn compiler() -> String {
    std::env::var("EPTC_EMU_CXX")
        .or_else(|_| std::env::var("CXX"))
        .unwrap_or_else(|_| "c++".into())
}

/// The host C++ compiler's version line, or why there is none.
pub fn available() -> Result<String, String> {
    let cxx = compiler();
    let out = Command::new(&cxx)
        .arg("--version")
        .output()
        .map_err(|e| format!("no host C++ compiler `{cxx}`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`{cxx} --version` failed"));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

type LaunchFn = unsafe extern "C" fn(
    k: *const std::ffi::c_void,
    args: *mut *mut u8,
    grid: *const u32,
    block: *const u32,
    err: *mut u8,
    errlen: u32,
) -> i32;
type FindFn = unsafe extern "C" fn(name: *const std::ffi::c_char) -> *const std::ffi::c_void;

/// Kernels compiled for the CPU.
pub struct Module {
    lib: libloading::Library,
    dtype: DType,
    /// The entry points by kernel name, with their operand counts.
    inputs: HashMap<String, usize>,
    /// The shim's state (fibers, shared memory) is per library: one launch at a time.
    lock: Mutex<()>,
    /// The CUDA C a GPU would compile instead (`module_source` of the kernels).
    cuda_source: String,
}

/// Storage functions and the tensor-core product for the host where the device ones use
/// PTX.
fn host_source(src: &str, dtype: DType) -> String {
    let mut src = match dtype {
        DType::F16 => {
            let device = crate::codegen::cuda::storage(DType::F16);
            assert!(src.contains(device), "the f16 prelude is in the module");
            src.replace(
                device,
                "typedef unsigned short T;\n\
                 inline float ld(const T* p, long long i) { return eptc_emu_half_to_float(p[i]); }\n\
                 inline unsigned short to_t(float v) { return eptc_emu_float_to_half(v); }\n\
                 inline void st(T* p, long long i, float v) { p[i] = to_t(v); }\n",
            )
        }
        DType::F32 | DType::BF16 => src.to_string(),
    };
    // Vector accesses checked for their alignment, as a GPU faults on a misaligned one
    // (the host would load it silently).
    for ty in ["uint4", "float4", "float2", "unsigned"] {
        for c in ["const ", ""] {
            src = src.replace(
                &format!("reinterpret_cast<{c}{ty}*>("),
                &format!("eptc_emu_vec_cast<{c}{ty}>("),
            );
        }
    }
    if let Some(device) = crate::codegen::cuda::mma(dtype) {
        assert!(src.contains(device), "the mma helper is in the module");
        let host = format!(
            "inline void mma_t(float* d, const unsigned* a, const unsigned* b) {{ eptc_emu_mma(d, a, b, {}); }}\n",
            u8::from(dtype == DType::BF16)
        );
        src = src.replace(device, &host);
    }
    src
}

impl Module {
    /// Compile `kernels` (with storage type `dtype`) for the CPU.
    pub fn compile(kernels: &[&Kernel], dtype: DType) -> Result<Module, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let mut src = String::from(SHIM);
        let cuda_source = module_source(kernels, dtype);
        src += &host_source(&cuda_source, dtype);
        // (A buffer converts to whatever pointer the entry declares: `T*`, or `float*`
        // for the values kept in f32.)
        src += "\n// Entry thunks: the launcher passes the buffers as an array.\n\
                struct eptc_buf { void* p; template <class X> operator X*() const { return (X*)p; } };\n";
        let mut inputs = HashMap::new();
        let mut find = String::from("extern \"C\" const void* eptc_emu_find(const char* name) {\n");
        for (i, k) in kernels.iter().enumerate() {
            if inputs.insert(k.name.clone(), k.inputs).is_some() {
                continue;
            }
            let args: Vec<String> = (0..=k.inputs)
                .map(|j| format!("eptc_buf{{a[{j}]}}"))
                .collect();
            src += &format!(
                "static void eptc_thunk_{i}(void** a) {{ {}({}); }}\n",
                k.name,
                args.join(", ")
            );
            find += &format!(
                "    if (!strcmp(name, \"{}\")) return (const void*)eptc_thunk_{i};\n",
                k.name
            );
        }
        find += "    return nullptr;\n}\n";
        src += &find;

        let dir = std::env::temp_dir().join(format!(
            "eptc-emu-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let result = Self::build(&dir, &src, dtype, inputs, cuda_source);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn build(
        dir: &std::path::Path,
        src: &str,
        dtype: DType,
        inputs: HashMap<String, usize>,
        cuda_source: String,
    ) -> Result<Module, String> {
        let cpp = dir.join("kernels.cpp");
        let so: PathBuf = dir.join("kernels.so");
        std::fs::write(&cpp, src).map_err(|e| format!("{}: {e}", cpp.display()))?;
        let cxx = compiler();
        let out = Command::new(&cxx)
            .args(["-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o"])
            .arg(&so)
            .arg(&cpp)
            .output()
            .map_err(|e| format!("no host C++ compiler `{cxx}`: {e}"))?;
        if !out.status.success() {
            let log = String::from_utf8_lossy(&out.stderr);
            let head: Vec<&str> = log.lines().take(40).collect();
            return Err(format!(
                "`{cxx}` did not compile the emulated kernels:\n{}",
                head.join("\n")
            ));
        }
        // SAFETY: the library is the shim and the kernels just built; loading runs no
        // initialisers beyond the C++ runtime's.
        let lib = unsafe { libloading::Library::new(&so) }
            .map_err(|e| format!("{}: {e}", so.display()))?;
        Ok(Module {
            lib,
            dtype,
            inputs,
            lock: Mutex::new(()),
            cuda_source,
        })
    }

    /// The module's CUDA C as a GPU would get it (before the host's replacements).
    pub fn cuda_source(&self) -> &str {
        &self.cuda_source
    }

    /// Run `k` with the operands' bytes `inputs` (storage type of the module) and return
    /// the output's `out_bytes` bytes. The output starts as NaN, so an element the kernel
    /// does not write shows.
    pub fn run(&self, k: &Kernel, inputs: &[&[u8]], out_bytes: usize) -> Result<Vec<u8>, String> {
        self.run_on(k, inputs, vec![0xff; out_bytes])
    }

    /// [`Module::run`] with the output starting as `out` (for a kernel that updates its
    /// output in place, the linear epilogue).
    pub fn run_on(&self, k: &Kernel, inputs: &[&[u8]], out: Vec<u8>) -> Result<Vec<u8>, String> {
        self.run_shifted(k, inputs, out, 0)
    }

    /// [`Module::run_on`] with every operand `shift` bytes past 16-byte alignment (a
    /// multiple of the element size): for the kernels' unaligned paths.
    pub fn run_shifted(
        &self,
        k: &Kernel,
        inputs: &[&[u8]],
        out: Vec<u8>,
        shift: usize,
    ) -> Result<Vec<u8>, String> {
        if shift >= 16 || !shift.is_multiple_of(self.dtype.size_bytes()) {
            return Err(format!("a shift of {shift} bytes"));
        }
        let out_bytes = out.len();
        let n = *self
            .inputs
            .get(&k.name)
            .ok_or_else(|| format!("{}: not in this module", k.name))?;
        if n != inputs.len() {
            return Err(format!(
                "{}: {} operands, the kernel takes {n}",
                k.name,
                inputs.len()
            ));
        }
        // Each buffer 16-byte aligned (float4 loads), with guards on both sides.
        let mut bufs: Vec<Vec<u128>> = inputs
            .iter()
            .map(|b| guarded(b, shift))
            .chain(std::iter::once(guarded(&out, 0)))
            .collect();
        let n_in = inputs.len();
        let mut ptrs: Vec<*mut u8> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                let at = GUARD + if i < n_in { shift } else { 0 };
                // SAFETY: `at` bytes into a buffer longer than that.
                unsafe { (b.as_mut_ptr() as *mut u8).add(at) }
            })
            .collect();
        self.launch(&k.name, &mut ptrs, k.grid, k.block)?;
        let lens: Vec<usize> = inputs
            .iter()
            .map(|b| b.len())
            .chain(std::iter::once(out_bytes))
            .collect();
        for (i, (b, &len)) in bufs.iter().zip(&lens).enumerate() {
            let at = if i < n_in { shift } else { 0 };
            let bytes = &as_bytes(b)[at..];
            let what = if i < inputs.len() {
                format!("operand {i}")
            } else {
                "the output".into()
            };
            if bytes[..GUARD].iter().any(|&x| x != 0xff) {
                return Err(format!("{}: wrote before the start of {what}", k.name));
            }
            if bytes[GUARD + len..GUARD + len + GUARD]
                .iter()
                .any(|&x| x != 0xff)
            {
                return Err(format!("{}: wrote past the end of {what}", k.name));
            }
            if i < inputs.len() && bytes[GUARD..GUARD + len] != *inputs[i] {
                return Err(format!("{}: wrote into {what}", k.name));
            }
        }
        let out = as_bytes(bufs.last().expect("the output"));
        Ok(out[GUARD..GUARD + out_bytes].to_vec())
    }

    /// Launch the kernel `name` of this module on buffers the caller owns: `args` are
    /// the addresses of its operands then its output (host memory standing for device
    /// memory, as [`crate::exec`]'s emulated runtime holds it). Nothing guards them here:
    /// the caller checks its own guard bytes.
    ///
    /// # Safety
    /// Every address must point into live memory holding what the kernel reads and writes.
    pub unsafe fn launch_raw(
        &self,
        name: &str,
        args: &[u64],
        grid: [u32; 3],
        block: [u32; 3],
    ) -> Result<(), String> {
        let n = *self
            .inputs
            .get(name)
            .ok_or_else(|| format!("{name}: not in this module"))?;
        if args.len() != n + 1 {
            return Err(format!(
                "{name}: {} arguments, the kernel takes {} operands and an output",
                args.len(),
                n
            ));
        }
        let mut ptrs: Vec<*mut u8> = args.iter().map(|&a| a as usize as *mut u8).collect();
        self.launch(name, &mut ptrs, grid, block)
    }

    fn launch(
        &self,
        kernel: &str,
        ptrs: &mut [*mut u8],
        grid: [u32; 3],
        block: [u32; 3],
    ) -> Result<(), String> {
        let name = std::ffi::CString::new(kernel).map_err(|e| e.to_string())?;
        let mut err = vec![0u8; 1024];
        let rc = {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: both symbols are the shim's, with these signatures.
            unsafe {
                let find: libloading::Symbol<FindFn> =
                    self.lib.get(b"eptc_emu_find").map_err(|e| e.to_string())?;
                let launch: libloading::Symbol<LaunchFn> = self
                    .lib
                    .get(b"eptc_emu_launch")
                    .map_err(|e| e.to_string())?;
                let f = find(name.as_ptr());
                if f.is_null() {
                    return Err(format!("{kernel}: no entry point"));
                }
                // The kernel reads its operands and writes the output within the sizes
                // its launch was planned for.
                launch(
                    f,
                    ptrs.as_mut_ptr(),
                    grid.as_ptr(),
                    block.as_ptr(),
                    err.as_mut_ptr(),
                    err.len() as u32,
                )
            }
        };
        if rc != 0 {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            return Err(format!(
                "{kernel}: {}",
                String::from_utf8_lossy(&err[..end])
            ));
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// `bytes` between two guards of all-ones, in 16-byte aligned memory, `shift` bytes past
/// the alignment.
fn guarded(bytes: &[u8], shift: usize) -> Vec<u128> {
    let total = shift + GUARD + bytes.len() + GUARD;
    let mut v = vec![u128::MAX; total.div_ceil(16)];
    // SAFETY: the vector holds at least `total` bytes.
    let raw = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 16) };
    raw[shift + GUARD..shift + GUARD + bytes.len()].copy_from_slice(bytes);
    v
}

fn as_bytes(v: &[u128]) -> &[u8] {
    // SAFETY: u128 has no padding; any byte view of it is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 16) }
}
