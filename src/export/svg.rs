//! Inline SVG charts for the HTML report (gain heatmap, per-model gain bars, proxy scatter), drawn
//! in Rust so that the report needs no script or network to show them and one board always gives
//! the same bytes.

use super::html::{escape, fmt_gain, fmt_num, model_label};
use crate::leaderboard::{Cell, Leaderboard, Row};
use std::fmt::Write;

/// Font size of every label, in px; text widths below are estimated from it.
const FONT_PX: f64 = 11.0;
/// Estimated advance of one character at `FONT_PX` (sans-serif, generous so labels never clip).
const CHAR_PX: f64 = 6.6;
/// sin(45°) = cos(45°): labels under the target columns are rotated by −45°.
const DIAG: f64 = std::f64::consts::FRAC_1_SQRT_2;

/// Smallest half-range of the colour scale, in points: a board whose gains are all tiny must not
/// paint them as strongly as large ones.
const MIN_SCALE_POINTS: f64 = 0.5;

/// Colour of the most negative gain (red), of zero (near white) and of the most positive (blue).
const NEG_RGB: [f64; 3] = [178.0, 24.0, 43.0];
const MID_RGB: [f64; 3] = [247.0, 247.0, 247.0];
const POS_RGB: [f64; 3] = [33.0, 102.0, 172.0];

/// Fill of a missing cell and colour of a failed one, shared by the table's CSS.
pub const MISSING_FILL: &str = "#d9d9d9";
pub const MISSING_DOT: &str = "#6e6e6e";
pub const FAILED_RED: &str = "#c0392b";

/// The diverging colour scale of gains: symmetric around zero, saturating at ±`max_abs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GainScale {
    max_abs: f64,
}

impl GainScale {
    /// A scale whose ends are the largest |gain| of the board's finished cells.
    pub fn for_board(board: &Leaderboard) -> Self {
        let max_abs = board
            .rows
            .iter()
            .flat_map(|row| row.cells.iter())
            .filter_map(|cell| match cell {
                Cell::Done { gain, .. } if gain.is_finite() => Some(gain.abs()),
                _ => None,
            })
            .fold(MIN_SCALE_POINTS, f64::max);
        GainScale { max_abs }
    }

    /// Half-range of the scale, in points.
    pub fn max_abs(&self) -> f64 {
        self.max_abs
    }

    /// Position of `gain` on the scale, in [−1, 1].
    fn position(&self, gain: f64) -> f64 {
        if gain.is_finite() {
            (gain / self.max_abs).clamp(-1.0, 1.0)
        } else {
            0.0
        }
    }

    /// Background colour of a gain, as `#rrggbb`.
    pub fn colour(&self, gain: f64) -> String {
        let t = self.position(gain);
        let end = if t < 0.0 { NEG_RGB } else { POS_RGB };
        let a = t.abs();
        let channel = |i: usize| (MID_RGB[i] + (end[i] - MID_RGB[i]) * a).round() as u8;
        format!("#{:02x}{:02x}{:02x}", channel(0), channel(1), channel(2))
    }

    /// Text colour readable on `colour(gain)`.
    pub fn text_colour(&self, gain: f64) -> &'static str {
        if self.position(gain).abs() > 0.55 {
            "#ffffff"
        } else {
            "#1a1a1a"
        }
    }

    /// A CSS `linear-gradient` from the most negative to the most positive colour.
    pub fn css_gradient(&self) -> String {
        format!(
            "linear-gradient(to right, {}, {}, {})",
            self.colour(-self.max_abs),
            self.colour(0.0),
            self.colour(self.max_abs)
        )
    }
}

/// A gain with one decimal and its sign, short enough for a heatmap cell (`0.0`, never `-0.0`).
fn short_gain(gain: f64) -> String {
    let s = format!("{gain:+.1}");
    match s.as_str() {
        "+0.0" | "-0.0" => "0.0".to_string(),
        _ if gain.is_finite() => s,
        _ => "n/a".to_string(),
    }
}

/// A coordinate, with one decimal so output is stable and short.
fn c(x: f64) -> String {
    format!("{x:.1}")
}

