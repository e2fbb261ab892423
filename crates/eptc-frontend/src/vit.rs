//! Importing a ViT checkpoint: detect its layout and architecture, build the IR graph,
//! and collect its weights (memory-mapped where possible).

use std::path::{Path, PathBuf};

use eptc_ir::{BinaryOp, Graph, HostTensor, Init, NodeId, Shape, TensorType, UnaryOp, WeightStore};

use crate::error::{FrontendError, Result};
use crate::layout::{Layout, Qkv};
use crate::posembed;
use crate::tensorfile::TensorFile;

/// What the user tells the importer that a file may not say.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Attention heads. Default: a Hugging Face `config.json` beside the file, else dim/64.
    pub heads: Option<usize>,
    /// LayerNorm epsilon. Default: the layout's (1e-6 timm/mmcls, 1e-12 HF, or config.json).
    pub eps: Option<f32>,
    /// Input image size; position embeddings are resized when it differs from the
    /// checkpoint's. Default: the checkpoint's.
    pub image_size: Option<usize>,
}

/// The architecture of an imported ViT.
#[derive(Clone, Debug, PartialEq)]
pub struct VitArch {
    pub layout: Layout,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub patch: usize,
    pub in_chans: usize,
    pub mlp_hidden: usize,
    pub qkv_bias: bool,
    pub eps: f32,
    /// The image size the checkpoint was trained at (from its position embeddings).
    pub checkpoint_image_size: usize,
    /// The image size the graph takes.
    pub image_size: usize,
    /// Classes of the checkpoint's own head, if it has one.
    pub head_classes: Option<usize>,
}

impl VitArch {
    /// Tokens per image: the class token plus the patches.
    pub fn tokens(&self) -> usize {
        1 + (self.image_size / self.patch).pow(2)
    }
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
}

/// An imported model: its graph (outputs `features` and, with a head, `logits`), the
/// weights the graph's params name, and the architecture.
#[derive(Clone, Debug)]
pub struct Model {
    pub path: PathBuf,
    pub arch: VitArch,
    pub graph: Graph,
    pub weights: WeightStore,
    /// The head's keys in the checkpoint (without `.weight`), if it has a head.
    pub head_key: Option<String>,
}

impl Model {
    /// Number of scalars in the checkpoint's weights that the graph uses.
    pub fn param_count(&self) -> usize {
        self.weights.iter().map(|(_, t)| t.numel()).sum()
    }
}

struct Ctx<'a> {
    file: &'a TensorFile,
    g: Graph,
    weights: WeightStore,
}

impl Ctx<'_> {
    /// A frozen param read from the checkpoint, shape-checked.
    fn param(&mut self, key: &str, shape: &[usize]) -> Result<NodeId> {
        let t = self.file.get_shaped(key, shape)?.clone();
        self.frozen(key, t)
    }

    fn frozen(&mut self, key: &str, t: HostTensor) -> Result<NodeId> {
        if let Some(id) = self.g.find_param(key) {
            return Ok(id);
        }
        let ty = TensorType::f32(Shape::fixed(&t.shape));
        self.weights.insert(key, t);
        Ok(self.g.param(key, false, Init::Checkpoint, ty))
    }

    /// `x W^T + b` for a linear layer stored as `key.weight` `[out, in]`, `key.bias`.
    fn linear(
        &mut self,
        x: NodeId,
        key: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<NodeId> {
        let w = self.param(&format!("{key}.weight"), &[out, inp])?;
        let y = self.g.matmul(x, w, false, true)?;
        if bias {
            let b = self.param(&format!("{key}.bias"), &[out])?;
            Ok(self.g.binary(BinaryOp::Add, y, b)?)
        } else {
            Ok(y)
        }
    }

    fn layernorm(&mut self, x: NodeId, key: &str, dim: usize, eps: f32) -> Result<NodeId> {
        let w = self.param(&format!("{key}.weight"), &[dim])?;
        let b = self.param(&format!("{key}.bias"), &[dim])?;
        Ok(self.g.layernorm(x, w, b, eps)?)
    }
}

