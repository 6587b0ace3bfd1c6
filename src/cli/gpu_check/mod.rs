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

mod ab;
mod bench;
mod checks;
mod profile;
mod shape;
use bench::{bench_shape, matmul_ceiling, time_it};
use checks::{
    attention_node_check, block_node_check, dense_check, dropout_check, flash_check,
    optimizer_check, parity, split_check, stack_check, tail_check,
};
use profile::{profile_ops, profile_products};
use shape::{random_batch, write_random_checkpoint, Shape};

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
    /// a kernel fault on the GPU loses the CUDA context and ends the whole process (exit 125), so
    /// scripts/gpu/run.sh runs it in stages of its own.
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
    /// Switches to time training with, comma-separated `VAR=value` (`RECYCLE_FLASH=1,
    /// RECYCLE_STACK=0`): the step with them and without them (the switches as the environment
    /// left them), in interleaved rounds in the same process, then a throughput row for the step
    /// with them and an A/B row, "the chosen levers together", against the step without.
    #[arg(long, value_delimiter = ',', requires = "train_only")]
    pub levers: Vec<String>,
}

/// `--levers`: each lever's switch and the state asked for; an unknown switch or a value that is
/// neither on nor off is an error naming the flag.
fn chosen_levers(words: &[String]) -> Result<Vec<(&'static EnvSwitch, bool)>> {
    let all = levers();
    words
        .iter()
        .filter(|w| !w.trim().is_empty())
        .map(|w| {
            let (var, value) = w
                .split_once('=')
                .with_context(|| format!("--levers {w}: expected VAR=value"))?;
            let switch = all
                .iter()
                .find(|sw| sw.var() == var.trim())
                .with_context(|| {
                    let known: Vec<&str> = all.iter().map(|sw| sw.var()).collect();
                    format!("--levers {w}: {var} is not a lever's switch here (one of {known:?})")
                })?;
            let on = crate::model::kernels::switch_word(value).with_context(|| {
                format!("--levers {w}: {value:?} is neither 1/on/true nor 0/off/false")
            })?;
            Ok((*switch, on))
        })
        .collect()
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
            let text = format!("{e:#}");
            let mut line = json!({"kind": "error", "error": text});
            if let (Some(line), serde_json::Value::Object(at)) = (line.as_object_mut(), at) {
                line.extend(at);
            }
            eprintln!("gpu-check: FAILED {line}");
            emit(line);
            end_if_context_lost(&text);
            None
        }
    }
}

/// The exit status of a `gpu-check` whose CUDA context was lost: above `timeout`'s 124, so that
/// scripts/gpu/run.sh counts the stage as died, as it does one that a signal or the time limit
/// ended, and turns the unmeasured levers off for the stages after.
pub const CONTEXT_LOST_EXIT: i32 = 125;

/// Ends the process (`CONTEXT_LOST_EXIT`) after a note where `error_text` says the CUDA context
/// is lost (a kernel fault: `device::context_lost`): every later call on the device would fail
/// the same way, so the rows after it would all be errors, and the stage's exit status is how the
/// script knows what happened.
fn end_if_context_lost(error_text: &str) {
    if crate::device::context_lost(error_text) {
        let text = "the CUDA context is lost (a kernel fault, above): this process ends here";
        eprintln!("gpu-check: NOTE {text} (exit {CONTEXT_LOST_EXIT})");
        emit(json!({"kind": "note", "note": text, "context_lost": true}));
        std::process::exit(CONTEXT_LOST_EXIT);
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

/// How the checks and the bench load a model: a fresh single-label head of `num_labels`, seed 0,
/// the checkpoint's own dropout.
fn load_options(num_labels: usize, precision: Precision) -> LoadOptions {
    LoadOptions {
        num_labels,
        problem: Problem::SingleLabel,
        seed: 0,
        precision,
        hidden_dropout: None,
    }
}

fn adamw_defaults() -> AdamWParams {
    AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    }
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

pub fn run(args: Args) -> Result<ExitCode> {
    let result = measure(args);
    if let Err(e) = &result {
        end_if_context_lost(&format!("{e:#}"));
    }
    result
}

fn measure(args: Args) -> Result<ExitCode> {
    chosen_levers(&args.levers)?;
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
        // The layers in one stack node (session 12, CUDA), with the one-pass tail it brings:
        // turned off for the rest of the run where its output or gradients differ from a node
        // per block's.
        if crate::model::kernels::stack::stack_on() {
            let stacked = stack_check(&device);
            let stacked = reported(stacked, json!({"stage": "stack"})).unwrap_or(false);
            ok &= stacked;
            if !stacked {
                crate::model::kernels::stack::set_stack(false);
                note_off(&crate::model::kernels::stack::STACK, "the stack node failed its check: the rest of this run runs a node per block (and the tail as two kernels)");
            }
        }
        let attention = attention_node_check(&device);
        let attention = reported(attention, json!({"stage": "attention"})).unwrap_or(false);
        if !attention {
            ops::set_fused_attention(false);
            note_off(
                &ops::FUSED_ATTENTION,
                "the attention node failed its check: the rest of this run composes attention",
            );
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
            note_off(
                &ops::FUSED_BLOCKS,
                "the block nodes failed their check: the rest of this run composes the blocks",
            );
        }
        if args.weight_grad_split > 1 {
            let split = split_check(&device, args.weight_grad_split as usize);
            ok &= reported(split, json!({"stage": "split"})).unwrap_or(false);
        }

        ok &= parity(&args, &device);
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
    for name in args.shapes.iter().filter(|n| !n.is_empty()) {
        let shape = Shape::named(name, args.tiny)?;
        let bench = bench_shape(&shape, &args, &device);
        ok &= reported(bench, json!({"stage": "bench", "shape": shape.name})).unwrap_or(false);
    }
    // The op profile after the throughput rows: it runs attention in one pass at the stage's own
    // shape (its check ran a small one), and a fault there now costs the profile alone.
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
    fn chosen_levers_name_known_switches_with_on_or_off() {
        let words = |ws: &[&str]| ws.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let chosen = chosen_levers(&words(&["RECYCLE_FLASH=1", "RECYCLE_STACK=off"])).unwrap();
        let got: Vec<(&str, bool)> = chosen.iter().map(|(sw, on)| (sw.var(), *on)).collect();
        assert_eq!(got, [("RECYCLE_FLASH", true), ("RECYCLE_STACK", false)]);
        assert!(chosen_levers(&[]).unwrap().is_empty());
        for (bad, says) in [
            ("RECYCLE_NOPE=1", "RECYCLE_NOPE is not a lever's switch"),
            ("RECYCLE_FLASH", "expected VAR=value"),
            ("RECYCLE_FLASH=maybe", "neither"),
        ] {
            let err = format!("{:#}", chosen_levers(&words(&[bad])).unwrap_err());
            assert!(err.contains("--levers") && err.contains(says), "{err}");
        }
    }
}
