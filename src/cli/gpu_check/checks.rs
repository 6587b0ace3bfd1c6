//! The checks: CUDA against the CPU on the parity fixtures, and each graph node and lever of the
//! kernels against its reference on the device, one PASS/FAIL row per comparison.

use super::*;

/// What one AdamW step on a fixture gives, for comparison across devices.
struct Step {
    /// Logits before the step (training graph), from the inference model, and after the step.
    logits: [Tensor; 3],
    /// The loss's gradient for each parameter, by name, as f32 on the CPU.
    grads: NamedGrads,
}

/// Each parameter's gradient by name, f32 on the CPU, in name order.
type NamedGrads = Vec<(String, Tensor)>;

/// The gradients `grads` holds for `varmap`'s variables, by name (`NamedGrads`).
fn named_grads(varmap: &VarMap, grads: &candle_core::backprop::GradStore) -> Result<NamedGrads> {
    let mut named = Vec::new();
    for (name, var) in varmap
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
    Ok(named)
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
    let opts = load_options(3, precision);
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
    let named = named_grads(&m.varmap, &grads)?;
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

/// Device against CPU f32 on each fixture; returns whether every check passed. Each case and
/// precision is reported on its own: an error in one (a gradient the device did not give, say)
/// is an error line, and the others still run.
pub(super) fn parity(args: &Args, device: &Device) -> bool {
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
        let reference =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
                .with_context(|| format!("{}/expected.safetensors", dir.display()))
                .and_then(|exp| {
                    let cpu = one_step(case, &dir, &exp, Precision::F32, &Device::Cpu)?;
                    Ok((exp, cpu))
                });
        let Some((exp, cpu)) = reported(
            reference,
            json!({"stage": "parity", "case": case, "precision": "cpu reference"}),
        ) else {
            ok = false;
            continue;
        };
        for precision in [Precision::F32, Precision::Bf16] {
            let checked = one_step(case, &dir, &exp, precision, device)
                .and_then(|step| compare_step(case, precision, device, &step, &cpu));
            ok &= reported(
                checked,
                json!({"stage": "parity", "case": case, "precision": precision.as_str()}),
            )
            .unwrap_or(false);
        }
        eprintln!("gpu-check: parity {case} done");
    }
    ok
}

/// One case's step on the device against the CPU's: a `parity` line for the gradients and for
/// each of the three logits; whether all passed.
fn compare_step(
    case: &str,
    precision: Precision,
    device: &Device,
    step: &Step,
    cpu: &Step,
) -> Result<bool> {
    let mut ok = true;
    let [cpu_before, _, cpu_after] = &cpu.logits;
    let [before, inference, after] = &step.logits;
    // Gradients, against the largest CPU gradient: f32 to reduction order, bf16 to its 8 bits.
    // (The logits after one AdamW step barely see a gradient's size: the first update is about
    // lr · sign(g).)
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
    Ok(ok)
}

/// Dropout on the device, checked by its properties (the devices draw different masks): about `p`
/// of the elements dropped, the backward applying the forward's mask (`y = x · dy/dx`, every
/// `dy/dx` either 0 or `1/(1-p)`), the same mask again after re-seeding, and a new one on the next
/// call.
pub(super) fn dropout_check(device: &Device) -> Result<bool> {
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
pub(super) fn dense_check(device: &Device) -> Result<DenseChecked> {
    use crate::model::kernels::attention_node::CpuPrims;
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return dense_rows(device, &crate::model::kernels::cuda::CudaPrims);
    }
    dense_rows(device, &CpuPrims)
}

