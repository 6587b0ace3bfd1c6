//! Text to token ids: load a `tokenizer.json`, encode a dataset once (truncated, unpadded), and cut
//! it into dynamically padded `Batch`es, optionally grouping examples of similar length.

use crate::data::Example;
use crate::model::Batch;
use crate::train::Batching;
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use std::path::Path;
use tokenizers::{EncodeInput, Tokenizer, TruncationParams, TruncationStrategy};

/// A tokenizer with our truncation (longest-first to `max_length`) and no padding of its own.
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    max_length: usize,
}

/// A dataset's token ids, one unpadded sequence per example.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<Vec<u32>>,
    pub type_ids: Vec<Vec<u32>>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens per example.
    pub fn lengths(&self) -> Vec<usize> {
        self.input_ids.iter().map(Vec::len).collect()
    }
}

/// Pad-token names tried, in order, when `tokenizer.json` configures no padding.
const PAD_TOKENS: [&str; 3] = ["[PAD]", "<pad>", "<|padding|>"];

impl TextTokenizer {
    /// Loads `path` (a `tokenizer.json`) and overrides its padding and truncation.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot load tokenizer {}", path.display()))?;
        Self::new(inner, max_length).with_context(|| format!("tokenizer {}", path.display()))
    }

    /// The tokenizer of the checkpoint in `dir`: its `tokenizer.json`, else one built from its
    /// vocabulary files (`vocab.txt`, or `vocab.json` + `merges.txt`), as `hub::tokenizer_for`.
    pub fn for_checkpoint(dir: &Path, max_length: usize) -> Result<Self> {
        let inner = crate::hub::tokenizer_for(dir)?;
        Self::new(inner, max_length).with_context(|| format!("tokenizer of {}", dir.display()))
    }

    /// Wraps a tokenizer: padding off (we pad per batch), truncation longest-first to `max_length`.
    /// The pad id is the tokenizer's own padding id, else the id of a known pad token.
    pub fn new(mut inner: Tokenizer, max_length: usize) -> Result<Self> {
        ensure!(
            max_length >= 2,
            "--max-length must be at least 2, got {max_length}"
        );
        let pad_id = match inner.get_padding() {
            Some(p) => p.pad_id,
            None => PAD_TOKENS
                .iter()
                .find_map(|t| inner.token_to_id(t))
                .ok_or_else(|| anyhow!("the tokenizer has no padding settings and none of the pad tokens {PAD_TOKENS:?}"))?,
        };
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..TruncationParams::default()
            }))
            .map_err(|e| anyhow!("cannot set truncation to {max_length}: {e}"))?;
        Ok(Self {
            inner,
            pad_id,
            max_length,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Encodes every example (text, and text_pair when present), with special tokens, in parallel.
    pub fn encode(&self, examples: &[Example]) -> Result<Encoded> {
        let inputs: Vec<EncodeInput> = examples
            .iter()
            .map(|e| match &e.text_pair {
                Some(pair) => EncodeInput::from((e.text.as_str(), pair.as_str())),
                None => EncodeInput::from(e.text.as_str()),
            })
            .collect();
        let encodings = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        let mut out = Encoded::default();
        for enc in encodings {
            out.input_ids.push(enc.get_ids().to_vec());
            out.type_ids.push(enc.get_type_ids().to_vec());
        }
        Ok(out)
    }
}

/// How wide a batch is padded: to its longest example rounded up to a multiple of `multiple`
/// (CUDA's attention paths want whole tiles or 16-byte rows), but never past `limit` (the
/// truncation length, which the model's positions hold) unless the longest example is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PadTo {
    pub multiple: usize,
    pub limit: usize,
}

impl PadTo {
    /// To the longest example.
    pub const LONGEST: PadTo = PadTo {
        multiple: 1,
        limit: usize::MAX,
    };

    /// The width of a batch whose longest example has `longest` tokens (at least 1).
    pub fn width(&self, longest: usize) -> usize {
        let longest = longest.max(1);
        longest
            .next_multiple_of(self.multiple.max(1))
            .min(self.limit.max(longest))
    }
}

