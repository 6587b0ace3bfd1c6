//! `recycle gpu-check` (hidden): the measurements scripts/gpu/run.sh takes on a lent GPU in one
//! call. CUDA against CPU on the tiny parity fixtures (logits, one AdamW step, bf16), then
//! training and inference examples/s of MiniLM-L6- and roberta-base-shaped models with random
//! weights, and a large bf16 matmul as the card's ceiling. One JSON line per measurement on stdout,
//! progress on stderr. `--device cpu --tiny` runs the same control flow on a CPU in seconds.

use crate::device::{describe, DeviceRequest};
use crate::model::bert::{BertClassifier, BertConfig, Flavour};
use crate::model::casting;
use crate::model::grad_sink::{self, GradSink};
use crate::model::kernels::attention_node as attn;
use crate::model::kernels::EnvSwitch;
use crate::model::ops::{self, Kernels};
use crate::model::{self, Batch, LoadOptions, Mode, Precision, Problem};
use crate::train::optim::{
    clip_grad_norm, decays, global_grad_norm, AdamW, AdamWParams, Clip, Kernel,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
    /// The parity fixtures (tests/fixtures/parity in the repository).
    #[arg(long, default_value = "tests/fixtures/parity")]
    pub fixtures: PathBuf,
    /// Model shapes to time, comma-separated: minilm, roberta-base.
    #[arg(long, value_delimiter = ',', default_value = "minilm,roberta-base")]
    pub shapes: Vec<String>,
    /// Precisions to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub precisions: Vec<Precision>,
    /// Examples per training step and per inference batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Tokens per example.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Untimed steps before each measurement.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps of each measurement round (three rounds; the median counts).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Side of the square bf16 matmul that measures the ceiling (0 skips it).
    #[arg(long, default_value_t = 8192)]
    pub matmul: usize,
    /// Shrink the shapes (2 layers, hidden 64) for a smoke test of the control flow.
    #[arg(long)]
    pub tiny: bool,
    /// Skip the parity checks.
    #[arg(long)]
    pub skip_parity: bool,
    /// Skip the op-by-op profile.
    #[arg(long)]
    pub skip_ops: bool,
    /// Parts to split the weight gradients' products in over the rows, for the split's parity
    /// rows and its A/B row (training runs unsplit otherwise); 1 skips both.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub weight_grad_split: u32,
    /// Check attention in one pass (its parity rows run even with --skip-parity) and, where they
    /// pass, time training with it (A/B rows, an op-profile row). `--flash false` leaves it out:
    /// a kernel fault on the GPU would end the whole process, so scripts/gpu/run.sh runs it in
    /// stages of its own.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub flash: bool,
    /// Time training alone (no A/B rows, phases or inference): a short, uniform workload for a
    /// kernel trace (benches/cuda/trace.cpp).
    #[arg(long)]
    pub train_only: bool,
    /// A name for the configuration of levers this run measures (scripts/gpu/run.sh's last
    /// stages: `best`, the switches `recycle gpu-levers` chose), written into its throughput
    /// rows; without it the rows are the defaults' (or the environment's: every row says which
    /// levers were on).
    #[arg(long)]
    pub config: Option<String>,
}

/// The levers a GPU run can turn on or off from its environment, each by its switch.
fn levers() -> Vec<&'static EnvSwitch> {
    use crate::model::kernels::{block_node, stack};
    #[allow(unused_mut)]
    let mut all: Vec<&'static EnvSwitch> = vec![
        &crate::device::POOL_KEEP,
        &ops::EMBEDDINGS_SUM,
        &attn::HEADS_IN_PLACE,
        &attn::FLASH,
        &stack::STACK,
        &block_node::ADD_NORM,
    ];
    #[cfg(feature = "cuda")]
    all.extend([
        &crate::model::kernels::cuda_lt::SWITCH,
        &crate::model::kernels::cuda_lt::DGELU,
    ]);
    all
}

