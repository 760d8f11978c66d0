//! Talking to ClickHouse: schema checks and INSERTs with retry and rejection isolation.
//!
//! Errors are sorted three ways. Transient (network, timeouts, overload codes): retried with
//! backoff until they pass. Fatal (unknown table/database/column, authentication, a schema that
//! does not match the row): the worker stops with the message, since every row would fail.
//! Anything else is a rejection of the block's content: the block is split in halves until the
//! rows ClickHouse rejects are isolated (they are dead-lettered by the caller); if every row of
//! a multi-row block is rejected on its own, it is not the rows' fault: fatal.

use std::sync::Arc;

use clickhouse::Client;

use super::config::ClickHouseConfig;
use super::row::{ResultRow, COLUMNS};
use super::schema;
use crate::retry::Backoff;
use crate::telemetry::events::{BlockInserted, BlockSplit, Counters, InsertRetried, InternalEvent, RowsRejected};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("ClickHouse cannot store any result ({0}), so the worker stops instead of dead-lettering every message. Check that the table exists with the columns `triage schema print` shows (`triage schema apply` creates it) and that the user may insert")]
    Fatal(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Transient,
    Fatal,
    Content,
}

/// ClickHouse exception codes.
const FATAL_CODES: &[u32] = &[
    8,   // THERE_IS_NO_COLUMN
    16,  // NO_SUCH_COLUMN_IN_TABLE
    47,  // UNKNOWN_IDENTIFIER
    60,  // UNKNOWN_TABLE
    81,  // UNKNOWN_DATABASE
    115, // UNKNOWN_SETTING
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];
const TRANSIENT_CODES: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE (connection cut mid-body)
    159, // TIMEOUT_EXCEEDED
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY (replica lost ZooKeeper session)
    252, // TOO_MANY_PARTS
    319, // UNKNOWN_STATUS_OF_INSERT
    425, // SYSTEM_ERROR
];

fn exception_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn classify(error: &clickhouse::error::Error) -> ErrorKind {
    use clickhouse::error::Error as E;
    match error {
        E::BadResponse(message) => match exception_code(message) {
            Some(code) if FATAL_CODES.contains(&code) => ErrorKind::Fatal,
            Some(code) if TRANSIENT_CODES.contains(&code) => ErrorKind::Transient,
            Some(_) => ErrorKind::Content,
            // An error page without a ClickHouse code: a proxy or load balancer.
            None => ErrorKind::Transient,
        },
        E::Network(_) | E::TimedOut => ErrorKind::Transient,
        _ => ErrorKind::Fatal,
    }
}

pub struct ClickHouseService {
    client: Client,
    config: ClickHouseConfig,
    backoff: Backoff,
    counters: Arc<Counters>,
}

impl ClickHouseService {
    pub fn new(config: &ClickHouseConfig) -> Self {
        Self::with_counters(config, Arc::default())
    }

    /// A service whose inserts, retries and rejections count in `counters` (a run's report).
    pub fn with_counters(config: &ClickHouseConfig, counters: Arc<Counters>) -> Self {
        let mut client = Client::default()
            .with_url(&config.url)
            .with_user(&config.user)
            .with_database(&config.database)
            // ClickHouse 18.x lacks RowBinaryWithNamesAndTypes; row/DDL agreement is tested instead.
            .with_validation(false);
        if !config.password.expose().is_empty() {
            client = client.with_password(config.password.expose());
        }
        for (k, v) in &config.settings {
            client = client.with_setting(k, v);
        }
        let backoff =
            Backoff::new(std::time::Duration::from_millis(config.retry_initial_ms), std::time::Duration::from_millis(config.retry_max_ms));
        ClickHouseService { client, config: config.clone(), backoff, counters }
    }

    /// Create the database, table and views, and add columns newer than the table
    /// (idempotent).
    pub async fn apply_schema(&self) -> Result<(), clickhouse::error::Error> {
        let admin = self.client.clone().with_database("default");
        let statements = schema::statements(&self.config);
        let (table, views) = statements.split_at(2);
        for stmt in table {
            admin.query(stmt).execute().await?;
        }
        let existing: Vec<String> = admin
            .query("SELECT name FROM system.columns WHERE database = ? AND table = ?")
            .bind(&self.config.database)
            .bind(&self.config.table)
            .fetch_all()
            .await?;
        for name in schema::ADDED_COLUMNS.iter().filter(|n| !existing.iter().any(|e| e == *n)) {
            if let Some(sql) = schema::add_column(&self.config, name) {
                tracing::info!(column = name, "adding a column to an existing results table");
                admin.query(&sql).execute().await?;
            }
        }
        for stmt in views {
            admin.query(stmt).execute().await?;
        }
        Ok(())
    }

