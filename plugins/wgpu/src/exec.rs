//! The wgpu runtime: the `wgpu` [`Backend`] and its [`WgpuExecutable`].
//!
//! At compile time the parameters are checked against the weight store (the same errors
//! as the CPU backend) and uploaded once, with the constants, into storage buffers. The
//! first run with a batch size `B` plans that batch: every live node's kernels are
//! generated for `B` and validated ([`kernels`] does the same without a device), turned
//! into compute pipelines (shared between identical kernels), intermediate buffers are
//! assigned by last use and size class (module `plan`), and one bind group per dispatch is
//! made. Later runs with that batch allocate nothing: they write the inputs, record one
//! compute pass with every dispatch plus the copies of the outputs into staging buffers,
//! submit once, wait, and read back the outputs only. `reshape` is a view of its operand's
//! buffer; zero-size tensors get no buffer and their kernels are not dispatched.
//!
//! Storage type (`CompileOptions::dtype`): f32, or f16 where the adapter offers
//! `shader-f16`. With f16 every device buffer holds f16 (2 bytes an element, sizes
//! rounded up to 4 bytes): parameters, constants and inputs are converted from f32 on
//! upload, outputs back to f32 on readback, and the kernels compute in f32 (see
//! [`codegen`]). The host only ever sees f32.

mod convert;
mod gpu;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use eptc_backend::{
    bind_batch, check_param, Availability, Backend, BackendError, Capabilities, CompileOptions,
    Executable, KernelSource, Result,
};
use eptc_ir::{DType, Graph, HostTensor, NodeId, Op, Shape, WeightStore};

use crate::codegen::{self, Kernel, Storage};
use crate::validate;
use convert::{decode, encode, stored_bytes};
use eptc_backend::plan::{self, Loc, Role};
use gpu::Gpu;

/// Batch sizes whose plans (pipelines aside, which are shared) an executable keeps; the
/// least recently used one is dropped beyond that.
const MAX_PLANS: usize = 4;

/// A replacement for the kernel generator: the validated kernels of a node for a batch.
/// Tests use it to run hand-written WGSL through the runtime (its bindings must use the
/// executable's storage type).
pub type KernelFn = fn(&Graph, NodeId, usize) -> std::result::Result<Vec<Kernel>, String>;

/// Options of the wgpu backend.
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Treat this many bytes as the storage-binding limit when it is below the adapter's
    /// (to exercise the limit check with small tensors).
    pub max_binding_bytes: Option<u64>,
    /// Generate kernels with this instead of [`codegen::node_kernels`] + naga validation
    /// (and skip the supported-op check at compile time).
    #[doc(hidden)]
    pub kernel_source: Option<KernelFn>,
}

/// The `wgpu` backend: WGSL kernels run with wgpu on the first adapter found (in CI,
/// Mesa's lavapipe).
#[derive(Clone, Debug, Default)]
pub struct WgpuBackend {
    opts: WgpuOptions,
}

impl WgpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_options(opts: WgpuOptions) -> Self {
        WgpuBackend { opts }
    }

    /// [`Backend::compile`], returning the concrete executable (with its statistics).
    pub fn compile_wgpu(
        &self,
        graph: &Graph,
        weights: &WeightStore,
        opts: &CompileOptions,
    ) -> Result<WgpuExecutable> {
        let storage = Storage::of(opts.dtype).map_err(BackendError::Other)?;
        let gpu = gpu::gpu().map_err(BackendError::Unavailable)?;
        if storage == Storage::F16 && !gpu.f16 {
            return Err(BackendError::Unavailable(format!(
                "f16 storage needs shader-f16, which the wgpu adapter {} lacks (f32 storage works)",
                gpu.desc
            )));
        }
        if self.opts.kernel_source.is_none() {
            let caps = self.capabilities();
            for id in graph.node_ids() {
                let kind = graph.node(id).op.kind();
                if !caps.supports(kind) {
                    return Err(BackendError::Unsupported {
                        backend: "wgpu".into(),
                        op: kind.into(),
                        node: id.index(),
                    });
                }
            }
        }
        WgpuExecutable::new(gpu, graph, weights, self.opts.clone(), storage)
    }
}

