//! Reading one split file (parquet, JSONL or CSV/TSV) into examples, through a column map.
//!
//! Every error names the file and the line (text formats) or row (parquet) it is about.

use super::card::ColumnMap;
use super::{Example, Label, Task};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// The file formats a split may be stored in, chosen by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Parquet,
    JsonLines,
    Csv,
    Tsv,
}

impl Format {
    /// The format of `path` by its extension (`.parquet`, `.jsonl`/`.json`, `.csv`, `.tsv`).
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        Ok(match ext.as_str() {
            "parquet" => Format::Parquet,
            "jsonl" | "json" | "ndjson" => Format::JsonLines,
            "csv" => Format::Csv,
            "tsv" => Format::Tsv,
            _ => bail!(
                "{}: unknown split format `.{ext}` (expected .parquet, .jsonl, .csv or .tsv)",
                path.display()
            ),
        })
    }
}

/// One cell as read from any format, before it is interpreted as text or label.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => format!("{s:?}"),
        }
    }

    /// The label key this value stands for, or `None` when the cell is empty.
    fn key(&self) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) if f.fract() == 0.0 => Some(format!("{}", *f as i64)),
            Value::Float(f) => Some(f.to_string()),
            Value::Str(s) if s.trim().is_empty() => None,
            Value::Str(s) => Some(s.trim().to_string()),
        }
    }
}

/// One row's cells for the mapped columns, with where it was found ("line 7", "row 6").
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    pub at: String,
    pub text: Value,
    pub text_pair: Option<Value>,
    pub label: Option<Value>,
}

/// Reads a split file and turns every row into an [`Example`] for `task`.
///
/// Labels: a string (or integer, or boolean) equal to a label name is that class; when no label
/// name looks like an integer, an integer (or a string such as CSV's `"1"`) is a class id and a
/// negative one marks an unlabelled row (the hub's convention for hidden test labels). Empty or
/// null labels are unlabelled rows.
pub fn read_split_file(path: &Path, columns: &ColumnMap, task: &Task) -> Result<Vec<Example>> {
    let raw = read_raw(path, columns)?;
    to_examples(path, &raw, task)
}

/// Reads the mapped columns of every row of a split file, without interpreting them.
pub fn read_raw(path: &Path, columns: &ColumnMap) -> Result<Vec<RawRecord>> {
    match Format::of(path)? {
        Format::Parquet => read_parquet(path, columns),
        Format::JsonLines => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            read_jsonl(&bytes, columns).with_context(|| format!("reading {}", path.display()))
        }
        Format::Csv | Format::Tsv => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let delim = if Format::of(path)? == Format::Tsv {
                b'\t'
            } else {
                b','
            };
            read_csv(&bytes, delim, columns).with_context(|| format!("reading {}", path.display()))
        }
    }
}

/// Interprets raw records as examples of `task`; errors name `path` and the line.
pub fn to_examples(path: &Path, raw: &[RawRecord], task: &Task) -> Result<Vec<Example>> {
    let mapper = LabelMapper::new(task);
    raw.iter()
        .map(|r| {
            let text = as_text(&r.text)
                .with_context(|| format!("{}, {}: text column", path.display(), r.at))?;
            let text_pair =
                match &r.text_pair {
                    Some(v) => Some(as_text(v).with_context(|| {
                        format!("{}, {}: text-pair column", path.display(), r.at)
                    })?),
                    None => None,
                };
            let label = match &r.label {
                Some(v) => mapper
                    .map(v)
                    .with_context(|| format!("{}, {}: label column", path.display(), r.at))?,
                None => None,
            };
            Ok(Example {
                text,
                text_pair,
                label,
            })
        })
        .collect()
}

/// The sorted distinct label keys of `raw` (numerically when they all are integers).
pub fn infer_labels(raw: &[RawRecord]) -> Vec<String> {
    let keys: BTreeSet<String> = raw
        .iter()
        .filter_map(|r| r.label.as_ref().and_then(Value::key))
        .collect();
    let mut keys: Vec<String> = keys.into_iter().collect();
    if keys.iter().all(|k| k.parse::<i64>().is_ok()) {
        keys.sort_by_key(|k| k.parse::<i64>().unwrap_or(0));
    }
    keys
}

fn as_text(v: &Value) -> Result<String> {
    match v {
        Value::Str(s) => Ok(s.clone()),
        other => bail!("expected a string, found {}", other.describe()),
    }
}

