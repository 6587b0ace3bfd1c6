//! A model's tokenizer from its snapshot: `tokenizer.json` when the repo has one, otherwise built
//! from the slow-tokenizer files older repos ship (BERT WordPiece `vocab.txt`, RoBERTa byte-level
//! BPE `vocab.json` + `merges.txt`) with special tokens and lower-casing from `tokenizer_config.json`.

use super::files;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Which slow-tokenizer family the files describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    WordPiece,
    ByteLevelBpe,
}

/// The settings `tokenizer_config.json` and `special_tokens_map.json` give a slow tokenizer.
#[derive(Debug, Clone, PartialEq)]
struct SlowConfig {
    cls: String,
    sep: String,
    pad: String,
    unk: String,
    mask: String,
    lowercase: bool,
    add_prefix_space: bool,
}

impl SlowConfig {
    fn defaults(family: Family) -> Self {
        match family {
            Family::WordPiece => SlowConfig {
                cls: "[CLS]".into(),
                sep: "[SEP]".into(),
                pad: "[PAD]".into(),
                unk: "[UNK]".into(),
                mask: "[MASK]".into(),
                lowercase: true,
                add_prefix_space: false,
            },
            Family::ByteLevelBpe => SlowConfig {
                cls: "<s>".into(),
                sep: "</s>".into(),
                pad: "<pad>".into(),
                unk: "<unk>".into(),
                mask: "<mask>".into(),
                lowercase: false,
                add_prefix_space: false,
            },
        }
    }

    /// Applies a JSON object of either file: `cls_token` (string or `{"content": …}`, and
    /// `bos_token` / `eos_token` for BPE), `do_lower_case`, `add_prefix_space`.
    fn apply(&mut self, v: &Value, family: Family) {
        let tok = |k: &str| match v.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(o @ Value::Object(_)) => {
                o.get("content").and_then(Value::as_str).map(str::to_string)
            }
            _ => None,
        };
        let (cls_key, sep_key) = match family {
            Family::WordPiece => ("cls_token", "sep_token"),
            Family::ByteLevelBpe => ("bos_token", "eos_token"),
        };
        if let Some(t) = tok("cls_token").or_else(|| tok(cls_key)) {
            self.cls = t;
        }
        if let Some(t) = tok("sep_token").or_else(|| tok(sep_key)) {
            self.sep = t;
        }
        for (key, slot) in [
            ("pad_token", &mut self.pad),
            ("unk_token", &mut self.unk),
            ("mask_token", &mut self.mask),
        ] {
            if let Some(t) = tok(key) {
                *slot = t;
            }
        }
        if let Some(b) = v.get("do_lower_case").and_then(Value::as_bool) {
            self.lowercase = b;
        }
        if let Some(b) = v.get("add_prefix_space").and_then(Value::as_bool) {
            self.add_prefix_space = b;
        }
    }
}

fn tk<E: std::fmt::Display>(what: String) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow!("{what}: {e}")
}

/// Loads or builds the tokenizer of a model snapshot, preferring `tokenizer.json`.
pub fn tokenizer_for(dir: &Path) -> Result<Tokenizer> {
    let json = dir.join(files::TOKENIZER_JSON);
    if json.is_file() {
        return Tokenizer::from_file(&json).map_err(tk(format!("loading {}", json.display())));
    }
    let (vocab_json, merges, vocab_txt) = (
        dir.join(files::VOCAB_JSON),
        dir.join(files::MERGES_TXT),
        dir.join(files::VOCAB_TXT),
    );
    let family = if vocab_json.is_file() && merges.is_file() {
        Family::ByteLevelBpe
    } else if vocab_txt.is_file() {
        Family::WordPiece
    } else {
        bail!(
            "{} has no tokenizer: none of {}, {}, {} + {}",
            dir.display(),
            files::TOKENIZER_JSON,
            files::VOCAB_TXT,
            files::VOCAB_JSON,
            files::MERGES_TXT
        );
    };
    let mut cfg = SlowConfig::defaults(family);
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            cfg.apply(&v, family);
        }
    }
    let built = match family {
        Family::WordPiece => wordpiece(&vocab_txt, &cfg),
        Family::ByteLevelBpe => byte_level_bpe(&vocab_json, &merges, &cfg),
    };
    built.with_context(|| format!("building the tokenizer of {}", dir.display()))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

fn wordpiece(vocab: &Path, cfg: &SlowConfig) -> Result<Tokenizer> {
    let model = WordPiece::from_file(path_str(vocab)?)
        .unk_token(cfg.unk.clone())
        .build()
        .map_err(tk(format!("reading {}", vocab.display())))?;
    let mut t = Tokenizer::new(model);
    t.with_normalizer(Some(BertNormalizer::new(true, true, None, cfg.lowercase)))
        .map_err(tk("normalizer".into()))?;
    t.with_pre_tokenizer(Some(BertPreTokenizer));
    t.with_decoder(Some(WordPieceDecoder::default()));
    finish(
        t,
        cfg,
        &format!("{} $A {}", cfg.cls, cfg.sep),
        &format!("{cls} $A {sep} $B:1 {sep}:1", cls = cfg.cls, sep = cfg.sep),
    )
}