/// Each lever's switch and whether it is on now, for the rows a measurement writes.
fn lever_states() -> serde_json::Value {
    levers()
        .into_iter()
        .map(|sw| (sw.var().to_string(), json!(sw.get())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Whether this run's one-pass attention check passed (`--flash`): its A/B and op-profile rows
/// run only then.
static FLASH_PASSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn flash_measured() -> bool {
    FLASH_PASSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// An encoder shape: transformers' config fields that set the FLOPs.
#[derive(Debug, Clone)]
struct Shape {
    name: String,
    model_type: &'static str,
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
}

impl Shape {
    fn named(name: &str, tiny: bool) -> Result<Self> {
        let (model_type, vocab, hidden, layers, heads, intermediate) = match name {
            "minilm" => ("bert", 30522, 384, 6, 12, 1536),
            "roberta-base" => ("roberta", 50265, 768, 12, 12, 3072),
            other => bail!("--shapes {other}: expected minilm or roberta-base"),
        };
        Ok(if tiny {
            Self {
                name: format!("{name}-tiny"),
                model_type,
                vocab: 1000,
                hidden: 64,
                layers: 2,
                heads: 4,
                intermediate: 128,
            }
        } else {
            Self {
                name: name.to_string(),
                model_type,
                vocab,
                hidden,
                layers,
                heads,
                intermediate,
            }
        })
    }

    fn max_positions(&self) -> usize {
        if self.model_type == "roberta" {
            514
        } else {
            512
        }
    }

    fn config(&self) -> serde_json::Value {
        let roberta = self.model_type == "roberta";
        json!({
            "model_type": self.model_type,
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.intermediate,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": self.max_positions(),
            "type_vocab_size": if roberta { 1 } else { 2 },
            "initializer_range": 0.02,
            "layer_norm_eps": if roberta { 1e-5 } else { 1e-12 },
            "pad_token_id": if roberta { 1 } else { 0 },
        })
    }

    /// Matmul FLOPs of one example's forward pass: the encoder's dense layers (2 per weight per
    /// token) and attention's two products (QKᵀ and PV, 2·seq·hidden each per token and layer).
    /// Embeddings, the head, LayerNorm and softmax are left out, as MFU conventions do.
    fn forward_flops(&self, seq: usize) -> f64 {
        let (h, i, l, s) = (
            self.hidden as f64,
            self.intermediate as f64,
            self.layers as f64,
            seq as f64,
        );
        let dense = l * (4.0 * h * h + 2.0 * h * i);
        s * (2.0 * dense + l * 4.0 * s * h)
    }
}

/// Writes `config.json` and random `model.safetensors` (transformers' initialisation: normal(0,
/// 0.02) weights, unit LayerNorm) of `shape` to `dir`.
fn write_random_checkpoint(shape: &Shape, dir: &Path) -> Result<()> {
    let config = shape.config();
    let cfg: BertConfig = serde_json::from_value(config.clone())?;
    let flavour = if shape.model_type == "roberta" {
        Flavour::Roberta
    } else {
        Flavour::Bert
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    BertClassifier::load(vb, &cfg, flavour, 2)
        .with_context(|| format!("building a random {}", shape.name))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)
        .with_context(|| format!("writing {}/config.json", dir.display()))?;
    varmap
        .save(dir.join("model.safetensors"))
        .with_context(|| format!("writing {}/model.safetensors", dir.display()))
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

/// Whether a measured difference passes: finite and at most `tol`.
fn within(value: impl Into<f64>, tol: impl Into<f64>) -> bool {
    let (v, t) = (value.into(), tol.into());
    v.is_finite() && v <= t
}

/// One check's verdict as a `{"kind": "parity"}` line, the rows the summary reports as PASS/FAIL:
/// `value` is the measured difference (or, for the dropout checks, the measured quantity).
fn check_line(
    case: &str,
    precision: &str,
    what: &str,
    device: &Device,
    value: impl Into<f64>,
    tol: impl Into<f64>,
    pass: bool,
) -> serde_json::Value {
    json!({
        "kind": "parity", "case": case, "precision": precision, "what": what,
        "device": describe(device), "max_abs_diff": value.into(), "tol": tol.into(),
        "pass": pass,
    })
}

/// `result`'s value, or `None` after reporting its error as a `{"kind": "error"}` line (with the
/// fields of `at` saying where) and on stderr: one failing measurement must not cost the rest of
/// a GPU session's single run.
fn reported<T>(result: Result<T>, at: serde_json::Value) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let mut line = json!({"kind": "error", "error": format!("{e:#}")});
            if let (Some(line), serde_json::Value::Object(at)) = (line.as_object_mut(), at) {
                line.extend(at);
            }
            eprintln!("gpu-check: FAILED {line}");
            emit(line);
            None
        }
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

fn max_abs(a: &Tensor) -> Result<f32> {
    Ok(a.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?)
}

fn adamw_defaults() -> AdamWParams {
    AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

/// What one AdamW step on a fixture gives, for comparison across devices.
struct Step {
    /// Logits before the step (training graph), from the inference model, and after the step.
    logits: [Tensor; 3],
    /// The loss's gradient for each parameter, by name, as f32 on the CPU.
    grads: Vec<(String, Tensor)>,
}

/// Logits of `case` before one AdamW step, from the training graph and from the inference model
/// (which takes the forward-only kernels off the CPU), the gradients, and the logits after the step
/// (eval-mode forwards, so no dropout draws differ between devices).
fn one_step(
    case: &str,
    dir: &Path,
    exp: &HashMap<String, Tensor>,
    precision: Precision,
    device: &Device,
) -> Result<Step> {
    let opts = LoadOptions {
        num_labels: 3,
        problem: Problem::SingleLabel,
        seed: 0,
        precision,
        hidden_dropout: None,
    };
    let m = model::load(dir, &opts, device).with_context(|| format!("fixture {case}"))?;
    let ids = |n: &str| -> Result<Tensor> { Ok(exp[n].to_dtype(DType::U32)?.to_device(device)?) };
    let batch = Batch {
        input_ids: ids("input_ids")?,
        attention_mask: ids("attention_mask")?,
        token_type_ids: if case.starts_with("bert") || case.starts_with("deberta") {
            Some(ids("token_type_ids")?)
        } else {
            None
        },
    };
    let labels = ids("labels")?;
    let mut opt = AdamW::new(&m.varmap, adamw_defaults(), decays, Kernel::Auto)?;
    // Gradients as `finetune` takes them: block nodes hand their weights' to a sink. A first
    // step's gradients are thrown away, so that the compared one runs as training does from its
    // second step on: in bf16, the masters the nodes took handed over uncast (`model::casting`).
    let sink = GradSink::new(&m.varmap)?;
    let forward = || -> Result<(Tensor, Tensor)> {
        let logits = sink.scope(|| m.model.forward(&batch, Mode::Eval))?;
        let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &labels)?;
        Ok((logits, loss))
    };
    drop(sink.backward(&forward()?.1)?);
    let (before, loss) = forward()?;
    let inference = m.inference_model()?.forward(&batch, Mode::Eval)?;
    let grads = sink.backward(&loss)?;
    let mut named = Vec::new();
    for (name, var) in m
        .varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap lock"))?
        .iter()
    {
        if let Some(g) = grads.get(var.as_tensor()) {
            named.push((
                name.clone(),
                g.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            ));
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut gs = opt.gradients(&grads);
    clip_grad_norm(&mut gs, 1.0)?;
    opt.step(&gs, 1e-3, 1.0)?;
    let after = m.model.forward(&batch, Mode::Eval)?;
    Ok(Step {
        logits: [before, inference, after],
        grads: named,
    })
}

/// The largest difference between two sets of named gradients, over the largest CPU gradient
/// (one scale for all, so that a near-zero tensor does not dominate), and the parameter where it
/// is; an error when the names differ.
fn grad_diff(ours: &[(String, Tensor)], cpu: &[(String, Tensor)]) -> Result<(f32, String)> {
    let names = |v: &[(String, Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    if names(ours) != names(cpu) {
        bail!("the devices give gradients for different parameters");
    }
    let mut scale = 0f32;
    for (_, g) in cpu {
        scale = scale.max(max_abs(g)?);
    }
    let mut worst = (0f32, String::new());
    for ((name, a), (_, b)) in ours.iter().zip(cpu) {
        let d = max_abs_diff(a, b)? / scale.max(1e-12);
        // A NaN difference is the worst of all.
        if d.is_nan() || d > worst.0 {
            worst = (d, name.clone());
        }
    }
    Ok(worst)
}

/// Device against CPU f32 on each fixture; returns whether every check passed.
fn parity(args: &Args, device: &Device) -> Result<bool> {
    let mut ok = true;
    for case in [
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "deberta-v2",
        "deberta-v3",
    ] {
        let dir = args.fixtures.join(case);
        let exp = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
            .with_context(|| format!("{}/expected.safetensors", dir.display()))?;
        let cpu = one_step(case, &dir, &exp, Precision::F32, &Device::Cpu)?;
        let [cpu_before, _, cpu_after] = &cpu.logits;
        for precision in [Precision::F32, Precision::Bf16] {
            let run = one_step(case, &dir, &exp, precision, device);
            let Some(step) = reported(
                run,
                json!({"stage": "parity", "case": case, "precision": precision.as_str()}),
            ) else {
                ok = false;
                continue;
            };
            let [before, inference, after] = &step.logits;
            // Gradients, against the largest CPU gradient: f32 to reduction order, bf16 to its
            // 8 bits. (The logits after one AdamW step barely see a gradient's size: the first
            // update is about lr · sign(g).)
            let (d, at) = grad_diff(&step.grads, &cpu.grads)?;
            let grad_tol = match precision {
                Precision::F32 => 1e-3,
                Precision::Bf16 => 1.0 / 16.0,
            };
            let pass = within(d, grad_tol);
            ok &= pass;
            let what = "gradients (vs largest)";
            let mut line = check_line(case, precision.as_str(), what, device, d, grad_tol, pass);
            line["worst"] = json!(at);
            emit(line);
            // f32: reduction order alone; bf16: 2^-5 of the logits' scale (tests/it/precision.rs).
            let tol = match precision {
                Precision::F32 => 1e-3,
                Precision::Bf16 => max_abs(cpu_before)?.max(1.0) / 32.0,
            };
            for (what, ours, cpu) in [
                ("logits", before, cpu_before),
                ("inference-model logits", inference, cpu_before),
                ("logits after one AdamW step", after, cpu_after),
            ] {
                let d = max_abs_diff(ours, cpu)?;
                let pass = within(d, tol);
                ok &= pass;
                emit(check_line(
                    case,
                    precision.as_str(),
                    what,
                    device,
                    d,
                    tol,
                    pass,
                ));
            }
        }
        eprintln!("gpu-check: parity {case} done");
    }
    Ok(ok)
}

/// Dropout on the device, checked by its properties (the devices draw different masks): about `p`
/// of the elements dropped, the backward applying the forward's mask (`y = x · dy/dx`, every
/// `dy/dx` either 0 or `1/(1-p)`), the same mask again after re-seeding, and a new one on the next
/// call.
fn dropout_check(device: &Device) -> Result<bool> {
    let p = 0.1f32;
    let scale = 1.0 / (1.0 - p);
    let mut ok = true;
    for precision in [Precision::F32, Precision::Bf16] {
        let dt = precision.compute_dtype();
        let x = candle_core::Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (256, 1024), device)?.abs()? + 0.5)?.to_dtype(dt)?,
        )?;
        ops::seed(device, 5)?;
        let y = ops::dropout(&x, p, Mode::Train)?;
        let g = y
            .backward()?
            .get(x.as_tensor())
            .context("dropout: no gradient for its input")?
            .to_dtype(DType::F32)?;
        let kept = g
            .ne(0f64)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        // Every gradient 0 or the scale (bf16 rounds 1/0.9 by up to 2^-8 of it).
        let off_scale = g.broadcast_sub(&Tensor::new(scale, device)?)?.abs()?;
        let off = off_scale
            .minimum(&g.abs()?)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let x32 = x.as_tensor().to_dtype(DType::F32)?;
        let y32 = y.to_dtype(DType::F32)?;
        let mismatch = max_abs_diff(&y32, &(&x32 * &g)?)? / max_abs(&y32)?.max(1e-6);
        ops::seed(device, 5)?;
        let again = ops::dropout(&x, p, Mode::Train)?;
        let next = ops::dropout(&x, p, Mode::Train)?;
        let same = max_abs_diff(&again, &y)?;
        let differs = max_abs_diff(&next, &y)? > 0.0;
        let tol = match precision {
            Precision::F32 => 1e-6,
            Precision::Bf16 => 1.0 / 128.0,
        };
        for (what, value, pass) in [
            (
                "dropout: kept fraction (0.9 +- 0.01)",
                kept,
                (kept - 0.9).abs() <= 0.01,
            ),
            (
                "dropout: gradients are 0 or 1/(1-p)",
                off,
                off <= scale * tol,
            ),
            (
                "dropout: y = x * dy/dx (the same mask)",
                mismatch,
                mismatch <= tol,
            ),
            ("dropout: re-seeded, the same mask", same, same == 0.0),
            (
                "dropout: the next call, a new mask",
                f32::from(u8::from(differs)),
                differs,
            ),
        ] {
            ok &= pass;
            let p = precision.as_str();
            emit(check_line("dropout", p, what, device, value, tol, pass));
        }
    }
    eprintln!("gpu-check: dropout checks done");
    Ok(ok)
}

/// A dense layer's three products as training takes them outside the graph (`ops::linear` for
/// `x·Wᵀ + b`, the device's `Prims` for `dy·W`, for `dy·W + r` with a residual's gradient added,
/// for `gelu'(u)·(dy·W)` with GELU's backward applied, and for `dyᵀ·x` with the bias's
/// gradient; the GELU row's reference is the exact derivative, the product's epilogue the tanh
/// form's, `kernels::cuda_lt`): on CUDA
/// in bf16 through cuBLASLt (`kernels::cuda_lt`: the bias and its gradient in the products'
/// epilogues, each shape's algorithm timed), against the same products in f32 from the same bf16
/// operands. Shapes with rows that no tile divides, and operands one element off their buffer's
/// start (an alignment of 2 bytes, which cuBLASLt must be told of). On the CPU the rows check the
/// check's control flow.
fn dense_check(device: &Device) -> Result<DenseChecked> {
    use crate::model::kernels::attention_node::CpuPrims;
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return dense_rows(device, &crate::model::kernels::cuda::CudaPrims);
    }
    dense_rows(device, &CpuPrims)
}

/// Which of `dense_check`'s rows passed: GELU's backward in the epilogue can be turned off alone.
#[derive(Debug, Clone, Copy)]
struct DenseChecked {
    /// Every row but GELU's.
    products: bool,
    /// GELU's backward applied to `dy·W`.
    gelu: bool,
}

/// `dense_check`'s row of GELU's backward.
const GELU_ROW: &str = "gelu'(u) * dy.W (GELU's backward)";

fn dense_rows<P: crate::model::kernels::attention_node::Prims>(
    device: &Device,
    prims: &P,
) -> Result<DenseChecked> {
    use crate::model::kernels::attention_node::{CpuPrims, Prims as _};
    #[cfg(feature = "cuda")]
    let runs = || {
        use crate::model::kernels::cuda_lt;
        (cuda_lt::counts().0, cuda_lt::dgelu_runs())
    };
    #[cfg(not(feature = "cuda"))]
    let runs = || (0usize, 0usize);
    let cases: &[(usize, usize, usize, usize)] = if device.is_cuda() {
        &[
            (64, 64, 192, 0),
            (300, 128, 512, 0),
            (257, 96, 40, 1),
            (2048, 768, 3072, 0),
            (2048, 3072, 768, 0),
        ]
    } else {
        &[(64, 64, 192, 0), (37, 24, 40, 1)]
    };
    let (mut ok, mut gelu_ok) = (true, true);
    let before = runs();
    for &(rows, inp, out, off) in cases {
        // A bf16 operand `off` elements into its buffer.
        let operand = |dims: &[usize], std: f64| -> Result<Tensor> {
            let n: usize = dims.iter().product();
            let t = Tensor::randn(0f32, 1.0, n + off, device)?
                .affine(std, 0.0)?
                .to_dtype(DType::BF16)?;
            Ok(t.narrow(0, off, n)?.reshape(dims)?)
        };
        let x = operand(&[rows, inp], 1.0)?;
        let w = operand(&[out, inp], 1.0 / (inp as f64).sqrt())?;
        let b = operand(&[out], 0.5)?;
        let dy = operand(&[rows, out], 1.0)?;
        let residual = operand(&[rows, inp], 1.0)?;
        // GELU's input: wide enough to reach where the tanh form's derivative is farthest from
        // the exact one (|u| ≈ 2).
        let u = operand(&[rows, inp], 2.0)?;
        let y = ops::linear(&x, &w, Some(&b))?;
        let dx = prims.dense_input_grad(&dy, &w)?;
        let dx_plus = prims.dense_input_grad_plus(&dy, &w, &residual)?;
        let du = prims.dense_input_grad_gelu(&dy, &w, &u)?;
        let (dw, db) = prims.dense_param_grads(&dy, &x)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (xf, wf, bf, dyf) = (f(&x)?, f(&w)?, f(&b)?, f(&dy)?);
        let du_ref = CpuPrims.gelu_backward(&f(&u)?, &dyf.matmul(&wf)?)?;
        let want = [
            ("x.W^T + b", y, xf.matmul(&wf.t()?)?.broadcast_add(&bf)?),
            ("dy.W", dx, dyf.matmul(&wf)?),
            (
                "dy.W + r (a residual's gradient)",
                dx_plus,
                (dyf.matmul(&wf)? + f(&residual)?)?,
            ),
            (GELU_ROW, du, du_ref),
            ("dy^T.x", dw, dyf.t()?.matmul(&xf)?),
            ("bias gradient", db, dyf.sum(0)?),
        ];
        for (what, got, reference) in want {
            let value = max_abs_diff(&f(&got)?, &reference)? / max_abs(&reference)?.max(1e-6);
            // bf16 results: rounded to 8 bits once, from f32 sums; the CPU's column sum (its
            // stand-in for the bias gradient) adds in bf16, an error growing with the rows.
            let tol = if what == "bias gradient" && !device.is_cuda() {
                1.0 / 16.0
            } else {
                1.0 / 64.0
            };
            let pass = within(value, tol);
            if what == GELU_ROW {
                gelu_ok &= pass;
            } else {
                ok &= pass;
            }
            let at = if off > 0 {
                ", operands 2 bytes off"
            } else {
                ""
            };
            emit(check_line(
                "dense",
                "bf16",
                &format!("{rows}x{inp}->{out}{at}: {what}"),
                device,
                value,
                tol,
                pass,
            ));
        }
    }
    let after = runs();
    eprintln!(
        "gpu-check: dense product checks done ({} products through cuBLASLt, {} of them with GELU's backward in the epilogue)",
        after.0 - before.0,
        after.1 - before.1
    );
    Ok(DenseChecked {
        products: ok,
        gelu: gelu_ok,
    })
}

/// The block nodes' tail in one pass (`Prims::dropout_add_norm`, CUDA only: elsewhere no device
/// has one) against the residual's dropout and add and then the layer norm, on the device, in f32
/// and bf16, with dropout and without: the same bits (`s` and `y`), so the tolerance is 0. A
/// shape the one pass should take that it declines fails its row.
fn tail_check(device: &Device) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use crate::model::kernels::attention_node::{Prims, SeededDropout};
        let prims = crate::model::kernels::cuda::CudaPrims;
        let mut ok = true;
        for dt in [DType::F32, DType::BF16] {
            for drop in [Some(SeededDropout { p: 0.1, seed: 5 }), None] {
                let (rows, n) = (37, 768);
                let r = |dims: &[usize]| -> Result<Tensor> {
                    Ok(Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(dt)?)
                };
                let (h, x, gamma, beta) = (r(&[rows, n])?, r(&[rows, n])?, r(&[n])?, r(&[n])?);
                let eps = 1e-5;
                let fused = prims.dropout_add_norm(&h, &x, drop, (&gamma, &beta), eps)?;
                let s_ref = prims.dropout_add(&h, &x, drop)?;
                let y_ref = ops::layer_norm(&s_ref, &gamma, &beta, eps)?;
                let value = match fused {
                    Some((s, y)) => {
                        let f = |t: &Tensor| t.to_dtype(DType::F32);
                        max_abs_diff(&f(&s)?, &f(&s_ref)?)?.max(max_abs_diff(&f(&y)?, &f(&y_ref)?)?)
                    }
                    None => f32::INFINITY,
                };
                let pass = within(value, 0.0);
                ok &= pass;
                let what = format!(
                    "{rows}x{n} residual {} and layer norm in one pass: the bits of the two kernels",
                    if drop.is_some() { "dropout, add" } else { "add" }
                );
                emit(check_line(
                    "tail",
                    if dt == DType::BF16 { "bf16" } else { "f32" },
                    &what,
                    device,
                    value,
                    0.0,
                    pass,
                ));
            }
        }
        eprintln!("gpu-check: one-pass tail checks done");
        return Ok(ok);
    }
    let _ = device;
    Ok(true)
}

/// The attention node (`kernels::attention_node`, what CUDA trains with) against autograd over
/// composed ops on the same device, with dropout on the probabilities from the node's own mask
/// source: the context and the gradients of q, k and v. On the CPU, where training uses the fused
/// CPU kernel instead, the node runs with its CPU stand-ins so that the check's control flow is
/// tested.
fn attention_node_check(device: &Device) -> Result<bool> {
    use crate::model::kernels::attention_node::{self as node, SeededDropout};
    let mut ok = true;
    for precision in [Precision::F32, Precision::Bf16] {
        let dt = precision.compute_dtype();
        let drop = Some(SeededDropout { p: 0.1, seed: 11 });
        let parity = match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                node::parity(crate::model::kernels::cuda::CudaPrims, device, dt, drop)?
            }
            _ => node::parity(node::CpuPrims, device, dt, drop)?,
        };
        // bf16: both sides round every product to 8 bits, in different orders.
        let tol = match precision {
            Precision::F32 => 1e-4,
            Precision::Bf16 => 1.0 / 16.0,
        };
        let rows = [
            ("attention node: context, with dropout", parity.context),
            ("attention node: gradient of q", parity.grads[0]),
            ("attention node: gradient of k", parity.grads[1]),
            ("attention node: gradient of v", parity.grads[2]),
        ];
        for (what, value) in rows {
            let pass = within(value, tol);
            ok &= pass;
            emit(check_line(
                "attention",
                precision.as_str(),
                what,
                device,
                value,
                tol,
                pass,
            ));
        }
    }
    eprintln!("gpu-check: attention node checks done");
    Ok(ok)
}

