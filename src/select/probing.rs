//! One probe, end to end: a checkpoint directory and a dataset in, frozen-feature scores out (linear
//! probe accuracy, LogME, H-score). Features go through the [`FeatureCache`]; this module reads the
//! checkpoint and its tokenizer but writes nothing except cache files.

use super::features::{extract, FeatureCache, FeatureKey, FeatureSpec, FEATURES_VERSION};
use super::hscore::{hscore, CovInverse};
use super::linear_probe::{probe, ProbeConfig};
use super::logme::{logme, logme_regression};
use super::rng::SplitMix64;
use super::Matrix;
use crate::data::{Dataset, Example, Label, Task};
use crate::model::{load, LoadOptions, Problem};
use crate::results::{FeatureLayers, FeaturePooling, ProbeScores};
use crate::tokenize::TextTokenizer;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Settings of a probe; every default in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSettings {
    pub pooling: FeaturePooling,
    pub layers: FeatureLayers,
    /// Tokens per example (longer inputs are truncated).
    pub max_length: usize,
    /// Examples per forward pass.
    pub batch_size: usize,
    /// At most this many training examples (a seeded subsample), `None`: all.
    pub max_train: Option<usize>,
    /// At most this many evaluation examples (a seeded subsample), `None`: all.
    pub max_eval: Option<usize>,
    /// Seed of the subsamples.
    pub sample_seed: u64,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            // Mean pooling of the last layer: what sentence encoders (MiniLM) are trained for, and
            // close to the paper's LP on the encoder output.
            pooling: FeaturePooling::Mean,
            layers: FeatureLayers::Last,
            max_length: 128,
            batch_size: 64,
            max_train: None,
            max_eval: None,
            sample_seed: 0,
        }
    }
}

/// A probe's scores and what they were computed on.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeRun {
    pub scores: ProbeScores,
    pub weights_sha256: String,
    pub dataset_fingerprint: String,
    /// The cache key's hash: everything the features depend on.
    pub feature_key: String,
    pub n_train: usize,
    pub n_eval: usize,
    /// What makes these scores weak: classes missing from the training sample or with a single
    /// example there (`sample_warnings`). Empty when there is nothing to say.
    pub warnings: Vec<String>,
}

/// Warnings about a classification probe's training sample: labels `y` of `classes` classes.
/// A class absent from the sample cannot be predicted at all (the linear probe scores 0 on it, and
/// LogME and the H-score see one class fewer); a class with one example has no spread for LogME
/// and the H-score to measure.
pub fn sample_warnings(y: &[usize], classes: usize) -> Vec<String> {
    let mut counts = vec![0usize; classes];
    for &c in y {
        if let Some(n) = counts.get_mut(c) {
            *n += 1;
        }
    }
    let with = |want: fn(usize) -> bool| -> Vec<String> {
        (0..classes)
            .filter(|&c| want(counts[c]))
            .map(|c| c.to_string())
            .collect()
    };
    let (absent, single) = (with(|n| n == 0), with(|n| n == 1));
    let mut out = Vec::new();
    if !absent.is_empty() {
        out.push(format!(
            "the training sample ({} examples) has no example of class(es) {}: the probe cannot \
             predict them",
            y.len(),
            absent.join(", ")
        ));
    }
    if !single.is_empty() {
        out.push(format!(
            "the training sample ({} examples) has a single example of class(es) {}: the scores \
             are unreliable",
            y.len(),
            single.join(", ")
        ));
    }
    out
}

/// The split the probe is scored on: `validation` when it has labels, else `test`. Validation
/// first: `recycle select` probes a target to choose which candidates to fine-tune and then reports
/// their gains on the target's test split, so a probe scored on test would pick with the labels
/// it is judged on.
fn eval_split(dataset: &Dataset) -> Result<&'static str> {
    for name in ["validation", "test"] {
        if let Ok(rows) = dataset.split(name) {
            if rows.iter().any(|e| e.label.is_some()) {
                return Ok(name);
            }
        }
    }
    bail!(
        "dataset `{}` ({}) has no labelled test or validation split to score the probe on",
        dataset.card.name,
        dataset.dir.display()
    )
}

