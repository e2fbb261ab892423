//! A batched data loader: images are decoded and transformed on worker threads, a few
//! batches ahead of the consumer, so a training backend never waits on decoding.
//!
//! Determinism: the shuffle order depends only on `(seed, epoch)` and every image's
//! augmentation RNG only on `(seed, epoch, dataset index)`, so the batches are
//! bit-identical whatever the number of workers or the thread timing. Batches come out
//! in order.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{
    eval_transform, load_entry_image, read_annotations, train_transform, DataError, Entry, Label,
    Normalize, Task,
};

/// An annotation file and the image folder its paths are relative to.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The folder the entries' file names are relative to.
    pub dir: PathBuf,
    /// The annotation file (named in errors).
    pub ann: PathBuf,
    pub entries: Vec<Entry>,
    pub task: Task,
    pub classes: usize,
}

impl Dataset {
    /// Reads the annotation file; an empty data set is an error naming the file.
    pub fn open(dir: &Path, ann: &Path, task: Task, classes: usize) -> Result<Dataset, DataError> {
        let entries = read_annotations(ann, task, classes)?;
        if entries.is_empty() {
            return Err(DataError::Empty {
                path: ann.to_path_buf(),
            });
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            ann: ann.to_path_buf(),
            entries,
            task,
            classes,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether every entry has a label.
    pub fn labeled(&self) -> bool {
        self.entries.iter().all(|e| !e.label.is_none())
    }

    /// Multi-hot `f32` rows `[n, classes]` (one-hot for multi-class, zeros for an
    /// unlabeled entry) and, for a labeled multi-class data set, the class ids.
    pub fn targets(&self) -> (Vec<f32>, Option<Vec<usize>>) {
        let indices: Vec<usize> = (0..self.entries.len()).collect();
        self.targets_of(&indices)
    }

    /// [`Dataset::targets`] for the entries at `indices`.
    fn targets_of(&self, indices: &[usize]) -> (Vec<f32>, Option<Vec<usize>>) {
        let c = self.classes;
        let mut rows = vec![0.0f32; indices.len() * c];
        for (row, &i) in rows.chunks_exact_mut(c.max(1)).zip(indices) {
            match &self.entries[i].label {
                Label::MultiHot(hot) => {
                    for (r, &h) in row.iter_mut().zip(hot) {
                        *r = if h { 1.0 } else { 0.0 };
                    }
                }
                Label::Class(k) => {
                    if let Some(r) = row.get_mut(*k) {
                        *r = 1.0;
                    }
                }
                Label::None => {}
            }
        }
        let ids = if self.task == Task::MultiClass {
            indices
                .iter()
                .map(|&i| match self.entries[i].label {
                    Label::Class(k) => Some(k),
                    _ => None,
                })
                .collect()
        } else {
            None
        };
        (rows, ids)
    }
}

/// How [`epoch`] batches and transforms a data set.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Images per batch (the last batch may be smaller unless `drop_last`). Must be > 0.
    pub batch_size: usize,
    /// Output side length: every image becomes `3 x image_size x image_size`.
    pub image_size: u32,
    pub norm: Normalize,
    /// Training augmentation (RandomResizedCrop + horizontal flip) instead of the
    /// evaluation resize.
    pub augment: bool,
    /// Shuffle the order every epoch (depends on `seed` and the epoch only).
    pub shuffle: bool,
    /// Leave out the last batch when it is incomplete.
    pub drop_last: bool,
    /// Worker threads; 0 decodes on the consuming thread, inside `next()`.
    pub workers: usize,
    /// Batches decoded ahead of the consumer (at least 1 is used).
    pub prefetch: usize,
    pub seed: u64,
}

impl LoaderConfig {
    /// Evaluation defaults: no augmentation, no shuffle, keep the last batch, ImageNet
    /// normalisation, 2 workers, 2 batches ahead, seed 0.
    pub fn eval(batch_size: usize, image_size: u32) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            image_size,
            norm: Normalize::default(),
            augment: false,
            shuffle: false,
            drop_last: false,
            workers: 2,
            prefetch: 2,
            seed: 0,
        }
    }

    /// Training defaults: augmentation and shuffle on, otherwise as [`LoaderConfig::eval`].
    pub fn train(batch_size: usize, image_size: u32, seed: u64) -> LoaderConfig {
        LoaderConfig {
            augment: true,
            shuffle: true,
            seed,
            ..LoaderConfig::eval(batch_size, image_size)
        }
    }
}