/// The block nodes (`kernels::block_node`, what CUDA trains BERT-family encoders with) against
/// autograd over the composed ops on the same device, with dropout from the nodes' own mask source:
/// the output and the gradients of the input and of the parameters, for the attention and the
/// feed-forward block. On the CPU the nodes run with their CPU stand-ins, so that the check's
/// control flow is tested.
/// A block node against its composed reference on `device` (`block_node::parity_with`, dropout
/// 0.1), with the device's `Prims`.
fn block_parity(
    device: &Device,
    dtype: DType,
    block: crate::model::kernels::block_node::Block,
    dims: crate::model::kernels::block_node::ParityDims,
) -> candle_core::Result<crate::model::kernels::block_node::Parity> {
    use crate::model::kernels::{attention_node::CpuPrims, block_node::parity_with};
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => parity_with(
            crate::model::kernels::cuda::CudaPrims,
            device,
            dtype,
            block,
            Some(0.1),
            dims,
        ),
        _ => parity_with(CpuPrims, device, dtype, block, Some(0.1), dims),
    }
}

fn block_node_check(device: &Device) -> Result<bool> {
    use crate::model::kernels::block_node as node;
    let mut ok = true;
    for precision in [Precision::F32, Precision::Bf16] {
        let dt = precision.compute_dtype();
        for (block, name) in [
            (node::Block::Attention, "attention block"),
            (node::Block::FeedForward, "ffn block"),
        ] {
            let in_place_before = attn::in_place_runs();
            let parity = block_parity(device, dt, block, node::ParityDims::default())?;
            // On CUDA in bf16 the attention block takes its heads in place (where on): a row
            // that fails if it did not, so that the rows above measured that path.
            if device.is_cuda()
                && precision == Precision::Bf16
                && block == node::Block::Attention
                && attn::heads_in_place_on()
            {
                let ran = attn::in_place_runs() > in_place_before;
                ok &= ran;
                emit(check_line(
                    "block",
                    precision.as_str(),
                    &format!("{name}: ran with its heads in place"),
                    device,
                    f32::from(u8::from(!ran)),
                    0.0,
                    ran,
                ));
            }
            // bf16: both sides round every product to 8 bits, in different orders.
            let tol = match precision {
                Precision::F32 => 1e-4,
                Precision::Bf16 => 1.0 / 16.0,
            };
            let rows = [
                ("output, with dropout", parity.output),
                ("gradient of the input", parity.input_grad),
                ("gradients of the parameters", parity.param_grads),
            ];
            for (what, value) in rows {
                let pass = within(value, tol);
                ok &= pass;
                emit(check_line(
                    "block",
                    precision.as_str(),
                    &format!("{name}: {what}"),
                    device,
                    value,
                    tol,
                    pass,
                ));
            }
        }
    }
    eprintln!("gpu-check: block node checks done");
    Ok(ok)
}

/// The weight gradients split over the rows (`weight_grad`): one product split in `parts` on the
/// device against the CPU's whole product in f32 (from the same rounded operands), then both block
/// nodes with every weight gradient split, against their composed reference; f32 and bf16.
fn split_check(device: &Device, parts: usize) -> Result<bool> {
    use crate::model::kernels::{block_node as node, weight_grad};
    let mut ok = true;
    let mut row = |precision: Precision, what: String, value: f32, tol: f64| {
        let pass = within(value, tol);
        ok &= pass;
        emit(check_line(
            "split",
            precision.as_str(),
            &what,
            device,
            value,
            tol,
            pass,
        ));
    };
    for precision in [Precision::F32, Precision::Bf16] {
        let dt = precision.compute_dtype();
        // 64 rows a part, the result's sides no multiples of a tile.
        let rows = 64 * parts;
        let dy = Tensor::randn(0f32, 1.0, (rows, 96), device)?.to_dtype(dt)?;
        let x = Tensor::randn(0f32, 1.0, (rows, 80), device)?.to_dtype(dt)?;
        let ours = weight_grad::weight_grad_split(&dy, &x, parts)?;
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let whole = cpu(&dy)?.t()?.matmul(&cpu(&x)?)?;
        let value = max_abs_diff(&ours, &whole)? / max_abs(&whole)?.max(1e-12);
        // bf16: each part's product rounds to 8 bits before the parts are added.
        let tol = match precision {
            Precision::F32 => 1e-5,
            Precision::Bf16 => 1.0 / 32.0,
        };
        row(
            precision,
            format!("weight gradient in {parts} parts vs CPU product"),
            value,
            tol,
        );
        weight_grad::set_split(parts);
        for (block, name) in [
            (node::Block::Attention, "attention block"),
            (node::Block::FeedForward, "ffn block"),
        ] {
            let before = weight_grad::splits_made();
            let parity = block_parity(device, dt, block, node::ParityDims::default());
            let tol = match precision {
                Precision::F32 => 1e-4,
                Precision::Bf16 => 1.0 / 16.0,
            };
            // A split that does not divide the block's rows runs unsplit: that fails the row.
            let split = weight_grad::splits_made() > before;
            match parity {
                Ok(p) => row(
                    precision,
                    format!("{name}: parameter gradients, split in {parts}"),
                    if split { p.param_grads } else { f32::INFINITY },
                    tol,
                ),
                Err(e) => {
                    weight_grad::set_split(1);
                    return Err(e.into());
                }
            }
        }
        weight_grad::set_split(1);
    }
    eprintln!("gpu-check: split weight gradient checks done");
    Ok(ok)
}

