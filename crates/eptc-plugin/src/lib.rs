//! Backend plugins: new hardware for eptc without rebuilding eptc.
//!
//! A plugin is a dynamic library exporting one symbol, `eptc_plugin_api`, which returns a
//! C function table with its size and an API version (PJRT's design is the model). Only
//! C types cross the boundary: graphs as the IR's text format (`ir-specs/`), tensors as
//! raw buffers with dtype and shape descriptors, errors as status codes with a message.
//!
//! - [`abi`]: the table and its types, the specification a plugin implements (in C or
//!   anything else that exports C functions);
//! - [`host`]: [`PluginBackend`], which loads a plugin, refuses it with a clear message
//!   when its version, table or `init` is wrong, and drives it as an
//!   [`eptc_backend::Backend`], the interface built-in backends implement too;
//! - [`guest`]: for Rust plugins, an adapter from any [`eptc_backend::Backend`] to the
//!   table, exported by [`export_backend!`] (see `plugins/cpu-plugin`).

pub mod abi;
pub mod guest;
pub mod host;

pub use host::{PluginBackend, PluginError};

/// Re-exported for [`export_backend!`].
#[doc(hidden)]
pub use eptc_backend;
