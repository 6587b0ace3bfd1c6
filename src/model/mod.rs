//! Trainable encoders for sequence classification, one adapter per architecture behind one trait.
//!
//! The contract between the architectures (this module) and the training loop (`train`): a model is
//! a `SequenceClassifier` built over a `VarBuilder`; the trainable weights live in a `VarMap` under
//! transformers' parameter names, so a checkpoint saved from it loads in
//! `AutoModelForSequenceClassification` and vice versa.

use candle_core::{Result as CResult, Tensor};

/// One padded batch, as the tokenizer produces it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]`, u32 token ids.
    pub input_ids: Tensor,
    /// `[batch, seq]`, u32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, seq]`, u32 segment ids, for architectures that have them.
    pub token_type_ids: Option<Tensor>,
}

/// Train or eval mode: dropout is active only in `Train`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// An encoder with a sequence-classification head.
pub trait SequenceClassifier: Send + Sync {
    /// Logits `[batch, num_labels]` (f32). In `Mode::Train`, dropout is applied.
    fn forward(&self, batch: &Batch, mode: Mode) -> CResult<Tensor>;
    /// Hidden states in eval mode: the embedding output, then each layer's output, `[batch, seq, hidden]`.
    fn hidden_states(&self, batch: &Batch) -> CResult<Vec<Tensor>>;
}

pub mod bert;
pub mod casting;
pub mod checkpoint;
pub mod deberta_v2;
pub mod distilbert;
pub mod grad_sink;
pub mod kernels;
pub mod layers;
pub mod ops;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The supported architectures, from `model_type` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    #[serde(rename = "bert")]
    Bert,
    #[serde(rename = "roberta")]
    Roberta,
    #[serde(rename = "xlm-roberta")]
    XlmRoberta,
    #[serde(rename = "distilbert")]
    DistilBert,
    #[serde(rename = "deberta-v2")]
    DebertaV2,
}

impl Arch {
    /// From `config.json`'s `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "bert" => Some(Self::Bert),
            "roberta" => Some(Self::Roberta),
            "xlm-roberta" => Some(Self::XlmRoberta),
            "distilbert" => Some(Self::DistilBert),
            "deberta-v2" => Some(Self::DebertaV2),
            _ => None,
        }
    }

    /// transformers' class for this architecture with a sequence-classification head.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Bert => "BertForSequenceClassification",
            Self::Roberta => "RobertaForSequenceClassification",
            Self::XlmRoberta => "XLMRobertaForSequenceClassification",
            Self::DistilBert => "DistilBertForSequenceClassification",
            Self::DebertaV2 => "DebertaV2ForSequenceClassification",
        }
    }

    /// The encoder's parameter prefix (`bert.`, `roberta.`, `distilbert.`).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Roberta | Self::XlmRoberta => "roberta",
            Self::DistilBert => "distilbert",
            Self::DebertaV2 => "deberta",
        }
    }

    /// Prefixes of the head parameters, which are initialised when the checkpoint lacks them.
    fn head_prefixes(self) -> &'static [&'static str] {
        match self {
            Self::Bert => &["bert.pooler.", "classifier."],
            Self::Roberta | Self::XlmRoberta => &["classifier."],
            Self::DistilBert => &["pre_classifier.", "classifier."],
            Self::DebertaV2 => &["pooler.", "classifier."],
        }
    }
}

/// What the head predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// One class per example, cross-entropy loss.
    SingleLabel,
    /// One real value per example (`num_labels` 1), mean-squared-error loss.
    Regression,
}

impl Problem {
    /// transformers' `problem_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SingleLabel => "single_label_classification",
            Self::Regression => "regression",
        }
    }

    /// transformers' loss for this problem, averaged over the batch: cross-entropy of `logits`
    /// `[batch, num_labels]` against u32 class ids `[batch]`, or the mean squared error of `logits`
    /// `[batch, 1]` against f32 scores `[batch]`.
    pub fn loss(self, logits: &Tensor, labels: &Tensor) -> CResult<Tensor> {
        match self {
            Self::SingleLabel => candle_nn::loss::cross_entropy(logits, labels),
            Self::Regression => {
                let diff = logits.squeeze(1)?.sub(&labels.to_dtype(logits.dtype())?)?;
                diff.sqr()?.mean_all()
            }
        }
    }
}

/// The arithmetic of the forward and backward passes. The trainable weights and the optimizer state
/// are f32 in both; `Bf16` casts the weights to bf16 at every forward (a differentiable cast, so
/// gradients arrive in f32), computes LayerNorm and softmax statistics in f32, and the loop takes
/// the loss in f32 (mixed precision as torch's autocast does it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The dtype the forward computes in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => bail!("precision {other:?}: expected f32 or bf16"),
        }
    }
}

