//! The standard HF cache layout (`models--org--name/{blobs,refs,snapshots/<commit>}`), shared
//! with Python tools, and resolution from it alone when offline (`HF_HUB_OFFLINE=1`).

use super::files::{self, ModelPlan, Weights, WeightsPlan};
use super::{
    card, DatasetRef, HubOptions, ModelRef, RepoKind, ResolvedDataset, ResolvedModel,
    PARQUET_CONVERSION_REVISION,
};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `<cache>/models--org--name` (or `datasets--…`).
pub fn repo_folder(cache_dir: &Path, kind: RepoKind, repo: &str) -> PathBuf {
    cache_dir.join(format!("{}--{}", kind.plural(), repo.replace('/', "--")))
}

/// `<repo folder>/snapshots/<commit>`.
pub fn snapshot_dir(folder: &Path, commit: &str) -> PathBuf {
    folder.join("snapshots").join(commit)
}

/// `<repo folder>/refs/<revision>`; `refs/convert/parquet` nests as huggingface_hub does.
pub fn ref_path(folder: &Path, revision: &str) -> PathBuf {
    folder.join("refs").join(revision)
}

/// A full 40-hex commit sha, which needs no ref to resolve.
pub fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Records that `revision` points at `commit` (not for revisions that are commits themselves).
pub fn write_ref(folder: &Path, revision: &str, commit: &str) -> Result<()> {
    if revision == commit {
        return Ok(());
    }
    let path = ref_path(folder, revision);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, commit).with_context(|| format!("writing cache ref {}", path.display()))
}

/// The commit a revision points at in the cache.
pub fn cached_commit(
    cache_dir: &Path,
    kind: RepoKind,
    repo: &str,
    revision: &str,
) -> Result<String> {
    let folder = repo_folder(cache_dir, kind, repo);
    if is_commit(revision) {
        if snapshot_dir(&folder, revision).is_dir() {
            return Ok(revision.to_string());
        }
        bail!(
            "offline: commit {revision} of {repo} is not in the cache ({} missing)",
            snapshot_dir(&folder, revision).display()
        );
    }
    let path = ref_path(&folder, revision);
    let commit = std::fs::read_to_string(&path).with_context(|| format!("offline: revision {revision} of {repo} is not in the cache ({} missing); run once online or unset HF_HUB_OFFLINE", path.display()))?;
    let commit = commit.trim().to_string();
    if !snapshot_dir(&folder, &commit).is_dir() {
        bail!(
            "offline: {} points at {commit} but its snapshot is missing",
            path.display()
        );
    }
    Ok(commit)
}

