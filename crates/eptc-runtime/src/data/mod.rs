//! Data loading for the MedFMC layout (DESIGN.md §6): annotation files, image decoding,
//! the train / evaluation transforms (DESIGN.md §7 defaults), a batched loader on worker
//! threads with prefetch ([`epoch`]), and a generator of small synthetic few-shot data
//! sets in the same layout ([`synth`]).

mod annotations;
mod image;
mod loader;
pub mod synth;
mod transform;

use std::path::{Path, PathBuf};

pub use self::annotations::{parse_annotations, read_annotations, Entry, Label, Task};
pub use self::image::{load_entry_image, load_image, Image};
pub use self::loader::{epoch, Batch, Dataset, Loader, LoaderConfig};
pub use self::transform::{
    eval_transform, hflip, resize, to_chw_normalized, train_transform, CropParams, Normalize,
    RandomResizedCrop,
};

/// Everything that can go wrong while reading a data set. Every variant names the file
/// (and, where there is one, the annotation line) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read annotation file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}:{line}: expected {expected} label value(s), found {found} in {text:?}{hint}",
        path.display()
    )]
    LabelCount {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
        text: String,
        hint: &'static str,
    },
    #[error(
        "{}:{line}: class id {value} is out of range (the task has {classes} classes: 0..{classes})",
        path.display()
    )]
    ClassOutOfRange {
        path: PathBuf,
        line: usize,
        value: String,
        classes: usize,
    },
    #[error(
        "{}:{line}: multi-hot label value {value:?} (position {position}) is not 0 or 1",
        path.display()
    )]
    NotBinary {
        path: PathBuf,
        line: usize,
        position: usize,
        value: String,
    },
    #[error("{}: the data set is empty (no image lines)", path.display())]
    Empty { path: PathBuf },
    #[error(
        "{}:{line}: {this} but line {other_line} is {other}; a file must be all labeled or all unlabeled",
        path.display()
    )]
    MixedLabels {
        path: PathBuf,
        line: usize,
        this: &'static str,
        other_line: usize,
        other: &'static str,
    },
    #[error("image {}{}: file not found", path.display(), listed_at(listed))]
    ImageMissing {
        path: PathBuf,
        listed: Option<(PathBuf, usize)>,
    },
    #[error("image {}{}: cannot read: {source}", path.display(), listed_at(listed))]
    ImageIo {
        path: PathBuf,
        listed: Option<(PathBuf, usize)>,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "image {}{}: cannot decode (corrupt or unsupported file): {source}",
        path.display(),
        listed_at(listed)
    )]
    ImageDecode {
        path: PathBuf,
        listed: Option<(PathBuf, usize)>,
        #[source]
        source: ::image::ImageError,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid synthetic data set specification: {0}")]
    InvalidSpec(String),
}

fn listed_at(listed: &Option<(PathBuf, usize)>) -> String {
    match listed {
        Some((ann, line)) => format!(" (listed at {}:{line})", ann.display()),
        None => String::new(),
    }
}

impl DataError {
    /// The annotation line the error is about, if any (1-based).
    pub fn line(&self) -> Option<usize> {
        match self {
            DataError::LabelCount { line, .. }
            | DataError::ClassOutOfRange { line, .. }
            | DataError::NotBinary { line, .. }
            | DataError::MixedLabels { line, .. } => Some(*line),
            DataError::ImageMissing { listed, .. }
            | DataError::ImageIo { listed, .. }
            | DataError::ImageDecode { listed, .. } => listed.as_ref().map(|(_, l)| *l),
            DataError::Io { .. }
            | DataError::Empty { .. }
            | DataError::Write { .. }
            | DataError::InvalidSpec(_) => None,
        }
    }
}

pub(crate) fn owned(path: &Path) -> PathBuf {
    path.to_path_buf()
}
