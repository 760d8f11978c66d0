//! Talking to ClickHouse: schema checks and INSERTs with retry and rejection isolation.
//!
//! Errors are sorted by exception code and, where one code means two things, by text:
//! - Content: an allow-list of codes that mean "this row's values" (parse, conversion, type,
//!   range, `throwIf`'s 395, constraints). The block is split in halves until the rows at fault
//!   are isolated; those are dead-lettered by the caller.
//! - Too many partitions for one INSERT (252 with that text, modern servers): the block is split
//!   (blocks are grouped by partition first, so only a server with a lower limit sees this).
//! - Fatal (unknown table/database/column, authentication, read-only, unknown setting): every
//!   row would fail, so the worker stops with the message, at start or at any later time.
//! - Everything else, known or not (too many parts, disk full, Keeper/ZooKeeper, a replica away
//!   such as 279, cancelled queries, timeouts, network, a proxy's error page): retried with
//!   backoff until it passes, never dead-lettered.
//!
//! If every row of a block is rejected on its own, the table is checked again: a changed
//! column stops the worker; otherwise the rows really are bad and are dead-lettered.

use std::collections::BTreeMap;
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
    TooManyPartitions,
}

/// ClickHouse exception codes after which nothing will ever be stored.
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
    194, // REQUIRED_PASSWORD
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// The settings every query carries: the configured ones, and for a cluster
/// `insert_distributed_sync = 1` unless configured otherwise, because an INSERT into a
/// Distributed table is then acknowledged only once every shard stored its rows, and triage
/// commits offsets on that acknowledgement.
fn client_settings(config: &ClickHouseConfig) -> BTreeMap<String, String> {
    let mut settings = config.settings.clone();
    if config.cluster.is_some() {
        settings.entry("insert_distributed_sync".into()).or_insert_with(|| "1".into());
    }
    settings
}

/// Codes that blame the inserted values: the only errors that can dead-letter a row.
const CONTENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF (RowBinary out of step with the columns)
    33,  // CANNOT_READ_ALL_DATA (likewise)
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    190, // SIZES_OF_ARRAYS_DOESNT_MATCH
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    407, // DECIMAL_OVERFLOW
    469, // VIOLATED_CONSTRAINT
];

/// 252 is TOO_MANY_PARTS (wait: merges catch up) and, on modern servers, also "Too many
/// partitions for single INSERT block" (split the block).
const TOO_MANY_PARTS_OR_PARTITIONS: u32 = 252;

fn exception_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn classify(error: &clickhouse::error::Error) -> ErrorKind {
    use clickhouse::error::Error as E;
    match error {
        E::BadResponse(message) => match exception_code(message) {
            Some(code) if FATAL_CODES.contains(&code) => ErrorKind::Fatal,
            Some(code) if CONTENT_CODES.contains(&code) => ErrorKind::Content,
            Some(TOO_MANY_PARTS_OR_PARTITIONS) if message.to_ascii_lowercase().contains("too many partitions") => {
                ErrorKind::TooManyPartitions
            }
            // Server state (parts, disk, Keeper, replicas, memory, cancelled), unknown codes, and
            // error pages without a code (a proxy): waiting can fix them, dead-lettering cannot.
            _ => ErrorKind::Transient,
        },
        E::Network(_) | E::TimedOut => ErrorKind::Transient,
        _ => ErrorKind::Fatal,
    }
}

/// Why ClickHouse refused a block as it is.
enum Rejection {
    /// A row's values (isolated by splitting, then dead-lettered).
    Content(String),
    /// The block spans more partitions than the server takes in one INSERT (split it).
    TooManyPartitions(String),
}

/// What to do with a block ClickHouse refused, by the kind of refusal and the block's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnRefusal {
    Stop,
    /// Split the block (a row's content, to isolate it; too many partitions, to fit).
    Split,
    /// Wait and send the same block again.
    Retry,
}

