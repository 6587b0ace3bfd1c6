//! The dataset card (`dataset.json`): what a dataset directory holds and how to read it back.

use super::Task;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the card inside a dataset directory.
pub const CARD_FILE: &str = "dataset.json";

/// Version of the card layout; bumped when a field changes meaning.
pub const CARD_SCHEMA_VERSION: u32 = 1;

/// Everything recycle records about one dataset directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Card {
    pub schema_version: u32,
    pub name: String,
    pub task: Task,
    pub columns: ColumnMap,
    /// The splits in their canonical order (train, validation, test, then any others).
    pub splits: Vec<SplitEntry>,
    /// Where the rows came from (package, file, URL), free text.
    pub source: String,
    pub license: String,
    /// Present when recycle carved some splits itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_seed: Option<SplitRecord>,
}

/// Which columns of a split file hold the text, the optional second text and the label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMap {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_pair: Option<String>,
    /// `None` reads every row as unlabelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl ColumnMap {
    /// The column names recycle itself writes.
    pub fn standard(pair: bool) -> ColumnMap {
        ColumnMap {
            text: "text".into(),
            text_pair: pair.then(|| "text_pair".into()),
            label: Some("label".into()),
        }
    }
}

/// One split file, with the row count and checksum that `Dataset::load` verifies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitEntry {
    pub name: String,
    /// Path relative to the dataset directory.
    pub file: String,
    pub rows: usize,
    pub sha256: String,
}

/// How recycle made the splits the source did not have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRecord {
    pub seed: u64,
    /// The split the new ones were carved from.
    pub from: String,
    /// New split name and the fraction of `from` (per class) that went into it.
    pub carved: Vec<(String, f64)>,
}

impl Card {
    /// Reads and validates `dir/dataset.json`.
    pub fn read(dir: &Path) -> Result<Card> {
        let path = dir.join(CARD_FILE);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading dataset card {}", path.display()))?;
        let card: Card = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing dataset card {}", path.display()))?;
        card.validate()
            .with_context(|| format!("dataset card {}", path.display()))?;
        Ok(card)
    }

    /// Checks what serde cannot: schema version, unique split names, safe relative file names.
    pub fn validate(&self) -> Result<()> {
        if self.schema_version != CARD_SCHEMA_VERSION {
            bail!(
                "field `schema_version` is {}, this recycle reads {}",
                self.schema_version,
                CARD_SCHEMA_VERSION
            );
        }
        if self.name.is_empty() {
            bail!("field `name` is empty");
        }
        if let Task::Classification { labels } = &self.task {
            if labels.is_empty() {
                bail!("field `task.labels` is empty");
            }
            let mut seen = std::collections::HashSet::new();
            for l in labels {
                if !seen.insert(l) {
                    bail!("field `task.labels` names `{l}` twice");
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.splits {
            if !seen.insert(&s.name) {
                bail!("field `splits` names split `{}` twice", s.name);
            }
            let p = Path::new(&s.file);
            if p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                bail!("split `{}`: field `file` must be a path inside the dataset directory, got `{}`", s.name, s.file);
            }
        }
        Ok(())
    }

    pub fn split(&self, name: &str) -> Option<&SplitEntry> {
        self.splits.iter().find(|s| s.name == name)
    }
}
