//! eptc's runtime. For now: the evaluation metrics of the MedFMC protocol ([`metrics`])
//! and MedFMC data loading ([`data`]). The training loop comes with issue #4.

pub mod data;
pub mod metrics;