fn on_refusal(kind: ErrorKind, rows: usize) -> OnRefusal {
    match kind {
        ErrorKind::Fatal => OnRefusal::Stop,
        ErrorKind::Content => OnRefusal::Split,
        ErrorKind::TooManyPartitions if rows > 1 => OnRefusal::Split,
        // One row is one partition: this cannot be its fault, wait like for any state.
        ErrorKind::Transient | ErrorKind::TooManyPartitions => OnRefusal::Retry,
    }
}

/// An LLM's answer as stored: the message's key and its labels.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Deserialize)]
pub struct LlmAnswer {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub head_names: Vec<String>,
    pub head_labels: Vec<String>,
    pub tags: Vec<String>,
    pub answered_by: String,
}

/// One LLM call in the spend ledger.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct SpendEntry {
    pub time: u32,
    pub time_ms: u64,
    /// This process (a restarted one is another instance: its predecessor's spend counts).
    pub instance: String,
    pub worker_id: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
}

/// A row of the Batch API record (`<table>_llm_batches`).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct BatchEntry {
    pub time: u32,
    pub batch_id: String,
    pub custom_id: String,
    /// `submitted` (a request in the batch) or `collected` (its answers taken; no custom_id).
    pub state: String,
}

/// How many messages a shadow model and the route's model got right against a later answer
/// (an LLM's or a person's), per judge and reference label (`triage eval --shadow`).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Deserialize)]
pub struct ShadowCount {
    pub topic: String,
    pub primary_model: String,
    pub primary_version: String,
    pub shadow_model: String,
    pub shadow_version: String,
    /// `llm` or `person`: who gave the reference answer.
    pub judge: String,
    /// The reference answer's category.
    pub label: String,
    pub primary_right: u8,
    pub shadow_right: u8,
    pub messages: u64,
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
        for (k, v) in client_settings(config) {
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
        // The results table, and its twin for shadow models' answers.
        for config in [self.config.clone(), self.config.shadow()] {
            self.apply_table(&admin, &config).await?;
        }
        for stmt in schema::ledger_statements(&self.config).into_iter().chain(schema::batches_statements(&self.config)) {
            admin.query(&stmt).execute().await?;
        }
        for (_, stmt) in schema::views(&self.config) {
            admin.query(&stmt).execute().await?;
        }
        Ok(())
    }

    /// One results table (and its Distributed table on a cluster), made or brought up to date.
    async fn apply_table(&self, admin: &Client, config: &ClickHouseConfig) -> Result<(), clickhouse::error::Error> {
        for stmt in schema::table_statements(config) {
            admin.query(&stmt).execute().await?;
        }
        let columns_of = |table: String| {
            let admin = admin.clone();
            let database = config.database.clone();
            async move {
                admin
                    .query("SELECT name FROM system.columns WHERE database = ? AND table = ?")
                    .bind(database)
                    .bind(table)
                    .fetch_all::<String>()
                    .await
            }
        };
        let stored = columns_of(schema::storage_table(config)).await?;
        let missing: Vec<&str> = schema::ADDED_COLUMNS.iter().copied().filter(|n| !stored.iter().any(|e| e == n)).collect();
        if let Some(sql) = schema::add_columns(config, &missing) {
            tracing::info!(columns = ?missing, "adding columns to an existing results table");
            admin.query(&sql).execute().await?;
        }
        if config.cluster.is_some() {
            let distributed = columns_of(config.table.clone()).await?;
            if schema::ADDED_COLUMNS.iter().any(|n| !distributed.iter().any(|e| e == *n)) {
                tracing::info!(table = %config.table, "making the Distributed table again over the new columns");
                for sql in schema::recreate_distributed(config) {
                    admin.query(&sql).execute().await?;
                }
            }
        }
        Ok(())
    }

    /// The version column of the table that stores rows (`row_version` for tables made by
    /// this release; `processed_time_ms` for older ones until `triage schema migrate`).
    pub async fn version_column(&self) -> Result<Option<String>, clickhouse::error::Error> {
        let sql = format!("SHOW CREATE TABLE {}.{}", self.config.database, schema::storage_table(&self.config));
        let statement = self.client.query(&sql).fetch_one::<String>().await?;
        Ok(schema::version_column_of(&statement))
    }

