//! Tests of the MedFMC data layer: annotation parsing, image decoding, transforms.

use std::path::Path;

use eptc_runtime::data::{
    eval_transform, hflip, load_entry_image, load_image, parse_annotations, read_annotations,
    resize, to_chw_normalized, train_transform, CropParams, DataError, Entry, Image, Label,
    Normalize, RandomResizedCrop, Task,
};
use image::{ImageBuffer, Luma, Rgb, Rgba};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn ann() -> &'static Path {
    Path::new("train_ann.txt")
}

fn parse(text: &str, task: Task, classes: usize) -> Result<Vec<Entry>, DataError> {
    parse_annotations(text, ann(), task, classes)
}

fn hot(bits: &[u8]) -> Label {
    Label::MultiHot(bits.iter().map(|&b| b == 1).collect())
}

fn err(text: &str, task: Task, classes: usize) -> (DataError, String) {
    let e = parse(text, task, classes).expect_err("expected an error");
    let msg = e.to_string();
    (e, msg)
}

// ---------------------------------------------------------------- annotations

#[test]
fn multi_hot_with_commas() {
    let es = parse("a.png 1,0,1\nb.png 0,0,0\n", Task::MultiLabel, 3).unwrap();
    assert_eq!(es.len(), 2);
    assert_eq!(es[0].file, "a.png");
    assert_eq!(es[0].label, hot(&[1, 0, 1]));
    assert_eq!(es[0].line, 1);
    assert_eq!(es[1].label, hot(&[0, 0, 0]));
    assert_eq!(es[1].line, 2);
}

#[test]
fn multi_hot_with_spaces() {
    let es = parse("a.png 1 0 1\nb.png  0\t1 1\n", Task::MultiLabel, 3).unwrap();
    assert_eq!(es[0].file, "a.png");
    assert_eq!(es[0].label, hot(&[1, 0, 1]));
    assert_eq!(es[1].file, "b.png");
    assert_eq!(es[1].label, hot(&[0, 1, 1]));
}

#[test]
fn class_ids() {
    let es = parse("a.png 3\nb.png 0\n", Task::MultiClass, 4).unwrap();
    assert_eq!(es[0].label, Label::Class(3));
    assert_eq!(es[1].label, Label::Class(0));
}

#[test]
fn unlabeled_test_set() {
    for task in [Task::MultiLabel, Task::MultiClass] {
        let es = parse("a.png\nb c.png\n", task, 3).unwrap();
        assert_eq!(es[0].file, "a.png");
        assert_eq!(es[0].label, Label::None);
        assert_eq!(es[1].file, "b c.png");
        assert_eq!(es[1].label, Label::None);
    }
}

#[test]
fn file_names_with_spaces() {
    let es = parse(
        "my scan 01.png 1,0,1\nother  scan.png 0 1 1\n",
        Task::MultiLabel,
        3,
    )
    .unwrap();
    assert_eq!(es[0].file, "my scan 01.png");
    assert_eq!(es[0].label, hot(&[1, 0, 1]));
    assert_eq!(es[1].file, "other  scan.png", "inner spacing is kept");
    assert_eq!(es[1].label, hot(&[0, 1, 1]));

    let es = parse("patient 7 view 2.jpg 2\npatient 7 2\n", Task::MultiClass, 3).unwrap();
    assert_eq!(es[0].file, "patient 7 view 2.jpg");
    assert_eq!(es[0].label, Label::Class(2));
    assert_eq!(
        es[1].file, "patient 7",
        "only the last integer is the class id"
    );
    assert_eq!(es[1].label, Label::Class(2));

    // A file name ending in a number, with comma-separated labels.
    let es = parse("scan 2 1,0,1\n", Task::MultiLabel, 3).unwrap();
    assert_eq!(es[0].file, "scan 2");
    assert_eq!(es[0].label, hot(&[1, 0, 1]));
}

