//! The HTML report: a snapshot of a small hand-built board, properties of the page (escaping,
//! one row and one heatmap cell per model and target, partial averages, correlations), the
//! `recycle report` command, and (with RECYCLE_BROWSER_TESTS=1) the page in headless Chromium.

mod browser;
mod cdp;

use assert_cmd::Command;
use recycle::export::html::HtmlExporter;
use recycle::export::Exporter;
use recycle::leaderboard::{
    BaselineCell, BaselineRow, Cell, Coverage, Leaderboard, Metric, ModelInfo, Provenance, Row,
    TargetInfo, LEADERBOARD_SCHEMA_VERSION,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A model id that HTML would misread if it were not escaped (local paths may hold any of these).
pub const HOSTILE_ID: &str = "./ckpt's & <best> \"v2\"";
/// A failure message that HTML would misread if it were not escaped.
pub const HOSTILE_ERROR: &str = "CUDA out of memory <alloc & free> \"oops\"";

fn done(score: f64, gain: f64, seeds: usize, within_noise: bool) -> Cell {
    Cell::Done {
        score,
        gain,
        seeds,
        within_noise,
    }
}

fn model(id: &str, revision: Option<&str>) -> ModelInfo {
    ModelInfo {
        id: id.to_string(),
        revision: revision.map(str::to_string),
        label: None,
    }
}

fn proxies(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// A small board with every kind of cell: complete rows (one hostile name), a row with a missing
/// and a failed cell, a cell within seed noise, and two proxies. Gains are consistent with the
/// baseline means; the first target's best and worst models are not the board's first row, so a
/// sort on it visibly reorders the table.
pub fn fixture_board() -> Leaderboard {
    let targets = vec![
        TargetInfo {
            name: "sst2".into(),
            metric: Metric::Accuracy,
        },
        TargetInfo {
            name: "rte".into(),
            metric: Metric::Accuracy,
        },
        TargetInfo {
            name: "stsb".into(),
            metric: Metric::Spearman,
        },
        TargetInfo {
            name: "tweet_ev_emoji".into(),
            metric: Metric::Accuracy,
        },
    ];
    let baseline = BaselineRow {
        model: model(
            "roberta-base",
            Some("e2da8e2f811d1448a5b465c236feacd80ffbac7b"),
        ),
        cells: vec![
            BaselineCell {
                mean: Some(94.0),
                std: Some(0.4),
                scores: vec![93.6, 94.4],
                failed: 0,
            },
            BaselineCell {
                mean: Some(70.0),
                std: Some(2.0),
                scores: vec![68.0, 72.0],
                failed: 1,
            },
            BaselineCell {
                mean: Some(90.0),
                std: None,
                scores: vec![90.0],
                failed: 0,
            },
            BaselineCell {
                mean: Some(30.0),
                std: Some(0.5),
                scores: vec![29.5, 30.5],
                failed: 0,
            },
        ],
        avg_score: Some(71.0),
    };
    let rows = vec![
        Row {
            rank: Some(1),
            model: model("textattack/roberta-base-MNLI", Some("a1b2c3d")),
            cells: vec![
                done(94.5, 0.5, 2, false),
                done(78.0, 8.0, 2, false),
                done(91.0, 1.0, 2, false),
                done(31.0, 1.0, 2, false),
            ],
            avg_gain: Some(2.625),
            partial_avg_gain: None,
            coverage: Coverage { done: 4, total: 4 },
            proxies: proxies(&[("logme", -1.8125), ("mnli_lp", 55.25)]),
        },
        Row {
            rank: Some(2),
            model: model("ibm/ColD-Fusion", Some("9f8e7d6")),
            cells: vec![
                done(95.5, 1.5, 2, false),
                done(71.0, 1.0, 2, true),
                done(92.0, 2.0, 2, false),
                done(30.5, 0.5, 2, true),
            ],
            avg_gain: Some(1.25),
            partial_avg_gain: None,
            coverage: Coverage { done: 4, total: 4 },
            proxies: proxies(&[("logme", -1.125), ("mnli_lp", 52.5)]),
        },
        Row {
            rank: Some(3),
            model: model(HOSTILE_ID, None),
            cells: vec![
                done(92.0, -2.0, 2, false),
                done(69.0, -1.0, 1, true),
                done(90.0, 0.0, 2, false),
                done(29.0, -1.0, 2, false),
            ],
            avg_gain: Some(-1.0),
            partial_avg_gain: None,
            coverage: Coverage { done: 4, total: 4 },
            proxies: proxies(&[("logme", 0.0), ("mnli_lp", 48.0)]),
        },
        Row {
            rank: None,
            model: model("org/half-done", Some("0000aaa")),
            cells: vec![
                done(94.2, 0.2, 2, true),
                Cell::Missing,
                Cell::Failed {
                    error: HOSTILE_ERROR.into(),
                },
                done(33.0, 3.0, 2, false),
            ],
            avg_gain: None,
            partial_avg_gain: Some(1.6),
            coverage: Coverage { done: 2, total: 4 },
            proxies: proxies(&[("mnli_lp", 51.0)]),
        },
    ];
    Leaderboard {
        schema_version: LEADERBOARD_SCHEMA_VERSION,
        arch: "roberta-base".into(),
        targets,
        baseline,
        rows,
        provenance: Provenance {
            recycle_version: "0.1.0".into(),
            generated_at: "2026-01-02T03:04:05Z".into(),
            suites: vec!["glue-mini".into(), "tweet-mini".into()],
            protocol_hashes: vec!["5f1c0ffee".into()],
            results: 42,
        },
    }
}

pub fn render(board: &Leaderboard) -> String {
    let bytes = HtmlExporter.render(board).expect("render the report");
    String::from_utf8(bytes).expect("the report is UTF-8")
}

/// `id@revision` or the id alone, as the report labels models.
pub fn label(m: &ModelInfo) -> String {
    match &m.revision {
        Some(r) => format!("{}@{}", m.label(), r),
        None => m.label().to_string(),
    }
}

/// The gain of a row on target `j`, if that cell is done.
pub fn gain(row: &Row, j: usize) -> Option<f64> {
    match row.cells[j] {
        Cell::Done { gain, .. } => Some(gain),
        _ => None,
    }
}

fn snapshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshots/report.html")
}

/// The snapshot is generated by this test: `UPDATE_SNAPSHOTS=1 cargo test --test it report::`
/// rewrites it; review the diff before committing.
#[test]
fn html_matches_snapshot() {
    let html = render(&fixture_board());
    let path = snapshot_path();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &html).unwrap();
        eprintln!("updated snapshot {}", path.display());
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading snapshot {} ({e}); run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    if html != expected {
        // Point at the first differing byte with a little context: SVG lines are long.
        let at = html
            .bytes()
            .zip(expected.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| html.len().min(expected.len()));
        let line = html[..at].matches('\n').count() + 1;
        let window = |s: &str| {
            let lo = s.floor_char_boundary(at.saturating_sub(80));
            let hi = s.ceil_char_boundary((at + 80).min(s.len()));
            s[lo..hi].to_string()
        };
        panic!(
            "the report differs from {} at line {line} (byte {at}):\n  got:      {:?}\n  \
             expected: {:?}\n(UPDATE_SNAPSHOTS=1 rewrites the snapshot)",
            path.display(),
            window(&html),
            window(&expected)
        );
    }
}

