//! Suites as data: the JSON file that names the baseline, the candidates, the donors, the targets,
//! the fine-tuning protocol and the seeds of an experiment, validated completely before any job runs.
//!
//! Parsing is pure (`Suite::parse` takes the text, the file name, the profile and `RECYCLE_HOME`);
//! `Suite::load` is the only place that reads the file and the environment. Every error names the
//! file and the field path, e.g. `configs/x.json: targets[2].metric: unknown metric "f1"`.

use crate::leaderboard::Metric;
use crate::model::Precision;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The placeholder a `path` may start with (or contain), replaced by the recycle home directory.
pub const HOME_VAR: &str = "${RECYCLE_HOME}";

/// Default number of baseline seeds (the baseline's spread is the noise yardstick of every gain).
pub const DEFAULT_BASELINE_SEEDS: u32 = 5;
/// Fewest baseline seeds that give a standard deviation worth the name.
pub const MIN_BASELINE_SEEDS: u32 = 3;
/// Default number of seeds per candidate.
pub const DEFAULT_CANDIDATE_SEEDS: u32 = 1;

/// The recycle home: `$RECYCLE_HOME`, else `$XDG_CACHE_HOME/recycle`, else `~/.cache/recycle`.
pub fn recycle_home() -> Result<PathBuf> {
    crate::assets::home(None)
}

// ---------------------------------------------------------------------------------------------
// The fine-tuning protocol
// ---------------------------------------------------------------------------------------------

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear decay to zero at the last step (IBM's protocol).
    Linear,
    /// Constant after warm-up.
    Constant,
}

/// The resolved fine-tuning protocol of one job; every default in one place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// Peak learning rate of AdamW.
    pub learning_rate: f64,
    /// Fraction of the total steps spent warming up linearly from zero.
    pub warmup_ratio: f64,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// Examples per optimiser step.
    pub batch_size: usize,
    /// Examples per forward/backward pass; gradients are accumulated up to `batch_size`.
    pub micro_batch_size: usize,
    /// Upper bound on training epochs.
    pub max_epochs: usize,
    /// Stop after this many evaluations on dev without improvement; `None`: never stop early.
    pub patience: Option<usize>,
    /// Tokens per example (longer inputs are truncated).
    pub max_length: usize,
    /// Decoupled weight decay of AdamW.
    pub weight_decay: f64,
    /// Arithmetic of the passes (`f32`, or `bf16` mixed precision). Left out of the JSON when
    /// f32, so protocols and hashes from before this field are unchanged.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Default for Protocol {
    /// The protocol of IBM's model-recycling evaluation.
    fn default() -> Self {
        Self {
            learning_rate: 5e-5,
            warmup_ratio: 0.006,
            schedule: Schedule::Linear,
            batch_size: 256,
            micro_batch_size: 32,
            max_epochs: 10,
            patience: Some(3),
            max_length: 256,
            weight_decay: 0.01,
            precision: Precision::F32,
        }
    }
}

/// A partial protocol, as written in a suite, a profile or a target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolOverrides {
    pub learning_rate: Option<f64>,
    pub warmup_ratio: Option<f64>,
    pub schedule: Option<Schedule>,
    pub batch_size: Option<usize>,
    pub micro_batch_size: Option<usize>,
    pub max_epochs: Option<usize>,
    /// `0` disables early stopping.
    pub patience: Option<usize>,
    pub max_length: Option<usize>,
    pub weight_decay: Option<f64>,
    /// Skipped when absent, so serialised overrides from before this field are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

impl Protocol {
    /// This protocol with the fields `o` sets replaced.
    pub fn with(&self, o: &ProtocolOverrides) -> Protocol {
        Protocol {
            learning_rate: o.learning_rate.unwrap_or(self.learning_rate),
            warmup_ratio: o.warmup_ratio.unwrap_or(self.warmup_ratio),
            schedule: o.schedule.unwrap_or(self.schedule),
            batch_size: o.batch_size.unwrap_or(self.batch_size),
            micro_batch_size: o.micro_batch_size.unwrap_or(self.micro_batch_size),
            max_epochs: o.max_epochs.unwrap_or(self.max_epochs),
            patience: match o.patience {
                Some(0) => None,
                Some(p) => Some(p),
                None => self.patience,
            },
            max_length: o.max_length.unwrap_or(self.max_length),
            weight_decay: o.weight_decay.unwrap_or(self.weight_decay),
            precision: o.precision.unwrap_or(self.precision),
        }
    }

