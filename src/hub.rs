//! HuggingFace hub access: resolve model and dataset ids (with an optional revision) to an exact
//! commit and a snapshot directory in the standard HF cache, online through hf-hub or offline from
//! the cache alone, so that results record the revision they used and Python tools share the files.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod cache;
pub mod card;
pub mod files;
mod http;
pub mod materialize;
mod remote;
pub mod tokenizer;

pub use card::{Feature, FeatureType};
pub use files::Weights;
pub use tokenizer::tokenizer_for;

/// The hub's etag of a file kept in git (not LFS): its git blob id, as hex.
pub fn git_blob_id(content: &[u8]) -> String {
    remote::to_hex(&remote::git_blob_sha1(content))
}

/// The public hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The branch a reference without `@revision` resolves through.
pub const DEFAULT_REVISION: &str = "main";
/// The revision under which the hub publishes its parquet conversion of a dataset.
pub const PARQUET_CONVERSION_REVISION: &str = "refs/convert/parquet";

/// Whether the network may be used (`HF_HUB_OFFLINE=1` forbids it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    Online,
    /// Cache only: revisions resolve through `refs/<rev>` in the cache.
    Offline,
}

/// Whether a repo that only has PyTorch pickles (`pytorch_model.bin`) may be used. Pickles can run
/// code when loaded by Python and are never used unless asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickleMode {
    Refuse,
    Allow,
}

/// Whether downloads draw a progress bar on the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Bar,
    Quiet,
}

/// How long a request may wait for the hub, as huggingface_hub's `HF_HUB_ETAG_TIMEOUT` and
/// `HF_HUB_DOWNLOAD_TIMEOUT` define it: each bounds connecting and every single read, so a hung
/// server fails the request while a slow but moving download carries on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// Metadata requests: the repo info call and each file's `Range: bytes=0-0` probe.
    pub etag: Duration,
    /// File downloads: the longest wait for the next bytes of the body.
    pub download: Duration,
}

/// huggingface_hub's `DEFAULT_ETAG_TIMEOUT`.
pub const DEFAULT_ETAG_TIMEOUT: Duration = Duration::from_secs(10);
/// huggingface_hub's `DEFAULT_DOWNLOAD_TIMEOUT`.
pub const DEFAULT_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            etag: DEFAULT_ETAG_TIMEOUT,
            download: DEFAULT_DOWNLOAD_TIMEOUT,
        }
    }
}

/// A hub access token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Trims the raw text; an empty token is no token.
    pub fn new(raw: &str) -> Option<Token> {
        let t = raw.trim();
        (!t.is_empty()).then(|| Token(t.to_string()))
    }

    pub(crate) fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How to reach the hub and where its cache lives, as huggingface_hub defines it.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// `HF_HUB_CACHE`: holds `models--org--name/{blobs,refs,snapshots}` and `datasets--…`.
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    /// `HF_TOKEN`, else the file `HF_TOKEN_PATH` (default `$HF_HOME/token`).
    pub token: Option<Token>,
    pub network: NetworkMode,
    pub pickle: PickleMode,
    pub progress: ProgressMode,
    /// `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT`.
    pub timeouts: Timeouts,
}

/// The environment variables and files `HubOptions::from_env` reads, as plain data so the rules
/// can be tested without touching the process environment.
#[derive(Debug, Default, Clone)]
pub struct HubEnv {
    pub vars: BTreeMap<String, String>,
    /// The user's home directory (for the `~/.cache/huggingface` default).
    pub home: Option<PathBuf>,
}

impl HubEnv {
    fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `HF_HOME`: default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
    pub fn hf_home(&self) -> PathBuf {
        if let Some(h) = self.var("HF_HOME") {
            return expand_home(h, self.home.as_deref());
        }
        let cache = match self.var("XDG_CACHE_HOME") {
            Some(x) => expand_home(x, self.home.as_deref()),
            None => self.home.clone().unwrap_or_default().join(".cache"),
        };
        cache.join("huggingface")
    }

    /// `HF_HUB_CACHE` (or the legacy `HUGGINGFACE_HUB_CACHE`), default `$HF_HOME/hub`.
    pub fn hub_cache(&self) -> PathBuf {
        match self
            .var("HF_HUB_CACHE")
            .or_else(|| self.var("HUGGINGFACE_HUB_CACHE"))
        {
            Some(c) => expand_home(c, self.home.as_deref()),
            None => self.hf_home().join("hub"),
        }
    }

