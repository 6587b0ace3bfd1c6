//! The HTML report: one self-contained page (styles, script, charts and data inline, nothing
//! fetched) that researchers open from `file://` and share as a single file.

use super::svg::{self, GainScale, ScatterPoint, FAILED_RED, MISSING_DOT, MISSING_FILL};
use super::Exporter;
use crate::leaderboard::{BaselineCell, Cell, Leaderboard, Metric, ModelInfo, Row};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeSet;
use std::fmt::Write;

/// Renders a leaderboard as a self-contained HTML report.
#[derive(Debug, Clone, Copy, Default)]
pub struct HtmlExporter;

impl Exporter for HtmlExporter {
    fn render(&self, board: &Leaderboard) -> Result<Vec<u8>> {
        check_shape(board)?;
        Ok(page(board)?.into_bytes())
    }
}

/// Index of the first target column in the table (after rank, model, average, coverage).
const FIRST_TARGET_COL: usize = 4;

/// Every row must have one cell per target, or columns would silently shift.
fn check_shape(board: &Leaderboard) -> Result<()> {
    let n = board.targets.len();
    ensure!(
        board.baseline.cells.len() == n,
        "baseline `{}` has {} cells for {} targets",
        model_label(&board.baseline.model),
        board.baseline.cells.len(),
        n
    );
    for row in &board.rows {
        ensure!(
            row.cells.len() == n,
            "model `{}` has {} cells for {} targets",
            model_label(&row.model),
            row.cells.len(),
            n
        );
    }
    Ok(())
}

/// Escapes text for HTML element content and quoted attribute values alike.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

/// A number in points with two decimals; never prints `-0.00`.
pub(crate) fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".to_string();
    }
    let s = format!("{x:.2}");
    if s == "-0.00" {
        "0.00".to_string()
    } else {
        s
    }
}

/// A gain in points with its sign (`+1.25`, `-0.40`, `0.00`).
pub(crate) fn fmt_gain(x: f64) -> String {
    let s = fmt_num(x);
    if x.is_finite() && !s.starts_with('-') && s != "0.00" {
        format!("+{s}")
    } else {
        s
    }
}

/// A model as the report names it: `id@revision`, or the id alone when unpinned.
pub(crate) fn model_label(model: &ModelInfo) -> String {
    match &model.revision {
        Some(rev) => format!("{}@{}", model.label(), rev),
        None => model.label().to_string(),
    }
}

fn metric_name(metric: Metric) -> &'static str {
    match metric {
        Metric::Accuracy => "accuracy",
        Metric::Spearman => "Spearman ρ",
    }
}

