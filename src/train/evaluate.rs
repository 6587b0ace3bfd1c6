//! Prediction without an autograd graph, and the score of predictions by the task's metric.

use super::metrics;
use crate::data::{Label, Task};
use crate::model::{Mode, SequenceClassifier};
use crate::tokenize::{make_batch, Encoded, PadTo};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};

/// Logits (one row per example, in example order) of `model` in eval mode, `batch_size` examples
/// at a time. Examples are batched by length (less padding) and the rows put back in order. Pass a
/// model over detached weights: a model over `Var`s would build a graph for every batch.
pub fn predict(
    model: &dyn SequenceClassifier,
    encoded: &Encoded,
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| encoded.input_ids[i].len());
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); encoded.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch = make_batch(encoded, chunk, pad_id, PadTo::LONGEST, device)?;
        let logits = model
            .forward(&batch, Mode::Eval)
            .context("forward pass in eval mode")?;
        let logits = logits.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        ensure!(
            logits.len() == chunk.len(),
            "the model returned {} rows for {} examples",
            logits.len(),
            chunk.len()
        );
        for (&i, row) in chunk.iter().zip(logits) {
            rows[i] = row;
        }
    }
    Ok(rows)
}

/// The task's score of `logits` against gold `labels`: accuracy for classification, Spearman
/// correlation for regression (the first logit is the prediction).
pub fn score(task: &Task, logits: &[Vec<f32>], labels: &[Label]) -> Result<f64> {
    ensure!(
        logits.len() == labels.len(),
        "{} predictions for {} labels",
        logits.len(),
        labels.len()
    );
    match task {
        Task::Classification { .. } => {
            let gold = labels
                .iter()
                .enumerate()
                .map(|(i, l)| match l {
                    Label::Class(c) => Ok(*c),
                    Label::Score(s) => {
                        bail!("example {i}: classification label expected, found score {s}")
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(metrics::accuracy(&metrics::argmax_rows(logits), &gold))
        }
        Task::Regression => {
            let predicted: Vec<f64> = logits
                .iter()
                .map(|r| r.first().copied().unwrap_or(f32::NAN) as f64)
                .collect();
            let gold: Vec<f64> = labels
                .iter()
                .map(|l| match l {
                    Label::Score(s) => *s as f64,
                    Label::Class(c) => *c as f64,
                })
                .collect();
            Ok(metrics::spearman(&predicted, &gold))
        }
    }
}

/// Predicts and scores in one go.
pub fn evaluate(
    model: &dyn SequenceClassifier,
    task: &Task,
    encoded: &Encoded,
    labels: &[Label],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let logits = predict(model, encoded, pad_id, batch_size, device)?;
    score(task, &logits, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_scores_accuracy_and_regression_spearman() {
        let task = Task::Classification {
            labels: vec!["no".into(), "yes".into()],
        };
        let logits = vec![vec![0.1, 0.9], vec![0.8, 0.2], vec![0.3, 0.7]];
        let labels = [Label::Class(1), Label::Class(1), Label::Class(1)];
        assert!((score(&task, &logits, &labels).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!(score(&task, &logits, &[Label::Score(1.0); 3]).is_err());
        let r = score(
            &Task::Regression,
            &[vec![0.1], vec![0.5], vec![0.2]],
            &[Label::Score(1.0), Label::Score(3.0), Label::Score(2.0)],
        )
        .unwrap();
        assert!((r - 1.0).abs() < 1e-12);
    }
}