#[test]
fn crlf_blank_lines_and_trailing_whitespace() {
    let text = "\r\na.png 1,0\r\n\r\n  b.png 0,1 \t\r\n   \r\nc d.png 1 1  \r\n";
    let es = parse(text, Task::MultiLabel, 2).unwrap();
    assert_eq!(es.len(), 3);
    assert_eq!((es[0].file.as_str(), es[0].line), ("a.png", 2));
    assert_eq!((es[1].file.as_str(), es[1].line), ("b.png", 4));
    assert_eq!((es[2].file.as_str(), es[2].line), ("c d.png", 6));
    assert_eq!(es[2].label, hot(&[1, 1]));

    let es = parse("a.png 1\r\nb.png 0\r\n", Task::MultiClass, 2).unwrap();
    assert_eq!(es[1].label, Label::Class(0));
}

#[test]
fn wrong_label_count_names_file_and_line() {
    let (e, msg) = err("a.png 1,0,1\nb.png 1,0\n", Task::MultiLabel, 3);
    assert!(matches!(
        e,
        DataError::LabelCount {
            line: 2,
            expected: 3,
            found: 2,
            ..
        }
    ));
    assert!(msg.contains("train_ann.txt:2"), "{msg}");
    assert!(msg.contains("expected 3"), "{msg}");

    let (e, msg) = err(
        "a.png 1 0 1\nb.png 1 0 1\nc.png 1 0 1 1\n",
        Task::MultiLabel,
        3,
    );
    assert_eq!(e.line(), Some(3));
    assert!(
        msg.contains("train_ann.txt:3") && msg.contains("found 4"),
        "{msg}"
    );

    // Multi-hot labels in a multi-class file.
    let (e, msg) = err("a.png 1\nb.png 0,1,0\n", Task::MultiClass, 3);
    assert!(matches!(e, DataError::LabelCount { line: 2, .. }), "{msg}");
    assert!(msg.contains("train_ann.txt:2"), "{msg}");
    let (e, _) = err("a.png 0 1 0\n", Task::MultiClass, 3);
    assert!(matches!(e, DataError::LabelCount { line: 1, .. }));
}

