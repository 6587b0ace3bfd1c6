//! `recycle analyze`: decompose gains into model and target effects, and measure how well cheap
//! proxies would have selected candidates. Flags become an [`AnalysisConfig`]; the report itself is
//! `select::analyze::report_with`. Building the gain table from the result store is still to wire.

use crate::select::analyze::AnalysisConfig;
use crate::select::decompose::{DecomposeConfig, Interaction};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory of result files (one JSON file per job).
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
    /// Architecture whose results are analysed, e.g. roberta-base.
    #[arg(long)]
    pub arch: String,
    /// A proxy to evaluate, as NAME=FILE: a JSON object from model id to score (higher = better).
    /// Repeat for several proxies.
    #[arg(long = "proxy", value_name = "NAME=FILE", value_parser = parse_proxy)]
    pub proxies: Vec<(String, PathBuf)>,
    /// Sizes k of the top-k selection regret, comma-separated.
    #[arg(long = "k", value_delimiter = ',', default_value = "1,3")]
    pub ks: Vec<usize>,
    /// The decomposition: additive (model + target) or with a rank-one interaction.
    #[arg(long, value_enum, default_value_t = InteractionArg::Additive)]
    pub interaction: InteractionArg,
    /// Bootstrap replicates for standard errors and prediction intervals (0: none).
    #[arg(long, default_value_t = 200)]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Markdown)]
    pub format: FormatArg,
    /// Write the report here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum InteractionArg {
    Additive,
    RankOne,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatArg {
    Markdown,
    Json,
}

impl Args {
    /// The typed settings of the analysis.
    pub fn analysis_config(&self) -> Result<AnalysisConfig> {
        if let Some(k) = self.ks.iter().find(|&&k| k == 0) {
            bail!("--k: top-k sizes must be ≥ 1, got {k}");
        }
        Ok(AnalysisConfig {
            decompose: DecomposeConfig {
                interaction: match self.interaction {
                    InteractionArg::Additive => Interaction::Additive,
                    InteractionArg::RankOne => Interaction::RankOne,
                },
                bootstrap: self.bootstrap,
                seed: self.seed,
                ..DecomposeConfig::default()
            },
            ks: self.ks.clone(),
        })
    }
}

fn parse_proxy(s: &str) -> Result<(String, PathBuf)> {
    let (name, file) = s
        .split_once('=')
        .with_context(|| format!("--proxy {s}: expected NAME=FILE"))?;
    if name.is_empty() || file.is_empty() {
        bail!("--proxy {s}: expected NAME=FILE with both parts non-empty");
    }
    Ok((name.to_string(), PathBuf::from(file)))
}

pub fn run(args: Args) -> Result<ExitCode> {
    args.analysis_config()?;
    bail!("`recycle analyze` is not wired to the result store yet (the analysis itself is select::analyze)")
}
