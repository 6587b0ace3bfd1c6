//! A stand-in for the HuggingFace hub on 127.0.0.1: the info API (`/api/{models,datasets}/…/revision/…`)
//! and `resolve` downloads with the headers hf-hub's sync client needs (ETag / X-Linked-Etag,
//! X-Repo-Commit, Content-Range, ranged bodies) and the hub's `X-Error-Code`s; files can be made
//! to stall, break or go missing. Std only; it stops on drop or after a deadline. `SilentServer`
//! accepts connections and never answers.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One file of a fake repo.
#[derive(Clone)]
pub struct FakeFile {
    pub body: Vec<u8>,
    /// LFS files carry a sha256 `X-Linked-Etag`; others a 40-hex git-style etag.
    pub lfs: bool,
    /// Serve only this many bytes while announcing the full size (a truncated download).
    pub truncate_to: Option<usize>,
    /// Serve the body with its first byte changed, under the original's etag and size.
    pub tamper: bool,
    /// Listed by the info API but answering 404 `EntryNotFound` when fetched.
    pub listed_only: bool,
    /// Stop answering at some point of the file's requests (for timeout tests).
    pub stall: Option<Stall>,
}

/// Where a file's requests go silent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stall {
    /// Every request for the file (the metadata probe first) gets no answer at all.
    Answer,
    /// The metadata probe is answered; the download sends its headers and half the body, then
    /// nothing more.
    Body,
}

/// How long a stalled answer stays silent before the fake gives up on it.
const STALL: Duration = Duration::from_secs(8);

impl FakeFile {
    pub fn text(s: &str) -> Self {
        FakeFile {
            body: s.as_bytes().to_vec(),
            lfs: false,
            truncate_to: None,
            tamper: false,
            listed_only: false,
            stall: None,
        }
    }
    pub fn lfs(body: Vec<u8>) -> Self {
        FakeFile {
            body,
            lfs: true,
            truncate_to: None,
            tamper: false,
            listed_only: false,
            stall: None,
        }
    }
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.body))
    }
    fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            recycle::hub::git_blob_id(&self.body)
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One revision of a repo: the commit it points at and its files.
#[derive(Clone)]
pub struct FakeRevision {
    pub commit: String,
    pub files: BTreeMap<String, FakeFile>,
}

/// The repos the fake serves, keyed by (`models`|`datasets`, repo id, revision).
#[derive(Clone, Default)]
pub struct FakeRepos {
    pub revisions: BTreeMap<(String, String, String), FakeRevision>,
    /// Gated repo ids and the token that opens them: as on the hub, their info API is public and
    /// their files answer 401 `GatedRepo` unless the request carries `Bearer <token>`.
    pub gated: BTreeMap<String, String>,
    /// Private repo ids and their token: without it every request answers 401 `RepoNotFound`.
    pub private: BTreeMap<String, String>,
    /// As the hub does for LFS files: `resolve` answers 302 to `/cdn/<sha256>` on the same server
    /// named `localhost` (another host to the client), with `X-Linked-Etag`, `X-Linked-Size` and
    /// `X-Repo-Commit`; the CDN path serves the body.
    pub cdn: bool,
    /// Renamed repos, old id → new id: every request for the old id answers 307 with a relative
    /// `Location` under the new id.
    pub renamed: BTreeMap<String, String>,
}

impl FakeRepos {
    pub fn add(
        &mut self,
        kind: &str,
        repo: &str,
        revision: &str,
        commit: &str,
        files: Vec<(&str, FakeFile)>,
    ) {
        let files = files.into_iter().map(|(n, f)| (n.to_string(), f)).collect();
        self.revisions.insert(
            (kind.into(), repo.into(), revision.into()),
            FakeRevision {
                commit: commit.into(),
                files,
            },
        );
        // A commit also resolves as a revision of its own, as on the hub.
        let same =
            self.revisions[&(kind.to_string(), repo.to_string(), revision.to_string())].clone();
        self.revisions
            .insert((kind.into(), repo.into(), commit.into()), same);
    }
}

/// Request paths with their Authorization header, in arrival order.
pub type RequestLog = Mutex<Vec<(String, Option<String>)>>;

pub struct FakeHub {
    pub endpoint: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Every request line and its Authorization header (if any), in order.
    pub log: Arc<RequestLog>,
}

impl FakeHub {
    /// Serves `repos` on a free port until dropped (or 120 s at most).
    pub fn start(repos: FakeRepos) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2, repos) = (stop.clone(), log.clone(), Arc::new(repos));
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (repos, log) = (repos.clone(), log2.clone());
                        std::thread::spawn(move || serve(stream, &repos, &log));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeHub {
            endpoint,
            stop,
            thread: Some(thread),
            log,
        }
    }

    pub fn paths(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(stream: TcpStream, repos: &FakeRepos, log: &RequestLog) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let auth = headers.get("authorization").cloned();
    log.lock().unwrap().push((path.clone(), auth.clone()));
    let range = headers.get("range").map(String::as_str);
    let host = headers
        .get("host")
        .map(String::as_str)
        .unwrap_or("127.0.0.1");
    let resp = respond(&path, range, auth.as_deref(), host, repos);
    let mut out = stream;
    match resp {
        Answer::Full(bytes) => {
            let _ = out.write_all(&bytes);
        }
        Answer::Silent => std::thread::sleep(STALL),
        Answer::Stalled(bytes) => {
            let _ = out.write_all(&bytes);
            let _ = out.flush();
            std::thread::sleep(STALL);
        }
    }
    let _ = out.flush();
}

