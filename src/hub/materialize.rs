//! Hub datasets inside suites: a resolved hub dataset (parquet files per split at one commit) is
//! turned into a recycle dataset directory through the suite's column, split and label mapping,
//! cached under `$RECYCLE_HOME/datasets/hub/` and opened with `Dataset::load`.
//!
//! The cache folder is named by repo, config, commit and a hash of the mapping, so a new commit or
//! a changed mapping gets its own folder and an existing folder never needs to be invalidated.

use super::{DatasetRef, HubOptions, ResolvedDataset};
use crate::data::card::{ColumnMap, SplitRecord};
use crate::data::read::{infer_labels, read_raw, RawRecord, Value};
use crate::data::store::{write_dataset, Draft, Existing};
use crate::data::{stratified_split, Dataset, Example, Label, Task};
use crate::hub::FeatureType;
use crate::suite::{HubMapping, SplitSource, COLUMN_SEPARATOR};
use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bumped when the way a mapping is applied changes, so old cache folders are not reused.
const MATERIALIZE_VERSION: u32 = 2;

/// The split names recycle datasets use.
const TRAIN: &str = "train";
const DEV: &str = "validation";
const TEST: &str = "test";

/// A hub dataset reference as a suite writes it.
#[derive(Debug, Clone, Copy)]
pub struct HubDatasetSpec<'a> {
    pub id: &'a str,
    pub config: Option<&'a str>,
    pub revision: Option<&'a str>,
    pub mapping: &'a HubMapping,
}

impl HubDatasetSpec<'_> {
    fn display(&self) -> String {
        let mut s = self.id.to_string();
        if let Some(c) = self.config {
            s.push('/');
            s.push_str(c);
        }
        if let Some(r) = self.revision {
            s.push('@');
            s.push_str(r);
        }
        s
    }
}

/// A hub dataset opened as a recycle dataset.
#[derive(Debug, Clone)]
pub struct Materialized {
    pub dataset: Dataset,
    /// The commit the files came from.
    pub commit: String,
    /// The dataset directory under `$RECYCLE_HOME/datasets/hub/`.
    pub dir: PathBuf,
}

/// Resolves `spec` on the hub (or offline from the cache), writes its recycle dataset directory
/// under `home/datasets/hub/` unless it is there already, and loads it.
pub fn open_hub_dataset(
    spec: HubDatasetSpec,
    opts: &HubOptions,
    home: &Path,
) -> Result<Materialized> {
    let what = spec.display();
    let mut r = DatasetRef::parse(spec.id, spec.config.map(str::to_string))
        .with_context(|| format!("dataset {what}"))?;
    r.revision = spec.revision.map(str::to_string);
    let resolved = super::resolve_dataset(&r, opts)?;
    let dir = cache_dir(home, &resolved, spec.mapping)?;
    if dir.join(crate::data::card::CARD_FILE).is_file() {
        match Dataset::load(&dir) {
            Ok(dataset) => {
                return Ok(Materialized {
                    dataset,
                    commit: resolved.commit,
                    dir,
                })
            }
            Err(e) => eprintln!("warning: {e:#}; rebuilding {}", dir.display()),
        }
    }
    let draft = draft(&resolved, spec.mapping).with_context(|| format!("dataset {what}"))?;
    write_dataset(&dir, &draft, Existing::Replace)
        .with_context(|| format!("dataset {what}: writing {}", dir.display()))?;
    let dataset = Dataset::load(&dir)?;
    Ok(Materialized {
        dataset,
        commit: resolved.commit,
        dir,
    })
}

/// `home/datasets/hub/<org>--<name>--<config>--<commit>-<mapping hash>`.
pub fn cache_dir(home: &Path, d: &ResolvedDataset, mapping: &HubMapping) -> Result<PathBuf> {
    let mut h = Sha256::new();
    h.update(MATERIALIZE_VERSION.to_le_bytes());
    h.update(serde_json::to_vec(mapping).context("serialising the dataset mapping")?);
    let hash: String = h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!(
        "{}--{}--{}-{hash}",
        d.repo.replace('/', "--"),
        d.config,
        d.commit
    );
    Ok(home.join("datasets").join("hub").join(name))
}

/// How label cells become labels.
#[derive(Debug, Clone, PartialEq)]
enum LabelPlan {
    /// Class names in id order: an integer is a class id (negative: no label), a string a name.
    Ids(Vec<String>),
    Regression,
    /// No names known: the sorted distinct values are the classes.
    Infer,
    /// Inferred names: a cell is the class whose name equals its text.
    Keys(Vec<String>),
}

