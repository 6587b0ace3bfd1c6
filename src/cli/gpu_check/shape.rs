//! The encoder shapes `gpu-check` times: their FLOPs, a random checkpoint and a random batch.

use super::*;

/// An encoder shape: transformers' config fields that set the FLOPs.
#[derive(Debug, Clone)]
pub(super) struct Shape {
    pub(super) name: String,
    pub(super) model_type: &'static str,
    pub(super) vocab: usize,
    pub(super) hidden: usize,
    pub(super) layers: usize,
    pub(super) heads: usize,
    pub(super) intermediate: usize,
}

impl Shape {
    pub(super) fn named(name: &str, tiny: bool) -> Result<Self> {
        let (model_type, vocab, hidden, layers, heads, intermediate) = match name {
            "minilm" => ("bert", 30522, 384, 6, 12, 1536),
            "roberta-base" => ("roberta", 50265, 768, 12, 12, 3072),
            other => bail!("--shapes {other}: expected minilm or roberta-base"),
        };
        Ok(if tiny {
            Self {
                name: format!("{name}-tiny"),
                model_type,
                vocab: 1000,
                hidden: 64,
                layers: 2,
                heads: 4,
                intermediate: 128,
            }
        } else {
            Self {
                name: name.to_string(),
                model_type,
                vocab,
                hidden,
                layers,
                heads,
                intermediate,
            }
        })
    }

    pub(super) fn max_positions(&self) -> usize {
        if self.model_type == "roberta" {
            514
        } else {
            512
        }
    }

    pub(super) fn config(&self) -> serde_json::Value {
        let roberta = self.model_type == "roberta";
        json!({
            "model_type": self.model_type,
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.intermediate,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": self.max_positions(),
            "type_vocab_size": if roberta { 1 } else { 2 },
            "initializer_range": 0.02,
            "layer_norm_eps": if roberta { 1e-5 } else { 1e-12 },
            "pad_token_id": if roberta { 1 } else { 0 },
        })
    }

    /// Matmul FLOPs of one example's forward pass: the encoder's dense layers (2 per weight per
    /// token) and attention's two products (QKᵀ and PV, 2·seq·hidden each per token and layer).
    /// Embeddings, the head, LayerNorm and softmax are left out, as MFU conventions do.
    pub(super) fn forward_flops(&self, seq: usize) -> f64 {
        let (h, i, l, s) = (
            self.hidden as f64,
            self.intermediate as f64,
            self.layers as f64,
            seq as f64,
        );
        let dense = l * (4.0 * h * h + 2.0 * h * i);
        s * (2.0 * dense + l * 4.0 * s * h)
    }
}

/// Writes `config.json` and random `model.safetensors` (transformers' initialisation: normal(0,
/// 0.02) weights, unit LayerNorm) of `shape` to `dir`.
pub(super) fn write_random_checkpoint(shape: &Shape, dir: &Path) -> Result<()> {
    let config = shape.config();
    let cfg: BertConfig = serde_json::from_value(config.clone())?;
    let flavour = if shape.model_type == "roberta" {
        Flavour::Roberta
    } else {
        Flavour::Bert
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    BertClassifier::load(vb, &cfg, flavour, 2)
        .with_context(|| format!("building a random {}", shape.name))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)
        .with_context(|| format!("writing {}/config.json", dir.display()))?;
    varmap
        .save(dir.join("model.safetensors"))
        .with_context(|| format!("writing {}/model.safetensors", dir.display()))
}

pub(super) fn random_batch(
    shape: &Shape,
    args: &Args,
    device: &Device,
    seed: u64,
) -> Result<(Batch, Tensor)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = args.batch * args.seq;
    // Ids above the special tokens, so padding-derived positions stay ordinary.
    let ids: Vec<u32> = (0..n)
        .map(|_| rng.random_range(5..shape.vocab as u32))
        .collect();
    let labels: Vec<u32> = (0..args.batch).map(|_| rng.random_range(0..2)).collect();
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (args.batch, args.seq), device)?,
        attention_mask: Tensor::ones((args.batch, args.seq), DType::U32, device)?,
        token_type_ids: None,
    };
    Ok((batch, Tensor::from_vec(labels, args.batch, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_flops_follow_the_dense_and_attention_terms() {
        // roberta-base at seq 128: 85M encoder matmul weights → 2·85M·128 ≈ 21.7 GFLOP, plus
        // attention 12·4·128²·768 ≈ 0.6 GFLOP.
        let s = Shape::named("roberta-base", false).unwrap();
        let dense_weights = 12.0 * (4.0 * 768.0 * 768.0 + 2.0 * 768.0 * 3072.0);
        assert_eq!(dense_weights, 84_934_656.0);
        let want = 128.0 * 2.0 * dense_weights + 12.0 * 4.0 * 128.0 * 128.0 * 768.0;
        assert_eq!(s.forward_flops(128), want);
        assert!(Shape::named("gpt2", false).is_err());
    }
}
