//! An example backend plugin: the CPU reference backend ([`eptc_cpu::CpuBackend`]) built
//! outside the eptc binary, as `libeptc_cpu_plugin.so`, behind the plugin C ABI
//! (`eptc_plugin::abi`), under the name `cpu-plugin`.
//!
//! ```text
//! cargo build --release -p eptc-cpu-plugin
//! eptc plugins --plugin target/release/libeptc_cpu_plugin.so
//! eptc compile MODEL --peft ept --target target/release/libeptc_cpu_plugin.so -o out
//! ```
//!
//! A plugin for other hardware is the same line around its own `eptc_backend::Backend`,
//! or, in C, the table `eptc_plugin::abi` documents.

eptc_plugin::export_backend!(
    name = "cpu-plugin",
    version = env!("CARGO_PKG_VERSION"),
    backend = eptc_cpu::CpuBackend::new(),
);
