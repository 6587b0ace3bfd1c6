//! The op-by-op profile of a training step and the dense layers' products alone.

use super::*;

/// The ops of a roberta-base-shaped training step, one at a time at the bench's batch and
/// sequence length: seconds of the forward alone and of forward + backward (the output's gradient
/// seeded with ones), the device drained around each, and how many times a step runs the op. Weights
/// are f32 `Var`s cast to the compute dtype inside the op, as `model::casting` does; activations are
/// `Var`s of the compute dtype. Σ count × forward+backward against the measured step says how much
/// of the step the list covers, and the largest products say where the time goes.
pub(super) fn profile_ops(args: &Args, precision: Precision, device: &Device) -> Result<()> {
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
pub(super) fn profile_products(args: &Args, precision: Precision, device: &Device) -> Result<()> {
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
