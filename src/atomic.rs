//! Atomic writes: a reader, or a re-run after a kill, sees the old file or directory or the new
//! one, never half of one. Every writer of results, reports, caches and checkpoints goes through
//! here: write a temporary sibling, make it durable, rename it into place.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Prefix of the temporary files `write_file` leaves behind when killed mid-write.
pub const TEMP_PREFIX: &str = ".tmp-";

/// The directory `path` lives in (`.` for a bare file name), created if missing.
fn parent_of(path: &Path) -> Result<&Path> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create directory {}", parent.display()))?;
    Ok(parent)
}

/// Makes a rename in `dir` durable (best effort: not every platform can fsync a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` atomically, the temporary file named `<prefix>…` (`TEMP_PREFIX` by
/// default, see `write_file`). The file is readable by others (0644), like a plain write.
pub fn write_file_prefixed(path: &Path, bytes: &[u8], prefix: &str) -> Result<()> {
    write_file_with(path, prefix, |tmp| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })
}

/// Writes `bytes` to `path` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_prefixed(path, bytes, TEMP_PREFIX)
}

/// Atomically creates `path` with a writer that needs a path of its own (a safetensors save):
/// `write` fills the temporary file it is given, which is then renamed to `path`.
pub fn write_file_with(
    path: &Path,
    prefix: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = parent_of(path)?;
    let suffix = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(&suffix)
        .tempfile_in(parent)
        .with_context(|| format!("cannot create a temporary file in {}", parent.display()))?;
    // A temporary file is private (0600); what it becomes is meant to be shared.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions of {}", tmp.path().display()))?;
    }
    write(tmp.path()).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    sync_dir(parent);
    Ok(())
}

/// Renames a finished temporary directory to `out`, replacing an old `out` if there is one: the old
/// directory is moved aside first and removed only once the new one is in place.
pub fn replace_dir(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
    let parent = parent_of(out)?;
    let old = if out.exists() {
        let trash = tempfile::Builder::new()
            .prefix(".old-")
            .tempdir_in(parent)
            .with_context(|| {
                format!(
                    "cannot create a temporary directory in {}",
                    parent.display()
                )
            })?;
        std::fs::rename(out, trash.path().join("old"))
            .with_context(|| format!("cannot move the old {} aside", out.display()))?;
        Some(trash)
    } else {
        None
    };
    let path = tmp.keep();
    if let Err(e) = std::fs::rename(&path, out) {
        let _ = std::fs::remove_dir_all(&path);
        return Err(e)
            .with_context(|| format!("cannot rename {} to {}", path.display(), out.display()));
    }
    sync_dir(parent);
    drop(old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_is_replaced_whole_and_no_temporary_is_left() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/r.json");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(&d.path().join("sub")), ["r.json"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644);
        }
    }

    #[test]
    fn a_failing_writer_leaves_the_old_file_and_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.safetensors");
        write_file(&p, b"old").unwrap();
        let err = write_file_with(&p, ".tmp-x-", |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("f.safetensors"), "{err:#}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(d.path()), ["f.safetensors"]);
    }

    #[test]
    fn a_directory_is_swapped_in_and_the_old_one_removed() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("ckpt");
        for content in ["a", "b"] {
            let tmp = tempfile::Builder::new()
                .prefix(".partial-")
                .tempdir_in(d.path())
                .unwrap();
            std::fs::write(tmp.path().join("w"), content).unwrap();
            replace_dir(tmp, &out).unwrap();
        }
        assert_eq!(std::fs::read_to_string(out.join("w")).unwrap(), "b");
        assert_eq!(names(d.path()), ["ckpt"]);
    }
}