    /// `HF_TOKEN_PATH`, default `$HF_HOME/token`.
    pub fn token_path(&self) -> PathBuf {
        match self.var("HF_TOKEN_PATH") {
            Some(p) => expand_home(p, self.home.as_deref()),
            None => self.hf_home().join("token"),
        }
    }

    /// huggingface_hub's `_is_true`: 1, ON, YES, TRUE in any case.
    pub fn offline(&self) -> bool {
        self.var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_uppercase().as_str(),
                    "1" | "ON" | "YES" | "TRUE"
                )
            })
            .unwrap_or(false)
    }

    /// A timeout variable in seconds (huggingface_hub reads an integer; a decimal is accepted too).
    /// Unset or empty gives `default`; anything but a positive finite number is an error naming it.
    pub fn timeout(&self, name: &str, default: Duration) -> Result<Duration> {
        let Some(v) = self.var(name) else {
            return Ok(default);
        };
        match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
            _ => bail!("{name}={v:?}: expected a positive number of seconds"),
        }
    }

    /// `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT`.
    pub fn timeouts(&self) -> Result<Timeouts> {
        Ok(Timeouts {
            etag: self.timeout("HF_HUB_ETAG_TIMEOUT", DEFAULT_ETAG_TIMEOUT)?,
            download: self.timeout("HF_HUB_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT)?,
        })
    }
}

fn expand_home(p: &str, home: Option<&Path>) -> PathBuf {
    match (p.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => h.join(rest),
        _ if p == "~" => home
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(p)),
        _ => PathBuf::from(p),
    }
}

impl HubOptions {
    /// Options for a given cache directory and the public hub, online, no token.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            cache_dir: cache_dir.into(),
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            network: NetworkMode::Online,
            pickle: PickleMode::Refuse,
            progress: ProgressMode::Quiet,
            timeouts: Timeouts::default(),
        }
    }

    /// Reads `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN` (or the token file),
    /// `HF_HUB_OFFLINE` and the two timeouts from the process environment.
    pub fn from_env() -> Self {
        let env = HubEnv {
            vars: std::env::vars()
                .filter(|(k, _)| {
                    k.starts_with("HF_") || k == "HUGGINGFACE_HUB_CACHE" || k == "XDG_CACHE_HOME"
                })
                .collect(),
            home: std::env::var_os("HOME").map(PathBuf::from),
        };
        let token_file = std::fs::read_to_string(env.token_path()).ok();
        Self::from_hub_env(&env, token_file.as_deref())
    }

    /// The rules of `from_env` over given variables and token-file contents.
    pub fn from_hub_env(env: &HubEnv, token_file: Option<&str>) -> Self {
        let mut o = HubOptions::new(env.hub_cache());
        if let Some(e) = env.var("HF_ENDPOINT") {
            o.endpoint = e.trim_end_matches('/').to_string();
        }
        o.token = env
            .var("HF_TOKEN")
            .and_then(Token::new)
            .or_else(|| token_file.and_then(Token::new));
        if env.offline() {
            o.network = NetworkMode::Offline;
        }
        o.progress = ProgressMode::Bar;
        // Infallible for its many callers: a malformed timeout is reported and the default kept.
        o.timeouts = Timeouts {
            etag: env
                .timeout("HF_HUB_ETAG_TIMEOUT", DEFAULT_ETAG_TIMEOUT)
                .unwrap_or_else(|e| {
                    eprintln!("warning: {e:#}; using {}s", DEFAULT_ETAG_TIMEOUT.as_secs());
                    DEFAULT_ETAG_TIMEOUT
                }),
            download: env
                .timeout("HF_HUB_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT)
                .unwrap_or_else(|e| {
                    eprintln!(
                        "warning: {e:#}; using {}s",
                        DEFAULT_DOWNLOAD_TIMEOUT.as_secs()
                    );
                    DEFAULT_DOWNLOAD_TIMEOUT
                }),
        };
        o
    }
}

/// What kind of repo an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The cache folder prefix and the URL word.
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

/// A model named on the hub: `org/name` or `name`, with an optional `@revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub repo: String,
    pub revision: Option<String>,
}

impl ModelRef {
    /// Parses `repo[@revision]`, e.g. `roberta-base` or `ibm/ColD-Fusion@0a1b2c`.
    pub fn parse(s: &str) -> Result<ModelRef> {
        let (repo, revision) = split_revision(s).with_context(|| format!("model id {s:?}"))?;
        Ok(ModelRef { repo, revision })
    }

