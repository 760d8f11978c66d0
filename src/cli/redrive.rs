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
    /// Only dead letters with this reason (e.g. clickhouse_rejected).
    #[arg(long)]
    reason: Option<String>,
}

pub fn run(args: RedriveArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    // The worker's client settings ([kafka.properties], SASL/TLS) in redrive's own group.
    let consumer: rdkafka::consumer::BaseConsumer = config.kafka.client(ClientRole::Redrive).create()?;
    let producer: rdkafka::producer::FutureProducer = config.kafka.client(ClientRole::Producer).create()?;
    let bar = progress_bar(Progress::Items("dead letters"), None);
    let (redriven, skipped) =
        kafka_tools::redrive(&consumer, &producer, &config.kafka.dead_letter_topic, args.reason.as_deref(), |n| bar.inc(n))?;
    bar.finish_and_clear();
    eprintln!("redrove {redriven} dead letters to their source topics ({skipped} left: other reasons or no source header)");
    Ok(())
}