/// How to load a checkpoint for fine-tuning.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Output width of the head; a checkpoint head of another width is replaced.
    pub num_labels: usize,
    pub problem: Problem,
    /// Seeds the initialisation of missing or replaced head weights, and dropout (`ops::seed`).
    pub seed: u64,
    /// The arithmetic of the passes; the trainable weights are f32 whatever it is.
    pub precision: Precision,
    /// Overrides the config's hidden dropout (`hidden_dropout_prob`, DistilBERT's `dropout`).
    pub hidden_dropout: Option<f32>,
}

/// A typed config, one variant per encoder family.
#[derive(Debug, Clone)]
enum ArchConfig {
    Bert(bert::BertConfig, bert::Flavour),
    DistilBert(distilbert::DistilBertConfig),
    DebertaV2(deberta_v2::DebertaV2Config),
}

impl ArchConfig {
    fn parse(arch: Arch, json: &serde_json::Value, hidden_dropout: Option<f32>) -> Result<Self> {
        let value = json.clone();
        Ok(match arch {
            Arch::Bert | Arch::Roberta | Arch::XlmRoberta => {
                let mut c: bert::BertConfig = serde_json::from_value(value)?;
                if let Some(p) = hidden_dropout {
                    c.hidden_dropout_prob = p;
                }
                let flavour = if arch == Arch::Bert {
                    bert::Flavour::Bert
                } else {
                    bert::Flavour::Roberta
                };
                Self::Bert(c, flavour)
            }
            Arch::DistilBert => {
                let mut c: distilbert::DistilBertConfig = serde_json::from_value(value)?;
                if let Some(p) = hidden_dropout {
                    c.dropout = p;
                }
                Self::DistilBert(c)
            }
            Arch::DebertaV2 => {
                let mut c: deberta_v2::DebertaV2Config = serde_json::from_value(value)?;
                if let Some(p) = hidden_dropout {
                    c.hidden_dropout_prob = p;
                }
                Self::DebertaV2(c)
            }
        })
    }

    fn build(
        &self,
        vb: VarBuilder,
        num_labels: usize,
    ) -> candle_core::Result<Box<dyn SequenceClassifier>> {
        Ok(match self {
            Self::Bert(c, flavour) => {
                Box::new(bert::BertClassifier::load(vb, c, *flavour, num_labels)?)
            }
            Self::DistilBert(c) => {
                Box::new(distilbert::DistilBertClassifier::load(vb, c, num_labels)?)
            }
            Self::DebertaV2(c) => {
                Box::new(deberta_v2::DebertaV2Classifier::load(vb, c, num_labels)?)
            }
        })
    }
}

/// A checkpoint loaded for fine-tuning: trainable weights in `varmap`, the model built over them.
pub struct LoadedModel {
    pub varmap: VarMap,
    pub model: Box<dyn SequenceClassifier>,
    pub arch: Arch,
    /// The original `config.json`, updated with `num_labels`, `id2label`, `label2id`, `problem_type`.
    pub config: serde_json::Value,
    /// Head parameters that were freshly initialised (absent from, or resized relative to, the
    /// checkpoint).
    pub fresh_params: Vec<String>,
    pub num_labels: usize,
    pub problem: Problem,
    source: std::path::PathBuf,
    arch_config: ArchConfig,
    /// The dtype the forward computes in (`Precision::compute_dtype`).
    compute: DType,
    device: Device,
}

/// The dtype of the trainable weights (the master copy the optimizer updates), in every precision.
pub const MASTER_DTYPE: DType = DType::F32;

