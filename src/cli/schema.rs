//! `triage schema print|apply`: the ClickHouse results table and its views.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use triage::config::{ClickHouseConfig, Config};
use triage::sink::clickhouse::ClickHouseService;

#[derive(Subcommand)]
pub enum SchemaAction {
    /// Print the DDL for the configured database and table.
    Print {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Create the database, table and views (idempotent).
    Apply {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: PathBuf,
    },
}

pub async fn run(action: SchemaAction) -> Result<()> {
    match action {
        SchemaAction::Print { config } => {
            let clickhouse = match config {
                Some(path) => Config::load(&path)?.clickhouse,
                None => ClickHouseConfig::default(),
            };
            print!("{}", triage::sink::clickhouse::schema::script(&clickhouse));
        }
        SchemaAction::Apply { config } => {
            let config = Config::load(&config)?;
            ClickHouseService::new(&config.clickhouse)
                .apply_schema()
                .await
                .with_context(|| format!("applying the schema at {}", config.clickhouse.url))?;
            eprintln!("schema applied: {}.{} and its views", config.clickhouse.database, config.clickhouse.table);
        }
    }
    Ok(())
}
