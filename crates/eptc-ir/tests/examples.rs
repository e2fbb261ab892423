//! Every file of `ir-specs/examples/` parses, verifies and round-trips exactly.

use std::path::PathBuf;

use eptc_ir::text::{parse, print};
use eptc_ir::verify;

fn examples() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../ir-specs/examples");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eptc"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// The file without its comment and blank lines: what `print` writes back.
fn canonical(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn the_required_examples_exist() {
    let names: Vec<String> = examples().into_iter().map(|e| e.0).collect();
    for want in ["mlp.eptc", "attention.eptc"] {
        assert!(names.iter().any(|n| n == want), "missing example {want}");
    }
}

#[test]
fn examples_parse_verify_and_round_trip() {
    for (name, text) in examples() {
        let g = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!g.outputs().is_empty(), "{name}: no output");
        let printed = print(&g).unwrap();
        assert_eq!(
            printed,
            canonical(&text),
            "{name}: print(parse(text)) differs from the file (without comments)"
        );
        let again = print(&parse(&printed).unwrap()).unwrap();
        assert_eq!(again, printed, "{name}: print(parse(print(g))) != print(g)");
        let c = g.compacted().unwrap();
        assert_eq!(
            print(&c).unwrap(),
            printed,
            "{name}: compacted() prints differently"
        );
    }
}

#[test]
fn attention_example_has_the_ept_nodes() {
    let (_, text) = examples()
        .into_iter()
        .find(|e| e.0 == "attention.eptc")
        .unwrap();
    let g = parse(&text).unwrap();
    let tagged: Vec<&str> = g
        .node_ids()
        .into_iter()
        .filter(|&id| g.node(id).tag.as_deref() == Some("ept"))
        .map(|id| g.node(id).op.kind())
        .collect();
    assert_eq!(tagged, ["param", "broadcast", "concat", "slice"]);
    let trainable: Vec<&str> = g
        .params()
        .into_iter()
        .filter(|p| p.2)
        .map(|p| p.1)
        .collect();
    assert_eq!(trainable, ["ept.prompts.0"]);
    assert_eq!(g.trainable_count(), 5 * 3);
    let kinds: Vec<&str> = g
        .node_ids()
        .iter()
        .map(|&id| g.node(id).op.kind())
        .collect();
    for k in [
        "matmul",
        "mul",
        "const",
        "broadcast",
        "concat",
        "softmax",
        "slice",
    ] {
        assert!(kinds.contains(&k), "attention.eptc lacks {k}");
    }
}
