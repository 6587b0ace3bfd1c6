//! `recycle gpu-check`, the measurement scripts/gpu/run.sh takes on a lent GPU, run on the CPU with
//! tiny shapes: every stage must run and every check pass, so that a GPU session's one call is not
//! spent on a broken control flow.

use assert_cmd::Command;
use serde_json::Value;

#[test]
fn gpu_check_runs_every_stage_on_the_cpu_and_every_check_passes() {
    let out = Command::cargo_bin("recycle")
        .unwrap()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["gpu-check", "--device", "cpu", "--tiny"])
        .args([
            "--batch", "2", "--seq", "8", "--warmup", "0", "--steps", "1",
        ])
        .args([
            "--matmul",
            "16",
            "--shapes",
            "minilm",
            "--precisions",
            "f32,bf16",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let of = |kind: &'static str| rows.iter().filter(move |r| r["kind"] == kind);

    // The dense products' six (GELU's backward among them) for each of two CPU cases (bf16), six fixtures × two precisions ×
    // (gradients, three logits), then dropout's five checks in both precisions, the attention
    // node's four in both, the block nodes' three for each of two
    // blocks in both, the split weight gradients' three (one product, two blocks) in both, the
    // attention block in one pass (three, bf16), the optimizer's five (two of them the clipping
    // coefficient left on the device), and the stack's three (logits, gradients, that it ran)
    // in both.
    let parity: Vec<&Value> = of("parity").collect();
    assert_eq!(
        parity.len(),
        6 * 2 + 6 * 2 * 4 + 5 * 2 + 4 * 2 + 3 * 2 * 2 + 3 * 2 + 3 + 5 + 3 * 2,
        "{parity:#?}"
    );
    for r in &parity {
        assert_eq!(r["pass"], true, "{r}");
    }
    for case in [
        "bert",
        "roberta",
        "distilbert",
        "deberta-v3",
        "dense",
        "dropout",
        "attention",
        "block",
        "split",
        "flash",
        "optimizer",
        "stack",
    ] {
        assert!(parity.iter().any(|r| r["case"] == case), "no {case} rows");
    }
    assert_eq!(
        parity
            .iter()
            .filter(|r| r["case"] == "dense"
                && r["what"]
                    .as_str()
                    .is_some_and(|w| w.contains("GELU's backward")))
            .count(),
        2,
        "{parity:#?}"
    );
    assert_eq!(of("error").count(), 0);
    assert_eq!(of("matmul").count(), 1);

    // Throughput in both modes and precisions, with positive, finite rates.
    let bench: Vec<&Value> = of("bench").collect();
    assert_eq!(bench.len(), 2 * 2, "{bench:#?}");
    for r in &bench {
        let eps = r["examples_per_s"].as_f64().unwrap();
        assert!(eps.is_finite() && eps > 0.0, "{r}");
    }
    assert_eq!(of("phases").count(), 2);
    assert_eq!(of("kernels").count(), 2);
    // Training with each switch on and off (the weight gradients split in four, against unsplit;
    // the gradient sink; the block nodes without it; the fused attention without them), per
    // precision, both timed.
    let ab: Vec<&Value> = of("ab").collect();
    assert_eq!(ab.len(), 4 * 2, "{ab:#?}");
    for what in [
        "weight gradients split in 4",
        "gradient sink",
        "block nodes",
        "fused attention",
    ] {
        assert!(
            ab.iter()
                .any(|r| r["what"].as_str().is_some_and(|w| w.starts_with(what))),
            "no {what} rows"
        );
    }
    for r in &ab {
        for k in ["on_s", "off_s"] {
            let t = r[k].as_f64().unwrap();
            assert!(t.is_finite() && t > 0.0, "{r}");
        }
    }

    // The dense layers' products alone: four layers × (forward, input gradient, weight gradient
    // unsplit and in 2, 4, 8) in both precisions, each with a positive, finite rate.
    let gemm: Vec<&Value> = of("gemm").collect();
    assert_eq!(gemm.len(), 2 * 4 * 6, "{gemm:#?}");
    for r in &gemm {
        let t = r["tflops"].as_f64().unwrap();
        assert!(t.is_finite() && t > 0.0, "{r}");
    }

    // The op profile: the same ops in both precisions, each timed.
    let ops: Vec<&Value> = of("op").collect();
    assert!(ops.len() >= 2 * 10, "{ops:#?}");
    for r in &ops {
        for k in ["forward_s", "forward_backward_s"] {
            let t = r[k].as_f64().unwrap();
            assert!(t.is_finite() && t > 0.0, "{r}");
        }
    }
}

/// scripts/gpu/run.sh itself, as a GPU session's one call runs it, on the CPU with tiny shapes
/// (`DEVICE=cpu`, no PyTorch): every stage must run through, the levers the A/B rows do not
/// choose can be set (`LEVERS`), the last stages must time training with them and without them
/// in the same process, and the summary must compare the two.
#[test]
fn the_gpu_script_runs_every_stage_on_the_cpu_and_times_the_chosen_levers() {
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("bash")
        .arg("scripts/gpu/run.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DEVICE", "cpu")
        .env("NO_TORCH", "1")
        .env("RECYCLE_BIN", env!("CARGO_BIN_EXE_recycle"))
        .env("OUT", out.path())
        .env("LEVERS", "RECYCLE_STACK=0 RECYCLE_EMBEDDINGS_SUM=0")
        .output()
        .unwrap();
    let report = std::fs::read_to_string(out.path().join("gpu-report.txt")).unwrap();
    assert!(
        status.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for stage in [
        "preflight",
        "recycle",
        "recycle-flash",
        "recycle-b128",
        "recycle-b256",
        "recycle-best-b256",
        "recycle-best-b128",
    ] {
        assert!(
            report.contains(&format!("run.sh: {stage}: exit 0")),
            "{stage} did not run through:\n{report}"
        );
    }
    // The chosen levers' rows say so, and the summary compares them with the defaults' rows.
    let best = std::fs::read_to_string(out.path().join("recycle-best-b256.jsonl")).unwrap();
    let first = |kind: &str| -> Value {
        best.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} row in:\n{best}"))
    };
    let row = first("bench");
    assert_eq!(row["config"], "best", "{row}");
    assert_eq!(row["levers"]["RECYCLE_STACK"], false, "{row}");
    assert_eq!(row["levers"]["RECYCLE_EMBEDDINGS_SUM"], false, "{row}");
    assert_eq!(row["levers"]["RECYCLE_FLASH"], false, "{row}");
    // Timed against the switches as they were, in the same process.
    let pair = first("ab");
    assert_eq!(pair["what"], "the chosen levers together", "{pair}");
    for k in ["on_s", "off_s"] {
        let t = pair[k].as_f64().unwrap();
        assert!(t.is_finite() && t > 0.0, "{pair}");
    }
    assert!(
        report.contains("levers 'best' (RECYCLE_EMBEDDINGS_SUM=0 RECYCLE_STACK=0)")
            && report.contains("same process, interleaved")
            && report.contains("against the defaults' row"),
        "{report}"
    );
    assert!(out.path().join("all.tgz").exists());
}

/// A kernel fault loses the CUDA context, and the process reports it as an error (gpu-check
/// exits 125, but a path that exits 1 must count too): scripts/gpu/run.sh takes a preflight
/// whose log names a lost context for a stage that died and turns every unmeasured lever off in
/// the stages after, which their rows' lever states show. The fault is a stand-in binary's, on
/// the CPU.
#[test]
fn the_gpu_script_turns_the_unmeasured_levers_off_after_a_lost_context() {
    let out = tempfile::tempdir().unwrap();
    let fake = out.path().join("recycle-faulting-preflight");
    std::fs::write(
        &fake,
        format!(
            "#!/usr/bin/env bash\n\
             if [[ \" $* \" == *' --shapes  --matmul 0 --skip-ops --flash false '* ]]; then\n\
             echo 'gpu-check: FAILED {{\"error\": \"DriverError(CUDA_ERROR_MISALIGNED_ADDRESS, \\\"misaligned address\\\")\"}}' >&2\n\
             exit 1\n\
             fi\n\
             exec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_recycle")
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let results = out.path().join("out");
    let status = std::process::Command::new("bash")
        .arg("scripts/gpu/run.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DEVICE", "cpu")
        .env("NO_TORCH", "1")
        .env("RECYCLE_BIN", &fake)
        .env("OUT", &results)
        .output()
        .unwrap();
    let report = std::fs::read_to_string(results.join("gpu-report.txt")).unwrap();
    assert!(
        status.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        report.contains("run.sh: preflight: exit 1")
            && report.contains("preflight: the checks' process died")
            && report.contains("RECYCLE_STACK=0"),
        "{report}"
    );
    assert!(report.contains("run.sh: recycle: exit 0"), "{report}");
    let main = std::fs::read_to_string(results.join("recycle.jsonl")).unwrap();
    let row = main
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["kind"] == "bench")
        .unwrap_or_else(|| panic!("no bench row in:\n{main}"));
    for lever in [
        "RECYCLE_HEADS_IN_PLACE",
        "RECYCLE_EMBEDDINGS_SUM",
        "RECYCLE_ADD_NORM",
        "RECYCLE_STACK",
    ] {
        assert_eq!(row["levers"][lever], false, "{lever}: {row}");
    }
    assert_eq!(row["levers"]["RECYCLE_POOL_KEEP"], true, "{row}");
}
