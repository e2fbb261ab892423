//! The compile pipeline as the CLI wires it: import, PEFT pass, backend.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use eptc_backend::{Backend, CompileOptions};
use eptc_frontend::{Model, TensorFile};
use eptc_ir::{DType, Graph, HostTensor, Op};
use eptc_peft::ept::prompt_name;
use eptc_peft::{PeftConfig, PromptInit};

use crate::args::{ModelArgs, OptArgs, PeftArgs};
use crate::backends;

/// The stages of one compilation.
pub struct Compiled {
    pub model: Model,
    pub imported: Graph,
    pub peft: Graph,
    /// The graph the backend runs: optimized for it, or the PEFT stage with `--no-optimize`.
    pub optimized: Graph,
    pub opt_summary: Option<eptc_opt::Summary>,
    /// The training graph: the run graph plus the loss and the gradients of the trainable
    /// tensors (`grad.<name>`), made by the autodiff pass.
    pub train: Graph,
    /// Frozen weights the optimizer folded (`folded.<k>`), computed at compile time.
    pub folded: BTreeMap<String, HostTensor>,
    pub config: PeftConfig,
    /// Initial values of the trainable tensors.
    pub adapter: BTreeMap<String, HostTensor>,
}

/// Import `path`, apply the PEFT method and optimize for `target`.
pub fn build(
    path: &Path,
    margs: &ModelArgs,
    pargs: &PeftArgs,
    oargs: &OptArgs,
    target: &str,
) -> Result<Compiled> {
    let model = eptc_frontend::import(path, &margs.import_options())?;
    let config = pargs
        .config(&model.arch)
        .with_context(|| format!("{}", path.display()))?;
    let imported = model.graph.clone();
    let mut peft = model.graph.clone();
    let ckpt_head = match (&model.head_key, pargs.num_classes) {
        (Some(k), None) => {
            let w = model.weights.get(&format!("{k}.weight")).cloned();
            let b = model.weights.get(&format!("{k}.bias")).cloned();
            match (w, b) {
                (Some(w), Some(b)) => Some((w, b)),
                (Some(w), None) => {
                    let c = w.shape[0];
                    Some((w, HostTensor::zeros(vec![c])))
                }
                _ => None,
            }
        }
        _ => None,
    };
    let mut adapter =
        eptc_peft::apply_with_weights(&mut peft, &config, ckpt_head, pargs.seed, &model.weights)?;
    if config.prompt_init == Some(PromptInit::Token) {
        let file = pargs
            .init_input
            .as_deref()
            .expect("checked by PeftArgs::config");
        token_init(&model, &imported, &config, file, target, &mut adapter)?;
    }
    let (optimized, opt_summary, folded) = if oargs.no_optimize {
        (peft.clone(), None, BTreeMap::new())
    } else {
        let caps = backends::find(target)?.capabilities();
        let (g, mut s) = eptc_opt::optimize(&peft, &|k| caps.supports(k), &oargs.limits()?)?;
        let f = eptc_opt::fold::split_constants(&g)?;
        let folded = fold_weights(&f.constants, &model)?;
        s.nodes_after = f.graph.len();
        s.folded_weights = folded.len();
        (f.graph, Some(s), folded)
    };
    // The fused attention backward where the target has kernels for it.
    let caps = backends::find(target)?.capabilities();
    let opts = eptc_autodiff::Options {
        fused_attention: caps.supports("attention_lse") && caps.supports("attention_grad"),
        recompute_gelu: backends::find(target)?.recompute_gelu(),
    };
    let train = training_graph(&optimized, config.task, &opts)?;
    Ok(Compiled {
        model,
        imported,
        peft,
        optimized,
        train,
        opt_summary,
        folded,
        config,
        adapter,
    })
}

/// The training graph of a run graph: the task's loss on `logits` (input `labels`
/// `[B, C]`), then the autodiff pass. It is derived from the optimized forward graph, so
/// the fused ops (attention with the EPT sink, linear epilogues) keep their own backward;
/// with `opts.fused_attention`, attention's backward is the fused `attention_lse` /
/// `attention_grad` ops (for a backend with kernels for them); with
/// `opts.recompute_gelu`, the MLP's pre-activation is recomputed in the backward.
pub fn training_graph(
    run: &Graph,
    task: eptc_peft::Task,
    opts: &eptc_autodiff::Options,
) -> Result<Graph> {
    use eptc_autodiff::loss::{add_loss, Loss, LOSS};
    let mut g = run.clone();
    let loss = match task {
        eptc_peft::Task::Multilabel => Loss::BinaryCrossEntropy,
        eptc_peft::Task::Multiclass => Loss::CrossEntropy,
    };
    add_loss(&mut g, "logits", loss)?;
    // Training reads the loss, the logits (for its running metrics) and the gradients.
    g.remove_output("features");
    let mut t = eptc_autodiff::differentiate_with(&g, LOSS, opts)?;
    t.name = format!("{}-train", run.name);
    Ok(t)
}