/// Loads the checkpoint in `dir` (`config.json` + safetensors) into a trainable `VarMap` and builds
/// its sequence classifier.
pub fn load(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<LoadedModel> {
    let name = dir.display().to_string();
    if opts.num_labels == 0 {
        bail!("{name}: num_labels must be at least 1");
    }
    if opts.problem == Problem::Regression && opts.num_labels != 1 {
        bail!(
            "{name}: a regression head has num_labels 1, not {}",
            opts.num_labels
        );
    }
    let mut config = checkpoint::read_config(dir)?;
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .with_context(|| format!("{name}/config.json: no \"model_type\""))?
        .to_string();
    let arch = Arch::from_model_type(&model_type).with_context(|| {
        format!("{name}/config.json: model_type {model_type:?} is not supported (bert, roberta, xlm-roberta, distilbert, deberta-v2)")
    })?;
    let arch_config = ArchConfig::parse(arch, &config, opts.hidden_dropout)
        .with_context(|| format!("{name}/config.json: not a valid {model_type} config"))?;
    let weights = checkpoint::read_weights(dir, device)?;
    let weights = checkpoint::canonical_names(weights, arch.prefix(), arch.head_prefixes());
    let fresh_ok = arch.head_prefixes().iter().map(|s| s.to_string()).collect();
    let backend = checkpoint::CheckpointBackend::new(name.clone(), weights, fresh_ok, opts.seed);
    let (varmap, fresh) = (backend.varmap.clone(), backend.fresh.clone());
    let vb = VarBuilder::from_backend(Box::new(backend), MASTER_DTYPE, device.clone());
    let mut model = arch_config
        .build(vb, opts.num_labels)
        .with_context(|| format!("{name}: cannot build the {model_type} model"))?;
    let compute = opts.precision.compute_dtype();
    if compute != MASTER_DTYPE {
        model = Box::new(casting::CastingModel {
            varmap: varmap.clone(),
            arch_config: arch_config.clone(),
            num_labels: opts.num_labels,
            compute,
            device: device.clone(),
        });
    }
    let fresh_params = fresh
        .lock()
        .map_err(|_| anyhow::anyhow!("lock poisoned"))?
        .clone();
    if !fresh_params.is_empty() {
        eprintln!(
            "{name}: initialised {} head parameters (seed {}): {}",
            fresh_params.len(),
            opts.seed,
            fresh_params.join(", ")
        );
    }
    ops::seed(device, opts.seed).with_context(|| format!("{name}: cannot seed dropout"))?;
    set_labels(&mut config, arch, opts.num_labels, opts.problem, &[]);
    Ok(LoadedModel {
        varmap,
        model,
        arch,
        config,
        fresh_params,
        num_labels: opts.num_labels,
        problem: opts.problem,
        source: dir.to_path_buf(),
        arch_config,
        compute,
        device: device.clone(),
    })
}

/// Writes the head's labels into a transformers config: `architectures`, `num_labels`, `id2label`,
/// `label2id`, `problem_type`. Names default to transformers' `LABEL_i`.
fn set_labels(
    config: &mut serde_json::Value,
    arch: Arch,
    num_labels: usize,
    problem: Problem,
    label_names: &[String],
) {
    let names: Vec<String> = (0..num_labels)
        .map(|i| match label_names.get(i) {
            Some(n) if label_names.len() == num_labels => n.clone(),
            _ => format!("LABEL_{i}"),
        })
        .collect();
    let id2label: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), serde_json::Value::from(n.clone())))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), serde_json::Value::from(i)))
        .collect();
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "architectures".into(),
            serde_json::json!([arch.class_name()]),
        );
        obj.insert("num_labels".into(), num_labels.into());
        obj.insert("id2label".into(), id2label.into());
        obj.insert("label2id".into(), label2id.into());
        obj.insert("problem_type".into(), problem.as_str().into());
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

impl LoadedModel {
    /// A model over detached views of the weights: forward builds no autograd graph (evaluation).
    /// The views share storage with the `VarMap`, so they see every optimizer update.
    pub fn inference_model(&self) -> Result<Box<dyn SequenceClassifier>> {
        let tensors: HashMap<String, candle_core::Tensor> = self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_dtype(self.compute)?)))
            .collect::<CResult<_>>()?;
        let vb = VarBuilder::from_tensors(tensors, self.compute, &self.device);
        self.arch_config
            .build(vb, self.num_labels)
            .with_context(|| {
                format!(
                    "{}: cannot build the inference model",
                    self.source.display()
                )
            })
    }

    /// Writes a checkpoint that `AutoModelForSequenceClassification.from_pretrained` loads:
    /// `config.json`, `model.safetensors` (every VarMap tensor by name) and the source's tokenizer files.
    /// `label_names` is empty (transformers' `LABEL_i`) or has one name per output.
    pub fn save(&self, dir: &Path, label_names: &[String]) -> Result<()> {
        if !label_names.is_empty() && label_names.len() != self.num_labels {
            bail!(
                "{}: {} label names for a head with {} outputs",
                dir.display(),
                label_names.len(),
                self.num_labels
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut config = self.config.clone();
        set_labels(
            &mut config,
            self.arch,
            self.num_labels,
            self.problem,
            label_names,
        );
        if let Some(obj) = config.as_object_mut() {
            obj.remove("torch_dtype");
            obj.insert("dtype".into(), dtype_name(MASTER_DTYPE).into());
        }
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config)?;
        std::fs::write(&config_path, text + "\n")
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        checkpoint::write_weights(&self.varmap, &dir.join("model.safetensors"))?;
        checkpoint::copy_tokenizer(&self.source, dir)
    }

    /// Names of the trainable parameters that get weight decay: all but biases and LayerNorm weights.
    pub fn decay_mask(&self) -> Result<BTreeSet<String>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
        Ok(data
            .keys()
            .filter(|n| gets_weight_decay(n))
            .cloned()
            .collect())
    }
}

/// Weight decay applies to every weight except biases and LayerNorm weights (transformers' Trainer).
pub fn gets_weight_decay(name: &str) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    let last = module
        .rsplit('.')
        .next()
        .unwrap_or(module)
        .to_ascii_lowercase();
    !(last.contains("layernorm") || last.contains("layer_norm"))
}
