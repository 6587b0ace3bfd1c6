//! End-to-end tests of `recycle run` / `rank` / `check` on the real binary with the real
//! fine-tuning executor: tiny checkpoints (tests/fixtures/tiny), tiny datasets imported by the
//! tests, no network. They check what issue 4 asks of the runner: the CI gate round trip, resume,
//! failure records, gains that come from the result files, determinism, a SIGKILLed run that
//! resumes to the uninterrupted results, and suite errors before any job starts.

mod workspace;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::BufRead;
use workspace::{
    files_under, names_starting, result_file, stderr, stdout, suite, tiny_model, Workspace, JOBS,
};

/// The fields of a result record that the fine-tuning determines (not times or paths).
fn outcome(r: &Value) -> Value {
    json!({
        "kind": r["kind"], "config_hash": r["config_hash"], "test_score": r["test_score"],
        "dev_score": r["dev_score"], "steps": r["steps"], "n_train": r["n_train"],
        "n_test": r["n_test"], "weights_sha256": r["model"]["weights_sha256"],
    })
}

fn outcomes(records: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    records
        .iter()
        .map(|(k, v)| (k.clone(), outcome(v)))
        .collect()
}

#[test]
fn run_rank_check_round_trip() {
    let ws = Workspace::new();
    let s = ws.write_suite("suite.json", &suite());
    let out = ws.run(&s, "res");
    assert!(out.status.success(), "{}", stderr(&out));
    let records = ws.records("res");
    for job in JOBS {
        let r = &records[&result_file(job)];
        assert_ne!(r["kind"], "failure", "{job}: {r}");
    }
    assert!(stdout(&out).contains("# Leaderboard: tiny-bert"));
    assert!(ws.path("res/tiny/report.html").is_file());

    let rank = ws
        .cmd()
        .args(["rank", "--arch", "tiny-bert", "--results", "res"])
        .args(["--format", "json", "--out", "ref.json"])
        .output()
        .unwrap();
    assert!(rank.status.success(), "{}", stderr(&rank));
    // The HTML report of the same results, built from the store by `recycle report --arch`.
    let report = ws
        .cmd()
        .args([
            "report",
            "--arch",
            "tiny-bert",
            "--results",
            "res",
            "--out",
            "board.html",
        ])
        .output()
        .unwrap();
    assert!(report.status.success(), "{}", stderr(&report));
    let html = std::fs::read_to_string(ws.path("board.html")).unwrap();
    let reference: Value =
        serde_json::from_slice(&std::fs::read(ws.path("ref.json")).unwrap()).unwrap();
    for row in reference["rows"].as_array().unwrap() {
        let id = row["model"]["id"].as_str().unwrap();
        assert!(html.contains(id), "the report lacks model {id}");
    }
    let check = |reference: &str| {
        ws.cmd()
            .args(["check", "--reference", reference, "--results", "res"])
            .output()
            .unwrap()
    };
    let same = check("ref.json");
    assert_eq!(same.status.code(), Some(0), "{}", stdout(&same));
    assert!(stdout(&same).contains("PASS"));

    // A reference whose best model had a much larger average gain: a regression.
    let mut board: Value =
        serde_json::from_slice(&std::fs::read(ws.path("ref.json")).unwrap()).unwrap();
    let first = &mut board["rows"][0];
    let model = first["model"]["id"].as_str().unwrap().to_string();
    let gain = first["avg_gain"].as_f64().unwrap();
    first["avg_gain"] = json!(gain + 40.0);
    std::fs::write(ws.path("perturbed.json"), board.to_string()).unwrap();
    let worse = check("perturbed.json");
    assert_eq!(worse.status.code(), Some(1), "{}", stdout(&worse));
    assert!(
        stdout(&worse).contains(&format!("REGRESSION: {model}")),
        "{}",
        stdout(&worse)
    );

    // Not a leaderboard at all: bad input, exit 2, the file named.
    std::fs::write(ws.path("bad.json"), "{\"rows\": 3}").unwrap();
    let bad = check("bad.json");
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("bad.json"), "{}", stderr(&bad));
    let missing = check("nope.json");
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("--reference nope.json"));
}

