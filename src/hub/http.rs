//! The hub's HTTP requests under timeouts: hf-hub 0.5 builds its ureq agent with none and offers
//! no way to set one, so a hung hub would hang `recycle` forever. The repo info call keeps hf-hub's
//! request with timeouts set on it; file metadata and downloads go through agents configured here.

use super::{Timeouts, Token};
use hf_hub::api::RepoInfo;
use std::io::{Read, Write};
use std::time::Duration;
use ureq::config::RedirectAuthHeaders;
use ureq::http::HeaderMap;
use ureq::typestate::WithoutBody;
use ureq::{Agent, RequestBuilder};

/// huggingface_hub's names for the two timeouts, to quote in errors.
pub(crate) const ETAG_TIMEOUT_VAR: &str = "HF_HUB_ETAG_TIMEOUT";
pub(crate) const DOWNLOAD_TIMEOUT_VAR: &str = "HF_HUB_DOWNLOAD_TIMEOUT";

/// Relative redirects (renamed repos) followed by a metadata probe, as huggingface_hub does.
const MAX_RELATIVE_REDIRECTS: usize = 5;
/// The largest repo info answer read (a listing of many thousand files fits).
const MAX_INFO_BYTES: u64 = 64 << 20;

/// Why a request failed, before it is put in words with its repo, revision and file.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The hub answered with an error status; `code` is its `X-Error-Code` header
    /// (`RepoNotFound`, `GatedRepo`, `EntryNotFound`, `RevisionNotFound`) when it sent one.
    Status { status: u16, code: Option<String> },
    /// Nothing arrived for as long as the timeout `var` allows.
    TimedOut { var: &'static str, after: Duration },
    /// No connection could be made, or it broke (refused, unknown host, reset, TLS).
    Transport(String),
    /// The answer broke the hub's protocol (a missing header, a malformed body).
    Protocol(String),
    /// Writing the download to disk failed.
    Write(std::io::Error),
}

/// What the hub says about one file before it is downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileMeta {
    /// `X-Repo-Commit`: the commit the revision resolved to.
    pub commit: String,
    /// `X-Linked-Etag` (LFS: the sha256) or `ETag` (git: the blob id), unquoted.
    pub etag: String,
    /// `X-Linked-Size`, else the total of `Content-Range`.
    pub size: u64,
}

/// Two agents: metadata probes that never follow a redirect to another host, and downloads that
/// do (to the hub's CDN) without carrying the token along.
pub(crate) struct Client {
    meta: Agent,
    files: Agent,
    token: Option<Token>,
    timeouts: Timeouts,
}

fn user_agent() -> String {
    format!("recycle/{}", env!("CARGO_PKG_VERSION"))
}

impl Client {
    pub fn new(token: Option<Token>, timeouts: Timeouts) -> Client {
        let meta = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(timeouts.etag))
            .timeout_per_read(Some(timeouts.etag))
            .user_agent(user_agent())
            .build()
            .into();
        let files = Agent::config_builder()
            .http_status_as_error(false)
            .redirect_auth_headers(RedirectAuthHeaders::SameHost)
            .timeout_connect(Some(timeouts.download))
            .timeout_per_read(Some(timeouts.download))
            .user_agent(user_agent())
            .build()
            .into();
        Client {
            meta,
            files,
            token,
            timeouts,
        }
    }

    fn authorized(&self, req: RequestBuilder<WithoutBody>) -> RequestBuilder<WithoutBody> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {}", t.secret())),
            None => req,
        }
    }

    fn etag_timeout(&self) -> (&'static str, Duration) {
        (ETAG_TIMEOUT_VAR, self.timeouts.etag)
    }

    /// Probes `url` with `Range: bytes=0-0` for the file's commit, etag and size.
    pub fn metadata(&self, url: &str) -> Result<FileMeta, Failure> {
        let mut url = url.to_string();
        for _ in 0..=MAX_RELATIVE_REDIRECTS {
            let resp = self
                .authorized(self.meta.get(&url))
                .header("Range", "bytes=0-0")
                .call()
                .map_err(|e| failure(e, self.etag_timeout()))?;
            let status = resp.status().as_u16();
            let h = resp.headers();
            if (300..400).contains(&status) {
                let location = header(h, "location")
                    .ok_or_else(|| Failure::Protocol(format!("HTTP {status} without Location")))?;
                if location.starts_with('/') {
                    url = format!("{}{location}", origin(&url));
                    continue;
                }
                // The file lives elsewhere (the CDN); the hub's own answer names commit and etag.
                let commit = required(h, "x-repo-commit")?;
                let etag = linked_etag(h)?;
                let size = match header(h, "x-linked-size") {
                    Some(s) => parse_size(&s, "X-Linked-Size")?,
                    None => self.remote_size(&location)?,
                };
                return Ok(FileMeta { commit, etag, size });
            }
            check_status(status, h)?;
            let commit = required(h, "x-repo-commit")?;
            let etag = linked_etag(h)?;
            let size = match (header(h, "x-linked-size"), header(h, "content-range")) {
                (Some(s), _) => parse_size(&s, "X-Linked-Size")?,
                (None, Some(r)) => range_total(&r)?,
                (None, None) => {
                    return Err(Failure::Protocol(
                        "the answer has neither X-Linked-Size nor Content-Range".into(),
                    ))
                }
            };
            return Ok(FileMeta { commit, etag, size });
        }
        Err(Failure::Protocol(format!(
            "more than {MAX_RELATIVE_REDIRECTS} redirects"
        )))
    }

    /// The size of a file on another host, from its `Content-Range`; the token stays home.
    fn remote_size(&self, location: &str) -> Result<u64, Failure> {
        let resp = self
            .meta
            .get(location)
            .header("Range", "bytes=0-0")
            .call()
            .map_err(|e| failure(e, self.etag_timeout()))?;
        check_status(resp.status().as_u16(), resp.headers())?;
        let range = required(resp.headers(), "content-range")?;
        range_total(&range)
    }

    /// Streams the body of `url` into `out`, calling `progress` with each chunk's length.
    /// Returns the number of bytes written.
    pub fn download(
        &self,
        url: &str,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, Failure> {
        let timeout = (DOWNLOAD_TIMEOUT_VAR, self.timeouts.download);
        let resp = self
            .authorized(self.files.get(url))
            .call()
            .map_err(|e| failure(e, timeout))?;
        let status = resp.status().as_u16();
        check_status(status, resp.headers())?;
        if status != 200 && status != 206 {
            return Err(Failure::Protocol(format!(
                "HTTP {status} where the file's body was expected"
            )));
        }
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_failure(e, timeout)),
            };
            out.write_all(&buf[..n]).map_err(Failure::Write)?;
            total += n as u64;
            progress(n as u64);
        }
        Ok(total)
    }
}

