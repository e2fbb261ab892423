//! The example plugin (`plugins/cpu-plugin`, the CPU reference backend built as
//! `libeptc_cpu_plugin.so`) loaded by path and driven through the C ABI, against the
//! built-in CPU backend: the same capabilities, bit-identical forward outputs and
//! gradients, `set_param`, errors that carry the plugin's message, and the refusals of
//! libraries that are not plugins.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use eptc_backend::{Availability, Backend, CompileOptions};
use eptc_cpu::CpuBackend;
use eptc_ir::{DType, Graph, HostTensor, Op, WeightStore};
use eptc_plugin::PluginBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../../../plugins/cpu/tests/common/mod.rs"]
mod cpu_common;
use cpu_common::tiny_vit::{tiny_vit, weights, CLASSES};

/// Build the example plugin with the test's profile into the test's target directory
/// (once per test binary) and return the library's path.
fn plugin_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // The test runs as <target>/<profile dir>/deps/<test>.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
            "debug" => "dev",
            other => other,
        };
        let out = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "eptc-cpu-plugin",
                "--profile",
                profile,
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cannot run cargo");
        assert!(
            out.status.success(),
            "cargo build -p eptc-cpu-plugin failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = profile_dir.join(format!(
            "{}eptc_cpu_plugin{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ));
        assert!(lib.exists(), "{} was not built", lib.display());
        lib
    })
}

fn plugin() -> PluginBackend {
    PluginBackend::load(plugin_path()).unwrap_or_else(|e| panic!("{e}"))
}

fn opts() -> CompileOptions {
    CompileOptions {
        threads: Some(2),
        dtype: DType::F32,
    }
}

fn images(batch: usize, seed: u64) -> HostTensor {
    let mut r = StdRng::seed_from_u64(seed);
    let v = (0..batch * 192)
        .map(|_| r.random_range(-2.0f32..2.0))
        .collect();
    HostTensor::new(vec![batch, 3, 8, 8], v)
}

fn one_hot(batch: usize) -> HostTensor {
    let mut v = vec![0.0; batch * CLASSES];
    for b in 0..batch {
        v[b * CLASSES + b % CLASSES] = 1.0;
    }
    HostTensor::new(vec![batch, CLASSES], v)
}

/// Same names, shapes and bits.
fn assert_identical(got: &[(String, HostTensor)], want: &[(String, HostTensor)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        assert_eq!((gn, &g.shape), (wn, &w.shape), "{what}");
        let gb: Vec<u32> = g.data().iter().map(|x| x.to_bits()).collect();
        let wb: Vec<u32> = w.data().iter().map(|x| x.to_bits()).collect();
        assert!(
            gb == wb,
            "{what}: output {gn} differs from the built-in CPU backend"
        );
        assert!(
            g.data().iter().all(|x| x.is_finite()),
            "{what}: {gn} not finite"
        );
    }
}

fn run_both(g: &Graph, w: &WeightStore, inputs: &[(&str, HostTensor)], what: &str) {
    let plugin = plugin();
    let mut p = plugin.compile(g, w, &opts()).unwrap();
    let mut c = CpuBackend::new().compile(g, w, &opts()).unwrap();
    let got = p.run(inputs).unwrap();
    let want = c.run(inputs).unwrap();
    assert_identical(&got, &want, what);
}

#[test]
fn loads_with_its_name_version_and_path() {
    let p = plugin();
    assert_eq!(p.name(), "cpu-plugin");
    assert_eq!(p.plugin_version(), env!("CARGO_PKG_VERSION"));
    assert_eq!(p.path(), plugin_path());
    match p.availability() {
        Availability::Available(d) => assert!(d.contains("threads"), "{d}"),
        Availability::Unavailable(why) => panic!("unavailable: {why}"),
    }
    // The CPU backend generates no kernels; the entry answers an empty list.
    assert!(p.kernels(&tiny_vit(), 1, DType::F32).unwrap().is_empty());
    // Loading it again (same library, init again) works.
    let again = plugin();
    assert_eq!(again.name(), "cpu-plugin");
}

#[test]
fn capabilities_are_the_cpu_backends() {
    assert_eq!(plugin().capabilities(), CpuBackend::new().capabilities());
}

#[test]
fn tiny_vit_forward_is_bit_identical_to_the_builtin_cpu() {
    let g = tiny_vit();
    let w = weights(&g, 7);
    for batch in [1, 3] {
        let x = images(batch, 100 + batch as u64);
        run_both(&g, &w, &[("pixel_values", x)], &format!("batch {batch}"));
    }
}

/// The tiny ViT with its head, class token and query projection trainable, plus the
/// cross-entropy loss and the gradients (as `eptc`'s pipeline builds training graphs).
fn training_graph() -> Graph {
    use eptc_autodiff::loss::{add_loss, Loss, LOSS};
    let mut g = tiny_vit();
    for (id, name) in g
        .params()
        .into_iter()
        .map(|(id, n, _)| (id, n.to_owned()))
        .collect::<Vec<_>>()
    {
        if ["head.weight", "head.bias", "cls", "q.weight"].contains(&name.as_str()) {
            if let Op::Param { trainable, .. } = &mut g.node_mut(id).op {
                *trainable = true;
            }
        }
    }
    add_loss(&mut g, "logits", Loss::CrossEntropy).unwrap();
    g.remove_output("features");
    eptc_autodiff::differentiate(&g, LOSS).unwrap()
}