/// Estimated width in px of `text` at `FONT_PX`.
fn text_px(text: &str) -> f64 {
    text.chars().count() as f64 * CHAR_PX
}

/// The hatching drawn over gains inside the baseline's seed-noise band, under a document-unique id.
fn hatch_pattern(id: &str) -> String {
    format!(
        "<pattern id=\"{id}\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" \
         patternTransform=\"rotate(45)\"><rect width=\"3\" height=\"6\" fill=\"#ffffff\" \
         fill-opacity=\"0.6\"/></pattern>"
    )
}

/// A `<title>` child: the tooltip of the element it sits in.
fn title(text: &str) -> String {
    format!("<title>{}</title>", escape(text))
}

/// The tooltip of one candidate cell.
fn cell_tooltip(model: &str, target: &str, cell: &Cell) -> String {
    match cell {
        Cell::Done {
            score,
            gain,
            seeds,
            within_noise,
        } => format!(
            "{model} on {target}: gain {} (score {}, {seeds} seed{}){}",
            fmt_gain(*gain),
            fmt_num(*score),
            if *seeds == 1 { "" } else { "s" },
            if *within_noise {
                ", within seed noise"
            } else {
                ""
            }
        ),
        Cell::Missing => format!("{model} on {target}: not run"),
        Cell::Failed { error } => format!("{model} on {target}: failed: {error}"),
    }
}

/// Labels of the target columns, rotated by −45° and anchored at (`x`, `y`) of each column.
fn diagonal_labels(out: &mut String, names: &[&str], x0: f64, slot: f64, y: f64) {
    for (j, name) in names.iter().enumerate() {
        let x = x0 + slot * (j as f64 + 0.5);
        let _ = write!(
            out,
            "<text class=\"axis-label\" x=\"{x}\" y=\"{y}\" transform=\"rotate(-45 {x} {y})\">{}</text>",
            escape(name),
            x = c(x),
            y = c(y),
        );
    }
}

