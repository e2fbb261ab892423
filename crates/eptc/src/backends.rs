//! The backends of this eptc: the built-in ones and the plugins the user named.
//!
//! Plugins are dynamic libraries speaking eptc's C ABI (`crates/eptc-plugin`,
//! `plugins/README.md`). They are loaded only from paths the user names: `--plugin PATH`,
//! `EPTC_PLUGIN_PATH` (paths separated by `:`), `--target PATH`, or the path an artifact
//! compiled for a plugin recorded in its manifest. Once loaded, a plugin is a backend like
//! the built-in ones (`--target NAME`), through the same `Backend` interface.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};
use eptc_backend::{Availability, Backend, Capabilities, CompileOptions, Executable, KernelSource};
use eptc_ir::{DType, Graph, WeightStore};
use eptc_plugin::host::PluginBackend;

/// The plugins loaded in this process.
static PLUGINS: Mutex<Vec<Arc<PluginBackend>>> = Mutex::new(Vec::new());

/// Every built-in backend.
fn built_in() -> Vec<Box<dyn Backend>> {
    vec![
        Box::new(eptc_cpu::CpuBackend::new()),
        Box::new(eptc_wgpu::WgpuBackend::new()),
        Box::new(eptc_cuda::CudaBackend::new()),
    ]
}

/// A loaded plugin as a boxed backend (the registry keeps it loaded).
struct Shared(Arc<PluginBackend>);

impl Backend for Shared {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn availability(&self) -> Availability {
        self.0.availability()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn compile(
        &self,
        graph: &Graph,
        weights: &WeightStore,
        opts: &CompileOptions,
    ) -> eptc_backend::Result<Box<dyn Executable>> {
        self.0.compile(graph, weights, opts)
    }
    fn kernels(
        &self,
        graph: &Graph,
        batch: usize,
        dtype: DType,
    ) -> eptc_backend::Result<Vec<KernelSource>> {
        self.0.kernels(graph, batch, dtype)
    }
}

/// What `eptc plugins` shows of a backend besides its name and capabilities.
pub struct Origin {
    /// `built-in` or `plugin`.
    pub kind: &'static str,
    /// The library, for a plugin.
    pub path: Option<PathBuf>,
    pub version: Option<String>,
}

/// Every backend: the built-in ones, then the loaded plugins.
pub fn all() -> Vec<Box<dyn Backend>> {
    all_with_origin().into_iter().map(|(b, _)| b).collect()
}

/// [`all`], each with where it comes from.
pub fn all_with_origin() -> Vec<(Box<dyn Backend>, Origin)> {
    let mut v: Vec<(Box<dyn Backend>, Origin)> = built_in()
        .into_iter()
        .map(|b| {
            let o = Origin {
                kind: "built-in",
                path: None,
                version: None,
            };
            (b, o)
        })
        .collect();
    for p in PLUGINS.lock().expect("plugin registry").iter() {
        let o = Origin {
            kind: "plugin",
            path: Some(p.path().to_path_buf()),
            version: Some(p.plugin_version().to_string()),
        };
        v.push((Box::new(Shared(Arc::clone(p))), o));
    }
    v
}

/// Whether `s` names a library file rather than a backend.
fn is_path(s: &str) -> bool {
    s.contains('/') || [".so", ".dylib", ".dll"].iter().any(|e| s.ends_with(e))
}

/// Load the plugin at `path` (once per library; its name must not clash with a built-in
/// backend or another plugin). Returns its name.
pub fn load_plugin(path: &Path) -> Result<String> {
    let canon = path
        .canonicalize()
        .map_err(|e| anyhow!("plugin {}: {e}", path.display()))?;
    let mut reg = PLUGINS.lock().expect("plugin registry");
    if let Some(p) = reg.iter().find(|p| p.path() == canon) {
        return Ok(p.name().to_string());
    }
    let p = PluginBackend::load(&canon).map_err(|e| anyhow!("{e}"))?;
    let name = p.name().to_string();
    if built_in().iter().any(|b| b.name() == name) {
        bail!(
            "plugin {}: its name {name:?} is a built-in backend's; a plugin needs a name of its own",
            canon.display()
        );
    }
    if let Some(q) = reg.iter().find(|q| q.name() == name) {
        bail!(
            "plugin {}: backend {name:?} is already loaded from {}",
            canon.display(),
            q.path().display()
        );
    }
    reg.push(Arc::new(p));
    Ok(name)
}

/// Load the plugins named by `--plugin` and `EPTC_PLUGIN_PATH`.
pub fn load_user_plugins(paths: &[PathBuf]) -> Result<()> {
    let mut all: Vec<PathBuf> = paths.to_vec();
    if let Some(v) = std::env::var_os("EPTC_PLUGIN_PATH") {
        all.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    for p in all {
        load_plugin(&p)?;
    }
    Ok(())
}

/// The library a loaded plugin called `name` came from (`None` for built-in backends).
pub fn plugin_path(name: &str) -> Option<PathBuf> {
    PLUGINS
        .lock()
        .expect("plugin registry")
        .iter()
        .find(|p| p.name() == name)
        .map(|p| p.path().to_path_buf())
}

/// The backend called `name` (or the plugin at that path), available here.
pub fn get(name: &str) -> Result<Box<dyn Backend>> {
    let b = find(name)?;
    if let Availability::Unavailable(why) = b.availability() {
        bail!("backend {} is unavailable here: {why}", b.name());
    }
    Ok(b)
}

/// The backend called `name`, or the plugin library at path `name` (loaded now), whether
/// or not it can run here (its capabilities and kernel generation need no device).
pub fn find(name: &str) -> Result<Box<dyn Backend>> {
    let name = if is_path(name) {
        load_plugin(Path::new(name))?
    } else {
        name.to_string()
    };
    if let Some(b) = all().into_iter().find(|b| b.name() == name) {
        return Ok(b);
    }
    let loaded: Vec<String> = all().iter().map(|b| b.name().to_string()).collect();
    bail!(
        "--target {name}: unknown backend (here: {}); a plugin is named by its path \
         (--target PATH, --plugin PATH or EPTC_PLUGIN_PATH); see `eptc plugins`",
        loaded.join(", ")
    )
}
