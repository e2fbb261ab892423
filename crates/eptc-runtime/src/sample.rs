//! K-shot splits for data sets that come without them (issue #8): `eptc sample`.
//!
//! The rule, for an annotation file of `n` labeled lines, `K` shots, `V` validation
//! images per class and a seed:
//!
//! 1. One permutation of the `n` lines is drawn from the seed (`StdRng`, rand 0.9).
//! 2. Training: for every class `c`, the first `K` lines of the permutation whose label
//!    has `c` (multi-class: is `c`). Multi-label: the union of these picks, deduplicated,
//!    so every label has at least `K` training images (an image picked for one label
//!    also counts for its other labels; the set has at most `classes × K` images).
//! 3. Validation: for every class, the next `V` lines of the permutation that have `c`
//!    and are not in the training set; the union again, so it is disjoint from training.
//! 4. Both sets are returned in input order.
//!
//! The result depends only on (the file's lines, `K`, `V`, seed). A "shot" here is an
//! image: the annotation files carry no patient ids (MedFMC counts shots per patient).

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::{parse_annotations, DataError, Entry, Label, Task};

/// What can go wrong while sampling a split.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("cannot read annotation file {}: {err}", path.display())]
    Read { path: PathBuf, err: std::io::Error },
    #[error("--shots 0: a K-shot split needs K >= 1")]
    ZeroShots,
    #[error("{}: the images are unlabeled (line {line}); there is nothing to sample by class", path.display())]
    Unlabeled { path: PathBuf, line: usize },
    #[error(
        "{}: class {class} has {have} image(s){lines}, fewer than the {need} needed ({what})",
        path.display()
    )]
    TooFew {
        path: PathBuf,
        class: usize,
        have: usize,
        need: usize,
        /// ` (lines 3, 8)` or empty.
        lines: String,
        what: String,
    },
}

/// A sampled split: indices into the entries, ascending (input order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

fn has(label: &Label, c: usize) -> bool {
    match label {
        Label::Class(k) => *k == c,
        Label::MultiHot(h) => h.get(c).copied().unwrap_or(false),
        Label::None => false,
    }
}

fn line_list(entries: &[Entry], idx: &[usize]) -> String {
    if idx.is_empty() {
        return " (no line has it)".to_string();
    }
    let shown: Vec<String> = idx
        .iter()
        .take(8)
        .map(|&i| entries[i].line.to_string())
        .collect();
    let more = if idx.len() > 8 { ", ..." } else { "" };
    format!(
        " (line{} {}{more})",
        if idx.len() == 1 { "" } else { "s" },
        shown.join(", ")
    )
}

/// Samples `shots` training and `val_per_class` validation images per class out of
/// `entries` (see the module documentation for the rule). `path` names the file in errors.
pub fn sample(
    entries: &[Entry],
    classes: usize,
    shots: usize,
    val_per_class: usize,
    seed: u64,
    path: &Path,
) -> Result<Split, SampleError> {
    if shots == 0 {
        return Err(SampleError::ZeroShots);
    }
    if let Some(e) = entries.iter().find(|e| e.label.is_none()) {
        return Err(SampleError::Unlabeled {
            path: path.to_path_buf(),
            line: e.line,
        });
    }
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let need = shots + val_per_class;
    // Every class must have K (+V) images before anything is picked.
    for c in 0..classes {
        let with: Vec<usize> = (0..entries.len())
            .filter(|&i| has(&entries[i].label, c))
            .collect();
        if with.len() < need {
            return Err(SampleError::TooFew {
                path: path.to_path_buf(),
                class: c,
                have: with.len(),
                need,
                lines: line_list(entries, &with),
                what: if val_per_class > 0 {
                    format!("{shots} shot(s) + {val_per_class} validation")
                } else {
                    format!("{shots} shot(s)")
                },
            });
        }
    }
    let mut in_train = vec![false; entries.len()];
    for c in 0..classes {
        for &i in order
            .iter()
            .filter(|&&i| has(&entries[i].label, c))
            .take(shots)
        {
            in_train[i] = true;
        }
    }
    let mut in_val = vec![false; entries.len()];
    if val_per_class > 0 {
        for c in 0..classes {
            let left: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&i| has(&entries[i].label, c) && !in_train[i])
                .collect();
            if left.len() < val_per_class {
                // Multi-label only: other labels' training picks took this one's images.
                return Err(SampleError::TooFew {
                    path: path.to_path_buf(),
                    class: c,
                    have: left.len(),
                    need: val_per_class,
                    lines: line_list(entries, &{
                        let mut l = left.clone();
                        l.sort_unstable();
                        l
                    }),
                    what: "validation images left outside the training set".to_string(),
                });
            }
            for &i in left.iter().take(val_per_class) {
                in_val[i] = true;
            }
        }
    }
    let pick = |set: &[bool]| (0..entries.len()).filter(|&i| set[i]).collect();
    Ok(Split {
        train: pick(&in_train),
        val: pick(&in_val),
    })
}