/// The gain heatmap: one row per candidate (board order), one column per target (suite order).
pub fn heatmap(board: &Leaderboard, scale: &GainScale) -> String {
    const CELL_W: f64 = 46.0;
    const CELL_H: f64 = 22.0;
    const LEGEND_H: f64 = 64.0;
    let labels: Vec<String> = board.rows.iter().map(|r| model_label(&r.model)).collect();
    let targets: Vec<&str> = board.targets.iter().map(|t| t.name.as_str()).collect();
    let longest_target = targets.iter().map(|t| text_px(t)).fold(0.0, f64::max);
    let left = labels.iter().map(|l| text_px(l)).fold(60.0, f64::max) + 12.0;
    let top = longest_target * DIAG + 14.0;
    let grid_w = CELL_W * targets.len() as f64;
    let grid_h = CELL_H * labels.len() as f64;
    let width = (left + grid_w + longest_target * DIAG + 8.0).max(left + 380.0);
    let height = top + grid_h + LEGEND_H;

    let mut out = String::new();
    let _ = write!(
        out,
        "<svg id=\"heatmap\" class=\"chart heatmap\" xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
         aria-label=\"Gain heatmap: {rows} models by {cols} targets\" font-size=\"{FONT_PX}\">",
        w = c(width),
        h = c(height),
        rows = labels.len(),
        cols = targets.len(),
    );
    let _ = write!(
        out,
        "<defs>{}<linearGradient id=\"hm-grad\"><stop offset=\"0\" stop-color=\"{}\"/>\
         <stop offset=\"0.5\" stop-color=\"{}\"/><stop offset=\"1\" stop-color=\"{}\"/>\
         </linearGradient></defs>",
        hatch_pattern("hm-hatch"),
        scale.colour(-scale.max_abs()),
        scale.colour(0.0),
        scale.colour(scale.max_abs()),
    );
    diagonal_labels(&mut out, &targets, left, CELL_W, top - 6.0);

    for (i, (row, label)) in board.rows.iter().zip(&labels).enumerate() {
        let y = top + CELL_H * i as f64;
        let _ = write!(
            out,
            "<text class=\"axis-label\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            c(left - 6.0),
            c(y + CELL_H / 2.0 + 4.0),
            escape(label)
        );
        for (j, (cell, target)) in row.cells.iter().zip(&targets).enumerate() {
            let x = left + CELL_W * j as f64;
            let tip = title(&cell_tooltip(label, target, cell));
            let (cx, cy) = (x + CELL_W / 2.0, y + CELL_H / 2.0);
            match cell {
                Cell::Done {
                    gain, within_noise, ..
                } => {
                    let noise = if *within_noise { " noise" } else { "" };
                    let _ = write!(
                        out,
                        "<g class=\"hm-cell done{noise}\">{tip}<rect x=\"{}\" y=\"{}\" \
                         width=\"{CELL_W}\" height=\"{CELL_H}\" fill=\"{}\" stroke=\"#ffffff\"/>",
                        c(x),
                        c(y),
                        scale.colour(*gain)
                    );
                    if *within_noise {
                        let _ = write!(
                            out,
                            "<rect x=\"{}\" y=\"{}\" width=\"{CELL_W}\" height=\"{CELL_H}\" \
                             fill=\"url(#hm-hatch)\"/>",
                            c(x),
                            c(y)
                        );
                    }
                    let _ = write!(
                        out,
                        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{}\" \
                         font-size=\"10\">{}</text></g>",
                        c(cx),
                        c(cy + 3.5),
                        scale.text_colour(*gain),
                        short_gain(*gain)
                    );
                }
                Cell::Missing => {
                    let _ = write!(
                        out,
                        "<g class=\"hm-cell missing\">{tip}<rect x=\"{}\" y=\"{}\" \
                         width=\"{CELL_W}\" height=\"{CELL_H}\" fill=\"{MISSING_FILL}\" \
                         stroke=\"#ffffff\"/><circle cx=\"{}\" cy=\"{}\" r=\"2.5\" \
                         fill=\"{MISSING_DOT}\"/></g>",
                        c(x),
                        c(y),
                        c(cx),
                        c(cy)
                    );
                }
                Cell::Failed { .. } => {
                    let _ = write!(
                        out,
                        "<g class=\"hm-cell failed\">{tip}<rect x=\"{}\" y=\"{}\" \
                         width=\"{}\" height=\"{}\" fill=\"#ffffff\" stroke=\"{FAILED_RED}\" \
                         stroke-width=\"2\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" \
                         fill=\"{FAILED_RED}\" font-size=\"12\">\u{2715}</text></g>",
                        c(x + 1.0),
                        c(y + 1.0),
                        c(CELL_W - 2.0),
                        c(CELL_H - 2.0),
                        c(cx),
                        c(cy + 4.0)
                    );
                }
            }
        }
    }

    // Legend: the colour ramp with its ends, then one swatch per special state.
    let ly = top + grid_h + 18.0;
    let lx = 8.0;
    let _ = write!(
        out,
        "<g class=\"legend\"><text x=\"{}\" y=\"{}\">gain (points)</text>\
         <rect x=\"{}\" y=\"{}\" width=\"160\" height=\"12\" fill=\"url(#hm-grad)\" stroke=\"#999999\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"start\">{}</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">0</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        c(lx),
        c(ly),
        c(lx),
        c(ly + 6.0),
        c(lx),
        c(ly + 32.0),
        escape(&fmt_gain(-scale.max_abs())),
        c(lx + 80.0),
        c(ly + 32.0),
        c(lx + 160.0),
        c(ly + 32.0),
        escape(&fmt_gain(scale.max_abs())),
    );
    let sx = lx + 190.0;
    let _ = write!(
        out,
        "<rect x=\"{x0}\" y=\"{y0}\" width=\"16\" height=\"12\" fill=\"{mid}\" stroke=\"#999999\"/>\
         <rect x=\"{x0}\" y=\"{y0}\" width=\"16\" height=\"12\" fill=\"url(#hm-hatch)\"/>\
         <text x=\"{t0}\" y=\"{ty}\">within seed noise</text>\
         <rect x=\"{x1}\" y=\"{y0}\" width=\"16\" height=\"12\" fill=\"{MISSING_FILL}\"/>\
         <circle cx=\"{c1}\" cy=\"{cy}\" r=\"2.5\" fill=\"{MISSING_DOT}\"/>\
         <text x=\"{t1}\" y=\"{ty}\">not run</text>\
         <rect x=\"{x2}\" y=\"{y0}\" width=\"16\" height=\"12\" fill=\"#ffffff\" \
         stroke=\"{FAILED_RED}\" stroke-width=\"2\"/>\
         <text x=\"{c2}\" y=\"{ty}\" text-anchor=\"middle\" fill=\"{FAILED_RED}\">\u{2715}</text>\
         <text x=\"{t2}\" y=\"{ty}\">failed</text></g></svg>",
        x0 = c(sx),
        y0 = c(ly + 6.0),
        mid = scale.colour(scale.max_abs() * 0.5),
        t0 = c(sx + 22.0),
        ty = c(ly + 16.0),
        x1 = c(sx + 140.0),
        c1 = c(sx + 148.0),
        cy = c(ly + 12.0),
        t1 = c(sx + 162.0),
        x2 = c(sx + 215.0),
        c2 = c(sx + 223.0),
        t2 = c(sx + 237.0),
    );
    out
}

