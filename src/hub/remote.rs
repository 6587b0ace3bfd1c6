//! Online resolution through hf-hub's sync API, plus what it leaves out: every file taken from one
//! commit, size and sha256 checks of each download, refs kept current, and errors that say which
//! repo, revision and file failed and why.

use super::cache::{self, repo_folder, snapshot_dir};
use super::files::{self, WeightsPlan};
use super::{
    card, DatasetRef, HubOptions, ModelRef, ProgressMode, RepoKind, ResolvedDataset, ResolvedModel,
    PARQUET_CONVERSION_REVISION,
};
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
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
    api: Api,
    repo: ApiRepo,
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
            .with_progress(opts.progress == ProgressMode::Bar)
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
            api,
            repo,
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

    /// Turns hf-hub's error into one that names the repo, revision and file and says what to do.
    fn explain(&self, e: ApiError, file: Option<&str>) -> anyhow::Error {
        let target = match file {
            Some(f) => format!("file {f} of {}", self.what()),
            None => self.what(),
        };
        let endpoint = &self.opts.endpoint;
        let ApiError::RequestError(req) = &e else {
            return anyhow!("fetching {target}: {e}");
        };
        match req.as_ref() {
            ureq::Error::StatusCode(404) => match file {
                Some(f) => {
                    anyhow!("{target}: not found (404): the repo has no file {f} at this revision")
                }
                None => {
                    anyhow!("{target}: not found (404): no such repo or revision on {endpoint}")
                }
            },
            ureq::Error::StatusCode(code @ (401 | 403)) => {
                let token = match self.opts.token {
                    Some(_) => "the token given (HF_TOKEN or the token file) has no access to it",
                    None => "no token is set: accept the repo's terms on the hub, then set HF_TOKEN or write the token to $HF_HOME/token",
                };
                anyhow!("{target}: access denied ({code}): the repo is gated or private (or does not exist); {token}")
            }
            ureq::Error::StatusCode(code) => {
                anyhow!("{target}: the hub at {endpoint} answered HTTP {code}")
            }
            ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_) => {
                anyhow::Error::new(Unreachable(format!("{target}: cannot reach the hub at {endpoint} ({req}); check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache only")))
            }
            other => anyhow!("fetching {target} from {endpoint}: {other}"),
        }
    }

    /// The commit the revision points at and the repo's file list.
    fn info(&self) -> Result<(String, Vec<String>)> {
        let info = self.repo.info().map_err(|e| self.explain(e, None))?;
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

    /// Makes `file` present in the commit's snapshot: reused when there, else downloaded and checked.
    /// `Ok(None)` for an optional file the hub does not have.
    fn fetch(&self, commit: &str, file: &str, optional: bool) -> Result<Option<PathBuf>> {
        let pointer = snapshot_dir(&self.folder, commit).join(file);
        if pointer.is_file() {
            return Ok(Some(pointer));
        }
        let meta = match self.api.metadata(&self.repo.url(file)) {
            Ok(m) => m,
            Err(ApiError::RequestError(e))
                if optional && matches!(*e, ureq::Error::StatusCode(404)) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(self.explain(e, Some(file))),
        };
        if meta.commit_hash() != commit {
            bail!("file {file} of {}: the revision moved from {commit} to {} during the download; run again", self.what(), meta.commit_hash());
        }
        let path = self
            .repo
            .download(file)
            .map_err(|e| self.explain(e, Some(file)))?;
        let blob = self.folder.join("blobs").join(meta.etag());
        if let Err(e) = verify(&blob, meta.size() as u64, meta.etag()) {
            // Leave nothing corrupt behind for the next run (or Python) to trust.
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&blob);
            return Err(e.context(format!(
                "corrupt download of file {file} of {} (commit {commit}); removed it, run again",
                self.what()
            )));
        }
        Ok(Some(path))
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
    cache::remove_commit_ref(&remote.folder, r.revision())?;
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
    cache::remove_commit_ref(&files_remote.folder, files_remote.revision)?;
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
