//! Merging: the arithmetic of every method on small hand-checked slices, and whole-checkpoint merges
//! on tiny checkpoints that the tests write themselves (safetensors + config.json).

use recycle::merge::{merge_checkpoints, merge_param, MergeRequest, MergeSpec, Method};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Values on a 1/64 grid in [-2, 2): sums, differences and power-of-two scalings of these are exact
/// in f32, so "returns them exactly" can be asserted with `==`.
fn grid(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 256) as f32 / 64.0 - 2.0
        })
        .collect()
}

fn spec(method: Method, n: usize) -> MergeSpec {
    MergeSpec::new(method, n)
}

// ---------------------------------------------------------------- pure arithmetic

#[test]
fn identical_models_are_returned_exactly() {
    let base = grid(500, 1);
    let m = grid(500, 2);
    let two = [m.as_slice(), m.as_slice()];
    let four = [m.as_slice(); 4];

    let avg = merge_param(&spec(Method::Average, 2), "w", None, &two).unwrap();
    assert_eq!(avg, m);
    let avg4 = merge_param(&spec(Method::Average, 4), "w", None, &four).unwrap();
    assert_eq!(avg4, m);

    let mut ties = spec(Method::Ties, 2);
    ties.density = 1.0;
    assert_eq!(merge_param(&ties, "w", Some(&base), &two).unwrap(), m);

    // base + λ Σ w_i δ with Σ w_i = 2 needs λ = 1/2 to be the identity.
    let mut ta = spec(Method::TaskArithmetic, 2);
    ta.lambda = 0.5;
    assert_eq!(merge_param(&ta, "w", Some(&base), &two).unwrap(), m);
    let mut ta4 = spec(Method::TaskArithmetic, 4);
    ta4.lambda = 0.25;
    assert_eq!(merge_param(&ta4, "w", Some(&base), &four).unwrap(), m);
}

#[test]
fn task_arithmetic_with_lambda_zero_is_the_base() {
    let base = grid(300, 3);
    let (a, b) = (grid(300, 4), grid(300, 5));
    let mut ta = spec(Method::TaskArithmetic, 2);
    ta.lambda = 0.0;
    assert_eq!(merge_param(&ta, "w", Some(&base), &[&a, &b]).unwrap(), base);
}

#[test]
fn dare_with_no_drop_is_task_arithmetic() {
    let base = grid(70_000, 6); // more than one chunk
    let (a, b) = (grid(70_000, 7), grid(70_000, 8));
    let mut ta = spec(Method::TaskArithmetic, 2);
    ta.weights = vec![0.7, 0.4];
    ta.lambda = 0.8;
    let mut dare = ta.clone();
    dare.method = Method::DareLinear;
    dare.drop_rate = 0.0;
    let expected = merge_param(&ta, "w", Some(&base), &[&a, &b]).unwrap();
    let got = merge_param(&dare, "w", Some(&base), &[&a, &b]).unwrap();
    assert_eq!(got, expected);
    // And the merge really moved away from the base (the test could fail).
    assert_ne!(got, base);
}

