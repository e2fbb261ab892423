//! Backend plugins end to end through the command line: the example plugin
//! (`plugins/cpu-plugin`, the CPU reference backend built as a `cdylib` outside the
//! `eptc` binary and speaking the C ABI of `crates/eptc-plugin`) is built, loaded by path,
//! and passes the PyTorch parity suite (logits of every EPT mode and depth, gradients),
//! trains to the same adapter as the built-in CPU backend, and is refused clearly when
//! it is not a plugin.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// Build the example plugin (same profile as this test) and return its library's path.
fn plugin() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        // target/<profile>/deps/plugins-<hash>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "eptc-cpu-plugin"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        // Build into the directory this test runs from.
        cmd.env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
        let st = cmd.status().expect("cargo runs");
        assert!(st.success(), "building the example plugin failed");
        let lib = profile_dir.join(format!(
            "{}eptc_cpu_plugin{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ));
        assert!(lib.exists(), "{} missing after the build", lib.display());
        lib
    })
}

fn target() -> Vec<String> {
    vec!["--target".into(), plugin().display().to_string()]
}

#[test]
fn plugins_lists_the_loaded_plugin() {
    let lib = plugin();
    let out = eptc_ok(&["plugins", "--plugin", s(lib)]);
    let line = out
        .lines()
        .find(|l| l.starts_with("cpu-plugin"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("plugin") && line.contains("available"),
        "{out}"
    );
    assert!(out.contains(&lib.display().to_string()), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&eptc_ok(&["plugins", "--json", "--plugin", s(lib)])).unwrap();
    let rows = v["backends"].as_array().unwrap();
    let cpu = rows.iter().find(|b| b["name"] == "cpu").unwrap();
    let p = rows.iter().find(|b| b["name"] == "cpu-plugin").unwrap();
    assert_eq!(p["kind"], "plugin");
    // The same backend inside: the same capabilities.
    assert_eq!(p["ops"], cpu["ops"]);
    assert_eq!(p["fused_ops"], cpu["fused_ops"]);
    assert_eq!(p["dtypes"], cpu["dtypes"]);
    // EPTC_PLUGIN_PATH works as --plugin does.
    let o = Command::new(env!("CARGO_BIN_EXE_eptc"))
        .arg("plugins")
        .env("EPTC_PLUGIN_PATH", lib)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("cpu-plugin"));
}

#[test]
fn parity_suite_through_the_plugin() {
    let t = target();
    suites::ept_case("cat", "deep", &t);
    suites::ept_case("multi-cat", "shallow", &t);
    suites::plain_model_with_checkpoint_head(&t);
}

#[test]
fn gradients_through_the_plugin_match_pytorch() {
    let worst = suites::grad_matches_pytorch(&target());
    println!("worst relative gradient error against PyTorch: {worst:e}");
}

/// Train `epochs` on the generated data with the artifact in `dir/art`; returns the best
/// adapter's bytes.
fn train(dir: &Path, data: &Path, target: &[String]) -> Vec<u8> {
    let art = dir.join("art");
    let m = fixture("tiny_timm.safetensors");
    let mut a = vec![
        "compile",
        s(&m),
        "--heads",
        "3",
        "--prompt-len",
        "4",
        "--num-classes",
        "3",
        "-o",
        s(&art),
    ];
    a.extend(target.iter().map(String::as_str));
    eptc_ok(&a);
    let run = dir.join("run");
    eptc_ok(&[
        "train",
        s(&art),
        "--data",
        s(data),
        "--train",
        s(&data.join("train.txt")),
        "--val",
        s(&data.join("val.txt")),
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "-o",
        s(&run),
    ]);
    std::fs::read(run.join("last.safetensors")).unwrap()
}

#[test]
fn training_through_the_plugin_gives_the_built_in_adapter() {
    let d = tempfile::tempdir().unwrap();
    let data = gen_data(d.path(), 3, 2);
    let (a, b) = (d.path().join("builtin"), d.path().join("plugin"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let built_in = train(&a, &data, &[]);
    let through = train(&b, &data, &target());
    assert!(
        built_in == through,
        "the plugin's adapter differs from the built-in CPU backend's"
    );
}

#[test]
fn an_artifact_remembers_its_plugin_and_says_when_it_is_gone() {
    let d = tempfile::tempdir().unwrap();
    // A copy of the library, so it can be removed.
    let lib = d.path().join(plugin().file_name().unwrap());
    std::fs::copy(plugin(), &lib).unwrap();
    let art = d.path().join("art");
    let m = fixture("tiny_timm.safetensors");
    eptc_ok(&[
        "compile",
        s(&m),
        "--heads",
        "3",
        "--target",
        s(&lib),
        "-o",
        s(&art),
    ]);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["target"], "cpu-plugin");
    let out = d.path().join("out.safetensors");
    let inp = fixture("input_b1.safetensors");
    // No --plugin needed: the manifest names the library.
    eptc_ok(&["run", s(&art), "--input", s(&inp), "--output", s(&out)]);
    std::fs::remove_file(&lib).unwrap();
    let e = eptc_err(&["run", s(&art), "--input", s(&inp), "--output", s(&out)]);
    assert!(
        e.contains("cpu-plugin") && e.contains(&lib.display().to_string()),
        "{e}"
    );
}

#[test]
fn what_is_not_a_plugin_is_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    // No such file.
    let e = eptc_err(&["plugins", "--plugin", "/no/such/libplugin.so"]);
    assert!(e.contains("/no/such/libplugin.so"), "{e}");
    // Not a library at all.
    let junk = d.path().join("libjunk.so");
    std::fs::write(&junk, b"not an ELF file").unwrap();
    let e = eptc_err(&["plugins", "--plugin", s(&junk)]);
    assert!(e.contains("libjunk.so"), "{e}");
    // A real library without the entry point: the C library's math library.
    if let Some(libm) = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .iter()
    .find(|p| Path::new(p).exists())
    {
        let e = eptc_err(&["plugins", "--plugin", libm]);
        assert!(e.contains("eptc_plugin_api"), "{e}");
    }
    // A plugin may not take a built-in backend's name or be an unknown target.
    let e = eptc_err(&[
        "compile",
        s(&fixture("tiny_timm.safetensors")),
        "--heads",
        "3",
        "--target",
        "nosuchbackend",
    ]);
    assert!(e.contains("unknown backend"), "{e}");
}
