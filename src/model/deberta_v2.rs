//! DeBERTa-v2/v3: disentangled attention (content-to-position and position-to-content scores over
//! log-bucketed relative positions), its embeddings, the optional first-layer convolution, and
//! `DebertaV2ForSequenceClassification`'s context pooler.

use super::layers::{Embedding, LayerNorm, Linear};
use super::ops::{self, Activation};
use super::{Batch, Mode, SequenceClassifier};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;

/// `pos_att_type`: a list (`["p2c", "c2p"]`) or a `|`-separated string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PosAttType {
    List(Vec<String>),
    Joined(String),
}

impl PosAttType {
    fn has(&self, kind: &str) -> bool {
        match self {
            Self::List(v) => v.iter().any(|s| s.trim().eq_ignore_ascii_case(kind)),
            Self::Joined(s) => s.split('|').any(|s| s.trim().eq_ignore_ascii_case(kind)),
        }
    }
}

/// The fields of a DeBERTa-v2 `config.json` the model reads; defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct DebertaV2Config {
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
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "minus_one")]
    pub max_relative_positions: i64,
    #[serde(default = "minus_one")]
    pub position_buckets: i64,
    #[serde(default = "yes")]
    pub position_biased_input: bool,
    #[serde(default)]
    pub pos_att_type: Option<PosAttType>,
    #[serde(default)]
    pub share_att_key: bool,
    #[serde(default)]
    pub norm_rel_ebd: Option<String>,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default)]
    pub attention_head_size: Option<usize>,
    #[serde(default)]
    pub conv_kernel_size: usize,
    #[serde(default = "one")]
    pub conv_groups: usize,
    #[serde(default = "default_conv_act")]
    pub conv_act: Activation,
    #[serde(default)]
    pub pooler_hidden_size: Option<usize>,
    #[serde(default)]
    pub pooler_dropout: f32,
    #[serde(default = "default_act")]
    pub pooler_hidden_act: Activation,
    #[serde(default)]
    pub cls_dropout: Option<f32>,
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_conv_act() -> Activation {
    Activation::Tanh
}
fn default_dropout() -> f32 {
    0.1
}
fn default_max_pos() -> usize {
    512
}
fn default_init_range() -> f64 {
    0.02
}
fn default_ln_eps() -> f64 {
    1e-7
}
fn minus_one() -> i64 {
    -1
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

impl DebertaV2Config {
    fn max_relative_positions(&self) -> i64 {
        if self.max_relative_positions < 1 {
            self.max_position_embeddings as i64
        } else {
            self.max_relative_positions
        }
    }

    /// Half the number of relative-position embeddings (`pos_ebd_size` / `att_span`).
    fn att_span(&self) -> usize {
        if self.position_buckets > 0 {
            self.position_buckets as usize
        } else {
            self.max_relative_positions() as usize
        }
    }

    fn pos_att(&self, kind: &str) -> bool {
        self.pos_att_type.as_ref().is_some_and(|p| p.has(kind))
    }
}

/// transformers' `make_log_bucket_position` for one relative position (computed in f32 as torch does).
fn log_bucket(rel: i64, bucket_size: i64, max_position: i64) -> i64 {
    let mid = bucket_size / 2;
    let abs_pos = if rel < mid && rel > -mid {
        mid - 1
    } else {
        rel.abs()
    };
    if abs_pos <= mid {
        return rel;
    }
    let ratio = (abs_pos as f32 / mid as f32).ln() / ((max_position - 1) as f32 / mid as f32).ln();
    let log_pos = (ratio * (mid - 1) as f32).ceil() as i64 + mid;
    log_pos * rel.signum()
}

/// Relative positions `q - k` `[seq, seq]`, log-bucketed when the config has buckets.
pub fn relative_positions(seq: usize, bucket_size: i64, max_position: i64) -> Vec<i64> {
    let mut out = Vec::with_capacity(seq * seq);
    for q in 0..seq as i64 {
        for k in 0..seq as i64 {
            let rel = q - k;
            out.push(if bucket_size > 0 && max_position > 0 {
                log_bucket(rel, bucket_size, max_position)
            } else {
                rel
            });
        }
    }
    out
}

/// Gather indices `[seq, seq]` into the `2 * span` relative embeddings: `clamp(sign * rel + span)`.
fn rel_index(rel: &[i64], sign: i64, span: usize, seq: usize, device: &Device) -> Result<Tensor> {
    let span = span as i64;
    let idx: Vec<u32> = rel
        .iter()
        .map(|r| (sign * r + span).clamp(0, 2 * span - 1) as u32)
        .collect();
    Tensor::from_vec(idx, (seq, seq), device)
}

struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    pos_key: Option<Linear>,
    pos_query: Option<Linear>,
    out: Linear,
    out_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    c2p: bool,
    p2c: bool,
    relative: bool,
    dropout: f32,
    attn_dropout: f32,
}

