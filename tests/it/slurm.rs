//! Scale-out: running markers, `recycle plan`/`status` states, the Slurm sweep files (snapshot),
//! `recycle slurm --submit` against a stand-in sbatch, and (with `RECYCLE_SLURM_TESTS=1` and a
//! cluster from .ci/slurm/start.sh) a real sweep.

mod cluster;
mod e2e;

use assert_cmd::Command;
use recycle::plan::{self, Job, JobSpec, Selection};
use recycle::progress::{Silent, StepInfo};
use recycle::results::{ResultStore, RunningMarker};
use recycle::runner::{self, JobExecutor, JobOutput, RunSettings};
use recycle::slurm::{self, Resources, SlurmOptions};
use recycle::suite::Suite;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const SUITE: &str = r#"{
  "name": "mini",
  "arch": "tiny-arch",
  "baseline": {"name": "base", "hub": "org/base@main"},
  "candidates": [
    {"name": "alpha", "hub": "org/alpha"},
    {"name": "beta", "hub": "org/beta"}
  ],
  "donors": [
    {"name": "d1", "base": "base", "source": {"path": "data/src1"}},
    {"name": "d2", "base": "alpha", "source": {"path": "data/src2"}}
  ],
  "targets": [
    {"name": "sst2", "dataset": {"path": "data/sst2"}, "metric": "accuracy"},
    {"name": "rte", "dataset": {"path": "data/rte"}, "metric": "accuracy"}
  ],
  "seeds": {"baseline": 3, "candidates": 1},
  "profiles": {"quick": {"max_train": 16}}
}"#;

fn parse(text: &str) -> Suite {
    Suite::parse(text, Path::new("suite.json"), None, Path::new("/home")).unwrap()
}

fn recycle() -> Command {
    let mut c = Command::cargo_bin("recycle").unwrap();
    c.env("RECYCLE_HOME", "/nonexistent-recycle-home");
    c
}

fn stdout_of(c: &mut Command) -> String {
    let out = c.assert().success();
    String::from_utf8_lossy(&out.get_output().stdout).to_string()
}

/// Succeeds on every job; records the markers it sees on disk while each job runs.
struct MarkerSpy {
    store: ResultStore,
    seen: Mutex<Vec<Vec<RunningMarker>>>,
}

impl JobExecutor for MarkerSpy {
    fn execute(&self, job: &Job, _: &mut dyn FnMut(&StepInfo)) -> anyhow::Result<JobOutput> {
        self.seen
            .lock()
            .unwrap()
            .push(self.store.load_markers("mini")?);
        let mut out = JobOutput {
            device: "cpu".into(),
            ..Default::default()
        };
        match job.spec {
            JobSpec::Donor { .. } => out.checkpoint = job.output_dir.clone(),
            JobSpec::Eval { .. } => out.test_score = Some(0.5),
        }
        Ok(out)
    }
}

#[test]
fn the_runner_marks_a_job_running_while_it_runs_and_clears_the_mark() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path().join("results"));
    let suite = parse(SUITE);
    let spy = MarkerSpy {
        store: store.clone(),
        seen: Mutex::new(Vec::new()),
    };
    let ids = vec!["donor/d1".to_string(), "eval/base/sst2/seed0".to_string()];
    let settings = RunSettings {
        donor_dir: tmp.path().join("donors"),
        selection: Selection::Jobs(ids.clone()),
    };
    runner::run(&suite, &store, &spy, &settings, &mut Silent).unwrap();
    let seen = spy.seen.into_inner().unwrap();
    assert_eq!(seen.len(), 2);
    for (markers, id) in seen.iter().zip(&ids) {
        assert_eq!(markers.len(), 1, "{markers:?}");
        let m = &markers[0];
        assert_eq!(&m.job_id, id);
        assert_eq!(m.pid, std::process::id());
        assert_eq!(m.host, runner::this_host());
        assert!(!m.host.is_empty());
    }
    assert!(store.load_markers("mini").unwrap().is_empty());
}

