//! Shared by the benches: a MiniLM-L6-shaped BERT checkpoint with random weights, written to a
//! temporary directory, and random token batches.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use recycle::data::{Label, Task};
use recycle::tokenize::Encoded;
use recycle::train::checkpoint::{load_trainable, Head, TrainableModel};
use recycle::train::LabeledSet;
use std::collections::HashMap;
use std::path::Path;

pub const VOCAB: usize = 30522;
pub const HIDDEN: usize = 384;
pub const LAYERS: usize = 6;
pub const HEADS: usize = 12;
pub const INTERMEDIATE: usize = 1536;
pub const MAX_POS: usize = 512;

/// Every encoder parameter of a BERT with MiniLM-L6's shape, under transformers' names.
pub fn minilm_shapes() -> Vec<(String, Vec<usize>)> {
    let mut p: Vec<(String, Vec<usize>)> = vec![
        (
            "bert.embeddings.word_embeddings.weight".into(),
            vec![VOCAB, HIDDEN],
        ),
        (
            "bert.embeddings.position_embeddings.weight".into(),
            vec![MAX_POS, HIDDEN],
        ),
        (
            "bert.embeddings.token_type_embeddings.weight".into(),
            vec![2, HIDDEN],
        ),
        ("bert.embeddings.LayerNorm.weight".into(), vec![HIDDEN]),
        ("bert.embeddings.LayerNorm.bias".into(), vec![HIDDEN]),
    ];
    let mut linear = |name: String, out_dim: usize, in_dim: usize| {
        p.push((format!("{name}.weight"), vec![out_dim, in_dim]));
        p.push((format!("{name}.bias"), vec![out_dim]));
    };
    for l in 0..LAYERS {
        let at = format!("bert.encoder.layer.{l}");
        for q in ["query", "key", "value"] {
            linear(format!("{at}.attention.self.{q}"), HIDDEN, HIDDEN);
        }
        linear(format!("{at}.attention.output.dense"), HIDDEN, HIDDEN);
        linear(format!("{at}.intermediate.dense"), INTERMEDIATE, HIDDEN);
        linear(format!("{at}.output.dense"), HIDDEN, INTERMEDIATE);
    }
    linear("bert.pooler.dense".into(), HIDDEN, HIDDEN);
    for l in 0..LAYERS {
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            p.push((format!("bert.encoder.layer.{l}.{ln}.weight"), vec![HIDDEN]));
            p.push((format!("bert.encoder.layer.{l}.{ln}.bias"), vec![HIDDEN]));
        }
    }
    p
}

/// Random weights (normal, std 0.02; LayerNorm weights 1) for `minilm_shapes`.
pub fn random_weights(device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, shape) in minilm_shapes() {
        let t = if name.contains("LayerNorm.weight") {
            Tensor::ones(shape, DType::F32, device)?
        } else {
            (Tensor::randn(0f32, 1.0, shape, device)? * 0.02)?
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes config.json and model.safetensors of a random MiniLM-shaped BERT to `dir`.
pub fn write_checkpoint(dir: &Path) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": MAX_POS,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    candle_core::safetensors::save(
        &random_weights(&Device::Cpu)?,
        dir.join("model.safetensors"),
    )?;
    Ok(())
}

/// Loads the random checkpoint with a 2-class head through the commands' loader.
pub fn load_minilm(dir: &Path, device: &Device) -> anyhow::Result<Box<dyn TrainableModel>> {
    write_checkpoint(dir)?;
    load_trainable(
        dir,
        &Head {
            num_labels: 2,
            regression: false,
        },
        0,
        recycle::model::Precision::F32,
        device,
    )
}

/// `n` examples of exactly `seq` random tokens ([CLS] … [SEP]), with random binary labels.
pub fn random_set(n: usize, seq: usize, seed: u64) -> LabeledSet {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut set = LabeledSet::default();
    for _ in 0..n {
        let mut ids = vec![101u32];
        ids.extend((0..seq - 2).map(|_| rng.random_range(1000..VOCAB as u32)));
        ids.push(102);
        set.encoded.type_ids.push(vec![0; seq]);
        set.encoded.input_ids.push(ids);
        set.labels.push(Label::Class(rng.random_range(0..2)));
    }
    set
}

pub fn binary_task() -> Task {
    Task::Classification {
        labels: vec!["0".into(), "1".into()],
    }
}

pub fn encoded_only(set: &LabeledSet) -> &Encoded {
    &set.encoded
}

/// The device the benches run on: `RECYCLE_BENCH_DEVICE` (cpu, cuda, auto), CPU by default.
pub fn bench_device() -> anyhow::Result<Device> {
    let req: recycle::device::DeviceRequest = std::env::var("RECYCLE_BENCH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()?;
    req.open()
}

/// Repetitions from `RECYCLE_BENCH_REPS`, else `default`.
pub fn reps(default: usize) -> usize {
    std::env::var("RECYCLE_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Process setup shared by the benches: the allocator settings of the binary (unless
/// `RECYCLE_BENCH_ALLOC=default`), printed with the thread count.
pub fn setup() {
    let alloc = match std::env::var("RECYCLE_BENCH_ALLOC").as_deref() {
        Ok("default") => "glibc defaults".to_string(),
        _ => format!("{:?}", recycle::alloc::tune()),
    };
    println!(
        "allocator: {alloc}; threads: {}",
        candle_core::utils::get_num_threads()
    );
}

/// The kernel variants to run from `RECYCLE_BENCH_KERNELS` (fused, composed, both; fused by
/// default), each with its result-name suffix.
pub fn kernel_variants() -> Vec<(recycle::model::ops::Kernels, &'static str)> {
    use recycle::model::ops::Kernels;
    match std::env::var("RECYCLE_BENCH_KERNELS").as_deref() {
        Ok("composed") => vec![(Kernels::Composed, "_composed")],
        Ok("both") => vec![(Kernels::Fused, ""), (Kernels::Composed, "_composed")],
        _ => vec![(Kernels::Fused, "")],
    }
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
