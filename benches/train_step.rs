//! Training throughput on a MiniLM-L6-shaped BERT (random weights): examples/s of full optimiser
//! steps at batch 32 and sequence lengths 128 and 64, and the cost of one AdamW update compared
//! with a plain copy of every weight measured in the same run.
//!
//! `cargo bench --bench train_step`; `RECYCLE_BENCH_DEVICE=cuda`, `RECYCLE_BENCH_REPS=N`,
//! `RECYCLE_BENCH_KERNELS=fused|composed|both`, `RECYCLE_BENCH_ALLOC=default` and
//! `RECYCLE_BENCH_PARTS=main|kernels` (only the steps / only the fused-kernel comparison) adjust it. Lines `RESULT name value`
//! are for scripts/bench/compare.sh.

mod common;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use recycle::train::optim::{decays, AdamW, AdamWParams, Kernel};
use recycle::train::{finetune, TrainConfig, Trainee};
use std::time::Instant;

fn seconds(
    device: &Device,
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?; // warm-up
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

/// One AdamW update of every MiniLM weight, against a copy of every weight.
fn optimizer(device: &Device) -> anyhow::Result<()> {
    let hp = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let weights = common::random_weights(device)?;
    let mut names: Vec<_> = weights.keys().cloned().collect();
    names.sort();
    let grads: Vec<Option<Tensor>> = names
        .iter()
        .map(|n| Some((&weights[n] * 0.5).unwrap()))
        .collect();
    let numel: usize = weights.values().map(|t| t.elem_count()).sum();
    let reps = common::reps(10);
    let copy = seconds(device, reps, || {
        for t in weights.values() {
            let _ = t.copy()?;
        }
        Ok(())
    })?;
    let mut times = vec![];
    for kernel in [Kernel::Auto, Kernel::TensorOps] {
        let vm = VarMap::new();
        for (n, t) in &weights {
            vm.data()
                .lock()
                .map_err(|_| anyhow::anyhow!("lock"))?
                .insert(n.clone(), Var::from_tensor(t)?);
        }
        let mut opt = AdamW::new(&vm, hp, decays, kernel)?;
        times.push(seconds(device, reps, || Ok(opt.step(&grads, 1e-5, 1.0)?))?);
    }
    println!(
        "adamw  {numel} weights: copy {:.4}s  fused {:.4}s  tensor-ops {:.4}s",
        copy, times[0], times[1]
    );
    println!(
        "adamw  fused / copy = {:.2}   tensor-ops / fused = {:.2}",
        times[0] / copy,
        times[1] / times[0]
    );
    Ok(())
}

/// Forward + backward of each fused op against its composed version on MiniLM's shapes at seq 128
/// (batch 32): median over alternating runs of the time ratio composed / fused.
fn kernels(device: &Device) -> anyhow::Result<()> {
    use recycle::model::ops::{self, set_kernels, Kernels};
    let (b, s, h, i, heads) = (32, 128, common::HIDDEN, common::INTERMEDIATE, common::HEADS);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, h), device)?)?;
    let w = Var::from_tensor(&Tensor::ones(h, candle_core::DType::F32, device)?)?;
    let bias = Var::from_tensor(&Tensor::zeros(h, candle_core::DType::F32, device)?)?;
    let scores = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, heads, s, s), device)?)?;
    let mask = Tensor::ones((b, s), candle_core::DType::U32, device)?;
    let attn_bias = ops::attention_bias(&mask, candle_core::DType::F32)?;
    let act = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, i), device)?)?;
    type Case<'a> = (&'a str, Box<dyn Fn() -> anyhow::Result<()> + 'a>);
    let cases: Vec<Case> = vec![
        (
            "layer_norm",
            Box::new(|| {
                let y = ops::layer_norm(x.as_tensor(), w.as_tensor(), bias.as_tensor(), 1e-12)?;
                y.sum_all()?.backward()?;
                Ok(())
            }),
        ),
        (
            "masked_softmax",
            Box::new(|| {
                let y = ops::scaled_masked_softmax(scores.as_tensor(), &attn_bias, 0.125)?;
                (y * scores.as_tensor())?.sum_all()?.backward()?;
                Ok(())
            }),
        ),
        (
            "gelu",
            Box::new(|| {
                ops::gelu(act.as_tensor())?.sum_all()?.backward()?;
                Ok(())
            }),
        ),
    ];
    let rounds = common::reps(3).max(3);
    for (name, f) in &cases {
        let mut ratios = vec![];
        let mut fused_s = vec![];
        for _ in 0..rounds {
            let mut t = [0.0; 2];
            for (k, kernels) in [Kernels::Fused, Kernels::Composed].into_iter().enumerate() {
                set_kernels(kernels);
                t[k] = seconds(device, 2, || f())?;
            }
            fused_s.push(t[0]);
            ratios.push(t[1] / t[0]);
        }
        set_kernels(Kernels::Fused);
        ratios.sort_by(f64::total_cmp);
        fused_s.sort_by(f64::total_cmp);
        println!(
            "kernel {name:<15} fwd+bwd: fused {:.4}s; composed / fused median {:.2} (min {:.2}, max {:.2})",
            fused_s[fused_s.len() / 2],
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
        println!(
            "RESULT kernel_speedup_{name} {:.3}",
            ratios[ratios.len() / 2]
        );
    }
    Ok(())
}

/// Full optimiser steps through the training loop (batch 32, one micro-batch, no dev split).
fn steps(device: &Device, suffix: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = common::load_minilm(dir.path(), device)?;
    let reps = common::reps(3);
    let mut rates = vec![];
    for seq in [128, 64] {
        let train = common::random_set(32 * (reps + 1), seq, seq as u64);
        let cfg = TrainConfig {
            batch_size: 32,
            micro_batch_size: 32,
            max_epochs: 1,
            max_steps: Some(reps + 1),
            ..TrainConfig::default()
        };
        let inference = || model.inference_model();
        let trainee = Trainee {
            model: model.model(),
            varmap: model.varmap(),
            inference: &inference,
            decay: &decays,
        };
        let mut secs = vec![];
        finetune(
            &trainee,
            &common::binary_task(),
            &train,
            None,
            0,
            &cfg,
            device,
            &mut |r| secs.push(32.0 / r.examples_per_sec),
        )?;
        let timed = &secs[1..]; // the first step warms up
        let rate = 32.0 * timed.len() as f64 / timed.iter().sum::<f64>();
        println!(
            "train  batch 32  seq {seq:>3}{suffix}: {rate:.1} examples/s ({:.3}s/step)",
            32.0 / rate
        );
        println!("RESULT train_seq{seq}{suffix} {rate:.3}");
        rates.push(rate);
    }
    println!(
        "train  seq 64 / seq 128 throughput = {:.2}",
        rates[1] / rates[0]
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    common::setup();
    let device = common::bench_device()?;
    println!("device: {}", recycle::device::describe(&device));
    match std::env::var("RECYCLE_BENCH_PARTS").as_deref() {
        Ok("main") => {}
        Ok("kernels") => return kernels(&device),
        _ => {
            optimizer(&device)?;
            kernels(&device)?;
        }
    }
    for (kernels, suffix) in common::kernel_variants() {
        recycle::model::ops::set_kernels(kernels);
        steps(&device, suffix)?;
    }
    if let Some(mb) = common::peak_rss_mb() {
        println!("RESULT train_peak_rss_mb {mb:.0}");
    }
    Ok(())
}
