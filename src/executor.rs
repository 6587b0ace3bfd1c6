//! The real `JobExecutor` behind `recycle run`: resolves a job's model and dataset, fine-tunes with
//! the job's protocol and seed, and scores the selected checkpoint on the target's test split (an
//! evaluation job) or saves it as a hub-format checkpoint (a donor job).

use crate::data::{Dataset, Example, Task};
use crate::hub::materialize::{open_hub_dataset, HubDatasetSpec};
use crate::hub::HubOptions;
use crate::leaderboard::Metric;
use crate::plan::{Job, JobSpec};
use crate::progress::StepInfo;
use crate::runner::{JobExecutor, JobOutput};
use crate::suite::{DatasetRef, ModelRef, Protocol};
use crate::tokenize::TextTokenizer;
use crate::train::checkpoint::{load_trainable, Head, TrainableModel};
use crate::train::optim::decays;
use crate::train::session::labeled_set;
use crate::train::{
    evaluate, finetune, Batching, EvalEvery, Outcome, StepReport, TrainConfig, Trainee,
};
use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The split names every recycle dataset has: fine-tune on train, early-stop on dev, report test.
pub const TRAIN: &str = "train";
pub const DEV: &str = "validation";
pub const TEST: &str = "test";

/// Seed of the subsample drawn when a suite caps a split: fixed, so every model and every seed of
/// a target sees the same examples (only the fine-tuning seed varies between seeds).
const CAP_SEED: u64 = 0x5eed_ca95;

/// Fine-tunes on one device.
pub struct FinetuneExecutor {
    device: Device,
    hub: HubOptions,
    /// The recycle home, where hub datasets are materialised (`None`: it could not be found).
    home: Option<PathBuf>,
    /// Evaluation batch size (no graph, so it can be larger than the training micro-batch).
    eval_batch_size: usize,
}

impl FinetuneExecutor {
    pub fn new(device: Device, hub: HubOptions) -> Self {
        Self {
            device,
            hub,
            home: crate::assets::home(None).ok(),
            eval_batch_size: 64,
        }
    }

    /// Materialise hub datasets under `home` instead of the environment's recycle home.
    pub fn with_home(mut self, home: PathBuf) -> Self {
        self.home = Some(home);
        self
    }

    fn open(&self, r: &DatasetRef) -> Result<OpenedDataset> {
        let home = self.home.as_deref().with_context(|| {
            format!(
                "dataset {}: cannot find the recycle home (set RECYCLE_HOME)",
                r.display_id()
            )
        })?;
        open_dataset(r, &self.hub, home)
    }
}

/// A model resolved to a local checkpoint directory.
struct ResolvedModel {
    dir: PathBuf,
    /// A hub commit, or `None` for a local directory.
    revision: Option<String>,
}

impl FinetuneExecutor {
    fn resolve_model(
        &self,
        model: &ModelRef,
        donor_checkpoint: Option<&Path>,
    ) -> Result<ResolvedModel> {
        match model {
            ModelRef::Path { raw, resolved } => {
                ensure!(
                    resolved.join("config.json").is_file(),
                    "model {raw}: {} has no config.json",
                    resolved.display()
                );
                Ok(ResolvedModel {
                    dir: resolved.clone(),
                    revision: None,
                })
            }
            ModelRef::Hub { id, revision } => {
                let r = crate::hub::ModelRef {
                    repo: id.clone(),
                    revision: revision.clone(),
                };
                let got = crate::hub::resolve_model(&r, &self.hub)
                    .with_context(|| format!("model {}", model.display_id()))?;
                Ok(ResolvedModel {
                    dir: got.dir,
                    revision: Some(got.commit),
                })
            }
            ModelRef::Donor { name } => {
                let dir = donor_checkpoint.with_context(|| {
                    format!(
                        "donor:{name}: its checkpoint is not known (run job donor/{name} first)"
                    )
                })?;
                Ok(ResolvedModel {
                    dir: dir.to_path_buf(),
                    revision: None,
                })
            }
        }
    }

