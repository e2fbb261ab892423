//! `eptc plot` (being written).

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct PlotArgs {}

pub fn cmd_plot(_a: &PlotArgs) -> Result<()> {
    bail!("eptc plot is not implemented yet")
}
