//! A real mouse click on a column header, through the Chrome DevTools Protocol: a tiny WebSocket
//! client over `TcpStream` (no driver), enough for `Runtime.evaluate` and `Input.dispatchMouseEvent`.

use super::browser::{base_args, chromium, write_report, Browser};
use super::{fixture_board, gain, label};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the whole exchange with the browser may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long one read from the browser may block.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One WebSocket connection to a page target.
struct Cdp {
    stream: TcpStream,
    next_id: u64,
}

/// Waits for Chromium to write the port it listens on (`--remote-debugging-port=0`).
fn devtools_port(profile: &Path, deadline: Instant) -> u16 {
    let file = profile.join("DevToolsActivePort");
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                return port;
            }
        }
        assert!(Instant::now() < deadline, "no {} in time", file.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET `path` from the DevTools HTTP endpoint and parse the JSON body.
fn http_json(port: u16, path: &str) -> Value {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0; length.expect("Content-Length from DevTools")];
    reader.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

impl Cdp {
    /// Opens the WebSocket at `ws://127.0.0.1:port/path`.
    fn connect(port: u16, path: &str) -> Cdp {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: cmVjeWNsZS1yZXBvcnQtdA==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        // Read the handshake response byte by byte so no frame bytes are swallowed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "WebSocket handshake: {head}"
        );
        Cdp { stream, next_id: 1 }
    }

    /// Sends one masked text frame (clients must mask).
    fn send(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mask = [0x5a, 0x13, 0xc7, 0x2e];
        let mut frame = vec![0x81];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    /// Reads one whole text message, joining continuation frames and skipping control frames.
    fn receive(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head).unwrap();
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let masked = head[1] & 0x80 != 0;
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.stream.read_exact(&mut b).unwrap();
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.stream.read_exact(&mut b).unwrap();
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut mask = [0u8; 4];
            if masked {
                self.stream.read_exact(&mut mask).unwrap();
            }
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload).unwrap();
            if masked {
                payload
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b ^= mask[i % 4]);
            }
            match opcode {
                0x0 | 0x1 => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return String::from_utf8(message).unwrap();
                    }
                }
                0x8 => panic!("the browser closed the DevTools connection"),
                _ => {} // ping, pong: nothing to do for a short exchange
            }
        }
    }

    /// Calls a CDP method and returns its `result`, skipping events in between.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({ "id": id, "method": method, "params": params }).to_string());
        loop {
            let reply: Value = serde_json::from_str(&self.receive()).unwrap();
            if reply["id"] == json!(id) {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "`{expression}` threw: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Presses and releases the left mouse button at (`x`, `y`) in CSS pixels.
    fn click_at(&mut self, x: f64, y: f64) {
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Clicks the middle of the table header of column `col`.
    fn click_header(&mut self, col: usize) {
        let rect = self.eval(&format!(
            "(() => {{ const th = document.querySelector('#board th[data-col=\"{col}\"]'); \
             th.scrollIntoView({{block: 'center', inline: 'center'}}); \
             const r = th.getBoundingClientRect(); \
             return [r.left + r.width / 2, r.top + r.height / 2]; }})()"
        ));
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        self.click_at(x, y);
    }

    fn first_row(&mut self) -> String {
        self.eval("document.querySelector('#rows tr').getAttribute('data-model')")
            .as_str()
            .expect("a first row")
            .to_string()
    }
}

#[test]
fn clicking_a_header_sorts_the_table() {
    let Some(chromium) = chromium() else { return };
    let board = fixture_board();
    let dir = tempfile::tempdir().unwrap();
    let url = write_report(dir.path());
    let profile = tempfile::tempdir_in(dir.path()).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut args = base_args(profile.path());
    args.push("--remote-debugging-port=0".into());
    args.push(url.clone());
    let _browser = Browser(
        Command::new(&chromium)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromium.display())),
    );
    let port = devtools_port(profile.path(), deadline);
    let ws_path = loop {
        let targets = http_json(port, "/json/list");
        let page = targets.as_array().and_then(|ts| {
            ts.iter()
                .find(|t| t["type"] == "page" && t["url"].as_str() == Some(url.as_str()))
        });
        if let Some(ws) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
            let after_scheme = ws.trim_start_matches("ws://");
            break after_scheme[after_scheme.find('/').unwrap()..].to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no page target for {url}: {targets}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut cdp = Cdp::connect(port, &ws_path);
    // The page target can exist before the report's document has replaced the initial one: wait
    // for the loaded report itself (its table rows), not just for some document to be complete.
    while cdp
        .eval("document.readyState === 'complete' && document.querySelector('#rows tr') !== null")
        != json!(true)
    {
        assert!(
            Instant::now() < deadline,
            "the report did not finish loading"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let first_target = |pick_max: bool| -> String {
        let done = board.rows.iter().filter(|r| gain(r, 0).is_some());
        let row = if pick_max {
            done.max_by(|a, b| gain(a, 0).unwrap().total_cmp(&gain(b, 0).unwrap()))
        } else {
            done.min_by(|a, b| gain(a, 0).unwrap().total_cmp(&gain(b, 0).unwrap()))
        };
        label(&row.unwrap().model)
    };
    assert_eq!(cdp.first_row(), label(&board.rows[0].model));

    // First click on a gain column sorts it best first, the second flips it.
    cdp.click_header(4);
    let best = first_target(true);
    assert_ne!(
        best,
        label(&board.rows[0].model),
        "the fixture must reorder"
    );
    assert_eq!(cdp.first_row(), best);
    assert_eq!(cdp.eval("location.hash"), json!("#sort=col4-desc"));
    cdp.click_header(4);
    assert_eq!(cdp.first_row(), first_target(false));
    assert_eq!(cdp.eval("location.hash"), json!("#sort=col4-asc"));
    assert_eq!(
        cdp.eval("document.querySelectorAll('#rows tr').length"),
        json!(board.rows.len())
    );
}