/// The attention block with attention in one pass (`Prims::flash_forward`: the tensor-core
/// kernels on CUDA, which take bf16 and heads of 64; `CpuPrims`' tensor-op form on the CPU) against
/// its composed reference in bf16, with dropout: output, input gradient, parameter gradients. A
/// block that did not run in one pass fails its rows.
fn flash_check(device: &Device) -> Result<bool> {
    use crate::model::kernels::block_node as node;
    let dims = node::ParityDims::ONE_PASS;
    let before = attn::flash_runs();
    let was = attn::flash_on();
    attn::set_flash(true);
    attn::set_flash_on_cpu(true);
    let (dt, block) = (DType::BF16, node::Block::Attention);
    let parity = block_parity(device, dt, block, dims);
    attn::set_flash(was);
    attn::set_flash_on_cpu(false);
    let parity = parity?;
    let ran = attn::flash_runs() > before;
    let mut ok = true;
    let rows = [
        ("output, with dropout", parity.output),
        ("gradient of the input", parity.input_grad),
        ("gradients of the parameters", parity.param_grads),
    ];
    for (what, value) in rows {
        let value = if ran { value } else { f32::INFINITY };
        // bf16, as the block node rows.
        let tol = 1.0 / 16.0;
        let pass = within(value, tol);
        ok &= pass;
        emit(check_line(
            "flash",
            "bf16",
            &format!("attention block in one pass: {what}"),
            device,
            value,
            tol,
            pass,
        ));
    }
    eprintln!("gpu-check: one-pass attention checks done");
    Ok(ok)
}

/// The optimizer on the device: three AdamW steps by `Kernel::Auto` (on CUDA every parameter in one
/// launch) and by `Kernel::Fused` (the fused in-place kernels, one parameter at a time) against the
/// per-parameter tensor ops (the reference), from the same weights and gradients, gradients scaled
/// as clipping would, one parameter without a gradient in the first step; and the global gradient
/// norm against the CPU's.
fn optimizer_check(device: &Device) -> Result<bool> {
    use candle_core::Var;
    let shapes: [(&str, &[usize]); 4] = [
        ("layer.dense.weight", &[768, 3072]),
        ("layer.dense.bias", &[768]),
        ("layer.LayerNorm.weight", &[768]),
        ("embeddings.word_embeddings.weight", &[1000, 64]),
    ];
    let make = || -> Result<VarMap> {
        let vm = VarMap::new();
        for (k, (name, shape)) in shapes.iter().enumerate() {
            // The same weights in both maps: a function of position.
            let n: usize = shape.iter().product();
            let t = (Tensor::arange(0f32, n as f32, &Device::Cpu)? * (1e-3 * (k + 1) as f64))?
                .sin()?
                .reshape(*shape)?;
            let var = Var::from_tensor(&t.to_device(device)?)?;
            vm.data()
                .lock()
                .map_err(|_| anyhow::anyhow!("varmap lock"))?
                .insert(name.to_string(), var);
        }
        Ok(vm)
    };
    let (vm_a, vm_b, vm_c, vm_d) = (make()?, make()?, make()?, make()?);
    let mut fused = AdamW::new(&vm_a, adamw_defaults(), decays, Kernel::Auto)?;
    let mut reference = AdamW::new(&vm_b, adamw_defaults(), decays, Kernel::TensorOps)?;
    let mut per_param = AdamW::new(&vm_c, adamw_defaults(), decays, Kernel::Fused)?;
    // Clipped as training clips: the norm and coefficient left on the device (`Clip::of`).
    let mut clipped = AdamW::new(&vm_d, adamw_defaults(), decays, Kernel::Auto)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut norm_diff, mut clip_diff) = (0f64, 0f64);
    for step in 0..3 {
        let grads = fused
            .vars()
            .enumerate()
            .map(|(k, v)| {
                if step == 0 && k == 1 {
                    return Ok(None);
                }
                let n = v.elem_count();
                let g: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                Ok(Some(Tensor::from_vec(g, v.shape(), device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let on_device = global_grad_norm(&grads)?;
        let cpu = grads
            .iter()
            .map(|g| g.as_ref().map(|g| g.to_device(&Device::Cpu)).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let on_cpu = global_grad_norm(&cpu)?;
        norm_diff = norm_diff.max((on_device - on_cpu).abs() / on_cpu);
        // A maximum norm the random gradients exceed, so that the coefficient clips.
        let max_norm = 0.25 * on_cpu;
        let host = Clip::on_host(&grads, Some(max_norm))?;
        let scale = host.coefficient()?;
        fused.step(&grads, 1e-3, scale)?;
        reference.step(&grads, 1e-3, scale)?;
        per_param.step(&grads, 1e-3, scale)?;
        let kept = Clip::of(&grads, Some(max_norm))?;
        clipped.step_clipped(&grads, 1e-3, &kept)?;
        clip_diff = clip_diff
            .max((kept.norm()? - host.norm()?).abs() / host.norm()?)
            .max((kept.coefficient()? - scale).abs() / scale);
    }
    let (mut weight_diff, mut per_param_diff, mut clipped_diff) = (0f32, 0f32, 0f32);
    for (((a, b), c), d) in fused
        .vars()
        .zip(reference.vars())
        .zip(per_param.vars())
        .zip(clipped.vars())
    {
        weight_diff = weight_diff.max(max_abs_diff(a.as_tensor(), b.as_tensor())?);
        per_param_diff = per_param_diff.max(max_abs_diff(c.as_tensor(), b.as_tensor())?);
        clipped_diff = clipped_diff.max(max_abs_diff(d.as_tensor(), a.as_tensor())?);
    }
    let mut ok = true;
    for (what, value, tol) in [
        (
            "adamw: auto (one launch) vs tensor ops, 3 steps",
            weight_diff as f64,
            1e-6,
        ),
        (
            "adamw: fused per parameter vs tensor ops",
            per_param_diff as f64,
            1e-6,
        ),
        ("gradient norm vs the CPU (relative)", norm_diff, 1e-5),
        (
            "clip left on the device: norm and coefficient vs the host's (relative)",
            clip_diff,
            1e-6,
        ),
        (
            "adamw: coefficient read on the device vs given, 3 steps",
            clipped_diff as f64,
            1e-6,
        ),
    ] {
        let pass = within(value, tol);
        ok &= pass;
        emit(check_line(
            "optimizer",
            "f32",
            what,
            device,
            value,
            tol,
            pass,
        ));
    }
    eprintln!("gpu-check: optimizer checks done");
    Ok(ok)
}

fn random_batch(shape: &Shape, args: &Args, device: &Device, seed: u64) -> Result<(Batch, Tensor)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = args.batch * args.seq;
    // Ids above the special tokens, so padding-derived positions stay ordinary.
    let ids: Vec<u32> = (0..n)
        .map(|_| rng.random_range(5..shape.vocab as u32))
        .collect();
    let labels: Vec<u32> = (0..args.batch).map(|_| rng.random_range(0..2)).collect();
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (args.batch, args.seq), device)?,
        attention_mask: Tensor::ones((args.batch, args.seq), DType::U32, device)?,
        token_type_ids: None,
    };
    Ok((batch, Tensor::from_vec(labels, args.batch, device)?))
}

/// Rounds of `steps` timed calls per measurement; the median round counts, so one round disturbed
/// by something else on the machine does not (PyTorch's side does the same).
const ROUNDS: usize = 3;

/// One A/B row: a step's seconds with the thing named on and off, and the process switch that
/// turns it on and off where there is one (`scripts/gpu/run.sh` sets those from the rows, through
/// `recycle gpu-levers`).
struct AbRow {
    what: String,
    on: f64,
    off: Result<f64>,
    switch: Option<&'static EnvSwitch>,
}

/// The A/B rows of one shape and precision.
struct AbRows<'a> {
    shape: &'a str,
    /// The plain step's time: "on" for the rows that turn one switch off.
    train: f64,
    rows: Vec<AbRow>,
}

impl AbRows<'_> {
    /// A row against the plain step: `off` is the step timed with the thing `what` off. A
    /// failed timing is reported (stage `ab`) and leaves no row. Returns the off time.
    fn off(&mut self, what: &str, off: Result<f64>) -> Option<f64> {
        self.against(what, self.train, off)
    }

    /// A row for a switch that is off in training: `on` is the step timed with `what` on,
    /// against the plain step. Reported and returned as `off`.
    fn on(&mut self, what: &str, on: Result<f64>) -> Option<f64> {
        let on = reported(on, self.at(what))?;
        self.push(what, on, Ok(self.train));
        Some(on)
    }

    /// As `off`, against another step's time `on`.
    fn against(&mut self, what: &str, on: f64, off: Result<f64>) -> Option<f64> {
        let off = reported(off, self.at(what))?;
        self.push(what, on, Ok(off));
        Some(off)
    }

    /// A row for a process switch, timed the other way from its default (`off` for one on by
    /// default, `on` for one off by default) against the plain step, and tagged with the switch.
    fn flipped(&mut self, switch: &'static EnvSwitch, what: &str, t: Result<f64>) -> Option<f64> {
        let t = if switch.default_on() {
            self.off(what, t)
        } else {
            self.on(what, t)
        };
        if t.is_some() {
            self.tag_last(switch);
        }
        t
    }

    /// Tags the last row with the switch it flipped.
    fn tag_last(&mut self, switch: &'static EnvSwitch) {
        if let Some(row) = self.rows.last_mut() {
            row.switch = Some(switch);
        }
    }

    fn push(&mut self, what: &str, on: f64, off: Result<f64>) {
        self.rows.push(AbRow {
            what: what.to_string(),
            on,
            off,
            switch: None,
        });
    }

    fn at(&self, what: &str) -> serde_json::Value {
        json!({"stage": "ab", "what": what, "shape": self.shape})
    }
}

/// Seconds per call of `f`: after `warmup` untimed calls, `ROUNDS` rounds of `steps` calls, each
/// timed with the device drained before the clock stops; the median round's.
fn time_it(
    device: &Device,
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        device.synchronize()?;
        let t = Instant::now();
        for _ in 0..steps {
            f()?;
        }
        device.synchronize()?;
        rounds.push(t.elapsed().as_secs_f64() / steps.max(1) as f64);
    }
    Ok(median(&mut rounds))
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times every precision of `args` on `shape`; returns whether all of them ran.
fn bench_shape(shape: &Shape, args: &Args, device: &Device) -> Result<bool> {
    let tmp = tempfile::tempdir()?;
    write_random_checkpoint(shape, tmp.path())?;
    let (batch, labels) = random_batch(shape, args, device, 7)?;
    let mut ok = true;
    for &precision in &args.precisions {
        let run = bench_one(shape, precision, args, device, tmp.path(), &batch, &labels);
        ok &= reported(
            run,
            json!({"stage": "bench", "shape": shape.name, "precision": precision.as_str()}),
        )
        .is_some();
    }
    Ok(ok)
}

