//! `triage produce`: load JSON lines (or a CSV with a header row) into a topic.

use std::io::BufRead;

use anyhow::Result;
use clap::Args;
use triage::config::{ClientRole, KafkaConfig};
use triage::kafka_tools;

use super::{open_input, progress_bar, Progress};

#[derive(Args)]
pub struct ProduceArgs {
    #[arg(long, env = "TRIAGE_KAFKA__BOOTSTRAP_SERVERS", default_value = "localhost:9092")]
    bootstrap_servers: String,
    #[arg(long)]
    topic: String,
    /// Messages per second at most (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// The input is a CSV with a header row (default: by the file extension).
    #[arg(long)]
    csv: bool,
    /// JSON lines or CSV ("-" for stdin).
    file: String,
}

pub async fn run(args: ProduceArgs) -> Result<()> {
    let kafka = KafkaConfig { bootstrap_servers: args.bootstrap_servers.clone(), ..Default::default() };
    let producer: rdkafka::producer::FutureProducer = kafka.client(ClientRole::Producer).create()?;
    let is_csv = args.csv || args.file.ends_with(".csv");
    // A JSON-lines file's messages are its lines: count them first for the bar's total.
    let total = match (is_csv, args.file.as_str()) {
        (false, name) if name != "-" => Some(open_input(name)?.reader.split(b'\n').count() as u64),
        _ => None,
    };
    let input = open_input(&args.file)?;
    let bar = progress_bar(Progress::Items("messages"), total);
    let records: Box<dyn Iterator<Item = _>> =
        if is_csv { Box::new(kafka_tools::read_csv(input.reader)) } else { Box::new(kafka_tools::read_json_lines(input.reader)) };
    let (sent, skipped) = kafka_tools::produce(&producer, &args.topic, records, args.rate, |n| bar.inc(n)).await?;
    bar.finish_and_clear();
    for s in &skipped {
        eprintln!("skipped: {s}");
    }
    eprintln!("produced {sent} messages to {} ({} skipped)", args.topic, skipped.len());
    Ok(())
}
