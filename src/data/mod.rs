//! Classification datasets: the in-memory example types every other module works with.
//! (Reading, importing and the dataset card are added by the datasets issue.)

use serde::{Deserialize, Serialize};

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