/// One shape in one precision: training examples/s, the phases of a training step, and inference
/// examples/s with and without the fused kernels. Each figure is emitted as soon as it is measured.
fn bench_one(
    shape: &Shape,
    precision: Precision,
    args: &Args,
    device: &Device,
    checkpoint: &Path,
    batch: &Batch,
    labels: &Tensor,
) -> Result<()> {
    let fwd = shape.forward_flops(args.seq);
    let bench_line = |mode: &str, secs: f64, flops: f64| {
        let eps = args.batch as f64 / secs;
        let mut row = json!({
            "kind": "bench", "impl": "recycle", "shape": shape.name,
            "precision": precision.as_str(), "mode": mode, "batch": args.batch,
            "seq": args.seq, "examples_per_s": eps, "flops_per_example": flops,
            "tflops": eps * flops / 1e12, "device": describe(device), "levers": lever_states(),
        });
        if let Some(config) = &args.config {
            row["config"] = json!(config);
        }
        emit(row);
        eprintln!(
            "gpu-check: {} {} {mode}: {eps:.1} examples/s",
            shape.name,
            precision.as_str()
        );
    };
    let opts = LoadOptions {
        num_labels: 2,
        problem: Problem::SingleLabel,
        seed: 0,
        precision,
        hidden_dropout: None,
    };
    let m = model::load(checkpoint, &opts, device)?;
    let mut opt = AdamW::new(&m.varmap, adamw_defaults(), decays, Kernel::Auto)?;
    // As `finetune` trains: block nodes hand their weights' gradients to a sink.
    let sink = GradSink::new(&m.varmap)?;
    // A training step as `finetune` takes it: clipped by the global norm (max 1, as the PyTorch
    // script clips too), the norm and coefficient left on the device, nothing read back. With
    // `sync` (the A/B row "no host sync in a step"), as `finetune` took it before session 11: the
    // loss read back after the forward and the norm after the backward.
    let step_with = |opt: &mut AdamW, sync: bool| -> Result<()> {
        let logits = sink.scope(|| m.model.forward(batch, Mode::Train))?;
        let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, labels)?;
        if sync {
            std::hint::black_box(loss.to_scalar::<f32>()?);
        }
        let grads = opt.gradients(&sink.backward(&loss)?);
        let clip = if sync {
            Clip::on_host(&grads, Some(1.0))?
        } else {
            Clip::of(&grads, Some(1.0))?
        };
        opt.step_clipped(&grads, 1e-5, &clip)
    };
    let step = |opt: &mut AdamW| step_with(opt, false);
    let train = time_it(device, args.warmup, args.steps, || step(&mut opt))?;
    bench_line("train", train, 3.0 * fwd);
    if args.train_only {
        return Ok(());
    }
    // The same steps without the block nodes (the attention node still on), then with neither:
    // what each is worth end to end, in the same run (on the CPU, which trains with neither, the
    // rows measure noise).
    // Each switch that is on (a node that failed its check is off for the whole run), off in
    // turn, the earlier ones staying off.
    let (blocks_on, attention_on) = (ops::fused_blocks(), ops::fused_attention_on());
    let sink_on = grad_sink::enabled();
    let mut baseline = train;
    let mut ab = AbRows {
        shape: &shape.name,
        train,
        rows: Vec::new(),
    };
    // cudarc's events on every buffer (off on an opened CUDA device): "on" is the default,
    // without them. In bf16 only: that is where a step is short enough for the host to bound it.
    if device.is_cuda()
        && precision == Precision::Bf16
        && !crate::device::set_buffer_events(device, false)
    {
        crate::device::set_buffer_events(device, true);
        let with = time_it(device, args.warmup, args.steps, || step(&mut opt));
        crate::device::set_buffer_events(device, false);
        ab.off("no CUDA events per buffer", with);
    }
    // No host synchronisation inside a training step (session 11): "off" reads the loss and the
    // gradient norm back as the training loop did before (its time kept for the pool's rows).
    let mut synced_step = None;
    if device.is_cuda() {
        let synced = time_it(device, args.warmup, args.steps, || {
            step_with(&mut opt, true)
        });
        synced_step = ab.off("no host sync in a step", synced);
    }
    // Freed memory kept in the device's pool (session 15, on by default): "off" hands it back to
    // the driver at every synchronisation, as cudarc leaves the pool. Timed on the step as this
    // bench takes it (a synchronisation a round) and as `finetune` took it before session 11 (the
    // loss and the norm read back every step: "on" is the row above's).
    if let (true, Some(kept_synced)) = (crate::device::pool_keep_on(), synced_step) {
        use crate::device::{pool_reserved, set_pool_keep};
        if let Ok(Some((now, high))) = pool_reserved(device) {
            eprintln!(
                "gpu-check: {} {}: the memory pool holds {:.2} GB ({:.2} GB at most)",
                shape.name,
                precision.as_str(),
                now as f64 / 1e9,
                high as f64 / 1e9
            );
        }
        let plain = "freed GPU memory kept in the pool";
        let read_back = "freed GPU memory kept, steps read back";
        match set_pool_keep(device, false) {
            Err(e) => {
                reported::<()>(Err(e), ab.at(plain));
            }
            Ok(_) => {
                let off = time_it(device, args.warmup, args.steps, || step(&mut opt));
                let off_synced = time_it(device, args.warmup, args.steps, || {
                    step_with(&mut opt, true)
                });
                if let Err(e) = set_pool_keep(device, true) {
                    eprintln!("gpu-check: the memory pool kept nothing after its A/B rows: {e:#}");
                }
                ab.flipped(&crate::device::POOL_KEEP, plain, off);
                ab.against(read_back, kept_synced, off_synced);
            }
        }
    }
    // Masters that the nodes take handed over uncast (on by default; `model::casting`): "off"
    // casts every weight at every forward. In bf16 only (f32 casts nothing).
    if device.is_cuda() && precision == Precision::Bf16 && casting::uncast_claimed() {
        let (cast, uncast) = casting::last_build();
        eprintln!(
            "gpu-check: {} bf16: a training forward casts {cast} weights, hands {uncast} over uncast",
            shape.name
        );
        casting::set_uncast_claimed(false);
        let all_cast = time_it(device, args.warmup, args.steps, || step(&mut opt));
        casting::set_uncast_claimed(true);
        ab.off("masters the nodes take, uncast", all_cast);
    }
    // The dense layers' bf16 products through cuBLASLt (session 13, on by default): "off" is
    // candle's cuBLAS calls, with the bias adds and column sums as kernels of their own.
    #[cfg(feature = "cuda")]
    if device.is_cuda() && precision == Precision::Bf16 && crate::model::kernels::cuda_lt::enabled()
    {
        use crate::model::kernels::cuda_lt;
        let (runs, timed) = cuda_lt::counts();
        eprintln!(
            "gpu-check: {} bf16: {runs} products through cuBLASLt so far, {timed} shapes timed",
            shape.name
        );
        cuda_lt::set_enabled(false);
        let candle = time_it(device, args.warmup, args.steps, || step(&mut opt));
        cuda_lt::set_enabled(true);
        ab.flipped(&cuda_lt::SWITCH, "dense products through cuBLASLt", candle);
    }
    // GELU's backward in the epilogue of the product feeding it (session 16, on by default with
    // the cuBLASLt products; the feed-forward block nodes take it): "off" is the product, then
    // the GELU backward kernel.
    #[cfg(feature = "cuda")]
    if device.is_cuda()
        && precision == Precision::Bf16
        && blocks_on
        && crate::model::kernels::cuda_lt::dgelu_on()
    {
        use crate::model::kernels::cuda_lt;
        eprintln!(
            "gpu-check: {} bf16: {} products with GELU's backward in the epilogue so far",
            shape.name,
            cuda_lt::dgelu_runs()
        );
        cuda_lt::set_dgelu(false);
        let kernel = time_it(device, args.warmup, args.steps, || step(&mut opt));
        cuda_lt::set_dgelu(true);
        ab.flipped(
            &cuda_lt::DGELU,
            "GELU's backward in the product's epilogue",
            kernel,
        );
    }
    // Attention's per-head products in place (session 13, CUDA bf16, on by default): "off"
    // splits q, k and v into heads and merges the context (and the gradients) with copies.
    if device.is_cuda() && precision == Precision::Bf16 && blocks_on && attn::heads_in_place_on() {
        attn::set_heads_in_place(false);
        let split = time_it(device, args.warmup, args.steps, || step(&mut opt));
        attn::set_heads_in_place(true);
        ab.flipped(&attn::HEADS_IN_PLACE, "attention's heads in place", split);
    }
    // The embeddings as one node (session 13, on by default): "off" is a lookup per table and
    // candle's adds of their rows.
    if device.is_cuda() && ops::embeddings_sum_on() {
        ops::set_embeddings_sum(false);
        let separate = time_it(device, args.warmup, args.steps, || step(&mut opt));
        ops::set_embeddings_sum(true);
        ab.flipped(&ops::EMBEDDINGS_SUM, "embeddings in one node", separate);
    }
    // The block nodes' tail in one pass (session 14, on by default; it runs where the blocks are
    // recorded into the stack): "off" is the residual's dropout and add, then the layer norm.
    if device.is_cuda()
        && blocks_on
        && crate::model::kernels::stack::stack_on()
        && crate::model::kernels::block_node::add_norm_on()
    {
        use crate::model::kernels::block_node::set_add_norm;
        set_add_norm(false);
        let separate = time_it(device, args.warmup, args.steps, || step(&mut opt));
        set_add_norm(true);
        ab.flipped(
            &crate::model::kernels::block_node::ADD_NORM,
            "residual add and layer norm in one pass",
            separate,
        );
    }
    // The encoder's block nodes as one stack node (session 12, on by default): "off" is a graph
    // node per block, each input's gradient added into a zero-filled slot by candle. CUDA only:
    // the CPU's training does not take the block nodes.
    if device.is_cuda() && blocks_on && crate::model::kernels::stack::stack_on() {
        use crate::model::kernels::stack::set_stack;
        set_stack(false);
        let per_block = time_it(device, args.warmup, args.steps, || step(&mut opt));
        set_stack(true);
        ab.flipped(
            &crate::model::kernels::stack::STACK,
            "block nodes in one stack node",
            per_block,
        );
    }
    // Layer norm's backward with 16-byte packs (session 12, on by default where rows fit): "off"
    // is the one-pass kernel before it.
    #[cfg(feature = "cuda")]
    if device.is_cuda() && crate::model::kernels::cuda::layer_norm_packed() {
        use crate::model::kernels::cuda::set_layer_norm_packed;
        set_layer_norm_packed(false);
        let one_pass = time_it(device, args.warmup, args.steps, || step(&mut opt));
        set_layer_norm_packed(true);
        ab.off("layer norm backward, 16-byte packs", one_pass);
    }
    // Layer norm's backward in one pass against the three kernels, both without the packed
    // kernels (which take roberta-base's rows first).
    #[cfg(feature = "cuda")]
    if device.is_cuda() && crate::model::kernels::cuda::layer_norm_one_pass() {
        use crate::model::kernels::cuda::{
            layer_norm_packed, set_layer_norm_one_pass, set_layer_norm_packed,
        };
        let packed = layer_norm_packed();
        set_layer_norm_packed(false);
        let one_pass = time_it(device, args.warmup, args.steps, || step(&mut opt));
        set_layer_norm_one_pass(false);
        let three = time_it(device, args.warmup, args.steps, || step(&mut opt));
        set_layer_norm_one_pass(true);
        set_layer_norm_packed(packed);
        let what = "layer norm backward in one pass";
        let at = ab.at(what);
        if let (Some(on), Some(off)) = (reported(one_pass, at.clone()), reported(three, at)) {
            ab.push(what, on, Ok(off));
        }
    }
    // The weight gradients split over the rows (off in training unless chosen): "on" is the split.
    let parts = args.weight_grad_split as usize;
    if parts > 1 {
        use crate::model::kernels::weight_grad;
        weight_grad::set_split(parts);
        let split = time_it(device, args.warmup, args.steps, || step(&mut opt));
        weight_grad::set_split(1);
        ab.on(&format!("weight gradients split in {parts}"), split);
    }
    // Attention in one pass (off in training unless chosen): "on" is one pass; a row only where
    // it ran (bf16, heads of 64, at most 512 tokens, a multiple of 16).
    if blocks_on && !attn::flash_on() && flash_measured() {
        let before = attn::flash_runs();
        attn::set_flash(true);
        let flash = time_it(device, args.warmup, args.steps, || step(&mut opt));
        attn::set_flash(false);
        let what = "attention in one pass (flash)";
        if let Some(on) = reported(flash, ab.at(what)) {
            if attn::flash_runs() > before {
                ab.push(what, on, Ok(train));
                ab.tag_last(&attn::FLASH);
                // Both levers together, where both are measured.
                if parts > 1 {
                    use crate::model::kernels::weight_grad;
                    attn::set_flash(true);
                    weight_grad::set_split(parts);
                    let both = time_it(device, args.warmup, args.steps, || step(&mut opt));
                    weight_grad::set_split(1);
                    attn::set_flash(false);
                    ab.on(&format!("flash + weight gradients split in {parts}"), both);
                }
            }
        }
    }
    if sink_on && blocks_on {
        grad_sink::set_enabled(false);
        let off = time_it(device, args.warmup, args.steps, || step(&mut opt));
        let next = *off.as_ref().unwrap_or(&baseline);
        ab.push("gradient sink", baseline, off);
        baseline = next;
    }
    if blocks_on {
        ops::set_fused_blocks(false);
        let off = time_it(device, args.warmup, args.steps, || step(&mut opt));
        let next = *off.as_ref().unwrap_or(&baseline);
        let what = if sink_on {
            "block nodes (without gradient sink)"
        } else {
            "block nodes"
        };
        ab.push(what, baseline, off);
        baseline = next;
    }
    if attention_on {
        ops::set_fused_attention(false);
        let off = time_it(device, args.warmup, args.steps, || step(&mut opt));
        let what = if blocks_on {
            "fused attention (without block nodes)"
        } else {
            "fused attention"
        };
        ab.push(what, baseline, off);
    }
    ops::set_fused_attention(attention_on);
    ops::set_fused_blocks(blocks_on);
    grad_sink::set_enabled(sink_on);
    for AbRow {
        what,
        on: on_s,
        off,
        switch,
    } in ab.rows
    {
        let off_s = off?;
        let mut row = json!({
            "kind": "ab", "impl": "recycle", "what": what, "shape": shape.name,
            "precision": precision.as_str(), "mode": "train", "batch": args.batch,
            "seq": args.seq, "on_s": on_s, "off_s": off_s, "device": describe(device),
        });
        if let Some(sw) = switch {
            row["switch"] = json!(sw.var());
            row["default_on"] = json!(sw.default_on());
        }
        emit(row);
        eprintln!(
            "gpu-check: {} {} train: {what} on {:.1} ms a step, off {:.1} ms",
            shape.name,
            precision.as_str(),
            1e3 * on_s,
            1e3 * off_s
        );
    }
    drop(opt);
    let phases = emit_phases(shape, args, precision, device, &m, batch, labels);
    let phases_ok = reported(
        phases,
        json!({"stage": "phases", "shape": shape.name, "precision": precision.as_str()}),
    )
    .is_some();
    let inference = m.inference_model()?;
    let infer = time_it(device, args.warmup, args.steps, || {
        inference.forward(batch, Mode::Eval)?;
        Ok(())
    })?;
    bench_line("infer", infer, fwd);
    // The same forward on the composed ops alone: what the fused kernels (the CPU's own, or
    // candle's forward-only ones elsewhere) are worth.
    ops::set_kernels(Kernels::Composed);
    let composed = time_it(device, args.warmup, args.steps, || {
        inference.forward(batch, Mode::Eval)?;
        Ok(())
    });
    ops::set_kernels(Kernels::Fused);
    let composed = composed?;
    emit(json!({
        "kind": "kernels", "impl": "recycle", "shape": shape.name,
        "precision": precision.as_str(), "mode": "infer", "batch": args.batch,
        "seq": args.seq, "fused_s": infer, "composed_s": composed, "device": describe(device),
    }));
    eprintln!(
        "gpu-check: {} {} infer: fused kernels {:.1} ms, composed ops {:.1} ms",
        shape.name,
        precision.as_str(),
        1e3 * infer,
        1e3 * composed
    );
    if !phases_ok {
        bail!("the phase timings failed (above)");
    }
    Ok(())
}