/// Ops the executor handles itself, without kernels.
const RUNTIME_KINDS: [&str; 4] = ["input", "param", "const", "reshape"];

impl Backend for WgpuBackend {
    fn name(&self) -> &str {
        "wgpu"
    }

    fn availability(&self) -> Availability {
        match gpu::gpu() {
            Ok(g) => Availability::Available(g.desc.clone()),
            Err(e) => Availability::Unavailable(e),
        }
    }

    fn capabilities(&self) -> Capabilities {
        let supported: HashSet<&str> = codegen::supported_kinds()
            .into_iter()
            .chain(RUNTIME_KINDS)
            .collect();
        let fused = Op::fused_kinds();
        let pick = |kinds: Vec<&str>, keep_fused: bool| -> Vec<String> {
            kinds
                .into_iter()
                .filter(|k| supported.contains(k) && fused.contains(k) == keep_fused)
                .map(str::to_owned)
                .collect()
        };
        Capabilities {
            ops: pick(Op::all_kinds(), false),
            fused_ops: pick(Op::fused_kinds(), true),
            // f16 needs the adapter's shader-f16; compiling says so where it is missing.
            dtypes: vec![DType::F32, DType::F16],
        }
    }

    fn compile(
        &self,
        graph: &Graph,
        weights: &WeightStore,
        opts: &CompileOptions,
    ) -> Result<Box<dyn Executable>> {
        Ok(Box::new(self.compile_wgpu(graph, weights, opts)?))
    }

    fn kernels(&self, graph: &Graph, batch: usize, dtype: DType) -> Result<Vec<KernelSource>> {
        Ok(kernels(graph, batch, dtype)?
            .into_iter()
            .map(|k| KernelSource {
                name: k.name,
                extension: "wgsl".into(),
                source: k.source,
            })
            .collect())
    }
}

/// Every kernel of `graph` with the batch bound to `batch` and tensors stored as `dtype`
/// (f32 or f16), in topological order, each validated with naga. Needs no device (for
/// `eptc compile --target wgpu` anywhere).
pub fn kernels(graph: &Graph, batch: usize, dtype: DType) -> Result<Vec<Kernel>> {
    Storage::of(dtype).map_err(BackendError::Other)?;
    let order = graph
        .topo_order()
        .map_err(|e| BackendError::Other(e.to_string()))?;
    let mut out = Vec::new();
    for id in order {
        out.extend(node_kernels(graph, id, batch, dtype)?);
    }
    Ok(out)
}

/// The default kernel source: generated and validated.
fn node_kernels(graph: &Graph, id: NodeId, batch: usize, dtype: DType) -> Result<Vec<Kernel>> {
    let ks = codegen::node_kernels(graph, id, batch, dtype)
        .map_err(|e| BackendError::Other(format!("wgpu: {e}")))?;
    for k in &ks {
        validate::validate_storage(k, dtype).map_err(BackendError::Other)?;
    }
    Ok(ks)
}

// ---- the executable -------------------------------------------------------------------

/// What a live node is to the runtime.
enum Kind {
    Input(String),
    /// A parameter, by name (its buffer is in `params`).
    Param(String),
    Const(Option<wgpu::Buffer>),
    /// A view of the node at this position.
    View(usize),
    /// Kernels reading the nodes at these positions.
    Compute(Vec<usize>),
}

struct Slot {
    id: NodeId,
    op: &'static str,
    shape: Shape,
    kind: Kind,
}

struct ParamBuf {
    shape: Vec<usize>,
    /// `None` for a zero-size parameter, or one no output depends on.
    buffer: Option<wgpu::Buffer>,
}

/// One dispatch.
struct Step {
    /// The node's op kind (for the profile).
    kind: &'static str,
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
}

struct OutputCopy {
    name: String,
    shape: Vec<usize>,
    /// Source, staging buffer and bytes copied: `numel(shape)` elements of the storage
    /// type, padded to 4 bytes. `None`: zero elements, nothing to copy.
    copy: Option<(wgpu::Buffer, wgpu::Buffer, u64)>,
}

/// Everything a run with one batch size needs, made on first use.
struct BatchPlan {
    batch: usize,
    /// Input name, its buffer (`None`: zero-size) and element count.
    inputs: Vec<(String, Option<wgpu::Buffer>, usize)>,
    steps: Vec<Step>,
    outputs: Vec<OutputCopy>,
    stats: PlanStats,
}

