//! `triage schema print|apply|wait`: the ClickHouse results table and its views, on one server
//! or a cluster (`[clickhouse] cluster`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use triage::config::{ClickHouseConfig, Config};
use triage::sink::clickhouse::ClickHouseService;

#[derive(Subcommand)]
pub enum SchemaAction {
    /// Print the DDL for the configured database and table.
    Print {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: Option<PathBuf>,
        /// Print the cluster layout for this cluster (replicated local tables, a Distributed
        /// table, everything ON CLUSTER), whatever the config says.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Create the database, table and views, and add columns a newer release needs (idempotent).
    Apply {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: PathBuf,
        /// Keep retrying while ClickHouse is not reachable, this long (a Job may start first).
        #[arg(long, default_value_t = 0)]
        wait_seconds: u64,
    },
    /// Move a results table made by an earlier release onto the `row_version` version column
    /// (needed by `triage escalate`: an LLM's answer must outrank replays). One server; run it
    /// with the workers stopped or not (rows written meanwhile are copied again).
    Migrate {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: PathBuf,
    },
    /// Wait until the table exists with every column the worker needs (an init container's job).
    Wait {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: PathBuf,
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
    },
}

pub async fn run(action: SchemaAction) -> Result<()> {
    match action {
        SchemaAction::Print { config, cluster } => {
            let mut clickhouse = match config {
                Some(path) => Config::load(&path)?.clickhouse,
                None => ClickHouseConfig::default(),
            };
            if cluster.is_some() {
                clickhouse.cluster = cluster;
                clickhouse.validate().map_err(anyhow::Error::msg)?;
            }
            print!("{}", triage::sink::clickhouse::schema::script(&clickhouse));
        }
        SchemaAction::Apply { config, wait_seconds } => {
            let config = Config::load(&config)?;
            ClickHouseService::new(&config.clickhouse)
                .apply_schema_waiting(Duration::from_secs(wait_seconds))
                .await
                .with_context(|| format!("applying the schema at {}", config.clickhouse.url))?;
            let on = config.clickhouse.cluster.as_deref().map(|c| format!(" on cluster {c}")).unwrap_or_default();
            eprintln!("schema applied{on}: {}.{} and its views", config.clickhouse.database, config.clickhouse.table);
        }
        SchemaAction::Migrate { config } => {
            let config = Config::load(&config)?;
            let service = ClickHouseService::new(&config.clickhouse);
            let target = format!("{}.{}", config.clickhouse.database, config.clickhouse.table);
            let moved = service
                .migrate_version(|step| eprintln!("[migrate] {step}"))
                .await
                .with_context(|| format!("migrating {target} at {}", config.clickhouse.url))?;
            if moved {
                eprintln!("{target} now keeps the highest-ranked answer per message (row_version)");
            } else {
                eprintln!("{target} already uses row_version: nothing to do");
            }
        }
        SchemaAction::Wait { config, timeout_seconds } => {
            let config = Config::load(&config)?;
            let service = ClickHouseService::new(&config.clickhouse);
            if let Err(reason) = service.wait_until_ready(Duration::from_secs(timeout_seconds)).await {
                bail!("the ClickHouse schema was not ready after {timeout_seconds}s: {reason} (has the schema Job run? `triage schema apply`)");
            }
            eprintln!("schema ready: {}.{}", config.clickhouse.database, config.clickhouse.table);
        }
    }
    Ok(())
}