struct LabelMapper<'a> {
    task: &'a Task,
    numeric_names: bool,
}

impl<'a> LabelMapper<'a> {
    fn new(task: &'a Task) -> Self {
        let numeric_names = match task {
            Task::Classification { labels } => {
                labels.iter().any(|l| l.trim().parse::<i64>().is_ok())
            }
            Task::Regression => false,
        };
        LabelMapper {
            task,
            numeric_names,
        }
    }

    fn map(&self, v: &Value) -> Result<Option<Label>> {
        let labels = match self.task {
            Task::Regression => {
                return match v {
                    Value::Int(i) => Ok(Some(Label::Score(*i as f32))),
                    Value::Float(f) => Ok(Some(Label::Score(*f as f32))),
                    Value::Str(s) if s.trim().is_empty() => Ok(None),
                    Value::Str(s) => s
                        .trim()
                        .parse::<f32>()
                        .map(|f| Some(Label::Score(f)))
                        .map_err(|_| anyhow!("regression score {s:?} is not a number")),
                    Value::Null => Ok(None),
                    Value::Bool(_) => bail!("regression score {} is not a number", v.describe()),
                };
            }
            Task::Classification { labels } => labels,
        };
        let Some(key) = v.key() else { return Ok(None) };
        if let Some(i) = labels.iter().position(|l| *l == key) {
            return Ok(Some(Label::Class(i as u32)));
        }
        if matches!(v, Value::Bool(_)) {
            if let Some(i) = labels.iter().position(|l| l.eq_ignore_ascii_case(&key)) {
                return Ok(Some(Label::Class(i as u32)));
            }
        }
        if !self.numeric_names && !matches!(v, Value::Bool(_)) {
            if let Ok(id) = key.parse::<i64>() {
                if id < 0 {
                    return Ok(None);
                }
                if (id as usize) < labels.len() {
                    return Ok(Some(Label::Class(id as u32)));
                }
                bail!("class id {id} is out of range for {} labels", labels.len());
            }
        }
        bail!(
            "unknown label {} (labels: {})",
            v.describe(),
            labels.join(", ")
        )
    }
}

fn column_index(header: &[String], name: &str, role: &str) -> Result<usize> {
    header.iter().position(|h| h == name).ok_or_else(|| {
        anyhow!(
            "{role} column `{name}` is missing (columns: {})",
            header.join(", ")
        )
    })
}

/// Reads CSV (or TSV) with a header row; ragged rows and invalid UTF-8 are errors with the line.
pub fn read_csv(bytes: &[u8], delimiter: u8, columns: &ColumnMap) -> Result<Vec<RawRecord>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .context("line 1: reading the header")?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_string())
        .collect();
    let ti = column_index(&header, &columns.text, "text")?;
    let pi = columns
        .text_pair
        .as_deref()
        .map(|c| column_index(&header, c, "text-pair"))
        .transpose()?;
    let li = columns
        .label
        .as_deref()
        .map(|c| column_index(&header, c, "label"))
        .transpose()?;
    let mut out = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(|e| match e.position() {
            Some(p) => anyhow!("line {}: {}", p.line(), csv_error_kind(&e)),
            None => anyhow!("{e}"),
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let cell = |i: usize| Value::Str(rec.get(i).unwrap_or("").to_string());
        out.push(RawRecord {
            at: format!("line {line}"),
            text: cell(ti),
            text_pair: pi.map(cell),
            label: li.map(cell),
        });
    }
    Ok(out)
}

fn csv_error_kind(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("ragged row: {len} fields where the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "invalid UTF-8".to_string(),
        _ => e.to_string(),
    }
}

