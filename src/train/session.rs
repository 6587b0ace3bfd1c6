//! One fine-tuning or prediction job over a loaded checkpoint and a dataset: tokenization, splits
//! and the loop, wired together for the `finetune` and `predict` commands (which do the file I/O).

use super::checkpoint::TrainableModel;
use super::finetune::{finetune, LabeledSet, Outcome, StepReport, Trainee};
use super::local_data::LocalDataset;
use super::optim::decays;
use super::TrainConfig;
use crate::data::{Example, Label, Task};
use crate::model::SequenceClassifier;
use crate::tokenize::TextTokenizer;
use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;

/// The split the loop evaluates on, when the dataset has it.
pub const DEV_SPLIT: &str = "validation";

/// Tokenizes labelled examples; every example must have a label.
pub fn labeled_set(
    tokenizer: &TextTokenizer,
    examples: &[Example],
    split: &str,
) -> Result<LabeledSet> {
    let labels = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            e.label
                .with_context(|| format!("{split} example {i} has no label"))
        })
        .collect::<Result<Vec<Label>>>()?;
    let encoded = tokenizer
        .encode(examples)
        .with_context(|| format!("tokenizing the {split} split"))?;
    Ok(LabeledSet { encoded, labels })
}

/// Fine-tunes `model` on the dataset's "train" split, evaluating on "validation" when present.
pub fn finetune_on_dataset(
    model: &dyn TrainableModel,
    tokenizer: &TextTokenizer,
    data: &LocalDataset,
    cfg: &TrainConfig,
    device: &Device,
    report: &mut dyn FnMut(&StepReport),
) -> Result<Outcome> {
    let train = data
        .split("train")
        .context("the dataset has no train split")?;
    let train = labeled_set(tokenizer, train, "train")?;
    let dev = match data.split(DEV_SPLIT) {
        Some(d) => Some(labeled_set(tokenizer, d, DEV_SPLIT)?),
        None => None,
    };
    let inference = || model.inference_model();
    let trainee = Trainee {
        model: model.model(),
        varmap: model.varmap(),
        inference: &inference,
        decay: &decays,
    };
    finetune(
        &trainee,
        &data.task,
        &train,
        dev.as_ref(),
        tokenizer.pad_id(),
        cfg,
        device,
        report,
    )
}

/// One line of `recycle predict`'s output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Position of the example in its split.
    pub index: usize,
    pub logits: Vec<f32>,
    /// Predicted class id (classification) …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<u32>,
    /// … and its name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_name: Option<String>,
    /// Predicted score (regression).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// Predictions of `model` for every example, in order.
pub fn predict_examples(
    model: &dyn SequenceClassifier,
    tokenizer: &TextTokenizer,
    task: &Task,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Prediction>> {
    let encoded = tokenizer.encode(examples)?;
    let logits = super::predict(model, &encoded, tokenizer.pad_id(), batch_size, device)?;
    let classes = super::metrics::argmax_rows(&logits);
    Ok(logits
        .into_iter()
        .zip(classes)
        .enumerate()
        .map(|(index, (logits, class))| match task {
            Task::Classification { labels } => Prediction {
                index,
                label: Some(class),
                label_name: labels.get(class as usize).cloned(),
                score: None,
                logits,
            },
            Task::Regression => Prediction {
                index,
                label: None,
                label_name: None,
                score: logits.first().copied(),
                logits,
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::tests::toy_tokenizer;
    use crate::train::toy::{toy_varmap, BagOfEmbeddings};
    use candle_nn::VarMap;
    use std::path::Path;

    struct Toy {
        vm: VarMap,
        model: BagOfEmbeddings,
    }

    impl TrainableModel for Toy {
        fn model(&self) -> &dyn SequenceClassifier {
            &self.model
        }
        fn varmap(&self) -> &VarMap {
            &self.vm
        }
        fn inference_model(&self) -> Result<Box<dyn SequenceClassifier>> {
            Ok(Box::new(BagOfEmbeddings::new(&self.vm, true)))
        }
        fn save(&self, _dir: &Path, _labels: &[String]) -> Result<()> {
            Ok(())
        }
    }

    /// Sentiment-like toy data: "good"/"great" words mean 1, "bad"/"awful" mean 0.
    fn examples(n: usize, offset: usize) -> Vec<Example> {
        let pos = ["good", "great", "fine"];
        let neg = ["bad", "awful", "poor"];
        let filler = ["the", "movie", "was", "plot"];
        (0..n)
            .map(|i| {
                let k = i + offset;
                let class = (k * 7 % 5 < 2) as u32;
                let word = if class == 1 { pos[k % 3] } else { neg[k % 3] };
                let text = format!(
                    "{} {} {} {}",
                    filler[k % 4],
                    word,
                    filler[(k + 1) % 4],
                    word
                );
                Example {
                    text,
                    text_pair: None,
                    label: Some(Label::Class(class)),
                }
            })
            .collect()
    }

    #[test]
    fn finetunes_from_text_and_predicts_every_example_in_order() {
        let words = [
            "the", "movie", "was", "plot", "good", "great", "fine", "bad", "awful", "poor",
        ];
        let tok = TextTokenizer::new(toy_tokenizer(&words), 16).unwrap();
        let task = Task::Classification {
            labels: vec!["neg".into(), "pos".into()],
        };
        let data = LocalDataset {
            task: task.clone(),
            splits: vec![
                ("train".into(), examples(120, 0)),
                (DEV_SPLIT.into(), examples(40, 1000)),
            ],
        };
        let vm = toy_varmap(4 + words.len(), 8, 2, 5);
        let toy = Toy {
            model: BagOfEmbeddings::new(&vm, false),
            vm,
        };
        let cfg = TrainConfig {
            lr: 0.05,
            batch_size: 16,
            micro_batch_size: 8,
            max_epochs: 5,
            ..TrainConfig::default()
        };
        let mut steps = 0;
        let out = finetune_on_dataset(&toy, &tok, &data, &cfg, &Device::Cpu, &mut |_| steps += 1)
            .unwrap();
        assert_eq!(out.steps, steps);
        assert_eq!(out.best_dev_score, Some(1.0));

        let test = examples(30, 5000);
        let model = toy.inference_model().unwrap();
        let preds = predict_examples(model.as_ref(), &tok, &task, &test, 7, &Device::Cpu).unwrap();
        assert_eq!(
            preds.iter().map(|p| p.index).collect::<Vec<_>>(),
            (0..30).collect::<Vec<_>>()
        );
        for (p, e) in preds.iter().zip(&test) {
            assert_eq!(Some(Label::Class(p.label.unwrap())), e.label, "{}", e.text);
            assert_eq!(
                p.label_name.as_deref(),
                Some(if p.label == Some(1) { "pos" } else { "neg" })
            );
        }
    }
}
