//! A bag-of-embeddings classifier over a `VarMap`, for testing the loop without a transformer.

use crate::model::{Batch, Mode, SequenceClassifier};
use candle_core::{DType, Device, Result as CResult, Tensor, Var, D};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

/// Mean of the token embeddings (padding masked out), then a linear head.
pub struct BagOfEmbeddings {
    emb: Tensor,
    weight: Tensor,
    bias: Tensor,
}

/// A fresh toy model's weights, drawn from a seeded generator (deterministic).
pub fn toy_varmap(vocab: usize, dim: usize, labels: usize, seed: u64) -> VarMap {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut draw =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect() };
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        let d = &Device::Cpu;
        data.insert(
            "embeddings.weight".into(),
            Var::from_vec(draw(vocab * dim), (vocab, dim), d).unwrap(),
        );
        data.insert(
            "classifier.weight".into(),
            Var::from_vec(draw(labels * dim), (labels, dim), d).unwrap(),
        );
        data.insert(
            "classifier.bias".into(),
            Var::zeros(labels, DType::F32, d).unwrap(),
        );
    }
    vm
}

impl BagOfEmbeddings {
    /// Over the `Var`s themselves (trainable) or over detached views of them (inference).
    pub fn new(vm: &VarMap, detached: bool) -> Self {
        let data = vm.data().lock().unwrap();
        let get = |n: &str| {
            let v = &data[n];
            if detached {
                v.as_detached_tensor()
            } else {
                v.as_tensor().clone()
            }
        };
        Self {
            emb: get("embeddings.weight"),
            weight: get("classifier.weight"),
            bias: get("classifier.bias"),
        }
    }

    /// The weights, copied, in a fixed order.
    pub fn snapshot(vm: &VarMap) -> Vec<Vec<f32>> {
        let data = vm.data().lock().unwrap();
        ["embeddings.weight", "classifier.weight", "classifier.bias"]
            .iter()
            .map(|n| {
                data[*n]
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    }
}

impl SequenceClassifier for BagOfEmbeddings {
    fn forward(&self, batch: &Batch, _mode: Mode) -> CResult<Tensor> {
        let (b, s) = batch.input_ids.dims2()?;
        let e = self
            .emb
            .index_select(&batch.input_ids.flatten_all()?, 0)?
            .reshape((b, s, ()))?;
        let mask = batch
            .attention_mask
            .to_dtype(DType::F32)?
            .unsqueeze(D::Minus1)?;
        let pooled = (e.broadcast_mul(&mask)?.sum(1)?).broadcast_div(&mask.sum(1)?)?;
        pooled.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }

    fn hidden_states(&self, batch: &Batch) -> CResult<Vec<Tensor>> {
        let (b, s) = batch.input_ids.dims2()?;
        Ok(vec![self
            .emb
            .index_select(&batch.input_ids.flatten_all()?, 0)?
            .reshape((b, s, ()))?])
    }
}
