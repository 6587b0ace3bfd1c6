//! Architecture knowledge for merging: the body's name prefix per `model_type` (so a base
//! checkpoint and *ForSequenceClassification checkpoints line up) and which tensors are heads.

/// What a checkpoint tensor is, once its name is read against its architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Part of the encoder body; `canonical` is the name without the architecture's prefix.
    Body { canonical: String },
    /// A sequence-classification head (merged only with `--keep-head`).
    ClassificationHead,
    /// A pretraining head (masked-LM, NSP, ...): never part of a merged base.
    PretrainingHead,
}

/// The names of one architecture family.
#[derive(Debug, Clone, Copy)]
struct Family {
    /// Prefix of the body in task-model checkpoints (`bert.`), empty when unknown.
    prefix: &'static str,
    /// Name prefixes of classification heads, outside the body prefix.
    classification: &'static [&'static str],
    /// Name prefixes of pretraining heads, outside the body prefix.
    pretraining: &'static [&'static str],
}

fn family(model_type: &str) -> Family {
    match model_type {
        "bert" => Family {
            prefix: "bert.",
            classification: &["classifier."],
            pretraining: &["cls."],
        },
        "roberta" | "xlm-roberta" | "camembert" => Family {
            prefix: "roberta.",
            classification: &["classifier."],
            pretraining: &["lm_head."],
        },
        "distilbert" => Family {
            prefix: "distilbert.",
            classification: &["pre_classifier.", "classifier."],
            pretraining: &["vocab_transform.", "vocab_layer_norm.", "vocab_projector."],
        },
        "deberta" | "deberta-v2" => Family {
            prefix: "deberta.",
            classification: &["pooler.", "classifier."],
            pretraining: &["lm_predictions.", "mask_predictions.", "cls.", "lm_head."],
        },
        "electra" => Family {
            prefix: "electra.",
            classification: &["classifier."],
            pretraining: &[
                "discriminator_predictions.",
                "generator_predictions.",
                "generator_lm_head.",
            ],
        },
        "mpnet" => Family {
            prefix: "mpnet.",
            classification: &["classifier."],
            pretraining: &["lm_head."],
        },
        _ => Family {
            prefix: "",
            classification: &["classifier.", "score."],
            pretraining: &["lm_head.", "cls."],
        },
    }
}

/// Classifies the tensor `name` of a checkpoint whose config says `model_type`.
pub fn role(model_type: &str, name: &str) -> Role {
    let f = family(model_type);
    if !f.prefix.is_empty() {
        if let Some(rest) = name.strip_prefix(f.prefix) {
            return Role::Body {
                canonical: rest.to_string(),
            };
        }
    }
    if f.classification.iter().any(|p| name.starts_with(p)) {
        Role::ClassificationHead
    } else if f.pretraining.iter().any(|p| name.starts_with(p)) {
        Role::PretrainingHead
    } else {
        Role::Body {
            canonical: name.to_string(),
        }
    }
}

/// `architectures` for a merged checkpoint without a head: the base class of the template's
/// first architecture (`RobertaForMaskedLM` → `RobertaModel`), which every *ForSequenceClassification
/// class loads with a freshly initialised head.
pub fn body_architecture(template: &str) -> String {
    match template.find("For") {
        Some(i) if i > 0 => format!("{}Model", &template[..i]),
        _ => template.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_heads_per_architecture() {
        let body = |c: &str| Role::Body {
            canonical: c.to_string(),
        };
        assert_eq!(
            role("bert", "bert.encoder.layer.0.output.dense.weight"),
            body("encoder.layer.0.output.dense.weight")
        );
        assert_eq!(role("bert", "encoder.layer.0.x"), body("encoder.layer.0.x"));
        assert_eq!(
            role("bert", "bert.pooler.dense.weight"),
            body("pooler.dense.weight")
        );
        assert_eq!(role("bert", "classifier.weight"), Role::ClassificationHead);
        assert_eq!(role("bert", "cls.predictions.bias"), Role::PretrainingHead);
        assert_eq!(
            role("roberta", "classifier.out_proj.weight"),
            Role::ClassificationHead
        );
        assert_eq!(role("xlm-roberta", "lm_head.bias"), Role::PretrainingHead);
        assert_eq!(
            role("distilbert", "pre_classifier.weight"),
            Role::ClassificationHead
        );
        assert_eq!(
            role("deberta-v2", "pooler.dense.weight"),
            Role::ClassificationHead
        );
        assert_eq!(
            role("deberta", "deberta.encoder.rel_embeddings.weight"),
            body("encoder.rel_embeddings.weight")
        );
    }

    #[test]
    fn body_architecture_strips_the_task() {
        assert_eq!(body_architecture("RobertaForMaskedLM"), "RobertaModel");
        assert_eq!(
            body_architecture("DebertaV2ForSequenceClassification"),
            "DebertaV2Model"
        );
        assert_eq!(body_architecture("BertModel"), "BertModel");
    }
}