fn arch_err(path: &Path, msg: impl Into<String>) -> FrontendError {
    FrontendError::Arch {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Read `config.json` beside a Hugging Face checkpoint, if there is one.
fn hf_config(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path.parent()?.join("config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Detect the architecture of an opened checkpoint.
pub fn detect(file: &TensorFile, opts: &ImportOptions) -> Result<VitArch> {
    let path = &file.path;
    let layout = Layout::detect(file.tensors.keys().map(String::as_str)).ok_or_else(|| {
        let some: Vec<&str> = file.tensors.keys().take(5).map(String::as_str).collect();
        FrontendError::NotVit {
            path: path.clone(),
            msg: format!(
                "no timm (blocks.0.norm1.weight), Hugging Face (encoder.layer.0.layernorm_before.weight) \
                 or mmcls (layers.0.ln1.weight) keys; the file starts with {some:?}"
            ),
        }
    })?;
    let cls = file.get(&layout.cls_token(), "[1, 1, dim]")?;
    // Width and channels must be positive: with a 0, every weight would be empty and
    // the file's other dimensions unbounded by its bytes.
    let dim = match cls.shape[..] {
        [1, 1, d] if d > 0 => d,
        _ => {
            return Err(FrontendError::TensorShape {
                path: path.clone(),
                key: layout.cls_token(),
                expected: "[1, 1, dim] with dim > 0".into(),
                found: cls.shape.clone(),
            })
        }
    };
    let pw_key = format!("{}.weight", layout.patch_embed());
    let pw = file.get(&pw_key, "[dim, channels, patch, patch]")?;
    let (in_chans, patch) = match pw.shape[..] {
        [d, c, p, q] if d == dim && p == q && p > 0 && c > 0 => (c, p),
        _ => {
            return Err(FrontendError::TensorShape {
                path: path.clone(),
                key: pw_key,
                expected: format!("[{dim}, channels, patch, patch] with channels, patch > 0"),
                found: pw.shape.clone(),
            })
        }
    };
    let pos = file.get(&layout.pos_embed(), "[1, 1 + patches, dim]")?;
    let grid = match pos.shape[..] {
        [1, n, d] if d == dim && n > 1 => {
            // `n` may be huge where the width is 0 (an empty tensor): no overflow.
            let g = ((n - 1) as f64).sqrt().round() as usize;
            (g.checked_mul(g) == Some(n - 1)).then_some(g)
        }
        _ => None,
    }
    .ok_or_else(|| FrontendError::TensorShape {
        path: path.clone(),
        key: layout.pos_embed(),
        expected: format!("[1, 1 + g*g, {dim}] (a class token and a square patch grid)"),
        found: pos.shape.clone(),
    })?;
    let mut depth = 0;
    while file.tensors.contains_key(&layout.block_probe(depth)) {
        depth += 1;
    }
    let fc1 = format!("{}.weight", layout.block(0).fc1);
    let mlp_hidden = file.get(&fc1, "[hidden, dim]")?.shape[0];
    let qkv_bias = match layout.block(0).qkv {
        Qkv::Fused(k) => file.tensors.contains_key(&format!("{k}.bias")),
        Qkv::Split([q, _, _]) => file.tensors.contains_key(&format!("{q}.bias")),
    };
    let config = matches!(layout, Layout::Hf { .. })
        .then(|| hf_config(path))
        .flatten();
    let cfg_usize = |k: &str| {
        config
            .as_ref()
            .and_then(|c| c[k].as_u64())
            .map(|v| v as usize)
    };
    let heads = match opts.heads.or_else(|| cfg_usize("num_attention_heads")) {
        Some(h) => h,
        None if dim % 64 == 0 => dim / 64,
        None => {
            return Err(arch_err(
                path,
                format!("cannot tell the number of attention heads (dim {dim} is not a multiple of 64): pass --heads"),
            ))
        }
    };
    if heads == 0 || dim % heads != 0 {
        return Err(arch_err(
            path,
            format!("{heads} heads do not divide the width {dim}"),
        ));
    }
    let eps = opts
        .eps
        .or_else(|| {
            config
                .as_ref()
                .and_then(|c| c["layer_norm_eps"].as_f64())
                .map(|e| e as f32)
        })
        .unwrap_or_else(|| layout.default_eps());
    // Sizes come from the file's shapes, which may be huge where another is 0 (an
    // empty tensor): every size the graph uses must be representable.
    let too_large = |what: &str| {
        arch_err(
            path,
            format!("{what} too large (width {dim}, patch {patch}, {in_chans} channels, patch grid {grid}x{grid}, MLP width {mlp_hidden})"),
        )
    };
    let checkpoint_image_size = grid
        .checked_mul(patch)
        .ok_or_else(|| too_large("image size"))?;
    let image_size = opts.image_size.unwrap_or(checkpoint_image_size);
    if image_size == 0 || !image_size.is_multiple_of(patch) {
        return Err(arch_err(
            path,
            format!("image size {image_size} is not a positive multiple of the patch size {patch}"),
        ));
    }
    // Elements of the largest activations per image: patches, tokens x (3 dim, MLP),
    // attention scores; bytes must fit too.
    let side = image_size / patch;
    let tokens = side
        .checked_mul(side)
        .and_then(|t| t.checked_add(1))
        .ok_or_else(|| too_large("token count"))?;
    let per_token = [
        in_chans
            .checked_mul(patch)
            .and_then(|c| c.checked_mul(patch)),
        dim.checked_mul(3),
        Some(mlp_hidden),
        Some(tokens),
    ];
    for n in per_token {
        n.and_then(|n| n.checked_mul(tokens))
            .and_then(|n| n.checked_mul(8))
            .ok_or_else(|| too_large("activations"))?;
    }
    let head_classes = layout
        .head_candidates()
        .iter()
        .find_map(|h| file.tensors.get(&format!("{h}.weight")))
        .filter(|w| w.shape.len() == 2 && w.shape[1] == dim)
        .map(|w| w.shape[0]);
    Ok(VitArch {
        layout,
        dim,
        depth,
        heads,
        patch,
        in_chans,
        mlp_hidden,
        qkv_bias,
        eps,
        checkpoint_image_size,
        image_size,
        head_classes,
    })
}

/// Import a ViT checkpoint from a safetensors file.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Model> {
    let file = TensorFile::read(path)?;
    import_file(&file, opts)
}

/// Import from an already opened file.
pub fn import_file(file: &TensorFile, opts: &ImportOptions) -> Result<Model> {
    let arch = detect(file, opts)?;
    let a = &arch;
    let (d, h, hd) = (a.dim, a.heads, a.head_dim());
    let n = a.tokens();
    let grid = a.image_size / a.patch;
    let l = &a.layout;
    let mut cx = Ctx {
        file,
        g: Graph::new("vit"),
        weights: WeightStore::new(),
    };
    let img = TensorType::f32(Shape::batched(&[a.in_chans, a.image_size, a.image_size]));
    let x = cx.g.input("pixel_values", img);

    // Patch embedding: a stride-p convolution is a matmul on patches.
    let cpp = a.in_chans * a.patch * a.patch;
    let patches = cx.g.patchify(x, a.patch)?;
    let pkey = l.patch_embed();
    let pw = cx.param(
        &format!("{pkey}.weight"),
        &[d, a.in_chans, a.patch, a.patch],
    )?;
    let pw = cx.g.reshape(pw, Shape::fixed(&[d, cpp]))?;
    let e = cx.g.matmul(patches, pw, false, true)?;
    let pb = cx.param(&format!("{pkey}.bias"), &[d])?;
    let e = cx.g.binary(BinaryOp::Add, e, pb)?;

    // Class token and position embeddings (resized to the grid if needed).
    let cls = cx.param(&l.cls_token(), &[1, 1, d])?;
    let cls = cx.g.broadcast(cls, Shape::batched(&[1, d]))?;
    let mut t = cx.g.concat(&[cls, e], 1)?;
    let pkey = l.pos_embed();
    let old_grid = a.checkpoint_image_size / a.patch;
    let pos = if grid == old_grid {
        cx.param(&pkey, &[1, n, d])?
    } else {
        let src = file.get_shaped(&pkey, &[1, 1 + old_grid * old_grid, d])?;
        let resized = posembed::resize(src.data(), d, 1, (old_grid, old_grid), (grid, grid));
        cx.frozen(&pkey, HostTensor::new(vec![1, n, d], resized))?
    };
    t = cx.g.binary(BinaryOp::Add, t, pos)?;

    let scale = cx.g.scalar((hd as f32).powf(-0.5));
    for i in 0..a.depth {
        let k = l.block(i);
        let y = cx.layernorm(t, &k.norm1, d, a.eps)?;
        let heads_of = |cx: &mut Ctx, y: NodeId| -> Result<NodeId> {
            let y = cx.g.reshape(y, Shape::batched(&[n, h, hd]))?;
            Ok(cx.g.permute(y, &[0, 2, 1, 3])?)
        };
        let (q, kk, v) = match &k.qkv {
            Qkv::Fused(key) => {
                let qkv = cx.linear(y, key, 3 * d, d, a.qkv_bias)?;
                let qkv = cx.g.reshape(qkv, Shape::batched(&[n, 3, h, hd]))?;
                let qkv = cx.g.permute(qkv, &[2, 0, 3, 1, 4])?;
                let mut parts = [qkv; 3];
                for (j, p) in parts.iter_mut().enumerate() {
                    let s = cx.g.slice(qkv, 0, j, j + 1)?;
                    *p = cx.g.reshape(s, Shape::batched(&[h, n, hd]))?;
                }
                (parts[0], parts[1], parts[2])
            }
            Qkv::Split(keys) => {
                let mut parts = [y; 3];
                for (p, key) in parts.iter_mut().zip(keys) {
                    let z = cx.linear(y, key, d, d, a.qkv_bias)?;
                    *p = heads_of(&mut cx, z)?;
                }
                (parts[0], parts[1], parts[2])
            }
        };
        // S = (Q K^T) * scale, softmax over keys, then A V (the EPT reference order).
        let s = cx.g.matmul(q, kk, false, true)?;
        let s = cx.g.binary(BinaryOp::Mul, s, scale)?;
        let attn = cx.g.softmax(s, 3)?;
        let o = cx.g.matmul(attn, v, false, false)?;
        let o = cx.g.permute(o, &[0, 2, 1, 3])?;
        let o = cx.g.reshape(o, Shape::batched(&[n, d]))?;
        let o = cx.linear(o, &k.proj, d, d, true)?;
        t = cx.g.binary(BinaryOp::Add, t, o)?;
        let y = cx.layernorm(t, &k.norm2, d, a.eps)?;
        let y = cx.linear(y, &k.fc1, a.mlp_hidden, d, true)?;
        let y = cx.g.unary(UnaryOp::Gelu, y)?;
        let y = cx.linear(y, &k.fc2, d, a.mlp_hidden, true)?;
        t = cx.g.binary(BinaryOp::Add, t, y)?;
    }
    let t = cx.layernorm(t, &l.final_norm(), d, a.eps)?;
    let c = cx.g.slice(t, 1, 0, 1)?;
    let features = cx.g.reshape(c, Shape::batched(&[d]))?;
    cx.g.set_output("features", features);

    let head_key = match a.head_classes {
        Some(classes) => {
            let key = l
                .head_candidates()
                .into_iter()
                .find(|h| file.tensors.contains_key(&format!("{h}.weight")))
                .expect("head_classes implies a head key");
            let bias = file.tensors.contains_key(&format!("{key}.bias"));
            let logits = cx.linear(features, &key, classes, d, bias)?;
            cx.g.set_output("logits", logits);
            Some(key)
        }
        None => None,
    };
    eptc_ir::verify(&cx.g)?;
    Ok(Model {
        path: file.path.clone(),
        arch,
        graph: cx.g,
        weights: cx.weights,
        head_key,
    })
}
