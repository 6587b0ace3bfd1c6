//! The JSON leaderboard: the reference format that `recycle check` reads back.

use super::Exporter;
use crate::leaderboard::{Leaderboard, LEADERBOARD_SCHEMA_VERSION};
use anyhow::{bail, Context, Result};

pub struct Json;

impl Exporter for Json {
    fn render(&self, board: &Leaderboard) -> Result<Vec<u8>> {
        let mut out =
            serde_json::to_vec_pretty(board).context("cannot serialise the leaderboard")?;
        out.push(b'\n');
        Ok(out)
    }
}

/// Parses a JSON leaderboard; `source` (a file name) is named in errors.
pub fn parse(text: &str, source: &str) -> Result<Leaderboard> {
    let board: Leaderboard = serde_json::from_str(text)
        .with_context(|| format!("{source}: not a recycle leaderboard JSON"))?;
    if board.schema_version != LEADERBOARD_SCHEMA_VERSION {
        bail!(
            "{source}: leaderboard schema version {} (this recycle reads version {LEADERBOARD_SCHEMA_VERSION})",
            board.schema_version
        );
    }
    Ok(board)
}
