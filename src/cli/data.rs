//! `recycle data`: not built yet.

use anyhow::{bail, Result};
use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum Command {}

pub fn run(_cmd: Command) -> Result<ExitCode> {
    bail!("`recycle data` is not built yet")
}
