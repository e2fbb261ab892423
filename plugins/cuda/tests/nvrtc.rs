//! Every kernel of whole graphs compiles with NVRTC: the CPU tests' tiny ViT, the tiny
//! EPT ViT forward (optimized) and training graphs (the default backward and the
//! flash-style one), the IR spec's examples, and the
//! ViT-B/16 + EPT forward and training graphs as `eptc compile` writes them, each for
//! f32 and bf16 storage and for sm_80 and sm_90.
//!
//! Identical kernels (the same source with the name masked) compile once: one module
//! per graph x dtype x arch holds the graph's unique kernels. A failure names the
//! kernels NVRTC complains about and quotes its log.
//!
//! Without NVRTC (libnvrtc.so.13 not on the library path) the tests say why and pass,
//! unless `EPTC_REQUIRE_NVRTC` is set. Here: `LD_LIBRARY_PATH=/work/nvrtc/nvidia/cu13/lib`.

use std::collections::HashMap;
use std::time::Instant;

use eptc_cuda::codegen::{module_source, node_kernels, Kernel};
use eptc_cuda::nvrtc;
use eptc_ir::{DType, Graph};

// The CPU backend tests' tiny ViT, shared, not copied (it takes `rng` and `values` from
// its parent: here, the crate root).
#[path = "../../cpu/tests/common/tiny_vit.rs"]
#[allow(dead_code)]
mod tiny_vit;

#[allow(dead_code)]
fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::SeedableRng::seed_from_u64(seed)
}

