//! Faults during training (issue #9, item 3): nothing is lost.
//!
//! - `kill -9` at any moment, then `--resume`, ends with adapters bit-identical to an
//!   uninterrupted run (CPU backend);
//! - a full disk (writes into `/dev/full`) or an unwritable output folder stops with a
//!   clear message, and the previous checkpoint stays intact and resumable;
//! - a NaN/Inf loss stops training with a message naming the last good checkpoint, which
//!   stays as it was.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{eptc, eptc_err, eptc_ok, fixture, gen_data, s};

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    art: PathBuf,
    data: PathBuf,
    train: PathBuf,
    val: PathBuf,
}

fn setup(shots: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = gen_data(&root, shots, 2);
    let art = root.join("art");
    eptc_ok(&[
        "compile",
        s(&fixture("tiny_timm.safetensors")),
        "--heads",
        "3",
        "--prompt-len",
        "6",
        "--num-classes",
        "3",
        "-o",
        s(&art),
    ]);
    Setup {
        _dir: dir,
        root,
        art,
        train: data.join("train.txt"),
        val: data.join("val.txt"),
        data,
    }
}

impl Setup {
    fn args<'a>(&'a self, run: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "train",
            s(&self.art),
            "--data",
            s(&self.data),
            "--train",
            s(&self.train),
            "--val",
            s(&self.val),
            "-o",
            s(run),
        ];
        a.extend(extra);
        a
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn epochs_done(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn bin() -> PathBuf {
    std::env::var_os("EPTC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_eptc")))
}

/// The run's final files, compared bit for bit.
const FINAL: [&str; 3] = ["last.safetensors", "best.safetensors", "state.safetensors"];

/// Whether two runs ended in the same place: adapters bit for bit, and the state's
/// tensors (parameters and optimizer buffers; its metadata holds the epochs' timings).
fn same_run(a: &Path, b: &Path) {
    for f in ["last.safetensors", "best.safetensors"] {
        assert!(
            bytes(&a.join(f)) == bytes(&b.join(f)),
            "{f} differs from the uninterrupted run's"
        );
    }
    let read = |p: &Path| eptc_frontend::TensorFile::read(&p.join("state.safetensors")).unwrap();
    let (sa, sb) = (read(a), read(b));
    assert_eq!(
        sa.tensors.keys().collect::<Vec<_>>(),
        sb.tensors.keys().collect::<Vec<_>>()
    );
    for (k, t) in &sa.tensors {
        let same = t
            .data()
            .iter()
            .zip(sb.tensors[k].data())
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "state tensor {k} differs");
    }
}