    /// Checks the values; `at` is the field path the protocol came from.
    fn validate(&self, at: &str) -> Result<()> {
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(self.learning_rate) {
            bail!(
                "{at}.learning_rate: must be a positive number, got {}",
                self.learning_rate
            );
        }
        if !(self.warmup_ratio.is_finite() && (0.0..1.0).contains(&self.warmup_ratio)) {
            bail!(
                "{at}.warmup_ratio: must be in [0, 1), got {}",
                self.warmup_ratio
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("{at}.weight_decay: must be ≥ 0, got {}", self.weight_decay);
        }
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("micro_batch_size", self.micro_batch_size),
            ("max_epochs", self.max_epochs),
        ] {
            if v == 0 {
                bail!("{at}.{name}: must be at least 1");
            }
        }
        if self.max_length < 2 {
            bail!(
                "{at}.max_length: must be at least 2 (room for the [CLS] and [SEP] tokens), got {}",
                self.max_length
            );
        }
        if !self.batch_size.is_multiple_of(self.micro_batch_size) {
            bail!(
                "{at}.micro_batch_size: {} does not divide batch_size {}",
                self.micro_batch_size,
                self.batch_size
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The file format (raw, as serde reads it)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuite {
    name: String,
    /// Free text for readers; not used.
    #[allow(dead_code)]
    description: Option<String>,
    arch: String,
    baseline: RawModel,
    #[serde(default)]
    candidates: Vec<RawModel>,
    #[serde(default)]
    donors: Vec<RawDonor>,
    targets: Vec<RawTarget>,
    #[serde(default)]
    protocol: ProtocolOverrides,
    #[serde(default)]
    seeds: RawSeeds,
    max_train: Option<usize>,
    max_eval: Option<usize>,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
    fusion: Option<RawFusion>,
}

/// The `fusion` section: a ColD Fusion loop over some of the suite's datasets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFusion {
    iterations: usize,
    contributors: usize,
    sources: Vec<RawFusionSource>,
    #[serde(default)]
    seed: u32,
    #[serde(default)]
    protocol: ProtocolOverrides,
    base: Option<String>,
    max_train: Option<usize>,
}

/// A fusion source: the name of a target or donor of the suite (its dataset), or a named dataset.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawFusionSource {
    Name(String),
    Dataset(RawNamedDataset),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamedDataset {
    name: String,
    path: Option<String>,
    hub: Option<String>,
    config: Option<String>,
    revision: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    hub: Option<String>,
    path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDonor {
    name: String,
    base: String,
    source: RawDataset,
    #[serde(default)]
    protocol: ProtocolOverrides,
    max_train: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    path: Option<String>,
    hub: Option<String>,
    config: Option<String>,
    revision: Option<String>,
    columns: Option<RawColumns>,
    splits: Option<RawSplits>,
    labels: Option<Vec<String>>,
}

/// One column name or a list of them (joined into one text).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumns {
    text: OneOrMany,
    text_pair: Option<OneOrMany>,
    label: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplits {
    train: String,
    dev: RawSplitSource,
    test: RawSplitSource,
}

/// A split name, or a rule carving the split out of train.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSplitSource {
    Name(String),
    Carve(RawCarve),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCarve {
    carve_from: String,
    fraction: f64,
    max: Option<usize>,
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    dataset: RawDataset,
    metric: String,
    #[serde(default)]
    protocol: ProtocolOverrides,
    max_train: Option<usize>,
    max_eval: Option<usize>,
    /// Free text for readers (provenance, assumptions); not used.
    #[allow(dead_code)]
    note: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeeds {
    baseline: Option<u32>,
    candidates: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    #[serde(default)]
    protocol: ProtocolOverrides,
    #[serde(default)]
    seeds: RawSeeds,
    max_train: Option<usize>,
    max_eval: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// The validated suite
// ---------------------------------------------------------------------------------------------

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ModelRef {
    /// A hub repository at a revision (`None`: the default branch).
    Hub {
        id: String,
        revision: Option<String>,
    },
    /// A local checkpoint directory: `raw` as written (hashed), `resolved` with `${RECYCLE_HOME}`
    /// expanded (not hashed, so a result does not depend on where the home lies).
    Path {
        raw: String,
        #[serde(skip)]
        resolved: PathBuf,
    },
    /// The checkpoint a donor job of this suite creates.
    Donor { name: String },
}

impl ModelRef {
    /// The id a leaderboard shows: the hub id, the path as written, or `donor:<name>`.
    pub fn display_id(&self) -> String {
        match self {
            ModelRef::Hub { id, .. } => id.clone(),
            ModelRef::Path { raw, .. } => raw.clone(),
            ModelRef::Donor { name } => format!("donor:{name}"),
        }
    }
}

/// Where a dataset comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DatasetRef {
    Path {
        raw: String,
        #[serde(skip)]
        resolved: PathBuf,
    },
    /// A hub dataset and how its columns and splits become a recycle dataset.
    Hub {
        id: String,
        config: Option<String>,
        revision: Option<String>,
        mapping: HubMapping,
    },
}

/// The default split seed of carve rules (IBM's protocol does not name one).
pub const DEFAULT_CARVE_SEED: u64 = 0;
/// What a list of text columns is joined with, in the order given (empty cells are left out).
pub const COLUMN_SEPARATOR: &str = " ";

/// How a hub dataset's columns, splits and labels map onto a recycle dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubMapping {
    pub columns: HubColumns,
    pub splits: HubSplits,
    /// Class names in class-id order; `None`: from the card's `class_label`, else from the data.
    pub labels: Option<Vec<String>>,
}

/// Which columns hold the first text, the optional second text and the label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubColumns {
    /// One or more columns, joined with [`COLUMN_SEPARATOR`].
    pub text: Vec<String>,
    /// Empty: a single-text task.
    pub text_pair: Vec<String>,
    pub label: String,
}

/// Where train, dev (early stopping) and test (reporting) come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubSplits {
    pub train: String,
    pub dev: SplitSource,
    pub test: SplitSource,
}

/// A hub split by name, or a stratified carve-out of train.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitSource {
    Name(String),
    /// `min(fraction × |train|, max)` examples of train (per class, seeded), removed from train.
    Carve {
        /// The fraction as written, in millionths (so the mapping is `Eq` and hashes stably).
        fraction_ppm: u32,
        max: Option<usize>,
        seed: u64,
    },
}

impl SplitSource {
    /// The carve fraction, if this is a carve rule.
    pub fn carve_fraction(&self) -> Option<f64> {
        match self {
            SplitSource::Carve { fraction_ppm, .. } => Some(f64::from(*fraction_ppm) / 1e6),
            SplitSource::Name(_) => None,
        }
    }
}

impl Default for HubMapping {
    /// `text` and `label` columns, splits `train`, `validation` and `test`.
    fn default() -> Self {
        HubMapping {
            columns: HubColumns {
                text: vec!["text".into()],
                text_pair: vec![],
                label: "label".into(),
            },
            splits: HubSplits {
                train: "train".into(),
                dev: SplitSource::Name("validation".into()),
                test: SplitSource::Name("test".into()),
            },
            labels: None,
        }
    }
}

impl DatasetRef {
    /// A short id for results: the path as written, or `hub-id[/config]`.
    pub fn display_id(&self) -> String {
        match self {
            DatasetRef::Path { raw, .. } => raw.clone(),
            DatasetRef::Hub {
                id,
                config: Some(c),
                ..
            } => format!("{id}/{c}"),
            DatasetRef::Hub { id, .. } => id.clone(),
        }
    }
}

/// A model of the suite (the baseline, a candidate or a donor's checkpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub name: String,
    pub source: ModelRef,
}

