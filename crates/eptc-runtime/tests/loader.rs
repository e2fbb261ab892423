//! The batched loader: determinism across worker counts, order, shuffle, drop_last,
//! errors, and early drop.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use eptc_runtime::data::synth::{generate, SynthSpec, SynthSummary};
use eptc_runtime::data::{
    epoch, read_annotations, Batch, DataError, Dataset, Label, LoaderConfig, Normalize, Task,
};

fn make(dir: &Path, task: Task, classes: usize, per_class: usize) -> SynthSummary {
    let spec = SynthSpec {
        task,
        classes,
        image_size: 24,
        train_per_class: per_class,
        val_per_class: 1,
        test_per_class: 1,
        seed: 42,
    };
    generate(dir, &spec).unwrap()
}

fn config(workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size: 4,
        image_size: 16,
        norm: Normalize::default(),
        augment: true,
        shuffle: true,
        drop_last: false,
        workers,
        prefetch: 2,
        seed: 9,
    }
}

fn collect(ds: &Arc<Dataset>, cfg: &LoaderConfig, ep: u64) -> Vec<Batch> {
    epoch(Arc::clone(ds), cfg, ep)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// A batch's indices, pixel bits, label bits and class ids.
type BatchBits = (Vec<usize>, Vec<u32>, Vec<u32>, Option<Vec<usize>>);

fn bits(b: &[Batch]) -> Vec<BatchBits> {
    b.iter()
        .map(|b| {
            (
                b.indices.clone(),
                b.pixels.iter().map(|v| v.to_bits()).collect(),
                b.labels.iter().map(|v| v.to_bits()).collect(),
                b.class_ids.clone(),
            )
        })
        .collect()
}

fn open(dir: &Path, sum: &SynthSummary, task: Task, classes: usize) -> Arc<Dataset> {
    Arc::new(Dataset::open(dir, &sum.train, task, classes).unwrap())
}

#[test]
fn worker_count_does_not_change_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let sum = make(dir.path(), Task::MultiClass, 3, 5);
    let ds = open(dir.path(), &sum, Task::MultiClass, 3);
    assert_eq!(ds.len(), 15);
    let one = collect(&ds, &config(1), 2);
    assert_eq!(one.len(), 4);
    assert_eq!(one.iter().map(Batch::len).collect::<Vec<_>>(), [4, 4, 4, 3]);
    for workers in [0, 3, 8] {
        let mut cfg = config(workers);
        assert_eq!(
            bits(&collect(&ds, &cfg, 2)),
            bits(&one),
            "{workers} workers"
        );
        cfg.prefetch = 1;
        assert_eq!(
            bits(&collect(&ds, &cfg, 2)),
            bits(&one),
            "{workers} workers, prefetch 1"
        );
    }
    // Every image exactly once, with the right shape and targets.
    let mut seen: Vec<usize> = one.iter().flat_map(|b| b.indices.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..15).collect::<Vec<_>>());
    let (rows, ids) = ds.targets();
    let ids = ids.unwrap();
    for b in &one {
        assert_eq!(b.pixels.len(), b.len() * 3 * 16 * 16);
        assert_eq!(b.labels.len(), b.len() * 3);
        assert_eq!(b.files.len(), b.len());
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(b.files[k], ds.entries[i].file);
            assert_eq!(b.labels[k * 3..k * 3 + 3], rows[i * 3..i * 3 + 3]);
            assert_eq!(b.class_ids.as_ref().unwrap()[k], ids[i]);
        }
    }
}

#[test]
fn shuffle_changes_between_epochs_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let sum = make(dir.path(), Task::MultiLabel, 3, 4);
    let ds = open(dir.path(), &sum, Task::MultiLabel, 3);
    let order = |cfg: &LoaderConfig, ep: u64| -> Vec<usize> {
        collect(&ds, cfg, ep)
            .iter()
            .flat_map(|b| b.indices.clone())
            .collect()
    };
    let cfg = config(2);
    let (e0, e1) = (order(&cfg, 0), order(&cfg, 1));
    assert_ne!(e0, e1);
    assert_eq!(order(&cfg, 0), e0);
    assert_eq!(order(&config(0), 1), e1);
    let other_seed = LoaderConfig {
        seed: 10,
        ..config(2)
    };
    assert_ne!(order(&other_seed, 0), e0);
    // Augmentation differs between epochs too (same image, other crop).
    let no_shuffle = LoaderConfig {
        shuffle: false,
        ..config(2)
    };
    let (a, b) = (collect(&ds, &no_shuffle, 0), collect(&ds, &no_shuffle, 1));
    assert_ne!(bits(&a), bits(&b));
    // Multi-label: no class ids; labels are the multi-hot rows.
    assert!(a.iter().all(|b| b.class_ids.is_none()));
    let (rows, ids) = ds.targets();
    assert!(ids.is_none());
    let labels: Vec<f32> = a.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, rows);
}

#[test]
fn no_shuffle_keeps_annotation_order_and_eval_is_epoch_independent() {
    let dir = tempfile::tempdir().unwrap();
    let sum = make(dir.path(), Task::MultiClass, 2, 5);
    let ds = open(dir.path(), &sum, Task::MultiClass, 2);
    let cfg = LoaderConfig::eval(3, 16);
    assert!(!cfg.augment && !cfg.shuffle && !cfg.drop_last);
    let a = collect(&ds, &cfg, 0);
    let files: Vec<String> = a.iter().flat_map(|b| b.files.clone()).collect();
    let want: Vec<String> = ds.entries.iter().map(|e| e.file.clone()).collect();
    assert_eq!(files, want);
    let idx: Vec<usize> = a.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, (0..10).collect::<Vec<_>>());
    assert_eq!(bits(&collect(&ds, &cfg, 5)), bits(&a));
}

