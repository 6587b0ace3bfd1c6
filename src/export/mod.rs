//! Output formats for a leaderboard, each behind one small trait that returns bytes; only the
//! caller (the CLI) writes them out.

use crate::leaderboard::Leaderboard;
use anyhow::Result;

pub mod csv;
pub mod html;
pub mod json;
pub mod markdown;
pub mod svg;

/// Renders a leaderboard in one format.
pub trait Exporter {
    fn render(&self, board: &Leaderboard) -> Result<Vec<u8>>;
}

/// The formats `recycle rank --format` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Csv,
    Json,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "md" | "markdown" => Ok(Format::Markdown),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => anyhow::bail!("--format {other}: expected md, csv or json"),
        }
    }
}

/// The exporter of a format.
pub fn exporter(format: Format) -> Box<dyn Exporter> {
    match format {
        Format::Markdown => Box::new(markdown::Markdown),
        Format::Csv => Box::new(csv::Csv),
        Format::Json => Box::new(json::Json),
    }
}

/// A number in points with two decimals and an explicit sign (`+1.23`, `-0.40`).
pub(crate) fn signed(x: f64) -> String {
    format!("{x:+.2}")
}
