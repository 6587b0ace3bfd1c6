//! The job list of a suite: donor-creation jobs (stage 0), then model × target × seed evaluations
//! (stage 1), each with a stable id and a hash of everything that determines its result.
//!
//! Ids are derived from names (`donor/<name>`, `eval/<model>/<target>/seed<k>`), so appending a
//! candidate or a target to a suite leaves every existing id (and result file) in place.

use crate::leaderboard::Metric;
use crate::results::RESULT_SCHEMA_VERSION;
use crate::suite::{DatasetRef, ModelRef, Protocol, Suite};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::str::FromStr;

/// Which role a model plays in the leaderboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Baseline,
    Candidate,
}

/// What a job does; everything here (and only this) goes into the config hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    /// Fine-tune `base` on `source` and save the result as a checkpoint (intertraining donor).
    Donor {
        donor: String,
        base_name: String,
        base: ModelRef,
        /// The config hash of the job that made `base` (a fusion iteration's merge), so that a
        /// changed earlier iteration re-runs this one; `None` for a model that exists up front.
        /// Left out of the JSON when `None`, so plain donors keep their hashes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_hash: Option<String>,
        source: DatasetRef,
        protocol: Protocol,
        seed: u32,
        max_train: Option<usize>,
        max_eval: Option<usize>,
    },
    /// Fine-tune `model` on `target` with one seed and score it.
    Eval {
        model_name: String,
        role: Role,
        model: ModelRef,
        /// For a donor model: the config hash of the donor job (a changed donor re-runs this job).
        donor_hash: Option<String>,
        target: String,
        dataset: DatasetRef,
        metric: Metric,
        protocol: Protocol,
        seed: u32,
        max_train: Option<usize>,
        max_eval: Option<usize>,
    },
}

impl JobSpec {
    pub fn protocol(&self) -> &Protocol {
        match self {
            JobSpec::Donor { protocol, .. } | JobSpec::Eval { protocol, .. } => protocol,
        }
    }
    pub fn seed(&self) -> u32 {
        match self {
            JobSpec::Donor { seed, .. } | JobSpec::Eval { seed, .. } => *seed,
        }
    }
}

/// One unit of work.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Stable id; also the result file's path under the suite's results directory.
    pub id: String,
    /// 0: donor creation; 1: evaluation.
    pub stage: u8,
    pub spec: JobSpec,
    /// sha256 of the canonical JSON of `spec` plus the result schema version.
    pub config_hash: String,
    /// For an evaluation of a donor model: the donor's checkpoint, filled in by the runner from the
    /// donor's result record just before the job runs.
    pub donor_checkpoint: Option<PathBuf>,
    /// For a donor job: where the executor saves the checkpoint (hub format); set by the runner.
    pub output_dir: Option<PathBuf>,
}

/// The whole ordered job list of a suite.
pub fn plan(suite: &Suite) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    let mut donor_hashes = std::collections::BTreeMap::new();
    for d in &suite.donors {
        let spec = JobSpec::Donor {
            donor: d.name.clone(),
            base_name: d.base.name.clone(),
            base: d.base.source.clone(),
            base_hash: None,
            source: d.source.clone(),
            protocol: d.protocol.clone(),
            seed: 0,
            max_train: d.max_train,
            max_eval: d.max_eval,
        };
        let job = Job::new(format!("donor/{}", d.name), 0, spec)?;
        donor_hashes.insert(d.name.clone(), job.config_hash.clone());
        jobs.push(job);
    }
    for (mi, model) in suite.evaluated_models().into_iter().enumerate() {
        let (role, n_seeds) = if mi == 0 {
            (Role::Baseline, suite.seeds.baseline)
        } else {
            (Role::Candidate, suite.seeds.candidates)
        };
        let donor_hash = match &model.source {
            ModelRef::Donor { name } => donor_hashes.get(name).cloned(),
            _ => None,
        };
        for t in &suite.targets {
            for seed in 0..n_seeds {
                let spec = JobSpec::Eval {
                    model_name: model.name.clone(),
                    role,
                    model: model.source.clone(),
                    donor_hash: donor_hash.clone(),
                    target: t.name.clone(),
                    dataset: t.dataset.clone(),
                    metric: t.metric,
                    protocol: t.protocol.clone(),
                    seed,
                    max_train: t.max_train,
                    max_eval: t.max_eval,
                };
                jobs.push(Job::new(
                    format!("eval/{}/{}/seed{seed}", model.name, t.name),
                    1,
                    spec,
                )?);
            }
        }
    }
    Ok(jobs)
}