/// A batch of the examples at `indices`, padded with `pad_id` as `pad` says, on `device`.
pub fn make_batch(
    encoded: &Encoded,
    indices: &[usize],
    pad_id: u32,
    pad: PadTo,
    device: &Device,
) -> Result<Batch> {
    ensure!(!indices.is_empty(), "cannot build an empty batch");
    let width = indices
        .iter()
        .map(|&i| {
            encoded
                .input_ids
                .get(i)
                .map(Vec::len)
                .ok_or_else(|| anyhow!("example index {i} out of range"))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let width = pad.width(width);
    let n = indices.len() * width;
    let (mut ids, mut mask, mut types) = (vec![pad_id; n], vec![0u32; n], vec![0u32; n]);
    for (row, &i) in indices.iter().enumerate() {
        let at = row * width;
        let seq = &encoded.input_ids[i];
        ids[at..at + seq.len()].copy_from_slice(seq);
        mask[at..at + seq.len()].fill(1);
        let ty = &encoded.type_ids[i];
        types[at..at + ty.len()].copy_from_slice(ty);
    }
    let shape = (indices.len(), width);
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, shape, device)?,
        attention_mask: Tensor::from_vec(mask, shape, device)?,
        token_type_ids: Some(Tensor::from_vec(types, shape, device)?),
    })
}

/// How many batches a length bucket holds: sorting is local to a window of this many batches, so
/// the order stays random at the scale of an epoch.
const BUCKET_BATCHES: usize = 50;

/// One epoch's batches (index lists of at most `batch_size`), drawn with `rng`.
///
/// `Shuffled`: a permutation cut into consecutive batches. `LengthBucketed`: a permutation cut into
/// buckets of `BUCKET_BATCHES` batches, each bucket sorted by length (ties stay in shuffled order)
/// and cut into batches, then all batches shuffled.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    batching: Batching,
    rng: &mut impl Rng,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    match batching {
        Batching::Shuffled => order.chunks(batch_size).map(<[usize]>::to_vec).collect(),
        Batching::LengthBucketed => {
            let mut batches = Vec::new();
            for bucket in order.chunks(batch_size * BUCKET_BATCHES) {
                let mut bucket = bucket.to_vec();
                bucket.sort_by_key(|&i| lengths[i]);
                batches.extend(bucket.chunks(batch_size).map(<[usize]>::to_vec));
            }
            batches.shuffle(rng);
            batches
        }
    }
}

