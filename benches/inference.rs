//! Inference throughput on a MiniLM-L6-shaped BERT (random weights): examples/s of `predict` at
//! batch 32 and sequence lengths 128 and 64, over detached weights (no autograd graph) and, as the
//! baseline measured in the same run, over the trainable `Var`s (which record a graph).
//!
//! `cargo bench --bench inference`; `RECYCLE_BENCH_DEVICE=cuda`, `RECYCLE_BENCH_REPS=N`,
//! `RECYCLE_BENCH_KERNELS=fused|composed|both`, `RECYCLE_BENCH_ALLOC=default` and
//! `RECYCLE_BENCH_PARTS=main` (skip the over-`Var`s baseline) adjust it. Lines
//! `RESULT name value` are for scripts/bench/compare.sh.

mod common;

use recycle::model::SequenceClassifier;
use recycle::train::predict;
use std::time::Instant;

fn rate(
    model: &dyn SequenceClassifier,
    set: &recycle::tokenize::Encoded,
    device: &candle_core::Device,
) -> anyhow::Result<f64> {
    let warm = recycle::tokenize::Encoded {
        input_ids: set.input_ids[..32].to_vec(),
        type_ids: set.type_ids[..32].to_vec(),
    };
    predict(model, &warm, 0, 32, device)?;
    let start = Instant::now();
    predict(model, set, 0, 32, device)?;
    Ok(set.len() as f64 / start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    common::setup();
    let device = common::bench_device()?;
    println!("device: {}", recycle::device::describe(&device));
    let dir = tempfile::tempdir()?;
    let model = common::load_minilm(dir.path(), &device)?;
    let detached = model.inference_model()?;
    let reps = common::reps(4);
    let with_vars = std::env::var("RECYCLE_BENCH_PARTS").as_deref() != Ok("main");
    for (kernels, suffix) in common::kernel_variants() {
        recycle::model::ops::set_kernels(kernels);
        for seq in [128, 64] {
            let set = common::random_set(32 * reps, seq, seq as u64);
            let fast = rate(detached.as_ref(), &set.encoded, &device)?;
            println!("infer  batch 32  seq {seq:>3}{suffix}: {fast:.1} examples/s detached");
            println!("RESULT infer_seq{seq}{suffix} {fast:.3}");
            if with_vars {
                let graph = rate(model.model(), &set.encoded, &device)?;
                println!(
                    "infer  batch 32  seq {seq:>3}{suffix}: {graph:.1} examples/s over Vars (detached / Vars = {:.2})",
                    fast / graph
                );
            }
        }
    }
    Ok(())
}
