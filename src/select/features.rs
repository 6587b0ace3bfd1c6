//! Frozen features: an encoder's hidden states pooled into one row per example, computed once per
//! (weights, data, pooling, layers, caps) and kept on disk under `$RECYCLE_HOME/features/`, so
//! probing a model again (another proxy, another report) costs a file read, not a forward pass.

use super::linear_probe::{average_layers, pool, stack_rows, HiddenView, Pooling};
use super::Matrix;
use crate::model::SequenceClassifier;
use crate::results::{FeatureLayers, FeaturePooling};
use crate::tokenize::{make_batch, Encoded, PadTo};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Bumped when the way features are computed changes: old cache files are then never read.
pub const FEATURES_VERSION: u32 = 1;

/// How features are taken from the hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureSpec {
    pub pooling: FeaturePooling,
    pub layers: FeatureLayers,
    /// Examples per forward pass (batches are padded to their longest example).
    pub batch_size: usize,
}

/// Pooled features of `encoded`, one row per example in example order. The model runs in eval
/// mode over examples sorted by length (less padding); pass a model over detached weights
/// (`LoadedModel::inference_model`) so no autograd graph is built.
pub fn extract(
    model: &dyn SequenceClassifier,
    encoded: &Encoded,
    pad_id: u32,
    spec: &FeatureSpec,
    device: &Device,
) -> Result<Matrix> {
    ensure!(!encoded.is_empty(), "no examples to compute features of");
    let pooling = match spec.pooling {
        FeaturePooling::Cls => Pooling::Cls,
        FeaturePooling::Mean => Pooling::Mean,
    };
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| encoded.input_ids[i].len());
    let mut blocks = Vec::new();
    for chunk in order.chunks(spec.batch_size.max(1)) {
        let batch = make_batch(encoded, chunk, pad_id, PadTo::LONGEST, device)?;
        let states = model
            .hidden_states(&batch)
            .context("hidden states in eval mode")?;
        let chosen: Vec<&Tensor> = match spec.layers {
            FeatureLayers::Last => states.last().into_iter().collect(),
            FeatureLayers::AllMean => states.iter().collect(),
        };
        ensure!(!chosen.is_empty(), "the model returned no hidden states");
        let mask: Vec<u32> = batch.attention_mask.flatten_all()?.to_vec1::<u32>()?;
        let mut pooled = Vec::with_capacity(chosen.len());
        for t in chosen {
            let (b, s, h) = t
                .dims3()
                .context("hidden states must be [batch, seq, hidden]")?;
            let values = t
                .detach()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            pooled.push(pool(&HiddenView::new(&values, b, s, h)?, &mask, pooling)?);
        }
        blocks.push(average_layers(&pooled)?);
    }
    let sorted = stack_rows(&blocks)?;
    // Put the rows back in example order.
    let mut out = Matrix::zeros(sorted.rows(), sorted.cols());
    for (row, &i) in order.iter().enumerate() {
        out.row_mut(i).copy_from_slice(sorted.row(row));
    }
    Ok(out)
}

/// Everything that determines a feature matrix; its hash names the cache file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureKey {
    pub version: u32,
    /// sha256 over the model's weight files.
    pub weights_sha256: String,
    pub dataset_fingerprint: String,
    /// Split name and the number of examples taken from it (after the cap), per split.
    pub splits: Vec<(String, usize)>,
    /// Seed of the subsample drawn when a cap applies.
    pub sample_seed: u64,
    pub pooling: FeaturePooling,
    pub layers: FeatureLayers,
    pub max_length: usize,
}

impl FeatureKey {
    /// sha256 of the key's canonical JSON.
    pub fn hash(&self) -> Result<String> {
        let v = serde_json::to_value(self).context("cannot serialise the feature key")?;
        Ok(crate::plan::sha256_hex(
            crate::plan::canonical_json(&v).as_bytes(),
        ))
    }
}

/// The features of every split of one key, by split name.
pub type SplitFeatures = HashMap<String, Matrix>;

/// The directory of cached features: one safetensors file per key, written atomically.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

impl FeatureCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$RECYCLE_HOME/features`.
    pub fn from_home() -> Result<Self> {
        Ok(Self::new(crate::suite::recycle_home()?.join("features")))
    }

    pub fn path_for(&self, key_hash: &str) -> PathBuf {
        self.dir.join(format!("{key_hash}.safetensors"))
    }

    /// The cached features of `key`, else `compute()`'s, stored before they are returned. The flag
    /// says whether they came from the cache. A cache file that cannot be read is recomputed.
    pub fn get_or_compute(
        &self,
        key: &FeatureKey,
        compute: impl FnOnce() -> Result<SplitFeatures>,
    ) -> Result<(SplitFeatures, bool)> {
        let path = self.path_for(&key.hash()?);
        if path.is_file() {
            match read_features(&path) {
                Ok(f)
                    if key
                        .splits
                        .iter()
                        .all(|(s, n)| f.get(s).is_some_and(|m| m.rows() == *n)) =>
                {
                    return Ok((f, true))
                }
                Ok(_) => eprintln!(
                    "warning: {}: cached features do not match their key; recomputing",
                    path.display()
                ),
                Err(e) => eprintln!("warning: {e:#}; recomputing"),
            }
        }
        let features = compute()?;
        write_features(&path, &features)?;
        Ok((features, false))
    }
}

fn read_features(path: &Path) -> Result<SplitFeatures> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read cached features {}", path.display()))?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            let (r, c) = t
                .dims2()
                .with_context(|| format!("{}: tensor {name} is not a matrix", path.display()))?;
            let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            Ok((name, Matrix::from_vec(r, c, data)?))
        })
        .collect()
}

/// Writes the features as f64 tensors to `path`, atomically.
fn write_features(path: &Path, features: &SplitFeatures) -> Result<()> {
    let mut tensors = HashMap::new();
    for (name, m) in features {
        let t = Tensor::from_slice(m.as_slice(), (m.rows(), m.cols()), &Device::Cpu)?;
        tensors.insert(name.clone(), t);
    }
    crate::atomic::write_file_with(path, crate::atomic::TEMP_PREFIX, |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })
    .context("cannot write to the feature cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FeatureKey {
        FeatureKey {
            version: FEATURES_VERSION,
            weights_sha256: "w".into(),
            dataset_fingerprint: "d".into(),
            splits: vec![("train".into(), 2)],
            sample_seed: 0,
            pooling: FeaturePooling::Mean,
            layers: FeatureLayers::Last,
            max_length: 8,
        }
    }

    #[test]
    fn the_second_request_reads_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FeatureCache::new(dir.path());
        let m = Matrix::from_rows(&[vec![1.0, 0.1], vec![-2.0, 1e-9]]).unwrap();
        let calls = std::cell::Cell::new(0);
        let compute = || {
            calls.set(calls.get() + 1);
            Ok(HashMap::from([("train".to_string(), m.clone())]))
        };
        let (a, hit_a) = cache.get_or_compute(&key(), compute).unwrap();
        let (b, hit_b) = cache.get_or_compute(&key(), compute).unwrap();
        assert_eq!((hit_a, hit_b, calls.get()), (false, true, 1));
        assert_eq!(a["train"], b["train"]);
        // Another key computes again.
        let other = FeatureKey {
            pooling: FeaturePooling::Cls,
            ..key()
        };
        let (_, hit) = cache.get_or_compute(&other, compute).unwrap();
        assert_eq!((hit, calls.get()), (false, 2));
    }
}