#[test]
fn ties_matches_a_hand_computed_example() {
    // base = 1 everywhere; deltas per model:
    //   m1: [ 3, -1,  2,    0.5, -4]
    //   m2: [-2, -3,  1,    0.25, 1]
    //   m3: [ 1,  2, -0.5, -1,   -2]
    // density 0.6 of 5 entries: k = 3 kept per model, by magnitude; ties go to the lower index.
    //   m1 trimmed: [ 3,  0, 2, 0, -4]     (4, 3, 2)
    //   m2 trimmed: [-2, -3, 1, 0,  0]     (3, 2, then 1 at index 2 beats 1 at index 4)
    //   m3 trimmed: [ 1,  2, 0, 0, -2]     (2, 2, then 1 at index 0 beats 1 at index 3)
    // elected sign = sign of the sum: [+2, -1, +3, 0, -6] -> [+, -, +, none, -]
    // agreeing entries: [3 and 1], [-3], [2 and 1], [], [-4 and -2]
    // normalised (mean of agreeing): [2, -3, 1.5, 0, -3] -> plus base: [3, -2, 2.5, 1, -2]
    // not normalised (sum):          [4, -3, 3,   0, -6] -> plus base: [5, -2, 4,   1, -5]
    let base = [1.0f32; 5];
    let d1 = [3.0f32, -1.0, 2.0, 0.5, -4.0];
    let d2 = [-2.0f32, -3.0, 1.0, 0.25, 1.0];
    let d3 = [1.0f32, 2.0, -0.5, -1.0, -2.0];
    let add = |d: &[f32; 5]| -> Vec<f32> { d.iter().map(|x| x + 1.0).collect() };
    let (m1, m2, m3) = (add(&d1), add(&d2), add(&d3));
    let mut ties = spec(Method::Ties, 3);
    ties.density = 0.6;
    let got = merge_param(&ties, "w", Some(&base), &[&m1, &m2, &m3]).unwrap();
    assert_eq!(got, vec![3.0, -2.0, 2.5, 1.0, -2.0]);

    ties.normalize = false;
    let got = merge_param(&ties, "w", Some(&base), &[&m1, &m2, &m3]).unwrap();
    assert_eq!(got, vec![5.0, -2.0, 4.0, 1.0, -5.0]);

    // Weights [2, 1, 1], normalised: index 0 weighted deltas 6, -2, 1 -> sign +, agreeing 6 and 1
    // with weights 2 and 1 -> 7/3; index 1: 0, -3, 2 -> sign -, agreeing -3 (weight 1) -> -3.
    ties.normalize = true;
    ties.weights = vec![2.0, 1.0, 1.0];
    let got = merge_param(&ties, "w", Some(&base), &[&m1, &m2, &m3]).unwrap();
    assert!((got[0] - (1.0 + 7.0 / 3.0)).abs() < 1e-6, "{got:?}");
    assert_eq!(got[1], -2.0);
}

#[test]
fn weights_follow_the_documented_semantics() {
    let a = [0.0f32, 2.0];
    let b = [4.0f32, 6.0];
    let mut avg = spec(Method::Average, 2);
    avg.weights = vec![1.0, 3.0];
    // Normalised: (1·a + 3·b) / 4.
    assert_eq!(
        merge_param(&avg, "w", None, &[&a, &b]).unwrap(),
        vec![3.0, 5.0]
    );
    avg.normalize = false;
    assert_eq!(
        merge_param(&avg, "w", None, &[&a, &b]).unwrap(),
        vec![12.0, 20.0]
    );
    // Average ignores the base even when given (ColD Fusion averages the contributors only).
    avg.normalize = true;
    assert_eq!(
        merge_param(&avg, "w", Some(&[100.0, 100.0]), &[&a, &b]).unwrap(),
        vec![3.0, 5.0]
    );
    // Task arithmetic never normalises: base + λ (w1 δ1 + w2 δ2); a negative weight negates.
    let base = [1.0f32, 1.0];
    let mut ta = spec(Method::TaskArithmetic, 2);
    ta.weights = vec![1.0, -1.0];
    ta.lambda = 2.0;
    // δ1 = [-1, 1], δ2 = [3, 5] -> δ1 − δ2 = [-4, -4] -> 1 + 2·(-4) = -7.
    assert_eq!(
        merge_param(&ta, "w", Some(&base), &[&a, &b]).unwrap(),
        vec![-7.0, -7.0]
    );
}

#[test]
fn dare_is_deterministic_and_keeps_the_expected_fraction() {
    let n = 200_000;
    let base = vec![0.0f32; n];
    let ones = vec![1.0f32; n];
    let mut dare = spec(Method::DareLinear, 1);
    dare.drop_rate = 0.7;
    dare.seed = 42;
    let first = merge_param(&dare, "encoder.w", Some(&base), &[&ones]).unwrap();
    let again = merge_param(&dare, "encoder.w", Some(&base), &[&ones]).unwrap();
    assert_eq!(first, again);

    let kept = first.iter().filter(|&&x| x != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.3).abs() < 0.01, "kept fraction {kept}");
    // Kept entries are rescaled by 1/(1−p), so the mean stays ≈ the delta (1).
    let mean = first.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
    assert!((mean - 1.0).abs() < 0.03, "mean {mean}");

    dare.seed = 43;
    let other_seed = merge_param(&dare, "encoder.w", Some(&base), &[&ones]).unwrap();
    assert_ne!(first, other_seed);
    dare.seed = 42;
    let other_name = merge_param(&dare, "encoder.v", Some(&base), &[&ones]).unwrap();
    assert_ne!(first, other_name);

    // dare-ties on a single model is the same drop-and-rescale.
    dare.method = Method::DareTies;
    assert_eq!(
        merge_param(&dare, "encoder.w", Some(&base), &[&ones]).unwrap(),
        first
    );
}

