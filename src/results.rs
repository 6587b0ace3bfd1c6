//! Result schema v1 and the result store: one JSON file per job, written atomically as soon as the
//! job ends, so a killed run loses at most the job in flight. The schema is documented in
//! docs/result-schema.json.

use crate::leaderboard::Metric;
use crate::plan::Role;
use crate::suite::Protocol;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Version of the result record format; part of every config hash.
pub const RESULT_SCHEMA_VERSION: u32 = 1;

/// recycle's version, recorded in every result.
pub const RECYCLE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git revision recycle was built from (set by build.rs when git is available).
pub fn git_revision() -> Option<&'static str> {
    option_env!("RECYCLE_GIT_REV").filter(|s| !s.is_empty())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// An evaluation: a model fine-tuned on a target with one seed.
    Finetune,
    /// A donor checkpoint created by intertraining.
    Donor,
    /// A job that failed; `error` says why. Retried on the next run.
    Failure,
    /// Frozen-feature scores of a model on a dataset (no fine-tuning); `probe` holds them.
    Probe,
}

/// How pooled features are taken from an encoder's hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeaturePooling {
    /// The first token's state.
    Cls,
    /// The mean over real tokens.
    Mean,
}

/// Which hidden states are pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLayers {
    /// The last layer's output.
    Last,
    /// The mean over the embedding output and every layer's output.
    AllMean,
}

impl FeaturePooling {
    /// The serialised name (`cls`, `mean`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cls => "cls",
            Self::Mean => "mean",
        }
    }
}

impl FeatureLayers {
    /// The serialised name (`last`, `all_mean`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::AllMean => "all_mean",
        }
    }
}

/// The scores of a `probe` record. Accuracies are fractions, like every score of a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeScores {
    /// The proxy column these scores fill on the leaderboard (e.g. `mnli_lp`), if any.
    pub name: Option<String>,
    pub pooling: FeaturePooling,
    pub layers: FeatureLayers,
    /// Feature width (the encoder's hidden size).
    pub features: usize,
    /// The split the linear probe is scored on (`test` or `validation`).
    pub eval_split: String,
    /// Linear-probe accuracy on `eval_split` (classification only).
    pub lp_accuracy: Option<f64>,
    /// LogME on the train features (mean log-evidence per example).
    pub logme: Option<f64>,
    /// H-score on the train features (classification only).
    pub hscore: Option<f64>,
    /// Whether the features came from the feature cache.
    pub cached: bool,
}

/// The model a record is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRecord {
    /// The model's name in the suite.
    pub name: String,
    /// Hub id, path as written in the suite, or `donor:<name>`.
    pub id: String,
    pub revision: Option<String>,
    /// sha256 of the weights actually loaded (known once the job ran).
    pub weights_sha256: Option<String>,
}

/// The dataset a record is about (the target's, or a donor's source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRecord {
    pub id: String,
    /// The hub commit the dataset resolved to (`None` for a local directory). Records written
    /// before this field existed read as `None`.
    #[serde(default)]
    pub revision: Option<String>,
    pub fingerprint: Option<String>,
}

/// One result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultRecord {
    pub schema_version: u32,
    pub kind: RecordKind,
    pub recycle_version: String,
    pub git_revision: Option<String>,
    pub job_id: String,
    /// Hash of everything that determines the result (see `plan::config_hash`).
    pub config_hash: String,
    pub suite: String,
    pub arch: String,
    /// `baseline` or `candidate` for an evaluation; `None` for a donor job.
    pub role: Option<Role>,
    pub model: ModelRecord,
    pub dataset: DatasetRecord,
    /// The target's name (evaluations only).
    pub target: Option<String>,
    pub protocol: Protocol,
    pub protocol_hash: String,
    pub seed: u32,
    pub metric: Option<Metric>,
    /// Scores are fractions (0.87), not points.
    pub dev_score: Option<f64>,
    pub test_score: Option<f64>,
    pub n_train: Option<usize>,
    pub n_dev: Option<usize>,
    pub n_test: Option<usize>,
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub wall_time_s: f64,
    pub device: Option<String>,
    /// RFC 3339, UTC.
    pub finished_at: String,
    /// A donor's checkpoint directory.
    pub checkpoint: Option<String>,
    /// A failure's error chain.
    pub error: Option<String>,
    /// A probe record's scores (absent from every other kind, and from records written before
    /// probes existed: schema v1 stays readable both ways).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeScores>,
}