#[test]
fn training_gradients_are_bit_identical_to_the_builtin_cpu() {
    let g = training_graph();
    let outputs: Vec<&str> = g.outputs().iter().map(|(n, _)| n.as_str()).collect();
    assert!(outputs.contains(&"grad.head.weight"), "{outputs:?}");
    assert!(outputs.contains(&"grad.q.weight"), "{outputs:?}");
    let w = weights(&g, 11);
    for batch in [1, 3] {
        let inputs = [
            ("pixel_values", images(batch, 200 + batch as u64)),
            ("labels", one_hot(batch)),
        ];
        run_both(&g, &w, &inputs, &format!("training, batch {batch}"));
    }
}

#[test]
fn set_param_changes_the_result() {
    let g = tiny_vit();
    let w = weights(&g, 3);
    let x = [("pixel_values", images(2, 5))];
    let plugin = plugin();
    let mut p = plugin.compile(&g, &w, &opts()).unwrap();
    let before = p.run(&x).unwrap();

    let head = w.get("head.bias").unwrap();
    let new = HostTensor::new(head.shape.clone(), vec![10.0, -3.0, 0.5]);
    p.set_param("head.bias", new.clone()).unwrap();
    let after = p.run(&x).unwrap();
    assert_ne!(
        before[0].1.data(),
        after[0].1.data(),
        "logits did not change"
    );

    let mut c = CpuBackend::new().compile(&g, &w, &opts()).unwrap();
    c.set_param("head.bias", new).unwrap();
    assert_identical(&after, &c.run(&x).unwrap(), "after set_param");

    // A value of the wrong shape is the plugin's error, and the executable still works.
    let e = p
        .set_param("head.bias", HostTensor::zeros(vec![4]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cpu-plugin") && e.contains("head.bias"), "{e}");
    assert_identical(&p.run(&x).unwrap(), &after, "after a refused set_param");
}

#[test]
fn a_missing_weight_is_the_plugins_error() {
    let g = tiny_vit();
    let mut w = weights(&g, 1);
    w.remove("head.weight");
    let e = plugin()
        .compile(&g, &w, &opts())
        .err()
        .expect("compile without head.weight succeeded")
        .to_string();
    assert!(e.contains("plugin cpu-plugin"), "{e}");
    assert!(e.contains(r#"no value for parameter "head.weight""#), "{e}");
}

#[test]
fn a_wrong_input_is_the_plugins_error() {
    let g = tiny_vit();
    let w = weights(&g, 1);
    let plugin = plugin();
    let mut p = plugin.compile(&g, &w, &opts()).unwrap();
    let bad = HostTensor::zeros(vec![2, 3, 4, 4]);
    let e = p.run(&[("pixel_values", bad)]).unwrap_err().to_string();
    assert!(e.contains("plugin cpu-plugin"), "{e}");
    assert!(
        e.contains("pixel_values") && e.contains("expected shape"),
        "{e}"
    );
    let e = p.run(&[]).unwrap_err().to_string();
    assert!(
        e.contains("missing input") && e.contains("pixel_values"),
        "{e}"
    );
    // The executable is still usable.
    assert_eq!(p.run(&[("pixel_values", images(1, 0))]).unwrap().len(), 2);
}

#[test]
fn an_unsupported_dtype_is_the_plugins_error() {
    let g = tiny_vit();
    let w = weights(&g, 1);
    let opts = CompileOptions {
        threads: None,
        dtype: DType::BF16,
    };
    let r = plugin().compile(&g, &w, &opts);
    let builtin = CpuBackend::new().compile(&g, &w, &opts);
    // Whatever the built-in backend says about bf16 storage, the plugin says the same.
    match (r, builtin) {
        (Ok(_), Ok(_)) => {}
        (Err(e), Err(b)) => assert!(e.to_string().contains(&b.to_string()), "{e} / {b}"),
        (r, b) => panic!("plugin: {:?}, built-in: {:?}", r.err(), b.err()),
    }
}

#[test]
fn executables_outlive_the_backend() {
    let g = tiny_vit();
    let w = weights(&g, 2);
    let mut exe = plugin().compile(&g, &w, &opts()).unwrap();
    // The PluginBackend is gone; the executable keeps the library loaded.
    let x = [("pixel_values", images(1, 9))];
    let got = exe.run(&x).unwrap();
    let want = CpuBackend::new()
        .compile(&g, &w, &opts())
        .unwrap()
        .run(&x)
        .unwrap();
    assert_identical(&got, &want, "after the backend was dropped");
    // And move to another thread (Executable: Send).
    std::thread::spawn(move || exe.run(&x).unwrap())
        .join()
        .unwrap();
}

#[test]
fn a_library_without_the_symbol_is_refused() {
    let e = PluginBackend::load(Path::new("libm.so.6")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("libm.so.6: "), "{msg}");
    assert!(msg.contains("does not export eptc_plugin_api"), "{msg}");
}

#[test]
fn a_missing_or_broken_file_is_refused() {
    let e = PluginBackend::load(Path::new("/nonexistent/libfoo.so")).unwrap_err();
    assert_eq!(e.to_string(), "/nonexistent/libfoo.so: no such file");

    let dir = std::env::temp_dir().join(format!("eptc-plugin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("libjunk.so");
    std::fs::write(&junk, b"not an ELF file").unwrap();
    let msg = PluginBackend::load(&junk).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        msg.starts_with(&format!("{}: cannot load the library", junk.display())),
        "{msg}"
    );
}
