//! Which files of a repo to use, decided from its file list alone (pure): the weights format,
//! the tokenizer files, and a dataset's parquet files grouped by config and split.

use super::PickleMode;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const CONFIG: &str = "config.json";
pub const SAFETENSORS: &str = "model.safetensors";
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
pub const PICKLE: &str = "pytorch_model.bin";
pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const VOCAB_TXT: &str = "vocab.txt";
pub const VOCAB_JSON: &str = "vocab.json";
pub const MERGES_TXT: &str = "merges.txt";
/// Tokenizer files used when present; a repo without them is fine.
pub const OPTIONAL_TOKENIZER_FILES: [&str; 2] =
    ["tokenizer_config.json", "special_tokens_map.json"];
/// The dataset card, whose YAML header names the class labels.
pub const README: &str = "README.md";

/// Where a resolved model's weights are.
#[derive(Debug, Clone, PartialEq)]
pub enum Weights {
    Safetensors(PathBuf),
    /// A `model.safetensors.index.json` and the shards it names.
    Sharded {
        index: PathBuf,
        shards: Vec<PathBuf>,
    },
    /// A PyTorch pickle, only when `--allow-pickle` was given.
    Pickle(PathBuf),
}

/// The weights file to fetch first (shards are named by the index once it is present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsPlan {
    Single,
    Sharded,
    Pickle,
}

/// The files of a model repo to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPlan {
    pub weights: WeightsPlan,
    /// Must be present: config, the weights file (or index), the tokenizer files.
    pub required: Vec<String>,
    /// Fetched when the repo has them.
    pub optional: Vec<String>,
}

/// Decides the files of a model repo from its listing.
pub fn plan_model(files: &[String], pickle: PickleMode) -> Result<ModelPlan> {
    let has = |f: &str| files.iter().any(|x| x == f);
    if !has(CONFIG) {
        bail!("the repo has no {CONFIG}");
    }
    let (weights, weights_file) = if has(SAFETENSORS) {
        (WeightsPlan::Single, SAFETENSORS)
    } else if has(SAFETENSORS_INDEX) {
        (WeightsPlan::Sharded, SAFETENSORS_INDEX)
    } else if has(PICKLE) {
        if pickle != PickleMode::Allow {
            bail!("the repo has only PyTorch pickle weights ({PICKLE}), which can run code when loaded; pass --allow-pickle to use them anyway");
        }
        (WeightsPlan::Pickle, PICKLE)
    } else {
        bail!("the repo has no weights: none of {SAFETENSORS}, {SAFETENSORS_INDEX} (or {PICKLE} with --allow-pickle)");
    };
    let mut required = vec![CONFIG.to_string(), weights_file.to_string()];
    if has(TOKENIZER_JSON) {
        required.push(TOKENIZER_JSON.into());
    } else if has(VOCAB_JSON) && has(MERGES_TXT) {
        required.extend([VOCAB_JSON.to_string(), MERGES_TXT.to_string()]);
    } else if has(VOCAB_TXT) {
        required.push(VOCAB_TXT.into());
    } else {
        bail!("the repo has no tokenizer: none of {TOKENIZER_JSON}, {VOCAB_TXT}, {VOCAB_JSON} + {MERGES_TXT}");
    }
    let optional = OPTIONAL_TOKENIZER_FILES
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    Ok(ModelPlan {
        weights,
        required,
        optional,
    })
}

/// The shard file names a `model.safetensors.index.json` maps its tensors to, sorted, once each.
pub fn shards_from_index(index_json: &str) -> Result<Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_str(index_json).context("parsing the safetensors index")?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .context("the safetensors index has no `weight_map` object")?;
    let mut shards: Vec<String> = map
        .values()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .context("a `weight_map` value is not a string")
        })
        .collect::<Result<_>>()?;
    shards.sort();
    shards.dedup();
    for s in &shards {
        if s.contains("..") || s.starts_with('/') {
            bail!("the safetensors index names an unsafe shard path {s:?}");
        }
    }
    Ok(shards)
}

/// The config and split a parquet file holds, from its path in a repo:
/// `data/train-00000-of-00001.parquet` (config `default`), `<config>/train-00000-of-00002.parquet`,
/// the hub's conversion `<config>/<split>/0000.parquet`, or the older `<config>/<name>-<split>.parquet`.
pub fn classify_parquet(path: &str) -> Option<(String, String)> {
    let stem = path.strip_suffix(".parquet")?;
    let parts: Vec<&str> = stem.split('/').collect();
    let config_of = |dir: &str| {
        if dir == "data" {
            "default".to_string()
        } else {
            dir.to_string()
        }
    };
    match parts.as_slice() {
        [file] => Some(("default".into(), split_of(file)?)),
        [dir, file] => Some((config_of(dir), split_of(file)?)),
        [config, split, file] if file.chars().all(|c| c.is_ascii_digit()) => {
            Some((config.to_string(), split.to_string()))
        }
        [config, "data", file] => Some((config.to_string(), split_of(file)?)),
        _ => None,
    }
}

