//! The pure per-parameter arithmetic of every merge method, computed in fixed-size chunks so that a
//! tensor never has to be converted to f32 in full (only TIES' magnitude pass needs one f32 buffer
//! the size of the tensor).

use super::{MergeSpec, Method};
use anyhow::{bail, Context, Result};

/// Elements processed per step; small enough to stay in cache, large enough to amortise overhead.
pub const CHUNK: usize = 1 << 16;

/// The floating-point storage types that a merge reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    F16,
    BF16,
    F64,
}

impl FloatDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F16 | FloatDtype::BF16 => 2,
            FloatDtype::F32 => 4,
            FloatDtype::F64 => 8,
        }
    }

    /// The safetensors dtype, or `None` for a non-float one (copied verbatim, never merged).
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(FloatDtype::F32),
            safetensors::Dtype::F16 => Some(FloatDtype::F16),
            safetensors::Dtype::BF16 => Some(FloatDtype::BF16),
            safetensors::Dtype::F64 => Some(FloatDtype::F64),
            _ => None,
        }
    }

    /// Appends `values` to `out` in this dtype's little-endian encoding.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        for &v in values {
            match self {
                FloatDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                FloatDtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                FloatDtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                FloatDtype::F64 => out.extend_from_slice(&f64::from(v).to_le_bytes()),
            }
        }
    }
}

/// Where a merge reads one parameter's elements from, a chunk at a time.
pub trait Source {
    /// Number of elements.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `out` with the elements `start .. start + out.len()`, converted to f32.
    fn read(&self, start: usize, out: &mut [f32]);
    /// The merge has finished with elements `start .. start + n` for now (a mapped source can
    /// drop those pages from the resident set).
    fn done(&self, _start: usize, _n: usize) {}
}

/// A read-only view of one parameter's elements, read as f32 a chunk at a time.
#[derive(Debug, Clone, Copy)]
pub enum Elements<'a> {
    F32(&'a [f32]),
    /// Little-endian bytes of `dtype` (as stored in a safetensors file).
    Raw {
        bytes: &'a [u8],
        dtype: FloatDtype,
    },
}

impl Source for Elements<'_> {
    fn len(&self) -> usize {
        match self {
            Elements::F32(v) => v.len(),
            Elements::Raw { bytes, dtype } => bytes.len() / dtype.size(),
        }
    }

    fn read(&self, start: usize, out: &mut [f32]) {
        match *self {
            Elements::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Elements::Raw { bytes, dtype } => {
                let size = dtype.size();
                let bytes = &bytes[start * size..(start + out.len()) * size];
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(size)) {
                    *o = match dtype {
                        FloatDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                        FloatDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                        FloatDtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                        FloatDtype::F64 => {
                            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                                as f32
                        }
                    };
                }
            }
        }
    }
}

/// TIES' magnitude trim of one model's delta for one tensor: which entries survive.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Trim {
    /// density 1 (or k ≥ n): every entry survives.
    All,
    /// k = 0: no entry survives.
    Nothing,
    /// Entries with |δ| > threshold survive, plus the first `equal_to_keep` entries (in index
    /// order) with |δ| == threshold, so that exactly k entries survive even when magnitudes tie.
    /// Magnitudes are compared as the bits of the non-negative f32 `|δ|`, which order like the
    /// numbers (and put NaN above every number, consistently in both passes).
    Above {
        threshold: u32,
        equal_to_keep: usize,
    },
}

/// Merges one parameter tensor: built once per tensor (TIES computes its trim thresholds here),
/// then `run` streams the merged values chunk by chunk.
#[derive(Debug)]
pub struct ParamMerger<'s> {
    spec: &'s MergeSpec,
    len: usize,
    /// DARE: one mask key per model, from (seed, tensor name, model index).
    dare_keys: Vec<u64>,
    /// TIES: one trim per model; empty for the other methods.
    trims: Vec<Trim>,
}

impl<'s> ParamMerger<'s> {
    /// Prepares the merge of the tensor `name` (its architecture-normalised name, which keys the
    /// DARE masks). `base` is required by every method but `Average`, where it is ignored.
    pub fn new(
        spec: &'s MergeSpec,
        name: &str,
        base: Option<&dyn Source>,
        models: &[&dyn Source],
    ) -> Result<Self> {
        if models.len() != spec.weights.len() {
            bail!(
                "tensor {name}: {} models but {} weights",
                models.len(),
                spec.weights.len()
            );
        }
        let Some(first) = models.first() else {
            bail!("tensor {name}: no models to merge");
        };
        let len = first.len();
        if let Some((i, m)) = models.iter().enumerate().find(|(_, m)| m.len() != len) {
            bail!(
                "tensor {name}: model {i} has {} elements, model 0 has {len}",
                m.len()
            );
        }
        let base = match (spec.method.needs_base(), base) {
            (true, None) => bail!(
                "tensor {name}: method {} needs a base",
                spec.method.as_str()
            ),
            (true, Some(b)) if b.len() != len => {
                bail!(
                    "tensor {name}: base has {} elements, the models {len}",
                    b.len()
                )
            }
            (_, b) => b,
        };
        let dare_keys = (0..models.len())
            .map(|i| dare_key(spec.seed, name, i))
            .collect();
        let trims = match (spec.method, base) {
            (Method::Ties, Some(base)) => trim_thresholds(spec.density, base, models),
            _ => Vec::new(),
        };
        Ok(ParamMerger {
            spec,
            len,
            dare_keys,
            trims,
        })
    }