/// The labelled examples of a split, a seeded subsample of `cap` of them when it applies (kept in
/// file order, so the sample does not depend on how the file was sorted beyond membership).
fn sample(rows: &[Example], cap: Option<usize>, seed: u64) -> Vec<Example> {
    let labelled: Vec<&Example> = rows.iter().filter(|e| e.label.is_some()).collect();
    let n = labelled.len();
    let keep = cap.map_or(n, |c| c.min(n));
    if keep == n {
        return labelled.into_iter().cloned().collect();
    }
    // Partial Fisher–Yates: the first `keep` positions of a seeded permutation.
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in 0..keep {
        let j = i + rng.below(n - i);
        idx.swap(i, j);
    }
    let mut chosen = idx[..keep].to_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| labelled[i].clone()).collect()
}

/// sha256 over a checkpoint's weight files (`*.safetensors`, by name), streamed.
pub fn weights_sha256(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list model directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "{}: no .safetensors weights to probe",
        dir.display()
    );
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file =
            std::fs::File::open(&f).with_context(|| format!("cannot open {}", f.display()))?;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", f.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Computes the features of `splits` with the checkpoint in `model_dir`.
fn compute(
    model_dir: &Path,
    splits: &[(String, Vec<Example>)],
    settings: &ProbeSettings,
    device: &Device,
) -> Result<HashMap<String, Matrix>> {
    let opts = LoadOptions {
        num_labels: 2,
        problem: Problem::SingleLabel,
        seed: 0,
        precision: crate::model::Precision::F32,
        hidden_dropout: None,
    };
    let loaded = load(model_dir, &opts, device)?;
    let model = loaded.inference_model()?;
    let tokenizer = TextTokenizer::for_checkpoint(model_dir, settings.max_length)?;
    let spec = FeatureSpec {
        pooling: settings.pooling,
        layers: settings.layers,
        batch_size: settings.batch_size,
    };
    let mut out = HashMap::new();
    for (name, rows) in splits {
        let encoded = tokenizer.encode(rows)?;
        let m = extract(model.as_ref(), &encoded, tokenizer.pad_id(), &spec, device)
            .with_context(|| format!("{}: features of split {name}", model_dir.display()))?;
        out.insert(name.clone(), m);
    }
    Ok(out)
}

fn class_labels(rows: &[Example], num_classes: usize, split: &str) -> Result<Vec<usize>> {
    rows.iter()
        .enumerate()
        .map(|(i, e)| match e.label {
            Some(Label::Class(c)) if (c as usize) < num_classes => Ok(c as usize),
            other => bail!(
                "split {split}, example {i}: expected a class below {num_classes}, found {other:?}"
            ),
        })
        .collect()
}

