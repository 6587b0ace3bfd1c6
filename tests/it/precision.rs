//! bf16 mixed precision on the CPU (candle's CPU backend has bf16), which is how it is tested
//! without a GPU: logits and AdamW steps of the tiny parity fixtures against transformers' f32
//! references, with f32 master weights and gradients throughout.

use candle_core::{DType, Device, Tensor};
use recycle::model::{self, LoadOptions, LoadedModel, Mode, Precision};

use super::models::{batch, expected, fixture, loss, max_abs, optimizer_fixture, options};

const CASES: &[&str] = &[
    "bert",
    "bert_regression",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "deberta-v3",
    "deberta-v2",
];

/// bf16 keeps 8 significant bits: one rounding is off by at most 2^-9 relatively. A logit of the
/// two-layer fixtures goes through about a dozen roundings in sequence (embeddings, each matmul's
/// inputs, the casts after LayerNorm and softmax), whose errors partly cancel in the dot
/// products; 2^-5 of the logits' scale bounds that with room, and is still far below the
/// differences the f32 parity tests catch in a wrong layer (those move logits by O(scale)).
const BF16_REL_TOL: f32 = 1.0 / 32.0;

fn load(case: &str, precision: Precision) -> LoadedModel {
    let opts = LoadOptions {
        precision,
        ..options(case, 0)
    };
    model::load(&fixture(case), &opts, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a - b).unwrap())
}

fn master_dtypes(m: &LoadedModel) -> Vec<(String, DType)> {
    m.varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dtype()))
        .collect()
}

#[test]
fn bf16_logits_are_close_to_transformers_f32_logits() {
    for case in CASES {
        let exp = expected(case);
        let b = batch(case, &exp);
        let m = load(case, Precision::Bf16);
        let want = &exp["logits"];
        let scale = max_abs(want).max(1.0);
        for (what, logits) in [
            (
                "train-graph model",
                m.model.forward(&b, Mode::Eval).unwrap(),
            ),
            (
                "inference model",
                m.inference_model()
                    .unwrap()
                    .forward(&b, Mode::Eval)
                    .unwrap(),
            ),
        ] {
            assert_eq!(logits.dtype(), DType::F32, "{case}: logits are f32");
            let d = max_abs_diff(&logits, want);
            assert!(
                d <= BF16_REL_TOL * scale,
                "{case} {what}: bf16 logits differ by {d} (scale {scale})"
            );
            // The bf16 path really ran: exact f32 agreement would mean nothing was rounded.
            assert!(d > 0.0, "{case} {what}: bf16 logits equal f32 exactly");
        }
        let f32_logits = load(case, Precision::F32)
            .model
            .forward(&b, Mode::Eval)
            .unwrap();
        assert!(max_abs_diff(&f32_logits, want) < 1e-4);
        for (name, dtype) in master_dtypes(&m) {
            assert_eq!(
                dtype,
                DType::F32,
                "{case}: master weight {name} is {dtype:?}"
            );
        }
    }
}

