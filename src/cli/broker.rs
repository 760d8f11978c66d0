//! `triage broker`: librdkafka's mock cluster for development (the real protocol over TCP).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use triage::local::LocalKafka;

#[derive(Args)]
pub struct BrokerArgs {
    #[arg(long, default_value_t = 1)]
    brokers: i32,
    /// Topics to create, as NAME or NAME:PARTITIONS.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Also write the bootstrap address to this file.
    #[arg(long)]
    address_file: Option<PathBuf>,
}

pub async fn run(args: BrokerArgs) -> Result<()> {
    let kafka = LocalKafka::start(args.brokers)?;
    for spec in &args.topics {
        let (name, partitions) = match spec.split_once(':') {
            Some((n, p)) => (n, p.parse::<i32>().with_context(|| format!("partitions in `{spec}`"))?),
            None => (spec.as_str(), 1),
        };
        kafka.create_topic(name, partitions)?;
    }
    let address = kafka.bootstrap_servers();
    if let Some(file) = &args.address_file {
        std::fs::write(file, &address).with_context(|| format!("writing {}", file.display()))?;
    }
    // librdkafka's mock cluster binds its own ports: the address differs per start.
    println!("{address}");
    eprintln!("mock Kafka cluster at {address} ({} broker(s)); Ctrl-C stops it", args.brokers);
    super::termination().await;
    Ok(())
}