    /// Whether the table holds an LLM's answer for this row's message (asked through the
    /// primary key: day, topic, partition, offset; no FINAL needed to know one exists).
    pub async fn has_llm_answer(&self, row: &ResultRow) -> Result<bool, clickhouse::error::Error> {
        let sql = format!(
            "SELECT toUInt64(count()) FROM {}.{} WHERE toDate(event_time) = toDate(toDateTime(?)) AND topic = ? AND partition = ? AND offset = ? AND answered_by LIKE 'llm:%'",
            self.config.database, self.config.table
        );
        let n =
            self.client.query(&sql).bind(row.event_time).bind(&row.topic).bind(row.partition).bind(row.offset).fetch_one::<u64>().await?;
        Ok(n > 0)
    }

    /// Every message's current answer where an LLM gave it (`triage escalate --export-labels`).
    pub async fn llm_answers(&self) -> Result<Vec<LlmAnswer>, clickhouse::error::Error> {
        let sql = format!(
            "SELECT topic, partition, offset, head_names, head_labels, tags, answered_by FROM {}.{} FINAL WHERE answered_by LIKE 'llm:%'",
            self.config.database, self.config.table
        );
        self.client.query(&sql).fetch_all::<LlmAnswer>().await
    }

    /// Append calls to the spend ledger.
    pub async fn record_spend(&self, entries: &[SpendEntry]) -> Result<(), clickhouse::error::Error> {
        // The client's database is the configured one; the crate quotes the name as one identifier.
        let mut insert = self.client.insert::<SpendEntry>(&schema::ledger_table(&self.config)).await?;
        for e in entries {
            insert.write(e).await?;
        }
        insert.end().await
    }