/// Five AdamW steps computed in bf16: gradients reach the f32 master weights in f32, the loss
/// falls, and the logits after the steps match transformers' f32 run within bf16's tolerance.
#[test]
fn bf16_training_steps_update_f32_master_weights_like_transformers() {
    use recycle::train::optim::{clip_grad_norm, decays, AdamW, Kernel};
    use recycle::train::schedule::lr_at;
    for case in CASES {
        let exp = expected(case);
        let m = load(case, Precision::Bf16);
        let b = batch(case, &exp);
        let fixture = optimizer_fixture(case);
        let (hp, steps) = (fixture.adamw, fixture.lr_per_step.len());
        let mut opt = AdamW::new(&m.varmap, hp, decays, Kernel::Auto).unwrap();
        let first_loss: f32 = loss(case, &m.model.forward(&b, Mode::Eval).unwrap(), &exp)
            .to_scalar()
            .unwrap();
        for step in 0..steps {
            let logits = m.model.forward(&b, Mode::Eval).unwrap();
            let l = loss(case, &logits, &exp);
            assert_eq!(l.dtype(), DType::F32, "{case}: the loss is f32");
            let grads = l.backward().unwrap();
            let mut gs = opt.gradients(&grads);
            assert!(
                gs.iter().flatten().all(|g| g.dtype() == DType::F32),
                "{case}: gradients of the master weights are f32"
            );
            assert!(
                gs.iter().filter(|g| g.is_some()).count() > opt.vars().count() / 2,
                "{case}: most weights get a gradient through the bf16 casts"
            );
            clip_grad_norm(&mut gs, fixture.grad_clip_max_norm).unwrap();
            opt.step(&gs, lr_at(step, steps, 1, fixture.lr), 1.0)
                .unwrap();
        }
        let after = m.model.forward(&b, Mode::Eval).unwrap();
        let last_loss: f32 = loss(case, &after, &exp).to_scalar().unwrap();
        assert!(
            last_loss < first_loss,
            "{case}: bf16 steps did not lower the loss ({first_loss} → {last_loss})"
        );
        let want = &exp["logits_after_adamw"];
        let d = max_abs_diff(&after, want);
        assert!(
            d <= BF16_REL_TOL * max_abs(want).max(1.0),
            "{case}: logits after 5 bf16 steps differ by {d}"
        );
        for (name, dtype) in master_dtypes(&m) {
            assert_eq!(
                dtype,
                DType::F32,
                "{case}: master weight {name} is {dtype:?}"
            );
        }
    }
}

/// Mixed precision as training runs it on a GPU, here on the CPU: block nodes and the embedding
/// node with a gradient sink in scope. The first step casts every master; from the second on, the
/// masters the nodes took from the sink (every encoder layer's weight and the embedding tables,
/// nothing else) are handed over uncast (`model::casting`), and the step (same weights, same
/// batch) gives the same loss and every master the same gradient, bit for bit. With the hand-over
/// turned off, every master is cast again, and still the same.
#[test]
fn bf16_nodes_take_their_masters_uncast_after_the_first_step_with_the_same_gradients() {
    use recycle::model::grad_sink::GradSink;
    use recycle::model::{casting, ops};
    ops::set_blocks_on_cpu(true);
    // DeBERTa's layers are not block nodes (its attention is disentangled): only its embedding
    // tables go to the sink.
    for case in ["bert", "roberta", "distilbert", "deberta-v3", "deberta-v2"] {
        let exp = expected(case);
        let m = load(case, Precision::Bf16);
        let b = batch(case, &exp);
        let sink = GradSink::new(&m.varmap).unwrap();
        let blocks = !case.starts_with("deberta");
        let vars: Vec<(String, candle_core::Var)> = {
            let data = m.varmap.data().lock().unwrap();
            let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let n = vars.len();
        let step = || {
            let logits = sink.scope(|| m.model.forward(&b, Mode::Eval)).unwrap();
            let built = casting::last_build();
            let l = loss(case, &logits, &exp);
            let grads = sink.backward(&l).unwrap();
            let named: Vec<(String, Vec<u32>)> = vars
                .iter()
                .map(|(name, var)| {
                    let g = grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
                    assert_eq!(g.dtype(), DType::F32, "{case}: {name}'s gradient");
                    let bits = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    (name.clone(), bits.iter().map(|x| x.to_bits()).collect())
                })
                .collect();
            (l.to_scalar::<f32>().unwrap().to_bits(), named, built)
        };
        let (loss1, grads1, built1) = step();
        assert_eq!(
            built1,
            (n, 0),
            "{case}: the first forward casts every master"
        );
        let claimed: Vec<&str> = vars
            .iter()
            .filter(|(_, v)| sink.claimed(v.as_tensor()))
            .map(|(name, _)| name.as_str())
            .collect();
        let expected_claimed: Vec<&str> = vars
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| {
                (blocks && name.contains(".layer."))
                    || (name.contains(".embeddings.") && name.ends_with("_embeddings.weight"))
            })
            .collect();
        eprintln!("{case}: {} of {n} masters uncast", expected_claimed.len());
        assert_eq!(claimed, expected_claimed, "{case}: masters the nodes took");
        let k = claimed.len();
        let (loss2, grads2, built2) = step();
        assert_eq!(built2, (n - k, k), "{case}: the second forward");
        assert_eq!(loss2, loss1, "{case}: the loss moved");
        for ((name, a), (_, b)) in grads1.iter().zip(&grads2) {
            assert!(
                a == b,
                "{case}: {name}'s gradient changed with its master uncast"
            );
        }
        casting::set_uncast_claimed(false);
        let (loss3, grads3, built3) = step();
        casting::set_uncast_claimed(true);
        assert_eq!(built3, (n, 0), "{case}: with the hand-over off");
        assert_eq!(loss3, loss1);
        assert!(grads3 == grads1, "{case}: gradients with every master cast");
    }
    ops::set_blocks_on_cpu(false);
}

