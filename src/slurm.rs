//! Slurm job arrays for a suite's pending jobs: the pure part of `recycle slurm`. From the plan's
//! pending jobs and typed options it builds the text of every file of a sweep (one sbatch script
//! per stage, the id lists the array tasks read, the aggregation job and a submit script); the CLI
//! writes them and, with `--submit`, runs sbatch.
//!
//! Layout, for `--out DIR/NAME.sh`: `NAME.sh` (submits the stages in order), `NAME.stage0.sbatch`
//! + `NAME.stage0.jobs` (donors), `NAME.stage1.sbatch` + `NAME.stage1.jobs` (evaluations),
//! `NAME.rank.sbatch` (the leaderboard), logs under `DIR/logs/`. Line `i + 1` of a `.jobs` file holds
//! the space-separated job ids of array task `i`.

use crate::plan::Job;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Everything the scripts need besides the jobs; paths are absolute (the scripts run elsewhere).
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmOptions {
    /// The recycle binary the tasks run.
    pub recycle_bin: PathBuf,
    pub suite_file: PathBuf,
    pub suite_name: String,
    pub arch: String,
    pub profile: Option<String>,
    pub results: PathBuf,
    /// `--device` of `recycle run` (e.g. `auto`, `cuda`).
    pub device: String,
    /// The submit script; the other files sit next to it (see the module docs).
    pub out: PathBuf,
    pub resources: Resources,
    /// At most this many array tasks per stage; `None`: one task per pending job.
    pub max_tasks: Option<usize>,
    /// `%M` of `--array`: at most this many tasks of a stage run at once.
    pub array_limit: Option<usize>,
}

/// Per-task resource requests (`#SBATCH` lines); `None` leaves Slurm's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub partition: Option<String>,
    pub gpus_per_task: Option<u32>,
    pub cpus_per_task: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
}

/// A stage of the sweep, in submission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Stage 0: donor creation.
    Donors,
    /// Stage 1: evaluations; after the donors succeed.
    Evals,
    /// `recycle rank`; after the evaluations end, whatever their outcome (missing cells show).
    Rank,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Donors => "stage0",
            Step::Evals => "stage1",
            Step::Rank => "rank",
        }
    }
}

/// One sbatch submission of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub step: Step,
    pub script: PathBuf,
    /// `afterok` or `afterany` on the previous submission, if there is one.
    pub dependency: Option<&'static str>,
}

/// Every file of a sweep and the order to submit it in.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// (path, contents), in a stable order.
    pub files: Vec<(PathBuf, String)>,
    pub submissions: Vec<Submission>,
    /// Where the rank job writes the leaderboard (JSON).
    pub leaderboard: PathBuf,
}

/// Splits `n` items into at most `max_tasks` contiguous chunks whose sizes differ by at most one;
/// returns each chunk as a range of indices. No chunk is empty; together they cover `0..n`.
pub fn chunks(n: usize, max_tasks: Option<usize>) -> Vec<std::ops::Range<usize>> {
    let tasks = max_tasks.unwrap_or(n).clamp(1, n.max(1)).min(n);
    (0..tasks)
        .map(|i| (i * n / tasks)..((i + 1) * n / tasks))
        .collect()
}

/// Quotes a string for POSIX sh: bare when it is made of safe characters, else in single quotes.
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn q(p: &Path) -> String {
    shell_quote(&p.to_string_lossy())
}