    /// Number of elements of the merged tensor.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Computes the merged tensor in order, handing each chunk of f32 values to `sink`. `base` and
    /// `models` must be the views given to `new`.
    pub fn run(
        &self,
        base: Option<&dyn Source>,
        models: &[&dyn Source],
        mut sink: impl FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let k = models.len();
        let step = CHUNK.min(self.len.max(1));
        let mut base_buf = vec![0f32; step];
        let mut model_bufs = vec![0f32; step * k];
        let mut out = vec![0f32; step];
        let mut delta = vec![0f32; k];
        // TIES: per model, how many threshold-equal entries have been kept so far.
        let mut equal_seen = vec![0usize; k];
        let spec = self.spec;
        let weight_sum: f32 = spec.weights.iter().sum();
        let keep_scale = 1.0 / (1.0 - spec.drop_rate);

        let mut start = 0;
        while start < self.len {
            let n = step.min(self.len - start);
            for (i, m) in models.iter().enumerate() {
                m.read(start, &mut model_bufs[i * step..i * step + n]);
            }
            if let (true, Some(b)) = (spec.method.needs_base(), base) {
                b.read(start, &mut base_buf[..n]);
            }
            for j in 0..n {
                let value = |i: usize| model_bufs[i * step + j];
                let b = base_buf[j];
                let global = (start + j) as u64;
                out[j] = match spec.method {
                    Method::Average => {
                        let acc: f32 = (0..k).map(|i| spec.weights[i] * value(i)).sum();
                        if spec.normalize {
                            acc / weight_sum
                        } else {
                            acc
                        }
                    }
                    Method::TaskArithmetic => {
                        let acc: f32 = (0..k).map(|i| spec.weights[i] * (value(i) - b)).sum();
                        b + spec.lambda * acc
                    }
                    Method::DareLinear => {
                        let acc: f32 = (0..k)
                            .map(|i| {
                                let d = dare(value(i) - b, self.dare_keys[i], global, spec);
                                spec.weights[i] * d * keep_scale
                            })
                            .sum();
                        b + spec.lambda * acc
                    }
                    Method::Ties => {
                        for i in 0..k {
                            let d = value(i) - b;
                            let kept = match self.trims[i] {
                                Trim::All => true,
                                Trim::Nothing => false,
                                Trim::Above {
                                    threshold,
                                    equal_to_keep,
                                } => {
                                    let mag = d.abs().to_bits();
                                    if mag > threshold {
                                        true
                                    } else if mag == threshold && equal_seen[i] < equal_to_keep {
                                        equal_seen[i] += 1;
                                        true
                                    } else {
                                        false
                                    }
                                }
                            };
                            delta[i] = if kept { d } else { 0.0 };
                        }
                        b + spec.lambda * elect_and_merge(&delta, &spec.weights, spec.normalize)
                    }
                    Method::DareTies => {
                        for (i, d) in delta.iter_mut().enumerate() {
                            *d = dare(value(i) - b, self.dare_keys[i], global, spec) * keep_scale;
                        }
                        b + spec.lambda * elect_and_merge(&delta, &spec.weights, spec.normalize)
                    }
                };
            }
            sink(&out[..n])?;
            for m in models {
                m.done(start, n);
            }
            if let (true, Some(b)) = (spec.method.needs_base(), base) {
                b.done(start, n);
            }
            start += n;
        }
        Ok(())
    }
}

/// Merges one parameter given as f32 slices: the pure entry point (tests, small tensors).
/// `name` keys the DARE masks; `base` is ignored by `Average` and required by the others.
pub fn merge_param(
    spec: &MergeSpec,
    name: &str,
    base: Option<&[f32]>,
    models: &[&[f32]],
) -> Result<Vec<f32>> {
    let base = base.map(Elements::F32);
    let models: Vec<Elements> = models.iter().map(|m| Elements::F32(m)).collect();
    let base: Option<&dyn Source> = base.as_ref().map(|b| b as &dyn Source);
    let models: Vec<&dyn Source> = models.iter().map(|m| m as &dyn Source).collect();
    let merger = ParamMerger::new(spec, name, base, &models)?;
    let mut out = Vec::with_capacity(merger.len());
    merger
        .run(base, &models, |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })
        .with_context(|| format!("merging tensor {name}"))?;
    Ok(out)
}

