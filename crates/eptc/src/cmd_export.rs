//! `eptc export` (being written).

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ExportArgs {}

pub fn cmd_export(_a: &ExportArgs) -> Result<()> {
    bail!("eptc export is not implemented yet")
}