/// The files of a sweep over `pending` (the plan's pending jobs, in plan order). Stages without
/// pending jobs are left out; the rank job is always there.
pub fn build(pending: &[Job], o: &SlurmOptions) -> Sweep {
    let dir = o.out.parent().unwrap_or(Path::new(".")).to_path_buf();
    let stem = o
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sweep".to_string());
    let sibling = |suffix: &str| dir.join(format!("{stem}.{suffix}"));
    let logs = dir.join("logs");
    let leaderboard = sibling("leaderboard.json");

    let mut files = Vec::new();
    let mut submissions: Vec<Submission> = Vec::new();
    for (stage, step) in [(0u8, Step::Donors), (1, Step::Evals)] {
        let ids: Vec<&str> = pending
            .iter()
            .filter(|j| j.stage == stage)
            .map(|j| j.id.as_str())
            .collect();
        if ids.is_empty() {
            continue;
        }
        let slices = chunks(ids.len(), o.max_tasks);
        let list: String = slices
            .iter()
            .map(|r| format!("{}\n", ids[r.clone()].join(" ")))
            .collect();
        let list_path = sibling(&format!("{}.jobs", step.label()));
        let script_path = sibling(&format!("{}.sbatch", step.label()));
        let script = stage_script(step, ids.len(), slices.len(), &list_path, &logs, o);
        files.push((list_path, list));
        files.push((script_path.clone(), script));
        let dependency = (!submissions.is_empty()).then_some("afterok");
        submissions.push(Submission {
            step,
            script: script_path,
            dependency,
        });
    }
    let rank_path = sibling("rank.sbatch");
    files.push((rank_path.clone(), rank_script(&leaderboard, &logs, o)));
    let dependency = (!submissions.is_empty()).then_some("afterany");
    submissions.push(Submission {
        step: Step::Rank,
        script: rank_path,
        dependency,
    });
    files.push((o.out.clone(), submit_script(&submissions, &logs)));
    Sweep {
        files,
        submissions,
        leaderboard,
    }
}

fn header(out: &mut String, name: &str, o: &SlurmOptions) {
    out.push_str("#!/bin/bash\n");
    let _ = writeln!(out, "#SBATCH --job-name={}", shell_quote(name));
    let r = &o.resources;
    if let Some(p) = &r.partition {
        let _ = writeln!(out, "#SBATCH --partition={}", shell_quote(p));
    }
    if let Some(t) = &r.time {
        let _ = writeln!(out, "#SBATCH --time={}", shell_quote(t));
    }
}

fn stage_script(
    step: Step,
    n_jobs: usize,
    n_tasks: usize,
    list: &Path,
    logs: &Path,
    o: &SlurmOptions,
) -> String {
    let mut s = String::new();
    header(
        &mut s,
        &format!("recycle-{}-{}", o.suite_name, step.label()),
        o,
    );
    let limit = o.array_limit.map(|m| format!("%{m}")).unwrap_or_default();
    let _ = writeln!(s, "#SBATCH --array=0-{}{limit}", n_tasks - 1);
    let _ = writeln!(
        s,
        "#SBATCH --output={}",
        q(&logs.join(format!("{}_%A_%a.out", step.label())))
    );
    // One task per array element: `--gpus-per-task` needs an explicit task count.
    s.push_str("#SBATCH --ntasks=1\n");
    let r = &o.resources;
    if let Some(g) = r.gpus_per_task {
        let _ = writeln!(s, "#SBATCH --gpus-per-task={g}");
    }
    if let Some(c) = r.cpus_per_task {
        let _ = writeln!(s, "#SBATCH --cpus-per-task={c}");
    }
    if let Some(m) = &r.mem {
        let _ = writeln!(s, "#SBATCH --mem={}", shell_quote(m));
    }
    let what = match step {
        Step::Donors => "donor creation",
        _ => "evaluations",
    };
    let _ = writeln!(
        s,
        "# recycle slurm: suite {}, {} ({}): {n_jobs} pending job(s) in {n_tasks} array task(s).",
        o.suite_name,
        step.label(),
        what
    );
    let _ = writeln!(
        s,
        "# Task i runs the job ids on line i+1 of {}.",
        list.display()
    );
    s.push_str("# --no-report: the rank job builds the board once every task has ended.\n");
    s.push_str("set -euo pipefail\n");
    let _ = writeln!(
        s,
        "ids=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {})",
        q(list)
    );
    s.push_str("args=()\nfor id in $ids; do args+=(--job \"$id\"); done\n");
    let _ = write!(
        s,
        "exec {} run {} --results {} --device {} --no-report",
        q(&o.recycle_bin),
        q(&o.suite_file),
        q(&o.results),
        shell_quote(&o.device)
    );
    if let Some(p) = &o.profile {
        let _ = write!(s, " --profile {}", shell_quote(p));
    }
    s.push_str(" \"${args[@]}\"\n");
    s
}

