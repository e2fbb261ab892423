use thiserror::Error;

#[derive(Debug, Error)]
pub enum PeftError {
    #[error("{0}")]
    Config(String),
    #[error("the graph does not look like a ViT: {0}")]
    Pattern(String),
    #[error("adapter {file}: {msg}")]
    Adapter { file: String, msg: String },
    #[error(transparent)]
    Ir(#[from] eptc_ir::IrError),
}

pub type Result<T, E = PeftError> = std::result::Result<T, E>;
