//! The fuzz targets' bodies: each takes the fuzzer's bytes, feeds them to one of eptc's
//! readers of untrusted input, and panics only on a bug: a reader that panics (rather
//! than returning an error), or a broken property of what it accepted.
//!
//! `fuzz_targets/*.rs` call these under libFuzzer (nightly, `cargo fuzz run`);
//! `tests/fuzz_regressions.rs` includes this file and replays every seed and crash
//! reproducer on stable. So this file uses only the crates the root package has.

use std::ffi::CString;
use std::path::Path;

use eptc_frontend::{ImportOptions, TensorFile};
use eptc_plugin::guest::{read_compile_args, TensorArg};
use eptc_runtime::data::{parse_annotations, Label, Task};

/// Where the fuzzed checkpoint "is": a folder that does not exist, so the importer's
/// look for a Hugging Face `config.json` beside it finds nothing.
const CHECKPOINT: &str = "/nonexistent-eptc-fuzz/input.safetensors";

/// The safetensors importer: bytes → [`TensorFile::from_bytes`] (the code path of
/// `TensorFile::read`, which `eptc inspect` / `compile` use: header, dtypes, shapes,
/// offsets, f32 mapping) → layout and architecture detection and the ViT import; a
/// model that imports is imported again at another image size (position-embedding
/// resize) and its graph printed.
pub fn safetensors(data: &[u8]) {
    let path = Path::new(CHECKPOINT);
    let file = match TensorFile::from_bytes(path, data) {
        Ok(f) => f,
        Err(e) => return check_message(&e.to_string()),
    };
    for (name, t) in &file.tensors {
        let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        assert_eq!(
            Some(t.data().len()),
            numel,
            "tensor {name:?}: data vs shape"
        );
    }
    // Detection with the defaults (heads = dim / 64 without a config.json), then the
    // import with one head, so that tiny widths import.
    if let Err(e) = eptc_frontend::detect(&file, &ImportOptions::default()) {
        check_message(&e.to_string());
    }
    let one_head = ImportOptions {
        heads: Some(1),
        ..ImportOptions::default()
    };
    let model = match eptc_frontend::import_file(&file, &one_head) {
        Ok(m) => m,
        Err(e) => return check_message(&e.to_string()),
    };
    eptc_ir::text::print(&model.graph).expect("an imported graph prints");
    // Another grid: the position embeddings are resized (bounded: inputs are small).
    let a = &model.arch;
    let grid = a.checkpoint_image_size / a.patch;
    if grid < 16 && a.dim <= 4096 {
        let opts = ImportOptions {
            image_size: Some(a.patch * (grid + 1)),
            ..one_head
        };
        if let Err(e) = eptc_frontend::import_file(&file, &opts) {
            check_message(&e.to_string());
        }
    }
}

/// The IR text parser: UTF-8 bytes → [`eptc_ir::text::parse`]; what parses prints,
/// and the printed text parses back to a graph that prints the same
/// (`print(parse(print(g))) == print(g)`).
pub fn ir_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let g = match eptc_ir::text::parse(text) {
        Ok(g) => g,
        Err(e) => return check_message(&e.to_string()),
    };
    let printed = eptc_ir::text::print(&g).expect("a parsed graph prints");
    let again = eptc_ir::text::parse(&printed)
        .unwrap_or_else(|e| panic!("the printed graph does not parse: {e}\n{printed}"));
    let reprinted = eptc_ir::text::print(&again).expect("a parsed graph prints");
    assert_eq!(
        printed, reprinted,
        "print -> parse -> print changed the text"
    );
}

