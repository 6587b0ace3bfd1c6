//! DistilBERT: its own parameter names (`transformer.layer.N`, `q_lin`, `sa_layer_norm`, …), no
//! token types, and `DistilBertForSequenceClassification`'s pre-classifier head.

use super::kernels::block_node::{AttentionParams, FfnParams};
use super::layers::{attend, Embedding, LayerNorm, Linear};
use super::ops::{self, Activation};
use super::{Batch, Mode, SequenceClassifier};
use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// The fields of a DistilBERT `config.json` the model reads; defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct DistilBertConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub hidden_dim: usize,
    #[serde(default = "default_dropout")]
    pub dropout: f32,
    #[serde(default = "default_dropout")]
    pub attention_dropout: f32,
    #[serde(default = "default_act")]
    pub activation: Activation,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_seq_classif_dropout")]
    pub seq_classif_dropout: f32,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub sinusoidal_pos_embds: bool,
}

fn default_dropout() -> f32 {
    0.1
}
fn default_act() -> Activation {
    Activation::Gelu
}
fn default_init_range() -> f64 {
    0.02
}
fn default_seq_classif_dropout() -> f32 {
    0.2
}
fn default_max_pos() -> usize {
    512
}

/// DistilBERT's LayerNorm epsilon (fixed in transformers, not in the config).
const LN_EPS: f64 = 1e-12;

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    sa_norm: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    out_norm: LayerNorm,
    act: Activation,
    heads: usize,
    dropout: f32,
    attn_dropout: f32,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &DistilBertConfig) -> Result<Self> {
        let (d, h, std) = (cfg.dim, cfg.hidden_dim, cfg.initializer_range);
        let att = vb.pp("attention");
        Ok(Self {
            q: Linear::load(att.pp("q_lin"), d, d, std)?,
            k: Linear::load(att.pp("k_lin"), d, d, std)?,
            v: Linear::load(att.pp("v_lin"), d, d, std)?,
            out: Linear::load(att.pp("out_lin"), d, d, std)?,
            sa_norm: LayerNorm::load(vb.pp("sa_layer_norm"), d, LN_EPS)?,
            lin1: Linear::load(vb.pp("ffn").pp("lin1"), d, h, std)?,
            lin2: Linear::load(vb.pp("ffn").pp("lin2"), h, d, std)?,
            out_norm: LayerNorm::load(vb.pp("output_layer_norm"), d, LN_EPS)?,
            act: cfg.activation,
            heads: cfg.n_heads,
            dropout: cfg.dropout,
            attn_dropout: cfg.attention_dropout,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor> {
        // DistilBERT has no dropout between the attention's output layer and its residual add.
        let block = self
            .attention_params()
            .map(|p| ops::attention_block(x, bias, &p, self.attn_dropout, 0.0, mode));
        let sa = match block.transpose()?.flatten() {
            Some(sa) => sa,
            None => {
                let ctx = attend(
                    &self.q.forward(x)?,
                    &self.k.forward(x)?,
                    &self.v.forward(x)?,
                    bias,
                    self.heads,
                    self.attn_dropout,
                    mode,
                )?;
                self.sa_norm.forward(&(self.out.forward(&ctx)? + x)?)?
            }
        };
        let block = self
            .ffn_params()
            .map(|p| ops::ffn_block(&sa, &p, self.dropout, mode));
        if let Some(y) = block.transpose()?.flatten() {
            return Ok(y);
        }
        let f = self
            .lin2
            .forward(&self.act.apply(&self.lin1.forward(&sa)?)?)?;
        let f = ops::dropout(&f, self.dropout, mode)?;
        self.out_norm.forward(&(f + sa)?)
    }

    /// The attention block's parameters, for `ops::attention_block`.
    fn attention_params(&self) -> Option<AttentionParams<'_>> {
        Some(AttentionParams {
            q: self.q.dense()?,
            k: self.k.dense()?,
            v: self.v.dense()?,
            out: self.out.dense()?,
            norm: self.sa_norm.norm(),
            heads: self.heads,
        })
    }

    /// The feed-forward block's parameters, for `ops::ffn_block` (exact GELU only).
    fn ffn_params(&self) -> Option<FfnParams<'_>> {
        if self.act != Activation::Gelu {
            return None;
        }
        Some(FfnParams {
            up: self.lin1.dense()?,
            down: self.lin2.dense()?,
            norm: self.out_norm.norm(),
        })
    }
}

/// `DistilBertForSequenceClassification`.
pub struct DistilBertClassifier {
    word: Embedding,
    position: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    pre_classifier: Linear,
    classifier: Linear,
    dropout: f32,
    head_dropout: f32,
}

impl DistilBertClassifier {
    pub fn load(vb: VarBuilder, cfg: &DistilBertConfig, num_labels: usize) -> Result<Self> {
        let (d, std) = (cfg.dim, cfg.initializer_range);
        let base = vb.pp("distilbert");
        let emb = base.pp("embeddings");
        let layers = (0..cfg.n_layers)
            .map(|i| Layer::load(base.pp("transformer").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: Embedding::load(emb.pp("word_embeddings"), cfg.vocab_size, d, std)?,
            position: Embedding::load(
                emb.pp("position_embeddings"),
                cfg.max_position_embeddings,
                d,
                std,
            )?,
            emb_norm: LayerNorm::load(emb.pp("LayerNorm"), d, LN_EPS)?,
            layers,
            pre_classifier: Linear::load(vb.pp("pre_classifier"), d, d, std)?,
            classifier: Linear::load(vb.pp("classifier"), d, num_labels, std)?,
            dropout: cfg.dropout,
            head_dropout: cfg.seq_classif_dropout,
        })
    }

    fn states(&self, batch: &Batch, mode: Mode, keep_all: bool) -> Result<Vec<Tensor>> {
        let ids = &batch.input_ids;
        let (b, s) = ids.dims2()?;
        let positions = Tensor::arange(0u32, s as u32, ids.device())?
            .unsqueeze(0)?
            .broadcast_as((b, s))?
            .contiguous()?;
        let x = Embedding::sum(&[(&self.word, ids), (&self.position, &positions)])?;
        let x = ops::dropout(&self.emb_norm.forward(&x)?, self.dropout, mode)?;
        let bias = ops::attention_bias(&batch.attention_mask, x.dtype())?;
        if !keep_all {
            // The layers as one graph node where they are block nodes (`kernels::stack`).
            let last = crate::model::kernels::stack::run(&x, |x| {
                let mut x = x.clone();
                for layer in &self.layers {
                    x = layer.forward(&x, &bias, mode)?;
                }
                Ok(x)
            })?;
            return Ok(vec![last]);
        }
        let mut states = vec![x];
        for layer in &self.layers {
            let next = layer.forward(&states[states.len() - 1], &bias, mode)?;
            if !keep_all {
                states.clear();
            }
            states.push(next);
        }
        Ok(states)
    }
}

impl SequenceClassifier for DistilBertClassifier {
    fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let states = self.states(batch, mode, false)?;
        let last = states
            .last()
            .ok_or_else(|| candle_core::Error::Msg("no hidden state".into()))?;
        let first = last.i((.., 0))?;
        let x = self.pre_classifier.forward(&first)?.relu()?;
        let x = ops::dropout(&x, self.head_dropout, mode)?;
        self.classifier.forward(&x)?.to_dtype(DType::F32)
    }

    fn hidden_states(&self, batch: &Batch) -> Result<Vec<Tensor>> {
        self.states(batch, Mode::Eval, true)
    }
}