#[test]
fn a_second_run_skips_every_job_and_leaves_the_results_untouched() {
    let ws = Workspace::new();
    let s = ws.write_suite("suite.json", &suite());
    assert!(ws.run(&s, "res").status.success());
    let mtimes = |ws: &Workspace| -> BTreeMap<String, std::time::SystemTime> {
        files_under(&ws.path("res"))
            .keys()
            .filter(|k| k.ends_with(".json"))
            .map(|k| {
                let m = std::fs::metadata(ws.path("res").join(k)).unwrap();
                (k.clone(), m.modified().unwrap())
            })
            .collect()
    };
    // A JSON file that is not a result, beside the suite's results: the run reads the directory
    // twice (to resume, then for the leaderboard) and warns about it once.
    let suite_dir = std::fs::read_dir(ws.path("res"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    std::fs::write(suite_dir.join("notes.json"), r#"{"note": "not a result"}"#).unwrap();
    let before = files_under(&ws.path("res"));
    let before_mtimes = mtimes(&ws);
    std::thread::sleep(std::time::Duration::from_millis(20));

    let again = ws.run(&s, "res");
    assert!(again.status.success(), "{}", stderr(&again));
    let err = stderr(&again);
    assert_eq!(
        err.matches("notes.json: not a result record (no `kind`), skipped")
            .count(),
        1,
        "{err}"
    );
    assert!(
        err.contains("0 done, 11 skipped (already done), 0 failed"),
        "{err}"
    );
    for job in JOBS {
        assert!(err.contains(&format!("{job}: skipped")), "{job}: {err}");
    }
    let after = files_under(&ws.path("res"));
    let json_only = |m: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        m.iter()
            .filter(|(k, _)| k.ends_with(".json"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(json_only(&before), json_only(&after));
    assert_eq!(before_mtimes, mtimes(&ws));
}

#[test]
fn a_failing_job_is_recorded_and_the_others_complete() {
    let ws = Workspace::new();
    // A checkpoint whose config is fine but whose weights are garbage: the suite and the datasets
    // pass the pre-flight checks, the job fails when it loads the weights.
    let broken = ws.path("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["config.json", "vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(tiny_model("bert").join(f), broken.join(f)).unwrap();
    }
    std::fs::write(broken.join("model.safetensors"), b"not a safetensors file").unwrap();
    let mut s = suite();
    s["candidates"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "broken", "path": broken}));
    let s = ws.write_suite("suite.json", &s);

    let out = ws.run(&s, "res");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("11 done, 0 skipped (already done), 2 failed"),
        "{err}"
    );
    let records = ws.records("res");
    for job in ["eval/broken/t1/seed0", "eval/broken/t2/seed0"] {
        assert!(err.contains(&format!("failed: {job}: ")), "{job}: {err}");
        let r = &records[&result_file(job)];
        assert_eq!(r["kind"], "failure", "{r}");
        let msg = r["error"].as_str().unwrap();
        assert!(msg.contains("model.safetensors"), "{msg}");
    }
    for job in JOBS {
        assert_ne!(records[&result_file(job)]["kind"], "failure", "{job}");
    }
    // The board shows the failed cells as failed, not as missing or as a score.
    let rank = ws
        .cmd()
        .args([
            "rank",
            "--arch",
            "tiny-bert",
            "--results",
            "res",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let board: Value = serde_json::from_slice(&rank.stdout).unwrap();
    let row = board["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"]["id"] == broken.to_string_lossy().as_ref())
        .unwrap();
    assert_eq!(row["cells"][0]["state"], "failed", "{row}");
    assert_eq!(row["avg_gain"], Value::Null);
    // A re-run retries the failed jobs only (and they fail again).
    let again = ws.run(&s, "res");
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("0 done, 11 skipped (already done), 2 failed"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn leaderboard_gains_are_the_result_files_per_seed_scores() {
    let ws = Workspace::new();
    let s = ws.write_suite("suite.json", &suite());
    assert!(ws.run(&s, "res").status.success());
    let rank = ws
        .cmd()
        .args([
            "rank",
            "--arch",
            "tiny-bert",
            "--results",
            "res",
            "--format",
            "json",
        ])
        .args(["--suite", &s])
        .output()
        .unwrap();
    assert!(rank.status.success(), "{}", stderr(&rank));
    let board: Value = serde_json::from_slice(&rank.stdout).unwrap();

    // Mean test score in points per (model name, target), from the files alone.
    let mut scores: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for r in ws.records("res").values() {
        if r["kind"] != "finetune" {
            continue;
        }
        let name = r["model"]["name"].as_str().unwrap().to_string();
        ids.insert(r["model"]["id"].as_str().unwrap().to_string(), name.clone());
        scores
            .entry((name, r["target"].as_str().unwrap().to_string()))
            .or_default()
            .push(r["test_score"].as_f64().unwrap() * 100.0);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let targets = ["t1", "t2"];
    assert_eq!(scores[&("base".into(), "t1".into())].len(), 3);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    for (i, t) in targets.iter().enumerate() {
        let cell = &board["baseline"]["cells"][i];
        let base = mean(&scores[&("base".into(), t.to_string())]);
        assert!(close(cell["mean"].as_f64().unwrap(), base), "{cell}");
    }
    let rows = board["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        let name = &ids[row["model"]["id"].as_str().unwrap()];
        let mut gains = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let base = mean(&scores[&("base".into(), t.to_string())]);
            let own = &scores[&(name.clone(), t.to_string())];
            assert_eq!(own.len(), 1);
            let cell = &row["cells"][i];
            assert_eq!(cell["state"], "done", "{cell}");
            assert!(close(cell["score"].as_f64().unwrap(), own[0]), "{cell}");
            assert!(
                close(cell["gain"].as_f64().unwrap(), own[0] - base),
                "{cell}"
            );
            gains.push(own[0] - base);
        }
        assert!(
            close(row["avg_gain"].as_f64().unwrap(), mean(&gains)),
            "{row}"
        );
    }
}

#[test]
fn two_runs_of_a_suite_give_identical_scores() {
    let ws = Workspace::new();
    let s = ws.write_suite("suite.json", &suite());
    let a = ws.run_in("home-a", &s, "res-a");
    let b = ws.run_in("home-b", &s, "res-b");
    assert!(a.status.success() && b.status.success());
    let (ra, rb) = (ws.records("res-a"), ws.records("res-b"));
    assert_eq!(ra.len(), JOBS.len());
    assert_eq!(outcomes(&ra), outcomes(&rb));
    // Not a degenerate suite where every job scores the same.
    let distinct: std::collections::BTreeSet<String> =
        ra.values().map(|r| r["test_score"].to_string()).collect();
    assert!(
        distinct.len() > 1,
        "every job scored the same: {distinct:?}"
    );
    // The donor's fine-tuned weights, a finer witness than accuracies on 15 examples, are
    // bit-identical (and not a copy of the file it started from).
    let donor = |home: &str| {
        let saved = files_under(&ws.path(&format!("{home}/donors/tiny")));
        let weights: Vec<&Vec<u8>> = saved
            .iter()
            .filter(|(k, _)| k.ends_with("model.safetensors"))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(weights.len(), 1, "{:?}", saved.keys());
        weights[0].clone()
    };
    let (wa, wb) = (donor("home-a"), donor("home-b"));
    assert!(wa == wb, "the donor checkpoints of two runs differ");
    let start = std::fs::read(tiny_model("bert_bare").join("model.safetensors")).unwrap();
    assert!(wa != start);
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_results() {
    let ws = Workspace::new();
    let s = ws.write_suite("suite.json", &suite());
    let reference = ws.run_in("home-ref", &s, "res-ref");
    assert!(reference.status.success(), "{}", stderr(&reference));

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_recycle"))
        .current_dir(ws.tmp.path())
        .env("RECYCLE_HOME", ws.path("home"))
        .args(["run", &s, "--results", "res", "--device", "cpu"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the donor and one evaluation are done and the next evaluation has started.
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let started_third = line.starts_with("[3/11] ");
        seen.push(line);
        if started_third {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let partial = ws.records("res");
    assert!(
        (1..JOBS.len()).contains(&partial.len()),
        "killed after {} results:\n{}",
        partial.len(),
        seen.join("\n")
    );

    let resumed = ws.run(&s, "res");
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let err = stderr(&resumed);
    assert!(
        err.contains(&format!("{} skipped (already done)", partial.len())),
        "{err}"
    );
    // A job with a result is reported skipped on one line, never as started.
    assert!(
        err.lines()
            .any(|l| l.starts_with("[1/11] donor/d1: skipped (result exists)")),
        "{err}"
    );
    assert!(!err.contains("donor/d1: started"), "{err}");
    assert_eq!(
        outcomes(&ws.records("res")),
        outcomes(&ws.records("res-ref"))
    );
    let no_temporaries = || {
        for dir in ["res", "home"] {
            for prefix in [".tmp-", ".partial-"] {
                let left = names_starting(&ws.path(dir), prefix);
                assert!(left.is_empty(), "temporary files left: {left:?}");
            }
        }
    };
    no_temporaries();

    // A kill while the donor saves leaves a half-written checkpoint and no donor result: the
    // re-run trains the donor again, removes the leftover, and keeps every other result.
    let donor = ws.path("res").join(result_file("donor/d1"));
    let checkpoint = ws.records("res")[&result_file("donor/d1")]["checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let checkpoint = std::path::Path::new(&checkpoint);
    let leftover = checkpoint.with_file_name(format!(
        ".partial-{}-x1y2z3",
        checkpoint.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("model.safetensors"), b"half").unwrap();
    std::fs::remove_file(&donor).unwrap();
    let again = ws.run(&s, "res");
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("1 done, 10 skipped (already done), 0 failed"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        outcomes(&ws.records("res")),
        outcomes(&ws.records("res-ref"))
    );
    no_temporaries();
}

/// Each broken suite: the field it breaks, and what the error must name.
#[test]
fn bad_suites_fail_before_any_job_with_the_file_and_field_named() {
    let ws = Workspace::new();
    // A copy of t1 whose card has no test split, one with no label column, and one whose card
    // lists a single label while the rows use class 1.
    let variant = |name: &str, edit: &dyn Fn(&mut Value)| {
        let dir = ws.path(&format!("data/{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (f, bytes) in files_under(&ws.path("data/t1")) {
            std::fs::write(dir.join(f), bytes).unwrap();
        }
        let card_path = dir.join("dataset.json");
        let mut card: Value = serde_json::from_slice(&std::fs::read(&card_path).unwrap()).unwrap();
        edit(&mut card);
        std::fs::write(&card_path, card.to_string()).unwrap();
    };
    variant("no_test", &|c| {
        c["splits"]
            .as_array_mut()
            .unwrap()
            .retain(|s| s["name"] != "test")
    });
    variant("no_label", &|c| {
        c["columns"].as_object_mut().unwrap().remove("label");
    });
    variant("one_label", &|c| c["task"]["labels"] = json!(["neg"]));

    let target =
        |path: &str| json!({"name": "t9", "dataset": {"path": path}, "metric": "accuracy"});
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "unknown key",
            Box::new(|s| s["epochs"] = json!(3)),
            &["unknown field `epochs`"],
        ),
        (
            "unknown key in a target",
            Box::new(|s| s["targets"][1]["metrc"] = json!("accuracy")),
            &["targets[1]", "unknown field `metrc`"],
        ),
        (
            "donor from an unknown model",
            Box::new(|s| s["donors"][0]["base"] = json!("nobody")),
            &["donors[0].base", "unknown model \"nobody\""],
        ),
        (
            "candidate path without a checkpoint",
            Box::new(|s| s["candidates"][0]["path"] = json!("models/missing")),
            &["candidates[0].path", "models/missing"],
        ),
        (
            "dataset without a test split",
            Box::new(move |s| {
                s["targets"]
                    .as_array_mut()
                    .unwrap()
                    .push(target("data/no_test"))
            }),
            &["targets[2].dataset", "no split `test`"],
        ),
        (
            "dataset without labels",
            Box::new(move |s| {
                s["targets"]
                    .as_array_mut()
                    .unwrap()
                    .push(target("data/no_label"))
            }),
            &["targets[2].dataset", "has no label"],
        ),
        (
            "label out of range",
            Box::new(move |s| s["donors"][0]["source"] = json!({"path": "data/one_label"})),
            &["donors[0].source", "class id 1 is out of range"],
        ),
        (
            "zero candidate seeds",
            Box::new(|s| s["seeds"]["candidates"] = json!(0)),
            &["seeds.candidates", "0 seeds"],
        ),
        (
            "zero baseline seeds",
            Box::new(|s| s["seeds"]["baseline"] = json!(0)),
            &["seeds.baseline", "0 seeds"],
        ),
    ];
    for (i, (what, edit, expect)) in cases.iter().enumerate() {
        let mut s = suite();
        edit(&mut s);
        let file = ws.write_suite(&format!("bad{i}.json"), &s);
        let results = format!("res{i}");
        let out = ws.run(&file, &results);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(&format!("Error: {file}: ")), "{what}: {err}");
        for e in *expect {
            assert!(err.contains(e), "{what}: expected {e:?} in {err}");
        }
        assert!(!err.contains("started"), "{what}: a job started: {err}");
        assert!(
            files_under(&ws.path(&results)).is_empty(),
            "{what}: files written under {results}"
        );
    }
}