/// The label plan: the suite's `labels`, else the card's class names (or float type) of the label
/// column, else inferred from the data.
fn label_plan(d: &ResolvedDataset, m: &HubMapping) -> LabelPlan {
    if let Some(l) = &m.labels {
        return LabelPlan::Ids(l.clone());
    }
    match d
        .features
        .iter()
        .find(|f| f.name == m.columns.label)
        .map(|f| &f.dtype)
    {
        Some(FeatureType::ClassLabel(names)) if !names.is_empty() => LabelPlan::Ids(names.clone()),
        Some(FeatureType::Value(t)) if t.starts_with("float") => LabelPlan::Regression,
        _ => LabelPlan::Infer,
    }
}

/// One hub split read through the mapping: texts joined, label cells as read.
struct RawSplit {
    name: String,
    rows: Vec<(String, Option<String>, Value)>,
}

fn read_column(file: &Path, column: &str) -> Result<Vec<Value>> {
    let map = ColumnMap {
        text: column.to_string(),
        text_pair: None,
        label: None,
    };
    Ok(read_raw(file, &map)?.into_iter().map(|r| r.text).collect())
}

/// Joins the cells of `columns` in one row; null and empty cells are left out.
fn join(cells: &[&Value], columns: &[String], file: &Path, row: usize) -> Result<String> {
    let mut parts = Vec::new();
    for (v, c) in cells.iter().zip(columns) {
        match v {
            Value::Str(s) if !s.trim().is_empty() => parts.push(s.as_str()),
            Value::Str(_) | Value::Null => {}
            other => bail!(
                "{}, row {}: column `{c}` holds {other:?}, not text",
                file.display(),
                row + 1
            ),
        }
    }
    Ok(parts.join(COLUMN_SEPARATOR))
}

