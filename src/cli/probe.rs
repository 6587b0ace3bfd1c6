//! `recycle probe`: frozen-feature scores (linear probe, LogME, H-score) of models on one dataset,
//! each written to the result store as a `probe` record; with `--name` the leaderboard shows them as
//! a proxy column (e.g. `mnli_lp`). The probing itself is `select::probing::probe_model`.

use crate::data::Dataset;
use crate::device::DeviceRequest;
use crate::leaderboard::Metric;
use crate::results::{
    git_revision, rfc3339_utc, DatasetRecord, FeatureLayers, FeaturePooling, ModelRecord,
    RecordKind, ResultRecord, ResultStore, RECYCLE_VERSION, RESULT_SCHEMA_VERSION,
};
use crate::select::features::FeatureCache;
use crate::select::probing::{probe_model, ProbeRun, ProbeSettings};
use crate::suite::{ModelRef, Protocol, Suite};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Models to probe: checkpoint directories or hub ids (`org/name[@revision]`).
    #[arg(long, num_args = 1.., required_unless_present = "suite")]
    pub model: Vec<String>,
    /// Probe the baseline and every candidate of this suite instead (records go under its name).
    #[arg(long, conflicts_with = "model")]
    pub suite: Option<PathBuf>,
    /// The dataset directory to probe on (train split, scored on validation, else test).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Name of the proxy column these scores fill on the leaderboard, e.g. `mnli_lp`.
    #[arg(long)]
    pub name: Option<String>,
    /// Leaderboard architecture the records belong to (taken from the suite with --suite).
    #[arg(long, required_unless_present = "suite")]
    pub arch: Option<String>,
    #[arg(long, value_enum, default_value_t = PoolingArg::Mean)]
    pub pooling: PoolingArg,
    #[arg(long, value_enum, default_value_t = LayersArg::Last)]
    pub layers: LayersArg,
    /// At most this many training examples (a seeded subsample).
    #[arg(long)]
    pub max_train: Option<usize>,
    /// At most this many evaluation examples (a seeded subsample).
    #[arg(long)]
    pub max_eval: Option<usize>,
    /// Tokens per example.
    #[arg(long, default_value_t = ProbeSettings::default().max_length,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    pub max_length: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = ProbeSettings::default().batch_size,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_size: usize,
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
pub enum PoolingArg {
    Cls,
    Mean,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayersArg {
    Last,
    AllMean,
}

impl Args {
    pub fn settings(&self) -> ProbeSettings {
        ProbeSettings {
            pooling: pooling(self.pooling),
            layers: layers(self.layers),
            max_length: self.max_length,
            batch_size: self.batch_size,
            max_train: self.max_train,
            max_eval: self.max_eval,
            ..ProbeSettings::default()
        }
    }
}

/// A model to probe: its name on the board, its id, and where its checkpoint lies.
pub(crate) struct Target {
    pub name: String,
    pub id: String,
    pub revision: Option<String>,
    pub dir: PathBuf,
}

pub(crate) fn pooling(p: PoolingArg) -> FeaturePooling {
    match p {
        PoolingArg::Cls => FeaturePooling::Cls,
        PoolingArg::Mean => FeaturePooling::Mean,
    }
}

pub(crate) fn layers(l: LayersArg) -> FeatureLayers {
    match l {
        LayersArg::Last => FeatureLayers::Last,
        LayersArg::AllMean => FeatureLayers::AllMean,
    }
}

fn resolve_hub(id: &str, revision: Option<&str>) -> Result<(PathBuf, String)> {
    let spec = match revision {
        Some(r) => format!("{id}@{r}"),
        None => id.to_string(),
    };
    let m = crate::hub::resolve_model(
        &crate::hub::ModelRef::parse(&spec)?,
        &crate::hub::HubOptions::from_env(),
    )?;
    Ok((m.dir, m.commit))
}

/// `--model M`: a checkpoint directory, else a hub id resolved through the hub cache.
pub(crate) fn resolve_flag_model(m: &str) -> Result<Target> {
    let path = Path::new(m);
    if path.is_dir() {
        return Ok(Target {
            name: m.to_string(),
            id: m.to_string(),
            revision: None,
            dir: path.to_path_buf(),
        });
    }
    let (dir, commit) = resolve_hub(m, None).with_context(|| {
        format!("--model {m}: no such local directory, so it was taken for a hub id")
    })?;
    Ok(Target {
        name: m.to_string(),
        id: m.to_string(),
        revision: Some(commit),
        dir,
    })
}

/// The suite's models to probe: the baseline, the candidates, the donors that have been trained, and
/// the fused bases of the `fusion` rounds that `recycle fuse` has completed (`fusion-<suite>-iter<k>`).
fn from_suite(suite: &Suite, store: &ResultStore) -> Result<Vec<Target>> {
    // One read of the suite's records serves both the donors and the fused bases.
    let records = store.load_suite(&suite.name)?;
    let mut targets = suite_models(suite, &records)?;
    targets.extend(fused_bases(suite, &records));
    Ok(targets)
}

/// Fused bases whose merge record is in the store without an error and whose checkpoint exists.
fn fused_bases(suite: &Suite, records: &[ResultRecord]) -> Vec<Target> {
    let Some(fusion) = &suite.fusion else {
        return Vec::new();
    };
    (1..=fusion.iterations)
        .filter_map(|k| {
            let job = format!("fuse/iter{k}/merge");
            let merged = records
                .iter()
                .rev()
                .find(|r| r.job_id == job)
                .is_some_and(|r| r.error.is_none());
            let model = crate::fuse::iteration_model(fusion, k);
            let ModelRef::Path { resolved, .. } = &model.source else {
                return None;
            };
            (merged && resolved.join("config.json").is_file()).then(|| Target {
                name: model.name.clone(),
                id: model.source.display_id(),
                revision: None,
                dir: resolved.clone(),
            })
        })
        .collect()
}

fn suite_models(suite: &Suite, donors: &[ResultRecord]) -> Result<Vec<Target>> {
    suite
        .evaluated_models()
        .into_iter()
        .map(|m| {
            let ctx = || format!("suite {}: model {}", suite.file.display(), m.name);
            let (dir, revision) = match &m.source {
                ModelRef::Path { resolved, .. } => (resolved.clone(), None),
                ModelRef::Hub { id, revision } => {
                    let (d, c) = resolve_hub(id, revision.as_deref()).with_context(ctx)?;
                    (d, Some(c))
                }
                ModelRef::Donor { name } => {
                    let job = format!("donor/{name}");
                    let ckpt = donors
                        .iter()
                        .rev()
                        .find(|r| r.kind == RecordKind::Donor && r.job_id == job)
                        .and_then(|r| r.checkpoint.clone())
                        .with_context(|| {
                            format!(
                                "{}: donor {name} has not been trained yet (run the suite first)",
                                ctx()
                            )
                        });
                    match ckpt {
                        Ok(c) => (PathBuf::from(c), None),
                        Err(e) => {
                            eprintln!("warning: {e:#}; skipped");
                            return Ok(None);
                        }
                    }
                }
            };
            Ok(Some(Target {
                name: m.name.clone(),
                id: m.source.display_id(),
                revision,
                dir,
            }))
        })
        .filter_map(Result::transpose)
        .collect()
}

pub fn run(args: Args) -> Result<ExitCode> {
    let store = ResultStore::new(super::rank::results_dir(args.results.clone())?);
    let cache = match &args.features {
        Some(d) => FeatureCache::new(d),
        None => FeatureCache::from_home()?,
    };
    let (suite_name, arch, targets) = match &args.suite {
        Some(file) => {
            let suite = Suite::load(file, None)?;
            let targets = from_suite(&suite, &store)?;
            (suite.name.clone(), suite.arch.clone(), targets)
        }
        None => {
            let Some(arch) = args.arch.clone() else {
                bail!("--arch is required with --model");
            };
            let targets = args
                .model
                .iter()
                .map(|m| resolve_flag_model(m))
                .collect::<Result<_>>()?;
            ("probe".to_string(), arch, targets)
        }
    };
    let dataset = Dataset::load(&args.dataset)
        .with_context(|| format!("--dataset {}", args.dataset.display()))?;
    let device = args.device.open()?;
    let settings = args.settings();
    let mut failed = 0;
    println!("| model | LP accuracy | LogME | H-score | features |\n|---|---:|---:|---:|---|");
    for t in &targets {
        let start = Instant::now();
        let run = probe_model(
            &t.dir,
            &dataset,
            args.name.clone(),
            &settings,
            &cache,
            &device,
        )
        .with_context(|| format!("model {} on dataset {}", t.name, args.dataset.display()));
        let run = match run {
            Ok(r) => r,
            Err(e) => {
                eprintln!("Error: {e:#}");
                failed += 1;
                continue;
            }
        };
        for w in &run.warnings {
            eprintln!("warning: model {}: {w}", t.name);
        }
        let record = probe_record(
            &suite_name,
            &arch,
            t,
            &dataset,
            &args.dataset,
            &settings,
            &run,
            start.elapsed().as_secs_f64(),
            &crate::device::describe(&device),
        )?;
        store.write(&record)?;
        let s = &run.scores;
        let fmt = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.4}"));
        println!(
            "| {} | {} | {} | {} | {} |",
            t.name,
            fmt(s.lp_accuracy),
            fmt(s.logme),
            fmt(s.hscore),
            if s.cached { "cached" } else { "computed" }
        );
    }
    if failed > 0 {
        eprintln!("{failed} of {} probes failed", targets.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The `probe` record of one run: scores in `probe`, the LP accuracy also as `test_score`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn probe_record(
    suite: &str,
    arch: &str,
    t: &Target,
    dataset: &Dataset,
    dataset_path: &Path,
    settings: &ProbeSettings,
    run: &ProbeRun,
    wall: f64,
    device: &str,
) -> Result<ResultRecord> {
    let protocol = Protocol {
        max_length: settings.max_length,
        ..Protocol::default()
    };
    // Keyed by the proxy's name where it has one, so probes under different `--name`s (or of
    // different datasets given different names) keep their own records.
    let key = run.scores.name.as_deref().unwrap_or(&dataset.card.name);
    let job_id = format!(
        "probe/{}/{}/{}-{}",
        key.replace(['/', '\\'], "--"),
        t.name.replace(['/', '\\'], "--"),
        settings.pooling.as_str(),
        settings.layers.as_str()
    );
    Ok(ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        kind: RecordKind::Probe,
        recycle_version: RECYCLE_VERSION.to_string(),
        git_revision: git_revision().map(str::to_string),
        job_id,
        config_hash: run.feature_key.clone(),
        suite: suite.to_string(),
        arch: arch.to_string(),
        role: None,
        model: ModelRecord {
            name: t.name.clone(),
            id: t.id.clone(),
            revision: t.revision.clone(),
            weights_sha256: Some(run.weights_sha256.clone()),
        },
        dataset: DatasetRecord {
            id: dataset_path.display().to_string(),
            revision: None,
            fingerprint: Some(run.dataset_fingerprint.clone()),
        },
        target: Some(dataset.card.name.clone()),
        protocol_hash: crate::plan::protocol_hash(&protocol)?,
        protocol,
        seed: 0,
        metric: run.scores.lp_accuracy.map(|_| Metric::Accuracy),
        dev_score: None,
        test_score: run.scores.lp_accuracy,
        n_train: Some(run.n_train),
        n_dev: None,
        n_test: Some(run.n_eval),
        steps: None,
        epochs: None,
        wall_time_s: wall,
        device: Some(device.to_string()),
        finished_at: rfc3339_utc(SystemTime::now()),
        checkpoint: None,
        error: None,
        probe: Some(run.scores.clone()),
    })
}
