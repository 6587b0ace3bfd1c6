//! Writing a dataset directory: every split plus its card, into a temporary directory beside the
//! target that is renamed into place, so a half-written dataset never exists.

use super::card::{Card, ColumnMap, SplitEntry, SplitRecord, CARD_FILE, CARD_SCHEMA_VERSION};
use super::{Example, Label, Task};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

/// What to do when the output directory already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse, naming the directory.
    Fail,
    /// Swap the new directory in and delete the old one.
    Replace,
}

/// A dataset in memory, ready to be written: everything on its card but the file hashes.
#[derive(Debug, Clone)]
pub struct Draft {
    pub name: String,
    pub task: Task,
    pub source: String,
    pub license: String,
    pub split_seed: Option<SplitRecord>,
    /// Splits in canonical order (train, validation, test).
    pub splits: Vec<(String, Vec<Example>)>,
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks a draft before anything is written: non-empty splits, labels that fit the task.
pub fn validate(draft: &Draft) -> Result<()> {
    if draft.splits.is_empty() {
        bail!("dataset `{}` has no splits", draft.name);
    }
    if let Task::Classification { labels } = &draft.task {
        if labels.len() < 2 {
            bail!(
                "dataset `{}` has {} class{} ({}): classification needs at least two, or every \
                 model scores 100 %",
                draft.name,
                labels.len(),
                if labels.len() == 1 { "" } else { "es" },
                labels.join(", ")
            );
        }
    }
    for (name, rows) in &draft.splits {
        if rows.is_empty() {
            bail!("dataset `{}`: split `{name}` is empty", draft.name);
        }
        for (i, e) in rows.iter().enumerate() {
            match (&draft.task, e.label) {
                (_, None) => bail!(
                    "dataset `{}`, split `{name}`, row {}: no label (every stored row needs one)",
                    draft.name,
                    i + 1
                ),
                (Task::Classification { labels }, Some(Label::Class(c)))
                    if (c as usize) >= labels.len() =>
                {
                    bail!(
                        "dataset `{}`, split `{name}`, row {}: class id {c} out of range",
                        draft.name,
                        i + 1
                    )
                }
                (Task::Classification { .. }, Some(Label::Score(_))) => {
                    bail!("dataset `{}`, split `{name}`, row {}: score label on a classification task", draft.name, i + 1)
                }
                (Task::Regression, Some(Label::Class(_))) => {
                    bail!(
                        "dataset `{}`, split `{name}`, row {}: class label on a regression task",
                        draft.name,
                        i + 1
                    )
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Serialises one split as JSON lines in recycle's standard columns.
pub fn split_bytes(rows: &[Example]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in rows {
        serde_json::to_writer(&mut out, e).context("serialising an example")?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Writes `draft` to `out` atomically and returns its card.
pub fn write_dataset(out: &Path, draft: &Draft, existing: Existing) -> Result<Card> {
    validate(draft)?;
    if out.exists() && existing == Existing::Fail {
        bail!(
            "{} already exists (remove it or choose another --out / name)",
            out.display()
        );
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{}-", draft.name))
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let pair = draft
        .splits
        .iter()
        .any(|(_, rows)| rows.iter().any(|e| e.text_pair.is_some()));
    let mut entries = Vec::new();
    for (name, rows) in &draft.splits {
        let bytes = split_bytes(rows)?;
        let file = format!("{name}.jsonl");
        let path = tmp.path().join(&file);
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        entries.push(SplitEntry {
            name: name.clone(),
            file,
            rows: rows.len(),
            sha256: sha256_hex(&bytes),
        });
    }
    let card = Card {
        schema_version: CARD_SCHEMA_VERSION,
        name: draft.name.clone(),
        task: draft.task.clone(),
        columns: ColumnMap::standard(pair),
        splits: entries,
        source: draft.source.clone(),
        license: draft.license.clone(),
        split_seed: draft.split_seed.clone(),
    };
    card.validate()
        .context("the card recycle was about to write")?;
    let card_path = tmp.path().join(CARD_FILE);
    let mut json = serde_json::to_vec_pretty(&card).context("serialising the dataset card")?;
    json.push(b'\n');
    std::fs::write(&card_path, json).with_context(|| format!("writing {}", card_path.display()))?;
    crate::atomic::replace_dir(tmp, out)?;
    Ok(card)
}