/// Consecutive batches in example order (for prediction), sorted by nothing.
pub fn sequential_batches(len: usize, batch_size: usize) -> Vec<Vec<usize>> {
    (0..len)
        .collect::<Vec<_>>()
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{PaddingParams, PaddingStrategy};

    /// A word-level BERT-style tokenizer over a tiny vocabulary, configured (like all-MiniLM-L6-v2's
    /// tokenizer.json) to pad and truncate to a fixed 128, which `TextTokenizer` must undo.
    pub(crate) fn toy_tokenizer(words: &[&str]) -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, w) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
            .iter()
            .chain(words)
            .enumerate()
        {
            vocab.insert(w.to_string(), i.into());
        }
        let model: WordLevel = serde_json::from_str(
            &serde_json::json!({"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"})
                .to_string(),
        )
        .unwrap();
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(Whitespace {}));
        tok.with_post_processor(Some(
            TemplateProcessing::builder()
                .try_single("[CLS] $A [SEP]")
                .unwrap()
                .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
                .unwrap()
                .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
                .build()
                .unwrap(),
        ));
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(128),
            pad_id: 0,
            pad_token: "[PAD]".into(),
            ..PaddingParams::default()
        }));
        tok.with_truncation(Some(TruncationParams {
            max_length: 128,
            ..TruncationParams::default()
        }))
        .unwrap();
        tok
    }

    fn ex(text: &str, pair: Option<&str>) -> Example {
        Example {
            text: text.into(),
            text_pair: pair.map(Into::into),
            label: None,
        }
    }

    #[test]
    fn overrides_fixed_padding_and_truncates_pairs_longest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        toy_tokenizer(&["a", "b", "c"]).save(&path, false).unwrap();
        let tok = TextTokenizer::from_file(&path, 8).unwrap();
        assert_eq!(tok.pad_id(), 0);
        let enc = tok
            .encode(&[
                ex("a b", None),
                ex("a a a a a a", Some("b c")),
                ex("zzz", None),
            ])
            .unwrap();
        // [CLS] a b [SEP] — not padded to 128.
        assert_eq!(enc.input_ids[0], vec![2, 4, 5, 3]);
        // 6 + 2 words + 3 specials = 11 > 8: longest-first drops 3 words from the longer text.
        assert_eq!(enc.input_ids[1], vec![2, 4, 4, 4, 3, 5, 6, 3]);
        assert_eq!(enc.type_ids[1], vec![0, 0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(enc.input_ids[2], vec![2, 1, 3]);
        assert_eq!(enc.lengths(), vec![4, 8, 3]);
    }

    #[test]
    fn batches_are_padded_to_their_longest_example() {
        let enc = Encoded {
            input_ids: vec![vec![2, 4, 3], vec![2, 4, 5, 6, 3], vec![2, 3]],
            type_ids: vec![vec![0; 3], vec![0, 0, 0, 1, 1], vec![0; 2]],
        };
        let b = make_batch(&enc, &[0, 2], 9, PadTo::LONGEST, &Device::Cpu).unwrap();
        assert_eq!(
            b.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![2, 4, 3], vec![2, 3, 9]]
        );
        assert_eq!(
            b.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 1, 0]]
        );
        let b = make_batch(&enc, &[1], 9, PadTo::LONGEST, &Device::Cpu).unwrap();
        assert_eq!(
            b.token_type_ids.unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![0, 0, 0, 1, 1]]
        );
        // Rounded up to a multiple: the padding is masked out like any other.
        let four = PadTo {
            multiple: 4,
            limit: 512,
        };
        let b = make_batch(&enc, &[0, 2], 9, four, &Device::Cpu).unwrap();
        assert_eq!(
            b.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![2, 4, 3, 9], vec![2, 3, 9, 9]]
        );
        assert_eq!(
            b.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1, 0], vec![1, 1, 0, 0]]
        );
    }

    /// Rounded up to the multiple, but not past the truncation length unless the example is
    /// longer (then to the example).
    #[test]
    fn padding_to_a_multiple_stops_at_the_limit() {
        let pad = |multiple, limit| PadTo { multiple, limit };
        assert_eq!(pad(8, 512).width(121), 128);
        assert_eq!(pad(8, 512).width(128), 128);
        assert_eq!(pad(8, 126).width(121), 126);
        assert_eq!(pad(8, 126).width(126), 126);
        assert_eq!(pad(8, 100).width(126), 126);
        assert_eq!(pad(16, 512).width(0), 16);
        assert_eq!(PadTo::LONGEST.width(0), 1);
        assert_eq!(PadTo::LONGEST.width(37), 37);
        assert_eq!(pad(0, 512).width(37), 37);
    }

    #[test]
    fn batching_covers_every_example_once_and_bucketing_cuts_padding() {
        let lengths: Vec<usize> = (0..1000).map(|i| 3 + (i * 7919) % 120).collect();
        let padded = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap() * b.len())
                .sum()
        };
        let mut seen = vec![];
        for batching in [Batching::Shuffled, Batching::LengthBucketed] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let batches = epoch_batches(&lengths, 16, batching, &mut rng);
            let mut all: Vec<usize> = batches.concat();
            all.sort();
            assert_eq!(all, (0..1000).collect::<Vec<_>>(), "{batching:?}");
            assert!(batches.iter().all(|b| b.len() <= 16));
            seen.push(padded(&batches));
            // Same seed, same batches.
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            assert_eq!(epoch_batches(&lengths, 16, batching, &mut rng), batches);
        }
        assert!(
            seen[1] * 10 < seen[0] * 7,
            "bucketing should cut padding: {seen:?}"
        );
    }
}
