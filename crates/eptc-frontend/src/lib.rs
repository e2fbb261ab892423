//! eptc's frontend: Vision Transformer checkpoints in safetensors (timm, Hugging Face
//! `ViTModel` / `ViTForImageClassification`, mmcls / mmpretrain key layouts) imported
//! into the IR, with their weights memory-mapped.

pub mod error;
pub mod layout;
pub mod posembed;
pub mod tensorfile;
pub mod vit;

pub use error::{FrontendError, Result};
pub use layout::Layout;
pub use tensorfile::{sync_parent, write_tensors, TensorFile};
pub use vit::{detect, import, import_file, ImportOptions, Model, VitArch};
