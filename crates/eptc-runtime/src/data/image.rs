//! Image decoding: PNG, JPEG, BMP and TIFF, 8- or 16-bit, gray / gray+alpha / RGB /
//! RGBA, all turned into RGB `f32` in `[0, 1]` (alpha is dropped, gray is copied to
//! the three channels).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use ::image::ImageReader;

use super::{owned, DataError, Entry};

/// A decoded RGB image, `f32` in `[0, 1]`, row-major HWC.
pub type Image = ::image::Rgb32FImage;

/// Decodes the image at `path` (format guessed from the content, then the extension).
pub fn load_image(path: &Path) -> Result<Image, DataError> {
    decode(path, None)
}

/// Decodes the image of an annotation entry: `data_dir/entry.file`. Errors name the
/// image and the annotation file and line that listed it.
pub fn load_entry_image(
    data_dir: &Path,
    annotations: &Path,
    entry: &Entry,
) -> Result<Image, DataError> {
    decode(
        &data_dir.join(&entry.file),
        Some((annotations.to_path_buf(), entry.line)),
    )
}

fn decode(path: &Path, listed: Option<(PathBuf, usize)>) -> Result<Image, DataError> {
    let io_error = |source: std::io::Error, listed: Option<(PathBuf, usize)>| {
        if source.kind() == ErrorKind::NotFound {
            DataError::ImageMissing {
                path: owned(path),
                listed,
            }
        } else {
            DataError::ImageIo {
                path: owned(path),
                listed,
                source,
            }
        }
    };
    let reader = ImageReader::open(path).map_err(|e| io_error(e, listed.clone()))?;
    let reader = reader
        .with_guessed_format()
        .map_err(|e| io_error(e, listed.clone()))?;
    let decoded = reader.decode().map_err(|source| DataError::ImageDecode {
        path: owned(path),
        listed,
        source,
    })?;
    // `into_rgb32f` scales 8-bit by 1/255 and 16-bit by 1/65535.
    Ok(decoded.into_rgb32f())
}
