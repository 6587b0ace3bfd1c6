//! Parity of the encoders with transformers (fixtures from scripts/parity/make_fixtures.py), gradient
//! flow, checkpoint round trips and the differentiable ops.

use candle_core::{DType, Device, Tensor, Var, D};
use recycle::model::grad_sink::GradSink;
use recycle::model::{self, ops, Batch, LoadOptions, LoadedModel, Mode, Problem};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

const CASES: &[&str] = &[
    "bert",
    "bert_regression",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "deberta-v3",
    "deberta-v2",
];

pub fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(case)
}

pub fn expected(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(case).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn is_regression(case: &str) -> bool {
    case.ends_with("regression")
}

pub fn options(case: &str, seed: u64) -> LoadOptions {
    let regression = is_regression(case);
    LoadOptions {
        num_labels: if regression { 1 } else { 3 },
        problem: if regression {
            Problem::Regression
        } else {
            Problem::SingleLabel
        },
        seed,
        precision: recycle::model::Precision::F32,
        hidden_dropout: None,
    }
}

fn load(case: &str) -> LoadedModel {
    model::load(&fixture(case), &options(case, 0), &Device::Cpu).unwrap()
}

/// The fixture's padded batch; token types only where the reference model was given them.
pub fn batch(case: &str, exp: &HashMap<String, Tensor>) -> Batch {
    let ids = |n: &str| exp[n].to_dtype(DType::U32).unwrap();
    Batch {
        input_ids: ids("input_ids"),
        attention_mask: ids("attention_mask"),
        token_type_ids: (case.starts_with("bert") || case.starts_with("deberta"))
            .then(|| ids("token_type_ids")),
    }
}

pub fn loss(case: &str, logits: &Tensor, exp: &HashMap<String, Tensor>) -> Tensor {
    let problem = options(case, 0).problem;
    let labels = match problem {
        Problem::Regression => exp["labels"].to_dtype(DType::F32).unwrap(),
        Problem::SingleLabel => exp["labels"].to_dtype(DType::U32).unwrap(),
    };
    problem.loss(logits, &labels).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn var(loaded: &LoadedModel, name: &str) -> Var {
    loaded
        .varmap
        .data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no var {name}"))
        .clone()
}

#[test]
fn logits_match_transformers() {
    for case in CASES {
        let exp = expected(case);
        let loaded = load(case);
        assert!(
            loaded.fresh_params.is_empty(),
            "{case}: fresh {:?}",
            loaded.fresh_params
        );
        let logits = loaded
            .model
            .forward(&batch(case, &exp), Mode::Eval)
            .unwrap();
        let d = max_abs_diff(&logits, &exp["logits"]);
        assert!(d < 1e-4, "{case}: logits differ by {d}");
        // The reference logits are not trivially small, so the comparison means something.
        assert!(
            max_abs(&exp["logits"]) > 0.05,
            "{case}: reference logits are near zero"
        );
    }
}

/// `b` with `extra` more masked columns of token `pad` (CUDA pads training batches to a multiple
/// of 8 or 16 tokens, `ops::train_pad_multiple`).
fn padded_wider(b: &Batch, extra: usize, pad: u32) -> Batch {
    let wider = |t: &Tensor, value: u32| {
        let rows = t.dim(0).unwrap();
        let more = Tensor::full(value, (rows, extra), t.device()).unwrap();
        Tensor::cat(&[t, &more], 1).unwrap()
    };
    Batch {
        input_ids: wider(&b.input_ids, pad),
        attention_mask: wider(&b.attention_mask, 0),
        token_type_ids: b.token_type_ids.as_ref().map(|t| wider(t, 0)),
    }
}

/// Extra masked padding changes no logit: every encoder masks the padded keys and pools over
/// real tokens only, so padding a batch wider is free to do for a kernel's sake.
#[test]
fn wider_padding_leaves_the_logits_as_they_are() {
    for case in CASES {
        let exp = expected(case);
        let loaded = load(case);
        let b = batch(case, &exp);
        let logits = loaded.model.forward(&b, Mode::Eval).unwrap();
        // The fixtures' models have 16 positions, roberta's first two taken by its padding offset.
        let room = 14 - b.input_ids.dim(1).unwrap();
        assert!(
            room >= 2,
            "{case}: the fixture's batch leaves no room to pad"
        );
        for (extra, pad) in [(1, 0), (room, 1), (room / 2, 3)] {
            let wide = padded_wider(&b, extra, pad);
            let wider_logits = loaded.model.forward(&wide, Mode::Eval).unwrap();
            let d = max_abs_diff(&wider_logits, &logits);
            assert!(
                d < 1e-5,
                "{case}: {extra} more padded columns moved the logits by {d}"
            );
        }
    }
}

/// The fixture's loss and every gradient it names against transformers' (within 1e-4).
fn check_loss_and_gradients(case: &str) {
    check_gradients_via(case, false);
}

/// `check_loss_and_gradients`, with `with_sink` the forward run with a gradient sink over the
/// model's `Var`s in scope and the gradients taken as training takes them: candle's backward, then
/// the sink's deposits added in. The block nodes must then have used it: the graph alone lacks
/// some fixture gradient.
fn check_gradients_via(case: &str, with_sink: bool) {
    let exp = expected(case);
    let loaded = load(case);
    let sink = with_sink.then(|| GradSink::new(&loaded.varmap).unwrap());
    let sink = sink.as_ref();
    let forward = || loaded.model.forward(&batch(case, &exp), Mode::Eval);
    let logits = match sink {
        Some(sink) => sink.scope(forward),
        None => forward(),
    }
    .unwrap();
    let l = loss(case, &logits, &exp);
    let want: f32 = exp["loss"].squeeze(0).unwrap().to_scalar().unwrap();
    let got: f32 = l.to_scalar().unwrap();
    assert!(
        (got - want).abs() <= 1e-4 * want.abs(),
        "{case}: loss {got} vs {want}"
    );
    let mut grads = l.backward().unwrap();
    if let Some(sink) = sink {
        let names: Vec<&str> = exp.keys().filter_map(|k| k.strip_prefix("grad.")).collect();
        let missing = names
            .iter()
            .filter(|n| grads.get(var(&loaded, n).as_tensor()).is_none())
            .count();
        assert!(
            missing > 0 && sink.pending() > 0,
            "{case}: no gradient went through the sink"
        );
        sink.drain_into(&mut grads).unwrap();
        assert_eq!(sink.pending(), 0);
    }
    let mut checked = 0;
    for (key, want) in exp.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let g = grads
            .get(var(&loaded, name).as_tensor())
            .unwrap_or_else(|| panic!("{case}: no grad for {name}"));
        let rel = max_abs_diff(g, want) / max_abs(want);
        assert!(
            rel < 1e-4,
            "{case}: gradient of {name} differs by {rel} (relative)"
        );
        checked += 1;
    }
    assert!(
        checked >= 4,
        "{case}: the fixture names at least four gradients"
    );
}

#[test]
fn loss_and_gradients_match_transformers() {
    for case in CASES {
        check_loss_and_gradients(case);
    }
}

/// The residual blocks as single nodes (what trains on CUDA), run here on the CPU: the encoders
/// that use them give transformers' loss and gradients, and they did use them (two per layer).
#[test]
fn block_nodes_give_transformers_gradients() {
    ops::set_blocks_on_cpu(true);
    for case in [
        "bert",
        "bert_regression",
        "roberta",
        "xlm-roberta",
        "distilbert",
    ] {
        let before = ops::block_nodes_made();
        check_loss_and_gradients(case);
        let config = load(case).config;
        let layers = config["num_hidden_layers"]
            .as_u64()
            .or_else(|| config["n_layers"].as_u64())
            .unwrap() as usize;
        assert_eq!(
            ops::block_nodes_made() - before,
            2 * layers,
            "{case}: the forward made two block nodes per layer"
        );
    }
    ops::set_blocks_on_cpu(false);
}

/// The block nodes as training runs them: their weights' gradients deposited in a gradient sink
/// instead of flowing back through the graph, and still transformers' gradients.
#[test]
fn block_nodes_through_a_grad_sink_give_transformers_gradients() {
    ops::set_blocks_on_cpu(true);
    for case in ["bert", "roberta", "distilbert"] {
        check_gradients_via(case, true);
    }
    ops::set_blocks_on_cpu(false);
}

/// In training mode the block nodes drop out (their output moves away from the eval mode's, and
/// not with p = 0), and in a whole model they give every parameter a finite gradient.
#[test]
fn block_nodes_drop_out_in_training_mode() {
    use recycle::model::kernels::block_node::{AttentionParams, Dense, FfnParams, Norm};
    ops::set_blocks_on_cpu(true);
    let dev = Device::Cpu;
    let var = |dims: &[usize], std: f64| {
        Var::from_tensor(&Tensor::randn(0f32, std as f32, dims, &dev).unwrap()).unwrap()
    };
    let (h, i) = (16, 32);
    let x = var(&[2, 5, h], 1.0);
    let p: Vec<Var> = [
        &[h, h][..],
        &[h],
        &[h, h],
        &[h],
        &[h, h],
        &[h],
        &[h, h],
        &[h],
        &[i, h],
        &[i],
        &[h, i],
    ]
    .iter()
    .map(|d| var(d, 0.3))
    .collect();
    let (ones, zeros) = (
        Tensor::ones(h, DType::F32, &dev).unwrap(),
        Tensor::zeros(h, DType::F32, &dev).unwrap(),
    );
    let t = |k: usize| p[k].as_tensor();
    let d = |k: usize| Dense {
        w: t(k),
        b: t(k + 1),
    };
    let norm = Norm {
        w: &ones,
        b: &zeros,
        eps: 1e-5,
    };
    let attention = AttentionParams {
        q: d(0),
        k: d(2),
        v: d(4),
        out: d(6),
        norm,
        heads: 2,
    };
    let ffn = FfnParams {
        up: d(8),
        down: Dense { w: t(10), b: t(7) },
        norm,
    };
    let bias =
        ops::attention_bias(&Tensor::ones((2, 5), DType::U32, &dev).unwrap(), DType::F32).unwrap();
    let x = x.as_tensor();
    let run_attention = |p_attn: f32, p_out: f32, mode: Mode| {
        ops::attention_block(x, &bias, &attention, p_attn, p_out, mode)
            .unwrap()
            .expect("a block node")
    };
    let run_ffn = |p: f32, mode: Mode| {
        ops::ffn_block(x, &ffn, p, mode)
            .unwrap()
            .expect("a block node")
    };
    let moved = |a: &Tensor, b: &Tensor| max_abs_diff(a, b) / max_abs(b);
    let eval = run_attention(0.3, 0.3, Mode::Eval);
    assert_eq!(moved(&run_attention(0.0, 0.0, Mode::Train), &eval), 0.0);
    assert!(moved(&run_attention(0.3, 0.0, Mode::Train), &eval) > 1e-3);
    assert!(moved(&run_attention(0.0, 0.3, Mode::Train), &eval) > 1e-3);
    let eval = run_ffn(0.3, Mode::Eval);
    assert_eq!(moved(&run_ffn(0.0, Mode::Train), &eval), 0.0);
    assert!(moved(&run_ffn(0.3, Mode::Train), &eval) > 1e-3);

    for case in ["bert", "distilbert"] {
        let exp = expected(case);
        let loaded = load(case);
        let before = ops::block_nodes_made();
        let train = loaded
            .model
            .forward(&batch(case, &exp), Mode::Train)
            .unwrap();
        assert!(
            ops::block_nodes_made() - before >= 4,
            "{case}: no block nodes"
        );
        let grads = loss(case, &train, &exp).backward().unwrap();
        for (name, v) in loaded.varmap.data().lock().unwrap().iter() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
            let sum: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(sum.is_finite(), "{case}: gradient of {name} is not finite");
        }
    }
    ops::set_blocks_on_cpu(false);
}

