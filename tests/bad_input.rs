//! Bad input (issue #9, item 2): exit code 2 and one clear line naming the file, tensor
//! or line and what is wrong; never a panic, never an allocation sized by the input
//! before it is checked.
//!
//! The cases of the issue and where each is tested:
//!
//! | case | test |
//! |---|---|
//! | truncated file | `truncated_checkpoint` (here) |
//! | oversized header | `oversized_header` (here) |
//! | malformed header | `cli.rs` `not_a_safetensors_file` |
//! | unknown dtype | `unknown_dtype` (here) |
//! | shape whose size overflows | `absurd_shape` (here) |
//! | missing tensor | `cli.rs` `missing_tensor_is_named` |
//! | mis-shaped tensor | `cli.rs` `misshaped_tensor_is_named_with_both_shapes` |
//! | non-ViT checkpoint | `cli.rs` `not_a_vit` |
//! | image size not a multiple of the patch, prompt length 0, layers out of range | `cli.rs` `bad_options_are_refused` |
//! | corrupt or missing image, empty data set, labels outside the class range | `training.rs` `bad_data_gives_clear_errors` |
//! | annotation line with the wrong label count | `wrong_label_count` (here) |
//!
//! The parsers themselves are fuzzed (`fuzz/`), and every input the fuzzer found that
//! crashed one is replayed by `tests/fuzz_regressions.rs`.

mod common;

use std::path::{Path, PathBuf};

use common::{eptc_err, eptc_ok, fixture, gen_data, s};

/// A safetensors file with this JSON header and data.
fn safetensors(path: &Path, header: &str, data: &[u8]) -> PathBuf {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    std::fs::write(path, b).unwrap();
    path.to_path_buf()
}

#[test]
fn truncated_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixture("tiny_timm.safetensors")).unwrap();
    // Cut in the data, in the header, and inside the 8-byte length.
    for cut in [full.len() - 1, 5000, 100, 5] {
        let p = d.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&p, &full[..cut]).unwrap();
        let e = eptc_err(&["inspect", s(&p)]);
        assert!(
            e.contains(&format!("cut{cut}.safetensors"))
                && e.contains("not a valid safetensors file"),
            "{e}"
        );
    }
}

#[test]
fn oversized_header() {
    let d = tempfile::tempdir().unwrap();
    // The length field claims 1 TiB: refused before anything is allocated.
    let p = d.path().join("huge.safetensors");
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend(b"{}");
    std::fs::write(&p, b).unwrap();
    let e = eptc_err(&["inspect", s(&p)]);
    assert!(
        e.contains("huge.safetensors") && e.contains("header too large"),
        "{e}"
    );
}

#[test]
fn unknown_dtype() {
    let d = tempfile::tempdir().unwrap();
    let q4 = safetensors(
        &d.path().join("q4.safetensors"),
        r#"{"cls_token":{"dtype":"Q4","shape":[1,1,48],"data_offsets":[0,48]}}"#,
        &[0; 48],
    );
    let e = eptc_err(&["inspect", s(&q4)]);
    assert!(e.contains("q4.safetensors") && e.contains("`Q4`"), "{e}");
    // A dtype safetensors knows but eptc does not read: the tensor is named.
    let i64 = safetensors(
        &d.path().join("i64.safetensors"),
        r#"{"cls_token":{"dtype":"I64","shape":[1,1,48],"data_offsets":[0,384]}}"#,
        &[0; 384],
    );
    let e = eptc_err(&["inspect", s(&i64)]);
    assert!(
        e.contains("i64.safetensors") && e.contains("\"cls_token\"") && e.contains("I64"),
        "{e}"
    );
}

#[test]
fn absurd_shape() {
    let d = tempfile::tempdir().unwrap();
    // 2^70 elements in 4 bytes of data: refused from the header, nothing allocated.
    let p = safetensors(
        &d.path().join("shape.safetensors"),
        r#"{"cls_token":{"dtype":"F32","shape":[1073741824,1073741824,1048576],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let e = eptc_err(&["inspect", s(&p)]);
    assert!(
        e.contains("shape.safetensors") && e.contains("overflow"),
        "{e}"
    );
    // A shape that fits in memory but not in the data.
    let p = safetensors(
        &d.path().join("short.safetensors"),
        r#"{"cls_token":{"dtype":"F32","shape":[1,1,48],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let e = eptc_err(&["inspect", s(&p)]);
    assert!(e.contains("short.safetensors"), "{e}");
}

#[test]
fn wrong_label_count() {
    let d = tempfile::tempdir().unwrap();
    let data = gen_data(d.path(), 1, 0);
    let art = d.path().join("art");
    eptc_ok(&[
        "compile",
        s(&fixture("tiny_timm.safetensors")),
        "--heads",
        "3",
        "--prompt-len",
        "2",
        "--num-classes",
        "3",
        "--task",
        "multilabel",
        "-o",
        s(&art),
    ]);
    let ann = d.path().join("labels.txt");
    std::fs::write(
        &ann,
        "images/train_0000.png 1,0,1\nimages/train_0001.png 1,0\n",
    )
    .unwrap();
    let e = eptc_err(&["eval", s(&art), "--data", s(&data), "--ann", s(&ann)]);
    assert!(
        e.contains("labels.txt:2") && e.contains("expected 3 label value(s), found 2"),
        "{e}"
    );
    std::fs::write(&ann, "images/train_0000.png 1 0 1 1\n").unwrap();
    let e = eptc_err(&["eval", s(&art), "--data", s(&data), "--ann", s(&ann)]);
    assert!(e.contains("labels.txt:1") && e.contains("found 4"), "{e}");
}