/// A batch of transformed images and their targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Indices into `dataset.entries`.
    pub indices: Vec<usize>,
    /// `[n, 3, S, S]`, normalised.
    pub pixels: Vec<f32>,
    /// `[n, classes]`: multi-hot, one-hot for multi-class, zeros when unlabeled.
    pub labels: Vec<f32>,
    /// Class ids (labeled multi-class data sets only).
    pub class_ids: Option<Vec<usize>>,
    /// The entries' file names, as written in the annotation file.
    pub files: Vec<String>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// splitmix64's finaliser: a good 64-bit mixing function.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes several numbers into one seed (order matters).
pub(crate) fn mix_seed(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x6570_7463_u64, |h, &p| splitmix64(h ^ splitmix64(p)))
}

const SHUFFLE_STREAM: u64 = 0x5348_5546;
const AUGMENT_STREAM: u64 = 0x4155_474D;

/// The dataset indices of one epoch, in order, cut into batches.
fn plan(len: usize, cfg: &LoaderConfig, epoch: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..len).collect();
    if cfg.shuffle {
        let mut rng = StdRng::seed_from_u64(mix_seed(&[SHUFFLE_STREAM, cfg.seed, epoch]));
        order.shuffle(&mut rng);
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(cfg.batch_size).map(|c| c.to_vec()).collect();
    if cfg.drop_last && batches.last().is_some_and(|b| b.len() < cfg.batch_size) {
        batches.pop();
    }
    batches
}

/// Decodes and transforms one batch; `stop` is checked between images.
fn build_batch(
    ds: &Dataset,
    cfg: &LoaderConfig,
    epoch: u64,
    indices: &[usize],
    stop: &AtomicBool,
) -> Option<Result<Batch, DataError>> {
    let s = cfg.image_size as usize;
    let mut pixels = Vec::with_capacity(indices.len() * 3 * s * s);
    for &i in indices {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let entry = &ds.entries[i];
        let image = match load_entry_image(&ds.dir, &ds.ann, entry) {
            Ok(image) => image,
            Err(e) => return Some(Err(e)),
        };
        let chw = if cfg.augment {
            let mut rng =
                StdRng::seed_from_u64(mix_seed(&[AUGMENT_STREAM, cfg.seed, epoch, i as u64]));
            train_transform(&image, cfg.image_size, &cfg.norm, &mut rng)
        } else {
            eval_transform(&image, cfg.image_size, &cfg.norm)
        };
        pixels.extend_from_slice(&chw);
    }
    let (labels, class_ids) = ds.targets_of(indices);
    Some(Ok(Batch {
        indices: indices.to_vec(),
        pixels,
        labels,
        class_ids,
        files: indices
            .iter()
            .map(|&i| ds.entries[i].file.clone())
            .collect(),
    }))
}

/// What the workers and the consumer share.
struct Shared {
    ds: Arc<Dataset>,
    cfg: LoaderConfig,
    epoch: u64,
    batches: Vec<Vec<usize>>,
    /// Set when the loader is dropped or has ended; workers then stop.
    stop: AtomicBool,
    window: Mutex<Window>,
    wake: Condvar,
}

struct Window {
    /// The next batch a worker will take.
    next: usize,
    /// Batches handed to the consumer so far.
    consumed: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Window> {
        // A poisoned lock only means a worker panicked while holding it; the counters
        // stay consistent (they are only ever incremented).
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _guard = self.lock();
        self.wake.notify_all();
    }
}