/// Compute the optimizer's folded weights once, on the CPU reference backend.
fn fold_weights(constants: &Graph, model: &Model) -> Result<BTreeMap<String, HostTensor>> {
    if constants.outputs().is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut exe = executable("cpu", constants, &model.weights, None, DType::F32)?;
    Ok(exe.run(&[])?.into_iter().collect())
}

/// Fill the prompts from the mean token embedding of a batch (`--prompt-init token`).
fn token_init(
    model: &Model,
    imported: &Graph,
    cfg: &PeftConfig,
    input: &Path,
    target: &str,
    adapter: &mut BTreeMap<String, HostTensor>,
) -> Result<()> {
    // The token embeddings are the input of the first LayerNorm.
    let mut g = imported.clone();
    let first_ln = g
        .topo_order()?
        .into_iter()
        .find(|&id| matches!(g.node(id).op, Op::LayerNorm { .. }))
        .context("the model has no LayerNorm")?;
    let tokens = g.operands(first_ln)[0];
    for (name, _) in g.outputs().to_vec() {
        g.remove_output(&name);
    }
    g.set_output("tokens", tokens);
    g.remove_dead();
    let pixels = read_pixels(input)?;
    // A compile-time computation, like the folds: on the CPU reference backend.
    let _ = target;
    let backend = backends::get("cpu")?;
    let mut exe = backend.compile(&g, &model.weights, &CompileOptions::default())?;
    let out = exe.run(&[("pixel_values", pixels)])?;
    let n = model.arch.tokens();
    for j in 0..cfg.layers.len() {
        adapter.insert(
            prompt_name(j),
            eptc_peft::adapter::token_init(&out[0].1, n, cfg.prompt_len),
        );
    }
    Ok(())
}

/// Read `pixel_values` from a tensor file.
pub fn read_pixels(path: &Path) -> Result<HostTensor> {
    let f = TensorFile::read(path)?;
    let t = f.get("pixel_values", "[B, 3, H, W]")?;
    if t.shape.len() != 4 {
        bail!(
            "{}: pixel_values has shape {:?}, expected [B, channels, H, W]",
            path.display(),
            t.shape
        );
    }
    Ok(t.clone())
}

/// A weight store holding the checkpoint's weights, the folded ones and the adapter's
/// values.
pub fn weights_with(
    model: &Model,
    folded: &BTreeMap<String, HostTensor>,
    adapter: &BTreeMap<String, HostTensor>,
) -> eptc_ir::WeightStore {
    let mut w = model.weights.clone();
    for (k, v) in folded.iter().chain(adapter) {
        w.insert(k.clone(), v.clone());
    }
    w
}

/// The kernels `target` generates for `graph` at batch `batch` (fused ops it lacks
/// lowered first, as [`executable`] does), validated; no device needed.
pub fn kernels(
    target: &str,
    graph: &Graph,
    batch: usize,
    dtype: DType,
) -> Result<Vec<eptc_backend::KernelSource>> {
    let backend = backends::find(target)?;
    let caps = backend.capabilities();
    let mut g = graph.clone();
    eptc_ir::decompose::lower_unsupported(&mut g, &|k| caps.supports(k))?;
    Ok(backend.kernels(&g, batch, dtype)?)
}

