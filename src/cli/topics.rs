//! `triage topics print|apply|wait`: the dead-letter and escalation topics triage writes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use triage::config::Config;
use triage::source::kafka::topics::{self, Applied};

#[derive(Subcommand)]
pub enum TopicsAction {
    /// Print the topics triage writes, with the partitions and replication `apply` would use.
    Print {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: PathBuf,
    },
    /// Create those that do not exist (idempotent; [kafka] side_topic_partitions / side_topic_replication).
    Apply {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: PathBuf,
        /// Keep retrying while Kafka is not reachable, this long.
        #[arg(long, default_value_t = 0)]
        wait_seconds: u64,
    },
    /// Wait until they all exist (an init container's job).
    Wait {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: PathBuf,
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
    },
}

pub async fn run(action: TopicsAction) -> Result<()> {
    match action {
        TopicsAction::Print { config } => {
            let config = Config::load(&config)?;
            for t in topics::side_topics(&config.kafka, config.escalation.enabled) {
                println!("{}\tpartitions={}\treplication={}", t.name, t.partitions, t.replication);
            }
        }
        TopicsAction::Apply { config, wait_seconds } => {
            let config = Config::load(&config)?;
            let wanted = topics::side_topics(&config.kafka, config.escalation.enabled);
            for (name, applied) in topics::apply(&config.kafka, &wanted, Duration::from_secs(wait_seconds)).await? {
                eprintln!("{name}: {}", if applied == Applied::Created { "created" } else { "exists" });
            }
        }
        TopicsAction::Wait { config, timeout_seconds } => {
            let config = Config::load(&config)?;
            let names: Vec<String> = topics::side_topics(&config.kafka, config.escalation.enabled).into_iter().map(|t| t.name).collect();
            topics::wait_until_exist(&config.kafka, &names, Duration::from_secs(timeout_seconds)).await?;
            eprintln!("topics ready: {}", names.join(", "));
        }
    }
    Ok(())
}
