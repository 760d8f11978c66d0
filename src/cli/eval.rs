//! `triage eval`: score a model directory on labelled data, beside a TF-IDF baseline; or, with
//! `--shadow`, a route's shadow model on live traffic against the LLM's and people's answers.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use triage::train::{cascade, eval, shadow as shadow_eval, Columns};

use super::{model_dir, BatchArgs, RuntimeArgs, StageProgress};

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long, env = "TRIAGE_MODEL")]
    model: Option<PathBuf>,
    /// Labelled data (CSV or JSON lines).
    #[arg(long, required_unless_present = "shadow")]
    data: Option<PathBuf>,
    /// Score the routes' shadow models from ClickHouse instead: each shadow's answers against
    /// the answers that replaced the route model's (LLM or person), beside the route model's.
    #[arg(long, requires = "config", conflicts_with_all = ["model", "data", "cascade", "all"])]
    shadow: bool,
    /// The worker's configuration (its [clickhouse] section), for --shadow.
    #[arg(long, short, env = "TRIAGE_CONFIG")]
    config: Option<PathBuf>,
    /// With --shadow: only this topic.
    #[arg(long, requires = "shadow")]
    topic: Option<String>,
    /// With --shadow: messages whose event time is within this many days.
    #[arg(long, default_value_t = 30, requires = "shadow")]
    days: u32,
    /// With --shadow: per-label lines shown per shadow (all with --json).
    #[arg(long, default_value_t = 20, requires = "shadow")]
    labels_shown: usize,
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
    if args.shadow {
        return shadow(&args);
    }
    let data = args.data.clone().context("--data is required")?;
    if !args.cascade.is_empty() {
        let options = eval::EvalOptions {
            model: args.cascade[0].clone(),
            data: data.clone(),
            all: false,
            columns: None,
            inference: args.runtime.options(),
            engine: args.batch.engine(),
        };
        let report = cascade::evaluate_cascade(&args.cascade, &data, &options, &StageProgress::new())?;
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
        data,
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

fn shadow(args: &EvalArgs) -> Result<()> {
    let path = args.config.as_ref().context("--shadow needs --config")?;
    let config = triage::config::Config::load(path)?;
    let service = triage::sink::clickhouse::ClickHouseService::new(&config.clickhouse);
    let since = (triage::time::now_ms() / 1000).saturating_sub(u64::from(args.days) * 86_400);
    let since = u32::try_from(since).context("the window starts past 2106")?;
    let counts = super::runtime()?.block_on(service.shadow_counts(since, args.topic.as_deref().unwrap_or(""))).with_context(|| {
        format!("reading {}.{} and its shadow table at {}", config.clickhouse.database, config.clickhouse.table, config.clickhouse.url)
    })?;
    let reports = shadow_eval::summarize(&counts);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", shadow_eval::render(&reports, args.labels_shown));
    }
    Ok(())
}
