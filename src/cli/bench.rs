//! `triage bench`: model ceiling vs the whole worker vs batch size 1 (and Avro, a shadow),
//! side by side, with ratios; `--sweep` tunes the ceiling instead.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use triage::bench::{BenchOptions, Workload};

use super::{BatchArgs, ModelArgs};

#[derive(Clone, Copy, ValueEnum)]
enum Workloads {
    Short,
    Tickets,
    Both,
}

impl Workloads {
    fn list(self) -> Vec<Workload> {
        match self {
            Workloads::Short => vec![Workload::Short],
            Workloads::Tickets => vec![Workload::Tickets],
            Workloads::Both => vec![Workload::Short, Workload::Tickets],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchFormat {
    Json,
    Avro,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Messages per workload (the backlog each worker run drains; default 10000, 1000 with --sweep).
    /// Fewer make the fixed tail (last insert, last commit) a visible share of stage b.
    #[arg(long)]
    messages: Option<usize>,
    /// Which workloads.
    #[arg(long, value_enum, default_value = "both")]
    workload: Workloads,
    /// The datasets folder (banking77/, support-tickets/); generated texts when absent.
    #[arg(long, default_value = "../shared/data")]
    data: PathBuf,
    /// Batch size of the ceiling run (default: the best of 8, 16, 32, 64 on a sample).
    #[arg(long)]
    ceiling_batch_size: Option<usize>,
    /// Tune the ceiling instead: batch size, threads vs sessions, optimisation level, truncation,
    /// tokenization overlap, --variant directories, GFLOP/s and share of peak; latency at low load.
    #[arg(long)]
    sweep: bool,
    /// With --sweep: another model or encoder directory to compare (repeatable).
    #[arg(long = "variant")]
    variants: Vec<PathBuf>,
    /// With --sweep: the CPU's peak fp32 GFLOP/s (default: estimated from /proc/cpuinfo).
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// Also run the worker on the same messages written as raw Avro (stage d, read through a
    /// pinned schema): the ratio d/b is what decoding Avro instead of JSON costs the worker.
    #[arg(long, value_enum, default_value = "json")]
    format: BenchFormat,
    /// Also run the worker with a shadow model classifying this share of the messages (stage
    /// e): the ratio e/b is what the shadow costs the route's model.
    #[arg(long)]
    shadow_share: Option<f64>,
    /// With --shadow-share: the shadow's model directory (default: the model itself).
    #[arg(long, requires = "shadow_share")]
    shadow_model: Option<PathBuf>,
    /// The worker's batching and threads (stage b; stage c changes only max_batch_size).
    #[command(flatten)]
    batch: BatchArgs,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let workloads = args.workload.list();
    if args.sweep {
        let options = triage::bench::sweep::SweepOptions {
            model_dir: args.model.dir()?,
            shared_data: args.data.clone(),
            messages: args.messages.unwrap_or(1000),
            workloads,
            variants: args.variants.clone(),
            inference: args.model.inference(),
            batching: args.batch.engine(),
            peak_gflops: args.peak_gflops,
        };
        let report = tokio::task::spawn_blocking(move || triage::bench::sweep::run(&options, |step| eprintln!("[sweep] {step}"))).await??;
        println!("{}", triage::bench::sweep::render(&report));
        return Ok(());
    }
    let options = BenchOptions {
        model_dir: args.model.dir()?,
        shared_data: args.data.clone(),
        messages: args.messages.unwrap_or(10_000),
        workloads,
        inference: args.model.inference(),
        batching: args.batch.engine(),
        ceiling_batch_size: args.ceiling_batch_size,
        avro: args.format == BenchFormat::Avro,
        shadow: args.shadow_share.map(|share| (args.shadow_model.clone(), share)),
    };
    let results = triage::bench::run(options, |step| eprintln!("[bench] {step}")).await?;
    println!("{}", triage::bench::render(&results));
    Ok(())
}
