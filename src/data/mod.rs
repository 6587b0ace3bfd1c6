//! Classification datasets: the example types every other module works with, and dataset
//! directories (split files plus a `dataset.json` card) read back with their checksums verified.

pub mod card;
pub mod import;
pub mod read;
pub mod split;
pub mod store;

pub use card::{Card, ColumnMap, SplitEntry, SplitRecord};
pub use read::read_split_file;
pub use split::stratified_split;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What a dataset asks a model to predict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Task {
    /// Single-label classification over these label names (index = class id).
    Classification { labels: Vec<String> },
    /// One real-valued score per example (STS-B-like), scored by Spearman correlation.
    Regression,
}

impl Task {
    /// Output width of a classification head for this task.
    pub fn num_outputs(&self) -> usize {
        match self {
            Task::Classification { labels } => labels.len(),
            Task::Regression => 1,
        }
    }
}

/// A gold label: a class id or a regression score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Label {
    Class(u32),
    Score(f32),
}

/// One example: a text, an optional second text (pair tasks), and its label when known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_pair: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
}

/// A dataset directory loaded into memory: its card and every split, checksums verified.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub card: Card,
    pub dir: PathBuf,
    splits: Vec<(String, Vec<Example>)>,
}

impl Dataset {
    /// Reads the card and every split of `dir`, verifying each file's sha256 and row count.
    pub fn load(dir: &Path) -> Result<Dataset> {
        let card = Card::read(dir)?;
        let mut splits = Vec::new();
        for entry in &card.splits {
            let path = dir.join(&entry.file);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "dataset `{}`, split `{}`: reading {}",
                    card.name,
                    entry.name,
                    path.display()
                )
            })?;
            let sha = store::sha256_hex(&bytes);
            if sha != entry.sha256 {
                bail!(
                    "dataset `{}`, split `{}`: {} has sha256 {sha}, the card says {} (file changed or corrupt)",
                    card.name,
                    entry.name,
                    path.display(),
                    entry.sha256
                );
            }
            drop(bytes);
            let rows = read_split_file(&path, &card.columns, &card.task)
                .with_context(|| format!("dataset `{}`, split `{}`", card.name, entry.name))?;
            if rows.len() != entry.rows {
                bail!(
                    "dataset `{}`, split `{}`: {} has {} rows, the card says {}",
                    card.name,
                    entry.name,
                    path.display(),
                    rows.len(),
                    entry.rows
                );
            }
            splits.push((entry.name.clone(), rows));
        }
        Ok(Dataset {
            card,
            dir: dir.to_path_buf(),
            splits,
        })
    }

    pub fn task(&self) -> &Task {
        &self.card.task
    }

    /// The examples of split `name`; the error names the dataset and the splits it has.
    pub fn split(&self, name: &str) -> Result<&[Example]> {
        self.splits
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, rows)| rows.as_slice())
            .ok_or_else(|| {
                anyhow!(
                    "dataset `{}` ({}) has no split `{name}` (splits: {})",
                    self.card.name,
                    self.dir.display(),
                    self.split_names().join(", ")
                )
            })
    }

    pub fn split_names(&self) -> Vec<&str> {
        self.splits.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// sha256 over the card's split names and hashes: identifies the exact data a result used.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.card)
    }
}

/// The fingerprint of a card (see [`Dataset::fingerprint`]), computable without loading splits.
pub fn fingerprint(card: &Card) -> String {
    let mut h = Sha256::new();
    for s in &card.splits {
        h.update(s.name.as_bytes());
        h.update(b":");
        h.update(s.sha256.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Per-label counts of a split, in label order, plus the number of unlabelled rows last
/// (regression: one "scored" entry).
pub fn label_counts(task: &Task, rows: &[Example]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = match task {
        Task::Classification { labels } => labels.iter().map(|l| (l.clone(), 0)).collect(),
        Task::Regression => vec![("scored".to_string(), 0)],
    };
    let mut unlabelled = 0;
    for e in rows {
        match e.label {
            Some(Label::Class(c)) => {
                if let Some(slot) = out.get_mut(c as usize) {
                    slot.1 += 1;
                }
            }
            Some(Label::Score(_)) => {
                if let Some(slot) = out.first_mut() {
                    slot.1 += 1;
                }
            }
            None => unlabelled += 1,
        }
    }
    if unlabelled > 0 {
        out.push(("(unlabelled)".to_string(), unlabelled));
    }
    out
}