#[test]
fn every_parameter_gets_a_gradient() {
    for case in CASES {
        let exp = expected(case);
        let loaded = load(case);
        let logits = loaded
            .model
            .forward(&batch(case, &exp), Mode::Train)
            .unwrap();
        let grads = loss(case, &logits, &exp).backward().unwrap();
        let data = loaded.varmap.data().lock().unwrap();
        assert!(data.len() > 20, "{case}: only {} parameters", data.len());
        for (name, v) in data.iter() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{case}: {name} has no gradient"));
            assert!(max_abs(g) > 0.0, "{case}: {name} has a zero gradient");
        }
    }
}

/// The reference optimizer of a fixture, from its optimizer.json.
pub struct OptimizerFixture {
    pub adamw: recycle::train::optim::AdamWParams,
    /// The peak learning rate of the schedule.
    pub lr: f64,
    /// The learning rate torch used at each step.
    pub lr_per_step: Vec<f64>,
    pub grad_clip_max_norm: f64,
    /// Parameters torch left out of weight decay.
    pub no_decay: BTreeSet<String>,
}

pub fn optimizer_fixture(case: &str) -> OptimizerFixture {
    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(case).join("optimizer.json")).unwrap(),
    )
    .unwrap();
    let f = |k: &str| settings[k].as_f64().unwrap();
    OptimizerFixture {
        adamw: recycle::train::optim::AdamWParams {
            beta1: settings["betas"][0].as_f64().unwrap(),
            beta2: settings["betas"][1].as_f64().unwrap(),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        },
        lr: f("lr"),
        lr_per_step: settings["lr_per_step"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect(),
        grad_clip_max_norm: f("grad_clip_max_norm"),
        no_decay: settings["no_decay_params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
    }
}

/// torch.optim.AdamW with the fixture's settings (optimizer.json), written out step by step.
fn adamw_steps(case: &str, loaded: &LoadedModel, b: &Batch, exp: &HashMap<String, Tensor>) {
    let opt = optimizer_fixture(case);
    let (wd, eps, max_norm) = (
        opt.adamw.weight_decay,
        opt.adamw.eps,
        opt.grad_clip_max_norm,
    );
    let (b1, b2) = (opt.adamw.beta1, opt.adamw.beta2);
    let lrs = opt.lr_per_step;
    let decay = loaded.decay_mask().unwrap();
    let vars: Vec<(String, Var)> = loaded
        .varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut m: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().zeros_like().unwrap())
        .collect();
    let mut s = m.clone();
    for (step, lr) in lrs.iter().enumerate() {
        let t = (step + 1) as i32;
        let logits = loaded.model.forward(b, Mode::Eval).unwrap();
        let grads = loss(case, &logits, exp).backward().unwrap();
        let gs: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
            .collect();
        let total: f32 = gs
            .iter()
            .map(|g| {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum::<f32>()
            .sqrt();
        let coef = (max_norm / (f64::from(total) + 1e-6)).min(1.0);
        for (i, (name, v)) in vars.iter().enumerate() {
            let g = (&gs[i] * coef).unwrap();
            let mut p = v.as_tensor().detach();
            if decay.contains(name) {
                p = (p * (1.0 - lr * wd)).unwrap();
            }
            m[i] = ((&m[i] * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap();
            s[i] = ((&s[i] * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let denom =
                ((s[i].sqrt().unwrap() / (1.0 - b2.powi(t)).sqrt()).unwrap() + eps).unwrap();
            let update = ((&m[i] / denom).unwrap() * (lr / (1.0 - b1.powi(t)))).unwrap();
            v.set(&(p - update).unwrap()).unwrap();
        }
    }
}

#[test]
fn five_adamw_steps_match_transformers() {
    for case in CASES {
        let exp = expected(case);
        let loaded = load(case);
        let b = batch(case, &exp);
        let before = loaded.model.forward(&b, Mode::Eval).unwrap();
        adamw_steps(case, &loaded, &b, &exp);
        let after = loaded.model.forward(&b, Mode::Eval).unwrap();
        let want = &exp["logits_after_adamw"];
        let d = max_abs_diff(&after, want);
        assert!(d < 1e-4, "{case}: logits after 5 AdamW steps differ by {d}");
        assert!(
            max_abs_diff(&before, want) > 1e-3,
            "{case}: the steps did not move the logits"
        );
    }
}

/// The same 5 steps through the crate's own training step: `train::optim::AdamW` (fused CPU
/// kernel), `clip_grad_norm`, the linear warm-up schedule and the decay rule the loop uses.
#[test]
fn five_steps_of_the_training_optimizer_match_transformers() {
    use recycle::train::optim::{clip_grad_norm, decays, AdamW, Kernel};
    use recycle::train::schedule::lr_at;
    for case in CASES {
        let exp = expected(case);
        let loaded = load(case);
        let b = batch(case, &exp);
        let fixture = optimizer_fixture(case);
        let (hp, lrs) = (fixture.adamw, fixture.lr_per_step);
        let mut opt = AdamW::new(&loaded.varmap, hp, decays, Kernel::Auto).unwrap();
        for (step, want_lr) in lrs.iter().enumerate() {
            let lr = lr_at(step, lrs.len(), 1, fixture.lr);
            assert!(
                (lr - want_lr).abs() < 1e-12,
                "{case}: step {step}: lr {lr} vs {want_lr}"
            );
            let logits = loaded.model.forward(&b, Mode::Eval).unwrap();
            let grads = loss(case, &logits, &exp).backward().unwrap();
            let mut gs = opt.gradients(&grads);
            clip_grad_norm(&mut gs, fixture.grad_clip_max_norm).unwrap();
            opt.step(&gs, lr, 1.0).unwrap();
        }
        let after = loaded.model.forward(&b, Mode::Eval).unwrap();
        let d = max_abs_diff(&after, &exp["logits_after_adamw"]);
        assert!(
            d < 1e-3,
            "{case}: logits after 5 training steps differ by {d}"
        );
    }
}

#[test]
fn decay_mask_matches_the_reference_optimizer() {
    for case in CASES {
        let loaded = load(case);
        let no_decay = optimizer_fixture(case).no_decay;
        let all: BTreeSet<String> = loaded
            .varmap
            .data()
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let want: BTreeSet<String> = all.difference(&no_decay).cloned().collect();
        assert_eq!(loaded.decay_mask().unwrap(), want, "{case}");
    }
}

#[test]
fn save_then_load_gives_identical_logits() {
    for case in CASES {
        let exp = expected(case);
        let b = batch(case, &exp);
        let mut loaded = load(case);
        // Move the weights off the fixture's so the round trip is not trivially the fixture.
        adamw_steps(case, &loaded, &b, &exp);
        loaded.model = loaded.inference_model().unwrap();
        let logits = loaded.model.forward(&b, Mode::Eval).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = if is_regression(case) {
            vec!["score".into()]
        } else {
            vec!["neg".into(), "neu".into(), "pos".into()]
        };
        loaded.save(dir.path(), &names).unwrap();
        if let Ok(keep) = std::env::var("RECYCLE_KEEP_SAVED") {
            let to = PathBuf::from(keep).join(case);
            std::fs::create_dir_all(&to).unwrap();
            for f in ["config.json", "model.safetensors"] {
                std::fs::copy(dir.path().join(f), to.join(f)).unwrap();
            }
            let ours = HashMap::from([("logits".to_string(), logits.clone())]);
            candle_core::safetensors::save(&ours, to.join("recycle_logits.safetensors")).unwrap();
        }
        let again = model::load(dir.path(), &options(case, 1), &Device::Cpu).unwrap();
        assert!(
            again.fresh_params.is_empty(),
            "{case}: {:?}",
            again.fresh_params
        );
        let logits2 = again.model.forward(&b, Mode::Eval).unwrap();
        assert_eq!(
            max_abs_diff(&logits, &logits2),
            0.0,
            "{case}: round trip changed the logits"
        );
        let config = model::checkpoint::read_config(dir.path()).unwrap();
        assert_eq!(
            config["architectures"][0],
            loaded.arch.class_name(),
            "{case}"
        );
        assert_eq!(config["id2label"]["0"], names[0].as_str(), "{case}");
        assert_eq!(config["num_labels"], names.len(), "{case}");
        let problem = if is_regression(case) {
            "regression"
        } else {
            "single_label_classification"
        };
        assert_eq!(config["problem_type"], problem, "{case}");
    }
}

#[test]
fn inference_model_builds_no_graph_and_follows_updates() {
    let case = "bert";
    let exp = expected(case);
    let b = batch(case, &exp);
    let loaded = load(case);
    let inference = loaded.inference_model().unwrap();
    let logits = inference.forward(&b, Mode::Eval).unwrap();
    assert_eq!(
        max_abs_diff(&logits, &loaded.model.forward(&b, Mode::Eval).unwrap()),
        0.0
    );
    let grads = logits.sum_all().unwrap().backward().unwrap();
    for v in loaded.varmap.all_vars() {
        assert!(
            grads.get(v.as_tensor()).is_none(),
            "evaluation recorded a gradient path to a weight"
        );
    }
    let w = var(&loaded, "classifier.bias");
    w.set(&(w.as_tensor().detach() + 1.0).unwrap()).unwrap();
    let moved = inference.forward(&b, Mode::Eval).unwrap();
    let d = max_abs_diff(&(moved - 1.0).unwrap(), &logits);
    assert!(
        d < 1e-5,
        "the inference model does not see the updated weights ({d})"
    );
}

#[test]
fn bare_sentence_transformers_encoder_loads_with_a_fresh_seeded_head() {
    let exp = expected("bert_bare");
    let b = batch("bert_bare", &exp);
    let opts = |seed| LoadOptions {
        num_labels: 4,
        problem: Problem::SingleLabel,
        seed,
        precision: recycle::model::Precision::F32,
        hidden_dropout: None,
    };
    let dir = fixture("bert_bare");
    let a = model::load(&dir, &opts(3), &Device::Cpu).unwrap();
    let fresh: BTreeSet<&str> = a.fresh_params.iter().map(String::as_str).collect();
    let want: BTreeSet<&str> = [
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    .into();
    assert_eq!(fresh, want);
    let states = a.model.hidden_states(&b).unwrap();
    assert_eq!(states.len(), 3, "embeddings + 2 layers");
    let d = max_abs_diff(&states[2], &exp["last_hidden_state"]);
    assert!(d < 1e-4, "last hidden state differs by {d}");
    // Fresh weights: normal(0, initializer_range), zero bias; same seed, same head.
    let w = var(&a, "classifier.weight").as_tensor().clone();
    let std: f32 = w
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!((std - 0.02).abs() < 0.006, "classifier init std {std}");
    assert_eq!(max_abs(var(&a, "classifier.bias").as_tensor()), 0.0);
    let same = model::load(&dir, &opts(3), &Device::Cpu).unwrap();
    let other = model::load(&dir, &opts(4), &Device::Cpu).unwrap();
    let la = a.model.forward(&b, Mode::Eval).unwrap();
    assert_eq!(
        max_abs_diff(&la, &same.model.forward(&b, Mode::Eval).unwrap()),
        0.0
    );
    assert!(max_abs_diff(&la, &other.model.forward(&b, Mode::Eval).unwrap()) > 0.0);
    assert_eq!(la.dims(), &[4, 4]);
}

#[test]
fn a_head_of_another_size_is_replaced() {
    let exp = expected("roberta");
    let mut opts = options("roberta", 0);
    opts.num_labels = 5;
    let loaded = model::load(&fixture("roberta"), &opts, &Device::Cpu).unwrap();
    let fresh: BTreeSet<&str> = loaded.fresh_params.iter().map(String::as_str).collect();
    assert_eq!(
        fresh,
        ["classifier.out_proj.weight", "classifier.out_proj.bias"].into()
    );
    let logits = loaded
        .model
        .forward(&batch("roberta", &exp), Mode::Eval)
        .unwrap();
    assert_eq!(logits.dims(), &[4, 5]);
    assert_eq!(loaded.config["num_labels"], 5);
}

#[test]
fn unsupported_or_broken_checkpoints_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = model::checkpoint::read_config(&fixture("bert")).unwrap();
    config["model_type"] = "gpt2".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = model::load(dir.path(), &options("bert", 0), &Device::Cpu)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("gpt2"), "{err:#}");
    config["model_type"] = "bert".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = model::load(dir.path(), &options("bert", 0), &Device::Cpu)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("model.safetensors"), "{err:#}");
    let err = load("bert")
        .save(dir.path(), &["only-one".to_string()])
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("1 label names for a head with 3 outputs"),
        "{err:#}"
    );
}

#[test]
fn dropout_masks_in_train_mode_only() {
    let x = Tensor::ones((200, 500), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&ops::dropout(&x, 0.3, Mode::Eval).unwrap(), &x),
        0.0
    );
    let y = ops::dropout(&x, 0.3, Mode::Train).unwrap();
    let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let zeros = v.iter().filter(|&&e| e == 0.0).count() as f64 / v.len() as f64;
    assert!((zeros - 0.3).abs() < 0.01, "dropped fraction {zeros}");
    assert!(
        v.iter().all(|&e| e == 0.0 || (e - 1.0 / 0.7).abs() < 1e-6),
        "kept values are not scaled by 1/(1-p)"
    );
    // Train mode on a model: dropout changes the logits; with dropout overridden to 0 it does not.
    let exp = expected("bert");
    let b = batch("bert", &exp);
    let loaded = load("bert");
    let eval = loaded.model.forward(&b, Mode::Eval).unwrap();
    assert!(max_abs_diff(&loaded.model.forward(&b, Mode::Train).unwrap(), &eval) > 1e-3);
}

/// Central finite differences of `sum(f(x) * r)` against the autograd gradient, in f64.
fn check_gradient(f: impl Fn(&Tensor) -> Tensor, shape: (usize, usize)) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f64, 1.0, shape, &dev).unwrap();
    let objective = |t: &Tensor| (f(t) * &r).unwrap().sum_all().unwrap();
    let grads = objective(x.as_tensor()).backward().unwrap();
    let g: Vec<f64> = grads
        .get(x.as_tensor())
        .expect("no gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-5;
    for i in 0..base.len() {
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, shape, &dev).unwrap();
            objective(&t).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (numeric - g[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
            "element {i}: {numeric} vs {}",
            g[i]
        );
    }
}

#[test]
fn ops_have_correct_gradients() {
    let dev = Device::Cpu;
    let w = Tensor::randn(1f64, 0.1, 6, &dev).unwrap();
    let b = Tensor::randn(0f64, 0.1, 6, &dev).unwrap();
    check_gradient(|x| ops::layer_norm(x, &w, &b, 1e-12).unwrap(), (3, 6));
    check_gradient(|x| ops::gelu(x).unwrap(), (3, 6));
    let mask = Tensor::new(
        &[
            [1u32, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 0, 0, 0, 0, 0],
        ],
        &dev,
    )
    .unwrap();
    let bias = ops::attention_bias(&mask, DType::F64)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    check_gradient(|x| ops::masked_softmax(x, &bias).unwrap(), (3, 6));
    // Masked positions get no probability, the rest sums to one.
    let p = ops::masked_softmax(&Tensor::randn(0f64, 1.0, (3, 6), &dev).unwrap(), &bias).unwrap();
    let masked = (p.clone() * (1.0 - mask.to_dtype(DType::F64).unwrap()).unwrap()).unwrap();
    assert_eq!(masked.sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
    let sums: Vec<f64> = p.sum(D::Minus1).unwrap().to_vec1().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-12), "{sums:?}");
    // LayerNorm agrees with candle's (gradient-less) fused op.
    let x = Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap();
    let (wf, bf) = (
        w.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    let ours = ops::layer_norm(&x, &wf, &bf, 1e-5).unwrap();
    let theirs = candle_nn::ops::layer_norm(&x, &wf, &bf, 1e-5).unwrap();
    assert!(max_abs_diff(&ours, &theirs) < 1e-5);
}

#[test]
fn a_sharded_checkpoint_loads_like_a_single_file() {
    let case = "bert";
    let exp = expected(case);
    let b = batch(case, &exp);
    let weights =
        candle_core::safetensors::load(fixture(case).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(case).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), weights[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.path().join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = model::load(dir.path(), &options(case, 0), &Device::Cpu).unwrap();
    let logits = sharded.model.forward(&b, Mode::Eval).unwrap();
    assert_eq!(
        max_abs_diff(&logits, &load(case).model.forward(&b, Mode::Eval).unwrap()),
        0.0
    );
}

#[test]
fn deberta_log_buckets_match_transformers_at_v3_settings() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity/deberta_buckets.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (size, max) = (
        json["bucket_size"].as_i64().unwrap(),
        json["max_position"].as_i64().unwrap(),
    );
    let want: Vec<i64> = json["bucket"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    // relative_positions(seq) lists q - k row by row; row `seq - 1` covers 0 ..= -(seq - 1) and
    // column 0 covers 0 ..= seq - 1, so one 601-long sequence spans -600 ..= 600.
    let seq = 601;
    let all = model::deberta_v2::relative_positions(seq, size, max);
    for (i, rel) in json["relative"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .enumerate()
    {
        let (q, k) = if rel >= 0 {
            (rel as usize, 0)
        } else {
            (0, (-rel) as usize)
        };
        assert_eq!(all[q * seq + k], want[i], "relative position {rel}");
    }
    assert!(
        want.iter().any(|&b| b.abs() < 600 && b.abs() > 128),
        "the fixture exercises the log buckets"
    );
}
