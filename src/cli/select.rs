//! `recycle select`: probe every candidate on the target (cheap, cached), rank them by the proxy,
//! and fine-tune only the top K plus the baseline's seeds, through the same runner and executor as
//! `recycle run`. The results land in the store as suite `select-<target>`, so `recycle rank` sees
//! them. The ranking is `select::choose`; the probes `select::probing`.

use super::probe::{probe_record, resolve_flag_model, LayersArg, PoolingArg};
use crate::data::Dataset;
use crate::device::DeviceRequest;
use crate::leaderboard::{build, Cell, Layout, Leaderboard};
use crate::progress::Progress;
use crate::results::{rfc3339_utc, ResultStore};
use crate::runner::{self, JobExecutor, RunSettings, RunSummary};
use crate::select::choose::{plain_name, rank, ProxyKind, Ranked, SelectionSuite, SuiteModel};
use crate::select::features::FeatureCache;
use crate::select::probing::{probe_model, ProbeSettings};
use crate::suite::{recycle_home, Suite};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The target dataset directory.
    #[arg(long)]
    pub target: PathBuf,
    /// Candidate checkpoints: directories or hub ids.
    #[arg(long, num_args = 1.., required = true)]
    pub candidates: Vec<String>,
    /// The vanilla pretrained model gains are measured against (directory or hub id).
    #[arg(long)]
    pub baseline: String,
    /// How many candidates to fine-tune.
    #[arg(long)]
    pub budget: usize,
    /// The proxy that ranks the candidates.
    #[arg(long, value_enum, default_value_t = ProxyArg::Lp)]
    pub proxy: ProxyArg,
    /// Leaderboard architecture of the results [default: the baseline's plain name].
    #[arg(long)]
    pub arch: Option<String>,
    /// Seeds of the baseline (its spread is the noise yardstick; at least 3).
    #[arg(long, default_value_t = 3)]
    pub baseline_seeds: u32,
    /// Fine-tuning: at most this many training examples.
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Fine-tuning: at most this many evaluation examples.
    #[arg(long)]
    pub max_eval: Option<usize>,
    /// Fine-tuning: at most this many epochs.
    #[arg(long)]
    pub max_epochs: Option<usize>,
    /// Fine-tuning: examples per optimiser step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Fine-tuning: peak learning rate (e.g. the suite's, to compare with its exhaustive run).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Fine-tuning: tokens per example.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Fine-tuning: early-stopping patience in epochs (0 disables early stopping).
    #[arg(long)]
    pub patience: Option<usize>,
    /// Probe: pooling of the hidden states.
    #[arg(long, value_enum, default_value_t = PoolingArg::Mean)]
    pub pooling: PoolingArg,
    /// Probe: which hidden states.
    #[arg(long, value_enum, default_value_t = LayersArg::Last)]
    pub layers: LayersArg,
    /// Probe: at most this many training examples.
    #[arg(long)]
    pub probe_max_train: Option<usize>,
    /// Probe: at most this many evaluation examples.
    #[arg(long)]
    pub probe_max_eval: Option<usize>,
    /// Results directory [default: $RECYCLE_HOME/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Feature cache [default: $RECYCLE_HOME/features].
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyArg {
    Lp,
    Logme,
    Hscore,
}

impl ProxyArg {
    pub fn kind(self) -> ProxyKind {
        match self {
            Self::Lp => ProxyKind::Lp,
            Self::Logme => ProxyKind::Logme,
            Self::Hscore => ProxyKind::Hscore,
        }
    }
}

/// What the fine-tuning half of a selection did.
#[derive(Debug, Clone)]
pub struct SelectOutcome {
    pub summary: RunSummary,
    /// The selection suite's board (one target).
    pub board: Leaderboard,
}

/// Fine-tunes the selection suite (the selected candidates and the baseline's seeds; jobs already
/// in the store with the same config hash are skipped) and builds its board.
pub fn fine_tune_selected(
    suite: &Suite,
    store: &ResultStore,
    executor: &dyn JobExecutor,
    progress: &mut dyn Progress,
) -> Result<SelectOutcome> {
    let settings = RunSettings {
        donor_dir: recycle_home()?.join("donors"),
        selection: crate::plan::Selection::All,
    };
    let summary = runner::run(suite, store, executor, &settings, progress)?;
    let records = store.load_suite(&suite.name)?;
    let layout = Layout::from_suites(&suite.arch, std::slice::from_ref(suite))?;
    let board = build(
        &suite.arch,
        &layout,
        &records,
        &rfc3339_utc(std::time::SystemTime::now()),
    );
    Ok(SelectOutcome { summary, board })
}

