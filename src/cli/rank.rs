//! `recycle rank --arch ARCH`: build the leaderboard of an architecture from the result files.

use crate::export::{exporter, Format};
use crate::leaderboard::{build, Layout, Leaderboard};
use crate::results::{rfc3339_utc, ResultStore};
use crate::suite::{recycle_home, Suite};
use anyhow::bail;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The architecture label the suites were run under, e.g. `roberta-base`.
    #[arg(long)]
    pub arch: String,
    /// Results directory [default: $RECYCLE_HOME/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Suite files that give the column order and the expected rows (repeatable); without them
    /// targets and models are listed in name order and never-run models do not appear.
    #[arg(long)]
    pub suite: Vec<PathBuf>,
    /// md, csv or json.
    #[arg(long, default_value = "md")]
    pub format: Format,
    /// Write here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let board = build_board(&args.arch, &results_dir(args.results)?, &args.suite)?;
    let bytes = exporter(args.format).render(&board)?;
    match args.out {
        Some(path) => std::fs::write(&path, &bytes)
            .with_context(|| format!("--out {}: cannot write", path.display()))?,
        None => std::io::stdout()
            .write_all(&bytes)
            .context("cannot write to stdout")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `--results`, else `$RECYCLE_HOME/results`.
pub fn results_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match flag {
        Some(d) => d,
        None => recycle_home()?.join("results"),
    };
    if dir.exists() && !dir.is_dir() {
        bail!("--results {}: not a directory", dir.display());
    }
    Ok(dir)
}

/// The board of `arch` from every record under `dir`, laid out by `suites` when given.
pub fn build_board(arch: &str, dir: &Path, suites: &[PathBuf]) -> Result<Leaderboard> {
    if !dir.is_dir() {
        bail!(
            "{}: no results directory there (pass --results, or `recycle run` a suite first)",
            dir.display()
        );
    }
    let records = ResultStore::new(dir).load_all()?;
    if !records.iter().any(|r| r.arch == arch) {
        bail!(
            "--arch {arch}: no results for this arch under {}",
            dir.display()
        );
    }
    let layout = if suites.is_empty() {
        Layout::from_records(arch, &records)?
    } else {
        let loaded: Vec<Suite> = suites
            .iter()
            .map(|f| Suite::load(f, None))
            .collect::<Result<_>>()?;
        let mut layout = Layout::from_suites(arch, &loaded)?;
        layout.add_fused(arch, &loaded, &records);
        layout
    };
    Ok(build(
        arch,
        &layout,
        &records,
        &rfc3339_utc(std::time::SystemTime::now()),
    ))
}
