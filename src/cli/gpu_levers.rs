//! `recycle gpu-levers` (hidden): which levers' switches `gpu-check`'s A/B rows say to turn the
//! other way from their defaults, so that scripts/gpu/run.sh's last stages can time the best
//! measured configuration in the same call (docs/cuda.md). Reads the JSON lines of `gpu-check`
//! stages; prints one `VAR=1` or `VAR=0` line per switch to flip on stdout (nothing: the defaults
//! are the best measured), and every switch's evidence and verdict on stderr.
//!
//! The rule changes a default only where every measured batch agrees by more than the noise
//! (`NOISE`): a lever on by default is turned off only if it loses at each batch of at least
//! `--min-batch`, and one off by default (attention in one pass) turned on only if it wins at
//! each. A lever that is an approximation must save a share of the step (`min_gain`) at some
//! batch to stay on.
//!
//! With `--failed` it prints instead `VAR=0` for each lever whose check failed in those stages
//! (`gpu-check`'s notes that name a switch), for the stages after, which skip the checks. Without
//! it, such a lever (one that failed, or turned itself off while its row was timed) is off in the
//! choice too.

use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// `gpu-check` output (JSON lines): its A/B rows with a `switch` count, everything else is
    /// passed over.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The smallest batch whose rows count (the MFU target is read at 128 and 256; smaller
    /// batches are bound by the host and noisier).
    #[arg(long, default_value_t = 128)]
    pub min_batch: usize,
    /// Print `VAR=0` for each lever whose check failed (a note naming its switch) instead.
    #[arg(long)]
    pub failed: bool,
}

/// An A/B row of `gpu-check` that names the switch it flipped: seconds a step with it on and off.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SwitchRow {
    pub switch: String,
    pub default_on: bool,
    pub what: String,
    pub shape: String,
    pub batch: usize,
    pub on_s: f64,
    pub off_s: f64,
}

/// What the rows say of one switch.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub switch: String,
    pub default_on: bool,
    /// Whether the best measured configuration has it on.
    pub on: bool,
    /// The rows that decided it, in batch order.
    pub rows: Vec<SwitchRow>,
}

impl Verdict {
    /// The `VAR=value` word that sets it, where it differs from the default.
    pub fn assignment(&self) -> Option<String> {
        (self.on != self.default_on).then(|| format!("{}={}", self.switch, u8::from(self.on)))
    }
}

/// The fraction of a step a lever must save to be on: more than nothing only for the levers that
/// change the arithmetic (GELU's backward in the products' epilogue takes the tanh form's
/// derivative, docs/cuda.md: it has to pay for itself).
pub fn min_gain(switch: &str) -> f64 {
    match switch {
        "RECYCLE_LT_DGELU" => 0.01,
        _ => 0.0,
    }
}

/// The difference between a step with a lever on and off that the rows must show before a
/// default is changed: run `12a`'s A/B rows at batch 256 (three rounds of four steps) moved by up
/// to 3 % for levers that do nothing there (cudarc's per-buffer events, 0.97×), so a difference
/// of 1 % or less is taken for noise.
pub const NOISE: f64 = 0.01;

/// Whether a row has the lever on slower than off by more than the noise.
fn loses(r: &SwitchRow) -> bool {
    r.on_s > r.off_s * (1.0 + NOISE)
}

/// Whether a row has the lever on faster than off by more than the noise.
fn wins(r: &SwitchRow) -> bool {
    r.off_s > r.on_s * (1.0 + NOISE)
}

/// Whether a row has the lever saving at least `min_gain` of the step.
fn pays(r: &SwitchRow) -> bool {
    r.on_s <= r.off_s * (1.0 - min_gain(&r.switch))
}

/// Every switch with a row at a batch of at least `min_batch`, and whether the best measured
/// configuration has it on (see the module's rule).
pub fn choose(rows: &[SwitchRow], min_batch: usize) -> Vec<Verdict> {
    let mut by_switch: BTreeMap<&str, Vec<SwitchRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.batch >= min_batch) {
        by_switch.entry(&r.switch).or_default().push(r.clone());
    }
    by_switch
        .into_iter()
        .map(|(switch, mut rows)| {
            rows.sort_by_key(|r| r.batch);
            let default_on = rows[0].default_on;
            let on = if !default_on {
                rows.iter().all(wins)
            } else if min_gain(switch) > 0.0 {
                rows.iter().any(pays)
            } else {
                !rows.iter().all(loses)
            };
            Verdict {
                switch: switch.to_string(),
                default_on,
                on,
                rows,
            }
        })
        .collect()
}

/// What `gpu-check` output says of the switches: its A/B rows that name one, and the switches
/// of the levers that failed their checks (in the order of their notes, once each).
#[derive(Debug, Default)]
pub struct Lines {
    pub rows: Vec<SwitchRow>,
    pub failed: Vec<String>,
}

