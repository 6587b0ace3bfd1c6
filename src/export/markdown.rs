//! The Markdown leaderboard: a table for a README or a pull-request comment.

use super::{signed, Exporter};
use crate::leaderboard::{Cell, Leaderboard};
use anyhow::Result;
use std::fmt::Write;

pub struct Markdown;

fn model_label(id: &str, revision: Option<&str>) -> String {
    let id = id.replace('|', "\\|");
    match revision {
        Some(r) => format!("`{id}`@{}", r.replace('|', "\\|")),
        None => format!("`{id}`"),
    }
}

impl Exporter for Markdown {
    fn render(&self, board: &Leaderboard) -> Result<Vec<u8>> {
        let mut s = String::new();
        let _ = writeln!(s, "# Leaderboard: {}\n", board.arch);
        let _ = writeln!(
            s,
            "Gains are in points (metric × 100) over the baseline's mean; ≈ marks a gain within the baseline's seed standard deviation. Averages cover complete rows only; a partial average is marked *partial*.\n"
        );
        let mut header = "| Rank | Model | Avg gain |".to_string();
        let mut rule = "|---:|---|---:|".to_string();
        for t in &board.targets {
            let _ = write!(header, " {} |", t.name);
            rule.push_str("---:|");
        }
        header.push_str(" Coverage |");
        rule.push_str("---:|");
        let _ = writeln!(s, "{header}\n{rule}");

        let b = &board.baseline;
        let _ = write!(
            s,
            "| base | {} | {} |",
            model_label(b.model.label(), b.model.revision.as_deref()),
            b.avg_score
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "—".into())
        );
        for c in &b.cells {
            let cell = match (c.mean, c.std) {
                (Some(m), Some(sd)) => format!("{m:.2} ± {sd:.2}"),
                (Some(m), None) => format!("{m:.2}"),
                (None, _) if c.failed > 0 => "failed".into(),
                (None, _) => "—".into(),
            };
            let _ = write!(s, " {cell} |");
        }
        let n = board.targets.len();
        let done = b.cells.iter().filter(|c| c.mean.is_some()).count();
        let _ = writeln!(s, " {done}/{n} |");

        for r in &board.rows {
            let avg = match (r.avg_gain, r.partial_avg_gain) {
                (Some(g), _) => signed(g),
                (None, Some(p)) => format!("{} *partial*", signed(p)),
                (None, None) => "—".into(),
            };
            let rank = r.rank.map(|k| k.to_string()).unwrap_or_else(|| "—".into());
            let _ = write!(
                s,
                "| {rank} | {} | {avg} |",
                model_label(r.model.label(), r.model.revision.as_deref())
            );
            for c in &r.cells {
                let cell = match c {
                    Cell::Done {
                        gain,
                        within_noise: true,
                        ..
                    } => format!("{} ≈", signed(*gain)),
                    Cell::Done { gain, .. } => signed(*gain),
                    Cell::Missing => "—".into(),
                    Cell::Failed { .. } => "failed".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            let _ = writeln!(s, " {}/{} |", r.coverage.done, r.coverage.total);
        }
        let p = &board.provenance;
        let _ = writeln!(
            s,
            "\n_{} results from suite(s) {}; recycle {}; generated {}._",
            p.results,
            if p.suites.is_empty() {
                "—".to_string()
            } else {
                p.suites.join(", ")
            },
            p.recycle_version,
            p.generated_at
        );
        Ok(s.into_bytes())
    }
}