enum Msg {
    Done(usize, Result<Batch, DataError>),
    Panicked(Box<dyn std::any::Any + Send + 'static>),
}

fn worker(shared: Arc<Shared>, tx: Sender<Msg>) {
    let ahead = shared.cfg.prefetch.max(1);
    loop {
        let b = {
            let mut w = shared.lock();
            loop {
                if shared.stop.load(Ordering::SeqCst) || w.next >= shared.batches.len() {
                    return;
                }
                if w.next < w.consumed + ahead {
                    break;
                }
                w = shared.wake.wait(w).unwrap_or_else(|e| e.into_inner());
            }
            w.next += 1;
            w.next - 1
        };
        let built = panic::catch_unwind(AssertUnwindSafe(|| {
            build_batch(
                &shared.ds,
                &shared.cfg,
                shared.epoch,
                &shared.batches[b],
                &shared.stop,
            )
        }));
        let msg = match built {
            Ok(Some(result)) => Msg::Done(b, result),
            Ok(None) => return,
            Err(payload) => Msg::Panicked(payload),
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// The batches of one epoch (an iterator of `Result<Batch, DataError>`), see [`epoch`].
///
/// After an `Err` item the loader ends. Dropping it stops and joins the workers (an
/// image being decoded is finished first).
pub struct Loader {
    shared: Arc<Shared>,
    rx: Option<Receiver<Msg>>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Result<Batch, DataError>>,
    /// The next batch to hand out.
    cursor: usize,
    done: bool,
}

/// The batches of one epoch, in order, produced by `cfg.workers` threads (at most
/// `cfg.prefetch` batches decoded ahead of the consumer; `cfg.workers == 0` decodes on
/// the calling thread).
///
/// # Panics
///
/// If `cfg.batch_size` is 0, or a worker thread cannot be spawned.
pub fn epoch(ds: Arc<Dataset>, cfg: &LoaderConfig, epoch: u64) -> Loader {
    assert!(cfg.batch_size > 0, "the batch size must be at least 1");
    let batches = plan(ds.len(), cfg, epoch);
    let shared = Arc::new(Shared {
        ds,
        cfg: cfg.clone(),
        epoch,
        batches,
        stop: AtomicBool::new(false),
        window: Mutex::new(Window {
            next: 0,
            consumed: 0,
        }),
        wake: Condvar::new(),
    });
    let threads = cfg.workers.min(shared.batches.len());
    let (tx, rx) = mpsc::channel();
    let workers = (0..threads)
        .map(|i| {
            let (shared, tx) = (Arc::clone(&shared), tx.clone());
            std::thread::Builder::new()
                .name(format!("eptc-loader-{i}"))
                .spawn(move || worker(shared, tx))
                .expect("cannot spawn a data loader thread")
        })
        .collect();
    Loader {
        shared,
        rx: (threads > 0).then_some(rx),
        workers,
        pending: BTreeMap::new(),
        cursor: 0,
        done: false,
    }
}

impl Loader {
    /// The number of batches in the epoch (after `drop_last`).
    pub fn num_batches(&self) -> usize {
        self.shared.batches.len()
    }

    /// Stops the workers and waits for them; returns the first panic, if any.
    fn shutdown(&mut self) -> Option<Box<dyn std::any::Any + Send + 'static>> {
        self.shared.halt();
        self.rx = None;
        let mut first = None;
        for handle in self.workers.drain(..) {
            if let Err(payload) = handle.join() {
                first.get_or_insert(payload);
            }
        }
        first
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(payload) = self.shutdown() {
            panic::resume_unwind(payload);
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let b = self.cursor;
        if b >= self.shared.batches.len() {
            self.finish();
            return None;
        }
        let result = if self.rx.is_none() {
            build_batch(
                &self.shared.ds,
                &self.shared.cfg,
                self.shared.epoch,
                &self.shared.batches[b],
                &self.shared.stop,
            )
            .expect("the loader is not stopped")
        } else {
            loop {
                if let Some(r) = self.pending.remove(&b) {
                    break r;
                }
                let msg = self.rx.as_ref().map(Receiver::recv);
                match msg {
                    Some(Ok(Msg::Done(i, r))) => {
                        self.pending.insert(i, r);
                    }
                    Some(Ok(Msg::Panicked(payload))) => {
                        self.done = true;
                        self.shutdown();
                        panic::resume_unwind(payload);
                    }
                    Some(Err(_)) | None => {
                        // Every worker is gone without delivering batch `b`.
                        self.finish();
                        panic!("data loader workers exited before batch {b} was produced");
                    }
                }
            }
        };
        self.cursor += 1;
        if result.is_err() {
            self.done = true;
            self.shutdown();
        } else {
            let mut w = self.shared.lock();
            w.consumed = self.cursor;
            self.shared.wake.notify_all();
        }
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            return (0, Some(0));
        }
        let left = self.shared.batches.len() - self.cursor;
        (0, Some(left))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Worker panics are not propagated from `drop` (that could abort).
        let _ = self.shutdown();
    }
}
