//! Replays the fuzz targets (fuzz/src/lib.rs, the same code cargo-fuzz runs) on stable
//! over every committed seed (fuzz/seeds/<target>/) and every crash reproducer
//! (fuzz/regressions/<target>/): none may panic, and the targets' properties (IR text
//! round trip, annotation invariants, error messages non-empty) must hold.

use std::path::{Path, PathBuf};

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e.expect("a readable folder").path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Runs `body` on each input of `target`, naming the file of a failure.
fn replay(target: &str, body: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no seeds for the fuzz target {target}");
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("a readable input");
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: panicked on {failed:#?}");
}

#[test]
fn safetensors() {
    replay("safetensors", targets::safetensors);
}

#[test]
fn ir_text() {
    replay("ir_text", targets::ir_text);
}

#[test]
fn annotations() {
    replay("annotations", targets::annotations);
}

#[test]
fn plugin_compile() {
    replay("plugin_compile", targets::plugin_compile);
}

/// The seeds exercise the accepting paths too, not only errors: the tiny checkpoints
/// import, the IR examples parse, the annotation and plugin seeds are read.
#[test]
fn seeds_reach_the_accepting_paths() {
    let seed = |target: &str, name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/seeds")
                .join(target)
                .join(name),
        )
        .expect("a seed")
    };
    for name in [
        "timm_f32",
        "timm_f64_depth2_nobias",
        "timm_patch2_chans3",
        "timm_prefixed_unaligned",
        "hf_f16",
        "hf_model_bf16",
        "mmcls_bf16",
    ] {
        let file =
            eptc_frontend::TensorFile::from_bytes(Path::new(name), &seed("safetensors", name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        let opts = eptc_frontend::ImportOptions {
            heads: Some(1),
            ..Default::default()
        };
        eptc_frontend::import_file(&file, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in [
        "small",
        "shapes",
        "spec_mlp",
        "spec_attention",
        "spec_fused",
        "spec_attention_backward",
    ] {
        let text = String::from_utf8(seed("ir_text", name)).expect("UTF-8");
        eptc_ir::text::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