/// Every file in a snapshot, as repo paths with `/` separators, sorted.
pub fn list_snapshot(dir: &Path) -> Result<Vec<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            if path.is_dir() {
                walk(base, &path, out)?;
            } else if path.is_file() {
                let rel = path.strip_prefix(base).unwrap_or(&path);
                out.push(
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Checks that the plan's files are in `dir` and says where the weights are.
pub(crate) fn model_weights(dir: &Path, plan: &ModelPlan) -> Result<Weights> {
    for f in &plan.required {
        if !dir.join(f).is_file() {
            bail!("file {f} is missing from {}", dir.display());
        }
    }
    Ok(match plan.weights {
        WeightsPlan::Single => Weights::Safetensors(dir.join(files::SAFETENSORS)),
        WeightsPlan::Pickle => Weights::Pickle(dir.join(files::PICKLE)),
        WeightsPlan::Sharded => {
            let index = dir.join(files::SAFETENSORS_INDEX);
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?;
            let shards = files::shards_from_index(&text)
                .with_context(|| format!("in {}", index.display()))?;
            let shards = shards.iter().map(|s| dir.join(s)).collect::<Vec<_>>();
            if let Some(missing) = shards.iter().find(|s| !s.is_file()) {
                bail!(
                    "shard {} named by {} is missing",
                    missing.display(),
                    files::SAFETENSORS_INDEX
                );
            }
            Weights::Sharded { index, shards }
        }
    })
}

pub(crate) fn warn_if_pickle(w: &Weights, repo: &str) {
    if let Weights::Pickle(p) = w {
        eprintln!("warning: {repo}: using PyTorch pickle weights {} (--allow-pickle); pickles can run code when loaded by Python", p.display());
    }
}

pub(crate) fn resolve_model_offline(r: &ModelRef, opts: &HubOptions) -> Result<ResolvedModel> {
    let commit = cached_commit(&opts.cache_dir, RepoKind::Model, &r.repo, r.revision())?;
    let dir = snapshot_dir(
        &repo_folder(&opts.cache_dir, RepoKind::Model, &r.repo),
        &commit,
    );
    let listing = list_snapshot(&dir)?;
    let plan = files::plan_model(&listing, opts.pickle)
        .with_context(|| format!("offline: in the cached snapshot {}", dir.display()))?;
    let weights = model_weights(&dir, &plan).context("offline")?;
    warn_if_pickle(&weights, &r.repo);
    Ok(ResolvedModel {
        repo: r.repo.clone(),
        revision: r.revision().to_string(),
        commit,
        dir,
        weights,
    })
}

/// Splits, label names and features of one config's files in a snapshot.
pub(crate) fn dataset_from_snapshot(
    r: &DatasetRef,
    files_revision: &str,
    commit: String,
    dir: PathBuf,
    listing: &[String],
) -> Result<ResolvedDataset> {
    let (config, splits) = files::group_parquet(listing, r.config.as_deref())?;
    let splits: BTreeMap<String, Vec<PathBuf>> = splits
        .into_iter()
        .map(|(s, fs)| (s, fs.iter().map(|f| dir.join(f)).collect()))
        .collect();
    for f in splits.values().flatten() {
        if !f.is_file() {
            bail!("file {} is missing", f.display());
        }
    }
    let readme = dir.join(files::README);
    let features = match std::fs::read_to_string(&readme) {
        Ok(text) => card::features(&text, &config).unwrap_or_else(|e| {
            eprintln!(
                "warning: {}: cannot read the card's YAML header ({e:#}); no label names",
                readme.display()
            );
            vec![]
        }),
        Err(_) => vec![],
    };
    Ok(ResolvedDataset {
        repo: r.repo.clone(),
        revision: r.revision().to_string(),
        files_revision: files_revision.to_string(),
        commit,
        config,
        dir,
        splits,
        label_names: card::label_names(&features),
        features,
    })
}

pub(crate) fn resolve_dataset_offline(
    r: &DatasetRef,
    opts: &HubOptions,
) -> Result<ResolvedDataset> {
    let folder = repo_folder(&opts.cache_dir, RepoKind::Dataset, &r.repo);
    let commit = cached_commit(&opts.cache_dir, RepoKind::Dataset, &r.repo, r.revision())?;
    let dir = snapshot_dir(&folder, &commit);
    let listing = list_snapshot(&dir)?;
    if listing.iter().any(|f| f.ends_with(".parquet")) {
        let shown = dir.display().to_string();
        return dataset_from_snapshot(r, r.revision(), commit, dir, &listing)
            .with_context(|| format!("offline: in the cached snapshot {shown}"));
    }
    // No parquet files of its own: the conversion branch, as fetched online.
    let conv = cached_commit(
        &opts.cache_dir,
        RepoKind::Dataset,
        &r.repo,
        PARQUET_CONVERSION_REVISION,
    )?;
    let conv_dir = snapshot_dir(&folder, &conv);
    let mut listing = list_snapshot(&conv_dir)?;
    listing.retain(|f| f.ends_with(".parquet"));
    let mut resolved = dataset_from_snapshot(
        r,
        PARQUET_CONVERSION_REVISION,
        conv,
        conv_dir.clone(),
        &listing,
    )
    .with_context(|| format!("offline: in the cached snapshot {}", conv_dir.display()))?;
    // The card lives on the main branch.
    if let Ok(text) = std::fs::read_to_string(dir.join(files::README)) {
        resolved.features = card::features(&text, &resolved.config).unwrap_or_default();
        resolved.label_names = card::label_names(&resolved.features);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_huggingface_hub() {
        let c = Path::new("/c");
        let f = repo_folder(c, RepoKind::Model, "ibm/ColD-Fusion");
        assert_eq!(f, PathBuf::from("/c/models--ibm--ColD-Fusion"));
        assert_eq!(
            repo_folder(c, RepoKind::Dataset, "glue"),
            PathBuf::from("/c/datasets--glue")
        );
        assert_eq!(
            ref_path(&f, "refs/convert/parquet"),
            PathBuf::from("/c/models--ibm--ColD-Fusion/refs/refs/convert/parquet")
        );
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit("main"));
    }

    #[test]
    fn offline_resolution_reads_refs_and_names_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let folder = repo_folder(tmp.path(), RepoKind::Model, "org/m");
        let sha = "a".repeat(40);
        let err = format!(
            "{:#}",
            cached_commit(tmp.path(), RepoKind::Model, "org/m", "main").unwrap_err()
        );
        assert!(
            err.contains("main") && err.contains("org/m") && err.contains("refs"),
            "{err}"
        );
        std::fs::create_dir_all(snapshot_dir(&folder, &sha)).unwrap();
        write_ref(&folder, "main", &sha).unwrap();
        assert_eq!(
            cached_commit(tmp.path(), RepoKind::Model, "org/m", "main").unwrap(),
            sha
        );
        assert_eq!(
            cached_commit(tmp.path(), RepoKind::Model, "org/m", &sha).unwrap(),
            sha
        );
        assert!(cached_commit(tmp.path(), RepoKind::Model, "org/m", &"b".repeat(40)).is_err());
    }
}