/// A sampled annotation file: the chosen lines' text, as written in the input
/// (surrounding whitespace dropped), one per line, in input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampledText {
    pub classes: usize,
    pub train: String,
    pub val: String,
    pub train_images: usize,
    pub val_images: usize,
}

/// The number of classes of an annotation text when not given: multi-class, the
/// largest class id + 1; multi-label, the label count of the first labeled line.
fn infer_classes(text: &str, path: &Path, task: Task) -> Result<usize, DataError> {
    match task {
        Task::MultiClass => {
            let entries = parse_annotations(text, path, task, usize::MAX)?;
            Ok(entries
                .iter()
                .filter_map(|e| match e.label {
                    Label::Class(c) => Some(c + 1),
                    _ => None,
                })
                .max()
                .unwrap_or(0))
        }
        // The parser reports the label count it found when told to expect none.
        Task::MultiLabel => match parse_annotations(text, path, task, 0) {
            Err(DataError::LabelCount { found, .. }) => Ok(found),
            Err(e) => Err(e),
            Ok(_) => Ok(0),
        },
    }
}

/// Parses `text` (the annotation file `path`) with the data loader's parser and samples
/// a split of it (see [`sample`]). `classes`: `None` infers them (see the module docs
/// of the command; a multi-class class no line has is then only caught up to the
/// largest id).
pub fn sample_text(
    text: &str,
    path: &Path,
    task: Task,
    classes: Option<usize>,
    shots: usize,
    val_per_class: usize,
    seed: u64,
) -> Result<SampledText, SampleError> {
    if shots == 0 {
        return Err(SampleError::ZeroShots);
    }
    let classes = match classes {
        Some(c) => c,
        None => infer_classes(text, path, task)?,
    };
    let entries = parse_annotations(text, path, task, classes)?;
    let split = sample(&entries, classes, shots, val_per_class, seed, path)?;
    let lines: Vec<&str> = text.lines().collect();
    let render = |idx: &[usize]| -> String {
        idx.iter()
            .map(|&i| format!("{}\n", lines[entries[i].line - 1].trim()))
            .collect()
    };
    Ok(SampledText {
        classes,
        train: render(&split.train),
        val: render(&split.val),
        train_images: split.train.len(),
        val_images: split.val.len(),
    })
}

