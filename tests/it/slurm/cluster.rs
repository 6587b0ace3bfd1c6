//! Against a real Slurm cluster (.ci/slurm/start.sh; `SLURM_CONF` exported): runs only with
//! `RECYCLE_SLURM_TESTS=1`, otherwise says so and returns.

use super::{parse, recycle, SUITE};
use recycle::plan;
use std::path::Path;
use std::time::{Duration, Instant};

/// Whether the cluster tests are on; prints why not when they are off.
fn enabled(test: &str) -> bool {
    let on = std::env::var("RECYCLE_SLURM_TESTS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!(
            "{test}: did not run (needs RECYCLE_SLURM_TESTS=1 and a cluster, see docs/slurm.md)"
        );
    }
    on
}

/// Submits a sweep with `recycle slurm --submit` and returns the printed (step, job id) pairs.
pub fn submit(args: &[&std::ffi::OsStr]) -> Vec<(String, String)> {
    let out = recycle()
        .arg("slurm")
        .args(args)
        .arg("--submit")
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    stdout
        .lines()
        .map(|l| {
            let (step, id) = l.split_once(' ').unwrap();
            (step.to_string(), id.to_string())
        })
        .collect()
}

/// Polls `squeue -h -j IDS` until it lists nothing, for at most `limit`.
pub fn wait_for(ids: &[String], limit: Duration) {
    let start = Instant::now();
    loop {
        let out = std::process::Command::new("squeue")
            .args(["-h", "-j", &ids.join(",")])
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // squeue fails on ids it no longer knows: they are gone too.
        if listed.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "jobs {ids:?} still queued after {limit:?}:\n{listed}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A stand-in recycle binary: logs each `run`'s arguments with its array task, writes `rank`'s
/// `--out`.
fn stub_recycle(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("recycle-stub");
    let log = dir.join("runs.log");
    let script = format!(
        r#"#!/bin/bash
set -eu
case "$1" in
  run) echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $*" >> '{log}' ;;
  rank) while [ $# -gt 0 ]; do [ "$1" = --out ] && echo ranked > "$2"; shift; done ;;
esac
"#,
        log = log.display()
    );
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn slurm_arrays_run_every_pending_job_once_stage_by_stage() {
    if !enabled("slurm_arrays_run_every_pending_job_once_stage_by_stage") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("suite.json");
    std::fs::write(&file, SUITE).unwrap();
    let stub = stub_recycle(tmp.path());
    let out = tmp.path().join("sweep/sweep.sh");
    let results = tmp.path().join("results");
    let ids = submit(&[
        file.as_os_str(),
        "--results".as_ref(),
        results.as_os_str(),
        "--tasks".as_ref(),
        "4".as_ref(),
        "--array-limit".as_ref(),
        "2".as_ref(),
        "--recycle-bin".as_ref(),
        stub.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let steps: Vec<&str> = ids.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(steps, ["stage0", "stage1", "rank"]);
    let job_ids: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    wait_for(&job_ids, Duration::from_secs(180));

    let log = std::fs::read_to_string(tmp.path().join("runs.log")).unwrap();
    let mut ran = Vec::new();
    let mut stage_of_line = Vec::new();
    let mut tasks = std::collections::BTreeSet::new();
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (array, task) = (words[0], words[1]);
        tasks.insert((array.to_string(), task.to_string()));
        stage_of_line.push(if array == job_ids[0] { 0 } else { 1 });
        assert_eq!(words[2], "run");
        let mut it = words[3..].iter();
        while let Some(w) = it.next() {
            if *w == "--job" {
                ran.push(it.next().unwrap().to_string());
            }
        }
    }
    // Stage 1 started only after every stage-0 task had ended.
    assert!(
        stage_of_line.windows(2).all(|w| w[0] <= w[1]),
        "stages interleaved:\n{log}"
    );
    // Two donors: two tasks; 14 evaluations: four tasks.
    assert_eq!(tasks.len(), 2 + 4, "{log}");
    let mut want: Vec<String> = plan::plan(&parse(SUITE))
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    want.sort();
    ran.sort();
    assert_eq!(ran, want, "each pending job exactly once");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("sweep/sweep.leaderboard.json")).unwrap(),
        "ranked\n"
    );
    let logs = std::fs::read_dir(tmp.path().join("sweep/logs"))
        .unwrap()
        .count();
    assert_eq!(logs, 2 + 4 + 1, "one log per array task and one for rank");
}

#[test]
fn a_slurm_sweep_gives_the_board_of_an_unsharded_run() {
    if !enabled("a_slurm_sweep_gives_the_board_of_an_unsharded_run") {
        return;
    }
    use super::e2e::{assert_complete, board, recycle_cmd, strip, tiny_suite, unsharded_board};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let suite = tiny_suite(root);
    let results = root.join("slurm-results");
    let out_script = root.join("sweep/sweep.sh");
    // The tasks inherit this environment (sbatch exports it by default).
    let out = recycle_cmd(root)
        .arg("slurm")
        .arg(&suite)
        .args([
            "--device",
            "cpu",
            "--tasks",
            "4",
            "--cpus-per-task",
            "1",
            "--submit",
        ])
        .arg("--results")
        .arg(&results)
        .arg("--out")
        .arg(&out_script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let ids: Vec<String> = stdout
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.to_string())
        .collect();
    assert_eq!(
        stdout
            .lines()
            .map(|l| l.split(' ').next().unwrap())
            .collect::<Vec<_>>(),
        ["stage1", "rank"],
        "{stdout}"
    );
    wait_for(&ids, Duration::from_secs(480));
    let logs = root.join("sweep/logs");
    let dump = || -> String {
        std::fs::read_dir(&logs)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                format!(
                    "== {}\n{}",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap_or_default()
                )
            })
            .collect()
    };
    assert_eq!(
        std::fs::read_dir(&logs).unwrap().count(),
        4 + 1,
        "one log per array task and one for rank:\n{}",
        dump()
    );
    assert_complete(&results, 8);
    let ranked = root.join("sweep/sweep.leaderboard.json");
    let text = std::fs::read_to_string(&ranked)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", ranked.display(), dump()));
    let from_slurm = strip(serde_json::from_str(&text).unwrap());
    assert_eq!(from_slurm, board(root, &results));
    let reference = unsharded_board(root, &suite, &root.join("whole"));
    assert_eq!(from_slurm, reference);
    assert_eq!(reference["rows"][0]["coverage"]["done"], 2, "{reference:#}");
}