/// `train-00000-of-00003-1a2b` → `train`; `imdb-test` → `test`.
fn split_of(file: &str) -> Option<String> {
    let pieces: Vec<&str> = file.split('-').collect();
    let shard_at = pieces
        .windows(3)
        .position(|w| is_digits(w[0]) && w[1] == "of" && is_digits(w[2]));
    let name = match shard_at {
        Some(i) => pieces[..i].join("-"),
        None => file.to_string(),
    };
    let split = name.rsplit('-').next().unwrap_or(&name);
    (!split.is_empty() && !is_digits(split)).then(|| split.to_string())
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

/// The parquet files of one config grouped by split (each split's files sorted), and the config
/// chosen: the one asked for, else the only one, else `default` when present.
pub fn group_parquet(
    files: &[String],
    config: Option<&str>,
) -> Result<(String, BTreeMap<String, Vec<String>>)> {
    let mut by_config: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for f in files {
        if let Some((c, s)) = classify_parquet(f) {
            by_config
                .entry(c)
                .or_default()
                .entry(s)
                .or_default()
                .push(f.clone());
        }
    }
    if by_config.is_empty() {
        bail!("no parquet files");
    }
    let names = || by_config.keys().cloned().collect::<Vec<_>>().join(", ");
    let chosen = match config {
        Some(c) if by_config.contains_key(c) => c.to_string(),
        Some(c) => bail!("no parquet files for config {c:?}; configs: {}", names()),
        None if by_config.len() == 1 => by_config.keys().next().cloned().unwrap_or_default(),
        None if by_config.contains_key("default") => "default".to_string(),
        None => bail!(
            "the dataset has several configs ({}); name one with --config",
            names()
        ),
    };
    let mut splits = by_config.remove(&chosen).unwrap_or_default();
    for v in splits.values_mut() {
        v.sort();
    }
    Ok((chosen, splits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prefers_safetensors_and_tokenizer_json() {
        let p = plan_model(
            &list(&[
                "config.json",
                "model.safetensors",
                "pytorch_model.bin",
                "tokenizer.json",
                "vocab.txt",
                "tokenizer_config.json",
                "README.md",
            ]),
            PickleMode::Refuse,
        )
        .unwrap();
        assert_eq!(p.weights, WeightsPlan::Single);
        assert_eq!(
            p.required,
            list(&["config.json", "model.safetensors", "tokenizer.json"])
        );
        assert_eq!(p.optional, list(&["tokenizer_config.json"]));
    }

    #[test]
    fn falls_back_to_sharded_and_vocab_files() {
        let p = plan_model(
            &list(&[
                "config.json",
                "model.safetensors.index.json",
                "vocab.json",
                "merges.txt",
                "vocab.txt",
            ]),
            PickleMode::Refuse,
        )
        .unwrap();
        assert_eq!(p.weights, WeightsPlan::Sharded);
        assert_eq!(
            p.required,
            list(&[
                "config.json",
                "model.safetensors.index.json",
                "vocab.json",
                "merges.txt"
            ])
        );
        let p = plan_model(
            &list(&["config.json", "model.safetensors", "vocab.txt"]),
            PickleMode::Refuse,
        )
        .unwrap();
        assert_eq!(
            p.required,
            list(&["config.json", "model.safetensors", "vocab.txt"])
        );
    }

    #[test]
    fn pickle_only_repos_need_the_flag() {
        let files = list(&["config.json", "pytorch_model.bin", "vocab.txt"]);
        let err = format!("{:#}", plan_model(&files, PickleMode::Refuse).unwrap_err());
        assert!(
            err.contains("--allow-pickle") && err.contains("pytorch_model.bin"),
            "{err}"
        );
        assert_eq!(
            plan_model(&files, PickleMode::Allow).unwrap().weights,
            WeightsPlan::Pickle
        );
        assert!(plan_model(
            &list(&["config.json", "model.safetensors"]),
            PickleMode::Allow
        )
        .is_err());
        assert!(plan_model(
            &list(&["model.safetensors", "vocab.txt"]),
            PickleMode::Allow
        )
        .is_err());
    }

    #[test]
    fn shard_names_come_from_the_weight_map() {
        let idx = r#"{"metadata":{},"weight_map":{"a":"model-00002-of-00002.safetensors","b":"model-00001-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#;
        assert_eq!(
            shards_from_index(idx).unwrap(),
            list(&[
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ])
        );
        assert!(shards_from_index(r#"{"weight_map":{"a":"../x"}}"#).is_err());
        assert!(shards_from_index("{}").is_err());
    }

    #[test]
    fn parquet_paths_name_config_and_split() {
        let c = |p: &str| classify_parquet(p).map(|(a, b)| format!("{a}/{b}"));
        assert_eq!(
            c("data/train-00000-of-00001.parquet").as_deref(),
            Some("default/train")
        );
        assert_eq!(
            c("data/validation-00000-of-00001-3e2a.parquet").as_deref(),
            Some("default/validation")
        );
        assert_eq!(
            c("cola/test-00000-of-00001.parquet").as_deref(),
            Some("cola/test")
        );
        assert_eq!(
            c("mnli/validation_matched/0000.parquet").as_deref(),
            Some("mnli/validation_matched")
        );
        assert_eq!(
            c("plain_text/imdb-unsupervised.parquet").as_deref(),
            Some("plain_text/unsupervised")
        );
        assert_eq!(c("README.md"), None);
    }

    #[test]
    fn groups_one_config_by_split() {
        let files = list(&[
            "cola/train-00001-of-00002.parquet",
            "cola/train-00000-of-00002.parquet",
            "cola/validation-00000-of-00001.parquet",
            "sst2/train-00000-of-00001.parquet",
        ]);
        let (cfg, splits) = group_parquet(&files, Some("cola")).unwrap();
        assert_eq!(cfg, "cola");
        assert_eq!(
            splits["train"],
            list(&[
                "cola/train-00000-of-00002.parquet",
                "cola/train-00001-of-00002.parquet"
            ])
        );
        assert_eq!(splits.len(), 2);
        let err = format!("{:#}", group_parquet(&files, None).unwrap_err());
        assert!(err.contains("cola, sst2"), "{err}");
        assert!(group_parquet(&files, Some("qnli")).is_err());
        let (cfg, _) = group_parquet(&list(&["data/train-00000-of-00001.parquet"]), None).unwrap();
        assert_eq!(cfg, "default");
    }
}