#[test]
fn kill_9_then_resume_gives_the_uninterrupted_adapter() {
    let st = setup(8);
    let opts = ["--epochs", "24", "--batch-size", "2", "--lr", "0.01"];
    let full = st.root.join("full");
    eptc_ok(&st.args(&full, &opts));

    // Kill the run with SIGKILL after it has completed 1, then 8, then 15 epochs (plus
    // a few milliseconds, so the kill lands anywhere: mid-step, mid-validation, or
    // while checkpoints are written), resuming after each kill.
    let run = st.root.join("killed");
    let mut kills = 0;
    for (i, after) in [1usize, 8, 15].into_iter().enumerate() {
        let mut a = st.args(&run, &opts);
        if i > 0 {
            a.push("--resume");
        }
        let mut child = Command::new(bin())
            .args(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while epochs_done(&run) < after {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before epoch {after}"
            );
            assert!(t0.elapsed() < Duration::from_secs(300), "the run hangs");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(3 * i as u64));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        assert!(epochs_done(&run) < 24, "the run finished before the kill");
    }
    assert_eq!(kills, 3);
    let o = eptc_ok(&st.args(&run, &[&opts[..], &["--resume"]].concat()));
    assert!(o.contains("resuming"), "{o}");
    same_run(&full, &run);
    // No temporary file is left behind.
    for e in std::fs::read_dir(&run).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".tmp"), "left behind: {name}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_keeps_the_previous_checkpoint() {
    let st = setup(3);
    let opts = ["--epochs", "3", "--lr", "0.01"];
    let full = st.root.join("full");
    eptc_ok(&st.args(&full, &opts));
    let run = st.root.join("run");
    eptc_ok(&st.args(&run, &[&opts[..], &["--stop-after", "1"]].concat()));
    let before: Vec<Vec<u8>> = FINAL
        .iter()
        .chain(&["metrics.jsonl"])
        .map(|f| bytes(&run.join(f)))
        .collect();
    // Every write of the next epoch goes first to `<file>.tmp`: pointing those at
    // /dev/full makes each write fail with ENOSPC, as on a full disk.
    let resume = [&opts[..], &["--resume"]].concat();
    for tmp in [
        "last.safetensors.tmp",
        "state.safetensors.tmp",
        "metrics.tmp",
    ] {
        std::os::unix::fs::symlink("/dev/full", run.join(tmp)).unwrap();
        let e = eptc_err(&st.args(&run, &resume));
        assert!(
            e.contains("No space left on device") && e.contains("is intact"),
            "{tmp}: {e}"
        );
        assert!(e.contains(s(&run)), "the message names the file: {e}");
        // The failed write removed its temporary file (here: the link).
        assert!(!run.join(tmp).exists(), "{tmp} left behind");
        if tmp != "metrics.tmp" {
            // The adapters may already hold the completed epoch 2 when the state fails
            // to write, which is safe: the state still says epoch 1, and resuming
            // rewrites them. The state and metrics are those of epoch 1.
            assert!(bytes(&run.join("state.safetensors")) == before[2], "{tmp}");
            assert!(bytes(&run.join("metrics.jsonl")) == before[3], "{tmp}");
        }
        // (metrics.jsonl is written last, from the history the state holds: when it
        // fails, the state has advanced and the next run writes the whole file again.)
    }
    // With space again, the run resumes and ends as an uninterrupted one.
    eptc_ok(&st.args(&run, &resume));
    same_run(&full, &run);
}

#[test]
fn an_unwritable_output_folder_is_named() {
    let st = setup(2);
    // A regular file where the run folder's parent should be (permissions cannot stop
    // root, which CI runs as; a file in the way stops everyone).
    let blocker = st.root.join("not-a-folder");
    std::fs::write(&blocker, b"x").unwrap();
    let run = blocker.join("run");
    let e = eptc_err(&st.args(&run, &["--epochs", "1"]));
    assert!(e.contains(s(&run)) && e.contains("run folder"), "{e}");
    let e = eptc_err(&[
        "export",
        s(&st.art),
        "--format",
        "ept-official",
        "-o",
        s(&blocker.join("x")),
    ]);
    assert!(e.contains("not-a-folder"), "{e}");
}

#[test]
fn a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let st = setup(3);
    let run = st.root.join("run");
    // 3 images per class, batch 4: 3 steps per epoch. The loss of step 5 (epoch 2)
    // reads as NaN.
    let mut a = st.args(&run, &["--epochs", "3", "--lr", "0.01"]);
    a.extend(["--stop-after", "1"]);
    eptc_ok(&a);
    let good: Vec<Vec<u8>> = FINAL.iter().map(|f| bytes(&run.join(f))).collect();
    let out = Command::new(bin())
        .args(st.args(&run, &["--epochs", "3", "--lr", "0.01", "--resume"]))
        .env("EPTC_FAULT_NAN_LOSS_AT_STEP", "5")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("not finite at epoch 2 step 5")
            && err.contains("last good checkpoint")
            && err.contains("(epoch 1)"),
        "{err}"
    );
    for (f, g) in FINAL.iter().zip(&good) {
        assert!(&bytes(&run.join(f)) == g, "{f} changed");
    }
    assert_eq!(epochs_done(&run), 1);

    // A real divergence from the first step: no checkpoint is written, and it says so.
    let run2 = st.root.join("diverged");
    let e = eptc(&st.args(&run2, &["--epochs", "2", "--lr", "1e30"]));
    let err = String::from_utf8_lossy(&e.stderr);
    assert_eq!(e.status.code(), Some(2), "{err}");
    assert!(
        err.contains("not finite") && err.contains("no checkpoint was written"),
        "{err}"
    );
    assert!(!run2.join("state.safetensors").exists());
}
