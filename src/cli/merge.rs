//! `recycle merge`: parse the merge flags into a `MergeRequest` and run the streaming merge.

use crate::merge::{merge_checkpoints, MergeRequest, MergeSpec, Method};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum MethodArg {
    /// Weighted mean of the MODELs (ColD Fusion); --base, if given, is only the template.
    Average,
    /// base + λ Σ w_i (m_i − base).
    TaskArithmetic,
    /// Trim deltas to the top --density, elect signs, merge the agreeing entries.
    Ties,
    /// Drop delta entries with --drop-rate p, rescale by 1/(1−p), then task arithmetic.
    DareLinear,
    /// Drop and rescale as DARE, then TIES' sign election.
    DareTies,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Average => Method::Average,
            MethodArg::TaskArithmetic => Method::TaskArithmetic,
            MethodArg::Ties => Method::Ties,
            MethodArg::DareLinear => Method::DareLinear,
            MethodArg::DareTies => Method::DareTies,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How to combine the models (see docs/merging.md).
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// The pretrained checkpoint dir the deltas are taken from (needed by all methods but
    /// `average`, where it only supplies config, tokenizer and tensor layout).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Fine-tuned checkpoint dirs (config.json + model.safetensors or a sharded index).
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    /// One weight per MODEL, comma-separated (default: 1 each). Negative weights negate a task.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub weights: Option<Vec<f32>>,
    /// Scale λ of the merged delta (delta methods; default 1).
    #[arg(long, allow_hyphen_values = true)]
    pub lambda: Option<f32>,
    /// TIES: fraction of each delta's entries kept by magnitude (default 0.2).
    #[arg(long)]
    pub density: Option<f32>,
    /// DARE: probability of dropping each delta entry (default 0.9).
    #[arg(long)]
    pub drop_rate: Option<f32>,
    /// DARE: seed of the drop masks (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// average / ties / dare-ties: do not divide by the sum of the (agreeing) weights.
    #[arg(long)]
    pub no_normalize: bool,
    /// Merge the classification heads too (they must agree in shape) instead of dropping them.
    #[arg(long)]
    pub keep_head: bool,
    /// Output checkpoint dir (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// Resolves the flags into a request, refusing flags that the chosen method would ignore.
pub fn request(args: Args) -> Result<MergeRequest> {
    let method = Method::from(args.method);
    let mut spec = MergeSpec::new(method, args.models.len());
    if let Some(w) = args.weights {
        if w.len() != args.models.len() {
            bail!(
                "--weights has {} values but {} models were given",
                w.len(),
                args.models.len()
            );
        }
        spec.weights = w;
    }
    let dare = matches!(method, Method::DareLinear | Method::DareTies);
    if let Some(l) = args.lambda {
        if !method.needs_base() {
            bail!("--lambda does not apply to --method average");
        }
        spec.lambda = l;
    }
    if let Some(d) = args.density {
        if method != Method::Ties {
            bail!("--density applies to --method ties only (DARE methods use --drop-rate)");
        }
        spec.density = d;
    }
    if let Some(p) = args.drop_rate {
        if !dare {
            bail!("--drop-rate applies to --method dare-linear and dare-ties only");
        }
        spec.drop_rate = p;
    }
    if let Some(s) = args.seed {
        if !dare {
            bail!("--seed applies to --method dare-linear and dare-ties only");
        }
        spec.seed = s;
    }
    if args.no_normalize {
        if matches!(method, Method::TaskArithmetic | Method::DareLinear) {
            bail!("--no-normalize does not apply to task-arithmetic / dare-linear (never normalised; use --lambda)");
        }
        spec.normalize = false;
    }
    spec.validate()?;
    Ok(MergeRequest {
        spec,
        base: args.base,
        models: args.models,
        keep_head: args.keep_head,
        out: args.out,
    })
}

pub fn run(args: Args) -> Result<ExitCode> {
    let req = request(args)?;
    let outcome = merge_checkpoints(&req)?;
    println!(
        "merged {} tensors ({} copied, {} head tensors dropped) into {} ({} bytes of weights)",
        outcome.merged,
        outcome.copied,
        outcome.dropped.len(),
        outcome.out.display(),
        outcome.bytes
    );
    Ok(ExitCode::SUCCESS)
}