/// An intertraining donor: `base` fine-tuned on `source`, then evaluated as a candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Donor {
    pub name: String,
    /// The model the donor starts from (the baseline or a candidate), by name.
    pub base: ModelEntry,
    pub source: DatasetRef,
    pub protocol: Protocol,
    pub max_train: Option<usize>,
    pub max_eval: Option<usize>,
}

/// A target task: every model is fine-tuned on it and scored on its test split.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub dataset: DatasetRef,
    pub metric: Metric,
    pub protocol: Protocol,
    pub max_train: Option<usize>,
    pub max_eval: Option<usize>,
}

/// A dataset contributors of a fusion iteration fine-tune on.
#[derive(Debug, Clone, PartialEq)]
pub struct FusionSource {
    pub name: String,
    pub dataset: DatasetRef,
}

/// A ColD Fusion loop: each iteration, `contributors` sources (sampled with `seed`, without
/// replacement) fine-tune the current base, and their bodies are averaged into the next base.
#[derive(Debug, Clone, PartialEq)]
pub struct Fusion {
    pub iterations: usize,
    pub contributors: usize,
    pub sources: Vec<FusionSource>,
    pub seed: u32,
    /// The contributors' fine-tuning protocol.
    pub protocol: Protocol,
    /// The model the first iteration starts from (the baseline unless `base` names a candidate).
    pub base: ModelEntry,
    pub max_train: Option<usize>,
    pub max_eval: Option<usize>,
    /// The suite's name: it scopes the fused bases' model names, so that two fusion suites of one
    /// architecture never fill the same leaderboard rows.
    pub suite: String,
    /// `<home>/fusion/<suite>`: where the fused bases and contributor checkpoints are saved.
    pub dir: PathBuf,
}

/// The most ColD Fusion iterations a suite may ask for.
pub const MAX_FUSION_ITERATIONS: usize = 1000;

/// Model names starting with this are reserved for fusion iterations (`fusion-<suite>-iter1`, ...).
pub const FUSION_NAME_PREFIX: &str = "fusion-";

impl Fusion {
    /// The targets the fused bases are evaluated on: those whose name and dataset are not sources.
    pub fn held_out<'a>(&self, targets: &'a [Target]) -> Vec<&'a Target> {
        targets
            .iter()
            .filter(|t| {
                !self
                    .sources
                    .iter()
                    .any(|s| s.name == t.name || s.dataset == t.dataset)
            })
            .collect()
    }
}

/// Seeds per role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seeds {
    pub baseline: u32,
    pub candidates: u32,
}

/// A validated suite with one profile applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    /// The file it was read from (named in every error).
    pub file: PathBuf,
    pub name: String,
    /// The leaderboard key, e.g. `roberta-base`.
    pub arch: String,
    /// The profile applied, if any.
    pub profile: Option<String>,
    pub baseline: ModelEntry,
    /// Candidates as listed (donors not included; see `evaluated_models`).
    pub candidates: Vec<ModelEntry>,
    pub donors: Vec<Donor>,
    pub targets: Vec<Target>,
    pub seeds: Seeds,
    /// The ColD Fusion loop of `recycle fuse`, if the suite declares one.
    pub fusion: Option<Fusion>,
}

/// What a dataset check (done by whoever can open datasets) is asked about.
pub struct DatasetUse<'a> {
    /// Field path of the dataset in the suite, e.g. `targets[1].dataset`.
    pub field: String,
    pub dataset: &'a DatasetRef,
    /// The metric the dataset is scored with (`None` for a donor source).
    pub metric: Option<Metric>,
}

impl Suite {
    /// Reads and validates a suite file, applying `profile` (`--profile`).
    /// Every job's protocol computes in `precision` (`recycle run --precision`): the same as
    /// writing it in the suite's top-level protocol, so bf16 jobs get their own hashes.
    pub fn set_precision(&mut self, precision: Precision) {
        let donors = self.donors.iter_mut().map(|d| &mut d.protocol);
        let targets = self.targets.iter_mut().map(|t| &mut t.protocol);
        let fusion = self.fusion.iter_mut().map(|f| &mut f.protocol);
        for p in donors.chain(targets).chain(fusion) {
            p.precision = precision;
        }
    }