/// What a batch plan holds (for tests and diagnostics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Live nodes computed by kernels.
    pub compute_nodes: usize,
    /// Dispatches per run.
    pub dispatches: usize,
    /// Pooled intermediate buffers, and their total size.
    pub intermediate_buffers: usize,
    pub intermediate_bytes: u64,
    /// What the intermediates would take without reuse (one buffer per computed node).
    pub unpooled_bytes: u64,
}

/// A graph compiled for wgpu.
pub struct WgpuExecutable {
    gpu: Arc<Gpu>,
    graph: Graph,
    opts: WgpuOptions,
    /// The element type of every device buffer.
    storage: Storage,
    /// Live nodes in topological order.
    slots: Vec<Slot>,
    /// Graph outputs: name and position in `slots`.
    outputs: Vec<(String, usize)>,
    params: HashMap<String, ParamBuf>,
    /// Bind group layout and pipeline layout per operand count.
    layouts: HashMap<usize, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    /// Pipelines by (WGSL source with the kernel's name masked, entry point), shared by
    /// identical kernels and batches.
    pipelines: HashMap<(String, String), wgpu::ComputePipeline>,
    /// Bound in place of a zero-size operand (bindings cannot be empty).
    dummy: Option<wgpu::Buffer>,
    /// Most recently used last.
    plans: Vec<BatchPlan>,
    buffers_created: usize,
    /// `EPTC_WGPU_PROFILE` set at compile time: every run submits and waits for each
    /// dispatch alone and prints the time per op kind to stderr.
    profile: bool,
}

fn other(node: usize, op: &str, msg: impl std::fmt::Display) -> BackendError {
    BackendError::Other(format!("node %{node} ({op}): {msg}"))
}

