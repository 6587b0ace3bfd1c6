//! `recycle check --reference RANKING.json`: the CI gate. Exit 0: pass, 1: regression, 2: bad input.

use super::rank::{build_board, results_dir};
use crate::check::{compare, CheckSettings};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The reference leaderboard (`recycle rank --format json`).
    #[arg(long)]
    pub reference: PathBuf,
    /// Results directory [default: $RECYCLE_HOME/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Suite files, as for `recycle rank` (repeatable).
    #[arg(long)]
    pub suite: Vec<PathBuf>,
    /// Allowed change of a model's average gain, in points [default: 2 × the standard error of the
    /// change, from the baseline's seed spread].
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// The top-k set that must not change.
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    /// Minimum Kendall tau-b between the two rankings.
    #[arg(long, default_value_t = 0.7)]
    pub min_tau: f64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.tolerance.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
        bail!("--tolerance: must be a number ≥ 0");
    }
    if !(-1.0..=1.0).contains(&args.min_tau) {
        bail!("--min-tau {}: must be in [-1, 1]", args.min_tau);
    }
    let name = args.reference.display().to_string();
    let text = std::fs::read_to_string(&args.reference)
        .with_context(|| format!("--reference {name}: cannot read"))?;
    let reference = crate::export::json::parse(&text, &name)?;
    let current = build_board(&reference.arch, &results_dir(args.results)?, &args.suite)?;
    let settings = CheckSettings {
        tolerance: args.tolerance,
        top_k: args.top_k,
        min_tau: args.min_tau,
    };
    let report = compare(&reference, &current, &settings);
    print!("{}", report.render());
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