/// Sends hf-hub's repo info request with the etag timeout set on it and reads the answer.
pub(crate) fn read_info(
    req: RequestBuilder<WithoutBody>,
    timeouts: Timeouts,
) -> Result<RepoInfo, Failure> {
    let timeout = (ETAG_TIMEOUT_VAR, timeouts.etag);
    let mut resp = req
        .config()
        .http_status_as_error(false)
        .timeout_connect(Some(timeouts.etag))
        .timeout_per_read(Some(timeouts.etag))
        .build()
        .call()
        .map_err(|e| failure(e, timeout))?;
    check_status(resp.status().as_u16(), resp.headers())?;
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_INFO_BYTES)
        .read_to_string()
        .map_err(|e| failure(e, timeout))?;
    serde_json::from_str(&body)
        .map_err(|e| Failure::Protocol(format!("the repo info answer is not the hub's JSON: {e}")))
}

fn check_status(status: u16, h: &HeaderMap) -> Result<(), Failure> {
    if status >= 400 {
        return Err(Failure::Status {
            status,
            code: header(h, "x-error-code"),
        });
    }
    Ok(())
}

/// Sorts a ureq error into timed out, unreachable, or a protocol fault.
fn failure(e: ureq::Error, (var, after): (&'static str, Duration)) -> Failure {
    match e {
        ureq::Error::StatusCode(status) => Failure::Status { status, code: None },
        ureq::Error::Timeout(_) => Failure::TimedOut { var, after },
        ureq::Error::Io(io) => io_failure(io, (var, after)),
        e @ (ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Tls(_)
        | ureq::Error::Rustls(_)
        | ureq::Error::ConnectProxyFailed(_)
        | ureq::Error::BodyStalled) => Failure::Transport(e.to_string()),
        other => Failure::Protocol(other.to_string()),
    }
}

/// An I/O error while talking to the hub: a timeout (as ureq reports it, or as the socket does),
/// else a broken connection.
fn io_failure(e: std::io::Error, timeout: (&'static str, Duration)) -> Failure {
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
        if matches!(inner, ureq::Error::Timeout(_)) {
            return Failure::TimedOut {
                var: timeout.0,
                after: timeout.1,
            };
        }
    }
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::TimedOut {
            var: timeout.0,
            after: timeout.1,
        },
        _ => Failure::Transport(e.to_string()),
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn required(h: &HeaderMap, name: &str) -> Result<String, Failure> {
    header(h, name).ok_or_else(|| Failure::Protocol(format!("the answer has no {name} header")))
}

/// `X-Linked-Etag` when present (LFS), else `ETag`, without quotes or a weak `W/` mark.
fn linked_etag(h: &HeaderMap) -> Result<String, Failure> {
    let raw = match header(h, "x-linked-etag") {
        Some(e) => e,
        None => required(h, "etag")?,
    };
    Ok(normalize_etag(&raw))
}

pub(crate) fn normalize_etag(raw: &str) -> String {
    raw.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn parse_size(s: &str, name: &str) -> Result<u64, Failure> {
    s.parse()
        .map_err(|_| Failure::Protocol(format!("{name} {s:?} is not a size")))
}

/// The total of `Content-Range: bytes 0-0/1234`.
pub(crate) fn range_total(range: &str) -> Result<u64, Failure> {
    match range.rsplit_once('/') {
        Some((_, total)) if total != "*" => parse_size(total.trim(), "Content-Range"),
        _ => Err(Failure::Protocol(format!(
            "Content-Range {range:?} has no total size"
        ))),
    }
}

/// `scheme://host[:port]` of a URL, to resolve a relative redirect against.
pub(crate) fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_lose_quotes_and_weak_marks() {
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag(" abc "), "abc");
    }

    #[test]
    fn content_range_totals_and_origins() {
        assert_eq!(range_total("bytes 0-0/1234").unwrap(), 1234);
        assert!(range_total("bytes 0-0/*").is_err());
        assert!(range_total("bytes 0-0").is_err());
        assert_eq!(
            origin("http://127.0.0.1:8080/org/m/resolve/main/x.json"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
    }
}
