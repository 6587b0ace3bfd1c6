//! The streaming merge driver: checks that the inputs agree, then writes the merged checkpoint
//! tensor by tensor, in the template's order, straight to disk. The safetensors header is written
//! first (every size is known from the template), then each tensor's bytes as they are computed, so
//! the process holds one chunk of output and the pages of one tensor per input at a time.

use super::checkpoint::{Checkpoint, TensorEntry};
use super::kernel::{Elements, FloatDtype, ParamMerger, Source as ElementSource};
use super::names::{body_architecture, Role};
use super::{MergeSpec, Method};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Tokenizer files carried over from the template checkpoint when present.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spm.model",
    "tokenizer.model",
];

/// One merge to perform: settings, inputs (checkpoint dirs) and the output dir.
#[derive(Debug, Clone)]
pub struct MergeRequest {
    pub spec: MergeSpec,
    /// Required by every method but `average`; for `average` it is only the template (config,
    /// tokenizer, tensor names and dtypes) and is not averaged in.
    pub base: Option<PathBuf>,
    pub models: Vec<PathBuf>,
    /// Merge the classification heads too (they must agree in shape) instead of dropping them.
    pub keep_head: bool,
    /// The output checkpoint dir; must not exist yet.
    pub out: PathBuf,
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeOutcome {
    pub out: PathBuf,
    /// Tensors computed by the merge method.
    pub merged: usize,
    /// Non-float tensors copied from the template (e.g. `position_ids`).
    pub copied: usize,
    /// Template tensors left out (heads), by name.
    pub dropped: Vec<String>,
    /// Size of the written model.safetensors.
    pub bytes: u64,
}

/// Where an output tensor's values come from.
enum Source<'a> {
    /// Bytes of the template, verbatim.
    Copy(&'a Checkpoint, &'a TensorEntry),
    /// Merged from one entry per model (and the base's, for delta methods).
    Merge {
        /// The normalised name: keys the DARE masks, shown in errors.
        key: String,
        base: Option<(&'a Checkpoint, &'a TensorEntry)>,
        models: Vec<(&'a Checkpoint, &'a TensorEntry)>,
        /// A head that the base lacks: averaged across the models instead of the chosen method.
        average_instead: bool,
    },
}

struct OutTensor<'a> {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    source: Source<'a>,
}

/// Merges the checkpoints of `req` into `req.out` (written to a temp dir, then renamed).
pub fn merge_checkpoints(req: &MergeRequest) -> Result<MergeOutcome> {
    req.spec.validate()?;
    if req.models.len() != req.spec.weights.len() {
        bail!(
            "--weights has {} values but {} models were given",
            req.spec.weights.len(),
            req.models.len()
        );
    }
    if req.spec.method.needs_base() && req.base.is_none() {
        bail!("--method {} needs --base", req.spec.method.as_str());
    }
    if req.out.exists() {
        bail!(
            "--out {} already exists; choose a new dir",
            req.out.display()
        );
    }
    let base = match &req.base {
        Some(dir) => {
            Some(Checkpoint::open(dir).with_context(|| format!("--base {}", dir.display()))?)
        }
        None => None,
    };
    let models = req
        .models
        .iter()
        .map(|dir| Checkpoint::open(dir).with_context(|| format!("model {}", dir.display())))
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = models.first() else {
        bail!("no models to merge");
    };
    let template = base.as_ref().unwrap_or(first);
    for m in &models {
        if m.model_type != template.model_type {
            bail!(
                "architecture mismatch: {} has model_type {:?}, {} has {:?}",
                template.dir.join("config.json").display(),
                template.model_type,
                m.dir.join("config.json").display(),
                m.model_type
            );
        }
    }
    for m in models.iter().chain(base.as_ref()) {
        check_same_shape_config(template, m)?;
    }
    let delta_base = if req.spec.method.needs_base() {
        base.as_ref()
    } else {
        None
    };
    let (plan, dropped) = plan_tensors(template, delta_base, &models, req.keep_head)?;

    let parent = match req.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("creating the parent of --out {}", req.out.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".recycle-merge-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temp dir in {}", parent.display()))?;

    let weights_path = tmp.path().join("model.safetensors");
    let bytes = write_safetensors(&weights_path, &req.spec, &plan)?;
    let config = merged_config(req, template, base.as_ref(), &models)?;
    let config_path = tmp.path().join("config.json");
    let text = serde_json::to_string_pretty(&config).context("serialising config.json")?;
    std::fs::write(&config_path, text + "\n")
        .with_context(|| format!("writing {}", config_path.display()))?;
    for name in TOKENIZER_FILES {
        let src = template.dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, tmp.path().join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }

    crate::atomic::replace_dir(tmp, &req.out)
        .with_context(|| format!("--out {}", req.out.display()))?;
    let merged = plan
        .iter()
        .filter(|t| matches!(t.source, Source::Merge { .. }))
        .count();
    Ok(MergeOutcome {
        out: req.out.clone(),
        merged,
        copied: plan.len() - merged,
        dropped,
        bytes,
    })
}

