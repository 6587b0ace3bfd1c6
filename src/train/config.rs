//! Every fine-tuning default in one place, one comment each; the runner hashes the resolved config.

pub use crate::model::Precision;
use serde::{Deserialize, Serialize};

/// When the loop evaluates on the dev split (and may stop early).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "every", rename_all = "snake_case")]
pub enum EvalEvery {
    /// At the end of each epoch (the protocol's default).
    Epoch,
    /// Every `n` optimiser steps, and once more at the end of training.
    Steps { n: usize },
}

/// How training examples are grouped into batches each epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// A seeded shuffle of all examples, cut into consecutive batches.
    Shuffled,
    /// Examples of similar length share a batch (less padding); buckets and batches are shuffled.
    LengthBucketed,
}

/// The resolved fine-tuning protocol. `Default` is the protocol's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate after warm-up (IBM's model-recycling protocol: 5e-5).
    pub lr: f64,
    /// Decoupled AdamW weight decay on matrices (biases and LayerNorm weights excluded).
    /// transformers' Trainer defaults to 0.0 and IBM's protocol does not state a value; we pick
    /// 0.01, the value of BERT's and RoBERTa's original fine-tuning recipes.
    pub weight_decay: f64,
    /// Fraction of the total steps spent on linear warm-up (warm-up steps = ceil(ratio × total)).
    pub warmup_ratio: f64,
    /// Effective batch size: examples per optimiser step.
    pub batch_size: usize,
    /// Examples per forward/backward pass; gradients are accumulated over
    /// `ceil(batch_size / micro_batch_size)` micro-batches (32 fits a CPU's caches and memory).
    pub micro_batch_size: usize,
    /// Upper bound on passes over the training split.
    pub max_epochs: usize,
    /// Optional cap on optimiser steps (overrides `max_epochs` when it is reached first).
    pub max_steps: Option<usize>,
    /// Early stopping: evaluations in a row without dev improvement before training stops.
    /// 2 lets one noisy evaluation pass without stopping; `None` never stops early.
    pub patience: Option<usize>,
    /// When to evaluate on dev.
    pub eval_every: EvalEvery,
    /// Global L2-norm gradient clipping threshold (transformers' default 1.0); `None` disables.
    pub max_grad_norm: Option<f64>,
    /// Adam's first-moment decay (torch default).
    pub beta1: f64,
    /// Adam's second-moment decay (torch default).
    pub beta2: f64,
    /// Adam's denominator epsilon (transformers' default 1e-8).
    pub eps: f64,
    /// Tokens per example after truncation (longest-first over pairs).
    pub max_length: usize,
    /// Seed for the head's initialisation, shuffling and dropout.
    pub seed: u64,
    /// How examples are grouped into batches (plain seeded shuffling by default).
    pub batching: Batching,
    /// Arithmetic of the passes: f32, or bf16 with f32 master weights, optimizer state and loss
    /// (see docs/cuda.md). f32 by default on every device; left out of the JSON when f32, so
    /// configs (and their hashes) from before this field are unchanged.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 5e-5,
            weight_decay: 0.01,
            warmup_ratio: 0.006,
            batch_size: 256,
            micro_batch_size: 32,
            max_epochs: 10,
            max_steps: None,
            patience: Some(2),
            eval_every: EvalEvery::Epoch,
            max_grad_norm: Some(1.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_length: 128,
            seed: 0,
            batching: Batching::Shuffled,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    /// Micro-batches per optimiser step.
    pub fn accumulation_steps(&self) -> usize {
        self.batch_size
            .div_ceil(self.micro_batch_size.max(1))
            .max(1)
    }

    /// Rejects settings the loop cannot run, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "train config: lr must be > 0, got {}",
            self.lr
        );
        ensure!(
            self.weight_decay >= 0.0,
            "train config: weight_decay must be >= 0, got {}",
            self.weight_decay
        );
        ensure!(
            (0.0..=1.0).contains(&self.warmup_ratio),
            "train config: warmup_ratio must be in [0, 1], got {}",
            self.warmup_ratio
        );
        ensure!(self.batch_size > 0, "train config: batch_size must be > 0");
        ensure!(
            self.micro_batch_size > 0,
            "train config: micro_batch_size must be > 0"
        );
        ensure!(
            self.micro_batch_size <= self.batch_size,
            "train config: micro_batch_size ({}) must not exceed batch_size ({})",
            self.micro_batch_size,
            self.batch_size
        );
        ensure!(self.max_epochs > 0, "train config: max_epochs must be > 0");
        ensure!(
            self.max_steps != Some(0),
            "train config: max_steps must be > 0"
        );
        ensure!(
            self.patience != Some(0),
            "train config: patience must be > 0"
        );
        if let EvalEvery::Steps { n } = self.eval_every {
            ensure!(n > 0, "train config: eval_every steps must be > 0");
        }
        ensure!(
            self.max_length >= 2,
            "train config: max_length must be >= 2"
        );
        ensure!(
            (0.0..1.0).contains(&self.beta1),
            "train config: beta1 must be in [0, 1)"
        );
        ensure!(
            (0.0..1.0).contains(&self.beta2),
            "train config: beta2 must be in [0, 1)"
        );
        ensure!(self.eps > 0.0, "train config: eps must be > 0");
        if let Some(m) = self.max_grad_norm {
            ensure!(
                m > 0.0 && m.is_finite(),
                "train config: max_grad_norm must be > 0 (or null for no clipping), got {m}"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = TrainConfig::default();
        c.validate().unwrap();
        assert_eq!(c.accumulation_steps(), 8);
        let json = serde_json::to_string(&c).unwrap();
        let back: TrainConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn precision_is_absent_from_f32_json_and_recorded_for_bf16() {
        let f32_json = serde_json::to_value(TrainConfig::default()).unwrap();
        assert!(f32_json.get("precision").is_none());
        let bf16 = TrainConfig {
            precision: Precision::Bf16,
            ..TrainConfig::default()
        };
        let v = serde_json::to_value(&bf16).unwrap();
        assert_eq!(v["precision"], "bf16");
        assert_eq!(serde_json::from_value::<TrainConfig>(v).unwrap(), bf16);
    }

    #[test]
    fn unknown_field_is_rejected() {
        let mut v = serde_json::to_value(TrainConfig::default()).unwrap();
        v["learning_rate"] = serde_json::json!(1.0);
        assert!(serde_json::from_value::<TrainConfig>(v).is_err());
    }

    #[test]
    fn micro_batch_larger_than_batch_is_rejected() {
        let c = TrainConfig {
            batch_size: 8,
            micro_batch_size: 16,
            ..TrainConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn max_grad_norm_must_be_positive_when_given() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let c = TrainConfig {
                max_grad_norm: Some(bad),
                ..TrainConfig::default()
            };
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("max_grad_norm"), "{bad}: {err}");
        }
        let none = TrainConfig {
            max_grad_norm: None,
            ..TrainConfig::default()
        };
        none.validate().unwrap();
    }
}
