//! The process-wide device: probed once (creating wgpu instances is slow), shared by every
//! executable. wgpu errors never panic: work runs inside error scopes, and anything that
//! escapes them is recorded by the uncaptured-error handler and reported by the next run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use eptc_backend::BackendError;

/// What to tell a user whose machine has no adapter.
pub(crate) const NO_ADAPTER: &str = "no wgpu adapter found (install a Vulkan driver, e.g. \
    Mesa's lavapipe: apt-get install mesa-vulkan-drivers libvulkan1)";

pub(crate) struct Gpu {
    /// "<adapter name> (<device type>, <backend>)".
    pub desc: String,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// The limits the device was opened with (the adapter's best).
    pub limits: wgpu::Limits,
    /// Whether the device was opened with `SHADER_F16` (requested whenever the adapter
    /// offers it, since every executable shares the device): f16 storage needs it.
    pub f16: bool,
    /// Errors no error scope caught, in order.
    uncaptured: Arc<Mutex<Vec<String>>>,
    _adapter: wgpu::Adapter,
    _instance: wgpu::Instance,
}

static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();

/// The shared device, or why there is none.
pub(crate) fn gpu() -> Result<Arc<Gpu>, String> {
    GPU.get_or_init(|| {
        catch_unwind(AssertUnwindSafe(|| pollster::block_on(probe())))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("the wgpu probe failed: {msg}"))
            })
            .map(Arc::new)
    })
    .clone()
}

async fn probe() -> Result<Gpu, String> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions::default())
        .await
        .map_err(|_| NO_ADAPTER.to_string())?;
    let info = adapter.get_info();
    let f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
    let desc = format!(
        "{} ({:?}, {:?}, {})",
        info.name,
        info.device_type,
        info.backend,
        if f16 {
            "offers shader-f16"
        } else {
            "no shader-f16"
        }
    );
    let limits = adapter.limits();
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("eptc"),
            required_features: if f16 {
                wgpu::Features::SHADER_F16
            } else {
                wgpu::Features::empty()
            },
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("wgpu adapter {desc} found, but its device cannot be opened: {e}"))?;
    let uncaptured: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&uncaptured);
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        if let Ok(mut l) = log.lock() {
            l.push(error_text(&e));
        }
    }));
    Ok(Gpu {
        desc,
        device,
        queue,
        limits,
        f16,
        uncaptured,
        _adapter: adapter,
        _instance: instance,
    })
}

fn error_text(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::OutOfMemory { .. } => "out of device memory".into(),
        e => {
            // The description, plus the source chain when it adds something.
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                let t = c.to_string();
                if !s.contains(&t) {
                    s.push_str(": ");
                    s.push_str(&t);
                }
                src = c.source();
            }
            s
        }
    }
}

impl Gpu {
    /// Run `f` inside validation, out-of-memory and internal error scopes; the first
    /// error caught becomes `BackendError::Other("<what>: <error>")`.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T, BackendError> {
        let v = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let m = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let i = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let out = f();
        // Pop in reverse order of pushing, all of them, then report the first error.
        let errs = [
            pollster::block_on(i.pop()),
            pollster::block_on(m.pop()),
            pollster::block_on(v.pop()),
        ];
        match errs.into_iter().flatten().next() {
            Some(e) => Err(BackendError::Other(format!("{what}: {}", error_text(&e)))),
            None => Ok(out),
        }
    }

    /// Errors that escaped every scope since the last call, as one `BackendError`.
    pub fn take_uncaptured(&self) -> Result<(), BackendError> {
        let errs = match self.uncaptured.lock() {
            Ok(mut l) => std::mem::take(&mut *l),
            Err(_) => return Ok(()),
        };
        if errs.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Other(format!("wgpu: {}", errs.join("; "))))
        }
    }
}