fn read_split(d: &ResolvedDataset, m: &HubMapping, split: &str) -> Result<RawSplit> {
    let files = d.splits.get(split).with_context(|| {
        format!(
            "no split `{split}` at commit {} (splits: {})",
            d.commit,
            d.splits.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let mut rows = Vec::new();
    for file in files {
        let read = |cols: &[String]| -> Result<Vec<Vec<Value>>> {
            cols.iter().map(|c| read_column(file, c)).collect()
        };
        let text = read(&m.columns.text)?;
        let pair = read(&m.columns.text_pair)?;
        let label = read_column(file, &m.columns.label)?;
        let n = label.len();
        ensure!(
            text.iter().chain(&pair).all(|c| c.len() == n),
            "{}: columns have different row counts",
            file.display()
        );
        for (i, l) in label.into_iter().enumerate() {
            let t: Vec<&Value> = text.iter().map(|c| &c[i]).collect();
            let p: Vec<&Value> = pair.iter().map(|c| &c[i]).collect();
            let text = join(&t, &m.columns.text, file, i)?;
            let pair = if m.columns.text_pair.is_empty() {
                None
            } else {
                Some(join(&p, &m.columns.text_pair, file, i)?)
            };
            rows.push((text, pair, l));
        }
    }
    Ok(RawSplit {
        name: split.to_string(),
        rows,
    })
}

fn class_id(v: &Value, names: &[String]) -> Result<Option<Label>> {
    let id = match v {
        Value::Null => return Ok(None),
        Value::Int(i) => *i,
        Value::Float(f) if f.fract() == 0.0 => *f as i64,
        Value::Str(s) => {
            return names
                .iter()
                .position(|n| n == s.trim())
                .map(|i| Some(Label::Class(i as u32)))
                .with_context(|| format!("unknown label {s:?} (labels: {})", names.join(", ")))
        }
        other => bail!("label {other:?} is neither a class id nor a label name"),
    };
    if id < 0 {
        return Ok(None);
    }
    ensure!(
        (id as usize) < names.len(),
        "class id {id} is out of range for {} labels ({})",
        names.len(),
        names.join(", ")
    );
    Ok(Some(Label::Class(id as u32)))
}

/// A cell as the text of a label name (integral floats as integers); `None` when empty.
fn key(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Str(s) if s.trim().is_empty() => None,
        Value::Str(s) => Some(s.trim().to_string()),
        Value::Int(i) => Some(i.to_string()),
        Value::Float(f) if f.fract() == 0.0 => Some(format!("{}", *f as i64)),
        Value::Float(f) => Some(f.to_string()),
        Value::Bool(b) => Some(b.to_string()),
    }
}

fn score(v: &Value) -> Result<Option<Label>> {
    Ok(match v {
        Value::Null => None,
        Value::Int(i) => Some(Label::Score(*i as f32)),
        Value::Float(f) => Some(Label::Score(*f as f32)),
        Value::Str(s) => Some(Label::Score(
            s.trim()
                .parse()
                .with_context(|| format!("score {s:?} is not a number"))?,
        )),
        Value::Bool(b) => bail!("score {b} is not a number"),
    })
}

/// The largest fraction up to `f` whose stratified carve-out (each class rounded, as
/// `stratified_split` does) holds at most `max` examples of `rows`.
fn capped_fraction(rows: &[Example], f: f64, max: usize) -> f64 {
    let mut strata: BTreeMap<Option<u32>, usize> = BTreeMap::new();
    for e in rows {
        let key = match e.label {
            Some(Label::Class(c)) => Some(c),
            _ => None,
        };
        *strata.entry(key).or_default() += 1;
    }
    let size = |f: f64| -> usize {
        strata
            .values()
            .map(|&n| ((n as f64 * f).round() as usize).min(n))
            .sum()
    };
    if size(f) <= max {
        return f;
    }
    let (mut lo, mut hi) = (0.0, f.min(max as f64 / rows.len().max(1) as f64));
    if size(hi) <= max {
        return hi;
    }
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if size(mid) <= max {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Reads the hub splits the mapping names, labels them, carves the missing ones out of train.
pub fn draft(d: &ResolvedDataset, m: &HubMapping) -> Result<Draft> {
    let mut raw = vec![read_split(d, m, &m.splits.train)?];
    for s in [&m.splits.dev, &m.splits.test] {
        if let SplitSource::Name(n) = s {
            raw.push(read_split(d, m, n)?);
        }
    }
    let plan = match label_plan(d, m) {
        LabelPlan::Infer
            if raw
                .iter()
                .flat_map(|s| &s.rows)
                .any(|r| matches!(r.2, Value::Float(f) if f.fract() != 0.0)) =>
        {
            LabelPlan::Regression
        }
        p => p,
    };
    // A split whose labels are all negative ids or null has hidden labels (the hub's `-1` for a
    // withheld test set); with no class names known they must not become a class of their own.
    let hidden: Vec<bool> = raw
        .iter()
        .map(|s| {
            !s.rows.is_empty()
                && s.rows
                    .iter()
                    .all(|r| matches!(r.2, Value::Null) || matches!(r.2, Value::Int(i) if i < 0))
        })
        .collect();
    let plan = match plan {
        LabelPlan::Infer => {
            let records: Vec<RawRecord> = raw
                .iter()
                .zip(&hidden)
                .filter(|(_, h)| !**h)
                .flat_map(|(s, _)| &s.rows)
                .map(|r| RawRecord {
                    at: String::new(),
                    text: Value::Null,
                    text_pair: None,
                    label: Some(r.2.clone()),
                })
                .collect();
            let labels = infer_labels(&records);
            ensure!(
                labels.len() >= 2,
                "label column `{}` has {} distinct value(s); give `labels` in the suite",
                m.columns.label,
                labels.len()
            );
            LabelPlan::Keys(labels)
        }
        p => p,
    };
    let task = match &plan {
        LabelPlan::Ids(names) | LabelPlan::Keys(names) => Task::Classification {
            labels: names.clone(),
        },
        LabelPlan::Regression | LabelPlan::Infer => Task::Regression,
    };
    let mut examples: Vec<Vec<Example>> = Vec::new();
    for (s, &hidden) in raw.iter().zip(&hidden) {
        let mut out = Vec::with_capacity(s.rows.len());
        let mut unlabelled = 0usize;
        for (i, (text, pair, v)) in s.rows.iter().enumerate() {
            let label = match &plan {
                LabelPlan::Ids(names) => class_id(v, names),
                LabelPlan::Regression => score(v),
                LabelPlan::Keys(_) if hidden => Ok(None),
                LabelPlan::Keys(names) => Ok(key(v)
                    .and_then(|k| names.iter().position(|l| *l == k))
                    .map(|p| Label::Class(p as u32))),
                LabelPlan::Infer => bail!("labels were not inferred"),
            }
            .with_context(|| {
                format!(
                    "split `{}`, row {}: label column `{}`",
                    s.name,
                    i + 1,
                    m.columns.label
                )
            })?;
            if label.is_none() {
                unlabelled += 1;
            }
            out.push(Example {
                text: text.clone(),
                text_pair: pair.clone(),
                label,
            });
        }
        ensure!(
            unlabelled == 0,
            "split `{}`: {unlabelled} of {} rows have no label (hidden test labels?); carve the \
             split out of train instead: {{\"carve_from\": \"{}\", \"fraction\": 0.1, \"max\": 1000}}",
            s.name,
            s.rows.len(),
            m.splits.train
        );
        examples.push(out);
    }

    // Name the splits recycle's way; carve the missing ones out of train in one seeded draw.
    let mut it = examples.into_iter();
    let mut train = it.next().unwrap_or_default();
    let mut named: Vec<(String, Vec<Example>)> = Vec::new();
    let mut carve: Vec<(String, f64)> = Vec::new();
    let mut seed = None;
    for (name, src) in [(DEV, &m.splits.dev), (TEST, &m.splits.test)] {
        match src {
            SplitSource::Name(_) => named.push((name.to_string(), it.next().unwrap_or_default())),
            SplitSource::Carve { max, seed: s, .. } => {
                let f = src.carve_fraction().unwrap_or(0.0);
                let f = match max {
                    Some(mx) => capped_fraction(&train, f, *mx),
                    None => f,
                };
                carve.push((name.to_string(), f));
                seed = Some(*s);
            }
        }
    }
    let split_seed = match seed {
        None => None,
        Some(seed) => {
            let fractions: Vec<f64> = carve.iter().map(|(_, f)| *f).collect();
            let mut parts = stratified_split(&train, &fractions, seed);
            train = parts.pop().unwrap_or_default();
            for ((name, _), part) in carve.iter().zip(parts) {
                ensure!(
                    !part.is_empty(),
                    "split `{name}` carved from `{}` would be empty ({} train rows)",
                    m.splits.train,
                    train.len()
                );
                named.push((name.clone(), part));
            }
            Some(SplitRecord {
                seed,
                from: m.splits.train.clone(),
                carved: carve,
            })
        }
    };
    let mut splits = vec![(TRAIN.to_string(), train)];
    splits.extend(named);
    splits.sort_by_key(|(n, _)| crate::data::import::split_rank(n));
    // The name doubles as a file-name prefix while writing: no '/'.
    let config = if d.config == "default" {
        String::new()
    } else {
        format!("--{}", d.config)
    };
    Ok(Draft {
        name: format!("{}{config}", d.repo.replace('/', "--")),
        task,
        source: format!(
            "hf://datasets/{}@{} (config {}, files from {}; columns {:?}, splits {:?})",
            d.repo, d.commit, d.config, d.files_revision, m.columns, m.splits
        ),
        license: format!("see the dataset card of {} on the hub", d.repo),
        split_seed,
        splits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Feature;
    use crate::suite::{HubColumns, HubSplits};
    use std::sync::Arc;

    /// A label column as written to parquet.
    enum Labels {
        Ints(Vec<i64>),
        Floats(Vec<f64>),
        Strs(Vec<&'static str>),
    }

    /// Writes a parquet file of UTF-8 text columns and one label column named `label_name`.
    fn parquet(path: &Path, texts: &[(&str, Vec<String>)], label_name: &str, labels: Labels) {
        use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        let mut fields: Vec<String> = texts
            .iter()
            .map(|(n, _)| format!("REQUIRED BYTE_ARRAY {n} (UTF8);"))
            .collect();
        fields.push(match labels {
            Labels::Ints(_) => format!("REQUIRED INT64 {label_name};"),
            Labels::Floats(_) => format!("REQUIRED DOUBLE {label_name};"),
            Labels::Strs(_) => format!("REQUIRED BYTE_ARRAY {label_name} (UTF8);"),
        });
        let schema = format!("message schema {{ {} }}", fields.join(" "));
        let schema = Arc::new(parquet::schema::parser::parse_message_type(&schema).unwrap());
        let file = std::fs::File::create(path).unwrap();
        let props = Arc::new(WriterProperties::builder().build());
        let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let bytes = |v: &[String]| {
            v.iter()
                .map(|s| ByteArray::from(s.as_str()))
                .collect::<Vec<_>>()
        };
        for (_, col) in texts {
            let mut c = rg.next_column().unwrap().unwrap();
            c.typed::<ByteArrayType>()
                .write_batch(&bytes(col), None, None)
                .unwrap();
            c.close().unwrap();
        }
        let mut c = rg.next_column().unwrap().unwrap();
        match &labels {
            Labels::Ints(v) => {
                c.typed::<Int64Type>().write_batch(v, None, None).unwrap();
            }
            Labels::Floats(v) => {
                c.typed::<DoubleType>().write_batch(v, None, None).unwrap();
            }
            Labels::Strs(v) => {
                let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
                c.typed::<ByteArrayType>()
                    .write_batch(&bytes(&v), None, None)
                    .unwrap();
            }
        }
        c.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();
    }

    fn strings(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix} {i}")).collect()
    }

    /// Alternating labels 0, 1, 0, 1…
    fn alternating(n: usize) -> Labels {
        Labels::Ints((0..n).map(|i| (i % 2) as i64).collect())
    }

    fn resolved(dir: &Path, splits: &[(&str, &str)], features: Vec<Feature>) -> ResolvedDataset {
        ResolvedDataset {
            repo: "org/set".into(),
            revision: "main".into(),
            files_revision: "main".into(),
            commit: "c".repeat(40),
            config: "default".into(),
            dir: dir.to_path_buf(),
            splits: splits
                .iter()
                .map(|(s, f)| (s.to_string(), vec![dir.join(f)]))
                .collect(),
            label_names: crate::hub::card::label_names(&features),
            features,
        }
    }

    fn mapping(
        text: &[&str],
        pair: &[&str],
        label: &str,
        dev: SplitSource,
        test: SplitSource,
    ) -> HubMapping {
        HubMapping {
            columns: HubColumns {
                text: text.iter().map(|s| s.to_string()).collect(),
                text_pair: pair.iter().map(|s| s.to_string()).collect(),
                label: label.into(),
            },
            splits: HubSplits {
                train: "train".into(),
                dev,
                test,
            },
            labels: None,
        }
    }

    fn name(s: &str) -> SplitSource {
        SplitSource::Name(s.into())
    }

    /// IBM's rule: min(10 % of train, 1000), stratified.
    fn ibm_carve() -> SplitSource {
        SplitSource::Carve {
            fraction_ppm: 100_000,
            max: Some(1000),
            seed: 0,
        }
    }

    fn split<'a>(d: &'a Draft, name: &str) -> &'a [Example] {
        &d.splits
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no split {name}"))
            .1
    }

    fn class_names(d: &Draft) -> Vec<String> {
        match &d.task {
            Task::Classification { labels } => labels.clone(),
            t => panic!("not classification: {t:?}"),
        }
    }

    #[test]
    fn text_columns_join_in_order_and_pairs_map_to_the_second_text() {
        let tmp = tempfile::tempdir().unwrap();
        let cols = |tag: &str| {
            vec![
                ("title", vec![format!("{tag} title"), String::new()]),
                (
                    "body",
                    vec![format!("{tag} body"), format!("{tag} lone body")],
                ),
                ("question", vec![format!("{tag} q1"), format!("{tag} q2")]),
                ("ignored", vec!["x".into(), "y".into()]),
            ]
        };
        for s in ["train", "validation", "test"] {
            parquet(
                &tmp.path().join(format!("{s}.parquet")),
                &cols(s),
                "answer",
                Labels::Ints(vec![1, 0]),
            );
        }
        let d = resolved(
            tmp.path(),
            &[
                ("train", "train.parquet"),
                ("validation", "validation.parquet"),
                ("test", "test.parquet"),
            ],
            vec![],
        );
        let m = mapping(
            &["title", "body"],
            &["question"],
            "answer",
            name("validation"),
            name("test"),
        );
        let drafted = draft(&d, &m).unwrap();
        let train = split(&drafted, "train");
        assert_eq!(train[0].text, "train title train body");
        // An empty cell is left out of the join rather than leaving a stray separator.
        assert_eq!(train[1].text, "train lone body");
        assert_eq!(train[0].text_pair.as_deref(), Some("train q1"));
        assert_eq!(
            split(&drafted, "test")[1].text_pair.as_deref(),
            Some("test q2")
        );
        assert!(split(&drafted, "validation")[0]
            .text
            .starts_with("validation"));
        // Without a pair mapping there is no second text.
        let single = mapping(&["body"], &[], "answer", name("validation"), name("test"));
        let drafted = draft(&d, &single).unwrap();
        assert_eq!(split(&drafted, "train")[0].text, "train body");
        assert_eq!(split(&drafted, "train")[0].text_pair, None);
    }

    #[test]
    fn label_names_come_from_the_suite_then_the_card_then_the_data() {
        let tmp = tempfile::tempdir().unwrap();
        let texts = vec![("text", strings("t", 4))];
        parquet(
            &tmp.path().join("ids.parquet"),
            &texts,
            "label",
            Labels::Ints(vec![2, 0, 1, 2]),
        );
        parquet(
            &tmp.path().join("names.parquet"),
            &texts,
            "label",
            Labels::Strs(vec!["sports", "world", "sports", "business"]),
        );
        parquet(
            &tmp.path().join("scores.parquet"),
            &texts,
            "label",
            Labels::Floats(vec![0.5, 4.25, 3.0, 1.0]),
        );
        let carve = || SplitSource::Carve {
            fraction_ppm: 250_000,
            max: None,
            seed: 0,
        };
        let m = mapping(&["text"], &[], "label", carve(), carve());
        let card = vec![Feature {
            name: "label".into(),
            dtype: FeatureType::ClassLabel(vec!["neg".into(), "neu".into(), "pos".into()]),
        }];

        // The card's class names, in id order; ids index them.
        let d = resolved(tmp.path(), &[("train", "ids.parquet")], card.clone());
        let drafted = draft(&d, &m).unwrap();
        assert_eq!(class_names(&drafted), ["neg", "neu", "pos"]);
        let mut seen: Vec<Label> = drafted
            .splits
            .iter()
            .flat_map(|(_, s)| s)
            .filter_map(|e| e.label)
            .collect();
        seen.sort_by_key(|l| format!("{l:?}"));
        assert_eq!(
            seen,
            [
                Label::Class(0),
                Label::Class(1),
                Label::Class(2),
                Label::Class(2)
            ]
        );

        // The suite's labels win over the card's.
        let mut own = m.clone();
        own.labels = Some(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(class_names(&draft(&d, &own).unwrap()), ["a", "b", "c"]);

        // No card: the distinct label texts, sorted.
        let d = resolved(tmp.path(), &[("train", "names.parquet")], vec![]);
        assert_eq!(
            class_names(&draft(&d, &m).unwrap()),
            ["business", "sports", "world"]
        );

        // Fractional labels (STS-B's 0–5 similarity) make a regression task.
        let d = resolved(tmp.path(), &[("train", "scores.parquet")], vec![]);
        assert!(matches!(draft(&d, &m).unwrap().task, Task::Regression));

        // A class id beyond the card's names is an error naming the column.
        let two = vec![Feature {
            name: "label".into(),
            dtype: FeatureType::ClassLabel(vec!["neg".into(), "pos".into()]),
        }];
        let d = resolved(tmp.path(), &[("train", "ids.parquet")], two);
        let err = format!("{:#}", draft(&d, &m).unwrap_err());
        assert!(
            err.contains("label column `label`") && err.contains("out of range"),
            "{err}"
        );
    }

    #[test]
    fn carve_takes_the_smaller_of_a_thousand_and_ten_percent_of_train() {
        let tmp = tempfile::tempdir().unwrap();
        for (file, n) in [
            ("big.parquet", 12_000),
            ("small.parquet", 3_000),
            ("dev.parquet", 10),
        ] {
            parquet(
                &tmp.path().join(file),
                &[("text", strings(file, n))],
                "label",
                alternating(n),
            );
        }
        let m = mapping(&["text"], &[], "label", name("validation"), ibm_carve());
        let sizes = |train_file: &str| {
            let d = resolved(
                tmp.path(),
                &[("train", train_file), ("validation", "dev.parquet")],
                vec![],
            );
            let drafted = draft(&d, &m).unwrap();
            let test = split(&drafted, "test");
            let balance = test
                .iter()
                .filter(|e| e.label == Some(Label::Class(0)))
                .count();
            let rec = drafted.split_seed.clone().unwrap();
            assert_eq!(rec.from, "train");
            (
                split(&drafted, "train").len(),
                split(&drafted, "validation").len(),
                test.len(),
                balance,
            )
        };
        // 10 % of 12 000 is 1 200: the cap of 1 000 applies, stratified 500/500.
        assert_eq!(sizes("big.parquet"), (11_000, 10, 1_000, 500));
        // 10 % of 3 000 is 300, under the cap.
        assert_eq!(sizes("small.parquet"), (2_700, 10, 300, 150));
    }

    #[test]
    fn mnli_dev_is_matched_and_test_is_mismatched_validation() {
        let tmp = tempfile::tempdir().unwrap();
        for s in [
            "train",
            "validation_matched",
            "validation_mismatched",
            "test_matched",
        ] {
            let texts = vec![
                ("premise", strings(&format!("{s} p"), 6)),
                ("hypothesis", strings(&format!("{s} h"), 6)),
            ];
            // test_matched has hidden labels (-1), as on the hub; it must not be read.
            let labels = if s.starts_with("test") {
                Labels::Ints(vec![-1; 6])
            } else {
                Labels::Ints(vec![0, 1, 2, 0, 1, 2])
            };
            parquet(
                &tmp.path().join(format!("{s}.parquet")),
                &texts,
                "label",
                labels,
            );
        }
        let files: Vec<(String, String)> = [
            "train",
            "validation_matched",
            "validation_mismatched",
            "test_matched",
        ]
        .iter()
        .map(|s| (s.to_string(), format!("{s}.parquet")))
        .collect();
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let d = resolved(tmp.path(), &refs, vec![]);
        let m = mapping(
            &["premise"],
            &["hypothesis"],
            "label",
            name("validation_matched"),
            name("validation_mismatched"),
        );
        let drafted = draft(&d, &m).unwrap();
        assert!(split(&drafted, "validation")
            .iter()
            .all(|e| e.text.starts_with("validation_matched p")));
        assert!(split(&drafted, "test").iter().all(|e| e
            .text
            .starts_with("validation_mismatched p")
            && e.text_pair
                .as_deref()
                .is_some_and(|p| p.starts_with("validation_mismatched h"))));
        assert_eq!(drafted.split_seed, None, "nothing was carved");

        // The hidden-label test split is refused with the carve rule as the way out.
        let hidden = mapping(
            &["premise"],
            &["hypothesis"],
            "label",
            name("validation_matched"),
            name("test_matched"),
        );
        let err = format!("{:#}", draft(&d, &hidden).unwrap_err());
        assert!(
            err.contains("test_matched") && err.contains("carve_from"),
            "{err}"
        );
    }

    #[test]
    fn missing_columns_and_splits_are_errors_naming_them() {
        let tmp = tempfile::tempdir().unwrap();
        parquet(
            &tmp.path().join("train.parquet"),
            &[("sentence", strings("s", 4))],
            "label",
            alternating(4),
        );
        let d = resolved(tmp.path(), &[("train", "train.parquet")], vec![]);
        let carve = SplitSource::Carve {
            fraction_ppm: 250_000,
            max: None,
            seed: 0,
        };
        for (text, pair, label, missing) in [
            (&["text"][..], &[][..], "label", "text"),
            (&["sentence"][..], &["question"][..], "label", "question"),
            (&["sentence"][..], &[][..], "gold", "gold"),
        ] {
            let m = mapping(text, pair, label, carve.clone(), carve.clone());
            let err = format!("{:#}", draft(&d, &m).unwrap_err());
            assert!(
                err.contains(missing) && err.contains("train.parquet"),
                "{missing}: {err}"
            );
        }
        let m = mapping(&["sentence"], &[], "label", name("dev"), carve.clone());
        let err = format!("{:#}", draft(&d, &m).unwrap_err());
        assert!(
            err.contains("no split `dev`") && err.contains("splits: train"),
            "{err}"
        );
    }

    #[test]
    fn capped_fraction_never_exceeds_the_cap() {
        let rows: Vec<Example> = (0..5003)
            .map(|i| Example {
                text: String::new(),
                text_pair: None,
                label: Some(Label::Class((i % 3) as u32)),
            })
            .collect();
        let f = capped_fraction(&rows, 0.5, 1000);
        let taken: usize = [1668usize, 1668, 1667]
            .iter()
            .map(|&n| ((n as f64 * f).round() as usize).min(n))
            .sum();
        assert!((998..=1000).contains(&taken), "{f} takes {taken}");
        assert_eq!(capped_fraction(&rows, 0.1, 1000), 0.1);
    }
}
