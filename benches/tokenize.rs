//! Tokenization throughput: examples/s of `TextTokenizer::encode` (the batch encoder the runner
//! calls once per split) on short synthetic texts (10–60 words, as in the default suite), against
//! the baseline of encoding the same texts one by one measured in the same run, with a BERT-style
//! WordPiece tokenizer built in memory (no files, no network).
//!
//! `cargo bench --bench tokenize`; `RECYCLE_BENCH_REPS=N` scales the example count.

mod common;

use rand::{Rng, SeedableRng};
use recycle::data::{Example, Label};
use recycle::tokenize::TextTokenizer;
use std::collections::HashMap;
use std::time::Instant;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

/// Synthetic words: consonant-vowel syllables, so WordPiece splits some of them into pieces.
fn word(rng: &mut impl Rng) -> String {
    const C: &[u8] = b"bcdfghklmnprstvz";
    const V: &[u8] = b"aeiou";
    (0..rng.random_range(1..4))
        .flat_map(|_| {
            [
                C[rng.random_range(0..C.len())] as char,
                V[rng.random_range(0..V.len())] as char,
            ]
        })
        .collect()
}

/// A WordPiece tokenizer over every 1- and 2-syllable word and `##` continuation.
fn tokenizer() -> anyhow::Result<Tokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] {
        let id = vocab.len() as u32;
        vocab.insert(t.into(), id);
    }
    let syllables: Vec<String> = "bcdfghklmnprstvz"
        .chars()
        .flat_map(|c| "aeiou".chars().map(move |v| format!("{c}{v}")))
        .collect();
    for a in &syllables {
        for piece in [a.clone(), format!("##{a}")] {
            let id = vocab.len() as u32;
            vocab.entry(piece).or_insert(id);
        }
        for b in &syllables {
            let id = vocab.len() as u32;
            vocab.entry(format!("{a}{b}")).or_insert(id);
        }
    }
    let (cls, sep) = (vocab["[CLS]"], vocab["[SEP]"]);
    // WordPiece reads its vocabulary from a vocab.txt: one token a line, the id is the line number.
    let mut lines: Vec<(&String, &u32)> = vocab.iter().collect();
    lines.sort_by_key(|(_, &id)| id);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("vocab.txt");
    let text: Vec<&str> = lines.iter().map(|(t, _)| t.as_str()).collect();
    std::fs::write(&path, text.join("\n") + "\n")?;
    let path = path
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("temporary path is not UTF-8"))?;
    let model = WordPiece::from_file(path)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::default()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    ));
    Ok(tok)
}

fn main() -> anyhow::Result<()> {
    common::setup();
    let n = 2000 * common::reps(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let examples: Vec<Example> = (0..n)
        .map(|_| {
            let words: Vec<String> = (0..rng.random_range(10..60))
                .map(|_| word(&mut rng))
                .collect();
            Example {
                text: words.join(" ") + ".",
                text_pair: None,
                label: Some(Label::Class(0)),
            }
        })
        .collect();
    let tok = TextTokenizer::new(tokenizer()?, 128)?;
    tok.encode(&examples[..100])?; // warm-up
    let start = Instant::now();
    let batch = tok.encode(&examples)?;
    let batch_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut one_by_one = 0usize;
    for e in &examples {
        one_by_one += tok.encode(std::slice::from_ref(e))?.input_ids[0].len();
    }
    let single_s = start.elapsed().as_secs_f64();
    let tokens: usize = batch.lengths().iter().sum();
    assert_eq!(tokens, one_by_one, "batch and one-by-one encodings differ");
    println!(
        "tokenize {n} examples ({:.1} tokens each): {:.0} examples/s batched, {:.0} one by one (batched / one by one = {:.2})",
        tokens as f64 / n as f64,
        n as f64 / batch_s,
        n as f64 / single_s,
        single_s / batch_s
    );
    println!("RESULT tokenize_examples_per_s {:.1}", n as f64 / batch_s);
    Ok(())
}
