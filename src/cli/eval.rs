//! `triage eval`: score a model directory on labelled data, beside a TF-IDF baseline.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use triage::train::{cascade, eval, Columns};

use super::{model_dir, BatchArgs, RuntimeArgs, StageProgress};

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long, env = "TRIAGE_MODEL")]
    model: Option<PathBuf>,
    /// Labelled data (CSV or JSON lines).
    #[arg(long)]
    data: PathBuf,
    /// Score every row (a separate test file) instead of the model's validation split.
    #[arg(long)]
    all: bool,
    /// Text columns (default: the model's [training] record).
    #[arg(long, value_delimiter = ',')]
    text: Vec<String>,
    /// HEAD=COLUMN label columns (default: the model's [training] record).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Evaluate a cascade instead: model directories, first tier first (e.g. models/fast,models/accurate),
    /// trained on the same data and split; reports accuracy, share answered per tier and messages/s of the
    /// cascade vs each tier alone.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["model", "all"])]
    cascade: Vec<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    batch: BatchArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if !args.cascade.is_empty() {
        let options = eval::EvalOptions {
            model: args.cascade[0].clone(),
            data: args.data.clone(),
            all: false,
            columns: None,
            inference: args.runtime.options(),
            engine: args.batch.engine(),
        };
        let report = cascade::evaluate_cascade(&args.cascade, &args.data, &options, &StageProgress::new())?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", cascade::render(&report));
        }
        return Ok(());
    }
    let columns = if args.text.is_empty() && args.labels.is_empty() { None } else { Some(Columns::parse(&args.text, &args.labels, &[])?) };
    let options = eval::EvalOptions {
        model: model_dir(&args.model)?,
        data: args.data,
        all: args.all,
        columns,
        inference: args.runtime.options(),
        engine: args.batch.engine(),
    };
    let report = eval::evaluate(&options, &StageProgress::new())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", eval::render(&report));
    }
    Ok(())
}