/// What every layer shares in one forward pass.
struct Context {
    /// `[b, 1, s, s]`, u8: 1 where both query and key are real tokens.
    pair_mask: Tensor,
    /// The (normalised) relative-position embeddings `[2 * span, hidden]`.
    rel_embeddings: Option<Tensor>,
    /// Gather indices `[s, s]` for c2p and for p2c.
    c2p_index: Tensor,
    p2c_index: Tensor,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &DebertaV2Config) -> Result<Self> {
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let heads = cfg.num_attention_heads;
        let head_dim = cfg.attention_head_size.unwrap_or(h / heads);
        let all = heads * head_dim;
        let sv = vb.pp("self");
        let (c2p, p2c) = (cfg.pos_att("c2p"), cfg.pos_att("p2c"));
        let separate = cfg.relative_attention && !cfg.share_att_key;
        Ok(Self {
            query: Linear::load(sv.pp("query_proj"), h, all, std)?,
            key: Linear::load(sv.pp("key_proj"), h, all, std)?,
            value: Linear::load(sv.pp("value_proj"), h, all, std)?,
            pos_key: if separate && c2p {
                Some(Linear::load(sv.pp("pos_key_proj"), h, all, std)?)
            } else {
                None
            },
            pos_query: if separate && p2c {
                Some(Linear::load(sv.pp("pos_query_proj"), h, all, std)?)
            } else {
                None
            },
            out: Linear::load(vb.pp("output").pp("dense"), all, h, std)?,
            out_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            heads,
            head_dim,
            c2p,
            p2c,
            relative: cfg.relative_attention,
            dropout: cfg.hidden_dropout_prob,
            attn_dropout: cfg.attention_probs_dropout_prob,
        })
    }

    /// `[b, s, heads * d]` → `[b, heads, s, d]`.
    fn split(&self, t: &Tensor) -> Result<Tensor> {
        let (b, s, _) = t.dims3()?;
        t.reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, x: &Tensor, ctx: &Context, mode: Mode) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let q = self.split(&self.query.forward(x)?)?;
        let k = self.split(&self.key.forward(x)?)?;
        let v = self.split(&self.value.forward(x)?)?;
        let factor = 1 + usize::from(self.c2p) + usize::from(self.p2c);
        let scale = 1.0 / ((self.head_dim * factor) as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        if let (true, Some(rel)) = (self.relative, &ctx.rel_embeddings) {
            let rel = ops::dropout(rel, self.dropout, mode)?.unsqueeze(0)?;
            let index = |i: &Tensor| {
                i.reshape((1, 1, s, s))?
                    .broadcast_as((b, self.heads, s, s))?
                    .contiguous()
            };
            if self.c2p {
                let proj = self.pos_key.as_ref().unwrap_or(&self.key);
                let pos_k = self.split(&proj.forward(&rel)?)?; // [1, h, 2span, d]
                let c2p = q.broadcast_matmul(&pos_k.t()?.contiguous()?)?; // [b, h, s, 2span]
                let c2p = c2p.gather(&index(&ctx.c2p_index)?, 3)?;
                scores = (scores + (c2p * scale)?)?;
            }
            if self.p2c {
                let proj = self.pos_query.as_ref().unwrap_or(&self.query);
                let pos_q = self.split(&proj.forward(&rel)?)?;
                let p2c = k.broadcast_matmul(&pos_q.t()?.contiguous()?)?; // [b, h, s(key), 2span]
                let p2c = p2c.gather(&index(&ctx.p2c_index)?, 3)?.transpose(2, 3)?;
                scores = (scores + (p2c * scale)?)?;
            }
        }
        // masked_fill(~mask, min) as transformers: a padded query row attends uniformly.
        let mask = ctx.pair_mask.broadcast_as(scores.shape())?;
        let lowest = match scores.dtype() {
            DType::F16 => -65504.0,
            // Finite in every dtype (f32::MIN rounds to -inf in bf16), so a fully masked row is uniform, not NaN.
            _ => -1e30,
        };
        let fill =
            Tensor::full(lowest, scores.shape(), scores.device())?.to_dtype(scores.dtype())?;
        let probs = ops::softmax(&mask.where_cond(&scores, &fill)?)?;
        let probs = ops::dropout(&probs, self.attn_dropout, mode)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((
            b,
            s,
            self.heads * self.head_dim,
        ))?;
        let o = ops::dropout(&self.out.forward(&context)?, self.dropout, mode)?;
        self.out_norm.forward(&(o + x)?)
    }
}

