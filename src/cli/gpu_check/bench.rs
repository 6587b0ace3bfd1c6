//! Throughput: training and inference examples/s, the A/B rows of the levers, a step's phases,
//! and the bf16 matmul ceiling.

use super::ab::time_levers;
use super::*;

/// Rounds of `steps` timed calls per measurement; the median round counts, so one round disturbed
/// by something else on the machine does not (PyTorch's side does the same).
const ROUNDS: usize = 3;

/// Seconds per call of `f`: after `warmup` untimed calls, `ROUNDS` rounds of `steps` calls, each
/// timed with the device drained before the clock stops; the median round's.
pub(super) fn time_it(
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
        rounds.push(time_round(device, steps, &mut f)?);
    }
    Ok(median(&mut rounds))
}

/// Seconds per call of `steps` calls of `f`, the device drained before the clock starts and
/// before it stops.
fn time_round(device: &Device, steps: usize, f: &mut impl FnMut() -> Result<()>) -> Result<f64> {
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..steps {
        f()?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / steps.max(1) as f64)
}

/// Seconds per call of `f` with a lever as it is and with it flipped (`flip(true)`; `flip(false)`
/// puts it back): `warmup` untimed calls flipped first (the shapes or paths it takes may be new),
/// then `ROUNDS` rounds of `steps` calls of each, interleaved A B, B A, A B, so that what drifts
/// over a stage (clocks, a pool still growing, algorithms still being timed) falls on both alike;
/// the median round of each. Rows timed one after another against a plain step measured first
/// drifted by 2 to 3 % at batch 256 in run `12a`, as much as the smaller levers are worth. The
/// lever is put back whatever happens.
pub(super) fn time_pair(
    device: &Device,
    warmup: usize,
    steps: usize,
    flip: &mut dyn FnMut(bool),
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let mut run = || -> Result<(f64, f64)> {
        flip(true);
        for _ in 0..warmup {
            f()?;
        }
        let mut times = [Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS)];
        for round in 0..ROUNDS {
            for k in 0..2 {
                let flipped = (round + k) % 2 == 1;
                flip(flipped);
                times[usize::from(flipped)].push(time_round(device, steps, &mut f)?);
            }
        }
        let [mut as_is, mut flipped] = times;
        Ok((median(&mut as_is), median(&mut flipped)))
    };
    let pair = run();
    flip(false);
    pair
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times every precision of `args` on `shape`; returns whether all of them ran.
pub(super) fn bench_shape(shape: &Shape, args: &Args, device: &Device) -> Result<bool> {
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
    let opts = load_options(2, precision);
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
    let chosen = chosen_levers(&args.levers)?;
    if !chosen.is_empty() {
        // The chosen levers against the switches as they are, in the same process, interleaved;
        // the throughput row is the step with them (its "levers" say so).
        let was: Vec<bool> = chosen.iter().map(|(sw, _)| sw.get()).collect();
        // `time_pair` warms the chosen levers up; the switches as they are, here.
        for _ in 0..args.warmup {
            step(&mut opt)?;
        }
        // The pool's switch acts when a device is opened: flipping it here sets the device's
        // pool too (`device::set_pool_keep`), or the row would say "off" and run kept.
        let set = |flip: bool| {
            for ((sw, on), was) in chosen.iter().zip(&was) {
                let value = if flip { *on } else { *was };
                if std::ptr::eq(*sw, &crate::device::POOL_KEEP) {
                    if let Err(e) = crate::device::set_pool_keep(device, value) {
                        eprintln!("gpu-check: the memory pool's release threshold: {e:#}");
                    }
                } else {
                    sw.set(value);
                }
            }
        };
        let (without, with) = time_pair(device, args.warmup, args.steps, &mut |f| set(f), || {
            step(&mut opt)
        })?;
        set(true);
        bench_line("train", with, 3.0 * fwd);
        emit(json!({
            "kind": "ab", "impl": "recycle", "what": "the chosen levers together",
            "shape": shape.name, "precision": precision.as_str(), "mode": "train",
            "batch": args.batch, "seq": args.seq, "on_s": with, "off_s": without,
            "device": describe(device), "levers_chosen": args.levers,
            "config": args.config,
        }));
        set(false);
        eprintln!(
            "gpu-check: {} {} train: the chosen levers {:.1} ms a step, without them {:.1} ms",
            shape.name,
            precision.as_str(),
            1e3 * with,
            1e3 * without
        );
        return Ok(());
    }
    let train = time_it(device, args.warmup, args.steps, || step(&mut opt))?;
    bench_line("train", train, 3.0 * fwd);
    if args.train_only {
        return Ok(());
    }
    let mut step_or_sync = |sync: bool| step_with(&mut opt, sync);
    time_levers(shape, precision, args, device, train, &mut step_or_sync)?;
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

/// TFLOP/s of an n×n×n bf16 matmul through candle (cuBLAS on CUDA).
pub(super) fn matmul_ceiling(n: usize, device: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let secs = time_it(device, 2, 10, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / secs / 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    #[test]
    fn a_pair_interleaves_the_two_states_and_puts_the_lever_back() {
        let state = Cell::new(false);
        let seen = RefCell::new(Vec::new());
        let step = || {
            seen.borrow_mut().push(state.get());
            if state.get() {
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
            Ok(())
        };
        let (as_is, flipped) =
            time_pair(&Device::Cpu, 1, 2, &mut |on| state.set(on), step).unwrap();
        assert!(!state.get(), "the lever is put back");
        // One warm-up call flipped, then rounds A B, B A, A B of two calls each.
        let (a, b) = (false, true);
        assert_eq!(
            *seen.borrow(),
            [b, a, a, b, b, b, b, a, a, a, a, b, b],
            "{:?}",
            seen.borrow()
        );
        // The time of the flipped calls is theirs: each sleeps 3 ms, the others do nothing.
        assert!(flipped >= 0.003 && as_is < flipped, "{as_is} {flipped}");
    }

    #[test]
    fn a_failed_pair_puts_the_lever_back_too() {
        let state = Cell::new(false);
        let calls = Cell::new(0);
        let step = || {
            calls.set(calls.get() + 1);
            if calls.get() == 3 {
                anyhow::bail!("the third step failed");
            }
            Ok(())
        };
        let err = time_pair(&Device::Cpu, 1, 2, &mut |on| state.set(on), step).unwrap_err();
        assert!(err.to_string().contains("third step"), "{err}");
        assert!(!state.get());
    }
}
