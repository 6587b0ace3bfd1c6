//! Progress of a run on the terminal: indicatif bars (jobs overall; the current job's steps with
//! loss, examples/s and ETA) when stderr is a terminal, plain log lines otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// One training step, as an executor reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepInfo {
    pub step: usize,
    pub total_steps: Option<usize>,
    pub epoch: usize,
    pub loss: Option<f64>,
    pub examples_per_sec: Option<f64>,
}

/// How a job ended, for the progress display.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    Done,
    Skipped,
    Failed(String),
}

/// What the runner tells whoever watches it.
pub trait Progress {
    fn run_started(&mut self, total: usize);
    fn job_started(&mut self, index: usize, job_id: &str);
    /// A job whose result already exists: started and finished at once, unless the display has a
    /// shorter way to say so.
    fn job_skipped(&mut self, index: usize, job_id: &str) {
        self.job_started(index, job_id);
        self.job_finished(job_id, &JobEnd::Skipped);
    }
    fn step(&mut self, info: &StepInfo);
    fn job_finished(&mut self, job_id: &str, end: &JobEnd);
    fn run_finished(&mut self);
}

/// Says nothing (tests, `--quiet`).
pub struct Silent;

impl Progress for Silent {
    fn run_started(&mut self, _: usize) {}
    fn job_started(&mut self, _: usize, _: &str) {}
    fn step(&mut self, _: &StepInfo) {}
    fn job_finished(&mut self, _: &str, _: &JobEnd) {}
    fn run_finished(&mut self) {}
}

/// Bars when stderr is a terminal, log lines otherwise.
pub fn for_stderr() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Bars::new())
    } else {
        Box::new(LogLines::default())
    }
}

/// Plain lines on stderr: one per job start and end, and one every `every` steps.
#[derive(Default)]
pub struct LogLines {
    total: usize,
    every: usize,
}

impl Progress for LogLines {
    fn run_started(&mut self, total: usize) {
        self.total = total;
        self.every = 50;
        eprintln!("recycle: {total} job(s) selected");
    }
    fn job_started(&mut self, index: usize, job_id: &str) {
        eprintln!("[{}/{}] {job_id}: started", index + 1, self.total);
    }
    fn job_skipped(&mut self, index: usize, job_id: &str) {
        eprintln!(
            "[{}/{}] {job_id}: skipped (result exists)",
            index + 1,
            self.total
        );
    }
    fn step(&mut self, s: &StepInfo) {
        if self.every > 0 && s.step.is_multiple_of(self.every) {
            eprintln!("  {}", describe_step(s));
        }
    }
    fn job_finished(&mut self, job_id: &str, end: &JobEnd) {
        match end {
            JobEnd::Done => eprintln!("  {job_id}: done"),
            JobEnd::Skipped => eprintln!("  {job_id}: skipped (result exists)"),
            JobEnd::Failed(e) => eprintln!("  {job_id}: FAILED: {e}"),
        }
    }
    fn run_finished(&mut self) {}
}

fn describe_step(s: &StepInfo) -> String {
    let mut line = match s.total_steps {
        Some(t) => format!("step {}/{t} epoch {}", s.step, s.epoch),
        None => format!("step {} epoch {}", s.step, s.epoch),
    };
    if let Some(l) = s.loss {
        line.push_str(&format!(" loss {l:.4}"));
    }
    if let Some(r) = s.examples_per_sec {
        line.push_str(&format!(" {r:.1} ex/s"));
    }
    line
}

/// Two indicatif bars: jobs overall and the current job's steps.
pub struct Bars {
    multi: MultiProgress,
    jobs: ProgressBar,
    steps: Option<ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let jobs = multi.add(ProgressBar::new(0));
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix:>5} [{bar:30}] {pos}/{len} jobs {elapsed_precise} {msg}",
        ) {
            jobs.set_style(style.progress_chars("=> "));
        }
        jobs.set_prefix("run");
        Bars {
            multi,
            jobs,
            steps: None,
        }
    }
}

impl Progress for Bars {
    fn run_started(&mut self, total: usize) {
        self.jobs.set_length(total as u64);
    }
    fn job_started(&mut self, _index: usize, job_id: &str) {
        self.jobs.set_message(job_id.to_string());
        let bar = self.multi.add(ProgressBar::new(0));
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos}/{len} steps ETA {eta} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix("job");
        self.steps = Some(bar);
    }
    fn step(&mut self, s: &StepInfo) {
        if let Some(bar) = &self.steps {
            if let Some(t) = s.total_steps {
                bar.set_length(t as u64);
            }
            bar.set_position(s.step as u64);
            let mut msg = format!("epoch {}", s.epoch);
            if let Some(l) = s.loss {
                msg.push_str(&format!(" loss {l:.4}"));
            }
            if let Some(r) = s.examples_per_sec {
                msg.push_str(&format!(" {r:.1} ex/s"));
            }
            bar.set_message(msg);
        }
    }
    fn job_finished(&mut self, job_id: &str, end: &JobEnd) {
        if let Some(bar) = self.steps.take() {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        if let JobEnd::Failed(e) = end {
            let _ = self.multi.println(format!("{job_id}: FAILED: {e}"));
        }
        self.jobs.inc(1);
    }
    fn run_finished(&mut self) {
        self.jobs.finish();
    }
}
