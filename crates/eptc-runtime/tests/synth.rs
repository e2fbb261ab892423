//! The synthetic data generator: layout, determinism, decodability, class coverage.

use std::collections::BTreeSet;
use std::time::Instant;

use eptc_runtime::data::synth::{generate, SynthSpec};
use eptc_runtime::data::{load_entry_image, read_annotations, DataError, Label, Task};

fn spec(task: Task, classes: usize, seed: u64) -> SynthSpec {
    SynthSpec {
        task,
        classes,
        image_size: 40,
        train_per_class: 3,
        val_per_class: 2,
        test_per_class: 2,
        seed,
    }
}

#[test]
fn multiclass_layout_decodes_and_parses() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(Task::MultiClass, 4, 7);
    let sum = generate(dir.path(), &s).unwrap();
    assert_eq!(sum.images, 4 * (3 + 2 + 2));
    assert_eq!(
        sum.class_names,
        [
            "horizontal_stripes",
            "vertical_stripes",
            "disc",
            "checkerboard"
        ]
    );
    for (ann, n) in [(&sum.train, 12), (&sum.val, 8), (&sum.test, 8)] {
        let entries = read_annotations(ann, Task::MultiClass, 4).unwrap();
        assert_eq!(entries.len(), n);
        let mut seen = BTreeSet::new();
        for e in &entries {
            assert!(e.file.starts_with("images/"), "{}", e.file);
            let img = load_entry_image(dir.path(), ann, e).unwrap();
            assert_eq!((img.width(), img.height()), (40, 40));
            match e.label {
                Label::Class(c) => seen.insert(c),
                ref l => panic!("unexpected label {l:?}"),
            };
        }
        assert_eq!(seen.len(), 4, "every class appears in {}", ann.display());
    }
    let unlabeled = read_annotations(&sum.test_unlabeled, Task::MultiClass, 4).unwrap();
    let test = read_annotations(&sum.test, Task::MultiClass, 4).unwrap();
    assert_eq!(unlabeled.len(), test.len());
    for (u, t) in unlabeled.iter().zip(&test) {
        assert_eq!(u.file, t.file);
        assert_eq!(u.label, Label::None);
    }
    let text = std::fs::read_to_string(&sum.train).unwrap();
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("images/train_0000.png ")
            && first.len() == "images/train_0000.png 2".len(),
        "{first}"
    );
}

#[test]
fn multilabel_every_label_has_both_values() {
    let dir = tempfile::tempdir().unwrap();
    for classes in 2..=4 {
        let s = spec(Task::MultiLabel, classes, 3);
        let sum = generate(dir.path(), &s).unwrap();
        assert_eq!(sum.class_names.len(), classes);
        for ann in [&sum.train, &sum.val, &sum.test] {
            let entries = read_annotations(ann, Task::MultiLabel, classes).unwrap();
            for j in 0..classes {
                let pos = entries
                    .iter()
                    .filter(|e| matches!(&e.label, Label::MultiHot(h) if h[j]))
                    .count();
                assert!(
                    pos > 0 && pos < entries.len(),
                    "label {j} in {}",
                    ann.display()
                );
            }
            for e in &entries {
                let img = load_entry_image(dir.path(), ann, e).unwrap();
                assert_eq!(img.width(), 40);
            }
        }
        let text = std::fs::read_to_string(&sum.val).unwrap();
        let label = text.lines().next().unwrap().split(' ').nth(1).unwrap();
        assert_eq!(label.split(',').count(), classes, "{text}");
    }
}

fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("images")] {
        for e in std::fs::read_dir(sub).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let name = p.strip_prefix(dir).unwrap().display().to_string();
                files.push((name, std::fs::read(&p).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn same_seed_same_bytes_other_seed_differs() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    for task in [Task::MultiClass, Task::MultiLabel] {
        generate(a.path(), &spec(task, 3, 11)).unwrap();
        generate(b.path(), &spec(task, 3, 11)).unwrap();
        generate(c.path(), &spec(task, 3, 12)).unwrap();
        let (sa, sb, sc) = (snapshot(a.path()), snapshot(b.path()), snapshot(c.path()));
        assert_eq!(sa.len(), 3 * 7 + 4);
        assert!(sa == sb, "same spec must give identical files");
        assert!(sa != sc, "another seed must give other files");
    }
}

#[test]
fn images_of_a_class_are_not_identical() {
    let dir = tempfile::tempdir().unwrap();
    let sum = generate(dir.path(), &spec(Task::MultiClass, 2, 5)).unwrap();
    let entries = read_annotations(&sum.train, Task::MultiClass, 2).unwrap();
    let bytes: BTreeSet<Vec<u8>> = entries
        .iter()
        .map(|e| std::fs::read(dir.path().join(&e.file)).unwrap())
        .collect();
    assert_eq!(bytes.len(), entries.len());
}

#[test]
fn invalid_specs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for s in [
        SynthSpec {
            classes: 1,
            ..SynthSpec::default()
        },
        SynthSpec {
            classes: 5,
            ..SynthSpec::default()
        },
        SynthSpec {
            image_size: 4,
            ..SynthSpec::default()
        },
        SynthSpec {
            val_per_class: 0,
            ..SynthSpec::default()
        },
    ] {
        let e = generate(dir.path(), &s).unwrap_err();
        assert!(matches!(e, DataError::InvalidSpec(_)), "{e}");
    }
}

#[test]
fn fast_enough() {
    // A few hundred 64 px images: well under a second in release; generous here
    // (tests run unoptimised, on shared machines).
    let dir = tempfile::tempdir().unwrap();
    let s = SynthSpec {
        task: Task::MultiClass,
        classes: 4,
        image_size: 64,
        train_per_class: 50,
        val_per_class: 15,
        test_per_class: 15,
        seed: 1,
    };
    let t = Instant::now();
    let sum = generate(dir.path(), &s).unwrap();
    assert_eq!(sum.images, 320);
    let secs = t.elapsed().as_secs_f64();
    eprintln!("generated {} images in {secs:.3} s", sum.images);
    assert!(secs < 10.0, "{secs} s");
}