#[test]
fn drop_last() {
    let dir = tempfile::tempdir().unwrap();
    let sum = make(dir.path(), Task::MultiClass, 2, 5);
    let ds = open(dir.path(), &sum, Task::MultiClass, 2);
    let mut cfg = config(2);
    let keep = epoch(Arc::clone(&ds), &cfg, 0);
    assert_eq!(keep.num_batches(), 3);
    let sizes: Vec<usize> = keep.map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes, [4, 4, 2]);
    cfg.drop_last = true;
    let dropped = epoch(Arc::clone(&ds), &cfg, 0);
    assert_eq!(dropped.num_batches(), 2);
    let sizes: Vec<usize> = dropped.map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes, [4, 4]);
    // An exact multiple loses nothing; a set smaller than a batch gives no batch.
    cfg.batch_size = 5;
    assert_eq!(epoch(Arc::clone(&ds), &cfg, 0).count(), 2);
    cfg.batch_size = 11;
    assert_eq!(epoch(Arc::clone(&ds), &cfg, 0).count(), 0);
}

#[test]
fn corrupt_image_names_file_and_line_then_ends() {
    let dir = tempfile::tempdir().unwrap();
    let sum = make(dir.path(), Task::MultiClass, 2, 5);
    let ds = open(dir.path(), &sum, Task::MultiClass, 2);
    // Entry 5 (line 6) is in the second batch of 4.
    let bad = &ds.entries[5];
    assert_eq!(bad.line, 6);
    std::fs::write(dir.path().join(&bad.file), b"not a png at all").unwrap();
    for workers in [0, 1, 3] {
        let cfg = LoaderConfig {
            shuffle: false,
            ..config(workers)
        };
        let mut loader = epoch(Arc::clone(&ds), &cfg, 0);
        assert!(loader.next().unwrap().is_ok());
        let err = loader.next().unwrap().unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::ImageDecode { .. }), "{msg}");
        assert!(msg.contains(&bad.file), "{msg}");
        assert!(msg.contains("train.txt:6"), "{msg}");
        assert_eq!(err.line(), Some(6));
        assert!(loader.next().is_none());
        assert!(loader.next().is_none());
    }
    // A missing file likewise.
    std::fs::remove_file(dir.path().join(&ds.entries[0].file)).unwrap();
    let cfg = LoaderConfig {
        shuffle: false,
        ..config(2)
    };
    let mut loader = epoch(Arc::clone(&ds), &cfg, 0);
    let first_err = loader.find_map(Result::err).unwrap();
    assert!(
        matches!(first_err, DataError::ImageMissing { .. }),
        "{first_err}"
    );
    assert!(loader.next().is_none());
}

#[test]
fn dropping_mid_epoch_returns_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let sum = make(dir.path(), Task::MultiClass, 4, 10);
    let ds = open(dir.path(), &sum, Task::MultiClass, 4);
    let (tx, rx) = mpsc::channel();
    let ds2 = Arc::clone(&ds);
    std::thread::spawn(move || {
        for taken in [0, 1, 3] {
            for workers in [1, 3] {
                let cfg = LoaderConfig {
                    batch_size: 2,
                    prefetch: 3,
                    ..config(workers)
                };
                let mut loader = epoch(Arc::clone(&ds2), &cfg, 0);
                for _ in 0..taken {
                    loader.next().unwrap().unwrap();
                }
                drop(loader);
            }
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("dropping the loader hangs");
}

#[test]
fn dataset_targets_and_unlabeled_sets() {
    let dir = tempfile::tempdir().unwrap();
    let sum = make(dir.path(), Task::MultiClass, 3, 2);
    let ds = Dataset::open(dir.path(), &sum.train, Task::MultiClass, 3).unwrap();
    assert!(ds.labeled() && !ds.is_empty());
    let (rows, ids) = ds.targets();
    let ids = ids.unwrap();
    for (i, e) in ds.entries.iter().enumerate() {
        let Label::Class(c) = e.label else { panic!() };
        assert_eq!(ids[i], c);
        let row = &rows[i * 3..i * 3 + 3];
        assert_eq!(row.iter().sum::<f32>(), 1.0);
        assert_eq!(row[c], 1.0);
    }
    let unl =
        Arc::new(Dataset::open(dir.path(), &sum.test_unlabeled, Task::MultiClass, 3).unwrap());
    assert!(!unl.labeled());
    let (rows, ids) = unl.targets();
    assert!(ids.is_none() && rows.iter().all(|&v| v == 0.0));
    assert_eq!(rows.len(), unl.len() * 3);
    let batches = collect(&unl, &LoaderConfig::eval(2, 16), 0);
    assert!(batches.iter().all(|b| b.class_ids.is_none()));
    assert_eq!(batches.iter().map(Batch::len).sum::<usize>(), 3);

    // An empty annotation file is an error naming the file.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = Dataset::open(dir.path(), &empty, Task::MultiClass, 3).unwrap_err();
    assert!(matches!(e, DataError::Empty { .. }));
    assert!(e.to_string().contains("empty.txt"), "{e}");
    // Sanity: read_annotations agrees with the data set.
    assert_eq!(
        read_annotations(&sum.train, Task::MultiClass, 3).unwrap(),
        ds.entries
    );
}