#[allow(dead_code)]
fn values(r: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    use rand::Rng;
    (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect()
}

/// Whether NVRTC is there; `false` (with the reason printed) lets a test pass without it,
/// unless `EPTC_REQUIRE_NVRTC` is set.
fn nvrtc_or_skip() -> bool {
    match nvrtc::available() {
        Ok(()) => true,
        Err(e) if std::env::var_os("EPTC_REQUIRE_NVRTC").is_some() => {
            panic!("EPTC_REQUIRE_NVRTC is set, but: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn example(path: &str) -> Graph {
    // At run time when set (a test binary run outside cargo, on another machine).
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    let p = std::path::Path::new(&dir).join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    eptc_ir::text::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The kernels of every node of `g` at `batch` for storage `dtype`, one per distinct
/// masked source.
fn unique_kernels(g: &Graph, batch: usize, dtype: DType) -> (usize, Vec<Kernel>) {
    eptc_ir::verify(g).unwrap_or_else(|e| panic!("graph {}: {e}", g.name));
    let mut seen: HashMap<String, ()> = HashMap::new();
    let mut unique = Vec::new();
    let mut all = 0;
    for id in g.node_ids() {
        let ks = node_kernels(g, id, batch, dtype).unwrap_or_else(|e| {
            panic!("graph {} at batch {batch}: {e}", g.name);
        });
        for k in ks {
            all += 1;
            if seen.insert(k.masked_source(), ()).is_none() {
                unique.push(k);
            }
        }
    }
    (all, unique)
}

/// The names of the kernels whose lines NVRTC's log points at (`prog(LINE): ...`).
fn blame(source: &str, log: &str, kernels: &[Kernel]) -> Vec<String> {
    // The first line of each kernel in the module.
    let mut starts: Vec<(usize, &str)> = Vec::new();
    for (i, line) in source.lines().enumerate() {
        for k in kernels {
            if line.contains(&format!(" {}(", k.name)) && line.starts_with("extern") {
                starts.push((i + 1, &k.name));
            }
        }
    }
    let mut names = Vec::new();
    for l in log.lines() {
        let Some(open) = l.find('(') else { continue };
        let Some(close) = l[open..].find(')') else {
            continue;
        };
        let Ok(n) = l[open + 1..open + close].parse::<usize>() else {
            continue;
        };
        let owner = starts
            .iter()
            .rev()
            .find(|(s, _)| *s <= n)
            .map_or("the prelude", |(_, k)| *k);
        if !names.iter().any(|x: &String| x == owner) {
            names.push(owner.to_string());
        }
    }
    names
}

/// The storage types every graph's kernels compile for.
const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// Compile the unique kernels of each graph (for its storage type) for sm_80 and sm_90:
/// one module per combination, the combinations spread over the available cores.
fn compile_graphs(graphs: &[(String, DType, Vec<Kernel>)]) {
    let mut jobs = Vec::new();
    for (gname, dtype, ks) in graphs {
        for arch in ["sm_80", "sm_90"] {
            jobs.push((gname.as_str(), ks, *dtype, arch));
        }
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(gname, ks, dtype, arch)) = jobs.get(i) else {
                    break;
                };
                let refs: Vec<&Kernel> = ks.iter().collect();
                let src = module_source(&refs, dtype);
                let t = Instant::now();
                match nvrtc::compile(&src, arch) {
                    Ok(ptx) => {
                        for k in ks {
                            let Some(body) = entry_ptx(&ptx, &k.name) else {
                                panic!("{gname} {dtype} {arch}: no entry {} in the PTX", k.name);
                            };
                            // The vectorized and tensor-core kernels keep their arrays
                            // (a thread's eight values, its fragments) in registers: a
                            // local-memory depot would mean every access goes through
                            // the cache hierarchy instead.
                            let kept = ["st8(", "mma_t("].iter().any(|m| k.source.contains(m));
                            if kept && body.contains(".local") {
                                failures.lock().unwrap().push(format!(
                                    "{gname}, {dtype}, {arch}: {} uses local memory:\n{}",
                                    k.name,
                                    body.lines()
                                        .filter(|l| l.contains(".local"))
                                        .collect::<Vec<_>>()
                                        .join("\n")
                                ));
                            }
                        }
                        eprintln!(
                            "{gname}, {dtype}, {arch}: {} kernels, {} KiB of PTX in {:.1} s",
                            ks.len(),
                            ptx.len() / 1024,
                            t.elapsed().as_secs_f64()
                        );
                    }
                    Err(log) => {
                        let who = blame(&src, &log, ks);
                        let mut msg = format!(
                            "{gname}, {dtype}, {arch}: kernels {who:?} fail to compile:\n{log}"
                        );
                        for k in ks.iter().filter(|k| who.contains(&k.name)).take(3) {
                            msg += &format!("\n--- {} ---\n{}", k.name, k.source);
                        }
                        failures.lock().unwrap().push(msg);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The PTX of entry `name`: from its `.entry` line to the next entry (or the end).
fn entry_ptx<'a>(ptx: &'a str, name: &str) -> Option<&'a str> {
    let start = ptx.find(&format!(".entry {name}("))?;
    let rest = &ptx[start + 1..];
    let end = rest.find(".entry ").map_or(rest.len(), |e| e);
    Some(&rest[..end])
}

#[test]
fn tiny_graphs_compile() {
    if !nvrtc_or_skip() {
        return;
    }
    let t = Instant::now();
    let mut graphs = Vec::new();
    let tiny = tiny_vit::tiny_vit();
    let mut sources = vec![("tiny_vit".to_string(), tiny)];
    for f in [
        "../wgpu/tests/data/tiny_optimized.eptc",
        "../wgpu/tests/data/tiny_train.eptc",
        "../../ir-specs/examples/attention.eptc",
        "../../ir-specs/examples/fused.eptc",
        "../../ir-specs/examples/mlp.eptc",
    ] {
        let name = f.rsplit('/').next().unwrap_or(f).to_string();
        sources.push((name, example(f)));
    }
    // The training graph with the flash-style attention backward (`attention_lse`,
    // `attention_grad`: on the tensor cores in bf16), as `EPTC_CUDA_ATTENTION=fused`
    // makes it at compile.
    let flash = {
        use eptc_autodiff::loss::{add_loss, Loss, LOSS};
        let mut g = example("../wgpu/tests/data/tiny_optimized.eptc");
        add_loss(&mut g, "logits", Loss::CrossEntropy).unwrap();
        g.remove_output("features");
        let opts = eptc_autodiff::Options {
            fused_attention: true,
            ..Default::default()
        };
        eptc_autodiff::differentiate_with(&g, LOSS, &opts).unwrap()
    };
    let (_, k16) = unique_kernels(&flash, 3, DType::BF16);
    let grads = k16
        .iter()
        .filter(|k| k.name.ends_with("attention_grad") && k.source.contains("mma_t("))
        .count();
    assert!(
        grads >= 3,
        "{grads} attention gradients on the tensor cores"
    );
    sources.push(("tiny_flash_train".to_string(), flash));
    let mut total = 0;
    for (name, g) in &sources {
        for dtype in DTYPES {
            let (all, unique) = unique_kernels(g, 3, dtype);
            assert!(all > 0, "{name}: no kernels");
            total += all;
            graphs.push((name.clone(), dtype, unique));
        }
    }
    compile_graphs(&graphs);
    eprintln!(
        "tiny graphs: {total} kernels compiled in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// ViT-B/16 + EPT (cat deep, L = 100, 10 classes, 224 px) forward and training graphs at
/// batch 64: every distinct kernel.
#[test]
fn vit_b16_graphs_compile() {
    if !nvrtc_or_skip() {
        return;
    }
    let t = Instant::now();
    let mut graphs = Vec::new();
    let mut total = 0;
    for f in [
        "../wgpu/tests/data/vit_b16_optimized.eptc",
        "../wgpu/tests/data/vit_b16_train.eptc",
    ] {
        let g = example(f);
        for dtype in DTYPES {
            let (all, unique) = unique_kernels(&g, 64, dtype);
            total += all;
            let tensor = unique
                .iter()
                .filter(|k| k.source.contains("mma_t("))
                .count();
            eprintln!(
                "{f}, {dtype}: {all} kernels, {} distinct, {tensor} on the tensor cores",
                unique.len()
            );
            // The attention of the ViT-B/16 forward (12 heads of 64) runs on the tensor
            // cores in bf16.
            if f.ends_with("optimized.eptc") {
                assert_eq!(tensor > 0, dtype == DType::BF16, "{f} {dtype}");
            }
            graphs.push((f.rsplit('/').next().unwrap_or(f).to_string(), dtype, unique));
        }
    }
    assert!(total > 1400, "{total} kernels");
    compile_graphs(&graphs);
    eprintln!(
        "ViT-B/16 graphs: {total} kernels compiled in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn compile_errors_quote_nvrtc() {
    if !nvrtc_or_skip() {
        return;
    }
    let e = nvrtc::compile(
        "extern \"C\" __global__ void k() { undefined_thing(); }",
        "sm_80",
    )
    .unwrap_err();
    assert!(e.contains("undefined_thing"), "{e}");
    let e = nvrtc::compile("", "sm_1").unwrap_err();
    assert!(e.contains("sm_1"), "{e}");
    let ptx = nvrtc::compile("extern \"C\" __global__ void k() {}", "sm_90").unwrap();
    assert!(ptx.contains(".target sm_90"), "{ptx}");
}
