//! The dataset reader of `finetune`/`predict`: a recycle dataset directory (with `dataset.json`,
//! read by `data::Dataset::load`), or, for quick experiments, a bare JSONL file (`text`,
//! `text_pair`, `label`) or a directory of `train.jsonl` / `validation.jsonl` / `test.jsonl`.

use crate::data::{Example, Label, Task};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A dataset's splits by name, and the task its labels imply.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDataset {
    pub task: Task,
    /// (split name, examples), in file order; a single file is the split "train".
    pub splits: Vec<(String, Vec<Example>)>,
}

impl LocalDataset {
    pub fn split(&self, name: &str) -> Option<&[Example]> {
        self.splits
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.as_slice())
    }

    pub fn split_names(&self) -> Vec<&str> {
        self.splits.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The class ids of a classification task that no example of any split carries: with bare
    /// JSONL's ids 0..=max, a stray id (a 7 among 0s and 1s) makes a head with empty classes.
    pub fn classes_without_examples(&self) -> Vec<u32> {
        let Task::Classification { labels } = &self.task else {
            return Vec::new();
        };
        let seen: std::collections::BTreeSet<u32> = self
            .splits
            .iter()
            .flat_map(|(_, e)| e.iter())
            .filter_map(|e| match e.label {
                Some(Label::Class(c)) => Some(c),
                _ => None,
            })
            .collect();
        (0..labels.len() as u32)
            .filter(|c| !seen.contains(c))
            .collect()
    }
}

const SPLITS: [&str; 3] = ["train", "validation", "test"];

/// Reads `path` (see the module doc). The task: regression if any label is a non-integer number,
/// else classification over classes 0..=max, named by their numbers.
pub fn load_dataset(path: &Path) -> Result<LocalDataset> {
    // A recycle dataset directory (with its card): its own task, label names and splits.
    if path.join(crate::data::card::CARD_FILE).is_file() {
        let d = crate::data::Dataset::load(path)?;
        let mut splits = Vec::new();
        for name in d.split_names() {
            splits.push((name.to_string(), d.split(name)?.to_vec()));
        }
        return Ok(LocalDataset {
            task: d.task().clone(),
            splits,
        });
    }
    let files: Vec<(String, PathBuf)> = if path.is_dir() {
        SPLITS
            .iter()
            .map(|s| (s.to_string(), path.join(format!("{s}.jsonl"))))
            .filter(|(_, p)| p.is_file())
            .collect()
    } else {
        vec![("train".to_string(), path.to_path_buf())]
    };
    if files.is_empty() {
        bail!(
            "--dataset {}: no train.jsonl, validation.jsonl or test.jsonl in this directory",
            path.display()
        );
    }
    let mut splits = Vec::new();
    for (name, file) in files {
        splits.push((name, read_jsonl(&file)?));
    }
    let labels = splits
        .iter()
        .flat_map(|(_, e)| e.iter().filter_map(|e| e.label));
    let mut max_class = None::<u32>;
    let mut regression = false;
    for l in labels {
        match l {
            Label::Class(c) => max_class = Some(max_class.map_or(c, |m| m.max(c))),
            Label::Score(_) => regression = true,
        }
    }
    let task = if regression {
        Task::Regression
    } else {
        let n = max_class.map_or(2, |m| (m as usize + 1).max(2));
        Task::Classification {
            labels: (0..n).map(|i| i.to_string()).collect(),
        }
    };
    Ok(LocalDataset { task, splits })
}

fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not an example", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_directory_of_splits_and_infers_the_task() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("train.jsonl"),
            "{\"text\":\"a\",\"label\":0}\n{\"text\":\"b\",\"text_pair\":\"c\",\"label\":2}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("test.jsonl"), "{\"text\":\"d\"}\n").unwrap();
        let d = load_dataset(dir.path()).unwrap();
        assert_eq!(d.split_names(), vec!["train", "test"]);
        assert_eq!(
            d.task,
            Task::Classification {
                labels: vec!["0".into(), "1".into(), "2".into()]
            }
        );
        assert_eq!(d.split("train").unwrap()[1].text_pair.as_deref(), Some("c"));
        assert_eq!(d.split("test").unwrap()[0].label, None);
        // Class 1 is implied by the ids 0 and 2 and carried by no example.
        assert_eq!(d.classes_without_examples(), vec![1]);

        let f = dir.path().join("sts.jsonl");
        std::fs::write(
            &f,
            "{\"text\":\"a\",\"label\":4}\n{\"text\":\"b\",\"label\":3.5}\n",
        )
        .unwrap();
        let sts = load_dataset(&f).unwrap();
        assert_eq!(sts.task, Task::Regression);
        assert!(sts.classes_without_examples().is_empty());
        std::fs::write(
            &f,
            "{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\",\"label\":0}\n",
        )
        .unwrap();
        assert!(load_dataset(&f)
            .unwrap()
            .classes_without_examples()
            .is_empty());

        std::fs::write(&f, "{\"text\":\"a\"}\nnot json\n").unwrap();
        let err = format!("{:#}", load_dataset(&f).unwrap_err());
        assert!(err.contains("sts.jsonl:2"), "{err}");
    }
}
