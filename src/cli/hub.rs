//! `recycle hub`: fetch a model or dataset from the HuggingFace hub into the shared cache and print
//! the commit it resolved to, so a run can pin it.

use crate::hub::{self, DatasetRef, HubOptions, ModelRef, PickleMode};
use anyhow::{bail, Result};
use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Resolve a hub id to a commit and download its files (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
    /// HF_TOKEN, HF_HUB_OFFLINE=1, HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT are honoured as
    /// by huggingface_hub).
    Download(DownloadArgs),
}

#[derive(clap::Args, Debug)]
pub struct DownloadArgs {
    /// Hub id, e.g. `roberta-base`, `ibm/ColD-Fusion`, `glue` (append `@REV` or use --revision).
    pub id: String,
    /// The id names a dataset (its parquet files), not a model.
    #[arg(long)]
    pub dataset: bool,
    /// Branch, tag or commit (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Dataset subset (config), e.g. `mnli` of `glue`.
    #[arg(long, requires = "dataset")]
    pub config: Option<String>,
    /// Accept a model that only has PyTorch pickle weights (pytorch_model.bin).
    #[arg(long, conflicts_with = "dataset")]
    pub allow_pickle: bool,
}

pub fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Download(a) => download(a),
    }
}

fn with_revision(id: &str, revision: Option<&str>) -> Result<String> {
    match (id.contains('@'), revision) {
        (true, Some(_)) => {
            bail!("give the revision either as ID@REV or with --revision, not both ({id:?})")
        }
        (false, Some(r)) => Ok(format!("{id}@{r}")),
        _ => Ok(id.to_string()),
    }
}

fn download(a: DownloadArgs) -> Result<ExitCode> {
    let mut opts = HubOptions::from_env();
    if a.allow_pickle {
        opts.pickle = PickleMode::Allow;
    }
    let id = with_revision(&a.id, a.revision.as_deref())?;
    if a.dataset {
        let d = hub::resolve_dataset(&DatasetRef::parse(&id, a.config)?, &opts)?;
        println!("dataset: {}", d.repo);
        println!("revision: {}", d.revision);
        if d.files_revision != d.revision {
            println!("files revision: {}", d.files_revision);
        }
        println!("commit: {}", d.commit);
        println!("config: {}", d.config);
        println!("snapshot: {}", d.dir.display());
        for (split, files) in &d.splits {
            println!("split {split}: {} parquet file(s)", files.len());
        }
        if let Some(names) = &d.label_names {
            println!("labels: {}", names.join(", "));
        }
    } else {
        let m = hub::resolve_model(&ModelRef::parse(&id)?, &opts)?;
        println!("model: {}", m.repo);
        println!("revision: {}", m.revision);
        println!("commit: {}", m.commit);
        println!("snapshot: {}", m.dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
