//! Online resolution: hf-hub's repo URLs and info call, our own file requests under timeouts
//! (src/hub/http.rs), every file taken from one commit, size and sha256 checks before a download
//! enters the cache, refs kept current, and errors that say which repo, revision and file failed
//! and why.

use super::cache::{self, repo_folder, snapshot_dir};
use super::files::{self, WeightsPlan};
use super::http::{self, Client, Failure};
use super::{
    card, DatasetRef, HubOptions, ModelRef, ProgressMode, RepoKind, ResolvedDataset, ResolvedModel,
    PARQUET_CONVERSION_REVISION,
};
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The hub could not be reached (as opposed to answering with an error), so the cache may stand in.
#[derive(Debug)]
pub(crate) struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Whether an error says the hub could not be reached.
pub(crate) fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unreachable>())
}

/// One repo at one revision, online.
struct Remote<'a> {
    repo: ApiRepo,
    client: Client,
    kind: RepoKind,
    name: &'a str,
    revision: &'a str,
    folder: PathBuf,
    opts: &'a HubOptions,
}

impl<'a> Remote<'a> {
    fn new(kind: RepoKind, name: &'a str, revision: &'a str, opts: &'a HubOptions) -> Result<Self> {
        let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
            .with_endpoint(opts.endpoint.clone())
            .with_token(opts.token.as_ref().map(|t| t.secret().to_string()))
            .with_progress(false)
            .build()
            .map_err(|e| anyhow!("setting up the hub client: {e}"))?;
        let repo_type = match kind {
            RepoKind::Model => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        };
        let repo = api.repo(Repo::with_revision(
            name.to_string(),
            repo_type,
            revision.to_string(),
        ));
        Ok(Remote {
            repo,
            client: Client::new(opts.token.clone(), opts.timeouts),
            kind,
            name,
            revision,
            folder: repo_folder(&opts.cache_dir, kind, name),
            opts,
        })
    }

    fn what(&self) -> String {
        let kind = match self.kind {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        };
        format!("{kind} {}@{}", self.name, self.revision)
    }

    /// Puts a failed request in words naming the repo, revision and file, and what to do.
    fn explain(&self, f: Failure, file: Option<&str>) -> anyhow::Error {
        let target = match file {
            Some(name) => format!("file {name} of {}", self.what()),
            None => self.what(),
        };
        let endpoint = &self.opts.endpoint;
        let token_advice = match self.opts.token {
            Some(_) => "the token given (HF_TOKEN or the token file) has no access to it",
            None => "no token is set: accept the repo's terms on the hub, then set HF_TOKEN or write the token to $HF_HOME/token",
        };
        match f {
            Failure::Status { status: 404, code } => {
                match (file, code.as_deref()) {
                    (_, Some("RevisionNotFound")) => anyhow!("{target}: not found (404): the repo has no revision {}", self.revision),
                    (_, Some("RepoNotFound")) => anyhow!("{target}: not found (404): no repo {} on {endpoint}", self.name),
                    (Some(name), _) => anyhow!("{target}: not found (404): the repo has no file {name} at this revision"),
                    (None, _) => anyhow!("{target}: not found (404): no such repo or revision on {endpoint}"),
                }
            }
            Failure::Status { status: status @ (401 | 403), code } => {
                let why = match code.as_deref() {
                    Some("GatedRepo") => "the repo is gated",
                    Some("RepoNotFound") => "the repo is private or does not exist",
                    _ => "the repo is gated or private (or does not exist)",
                };
                anyhow!("{target}: access denied ({status}): {why}; {token_advice}")
            }
            Failure::Status { status, code } => {
                let code = code.map(|c| format!(" ({c})")).unwrap_or_default();
                anyhow!("{target}: the hub at {endpoint} answered HTTP {status}{code}")
            }
            Failure::TimedOut { var, after } => anyhow::Error::new(Unreachable(format!(
                "{target}: the hub at {endpoint} sent nothing for {}s ({var}); check the network, raise {var}, or set HF_HUB_OFFLINE=1 to use the cache only",
                after.as_secs_f64()
            ))),
            Failure::Transport(why) => anyhow::Error::new(Unreachable(format!(
                "{target}: cannot reach the hub at {endpoint} ({why}); check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache only"
            ))),
            Failure::Protocol(why) => {
                anyhow!("{target}: unexpected answer from the hub at {endpoint}: {why}")
            }
            Failure::Write(e) => anyhow!("{target}: writing the download into the cache {}: {e}", self.folder.display()),
        }
    }

