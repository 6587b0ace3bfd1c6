//! The report in headless Chromium (RECYCLE_BROWSER_TESTS=1, as .ci/run sets after
//! scripts/install-chromium.sh): a non-blank screenshot, the table and heatmap in the live DOM,
//! and a `#sort=` fragment that reorders the table with the same function a header click uses.

use super::{fixture_board, gain, label, render};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one Chromium run may take before the test kills it and fails.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// The Chromium binary, or `None` when browser tests are not enabled. Enabled but absent is a
/// failure, never a silent skip.
pub fn chromium() -> Option<PathBuf> {
    if std::env::var("RECYCLE_BROWSER_TESTS").as_deref() != Ok("1") {
        eprintln!("browser test not run: set RECYCLE_BROWSER_TESTS=1 (CI does)");
        return None;
    }
    let path = std::env::var_os("RECYCLE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "RECYCLE_BROWSER_TESTS=1 but Chromium is not at {}: run scripts/install-chromium.sh \
         (or point RECYCLE_CHROMIUM at a Chromium binary)",
        path.display()
    );
    Some(path)
}

/// Flags for a headless, offline, throwaway Chromium profile.
pub fn base_args(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,1400",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// Kills the browser when the test ends, however it ends.
pub struct Browser(pub Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs Chromium to completion with `args`, stdout into `stdout`; fails after `BROWSER_TIMEOUT`.
fn run_chromium(chromium: &Path, args: &[String], stdout: &Path, stderr: &Path) {
    let child = Command::new(chromium)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(stdout).unwrap())
        .stderr(File::create(stderr).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", chromium.display()));
    let mut browser = Browser(child);
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    loop {
        if let Some(status) = browser.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "chromium exited with {status}; stderr:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "chromium did not finish within {BROWSER_TIMEOUT:?}; stderr:\n{}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes the fixture report into `dir` and returns its `file://` URL.
pub fn write_report(dir: &Path) -> String {
    let path = dir.join("report.html");
    std::fs::write(&path, render(&fixture_board())).unwrap();
    format!("file://{}", path.display())
}

/// Loads `url` and returns the DOM after the page's scripts ran.
fn dump_dom(chromium: &Path, dir: &Path, url: &str) -> String {
    let profile = tempfile::tempdir_in(dir).unwrap();
    let mut args = base_args(profile.path());
    args.push("--dump-dom".into());
    args.push(url.into());
    let out = dir.join("dom.html");
    run_chromium(chromium, &args, &out, &dir.join("dom.stderr"));
    std::fs::read_to_string(&out).unwrap()
}

/// Undoes the escaping that a DOM serialiser (or the report) applies to attribute values.
pub fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The `data-model` of each candidate row, in the order the live table shows them.
fn table_order(dom: &str) -> Vec<String> {
    let body = &dom[dom
        .find("<tbody id=\"rows\">")
        .expect("the candidates' tbody")..];
    let body = &body[..body.find("</tbody>").expect("end of tbody")];
    body.split("<tr ")
        .skip(1)
        .map(|tr| {
            let at = tr.find("data-model=\"").expect("data-model on a row") + 12;
            unescape(&tr[at..at + tr[at..].find('"').unwrap()])
        })
        .collect()
}

#[test]
fn screenshot_is_not_blank_and_shows_both_ends_of_the_colour_scale() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = write_report(dir.path());
    let profile = tempfile::tempdir_in(dir.path()).unwrap();
    let png_path = dir.path().join("report.png");
    let mut args = base_args(profile.path());
    args.push(format!("--screenshot={}", png_path.display()));
    args.push(url);
    run_chromium(
        &chromium,
        &args,
        &dir.path().join("shot.stdout"),
        &dir.path().join("shot.stderr"),
    );
    if let Some(keep) = std::env::var_os("RECYCLE_KEEP_SCREENSHOT") {
        std::fs::copy(&png_path, keep).unwrap();
    }

    let decoder = png::Decoder::new(std::io::BufReader::new(File::open(&png_path).unwrap()));
    let mut reader = decoder.read_info().expect("the screenshot is a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("PNG size")];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    assert!(
        channels >= 3,
        "colour screenshot, got {:?}",
        info.color_type
    );
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let pixels: Vec<[u8; 3]> = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    assert!(
        info.width >= 800 && info.height >= 600,
        "{}x{}",
        info.width,
        info.height
    );

    // Not blank: no single colour covers almost everything, and there is real variety.
    let mut counts = std::collections::HashMap::new();
    for p in &pixels {
        *counts.entry(*p).or_insert(0usize) += 1;
    }
    let most = counts.values().max().copied().unwrap_or(0);
    assert!(
        (most as f64) < 0.97 * pixels.len() as f64,
        "one colour covers {most} of {} pixels",
        pixels.len()
    );
    assert!(counts.len() > 50, "only {} distinct colours", counts.len());
    // The gain colours are drawn: strongly blue cells (gains) and strongly red ones (losses).
    let blue = pixels
        .iter()
        .filter(|[r, _, b]| *b as i32 - *r as i32 > 90)
        .count();
    let red = pixels
        .iter()
        .filter(|[r, _, b]| *r as i32 - *b as i32 > 90)
        .count();
    assert!(blue > 200, "{blue} strongly blue pixels");
    assert!(red > 200, "{red} strongly red pixels");
}

#[test]
fn dom_shows_table_rows_and_heatmap() {
    let Some(chromium) = chromium() else { return };
    let board = fixture_board();
    let dir = tempfile::tempdir().unwrap();
    let url = write_report(dir.path());
    let dom = dump_dom(&chromium, dir.path(), &url);
    let expected: Vec<String> = board.rows.iter().map(|r| label(&r.model)).collect();
    assert_eq!(table_order(&dom), expected);
    assert!(dom.contains("<tr class=\"baseline\""));
    assert!(dom.contains("id=\"heatmap\""));
    assert_eq!(
        dom.matches("class=\"hm-cell ").count(),
        board.rows.len() * board.targets.len()
    );
    // No sort applied without a fragment.
    assert!(dom.contains("data-sort=\"board\""));
}

#[test]
fn sort_fragment_reorders_the_table() {
    let Some(chromium) = chromium() else { return };
    let board = fixture_board();
    let dir = tempfile::tempdir().unwrap();
    let url = write_report(dir.path());

    // Column 4 is the first target. Missing and failed cells sort last either way.
    let by_first_target = |descending: bool| -> String {
        let best = board
            .rows
            .iter()
            .filter(|r| gain(r, 0).is_some())
            .max_by(|a, b| {
                let (ga, gb) = (gain(a, 0).unwrap(), gain(b, 0).unwrap());
                if descending {
                    ga.total_cmp(&gb)
                } else {
                    gb.total_cmp(&ga)
                }
            })
            .unwrap();
        label(&best.model)
    };
    for (fragment, first) in [
        ("#sort=col4-desc", by_first_target(true)),
        ("#sort=col4-asc", by_first_target(false)),
    ] {
        assert_ne!(
            first,
            label(&board.rows[0].model),
            "the fixture must reorder"
        );
        let dom = dump_dom(&chromium, dir.path(), &format!("{url}{fragment}"));
        let order = table_order(&dom);
        assert_eq!(order[0], first, "first row after {fragment}: {order:?}");
        assert_eq!(order.len(), board.rows.len());
        let sorted_header = if fragment.ends_with("desc") {
            "aria-sort=\"descending\""
        } else {
            "aria-sort=\"ascending\""
        };
        assert!(dom.contains(&format!(
            "data-col=\"4\" data-type=\"num\" data-first=\"desc\" {sorted_header}"
        )));
    }
}