/// A directory as an absolute path (suites resolve relative paths against nothing).
fn absolute(p: &Path) -> Result<String> {
    let abs =
        std::fs::canonicalize(p).with_context(|| format!("{}: cannot resolve", p.display()))?;
    Ok(abs.display().to_string())
}

fn suite_model(spec: &str) -> Result<SuiteModel> {
    let p = Path::new(spec);
    Ok(if p.is_dir() {
        SuiteModel {
            name: plain_name(spec),
            ..SuiteModel::from_spec(&absolute(p)?, true)
        }
    } else {
        SuiteModel::from_spec(spec, false)
    })
}

pub fn run(args: Args) -> Result<ExitCode> {
    let store = ResultStore::new(super::rank::results_dir(args.results.clone())?);
    let cache = match &args.features {
        Some(d) => FeatureCache::new(d),
        None => FeatureCache::from_home()?,
    };
    let dataset = Dataset::load(&args.target)
        .with_context(|| format!("--target {}", args.target.display()))?;
    let target = plain_name(&dataset.card.name);
    let suite_name = format!("select-{target}");
    let arch = args
        .arch
        .clone()
        .unwrap_or_else(|| plain_name(&args.baseline));
    let baseline = suite_model(&args.baseline).context("--baseline")?;
    let candidates: Vec<SuiteModel> = args
        .candidates
        .iter()
        .map(|c| suite_model(c).with_context(|| format!("--candidates {c}")))
        .collect::<Result<_>>()?;
    // The generated suite would reject these, naming its own file: name the flags instead.
    if args.baseline_seeds < crate::suite::MIN_BASELINE_SEEDS {
        bail!(
            "--baseline-seeds {}: the baseline needs at least {} (its spread is the noise yardstick)",
            args.baseline_seeds,
            crate::suite::MIN_BASELINE_SEEDS
        );
    }
    let mut seen: Vec<(&str, &str)> = vec![(baseline.name.as_str(), args.baseline.as_str())];
    for (spec, c) in args.candidates.iter().zip(&candidates) {
        if let Some((_, other)) = seen.iter().find(|(n, _)| *n == c.name) {
            bail!(
                "--candidates {spec}: its model name `{}` is already taken by {other}; give \
                 each candidate its own checkpoint",
                c.name
            );
        }
        seen.push((c.name.as_str(), spec.as_str()));
    }
    let device = args.device.open()?;
    let proxy = args.proxy.kind();
    let settings = ProbeSettings {
        pooling: super::probe::pooling(args.pooling),
        layers: super::probe::layers(args.layers),
        max_train: args.probe_max_train,
        max_eval: args.probe_max_eval,
        ..ProbeSettings::default()
    };

    // 1. Probe every candidate on the target.
    let mut scores = Vec::new();
    let mut probe_failures = 0usize;
    for (spec, cand) in args.candidates.iter().zip(&candidates) {
        let start = Instant::now();
        let result = resolve_flag_model(spec).and_then(|mut t| {
            t.name = cand.name.clone();
            let run = probe_model(&t.dir, &dataset, None, &settings, &cache, &device)?;
            for w in &run.warnings {
                eprintln!("warning: model {}: {w}", t.name);
            }
            let record = probe_record(
                &suite_name,
                &arch,
                &t,
                &dataset,
                &args.target,
                &settings,
                &run,
                start.elapsed().as_secs_f64(),
                &crate::device::describe(&device),
            )?;
            store.write(&record)?;
            Ok(proxy.score(&run.scores))
        });
        match result {
            Ok(s) => scores.push((cand.name.clone(), s)),
            Err(e) => {
                eprintln!("Error: candidate {spec}: probe failed: {e:#}");
                probe_failures += 1;
                scores.push((cand.name.clone(), None));
            }
        }
    }
    let ranked = rank(&scores, args.budget)?;
    if !ranked.iter().any(|r| r.selected) {
        bail!("no candidate could be probed on {}", args.target.display());
    }

    // 2. Fine-tune the top K and the baseline.
    let mut protocol = serde_json::Map::new();
    if let Some(e) = args.max_epochs {
        protocol.insert("max_epochs".into(), e.into());
    }
    if let Some(b) = args.batch_size {
        protocol.insert("batch_size".into(), b.into());
        protocol.insert("micro_batch_size".into(), b.min(32).into());
    }
    if let Some(lr) = args.learning_rate {
        protocol.insert("learning_rate".into(), lr.into());
    }
    if let Some(l) = args.max_length {
        protocol.insert("max_length".into(), l.into());
    }
    if let Some(p) = args.patience {
        protocol.insert("patience".into(), p.into());
    }
    let spec = SelectionSuite {
        name: suite_name.clone(),
        arch: arch.clone(),
        baseline,
        candidates: candidates
            .into_iter()
            .filter(|c| ranked.iter().any(|r| r.selected && r.model == c.name))
            .collect(),
        target: target.clone(),
        dataset: absolute(&args.target)?,
        baseline_seeds: args.baseline_seeds,
        max_train: args.max_train,
        max_eval: args.max_eval,
        protocol: protocol.into(),
    };
    let home = recycle_home()?;
    let suite_file = home.join("selections").join(format!("{suite_name}.json"));
    let text = serde_json::to_string_pretty(&spec.to_json())?;
    let suite = Suite::parse(&text, &suite_file, None, &home)?;
    if let Some(dir) = suite_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&suite_file, text + "\n")
        .with_context(|| format!("cannot write {}", suite_file.display()))?;
    suite.check_datasets(&crate::executor::check_dataset_use)?;
    let executor =
        crate::executor::FinetuneExecutor::new(device, crate::hub::HubOptions::from_env());
    let mut progress = crate::progress::for_stderr();
    let outcome = fine_tune_selected(&suite, &store, &executor, progress.as_mut())?;
    print!("{}", render(proxy, &ranked, &outcome, &suite_file));
    for (id, err) in &outcome.summary.failed {
        eprintln!("failed: {id}: {err}");
    }
    if probe_failures > 0 {
        eprintln!("{probe_failures} candidate(s) could not be probed and were left out (above)");
    }
    // Exit 1 when anything asked for was left out: a failed fine-tune or an unprobed candidate.
    Ok(
        if outcome.summary.failed.is_empty() && probe_failures == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

/// The chosen model (best gain among the fine-tuned), the fine-tuned gains and the proxy ranking.
pub fn render(
    proxy: ProxyKind,
    ranked: &[Ranked],
    outcome: &SelectOutcome,
    suite: &Path,
) -> String {
    let mut s = String::new();
    let board = &outcome.board;
    let base = board.baseline.cells.first();
    match board.rows.first().filter(|r| r.avg_gain.is_some()) {
        Some(best) => {
            let _ = writeln!(
                s,
                "chosen: {} (gain {:+.2} points over {} on {})\n",
                best.model.id,
                best.avg_gain.unwrap_or(0.0),
                board.baseline.model.id,
                board.targets.first().map_or("", |t| t.name.as_str())
            );
        }
        None => {
            let _ = writeln!(s, "chosen: none (no selected candidate finished)\n");
        }
    }
    let _ = writeln!(
        s,
        "| fine-tuned | score | gain | seeds |\n|---|---:|---:|---:|"
    );
    if let Some(b) = base {
        let _ = writeln!(
            s,
            "| {} (baseline) | {} | — | {} |",
            board.baseline.model.id,
            b.mean.map_or("—".into(), |m| format!("{m:.2}")),
            b.scores.len()
        );
    }
    for r in &board.rows {
        let line = match r.cells.first() {
            Some(Cell::Done {
                score, gain, seeds, ..
            }) => format!("| {} | {score:.2} | {gain:+.2} | {seeds} |", r.model.id),
            Some(Cell::Failed { error }) => format!("| {} | failed: {error} | | |", r.model.id),
            _ => format!("| {} | — | — | 0 |", r.model.id),
        };
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(
        s,
        "\n| rank | candidate | {} | fine-tuned |\n|---:|---|---:|---|",
        proxy.as_str()
    );
    for (i, r) in ranked.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            i + 1,
            r.model,
            r.score.map_or("—".into(), |v| format!("{v:.4}")),
            if r.selected { "yes" } else { "no" }
        );
    }
    let _ = writeln!(s, "\nsuite: {}", suite.display());
    s
}
