//! Importing a user's dataset: typed import settings in, a validated in-memory [`Draft`] out.
//!
//! Nothing here writes; `store::write_dataset` does, once the whole dataset has been read.

use super::card::{ColumnMap, SplitRecord};
use super::read::{infer_labels, read_raw, to_examples, RawRecord, Value};
use super::split::stratified_split;
use super::store::Draft;
use super::{Example, Task};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What the label column means.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelMode {
    /// Classes named by `labels`, or the sorted distinct label values when `None`.
    Classification {
        labels: Option<Vec<String>>,
    },
    Regression,
}

/// Everything `recycle data import` was asked to do, parsed.
#[derive(Debug, Clone)]
pub struct ImportSpec {
    pub name: String,
    /// A table file (CSV/TSV/JSONL/parquet) or a folder with one sub-folder of text files per class.
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub test: Option<PathBuf>,
    pub columns: ColumnMap,
    pub labels: LabelMode,
    /// Fraction of each class of train carved into validation when there is no validation file.
    pub dev_fraction: f64,
    /// Fraction of each class of train carved into test when there is no test file.
    pub test_fraction: f64,
    pub seed: u64,
    pub source: Option<String>,
    pub license: Option<String>,
}

/// Reads every source file of `spec` and returns the dataset it describes (nothing is written).
pub fn build(spec: &ImportSpec) -> Result<Draft> {
    for (flag, f) in [
        ("--dev-fraction", spec.dev_fraction),
        ("--test-fraction", spec.test_fraction),
    ] {
        if !(0.0..1.0).contains(&f) {
            bail!("{flag} must be in [0, 1), got {f}");
        }
    }
    if spec.dev_fraction + spec.test_fraction >= 1.0 {
        bail!("--dev-fraction + --test-fraction must be below 1");
    }
    let mut raw: Vec<(String, PathBuf, Vec<RawRecord>)> = Vec::new();
    for (name, path) in [
        ("train", Some(&spec.train)),
        ("validation", spec.validation.as_ref()),
        ("test", spec.test.as_ref()),
    ] {
        if let Some(path) = path {
            let rows = if path.is_dir() {
                read_class_folders(path)?
            } else {
                read_raw(path, &spec.columns)?
            };
            if rows.is_empty() {
                bail!("{}: split `{name}` is empty (no rows)", path.display());
            }
            raw.push((name.to_string(), path.clone(), rows));
        }
    }
    let task = match &spec.labels {
        LabelMode::Regression => Task::Regression,
        LabelMode::Classification { labels: Some(l) } => Task::Classification { labels: l.clone() },
        LabelMode::Classification { labels: None } => {
            let all: Vec<RawRecord> = raw.iter().flat_map(|(_, _, r)| r.iter().cloned()).collect();
            let labels = infer_labels(&all);
            if labels.is_empty() {
                bail!(
                    "{}: no labels found to infer label names from (pass --labels)",
                    spec.train.display()
                );
            }
            Task::Classification { labels }
        }
    };
    let mut splits: Vec<(String, Vec<Example>)> = Vec::new();
    for (name, path, rows) in &raw {
        let examples = to_examples(path, rows, &task)?;
        // Reading maps an empty or null label cell to "no label" (hidden test labels on the hub);
        // an imported row must have one.
        if let Some(r) = rows
            .iter()
            .zip(&examples)
            .find_map(|(r, e)| e.label.is_none().then_some(r))
        {
            bail!("{}, {}: the label cell is empty", path.display(), r.at);
        }
        splits.push((name.clone(), examples));
    }
    let mut carve: Vec<(String, f64)> = Vec::new();
    if spec.validation.is_none() {
        carve.push(("validation".into(), spec.dev_fraction));
    }
    if spec.test.is_none() {
        carve.push(("test".into(), spec.test_fraction));
    }
    let split_seed = if carve.is_empty() {
        None
    } else {
        let train = std::mem::take(&mut splits[0].1);
        let fractions: Vec<f64> = carve.iter().map(|(_, f)| *f).collect();
        let mut parts = stratified_split(&train, &fractions, spec.seed);
        splits[0].1 = parts.pop().unwrap_or_default();
        for ((name, _), part) in carve.iter().zip(parts) {
            if part.is_empty() {
                bail!(
                    "split `{name}` carved from {} would be empty (raise --dev-fraction / --test-fraction or give the file)",
                    spec.train.display()
                );
            }
            splits.push((name.clone(), part));
        }
        Some(SplitRecord {
            seed: spec.seed,
            from: "train".into(),
            carved: carve,
        })
    };
    splits.sort_by_key(|(n, _)| split_rank(n));
    let source = spec.source.clone().unwrap_or_else(|| {
        raw.iter()
            .map(|(n, p, _)| format!("{n}: {}", p.display()))
            .collect::<Vec<_>>()
            .join("; ")
    });
    let draft = Draft {
        name: spec.name.clone(),
        task,
        source,
        license: spec.license.clone().unwrap_or_else(|| "unknown".into()),
        split_seed,
        splits,
    };
    super::store::validate(&draft)?;
    Ok(draft)
}

/// Canonical split order: train, validation, test, then anything else.
pub fn split_rank(name: &str) -> usize {
    match name {
        "train" => 0,
        "validation" => 1,
        "test" => 2,
        _ => 3,
    }
}

/// Reads a folder holding one sub-folder per class, one UTF-8 text file per example
/// (sub-folders and files in name order). Hidden entries are skipped.
pub fn read_class_folders(dir: &Path) -> Result<Vec<RawRecord>> {
    let mut out = Vec::new();
    for class_dir in sorted_entries(dir)? {
        if !class_dir.is_dir() {
            continue;
        }
        let class = class_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        for file in sorted_entries(&class_dir)? {
            if !file.is_file() {
                continue;
            }
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}: invalid UTF-8 at byte {}",
                    file.display(),
                    e.utf8_error().valid_up_to()
                )
            })?;
            out.push(RawRecord {
                at: format!("file {}", file.display()),
                text: Value::Str(text.trim_end().to_string()),
                text_pair: None,
                label: Some(Value::Str(class.clone())),
            });
        }
    }
    Ok(out)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(".")
                .starts_with('.')
        })
        .collect();
    v.sort();
    Ok(v)
}