impl Job {
    /// A job with its config hash computed from `spec`.
    pub fn new(id: String, stage: u8, spec: JobSpec) -> Result<Job> {
        let config_hash = config_hash(&spec)
            .with_context(|| format!("job {id}: cannot hash its configuration"))?;
        Ok(Job {
            id,
            stage,
            spec,
            config_hash,
            donor_checkpoint: None,
            output_dir: None,
        })
    }
}

/// sha256 (hex) of the canonical JSON of a job spec and the result schema version.
pub fn config_hash(spec: &JobSpec) -> Result<String> {
    let value = serde_json::json!({ "schema_version": RESULT_SCHEMA_VERSION, "spec": spec });
    Ok(sha256_hex(canonical_json(&value).as_bytes()))
}

/// sha256 (hex) of the canonical JSON of a protocol.
pub fn protocol_hash(p: &Protocol) -> Result<String> {
    let value = serde_json::to_value(p).context("cannot serialise the protocol")?;
    Ok(sha256_hex(canonical_json(&value).as_bytes()))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compact JSON with object keys sorted at every level.
pub fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&map[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(canonical_json)
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

/// A shard `I/N` of a plan: 0-based index `I` of `N` slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Shard> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("--shard {s}: expected I/N, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("--shard {s}: I is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--shard {s}: N is not a number"))?;
        if count == 0 || index >= count {
            bail!("--shard {s}: need 0 ≤ I < N (shards are numbered from 0)");
        }
        Ok(Shard { index, count })
    }
}

/// Which jobs of a plan to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Selection {
    #[default]
    All,
    /// Round-robin over each stage's jobs in plan order.
    Shard(Shard),
    /// These ids (`--job`), in plan order.
    Jobs(Vec<String>),
}

/// The jobs of `plan` that `selection` picks, in plan order. Shards are disjoint and cover the
/// plan; each stage is dealt out separately so every shard gets its share of donors.
pub fn select(plan: &[Job], selection: &Selection) -> Result<Vec<Job>> {
    match selection {
        Selection::All => Ok(plan.to_vec()),
        Selection::Shard(s) => {
            let mut out = Vec::new();
            for stage in [0u8, 1] {
                out.extend(
                    plan.iter()
                        .filter(|j| j.stage == stage)
                        .enumerate()
                        .filter(|(k, _)| k % s.count == s.index)
                        .map(|(_, j)| j.clone()),
                );
            }
            Ok(out)
        }
        Selection::Jobs(ids) => {
            for id in ids {
                if !plan.iter().any(|j| &j.id == id) {
                    bail!("--job {id}: no such job in this suite (see `recycle plan`)");
                }
            }
            Ok(plan
                .iter()
                .filter(|j| ids.contains(&j.id))
                .cloned()
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"d":2,"c":3}],"x":null}}"#).unwrap();
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}"#
        );
    }

    #[test]
    fn base_hash_is_hashed_only_when_set() {
        let p = Protocol::default();
        let donor = |base_hash: Option<String>| JobSpec::Donor {
            donor: "d".into(),
            base_name: "b".into(),
            base: ModelRef::Hub {
                id: "org/b".into(),
                revision: None,
            },
            base_hash,
            source: DatasetRef::Hub {
                id: "glue".into(),
                config: None,
                revision: None,
            },
            protocol: p.clone(),
            seed: 0,
            max_train: None,
            max_eval: None,
        };
        // Without it, the JSON (and so every existing donor's hash) is as before the field.
        let json = serde_json::to_value(donor(None)).unwrap();
        assert!(json.get("base_hash").is_none(), "{json}");
        let a = config_hash(&donor(Some("x".into()))).unwrap();
        assert_ne!(config_hash(&donor(None)).unwrap(), a);
        assert_ne!(config_hash(&donor(Some("y".into()))).unwrap(), a);
    }

    #[test]
    fn shard_parsing_rejects_out_of_range() {
        assert_eq!(
            "1/4".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 4 }
        );
        assert!("4/4".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
