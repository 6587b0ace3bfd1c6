//! `recycle data`: import a user's dataset, list and show the datasets in recycle's home.

use crate::assets;
use crate::data::import::{build, ImportSpec, LabelMode};
use crate::data::store::{write_dataset, Existing};
use crate::data::{label_counts, ColumnMap, Dataset, Task};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Import a CSV / TSV / JSONL / parquet file, or a folder with one sub-folder of text files per class.
    Import(Box<ImportArgs>),
    /// List the datasets in recycle's home with their split sizes.
    List(HomeArgs),
    /// Show a dataset's card, split sizes and label distributions.
    Show(ShowArgs),
}

#[derive(clap::Args, Debug)]
pub struct HomeArgs {
    /// recycle's home directory (default: $RECYCLE_HOME, $XDG_CACHE_HOME/recycle, ~/.cache/recycle).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// A dataset name in recycle's home, or a dataset directory.
    pub dataset: String,
    #[command(flatten)]
    pub home: HomeArgs,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The train split: a table file or a folder of per-class folders.
    pub train: PathBuf,
    /// Dataset name (default: the file or folder name without extension).
    #[arg(long)]
    pub name: Option<String>,
    /// A validation split file (else carved from train with --dev-fraction).
    #[arg(long, value_name = "FILE")]
    pub validation: Option<PathBuf>,
    /// A test split file (else carved from train with --test-fraction).
    #[arg(long, value_name = "FILE")]
    pub test: Option<PathBuf>,
    /// The text column.
    #[arg(long, default_value = "text", value_name = "COLUMN")]
    pub text: String,
    /// The second text column of pair tasks.
    #[arg(long, value_name = "COLUMN")]
    pub text_pair: Option<String>,
    /// The label column.
    #[arg(long, default_value = "label", value_name = "COLUMN")]
    pub label: String,
    /// Label names in class-id order (default: the sorted distinct label values).
    #[arg(long, value_delimiter = ',', conflicts_with = "regression")]
    pub labels: Option<Vec<String>>,
    /// The label is a real-valued score.
    #[arg(long)]
    pub regression: bool,
    /// Fraction of each class of train carved into validation when there is no --validation.
    #[arg(long, default_value_t = 0.1)]
    pub dev_fraction: f64,
    /// Fraction of each class of train carved into test when there is no --test.
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    /// Seed of the stratified split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory (default: $RECYCLE_HOME/datasets/<name>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace an existing dataset directory.
    #[arg(long)]
    pub force: bool,
    /// Where the data came from, recorded on the card.
    #[arg(long)]
    pub source: Option<String>,
    /// The data's license, recorded on the card.
    #[arg(long)]
    pub license: Option<String>,
    #[command(flatten)]
    pub home: HomeArgs,
}

pub fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Import(a) => import(*a),
        Command::List(a) => list(a),
        Command::Show(a) => show(a),
    }
}

fn import(a: ImportArgs) -> Result<ExitCode> {
    let name = match &a.name {
        Some(n) => n.clone(),
        None => a
            .train
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "cannot derive a name from {}: pass --name",
                    a.train.display()
                )
            })?,
    };
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("--name `{name}` is not a usable directory name");
    }
    let spec = ImportSpec {
        name: name.clone(),
        train: a.train.clone(),
        validation: a.validation.clone(),
        test: a.test.clone(),
        columns: ColumnMap {
            text: a.text.clone(),
            text_pair: a.text_pair.clone(),
            label: Some(a.label.clone()),
        },
        labels: if a.regression {
            LabelMode::Regression
        } else {
            LabelMode::Classification {
                labels: a.labels.clone(),
            }
        },
        dev_fraction: a.dev_fraction,
        test_fraction: a.test_fraction,
        seed: a.seed,
        source: a.source.clone(),
        license: a.license.clone(),
    };
    let out = match &a.out {
        Some(o) => o.clone(),
        None => assets::datasets_dir(&assets::home(a.home.home.as_deref())?).join(&name),
    };
    let draft = build(&spec).with_context(|| format!("importing dataset `{name}`"))?;
    let existing = if a.force {
        Existing::Replace
    } else {
        Existing::Fail
    };
    let card = write_dataset(&out, &draft, existing)
        .with_context(|| format!("writing dataset `{name}`"))?;
    println!("imported {} into {}", card.name, out.display());
    let ds = Dataset::load(&out)?;
    print_dataset(&ds);
    Ok(ExitCode::SUCCESS)
}

fn list(a: HomeArgs) -> Result<ExitCode> {
    let dir = assets::datasets_dir(&assets::home(a.home.as_deref())?);
    if !dir.is_dir() {
        println!(
            "no datasets in {} (run `recycle fetch` or `recycle data import`)",
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or(".")
                    .starts_with('.')
        })
        .collect();
    dirs.sort();
    for d in dirs {
        match crate::data::Card::read(&d) {
            Ok(card) => {
                let splits: Vec<String> = card
                    .splits
                    .iter()
                    .map(|s| format!("{} {}", s.name, s.rows))
                    .collect();
                println!(
                    "{:<20} {:<28} {}",
                    card.name,
                    task_summary(&card.task),
                    splits.join(", ")
                );
            }
            Err(e) => println!(
                "{:<20} unreadable: {e:#}",
                d.file_name().and_then(|n| n.to_str()).unwrap_or("?")
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show(a: ShowArgs) -> Result<ExitCode> {
    let as_dir = Path::new(&a.dataset);
    let dir = if as_dir.join(crate::data::card::CARD_FILE).is_file() {
        as_dir.to_path_buf()
    } else {
        assets::datasets_dir(&assets::home(a.home.home.as_deref())?).join(&a.dataset)
    };
    let ds = Dataset::load(&dir).with_context(|| format!("dataset `{}`", a.dataset))?;
    print_dataset(&ds);
    Ok(ExitCode::SUCCESS)
}

fn task_summary(task: &Task) -> String {
    match task {
        Task::Classification { labels } => format!("classification ({} labels)", labels.len()),
        Task::Regression => "regression".into(),
    }
}

fn print_dataset(ds: &Dataset) {
    let c = &ds.card;
    println!("name:        {}", c.name);
    println!("dir:         {}", ds.dir.display());
    println!("task:        {}", task_summary(&c.task));
    println!("source:      {}", c.source);
    println!("license:     {}", c.license);
    if let Some(s) = &c.split_seed {
        let carved: Vec<String> = s.carved.iter().map(|(n, f)| format!("{n} {f}")).collect();
        println!(
            "split seed:  {} (carved from {}: {})",
            s.seed,
            s.from,
            carved.join(", ")
        );
    }
    println!("fingerprint: {}", ds.fingerprint());
    for name in ds.split_names() {
        let rows = ds.split(name).unwrap_or(&[]);
        let counts: Vec<String> = label_counts(&c.task, rows)
            .iter()
            .map(|(l, n)| format!("{l} {n}"))
            .collect();
        println!(
            "  {name:<11} {:>7} rows   {}",
            rows.len(),
            counts.join(", ")
        );
    }
}