// ---------------------------------------------------------------- checkpoints

struct T {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    values: Vec<f32>,
}

fn t(name: &'static str, shape: &[usize], values: Vec<f32>) -> T {
    T {
        name,
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        values,
    }
}

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        match dtype {
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            Dtype::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
            other => panic!("test helper does not encode {other:?}"),
        }
    }
    out
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("test helper does not decode {other:?}"),
    }
}

fn write_safetensors(path: &Path, tensors: &[T]) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| encode(t.dtype, &t.values)).collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.name,
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn write_checkpoint(dir: &Path, model_type: &str, arch: &str, tensors: &[T]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": 4,
        "num_hidden_layers": 1,
        "id2label": {"0": "neg", "1": "pos"},
        "label2id": {"neg": 0, "pos": 1},
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors);
    dir.to_path_buf()
}

fn read_tensor(dir: &Path, name: &str) -> (Dtype, Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    (
        view.dtype(),
        view.shape().to_vec(),
        decode(view.dtype(), view.data()),
    )
}

fn names(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
}

/// A sentence-transformers style BERT base (no `bert.` prefix, MLM head) and two fine-tuned
/// BertForSequenceClassification checkpoints (`bert.` prefix, classifier).
fn bert_fixture(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = write_checkpoint(
        &root.join("base"),
        "bert",
        "BertForMaskedLM",
        &[
            t("embeddings.word_embeddings.weight", &[3, 4], grid(12, 10)),
            t(
                "encoder.layer.0.attention.self.query.weight",
                &[4, 4],
                grid(16, 11),
            ),
            t("pooler.dense.bias", &[4], grid(4, 12)),
            t("cls.predictions.bias", &[3], grid(3, 13)),
            T {
                name: "embeddings.position_ids",
                dtype: Dtype::I64,
                shape: vec![1, 3],
                values: vec![0.0, 1.0, 2.0],
            },
        ],
    );
    std::fs::write(base.join("tokenizer.json"), "{\"fake\": \"tokenizer\"}").unwrap();
    std::fs::write(base.join("vocab.txt"), "[PAD]\n[CLS]\n[SEP]\n").unwrap();
    let tuned = |name: &str, seed: u64| {
        write_checkpoint(
            &root.join(name),
            "bert",
            "BertForSequenceClassification",
            &[
                t(
                    "bert.embeddings.word_embeddings.weight",
                    &[3, 4],
                    grid(12, seed),
                ),
                t(
                    "bert.encoder.layer.0.attention.self.query.weight",
                    &[4, 4],
                    grid(16, seed + 1),
                ),
                t("bert.pooler.dense.bias", &[4], grid(4, seed + 2)),
                t("classifier.weight", &[2, 4], grid(8, seed + 3)),
                t("classifier.bias", &[2], grid(2, seed + 4)),
            ],
        )
    };
    (base, tuned("a", 20), tuned("b", 30))
}

fn request(method: Method, base: Option<&Path>, models: &[&Path], out: &Path) -> MergeRequest {
    MergeRequest {
        spec: MergeSpec::new(method, models.len()),
        base: base.map(Path::to_path_buf),
        models: models.iter().map(|m| m.to_path_buf()).collect(),
        keep_head: false,
        out: out.to_path_buf(),
    }
}