    /// Fine-tunes `model` on `dataset`'s train split (early stopping on dev) and returns the
    /// trained model, its tokenizer and what happened.
    #[allow(clippy::too_many_arguments)]
    fn train(
        &self,
        model: &ResolvedModel,
        dataset: &Dataset,
        protocol: &Protocol,
        seed: u32,
        max_train: Option<usize>,
        max_eval: Option<usize>,
        on_step: &mut dyn FnMut(&StepInfo),
    ) -> Result<Trained> {
        let task = dataset.task().clone();
        let cfg = train_config(protocol, seed)?;
        let tokenizer = TextTokenizer::for_checkpoint(&model.dir, cfg.max_length)?;
        let train_rows = capped(dataset.split(TRAIN)?, max_train);
        let dev_rows = capped(dataset.split(DEV)?, max_eval);
        let train = labeled_set(&tokenizer, &train_rows, TRAIN)?;
        let dev = labeled_set(&tokenizer, &dev_rows, DEV)?;
        let trainable = load_trainable(
            &model.dir,
            &Head::for_task(&task),
            u64::from(seed),
            cfg.precision,
            &self.device,
        )
        .with_context(|| format!("loading model {}", model.dir.display()))?;
        let inference = || trainable.inference_model();
        let trainee = Trainee {
            model: trainable.model(),
            varmap: trainable.varmap(),
            inference: &inference,
            decay: &decays,
        };
        let mut report = |r: &StepReport| {
            on_step(&StepInfo {
                step: r.step,
                total_steps: Some(r.total_steps),
                epoch: r.epoch,
                loss: Some(r.loss),
                examples_per_sec: Some(r.examples_per_sec),
            })
        };
        let outcome = finetune(
            &trainee,
            &task,
            &train,
            Some(&dev),
            tokenizer.pad_id(),
            &cfg,
            &self.device,
            &mut report,
        )?;
        Ok(Trained {
            model: trainable,
            tokenizer,
            task,
            outcome,
            n_train: train_rows.len(),
            n_dev: dev_rows.len(),
        })
    }

    fn test_score(
        &self,
        t: &Trained,
        dataset: &Dataset,
        max_eval: Option<usize>,
    ) -> Result<(f64, usize)> {
        let rows = capped(dataset.split(TEST)?, max_eval);
        let test = labeled_set(&t.tokenizer, &rows, TEST)?;
        let model = t.model.inference_model()?;
        let score = evaluate(
            model.as_ref(),
            &t.task,
            &test.encoded,
            &test.labels,
            t.tokenizer.pad_id(),
            self.eval_batch_size,
            &self.device,
        )?;
        Ok((score, rows.len()))
    }
}

struct Trained {
    model: Box<dyn TrainableModel>,
    tokenizer: TextTokenizer,
    task: Task,
    outcome: Outcome,
    n_train: usize,
    n_dev: usize,
}

impl JobExecutor for FinetuneExecutor {
    fn execute(&self, job: &Job, on_step: &mut dyn FnMut(&StepInfo)) -> Result<JobOutput> {
        let out = self.execute_here(job, on_step);
        // The job's tensors are gone: the memory its device's pool kept goes back to the driver
        // (a failure there costs only speed, so the job's result stands).
        if let Err(e) = crate::device::release_pool(&self.device) {
            eprintln!(
                "warning: {}: releasing the memory pool: {e:#}",
                crate::device::describe(&self.device)
            );
        }
        out
    }
}

impl FinetuneExecutor {
    fn execute_here(&self, job: &Job, on_step: &mut dyn FnMut(&StepInfo)) -> Result<JobOutput> {
        match &job.spec {
            JobSpec::Eval {
                model,
                target,
                dataset,
                metric,
                protocol,
                seed,
                max_train,
                max_eval,
                ..
            } => {
                let resolved = self.resolve_model(model, job.donor_checkpoint.as_deref())?;
                let OpenedDataset {
                    data,
                    revision: dataset_revision,
                } = self
                    .open(dataset)
                    .with_context(|| format!("target {target}"))?;
                check_metric(*metric, data.task()).with_context(|| format!("target {target}"))?;
                let trained = self.train(
                    &resolved, &data, protocol, *seed, *max_train, *max_eval, on_step,
                )?;
                let (test, n_test) = self.test_score(&trained, &data, *max_eval)?;
                Ok(JobOutput {
                    dev_score: trained.outcome.best_dev_score,
                    test_score: Some(test),
                    n_train: trained.n_train,
                    n_dev: trained.n_dev,
                    n_test,
                    steps: trained.outcome.steps,
                    epochs: trained.outcome.epochs,
                    weights_sha256: Some(weights_sha256(&resolved.dir)?),
                    model_revision: resolved.revision,
                    dataset_fingerprint: Some(data.fingerprint()),
                    dataset_revision,
                    device: crate::device::describe(&self.device),
                    checkpoint: None,
                })
            }
            JobSpec::Donor {
                donor,
                base,
                source,
                protocol,
                seed,
                max_train,
                max_eval,
                ..
            } => {
                let out = job.output_dir.as_deref().with_context(|| {
                    format!("donor {donor}: the runner gave no output directory")
                })?;
                let resolved = self.resolve_model(base, None)?;
                let OpenedDataset {
                    data,
                    revision: dataset_revision,
                } = self
                    .open(source)
                    .with_context(|| format!("donor {donor}: source dataset"))?;
                let trained = self.train(
                    &resolved, &data, protocol, *seed, *max_train, *max_eval, on_step,
                )?;
                let (test, n_test) = self.test_score(&trained, &data, *max_eval)?;
                let labels = match &trained.task {
                    Task::Classification { labels } => labels.clone(),
                    Task::Regression => Vec::new(),
                };
                save_atomically(trained.model.as_ref(), out, &labels)
                    .with_context(|| format!("donor {donor}: saving the checkpoint"))?;
                Ok(JobOutput {
                    dev_score: trained.outcome.best_dev_score,
                    test_score: Some(test),
                    n_train: trained.n_train,
                    n_dev: trained.n_dev,
                    n_test,
                    steps: trained.outcome.steps,
                    epochs: trained.outcome.epochs,
                    weights_sha256: Some(weights_sha256(&resolved.dir)?),
                    model_revision: resolved.revision,
                    dataset_fingerprint: Some(data.fingerprint()),
                    dataset_revision,
                    device: crate::device::describe(&self.device),
                    checkpoint: Some(out.to_path_buf()),
                })
            }
        }
    }
}