/// TIES sign election and disjoint merge of one entry's (already trimmed or dropped) deltas:
/// the elected sign is that of `Σ w_i δ_i`; the entries whose weighted delta `w_i δ_i` has that
/// sign are summed, and divided by the sum of their weights when `normalize`.
pub fn elect_and_merge(delta: &[f32], weights: &[f32], normalize: bool) -> f32 {
    let total: f32 = delta.iter().zip(weights).map(|(d, w)| d * w).sum();
    if total == 0.0 || total.is_nan() {
        return 0.0;
    }
    let positive = total > 0.0;
    let (mut num, mut den) = (0f32, 0f32);
    for (d, w) in delta.iter().zip(weights) {
        let s = d * w;
        if s != 0.0 && (s > 0.0) == positive {
            num += s;
            den += w;
        }
    }
    if !normalize {
        num
    } else if den.abs() > 1e-12 {
        num / den
    } else {
        0.0
    }
}

/// Per model: the magnitude threshold keeping the top `k = round(density · n)` entries of its
/// delta, found by a two-pass radix select over the magnitudes' bits (high 16 bits, then low 16
/// bits within the chosen bucket): exact, streaming, and 512 KiB of counters whatever the size.
fn trim_thresholds(density: f32, base: &dyn Source, models: &[&dyn Source]) -> Vec<Trim> {
    let n = base.len();
    let k = ((f64::from(density) * n as f64).round() as usize).min(n);
    if k == n {
        return vec![Trim::All; models.len()];
    }
    if k == 0 {
        return vec![Trim::Nothing; models.len()];
    }
    let step = CHUNK.min(n);
    let mut base_buf = vec![0f32; step];
    let mut model_buf = vec![0f32; step];
    let mut counts = vec![0usize; 1 << 16];
    let mut trims = Vec::with_capacity(models.len());
    for m in models {
        // Pass 1: histogram of the high 16 bits; pass 2: of the low 16 bits inside the bucket
        // that holds the k-th largest magnitude.
        let mut high = None;
        let mut above = 0usize;
        for pass in 0..2 {
            counts.iter_mut().for_each(|c| *c = 0);
            let mut start = 0;
            while start < n {
                let len = step.min(n - start);
                base.read(start, &mut base_buf[..len]);
                m.read(start, &mut model_buf[..len]);
                for (x, b) in model_buf[..len].iter().zip(&base_buf[..len]) {
                    let bits = (x - b).abs().to_bits();
                    match high {
                        None => counts[(bits >> 16) as usize] += 1,
                        Some(h) if bits >> 16 == h => counts[(bits & 0xffff) as usize] += 1,
                        Some(_) => {}
                    }
                }
                m.done(start, len);
                base.done(start, len);
                start += len;
            }
            // Walk down from the largest bucket until the k-th largest entry is inside.
            let mut bucket = 0u32;
            for (i, &c) in counts.iter().enumerate().rev() {
                if above + c >= k {
                    bucket = i as u32;
                    break;
                }
                above += c;
            }
            if pass == 0 {
                high = Some(bucket);
            } else if let Some(h) = high {
                trims.push(Trim::Above {
                    threshold: (h << 16) | bucket,
                    equal_to_keep: k - above,
                });
            }
        }
    }
    trims
}

/// DARE: keep `d` with probability 1 − p, else 0 (the caller rescales the kept entries).
fn dare(d: f32, key: u64, index: u64, spec: &MergeSpec) -> f32 {
    if spec.drop_rate == 0.0 || unit(key, index) >= f64::from(spec.drop_rate) {
        d
    } else {
        0.0
    }
}

/// The key of model `model`'s DARE mask for tensor `name`: independent of tensor order.
pub fn dare_key(seed: u64, name: &str, model: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a over the name
    for &byte in name.as_bytes() {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(seed ^ splitmix64(h ^ splitmix64(model as u64)))
}

/// A uniform number in [0, 1) for element `index` of the mask keyed `key` (counter-based, so it
/// does not depend on how the tensor is chunked).
fn unit(key: u64, index: u64) -> f64 {
    let bits = splitmix64(key.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Merges one parameter given as candle tensors (e.g. the `VarMap`s of models held in memory):
/// computed in f32 on the CPU, returned with the shape, dtype and device of the first model.
pub fn merge_tensor(
    spec: &MergeSpec,
    name: &str,
    base: Option<&candle_core::Tensor>,
    models: &[&candle_core::Tensor],
) -> Result<candle_core::Tensor> {
    let to_vec = |t: &candle_core::Tensor| -> Result<Vec<f32>> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .with_context(|| format!("reading tensor {name} as f32"))
    };
    let Some(first) = models.first() else {
        bail!("tensor {name}: no models to merge");
    };
    for m in models {
        if m.shape() != first.shape() {
            bail!(
                "tensor {name}: shapes {:?} and {:?} differ",
                first.dims(),
                m.dims()
            );
        }
    }
    let base_values = base.map(to_vec).transpose()?;
    let model_values = models
        .iter()
        .map(|m| to_vec(m))
        .collect::<Result<Vec<_>>>()?;
    let slices: Vec<&[f32]> = model_values.iter().map(Vec::as_slice).collect();
    let merged = merge_param(spec, name, base_values.as_deref(), &slices)?;
    candle_core::Tensor::from_vec(merged, first.shape(), first.device())
        .and_then(|t| t.to_dtype(first.dtype()))
        .with_context(|| format!("building merged tensor {name}"))
}