/// The encoder's block nodes as one stack node (`kernels::stack`), as training runs them on a GPU,
/// here on the CPU: the same loss and every master's gradient, bit for bit, as with a graph node
/// per block, in bf16 and f32, without and with dropout (the same seeds); the stack holds every
/// block (two a layer) when on and none when off.
#[test]
fn stacked_block_nodes_give_the_same_gradients_as_a_node_per_block() {
    use recycle::model::grad_sink::GradSink;
    use recycle::model::kernels::{attention_node, block_node, stack};
    use recycle::model::ops;
    ops::set_blocks_on_cpu(true);
    // With the blocks' tails in one pass too (`Prims::dropout_add_norm`, which the stacked blocks
    // take where the device has it; here its composed test form): the same bits again.
    for (case, one_pass) in ["bert", "roberta", "distilbert"]
        .into_iter()
        .flat_map(|c| [(c, false), (c, true)])
    {
        attention_node::set_add_norm_on_cpu(one_pass);
        for precision in [Precision::Bf16, Precision::F32] {
            let exp = expected(case);
            let m = load(case, precision);
            let b = batch(case, &exp);
            let sink = GradSink::new(&m.varmap).unwrap();
            let vars: Vec<(String, candle_core::Var)> = {
                let data = m.varmap.data().lock().unwrap();
                let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            for mode in [Mode::Eval, Mode::Train] {
                let step = |on: bool| {
                    stack::set_stack(on);
                    ops::seed(&Device::Cpu, 11).unwrap();
                    let logits = sink.scope(|| m.model.forward(&b, mode)).unwrap();
                    let stacked = stack::last_stack_len();
                    let l = loss(case, &logits, &exp);
                    let grads = sink.backward(&l).unwrap();
                    stack::set_stack(true);
                    let bits: Vec<(String, Vec<u32>)> = vars
                        .iter()
                        .map(|(name, var)| {
                            let g = grads
                                .get(var.as_tensor())
                                .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
                            let v = g.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                            let v = v.to_vec1::<f32>().unwrap();
                            (name.clone(), v.iter().map(|x| x.to_bits()).collect())
                        })
                        .collect();
                    (l.to_scalar::<f32>().unwrap().to_bits(), bits, stacked)
                };
                let at = format!("{case} {precision:?} {mode:?}, tails in one pass {one_pass}");
                let (loss_off, grads_off, stacked_off) = step(false);
                let tails_before = block_node::tail_one_pass_runs();
                let (loss_on, grads_on, stacked_on) = step(true);
                let tails = block_node::tail_one_pass_runs() - tails_before;
                assert_eq!(
                    tails,
                    if one_pass { stacked_on } else { 0 },
                    "{at}: block tails run in one pass"
                );
                assert_eq!(stacked_off, 0, "{at}: a stack with the stack off");
                let layers = vars
                    .iter()
                    .filter(|(n, _)| {
                        n.ends_with("attention.output.LayerNorm.weight")
                            || n.ends_with("sa_layer_norm.weight")
                    })
                    .count();
                assert!(layers > 0, "{at}: no layers found among the weights");
                assert_eq!(stacked_on, 2 * layers, "{at}: blocks in the stack");
                assert_eq!(loss_on, loss_off, "{at}: the loss moved");
                for ((name, a), (_, b)) in grads_off.iter().zip(&grads_on) {
                    assert!(a == b, "{at}: {name}'s gradient changed in the stack");
                }
            }
        }
    }
    attention_node::set_add_norm_on_cpu(false);
    ops::set_blocks_on_cpu(false);
}
