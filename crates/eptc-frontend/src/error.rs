use std::path::PathBuf;

use thiserror::Error;

/// Errors of the frontend. Each names the file and, where there is one, the tensor.
#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid safetensors file: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("{}: not a ViT checkpoint eptc knows: {msg}", path.display())]
    NotVit { path: PathBuf, msg: String },
    #[error("{}: missing tensor {key:?} (expected shape {expected})", path.display())]
    MissingTensor {
        path: PathBuf,
        key: String,
        expected: String,
    },
    #[error("{}: tensor {key:?} has shape {found:?}, expected {expected}", path.display())]
    TensorShape {
        path: PathBuf,
        key: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("{}: tensor {key:?} has element type {dtype}, eptc reads F32, F16, BF16 and F64", path.display())]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{}: {msg}", path.display())]
    Arch { path: PathBuf, msg: String },
    #[error(transparent)]
    Ir(#[from] eptc_ir::IrError),
}

pub type Result<T, E = FrontendError> = std::result::Result<T, E>;