/// The pid of a process that has exited (and been reaped).
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn plan_and_status_tell_running_from_stale_running() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("suite.json");
    std::fs::write(&file, SUITE).unwrap();
    let results = tmp.path().join("results");
    let store = ResultStore::new(&results);
    let suite = parse(SUITE);
    let jobs = plan::plan(&suite).unwrap();
    let marker = |id: &str, host: String, pid: u32| RunningMarker {
        job_id: id.into(),
        config_hash: jobs
            .iter()
            .find(|j| j.id == id)
            .unwrap()
            .config_hash
            .clone(),
        host,
        pid,
        started_at: "2024-01-01T00:00:00Z".into(),
        slurm_job: None,
    };
    let here = runner::this_host();
    let alive = marker("eval/base/sst2/seed0", here.clone(), std::process::id());
    let killed = marker("eval/base/sst2/seed1", here, dead_pid());
    let elsewhere = marker("eval/alpha/rte/seed0", "node-elsewhere".into(), 1);
    for m in [&alive, &killed, &elsewhere] {
        store.write_marker("mini", m).unwrap();
    }
    let stdout = stdout_of(
        recycle()
            .arg("plan")
            .arg(&file)
            .arg("--results")
            .arg(&results),
    );
    let state_of = |id: &str| {
        stdout
            .lines()
            .find(|l| l.contains(&format!(" {id} ")))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
    };
    assert_eq!(state_of("eval/base/sst2/seed0").as_deref(), Some("running"));
    assert_eq!(
        state_of("eval/base/sst2/seed1").as_deref(),
        Some("stale-running")
    );
    assert_eq!(state_of("eval/alpha/rte/seed0").as_deref(), Some("running"));
    assert_eq!(state_of("eval/base/rte/seed0").as_deref(), Some("missing"));
    let stdout = stdout_of(
        recycle()
            .arg("status")
            .arg(&file)
            .arg("--results")
            .arg(&results),
    );
    let n = jobs.len();
    assert!(
        stdout.contains(&format!(
            "{n} jobs: 0 done, 0 failed, 0 stale, {} missing, 2 running, 1 stale-running",
            n - 3
        )),
        "{stdout}"
    );
}

fn snapshot_options() -> SlurmOptions {
    SlurmOptions {
        recycle_bin: "/opt/recycle/bin/recycle".into(),
        suite_file: "/sweeps/my suites/mini.json".into(),
        suite_name: "mini".into(),
        arch: "tiny-arch".into(),
        profile: Some("quick".into()),
        results: "/scratch/results".into(),
        device: "cuda".into(),
        out: "/sweeps/mini/sweep.sh".into(),
        resources: Resources {
            partition: Some("gpu".into()),
            gpus_per_task: Some(1),
            cpus_per_task: Some(8),
            mem: Some("32G".into()),
            time: Some("4:00:00".into()),
        },
        max_tasks: Some(4),
        array_limit: Some(2),
    }
}

/// The sweep of the suite with a few jobs done, compared byte for byte with
/// tests/it/slurm/expected/ (`UPDATE_SNAPSHOTS=1` rewrites them; review the diff by eye).
#[test]
fn sweep_files_match_the_reviewed_snapshot() {
    let jobs = plan::plan(&parse(SUITE)).unwrap();
    let done = ["donor/d2", "eval/base/sst2/seed0", "eval/beta/rte/seed0"];
    let pending: Vec<Job> = jobs
        .into_iter()
        .filter(|j| !done.contains(&j.id.as_str()))
        .collect();
    let sweep = slurm::build(&pending, &snapshot_options());
    let expected_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/slurm/expected");
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    let mut names = Vec::new();
    for (path, text) in &sweep.files {
        assert_eq!(path.parent(), Some(Path::new("/sweeps/mini")));
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let snap = expected_dir.join(&name);
        if update {
            std::fs::create_dir_all(&expected_dir).unwrap();
            std::fs::write(&snap, text).unwrap();
        }
        let want = std::fs::read_to_string(&snap)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SNAPSHOTS=1 writes it)", snap.display()));
        assert_eq!(text, &want, "{name} differs from its snapshot");
        names.push(name);
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&expected_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    on_disk.sort();
    names.sort();
    assert_eq!(names, on_disk, "a snapshot file is missing or left over");
    let steps: Vec<_> = sweep
        .submissions
        .iter()
        .map(|s| (s.step.label(), s.dependency))
        .collect();
    assert_eq!(
        steps,
        [
            ("stage0", None),
            ("stage1", Some("afterok")),
            ("rank", Some("afterany"))
        ]
    );
}