/// Reads JSON lines (one object per line; blank lines are skipped).
pub fn read_jsonl(bytes: &[u8], columns: &ColumnMap) -> Result<Vec<RawRecord>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let at = format!("line {}", i + 1);
        let line = std::str::from_utf8(line).map_err(|e| anyhow!("{at}: invalid UTF-8 ({e})"))?;
        if line.trim().is_empty() {
            continue;
        }
        let obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).with_context(|| format!("{at}: not a JSON object"))?;
        let get = |name: &str, role: &str| -> Result<Value> {
            let v = obj.get(name).ok_or_else(|| {
                anyhow!(
                    "{at}: {role} column `{name}` is missing (keys: {})",
                    obj.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            json_value(v).with_context(|| format!("{at}: {role} column `{name}`"))
        };
        let text = get(&columns.text, "text")?;
        let text_pair = columns
            .text_pair
            .as_deref()
            .map(|c| get(c, "text-pair"))
            .transpose()?;
        let label = columns
            .label
            .as_deref()
            .map(|c| get(c, "label"))
            .transpose()?;
        out.push(RawRecord {
            at,
            text,
            text_pair,
            label,
        });
    }
    Ok(out)
}

fn json_value(v: &serde_json::Value) -> Result<Value> {
    Ok(match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::Str(s.clone()),
        other => bail!("expected a string, number or boolean, found {other}"),
    })
}

/// Reads a parquet file through the row API (no arrow), decoding only the mapped columns.
pub fn read_parquet(path: &Path, columns: &ColumnMap) -> Result<Vec<RawRecord>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::schema::types::Type;
    let ctx = || format!("reading {}", path.display());
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a parquet file", path.display()))?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .clone();
    let header: Vec<String> = root
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    // The projection holds the mapped columns once each, in file order; rows come back that way.
    let mut wanted = vec![column_index(&header, &columns.text, "text").with_context(ctx)?];
    if let Some(c) = columns.text_pair.as_deref() {
        wanted.push(column_index(&header, c, "text-pair").with_context(ctx)?);
    }
    if let Some(c) = columns.label.as_deref() {
        wanted.push(column_index(&header, c, "label").with_context(ctx)?);
    }
    let mut projected = wanted.clone();
    projected.sort_unstable();
    projected.dedup();
    let fields = projected
        .iter()
        .map(|&i| root.get_fields()[i].clone())
        .collect();
    let schema = Type::group_type_builder(root.name())
        .with_fields(fields)
        .build()
        .with_context(ctx)?;
    let slot = |col: usize| projected.iter().position(|&p| p == col).unwrap_or(0);
    let (ti, pi, li) = (
        slot(wanted[0]),
        columns.text_pair.as_ref().map(|_| slot(wanted[1])),
        columns
            .label
            .as_ref()
            .map(|_| slot(wanted[wanted.len() - 1])),
    );
    let names: Vec<&str> = projected.iter().map(|&i| header[i].as_str()).collect();
    let mut out = Vec::new();
    for (i, row) in reader
        .get_row_iter(Some(schema))
        .with_context(ctx)?
        .enumerate()
    {
        let at = format!("row {}", i + 1);
        let row = row.with_context(|| format!("{}, {at}", path.display()))?;
        let cells: Vec<&parquet::record::Field> = row.get_column_iter().map(|(_, f)| f).collect();
        let cell = |j: usize| -> Result<Value> {
            let f = cells.get(j).ok_or_else(|| {
                anyhow!("{}, {at}: column `{}` missing", path.display(), names[j])
            })?;
            parquet_value(f)
                .with_context(|| format!("{}, {at}: column `{}`", path.display(), names[j]))
        };
        out.push(RawRecord {
            text: cell(ti)?,
            text_pair: pi.map(cell).transpose()?,
            label: li.map(cell).transpose()?,
            at,
        });
    }
    Ok(out)
}

fn parquet_value(f: &parquet::record::Field) -> Result<Value> {
    use parquet::record::Field as F;
    Ok(match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(v) => Value::Int(*v as i64),
        F::Short(v) => Value::Int(*v as i64),
        F::Int(v) => Value::Int(*v as i64),
        F::Long(v) => Value::Int(*v),
        F::UByte(v) => Value::Int(*v as i64),
        F::UShort(v) => Value::Int(*v as i64),
        F::UInt(v) => Value::Int(*v as i64),
        F::ULong(v) => Value::Int(i64::try_from(*v).context("integer too large")?),
        F::Float16(v) => Value::Float(f64::from(f32::from(*v))),
        F::Float(v) => Value::Float(*v as f64),
        F::Double(v) => Value::Float(*v),
        F::Str(s) => Value::Str(s.clone()),
        F::Bytes(b) => Value::Str(
            std::str::from_utf8(b.data())
                .map_err(|e| anyhow!("binary value is not UTF-8 ({e})"))?
                .to_string(),
        ),
        other => bail!("unsupported parquet value {other}"),
    })
}
