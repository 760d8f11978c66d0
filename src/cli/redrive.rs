//! `triage redrive`: send dead letters back to the topics they came from.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use triage::config::{ClientRole, Config};
use triage::kafka_tools;

use super::{progress_bar, Progress};

#[derive(Args)]
pub struct RedriveArgs {
    #[arg(long, short, env = "TRIAGE_CONFIG")]
    config: PathBuf,
    /// Only dead letters with this reason (e.g. clickhouse_rejected). Each reason keeps its own
    /// position, so letters of other reasons are never skipped.
    #[arg(long)]
    reason: Option<String>,
    /// Stop after sending this many letters back (redrive in slices; the next run goes on from there).
    #[arg(long)]
    max: Option<u64>,
}

pub fn run(args: RedriveArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    // The worker's client settings ([kafka.properties], SASL/TLS) in redrive's own group.
    let consumer: rdkafka::consumer::BaseConsumer = config.kafka.client(ClientRole::Redrive { reason: args.reason.clone() }).create()?;
    let producer: rdkafka::producer::FutureProducer = config.kafka.client(ClientRole::Producer).create()?;
    let bar = progress_bar(Progress::Items("dead letters"), None);
    let report =
        kafka_tools::redrive(&consumer, &producer, &config.kafka.dead_letter_topic, args.reason.as_deref(), args.max, |n| bar.inc(n))?;
    bar.finish_and_clear();
    eprintln!("{report}");
    Ok(())
}
