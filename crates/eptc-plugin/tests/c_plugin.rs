//! A plugin written in C against `include/eptc_plugin.h` (`tests/c/negate_plugin.c`, a toy
//! backend that runs `y = neg(x)`), compiled with the system's C compiler and loaded by
//! path: the header and the Rust ABI agree (the table's size, every entry called), and
//! the refusals of real libraries (another API version, a short table, a failing init)
//! carry the path and the reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use eptc_backend::{Availability, Backend, CompileOptions};
use eptc_ir::{DType, Graph, HostTensor, Shape, TensorType, UnaryOp, WeightStore};
use eptc_plugin::PluginBackend;

/// Compile the C plugin with `defines` into `lib<stem>.so` under the test's temp dir.
fn build(stem: &str, defines: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("eptc-plugin-c");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("lib{stem}.so"));
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-std=c11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
        ])
        .arg(&out)
        .arg("-I")
        .arg(manifest.join("include"))
        .args(defines.iter().map(|d| format!("-D{d}")))
        .arg(manifest.join("tests/c/negate_plugin.c"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(status.success(), "{cc} failed on tests/c/negate_plugin.c");
    out
}

fn neg_graph() -> Graph {
    let mut g = Graph::new("neg");
    let x = g.input("x", TensorType::f32(Shape::batched(&[2, 3])));
    let y = g.unary(UnaryOp::Neg, x).unwrap();
    g.set_output("y", y);
    g
}

#[test]
fn a_c_plugin_loads_and_runs() {
    let path = build("c_negate", &[]);
    let be = PluginBackend::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(be.name(), "c-negate");
    assert_eq!(be.plugin_version(), "0.0.1-c");
    assert_eq!(
        be.availability(),
        Availability::Available("host memory, one thread".into())
    );
    let caps = be.capabilities();
    assert_eq!(caps.ops, ["input", "neg"]);
    assert!(caps.fused_ops.is_empty());
    assert_eq!(caps.dtypes, [DType::F32], "the unknown dtype is ignored");
    assert!(be.kernels(&neg_graph(), 1, DType::F32).unwrap().is_empty());

    let mut exe = be
        .compile(
            &neg_graph(),
            &WeightStore::new(),
            &CompileOptions::default(),
        )
        .unwrap();
    assert_eq!(exe.device_seconds(), None, "no run yet");
    let x = HostTensor::new(vec![2, 2, 3], (0..12).map(|i| i as f32 - 5.5).collect());
    let out = exe.run(&[("x", x.clone())]).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, "y");
    assert_eq!(out[0].1.shape, x.shape);
    let want: Vec<f32> = x.data().iter().map(|v| -v).collect();
    assert_eq!(out[0].1.data(), &want[..]);
    assert_eq!(exe.device_seconds(), Some(0.25));

    // The C plugin's errors, with its messages.
    let e = exe.run(&[]).unwrap_err().to_string();
    assert_eq!(e, r#"plugin c-negate: expects exactly one input, "x""#);
    let e = exe
        .set_param("w", HostTensor::zeros(vec![1]))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        r#"plugin c-negate: no parameter named "w" in y = neg(x)"#
    );
    let mut relu = Graph::new("relu");
    let x = relu.input("x", TensorType::f32(Shape::batched(&[3])));
    let y = relu.unary(UnaryOp::Relu, x).unwrap();
    relu.set_output("y", y);
    let e = be
        .compile(&relu, &WeightStore::new(), &CompileOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        e,
        "plugin c-negate: the graph is not y = neg(x): this plugin only negates"
    );
}

#[test]
fn a_c_plugin_of_another_api_version_is_refused() {
    let path = build("c_negate_v2", &["EPTC_TEST_API_VERSION=2"]);
    let e = PluginBackend::load(&path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("{}: API version 2, this eptc speaks 1", path.display())
    );
}

#[test]
fn a_c_plugin_with_a_short_table_is_refused() {
    let path = build("c_negate_short", &["EPTC_TEST_SHORT_TABLE"]);
    let e = PluginBackend::load(&path).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: its function table has", path.display())),
        "{e}"
    );
    assert!(e.contains("struct_size too small"), "{e}");
}

#[test]
fn a_c_plugin_whose_init_fails_is_refused() {
    let path = build("c_negate_noinit", &["EPTC_TEST_FAIL_INIT"]);
    let e = PluginBackend::load(&path).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: plugin c-negate failed to initialise (unavailable): \
             no XPU 9000 found (checked /dev/xpu0)",
            path.display()
        )
    );
}