    pub fn load(file: &Path, profile: Option<&str>) -> Result<Suite> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read suite file {}", file.display()))?;
        let home = recycle_home()?;
        Suite::parse(&text, file, profile, &home)
    }

    /// Parses and validates a suite; `file` is only used in messages.
    /// Every profile is resolved, not only the one asked for, so a mistake in a profile is
    /// reported whichever profile a run uses.
    pub fn parse(text: &str, file: &Path, profile: Option<&str>, home: &Path) -> Result<Suite> {
        let f = file.display();
        let read = || -> Result<RawSuite> {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    anyhow!("{f}: {inner}")
                } else {
                    anyhow!("{f}: {path}: {inner}")
                }
            })
        };
        if text.trim().is_empty() {
            bail!("{f}: the suite file is empty (docs/suite-format.md describes the format)");
        }
        let raw = read()?;
        let others: Vec<String> = raw
            .profiles
            .keys()
            .filter(|k| Some(k.as_str()) != profile)
            .cloned()
            .collect();
        let suite = resolve(raw, file, profile, home).map_err(|e| anyhow!("{f}: {e:#}"))?;
        for other in others {
            resolve(read()?, file, Some(&other), home).map_err(|e| anyhow!("{f}: {e:#}"))?;
        }
        Ok(suite)
    }

    /// Every model that is evaluated on the targets: the baseline, the candidates, then the donors.
    pub fn evaluated_models(&self) -> Vec<ModelEntry> {
        let mut out = vec![self.baseline.clone()];
        out.extend(self.candidates.iter().cloned());
        out.extend(self.donors.iter().map(|d| ModelEntry {
            name: d.name.clone(),
            source: ModelRef::Donor {
                name: d.name.clone(),
            },
        }));
        out
    }

    /// Runs `check` on every dataset the suite uses (missing columns, labels out of range, a
    /// metric that does not fit the task: the dataset owner knows how); the first error is returned
    /// with the file and field path named.
    /// The files and directories the suite reads from the local disk: the suite file, local model
    /// checkpoints and local datasets (as resolved, relative to the working directory where not
    /// absolute). A command that writes files must not write into any of them.
    pub fn local_inputs(&self) -> Vec<PathBuf> {
        let mut out = vec![self.file.clone()];
        for m in std::iter::once(&self.baseline).chain(&self.candidates) {
            if let ModelRef::Path { resolved, .. } = &m.source {
                out.push(resolved.clone());
            }
        }
        let datasets = std::cell::RefCell::new(Vec::new());
        let _ = self.check_datasets(&|u| {
            if let DatasetRef::Path { resolved, .. } = u.dataset {
                datasets.borrow_mut().push(resolved.clone());
            }
            Ok(())
        });
        out.extend(datasets.into_inner());
        out
    }

    pub fn check_datasets(&self, check: &dyn Fn(&DatasetUse) -> Result<()>) -> Result<()> {
        let f = self.file.display();
        for (i, d) in self.donors.iter().enumerate() {
            let u = DatasetUse {
                field: format!("donors[{i}].source"),
                dataset: &d.source,
                metric: None,
            };
            check(&u).map_err(|e| anyhow!("{f}: {}: {e:#}", u.field))?;
        }
        for (i, t) in self.targets.iter().enumerate() {
            let u = DatasetUse {
                field: format!("targets[{i}].dataset"),
                dataset: &t.dataset,
                metric: Some(t.metric),
            };
            check(&u).map_err(|e| anyhow!("{f}: {}: {e:#}", u.field))?;
        }
        for (i, s) in self
            .fusion
            .iter()
            .flat_map(|x| x.sources.iter())
            .enumerate()
        {
            let u = DatasetUse {
                field: format!("fusion.sources[{i}]"),
                dataset: &s.dataset,
                metric: None,
            };
            check(&u).map_err(|e| anyhow!("{f}: {}: {e:#}", u.field))?;
        }
        Ok(())
    }
}

/// Names become path components of job ids and result files: keep them plain.
fn check_name(name: &str, at: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("{at}: name {name:?} must be non-empty ASCII letters, digits, '-', '_' or '.' (not starting with '.')");
    }
    Ok(())
}

fn expand_path(raw: &str, home: &Path, at: &str) -> Result<PathBuf> {
    if raw.is_empty() {
        bail!("{at}: empty path");
    }
    if raw.contains("${") && !raw.contains(HOME_VAR) {
        bail!("{at}: {raw:?}: the only variable a path may use is {HOME_VAR}");
    }
    let home = home.to_string_lossy();
    Ok(PathBuf::from(raw.replace(HOME_VAR, &home)))
}

fn resolve_model(m: &RawModel, home: &Path, at: &str) -> Result<ModelEntry> {
    check_name(&m.name, &format!("{at}.name"))?;
    let source = match (&m.hub, &m.path) {
        (Some(h), None) => {
            let (id, rev) = match h.split_once('@') {
                Some((id, rev)) => (id, Some(rev)),
                None => (h.as_str(), None),
            };
            if id.is_empty() || rev.is_some_and(str::is_empty) {
                bail!("{at}.hub: {h:?} must be \"id\" or \"id@revision\"");
            }
            ModelRef::Hub {
                id: id.to_string(),
                revision: rev.map(str::to_string),
            }
        }
        (None, Some(p)) => ModelRef::Path {
            raw: p.clone(),
            resolved: expand_path(p, home, &format!("{at}.path"))?,
        },
        (Some(_), Some(_)) => bail!("{at}: give either \"hub\" or \"path\", not both"),
        (None, None) => bail!("{at}: missing field `hub` or `path`"),
    };
    Ok(ModelEntry {
        name: m.name.clone(),
        source,
    })
}

