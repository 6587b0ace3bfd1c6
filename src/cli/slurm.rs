//! `recycle slurm SUITE`: writes the Slurm job-array scripts of a suite's pending jobs (see
//! `crate::slurm` for the layout) and, with `--submit`, submits them in order with sbatch.

use super::rank::results_dir;
use crate::device::DeviceRequest;
use crate::results::ResultStore;
use crate::runner::{job_states, marker_liveness, records_by_job};
use crate::slurm::{self, Resources, SlurmOptions};
use crate::suite::Suite;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The suite file.
    pub suite: PathBuf,
    /// Results directory the tasks write to [default: $RECYCLE_HOME/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// A profile of the suite.
    #[arg(long)]
    pub profile: Option<String>,
    /// `--device` of the tasks' `recycle run`: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Slurm partition.
    #[arg(long)]
    pub partition: Option<String>,
    /// GPUs per array task.
    #[arg(long)]
    pub gpus_per_task: Option<u32>,
    /// CPUs per array task.
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// Memory per task, in sbatch's syntax (e.g. `16G`).
    #[arg(long)]
    pub mem: Option<String>,
    /// Time limit per task, in sbatch's syntax (e.g. `4:00:00`).
    #[arg(long)]
    pub time: Option<String>,
    /// At most this many tasks of a stage run at once (`--array=0-N%M`).
    #[arg(long)]
    pub array_limit: Option<usize>,
    /// At most this many array tasks per stage; each runs a contiguous slice of the pending jobs
    /// [default: one task per pending job].
    #[arg(long)]
    pub tasks: Option<usize>,
    /// The submit script; the stage scripts and id lists go next to it
    /// [default: slurm/<suite>/sweep.sh].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The recycle binary the tasks run [default: this executable].
    #[arg(long)]
    pub recycle_bin: Option<PathBuf>,
    /// Submit the stages with sbatch (in order, with dependencies) and print their job ids.
    #[arg(long)]
    pub submit: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    args.device
        .parse::<DeviceRequest>()
        .with_context(|| format!("--device {}", args.device))?;
    for (flag, v) in [("--tasks", args.tasks), ("--array-limit", args.array_limit)] {
        if v == Some(0) {
            bail!("{flag} 0: must be at least 1");
        }
    }
    // Each value becomes one `#SBATCH` line: a line break would smuggle in another directive.
    for (flag, v) in [
        ("--partition", &args.partition),
        ("--mem", &args.mem),
        ("--time", &args.time),
    ] {
        if let Some(v) = v.as_deref().filter(|v| v.contains(['\n', '\r'])) {
            bail!("{flag} {v:?}: must be one line");
        }
    }
    let suite = Suite::load(&args.suite, args.profile.as_deref())?;
    let results = absolute(&results_dir(args.results)?, "--results")?;
    let store = ResultStore::new(&results);
    let jobs = crate::plan::plan(&suite)?;
    let states = job_states(
        &jobs,
        &records_by_job(&store, &suite)?,
        &marker_liveness(&store, &suite)?,
    );
    let pending: Vec<_> = jobs
        .into_iter()
        .zip(states)
        .filter(|(_, s)| s.is_pending())
        .map(|(j, _)| j)
        .collect();
    if pending.is_empty() {
        eprintln!(
            "{}: no pending jobs (see `recycle status`); nothing written",
            suite.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    let recycle_bin = match args.recycle_bin {
        Some(p) => absolute(&p, "--recycle-bin")?,
        None => std::env::current_exe().context("cannot find the path of this executable")?,
    };
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("slurm").join(&suite.name).join("sweep.sh"));
    let options = SlurmOptions {
        recycle_bin,
        suite_file: absolute(&args.suite, "SUITE")?,
        suite_name: suite.name.clone(),
        arch: suite.arch.clone(),
        profile: args.profile,
        results,
        device: args.device,
        out: absolute(&out, "--out")?,
        resources: Resources {
            partition: args.partition,
            gpus_per_task: args.gpus_per_task,
            cpus_per_task: args.cpus_per_task,
            mem: args.mem,
            time: args.time,
        },
        max_tasks: args.tasks,
        array_limit: args.array_limit,
    };
    let sweep = slurm::build(&pending, &options);
    check_outputs_spare_inputs(&sweep.files, &suite)?;
    let logs = options.out.parent().unwrap_or(Path::new(".")).join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("--out: cannot create {}", logs.display()))?;
    for (path, text) in &sweep.files {
        std::fs::write(path, text)
            .with_context(|| format!("--out: cannot write {}", path.display()))?;
    }
    eprintln!(
        "{}: {} pending jobs; wrote {} (submit with `bash {}`); leaderboard goes to {}",
        suite.name,
        pending.len(),
        options.out.display(),
        options.out.display(),
        sweep.leaderboard.display()
    );
    if args.submit {
        let mut prev: Option<String> = None;
        for sub in &sweep.submissions {
            let mut cmd = Command::new("sbatch");
            cmd.arg("--parsable");
            if let (Some(kind), Some(id)) = (sub.dependency, &prev) {
                cmd.arg(format!("--dependency={kind}:{id}"));
            }
            cmd.arg(&sub.script);
            let id = sbatch(cmd, &sub.script)?;
            println!("{} {id}", sub.step.label());
            prev = Some(id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one sbatch command and returns the job id it printed.
fn sbatch(mut cmd: Command, script: &Path) -> Result<String> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "--submit: sbatch is not on PATH (the scripts are written; submit them with \
                 `bash` on a Slurm login node)"
            )
        } else {
            anyhow::Error::new(e).context(format!(
                "--submit: cannot run sbatch for {}",
                script.display()
            ))
        }
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "--submit: sbatch {} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    slurm::parse_job_id(&stdout).with_context(|| {
        format!(
            "--submit: sbatch {} printed no job id: {stdout:?}",
            script.display()
        )
    })
}

/// Refuses a sweep that would write over the suite file or into a checkpoint or dataset the suite
/// reads (`--out suite.json` replaced the suite with the submit script).
fn check_outputs_spare_inputs(files: &[(PathBuf, String)], suite: &Suite) -> Result<()> {
    // Canonical where the path exists, so `./x/../suite.json` and symlinks compare equal.
    let norm = |p: &Path| {
        p.canonicalize()
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let inputs: Vec<PathBuf> = suite.local_inputs().iter().map(|p| norm(p)).collect();
    for (path, _) in files {
        let path = norm(path);
        if let Some(input) = inputs.iter().find(|i| path == **i || path.starts_with(i)) {
            bail!(
                "--out: the sweep would write {}, over {} that the suite reads; choose another \
                 --out",
                path.display(),
                input.display()
            );
        }
    }
    Ok(())
}

fn absolute(p: &Path, flag: &str) -> Result<PathBuf> {
    std::path::absolute(p)
        .with_context(|| format!("{flag} {}: cannot make it absolute", p.display()))
}
