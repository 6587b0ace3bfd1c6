//! BERT-family encoders (BERT, MiniLM-style BERT checkpoints, RoBERTa, XLM-RoBERTa): one encoder
//! with two ways of numbering positions, and the two classification heads transformers puts on it.

use super::kernels::block_node::{AttentionParams, FfnParams};
use super::layers::{attend, Embedding, LayerNorm, Linear};
use super::ops::{self, Activation};
use super::{Batch, Mode, SequenceClassifier};
use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// The fields of a BERT/RoBERTa `config.json` the encoder reads; defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub classifier_dropout: Option<f32>,
    #[serde(default = "default_pos_type")]
    pub position_embedding_type: String,
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_dropout() -> f32 {
    0.1
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_init_range() -> f64 {
    0.02
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_pos_type() -> String {
    "absolute".to_string()
}

impl BertConfig {
    /// Dropout before the classifier: `classifier_dropout`, else the hidden dropout.
    fn head_dropout(&self) -> f32 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}

/// How position ids are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// BERT: 0, 1, 2, … for every sequence.
    Absolute,
    /// RoBERTa: `padding_idx + 1 + (index among non-pad tokens)`, `padding_idx` on pad tokens.
    FromPadding { padding_idx: u32 },
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    dropout: f32,
    positions: Positions,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig, positions: Positions) -> Result<Self> {
        let std = cfg.initializer_range;
        Ok(Self {
            word: Embedding::load(
                vb.pp("word_embeddings"),
                cfg.vocab_size,
                cfg.hidden_size,
                std,
            )?,
            position: Embedding::load(
                vb.pp("position_embeddings"),
                cfg.max_position_embeddings,
                cfg.hidden_size,
                std,
            )?,
            token_type: Embedding::load(
                vb.pp("token_type_embeddings"),
                cfg.type_vocab_size,
                cfg.hidden_size,
                std,
            )?,
            norm: LayerNorm::load(vb.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
            positions,
        })
    }

    fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let ids = &batch.input_ids;
        let (b, s) = ids.dims2()?;
        let device = ids.device();
        let position_ids = match self.positions {
            Positions::Absolute => Tensor::arange(0u32, s as u32, device)?
                .unsqueeze(0)?
                .broadcast_as((b, s))?
                .contiguous()?,
            Positions::FromPadding { padding_idx } => {
                let real = ids.ne(padding_idx)?.to_dtype(DType::F32)?;
                let counted = (real.cumsum(1)? * &real)?;
                (counted + f64::from(padding_idx))?.to_dtype(DType::U32)?
            }
        };
        let token_types = match &batch.token_type_ids {
            Some(t) if self.positions == Positions::Absolute => t.clone(),
            _ => ids.zeros_like()?,
        };
        let x = Embedding::sum(&[
            (&self.word, ids),
            (&self.position, &position_ids),
            (&self.token_type, &token_types),
        ])?;
        ops::dropout(&self.norm.forward(&x)?, self.dropout, mode)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    act: Activation,
    heads: usize,
    dropout: f32,
    attn_dropout: f32,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, i, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        let att = vb.pp("attention");
        Ok(Self {
            query: Linear::load(att.pp("self").pp("query"), h, h, std)?,
            key: Linear::load(att.pp("self").pp("key"), h, h, std)?,
            value: Linear::load(att.pp("self").pp("value"), h, h, std)?,
            attn_out: Linear::load(att.pp("output").pp("dense"), h, h, std)?,
            attn_norm: LayerNorm::load(att.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            intermediate: Linear::load(vb.pp("intermediate").pp("dense"), h, i, std)?,
            output: Linear::load(vb.pp("output").pp("dense"), i, h, std)?,
            out_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
            heads: cfg.num_attention_heads,
            dropout: cfg.hidden_dropout_prob,
            attn_dropout: cfg.attention_probs_dropout_prob,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor> {
        let block = self
            .attention_params()
            .map(|p| ops::attention_block(x, bias, &p, self.attn_dropout, self.dropout, mode));
        let a = match block.transpose()?.flatten() {
            Some(a) => a,
            None => {
                let ctx = attend(
                    &self.query.forward(x)?,
                    &self.key.forward(x)?,
                    &self.value.forward(x)?,
                    bias,
                    self.heads,
                    self.attn_dropout,
                    mode,
                )?;
                let a = ops::dropout(&self.attn_out.forward(&ctx)?, self.dropout, mode)?;
                self.attn_norm.forward(&(a + x)?)?
            }
        };
        let block = self
            .ffn_params()
            .map(|p| ops::ffn_block(&a, &p, self.dropout, mode));
        if let Some(y) = block.transpose()?.flatten() {
            return Ok(y);
        }
        let i = self.act.apply(&self.intermediate.forward(&a)?)?;
        let o = ops::dropout(&self.output.forward(&i)?, self.dropout, mode)?;
        self.out_norm.forward(&(o + a)?)
    }

    /// The attention block's parameters, for `ops::attention_block`.
    fn attention_params(&self) -> Option<AttentionParams<'_>> {
        Some(AttentionParams {
            q: self.query.dense()?,
            k: self.key.dense()?,
            v: self.value.dense()?,
            out: self.attn_out.dense()?,
            norm: self.attn_norm.norm(),
            heads: self.heads,
        })
    }

    /// The feed-forward block's parameters, for `ops::ffn_block` (exact GELU only).
    fn ffn_params(&self) -> Option<FfnParams<'_>> {
        if self.act != Activation::Gelu {
            return None;
        }
        Some(FfnParams {
            up: self.intermediate.dense()?,
            down: self.output.dense()?,
            norm: self.out_norm.norm(),
        })
    }
}

/// The encoder stack (`embeddings`, `encoder.layer.N`).
pub struct Encoder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl Encoder {
    pub fn load(vb: VarBuilder, cfg: &BertConfig, positions: Positions) -> Result<Self> {
        if cfg.position_embedding_type != "absolute" {
            candle_core::bail!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                cfg.position_embedding_type
            );
        }
        let embeddings = Embeddings::load(vb.pp("embeddings"), cfg, positions)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(vb.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers })
    }

    /// Every hidden state: the embedding output, then each layer's output.
    pub fn forward_all(&self, batch: &Batch, mode: Mode) -> Result<Vec<Tensor>> {
        let x = self.embeddings.forward(batch, mode)?;
        let bias = ops::attention_bias(&batch.attention_mask, x.dtype())?;
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(x);
        for layer in &self.layers {
            let next = layer.forward(&states[states.len() - 1], &bias, mode)?;
            states.push(next);
        }
        Ok(states)
    }

    pub fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let x = self.embeddings.forward(batch, mode)?;
        let bias = ops::attention_bias(&batch.attention_mask, x.dtype())?;
        // The layers as one graph node where they are block nodes (`kernels::stack`).
        crate::model::kernels::stack::run(&x, |x| {
            let mut x = x.clone();
            for layer in &self.layers {
                x = layer.forward(&x, &bias, mode)?;
            }
            Ok(x)
        })
    }
}