fn resolve_dataset(d: &RawDataset, home: &Path, at: &str) -> Result<DatasetRef> {
    match (&d.path, &d.hub) {
        (Some(p), None) => {
            for (name, set) in [
                ("config", d.config.is_some()),
                ("revision", d.revision.is_some()),
                ("columns", d.columns.is_some()),
                ("splits", d.splits.is_some()),
                ("labels", d.labels.is_some()),
            ] {
                if set {
                    bail!("{at}.{name}: only applies to a \"hub\" dataset");
                }
            }
            Ok(DatasetRef::Path {
                raw: p.clone(),
                resolved: expand_path(p, home, &format!("{at}.path"))?,
            })
        }
        (None, Some(h)) => {
            if h.is_empty() {
                bail!("{at}.hub: empty dataset id");
            }
            if h.contains('@') {
                bail!("{at}.hub: {h:?}: give the revision in \"revision\", not after '@'");
            }
            Ok(DatasetRef::Hub {
                id: h.clone(),
                config: d.config.clone(),
                revision: d.revision.clone(),
                mapping: resolve_mapping(d, at)?,
            })
        }
        (Some(_), Some(_)) => bail!("{at}: give either \"path\" or \"hub\", not both"),
        (None, None) => bail!("{at}: missing field `path` or `hub`"),
    }
}

fn resolve_mapping(d: &RawDataset, at: &str) -> Result<HubMapping> {
    let mut m = HubMapping::default();
    if let Some(c) = &d.columns {
        let text = c.text.to_vec();
        let text_pair = c
            .text_pair
            .as_ref()
            .map(OneOrMany::to_vec)
            .unwrap_or_default();
        if text.is_empty() {
            bail!("{at}.columns.text: names no column");
        }
        if c.text_pair.is_some() && text_pair.is_empty() {
            bail!("{at}.columns.text_pair: names no column (leave it out for single texts)");
        }
        let mut seen = BTreeSet::new();
        for (field, col) in text
            .iter()
            .map(|t| ("text", t))
            .chain(text_pair.iter().map(|t| ("text_pair", t)))
            .chain(std::iter::once(("label", &c.label)))
        {
            if col.trim().is_empty() {
                bail!("{at}.columns.{field}: empty column name");
            }
            if !seen.insert(col.as_str()) {
                bail!("{at}.columns.{field}: column {col:?} is used twice");
            }
        }
        m.columns = HubColumns {
            text,
            text_pair,
            label: c.label.clone(),
        };
    }
    if let Some(s) = &d.splits {
        if s.train.trim().is_empty() {
            bail!("{at}.splits.train: empty split name");
        }
        let mut seeds = BTreeSet::new();
        let mut total = 0.0;
        let mut source = |field: &str, r: &RawSplitSource| -> Result<SplitSource> {
            match r {
                RawSplitSource::Name(n) => {
                    if n.trim().is_empty() {
                        bail!("{at}.splits.{field}: empty split name");
                    }
                    if *n == s.train {
                        bail!("{at}.splits.{field}: {n:?} is the train split; carve it out of train instead");
                    }
                    Ok(SplitSource::Name(n.clone()))
                }
                RawSplitSource::Carve(c) => {
                    if c.carve_from != s.train {
                        bail!(
                            "{at}.splits.{field}.carve_from: {:?}: splits are carved from the train split ({:?})",
                            c.carve_from,
                            s.train
                        );
                    }
                    if !(c.fraction.is_finite() && c.fraction > 0.0 && c.fraction < 1.0) {
                        bail!(
                            "{at}.splits.{field}.fraction: must be in (0, 1), got {}",
                            c.fraction
                        );
                    }
                    if c.max == Some(0) {
                        bail!(
                            "{at}.splits.{field}.max: must be at least 1 (leave it out for no cap)"
                        );
                    }
                    total += c.fraction;
                    let seed = c.seed.unwrap_or(DEFAULT_CARVE_SEED);
                    seeds.insert(seed);
                    Ok(SplitSource::Carve {
                        fraction_ppm: (c.fraction * 1e6).round() as u32,
                        max: c.max,
                        seed,
                    })
                }
            }
        };
        let dev = source("dev", &s.dev)?;
        let test = source("test", &s.test)?;
        if let (SplitSource::Name(a), SplitSource::Name(b)) = (&dev, &test) {
            if a == b {
                bail!("{at}.splits.test: {b:?} is also the dev split");
            }
        }
        if seeds.len() > 1 {
            bail!(
                "{at}.splits.test.seed: dev and test are carved in one draw and need the same seed"
            );
        }
        if total >= 1.0 {
            bail!("{at}.splits: the carved fractions add up to {total}, which leaves no train");
        }
        m.splits = HubSplits {
            train: s.train.clone(),
            dev,
            test,
        };
    }
    if let Some(l) = &d.labels {
        if l.len() < 2 {
            bail!("{at}.labels: a classification task needs at least 2 labels");
        }
        let mut seen = BTreeSet::new();
        for name in l {
            if name.trim().is_empty() {
                bail!("{at}.labels: empty label name");
            }
            if !seen.insert(name) {
                bail!("{at}.labels: label {name:?} is listed twice");
            }
        }
        m.labels = Some(l.clone());
    }
    Ok(m)
}