#[test]
fn class_out_of_range_names_file_and_line() {
    let (e, msg) = err("a.png 1\nb.png 2\n\nc.png 5\n", Task::MultiClass, 5);
    assert!(
        matches!(e, DataError::ClassOutOfRange { line: 4, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("train_ann.txt:4") && msg.contains("5"),
        "{msg}"
    );

    let (e, msg) = err("a.png -1\n", Task::MultiClass, 5);
    assert!(
        matches!(e, DataError::ClassOutOfRange { line: 1, .. }),
        "{msg}"
    );
    assert!(msg.contains("-1"), "{msg}");
}

#[test]
fn non_binary_multi_hot_names_file_and_line() {
    let (e, msg) = err("a.png 1,0,1\nb.png 1,2,0\n", Task::MultiLabel, 3);
    assert!(
        matches!(
            e,
            DataError::NotBinary {
                line: 2,
                position: 1,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("train_ann.txt:2") && msg.contains("\"2\""),
        "{msg}"
    );

    let (e, _) = err("a.png 1 -1 0\n", Task::MultiLabel, 3);
    assert!(matches!(e, DataError::NotBinary { line: 1, .. }));
}

#[test]
fn empty_data_set() {
    for text in ["", "\n\n  \r\n"] {
        let (e, msg) = err(text, Task::MultiLabel, 3);
        assert!(matches!(e, DataError::Empty { .. }));
        assert!(
            msg.contains("train_ann.txt") && msg.contains("empty"),
            "{msg}"
        );
    }
}

#[test]
fn mixed_labeled_and_unlabeled() {
    let (e, msg) = err("a.png 1\nb.png 0\nc.png\n", Task::MultiClass, 2);
    assert!(matches!(e, DataError::MixedLabels { line: 3, .. }), "{msg}");
    assert!(
        msg.contains("train_ann.txt:3") && msg.contains("line 1"),
        "{msg}"
    );

    let (e, msg) = err("a.png\nb.png 0,1\n", Task::MultiLabel, 2);
    assert!(matches!(e, DataError::MixedLabels { line: 2, .. }), "{msg}");
}

#[test]
fn read_annotations_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("val.txt");
    std::fs::write(&path, "x y.png 0,1\r\n").unwrap();
    let es = read_annotations(&path, Task::MultiLabel, 2).unwrap();
    assert_eq!(es[0].file, "x y.png");

    let missing = dir.path().join("nope.txt");
    let msg = read_annotations(&missing, Task::MultiLabel, 2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope.txt"), "{msg}");
}

// ---------------------------------------------------------------- images

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn png_8bit_gray_becomes_three_equal_channels() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gray.png");
    ImageBuffer::from_fn(5, 4, |x, y| Luma([(x * 50 + y) as u8]))
        .save(&path)
        .unwrap();
    let img = load_image(&path).unwrap();
    assert_eq!(img.dimensions(), (5, 4));
    for (x, y, p) in img.enumerate_pixels() {
        let v = (x * 50 + y) as f32 / 255.0;
        assert!(p.0.iter().all(|&c| close(c, v, 1e-6)), "{x},{y}: {p:?}");
    }
}

#[test]
fn png_16bit_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.png");
    ImageBuffer::from_fn(3, 2, |x, y| Rgb([0u16, 65535, (x * 1000 + y * 7) as u16]))
        .save(&path)
        .unwrap();
    let img = load_image(&path).unwrap();
    assert_eq!(img.dimensions(), (3, 2));
    for (x, y, p) in img.enumerate_pixels() {
        assert!(close(p.0[0], 0.0, 1e-7));
        assert!(close(p.0[1], 1.0, 1e-7));
        let b = (x * 1000 + y * 7) as f32 / 65535.0;
        assert!(close(p.0[2], b, 1e-6), "{p:?} vs {b}");
    }
}

#[test]
fn png_rgba_drops_alpha() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rgba.png");
    ImageBuffer::from_pixel(2, 2, Rgba([255u8, 0, 51, 10]))
        .save(&path)
        .unwrap();
    let img = load_image(&path).unwrap();
    let p = img.get_pixel(1, 1).0;
    assert!(close(p[0], 1.0, 1e-6) && close(p[1], 0.0, 1e-6) && close(p[2], 0.2, 1e-6));
}

fn rgb8_test_image() -> ImageBuffer<Rgb<u8>, Vec<u8>> {
    ImageBuffer::from_pixel(16, 16, Rgb([200u8, 100, 30]))
}

#[test]
fn jpeg_bmp_tiff_rgb() {
    let dir = tempfile::tempdir().unwrap();
    for (name, tol) in [("a.jpg", 3.0 / 255.0), ("a.bmp", 1e-6), ("a.tiff", 1e-6)] {
        let path = dir.path().join(name);
        rgb8_test_image().save(&path).unwrap();
        let img = load_image(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.dimensions(), (16, 16), "{name}");
        let p = img.get_pixel(7, 9).0;
        let want = [200.0 / 255.0, 100.0 / 255.0, 30.0 / 255.0];
        for c in 0..3 {
            assert!(close(p[c], want[c], tol), "{name}: {p:?} vs {want:?}");
        }
    }
}

#[test]
fn format_is_guessed_from_content() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("a.png");
    rgb8_test_image().save(&png).unwrap();
    let misnamed = dir.path().join("really_a_png.jpg");
    std::fs::rename(&png, &misnamed).unwrap();
    assert_eq!(load_image(&misnamed).unwrap().dimensions(), (16, 16));
}

