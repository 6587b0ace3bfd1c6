//! Opening a hub-format checkpoint dir for merging: its config.json, and its weights
//! (`model.safetensors` or the shards of `model.safetensors.index.json`) mapped with mmap, so that
//! a tensor's bytes are read only when it is merged and can be released right after.

use super::names::{role, Role};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One tensor of a checkpoint: where its bytes are, and what it is.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// The name as stored in the file.
    pub name: String,
    pub role: Role,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    file: usize,
    /// Byte range inside the mapped file (header included in the offsets).
    start: usize,
    end: usize,
}

#[derive(Debug)]
struct WeightsFile {
    path: PathBuf,
    map: Mmap,
}

/// A checkpoint dir opened for merging.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    /// config.json, as written (key order preserved).
    pub config: serde_json::Value,
    pub model_type: String,
    files: Vec<WeightsFile>,
    /// Every tensor, in file order (shards in the index's sorted file order).
    pub tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    by_canonical: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir`: reads config.json (needs `model_type`) and maps the weights.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", config_path.display()))?;
        let Some(model_type) = config.get("model_type").and_then(|v| v.as_str()) else {
            bail!("{}: no `model_type` string", config_path.display());
        };
        let model_type = model_type.to_string();

        let mut files = Vec::new();
        for path in weight_files(dir)? {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the map is read-only; like every mmap-based loader (candle, safetensors), we
            // rely on nobody truncating the checkpoint while it is being merged.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            files.push(WeightsFile { path, map });
        }

        let mut tensors = Vec::new();
        for (index, wf) in files.iter().enumerate() {
            let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&wf.map)
                .with_context(|| {
                    format!("reading the safetensors header of {}", wf.path.display())
                })?;
            let data_start = 8 + header_len;
            for name in metadata.offset_keys() {
                let Some(info) = metadata.info(&name) else {
                    continue;
                };
                tensors.push(TensorEntry {
                    role: role(&model_type, &name),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    file: index,
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                    name,
                });
            }
        }
        let mut by_name = HashMap::new();
        let mut by_canonical = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                bail!("{}: tensor {} appears twice", dir.display(), t.name);
            }
            if let Role::Body { canonical } = &t.role {
                if let Some(j) = by_canonical.insert(canonical.clone(), i) {
                    bail!(
                        "{}: tensors {} and {} are the same body tensor {canonical}",
                        dir.display(),
                        tensors[j].name,
                        t.name
                    );
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            model_type,
            files,
            tensors,
            by_name,
            by_canonical,
        })
    }

    /// The body tensor with this architecture-normalised name.
    pub fn body(&self, canonical: &str) -> Option<&TensorEntry> {
        self.by_canonical.get(canonical).map(|&i| &self.tensors[i])
    }

    /// The tensor stored under exactly this name.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor of this checkpoint.
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.files[t.file].map[t.start..t.end]
    }

    /// The weights file that holds `t` (for error messages).
    pub fn file_of(&self, t: &TensorEntry) -> &Path {
        &self.files[t.file].path
    }

    /// Drops the pages of `t` from this process's resident set once it has been merged (they stay
    /// in the page cache): this keeps the peak RSS of a merge near one chunk per input.
    pub fn release(&self, t: &TensorEntry) {
        self.release_range(t, 0, t.end - t.start);
    }

    /// Like `release`, for the bytes `offset .. offset + len` of `t` only. Only whole pages inside
    /// the range are dropped, so the neighbouring bytes stay resident.
    pub fn release_range(&self, t: &TensorEntry, offset: usize, len: usize) {
        let map = &self.files[t.file].map;
        let start = t.start + offset;
        let end = (start + len).min(t.end);
        let page = page_size();
        let base = map.as_ptr() as usize;
        // Round inward to whole pages (in address space, where pages are aligned).
        let first = (base + start).div_ceil(page) * page - base;
        let last = ((base + end) / page) * page - base;
        if last > first {
            // SAFETY: the map is read-only and file-backed, so dropping its pages loses nothing:
            // a later access reads them back from the file. Failure only costs memory, so the
            // result is ignored.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
            };
        }
    }

    /// sha256 of the weights: of `model.safetensors`, or of the shards concatenated in sorted order.
    /// Read through the file (not the map) so hashing does not grow the resident set.
    pub fn weights_sha256(&self) -> Result<String> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for wf in &self.files {
            let mut file =
                File::open(&wf.path).with_context(|| format!("opening {}", wf.path.display()))?;
            loop {
                let n = file
                    .read(&mut buf)
                    .with_context(|| format!("reading {}", wf.path.display()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        Ok(hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }
}

/// The weights files of a checkpoint dir: `model.safetensors`, else the shards named by
/// `model.safetensors.index.json` (sorted, deduplicated).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json (convert .bin checkpoints to safetensors first)",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index_path)
        .with_context(|| format!("reading {}", index_path.display()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index_path.display()))?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no `weight_map` object", index_path.display());
    };
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            bail!(
                "{}: weight_map entry {tensor} is not a file name",
                index_path.display()
            );
        };
        shards.push(file.to_string());
    }
    shards.sort();
    shards.dedup();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}