/// The config fields that set an encoder's depth and widths (BERT family, then DistilBERT's names).
const SHAPE_FIELDS: [&str; 8] = [
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "n_layers",
    "dim",
    "hidden_dim",
    "n_heads",
];

/// Refuses inputs whose configs disagree on depth or widths. The output takes the template's
/// tensors, so a deeper input's extra layers would otherwise be dropped without a word (a
/// shallower one is caught by its missing tensors). Tensors outside the template that are not
/// layers (a pooler the template lacks) are dropped, as the template's architecture has no place
/// for them.
fn check_same_shape_config(template: &Checkpoint, m: &Checkpoint) -> Result<()> {
    for field in SHAPE_FIELDS {
        if let (Some(a), Some(b)) = (template.config.get(field), m.config.get(field)) {
            if a != b {
                bail!(
                    "architecture mismatch: {} has {field} {a}, {} has {b}; merging would drop \
                     or misplace layers",
                    template.dir.join("config.json").display(),
                    m.dir.join("config.json").display()
                );
            }
        }
    }
    Ok(())
}

/// Lines up every output tensor with its inputs, refusing missing tensors and shape mismatches.
fn plan_tensors<'a>(
    template: &'a Checkpoint,
    base: Option<&'a Checkpoint>,
    models: &'a [Checkpoint],
    keep_head: bool,
) -> Result<(Vec<OutTensor<'a>>, Vec<String>)> {
    let mut plan = Vec::new();
    let mut dropped = Vec::new();
    for t in &template.tensors {
        let Role::Body { canonical } = &t.role else {
            dropped.push(t.name.clone());
            continue;
        };
        if FloatDtype::from_safetensors(t.dtype).is_none() {
            plan.push(OutTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                source: Source::Copy(template, t),
            });
            continue;
        }
        let mut inputs = Vec::with_capacity(models.len());
        for m in models {
            let Some(e) = m.body(canonical) else {
                bail!(
                    "tensor {canonical} is missing from {} (present in {} as {})",
                    m.dir.display(),
                    template.file_of(t).display(),
                    t.name
                );
            };
            check_input(template, t, m, e)?;
            inputs.push((m, e));
        }
        plan.push(OutTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            source: Source::Merge {
                key: canonical.clone(),
                base: base.map(|b| (b, t)),
                models: inputs,
                average_instead: false,
            },
        });
    }
    if keep_head {
        let first = &models[0];
        let heads: Vec<&TensorEntry> = first
            .tensors
            .iter()
            .filter(|t| t.role == Role::ClassificationHead)
            .collect();
        if heads.is_empty() {
            bail!(
                "--keep-head: {} has no classification head",
                first.dir.display()
            );
        }
        for h in heads {
            if FloatDtype::from_safetensors(h.dtype).is_none() {
                bail!(
                    "--keep-head: head tensor {} of {} is not a float tensor",
                    h.name,
                    first.file_of(h).display()
                );
            }
            let mut inputs = Vec::with_capacity(models.len());
            for m in models {
                let Some(e) = m.get(&h.name) else {
                    bail!(
                        "--keep-head: head tensor {} is missing from {}",
                        h.name,
                        m.dir.display()
                    );
                };
                check_input(first, h, m, e).context("--keep-head: the heads disagree")?;
                inputs.push((m, e));
            }
            let base_head = base.and_then(|b| b.get(&h.name).map(|e| (b, e)));
            let base_head = base_head.filter(|(_, e)| e.shape == h.shape);
            plan.push(OutTensor {
                name: h.name.clone(),
                dtype: h.dtype,
                shape: h.shape.clone(),
                source: Source::Merge {
                    key: h.name.clone(),
                    average_instead: base.is_some() && base_head.is_none(),
                    base: base_head,
                    models: inputs,
                },
            });
        }
        dropped.retain(|name| !plan.iter().any(|t| &t.name == name));
    }
    Ok((plan, dropped))
}