/// One candidate's gain on each target as bars around a zero line; the y range is shared by every
/// model (`scale`) so that the charts compare by eye. `index` makes the element ids unique.
pub fn gain_bars(board: &Leaderboard, index: usize, row: &Row, scale: &GainScale) -> String {
    const SLOT: f64 = 34.0;
    const BAR_W: f64 = 22.0;
    const HALF_H: f64 = 70.0;
    const LEFT: f64 = 52.0;
    let label = model_label(&row.model);
    let targets: Vec<&str> = board.targets.iter().map(|t| t.name.as_str()).collect();
    let longest_target = targets.iter().map(|t| text_px(t)).fold(0.0, f64::max);
    let top = 10.0;
    let zero_y = top + HALF_H;
    let bottom = top + 2.0 * HALF_H;
    let width = LEFT + SLOT * targets.len() as f64 + longest_target * DIAG + 8.0;
    let height = bottom + 12.0 + longest_target * DIAG + 6.0;
    let hatch = format!("bars{index}-hatch");
    let per_point = HALF_H / scale.max_abs();

    let mut out = String::new();
    let _ = write!(
        out,
        "<svg id=\"bars-{index}\" class=\"chart bars\" xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
         aria-label=\"Gain by target of {label}\" font-size=\"{FONT_PX}\"><defs>{pattern}</defs>",
        w = c(width),
        h = c(height),
        label = escape(&label),
        pattern = hatch_pattern(&hatch),
    );
    // The y axis: ticks at −max, 0 and +max.
    for (value, y) in [
        (scale.max_abs(), top),
        (0.0, zero_y),
        (-scale.max_abs(), bottom),
    ] {
        let _ = write!(
            out,
            "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"1\"/>\
             <text class=\"axis-label\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            c(LEFT - 4.0),
            c(LEFT + SLOT * targets.len() as f64),
            if value == 0.0 { "#555555" } else { "#e0e0e0" },
            c(LEFT - 6.0),
            c(y + 4.0),
            escape(&fmt_gain(value)),
            y = c(y),
        );
    }
    for (j, (cell, target)) in row.cells.iter().zip(&targets).enumerate() {
        let cx = LEFT + SLOT * (j as f64 + 0.5);
        let tip = title(&cell_tooltip(&label, target, cell));
        match cell {
            Cell::Done {
                gain, within_noise, ..
            } => {
                let g = if gain.is_finite() {
                    gain.clamp(-scale.max_abs(), scale.max_abs())
                } else {
                    0.0
                };
                let h = (g.abs() * per_point).max(1.0);
                let y = if g >= 0.0 { zero_y - h } else { zero_y };
                let noise = if *within_noise { " noise" } else { "" };
                let _ = write!(
                    out,
                    "<g class=\"bar done{noise}\">{tip}<rect x=\"{x}\" y=\"{y}\" width=\"{BAR_W}\" \
                     height=\"{h}\" fill=\"{fill}\" stroke=\"#4d4d4d\" stroke-width=\"0.5\"/>",
                    x = c(cx - BAR_W / 2.0),
                    y = c(y),
                    h = c(h),
                    fill = scale.colour(*gain),
                );
                if *within_noise {
                    let _ = write!(
                        out,
                        "<rect x=\"{}\" y=\"{}\" width=\"{BAR_W}\" height=\"{}\" fill=\"url(#{hatch})\"/>",
                        c(cx - BAR_W / 2.0),
                        c(y),
                        c(h)
                    );
                }
                out.push_str("</g>");
            }
            Cell::Missing => {
                let _ = write!(
                    out,
                    "<g class=\"bar missing\">{tip}<circle cx=\"{}\" cy=\"{}\" r=\"3\" \
                     fill=\"{MISSING_DOT}\"/></g>",
                    c(cx),
                    c(zero_y)
                );
            }
            Cell::Failed { .. } => {
                let _ = write!(
                    out,
                    "<g class=\"bar failed\">{tip}<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" \
                     fill=\"{FAILED_RED}\" font-size=\"14\">\u{2715}</text></g>",
                    c(cx),
                    c(zero_y + 5.0)
                );
            }
        }
    }
    // Target labels start just under each bar and run down-left, so they never overlap the plot.
    for (j, name) in targets.iter().enumerate() {
        let x = LEFT + SLOT * (j as f64 + 0.5);
        let y = bottom + 12.0;
        let _ = write!(
            out,
            "<text class=\"axis-label\" x=\"{x}\" y=\"{y}\" text-anchor=\"end\" \
             transform=\"rotate(-45 {x} {y})\">{}</text>",
            escape(name),
            x = c(x),
            y = c(y),
        );
    }
    out.push_str("</svg>");
    out
}