fn parse_metric(s: &str, at: &str) -> Result<Metric> {
    match s {
        "accuracy" => Ok(Metric::Accuracy),
        "spearman" => Ok(Metric::Spearman),
        other => bail!("{at}: unknown metric {other:?} (expected \"accuracy\" or \"spearman\")"),
    }
}

fn check_cap(v: Option<usize>, at: &str) -> Result<()> {
    if v == Some(0) {
        bail!("{at}: must be at least 1 (leave it out for no cap)");
    }
    Ok(())
}

fn resolve(raw: RawSuite, file: &Path, profile: Option<&str>, home: &Path) -> Result<Suite> {
    check_name(&raw.name, "name")?;
    if raw.arch.trim().is_empty() {
        bail!("arch: must not be empty");
    }
    // Profile: named overrides on top of the suite-level settings.
    let empty = RawProfile::default();
    let prof = match profile {
        None => &empty,
        Some(p) => raw.profiles.get(p).ok_or_else(|| {
            let known: Vec<&str> = raw.profiles.keys().map(String::as_str).collect();
            anyhow!(
                "--profile {p}: no such profile in `profiles` (defined: {})",
                list_or_none(&known)
            )
        })?,
    };
    let at_prof = |field: &str| match profile {
        Some(p) => format!("profiles.{p}.{field}"),
        None => field.to_string(),
    };

    let suite_protocol = Protocol::default().with(&raw.protocol);
    suite_protocol.validate("protocol")?;
    let base_protocol = suite_protocol.with(&prof.protocol);
    base_protocol.validate(&at_prof("protocol"))?;
    check_cap(raw.max_train, "max_train")?;
    check_cap(raw.max_eval, "max_eval")?;
    check_cap(prof.max_train, &at_prof("max_train"))?;
    check_cap(prof.max_eval, &at_prof("max_eval"))?;
    let max_train = prof.max_train.or(raw.max_train);
    let max_eval = prof.max_eval.or(raw.max_eval);

    // Seeds: validate the suite's and the profile's own values, then combine.
    for (seeds, at) in [
        (&raw.seeds, "seeds".to_string()),
        (&prof.seeds, at_prof("seeds")),
    ] {
        if let Some(b) = seeds.baseline {
            if b < MIN_BASELINE_SEEDS {
                bail!("{at}.baseline: {b} seeds; the baseline needs at least {MIN_BASELINE_SEEDS} (its spread is the noise yardstick)");
            }
        }
        if seeds.candidates == Some(0) {
            bail!("{at}.candidates: 0 seeds; at least 1 is needed");
        }
    }
    let seeds = Seeds {
        baseline: prof
            .seeds
            .baseline
            .or(raw.seeds.baseline)
            .unwrap_or(DEFAULT_BASELINE_SEEDS),
        candidates: prof
            .seeds
            .candidates
            .or(raw.seeds.candidates)
            .unwrap_or(DEFAULT_CANDIDATE_SEEDS),
    };

    // Models: names unique across baseline, candidates and donors.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut claim = |name: &str, at: String| -> Result<()> {
        if let Some(prev) = names.get(name) {
            bail!("{at}.name: duplicate model name {name:?} (already used by {prev})");
        }
        names.insert(name.to_string(), at);
        Ok(())
    };
    let baseline = resolve_model(&raw.baseline, home, "baseline")?;
    claim(&baseline.name, "baseline".into())?;
    let mut candidates = Vec::new();
    for (i, m) in raw.candidates.iter().enumerate() {
        let at = format!("candidates[{i}]");
        let entry = resolve_model(m, home, &at)?;
        claim(&entry.name, at)?;
        candidates.push(entry);
    }
    let mut donors = Vec::new();
    for (i, d) in raw.donors.iter().enumerate() {
        let at = format!("donors[{i}]");
        check_name(&d.name, &format!("{at}.name"))?;
        claim(&d.name, at.clone())?;
        let base = std::iter::once(&baseline)
            .chain(candidates.iter())
            .find(|m| m.name == d.base)
            .cloned()
            .ok_or_else(|| {
                let mut known = vec![baseline.name.as_str()];
                known.extend(candidates.iter().map(|c| c.name.as_str()));
                anyhow!(
                    "{at}.base: unknown model {:?} (known: {})",
                    d.base,
                    known.join(", ")
                )
            })?;
        let protocol = base_protocol.with(&d.protocol);
        protocol.validate(&format!("{at}.protocol"))?;
        check_cap(d.max_train, &format!("{at}.max_train"))?;
        donors.push(Donor {
            name: d.name.clone(),
            base,
            source: resolve_dataset(&d.source, home, &format!("{at}.source"))?,
            protocol,
            max_train: d.max_train.or(max_train),
            max_eval,
        });
    }

    if raw.targets.is_empty() {
        bail!("targets: a suite needs at least one target");
    }
    let mut target_names = BTreeSet::new();
    let mut targets = Vec::new();
    for (i, t) in raw.targets.iter().enumerate() {
        let at = format!("targets[{i}]");
        check_name(&t.name, &format!("{at}.name"))?;
        if !target_names.insert(t.name.clone()) {
            bail!("{at}.name: duplicate target name {:?}", t.name);
        }
        let protocol = base_protocol.with(&t.protocol);
        protocol.validate(&format!("{at}.protocol"))?;
        check_cap(t.max_train, &format!("{at}.max_train"))?;
        check_cap(t.max_eval, &format!("{at}.max_eval"))?;
        let dataset = resolve_dataset(&t.dataset, home, &format!("{at}.dataset"))?;
        let metric = parse_metric(&t.metric, &format!("{at}.metric"))?;
        if let (Metric::Spearman, DatasetRef::Hub { mapping, .. }) = (metric, &dataset) {
            if mapping.labels.is_some() {
                bail!("{at}.dataset.labels: a spearman (regression) target has scores, not labels");
            }
        }
        targets.push(Target {
            name: t.name.clone(),
            dataset,
            metric,
            protocol,
            max_train: t.max_train.or(max_train),
            max_eval: t.max_eval.or(max_eval),
        });
    }

    let fusion = match &raw.fusion {
        None => None,
        Some(rf) => Some(resolve_fusion(
            rf,
            &FusionContext {
                suite: &raw.name,
                baseline: &baseline,
                candidates: &candidates,
                donors: &donors,
                targets: &targets,
                protocol: &base_protocol,
                max_train,
                max_eval,
                home,
            },
        )?),
    };

    Ok(Suite {
        file: file.to_path_buf(),
        name: raw.name,
        arch: raw.arch,
        profile: profile.map(str::to_string),
        baseline,
        candidates,
        donors,
        targets,
        seeds,
        fusion,
    })
}