/// Which of `dense_check`'s rows passed: GELU's backward in the epilogue can be turned off alone.
#[derive(Debug, Clone, Copy)]
pub(super) struct DenseChecked {
    /// Every row but GELU's.
    pub(super) products: bool,
    /// GELU's backward applied to `dy·W`.
    pub(super) gelu: bool,
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

/// The encoder's layers as one stack node (`kernels::stack`, with the one-pass tail it brings)
/// against a node per block, on the device, at a width the packed kernels take (hidden 256, 2
/// layers): the logits of a forward through the gradient sink, and every gradient, f32 and bf16.
/// The two sides run the same kernels (the tail's one pass gives the two kernels' bits), so the
/// tolerances only allow for atomics' order. A stack that did not run fails its row. Why a check
/// of its own (session 18): the stack's CUDA forward handed over the first half of the tail's
/// shared `[s | y]` buffer, the residual sum, where the layer norm's output was meant; the
/// fixtures' parity rows are too narrow for the one-pass tail, and the CPU's form of the stack
/// copies views right.
pub(super) fn stack_check(device: &Device) -> Result<bool> {
    use crate::model::kernels::stack;
    let shape = Shape {
        name: "stack check".into(),
        model_type: "roberta",
        vocab: 500,
        hidden: 256,
        layers: 2,
        heads: 4,
        intermediate: 1024,
    };
    let tmp = tempfile::tempdir()?;
    write_random_checkpoint(&shape, tmp.path())?;
    let (b, seq) = (4, 24);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let ids: Vec<u32> = (0..b * seq).map(|_| rng.random_range(5..500)).collect();
    // Two rows padded, so that the mask matters too.
    let mask: Vec<u32> = (0..b * seq)
        .map(|i| u32::from(i / seq < 2 || i % seq < seq - 5))
        .collect();
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (b, seq), device)?,
        attention_mask: Tensor::from_vec(mask, (b, seq), device)?,
        token_type_ids: None,
    };
    let labels = Tensor::from_vec(vec![0u32, 1, 1, 0], b, device)?;
    let was = stack::stack_on();
    let mut ok = true;
    for precision in [Precision::F32, Precision::Bf16] {
        let opts = load_options(2, precision);
        let m = model::load(tmp.path(), &opts, device)?;
        let sink = GradSink::new(&m.varmap)?;
        let run = |stacked: bool| -> Result<(Tensor, NamedGrads, usize)> {
            stack::set_stack(stacked);
            let logits = sink.scope(|| m.model.forward(&batch, Mode::Eval))?;
            let stacked_blocks = stack::last_stack_len();
            let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &labels)?;
            let grads = sink.backward(&loss)?;
            Ok((logits, named_grads(&m.varmap, &grads)?, stacked_blocks))
        };
        let compared = (|| -> Result<(f32, f32, String, usize)> {
            let (plain, plain_grads, _) = run(false)?;
            let (stacked, stacked_grads, blocks) = run(true)?;
            let scale = max_abs(&plain)?.max(1.0);
            let logits = max_abs_diff(&stacked, &plain)? / scale;
            let (grads, worst) = grad_diff(&stacked_grads, &plain_grads)?;
            Ok((logits, grads, worst, blocks))
        })();
        stack::set_stack(was);
        let (logits, grads, worst, blocks) = compared?;
        let tol = match precision {
            Precision::F32 => 1e-5,
            Precision::Bf16 => 1.0 / 128.0,
        };
        // Where the device takes block nodes (CUDA; the CPU for a test thread that asked), the
        // stack must have held every block (two a layer).
        let probe = Tensor::zeros(1, precision.compute_dtype(), device)?;
        let ran = !ops::blocks_expected(&probe) || blocks == 2 * shape.layers;
        for (what, value, pass) in [
            (
                "logits, stacked against a node per block",
                logits,
                within(logits, tol),
            ),
            (
                "gradients, stacked against a node per block",
                grads,
                within(grads, tol),
            ),
            (
                "the stack ran over every layer",
                f32::from(u8::from(!ran)),
                ran,
            ),
        ] {
            ok &= pass;
            let mut line = check_line("stack", precision.as_str(), what, device, value, tol, pass);
            if what.starts_with("gradients") {
                line["worst"] = json!(worst);
            }
            emit(line);
        }
    }
    eprintln!("gpu-check: stack checks done");
    Ok(ok)
}

/// The block nodes' tail in one pass (`Prims::dropout_add_norm`, CUDA only: elsewhere no device
/// has one) against the residual's dropout and add and then the layer norm, on the device, in f32
/// and bf16, with dropout and without: the same bits (`s` and `y`), so the tolerance is 0. A
/// shape the one pass should take that it declines fails its row.
pub(super) fn tail_check(device: &Device) -> Result<bool> {
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
pub(super) fn attention_node_check(device: &Device) -> Result<bool> {
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

pub(super) fn block_node_check(device: &Device) -> Result<bool> {
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
pub(super) fn split_check(device: &Device, parts: usize) -> Result<bool> {
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
pub(super) fn flash_check(device: &Device) -> Result<bool> {
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
pub(super) fn optimizer_check(device: &Device) -> Result<bool> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// With the block nodes and the one-pass tail on the CPU (the test hooks), the stack runs
    /// over both layers and its logits and gradients are a node per block's: the check passes
    /// where the stack is right, so on a GPU a failure is the device's.
    #[test]
    fn the_stack_check_passes_where_the_stack_runs_right() {
        ops::set_blocks_on_cpu(true);
        attn::set_add_norm_on_cpu(true);
        let passed = stack_check(&Device::Cpu);
        let tails = crate::model::kernels::block_node::tail_one_pass_runs();
        ops::set_blocks_on_cpu(false);
        attn::set_add_norm_on_cpu(false);
        assert!(passed.unwrap(), "the stack check failed on the CPU");
        // The stacked side's tails ran in one pass: 2 layers × 2 blocks, f32 and bf16.
        assert_eq!(tails, 8);
    }
}