impl WgpuExecutable {
    fn new(
        gpu: Arc<Gpu>,
        graph: &Graph,
        weights: &WeightStore,
        opts: WgpuOptions,
        storage: Storage,
    ) -> Result<Self> {
        let order = graph
            .topo_order()
            .map_err(|e| BackendError::Other(e.to_string()))?;
        // Liveness: backwards from the outputs.
        let mut live: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = graph.outputs().iter().map(|o| o.1).collect();
        while let Some(n) = stack.pop() {
            if !graph.contains(n) {
                return Err(BackendError::Other(format!(
                    "output node %{} missing",
                    n.index()
                )));
            }
            if live.insert(n) {
                stack.extend(graph.operands(n));
            }
        }
        let mut exe = WgpuExecutable {
            gpu,
            graph: graph.clone(),
            opts,
            storage,
            slots: Vec::new(),
            outputs: Vec::new(),
            params: HashMap::new(),
            layouts: HashMap::new(),
            pipelines: HashMap::new(),
            dummy: None,
            plans: Vec::new(),
            buffers_created: 0,
            profile: std::env::var_os("EPTC_WGPU_PROFILE").is_some(),
        };
        let mut pos: HashMap<NodeId, usize> = HashMap::new();
        for &id in &order {
            let node = graph.node(id);
            let (op, n) = (node.op.kind(), id.index());
            if node.ty.dtype != DType::F32 {
                return Err(BackendError::Unsupported {
                    backend: "wgpu".into(),
                    op: format!("{op} in {}", node.ty.dtype),
                    node: n,
                });
            }
            let fixed = || {
                node.ty
                    .shape
                    .as_fixed()
                    .ok_or_else(|| other(n, op, "a leaf's shape cannot depend on B"))
            };
            // Every parameter is checked, live or not (as the CPU backend does), and the
            // live ones are uploaded once per name.
            if let Op::Param { name, .. } = &node.op {
                let t = weights
                    .get(name)
                    .ok_or_else(|| BackendError::MissingParam(name.clone()))?;
                check_param(name, &fixed()?, t)?;
                let have = exe.params.get(name).is_some_and(|p| p.buffer.is_some());
                let buffer = if live.contains(&id) && !have {
                    exe.upload(n, op, &format!("param {name}"), t.data())?
                } else {
                    None
                };
                let p = exe.params.entry(name.clone()).or_insert(ParamBuf {
                    shape: t.shape.clone(),
                    buffer: None,
                });
                if buffer.is_some() {
                    p.buffer = buffer;
                }
            }
            if !live.contains(&id) {
                continue;
            }
            let operands: Vec<usize> = graph
                .operands(id)
                .iter()
                .map(|o| {
                    pos.get(o)
                        .copied()
                        .ok_or_else(|| other(n, op, "operand is not computed before its user"))
                })
                .collect::<Result<_>>()?;
            let kind = match &node.op {
                Op::Input { name } => Kind::Input(name.clone()),
                Op::Param { name, .. } => Kind::Param(name.clone()),
                Op::Const { values } => {
                    if values.len() != fixed()?.iter().product::<usize>() {
                        return Err(other(n, op, "value count does not match shape"));
                    }
                    Kind::Const(exe.upload(n, op, &format!("const %{n}"), values)?)
                }
                Op::Reshape { .. } => {
                    if operands.len() != 1 {
                        return Err(other(n, op, format!("{} operands", operands.len())));
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
        // Let the uploads finish (and their staging memory go) before the first run.
        let g = Arc::clone(&exe.gpu);
        g.scoped("uploading the parameters", || {
            g.queue.submit([]);
            g.device.poll(wgpu::PollType::wait_indefinitely())
        })?
        .map_err(|e| BackendError::Other(format!("uploading the parameters: {e}")))?;
        g.take_uncaptured()?;
        Ok(exe)
    }

    /// Buffers created by this executable so far (parameters, constants, inputs,
    /// intermediates, staging). A run with an already planned batch creates none.
    pub fn buffers_created(&self) -> usize {
        self.buffers_created
    }

    /// Compute pipelines created so far (identical kernels share one).
    pub fn pipelines_created(&self) -> usize {
        self.pipelines.len()
    }

    /// The plan of a batch size already run, if still kept.
    pub fn plan_stats(&self, batch: usize) -> Option<PlanStats> {
        self.plans
            .iter()
            .find(|p| p.batch == batch)
            .map(|p| p.stats)
    }

    /// The adapter's storage-binding limit, or the smaller test limit.
    fn binding_limit(&self) -> u64 {
        let l = self.gpu.limits.max_storage_buffer_binding_size;
        self.opts.max_binding_bytes.map_or(l, |m| m.min(l))
    }

    /// Check a tensor of `bytes` against the device's limits.
    fn check_size(&self, node: usize, op: &str, bytes: u64) -> Result<()> {
        let binding = self.binding_limit();
        let buffer = self.gpu.limits.max_buffer_size;
        if bytes > binding {
            return Err(other(
                node,
                op,
                format!(
                    "{bytes} bytes exceed the adapter's storage-binding limit of {binding} bytes"
                ),
            ));
        }
        if bytes > buffer {
            return Err(other(
                node,
                op,
                format!("{bytes} bytes exceed the adapter's buffer-size limit of {buffer} bytes"),
            ));
        }
        Ok(())
    }

    fn create_buffer(
        &mut self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let g = Arc::clone(&self.gpu);
        let b = g.scoped(&format!("creating buffer {label} ({size} bytes)"), || {
            g.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        })?;
        self.buffers_created += 1;
        Ok(b)
    }

    fn storage_buffer(&mut self, label: &str, size: u64) -> Result<wgpu::Buffer> {
        use wgpu::BufferUsages as U;
        self.create_buffer(label, size, U::STORAGE | U::COPY_DST | U::COPY_SRC)
    }

    /// A storage buffer holding `data` in the storage type (`None` when empty).
    fn upload(
        &mut self,
        node: usize,
        op: &str,
        label: &str,
        data: &[f32],
    ) -> Result<Option<wgpu::Buffer>> {
        if data.is_empty() {
            return Ok(None);
        }
        let bytes = encode(self.storage, data);
        self.check_size(node, op, bytes.len() as u64)?;
        let b = self.storage_buffer(label, bytes.len() as u64)?;
        let g = Arc::clone(&self.gpu);
        g.scoped(&format!("uploading {label}"), || {
            g.queue.write_buffer(&b, 0, &bytes)
        })?;
        Ok(Some(b))
    }

    fn layout(&mut self, inputs: usize) -> Result<(wgpu::BindGroupLayout, wgpu::PipelineLayout)> {
        if let Some(l) = self.layouts.get(&inputs) {
            return Ok(l.clone());
        }
        let g = Arc::clone(&self.gpu);
        let l = g.scoped("creating a bind group layout", || {
            let entries: Vec<wgpu::BindGroupLayoutEntry> = (0..=inputs)
                .map(|b| wgpu::BindGroupLayoutEntry {
                    binding: b as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: b < inputs,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            let bgl = g
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(&format!("eptc {inputs} inputs")),
                    entries: &entries,
                });
            let pl = g
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(&format!("eptc {inputs} inputs")),
                    bind_group_layouts: &[Some(&bgl)],
                    immediate_size: 0,
                });
            (bgl, pl)
        })?;
        self.layouts.insert(inputs, l.clone());
        Ok(l)
    }

    fn pipeline(
        &mut self,
        k: &Kernel,
        layout: &wgpu::PipelineLayout,
    ) -> Result<wgpu::ComputePipeline> {
        // Kernels that differ only by their name (in a comment, say) share a pipeline:
        // the same template for the same shapes in another layer.
        let key = (k.source.replace(&k.name, "\u{1}"), k.entry.clone());
        if let Some(p) = self.pipelines.get(&key) {
            return Ok(p.clone());
        }
        let g = Arc::clone(&self.gpu);
        let p = g.scoped(&format!("kernel {}", k.name), || {
            let module = g.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&k.name),
                source: wgpu::ShaderSource::Wgsl(k.source.as_str().into()),
            });
            g.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&k.name),
                    layout: Some(layout),
                    module: &module,
                    entry_point: Some(&k.entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
        })?;
        self.pipelines.insert(key, p.clone());
        Ok(p)
    }

    fn node_kernels(&self, id: NodeId, batch: usize) -> Result<Vec<Kernel>> {
        match self.opts.kernel_source {
            Some(f) => f(&self.graph, id, batch).map_err(BackendError::Other),
            None => node_kernels(&self.graph, id, batch, self.storage.dtype()),
        }
    }

    /// Plan batch `batch` (see the module docs).
    fn build_plan(&mut self, batch: usize) -> Result<BatchPlan> {
        let limits = self.gpu.limits.clone();
        // Sizes and limits first: a graph too large for the device fails before any work.
        let mut nodes: Vec<(Role, u64)> = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let numel = s
                .shape
                .resolve(batch)
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            let bytes = numel
                .and_then(|n| stored_bytes(self.storage, n))
                .ok_or_else(|| other(s.id.index(), s.op, "size overflows"))?;
            self.check_size(s.id.index(), s.op, bytes)?;
            let role = match &s.kind {
                Kind::Input(_) | Kind::Param(_) | Kind::Const(_) => Role::Leaf,
                Kind::View(o) => Role::View(*o),
                Kind::Compute(ops) => Role::Compute(ops.clone()),
            };
            nodes.push((role, bytes));
        }
        let outs: Vec<usize> = self.outputs.iter().map(|o| o.1).collect();
        let bp = plan::plan(&nodes, &outs, limits.max_buffer_size);

        // Kernels (generated and validated) before any device work.
        let mut kernels: Vec<(usize, Vec<Kernel>)> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let Kind::Compute(ops) = &s.kind else {
                continue;
            };
            if nodes[i].1 == 0 {
                continue; // nothing to compute
            }
            let ks = self.node_kernels(s.id, batch)?;
            for k in &ks {
                let n = s.id.index();
                if k.inputs != ops.len() {
                    return Err(other(
                        n,
                        s.op,
                        format!(
                            "kernel {} binds {} operands, the node has {}",
                            k.name,
                            k.inputs,
                            ops.len()
                        ),
                    ));
                }
                if k.inputs as u64 + 1 > u64::from(limits.max_storage_buffers_per_shader_stage) {
                    return Err(other(
                        n,
                        s.op,
                        format!(
                            "kernel {} binds {} storage buffers, above the adapter's limit of {}",
                            k.name,
                            k.inputs + 1,
                            limits.max_storage_buffers_per_shader_stage
                        ),
                    ));
                }
                let max = limits.max_compute_workgroups_per_dimension;
                if k.workgroups.iter().any(|&w| w > max) {
                    return Err(other(
                        n,
                        s.op,
                        format!(
                            "kernel {} dispatches {:?} workgroups, above the adapter's limit of {max} per dimension",
                            k.name, k.workgroups
                        ),
                    ));
                }
            }
            kernels.push((i, ks));
        }

        // Buffers: intermediates, inputs, staging.
        let mut slot_bufs = Vec::with_capacity(bp.slots.len());
        for (k, &size) in bp.slots.iter().enumerate() {
            slot_bufs.push(self.storage_buffer(&format!("b{batch} slot {k}"), size)?);
        }
        let mut input_bufs: HashMap<usize, wgpu::Buffer> = HashMap::new();
        let mut inputs = Vec::new();
        let input_nodes: Vec<(usize, String)> = (self.slots.iter().enumerate())
            .filter_map(|(i, s)| match &s.kind {
                Kind::Input(name) => Some((i, name.clone())),
                _ => None,
            })
            .collect();
        for (i, name) in input_nodes {
            let bytes = nodes[i].1;
            let buf = if bytes == 0 {
                None
            } else {
                let b = self.storage_buffer(&format!("b{batch} input {name}"), bytes)?;
                input_bufs.insert(i, b.clone());
                Some(b)
            };
            inputs.push((name, buf, self.slots[i].shape.numel(batch)));
        }
        // The buffer holding node `i`'s value and its byte count.
        let buffer_of = |exe: &Self, i: usize| -> Option<(wgpu::Buffer, u64)> {
            let b = match bp.loc[i] {
                Loc::Empty => return None,
                Loc::Slot(k) => slot_bufs[k].clone(),
                Loc::Leaf(r) => match &exe.slots[r].kind {
                    Kind::Input(_) => input_bufs.get(&r)?.clone(),
                    Kind::Param(name) => exe.params.get(name)?.buffer.clone()?,
                    Kind::Const(b) => b.clone()?,
                    _ => return None,
                },
            };
            Some((b, nodes[i].1))
        };

        // Pipelines and bind groups.
        let mut steps = Vec::new();
        for (i, ks) in &kernels {
            let Kind::Compute(ops) = &self.slots[*i].kind else {
                continue;
            };
            let ops = ops.clone();
            let (out, out_bytes) = buffer_of(self, *i).ok_or_else(|| {
                other(
                    self.slots[*i].id.index(),
                    self.slots[*i].op,
                    "no output buffer",
                )
            })?;
            let mut binds: Vec<(wgpu::Buffer, u64)> = Vec::with_capacity(ops.len() + 1);
            for &o in &ops {
                match buffer_of(self, o) {
                    Some(b) => binds.push(b),
                    None => binds.push((self.dummy()?, 4)),
                }
            }
            binds.push((out, out_bytes));
            for k in ks {
                let (bgl, pl) = self.layout(k.inputs)?;
                let pipeline = self.pipeline(k, &pl)?;
                let g = Arc::clone(&self.gpu);
                let bind_group = g.scoped(&format!("binding kernel {}", k.name), || {
                    let entries: Vec<wgpu::BindGroupEntry> = binds
                        .iter()
                        .enumerate()
                        .map(|(b, (buf, bytes))| wgpu::BindGroupEntry {
                            binding: b as u32,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: buf,
                                offset: 0,
                                size: NonZeroU64::new(*bytes),
                            }),
                        })
                        .collect();
                    g.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(&k.name),
                        layout: &bgl,
                        entries: &entries,
                    })
                })?;
                if k.workgroups.contains(&0) {
                    continue;
                }
                steps.push(Step {
                    kind: self.slots[*i].op,
                    pipeline,
                    bind_group,
                    workgroups: k.workgroups,
                });
            }
        }

        // Outputs: copied into staging buffers at the end of the run.
        let mut outputs = Vec::new();
        for (name, i) in self.outputs.clone() {
            let shape = self.slots[i].shape.resolve(batch);
            let copy = match buffer_of(self, i) {
                None => None,
                Some((src, bytes)) => {
                    use wgpu::BufferUsages as U;
                    let staging = self.create_buffer(
                        &format!("b{batch} output {name}"),
                        bytes,
                        U::MAP_READ | U::COPY_DST,
                    )?;
                    Some((src, staging, bytes))
                }
            };
            outputs.push(OutputCopy { name, shape, copy });
        }

        let compute: Vec<usize> = (0..nodes.len())
            .filter(|&i| matches!(nodes[i].0, Role::Compute(_)))
            .collect();
        let stats = PlanStats {
            compute_nodes: compute.len(),
            dispatches: steps.len(),
            intermediate_buffers: bp.slots.len(),
            intermediate_bytes: bp.slots.iter().sum(),
            unpooled_bytes: compute.iter().map(|&i| nodes[i].1).sum(),
        };
        Ok(BatchPlan {
            batch,
            inputs,
            steps,
            outputs,
            stats,
        })
    }

    fn dummy(&mut self) -> Result<wgpu::Buffer> {
        if let Some(d) = &self.dummy {
            return Ok(d.clone());
        }
        let d = self.storage_buffer("empty operand", 16)?;
        self.dummy = Some(d.clone());
        Ok(d)
    }

    /// The plan for `batch`, made on first use; it becomes the most recently used.
    fn plan_index(&mut self, batch: usize) -> Result<usize> {
        if let Some(i) = self.plans.iter().position(|p| p.batch == batch) {
            let p = self.plans.remove(i);
            self.plans.push(p);
        } else {
            let p = self.build_plan(batch)?;
            if self.plans.len() >= MAX_PLANS {
                self.plans.remove(0);
            }
            self.plans.push(p);
        }
        Ok(self.plans.len() - 1)
    }

    fn run_inner(&mut self, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        let batch = bind_batch(&self.graph, inputs)?;
        let gpu = Arc::clone(&self.gpu);
        // Anything left from earlier work on the device is reported, not blamed on us
        // later.
        gpu.take_uncaptured()?;
        let p = self.plan_index(batch)?;
        let plan = &self.plans[p];

        // Check every input before touching the device.
        let mut feed: Vec<(&wgpu::Buffer, &[f32])> = Vec::new();
        for (name, buf, numel) in &plan.inputs {
            let t = inputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| BackendError::MissingInput(name.clone()))?;
            if t.data().len() != t.numel() || t.numel() != *numel {
                return Err(BackendError::InputShape {
                    name: name.clone(),
                    expected: format!("{numel} values"),
                    found: vec![t.data().len()],
                });
            }
            if let Some(b) = buf {
                feed.push((b, t.data()));
            }
        }

        let storage = self.storage;
        gpu.scoped("writing the inputs", || {
            for (b, data) in &feed {
                gpu.queue.write_buffer(b, 0, &encode(storage, data));
            }
        })?;
        let index = if self.profile {
            // One submission per dispatch, waited for: time per op kind.
            let mut prof = eptc_backend::Profile::default();
            for s in &plan.steps {
                let t0 = std::time::Instant::now();
                let i = submit(&gpu, std::slice::from_ref(s), &[])?;
                gpu.device
                    .poll(wgpu::PollType::Wait {
                        submission_index: Some(i),
                        timeout: None,
                    })
                    .map_err(|e| BackendError::Other(format!("waiting for the device: {e}")))?;
                prof.record(s.kind, t0.elapsed().as_secs_f64());
            }
            prof.print("eptc-wgpu profile", "kernels", "dispatches");
            submit(&gpu, &[], &plan.outputs)?
        } else {
            submit(&gpu, &plan.steps, &plan.outputs)?
        };

        // Read the outputs back.
        type MapResult = Option<std::result::Result<(), wgpu::BufferAsyncError>>;
        let mapped: Arc<Mutex<Vec<MapResult>>> =
            Arc::new(Mutex::new(vec![None; plan.outputs.len()]));
        // Cancels pending maps so that the next run can copy into the staging buffers.
        let cancel = || {
            let _ = gpu.scoped("", || {
                for o in &plan.outputs {
                    if let Some((_, staging, _)) = &o.copy {
                        staging.unmap();
                    }
                }
            });
        };
        let requested = gpu.scoped("reading the outputs", || {
            for (k, o) in plan.outputs.iter().enumerate() {
                if let Some((_, staging, _)) = &o.copy {
                    let m = Arc::clone(&mapped);
                    staging.map_async(wgpu::MapMode::Read, .., move |r| {
                        if let Ok(mut m) = m.lock() {
                            m[k] = Some(r);
                        }
                    });
                }
            }
        });
        if let Err(e) = requested {
            cancel();
            return Err(e);
        }
        let waited = gpu.device.poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        });
        if let Err(e) = waited {
            cancel();
            return Err(BackendError::Other(format!("waiting for the device: {e}")));
        }
        // The device is shared by the process: another thread's poll may be the one that
        // runs our map callbacks, a moment after our own poll returned. Wait for them (the
        // work is done; only the callbacks are pending), polling, for up to 10 s.
        let expected = plan.outputs.iter().filter(|o| o.copy.is_some()).count();
        let t0 = std::time::Instant::now();
        loop {
            let done = mapped
                .lock()
                .map(|m| m.iter().filter(|r| r.is_some()).count())
                .unwrap_or(expected);
            if done >= expected || t0.elapsed() > std::time::Duration::from_secs(10) {
                break;
            }
            let _ = gpu.device.poll(wgpu::PollType::Poll);
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let mut out = Vec::with_capacity(plan.outputs.len());
        let mut first_err: Option<BackendError> = None;
        for (k, o) in plan.outputs.iter().enumerate() {
            let Some((_, staging, _)) = &o.copy else {
                out.push((o.name.clone(), HostTensor::zeros(o.shape.clone())));
                continue;
            };
            let state = mapped.lock().ok().and_then(|m| m[k].clone());
            let data = match state {
                Some(Ok(())) => {
                    let numel = o.shape.iter().product::<usize>();
                    let v = staging
                        .get_mapped_range(..)
                        .map_err(|e| e.to_string())
                        .and_then(|view| {
                            decode(storage, &view, numel)
                                .ok_or_else(|| "the staging buffer is too small".to_string())
                        })
                        .map_err(|e| {
                            BackendError::Other(format!("reading output {:?}: {e}", o.name))
                        });
                    staging.unmap();
                    v
                }
                Some(Err(e)) => Err(BackendError::Other(format!(
                    "reading output {:?}: {e}",
                    o.name
                ))),
                None => {
                    staging.unmap(); // cancels the pending map
                    Err(BackendError::Other(format!(
                        "reading output {:?}: the device never finished mapping it",
                        o.name
                    )))
                }
            };
            match data {
                Ok(d) => out.push((o.name.clone(), HostTensor::new(o.shape.clone(), d))),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        gpu.take_uncaptured()?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// Record `steps` in one compute pass, then the copies of `outputs` into their staging
/// buffers, and submit it all at once.
fn submit(gpu: &Gpu, steps: &[Step], outputs: &[OutputCopy]) -> Result<wgpu::SubmissionIndex> {
    gpu.scoped("running the graph", || {
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("eptc run"),
            });
        if !steps.is_empty() {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("eptc kernels"),
                timestamp_writes: None,
            });
            for s in steps {
                pass.set_pipeline(&s.pipeline);
                pass.set_bind_group(0, &s.bind_group, &[]);
                let [x, y, z] = s.workgroups;
                pass.dispatch_workgroups(x, y, z);
            }
        }
        for o in outputs {
            if let Some((src, staging, bytes)) = &o.copy {
                enc.copy_buffer_to_buffer(src, 0, staging, 0, *bytes);
            }
        }
        gpu.queue.submit([enc.finish()])
    })
}

impl Executable for WgpuExecutable {
    fn set_param(&mut self, name: &str, value: HostTensor) -> Result<()> {
        let p = self
            .params
            .get(name)
            .ok_or_else(|| BackendError::Other(format!("the graph has no parameter {name:?}")))?;
        check_param(name, &p.shape, &value)?;
        if let Some(b) = &p.buffer {
            let g = Arc::clone(&self.gpu);
            let bytes = encode(self.storage, value.data());
            g.scoped(&format!("setting param {name}"), || {
                g.queue.write_buffer(b, 0, &bytes)
            })?;
        }
        Ok(())
    }

    fn run(&mut self, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        self.run_inner(inputs)
    }
}