    /// The revision asked for, `main` when none was.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.revision {
            Some(r) => write!(f, "{}@{r}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

fn split_revision(s: &str) -> Result<(String, Option<String>)> {
    let (repo, rev) = match s.split_once('@') {
        Some((r, v)) => (r, Some(v)),
        None => (s, None),
    };
    validate_repo_id(repo)?;
    if let Some(v) = rev {
        if v.is_empty() || v.contains("..") || v.chars().any(char::is_whitespace) {
            bail!("invalid revision {v:?}");
        }
    }
    Ok((repo.to_string(), rev.map(str::to_string)))
}

fn validate_repo_id(repo: &str) -> Result<()> {
    let parts: Vec<&str> = repo.split('/').collect();
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
        bail!(
            "invalid hub repo id {repo:?}: expected `name` or `org/name` (letters, digits, - _ .)"
        );
    }
    Ok(())
}

/// A model resolved to one commit, with its files present in `dir`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    pub repo: String,
    /// The revision as asked (`main` when none was).
    pub revision: String,
    /// The commit sha it resolved to.
    pub commit: String,
    /// The snapshot directory (`…/snapshots/<commit>`) holding the files.
    pub dir: PathBuf,
    /// Where the weights are, in `dir`.
    pub weights: Weights,
}

/// A dataset named on the hub, with an optional subset (config) and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    pub repo: String,
    pub config: Option<String>,
    pub revision: Option<String>,
}

impl DatasetRef {
    /// Parses `repo[@revision]`; the config is given separately.
    pub fn parse(s: &str, config: Option<String>) -> Result<DatasetRef> {
        let (repo, revision) = split_revision(s).with_context(|| format!("dataset id {s:?}"))?;
        Ok(DatasetRef {
            repo,
            config,
            revision,
        })
    }

    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }
}

/// A dataset resolved to one commit: its parquet files per split and what the card says.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedDataset {
    pub repo: String,
    /// The revision as asked (`main` when none was).
    pub revision: String,
    /// The revision the files were taken from: the one asked, or `refs/convert/parquet` when the
    /// repo has no parquet files of its own.
    pub files_revision: String,
    /// The commit sha of `files_revision`.
    pub commit: String,
    /// The subset the files belong to (`default` for single-config repos).
    pub config: String,
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Parquet files per split name, in shard order.
    pub splits: BTreeMap<String, Vec<PathBuf>>,
    /// Class names from the card's `dataset_info` (the first `class_label` feature), if any.
    pub label_names: Option<Vec<String>>,
    /// All features the card lists for the config (empty when it has no card or none).
    pub features: Vec<Feature>,
}

/// Resolves a model to a commit and makes its weights, config and tokenizer files present in the
/// cache (downloading them unless offline).
pub fn resolve_model(r: &ModelRef, opts: &HubOptions) -> Result<ResolvedModel> {
    match opts.network {
        NetworkMode::Online => remote::resolve_model(r, opts).or_else(|e| {
            // As huggingface_hub does: when the hub cannot be reached, a cached revision stands in.
            match cache::resolve_model_offline(r, opts) {
                Ok(m) if remote::is_unreachable(&e) => {
                    eprintln!(
                        "warning: {e:#}; using the cached {}@{} (commit {})",
                        r.repo,
                        r.revision(),
                        m.commit
                    );
                    Ok(m)
                }
                _ => Err(e),
            }
        }),
        NetworkMode::Offline => cache::resolve_model_offline(r, opts),
    }
    .with_context(|| format!("resolving model {}@{}", r.repo, r.revision()))
}

/// Resolves a dataset to a commit, one config, and its parquet files per split.
pub fn resolve_dataset(r: &DatasetRef, opts: &HubOptions) -> Result<ResolvedDataset> {
    match opts.network {
        NetworkMode::Online => remote::resolve_dataset(r, opts).or_else(|e| {
            match cache::resolve_dataset_offline(r, opts) {
                Ok(d) if remote::is_unreachable(&e) => {
                    eprintln!(
                        "warning: {e:#}; using the cached {}@{} (commit {})",
                        r.repo,
                        r.revision(),
                        d.commit
                    );
                    Ok(d)
                }
                _ => Err(e),
            }
        }),
        NetworkMode::Offline => cache::resolve_dataset_offline(r, opts),
    }
    .with_context(|| format!("resolving dataset {}@{}", r.repo, r.revision()))
}