/// The two heads transformers puts on this encoder.
enum Head {
    /// `BertForSequenceClassification`: `bert.pooler.dense` + tanh on the first token → dropout →
    /// `classifier`.
    Bert { pooler: Linear, classifier: Linear },
    /// `RobertaClassificationHead`: dropout → `classifier.dense` → tanh → dropout →
    /// `classifier.out_proj`, on the first token.
    Roberta { dense: Linear, out_proj: Linear },
}

/// The encoder flavours, which decide the parameter prefix, the positions and the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Bert,
    Roberta,
}

/// `BertForSequenceClassification` / `(XLM)RobertaForSequenceClassification`.
pub struct BertClassifier {
    encoder: Encoder,
    head: Head,
    head_dropout: f32,
}

impl BertClassifier {
    pub fn load(
        vb: VarBuilder,
        cfg: &BertConfig,
        flavour: Flavour,
        num_labels: usize,
    ) -> Result<Self> {
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let (encoder, head) = match flavour {
            Flavour::Bert => {
                let base = vb.pp("bert");
                let encoder = Encoder::load(base.clone(), cfg, Positions::Absolute)?;
                let pooler = Linear::load(base.pp("pooler").pp("dense"), h, h, std)?;
                let classifier = Linear::load(vb.pp("classifier"), h, num_labels, std)?;
                (encoder, Head::Bert { pooler, classifier })
            }
            Flavour::Roberta => {
                let padding_idx = cfg.pad_token_id.unwrap_or(1);
                let encoder = Encoder::load(
                    vb.pp("roberta"),
                    cfg,
                    Positions::FromPadding { padding_idx },
                )?;
                let dense = Linear::load(vb.pp("classifier").pp("dense"), h, h, std)?;
                let out_proj =
                    Linear::load(vb.pp("classifier").pp("out_proj"), h, num_labels, std)?;
                (encoder, Head::Roberta { dense, out_proj })
            }
        };
        Ok(Self {
            encoder,
            head,
            head_dropout: cfg.head_dropout(),
        })
    }
}

impl SequenceClassifier for BertClassifier {
    fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let hidden = self.encoder.forward(batch, mode)?;
        let first = hidden.i((.., 0))?;
        let p = self.head_dropout;
        let logits = match &self.head {
            Head::Bert { pooler, classifier } => {
                let pooled = pooler.forward(&first)?.tanh()?;
                classifier.forward(&ops::dropout(&pooled, p, mode)?)
            }
            Head::Roberta { dense, out_proj } => {
                let x = dense.forward(&ops::dropout(&first, p, mode)?)?.tanh()?;
                out_proj.forward(&ops::dropout(&x, p, mode)?)
            }
        }?;
        logits.to_dtype(DType::F32)
    }

    fn hidden_states(&self, batch: &Batch) -> Result<Vec<Tensor>> {
        self.encoder.forward_all(batch, Mode::Eval)
    }
}