    /// Wait (with backoff, logging each attempt) until the server answers and the table has
    /// every column the row needs. A missing table or column is returned at once: waiting
    /// would not fix it.
    pub async fn wait_for_schema(&self) -> Result<(), SinkError> {
        let mut attempt = 0;
        loop {
            match self.check_schema().await {
                Ok(()) => return Ok(()),
                Err(Err(fatal)) => return Err(fatal),
                Err(Ok(transient)) => {
                    attempt += 1;
                    let delay = self.backoff.delay(attempt);
                    tracing::warn!(error = %transient, url = %self.config.url, retry_in_ms = delay.as_millis() as u64, "ClickHouse not reachable yet");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Whether the server answers at all.
    pub async fn ping(&self) -> Result<(), clickhouse::error::Error> {
        self.client.query("SELECT 1").fetch_one::<u8>().await.map(|_| ())
    }

    /// Check that the table has every column of the row with its type. Transient errors are
    /// returned as `Err(Ok(..))` so the caller can wait for the server.
    pub async fn check_schema(&self) -> Result<(), Result<clickhouse::error::Error, SinkError>> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Columns {
            names: Vec<String>,
            types: Vec<String>,
        }
        let Columns { names, types } = self
            .client
            .query("SELECT groupArray(name) AS names, groupArray(type) AS types FROM system.columns WHERE database = ? AND table = ?")
            .bind(&self.config.database)
            .bind(&self.config.table)
            .fetch_one()
            .await
            .map_err(|e| if classify(&e) == ErrorKind::Transient { Ok(e) } else { Err(SinkError::Fatal(e.to_string())) })?;
        let target = format!("{}.{}", self.config.database, self.config.table);
        if names.is_empty() {
            return Err(Err(SinkError::Fatal(format!("table {target} does not exist"))));
        }
        for (column, ty, _) in COLUMNS {
            match names.iter().position(|n| n == column) {
                None => return Err(Err(SinkError::Fatal(format!("table {target} has no column `{column}`")))),
                Some(i) => {
                    let found = types[i].strip_prefix("LowCardinality(").and_then(|t| t.strip_suffix(')')).unwrap_or(&types[i]);
                    if found != *ty {
                        return Err(Err(SinkError::Fatal(format!("column {target}.{column} is {}, expected {ty}", types[i]))));
                    }
                }
            }
        }
        Ok(())
    }

    async fn insert_once(&self, rows: &[ResultRow]) -> Result<(), clickhouse::error::Error> {
        let timeout = std::time::Duration::from_millis(self.config.insert_timeout_ms);
        let mut insert = self.client.insert::<ResultRow>(&self.config.table).await?.with_timeouts(Some(timeout), Some(timeout));
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await
    }

    /// Insert with retries; returns the rows ClickHouse rejected for their content (index in
    /// `rows`, sorted, with ClickHouse's error). Returns only when every row is either stored or
    /// isolated as rejected.
    pub async fn insert(&self, rows: &[ResultRow]) -> Result<Vec<(usize, String)>, SinkError> {
        let mut rejected = Vec::new();
        // Blocks still to insert: (start, end) ranges of `rows`.
        let mut todo = vec![(0, rows.len())];
        while let Some((start, end)) = todo.pop() {
            if start == end {
                continue;
            }
            let started = std::time::Instant::now();
            match self.insert_retrying(&rows[start..end]).await? {
                None => BlockInserted { rows: end - start, elapsed: started.elapsed() }.emit(&self.counters),
                Some(error) if end - start == 1 => rejected.push((start, error)),
                Some(error) => {
                    BlockSplit { rows: end - start, error: &error }.emit(&self.counters);
                    let mid = start + (end - start) / 2;
                    todo.push((mid, end));
                    todo.push((start, mid));
                }
            }
        }
        if rows.len() > 1 && rejected.len() == rows.len() {
            return Err(SinkError::Fatal(format!("all {} rows of a block were rejected one by one", rows.len())));
        }
        RowsRejected { rows: rejected.len() }.emit(&self.counters);
        rejected.sort_unstable_by_key(|(index, _)| *index);
        Ok(rejected)
    }

    /// One block: Ok(None) stored, Ok(Some(e)) rejected for its content, Err fatal.
    async fn insert_retrying(&self, rows: &[ResultRow]) -> Result<Option<String>, SinkError> {
        let mut attempt = 0;
        loop {
            let error = match self.insert_once(rows).await {
                Ok(()) => return Ok(None),
                Err(e) => e,
            };
            match classify(&error) {
                ErrorKind::Fatal => return Err(SinkError::Fatal(error.to_string())),
                ErrorKind::Content => return Ok(Some(error.to_string())),
                ErrorKind::Transient => {
                    attempt += 1;
                    let delay = self.backoff.delay(attempt);
                    InsertRetried { rows: rows.len(), attempt, error: &error, delay }.emit(&self.counters);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_codes_are_parsed_and_sorted() {
        let e = |m: &str| clickhouse::error::Error::BadResponse(m.to_string());
        assert_eq!(exception_code("Code: 60, e.displayText() = DB::Exception: Table triage.results doesn't exist"), Some(60));
        assert_eq!(classify(&e("Code: 60. DB::Exception: Table x doesn't exist. (UNKNOWN_TABLE)")), ErrorKind::Fatal);
        assert_eq!(classify(&e("Code: 252, e.displayText() = DB::Exception: Too many parts")), ErrorKind::Transient);
        assert_eq!(classify(&e("Code: 395, e.displayText() = DB::Exception: poison row")), ErrorKind::Content);
        assert_eq!(classify(&e("<html>502 Bad Gateway</html>")), ErrorKind::Transient);
        assert_eq!(classify(&clickhouse::error::Error::TimedOut), ErrorKind::Transient);
    }
}