    /// The commit the revision points at and the repo's file list.
    fn info(&self) -> Result<(String, Vec<String>)> {
        let info = http::read_info(self.repo.info_request(), self.opts.timeouts)
            .map_err(|e| self.explain(e, None))?;
        if !cache::is_commit(&info.sha) {
            bail!(
                "{}: the hub's info answer has no valid commit sha ({:?})",
                self.what(),
                info.sha
            );
        }
        Ok((
            info.sha,
            info.siblings.into_iter().map(|s| s.rfilename).collect(),
        ))
    }

    /// Makes `file` present in the commit's snapshot: reused when there, else downloaded and checked
    /// before it enters the cache. `Ok(None)` for an optional file the hub does not have.
    fn fetch(&self, commit: &str, file: &str, optional: bool) -> Result<Option<PathBuf>> {
        let pointer = snapshot_dir(&self.folder, commit).join(file);
        if pointer.is_file() {
            return Ok(Some(pointer));
        }
        let url = self.repo.url(file);
        let meta = match self.client.metadata(&url) {
            Ok(m) => m,
            Err(Failure::Status { status: 404, .. }) if optional => return Ok(None),
            Err(e) => return Err(self.explain(e, Some(file))),
        };
        if meta.commit != commit {
            bail!("file {file} of {}: the revision moved from {commit} to {} during the download; run again", self.what(), meta.commit);
        }
        let blobs = self.folder.join("blobs");
        let blob = blobs.join(&meta.etag);
        let reusable = std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == meta.size);
        if !reusable {
            std::fs::create_dir_all(&blobs)
                .with_context(|| format!("creating {}", blobs.display()))?;
            // A private temporary name: concurrent runs never write into each other's file, and
            // nothing unchecked ever sits under the blob's name.
            let mut part = tempfile::Builder::new()
                .prefix(&format!("{}.", meta.etag))
                .suffix(".incomplete")
                .tempfile_in(&blobs)
                .with_context(|| format!("creating a temporary file in {}", blobs.display()))?;
            let bar = progress_bar(self.opts.progress, meta.size, file);
            let mut on_chunk = |n: u64| bar.inc(n);
            let got = self
                .client
                .download(&url, part.as_file_mut(), &mut on_chunk);
            bar.finish_and_clear();
            got.map_err(|e| self.explain(e, Some(file)))?;
            verify(part.path(), meta.size, &meta.etag).map_err(|e| {
                e.context(format!(
                    "corrupt download of file {file} of {} (commit {commit}); nothing was kept, run again",
                    self.what()
                ))
            })?;
            part.persist(&blob)
                .with_context(|| format!("moving the download into {}", blob.display()))?;
        }
        link_pointer(&blob, &pointer, file)?;
        Ok(Some(pointer))
    }
}

fn progress_bar(mode: ProgressMode, size: u64, file: &str) -> indicatif::ProgressBar {
    match mode {
        ProgressMode::Quiet => indicatif::ProgressBar::hidden(),
        ProgressMode::Bar => {
            let bar = indicatif::ProgressBar::new(size);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            ) {
                bar.set_style(style);
            }
            bar.set_message(file.to_string());
            bar
        }
    }
}

/// `snapshots/<commit>/<file>` → `../../blobs/<etag>` (one `..` more per folder in `file`), as
/// huggingface_hub links them; a copy where symlinks are unavailable.
fn link_pointer(blob: &Path, pointer: &Path, file: &str) -> Result<()> {
    if let Some(dir) = pointer.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let up = file.split('/').count() + 1;
    let mut target = PathBuf::new();
    for _ in 0..up {
        target.push("..");
    }
    target.push("blobs");
    if let Some(name) = blob.file_name() {
        target.push(name);
    }
    #[cfg(unix)]
    let made = std::os::unix::fs::symlink(&target, pointer);
    #[cfg(not(unix))]
    let made = std::fs::copy(blob, pointer).map(|_| ());
    match made {
        Ok(()) => Ok(()),
        // Another run linked it first: the same blob under the same name.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && pointer.is_file() => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("linking {} to {}", pointer.display(), target.display()))
        }
    }
}

