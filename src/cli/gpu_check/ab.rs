//! The A/B rows: training with each lever on and off in the same process. A lever with a process
//! switch is timed in interleaved rounds against the step without the flip (`time_pair`) and its
//! row names the switch (`recycle gpu-levers` reads those); the others against the plain step.

use super::bench::time_pair;
use super::*;

/// The A/B rows of one shape and precision, each written as soon as it is measured (a fault in a
/// later row ends the process, and the rows before it still reach the report).
struct AbRows<'a> {
    shape: &'a Shape,
    precision: Precision,
    args: &'a Args,
    device: &'a Device,
    /// The plain step's time: "on" for the rows that turn one switch off.
    train: f64,
    /// The first row that could not be timed, returned once the others are written.
    failed: Option<anyhow::Error>,
}

impl AbRows<'_> {
    /// A row against the plain step: `off` is the step timed with the thing `what` off. A
    /// failed timing is reported (stage `ab`) and leaves no row. Returns the off time.
    fn off(&mut self, what: &str, off: Result<f64>) -> Option<f64> {
        self.against(what, self.train, off, None)
    }

    /// A row for a switch that is off in training: `on` is the step timed with `what` on,
    /// against the plain step. Reported and returned as `off`.
    fn on(&mut self, what: &str, on: Result<f64>) -> Option<f64> {
        let on = reported(on, self.at(what))?;
        self.record(what, on, Ok(self.train), None);
        Some(on)
    }

    /// As `off`, against another step's time `on`, naming the process switch it flipped where
    /// there is one.
    fn against(
        &mut self,
        what: &str,
        on: f64,
        off: Result<f64>,
        switch: Option<&'static EnvSwitch>,
    ) -> Option<f64> {
        let off = reported(off, self.at(what))?;
        self.record(what, on, Ok(off), switch);
        Some(off)
    }

    /// A row for a process switch, timed with it as it is and flipped, interleaved
    /// (`time_switch`). Returns whether there is a row.
    fn flip(
        &mut self,
        switch: &'static EnvSwitch,
        what: &str,
        time: impl FnOnce(&mut dyn FnMut(bool)) -> Result<(f64, f64)>,
    ) -> bool {
        let pair = time_switch(switch, time);
        self.switch_row(switch, what, pair)
    }

    /// A row for a process switch from its `(on, off)` seconds; a failed timing is reported and
    /// leaves no row. Returns whether there is a row.
    fn switch_row(
        &mut self,
        switch: &'static EnvSwitch,
        what: &str,
        pair: Result<(f64, f64)>,
    ) -> bool {
        let Some((on, off)) = reported(pair, self.at(what)) else {
            return false;
        };
        self.record(what, on, Ok(off), Some(switch));
        true
    }

    /// Writes the row (an `off` that failed is kept to be returned by `finish`).
    fn record(
        &mut self,
        what: &str,
        on_s: f64,
        off: Result<f64>,
        switch: Option<&'static EnvSwitch>,
    ) {
        let off_s = match off {
            Ok(t) => t,
            Err(e) => {
                self.failed.get_or_insert(e);
                return;
            }
        };
        let (shape, precision, args) = (self.shape, self.precision, self.args);
        let mut row = json!({
            "kind": "ab", "impl": "recycle", "what": what, "shape": shape.name,
            "precision": precision.as_str(), "mode": "train", "batch": args.batch,
            "seq": args.seq, "on_s": on_s, "off_s": off_s, "device": describe(self.device),
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

    fn at(&self, what: &str) -> serde_json::Value {
        json!({"stage": "ab", "what": what, "shape": self.shape.name})
    }

    /// The first row that could not be timed, if any.
    fn finish(self) -> Result<()> {
        self.failed.map_or(Ok(()), Err)
    }
}

/// The step timed with `switch` as it is and flipped, interleaved (`time` is `time_pair`, handed
/// the function that flips it): `(on, off)` seconds. The switch is put back, except where the
/// lever turned itself off while it was timed (cuBLASLt giving up after an error of its own):
/// then there is no row, the lever stays off, and a note naming its switch says so (the stages
/// after keep it off).
fn time_switch(
    switch: &'static EnvSwitch,
    time: impl FnOnce(&mut dyn FnMut(bool)) -> Result<(f64, f64)>,
) -> Result<(f64, f64)> {
    let was = switch.get();
    // What the switch was last set to here: found otherwise at the next flip, the lever changed
    // it itself.
    let mut last = was;
    let mut gave_up = false;
    let pair = time(&mut |flipped| {
        gave_up |= switch.get() != last;
        last = was != flipped;
        switch.set(last);
    });
    gave_up |= switch.get() != last;
    if gave_up {
        switch.set(false);
        note_off(
            switch,
            &format!(
                "{} turned itself off while its A/B row was timed (stderr says why): off for the \
                 rest of this run",
                switch.var()
            ),
        );
        bail!(
            "{} turned itself off while it was timed: no row",
            switch.var()
        );
    }
    switch.set(was);
    let (as_is, flipped) = pair?;
    Ok(if was {
        (as_is, flipped)
    } else {
        (flipped, as_is)
    })
}

/// Times training with each lever that is on flipped in turn (and the levers that are off, where
/// measured, turned on), against `train`, the plain step's seconds, and writes an `ab` row each.
/// `step(false)` takes a training step as `finetune` does, `step(true)` one that reads the loss
/// and the norm back as it did before session 11.
pub(super) fn time_levers(
    shape: &Shape,
    precision: Precision,
    args: &Args,
    device: &Device,
    train: f64,
    step: &mut dyn FnMut(bool) -> Result<()>,
) -> Result<()> {
    // The same steps without the block nodes (the attention node still on), then with neither:
    // what each is worth end to end, in the same run (on the CPU, which trains with neither, the
    // rows measure noise).
    // Each switch that is on (a node that failed its check is off for the whole run), off in
    // turn, the earlier ones staying off.
    let (blocks_on, attention_on) = (ops::fused_blocks(), ops::fused_attention_on());
    let sink_on = grad_sink::enabled();
    let mut baseline = train;
    let mut ab = AbRows {
        shape,
        precision,
        args,
        device,
        train,
        failed: None,
    };
    // cudarc's events on every buffer (off on an opened CUDA device): "on" is the default,
    // without them. In bf16 only: that is where a step is short enough for the host to bound it.
    if device.is_cuda()
        && precision == Precision::Bf16
        && !crate::device::set_buffer_events(device, false)
    {
        crate::device::set_buffer_events(device, true);
        let with = time_it(device, args.warmup, args.steps, || step(false));
        crate::device::set_buffer_events(device, false);
        ab.off("no CUDA events per buffer", with);
    }
    // No host synchronisation inside a training step (session 11): "off" reads the loss and the
    // gradient norm back as the training loop did before (its time kept for the pool's rows).
    let mut synced_step = None;
    if device.is_cuda() {
        let synced = time_it(device, args.warmup, args.steps, || step(true));
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
        // The plain step kept and not, interleaved (the row `recycle gpu-levers` reads); the
        // switch acts on the device's pool, so the flip sets the pool itself.
        let mut flip_failed = None;
        let pair = time_pair(
            device,
            args.warmup,
            args.steps,
            &mut |flipped| {
                if let Err(e) = set_pool_keep(device, !flipped) {
                    flip_failed.get_or_insert(e);
                }
            },
            || step(false),
        );
        let pair = match flip_failed {
            Some(e) => Err(e),
            None => pair,
        };
        let pooled = ab.switch_row(&crate::device::POOL_KEEP, plain, pair);
        // Steps that read back, against the row above's: the pool's share of what synchronising
        // every step cost `finetune` before session 11.
        if pooled && set_pool_keep(device, false).is_ok() {
            let off_synced = time_it(device, args.warmup, args.steps, || step(true));
            if let Err(e) = set_pool_keep(device, true) {
                eprintln!("gpu-check: the memory pool kept nothing after its A/B rows: {e:#}");
            }
            ab.against(read_back, kept_synced, off_synced, None);
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
        let all_cast = time_it(device, args.warmup, args.steps, || step(false));
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
        ab.flip(&cuda_lt::SWITCH, "dense products through cuBLASLt", |set| {
            time_pair(device, args.warmup, args.steps, set, || step(false))
        });
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
        ab.flip(
            &cuda_lt::DGELU,
            "GELU's backward in the product's epilogue",
            |set| time_pair(device, args.warmup, args.steps, set, || step(false)),
        );
    }
    // Attention's per-head products in place (session 13, CUDA bf16, on by default): "off"
    // splits q, k and v into heads and merges the context (and the gradients) with copies.
    if device.is_cuda() && precision == Precision::Bf16 && blocks_on && attn::heads_in_place_on() {
        ab.flip(&attn::HEADS_IN_PLACE, "attention's heads in place", |set| {
            time_pair(device, args.warmup, args.steps, set, || step(false))
        });
    }
    // The embeddings as one node (session 13, on by default): "off" is a lookup per table and
    // candle's adds of their rows.
    if device.is_cuda() && ops::embeddings_sum_on() {
        ab.flip(&ops::EMBEDDINGS_SUM, "embeddings in one node", |set| {
            time_pair(device, args.warmup, args.steps, set, || step(false))
        });
    }
    // The block nodes' tail in one pass (session 14, on by default; it runs where the blocks are
    // recorded into the stack): "off" is the residual's dropout and add, then the layer norm.
    if device.is_cuda()
        && blocks_on
        && crate::model::kernels::stack::stack_on()
        && crate::model::kernels::block_node::add_norm_on()
    {
        ab.flip(
            &crate::model::kernels::block_node::ADD_NORM,
            "residual add and layer norm in one pass",
            |set| time_pair(device, args.warmup, args.steps, set, || step(false)),
        );
    }
    // The encoder's block nodes as one stack node (session 12, on by default): "off" is a graph
    // node per block, each input's gradient added into a zero-filled slot by candle. CUDA only:
    // the CPU's training does not take the block nodes.
    if device.is_cuda() && blocks_on && crate::model::kernels::stack::stack_on() {
        ab.flip(
            &crate::model::kernels::stack::STACK,
            "block nodes in one stack node",
            |set| time_pair(device, args.warmup, args.steps, set, || step(false)),
        );
    }
    // Layer norm's backward with 16-byte packs (session 12, on by default where rows fit): "off"
    // is the one-pass kernel before it.
    #[cfg(feature = "cuda")]
    if device.is_cuda() && crate::model::kernels::cuda::layer_norm_packed() {
        use crate::model::kernels::cuda::set_layer_norm_packed;
        set_layer_norm_packed(false);
        let one_pass = time_it(device, args.warmup, args.steps, || step(false));
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
        let one_pass = time_it(device, args.warmup, args.steps, || step(false));
        set_layer_norm_one_pass(false);
        let three = time_it(device, args.warmup, args.steps, || step(false));
        set_layer_norm_one_pass(true);
        set_layer_norm_packed(packed);
        let what = "layer norm backward in one pass";
        let at = ab.at(what);
        if let (Some(on), Some(off)) = (reported(one_pass, at.clone()), reported(three, at)) {
            ab.record(what, on, Ok(off), None);
        }
    }
    // The weight gradients split over the rows (off in training unless chosen): "on" is the split.
    let parts = args.weight_grad_split as usize;
    if parts > 1 {
        use crate::model::kernels::weight_grad;
        weight_grad::set_split(parts);
        let split = time_it(device, args.warmup, args.steps, || step(false));
        weight_grad::set_split(1);
        ab.on(&format!("weight gradients split in {parts}"), split);
    }
    // Attention in one pass (off in training unless chosen): "on" is one pass; a row only where
    // it ran (bf16, heads of 64, at most 512 tokens, a multiple of 16).
    if blocks_on && !attn::flash_on() && flash_measured() {
        let before = attn::flash_runs();
        let what = "attention in one pass (flash)";
        let pair = time_switch(&attn::FLASH, |set| {
            time_pair(device, args.warmup, args.steps, set, || step(false))
        });
        // No row where the shapes did not fit (the "on" steps ran without it), unless to report
        // a failure.
        let ran = attn::flash_runs() > before;
        if (ran || pair.is_err()) && ab.switch_row(&attn::FLASH, what, pair) && parts > 1 {
            // Both levers together, where both are measured.
            use crate::model::kernels::weight_grad;
            attn::set_flash(true);
            weight_grad::set_split(parts);
            let both = time_it(device, args.warmup, args.steps, || step(false));
            weight_grad::set_split(1);
            attn::set_flash(false);
            ab.on(&format!("flash + weight gradients split in {parts}"), both);
        }
    }
    if sink_on && blocks_on {
        grad_sink::set_enabled(false);
        let off = time_it(device, args.warmup, args.steps, || step(false));
        let next = *off.as_ref().unwrap_or(&baseline);
        ab.record("gradient sink", baseline, off, None);
        baseline = next;
    }
    if blocks_on {
        ops::set_fused_blocks(false);
        let off = time_it(device, args.warmup, args.steps, || step(false));
        let next = *off.as_ref().unwrap_or(&baseline);
        let what = if sink_on {
            "block nodes (without gradient sink)"
        } else {
            "block nodes"
        };
        ab.record(what, baseline, off, None);
        baseline = next;
    }
    if attention_on {
        ops::set_fused_attention(false);
        let off = time_it(device, args.warmup, args.steps, || step(false));
        let what = if blocks_on {
            "fused attention (without block nodes)"
        } else {
            "fused attention"
        };
        ab.record(what, baseline, off, None);
    }
    ops::set_fused_attention(attention_on);
    ops::set_fused_blocks(blocks_on);
    grad_sink::set_enabled(sink_on);
    ab.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    static LEVER: EnvSwitch = EnvSwitch::new("RECYCLE_TEST_AB_LEVER");

    /// As-is and flipped come back as (on, off) and the switch is put back; a lever that turns
    /// itself off in a round leaves no row and stays off.
    #[test]
    fn a_switch_row_maps_its_pair_and_a_lever_that_gave_up_stays_off() {
        LEVER.set(true);
        let seen = std::cell::RefCell::new(Vec::new());
        let pair = time_switch(&LEVER, |flip| {
            for flipped in [true, false, true, true, false] {
                flip(flipped);
                seen.borrow_mut().push(LEVER.get());
            }
            Ok((1.0, 2.0))
        })
        .unwrap();
        assert_eq!(pair, (1.0, 2.0));
        assert_eq!(*seen.borrow(), [false, true, false, false, true]);
        assert!(LEVER.get());

        LEVER.set(false);
        let pair = time_switch(&LEVER, |flip| {
            flip(true);
            Ok((1.0, 2.0))
        })
        .unwrap();
        assert_eq!(pair, (2.0, 1.0), "off by default: as-is is off");
        assert!(!LEVER.get());

        LEVER.set(true);
        let err = time_switch(&LEVER, |flip| {
            flip(false);
            // The lever gives up in the middle of its own round.
            LEVER.set(false);
            flip(true);
            flip(false);
            Ok((1.0, 2.0))
        })
        .unwrap_err();
        assert!(format!("{err}").contains("RECYCLE_TEST_AB_LEVER"), "{err}");
        assert!(!LEVER.get());
    }
}