/// Loads a PyTorch pickle's tensors; refuses unless the options allow pickles.
pub fn read_pickle_weights(
    path: &Path,
    opts: &HubOptions,
) -> Result<Vec<(String, candle_core::Tensor)>> {
    if opts.pickle != PickleMode::Allow {
        bail!(
            "refusing to read PyTorch pickle {}: pass --allow-pickle to allow it",
            path.display()
        );
    }
    candle_core::pickle::read_all(path)
        .with_context(|| format!("reading PyTorch pickle {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> HubEnv {
        HubEnv {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: Some(PathBuf::from("/home/u")),
        }
    }

    #[test]
    fn cache_paths_follow_huggingface_hub_defaults() {
        let o = HubOptions::from_hub_env(&env(&[]), None);
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(o.network, NetworkMode::Online);
        assert!(o.token.is_none());
        let o = HubOptions::from_hub_env(&env(&[("HF_HOME", "/data/hf")]), None);
        assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
        assert_eq!(
            env(&[("HF_HOME", "/data/hf")]).token_path(),
            PathBuf::from("/data/hf/token")
        );
        let o = HubOptions::from_hub_env(
            &env(&[("HF_HOME", "/data/hf"), ("HF_HUB_CACHE", "~/c")]),
            None,
        );
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/c"));
        let o = HubOptions::from_hub_env(&env(&[("XDG_CACHE_HOME", "/x")]), None);
        assert_eq!(o.cache_dir, PathBuf::from("/x/huggingface/hub"));
    }

    #[test]
    fn endpoint_offline_and_token_come_from_env() {
        let o = HubOptions::from_hub_env(
            &env(&[
                ("HF_ENDPOINT", "http://127.0.0.1:9/"),
                ("HF_HUB_OFFLINE", "yes"),
            ]),
            Some("  file-token\n"),
        );
        assert_eq!(o.endpoint, "http://127.0.0.1:9");
        assert_eq!(o.network, NetworkMode::Offline);
        assert_eq!(o.token.as_ref().map(Token::secret), Some("file-token"));
        let o = HubOptions::from_hub_env(
            &env(&[("HF_TOKEN", "hf_env"), ("HF_HUB_OFFLINE", "0")]),
            Some("file-token"),
        );
        assert_eq!(o.token.as_ref().map(Token::secret), Some("hf_env"));
        assert_eq!(o.network, NetworkMode::Online);
    }

    #[test]
    fn timeouts_come_from_huggingface_hub_variables() {
        let o = HubOptions::from_hub_env(&env(&[]), None);
        assert_eq!(o.timeouts, Timeouts::default());
        assert_eq!(o.timeouts.etag, Duration::from_secs(10));
        let e = env(&[
            ("HF_HUB_ETAG_TIMEOUT", "3"),
            ("HF_HUB_DOWNLOAD_TIMEOUT", " 0.5 "),
        ]);
        let o = HubOptions::from_hub_env(&e, None);
        assert_eq!(o.timeouts.etag, Duration::from_secs(3));
        assert_eq!(o.timeouts.download, Duration::from_millis(500));
        for bad in ["0", "-1", "ten", "inf"] {
            let e = env(&[("HF_HUB_DOWNLOAD_TIMEOUT", bad)]);
            let err = format!("{:#}", e.timeouts().unwrap_err());
            assert!(err.contains("HF_HUB_DOWNLOAD_TIMEOUT"), "{bad}: {err}");
            // from_env keeps going with the default.
            let o = HubOptions::from_hub_env(&e, None);
            assert_eq!(o.timeouts.download, DEFAULT_DOWNLOAD_TIMEOUT);
        }
    }

    #[test]
    fn token_never_shows_in_debug_output() {
        let o = HubOptions::from_hub_env(&env(&[("HF_TOKEN", "hf_SECRETVALUE")]), None);
        let shown = format!("{o:?} {:#?}", o);
        assert!(!shown.contains("SECRETVALUE"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn model_refs_parse_with_and_without_revision() {
        let m = ModelRef::parse("roberta-base").unwrap();
        assert_eq!((m.repo.as_str(), m.revision()), ("roberta-base", "main"));
        let m = ModelRef::parse("ibm/ColD-Fusion@v1.0").unwrap();
        assert_eq!(
            (m.repo.as_str(), m.revision.as_deref()),
            ("ibm/ColD-Fusion", Some("v1.0"))
        );
        assert_eq!(m.to_string(), "ibm/ColD-Fusion@v1.0");
        for bad in ["", "a/b/c", "a@", "/x", "a--b/c", "x y"] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
