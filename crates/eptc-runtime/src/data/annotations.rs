//! MedFMC annotation files: one line per image, the file name first and the label (if
//! any) last. Accepted forms:
//!
//! - `file.png 1,0,1` — multi-hot, comma separated ([`Task::MultiLabel`]);
//! - `file.png 1 0 1` — multi-hot, space separated ([`Task::MultiLabel`]);
//! - `file.png 3` — a class id ([`Task::MultiClass`]);
//! - `file.png` — no label (an unlabeled test set; all lines then must be unlabeled).
//!
//! File names may contain spaces, so labels are parsed from the right: the label is the
//! trailing run of integer tokens after the first token (the first token always belongs
//! to the file name). A file name that itself ends in a lone integer token is therefore
//! ambiguous with space-separated labels; comma-separated multi-hot labels avoid that.

use std::path::Path;

use super::{owned, DataError};

/// The kind of classification task, which decides how a label is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Multi-hot labels (sigmoid + BCE).
    MultiLabel,
    /// One class id per image (softmax + cross-entropy).
    MultiClass,
}

/// The label of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    MultiHot(Vec<bool>),
    Class(usize),
    /// Unlabeled (test set).
    None,
}

impl Label {
    pub fn is_none(&self) -> bool {
        matches!(self, Label::None)
    }
}

/// One annotation line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The image file name, relative to the data folder, exactly as written (inner
    /// spaces kept).
    pub file: String,
    pub label: Label,
    /// 1-based line number in the annotation file.
    pub line: usize,
}

/// Reads and parses an annotation file (see [`parse_annotations`]).
pub fn read_annotations(path: &Path, task: Task, classes: usize) -> Result<Vec<Entry>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: owned(path),
        source,
    })?;
    parse_annotations(&text, path, task, classes)
}

/// Parses the text of an annotation file; `path` is only used in error messages.
/// Blank lines, surrounding whitespace and CRLF line ends are ignored.
pub fn parse_annotations(
    text: &str,
    path: &Path,
    task: Task,
    classes: usize,
) -> Result<Vec<Entry>, DataError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let entry = parse_line(line, index + 1, path, task, classes)?;
        if let Some(first) = entries.first() {
            if first.label.is_none() != entry.label.is_none() {
                let kind = |l: &Label| if l.is_none() { "unlabeled" } else { "labeled" };
                return Err(DataError::MixedLabels {
                    path: owned(path),
                    line: entry.line,
                    this: if entry.label.is_none() {
                        "has no label"
                    } else {
                        "has a label"
                    },
                    other_line: first.line,
                    other: kind(&first.label),
                });
            }
        }
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(DataError::Empty { path: owned(path) });
    }
    Ok(entries)
}

/// Whitespace-separated tokens of `line` with their byte offsets.
fn tokens(line: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                out.push((s, &line[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &line[s..]));
    }
    out
}

/// An optionally signed run of ASCII digits.
fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `1,0,1` (at least one comma, every piece an integer).
fn is_comma_list(s: &str) -> bool {
    s.contains(',') && s.split(',').all(is_integer)
}

fn parse_line(
    line: &str,
    number: usize,
    path: &Path,
    task: Task,
    classes: usize,
) -> Result<Entry, DataError> {
    let toks = tokens(line);
    // The first token always belongs to the file name; labels are the trailing run.
    let candidates = &toks[1..];
    let label_start = if candidates.last().is_some_and(|(_, t)| is_comma_list(t)) {
        candidates.len() - 1
    } else {
        candidates
            .iter()
            .rposition(|(_, t)| !is_integer(t))
            .map_or(0, |p| p + 1)
    };
    let label_toks = &candidates[label_start..];
    let Some(&(label_offset, _)) = label_toks.first() else {
        return Ok(Entry {
            file: line.to_string(),
            label: Label::None,
            line: number,
        });
    };
    let file = line[..label_offset].trim_end().to_string();
    let label_text = &line[label_offset..];
    let values: Vec<&str> = label_toks.iter().flat_map(|(_, t)| t.split(',')).collect();
    let label = match task {
        Task::MultiLabel => {
            if values.len() != classes {
                return Err(DataError::LabelCount {
                    path: owned(path),
                    line: number,
                    expected: classes,
                    found: values.len(),
                    text: label_text.to_string(),
                    hint: if values.len() > classes && !label_text.contains(',') {
                        " (if the file name ends in a number, write the labels comma separated)"
                    } else {
                        ""
                    },
                });
            }
            let mut hot = Vec::with_capacity(values.len());
            for (position, v) in values.iter().enumerate() {
                match *v {
                    "0" => hot.push(false),
                    "1" => hot.push(true),
                    _ => {
                        return Err(DataError::NotBinary {
                            path: owned(path),
                            line: number,
                            position,
                            value: v.to_string(),
                        })
                    }
                }
            }
            Label::MultiHot(hot)
        }
        Task::MultiClass => {
            let looks_multi_hot = values.len() > 1
                && (label_text.contains(',')
                    || (values.len() == classes && values.iter().all(|v| *v == "0" || *v == "1")));
            if looks_multi_hot {
                return Err(DataError::LabelCount {
                    path: owned(path),
                    line: number,
                    expected: 1,
                    found: values.len(),
                    text: label_text.to_string(),
                    hint: " (a multi-class task takes one class id; is this a multi-label file?)",
                });
            }
            // A file name may end in integer tokens: only the last one is the class id.
            let (file, value) = if values.len() > 1 {
                let (off, last) = *label_toks.last().expect("non-empty");
                (line[..off].trim_end().to_string(), last)
            } else {
                (file, values[0])
            };
            match value.parse::<usize>() {
                Ok(c) if c < classes => {
                    return Ok(Entry {
                        file,
                        label: Label::Class(c),
                        line: number,
                    })
                }
                _ => {
                    return Err(DataError::ClassOutOfRange {
                        path: owned(path),
                        line: number,
                        value: value.to_string(),
                        classes,
                    })
                }
            }
        }
    };
    Ok(Entry {
        file,
        label,
        line: number,
    })
}