/// The training loop's settings for a suite protocol and a seed.
pub fn train_config(p: &Protocol, seed: u32) -> Result<TrainConfig> {
    if p.schedule != crate::suite::Schedule::Linear {
        bail!(
            "protocol schedule {:?}: only the linear schedule is implemented by the training loop",
            p.schedule
        );
    }
    let cfg = TrainConfig {
        lr: p.learning_rate,
        weight_decay: p.weight_decay,
        warmup_ratio: p.warmup_ratio,
        batch_size: p.batch_size,
        micro_batch_size: p.micro_batch_size.min(p.batch_size),
        max_epochs: p.max_epochs,
        max_steps: None,
        patience: p.patience,
        eval_every: EvalEvery::Epoch,
        max_length: p.max_length,
        seed: u64::from(seed),
        batching: Batching::LengthBucketed,
        precision: p.precision,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

/// A dataset opened for a job, with the hub commit it came from.
pub struct OpenedDataset {
    pub data: Dataset,
    /// The hub commit (`None` for a local directory).
    pub revision: Option<String>,
}

/// A dataset reference opened as a recycle dataset: a local directory as it is, a hub dataset
/// resolved (or taken from the cache offline) and materialised under `home/datasets/hub/`.
pub fn open_dataset(r: &DatasetRef, hub: &HubOptions, home: &Path) -> Result<OpenedDataset> {
    match r {
        DatasetRef::Path { resolved, .. } => Ok(OpenedDataset {
            data: Dataset::load(resolved)?,
            revision: None,
        }),
        DatasetRef::Hub {
            id,
            config,
            revision,
            mapping,
        } => {
            let spec = HubDatasetSpec {
                id,
                config: config.as_deref(),
                revision: revision.as_deref(),
                mapping,
            };
            let m = open_hub_dataset(spec, hub, home)?;
            Ok(OpenedDataset {
                data: m.dataset,
                revision: Some(m.commit),
            })
        }
    }
}

/// The metric must fit the task: accuracy for classification, Spearman for regression.
pub fn check_metric(metric: Metric, task: &Task) -> Result<()> {
    match (metric, task) {
        (Metric::Accuracy, Task::Classification { .. }) | (Metric::Spearman, Task::Regression) => {
            Ok(())
        }
        (m, t) => bail!(
            "metric {m:?} does not fit the dataset's task ({})",
            match t {
                Task::Classification { .. } => "classification: use accuracy",
                Task::Regression => "regression: use spearman",
            }
        ),
    }
}

/// `rows`, or a fixed subsample of `cap` of them (same examples for every model and seed).
pub fn capped(rows: &[Example], cap: Option<usize>) -> Vec<Example> {
    match cap {
        Some(n) if n < rows.len() => {
            let mut idx: Vec<usize> = (0..rows.len()).collect();
            idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(CAP_SEED));
            idx.truncate(n);
            idx.sort_unstable();
            idx.into_iter().map(|i| rows[i].clone()).collect()
        }
        _ => rows.to_vec(),
    }
}

/// sha256 over the checkpoint's weight files (a sharded index and its shards, in name order).
pub fn weights_sha256(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading model directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "{}: no .safetensors weights",
        dir.display()
    );
    let mut h = Sha256::new();
    for f in &files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("reading {}", f.display()))?;
        std::io::copy(&mut file, &mut h).with_context(|| format!("reading {}", f.display()))?;
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Saves to a temporary sibling directory and renames it into place, replacing an older copy.
/// The temporary directory is named after `out`, so that the next save of the same checkpoint
/// removes what a killed save left behind (and nothing another job is writing).
fn save_atomically(model: &dyn TrainableModel, out: &Path, labels: &[String]) -> Result<()> {
    let parent = out
        .parent()
        .with_context(|| format!("{} has no parent directory", out.display()))?;
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable directory name", out.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let prefix = format!(".partial-{name}-");
    for entry in
        std::fs::read_dir(parent).with_context(|| format!("listing {}", parent.display()))?
    {
        let path = entry
            .with_context(|| format!("listing {}", parent.display()))?
            .path();
        let stale = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix));
        if stale && path.is_dir() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the unfinished save {}", path.display()))?;
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    model.save(tmp.path(), labels)?;
    crate::atomic::replace_dir(tmp, out)
        .with_context(|| format!("moving the checkpoint into {}", out.display()))
}

