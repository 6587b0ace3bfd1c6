//! `recycle report`: render a leaderboard as one self-contained HTML file.

use crate::export::html::HtmlExporter;
use crate::export::Exporter;
use crate::leaderboard::{Leaderboard, LEADERBOARD_SCHEMA_VERSION};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture whose results to aggregate into the report (e.g. roberta-base).
    #[arg(
        long,
        required_unless_present = "from_json",
        conflicts_with = "from_json"
    )]
    pub arch: Option<String>,
    /// Directory of result files to aggregate (with --arch).
    #[arg(long, requires = "arch")]
    pub results: Option<PathBuf>,
    /// Suite files that give the column order and the expected rows (repeatable, with --arch).
    #[arg(long, requires = "arch")]
    pub suite: Vec<PathBuf>,
    /// A leaderboard JSON file (the serde form of `Leaderboard`, as the JSON exporter writes it) to render instead.
    #[arg(long, value_name = "BOARD.json")]
    pub from_json: Option<PathBuf>,
    /// Where to write the HTML report.
    #[arg(long, value_name = "report.html")]
    pub out: PathBuf,
}

/// Where the report's leaderboard comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A leaderboard already serialised as JSON.
    BoardJson(PathBuf),
    /// Results of one architecture, aggregated on the fly.
    Results {
        arch: String,
        dir: Option<PathBuf>,
        suites: Vec<PathBuf>,
    },
}

/// The command's typed settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub source: Source,
    pub out: PathBuf,
}

impl Args {
    fn settings(self) -> Result<Settings> {
        let source = match (self.from_json, self.arch) {
            (Some(path), None) => Source::BoardJson(path),
            (None, Some(arch)) => Source::Results {
                arch,
                dir: self.results,
                suites: self.suite,
            },
            _ => bail!("give exactly one of --from-json or --arch"),
        };
        Ok(Settings {
            source,
            out: self.out,
        })
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let settings = args.settings()?;
    let board = match &settings.source {
        Source::BoardJson(path) => read_board(path)?,
        Source::Results { arch, dir, suites } => crate::cli::rank::build_board(
            arch,
            &crate::cli::rank::results_dir(dir.clone())?,
            suites,
        )?,
    };
    let html = HtmlExporter
        .render(&board)
        .with_context(|| format!("rendering the `{}` leaderboard as HTML", board.arch))?;
    write_atomically(&settings.out, &html)?;
    println!(
        "wrote {} ({} models × {} targets)",
        settings.out.display(),
        board.rows.len(),
        board.targets.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads a leaderboard JSON file, refusing other schema versions.
pub fn read_board(path: &Path) -> Result<Leaderboard> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading leaderboard {}", path.display()))?;
    let board: Leaderboard = serde_json::from_str(&text)
        .with_context(|| format!("parsing leaderboard {}", path.display()))?;
    ensure!(
        board.schema_version == LEADERBOARD_SCHEMA_VERSION,
        "leaderboard {} has schema_version {}, this recycle reads {}",
        path.display(),
        board.schema_version,
        LEADERBOARD_SCHEMA_VERSION
    );
    Ok(board)
}

/// Writes `bytes` to `path` atomically, so a reader never sees half a report.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic::write_file(path, bytes).with_context(|| format!("--out {}", path.display()))
}