struct Layer {
    attention: Attention,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    act: Activation,
    dropout: f32,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &DebertaV2Config) -> Result<Self> {
        let (h, i, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        Ok(Self {
            attention: Attention::load(vb.pp("attention"), cfg)?,
            intermediate: Linear::load(vb.pp("intermediate").pp("dense"), h, i, std)?,
            output: Linear::load(vb.pp("output").pp("dense"), i, h, std)?,
            out_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Context, mode: Mode) -> Result<Tensor> {
        let a = self.attention.forward(x, ctx, mode)?;
        let i = self.act.apply(&self.intermediate.forward(&a)?)?;
        let o = ops::dropout(&self.output.forward(&i)?, self.dropout, mode)?;
        self.out_norm.forward(&(o + a)?)
    }
}

/// `ConvLayer`: a same-padded 1-D convolution over the sequence, added to the first layer's output.
/// Written as a sum of shifted matmuls so its gradient is built from well-tested ops.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    norm: LayerNorm,
    kernel: usize,
    act: Activation,
    dropout: f32,
}

impl Conv {
    fn load(vb: VarBuilder, cfg: &DebertaV2Config) -> Result<Self> {
        let (h, k) = (cfg.hidden_size, cfg.conv_kernel_size);
        if cfg.conv_groups != 1 {
            candle_core::bail!("conv_groups {} is not supported (only 1)", cfg.conv_groups);
        }
        if k % 2 == 0 {
            candle_core::bail!("an even conv_kernel_size ({k}) is not supported");
        }
        let std = cfg.initializer_range;
        Ok(Self {
            weight: vb.pp("conv").get_with_hints(
                (h, h, k),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            bias: vb.pp("conv").get_with_hints(h, "bias", Init::Const(0.0))?,
            norm: LayerNorm::load(vb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            kernel: k,
            act: cfg.conv_act,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    /// `input`: the encoder input `[b, s, h]`; `residual`: the first layer's output; `mask`: `[b, s, 1]`.
    fn forward(
        &self,
        input: &Tensor,
        residual: &Tensor,
        mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, s, _) = input.dims3()?;
        let pad = (self.kernel - 1) / 2;
        let padded = input.pad_with_zeros(1, pad, pad)?;
        let mut out = self
            .bias
            .unsqueeze(0)?
            .unsqueeze(0)?
            .broadcast_as(input.shape())?
            .contiguous()?;
        for j in 0..self.kernel {
            let w = self
                .weight
                .i((.., .., j))?
                .t()?
                .contiguous()?
                .broadcast_left(b)?; // [b, in, out]
            out = (out + padded.narrow(1, j, s)?.matmul(&w)?)?;
        }
        let out = out.broadcast_mul(mask)?;
        let out = self.act.apply(&ops::dropout(&out, self.dropout, mode)?)?;
        self.norm.forward(&(residual + out)?)?.broadcast_mul(mask)
    }
}

/// `DebertaV2ForSequenceClassification`.
pub struct DebertaV2Classifier {
    word: Embedding,
    position: Option<Embedding>,
    token_type: Option<Embedding>,
    embed_proj: Option<Linear>,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    rel_embeddings: Option<Tensor>,
    rel_norm: Option<LayerNorm>,
    conv: Option<Conv>,
    pooler: Linear,
    classifier: Linear,
    cfg: DebertaV2Config,
}

impl DebertaV2Classifier {
    pub fn load(vb: VarBuilder, cfg: &DebertaV2Config, num_labels: usize) -> Result<Self> {
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let e = cfg.embedding_size.unwrap_or(h);
        let base = vb.pp("deberta");
        let emb = base.pp("embeddings");
        let enc = base.pp("encoder");
        let norm_rel = cfg
            .norm_rel_ebd
            .as_deref()
            .unwrap_or("none")
            .to_ascii_lowercase()
            .split('|')
            .any(|s| s.trim() == "layer_norm");
        let pooler_size = cfg.pooler_hidden_size.unwrap_or(h);
        Ok(Self {
            word: Embedding::load(emb.pp("word_embeddings"), cfg.vocab_size, e, std)?,
            position: if cfg.position_biased_input {
                Some(Embedding::load(
                    emb.pp("position_embeddings"),
                    cfg.max_position_embeddings,
                    e,
                    std,
                )?)
            } else {
                None
            },
            token_type: if cfg.type_vocab_size > 0 {
                Some(Embedding::load(
                    emb.pp("token_type_embeddings"),
                    cfg.type_vocab_size,
                    e,
                    std,
                )?)
            } else {
                None
            },
            embed_proj: if e != h {
                Some(Linear::load_no_bias(emb.pp("embed_proj"), e, h, std)?)
            } else {
                None
            },
            emb_norm: LayerNorm::load(emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::load(enc.pp("layer").pp(i), cfg))
                .collect::<Result<Vec<_>>>()?,
            rel_embeddings: if cfg.relative_attention {
                Some(enc.pp("rel_embeddings").get_with_hints(
                    (2 * cfg.att_span(), h),
                    "weight",
                    Init::Randn {
                        mean: 0.0,
                        stdev: std,
                    },
                )?)
            } else {
                None
            },
            rel_norm: if cfg.relative_attention && norm_rel {
                Some(LayerNorm::load(enc.pp("LayerNorm"), h, cfg.layer_norm_eps)?)
            } else {
                None
            },
            conv: if cfg.conv_kernel_size > 0 {
                Some(Conv::load(enc.pp("conv"), cfg)?)
            } else {
                None
            },
            pooler: Linear::load(vb.pp("pooler").pp("dense"), pooler_size, pooler_size, std)?,
            classifier: Linear::load(vb.pp("classifier"), pooler_size, num_labels, std)?,
            cfg: cfg.clone(),
        })
    }

    fn states(&self, batch: &Batch, mode: Mode, keep_all: bool) -> Result<Vec<Tensor>> {
        let ids = &batch.input_ids;
        let (b, s) = ids.dims2()?;
        let device = ids.device();
        let mut x = self.word.forward(ids)?;
        if let Some(p) = &self.position {
            let pos = Tensor::arange(0u32, s as u32, device)?
                .unsqueeze(0)?
                .broadcast_as((b, s))?
                .contiguous()?;
            x = (x + p.forward(&pos)?)?;
        }
        if let Some(t) = &self.token_type {
            let types = match &batch.token_type_ids {
                Some(t) => t.clone(),
                None => ids.zeros_like()?,
            };
            x = (x + t.forward(&types)?)?;
        }
        if let Some(p) = &self.embed_proj {
            x = p.forward(&x)?;
        }
        let mask = batch.attention_mask.to_dtype(x.dtype())?.unsqueeze(2)?; // [b, s, 1]
        let x = self.emb_norm.forward(&x)?.broadcast_mul(&mask)?;
        let x = ops::dropout(&x, self.cfg.hidden_dropout_prob, mode)?;

        let m = batch.attention_mask.to_dtype(DType::U8)?;
        let pair_mask = m
            .unsqueeze(1)?
            .unsqueeze(2)?
            .broadcast_mul(&m.unsqueeze(1)?.unsqueeze(3)?)?; // [b,1,s,s]
        let rel_embeddings = match (&self.rel_embeddings, &self.rel_norm) {
            (Some(r), Some(n)) => Some(n.forward(r)?),
            (Some(r), None) => Some(r.clone()),
            _ => None,
        };
        let span = self.cfg.att_span();
        let rel = relative_positions(
            s,
            self.cfg.position_buckets,
            self.cfg.max_relative_positions(),
        );
        let ctx = Context {
            pair_mask,
            rel_embeddings,
            c2p_index: rel_index(&rel, 1, span, s, device)?,
            p2c_index: rel_index(&rel, -1, span, s, device)?,
        };
        let input = x;
        let mut states = vec![input.clone()];
        let mut current = input.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            current = layer.forward(&current, &ctx, mode)?;
            if let (0, Some(conv)) = (i, &self.conv) {
                current = conv.forward(&input, &current, &mask, mode)?;
            }
            if keep_all {
                states.push(current.clone());
            }
        }
        if !keep_all {
            states = vec![current];
        }
        Ok(states)
    }
}

impl SequenceClassifier for DebertaV2Classifier {
    fn forward(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let states = self.states(batch, mode, false)?;
        let last = states
            .last()
            .ok_or_else(|| candle_core::Error::Msg("no hidden state".into()))?;
        let first = ops::dropout(&last.i((.., 0))?, self.cfg.pooler_dropout, mode)?;
        let pooled = self
            .cfg
            .pooler_hidden_act
            .apply(&self.pooler.forward(&first)?)?;
        let p = self.cfg.cls_dropout.unwrap_or(self.cfg.hidden_dropout_prob);
        self.classifier
            .forward(&ops::dropout(&pooled, p, mode)?)?
            .to_dtype(DType::F32)
    }

    fn hidden_states(&self, batch: &Batch) -> Result<Vec<Tensor>> {
        self.states(batch, Mode::Eval, true)
    }
}
