//! `eptc protocol` (being written).

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ProtocolArgs {}

pub fn cmd_protocol(_a: &ProtocolArgs) -> Result<()> {
    bail!("eptc protocol is not implemented yet")
}
