//! Differentiable building blocks: candle's fused layer norm and softmax record no gradient, so the
//! encoders are built from these composed ops instead (a fused op with a hand-written backward can
//! later replace a body here without touching the callers).

use super::Mode;
use candle_core::{DType, Device, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use std::sync::Mutex;

/// Host RNG for dropout masks on the CPU, whose candle RNG cannot be seeded.
static HOST_RNG: Mutex<Option<rand::rngs::StdRng>> = Mutex::new(None);

/// Seeds dropout: the device RNG where candle can seed it (CUDA), the host RNG used for CPU masks.
pub fn seed(device: &Device, seed: u64) -> Result<()> {
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    let mut rng = HOST_RNG
        .lock()
        .map_err(|_| candle_core::Error::Msg("dropout RNG lock poisoned".into()))?;
    *rng = Some(rand::rngs::StdRng::seed_from_u64(seed));
    Ok(())
}

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var + eps) * w + b`, computed in
/// f32 for half-precision inputs.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

/// Additive attention bias `[batch, 1, 1, seq]` from a `[batch, seq]` 0/1 mask: 0 where attended,
/// a large negative where padded. Computed once per forward and shared by every layer.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?;
    bias.reshape((b, 1, 1, s))?.to_dtype(dtype)
}

/// Softmax over the last dimension of `scores + bias`, where `bias` comes from `attention_bias`.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    softmax(&scores.broadcast_add(bias)?)
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    // The shift is a constant for the gradient: softmax is invariant to it.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Exact (erf) GELU, transformers' "gelu"; candle's `gelu_erf` has a backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Inverted dropout: in `Mode::Train` zeroes each element with probability `p` and scales the rest
/// by `1 / (1 - p)`; the identity in `Mode::Eval` or when `p` is 0.
pub fn dropout(x: &Tensor, p: f32, mode: Mode) -> Result<Tensor> {
    if mode == Mode::Eval || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    let keep = if x.device().is_cpu() {
        let n = x.elem_count();
        let mut guard = HOST_RNG
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout RNG lock poisoned".into()))?;
        let rng = guard.get_or_insert_with(|| rand::rngs::StdRng::seed_from_u64(0));
        let scale = 1.0 / (1.0 - p);
        let v: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f32>() >= p { scale } else { 0.0 })
            .collect();
        Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?
    } else {
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        (u.ge(f64::from(p))?.to_dtype(DType::F32)? * (1.0 / (1.0 - f64::from(p))))?
            .to_dtype(x.dtype())?
    };
    x.mul(&keep)
}

/// The activations the supported configs name (`hidden_act` / `activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Activation {
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation ("gelu_new", "gelu_pytorch_tanh").
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    #[serde(rename = "tanh")]
    Tanh,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => gelu(x),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Tanh => x.tanh(),
        }
    }
}