/// What a fusion section is resolved against.
struct FusionContext<'a> {
    suite: &'a str,
    baseline: &'a ModelEntry,
    candidates: &'a [ModelEntry],
    donors: &'a [Donor],
    targets: &'a [Target],
    protocol: &'a Protocol,
    max_train: Option<usize>,
    max_eval: Option<usize>,
    home: &'a Path,
}

fn resolve_fusion(rf: &RawFusion, cx: &FusionContext) -> Result<Fusion> {
    let models = std::iter::once(cx.baseline).chain(cx.candidates.iter());
    let donor_names = cx.donors.iter().map(|d| &d.name);
    if let Some(n) = models
        .clone()
        .map(|m| &m.name)
        .chain(donor_names)
        .find(|n| n.starts_with(FUSION_NAME_PREFIX))
    {
        bail!("fusion: model name {n:?} starts with {FUSION_NAME_PREFIX:?}, which is reserved for fusion iterations");
    }
    if rf.iterations == 0 {
        bail!("fusion.iterations: must be at least 1");
    }
    // Each iteration fine-tunes every contributor and evaluates on every held-out target; the
    // whole plan is built up front, so an absurd count would stall before the first job.
    if rf.iterations > MAX_FUSION_ITERATIONS {
        bail!(
            "fusion.iterations: {} is more than {MAX_FUSION_ITERATIONS} (ColD Fusion used 5 to 30)",
            rf.iterations
        );
    }
    let mut sources: Vec<FusionSource> = Vec::new();
    for (i, s) in rf.sources.iter().enumerate() {
        let at = format!("fusion.sources[{i}]");
        let source = match s {
            RawFusionSource::Name(name) => {
                let dataset = cx
                    .targets
                    .iter()
                    .find(|t| &t.name == name)
                    .map(|t| t.dataset.clone())
                    .or_else(|| {
                        cx.donors
                            .iter()
                            .find(|d| &d.name == name)
                            .map(|d| d.source.clone())
                    })
                    .ok_or_else(|| {
                        anyhow!("{at}: {name:?} is neither a target nor a donor of the suite (give {{\"name\", \"path\"}} for another dataset)")
                    })?;
                FusionSource {
                    name: name.clone(),
                    dataset,
                }
            }
            RawFusionSource::Dataset(d) => {
                let raw = RawDataset {
                    path: d.path.clone(),
                    hub: d.hub.clone(),
                    config: d.config.clone(),
                    revision: d.revision.clone(),
                    columns: None,
                    splits: None,
                    labels: None,
                };
                FusionSource {
                    name: d.name.clone(),
                    dataset: resolve_dataset(&raw, cx.home, &at)?,
                }
            }
        };
        check_name(&source.name, &format!("{at}.name"))?;
        if let Some(j) = sources.iter().position(|x| x.name == source.name) {
            bail!(
                "{at}: duplicate source {:?} (also fusion.sources[{j}])",
                source.name
            );
        }
        sources.push(source);
    }
    if rf.contributors == 0 || rf.contributors > sources.len() {
        bail!(
            "fusion.contributors: {} contributors per iteration need between 1 and the {} sources",
            rf.contributors,
            sources.len()
        );
    }
    let base = match &rf.base {
        None => cx.baseline.clone(),
        Some(name) => models
            .clone()
            .find(|m| &m.name == name)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = models.clone().map(|m| m.name.as_str()).collect();
                anyhow!(
                    "fusion.base: unknown model {name:?} (known: {})",
                    known.join(", ")
                )
            })?,
    };
    let protocol = cx.protocol.with(&rf.protocol);
    protocol.validate("fusion.protocol")?;
    check_cap(rf.max_train, "fusion.max_train")?;
    let fusion = Fusion {
        iterations: rf.iterations,
        contributors: rf.contributors,
        sources,
        seed: rf.seed,
        protocol,
        base,
        max_train: rf.max_train.or(cx.max_train),
        max_eval: cx.max_eval,
        suite: cx.suite.to_string(),
        dir: cx.home.join("fusion").join(cx.suite),
    };
    if fusion.held_out(cx.targets).is_empty() {
        bail!("fusion.sources: every target is a source, so no target is left to evaluate the fused bases on");
    }
    Ok(fusion)
}