/// Checks one dataset a suite uses before any job starts: it opens, has the three splits, its
/// labels fit its task, and the metric fits the task.
/// Hub datasets are resolved with `HubOptions::from_env` and materialised under the recycle home.
pub fn check_dataset_use(u: &crate::suite::DatasetUse) -> Result<()> {
    let home = crate::assets::home(None)?;
    let data = open_dataset(u.dataset, &HubOptions::from_env(), &home)?.data;
    for split in [TRAIN, DEV, TEST] {
        let rows = data.split(split)?;
        ensure!(
            !rows.is_empty(),
            "dataset {}: the {split} split is empty",
            u.dataset.display_id()
        );
        let labels: Vec<crate::data::Label> = rows
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.label.with_context(|| {
                    format!(
                        "dataset {}: {split} example {i} has no label",
                        u.dataset.display_id()
                    )
                })
            })
            .collect::<Result<_>>()?;
        crate::train::finetune::check_labels(data.task(), &labels, split)
            .with_context(|| format!("dataset {}", u.dataset.display_id()))?;
    }
    if let Some(m) = u.metric {
        check_metric(m, data.task())?;
    }
    Ok(())
}

/// Checks that every local model of the suite (baseline and candidates; donors start from one of
/// them) is a checkpoint directory before any job starts; the error names the file and field.
pub fn check_model_paths(suite: &crate::suite::Suite) -> Result<()> {
    let models = std::iter::once(("baseline".to_string(), &suite.baseline)).chain(
        suite
            .candidates
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("candidates[{i}]"), m)),
    );
    for (at, m) in models {
        if let ModelRef::Path { raw, resolved } = &m.source {
            ensure!(
                resolved.exists(),
                "{}: {at}.path: model {raw}: {} does not exist",
                suite.file.display(),
                resolved.display()
            );
            ensure!(
                resolved.join("config.json").is_file(),
                "{}: {at}.path: model {raw}: {} has no config.json (not a checkpoint directory)",
                suite.file.display(),
                resolved.display()
            );
        }
    }
    Ok(())
}

/// Fetches the embedded assets (`recycle fetch`) that the suite refers to by path and that are not
/// installed yet, so that the embedded default suite runs on a fresh machine with one command.
pub fn fetch_embedded_assets(suite: &crate::suite::Suite, home: &Path) -> Result<()> {
    use crate::assets::fetch::{fetch, Asset, Outcome};
    let mut paths: Vec<&Path> = Vec::new();
    for m in std::iter::once(&suite.baseline)
        .chain(&suite.candidates)
        .chain(suite.donors.iter().map(|d| &d.base))
    {
        if let ModelRef::Path { resolved, .. } = &m.source {
            paths.push(resolved);
        }
    }
    for d in suite
        .targets
        .iter()
        .map(|t| &t.dataset)
        .chain(suite.donors.iter().map(|d| &d.source))
    {
        if let DatasetRef::Path { resolved, .. } = d {
            paths.push(resolved);
        }
    }
    let missing: Vec<Asset> = Asset::ALL
        .into_iter()
        .filter(|a| paths.iter().any(|p| *p == a.dir(home)) && !a.is_installed(&a.dir(home)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "fetching the embedded assets this suite needs into {}: {}",
        home.display(),
        missing
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let outcomes = fetch(home, &missing, &mut |line| eprintln!("  {line}"))?;
    let failed: Vec<String> = outcomes
        .into_iter()
        .filter_map(|(a, o)| match o {
            Outcome::Failed(why) => Some(format!("{}: {why}", a.name())),
            _ => None,
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "could not fetch embedded assets:\n  {}",
        failed.join("\n  ")
    );
    Ok(())
}