/// Probes the checkpoint in `model_dir` on `dataset`: features of the train split and of the eval
/// split (from the cache when present), then the three scores. `name` is the proxy column the
/// scores fill, if any.
pub fn probe_model(
    model_dir: &Path,
    dataset: &Dataset,
    name: Option<String>,
    settings: &ProbeSettings,
    cache: &FeatureCache,
    device: &Device,
) -> Result<ProbeRun> {
    let ds = &dataset.card.name;
    let eval = eval_split(dataset)?;
    let train = sample(
        dataset.split("train")?,
        settings.max_train,
        settings.sample_seed,
    );
    let test = sample(
        dataset.split(eval)?,
        settings.max_eval,
        settings.sample_seed ^ 1,
    );
    ensure!(
        train.len() >= 2,
        "dataset `{ds}`: the probe needs at least 2 labelled training examples"
    );
    let splits = vec![("train".to_string(), train), (eval.to_string(), test)];
    let key = FeatureKey {
        version: FEATURES_VERSION,
        weights_sha256: weights_sha256(model_dir)?,
        dataset_fingerprint: dataset.fingerprint(),
        splits: splits.iter().map(|(n, r)| (n.clone(), r.len())).collect(),
        sample_seed: settings.sample_seed,
        pooling: settings.pooling,
        layers: settings.layers,
        max_length: settings.max_length,
    };
    let (features, cached) =
        cache.get_or_compute(&key, || compute(model_dir, &splits, settings, device))?;
    let train_x = features
        .get("train")
        .context("cached features lack the train split")?;
    let eval_x = features
        .get(eval)
        .with_context(|| format!("cached features lack split {eval}"))?;
    let mut warnings = Vec::new();
    let (lp, lm, hs) = match dataset.task() {
        Task::Classification { labels } => {
            let c = labels.len();
            let ytr = class_labels(&splits[0].1, c, "train")?;
            warnings = sample_warnings(&ytr, c)
                .into_iter()
                .map(|w| format!("dataset `{ds}`: {w}"))
                .collect();
            let yte = class_labels(&splits[1].1, c, eval)?;
            let lp = probe(train_x, &ytr, eval_x, &yte, c, &ProbeConfig::default())
                .with_context(|| format!("dataset `{ds}`: linear probe"))?;
            let lm = logme(train_x, &ytr, c).with_context(|| format!("dataset `{ds}`: LogME"))?;
            let hs = hscore(train_x, &ytr, c, CovInverse::default())
                .with_context(|| format!("dataset `{ds}`: H-score"))?;
            (Some(lp.test_accuracy), Some(lm), Some(hs))
        }
        Task::Regression => {
            let y: Vec<f64> = splits[0]
                .1
                .iter()
                .map(|e| match e.label {
                    Some(Label::Score(s)) => f64::from(s),
                    Some(Label::Class(c)) => f64::from(c),
                    None => f64::NAN,
                })
                .collect();
            let lm = logme_regression(train_x, &y)
                .with_context(|| format!("dataset `{ds}`: LogME (regression)"))?;
            (None, Some(lm), None)
        }
    };
    Ok(ProbeRun {
        scores: ProbeScores {
            name,
            pooling: settings.pooling,
            layers: settings.layers,
            features: train_x.cols(),
            eval_split: eval.to_string(),
            lp_accuracy: lp,
            logme: lm,
            hscore: hs,
            cached,
        },
        weights_sha256: key.weights_sha256.clone(),
        dataset_fingerprint: key.dataset_fingerprint.clone(),
        feature_key: key.hash()?,
        n_train: train_x.rows(),
        n_eval: eval_x.rows(),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::store::{write_dataset, Draft, Existing};

    #[test]
    fn sample_warnings_name_absent_and_single_example_classes() {
        // Every class twice: nothing to say.
        assert!(sample_warnings(&[0, 0, 2, 2, 1, 1], 3).is_empty());
        let w = sample_warnings(&[0, 0, 0, 2], 4);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("no example of class(es) 1, 3"), "{w:?}");
        assert!(w[1].contains("single example of class(es) 2"), "{w:?}");
        assert!(w.iter().all(|l| l.contains("(4 examples)")), "{w:?}");
    }
    use crate::data::{Label, Task};

    fn stored(dir: &Path, splits: &[&str]) -> Dataset {
        let rows = |k: u32| -> Vec<Example> {
            (0..4)
                .map(|i| Example {
                    text: format!("row {k} {i}"),
                    text_pair: None,
                    label: Some(Label::Class(i % 2)),
                })
                .collect()
        };
        let draft = Draft {
            name: "d".into(),
            task: Task::Classification {
                labels: vec!["a".into(), "b".into()],
            },
            source: "test".into(),
            license: "none".into(),
            split_seed: None,
            splits: splits
                .iter()
                .enumerate()
                .map(|(k, s)| (s.to_string(), rows(k as u32)))
                .collect(),
        };
        write_dataset(dir, &draft, Existing::Fail).unwrap();
        Dataset::load(dir).unwrap()
    }

    #[test]
    fn the_probe_is_scored_on_validation_never_test_when_there_is_one() {
        let tmp = tempfile::tempdir().unwrap();
        let both = stored(&tmp.path().join("both"), &["train", "validation", "test"]);
        assert_eq!(eval_split(&both).unwrap(), "validation");
        let test_only = stored(&tmp.path().join("t"), &["train", "test"]);
        assert_eq!(eval_split(&test_only).unwrap(), "test");
        let train_only = stored(&tmp.path().join("n"), &["train"]);
        assert!(eval_split(&train_only).is_err());
    }
}