    pub async fn record_batch(&self, entries: &[BatchEntry]) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.client.insert::<BatchEntry>(&schema::batches_table(&self.config)).await?;
        for e in entries {
            insert.write(e).await?;
        }
        insert.end().await
    }

    /// (batch id, custom id) of every request submitted since `since` (unix seconds) in a batch
    /// whose answers were not yet collected.
    pub async fn pending_batches(&self, since: u32) -> Result<Vec<(String, String)>, clickhouse::error::Error> {
        let table = format!("{}.{}", self.config.database, schema::batches_table(&self.config));
        let sql = format!(
            "SELECT batch_id, custom_id FROM {table} WHERE state = 'submitted' AND time >= toDateTime(?) \
             AND batch_id NOT IN (SELECT batch_id FROM {table} WHERE state = 'collected' AND time >= toDateTime(?)) \
             ORDER BY batch_id, custom_id"
        );
        self.client.query(&sql).bind(since).bind(since).fetch_all::<(String, String)>().await
    }

    /// What instances other than `instance` spent since `since_ms` (unix ms).
    pub async fn spent_elsewhere(&self, instance: &str, since_ms: u64) -> Result<f64, clickhouse::error::Error> {
        let sql = format!(
            "SELECT toFloat64(sum(cost)) FROM {}.{} WHERE time >= toDateTime(?) AND time_ms >= ? AND instance != ?",
            self.config.database,
            schema::ledger_table(&self.config)
        );
        self.client.query(&sql).bind((since_ms / 1000) as u32).bind(since_ms).bind(instance).fetch_one::<f64>().await
    }

    /// Shadow and primary answers scored against the answer that replaced the primary's
    /// (`answered_by` an LLM or a person; the small model's own answer is then in
    /// `slm_category`), for messages whose event time is at or after `since` (unix seconds),
    /// on `topic` ("" for every topic). Both tables read with FINAL: a replay counts once, and
    /// a person's answer outranks an LLM's. Runs on ClickHouse 18.16 and modern servers.
    pub async fn shadow_counts(&self, since: u32, topic: &str) -> Result<Vec<ShadowCount>, clickhouse::error::Error> {
        let primary = format!("{}.{}", self.config.database, self.config.table);
        let shadow = format!("{}.{}", self.config.database, self.config.shadow().table);
        let sql = format!(
            "SELECT topic, primary_model, primary_version, shadow_model, shadow_version, judge, label, \
                    toUInt8(primary_label = label) AS primary_right, toUInt8(shadow_label = label) AS shadow_right, \
                    toUInt64(count()) AS messages \
             FROM ( \
                 SELECT topic, partition, offset, model_name AS primary_model, model_version AS primary_version, \
                        if(answered_by LIKE 'person:%', 'person', 'llm') AS judge, category AS label, slm_category AS primary_label \
                 FROM {primary} FINAL \
                 WHERE (answered_by LIKE 'llm:%' OR answered_by LIKE 'person:%') AND slm_category != '' \
                   AND event_time >= toDateTime(?) AND (? = '' OR topic = ?) \
             ) AS answered \
             ALL INNER JOIN ( \
                 SELECT topic, partition, offset, model_name AS shadow_model, model_version AS shadow_version, category AS shadow_label \
                 FROM {shadow} FINAL \
                 WHERE event_time >= toDateTime(?) AND (? = '' OR topic = ?) \
             ) AS shadowed USING (topic, partition, offset) \
             GROUP BY topic, primary_model, primary_version, shadow_model, shadow_version, judge, label, primary_right, shadow_right \
             ORDER BY topic, shadow_model, shadow_version, judge, label"
        );
        self.client.query(&sql).bind(since).bind(topic).bind(topic).bind(since).bind(topic).bind(topic).fetch_all::<ShadowCount>().await
    }

    /// Move a table made before `row_version` onto it ([`schema::migration`]), reporting each
    /// step. Ok(false): nothing to do.
    pub async fn migrate_version(&self, progress: impl Fn(&str)) -> Result<bool, SinkError> {
        let fatal = |e: clickhouse::error::Error| SinkError::Fatal(e.to_string());
        self.apply_schema().await.map_err(fatal)?;
        if self.version_column().await.map_err(fatal)?.as_deref() == Some(schema::VERSION_COLUMN) {
            return Ok(false);
        }
        // Rows a worker hands over while the copy runs are copied again after the swap; a
        // minute's margin covers clocks that disagree between hosts (extra copies collapse).
        let since_ms = crate::time::now_ms().saturating_sub(60_000);
        let steps = schema::migration(&self.config, since_ms).map_err(SinkError::Fatal)?;
        let admin = self.client.clone().with_database("default");
        let count = |table: String| {
            let admin = admin.clone();
            let sql = format!("SELECT toUInt64(count()) FROM {}.{table}", self.config.database);
            async move { admin.query(&sql).fetch_one::<u64>().await }
        };
        let before = count(self.config.table.clone()).await.map_err(fatal)?;
        for (i, sql) in steps.iter().enumerate() {
            let first_line = sql.lines().next().unwrap_or_default();
            progress(&format!("step {}/{}: {}", i + 1, steps.len(), crate::sink::kafka::cut_at_char(first_line, 110)));
            admin.query(sql).execute().await.map_err(fatal)?;
        }
        let (_, kept) = schema::migration_tables(&self.config);
        let after = count(self.config.table.clone()).await.map_err(fatal)?;
        progress(&format!("{before} rows before, {after} now (before merging duplicates); the old table is kept as {kept}"));
        Ok(true)
    }

    /// [`apply_schema`](Self::apply_schema), retrying while the server is not reachable yet
    /// (a schema Job may start before ClickHouse), up to `wait`.
    pub async fn apply_schema_waiting(&self, wait: std::time::Duration) -> Result<(), clickhouse::error::Error> {
        let deadline = std::time::Instant::now() + wait;
        let mut attempt = 0;
        loop {
            match self.apply_schema().await {
                Err(e) if classify(&e) == ErrorKind::Transient && std::time::Instant::now() < deadline => {
                    attempt += 1;
                    let delay = self.backoff.delay(attempt);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "ClickHouse not ready for the schema yet");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// Wait until the table exists with every column the row needs, whatever the reason it
    /// does not yet (server down, schema Job still running), up to `wait`; then the last
    /// reason. For an init container: the worker starts only once it can store rows.
    pub async fn wait_until_ready(&self, wait: std::time::Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + wait;
        let mut attempt = 0;
        loop {
            let reason = match self.check_schema().await {
                Ok(()) => return Ok(()),
                Err(Ok(transient)) => transient.to_string(),
                Err(Err(missing)) => missing.to_string(),
            };
            if std::time::Instant::now() >= deadline {
                return Err(reason);
            }
            attempt += 1;
            let delay = self.backoff.delay(attempt).min(std::time::Duration::from_secs(10));
            tracing::info!(reason = %reason, retry_in_ms = delay.as_millis() as u64, "waiting for the ClickHouse schema");
            tokio::time::sleep(delay).await;
        }
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
        self.within_timeout(self.client.query("SELECT 1").fetch_one::<u8>()).await.map(|_| ())
    }

    /// A query bounded by `insert_timeout_ms`: a server that accepts connections but never
    /// answers (frozen, a stuck proxy) is an error to wait out and log, not a silent hang.
    async fn within_timeout<T>(
        &self,
        query: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, clickhouse::error::Error> {
        let timeout = std::time::Duration::from_millis(self.config.insert_timeout_ms);
        tokio::time::timeout(timeout, query).await.unwrap_or(Err(clickhouse::error::Error::TimedOut))
    }

    /// Check that the table has every column of the row with its type. Transient errors are
    /// returned as `Err(Ok(..))` so the caller can wait for the server.
    pub async fn check_schema(&self) -> Result<(), Result<clickhouse::error::Error, SinkError>> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Columns {
            names: Vec<String>,
            types: Vec<String>,
        }
        let query = self
            .client
            .query("SELECT groupArray(name) AS names, groupArray(type) AS types FROM system.columns WHERE database = ? AND table = ?")
            .bind(&self.config.database)
            .bind(&self.config.table)
            .fetch_one();
        let Columns { names, types } = self.within_timeout(query).await.map_err(|e| {
            if classify(&e) == ErrorKind::Transient {
                Ok(e)
            } else {
                Err(SinkError::Fatal(e.to_string()))
            }
        })?;
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
                Some(Rejection::Content(error)) if end - start == 1 => rejected.push((start, error)),
                Some(Rejection::Content(error) | Rejection::TooManyPartitions(error)) => {
                    BlockSplit { rows: end - start, error: &error }.emit(&self.counters);
                    let mid = start + (end - start) / 2;
                    todo.push((mid, end));
                    todo.push((start, mid));
                }
            }
        }
        if !rejected.is_empty() {
            // Before anything is dead-lettered: has the table changed under us? A changed column
            // type makes rows unreadable, but not always all of them (a misaligned RowBinary row
            // can still parse), so any rejection is checked against the table, once per block.
            // If it changed, stop (dead-lettering would empty the stream into the dead-letter
            // topic); if not, the rows really are bad.
            match self.check_schema().await {
                Ok(()) => tracing::warn!(
                    rejected = rejected.len(),
                    rows = rows.len(),
                    "ClickHouse rejected rows, and the table is as expected: dead-lettering them"
                ),
                Err(Err(fatal)) => return Err(fatal),
                Err(Ok(transient)) => {
                    return Err(SinkError::Fatal(format!("ClickHouse rejected rows and the table could not be checked ({transient})")))
                }
            }
        }
        RowsRejected { rows: rejected.len() }.emit(&self.counters);
        rejected.sort_unstable_by_key(|(index, _)| *index);
        Ok(rejected)
    }

    /// One block: Ok(None) stored, Ok(Some(_)) refused as it is (split it), Err fatal.
    async fn insert_retrying(&self, rows: &[ResultRow]) -> Result<Option<Rejection>, SinkError> {
        let mut attempt = 0;
        loop {
            let error = match self.insert_once(rows).await {
                Ok(()) => return Ok(None),
                Err(e) => e,
            };
            let kind = classify(&error);
            match on_refusal(kind, rows.len()) {
                OnRefusal::Stop => return Err(SinkError::Fatal(error.to_string())),
                OnRefusal::Split if kind == ErrorKind::Content => return Ok(Some(Rejection::Content(error.to_string()))),
                OnRefusal::Split => return Ok(Some(Rejection::TooManyPartitions(error.to_string()))),
                OnRefusal::Retry => {
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
    fn a_cluster_inserts_synchronously_unless_told_otherwise_and_a_single_server_gets_only_its_settings() {
        let single = ClickHouseConfig { settings: [("async_insert".to_string(), "0".to_string())].into(), ..Default::default() };
        assert_eq!(client_settings(&single), single.settings, "no distributed setting without a cluster");
        let cluster = ClickHouseConfig { cluster: Some("c".into()), ..single.clone() };
        let settings = client_settings(&cluster);
        assert_eq!(settings.get("insert_distributed_sync").map(String::as_str), Some("1"));
        assert_eq!(settings.get("async_insert").map(String::as_str), Some("0"));
        let mut told = cluster.clone();
        told.settings.insert("insert_distributed_sync".into(), "0".into());
        assert_eq!(client_settings(&told).get("insert_distributed_sync").map(String::as_str), Some("0"), "the user's value wins");
    }

    /// A refused block is split to find a bad row or to fit the partition limit, and a block
    /// of one row over the partition limit is waited for (it cannot be its fault), never split
    /// into nothing or dead-lettered.
    #[test]
    fn refused_blocks_are_split_retried_or_stop_the_sink_by_kind_and_size() {
        use OnRefusal::*;
        for rows in [1, 2, 10] {
            assert_eq!(on_refusal(ErrorKind::Fatal, rows), Stop);
            assert_eq!(on_refusal(ErrorKind::Content, rows), Split, "a bad row is isolated down to itself");
            assert_eq!(on_refusal(ErrorKind::Transient, rows), Retry);
        }
        assert_eq!(on_refusal(ErrorKind::TooManyPartitions, 2), Split);
        assert_eq!(on_refusal(ErrorKind::TooManyPartitions, 500), Split);
        assert_eq!(on_refusal(ErrorKind::TooManyPartitions, 1), Retry);
    }

    #[test]
    fn exception_codes_are_parsed_and_sorted() {
        let e = |m: &str| clickhouse::error::Error::BadResponse(m.to_string());
        assert_eq!(exception_code("Code: 60, e.displayText() = DB::Exception: Table triage.results doesn't exist"), Some(60));
        assert_eq!(classify(&e("Code: 60. DB::Exception: Table x doesn't exist. (UNKNOWN_TABLE)")), ErrorKind::Fatal);
        assert_eq!(
            classify(&e(
                "Code: 252, e.displayText() = DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts"
            )),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(&e("Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). (TOO_MANY_PARTS)")),
            ErrorKind::TooManyPartitions
        );
        assert_eq!(classify(&e("Code: 395, e.displayText() = DB::Exception: poison row")), ErrorKind::Content);
        assert_eq!(
            classify(&e("Code: 27. DB::Exception: Cannot parse input: expected ',' (CANNOT_PARSE_INPUT_ASSERTION_FAILED)")),
            ErrorKind::Content
        );
        assert_eq!(classify(&e("<html>502 Bad Gateway</html>")), ErrorKind::Transient);
        assert_eq!(classify(&clickhouse::error::Error::TimedOut), ErrorKind::Transient);
        // Server state is never the rows' fault: retried, never dead-lettered.
        for state in [
            "Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space. (NOT_ENOUGH_SPACE)",
            "Code: 279. DB::Exception: All connection tries failed. (ALL_CONNECTION_TRIES_FAILED)",
            "Code: 999. Coordination::Exception: Connection loss. (KEEPER_EXCEPTION)",
            "Code: 225. DB::Exception: ZooKeeper session has been expired. (NO_ZOOKEEPER)",
            "Code: 394. DB::Exception: Query was cancelled. (QUERY_WAS_CANCELLED)",
            "Code: 241. DB::Exception: Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)",
            "Code: 1002. DB::Exception: some code nobody has seen yet",
        ] {
            assert_eq!(classify(&e(state)), ErrorKind::Transient, "{state}");
        }
        for fatal in
            ["Code: 516. DB::Exception: default: Authentication failed", "Code: 16. DB::Exception: No such column ood_score in table"]
        {
            assert_eq!(classify(&e(fatal)), ErrorKind::Fatal, "{fatal}");
        }
    }
}