/// `SystemTime` as RFC 3339 UTC with second precision, e.g. `2024-05-01T12:00:00Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Prefix of the temporary files the store writes before renaming them into place.
use crate::atomic::TEMP_PREFIX;

/// Temporaries younger than this are left alone by `clean_stale_temps`.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// Extension of running markers.
const MARKER_EXTENSION: &str = "running";

/// Written next to a job's result path when the job starts and removed once its result is written:
/// `recycle plan`/`status` report the job as running while the process is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningMarker {
    pub job_id: String,
    pub config_hash: String,
    /// The host the job runs on (its pid means something only there).
    pub host: String,
    pub pid: u32,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// `<array job>_<task>` or the job id when run under Slurm.
    pub slurm_job: Option<String>,
}

/// The directory of result files: `<dir>/<suite>/<job id>.json`.
#[derive(Debug, Clone)]
pub struct ResultStore {
    dir: PathBuf,
}

impl ResultStore {
    pub fn new(dir: impl Into<PathBuf>) -> ResultStore {
        ResultStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the record of `job_id` of `suite` lives.
    pub fn path_for(&self, suite: &str, job_id: &str) -> PathBuf {
        let mut p = self.dir.join(suite);
        for part in job_id.split('/') {
            p.push(part);
        }
        p.set_extension("json");
        p
    }

    /// Writes a record atomically: a temporary file in the same directory, fsync, rename.
    pub fn write(&self, record: &ResultRecord) -> Result<PathBuf> {
        let path = self.path_for(&record.suite, &record.job_id);
        let mut bytes = serde_json::to_vec_pretty(record)
            .with_context(|| format!("cannot serialise the result of job {}", record.job_id))?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// Removes the record of `job_id` of `suite`; a record that is already gone is fine.
    pub fn remove(&self, suite: &str, job_id: &str) -> Result<()> {
        let path = self.path_for(suite, job_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove result {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Where the running marker of `job_id` of `suite` lives: next to its result, `<job>.running`
    /// (not `.json`, so loading records never sees it).
    pub fn marker_path(&self, suite: &str, job_id: &str) -> PathBuf {
        self.path_for(suite, job_id)
            .with_extension(MARKER_EXTENSION)
    }

    /// Writes the running marker of a job atomically.
    pub fn write_marker(&self, suite: &str, marker: &RunningMarker) -> Result<PathBuf> {
        let path = self.marker_path(suite, &marker.job_id);
        let mut bytes = serde_json::to_vec_pretty(marker)
            .with_context(|| format!("cannot serialise the marker of job {}", marker.job_id))?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// Removes the running marker of a job; a marker that is already gone is fine.
    pub fn remove_marker(&self, suite: &str, job_id: &str) -> Result<()> {
        let path = self.marker_path(suite, job_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove running marker {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Every running marker of one suite, in path order. A marker removed while we list is skipped.
    pub fn load_markers(&self, suite: &str) -> Result<Vec<RunningMarker>> {
        let mut files = Vec::new();
        collect_ext(&self.dir.join(suite), MARKER_EXTENSION, &mut files)?;
        files.sort();
        let mut out = Vec::new();
        for f in files {
            let text = match std::fs::read_to_string(&f) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                other => {
                    other.with_context(|| format!("cannot read running marker {}", f.display()))?
                }
            };
            let marker: RunningMarker = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a valid running marker", f.display()))?;
            out.push(marker);
        }
        Ok(out)
    }

    /// The record of one job, if its file exists.
    pub fn get(&self, suite: &str, job_id: &str) -> Result<Option<ResultRecord>> {
        let path = self.path_for(suite, job_id);
        if !path.exists() {
            return Ok(None);
        }
        match read_record(&path)? {
            Some(r) => Ok(Some(r)),
            None => bail!(
                "{}: a JSON file that is not a result record sits where the result of job \
                 {job_id} belongs; move it away and `recycle run` redoes the job",
                path.display()
            ),
        }
    }

    /// Every record under the store (all suites), in path order. A file that does not parse is
    /// an error naming it; JSON files that are not result records at all (no `kind`: a leaderboard
    /// or reference written into the directory) are skipped with a warning; temporary files of
    /// killed runs are ignored.
    pub fn load_all(&self) -> Result<Vec<ResultRecord>> {
        self.load_under(&self.dir)
    }

    /// Every record of one suite.
    pub fn load_suite(&self, suite: &str) -> Result<Vec<ResultRecord>> {
        self.load_under(&self.dir.join(suite))
    }

    fn load_under(&self, root: &Path) -> Result<Vec<ResultRecord>> {
        let mut files = Vec::new();
        collect_ext(root, "json", &mut files)?;
        files.sort();
        let mut records = Vec::with_capacity(files.len());
        for f in &files {
            match read_record(f)? {
                Some(r) => records.push(r),
                None if first_warning_for(f) => eprintln!(
                    "warning: {}: not a result record (no `kind`), skipped",
                    f.display()
                ),
                None => {}
            }
        }
        Ok(records)
    }

    /// Removes temporary files left behind by killed runs; returns how many. A temporary goes when
    /// its writer ran on this host and is dead, or when it is older than `STALE_TEMP_AGE`: a younger
    /// one of a live process (or of another host) may belong to a shard writing right now (a write
    /// takes milliseconds, so an hour-old temporary has no live writer).
    pub fn clean_stale_temps(&self) -> Result<usize> {
        self.clean_temps_older_than(STALE_TEMP_AGE, SystemTime::now())
    }

    /// Removes temporary files whose modification time is at least `age` before `now`, or whose
    /// writer on this host is dead.
    pub fn clean_temps_older_than(&self, age: Duration, now: SystemTime) -> Result<usize> {
        let mut n = 0;
        clean_temps(&self.dir, age, now, &mut n)?;
        Ok(n)
    }
}

/// The fix a broken record's message offers: results are one file per job, so losing one file
/// loses one job, which a re-run redoes.
const REDO_HINT: &str = "delete it and `recycle run` redoes that job";

/// Whether `path` has not been warned about yet in this process: a command that reads a results
/// directory twice (`recycle run`: to resume, then for the leaderboard) says so once.
fn first_warning_for(path: &Path) -> bool {
    static WARNED: std::sync::Mutex<Option<std::collections::HashSet<PathBuf>>> =
        std::sync::Mutex::new(None);
    match WARNED.lock() {
        Ok(mut set) => set
            .get_or_insert_with(Default::default)
            .insert(path.to_path_buf()),
        Err(_) => true,
    }
}

/// The record in `path`; `None` for well-formed JSON that is not a result record at all (no
/// `kind`: every record has one; recycle's own leaderboard JSON has a `schema_version` but none).
fn read_record(path: &Path) -> Result<Option<ResultRecord>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read result file {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not valid JSON (a result file cut short?); {REDO_HINT}",
            path.display()
        )
    })?;
    if value.get("kind").is_none() {
        return Ok(None);
    }
    let record: ResultRecord = serde_json::from_value(value)
        .with_context(|| format!("{}: not a valid result record; {REDO_HINT}", path.display()))?;
    if record.schema_version != RESULT_SCHEMA_VERSION {
        bail!(
            "{}: result schema version {} (this recycle reads version {RESULT_SCHEMA_VERSION})",
            path.display(),
            record.schema_version
        );
    }
    Ok(Some(record))
}

/// This process's temporaries are named `.tmp-<pid>-<host tag>-<random>.json`, so that a later
/// run on the same host can tell a killed writer's leftovers from a live shard's file.
fn temp_prefix() -> String {
    format!(
        "{TEMP_PREFIX}{}-{}-",
        std::process::id(),
        host_tag(&crate::runner::this_host())
    )
}

/// A short, file-name-safe tag of a host name.
fn host_tag(host: &str) -> String {
    crate::plan::sha256_hex(host.as_bytes())[..8].to_string()
}

/// Whether the writer of a temporary is known to be gone: it ran on this host and its pid is dead.
fn temp_writer_is_dead(path: &Path) -> bool {
    let Some(rest) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(TEMP_PREFIX))
    else {
        return false;
    };
    let mut parts = rest.split('-');
    let (Some(pid), Some(tag)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    tag == host_tag(&crate::runner::this_host()) && !crate::runner::pid_alive(pid)
}

fn is_temp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMP_PREFIX))
}

/// Writes `bytes` to `path` atomically; the temporary's name carries this writer's pid and host
/// (`temp_prefix`), so that `clean_stale_temps` can tell a dead writer's leftovers.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic::write_file_prefixed(path, bytes, &temp_prefix())
}

/// Visible files under `dir` (recursively) whose extension is `ext`.
fn collect_ext(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list results directory {}", dir.display()))?;
    for entry in entries {
        let entry =
            entry.with_context(|| format!("cannot list results directory {}", dir.display()))?;
        let path = entry.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_ext(&path, ext, out)?;
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}

fn clean_temps(dir: &Path, age: Duration, now: SystemTime, n: &mut usize) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list results directory {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.is_dir() {
            clean_temps(&path, age, now, n)?;
        } else if is_temp(&path) {
            // A temporary renamed or removed by its writer since we listed it is not ours to clean.
            let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
                continue;
            };
            if now.duration_since(modified).unwrap_or_default() < age && !temp_writer_is_dead(&path)
            {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => *n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot remove stale temporary file {}", path.display())
                    })
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        let at = |s: u64| rfc3339_utc(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 (leap day of a century leap year) 12:34:56.
        assert_eq!(at(951_827_696), "2000-02-29T12:34:56Z");
        // 2024-12-31T23:59:59Z.
        assert_eq!(at(1_735_689_599), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn job_ids_map_to_nested_paths() {
        let s = ResultStore::new("/r");
        assert_eq!(
            s.path_for("suite", "eval/m/t/seed0"),
            PathBuf::from("/r/suite/eval/m/t/seed0.json")
        );
    }
}

#[cfg(test)]
mod marker_tests {
    use super::*;

    fn marker(job: &str) -> RunningMarker {
        RunningMarker {
            job_id: job.into(),
            config_hash: "abc".into(),
            host: "node1".into(),
            pid: 42,
            started_at: "2024-01-01T00:00:00Z".into(),
            slurm_job: Some("7_1".into()),
        }
    }

    #[test]
    fn markers_round_trip_and_stay_out_of_the_records() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ResultStore::new(tmp.path());
        let path = store.write_marker("s", &marker("eval/m/t/seed0")).unwrap();
        assert_eq!(path, tmp.path().join("s/eval/m/t/seed0.running"));
        store.write_marker("s", &marker("donor/d")).unwrap();
        assert_eq!(
            store.load_markers("s").unwrap(),
            vec![marker("donor/d"), marker("eval/m/t/seed0")]
        );
        assert!(store.load_all().unwrap().is_empty());
        store.remove_marker("s", "donor/d").unwrap();
        store.remove_marker("s", "donor/d").unwrap();
        assert_eq!(
            store.load_markers("s").unwrap(),
            vec![marker("eval/m/t/seed0")]
        );
    }

    #[test]
    fn temp_cleanup_spares_young_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ResultStore::new(tmp.path());
        let dir = tmp.path().join("s/eval");
        std::fs::create_dir_all(&dir).unwrap();
        let young = dir.join(".tmp-young.json");
        let old = dir.join(".tmp-old.json");
        std::fs::write(&young, "{").unwrap();
        std::fs::write(&old, "{").unwrap();
        let f = std::fs::File::options().write(true).open(&old).unwrap();
        f.set_modified(SystemTime::now() - STALE_TEMP_AGE - Duration::from_secs(5))
            .unwrap();
        assert_eq!(store.clean_stale_temps().unwrap(), 1);
        assert!(young.exists());
        assert!(!old.exists());
    }

    #[test]
    fn temp_cleanup_removes_a_dead_writers_temporary_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ResultStore::new(tmp.path());
        let dir = tmp.path().join("s/eval");
        std::fs::create_dir_all(&dir).unwrap();
        let tag = host_tag(&crate::runner::this_host());
        // A child that has exited: its pid is dead (and not reused within this test).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let killed = dir.join(format!(".tmp-{dead}-{tag}-abc.json"));
        let live = dir.join(format!(".tmp-{}-{tag}-abc.json", std::process::id()));
        let other_host = dir.join(format!(".tmp-{dead}-00000000-abc.json"));
        for f in [&killed, &live, &other_host] {
            std::fs::write(f, "{").unwrap();
        }
        assert_eq!(store.clean_stale_temps().unwrap(), 1);
        assert!(!killed.exists());
        assert!(live.exists(), "a live writer's temporary is kept");
        assert!(
            other_host.exists(),
            "another host's young temporary is kept"
        );
        // And our own writes are named so that this works.
        assert!(temp_prefix().starts_with(&format!(".tmp-{}-{tag}-", std::process::id())));
    }
}
