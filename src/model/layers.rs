//! Trainable layers over a `VarBuilder`, with transformers' initialisation as the hint for any
//! weight the checkpoint lacks (normal(0, initializer_range) weights, zero biases, unit LayerNorm).
//!
//! Each layer computes in its builder's dtype. A weight handed over in another one (an uncast f32
//! master in a mixed-precision forward, `model::casting`) is cast where the layer uses it, a
//! recorded cast, so its gradient reaches the master; weights in the builder's dtype cost nothing.

use super::kernels::block_node::{Dense, Norm};
use super::ops;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// A dense layer `x W^T + b` under transformers' names `weight` `[out, in]` and `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    dtype: DType,
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, init_std: f64) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: init_std,
            },
        )?;
        let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias: Some(bias),
            dtype: vb.dtype(),
        })
    }

    /// A dense layer without a bias (`nn.Linear(..., bias=False)`).
    pub fn load_no_bias(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        init_std: f64,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: init_std,
            },
        )?;
        Ok(Self {
            weight,
            bias: None,
            dtype: vb.dtype(),
        })
    }
}

impl Linear {
    /// The weight and bias, for the block nodes (`None` without a bias).
    pub fn dense(&self) -> Option<Dense<'_>> {
        Some(Dense {
            w: &self.weight,
            b: self.bias.as_ref()?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(self.dtype))
            .transpose()?;
        ops::linear(x, &self.weight.to_dtype(self.dtype)?, bias.as_ref())
    }
}

/// LayerNorm with the names `weight` and `bias`; checkpoints that still say `gamma`/`beta` are
/// renamed when they are read.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    dtype: DType,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            eps,
            dtype: vb.dtype(),
        })
    }
}

impl LayerNorm {
    /// The weight, bias and epsilon, for the block nodes.
    pub fn norm(&self) -> Norm<'_> {
        Norm {
            w: &self.weight,
            b: &self.bias,
            eps: self.eps,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (
            self.weight.to_dtype(self.dtype)?,
            self.bias.to_dtype(self.dtype)?,
        );
        ops::layer_norm(x, &w, &b, self.eps)
    }
}

/// A lookup table `[vocab, dim]` under the name `weight`.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
    dtype: DType,
}

impl Embedding {
    pub fn load(vb: VarBuilder, vocab: usize, dim: usize, init_std: f64) -> Result<Self> {
        let weight = vb.get_with_hints(
            (vocab, dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: init_std,
            },
        )?;
        Ok(Self {
            weight,
            dtype: vb.dtype(),
        })
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        ops::embedding(&self.weight, ids, self.dtype)
    }
}

impl Embedding {
    /// The sum of each table's rows for its ids (`ops::embeddings_sum`), in the first table's
    /// dtype.
    pub fn sum(parts: &[(&Embedding, &Tensor)]) -> Result<Tensor> {
        let tables: Vec<&Tensor> = parts.iter().map(|(e, _)| &e.weight).collect();
        let ids: Vec<&Tensor> = parts.iter().map(|(_, i)| *i).collect();
        let dtype = parts.first().map_or(DType::F32, |(e, _)| e.dtype);
        ops::embeddings_sum(&tables, &ids, dtype)
    }
}

/// Multi-head self-attention core shared by the encoders: projected `q`, `k`, `v` `[b, s, hidden]`
/// → context `[b, s, hidden]`, with padding masked by `bias` (see `ops::attention_bias`).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    attn_dropout: f32,
    mode: super::Mode,
) -> Result<Tensor> {
    let (b, s, hidden) = q.dims3()?;
    let head_dim = hidden / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if let Some(ctx) = ops::fused_attention(q, k, v, bias, heads, scale, attn_dropout, mode)? {
        return Ok(ctx);
    }
    let split =
        |t: &Tensor| -> Result<Tensor> { ops::swap12(&t.reshape((b, s, heads, head_dim))?) };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    // gemm reads the transposed `k` through its strides; the scale is applied inside the softmax.
    let scores = q.matmul(&k.t()?)?;
    let probs = ops::scaled_masked_softmax(&scores, bias, scale)?;
    let probs = ops::dropout(&probs, attn_dropout, mode)?;
    ops::swap12(&probs.matmul(&v)?)?.reshape((b, s, hidden))
}