fn sha256_hex(path: &Path) -> String {
    let digest = Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_merged_checkpoint_round_trips_with_config_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a, b) = bert_fixture(tmp.path());
    let out = tmp.path().join("merged");
    let mut req = request(Method::TaskArithmetic, Some(&base), &[&a, &b], &out);
    req.spec.lambda = 0.5;
    let outcome = merge_checkpoints(&req).unwrap();
    assert_eq!(outcome.merged, 3);
    assert_eq!(outcome.copied, 1);

    // Names in the base's layout; classifier and MLM head dropped; pooler and buffers kept.
    assert_eq!(
        names(&out),
        vec![
            "embeddings.position_ids",
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.attention.self.query.weight",
            "pooler.dense.bias",
        ]
    );
    // Values: base + 0.5 ((a − base) + (b − base)), computed independently here.
    let (_, _, base_q) = read_tensor(&base, "encoder.layer.0.attention.self.query.weight");
    let (_, _, a_q) = read_tensor(&a, "bert.encoder.layer.0.attention.self.query.weight");
    let (_, _, b_q) = read_tensor(&b, "bert.encoder.layer.0.attention.self.query.weight");
    let (dtype, shape, got) = read_tensor(&out, "encoder.layer.0.attention.self.query.weight");
    assert_eq!((dtype, shape), (Dtype::F32, vec![4, 4]));
    for i in 0..16 {
        let expected = base_q[i] + 0.5 * ((a_q[i] - base_q[i]) + (b_q[i] - base_q[i]));
        assert!(
            (got[i] - expected).abs() < 1e-6,
            "entry {i}: {} vs {expected}",
            got[i]
        );
    }
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let pos = st.tensor("embeddings.position_ids").unwrap();
    assert_eq!(pos.dtype(), Dtype::I64);
    assert_eq!(pos.data(), encode(Dtype::I64, &[0.0, 1.0, 2.0]).as_slice());

    // candle reads the streamed file too (the format the model adapters load).
    let loaded =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(
        loaded["encoder.layer.0.attention.self.query.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        got
    );

    // config: the base's, body architecture, labels removed, the merge recorded.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "bert");
    assert_eq!(config["architectures"], serde_json::json!(["BertModel"]));
    assert!(config.get("id2label").is_none());
    let rec = &config["recycle_merge"];
    assert_eq!(rec["method"], "task-arithmetic");
    assert_eq!(rec["lambda"], 0.5);
    assert_eq!(rec["weights"], serde_json::json!([1.0, 1.0]));
    assert_eq!(
        rec["models"][1]["weights_sha256"],
        sha256_hex(&b.join("model.safetensors"))
    );
    assert_eq!(
        rec["base"]["weights_sha256"],
        sha256_hex(&base.join("model.safetensors"))
    );
    assert!(rec["density"].is_null());
    // Tokenizer files are carried byte for byte.
    for f in ["tokenizer.json", "vocab.txt"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(base.join(f)).unwrap()
        );
    }
    // Nothing is left behind next to the output.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".recycle-merge")
        })
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn keep_head_merges_the_classifiers_and_refuses_disagreeing_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a, b) = bert_fixture(tmp.path());
    let out = tmp.path().join("merged");
    let mut req = request(Method::Average, Some(&base), &[&a, &b], &out);
    req.keep_head = true;
    merge_checkpoints(&req).unwrap();
    let (_, _, ha) = read_tensor(&a, "classifier.weight");
    let (_, _, hb) = read_tensor(&b, "classifier.weight");
    let (_, shape, got) = read_tensor(&out, "classifier.weight");
    assert_eq!(shape, vec![2, 4]);
    let expected: Vec<f32> = ha.iter().zip(&hb).map(|(x, y)| (x + y) / 2.0).collect();
    assert_eq!(got, expected);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert_eq!(config["id2label"]["1"], "pos");

    // A three-label head does not merge with a two-label one.
    let c = write_checkpoint(
        &tmp.path().join("c"),
        "bert",
        "BertForSequenceClassification",
        &[
            t(
                "bert.embeddings.word_embeddings.weight",
                &[3, 4],
                grid(12, 40),
            ),
            t(
                "bert.encoder.layer.0.attention.self.query.weight",
                &[4, 4],
                grid(16, 41),
            ),
            t("bert.pooler.dense.bias", &[4], grid(4, 42)),
            t("classifier.weight", &[3, 4], grid(12, 43)),
            t("classifier.bias", &[3], grid(3, 44)),
        ],
    );
    let mut req = request(
        Method::Average,
        Some(&base),
        &[&a, &c],
        &tmp.path().join("m2"),
    );
    req.keep_head = true;
    let err = format!("{:#}", merge_checkpoints(&req).unwrap_err());
    assert!(err.contains("classifier"), "{err}");
    // The first disagreeing head tensor is named with both files and both shapes.
    assert!(
        err.contains("has shape [3") && err.contains("has shape [2"),
        "{err}"
    );
    assert!(
        err.contains(&c.join("model.safetensors").display().to_string()),
        "{err}"
    );
    // Without --keep-head the same inputs merge (heads dropped).
    let req = request(
        Method::Average,
        Some(&base),
        &[&a, &c],
        &tmp.path().join("m3"),
    );
    merge_checkpoints(&req).unwrap();
    assert!(!names(&tmp.path().join("m3"))
        .iter()
        .any(|n| n.starts_with("classifier")));
}

