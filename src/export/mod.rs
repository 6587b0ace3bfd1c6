//! Output formats for a leaderboard, each behind one small trait that returns bytes; only the
//! caller (the CLI) writes them out.

use crate::leaderboard::Leaderboard;
use anyhow::Result;

/// Renders a leaderboard in one format.
pub trait Exporter {
    fn render(&self, board: &Leaderboard) -> Result<Vec<u8>>;
}

pub mod html;
pub mod svg;