fn rank_script(leaderboard: &Path, logs: &Path, o: &SlurmOptions) -> String {
    let mut s = String::new();
    header(&mut s, &format!("recycle-{}-rank", o.suite_name), o);
    let _ = writeln!(s, "#SBATCH --output={}", q(&logs.join("rank_%j.out")));
    let _ = writeln!(
        s,
        "# recycle slurm: suite {}, the leaderboard of {} once the evaluations have ended.",
        o.suite_name, o.arch
    );
    s.push_str("set -euo pipefail\n");
    let _ = writeln!(
        s,
        "exec {} rank --arch {} --results {} --format json --out {}",
        q(&o.recycle_bin),
        shell_quote(&o.arch),
        q(&o.results),
        q(leaderboard)
    );
    s
}

fn submit_script(subs: &[Submission], logs: &Path) -> String {
    let mut s = String::from("#!/bin/bash\n");
    s.push_str("# recycle slurm: submits the stages in order, each after the previous one.\n");
    s.push_str("set -euo pipefail\n");
    let _ = writeln!(s, "mkdir -p {}", q(logs));
    let mut prev: Option<&str> = None;
    for sub in subs {
        let var = sub.step.label();
        let dep = match (sub.dependency, prev) {
            (Some(kind), Some(p)) => format!(" --dependency={kind}:${p}"),
            _ => String::new(),
        };
        let _ = writeln!(s, "{var}=$(sbatch --parsable{dep} {})", q(&sub.script));
        let _ = writeln!(s, "{var}=${{{var}%%;*}}");
        let _ = writeln!(s, "echo \"{var} ${var}\"");
        prev = Some(var);
    }
    s
}

/// The job id in `sbatch --parsable` output (`ID` or `ID;CLUSTER`).
pub fn parse_job_id(stdout: &str) -> Option<String> {
    let line = stdout.lines().map(str::trim).find(|l| !l.is_empty())?;
    let id = line.split(';').next()?.trim();
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit())).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_balanced_disjoint_and_cover() {
        for n in 0..60 {
            for max in [None, Some(1), Some(2), Some(3), Some(4), Some(7), Some(100)] {
                let c = chunks(n, max);
                let want = if n == 0 { 0 } else { max.unwrap_or(n).min(n) };
                assert_eq!(c.len(), want, "n={n} max={max:?}");
                let mut next = 0;
                for r in &c {
                    assert_eq!(r.start, next, "n={n} max={max:?}: gap or overlap");
                    assert!(!r.is_empty());
                    next = r.end;
                }
                assert_eq!(next, n);
                let sizes: Vec<usize> = c.iter().map(|r| r.len()).collect();
                let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
                if let (Some(lo), Some(hi)) = (lo, hi) {
                    assert!(hi - lo <= 1, "n={n} max={max:?}: {sizes:?}");
                }
            }
        }
    }

    #[test]
    fn shell_quote_leaves_safe_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("/a/b-c_d.e"), "/a/b-c_d.e");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn parsable_output_gives_the_job_id() {
        assert_eq!(parse_job_id("1234\n").as_deref(), Some("1234"));
        assert_eq!(parse_job_id("1234;cluster\n").as_deref(), Some("1234"));
        assert_eq!(parse_job_id("Submitted batch job 12"), None);
        assert_eq!(parse_job_id(""), None);
    }
}