#[test]
fn mismatched_architecture_or_shape_is_refused_with_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a, _) = bert_fixture(tmp.path());
    let roberta = write_checkpoint(
        &tmp.path().join("roberta"),
        "roberta",
        "RobertaForSequenceClassification",
        &[t("roberta.pooler.dense.bias", &[4], grid(4, 50))],
    );
    let req = request(
        Method::TaskArithmetic,
        Some(&base),
        &[&a, &roberta],
        &tmp.path().join("o1"),
    );
    let err = format!("{:#}", merge_checkpoints(&req).unwrap_err());
    assert!(err.contains("model_type"), "{err}");
    assert!(
        err.contains("roberta") && err.contains("config.json"),
        "{err}"
    );
    assert!(
        err.contains(&base.join("config.json").display().to_string()),
        "{err}"
    );

    let wide = write_checkpoint(
        &tmp.path().join("wide"),
        "bert",
        "BertForSequenceClassification",
        &[
            t(
                "bert.embeddings.word_embeddings.weight",
                &[3, 4],
                grid(12, 60),
            ),
            t(
                "bert.encoder.layer.0.attention.self.query.weight",
                &[4, 2],
                grid(8, 61),
            ),
            t("bert.pooler.dense.bias", &[4], grid(4, 62)),
        ],
    );
    let req = request(
        Method::Ties,
        Some(&base),
        &[&a, &wide],
        &tmp.path().join("o2"),
    );
    let err = format!("{:#}", merge_checkpoints(&req).unwrap_err());
    assert!(
        err.contains("encoder.layer.0.attention.self.query.weight"),
        "{err}"
    );
    assert!(err.contains("[4, 4]") && err.contains("[4, 2]"), "{err}");
    assert!(
        err.contains(&wide.join("model.safetensors").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains(&base.join("model.safetensors").display().to_string()),
        "{err}"
    );
    assert!(!tmp.path().join("o2").exists());

    // A deeper model is refused in either order, by its config: as the template's partner its
    // extra layer would have no place in the output.
    let deep = write_checkpoint(
        &tmp.path().join("deep"),
        "bert",
        "BertForSequenceClassification",
        &[
            t(
                "bert.embeddings.word_embeddings.weight",
                &[3, 4],
                grid(12, 70),
            ),
            t(
                "bert.encoder.layer.0.attention.self.query.weight",
                &[4, 4],
                grid(16, 71),
            ),
            t(
                "bert.encoder.layer.1.attention.self.query.weight",
                &[4, 4],
                grid(16, 72),
            ),
            t("bert.pooler.dense.bias", &[4], grid(4, 73)),
        ],
    );
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deep.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = serde_json::json!(2);
    std::fs::write(deep.join("config.json"), config.to_string()).unwrap();
    for (k, (method, base, models)) in [
        (Method::Average, None, [&a, &deep]),
        (Method::Average, None, [&deep, &a]),
        (Method::Ties, Some(&base), [&a, &deep]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("o-deep-{k}"));
        let models: Vec<&Path> = models.iter().map(|m| m.as_path()).collect();
        let req = request(method, base.map(|b: &PathBuf| b.as_path()), &models, &out);
        let err = format!("{:#}", merge_checkpoints(&req).unwrap_err());
        assert!(
            err.contains("num_hidden_layers") && err.contains(" 1") && err.contains(" 2"),
            "{k}: {err}"
        );
        assert!(!out.exists(), "{k}");
    }
}

