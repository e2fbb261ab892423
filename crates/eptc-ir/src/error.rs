use thiserror::Error;

/// Errors of the IR: building, verifying and parsing graphs.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum IrError {
    /// An op was given operands it cannot take.
    #[error("{op} (node %{node}): {msg}")]
    Shape {
        op: String,
        node: usize,
        msg: String,
    },
    /// The graph breaks an invariant.
    #[error("invalid graph: {0}")]
    Invalid(String),
    /// The text format could not be read.
    #[error("line {line}: {msg}")]
    Parse { line: usize, msg: String },
}

pub type Result<T, E = IrError> = std::result::Result<T, E>;
