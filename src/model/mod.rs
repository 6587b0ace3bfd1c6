//! Trainable encoders for sequence classification, one adapter per architecture behind one trait.
//!
//! The contract between the architectures (this module) and the training loop (`train`): a model is
//! a `SequenceClassifier` built over a `VarBuilder`; the trainable weights live in a `VarMap` under
//! transformers' parameter names, so a checkpoint saved from it loads in
//! `AutoModelForSequenceClassification` and vice versa.

use candle_core::{Result as CResult, Tensor};

/// One padded batch, as the tokenizer produces it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]`, u32 token ids.
    pub input_ids: Tensor,
    /// `[batch, seq]`, u32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, seq]`, u32 segment ids, for architectures that have them.
    pub token_type_ids: Option<Tensor>,
}

/// Train or eval mode: dropout is active only in `Train`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// An encoder with a sequence-classification head.
pub trait SequenceClassifier: Send + Sync {
    /// Logits `[batch, num_labels]` (f32). In `Mode::Train`, dropout is applied.
    fn forward(&self, batch: &Batch, mode: Mode) -> CResult<Tensor>;
    /// Hidden states in eval mode: the embedding output, then each layer's output, `[batch, seq, hidden]`.
    fn hidden_states(&self, batch: &Batch) -> CResult<Vec<Tensor>>;
}