#[test]
fn corrupt_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken scan.png");
    // A PNG signature followed by garbage, and a file of plain garbage.
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(&[7u8; 40]);
    std::fs::write(&path, &bytes).unwrap();
    let e = load_image(&path).unwrap_err();
    assert!(matches!(e, DataError::ImageDecode { .. }));
    assert!(e.to_string().contains("broken scan.png"), "{e}");

    let junk = dir.path().join("junk.bmp");
    std::fs::write(&junk, b"not an image at all").unwrap();
    let e = load_image(&junk).unwrap_err();
    assert!(e.to_string().contains("junk.bmp"), "{e}");

    // Through an entry, the annotation file and line are named too.
    let entries = parse("x.png 1\n\nbroken scan.png 0\n", Task::MultiClass, 2).unwrap();
    let e = load_entry_image(dir.path(), ann(), &entries[1]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("broken scan.png") && msg.contains("train_ann.txt:3"),
        "{msg}"
    );
    assert_eq!(e.line(), Some(3));
}

#[test]
fn missing_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_image(&dir.path().join("ghost.png")).unwrap_err();
    assert!(matches!(e, DataError::ImageMissing { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("ghost.png") && msg.contains("not found"),
        "{msg}"
    );

    let entries = parse("ghost 2.png 1,0\n", Task::MultiLabel, 2).unwrap();
    let e = load_entry_image(dir.path(), ann(), &entries[0]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("ghost 2.png") && msg.contains("train_ann.txt:1"),
        "{msg}"
    );
}

#[test]
fn entry_image_loads_relative_to_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    rgb8_test_image()
        .save(dir.path().join("with space.png"))
        .unwrap();
    let entries = parse("with space.png 1\n", Task::MultiClass, 2).unwrap();
    let img = load_entry_image(dir.path(), ann(), &entries[0]).unwrap();
    assert_eq!(img.dimensions(), (16, 16));
}

// ---------------------------------------------------------------- transforms

/// A non-symmetric gradient image, so that different crops give different outputs.
fn gradient(w: u32, h: u32) -> Image {
    ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            x as f32 / w as f32,
            y as f32 / h as f32,
            ((x * y) % 17) as f32 / 16.0,
        ])
    })
}

const IDENTITY: Normalize = Normalize {
    mean: [0.0; 3],
    std: [1.0; 3],
};

#[test]
fn resize_shape_and_range() {
    let img = gradient(50, 30);
    let r = resize(&img, 24);
    assert_eq!(r.dimensions(), (24, 24));
    let up = resize(&gradient(5, 7), 33);
    assert_eq!(up.dimensions(), (33, 33));

    let v = eval_transform(&img, 16, &IDENTITY);
    assert_eq!(v.len(), 3 * 16 * 16);
    assert!(v.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)));
    // A hard edge (which makes bicubic overshoot) still stays in range.
    let edges = ImageBuffer::from_fn(9, 9, |x, _| Rgb([(x % 2) as f32; 3]));
    let v = eval_transform(&edges, 20, &IDENTITY);
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
}

#[test]
fn chw_layout() {
    let img = ImageBuffer::from_fn(2, 1, |x, _| Rgb([x as f32, 10.0 + x as f32, 20.0]));
    let v = to_chw_normalized(&img, &IDENTITY);
    assert_eq!(v, vec![0.0, 1.0, 10.0, 11.0, 20.0, 20.0]);
}

#[test]
fn normalising_a_constant_image() {
    let img = ImageBuffer::from_pixel(8, 6, Rgb([0.5f32, 0.5, 0.5]));
    assert_eq!(Normalize::default(), Normalize::IMAGENET);
    let v = eval_transform(&img, 4, &Normalize::default());
    assert_eq!(v.len(), 3 * 16);
    let want = [
        (0.5 - 0.485) / 0.229,
        (0.5 - 0.456) / 0.224,
        (0.5 - 0.406) / 0.225,
    ];
    for c in 0..3 {
        for &x in &v[c * 16..(c + 1) * 16] {
            assert!(close(x, want[c], 1e-5), "channel {c}: {x} vs {}", want[c]);
        }
    }
    // Configurable.
    let custom = Normalize {
        mean: [0.5, 0.0, 1.0],
        std: [1.0, 0.25, 0.5],
    };
    let v = to_chw_normalized(&img, &custom);
    assert!(close(v[0], 0.0, 1e-6) && close(v[48], 2.0, 1e-6) && close(v[96], -1.0, 1e-6));
}

