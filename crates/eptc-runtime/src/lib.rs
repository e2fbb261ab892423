//! eptc's runtime. For now: the evaluation metrics of the MedFMC protocol ([`metrics`]),
//! MedFMC data loading ([`data`]), and the optimizers and schedule ([`optim`]). The
//! training loop comes with issue #4.

pub mod analysis;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod sample;
