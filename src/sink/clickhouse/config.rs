//! `[clickhouse]`: where results are stored and how INSERTs are paced and retried.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint, e.g. http://clickhouse:8123 or https://xyz.clickhouse.cloud:8443.
    pub url: String,
    pub database: String,
    pub table: String,
    pub user: String,
    pub password: Secret,
    pub password_file: Option<PathBuf>,
    /// Rows per INSERT at most.
    pub insert_max_rows: usize,
    /// Longest a row waits before its INSERT starts (milliseconds).
    pub insert_interval_ms: u64,
    /// An INSERT that has not finished after this long is abandoned and retried (milliseconds).
    pub insert_timeout_ms: u64,
    /// Retry backoff: first delay, cap (milliseconds); jittered.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Use LowCardinality(String) for low-cardinality columns in the DDL (ClickHouse >= 19;
    /// 18.x needs allow_experimental_low_cardinality_type).
    pub low_cardinality: bool,
    /// A cluster name from the servers' remote_servers: `schema apply` then creates replicated
    /// local tables, a Distributed table named `table` over them and the views, all ON CLUSTER,
    /// and INSERTs into `table` use insert_distributed_sync = 1.
    pub cluster: Option<String>,
    /// Extra settings sent with every INSERT (e.g. async_insert = "0" on modern servers).
    pub settings: BTreeMap<String, String>,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://localhost:8123".into(),
            database: "triage".into(),
            table: "results".into(),
            user: "default".into(),
            password: Secret::default(),
            password_file: None,
            insert_max_rows: 10_000,
            insert_interval_ms: 1_000,
            insert_timeout_ms: 30_000,
            retry_initial_ms: 200,
            retry_max_ms: 30_000,
            low_cardinality: false,
            cluster: None,
            settings: BTreeMap::new(),
        }
    }
}

impl ClickHouseConfig {
    /// Where shadow models' answers go: `<table>_shadow`, same columns and key.
    pub fn shadow(&self) -> ClickHouseConfig {
        ClickHouseConfig { table: format!("{}_shadow", self.table), ..self.clone() }
    }

    /// Everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("clickhouse.url must start with http:// or https:// (got `{}`)", self.url));
        }
        for (what, name) in [("database", &self.database), ("table", &self.table)] {
            if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                return Err(format!("clickhouse.{what} `{name}` must be letters, digits and _"));
            }
        }
        if let Some(cluster) = &self.cluster {
            if cluster.is_empty() || cluster.contains(['\'', '`', ';', ' ']) {
                return Err(format!("clickhouse.cluster `{cluster}` must be a cluster name from remote_servers"));
            }
        }
        if self.insert_max_rows == 0 || self.retry_initial_ms == 0 || self.retry_max_ms < self.retry_initial_ms {
            return Err("clickhouse.insert_max_rows and retry_initial_ms must be positive, retry_max_ms >= retry_initial_ms".into());
        }
        Ok(())
    }
}