/// The job ids of a written `.jobs` file, line by line.
fn read_jobs_file(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn array_slices_are_disjoint_and_cover_the_pending_jobs_of_each_stage() {
    let jobs = plan::plan(&parse(SUITE)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for n_done in [0, 1, 5, jobs.len() - 1] {
        for max_tasks in [None, Some(1), Some(3), Some(4), Some(64)] {
            // Every third job from `n_done` on is done, the rest pending.
            let pending: Vec<Job> = jobs
                .iter()
                .enumerate()
                .filter(|(i, _)| !(*i < n_done || i % 3 == 0))
                .map(|(_, j)| j.clone())
                .collect();
            let mut o = snapshot_options();
            o.max_tasks = max_tasks;
            o.out = tmp.path().join("sweep.sh");
            let sweep = slurm::build(&pending, &o);
            for stage in [0u8, 1] {
                let want: Vec<String> = pending
                    .iter()
                    .filter(|j| j.stage == stage)
                    .map(|j| j.id.clone())
                    .collect();
                let list = tmp.path().join(format!("sweep.stage{stage}.jobs"));
                let file = sweep.files.iter().find(|(p, _)| *p == list);
                let Some((_, text)) = file else {
                    assert!(want.is_empty(), "stage {stage}: no id list for {want:?}");
                    continue;
                };
                let lines: Vec<Vec<String>> = text
                    .lines()
                    .map(|l| l.split_whitespace().map(str::to_string).collect())
                    .collect();
                assert!(lines.iter().all(|l| !l.is_empty()));
                assert!(lines.len() <= max_tasks.unwrap_or(usize::MAX));
                // Concatenated in task order they are exactly the pending ids in plan order:
                // disjoint, covering, nothing else.
                assert_eq!(lines.concat(), want, "stage {stage}, max {max_tasks:?}");
                let script = tmp.path().join(format!("sweep.stage{stage}.sbatch"));
                let (_, script) = sweep.files.iter().find(|(p, _)| *p == script).unwrap();
                assert!(
                    script.contains(&format!("--array=0-{}%2\n", lines.len() - 1)),
                    "{script}"
                );
            }
        }
    }
}

/// A stand-in for sbatch: logs its arguments and prints job ids 100, 101, …
fn fake_sbatch(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("sbatch.log");
    let script = format!(
        "#!/bin/sh\nn=$(wc -l < '{log}' 2>/dev/null || echo 0)\necho \"$*\" >> '{log}'\necho $((100 + n))\n",
        log = log.display()
    );
    let path = bin.join("sbatch");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn cli_writes_the_pending_jobs_and_submits_the_stages_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("suite.json");
    std::fs::write(&file, SUITE).unwrap();
    let results = tmp.path().join("results");
    let suite = parse(SUITE);
    // Run the donors and two evaluations: the sweep covers only the rest.
    let ran = vec![
        "donor/d1".to_string(),
        "donor/d2".to_string(),
        "eval/base/sst2/seed0".to_string(),
        "eval/alpha/rte/seed0".to_string(),
    ];
    let spy = MarkerSpy {
        store: ResultStore::new(&results),
        seen: Mutex::new(Vec::new()),
    };
    let settings = RunSettings {
        donor_dir: tmp.path().join("donors"),
        selection: Selection::Jobs(ran.clone()),
    };
    runner::run(
        &suite,
        &ResultStore::new(&results),
        &spy,
        &settings,
        &mut Silent,
    )
    .unwrap();

    let bin = fake_sbatch(tmp.path());
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = tmp.path().join("sweep/run.sh");
    let stdout = stdout_of(
        recycle()
            .env("PATH", path)
            .arg("slurm")
            .arg(&file)
            .arg("--results")
            .arg(&results)
            .args(["--tasks", "3", "--array-limit", "2", "--submit", "--out"])
            .arg(&out),
    );
    assert_eq!(stdout, "stage1 100\nrank 101\n");
    let dir = tmp.path().join("sweep");
    assert!(
        !dir.join("run.stage0.sbatch").exists(),
        "no donor is pending"
    );
    let want: Vec<String> = plan::plan(&suite)
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .filter(|id| !ran.contains(id))
        .collect();
    let lines = read_jobs_file(&dir.join("run.stage1.jobs"));
    assert_eq!(lines.len(), 3);
    assert_eq!(lines.concat(), want);
    let log = std::fs::read_to_string(tmp.path().join("sbatch.log")).unwrap();
    let log: Vec<&str> = log.lines().collect();
    assert_eq!(
        log,
        [
            format!("--parsable {}", dir.join("run.stage1.sbatch").display()),
            format!(
                "--parsable --dependency=afterany:100 {}",
                dir.join("run.rank.sbatch").display()
            ),
        ]
    );
    let script = std::fs::read_to_string(dir.join("run.stage1.sbatch")).unwrap();
    let exe = assert_cmd::cargo::cargo_bin("recycle");
    assert!(
        script.contains(&format!("exec {} run {} ", exe.display(), file.display())),
        "{script}"
    );
    assert!(dir.join("logs").is_dir());

    // Nothing pending: nothing written, nothing submitted.
    let done = tmp.path().join("done.json");
    std::fs::write(&done, SUITE).unwrap();
    let all = RunSettings {
        donor_dir: tmp.path().join("donors"),
        selection: Selection::All,
    };
    runner::run(&suite, &ResultStore::new(&results), &spy, &all, &mut Silent).unwrap();
    let out2 = tmp.path().join("again/run.sh");
    recycle()
        .arg("slurm")
        .arg(&file)
        .arg("--results")
        .arg(&results)
        .arg("--out")
        .arg(&out2)
        .assert()
        .success();
    assert!(!out2.exists());
}

#[test]
fn out_never_writes_over_the_suite_or_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("suite.json");
    std::fs::write(&file, SUITE).unwrap();
    std::fs::create_dir_all(tmp.path().join("data/sst2")).unwrap();
    for out in [
        file.clone(),
        tmp.path().join("data/sst2/dataset.json"),
        tmp.path().join("data/rte/x.sh"),
    ] {
        let run = recycle()
            .current_dir(tmp.path())
            .arg("slurm")
            .arg(&file)
            .arg("--results")
            .arg(tmp.path().join("results"))
            .arg("--out")
            .arg(&out)
            .assert()
            .code(2);
        let stderr = String::from_utf8_lossy(&run.get_output().stderr).to_string();
        assert!(
            stderr.contains("that the suite reads"),
            "{}: {stderr}",
            out.display()
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), SUITE);
    assert!(!tmp.path().join("data/sst2/dataset.json").exists());
}

#[test]
fn submit_without_sbatch_says_so_and_keeps_the_scripts() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("suite.json");
    std::fs::write(&file, SUITE).unwrap();
    let out = tmp.path().join("sweep/run.sh");
    let run = recycle()
        .env("PATH", tmp.path().join("empty-path"))
        .arg("slurm")
        .arg(&file)
        .arg("--results")
        .arg(tmp.path().join("results"))
        .arg("--out")
        .arg(&out)
        .arg("--submit")
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(stderr.contains("sbatch is not on PATH"), "{stderr}");
    assert!(out.is_file(), "the scripts stay for a manual submit");
}

#[test]
fn bad_flags_are_errors_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("suite.json");
    std::fs::write(&file, SUITE).unwrap();
    for (flags, needle) in [
        (vec!["--tasks", "0"], "--tasks"),
        (vec!["--array-limit", "0"], "--array-limit"),
        (vec!["--device", "tpu"], "--device"),
        (vec!["--mem", "16G\n#SBATCH --exclusive"], "--mem"),
    ] {
        let out = recycle()
            .arg("slurm")
            .arg(&file)
            .args(&flags)
            .arg("--results")
            .arg(tmp.path())
            .assert()
            .code(2);
        let stderr = String::from_utf8_lossy(&out.get_output().stderr).to_string();
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
    }
}