/// What the fake sends back.
enum Answer {
    Full(Vec<u8>),
    /// Nothing at all, for a while.
    Silent,
    /// These bytes (headers announcing more), then nothing for a while.
    Stalled(Vec<u8>),
}

fn http(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn respond(
    path: &str,
    range: Option<&str>,
    auth: Option<&str>,
    host: &str,
    repos: &FakeRepos,
) -> Answer {
    let not_found = |what: &str| {
        Answer::Full(http(
            "404 Not Found",
            &[("X-Error-Code", what.to_string())],
            b"{\"error\":\"not found\"}",
        ))
    };
    let unauthorized = |what: &str| {
        Answer::Full(http(
            "401 Unauthorized",
            &[("X-Error-Code", what.to_string())],
            b"{\"error\":\"unauthorized\"}",
        ))
    };
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let found = repos
            .revisions
            .values()
            .flat_map(|r| r.files.values())
            .find(|f| f.lfs && f.sha256() == sha);
        return match found {
            Some(f) => serve_body(f, range, vec![]),
            None => Answer::Full(http("404 Not Found", &[], b"")),
        };
    }
    // Which repo and revision the request is about, and the file (for resolve).
    let (kind, repo, rev, file) = if let Some(rest) = path.strip_prefix("/api/") {
        let Some((kind, rest)) = rest.split_once('/') else {
            return not_found("RepoNotFound");
        };
        let Some((repo, rev)) = rest.split_once("/revision/") else {
            return not_found("RepoNotFound");
        };
        (kind.to_string(), repo.to_string(), decode(rev), None)
    } else {
        let (kind, rest) = match path.strip_prefix("/datasets/") {
            Some(r) => ("datasets", r),
            None => ("models", &path[1..]),
        };
        let Some((repo, rest)) = rest.split_once("/resolve/") else {
            return not_found("RepoNotFound");
        };
        let Some((rev, file)) = rest.split_once('/') else {
            return not_found("EntryNotFound");
        };
        (
            kind.to_string(),
            repo.to_string(),
            decode(rev),
            Some(decode(file)),
        )
    };
    if let Some(new) = repos.renamed.get(&repo) {
        let moved = path.replacen(&format!("/{repo}/"), &format!("/{new}/"), 1);
        return Answer::Full(http("307 Temporary Redirect", &[("Location", moved)], b""));
    }
    let opens = |token: &String| auth == Some(&format!("Bearer {token}"));
    if repos.private.get(&repo).is_some_and(|t| !opens(t)) {
        return unauthorized("RepoNotFound");
    }
    if file.is_some() && repos.gated.get(&repo).is_some_and(|t| !opens(t)) {
        return unauthorized("GatedRepo");
    }
    let Some(r) = repos.revisions.get(&(kind.clone(), repo.clone(), rev)) else {
        let known = repos
            .revisions
            .keys()
            .any(|(k, name, _)| *k == kind && *name == repo);
        return not_found(if known {
            "RevisionNotFound"
        } else {
            "RepoNotFound"
        });
    };
    let Some(file) = file else {
        let siblings: Vec<String> = r
            .files
            .keys()
            .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\":\"{repo}\",\"sha\":\"{}\",\"siblings\":[{}]}}",
            r.commit,
            siblings.join(",")
        );
        return Answer::Full(http(
            "200 OK",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        ));
    };
    let Some(f) = r.files.get(&file).filter(|f| !f.listed_only) else {
        return not_found("EntryNotFound");
    };
    if f.stall == Some(Stall::Answer) {
        return Answer::Silent;
    }
    let mut headers = vec![
        ("X-Repo-Commit", r.commit.clone()),
        ("ETag", format!("\"{}\"", f.etag())),
    ];
    if f.lfs {
        headers.push(("X-Linked-Etag", format!("\"{}\"", f.etag())));
    }
    if f.lfs && repos.cdn {
        headers.push(("X-Linked-Size", f.body.len().to_string()));
        // Another host name for the same server, as the CDN is another host than the hub.
        let port = host.rsplit_once(':').map(|(_, p)| p).unwrap_or("80");
        headers.push((
            "Location",
            format!("http://localhost:{port}/cdn/{}", f.sha256()),
        ));
        return Answer::Full(http("302 Found", &headers, b""));
    }
    serve_body(f, range, headers)
}

/// A file's body, whole or the asked range, as damaged or stalled as the file says.
fn serve_body(f: &FakeFile, range: Option<&str>, mut headers: Vec<(&str, String)>) -> Answer {
    let size = f.body.len();
    let mut body = f.body.clone();
    if f.tamper {
        body[0] ^= 0x20;
    }
    let served = &body[..f.truncate_to.unwrap_or(size).min(size)];
    let start = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let end_incl = range
        .and_then(|r| r.split('-').nth(1))
        .and_then(|s| s.parse::<usize>().ok());
    match start {
        Some(s) => {
            let e = end_incl
                .map(|e| e + 1)
                .unwrap_or(served.len())
                .min(served.len());
            let s = s.min(e);
            headers.push((
                "Content-Range",
                format!("bytes {s}-{}/{size}", e.saturating_sub(1)),
            ));
            Answer::Full(http("206 Partial Content", &headers, &served[s..e]))
        }
        None if f.stall == Some(Stall::Body) => {
            let mut bytes = http("200 OK", &headers, served);
            bytes.truncate(bytes.len() - served.len() / 2);
            Answer::Stalled(bytes)
        }
        None => Answer::Full(http("200 OK", &headers, served)),
    }
}

/// A server that accepts connections and never answers, until dropped.
pub struct SilentServer {
    pub endpoint: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentServer {
    pub fn start() -> SilentServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut held = Vec::new();
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        SilentServer {
            endpoint,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