/// Checks a downloaded blob's size, then its content against the etag: the sha256 of LFS files
/// (weights, parquet), the git blob sha1 of small git-stored files. Other etags get the size check.
fn verify(blob: &Path, size: u64, etag: &str) -> Result<()> {
    let got = std::fs::metadata(blob)
        .with_context(|| format!("reading {}", blob.display()))?
        .len();
    if got != size {
        bail!("got {got} bytes, the hub announced {size}");
    }
    let hex = etag.chars().all(|c| c.is_ascii_hexdigit());
    let digest = match etag.len() {
        64 if hex => {
            let mut f =
                std::fs::File::open(blob).with_context(|| format!("opening {}", blob.display()))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f
                    .read(&mut buf)
                    .with_context(|| format!("reading {}", blob.display()))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            to_hex(&h.finalize())
        }
        40 if hex => {
            let body =
                std::fs::read(blob).with_context(|| format!("reading {}", blob.display()))?;
            to_hex(&git_blob_sha1(&body))
        }
        _ => return Ok(()),
    };
    if !digest.eq_ignore_ascii_case(etag) {
        bail!("content hash {digest} does not match the hub's etag {etag}");
    }
    Ok(())
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Git's object id of a blob (the hub's etag of a file not stored in LFS): SHA-1 of
/// `blob <len>\0` followed by the content.
pub fn git_blob_sha1(content: &[u8]) -> [u8; 20] {
    let mut msg = format!("blob {}\0", content.len()).into_bytes();
    msg.extend_from_slice(content);
    sha1(&msg)
}

/// SHA-1 (FIPS 180-4), only to check git-stored files against their etag; not for security.
fn sha1(msg: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut data = msg.to_vec();
    data.push(0x80);
    while data.len() % 64 != 56 {
        data.push(0);
    }
    data.extend_from_slice(&((msg.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in data.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

pub(crate) fn resolve_model(r: &ModelRef, opts: &HubOptions) -> Result<ResolvedModel> {
    let remote = Remote::new(RepoKind::Model, &r.repo, r.revision(), opts)?;
    let (commit, listing) = remote.info()?;
    let plan = files::plan_model(&listing, opts.pickle).with_context(|| remote.what())?;
    for f in &plan.required {
        remote.fetch(&commit, f, false)?;
    }
    for f in &plan.optional {
        remote.fetch(&commit, f, true)?;
    }
    let dir = snapshot_dir(&remote.folder, &commit);
    if plan.weights == WeightsPlan::Sharded {
        let index = dir.join(files::SAFETENSORS_INDEX);
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        for shard in
            files::shards_from_index(&text).with_context(|| format!("in {}", index.display()))?
        {
            remote.fetch(&commit, &shard, false)?;
        }
    }
    cache::write_ref(&remote.folder, r.revision(), &commit)?;
    let weights = cache::model_weights(&dir, &plan)?;
    cache::warn_if_pickle(&weights, &r.repo);
    Ok(ResolvedModel {
        repo: r.repo.clone(),
        revision: r.revision().to_string(),
        commit,
        dir,
        weights,
    })
}

pub(crate) fn resolve_dataset(r: &DatasetRef, opts: &HubOptions) -> Result<ResolvedDataset> {
    let main = Remote::new(RepoKind::Dataset, &r.repo, r.revision(), opts)?;
    let (commit, listing) = main.info()?;
    let has_parquet = listing.iter().any(|f| f.ends_with(".parquet"));
    let card = if listing.iter().any(|f| f == files::README) {
        main.fetch(&commit, files::README, true)?
    } else {
        None
    };
    cache::write_ref(&main.folder, r.revision(), &commit)?;
    let (files_remote, files_commit, files_listing) = if has_parquet {
        (main, commit, listing)
    } else {
        let conv = Remote::new(
            RepoKind::Dataset,
            &r.repo,
            PARQUET_CONVERSION_REVISION,
            opts,
        )?;
        let (c, l) = conv.info().context(
            "the repo has no parquet files of its own, so its parquet conversion is needed",
        )?;
        (conv, c, l)
    };
    let (_, splits) = files::group_parquet(&files_listing, r.config.as_deref())
        .with_context(|| files_remote.what())?;
    for f in splits.values().flatten() {
        files_remote.fetch(&files_commit, f, false)?;
    }
    cache::write_ref(&files_remote.folder, files_remote.revision, &files_commit)?;
    let dir = snapshot_dir(&files_remote.folder, &files_commit);
    let mut resolved =
        cache::dataset_from_snapshot(r, files_remote.revision, files_commit, dir, &files_listing)?;
    if let Some(card_path) = card {
        let text = std::fs::read_to_string(&card_path)
            .with_context(|| format!("reading {}", card_path.display()))?;
        match card::features(&text, &resolved.config) {
            Ok(f) => {
                resolved.label_names = card::label_names(&f);
                resolved.features = f;
            }
            Err(e) => eprintln!(
                "warning: {}: cannot read the card's YAML header ({e:#}); no label names",
                card_path.display()
            ),
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_matches_published_vectors() {
        // FIPS 180 examples and git's id of the empty blob.
        assert_eq!(
            to_hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            to_hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        assert_eq!(
            to_hex(&sha1(&[b'a'; 1_000_000])),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
        assert_eq!(
            to_hex(&git_blob_sha1(b"")),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
    }
}