/// [`sample_text`] of the file at `path`.
pub fn sample_file(
    path: &Path,
    task: Task,
    classes: Option<usize>,
    shots: usize,
    val_per_class: usize,
    seed: u64,
) -> Result<SampledText, SampleError> {
    let text = std::fs::read_to_string(path).map_err(|err| SampleError::Read {
        path: path.to_path_buf(),
        err,
    })?;
    sample_text(&text, path, task, classes, shots, val_per_class, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("ann.txt")
    }

    /// `per` images of each of `classes` classes, interleaved.
    fn multiclass(classes: usize, per: usize) -> String {
        (0..classes * per)
            .map(|i| format!("images/img_{i:03}.png {}\n", i % classes))
            .collect()
    }

    fn parse(text: &str, task: Task, classes: usize) -> Vec<Entry> {
        parse_annotations(text, p(), task, classes).unwrap()
    }

    fn count(entries: &[Entry], idx: &[usize], c: usize) -> usize {
        idx.iter().filter(|&&i| has(&entries[i].label, c)).count()
    }

    #[test]
    fn multiclass_counts_disjoint_and_ordered() {
        let text = multiclass(3, 10);
        let e = parse(&text, Task::MultiClass, 3);
        let s = sample(&e, 3, 5, 2, 7, p()).unwrap();
        assert_eq!(s.train.len(), 15);
        assert_eq!(s.val.len(), 6);
        for c in 0..3 {
            assert_eq!(count(&e, &s.train, c), 5);
            assert_eq!(count(&e, &s.val, c), 2);
        }
        assert!(s.train.iter().all(|i| !s.val.contains(i)));
        assert!(s.train.windows(2).all(|w| w[0] < w[1]));
        assert!(s.val.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let text = multiclass(4, 12);
        let a = sample_text(&text, p(), Task::MultiClass, None, 1, 1, 3).unwrap();
        let b = sample_text(&text, p(), Task::MultiClass, None, 1, 1, 3).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.classes, 4);
        let differ = (0..5u64).any(|s| {
            sample_text(&text, p(), Task::MultiClass, None, 1, 1, 100 + s)
                .unwrap()
                .train
                != a.train
        });
        assert!(differ);
        // The lines are the input's, in input order.
        let mut last = 0;
        for l in a.train.lines() {
            let pos = text.lines().position(|t| t == l).unwrap();
            assert!(pos >= last);
            last = pos;
        }
    }

    #[test]
    fn multilabel_every_label_has_k_and_no_duplicates() {
        // 3 labels; images with one, two or three labels.
        let pats = [
            "1,0,0", "0,1,0", "0,0,1", "1,1,0", "0,1,1", "1,1,1", "1,0,1",
        ];
        let text: String = (0..42)
            .map(|i| format!("m_{i}.png {}\n", pats[i % pats.len()]))
            .collect();
        let r = sample_text(&text, p(), Task::MultiLabel, None, 3, 2, 1).unwrap();
        assert_eq!(r.classes, 3);
        let e = parse(&text, Task::MultiLabel, 3);
        let s = sample(&e, 3, 3, 2, 1, p()).unwrap();
        assert!(s.train.len() <= 9 && s.val.len() <= 6);
        for c in 0..3 {
            assert!(count(&e, &s.train, c) >= 3);
            assert!(count(&e, &s.val, c) >= 2);
        }
        assert!(s.train.iter().all(|i| !s.val.contains(i)));
        assert_eq!(r.train.lines().count(), s.train.len());
        // Space-separated multi-hot lines are kept as written.
        let spaced = "a.png 1 0\nb.png 0 1\nc.png 1 1\n";
        let r = sample_text(spaced, p(), Task::MultiLabel, Some(2), 1, 0, 0).unwrap();
        assert!(r.train.lines().all(|l| spaced.lines().any(|t| t == l)));
    }

    #[test]
    fn errors_name_the_file_class_and_lines() {
        let text = "a.png 0\nb.png 1\nc.png 0\nd.png 1\ne.png 0\n";
        let e = sample_text(text, p(), Task::MultiClass, None, 2, 1, 0).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("ann.txt") && m.contains("class 1"), "{m}");
        assert!(m.contains("lines 2, 4") && m.contains("3 needed"), "{m}");
        // A class no line has, with --classes.
        let m = sample_text(text, p(), Task::MultiClass, Some(3), 1, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(m.contains("class 2 has 0") && m.contains("no line"), "{m}");
        assert!(matches!(
            sample_text(text, p(), Task::MultiClass, None, 0, 0, 0),
            Err(SampleError::ZeroShots)
        ));
        let m = sample_text("x.png\ny.png\n", p(), Task::MultiClass, None, 1, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(m.contains("unlabeled") && m.contains("line 1"), "{m}");
        // The parser's errors come through with their line.
        let m = sample_text("a.png 0\nb.png 1,0\n", p(), Task::MultiClass, None, 1, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(m.contains("ann.txt:2"), "{m}");
        let m = sample_file(
            Path::new("/nonexistent/ann.txt"),
            Task::MultiClass,
            None,
            1,
            0,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(m.contains("/nonexistent/ann.txt"), "{m}");
    }
}
