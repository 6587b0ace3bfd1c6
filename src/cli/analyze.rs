//! `recycle analyze`: decompose gains into model and target effects, and measure how well cheap
//! proxies would have selected candidates. Flags become an [`AnalysisConfig`]; the gain table and
//! the probe proxies come from the leaderboard of the result store (`select::analyze::from_leaderboard`),
//! the report itself is `select::analyze::report_with`.

use crate::select::analyze::{from_leaderboard, report_with, to_markdown, AnalysisConfig, Holdout};
use crate::select::decompose::{DecomposeConfig, Interaction};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory of result files [default: $RECYCLE_HOME/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Architecture whose results are analysed, e.g. roberta-base; may be left out when the results
    /// hold a single architecture.
    #[arg(long)]
    pub arch: Option<String>,
    /// Suite files that give the column order and the expected rows (repeatable), as for `rank`.
    #[arg(long)]
    pub suite: Vec<PathBuf>,
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
    /// Check the predictions on evaluated cells: `leave-one-out` hides each in turn, refits and
    /// reports the error and the intervals' coverage.
    #[arg(long, value_enum, default_value_t = HoldoutArg::None)]
    pub holdout: HoldoutArg,
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
pub enum HoldoutArg {
    None,
    LeaveOneOut,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatArg {
    #[value(alias = "md")]
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
            holdout: match self.holdout {
                HoldoutArg::None => Holdout::Off,
                HoldoutArg::LeaveOneOut => Holdout::LeaveOneOut,
            },
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
    let config = args.analysis_config()?;
    let dir = super::rank::results_dir(args.results.clone())?;
    let arch = match &args.arch {
        Some(a) => a.clone(),
        None => only_arch(&dir)?,
    };
    let board = super::rank::build_board(&arch, &dir, &args.suite)?;
    let (table, mut proxies) = from_leaderboard(&board)?;
    for (name, file) in &args.proxies {
        if proxies.contains_key(name) {
            bail!(
                "--proxy {name}={}: the results already have a proxy named {name}",
                file.display()
            );
        }
        proxies.insert(name.clone(), read_proxy_file(file)?);
    }
    let report = report_with(&table, &proxies, &config)
        .with_context(|| format!("--arch {arch}: results under {}", dir.display()))?;
    // The Markdown on stdout says what was not computed; elsewhere stderr says it too.
    if args.format == FormatArg::Json || args.out.is_some() {
        for note in &report.decomposition.notes {
            eprintln!("warning: --arch {arch}: not computed: {note}");
        }
    }
    let bytes = match args.format {
        FormatArg::Markdown => to_markdown(&report).into_bytes(),
        FormatArg::Json => {
            let mut b =
                serde_json::to_vec_pretty(&report).context("cannot serialise the report")?;
            b.push(b'\n');
            b
        }
    };
    match &args.out {
        Some(path) => std::fs::write(path, &bytes)
            .with_context(|| format!("--out {}: cannot write", path.display()))?,
        None => std::io::stdout()
            .write_all(&bytes)
            .context("cannot write to stdout")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The single architecture of the evaluation records under `dir`; an error listing them otherwise.
fn only_arch(dir: &Path) -> Result<String> {
    let records = crate::results::ResultStore::new(dir).load_all()?;
    let archs: std::collections::BTreeSet<&str> = records
        .iter()
        .filter(|r| r.role.is_some())
        .map(|r| r.arch.as_str())
        .collect();
    match archs.len() {
        1 => Ok(archs.into_iter().next().unwrap_or_default().to_string()),
        0 => bail!("no evaluation results under {}", dir.display()),
        _ => bail!(
            "--arch: the results under {} hold several architectures ({}); name one",
            dir.display(),
            archs.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A `--proxy` file: a JSON object from model id to score.
fn read_proxy_file(file: &Path) -> Result<BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--proxy {}: cannot read", file.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--proxy {}: not a JSON object from model id to score",
            file.display()
        )
    })
}