#[test]
fn half_precision_inputs_merge_in_f32_and_keep_the_base_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let half_t = |name, dtype, seed| T {
        name,
        dtype,
        shape: vec![8],
        values: grid(8, seed),
    };
    let base = write_checkpoint(
        &tmp.path().join("base"),
        "roberta",
        "RobertaModel",
        &[half_t("w", Dtype::F16, 1)],
    );
    let a = write_checkpoint(
        &tmp.path().join("a"),
        "roberta",
        "RobertaForSequenceClassification",
        &[half_t("roberta.w", Dtype::BF16, 2)],
    );
    let b = write_checkpoint(
        &tmp.path().join("b"),
        "roberta",
        "RobertaForSequenceClassification",
        &[half_t("roberta.w", Dtype::F32, 3)],
    );
    let out = tmp.path().join("out");
    merge_checkpoints(&request(Method::Average, Some(&base), &[&a, &b], &out)).unwrap();
    let (dtype, _, got) = read_tensor(&out, "w");
    assert_eq!(dtype, Dtype::F16);
    // Grid values are exact in bf16 and f16, and so are their means.
    let expected: Vec<f32> = grid(8, 2)
        .iter()
        .zip(grid(8, 3))
        .map(|(x, y)| (x + y) / 2.0)
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn sharded_inputs_and_dare_masks_keyed_by_name_not_position() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 4096;
    // Base A: "z.weight" alone. Base B: sharded, "a.weight" in one shard and "z.weight" in another.
    let base_a = write_checkpoint(
        &tmp.path().join("base_a"),
        "bert",
        "BertModel",
        &[t("z.weight", &[n], grid(n, 1))],
    );
    let base_b = tmp.path().join("base_b");
    std::fs::create_dir_all(&base_b).unwrap();
    std::fs::copy(base_a.join("config.json"), base_b.join("config.json")).unwrap();
    write_safetensors(
        &base_b.join("model-00001-of-00002.safetensors"),
        &[t("a.weight", &[n], grid(n, 9))],
    );
    write_safetensors(
        &base_b.join("model-00002-of-00002.safetensors"),
        &[t("z.weight", &[n], grid(n, 1))],
    );
    std::fs::write(
        base_b.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "z.weight": "model-00002-of-00002.safetensors"}})
        .to_string(),
    )
    .unwrap();
    let m = write_checkpoint(
        &tmp.path().join("m"),
        "bert",
        "BertForSequenceClassification",
        &[
            t("bert.a.weight", &[n], grid(n, 10)),
            t("bert.z.weight", &[n], grid(n, 2)),
        ],
    );
    let mut req_a = request(
        Method::DareLinear,
        Some(&base_a),
        &[&m],
        &tmp.path().join("oa"),
    );
    req_a.spec.drop_rate = 0.5;
    let mut req_b = req_a.clone();
    req_b.base = Some(base_b.clone());
    req_b.out = tmp.path().join("ob");
    merge_checkpoints(&req_a).unwrap();
    merge_checkpoints(&req_b).unwrap();
    let (_, _, za) = read_tensor(&tmp.path().join("oa"), "z.weight");
    let (_, _, zb) = read_tensor(&tmp.path().join("ob"), "z.weight");
    assert_eq!(za, zb);
    assert_ne!(za, grid(n, 1), "DARE at p = 0.5 kept the base unchanged");
    assert_eq!(names(&tmp.path().join("ob")), vec!["a.weight", "z.weight"]);
}

#[test]
fn a_pooler_the_template_lacks_is_dropped_not_refused() {
    // ColD Fusion's case: a base without a pooler, contributors whose classification head added
    // one. Same config, so the merge mirrors the base and leaves the pooler out.
    let tmp = tempfile::tempdir().unwrap();
    let (_, a, b) = bert_fixture(tmp.path());
    let bare = write_checkpoint(
        &tmp.path().join("bare"),
        "bert",
        "BertModel",
        &[
            t("embeddings.word_embeddings.weight", &[3, 4], grid(12, 80)),
            t(
                "encoder.layer.0.attention.self.query.weight",
                &[4, 4],
                grid(16, 81),
            ),
        ],
    );
    let out = tmp.path().join("o");
    merge_checkpoints(&request(Method::Average, Some(&bare), &[&a, &b], &out)).unwrap();
    assert_eq!(
        names(&out),
        vec![
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.attention.self.query.weight"
        ]
    );
}

#[test]
fn an_existing_output_dir_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a, b) = bert_fixture(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let err =
        merge_checkpoints(&request(Method::Average, Some(&base), &[&a, &b], &out)).unwrap_err();
    assert!(format!("{err:#}").contains("--out"));
}