/// One model in a proxy scatter.
#[derive(Debug, Clone, PartialEq)]
pub struct ScatterPoint {
    pub label: String,
    /// The proxy score.
    pub x: f64,
    /// The model's average gain (partial for an incomplete row).
    pub y: f64,
    /// Whether `y` is a full average (filled dot) or a partial one (hollow dot).
    pub complete: bool,
}

/// Ticks of an axis: `n` evenly spaced values from `lo` to `hi`.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64)
        .collect()
}

/// The range of `values`, padded by 8% on each side (±1 around a single value).
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (-1.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.08 } else { 1.0 };
    (lo - pad, hi + pad)
}

/// A scatter of a proxy score (x) against average gain (y), one dot per model. `id` must be
/// unique in the document.
pub fn scatter(id: &str, points: &[ScatterPoint], x_label: &str, y_label: &str) -> String {
    const W: f64 = 460.0;
    const H: f64 = 320.0;
    const LEFT: f64 = 62.0;
    const RIGHT: f64 = 16.0;
    const TOP: f64 = 14.0;
    const BOTTOM: f64 = 46.0;
    let (x_lo, x_hi) = padded_range(points.iter().map(|p| p.x));
    let (y_lo, y_hi) = padded_range(points.iter().map(|p| p.y));
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w;
    let py = |y: f64| TOP + (y_hi - y) / (y_hi - y_lo) * plot_h;

    let mut out = String::new();
    let _ = write!(
        out,
        "<svg id=\"{id}\" class=\"chart scatter\" xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" \
         aria-label=\"{}\" font-size=\"{FONT_PX}\">\
         <rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999999\"/>",
        escape(&format!("{y_label} against {x_label}")),
        c(plot_w),
        c(plot_h),
        id = escape(id),
    );
    for t in ticks(x_lo, x_hi, 5) {
        let _ = write!(
            out,
            "<line x1=\"{x}\" y1=\"{TOP}\" x2=\"{x}\" y2=\"{}\" stroke=\"#eeeeee\"/>\
             <text class=\"axis-label\" x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            c(TOP + plot_h),
            c(TOP + plot_h + 14.0),
            escape(&fmt_num(t)),
            x = c(px(t)),
        );
    }
    for t in ticks(y_lo, y_hi, 5) {
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eeeeee\"/>\
             <text class=\"axis-label\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            c(LEFT + plot_w),
            c(LEFT - 4.0),
            c(py(t) + 4.0),
            escape(&fmt_num(t)),
            y = c(py(t)),
        );
    }
    if y_lo < 0.0 && y_hi > 0.0 {
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#777777\" \
             stroke-dasharray=\"4 3\"/>",
            c(LEFT + plot_w),
            y = c(py(0.0)),
        );
    }
    let _ = write!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\
         <text x=\"14\" y=\"{y}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {y})\">{}</text>",
        c(LEFT + plot_w / 2.0),
        c(H - 8.0),
        escape(x_label),
        escape(y_label),
        y = c(TOP + plot_h / 2.0),
    );
    // Name the dots when there are few enough to read.
    let named = points.len() <= 12;
    for p in points {
        if !(p.x.is_finite() && p.y.is_finite()) {
            continue;
        }
        let fill = if p.complete { "#2166ac" } else { "#ffffff" };
        let _ = write!(
            out,
            "<g class=\"point{}\">{}<circle cx=\"{}\" cy=\"{}\" r=\"4.5\" fill=\"{fill}\" \
             stroke=\"#2166ac\" stroke-width=\"1.5\"/>",
            if p.complete { "" } else { " partial" },
            title(&format!(
                "{}: {x_label} {}, {} {}",
                p.label,
                fmt_num(p.x),
                if p.complete {
                    "average gain"
                } else {
                    "partial average gain"
                },
                fmt_gain(p.y)
            )),
            c(px(p.x)),
            c(py(p.y)),
        );
        if named {
            // Labels of dots in the right half run leftwards, so they stay inside the chart.
            let right = px(p.x) > LEFT + plot_w / 2.0;
            let _ = write!(
                out,
                "<text class=\"point-label\" x=\"{}\" y=\"{}\" font-size=\"9\" \
                 text-anchor=\"{}\">{}</text>",
                c(if right { px(p.x) - 6.0 } else { px(p.x) + 6.0 }),
                c(py(p.y) - 5.0),
                if right { "end" } else { "start" },
                escape(&p.label)
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_scale_is_diverging_and_saturates() {
        let scale = GainScale { max_abs: 2.0 };
        assert_eq!(scale.colour(0.0), "#f7f7f7");
        assert_eq!(scale.colour(2.0), "#2166ac");
        assert_eq!(scale.colour(-2.0), "#b2182b");
        assert_eq!(scale.colour(9.0), scale.colour(2.0));
        assert_eq!(scale.colour(-9.0), scale.colour(-2.0));
        assert_eq!(scale.colour(f64::NAN), scale.colour(0.0));
        // Halfway is halfway between near-white and the end, per channel:
        // (247+33)/2 = 140, (247+102)/2 = 174.5 → 175, (247+172)/2 = 209.5 → 210.
        assert_eq!(scale.colour(1.0), "#8cafd2");
    }

    #[test]
    fn text_on_strong_colours_is_white() {
        let scale = GainScale { max_abs: 1.0 };
        assert_eq!(scale.text_colour(0.9), "#ffffff");
        assert_eq!(scale.text_colour(-0.9), "#ffffff");
        assert_eq!(scale.text_colour(0.1), "#1a1a1a");
    }

    #[test]
    fn short_gains_have_a_sign_but_no_negative_zero() {
        assert_eq!(short_gain(0.04), "0.0");
        assert_eq!(short_gain(-0.04), "0.0");
        assert_eq!(short_gain(1.26), "+1.3");
        assert_eq!(short_gain(-8.0), "-8.0");
    }

    #[test]
    fn padded_range_handles_one_value_and_none() {
        assert_eq!(padded_range([3.0].into_iter()), (2.0, 4.0));
        assert_eq!(padded_range(std::iter::empty()), (-1.0, 1.0));
        let (lo, hi) = padded_range([0.0, 10.0].into_iter());
        assert!(lo < 0.0 && hi > 10.0);
    }

    #[test]
    fn scatter_escapes_labels() {
        let svg = scatter(
            "s",
            &[ScatterPoint {
                label: "<b>&".into(),
                x: 1.0,
                y: 2.0,
                complete: true,
            }],
            "x<",
            "y>",
        );
        assert!(!svg.contains("<b>"));
        assert!(svg.contains("&lt;b&gt;&amp;"));
        assert!(svg.contains("x&lt;"));
    }
}
