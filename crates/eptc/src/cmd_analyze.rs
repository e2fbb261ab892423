//! `eptc analyze` (being written).

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {}

pub fn cmd_analyze(_a: &AnalyzeArgs) -> Result<()> {
    bail!("eptc analyze is not implemented yet")
}
