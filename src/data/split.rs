//! The seeded stratified splitter: carves validation/test splits out of a split that has them not.
//!
//! Its own tiny generator (splitmix64) keeps a seed's split the same across dependency upgrades.

use super::{Example, Label};
use std::collections::BTreeMap;

/// A deterministic 64-bit generator (splitmix64): small, fast and stable forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by rejection so that no index is favoured.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Shuffles `items` in place (Fisher-Yates) with a generator seeded by `seed`.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// The stratum an example falls in: its class, or one stratum for scores and unlabelled rows.
fn stratum(e: &Example) -> Option<u32> {
    match e.label {
        Some(Label::Class(c)) => Some(c),
        _ => None,
    }
}

/// Splits `examples` into `fractions.len() + 1` parts: part k holds `round(n_c * fractions[k])`
/// examples of each class c (taken in a seeded shuffled order), the last part the rest.
/// Every part keeps the original order of its examples.
pub fn stratified_split(examples: &[Example], fractions: &[f64], seed: u64) -> Vec<Vec<Example>> {
    let mut strata: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        strata.entry(stratum(e)).or_default().push(i);
    }
    let mut owner = vec![fractions.len(); examples.len()];
    for (class, idx) in strata.iter_mut() {
        // Each stratum gets its own stream so that adding a class does not reshuffle the others.
        let salt = class.map(|c| c as u64 + 1).unwrap_or(0);
        shuffle(idx, seed ^ salt.wrapping_mul(0xA24B_AED4_963E_E407));
        let n = idx.len() as f64;
        let mut start = 0usize;
        for (part, f) in fractions.iter().enumerate() {
            let take = ((n * f).round() as usize).min(idx.len() - start);
            for &i in &idx[start..start + take] {
                owner[i] = part;
            }
            start += take;
        }
    }
    let mut parts = vec![Vec::new(); fractions.len() + 1];
    for (e, o) in examples.iter().zip(owner) {
        parts[o].push(e.clone());
    }
    parts
}