/// Refuses an input tensor that does not match the template's: shape, or a non-float dtype.
fn check_input(
    template: &Checkpoint,
    t: &TensorEntry,
    m: &Checkpoint,
    e: &TensorEntry,
) -> Result<()> {
    if e.shape != t.shape {
        bail!(
            "shape mismatch: tensor {} in {} has shape {:?}, tensor {} in {} has shape {:?}",
            t.name,
            template.file_of(t).display(),
            t.shape,
            e.name,
            m.file_of(e).display(),
            e.shape
        );
    }
    if FloatDtype::from_safetensors(e.dtype).is_none() {
        bail!(
            "tensor {} in {} has dtype {:?}, which cannot be merged",
            e.name,
            m.file_of(e).display(),
            e.dtype
        );
    }
    Ok(())
}

/// Writes the header, then every tensor's bytes in plan order; returns the file size.
fn write_safetensors(path: &Path, spec: &MergeSpec, plan: &[OutTensor<'_>]) -> Result<u64> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in plan {
        let elements: usize = t.shape.iter().product();
        let size = match (&t.source, FloatDtype::from_safetensors(t.dtype)) {
            (Source::Copy(c, e), _) => c.bytes(e).len(),
            (_, Some(d)) => elements * d.size(),
            (_, None) => bail!("tensor {}: dtype {:?} cannot be merged", t.name, t.dtype),
        };
        header.insert(
            t.name.clone(),
            json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + size] }),
        );
        offset += size;
    }
    let mut header_bytes =
        serde_json::to_vec(&Value::Object(header)).context("safetensors header")?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }

    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let write_err = || format!("writing {}", path.display());
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .with_context(write_err)?;
    w.write_all(&header_bytes).with_context(write_err)?;

    let average_spec = MergeSpec {
        method: Method::Average,
        normalize: true,
        ..spec.clone()
    };
    let mut encoded = Vec::new();
    for t in plan {
        match &t.source {
            Source::Copy(c, e) => {
                w.write_all(c.bytes(e)).with_context(write_err)?;
                c.release(e);
            }
            Source::Merge {
                key,
                base,
                models,
                average_instead,
            } => {
                let Some(out_dtype) = FloatDtype::from_safetensors(t.dtype) else {
                    bail!("tensor {}: dtype {:?} cannot be merged", t.name, t.dtype);
                };
                let base_view = base.map(|(c, e)| mapped(c, e)).transpose()?;
                let model_views = models
                    .iter()
                    .map(|&(c, e)| mapped(c, e))
                    .collect::<Result<Vec<_>>>()?;
                let base_src = base_view.as_ref().map(|v| v as &dyn ElementSource);
                let model_srcs: Vec<&dyn ElementSource> = model_views
                    .iter()
                    .map(|v| v as &dyn ElementSource)
                    .collect();
                let tensor_spec = if *average_instead {
                    &average_spec
                } else {
                    spec
                };
                let merger = ParamMerger::new(tensor_spec, key, base_src, &model_srcs)
                    .with_context(|| format!("merging tensor {}", t.name))?;
                merger
                    .run(base_src, &model_srcs, |chunk| {
                        encoded.clear();
                        out_dtype.encode(chunk, &mut encoded);
                        w.write_all(&encoded).with_context(write_err)
                    })
                    .with_context(|| format!("merging tensor {}", t.name))?;
                if let Some((c, e)) = base {
                    c.release(e);
                }
                for (c, e) in models {
                    c.release(e);
                }
            }
        }
    }
    w.flush().with_context(write_err)?;
    let total = 8 + header_bytes.len() as u64 + offset as u64;
    let written = w
        .get_ref()
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    if written != total {
        bail!(
            "{}: wrote {written} bytes, expected {total}",
            path.display()
        );
    }
    Ok(total)
}

