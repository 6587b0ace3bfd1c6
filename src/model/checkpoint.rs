//! Checkpoint files: reading `config.json` and (sharded) safetensors into a trainable `VarMap`, and
//! writing a directory that transformers' `from_pretrained` loads.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarMap};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Reads `config.json` of a checkpoint directory.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`,
/// on `device`, under the names they have in the files.
pub fn read_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return candle_core::safetensors::load(&single, device)
            .with_context(|| format!("cannot read {}", single.display()));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let mut all = HashMap::new();
        for shard in shards {
            let path = dir.join(shard);
            let part = candle_core::safetensors::load(&path, device)
                .with_context(|| format!("cannot read shard {}", path.display()))?;
            all.extend(part);
        }
        return Ok(all);
    }
    if dir.join("pytorch_model.bin").is_file() {
        bail!(
            "{}: only safetensors weights are supported, this checkpoint has pytorch_model.bin",
            dir.display()
        );
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

/// Renames checkpoint tensors to the names the model asks for: adds the architecture prefix
/// (`bert.`) when the checkpoint is a bare encoder (sentence-transformers), and renames old
/// LayerNorm `gamma`/`beta` to `weight`/`bias`.
pub fn canonical_names(
    weights: HashMap<String, Tensor>,
    prefix: &str,
    head_prefixes: &[&str],
) -> HashMap<String, Tensor> {
    let dotted = format!("{prefix}.");
    let has_prefix = weights.keys().any(|k| k.starts_with(&dotted));
    weights
        .into_iter()
        .map(|(name, t)| {
            let name = if has_prefix || head_prefixes.iter().any(|h| name.starts_with(h)) {
                name
            } else {
                format!("{dotted}{name}")
            };
            let name = if let Some(stem) = name.strip_suffix(".gamma") {
                format!("{stem}.weight")
            } else if let Some(stem) = name.strip_suffix(".beta") {
                format!("{stem}.bias")
            } else {
                name
            };
            (name, t)
        })
        .collect()
}

/// Normal(mean, std) samples from a seeded RNG (Box–Muller), so a fresh head is the same on every
/// device and run with the same seed.
fn normal(rng: &mut rand::rngs::StdRng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (mean + std * z) as f32
        })
        .collect()
}

/// A `VarBuilder` backend that moves checkpoint tensors into a `VarMap` as they are asked for, and
/// initialises the head parameters the checkpoint lacks or has at another size.
pub struct CheckpointBackend {
    pub checkpoint: String,
    pub weights: HashMap<String, Tensor>,
    pub varmap: VarMap,
    /// Name prefixes that may be freshly initialised (pooler and classifier).
    pub fresh_ok: Vec<String>,
    rng: Mutex<rand::rngs::StdRng>,
    /// Names initialised here; shared so the caller can read them after the `VarBuilder` is gone.
    pub fresh: Arc<Mutex<Vec<String>>>,
}

impl CheckpointBackend {
    pub fn new(
        checkpoint: String,
        weights: HashMap<String, Tensor>,
        fresh_ok: Vec<String>,
        seed: u64,
    ) -> Self {
        Self {
            checkpoint,
            weights,
            varmap: VarMap::new(),
            fresh_ok,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            fresh: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn init(
        &self,
        shape: &Shape,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let t = match h {
            Init::Const(c) => Tensor::full(c as f32, shape, dev)?,
            Init::Randn { mean, stdev } => {
                let mut rng = self.rng.lock().map_err(|_| msg("head RNG lock poisoned"))?;
                Tensor::from_vec(normal(&mut rng, n, mean, stdev), shape, dev)?
            }
            other => return Err(msg(&format!("unsupported initialisation {other:?}"))),
        };
        t.to_dtype(dtype)
    }
}

fn msg(s: &str) -> candle_core::Error {
    candle_core::Error::Msg(s.to_string())
}

impl candle_nn::var_builder::SimpleBackend for CheckpointBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let ck = &self.checkpoint;
        let may_init = self.fresh_ok.iter().any(|p| name.starts_with(p.as_str()));
        let tensor = match self.weights.get(name) {
            Some(t) if t.shape() == &s => t.to_device(dev)?.to_dtype(dtype)?,
            Some(t) if may_init => {
                eprintln!(
                    "{ck}: {name} has shape {:?}, the task needs {:?}: replaced by a fresh initialisation",
                    t.dims(),
                    s.dims()
                );
                self.fresh
                    .lock()
                    .map_err(|_| msg("lock poisoned"))?
                    .push(name.to_string());
                self.init(&s, h, dtype, dev)?
            }
            Some(t) => {
                return Err(msg(&format!(
                    "{ck}: {name} has shape {:?}, the config implies {:?}",
                    t.dims(),
                    s.dims()
                )))
            }
            None if may_init => {
                self.fresh
                    .lock()
                    .map_err(|_| msg("lock poisoned"))?
                    .push(name.to_string());
                self.init(&s, h, dtype, dev)?
            }
            None => return Err(msg(&format!("{ck}: missing tensor {name}"))),
        };
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        self.varmap
            .data()
            .lock()
            .map_err(|_| msg("VarMap lock poisoned"))?
            .insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.weights.get(name) {
            Some(t) => t.to_device(dev)?.to_dtype(dtype),
            None => Err(msg(&format!("{}: missing tensor {name}", self.checkpoint))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }
}

/// Writes every tensor of `varmap` to `path` as safetensors, under its VarMap name.
pub fn write_weights(varmap: &VarMap, path: &Path) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    candle_core::safetensors::save(&tensors, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Tokenizer files copied next to a saved checkpoint when the source has them.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spm.model",
    "added_tokens.json",
];

/// Copies the tokenizer files `src` has into `dst`.
pub fn copy_tokenizer(src: &Path, dst: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.is_file() {
            let to = dst.join(f);
            std::fs::copy(&from, &to)
                .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}