/// The annotation-file parser: the first byte picks the task (bit 0: multi-class) and
/// the second the class count; the rest, UTF-8, is the file. Accepted entries must keep
/// the parser's promises (labels of the task and count, all labeled or none, file names
/// non-empty and trimmed, line numbers increasing).
pub fn annotations(data: &[u8]) {
    let [mode, classes, rest @ ..] = data else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let task = if mode & 1 == 1 {
        Task::MultiClass
    } else {
        Task::MultiLabel
    };
    let classes = usize::from(*classes);
    let entries = match parse_annotations(text, Path::new("fuzz.txt"), task, classes) {
        Ok(e) => e,
        Err(e) => return check_message(&e.to_string()),
    };
    assert!(!entries.is_empty(), "an accepted file has entries");
    let labeled = !entries[0].label.is_none();
    let mut last_line = 0;
    for e in &entries {
        assert!(!e.file.is_empty(), "line {}: empty file name", e.line);
        assert_eq!(
            e.file.trim(),
            e.file,
            "line {}: file name not trimmed",
            e.line
        );
        assert!(e.line > last_line, "line numbers not increasing");
        last_line = e.line;
        assert_eq!(
            !e.label.is_none(),
            labeled,
            "labeled and unlabeled lines mixed"
        );
        match (&e.label, task) {
            (Label::None, _) => {}
            (Label::MultiHot(hot), Task::MultiLabel) => assert_eq!(hot.len(), classes),
            (Label::Class(c), Task::MultiClass) => assert!(*c < classes),
            (l, t) => panic!("line {}: label {l:?} for task {t:?}", e.line),
        }
    }
}

/// The plugin guest's reading of `compile`'s arguments ([`read_compile_args`]: the IR
/// text and the weight descriptors). The input is the IR text up to the first NUL, then
/// descriptors, each: dtype code (1 byte), rank (1 byte), name length (1 byte), the name,
/// `rank` dimensions (1 byte each; 255 means the next 8 bytes, little-endian), data
/// length (2 bytes, little-endian), the data. Descriptors are honest about their buffers
/// (as the ABI requires of the host); everything else is the fuzzer's.
pub fn plugin_compile(data: &[u8]) {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = CString::new(text).expect("no NUL before the first NUL");
    let mut r = Reader(rest);
    let mut owned: Vec<(CString, u32, Vec<u64>, Vec<u8>)> = Vec::new();
    while let Some(&[dtype, rank, name_len]) = r.take(3) {
        let Some(name) = r.take(name_len.into()) else {
            break;
        };
        let name = CString::new(name.iter().map(|&b| b.max(1)).collect::<Vec<u8>>())
            .expect("NULs replaced");
        let mut shape = Vec::new();
        for _ in 0..rank {
            match r.take(1) {
                Some(&[255]) => match r.take(8) {
                    Some(b) => shape.push(u64::from_le_bytes(b.try_into().expect("8 bytes"))),
                    None => break,
                },
                Some(&[d]) => shape.push(d.into()),
                _ => break,
            }
        }
        let Some(len) = r.take(2) else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let data = r.take(len.min(r.0.len())).unwrap_or_default().to_vec();
        owned.push((name, dtype.into(), shape, data));
    }
    let args: Vec<TensorArg> = owned
        .iter()
        .map(|(name, dtype, shape, data)| TensorArg {
            name,
            dtype: *dtype,
            shape,
            data,
        })
        .collect();
    match read_compile_args(&text, &args) {
        Ok((graph, weights)) => {
            eptc_ir::text::print(&graph).expect("a parsed graph prints");
            for (name, t) in weights.iter() {
                let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                assert_eq!(
                    Some(t.data().len()),
                    numel,
                    "weight {name:?}: data vs shape"
                );
            }
        }
        Err((status, msg)) => {
            assert_ne!(status, eptc_plugin::abi::EPTC_OK);
            assert_ne!(
                status,
                eptc_plugin::abi::EPTC_ERR_PANIC,
                "compile's arguments panicked: {msg}"
            );
            check_message(&msg);
        }
    }
}

/// The unread rest of a fuzz input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The next `n` bytes; none (and nothing consumed) when fewer are left.
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }
}

/// An error must say something.
fn check_message(msg: &str) {
    assert!(!msg.trim().is_empty(), "an empty error message");
}
