//! The CSV leaderboard, in long form (one line per model × target) so that it loads straight into
//! a data frame.

use super::Exporter;
use crate::leaderboard::{Cell, Leaderboard, Metric};
use anyhow::{Context, Result};

pub struct Csv;

const HEADER: [&str; 15] = [
    "role",
    "rank",
    "model",
    "revision",
    "target",
    "metric",
    "state",
    "score",
    "std",
    "gain",
    "seeds",
    "within_noise",
    "avg_gain",
    "partial_avg_gain",
    "coverage",
];

fn num(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_default()
}

fn metric(m: Metric) -> &'static str {
    match m {
        Metric::Accuracy => "accuracy",
        Metric::Spearman => "spearman",
    }
}

impl Exporter for Csv {
    fn render(&self, board: &Leaderboard) -> Result<Vec<u8>> {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(HEADER).context("cannot write CSV")?;
        let b = &board.baseline;
        for (t, c) in board.targets.iter().zip(&b.cells) {
            let state = if c.mean.is_some() {
                "done"
            } else if c.failed > 0 {
                "failed"
            } else {
                "missing"
            };
            w.write_record([
                "baseline",
                "",
                &b.model.id,
                b.model.revision.as_deref().unwrap_or(""),
                &t.name,
                metric(t.metric),
                state,
                &num(c.mean),
                &num(c.std),
                "",
                &c.scores.len().to_string(),
                "",
                "",
                "",
                "",
            ])
            .context("cannot write CSV")?;
        }
        for r in &board.rows {
            for (t, c) in board.targets.iter().zip(&r.cells) {
                let (state, score, gain, seeds, noise) = match c {
                    Cell::Done {
                        score,
                        gain,
                        seeds,
                        within_noise,
                    } => (
                        "done",
                        Some(*score),
                        Some(*gain),
                        seeds.to_string(),
                        within_noise.to_string(),
                    ),
                    Cell::Missing => ("missing", None, None, String::new(), String::new()),
                    Cell::Failed { .. } => ("failed", None, None, String::new(), String::new()),
                };
                w.write_record([
                    "candidate",
                    &r.rank.map(|k| k.to_string()).unwrap_or_default(),
                    &r.model.id,
                    r.model.revision.as_deref().unwrap_or(""),
                    &t.name,
                    metric(t.metric),
                    state,
                    &num(score),
                    "",
                    &num(gain),
                    &seeds,
                    &noise,
                    &num(r.avg_gain),
                    &num(r.partial_avg_gain),
                    &format!("{}/{}", r.coverage.done, r.coverage.total),
                ])
                .context("cannot write CSV")?;
            }
        }
        w.into_inner().context("cannot finish CSV")
    }
}
