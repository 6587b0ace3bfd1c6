//! The one seam between the commands and the architectures: what `finetune`/`predict` need from a
//! loaded checkpoint, and the function that loads one.

use crate::data::Task;
use crate::model::{LoadOptions, LoadedModel, Precision, Problem, SequenceClassifier};
use anyhow::{Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use std::path::Path;

/// A checkpoint loaded for fine-tuning or prediction (`model::LoadedModel` implements it).
pub trait TrainableModel {
    /// The model over the trainable `Var`s.
    fn model(&self) -> &dyn SequenceClassifier;
    fn varmap(&self) -> &VarMap;
    /// A model over detached views of the current weights (no autograd graph).
    fn inference_model(&self) -> Result<Box<dyn SequenceClassifier>>;
    /// Writes a transformers-loadable checkpoint (config, weights, tokenizer) to `dir`.
    fn save(&self, dir: &Path, label_names: &[String]) -> Result<()>;
}

/// How the head of a checkpoint is shaped for a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub num_labels: usize,
    pub regression: bool,
}

impl Head {
    pub fn for_task(task: &Task) -> Self {
        Self {
            num_labels: task.num_outputs(),
            regression: matches!(task, Task::Regression),
        }
    }
}

/// Loads the checkpoint in `dir` with a head for `head`, its fresh weights seeded by `seed`
/// (f32 weights computing in `precision`, the config's dropout).
pub fn load_trainable(
    dir: &Path,
    head: &Head,
    seed: u64,
    precision: Precision,
    device: &Device,
) -> Result<Box<dyn TrainableModel>> {
    let problem = if head.regression {
        Problem::Regression
    } else {
        Problem::SingleLabel
    };
    let opts = LoadOptions {
        num_labels: head.num_labels,
        problem,
        seed,
        precision,
        hidden_dropout: None,
    };
    Ok(Box::new(crate::model::load(dir, &opts, device)?))
}

impl TrainableModel for LoadedModel {
    fn model(&self) -> &dyn SequenceClassifier {
        self.model.as_ref()
    }
    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    fn inference_model(&self) -> Result<Box<dyn SequenceClassifier>> {
        LoadedModel::inference_model(self)
    }
    fn save(&self, dir: &Path, label_names: &[String]) -> Result<()> {
        LoadedModel::save(self, dir, label_names)
    }
}

/// The task a fine-tuned checkpoint's head was trained for, from its `config.json`: `problem_type`
/// "regression" (or `num_labels` 1) is regression, otherwise classification over `id2label`.
pub fn task_of_checkpoint(dir: &Path) -> Result<Task> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    task_from_config(&config).with_context(|| format!("{}", path.display()))
}

/// `task_of_checkpoint` on a parsed config.
pub fn task_from_config(config: &serde_json::Value) -> Result<Task> {
    if config.get("problem_type").and_then(|v| v.as_str()) == Some("regression") {
        return Ok(Task::Regression);
    }
    let Some(id2label) = config.get("id2label").and_then(|v| v.as_object()) else {
        let n = config
            .get("num_labels")
            .and_then(|v| v.as_u64())
            .unwrap_or(2) as usize;
        return Ok(if n == 1 {
            Task::Regression
        } else {
            Task::Classification {
                labels: (0..n).map(|i| format!("LABEL_{i}")).collect(),
            }
        });
    };
    let mut labels = vec![None; id2label.len()];
    for (id, name) in id2label {
        let i: usize = id
            .parse()
            .with_context(|| format!("id2label: key {id:?} is not a class index"))?;
        let slot = labels
            .get_mut(i)
            .with_context(|| format!("id2label: class {i} but only {} labels", id2label.len()))?;
        *slot = Some(
            name.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| name.to_string()),
        );
    }
    let labels: Vec<String> = labels
        .into_iter()
        .enumerate()
        .map(|(i, l)| l.unwrap_or(format!("LABEL_{i}")))
        .collect();
    if labels.len() == 1 {
        return Ok(Task::Regression);
    }
    Ok(Task::Classification { labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn task_comes_from_id2label_or_problem_type() {
        let c = json!({"id2label": {"1": "pos", "0": "neg"}});
        assert_eq!(
            task_from_config(&c).unwrap(),
            Task::Classification {
                labels: vec!["neg".into(), "pos".into()]
            }
        );
        assert_eq!(
            task_from_config(&json!({"problem_type": "regression"})).unwrap(),
            Task::Regression
        );
        assert_eq!(
            task_from_config(&json!({"num_labels": 1})).unwrap(),
            Task::Regression
        );
        assert!(task_from_config(&json!({"id2label": {"5": "x"}})).is_err());
    }
}