#[test]
fn rendering_is_deterministic() {
    let board = fixture_board();
    assert_eq!(render(&board), render(&board));
}

#[test]
fn names_and_errors_are_escaped() {
    let html = render(&fixture_board());
    for raw in ["<best>", "<alloc", "& free", "\"v2\"", "\"oops\""] {
        assert!(!html.contains(raw), "raw `{raw}` in the report");
    }
    assert!(html.contains("./ckpt&#39;s &amp; &lt;best&gt; &quot;v2&quot;"));
    assert!(html.contains("CUDA out of memory &lt;alloc &amp; free&gt; &quot;oops&quot;"));
    // The embedded board survives a round trip.
    let start = html
        .find("<script type=\"application/json\" id=\"board-data\">")
        .expect("embedded board");
    let rest = &html[start..];
    let json = &rest[rest.find('>').unwrap() + 1..rest.find("</script>").unwrap()];
    let back: Leaderboard = serde_json::from_str(json).expect("embedded board parses");
    assert_eq!(back, fixture_board());
}

#[test]
fn nothing_is_fetched() {
    let html = render(&fixture_board()).replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for needle in [
        "http://", "https://", "src=", "<link", "@import", "url(http",
    ] {
        assert!(
            !html.contains(needle),
            "`{needle}` in a self-contained report"
        );
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn one_table_row_and_heatmap_cell_per_model_and_target() {
    let board = fixture_board();
    let html = render(&board);
    let cells: Vec<&Cell> = board.rows.iter().flat_map(|r| &r.cells).collect();
    let missing = cells.iter().filter(|c| matches!(c, Cell::Missing)).count();
    let failed = cells
        .iter()
        .filter(|c| matches!(c, Cell::Failed { .. }))
        .count();
    let noise = cells
        .iter()
        .filter(|c| {
            matches!(
                c,
                Cell::Done {
                    within_noise: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(count(&html, "<tr data-order="), board.rows.len());
    assert_eq!(count(&html, "class=\"hm-cell "), cells.len());
    assert_eq!(count(&html, "class=\"hm-cell missing\""), missing);
    assert_eq!(count(&html, "class=\"hm-cell failed\""), failed);
    assert_eq!(count(&html, "class=\"hm-cell done noise\""), noise);
    assert_eq!(count(&html, "class=\"cell done noise\""), noise);
    assert_eq!(count(&html, "class=\"cell missing\""), missing);
    assert_eq!(count(&html, "class=\"cell failed\""), failed);
    assert_eq!(count(&html, "class=\"chart bars\""), board.rows.len());
    assert_eq!(
        count(&html, "<th data-col="),
        4 + board.targets.len(),
        "rank, model, average, coverage and one column per target"
    );
    assert!(html.contains("<tr class=\"baseline\""));
}

#[test]
fn partial_averages_are_labelled_and_full_ones_not() {
    let board = fixture_board();
    let html = render(&board);
    for row in &board.rows {
        let marker = format!(
            "data-model=\"{}\"",
            recycle::export::html::escape(&label(&row.model))
        );
        let start = html.find(&marker).expect("row in table");
        let tr = &html[start..start + html[start..].find("</tr>").unwrap()];
        assert_eq!(
            tr.contains("class=\"partial\""),
            row.avg_gain.is_none() && row.partial_avg_gain.is_some(),
            "{tr}"
        );
    }
}

#[test]
fn proxy_correlations_are_printed() {
    let board = fixture_board();
    let html = render(&board);
    // By construction mnli_lp = 2·avg + 50 and logme = −avg/2 − 0.5 on the complete rows: r = ±1.
    for row in board.rows.iter().filter(|r| r.avg_gain.is_some()) {
        let avg = row.avg_gain.unwrap();
        assert_eq!(row.proxies["mnli_lp"], 2.0 * avg + 50.0);
        assert_eq!(row.proxies["logme"], -avg / 2.0 - 0.5);
    }
    let complete = board.rows.iter().filter(|r| r.avg_gain.is_some()).count();
    let mnli = &html[html
        .find("data-proxy=\"mnli_lp\"")
        .expect("mnli_lp scatter")..];
    assert!(mnli.contains(&format!(
        "Pearson r = <span class=\"pearson\">1.00</span>, Spearman ρ = <span class=\"spearman\">1.00</span> (n = {complete})"
    )));
    let logme = &html[html.find("data-proxy=\"logme\"").expect("logme scatter")..];
    assert!(logme.contains("<span class=\"pearson\">-1.00</span>"));
    assert!(logme.contains("<span class=\"spearman\">-1.00</span>"));
    // The incomplete row is drawn hollow, not counted.
    assert_eq!(
        count(
            mnli.split("</figure>").next().unwrap(),
            "class=\"point partial\""
        ),
        1
    );

    let mut plain = board.clone();
    plain.rows.iter_mut().for_each(|r| r.proxies.clear());
    assert!(!render(&plain).contains("id=\"proxies\""));
}

#[test]
fn provenance_is_shown() {
    let board = fixture_board();
    let html = render(&board);
    let section = &html[html.find("id=\"provenance\"").expect("provenance section")..];
    for needle in [
        board.provenance.recycle_version.as_str(),
        board.provenance.generated_at.as_str(),
        "glue-mini",
        "tweet-mini",
        "5f1c0ffee",
        "e2da8e2f811d1448a5b465c236feacd80ffbac7b",
        "9f8e7d6",
        "unpinned",
    ] {
        assert!(section.contains(needle), "`{needle}` in provenance");
    }
}

#[test]
fn an_empty_board_renders() {
    let mut board = fixture_board();
    board.rows.clear();
    let html = render(&board);
    assert!(html.contains("<tbody id=\"rows\">\n</tbody>"));
    assert!(!html.contains("id=\"per-model\""));
    assert!(!html.contains("id=\"proxies\""));
    board.targets.clear();
    board.baseline.cells.clear();
    assert!(render(&board).contains("id=\"heatmap\""));
}

#[test]
fn a_row_with_the_wrong_number_of_cells_is_an_error_naming_it() {
    let mut board = fixture_board();
    board.rows[1].cells.pop();
    let err = HtmlExporter.render(&board).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("ibm/ColD-Fusion@9f8e7d6"), "{msg}");
}

#[test]
fn report_command_renders_a_board_json() {
    let dir = tempfile::tempdir().unwrap();
    let board = fixture_board();
    let json = dir.path().join("board.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&board).unwrap()).unwrap();
    let out = dir.path().join("report.html");
    Command::cargo_bin("recycle")
        .unwrap()
        .args(["report", "--from-json"])
        .arg(&json)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), render(&board));
}

#[test]
fn report_command_refuses_other_schema_versions_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut board = fixture_board();
    board.schema_version = LEADERBOARD_SCHEMA_VERSION + 1;
    let json = dir.path().join("future.json");
    std::fs::write(&json, serde_json::to_vec(&board).unwrap()).unwrap();
    let out = dir.path().join("report.html");
    let assert = Command::cargo_bin("recycle")
        .unwrap()
        .args(["report", "--from-json"])
        .arg(&json)
        .arg("--out")
        .arg(&out)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(stderr.contains("future.json"), "{stderr}");
    assert!(stderr.contains("schema_version"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn report_command_with_arch_names_the_arch_when_it_has_no_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.html");
    let assert = Command::cargo_bin("recycle")
        .unwrap()
        .args(["report", "--arch", "roberta-base", "--results"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(stderr.contains("--arch roberta-base"), "{stderr}");
    assert!(!out.exists());
}