/// Compile `graph` for `target` with the given weights.
pub fn executable(
    target: &str,
    graph: &Graph,
    weights: &eptc_ir::WeightStore,
    threads: Option<usize>,
    dtype: DType,
) -> Result<Box<dyn eptc_backend::Executable>> {
    let backend: Box<dyn Backend> = backends::get(target)?;
    // Fused ops the backend lacks run as their decomposition.
    let caps = backend.capabilities();
    let mut g = graph.clone();
    eptc_ir::decompose::lower_unsupported(&mut g, &|k| caps.supports(k))?;
    // Primitives have no fallback: a backend (a plugin) that lacks one is told so here,
    // with the node, rather than handed a graph it cannot run.
    for id in g.node_ids() {
        let kind = g.node(id).op.kind();
        if !caps.supports(kind) {
            bail!(
                "backend {} does not support op {kind} (node %{}), which this graph needs; \
                 its capabilities list {} ops",
                backend.name(),
                id.index(),
                caps.ops.len() + caps.fused_ops.len()
            );
        }
    }
    Ok(backend.compile(&g, weights, &CompileOptions { threads, dtype })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    #[command(no_binary_name = true)]
    struct Cli {
        #[command(flatten)]
        a: crate::cmd_compile::CompileArgs,
    }

    fn count(g: &Graph, kind: &str) -> usize {
        g.node_ids()
            .into_iter()
            .filter(|&id| g.node(id).op.kind() == kind)
            .count()
    }

    /// The training graph with the fused attention backward (`attention_lse`,
    /// `attention_grad`), run on the CPU backend as its decomposition, and the one
    /// recomputing the MLP's pre-activation give the loss and gradients of the default
    /// training graph (tiny ViT, EPT deep with the sink).
    #[test]
    fn fused_attention_backward_and_recomputation_give_the_same_gradients() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let model = root.join("tests/fixtures/tiny_timm.safetensors");
        let a = Cli::try_parse_from([model.to_str().unwrap(), "--heads", "3", "--peft", "ept"])
            .unwrap()
            .a;
        let c = build(&a.model, &a.model_args, &a.peft, &a.opt, "cpu").unwrap();
        let with = |fused_attention, recompute_gelu| {
            let o = eptc_autodiff::Options {
                fused_attention,
                recompute_gelu,
            };
            training_graph(&c.optimized, c.config.task, &o).unwrap()
        };
        let plain = with(false, false);
        let fused = with(true, false);
        let recomputed = with(false, true);
        let both = with(true, true);
        let layers = count(&c.optimized, "attention");
        assert!(layers > 0);
        assert_eq!(count(&plain, "attention_grad"), 0);
        // Every attention on a path from a trainable tensor gets its lse and gradients.
        let (lse, grads) = (
            count(&fused, "attention_lse"),
            count(&fused, "attention_grad"),
        );
        eprintln!("{layers} attention layers: {lse} attention_lse, {grads} attention_grad");
        assert!(lse >= 1 && lse <= layers && grads >= lse && grads <= 3 * lse);
        let w = weights_with(&c.model, &c.folded, &c.adapter);
        let px = TensorFile::read(&root.join("tests/fixtures/input_b3.safetensors")).unwrap();
        let px = px.get("pixel_values", "[B, 3, H, W]").unwrap().clone();
        let labels_id = fused.find_input(eptc_autodiff::loss::LABELS).unwrap();
        let classes = fused.ty(labels_id).shape.resolve(3)[1];
        let mut onehot = vec![0.0; 3 * classes];
        for (i, c) in [0, 2, 1].iter().enumerate() {
            onehot[i * classes + c % classes] = 1.0;
        }
        let labels = HostTensor::new(vec![3, classes], onehot);
        let run = |g: &Graph| {
            let mut exe = executable("cpu", g, &w, Some(2), DType::F32).unwrap();
            let out = exe
                .run(&[("pixel_values", px.clone()), ("labels", labels.clone())])
                .unwrap();
            out.into_iter().collect::<BTreeMap<_, _>>()
        };
        let want = run(&plain);
        // The recomputing graphs keep the fused linear + GELU and store no pre-activation:
        // no separate `gelu`, one more linear per GELU linear.
        assert!(count(&plain, "gelu") > 0);
        assert_eq!(count(&recomputed, "gelu"), 0);
        assert_eq!(
            count(&recomputed, "linear"),
            count(&plain, "linear") + count(&plain, "gelu")
        );
        // (Each MLP reads a LayerNorm, recomputed too and not shared with the forward's.)
        assert_eq!(
            count(&recomputed, "layernorm"),
            count(&plain, "layernorm") + count(&plain, "gelu")
        );
        for (what, g) in [
            ("fused attention", &fused),
            ("recomputed GELU input", &recomputed),
            ("both", &both),
        ] {
            let got = run(g);
            assert_eq!(
                want.keys().collect::<Vec<_>>(),
                got.keys().collect::<Vec<_>>()
            );
            let mut grads = 0;
            for (k, a) in &want {
                let b = &got[k];
                let num: f64 = a
                    .data()
                    .iter()
                    .zip(b.data())
                    .map(|(x, y)| f64::from(x - y).powi(2))
                    .sum();
                let den: f64 = a.data().iter().map(|x| f64::from(*x).powi(2)).sum();
                let rel = (num / den.max(1e-30)).sqrt();
                assert!(rel <= 1e-5, "{what}: {k}: relative error {rel:e}");
                grads += usize::from(k.starts_with("grad."));
            }
            assert!(grads >= 2, "{grads} gradients compared");
        }
    }
}
