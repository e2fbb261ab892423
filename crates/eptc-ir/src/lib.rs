//! eptc's intermediate representation.
//!
//! A [`Graph`] is a petgraph of typed [`Node`]s: an [`Op`], the [`TensorType`] of its
//! output (element type and shape, with the batch `B` symbolic) and the tag of the pass
//! that inserted it. [`verify`] checks a graph; [`text`] prints and parses it; [`decompose`]
//! rewrites fused ops into primitives for backends that lack them.
//! The spec of every op lives in `ir-specs/ops.toml`.

pub mod decompose;
pub mod error;
pub mod graph;
pub mod infer;
pub mod op;
pub mod reference;
pub mod strides;
pub mod text;
pub mod types;
pub mod verify;
pub mod weights;

pub use decompose::{decompose, lower_unsupported};
pub use error::{IrError, Result};
pub use graph::{Graph, Node, NodeId};
pub use op::{Activation, AttnWrt, BinaryOp, Init, Op, ReduceOp, UnaryOp};
pub use types::{DType, Dim, Shape, TensorType};
pub use verify::verify;
pub use weights::{HostTensor, WeightStore};