#[test]
fn random_resized_crop_is_deterministic_for_a_seed() {
    let img = gradient(64, 48);
    let a = train_transform(
        &img,
        32,
        &Normalize::default(),
        &mut StdRng::seed_from_u64(7),
    );
    let b = train_transform(
        &img,
        32,
        &Normalize::default(),
        &mut StdRng::seed_from_u64(7),
    );
    assert_eq!(a.len(), 3 * 32 * 32);
    assert_eq!(a, b);

    let rrc = RandomResizedCrop::new(20);
    let p = rrc.params(640, 480, &mut StdRng::seed_from_u64(3));
    assert_eq!(p, rrc.params(640, 480, &mut StdRng::seed_from_u64(3)));
}

#[test]
fn random_resized_crop_varies_across_seeds() {
    let img = gradient(64, 48);
    let outs: Vec<Vec<f32>> = (0..8)
        .map(|s| train_transform(&img, 16, &IDENTITY, &mut StdRng::seed_from_u64(s)))
        .collect();
    let mut distinct = outs.clone();
    distinct.dedup();
    distinct.sort_by(|a, b| a.partial_cmp(b).unwrap());
    distinct.dedup();
    assert!(
        distinct.len() >= 6,
        "only {} distinct crops of 8",
        distinct.len()
    );
    assert!(outs.iter().flatten().all(|x| (0.0..=1.0).contains(x)));

    // Crop parameters stay inside the image and within the scale / ratio bounds.
    let rrc = RandomResizedCrop::new(16);
    let mut rng = StdRng::seed_from_u64(11);
    let mut flips = 0;
    for _ in 0..200 {
        let p = rrc.params(300, 200, &mut rng);
        assert!(p.width > 0 && p.height > 0);
        assert!(p.left + p.width <= 300 && p.top + p.height <= 200, "{p:?}");
        let frac = f64::from(p.width * p.height) / 60000.0;
        assert!((0.07..=1.0).contains(&frac), "{p:?}");
    }
    // The flip happens about half the time.
    let one_col = ImageBuffer::from_fn(16, 16, |x, _| Rgb([x as f32 / 15.0; 3]));
    for s in 0..100 {
        let v = train_transform(&one_col, 16, &IDENTITY, &mut StdRng::seed_from_u64(s));
        if v[0] > v[15] {
            flips += 1;
        }
    }
    assert!((25..=75).contains(&flips), "{flips} flips of 100");
}

#[test]
fn random_resized_crop_falls_back_to_center_crop() {
    // No crop of the full area fits a 1000x10 image with ratio in [3/4, 4/3]: after
    // 10 attempts, the center crop with the ratio clamped to 4/3.
    let mut rrc = RandomResizedCrop::new(8);
    rrc.scale = (1.0, 1.0);
    let p = rrc.params(1000, 10, &mut StdRng::seed_from_u64(0));
    assert_eq!(
        p,
        CropParams {
            top: 0,
            left: 493,
            height: 10,
            width: 13
        }
    );
    let p = rrc.params(10, 1000, &mut StdRng::seed_from_u64(0));
    assert_eq!(
        p,
        CropParams {
            top: 493,
            left: 0,
            height: 13, // round(10 / (3/4))
            width: 10
        }
    );
    let out = rrc.apply(&gradient(1000, 10), &mut StdRng::seed_from_u64(0));
    assert_eq!(out.dimensions(), (8, 8));
}

#[test]
fn hflip_mirrors() {
    let img = ImageBuffer::from_fn(3, 1, |x, _| Rgb([x as f32; 3]));
    let f = hflip(&img);
    assert_eq!(f.get_pixel(0, 0).0[0], 2.0);
    assert_eq!(f.get_pixel(2, 0).0[0], 0.0);
}