/// Reads `gpu-check` output; a line that is not JSON is an error naming the file and line, except
/// an unfinished last line (no newline after it: a process cut off mid-write), which is passed
/// over with a warning.
pub fn read_lines(path: &std::path::Path, into: &mut Lines) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let count = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if !line.starts_with('{') {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == count && !text.ends_with('\n') => {
                eprintln!("gpu-levers: {}: an unfinished last line, passed over", at());
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("{}: not a JSON line", at())),
        };
        let Some(switch) = v.get("switch").and_then(|s| s.as_str()) else {
            continue;
        };
        if v["kind"] == "ab" {
            let row = serde_json::from_value(v.clone())
                .with_context(|| format!("{}: an A/B row", at()))?;
            into.rows.push(row);
        } else if v["kind"] == "note" && !into.failed.iter().any(|f| f == switch) {
            into.failed.push(switch.to_string());
        }
    }
    Ok(())
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut lines = Lines::default();
    for f in &args.files {
        read_lines(f, &mut lines)?;
    }
    if args.failed {
        for switch in &lines.failed {
            eprintln!("gpu-levers: {switch}: failed its check, off for the stages after");
        }
        // The choice without verdicts: `VAR=0` for each failed lever.
        for word in choice(&lines, &[]) {
            println!("{word}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let verdicts = verdicts(&lines, args.min_batch);
    for switch in &lines.failed {
        eprintln!("gpu-levers: {switch}: failed or turned itself off in these stages: off");
    }
    if verdicts.is_empty() {
        eprintln!(
            "gpu-levers: no A/B row names a switch at batch {} or more: the defaults stand",
            args.min_batch
        );
    }
    for v in &verdicts {
        let evidence: Vec<String> = v
            .rows
            .iter()
            .map(|r| {
                format!(
                    "batch {} on {:.1} ms, off {:.1} ms ({:.3}x)",
                    r.batch,
                    1e3 * r.on_s,
                    1e3 * r.off_s,
                    r.off_s / r.on_s
                )
            })
            .collect();
        let state = |on: bool| if on { "on" } else { "off" };
        eprintln!(
            "gpu-levers: {} ({}): {}; {} by default, {}{}",
            v.switch,
            v.rows[0].what,
            evidence.join("; "),
            state(v.default_on),
            if v.on == v.default_on {
                "stays "
            } else {
                "turned "
            },
            state(v.on)
        );
    }
    for word in choice(&lines, &verdicts) {
        println!("{word}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The verdicts of the switches that did not fail (`choose` over the rows).
fn verdicts(lines: &Lines, min_batch: usize) -> Vec<Verdict> {
    choose(&lines.rows, min_batch)
        .into_iter()
        .filter(|v| !lines.failed.contains(&v.switch))
        .collect()
}

/// The `VAR=value` words of the choice: `VAR=0` for each lever that failed or turned itself off
/// in these stages (whatever its rows say), then each verdict that differs from its default.
fn choice(lines: &Lines, verdicts: &[Verdict]) -> Vec<String> {
    lines
        .failed
        .iter()
        .map(|switch| format!("{switch}=0"))
        .chain(verdicts.iter().filter_map(Verdict::assignment))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(switch: &str, default_on: bool, batch: usize, on_ms: f64, off_ms: f64) -> SwitchRow {
        SwitchRow {
            switch: switch.into(),
            default_on,
            what: format!("{switch} lever"),
            shape: "roberta-base".into(),
            batch,
            on_s: on_ms / 1e3,
            off_s: off_ms / 1e3,
        }
    }

    fn verdict(rows: &[SwitchRow], switch: &str) -> Verdict {
        choose(rows, 128)
            .into_iter()
            .find(|v| v.switch == switch)
            .unwrap()
    }

    #[test]
    fn a_lever_on_by_default_goes_off_only_where_it_loses_at_every_batch() {
        let loses = [
            row("A", true, 128, 35.0, 34.0),
            row("A", true, 256, 70.0, 68.0),
        ];
        let v = verdict(&loses, "A");
        assert!(!v.on);
        assert_eq!(v.assignment().as_deref(), Some("A=0"));
        let mixed = [
            row("A", true, 128, 35.0, 34.0),
            row("A", true, 256, 67.0, 68.0),
        ];
        let v = verdict(&mixed, "A");
        assert!(v.on);
        assert_eq!(v.assignment(), None);
        // Losing by less than the noise at each batch is no loss.
        let noise = [
            row("A", true, 128, 34.2, 34.0),
            row("A", true, 256, 68.5, 68.0),
        ];
        assert!(verdict(&noise, "A").on);
    }

    #[test]
    fn a_lever_off_by_default_goes_on_only_where_it_wins_at_every_batch() {
        let wins = [
            row("F", false, 256, 60.0, 68.0),
            row("F", false, 128, 30.0, 34.0),
        ];
        let v = verdict(&wins, "F");
        assert!(v.on);
        assert_eq!(v.assignment().as_deref(), Some("F=1"));
        assert_eq!(
            v.rows.iter().map(|r| r.batch).collect::<Vec<_>>(),
            [128, 256]
        );
        let mixed = [
            row("F", false, 128, 30.0, 34.0),
            row("F", false, 256, 69.0, 68.0),
        ];
        assert!(!verdict(&mixed, "F").on);
        let noise = [
            row("F", false, 128, 33.8, 34.0),
            row("F", false, 256, 67.6, 68.0),
        ];
        assert!(!verdict(&noise, "F").on);
    }

    #[test]
    fn an_approximation_stays_on_only_where_it_saves_a_percent() {
        let small = [
            row("RECYCLE_LT_DGELU", true, 128, 33.9, 34.0),
            row("RECYCLE_LT_DGELU", true, 256, 67.7, 68.0),
        ];
        assert_eq!(
            verdict(&small, "RECYCLE_LT_DGELU").assignment().as_deref(),
            Some("RECYCLE_LT_DGELU=0")
        );
        let pays = [row("RECYCLE_LT_DGELU", true, 128, 33.0, 34.0)];
        assert!(verdict(&pays, "RECYCLE_LT_DGELU").on);
        // Any saving keeps a lever that does not change the arithmetic.
        assert!(verdict(&[row("B", true, 128, 33.9, 34.0)], "B").on);
    }

    #[test]
    fn rows_under_the_smallest_batch_do_not_count() {
        let rows = [
            row("A", true, 32, 10.0, 12.0),
            row("A", true, 128, 35.0, 34.0),
        ];
        let v = verdict(&rows, "A");
        assert_eq!(v.rows.len(), 1);
        assert!(!v.on);
        assert!(choose(&[row("A", true, 32, 13.0, 12.0)], 128).is_empty());
    }

    #[test]
    fn only_switch_lines_are_read_and_a_broken_line_names_its_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("b128.jsonl");
        let lines = [
            r#"{"kind":"bench","impl":"recycle","batch":128}"#,
            r#"{"kind":"ab","what":"gradient sink","shape":"s","batch":128,"on_s":0.03,"off_s":0.04}"#,
            r#"{"kind":"ab","what":"stack","switch":"RECYCLE_STACK","default_on":true,"shape":"s","batch":128,"on_s":0.035,"off_s":0.034}"#,
            r#"{"kind":"note","note":"the attention node failed its check"}"#,
            r#"{"kind":"note","note":"the tail failed its check","switch":"RECYCLE_ADD_NORM"}"#,
            r#"{"kind":"note","note":"the tail again","switch":"RECYCLE_ADD_NORM"}"#,
            "gpu-check: a progress line",
        ];
        std::fs::write(&f, lines.join("\n")).unwrap();
        let mut read = Lines::default();
        read_lines(&f, &mut read).unwrap();
        assert_eq!(read.rows.len(), 1);
        assert_eq!(read.rows[0].switch, "RECYCLE_STACK");
        assert_eq!(read.failed, ["RECYCLE_ADD_NORM"]);
        assert_eq!(
            verdict(&read.rows, "RECYCLE_STACK").assignment().as_deref(),
            Some("RECYCLE_STACK=0")
        );
        // Cut off mid-write: the lines before it still count.
        std::fs::write(&f, format!("{}\n{{\"kind\": ", lines[4])).unwrap();
        let mut cut = Lines::default();
        read_lines(&f, &mut cut).unwrap();
        assert_eq!(cut.failed, ["RECYCLE_ADD_NORM"]);
        std::fs::write(&f, format!("{{\"kind\": \n{}\n", lines[0])).unwrap();
        let err = format!("{:#}", read_lines(&f, &mut Lines::default()).unwrap_err());
        assert!(err.contains("b128.jsonl:1"), "{err}");
        // A lever noted off in the A/B stages is off in the choice, whatever its rows say.
        let mut noted = Lines {
            rows: vec![
                row("RECYCLE_ADD_NORM", true, 128, 30.0, 34.0),
                row("RECYCLE_STACK", true, 128, 35.0, 34.0),
            ],
            failed: vec!["RECYCLE_ADD_NORM".into()],
        };
        let v = verdicts(&noted, 128);
        assert_eq!(v.len(), 1);
        assert_eq!(
            choice(&noted, &v),
            ["RECYCLE_ADD_NORM=0", "RECYCLE_STACK=0"]
        );
        noted.failed.clear();
        let v = verdicts(&noted, 128);
        assert_eq!(choice(&noted, &v), ["RECYCLE_STACK=0"]);
        let missing = dir.path().join("absent.jsonl");
        let err = format!(
            "{:#}",
            read_lines(&missing, &mut Lines::default()).unwrap_err()
        );
        assert!(err.contains("absent.jsonl"), "{err}");
    }
}
