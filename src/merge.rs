//! Merging encoders: combine recycled checkpoints (average, task arithmetic, TIES, DARE) into a new
//! base for fine-tuning, one parameter at a time so that memory stays near one model.
//!
//! The arithmetic is pure (`kernel`, on f32 slices or typed byte views); the architecture knowledge
//! (name prefixes, classification heads) sits in `names`; opening hub-format checkpoint dirs through
//! mmap in `checkpoint`; and the streaming driver that writes the merged checkpoint in `stream`.
//! See docs/merging.md for the formulas and the weight semantics.

pub mod checkpoint;
pub mod kernel;
pub mod names;
pub mod stream;

pub use kernel::{merge_param, merge_tensor, ParamMerger};
pub use stream::{merge_checkpoints, MergeOutcome, MergeRequest};

use anyhow::{bail, Result};
use serde::Serialize;

/// How the models are combined. Every method works per parameter tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Weighted mean of the models themselves; the base (if any) is not averaged in.
    Average,
    /// `base + λ Σ w_i (m_i − base)`.
    TaskArithmetic,
    /// Trim each delta to its top-`density` entries by magnitude, elect a sign per entry from the
    /// sum of the weighted trimmed deltas, and merge only the entries that agree with it.
    Ties,
    /// Drop delta entries with probability `p`, rescale the rest by `1/(1−p)`, then task arithmetic.
    DareLinear,
    /// DARE's drop-and-rescale, then TIES' sign election and disjoint merge (no magnitude trim).
    DareTies,
}

impl Method {
    /// Whether the method works on deltas from a base model (all but `Average`).
    pub fn needs_base(self) -> bool {
        !matches!(self, Method::Average)
    }

    /// The name used on the command line and in `recycle_merge`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Average => "average",
            Method::TaskArithmetic => "task-arithmetic",
            Method::Ties => "ties",
            Method::DareLinear => "dare-linear",
            Method::DareTies => "dare-ties",
        }
    }
}

/// The resolved merge settings, shared by every parameter tensor.
///
/// Weight semantics (see docs/merging.md):
/// - `weights[i]` belongs to model `i` (not to the base); they may be negative (task negation).
/// - `Average`: `Σ w_i m_i / Σ w_i` when `normalize`, else `Σ w_i m_i`.
/// - `TaskArithmetic` / `DareLinear`: `base + λ Σ w_i δ_i`; never normalised (λ is the scale).
/// - `Ties` / `DareTies`: `base + λ · Σ_{agree} w_i δ_i / Σ_{agree} w_i` when `normalize`
///   (a weighted mean of the deltas that agree with the elected sign), else without the division.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergeSpec {
    pub method: Method,
    /// One weight per model, in the order the models are given.
    pub weights: Vec<f32>,
    /// Scale λ of the merged delta (unused by `Average`).
    pub lambda: f32,
    /// TIES: fraction of each delta's entries kept (by magnitude), in `[0, 1]`.
    pub density: f32,
    /// DARE: probability `p` of dropping a delta entry, in `[0, 1)`.
    pub drop_rate: f32,
    /// DARE: seed of the drop masks; a mask depends only on (seed, tensor name, model index).
    pub seed: u64,
    /// `Average` and the TIES family: divide by the (agreeing) weights' sum.
    pub normalize: bool,
}

impl MergeSpec {
    /// Settings with the documented defaults for `n_models` models: equal weights 1, λ = 1,
    /// density 0.2 (the TIES paper's top-20%), drop rate 0.9 (the DARE paper's usual rate),
    /// seed 0, normalisation on.
    pub fn new(method: Method, n_models: usize) -> Self {
        MergeSpec {
            method,
            weights: vec![1.0; n_models],
            lambda: 1.0,
            density: 0.2,
            drop_rate: 0.9,
            seed: 0,
            normalize: true,
        }
    }

    /// Checks the ranges of every setting; the error names the offending setting.
    pub fn validate(&self) -> Result<()> {
        if self.weights.is_empty() {
            bail!("a merge needs at least one model");
        }
        if self.weights.iter().any(|w| !w.is_finite()) {
            bail!("--weights must be finite numbers, got {:?}", self.weights);
        }
        if !self.lambda.is_finite() {
            bail!("--lambda must be a finite number, got {}", self.lambda);
        }
        if !(0.0..=1.0).contains(&self.density) {
            bail!("--density must lie in [0, 1], got {}", self.density);
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            bail!("--drop-rate must lie in [0, 1), got {}", self.drop_rate);
        }
        if self.method == Method::Average && self.normalize {
            let sum: f32 = self.weights.iter().sum();
            if sum.abs() < 1e-12 {
                bail!(
                    "--weights sum to zero, so `average` cannot normalise them (use --no-normalize)"
                );
            }
        }
        Ok(())
    }
}