fn list_or_none(v: &[&str]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_precision_defaults_to_f32_and_is_left_out_of_its_json() {
        let p = Protocol::default();
        assert!(serde_json::to_value(&p).unwrap().get("precision").is_none());
        let o: ProtocolOverrides = serde_json::from_str(r#"{"precision": "bf16"}"#).unwrap();
        let q = p.with(&o);
        assert_eq!(q.precision, Precision::Bf16);
        assert_eq!(serde_json::to_value(&q).unwrap()["precision"], "bf16");
        assert!(serde_json::from_str::<ProtocolOverrides>(r#"{"precision": "fp8"}"#).is_err());
        let cfg = crate::executor::train_config(&q, 0).unwrap();
        assert_eq!(cfg.precision, Precision::Bf16);
    }

    const OK: &str = r#"{
        "name": "s", "arch": "roberta-base",
        "baseline": {"name": "base", "hub": "roberta-base@main"},
        "candidates": [{"name": "c1", "path": "${RECYCLE_HOME}/models/c1"}],
        "donors": [{"name": "d1", "base": "base", "source": {"hub": "glue", "config": "mnli"}}],
        "targets": [{"name": "t1", "dataset": {"path": "data/t1"}, "metric": "accuracy",
                     "protocol": {"learning_rate": 1e-4}}],
        "protocol": {"max_epochs": 3},
        "profiles": {"quick": {"seeds": {"baseline": 3}, "max_train": 64, "protocol": {"batch_size": 32}}}
    }"#;

    fn parse(text: &str, profile: Option<&str>) -> Result<Suite> {
        Suite::parse(
            text,
            Path::new("configs/x.json"),
            profile,
            Path::new("/home/r"),
        )
    }

    #[test]
    fn resolves_defaults_overrides_and_profiles() {
        let s = parse(OK, None).unwrap();
        assert_eq!(
            s.seeds,
            Seeds {
                baseline: 5,
                candidates: 1
            }
        );
        assert_eq!(s.targets[0].protocol.learning_rate, 1e-4);
        assert_eq!(s.targets[0].protocol.max_epochs, 3);
        assert_eq!(s.targets[0].protocol.batch_size, 256);
        assert_eq!(
            s.candidates[0].source,
            ModelRef::Path {
                raw: "${RECYCLE_HOME}/models/c1".into(),
                resolved: "/home/r/models/c1".into()
            }
        );
        let q = parse(OK, Some("quick")).unwrap();
        assert_eq!(q.seeds.baseline, 3);
        assert_eq!(q.targets[0].max_train, Some(64));
        assert_eq!(q.targets[0].protocol.batch_size, 32);
        assert_eq!(q.targets[0].protocol.learning_rate, 1e-4);
        let names: Vec<String> = q.evaluated_models().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["base", "c1", "d1"]);
    }

    #[test]
    fn unknown_profile_names_the_flag() {
        let e = format!("{:#}", parse(OK, Some("full")).unwrap_err());
        assert!(e.contains("--profile full") && e.contains("quick"), "{e}");
    }

    #[test]
    fn bad_metric_names_file_and_field_path() {
        let text = OK.replace("\"accuracy\"", "\"f1\"");
        let e = format!("{:#}", parse(&text, None).unwrap_err());
        assert!(
            e.starts_with("configs/x.json: targets[0].metric: unknown metric \"f1\""),
            "{e}"
        );
    }

    #[test]
    fn a_bad_profile_is_reported_whichever_profile_runs() {
        // batch 32 with micro-batch 64 is valid at the suite level and broken in `quick`.
        let text = OK.replace(
            r#""protocol": {"batch_size": 32}"#,
            r#""protocol": {"batch_size": 24, "micro_batch_size": 16}"#,
        );
        assert_ne!(text, OK);
        for profile in [None, Some("quick")] {
            let e = format!("{:#}", parse(&text, profile).unwrap_err());
            assert!(
                e.contains("profiles.quick.protocol.micro_batch_size: 16 does not divide"),
                "{profile:?}: {e}"
            );
        }
    }

    #[test]
    fn max_length_leaves_room_for_the_special_tokens() {
        let text = OK.replace(r#""max_epochs": 3"#, r#""max_epochs": 3, "max_length": 1"#);
        let e = format!("{:#}", parse(&text, None).unwrap_err());
        assert!(e.contains("protocol.max_length: must be at least 2"), "{e}");
        let text = OK.replace(r#""max_epochs": 3"#, r#""max_epochs": 3, "max_length": 2"#);
        parse(&text, None).unwrap();
    }

    #[test]
    fn an_empty_suite_file_says_so() {
        for text in ["", "  \n"] {
            let e = format!("{:#}", parse(text, None).unwrap_err());
            assert!(e.contains("configs/x.json: the suite file is empty"), "{e}");
        }
    }

    #[test]
    fn fusion_iterations_are_bounded() {
        let fusion = |n: usize| {
            OK.replace(
                r#""protocol": {"max_epochs": 3},"#,
                &format!(
                    r#""protocol": {{"max_epochs": 3}},
                    "fusion": {{"iterations": {n}, "contributors": 1,
                               "sources": [{{"name": "s1", "path": "data/s1"}}]}},"#
                ),
            )
        };
        parse(&fusion(MAX_FUSION_ITERATIONS), None).unwrap();
        let e = format!(
            "{:#}",
            parse(&fusion(MAX_FUSION_ITERATIONS + 1), None).unwrap_err()
        );
        assert!(
            e.contains("fusion.iterations: 1001 is more than 1000"),
            "{e}"
        );
    }
}