/// The board as JSON safe to embed in a `<script>` element (no `<`, `>` or `&` left raw).
fn embedded_json(board: &Leaderboard) -> Result<String> {
    let json = serde_json::to_string(board).with_context(|| {
        format!(
            "serialising the `{}` leaderboard for the report",
            board.arch
        )
    })?;
    Ok(json
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026"))
}

const STYLE: &str = r#"
:root { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1a1a1a; }
body { margin: 24px; max-width: 1400px; }
h1 { font-size: 1.5em; margin-bottom: 4px; }
h2 { font-size: 1.2em; margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.summary { color: #444; margin-top: 0; }
.scroll { overflow-x: auto; }
table.board { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
table.board th, table.board td { border: 1px solid #e3e3e3; padding: 4px 7px; text-align: right; white-space: nowrap; }
table.board th { background: #f4f4f4; position: sticky; top: 0; }
table.board th[data-col] { cursor: pointer; user-select: none; }
table.board th .metric { display: block; font-weight: normal; font-size: 11px; color: #666; }
table.board th[aria-sort="ascending"]::after { content: " \25B2"; font-size: 10px; }
table.board th[aria-sort="descending"]::after { content: " \25BC"; font-size: 10px; }
table.board td.model, table.board th.model { text-align: left; }
table.board td.model .rev { color: #777; font-size: 11px; }
tr.baseline td { background: #fbf8ea; font-style: italic; }
tr.baseline td.model::before { content: "baseline "; font-weight: bold; font-style: normal; }
td.cell.noise { background-image: repeating-linear-gradient(135deg, rgba(255,255,255,0.6) 0 3px, transparent 3px 6px); }
td.cell.noise span { opacity: 0.7; }
td.cell.missing { background: MISSING_FILL; color: MISSING_DOT; text-align: center; }
td.cell.failed { outline: 2px solid FAILED_RED; outline-offset: -3px; color: FAILED_RED; text-align: center; background: #fff; }
span.partial { display: inline-block; margin-left: 4px; padding: 0 4px; border-radius: 3px; background: #fff3cd; color: #7a5b00; font-size: 10px; font-style: normal; }
.legend { display: flex; flex-wrap: wrap; gap: 16px; align-items: center; font-size: 12px; margin: 8px 0; }
.legend .swatch { display: inline-block; width: 22px; height: 14px; vertical-align: middle; border: 1px solid #999; margin-right: 4px; }
.legend .ramp { width: 120px; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; }
figcaption { font-size: 12px; color: #333; margin-bottom: 4px; }
.chart .axis-label { fill: #333; }
.chart text { font-family: inherit; }
dl.provenance { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; font-size: 13px; }
dl.provenance dt { font-weight: bold; }
dl.provenance dd { margin: 0; }
code { font-size: 12px; background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
"#;

/// The sorting script: a header click and a `#sort=colN-asc|desc` fragment use the same function,
/// so a shared link (or a test) reproduces a sort without clicking.
const SCRIPT: &str = r#"
(function () {
  'use strict';
  var table = document.getElementById('board');
  var body = document.getElementById('rows');
  if (!table || !body) { return; }
  var heads = Array.prototype.slice.call(table.querySelectorAll('thead th[data-col]'));
  function order(row) { return parseInt(row.getAttribute('data-order'), 10); }
  function key(row, col, numeric) {
    var v = row.cells[col].getAttribute('data-v');
    if (v === null || v === '') { return null; }
    return numeric ? parseFloat(v) : v.toLowerCase();
  }
  function sortBy(col, dir) {
    var th = null;
    heads.forEach(function (h) { if (parseInt(h.getAttribute('data-col'), 10) === col) { th = h; } });
    if (th === null || (dir !== 'asc' && dir !== 'desc')) { return false; }
    var numeric = th.getAttribute('data-type') === 'num';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var ka = key(a, col, numeric), kb = key(b, col, numeric);
      if (ka === null || kb === null) {
        if (ka === kb) { return order(a) - order(b); }
        return ka === null ? 1 : -1;
      }
      var c = numeric ? ka - kb : (ka < kb ? -1 : (ka > kb ? 1 : 0));
      if (c === 0) { return order(a) - order(b); }
      return dir === 'desc' ? -c : c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    heads.forEach(function (h) {
      h.setAttribute('aria-sort', h === th ? (dir === 'asc' ? 'ascending' : 'descending') : 'none');
    });
    table.setAttribute('data-sort', 'col' + col + '-' + dir);
    return true;
  }
  function onHeader(th) {
    var col = parseInt(th.getAttribute('data-col'), 10);
    var state = th.getAttribute('aria-sort');
    var dir = state === 'descending' ? 'asc' : (state === 'ascending' ? 'desc' : th.getAttribute('data-first'));
    if (sortBy(col, dir)) {
      try { history.replaceState(null, '', '#sort=col' + col + '-' + dir); } catch (e) { }
    }
  }
  heads.forEach(function (th) {
    th.addEventListener('click', function () { onHeader(th); });
    th.addEventListener('keydown', function (ev) {
      if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); onHeader(th); }
    });
  });
  function fromHash() {
    var m = /^#sort=col(\d+)-(asc|desc)$/.exec(location.hash);
    if (m) { sortBy(parseInt(m[1], 10), m[2]); }
  }
  window.addEventListener('hashchange', fromHash);
  fromHash();
})();
"#;

/// The whole page.
fn page(board: &Leaderboard) -> Result<String> {
    let scale = GainScale::for_board(board);
    let arch = escape(&board.arch);
    let style = STYLE
        .replace("MISSING_FILL", MISSING_FILL)
        .replace("MISSING_DOT", MISSING_DOT)
        .replace("FAILED_RED", FAILED_RED);
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"recycle {version}\">\n\
         <title>Model recycling leaderboard: {arch}</title>\n<style>{style}</style>\n</head>\n<body>\n\
         <h1>Model recycling leaderboard: {arch}</h1>\n",
        version = escape(&board.provenance.recycle_version),
    );
    summary(&mut out, board);
    table(&mut out, board, &scale);
    let _ = write!(
        out,
        "<section id=\"heatmap-section\">\n<h2>Gain heatmap</h2>\n<p class=\"summary\">Gain over \
         the baseline in points, models (board order) by targets (suite order).</p>\n\
         <div class=\"scroll\">{}</div>\n</section>\n",
        svg::heatmap(board, &scale)
    );
    per_model(&mut out, board, &scale);
    proxies(&mut out, board);
    provenance(&mut out, board);
    let _ = write!(
        out,
        "<script type=\"application/json\" id=\"board-data\">{}</script>\n\
         <script>{SCRIPT}</script>\n</body>\n</html>\n",
        embedded_json(board)?
    );
    Ok(out)
}

fn summary(out: &mut String, board: &Leaderboard) {
    let complete = board.rows.iter().filter(|r| r.avg_gain.is_some()).count();
    let _ = write!(
        out,
        "<p class=\"summary\">{} candidate{} ({complete} complete) on {} target{}, against the \
         baseline <code>{}</code>.",
        board.rows.len(),
        if board.rows.len() == 1 { "" } else { "s" },
        board.targets.len(),
        if board.targets.len() == 1 { "" } else { "s" },
        escape(&model_label(&board.baseline.model)),
    );
    if let Some((row, gain)) = board.rows.iter().find_map(|r| r.avg_gain.map(|g| (r, g))) {
        let _ = write!(
            out,
            " Best complete: <strong>{}</strong> ({} points on average).",
            escape(&model_label(&row.model)),
            fmt_gain(gain)
        );
    }
    out.push_str("</p>\n");
}

/// The model cell's content: the id, then the revision in a muted span.
fn model_html(model: &ModelInfo) -> String {
    match &model.revision {
        Some(rev) => format!(
            "{}<span class=\"rev\">@{}</span>",
            escape(model.label()),
            escape(rev)
        ),
        None => escape(model.label()),
    }
}

fn table(out: &mut String, board: &Leaderboard, scale: &GainScale) {
    out.push_str(
        "<section id=\"leaderboard\">\n<h2>Leaderboard</h2>\n<p class=\"summary\">Gains in \
         points over the baseline's mean; the baseline row shows absolute scores (mean ± std over \
         seeds). Click a column header to sort.</p>\n",
    );
    let _ = write!(
        out,
        "<div class=\"legend\"><span><span class=\"swatch ramp\" style=\"background:{}\"></span>\
         gain {} … {}</span>\
         <span><span class=\"swatch\" style=\"background-color:{};background-image:repeating-linear-gradient(135deg, rgba(255,255,255,0.6) 0 3px, transparent 3px 6px)\"></span>within seed noise (|gain| ≤ baseline std)</span>\
         <span><span class=\"swatch\" style=\"background:{MISSING_FILL};text-align:center;line-height:14px;color:{MISSING_DOT}\">·</span>not run</span>\
         <span><span class=\"swatch\" style=\"background:#fff;border:2px solid {FAILED_RED};text-align:center;line-height:12px;color:{FAILED_RED}\">✕</span>failed</span>\
         <span><span class=\"partial\">partial</span> average over the targets a model has</span></div>\n",
        scale.css_gradient(),
        escape(&fmt_gain(-scale.max_abs())),
        escape(&fmt_gain(scale.max_abs())),
        scale.colour(scale.max_abs() * 0.5),
    );
    out.push_str(
        "<div class=\"scroll\">\n<table id=\"board\" class=\"board\" data-sort=\"board\">\n<thead><tr>\
         <th data-col=\"0\" data-type=\"num\" data-first=\"asc\" aria-sort=\"none\" tabindex=\"0\">Rank</th>\
         <th data-col=\"1\" data-type=\"text\" data-first=\"asc\" aria-sort=\"none\" tabindex=\"0\" class=\"model\">Model</th>\
         <th data-col=\"2\" data-type=\"num\" data-first=\"desc\" aria-sort=\"none\" tabindex=\"0\">Avg gain</th>\
         <th data-col=\"3\" data-type=\"num\" data-first=\"desc\" aria-sort=\"none\" tabindex=\"0\">Coverage</th>",
    );
    for (j, target) in board.targets.iter().enumerate() {
        let _ = write!(
            out,
            "<th data-col=\"{}\" data-type=\"num\" data-first=\"desc\" aria-sort=\"none\" \
             tabindex=\"0\">{}<span class=\"metric\">{}</span></th>",
            FIRST_TARGET_COL + j,
            escape(&target.name),
            metric_name(target.metric)
        );
    }
    out.push_str("</tr></thead>\n");
    baseline_row(out, board);
    out.push_str("<tbody id=\"rows\">\n");
    for (i, row) in board.rows.iter().enumerate() {
        candidate_row(out, board, i, row, scale);
    }
    out.push_str("</tbody>\n</table>\n</div>\n</section>\n");
}

fn baseline_row(out: &mut String, board: &Leaderboard) {
    let base = &board.baseline;
    let covered = base.cells.iter().filter(|c| c.mean.is_some()).count();
    let avg = match base.avg_score {
        Some(a) => format!("{} <span class=\"metric\">score</span>", fmt_num(a)),
        None => "—".to_string(),
    };
    let _ = write!(
        out,
        "<tbody id=\"baseline\"><tr class=\"baseline\" data-model=\"{}\"><td>—</td>\
         <td class=\"model\">{}</td><td title=\"average absolute score\">{avg}</td><td>{covered}/{}</td>",
        escape(&model_label(&base.model)),
        model_html(&base.model),
        base.cells.len(),
    );
    for (cell, target) in base.cells.iter().zip(&board.targets) {
        out.push_str(&baseline_cell(cell, &target.name));
    }
    out.push_str("</tr></tbody>\n");
}

fn baseline_cell(cell: &BaselineCell, target: &str) -> String {
    let seeds: Vec<String> = cell.scores.iter().map(|s| fmt_num(*s)).collect();
    let failed = if cell.failed > 0 {
        format!(", {} failed", cell.failed)
    } else {
        String::new()
    };
    let tip = escape(&format!(
        "baseline on {target}: seeds [{}]{failed}",
        seeds.join(", ")
    ));
    match cell.mean {
        Some(mean) => {
            let std = match cell.std {
                Some(s) => format!(" ± {}", fmt_num(s)),
                None => String::new(),
            };
            let failed_note = if cell.failed > 0 {
                format!(" <span class=\"partial\">{} failed</span>", cell.failed)
            } else {
                String::new()
            };
            format!(
                "<td class=\"cell base\" title=\"{tip}\">{}{std}{failed_note}</td>",
                fmt_num(mean)
            )
        }
        None if cell.failed > 0 => {
            format!("<td class=\"cell failed\" title=\"{tip}\">\u{2715}</td>")
        }
        None => format!("<td class=\"cell missing\" title=\"{tip}\">·</td>"),
    }
}

fn candidate_row(out: &mut String, board: &Leaderboard, i: usize, row: &Row, scale: &GainScale) {
    let label = model_label(&row.model);
    let (rank_v, rank_text) = match row.rank {
        Some(r) => (r.to_string(), r.to_string()),
        None => (String::new(), "—".to_string()),
    };
    let (avg_v, avg_text) = match (row.avg_gain, row.partial_avg_gain) {
        (Some(g), _) => (g.to_string(), fmt_gain(g)),
        (None, Some(p)) => (
            p.to_string(),
            format!(
                "{}<span class=\"partial\" title=\"average over {} of {} targets\">partial</span>",
                fmt_gain(p),
                row.coverage.done,
                row.coverage.total
            ),
        ),
        (None, None) => (String::new(), "—".to_string()),
    };
    let _ = write!(
        out,
        "<tr data-order=\"{i}\" data-model=\"{}\"><td data-v=\"{rank_v}\">{rank_text}</td>\
         <td class=\"model\" data-v=\"{}\"><a href=\"#model-{i}\">{}</a></td>\
         <td data-v=\"{avg_v}\">{avg_text}</td>\
         <td data-v=\"{}\">{}/{}</td>",
        escape(&label),
        escape(&label),
        model_html(&row.model),
        row.coverage.done,
        row.coverage.done,
        row.coverage.total,
    );
    for (cell, target) in row.cells.iter().zip(&board.targets) {
        match cell {
            Cell::Done {
                score,
                gain,
                seeds,
                within_noise,
            } => {
                let noise = if *within_noise { " noise" } else { "" };
                let tip = format!(
                    "{label} on {}: score {} ({seeds} seed{}), gain {}{}",
                    target.name,
                    fmt_num(*score),
                    if *seeds == 1 { "" } else { "s" },
                    fmt_gain(*gain),
                    if *within_noise {
                        ", within seed noise"
                    } else {
                        ""
                    }
                );
                let _ = write!(
                    out,
                    "<td class=\"cell done{noise}\" data-v=\"{}\" style=\"background-color:{};color:{}\" \
                     title=\"{}\"><span>{}</span></td>",
                    if gain.is_finite() {
                        gain.to_string()
                    } else {
                        String::new()
                    },
                    scale.colour(*gain),
                    scale.text_colour(*gain),
                    escape(&tip),
                    fmt_gain(*gain)
                );
            }
            Cell::Missing => {
                let _ = write!(
                    out,
                    "<td class=\"cell missing\" data-v=\"\" title=\"{}\">·</td>",
                    escape(&format!("{label} on {}: not run", target.name))
                );
            }
            Cell::Failed { error } => {
                let _ = write!(
                    out,
                    "<td class=\"cell failed\" data-v=\"\" title=\"{}\">\u{2715}</td>",
                    escape(&format!("{label} on {}: failed: {error}", target.name))
                );
            }
        }
    }
    out.push_str("</tr>\n");
}

fn per_model(out: &mut String, board: &Leaderboard, scale: &GainScale) {
    if board.rows.is_empty() {
        return;
    }
    out.push_str(
        "<section id=\"per-model\">\n<h2>Gain by target, per model</h2>\n<p class=\"summary\">\
         One chart per candidate on a shared scale; hatched bars are within the baseline's seed \
         noise, a grey dot is a target not run, a red ✕ a failed one.</p>\n<div class=\"charts\">\n",
    );
    for (i, row) in board.rows.iter().enumerate() {
        let avg = match (row.avg_gain, row.partial_avg_gain) {
            (Some(g), _) => format!("average {}", fmt_gain(g)),
            (None, Some(p)) => format!("partial average {}", fmt_gain(p)),
            (None, None) => "no average".to_string(),
        };
        let _ = write!(
            out,
            "<figure id=\"model-{i}\"><figcaption><strong>{}</strong> — {} · {}/{} targets</figcaption>{}</figure>\n",
            escape(&model_label(&row.model)),
            escape(&avg),
            row.coverage.done,
            row.coverage.total,
            svg::gain_bars(board, i, row, scale)
        );
    }
    out.push_str("</div>\n</section>\n");
}

fn proxies(out: &mut String, board: &Leaderboard) {
    let names: BTreeSet<&str> = board
        .rows
        .iter()
        .flat_map(|r| r.proxies.keys().map(String::as_str))
        .collect();
    if names.is_empty() {
        return;
    }
    out.push_str(
        "<section id=\"proxies\">\n<h2>Proxies against average gain</h2>\n<p class=\"summary\">\
         Correlations use complete rows only; hollow dots are partial averages.</p>\n<div class=\"charts\">\n",
    );
    for (k, name) in names.iter().enumerate() {
        let points: Vec<ScatterPoint> = board
            .rows
            .iter()
            .filter_map(|r| {
                let x = *r.proxies.get(*name)?;
                let (y, complete) = match (r.avg_gain, r.partial_avg_gain) {
                    (Some(g), _) => (g, true),
                    (None, Some(p)) => (p, false),
                    (None, None) => return None,
                };
                Some(ScatterPoint {
                    label: model_label(&r.model),
                    x,
                    y,
                    complete,
                })
            })
            .collect();
        let (xs, ys): (Vec<f64>, Vec<f64>) = points
            .iter()
            .filter(|p| p.complete)
            .map(|p| (p.x, p.y))
            .unzip();
        let shown = |r: Option<f64>| r.map(fmt_num).unwrap_or_else(|| "n/a".to_string());
        let _ = write!(
            out,
            "<figure class=\"proxy\" data-proxy=\"{name}\"><figcaption><strong>{name}</strong>: \
             Pearson r = <span class=\"pearson\">{}</span>, Spearman ρ = <span class=\"spearman\">{}</span> \
             (n = {})</figcaption>{}</figure>\n",
            shown(corr::pearson(&xs, &ys)),
            shown(corr::spearman(&xs, &ys)),
            xs.len(),
            svg::scatter(&format!("proxy-{k}"), &points, name, "average gain (points)"),
            name = escape(name),
        );
    }
    out.push_str("</div>\n</section>\n");
}

fn provenance(out: &mut String, board: &Leaderboard) {
    let p = &board.provenance;
    let codes = |items: &[String]| {
        if items.is_empty() {
            "none".to_string()
        } else {
            items
                .iter()
                .map(|s| format!("<code>{}</code>", escape(s)))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    let _ = write!(
        out,
        "<section id=\"provenance\">\n<h2>Provenance</h2>\n<dl class=\"provenance\">\
         <dt>architecture</dt><dd>{}</dd>\
         <dt>recycle version</dt><dd>{}</dd>\
         <dt>generated at</dt><dd>{}</dd>\
         <dt>leaderboard schema</dt><dd>{}</dd>\
         <dt>suites</dt><dd>{}</dd>\
         <dt>protocol hashes</dt><dd>{}</dd>\
         <dt>result records</dt><dd>{}</dd></dl>\n",
        escape(&board.arch),
        escape(&p.recycle_version),
        escape(&p.generated_at),
        board.schema_version,
        codes(&p.suites),
        codes(&p.protocol_hashes),
        p.results,
    );
    out.push_str(
        "<h3>Revisions</h3>\n<table class=\"board revisions\"><thead><tr><th class=\"model\">Model</th>\
         <th class=\"model\">Revision</th></tr></thead><tbody>\n",
    );
    for model in std::iter::once(&board.baseline.model).chain(board.rows.iter().map(|r| &r.model)) {
        let _ = writeln!(
            out,
            "<tr><td class=\"model\">{}</td><td class=\"model\">{}</td></tr>",
            escape(&model.id),
            match &model.revision {
                Some(rev) => format!("<code>{}</code>", escape(rev)),
                None => "unpinned".to_string(),
            }
        );
    }
    out.push_str("</tbody></table>\n</section>\n");
}

/// Pearson and Spearman correlations for the proxy scatter.
mod corr {
    /// Pearson's r; `None` with fewer than three pairs or a constant side.
    pub fn pearson(xs: &[f64], ys: &[f64]) -> Option<f64> {
        if xs.len() != ys.len() || xs.len() < 3 {
            return None;
        }
        let n = xs.len() as f64;
        let mx = xs.iter().sum::<f64>() / n;
        let my = ys.iter().sum::<f64>() / n;
        let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
        for (x, y) in xs.iter().zip(ys) {
            sxy += (x - mx) * (y - my);
            sxx += (x - mx) * (x - mx);
            syy += (y - my) * (y - my);
        }
        let r = sxy / (sxx * syy).sqrt();
        if r.is_finite() && sxx > 0.0 && syy > 0.0 {
            Some(r.clamp(-1.0, 1.0))
        } else {
            None
        }
    }

    /// 1-based ranks, ties sharing their average rank.
    pub fn ranks(values: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
        let mut out = vec![0.0; values.len()];
        let mut start = 0;
        while start < idx.len() {
            let mut end = start + 1;
            while end < idx.len() && values[idx[end]] == values[idx[start]] {
                end += 1;
            }
            let rank = (start + 1 + end) as f64 / 2.0;
            for &i in &idx[start..end] {
                out[i] = rank;
            }
            start = end;
        }
        out
    }

    /// Spearman's ρ: Pearson's r of the ranks.
    pub fn spearman(xs: &[f64], ys: &[f64]) -> Option<f64> {
        pearson(&ranks(xs), &ranks(ys))
    }
}

#[cfg(test)]
mod tests {
    use super::corr::{pearson, ranks, spearman};
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape("plain ü"), "plain ü");
    }

    #[test]
    fn numbers_never_show_negative_zero() {
        assert_eq!(fmt_num(-0.001), "0.00");
        assert_eq!(fmt_gain(-0.001), "0.00");
        assert_eq!(fmt_gain(1.005_1), "+1.01");
        assert_eq!(fmt_gain(-2.5), "-2.50");
        assert_eq!(fmt_num(f64::NAN), "n/a");
    }

    #[test]
    fn pearson_of_linear_data_is_one() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        let ys: Vec<f64> = xs.iter().map(|x| 3.0 * x - 1.0).collect();
        let r = pearson(&xs, &ys).unwrap();
        assert!((r - 1.0).abs() < 1e-12, "{r}");
        let neg: Vec<f64> = xs.iter().map(|x| -x).collect();
        assert!((pearson(&xs, &neg).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&xs, &[1.0, 1.0, 1.0, 1.0]), None);
        assert_eq!(pearson(&[1.0, 2.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn pearson_matches_the_textbook_formula() {
        let xs = [1.0, 2.0, 3.0];
        let ys = [2.0, 4.0, 3.0];
        // By hand: x̄ = 2, ȳ = 3, dx = (-1, 0, 1), dy = (-1, 1, 0): Σdxdy = 1, Σdx² = 2, Σdy² = 2 → r = 1/2.
        assert!((pearson(&xs, &ys).unwrap() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[10.0, 30.0, 20.0, 30.0]), vec![1.0, 3.5, 2.0, 3.5]);
    }

    #[test]
    fn spearman_sees_monotone_not_linear() {
        let xs = [1.0, 2.0, 3.0, 4.0, 5.0];
        let ys = [1.0, 8.0, 27.0, 64.0, 125.0];
        assert!((spearman(&xs, &ys).unwrap() - 1.0).abs() < 1e-12);
        assert!(pearson(&xs, &ys).unwrap() < 0.99);
    }
}
