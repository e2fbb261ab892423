//! eptc's runtime. For now: the evaluation metrics of the MedFMC protocol ([`metrics`]).
//! Data loading and the training loop come with issue #4.

pub mod metrics;
