//! The dataset card: its YAML header's `dataset_info.features`, which name a dataset's columns and
//! class labels. A small block-YAML reader covers the subset the hub writes (mappings, sequences,
//! plain and quoted scalars), so no YAML crate is needed.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// One column the card declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feature {
    pub name: String,
    pub dtype: FeatureType,
}

/// A column's type as far as classification cares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureType {
    /// A plain value: `string`, `int64`, `float32`…
    Value(String),
    /// A class label with its names in class-id order.
    ClassLabel(Vec<String>),
    /// Anything nested (sequences, structs, translations).
    Other,
}

/// A parsed YAML node.
#[derive(Debug, Clone, PartialEq)]
pub enum Yaml {
    Map(Vec<(String, Yaml)>),
    Seq(Vec<Yaml>),
    Str(String),
    Null,
}

impl Yaml {
    pub fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The YAML between the leading `---` lines of a card, if it has a header.
pub fn front_matter(card: &str) -> Option<&str> {
    let rest = card
        .strip_prefix("---\n")
        .or_else(|| card.strip_prefix("---\r\n"))?;
    let end = rest
        .find("\n---")
        .map(|i| i + 1)
        .or_else(|| rest.starts_with("---").then_some(0))?;
    Some(&rest[..end])
}

/// The features a card declares for `config` (`dataset_info` as one mapping, or a list of
/// mappings with `config_name`). An empty list when the card says nothing.
pub fn features(card: &str, config: &str) -> Result<Vec<Feature>> {
    let Some(yaml) = front_matter(card) else {
        return Ok(vec![]);
    };
    let doc = parse_yaml(yaml)?;
    let info = match doc.get("dataset_info") {
        Some(Yaml::Seq(items)) => {
            let named = items
                .iter()
                .find(|i| i.get("config_name").and_then(Yaml::as_str) == Some(config));
            named.or_else(|| (items.len() == 1).then(|| &items[0]))
        }
        Some(m @ Yaml::Map(_)) => match m.get("config_name").and_then(Yaml::as_str) {
            Some(c) if c != config => None,
            _ => Some(m),
        },
        _ => None,
    };
    let Some(Yaml::Seq(feats)) = info.and_then(|i| i.get("features")) else {
        return Ok(vec![]);
    };
    Ok(feats.iter().filter_map(feature).collect())
}

/// The class names of the first class-label feature, if any.
pub fn label_names(features: &[Feature]) -> Option<Vec<String>> {
    features.iter().find_map(|f| match &f.dtype {
        FeatureType::ClassLabel(n) => Some(n.clone()),
        _ => None,
    })
}

fn feature(node: &Yaml) -> Option<Feature> {
    let name = node.get("name")?.as_str()?.to_string();
    let dtype = match node.get("dtype") {
        Some(Yaml::Str(s)) => FeatureType::Value(s.clone()),
        Some(d) => match d.get("class_label").and_then(|c| c.get("names")) {
            Some(Yaml::Map(kv)) => {
                let mut pairs: Vec<(i64, String)> = kv
                    .iter()
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
                    .collect();
                pairs.sort();
                FeatureType::ClassLabel(pairs.into_iter().map(|(_, n)| n).collect())
            }
            Some(Yaml::Seq(items)) => FeatureType::ClassLabel(
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            ),
            _ => FeatureType::Other,
        },
        None => FeatureType::Other,
    };
    Some(Feature { name, dtype })
}

/// Parses block YAML: indentation-nested mappings and `- ` sequences, plain, quoted and block
/// (`|`, `>`) scalars, comments. Flow collections are kept as their text.
pub fn parse_yaml(text: &str) -> Result<Yaml> {
    let mut lines: Vec<(usize, String)> = Vec::new();
    for raw in text.lines() {
        let t = raw.trim_end();
        let content = t.trim_start();
        if content.is_empty() || content.starts_with('#') || content == "---" {
            continue;
        }
        if raw.starts_with('\t') {
            bail!("YAML indented with tabs: {raw:?}");
        }
        lines.push((t.len() - content.len(), content.to_string()));
    }
    let mut i = 0;
    let doc = match lines.first() {
        Some(&(indent, _)) => block(&mut lines, &mut i, indent)?,
        None => Yaml::Null,
    };
    if i < lines.len() {
        bail!("unexpected YAML line {:?}", lines[i].1);
    }
    Ok(doc)
}

fn is_item(s: &str) -> bool {
    s == "-" || s.starts_with("- ")
}

fn block(lines: &mut [(usize, String)], i: &mut usize, indent: usize) -> Result<Yaml> {
    if is_item(&lines[*i].1) {
        seq(lines, i, indent)
    } else {
        map(lines, i, indent)
    }
}

fn seq(lines: &mut [(usize, String)], i: &mut usize, indent: usize) -> Result<Yaml> {
    let mut items = Vec::new();
    while *i < lines.len() && lines[*i].0 == indent && is_item(&lines[*i].1) {
        let rest = lines[*i].1[1..].trim_start().to_string();
        if rest.is_empty() {
            *i += 1;
            match lines.get(*i) {
                Some(&(d, _)) if d > indent => items.push(block(lines, i, d)?),
                _ => items.push(Yaml::Null),
            }
        } else if split_key(&rest).is_some() || is_item(&rest) {
            // `- key: v` opens a mapping whose keys sit where `key` does.
            let at = indent + (lines[*i].1.len() - rest.len());
            lines[*i] = (at, rest);
            items.push(block(lines, i, at)?);
        } else {
            items.push(scalar(&rest));
            *i += 1;
        }
    }
    Ok(Yaml::Seq(items))
}

fn map(lines: &mut [(usize, String)], i: &mut usize, indent: usize) -> Result<Yaml> {
    let mut kv = Vec::new();
    while *i < lines.len() && lines[*i].0 == indent && !is_item(&lines[*i].1) {
        let line = lines[*i].1.clone();
        let Some((key, rest)) = split_key(&line) else {
            bail!("expected `key: value` in YAML line {line:?}")
        };
        *i += 1;
        let value = if rest.is_empty() {
            match lines.get(*i) {
                Some(&(d, _)) if d > indent => block(lines, i, d)?,
                Some((d, s)) if *d == indent && is_item(s) => seq(lines, i, indent)?,
                _ => Yaml::Null,
            }
        } else if rest.starts_with('|') || rest.starts_with('>') {
            let mut parts = Vec::new();
            while *i < lines.len() && lines[*i].0 > indent {
                parts.push(lines[*i].1.clone());
                *i += 1;
            }
            Yaml::Str(parts.join(if rest.starts_with('|') { "\n" } else { " " }))
        } else {
            scalar(rest)
        };
        kv.push((key, value));
    }
    Ok(Yaml::Map(kv))
}

/// Splits `key: rest` (or `key:`), honouring a quoted key.
fn split_key(line: &str) -> Option<(String, &str)> {
    let (key, after) = if let Some(q @ ('\'' | '"')) = line.chars().next() {
        let end = line[1..].find(q)? + 1;
        (line[1..end].to_string(), &line[end + 1..])
    } else {
        let pos = line
            .find(": ")
            .or_else(|| line.ends_with(':').then(|| line.len() - 1))?;
        if line[..pos].contains(['[', '{']) {
            return None;
        }
        (line[..pos].trim().to_string(), &line[pos..])
    };
    let rest = after.strip_prefix(':')?;
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    Some((key, rest.trim()))
}

fn scalar(s: &str) -> Yaml {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Yaml::Str(inner.replace("''", "'"));
    }
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return Yaml::Str(inner.replace("\\\"", "\"").replace("\\\\", "\\"));
    }
    let s = match s.find(" #") {
        Some(p) => s[..p].trim_end(),
        None => s,
    };
    match s {
        "" | "~" | "null" => Yaml::Null,
        _ => Yaml::Str(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GLUE_LIKE: &str = "---\nannotations_creators:\n- other\nlanguage:\n- en\ndataset_info:\n- config_name: cola\n  features:\n  - name: sentence\n    dtype: string\n  - name: label\n    dtype:\n      class_label:\n        names:\n          '0': unacceptable\n          '1': acceptable\n  - name: idx\n    dtype: int32\n  splits:\n  - name: train\n    num_bytes: 484869\n    num_examples: 8551\n- config_name: mnli\n  features:\n  - name: premise\n    dtype: string\n  - name: label\n    dtype:\n      class_label:\n        names:\n          '0': entailment\n          '1': neutral\n          '2': contradiction\n---\n\n# GLUE\n\ntext: not: yaml\n";

    #[test]
    fn reads_class_labels_of_the_named_config() {
        let f = features(GLUE_LIKE, "mnli").unwrap();
        assert_eq!(
            label_names(&f),
            Some(vec![
                "entailment".to_string(),
                "neutral".into(),
                "contradiction".into()
            ])
        );
        let f = features(GLUE_LIKE, "cola").unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(
            f[0],
            Feature {
                name: "sentence".into(),
                dtype: FeatureType::Value("string".into())
            }
        );
        assert_eq!(
            f[1].dtype,
            FeatureType::ClassLabel(vec!["unacceptable".into(), "acceptable".into()])
        );
        assert!(features(GLUE_LIKE, "qqp").unwrap().is_empty());
    }

    #[test]
    fn reads_single_config_cards_and_list_names_in_id_order() {
        let card = "---\nlicense: other\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  - name: label\n    dtype:\n      class_label:\n        names:\n          '10': ten\n          '2': two\n          '0': \"zero\"\n  config_name: plain_text\n---\nbody";
        assert_eq!(
            label_names(&features(card, "plain_text").unwrap()),
            Some(vec!["zero".to_string(), "two".into(), "ten".into()])
        );
        assert!(features(card, "other").unwrap().is_empty());
        let old = "---\ndataset_info:\n  features:\n    - name: label\n      dtype:\n        class_label:\n          names:\n            - neg\n            - pos\n---\n";
        assert_eq!(
            label_names(&features(old, "default").unwrap()),
            Some(vec!["neg".to_string(), "pos".into()])
        );
    }

    #[test]
    fn cards_without_a_header_have_no_features() {
        assert!(features("# Just markdown\n", "default").unwrap().is_empty());
        assert!(features("---\ntags: [a, b]\n---\n", "default")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn parses_nested_blocks_quotes_and_block_scalars() {
        let y = parse_yaml("a: 'it''s'\nb:\n  c: |\n    line1\n    line2\n  d: x # comment\ne:\n- - 1\n  - 2\n- k: v\n  l: w\n").unwrap();
        assert_eq!(y.get("a"), Some(&Yaml::Str("it's".into())));
        assert_eq!(
            y.get("b").and_then(|b| b.get("c")),
            Some(&Yaml::Str("line1\nline2".into()))
        );
        assert_eq!(
            y.get("b").and_then(|b| b.get("d")),
            Some(&Yaml::Str("x".into()))
        );
        let Some(Yaml::Seq(e)) = y.get("e") else {
            panic!("e is not a sequence: {y:?}")
        };
        assert_eq!(
            e[0],
            Yaml::Seq(vec![Yaml::Str("1".into()), Yaml::Str("2".into())])
        );
        assert_eq!(e[1].get("l"), Some(&Yaml::Str("w".into())));
        assert!(parse_yaml("a: 1\n  b: 2\n").is_err());
    }
}