fn byte_level_bpe(vocab: &Path, merges: &Path, cfg: &SlowConfig) -> Result<Tokenizer> {
    let model = BPE::from_file(path_str(vocab)?, path_str(merges)?)
        .build()
        .map_err(tk(format!(
            "reading {} and {}",
            vocab.display(),
            merges.display()
        )))?;
    let mut t = Tokenizer::new(model);
    t.with_pre_tokenizer(Some(
        ByteLevel::default().add_prefix_space(cfg.add_prefix_space),
    ));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    finish(
        t,
        cfg,
        &format!("{} $A {}", cfg.cls, cfg.sep),
        &format!(
            "{cls} $A {sep} {sep} $B {sep}",
            cls = cfg.cls,
            sep = cfg.sep
        ),
    )
}

/// Registers the special tokens and the `[CLS] … [SEP]` templates.
fn finish(mut t: Tokenizer, cfg: &SlowConfig, single: &str, pair: &str) -> Result<Tokenizer> {
    let id = |tok: &str| {
        t.token_to_id(tok)
            .with_context(|| format!("special token {tok:?} is not in the vocabulary"))
    };
    let (cls, sep) = (id(&cfg.cls)?, id(&cfg.sep)?);
    let post = TemplateProcessing::builder()
        .try_single(single)
        .map_err(tk(format!("template {single:?}")))?
        .try_pair(pair)
        .map_err(tk(format!("template {pair:?}")))?
        .special_tokens(vec![(cfg.cls.clone(), cls), (cfg.sep.clone(), sep)])
        .build()
        .map_err(tk("post-processor".into()))?;
    t.with_post_processor(Some(post));
    let specials: Vec<AddedToken> = [&cfg.cls, &cfg.sep, &cfg.pad, &cfg.unk, &cfg.mask]
        .into_iter()
        .filter(|s| t.token_to_id(s).is_some())
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    t.add_special_tokens(specials)
        .map_err(tk("special tokens".into()))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn builds_bert_wordpiece_from_vocab_txt() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "vocab.txt",
            "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n##s\n,\n",
        );
        write(
            d.path(),
            "tokenizer_config.json",
            r#"{"do_lower_case": true}"#,
        );
        let t = tokenizer_for(d.path()).unwrap();
        let e = t.encode(("Hello worlds", "WORLD, x"), true).unwrap();
        assert_eq!(
            e.get_tokens(),
            ["[CLS]", "hello", "world", "##s", "[SEP]", "world", ",", "[UNK]", "[SEP]"]
        );
        assert_eq!(e.get_type_ids(), [0, 0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(e.get_ids()[..3], [2, 5, 6]);
    }

    #[test]
    fn respects_case_and_special_tokens_from_config() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "vocab.txt",
            "[PAD]\n<unk>\n[CLS]\n[SEP]\nHello\nhello\n",
        );
        write(
            d.path(),
            "tokenizer_config.json",
            r#"{"do_lower_case": false}"#,
        );
        write(
            d.path(),
            "special_tokens_map.json",
            r#"{"unk_token": {"content": "<unk>"}}"#,
        );
        let t = tokenizer_for(d.path()).unwrap();
        let e = t.encode("Hello bye", true).unwrap();
        assert_eq!(e.get_tokens(), ["[CLS]", "Hello", "<unk>", "[SEP]"]);
    }

    #[test]
    fn builds_roberta_byte_level_bpe_from_vocab_and_merges() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "vocab.json",
            r#"{"<s>":0,"<pad>":1,"</s>":2,"<unk>":3,"h":4,"i":5,"hi":6,"Ġ":7,"Ġhi":8,"<mask>":9}"#,
        );
        write(d.path(), "merges.txt", "#version: 0.2\nh i\nĠ hi\n");
        let t = tokenizer_for(d.path()).unwrap();
        let e = t.encode(("hi hi", "hi"), true).unwrap();
        assert_eq!(
            e.get_tokens(),
            ["<s>", "hi", "Ġhi", "</s>", "</s>", "hi", "</s>"]
        );
        assert_eq!(e.get_ids(), [0, 6, 8, 2, 2, 6, 2]);
        assert_eq!(t.decode(&[6, 8], true).unwrap(), "hi hi");
    }

    #[test]
    fn prefers_tokenizer_json_and_errors_without_any_files() {
        let d = tempfile::tempdir().unwrap();
        let err = format!("{:#}", tokenizer_for(d.path()).unwrap_err());
        assert!(
            err.contains("vocab.txt") && err.contains("tokenizer.json"),
            "{err}"
        );
        write(d.path(), "vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n");
        let built = tokenizer_for(d.path()).unwrap();
        built.save(d.path().join("tokenizer.json"), false).unwrap();
        // A vocab.txt that would fail proves tokenizer.json is the one read.
        write(d.path(), "vocab.txt", "nothing special\n");
        let t = tokenizer_for(d.path()).unwrap();
        assert_eq!(
            t.encode("hello", true).unwrap().get_tokens(),
            ["[CLS]", "hello", "[SEP]"]
        );
    }
}