/// Where a training step's time goes: the forward pass with the loss, the backward pass, the global
/// gradient norm, and the AdamW update by each implementation (`Kernel::Auto`, what training uses:
/// the fused kernel on the CPU, one launch for every parameter on CUDA; `Kernel::Fused`: the fused
/// kernels one parameter at a time; `Kernel::Flat`: one update per weight-decay
/// group; `Kernel::TensorOps`: tensor ops per parameter). Seconds per step, the device drained
/// after each phase, so the phases add up to more than a step that overlaps host and device work.
fn emit_phases(
    shape: &Shape,
    args: &Args,
    precision: Precision,
    device: &Device,
    m: &model::LoadedModel,
    batch: &Batch,
    labels: &Tensor,
) -> Result<()> {
    let mut optimizers = [
        ("auto", Kernel::Auto, 0.0),
        ("fused per parameter", Kernel::Fused, 0.0),
        ("flat", Kernel::Flat, 0.0),
        ("per-parameter", Kernel::TensorOps, 0.0),
    ];
    let mut opts = optimizers
        .iter()
        .map(|&(_, kernel, _)| AdamW::new(&m.varmap, adamw_defaults(), decays, kernel))
        .collect::<Result<Vec<_>>>()?;
    let (mut forward, mut backward, mut norm) = (0.0, 0.0, 0.0);
    // The host's share of the forward and the backward: the time until the call returns, before
    // the device is drained (nothing in either waits on the device). Where it is close to the
    // drained time, the phase is bound by the host.
    let (mut forward_host, mut backward_host) = (0.0, 0.0);
    let sink = GradSink::new(&m.varmap)?;
    for step in 0..args.warmup + args.steps {
        let timed = step >= args.warmup;
        let lap = |acc: &mut f64, t: Instant| -> Result<Instant> {
            device.synchronize()?;
            if timed {
                *acc += t.elapsed().as_secs_f64();
            }
            Ok(Instant::now())
        };
        let host = |acc: &mut f64, t: Instant| {
            if timed {
                *acc += t.elapsed().as_secs_f64();
            }
        };
        let t = Instant::now();
        let logits = sink.scope(|| m.model.forward(batch, Mode::Train))?;
        let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, labels)?;
        host(&mut forward_host, t);
        let t = lap(&mut forward, t)?;
        let store = sink.backward(&loss)?;
        let gs = opts[0].gradients(&store);
        host(&mut backward_host, t);
        let t = lap(&mut backward, t)?;
        global_grad_norm(&gs)?;
        let mut t = lap(&mut norm, t)?;
        for (opt, entry) in opts.iter_mut().zip(optimizers.iter_mut()) {
            opt.step(&gs, 1e-5, 1.0)?;
            t = lap(&mut entry.2, t)?;
        }
    }
    let per_step = |secs: f64| secs / args.steps.max(1) as f64;
    let optimizer: serde_json::Map<String, serde_json::Value> = optimizers
        .iter()
        .map(|&(name, _, secs)| (name.to_string(), json!(per_step(secs))))
        .collect();
    emit(json!({
        "kind": "phases", "impl": "recycle", "shape": shape.name,
        "precision": precision.as_str(), "batch": args.batch, "seq": args.seq,
        "forward_s": per_step(forward), "backward_s": per_step(backward),
        "forward_host_s": per_step(forward_host), "backward_host_s": per_step(backward_host),
        "grad_norm_s": per_step(norm), "optimizer_s": optimizer, "device": describe(device),
    }));
    eprintln!(
        "gpu-check: {} {} phases: forward {:.1} ms (host {:.1}), backward {:.1} ms (host {:.1}), \
         grad norm {:.1} ms, AdamW {}",
        shape.name,
        precision.as_str(),
        1e3 * per_step(forward),
        1e3 * per_step(forward_host),
        1e3 * per_step(backward),
        1e3 * per_step(backward_host),
        1e3 * per_step(norm),
        optimizers
            .iter()
            .map(|&(name, _, secs)| format!("{name} {:.1} ms", 1e3 * per_step(secs)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// The ops of a roberta-base-shaped training step, one at a time at the bench's batch and
/// sequence length: seconds of the forward alone and of forward + backward (the output's gradient
/// seeded with ones), the device drained around each, and how many times a step runs the op. Weights
/// are f32 `Var`s cast to the compute dtype inside the op, as `model::casting` does; activations are
/// `Var`s of the compute dtype. Σ count × forward+backward against the measured step says how much
/// of the step the list covers, and the largest products say where the time goes.
fn profile_ops(args: &Args, precision: Precision, device: &Device) -> Result<()> {
    use candle_core::Var;
    let shape = Shape::named("roberta-base", args.tiny)?;
    let (b, s, h, i, heads, l) = (
        args.batch,
        args.seq,
        shape.hidden,
        shape.intermediate,
        shape.heads,
        shape.layers,
    );
    let dt = precision.compute_dtype();
    let act = |dims: &[usize]| -> Result<Var> {
        Ok(Var::from_tensor(
            &Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(dt)?,
        )?)
    };
    let weight = |dims: &[usize]| -> Result<Var> {
        Ok(Var::from_tensor(&Tensor::randn(0f32, 0.02, dims, device)?)?)
    };
    let cast = |v: &Var| v.as_tensor().to_dtype(dt);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let ids = |vocab: usize, rng: &mut rand::rngs::StdRng| -> Result<Tensor> {
        let v: Vec<u32> = (0..b * s)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        Ok(Tensor::from_vec(v, b * s, device)?)
    };
    let word_ids = ids(shape.vocab, &mut rng)?;
    let pos_ids = ids(shape.max_positions(), &mut rng)?;
    let (w_word, w_pos) = (
        weight(&[shape.vocab, h])?,
        weight(&[shape.max_positions(), h])?,
    );
    let x = act(&[b, s, h])?;
    let y = act(&[b, s, h])?;
    let wide = act(&[b, s, i])?;
    let (w_hh, b_h) = (weight(&[h, h])?, weight(&[h])?);
    let (w_ih, b_i) = (weight(&[i, h])?, weight(&[i])?);
    let w_hi = weight(&[h, i])?;
    let (ln_w, ln_b) = (weight(&[h])?, weight(&[h])?);
    let d = h / heads;
    let (qh, kh, vh) = (
        act(&[b, heads, s, d])?,
        act(&[b, heads, s, d])?,
        act(&[b, heads, s, d])?,
    );
    let scores = act(&[b, heads, s, s])?;
    let mask = Tensor::ones((b, s), DType::U32, device)?;
    let bias = ops::attention_bias(&mask, dt)?;
    // Where the attention core runs fused (one kernel on the CPU, one graph node on CUDA), its
    // pieces below are measured alone but count no runs per step.
    let attention = || {
        let (q, k) = (x.as_tensor(), y.as_tensor());
        ops::fused_attention(q, k, q, &bias, heads, 0.125, 0.1, Mode::Train)
    };
    let fused = attention()?.is_some();
    // Where the residual blocks run as single nodes (CUDA), the dense layers, the layer norms
    // after them, the hidden dropouts, GELU, the residual adds and the attention core are inside
    // the two block rows at the end, and count only outside them (the embeddings' layer norm and
    // dropout).
    use crate::model::kernels::block_node::{AttentionParams, Dense, FfnParams, Norm};
    let (w_hh_t, b_h_t, w_ih_t, b_i_t, w_hi_t, ln_w_t, ln_b_t) = (
        cast(&w_hh)?,
        cast(&b_h)?,
        cast(&w_ih)?,
        cast(&b_i)?,
        cast(&w_hi)?,
        cast(&ln_w)?,
        cast(&ln_b)?,
    );
    let dense_hh = Dense {
        w: &w_hh_t,
        b: &b_h_t,
    };
    let norm = Norm {
        w: &ln_w_t,
        b: &ln_b_t,
        eps: 1e-5,
    };
    let attention_params = AttentionParams {
        q: dense_hh,
        k: dense_hh,
        v: dense_hh,
        out: dense_hh,
        norm,
        heads,
    };
    let ffn_params = FfnParams {
        up: Dense {
            w: &w_ih_t,
            b: &b_i_t,
        },
        down: Dense {
            w: &w_hi_t,
            b: &b_h_t,
        },
        norm,
    };
    let attention_block =
        || ops::attention_block(&x, &bias, &attention_params, 0.1, 0.1, Mode::Train);
    let ffn_block = || ops::ffn_block(&x, &ffn_params, 0.1, Mode::Train);
    let blocks = attention_block()?.is_some() && ffn_block()?.is_some();
    // The attention block with attention in one pass (see its row below).
    let flash_block = || -> candle_core::Result<Option<Tensor>> {
        let was = attn::flash_on();
        attn::set_flash(true);
        let out = attention_block();
        attn::set_flash(was);
        out
    };
    let in_blocks = |count: usize| if blocks { 0 } else { count };
    let pieces = if fused || blocks { 0 } else { l };
    // For the rows of the fused pieces inside the block nodes (see below).
    use crate::model::kernels::attention_node::{CpuPrims, Prims, SeededDropout};
    let prims: Box<dyn Prims> = match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Box::new(crate::model::kernels::cuda::CudaPrims),
        _ => Box::new(CpuPrims),
    };
    let prims = prims.as_ref();
    let drop = SeededDropout { p: 0.1, seed: 5 };
    let qkv = act(&[b, s, 3 * h])?;
    let (scores_t, x_t, y_t, wide_t) = (
        scores.as_tensor().detach(),
        x.as_tensor().detach(),
        y.as_tensor().detach(),
        wide.as_tensor().detach(),
    );
    type Op<'a> = (
        &'static str,
        usize,
        Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>,
    );
    let mut list: Vec<Op> = vec![
        (
            "embedding: word table",
            1,
            Box::new(|| ops::embedding(&cast(&w_word)?, &word_ids, dt)),
        ),
        (
            "embedding: position table",
            1,
            Box::new(|| ops::embedding(&cast(&w_pos)?, &pos_ids, dt)),
        ),
        (
            "linear h->h (q, k, v, out)",
            in_blocks(4 * l),
            Box::new(|| ops::linear(&x, &cast(&w_hh)?, Some(&cast(&b_h)?))),
        ),
        (
            "linear h->4h",
            in_blocks(l),
            Box::new(|| ops::linear(&x, &cast(&w_ih)?, Some(&cast(&b_i)?))),
        ),
        (
            "linear 4h->h",
            in_blocks(l),
            Box::new(|| ops::linear(&wide, &cast(&w_hi)?, Some(&cast(&b_h)?))),
        ),
        (
            "matmul x.W^T alone (h->4h, no bias, no cast)",
            0,
            Box::new(|| {
                x.as_tensor()
                    .reshape((b * s, h))?
                    .matmul(&cast(&w_ih)?.t()?)
            }),
        ),
        (
            "layer norm",
            in_blocks(2 * l) + 1,
            Box::new(|| ops::layer_norm(&x, &cast(&ln_w)?, &cast(&ln_b)?, 1e-5)),
        ),
        (
            "attention: split heads x3 + merge",
            pieces,
            Box::new(|| {
                let split = |t: &Tensor| ops::swap12(&t.reshape((b, s, heads, d))?);
                let (q, k, v) = (split(&x)?, split(&y)?, split(&x)?);
                ops::swap12(&((q + k)? + v)?)?.reshape((b, s, h))
            }),
        ),
        (
            "attention: QK^T and PV matmuls",
            pieces,
            Box::new(|| {
                let p = qh.matmul(&kh.t()?)?;
                p.matmul(&vh)
            }),
        ),
        (
            "attention: scaled masked softmax",
            pieces,
            Box::new(|| ops::scaled_masked_softmax(&scores, &bias, 0.125)),
        ),
        (
            "dropout on probabilities",
            pieces,
            Box::new(|| ops::dropout(&scores, 0.1, Mode::Train)),
        ),
        (
            "dropout on hidden states",
            in_blocks(2 * l) + 1,
            Box::new(|| ops::dropout(&x, 0.1, Mode::Train)),
        ),
        ("gelu (erf)", in_blocks(l), Box::new(|| ops::gelu(&wide))),
        (
            "residual add",
            in_blocks(2 * l),
            Box::new(|| x.as_tensor() + y.as_tensor()),
        ),
    ];
    if fused {
        list.push((
            "attention core fused (split..PV, prob dropout)",
            in_blocks(l),
            Box::new(|| {
                attention()?.ok_or_else(|| candle_core::Error::Msg("attention not fused".into()))
            }),
        ));
    }
    // The attention block with attention in one pass, where it runs (no runs counted: training
    // uses it only when chosen).
    let before = attn::flash_runs();
    let flash = blocks
        && flash_measured()
        && !attn::flash_on()
        && flash_block()?.is_some()
        && attn::flash_runs() > before;
    if flash {
        list.push((
            "attention block node, attention in one pass",
            0,
            Box::new(|| flash_block()?.ok_or_else(block_missing)),
        ));
    }
    if blocks {
        list.push((
            "attention block node (q,k,v..LN)",
            l,
            Box::new(|| attention_block()?.ok_or_else(block_missing)),
        ));
        list.push((
            "ffn block node (h->4h..LN)",
            l,
            Box::new(|| ffn_block()?.ok_or_else(block_missing)),
        ));
    }
    // The fused pieces inside the block nodes, alone: no graph node of their own (so forward +
    // backward is the forward again) and no runs counted, since the block rows hold them.
    let pieces: Vec<Op> = vec![
        (
            "in blocks: softmax + prob dropout, one pass",
            0,
            Box::new(|| Ok(prims.softmax_dropout(&scores_t, &bias, 0.125, drop)?.1)),
        ),
        (
            "in blocks: dropout + residual add, one pass",
            0,
            Box::new(|| prims.dropout_add(&x_t, &y_t, Some(drop))),
        ),
        (
            "in blocks: bias + gelu h->4h, one pass",
            0,
            Box::new(|| Ok(prims.bias_gelu(&wide_t, &b_i_t)?.1)),
        ),
        (
            "in blocks: q,k,v split x3 + merge",
            0,
            Box::new(|| {
                let split = |part| prims.split_part(&qkv, part, 3, heads);
                let (q, k, v) = (split(0)?, split(1)?, split(2)?);
                prims.merge_parts([&q, &k, &v])
            }),
        ),
        (
            "in blocks: layer norm dx + branch dropout",
            0,
            Box::new(|| {
                let [_, dh, _, _] =
                    prims.layer_norm_backward_dropout(&x_t, &ln_w_t, &y_t, 1e-5, Some(drop))?;
                Ok(dh)
            }),
        ),
    ];
    list.extend(pieces);
    // The word table as training looks it up on CUDA with a gradient sink in scope from its second
    // step on: the f32 master handed over uncast (`model::casting`), rows gathered from it and
    // cast, its gradient deposited with the sink (a fresh sink a call, so that deposits do not
    // pile up), against the row "embedding: word table" (a cast table, candle's graph).
    if device.is_cuda() {
        list.push((
            "embedding: word table, gradient to the sink",
            0,
            Box::new(|| {
                let sink = GradSink::for_masters([w_word.as_tensor()])?;
                sink.scope(|| ops::embedding(w_word.as_tensor(), &word_ids, dt))
            }),
        ));
    }
    // The same layer norm backward without the packed kernels (session 12): in one pass (the path
    // before them), and as three kernels (row statistics, dx, dw and db; before session 10).
    #[cfg(feature = "cuda")]
    if device.is_cuda() && crate::model::kernels::cuda::layer_norm_packed() {
        use crate::model::kernels::cuda::{set_layer_norm_one_pass, set_layer_norm_packed};
        let (x_t, y_t, ln_w_t) = (&x_t, &y_t, &ln_w_t);
        for (name, one_pass) in [
            ("in blocks: layer norm dx + branch dropout, one pass", true),
            (
                "in blocks: layer norm dx + branch dropout, three kernels",
                false,
            ),
        ] {
            list.push((
                name,
                0,
                Box::new(move || {
                    set_layer_norm_packed(false);
                    set_layer_norm_one_pass(one_pass);
                    let out = prims.layer_norm_backward_dropout(x_t, ln_w_t, y_t, 1e-5, Some(drop));
                    set_layer_norm_one_pass(true);
                    set_layer_norm_packed(true);
                    let [_, dh, _, _] = out?;
                    Ok(dh)
                }),
            ));
        }
    }
    let mut total = 0.0;
    for (name, count, f) in &list {
        let fwd = time_it(device, args.warmup, args.steps, || {
            f()?;
            Ok(())
        })?;
        let both = time_it(device, args.warmup, args.steps, || {
            f()?.backward()?;
            Ok(())
        })?;
        total += *count as f64 * both;
        emit(json!({
            "kind": "op", "impl": "recycle", "name": name, "precision": precision.as_str(),
            "batch": b, "seq": s, "count": count, "forward_s": fwd, "forward_backward_s": both,
            "device": describe(device),
        }));
        eprintln!(
            "gpu-check: op {name} {}: forward {:.3} ms, forward+backward {:.3} ms, x{count}",
            precision.as_str(),
            1e3 * fwd,
            1e3 * both
        );
    }
    eprintln!(
        "gpu-check: ops {}: Σ count × forward+backward = {:.1} ms",
        precision.as_str(),
        1e3 * total
    );
    Ok(())
}

/// The dense layers' three products at roberta-base's shapes over `batch × seq` rows, alone: the
/// forward `x·Wᵀ`, the input gradient `dy·W` and the weight gradient `dyᵀ·x`, the last unsplit and
/// split over the rows in 2, 4 and 8 (`weight_grad`). TFLOP/s each, as `{"kind": "gemm"}` lines:
/// which products run below the card's ceiling, and whether a split lifts the weight gradient's.
fn profile_products(args: &Args, precision: Precision, device: &Device) -> Result<()> {
    use crate::model::kernels::weight_grad;
    let shape = Shape::named("roberta-base", args.tiny)?;
    let (h, i) = (shape.hidden, shape.intermediate);
    let rows = args.batch * args.seq;
    let dt = precision.compute_dtype();
    let randn = |r: usize, c: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, (r, c), device)?.to_dtype(dt)?)
    };
    // (what, out, in): q, k and v run as one product of 3h outputs in the attention block.
    let layers = [
        ("h->h (attention output)", h, h),
        ("h->3h (q, k, v)", 3 * h, h),
        ("h->4h", i, h),
        ("4h->h", h, i),
    ];
    for (what, out, inp) in layers {
        let (x, w, dy) = (randn(rows, inp)?, randn(out, inp)?, randn(rows, out)?);
        let flops = 2.0 * (rows * out * inp) as f64;
        // (product, parts of the split or 0, the product).
        type Product<'a> = (
            &'static str,
            usize,
            Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>,
        );
        let mut products: Vec<Product> = vec![
            ("x.W^T", 0, Box::new(|| x.matmul(&w.t()?))),
            ("dy.W", 0, Box::new(|| dy.matmul(&w))),
        ];
        for parts in [1usize, 2, 4, 8] {
            let (x, dy) = (&x, &dy);
            products.push((
                "dy^T.x",
                parts,
                Box::new(move || weight_grad::weight_grad_split(dy, x, parts)),
            ));
        }
        for (product, parts, f) in &products {
            let secs = time_it(device, args.warmup, args.steps, || {
                f()?;
                Ok(())
            })?;
            let tflops = flops / secs / 1e12;
            emit(json!({
                "kind": "gemm", "impl": "recycle", "layer": what, "product": product,
                "parts": parts, "rows": rows, "out": out, "in": inp,
                "precision": precision.as_str(), "batch": args.batch, "seq": args.seq,
                "seconds": secs, "tflops": tflops, "device": describe(device),
            }));
            let split = if *parts > 0 {
                format!(" in {parts}")
            } else {
                String::new()
            };
            eprintln!(
                "gpu-check: product {what} {product}{split} {}: {:.3} ms, {tflops:.1} TFLOP/s",
                precision.as_str(),
                1e3 * secs
            );
        }
    }
    Ok(())
}