#[test]
fn cli_merges_and_refuses_flags_the_method_ignores() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, a, b) = bert_fixture(tmp.path());
    let out = tmp.path().join("cli_out");
    assert_cmd::Command::cargo_bin("recycle")
        .unwrap()
        .args([
            "merge",
            "--method",
            "ties",
            "--density",
            "0.5",
            "--weights",
            "1,-0.5",
        ])
        .arg("--base")
        .arg(&base)
        .arg(&a)
        .arg(&b)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["recycle_merge"]["density"], 0.5);
    assert_eq!(
        config["recycle_merge"]["weights"],
        serde_json::json!([1.0, -0.5])
    );

    let output = assert_cmd::Command::cargo_bin("recycle")
        .unwrap()
        .args(["merge", "--method", "task-arithmetic", "--density", "0.5"])
        .arg("--base")
        .arg(&base)
        .arg(&a)
        .arg("--out")
        .arg(tmp.path().join("never"))
        .assert()
        .failure()
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--density"), "{stderr}");
    // task arithmetic without a base is refused, naming the flag.
    let output = assert_cmd::Command::cargo_bin("recycle")
        .unwrap()
        .args(["merge", "--method", "task-arithmetic"])
        .arg(&a)
        .arg("--out")
        .arg(tmp.path().join("never"))
        .assert()
        .failure()
        .get_output()
        .clone();
    assert!(String::from_utf8_lossy(&output.stderr).contains("--base"));
}

#[test]
fn ties_trim_keeps_exactly_the_top_k_magnitudes_across_chunks() {
    // 150k entries (several chunks) on a 1/64 grid: many magnitudes tie at the threshold, and
    // exactly k = round(0.3 n) must still survive, none smaller than any dropped one.
    let n = 150_000;
    let base = grid(n, 70);
    let m = grid(n, 71);
    let mut ties = spec(Method::Ties, 1);
    ties.density = 0.3;
    let got = merge_param(&ties, "w", Some(&base), &[&m]).unwrap();
    let k = (0.3 * n as f64).round() as usize;
    let mut kept_min = f32::INFINITY;
    let mut dropped_max = 0f32;
    let mut kept = 0;
    for i in 0..n {
        let delta = (m[i] - base[i]).abs();
        if got[i] != base[i] {
            assert_eq!(got[i], m[i], "entry {i}: a kept entry is the model's value");
            kept += 1;
            kept_min = kept_min.min(delta);
        } else if delta != 0.0 {
            dropped_max = dropped_max.max(delta);
        }
    }
    assert_eq!(kept, k);
    assert!(kept_min >= dropped_max, "{kept_min} < {dropped_max}");
}

#[test]
fn candle_tensors_merge_like_slices_and_keep_dtype_and_shape() {
    use candle_core::{DType, Device, Tensor};
    let (a, b) = (grid(6, 80), grid(6, 81));
    let ta = Tensor::from_vec(a.clone(), (2, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let tb = Tensor::from_vec(b.clone(), (2, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let merged =
        recycle::merge::merge_tensor(&spec(Method::Average, 2), "w", None, &[&ta, &tb]).unwrap();
    assert_eq!(merged.dtype(), DType::BF16);
    assert_eq!(merged.dims(), &[2, 3]);
    let got: Vec<f32> = merged
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let expected: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect();
    assert_eq!(got, expected);
}

#[test]
fn keep_head_without_a_base_head_averages_the_heads() {
    // The base (a pretrained body) has no classifier, so task arithmetic has no delta for it:
    // the heads are averaged across the models, as documented.
    let tmp = tempfile::tempdir().unwrap();
    let (base, a, b) = bert_fixture(tmp.path());
    let out = tmp.path().join("merged");
    let mut req = request(Method::TaskArithmetic, Some(&base), &[&a, &b], &out);
    req.keep_head = true;
    req.spec.lambda = 0.3;
    merge_checkpoints(&req).unwrap();
    let (_, _, ha) = read_tensor(&a, "classifier.bias");
    let (_, _, hb) = read_tensor(&b, "classifier.bias");
    let (_, _, got) = read_tensor(&out, "classifier.bias");
    let expected: Vec<f32> = ha.iter().zip(&hb).map(|(x, y)| (x + y) / 2.0).collect();
    assert_eq!(got, expected);
}