/// config.json of the merged checkpoint: the template's, with `architectures` set to the body's
/// class (or the first model's classifier with `--keep-head`) and a `recycle_merge` record.
fn merged_config(
    req: &MergeRequest,
    template: &Checkpoint,
    base: Option<&Checkpoint>,
    models: &[Checkpoint],
) -> Result<Value> {
    let mut config = template.config.clone();
    let Some(obj) = config.as_object_mut() else {
        bail!("{}: config.json is not an object", template.dir.display());
    };
    if req.keep_head {
        let first = &models[0].config;
        for key in [
            "architectures",
            "id2label",
            "label2id",
            "num_labels",
            "problem_type",
        ] {
            if let Some(v) = first.get(key) {
                obj.insert(key.to_string(), v.clone());
            }
        }
    } else if let Some(arch) = obj
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
    {
        let body = body_architecture(arch);
        obj.insert("architectures".into(), json!([body]));
        for key in ["id2label", "label2id", "num_labels", "problem_type"] {
            obj.remove(key);
        }
    }
    let spec = &req.spec;
    let record = |c: &Checkpoint| -> Result<Value> {
        let path = std::fs::canonicalize(&c.dir).unwrap_or_else(|_| c.dir.clone());
        Ok(json!({
            "path": path.display().to_string(),
            "weights_sha256": c.weights_sha256()?,
        }))
    };
    let base_record = base.map(record).transpose()?;
    let model_records = models.iter().map(record).collect::<Result<Vec<_>>>()?;
    let dare = matches!(spec.method, Method::DareLinear | Method::DareTies);
    obj.insert(
        "recycle_merge".into(),
        json!({
            "method": spec.method.as_str(),
            "base": base_record,
            "models": model_records,
            "weights": spec.weights,
            "lambda": spec.method.needs_base().then_some(spec.lambda),
            "density": (spec.method == Method::Ties).then_some(spec.density),
            "drop_rate": dare.then_some(spec.drop_rate),
            "seed": dare.then_some(spec.seed),
            "normalize": spec.normalize,
            "keep_head": req.keep_head,
            "recycle_version": env!("CARGO_PKG_VERSION"),
        }),
    );
    Ok(config)
}

/// A float tensor of a mapped checkpoint, as a merge source that releases its pages as soon as
/// the merge is done with them (so a large tensor never becomes resident in full).
struct Mapped<'a> {
    checkpoint: &'a Checkpoint,
    entry: &'a TensorEntry,
    view: Elements<'a>,
    size: usize,
}

fn mapped<'a>(c: &'a Checkpoint, e: &'a TensorEntry) -> Result<Mapped<'a>> {
    let Some(dtype) = FloatDtype::from_safetensors(e.dtype) else {
        bail!("tensor {}: dtype {:?} cannot be merged", e.name, e.dtype);
    };
    Ok(Mapped {
        checkpoint: c,
        entry: e,
        view: Elements::Raw {
            bytes: c.bytes(e),
            dtype,
        },
        size: dtype.size(),
    })
}

impl ElementSource for Mapped<'_> {
    fn len(&self) -> usize {
        self.view.len()
    }

    fn read(&self, start: usize, out: &mut [f32]) {
        self.view.read(start, out);
    }

    fn done(&self, start: usize, n: usize) {
        self.checkpoint
            .release_range(self.entry, start * self.size, n * self.size);
    }
}