/// A line the report prints as it is.
fn note(text: &str) {
    eprintln!("gpu-check: NOTE {text}");
    emit(json!({"kind": "note", "note": text}));
}

/// A note that a lever failed and is off for the rest of the run, naming its switch: that line
/// tells scripts/gpu/run.sh (through `recycle gpu-levers --failed`) to keep it off in the stages
/// after, which skip the checks.
fn note_off(switch: &'static EnvSwitch, text: &str) {
    eprintln!("gpu-check: NOTE {text}");
    emit(json!({"kind": "note", "note": text, "switch": switch.var()}));
}

fn block_missing() -> candle_core::Error {
    candle_core::Error::Msg("the block ran composed where it ran as a node before".into())
}

/// TFLOP/s of an n×n×n bf16 matmul through candle (cuBLAS on CUDA).
fn matmul_ceiling(n: usize, device: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let secs = time_it(device, 2, 10, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / secs / 1e12)
}

pub fn run(args: Args) -> Result<ExitCode> {
    let device = args.device.open()?;
    eprintln!("gpu-check: running on {}", describe(&device));
    let mut ok = true;
    if !args.skip_parity {
        // The graph nodes first: one that fails its check is turned off for the rest of the run
        // (the fixtures' parity included), so that the measurements still run, on the path
        // beneath it, and the report says so.
        let dropout = dropout_check(&device);
        ok &= reported(dropout, json!({"stage": "dropout"})).unwrap_or(false);
        // The dense products first: training takes them for every layer (on CUDA in bf16 through
        // cuBLASLt, turned off for the rest of the run if they fail here).
        #[cfg(feature = "cuda")]
        let (lt_was_on, dgelu_was_on) = {
            use crate::model::kernels::cuda_lt;
            (cuda_lt::enabled(), cuda_lt::dgelu_on())
        };
        let dense = dense_check(&device);
        let (dense, gelu) = reported(dense, json!({"stage": "dense"}))
            .map_or((false, false), |d| (d.products, d.gelu));
        ok &= dense && gelu;
        #[cfg(feature = "cuda")]
        if !dense && crate::model::kernels::cuda_lt::enabled() {
            crate::model::kernels::cuda_lt::set_enabled(false);
            note_off(
                &crate::model::kernels::cuda_lt::SWITCH,
                "the cuBLASLt products failed their check: the rest of this run uses candle's",
            );
        } else if device.is_cuda() && lt_was_on && !crate::model::kernels::cuda_lt::enabled() {
            note_off(&crate::model::kernels::cuda_lt::SWITCH, "cuBLASLt failed and turned itself off (stderr says why): the rest of this run uses candle's products");
        } else if !gelu && crate::model::kernels::cuda_lt::dgelu_on() {
            crate::model::kernels::cuda_lt::set_dgelu(false);
            note_off(&crate::model::kernels::cuda_lt::DGELU, "GELU's backward in the epilogue failed its check: the rest of this run runs it as a kernel of its own");
        } else if device.is_cuda() && dgelu_was_on && !crate::model::kernels::cuda_lt::dgelu_on() {
            note_off(&crate::model::kernels::cuda_lt::DGELU, "GELU's backward in the epilogue turned itself off after a cuBLASLt error (stderr says why): the rest of this run runs it as a kernel of its own");
        }
        // The block nodes' tail in one pass (session 14, CUDA): turned off for the rest of the
        // run where it fails.
        let tail = tail_check(&device);
        let tail = reported(tail, json!({"stage": "tail"})).unwrap_or(false);
        ok &= tail;
        if !tail && crate::model::kernels::block_node::add_norm_on() {
            crate::model::kernels::block_node::set_add_norm(false);
            note_off(&crate::model::kernels::block_node::ADD_NORM, "the one-pass tail (residual add and layer norm) failed its check: the rest of this run runs the two kernels");
        }
        let attention = attention_node_check(&device);
        let attention = reported(attention, json!({"stage": "attention"})).unwrap_or(false);
        if !attention {
            ops::set_fused_attention(false);
            note("the attention node failed its check: the rest of this run composes attention");
        }
        let blocks = block_node_check(&device);
        let mut blocks = reported(blocks, json!({"stage": "block"})).unwrap_or(false);
        ok &= attention && blocks;
        // With attention's heads in place (session 13, CUDA bf16): where the blocks fail, once
        // more on split heads, which keeps the block nodes if only the heads in place are wrong.
        if !blocks && device.is_cuda() && attn::heads_in_place_on() {
            attn::set_heads_in_place(false);
            note_off(&attn::HEADS_IN_PLACE, "the block nodes failed their check with attention's heads in place: those are off for the rest of this run, and the blocks checked again");
            let again = block_node_check(&device);
            blocks = reported(again, json!({"stage": "block", "heads_in_place": false}))
                .unwrap_or(false);
        }
        if !blocks {
            ops::set_fused_blocks(false);
            note("the block nodes failed their check: the rest of this run composes the blocks");
        }
        if args.weight_grad_split > 1 {
            let split = split_check(&device, args.weight_grad_split as usize);
            ok &= reported(split, json!({"stage": "split"})).unwrap_or(false);
        }

        ok &= parity(&args, &device)?;
        let optimizer = optimizer_check(&device);
        ok &= reported(optimizer, json!({"stage": "optimizer"})).unwrap_or(false);
    }
    if args.flash {
        let flash = flash_check(&device);
        let passed = reported(flash, json!({"stage": "flash"})).unwrap_or(false);
        FLASH_PASSED.store(passed, std::sync::atomic::Ordering::Relaxed);
        ok &= passed;
    }
    if args.matmul > 0 {
        let ceiling = matmul_ceiling(args.matmul, &device);
        if let Some(tflops) = reported(ceiling, json!({"stage": "matmul"})) {
            emit(
                json!({"kind": "matmul", "impl": "recycle", "n": args.matmul, "dtype": "bf16",
                    "tflops": tflops, "device": describe(&device)}),
            );
            eprintln!(
                "gpu-check: bf16 matmul {}³: {tflops:.1} TFLOP/s",
                args.matmul
            );
        } else {
            ok = false;
        }
    }
    if !args.skip_ops {
        for &precision in &args.precisions {
            let run = profile_ops(&args, precision, &device);
            ok &= reported(
                run,
                json!({"stage": "ops", "precision": precision.as_str()}),
            )
            .is_some();
            let run = profile_products(&args, precision, &device);
            ok &= reported(
                run,
                json!({"stage": "products", "precision": precision.as_str()}),
            )
            .is_some();
        }
    }
    for name in args.shapes.iter().filter(|n| !n.is_empty()) {
        let shape = Shape::named(name, args.tiny)?;
        let bench = bench_shape(&shape, &args, &device);
        ok &= reported(bench, json!({"stage": "bench", "shape": shape.name})).unwrap_or(false);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_flops_follow_the_dense_and_attention_terms() {
        // roberta-base at seq 128: 85M encoder matmul weights → 2·85M·128 ≈ 21.7 GFLOP, plus
        // attention 12·4·128²·768 ≈ 0.6 GFLOP.
        let s = Shape::named("roberta-base", false).unwrap();
        let dense_weights = 12.0 * (4.0 * 768.0 * 768.0 + 2.0 * 768.0 * 3072.0);
        assert_eq!(dense_weights, 84_934_656.0);
        let want = 128.0 * 2.0 * dense_weights + 12.0 * 4.0 * 128.0 * 128.0 * 768.0;
        assert_eq!(s.forward_flops(128), want);
        assert!(Shape::named("gpt2", false).is_err());
    }
}
