//! The results table and the analytics views, as SQL that runs on ClickHouse 18.16 and on
//! modern servers (23.x-25.x).
//!
//! Replays must not double-count: the table is a ReplacingMergeTree whose ORDER BY ends with
//! (topic, partition, offset) and whose PARTITION BY uses the Kafka message timestamp (the
//! same on every replay), so a replayed message's rows collapse into one. Until merges run,
//! duplicates may be visible: read with FINAL (as every view here does) or with argMax.
//!
//! The version is `row_version`: the answer's rank (small model, LLM, person) before its time,
//! so an LLM's answer written by `triage escalate` stays the row `FINAL` returns even when the
//! small model's row is replayed later. Tables made before it used `processed_time_ms`: a
//! ReplacingMergeTree's version cannot be altered, so [`migration`] copies such a table into
//! one made anew (`triage schema migrate`).

use super::config::ClickHouseConfig;
use super::row::COLUMNS;

fn on_cluster(c: &ClickHouseConfig) -> String {
    c.cluster.as_deref().map(|name| format!(" ON CLUSTER '{name}'")).unwrap_or_default()
}

/// The table that stores rows: the results table itself, or on a cluster each replica's
/// `<table>_local` under the Distributed `<table>`.
pub fn storage_table(c: &ClickHouseConfig) -> String {
    match c.cluster {
        Some(_) => format!("{}_local", c.table),
        None => c.table.clone(),
    }
}

pub fn create_database(c: &ClickHouseConfig) -> String {
    format!("CREATE DATABASE IF NOT EXISTS {}{}", c.database, on_cluster(c))
}

/// The ReplacingMergeTree version column of tables made by this release.
pub const VERSION_COLUMN: &str = "row_version";

pub fn create_table(c: &ClickHouseConfig) -> String {
    create_table_named(c, &storage_table(c))
}

fn create_table_named(c: &ClickHouseConfig, local: &str) -> String {
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|(name, ty, low)| {
            let ty = if *low && c.low_cardinality { format!("LowCardinality({ty})") } else { ty.to_string() };
            format!("    `{name}` {ty}")
        })
        .collect();
    let engine = match c.cluster {
        // {shard} and {replica} are the servers' macros; the ZooKeeper path names the table.
        Some(_) => format!(
            "ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{db}/{local}', '{{replica}}', {VERSION_COLUMN})",
            db = c.database
        ),
        None => format!("ReplacingMergeTree({VERSION_COLUMN})"),
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{local}{on}\n(\n{cols}\n)\nENGINE = {engine}\n\
         PARTITION BY toYYYYMM(event_time)\nORDER BY (toDate(event_time), topic, partition, offset)",
        db = c.database,
        on = on_cluster(c),
        cols = columns.join(",\n"),
    )
}

/// On a cluster: the Distributed table over the replicas' local tables, sharded by the dedup
/// key, so a replayed (or redriven) message lands on its first copy's shard and FINAL, applied
/// per shard, still reads it once.
pub fn create_distributed(c: &ClickHouseConfig) -> Option<String> {
    let cluster = c.cluster.as_deref()?;
    Some(format!(
        "CREATE TABLE IF NOT EXISTS {db}.{t}{on} AS {db}.{local}\nENGINE = Distributed('{cluster}', {db}, {local}, cityHash64(topic, partition, offset))",
        db = c.database,
        t = c.table,
        on = on_cluster(c),
        local = storage_table(c),
    ))
}

/// Analytics views. Plain views over `FINAL`, never materialized views: a materialized view
/// sees inserted blocks, so it would count a replayed message twice.
pub fn views(c: &ClickHouseConfig) -> Vec<(String, String)> {
    let (db, t, on) = (&c.database, &c.table, on_cluster(c));
    vec![
        (
            format!("{t}_hourly"),
            format!(
                "CREATE VIEW IF NOT EXISTS {db}.{t}_hourly{on} AS\nSELECT toStartOfHour(event_time) AS hour, kind, category, priority,\n       \
                 count() AS messages, sum(escalated) AS escalations, avg(confidence) AS mean_confidence\n\
                 FROM {db}.{t} FINAL\nGROUP BY hour, kind, category, priority"
            ),
        ),
        (
            format!("{t}_escalation_rate"),
            format!(
                "CREATE VIEW IF NOT EXISTS {db}.{t}_escalation_rate{on} AS\nSELECT toDate(event_time) AS day, kind, model_name, model_version,\n       \
                 count() AS messages, sum(escalated) AS escalations, sum(escalated) / count() AS escalation_rate\n\
                 FROM {db}.{t} FINAL\nGROUP BY day, kind, model_name, model_version"
            ),
        ),
        (
            format!("{t}_confidence_by_model"),
            format!(
                "CREATE VIEW IF NOT EXISTS {db}.{t}_confidence_by_model{on} AS\nSELECT toDate(event_time) AS day, model_name, model_version, category,\n       \
                 count() AS messages, avg(confidence) AS mean_confidence,\n       \
                 quantile(0.1)(confidence) AS p10_confidence, quantile(0.5)(confidence) AS median_confidence\n\
                 FROM {db}.{t} FINAL\nGROUP BY day, model_name, model_version, category"
            ),
        ),
    ]
}

/// Columns added after the first release: `triage schema apply` adds those a table created
/// earlier lacks. (18.16 has no `ADD COLUMN IF NOT EXISTS`, so apply checks system.columns.)
pub const ADDED_COLUMNS: &[&str] = &[
    "ood_score",
    "redriven",
    "tier",
    "first_model_name",
    "first_category",
    "first_confidence",
    "answered_by",
    "row_version",
    "slm_category",
    "slm_confidence",
    "slm_priority",
    "slm_tags",
    "llm_prompt_tokens",
    "llm_completion_tokens",
    "llm_latency_ms",
];

/// The version column of a ReplacingMergeTree, read from its `SHOW CREATE TABLE` (the same
/// text on 18.16 and modern servers): the engine's last argument.
pub fn version_column_of(create_statement: &str) -> Option<String> {
    let start = create_statement.find("ReplacingMergeTree(")? + "ReplacingMergeTree(".len();
    let args = &create_statement[start..start + create_statement[start..].find(')')?];
    let last = args.rsplit(',').next()?.trim().trim_matches('`');
    (!last.is_empty() && !last.starts_with('\'')).then(|| last.to_string())
}

/// Where a table being migrated is built, and where the old one is kept afterwards.
pub fn migration_tables(c: &ClickHouseConfig) -> (String, String) {
    (format!("{}__migrating", c.table), format!("{}_before_row_version", c.table))
}

/// Copy rows of `from` into `to` (both in the results database), every column named, the
/// version computed for rows the old table never versioned. `since_ms`: only rows processed
/// from then on (the second pass, for rows written while the first ran).
pub fn copy_rows(c: &ClickHouseConfig, from: &str, to: &str, since_ms: Option<u64>) -> String {
    let names: Vec<String> = COLUMNS.iter().map(|(n, _, _)| format!("`{n}`")).collect();
    let select: Vec<String> = COLUMNS
        .iter()
        .map(|(n, _, _)| match *n {
            // By position, not by alias: an alias named like the column it reads is a cycle.
            VERSION_COLUMN => format!("if(`{VERSION_COLUMN}` = 0, processed_time_ms, `{VERSION_COLUMN}`)"),
            other => format!("`{other}`"),
        })
        .collect();
    let filter = since_ms.map(|ms| format!(" WHERE processed_time_ms >= {ms}")).unwrap_or_default();
    format!(
        "INSERT INTO {db}.{to} ({names}) SELECT {select} FROM {db}.{from}{filter}",
        db = c.database,
        names = names.join(", "),
        select = select.join(", ")
    )
}

/// The statements of a migration to `row_version` on one server, in order: a new table, every
/// row copied, the two swapped by one RENAME (views read by name, so they follow), then the
/// rows written during the copy copied again (duplicates collapse: same key, same version).
/// The old table is kept under [`migration_tables`]' second name, to drop once checked.
pub fn migration(c: &ClickHouseConfig, since_ms: u64) -> Result<Vec<String>, String> {
    if c.cluster.is_some() {
        return Err("a cluster's replicated tables are migrated by hand (see deploy/clickhouse/README.md): \
                    `triage schema migrate` handles one server"
            .into());
    }
    let (building, kept) = migration_tables(c);
    Ok(vec![
        format!("DROP TABLE IF EXISTS {}.{building}", c.database),
        create_table_named(c, &building),
        copy_rows(c, &c.table, &building, None),
        format!("RENAME TABLE {db}.{t} TO {db}.{kept}, {db}.{building} TO {db}.{t}", db = c.database, t = c.table),
        copy_rows(c, &kept, &c.table, Some(since_ms)),
    ])
}

/// One `ALTER TABLE ... ADD COLUMN a T, ADD COLUMN b U, ...` for the added columns `names`
/// (in row order: each lands at the end, where the row has it), on the table that stores rows
/// (ON CLUSTER for a cluster's replicated local tables). One statement, so a cluster runs one
/// distributed DDL task, not one per column. None when `names` is empty or unknown.
pub fn add_columns(c: &ClickHouseConfig, names: &[&str]) -> Option<String> {
    let actions: Vec<String> = names
        .iter()
        .map(|name| COLUMNS.iter().find(|(n, _, _)| n == name).map(|(_, ty, _)| format!("ADD COLUMN `{name}` {ty}")))
        .collect::<Option<_>>()?;
    if actions.is_empty() {
        return None;
    }
    Some(format!("ALTER TABLE {}.{}{} {}", c.database, storage_table(c), on_cluster(c), actions.join(", ")))
}

/// On a cluster, the Distributed table takes new columns by being made again: 18.16 refuses
/// `ALTER ... ON CLUSTER` on a table that is not replicated when the shards use
/// internal_replication (code 371). It holds no rows (triage inserts synchronously), so
/// dropping it loses nothing; an INSERT in the instant between fails, and is retried by the
/// worker's restart.
pub fn recreate_distributed(c: &ClickHouseConfig) -> Vec<String> {
    let Some(create) = create_distributed(c) else { return Vec::new() };
    vec![format!("DROP TABLE IF EXISTS {}.{}{}", c.database, c.table, on_cluster(c)), create]
}

/// The statements that create storage (database, table, and on a cluster the Distributed
/// table), in order; the views come after any added columns.
pub fn table_statements(c: &ClickHouseConfig) -> Vec<String> {
    let mut out = vec![create_database(c), create_table(c)];
    out.extend(create_distributed(c));
    out
}

/// `triage escalate`'s spend ledger: a row per LLM call with what it cost, so replicas (and a
/// restarted process) share one hourly cap. Plain MergeTree, a day per partition (drop old
/// days, or the TTL in `ttl.sql` on modern servers); on a cluster, replicated and read through
/// a Distributed table.
pub fn ledger_table(c: &ClickHouseConfig) -> String {
    format!("{}_llm_spend", c.table)
}

pub fn ledger_statements(c: &ClickHouseConfig) -> Vec<String> {
    side_table(
        c,
        &ledger_table(c),
        "    `time` DateTime,\n    `time_ms` UInt64,\n    `instance` String,\n    `worker_id` String,\n    `model` String,\n    \
         `prompt_tokens` UInt64,\n    `completion_tokens` UInt64,\n    `cost` Float64",
        "time",
    )
}

/// `triage escalate`'s Batch API record: a row per request submitted in a batch (`submitted`)
/// and one per batch whose answers were collected (`collected`, empty custom_id), so a
/// restarted process waits for its batches instead of sending their requests again.
pub fn batches_table(c: &ClickHouseConfig) -> String {
    format!("{}_llm_batches", c.table)
}

pub fn batches_statements(c: &ClickHouseConfig) -> Vec<String> {
    side_table(
        c,
        &batches_table(c),
        "    `time` DateTime,\n    `batch_id` String,\n    `custom_id` String,\n    `state` String",
        "(batch_id, custom_id)",
    )
}

/// A small MergeTree beside the results (a day per partition), replicated and read through a
/// Distributed table on a cluster.
fn side_table(c: &ClickHouseConfig, table: &str, columns: &str, order_by: &str) -> Vec<String> {
    let local = match c.cluster {
        Some(_) => format!("{table}_local"),
        None => table.to_string(),
    };
    let engine = match c.cluster {
        Some(_) => format!("ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{db}/{local}', '{{replica}}')", db = c.database),
        None => "MergeTree()".to_string(),
    };
    let mut out = vec![format!(
        "CREATE TABLE IF NOT EXISTS {db}.{local}{on}\n(\n{columns}\n)\nENGINE = {engine}\nPARTITION BY toYYYYMMDD(time)\nORDER BY {order_by}",
        db = c.database,
        on = on_cluster(c),
    )];
    if let Some(cluster) = c.cluster.as_deref() {
        out.push(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{table}{on} AS {db}.{local}\nENGINE = Distributed('{cluster}', {db}, {local}, rand())",
            db = c.database,
            on = on_cluster(c),
        ));
    }
    out
}

/// Every statement, in the order `triage schema apply` runs them (plus any `add_columns`
/// between the tables and the views).
pub fn statements(c: &ClickHouseConfig) -> Vec<String> {
    let mut out = table_statements(c);
    // Shadow models' answers: the same columns and key in their own table.
    let shadow = c.shadow();
    out.push(create_table(&shadow));
    out.extend(create_distributed(&shadow));
    out.extend(ledger_statements(c));
    out.extend(batches_statements(c));
    out.extend(views(c).into_iter().map(|(_, sql)| sql));
    out
}

pub fn script(c: &ClickHouseConfig) -> String {
    let mut s = String::from(
        "-- triage results schema. Read each message once: SELECT ... FROM <table> FINAL, or\n\
         -- argMax(column, row_version) grouped by (topic, partition, offset).\n",
    );
    if let Some(cluster) = &c.cluster {
        s.push_str(&format!(
            "-- Cluster layout (`triage schema print --cluster '{cluster}'`): a ReplicatedReplacingMergeTree\n\
             -- `{local}` on every replica, the Distributed `{t}` over them, sharded by the dedup key.\n\
             -- Needs ZooKeeper / ClickHouse Keeper, the {{shard}} and {{replica}} macros, and `{cluster}` in\n\
             -- remote_servers. triage inserts into `{t}` with insert_distributed_sync = 1 (set for you),\n\
             -- so an acknowledged INSERT is stored on its shard.\n",
            local = storage_table(c),
            t = c.table,
        ));
    }
    for stmt in statements(c) {
        s.push_str(&stmt);
        s.push_str(";\n\n");
    }
    s.push_str("-- Upgrading a table created by an earlier release (`triage schema apply` does this itself):\n");
    s.push_str("-- (the columns it lacks, from the first it lacks on, in this order)\n");
    if let Some(sql) = add_columns(c, ADDED_COLUMNS) {
        s.push_str(&format!("-- {sql};\n"));
    }
    let recreate = recreate_distributed(c);
    if !recreate.is_empty() {
        s.push_str("-- then the Distributed table, made again over the new columns (18.16 cannot ALTER it ON CLUSTER):\n");
        for sql in recreate {
            s.push_str(&format!("-- {};\n", sql.replace('\n', " ")));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_key_ends_the_order_by_and_partitioning_is_replay_stable() {
        let sql = create_table(&ClickHouseConfig::default());
        assert!(sql.contains("ReplacingMergeTree(row_version)"));
        assert_eq!(version_column_of(&sql).as_deref(), Some("row_version"));
        assert!(sql.contains("ORDER BY (toDate(event_time), topic, partition, offset)"));
        assert!(sql.contains("PARTITION BY toYYYYMM(event_time)"), "event time, never processing time");
    }

    #[test]
    fn every_view_reads_final() {
        for (_, sql) in views(&ClickHouseConfig::default()) {
            assert!(sql.contains("FINAL"), "{sql}");
            assert!(!sql.contains("MATERIALIZED"), "{sql}");
        }
    }

    #[test]
    fn low_cardinality_is_opt_in() {
        let plain = create_table(&ClickHouseConfig::default());
        assert!(!plain.contains("LowCardinality"));
        let lc = create_table(&ClickHouseConfig { low_cardinality: true, ..ClickHouseConfig::default() });
        assert!(lc.contains("`category` LowCardinality(String)"));
    }

    #[test]
    fn the_cluster_layout_replicates_shards_by_the_dedup_key_and_runs_everywhere() {
        let c = ClickHouseConfig { cluster: Some("prod".into()), ..ClickHouseConfig::default() };
        let all = statements(&c);
        assert!(all.iter().all(|s| s.contains(" ON CLUSTER 'prod'")), "{all:#?}");
        let table = create_table(&c);
        assert!(table.contains("triage.results_local ON CLUSTER 'prod'"), "{table}");
        assert!(table.contains("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/triage/results_local', '{replica}', row_version)"));
        assert_eq!(version_column_of(&table).as_deref(), Some("row_version"));
        let distributed = create_distributed(&c).unwrap();
        assert!(distributed.contains("AS triage.results_local") && distributed.contains("cityHash64(topic, partition, offset)"));
        assert!(views(&c).iter().all(|(_, v)| v.contains("FROM triage.results FINAL")), "views read the Distributed table");
        assert_eq!(
            add_columns(&c, &["redriven", "tier"]).unwrap(),
            "ALTER TABLE triage.results_local ON CLUSTER 'prod' ADD COLUMN `redriven` UInt8, ADD COLUMN `tier` UInt8"
        );
        assert!(add_columns(&c, &[]).is_none() && add_columns(&c, &["no_such_column"]).is_none());
        let recreate = recreate_distributed(&c);
        assert_eq!(recreate[0], "DROP TABLE IF EXISTS triage.results ON CLUSTER 'prod'");
        assert!(recreate[1].starts_with("CREATE TABLE IF NOT EXISTS triage.results ON CLUSTER 'prod' AS triage.results_local"));
        assert_eq!(
            add_columns(&ClickHouseConfig::default(), &["redriven"]).unwrap(),
            "ALTER TABLE triage.results ADD COLUMN `redriven` UInt8"
        );
        assert!(recreate_distributed(&ClickHouseConfig::default()).is_empty());
        assert!(create_distributed(&ClickHouseConfig::default()).is_none());
    }

    #[test]
    fn the_version_column_is_read_from_either_servers_create_statement() {
        let old_1816 = "CREATE TABLE triage.results ( `topic` String) ENGINE = ReplacingMergeTree(processed_time_ms) PARTITION BY toYYYYMM(event_time) ORDER BY (toDate(event_time), topic, partition, offset) SETTINGS index_granularity = 8192";
        assert_eq!(version_column_of(old_1816).as_deref(), Some("processed_time_ms"));
        let replicated =
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/triage/results_local', '{replica}', row_version)";
        assert_eq!(version_column_of(replicated).as_deref(), Some("row_version"));
        assert_eq!(version_column_of("ENGINE = ReplacingMergeTree"), None, "no version: the last part wins, not ours");
        assert_eq!(version_column_of("ENGINE = ReplacingMergeTree()"), None);
        assert_eq!(version_column_of("ENGINE = MergeTree()"), None);
    }

    #[test]
    fn a_migration_copies_everything_swaps_in_one_rename_and_catches_up() {
        let c = ClickHouseConfig::default();
        let steps = migration(&c, 1_700_000_000_000).unwrap();
        assert!(steps[1].contains("triage.results__migrating") && steps[1].contains("ReplacingMergeTree(row_version)"));
        assert!(steps[2].starts_with("INSERT INTO triage.results__migrating (`topic`,"));
        assert!(steps[2].contains(", if(`row_version` = 0, processed_time_ms, `row_version`), "));
        assert_eq!(
            steps[3],
            "RENAME TABLE triage.results TO triage.results_before_row_version, triage.results__migrating TO triage.results"
        );
        assert!(steps[4].ends_with("FROM triage.results_before_row_version WHERE processed_time_ms >= 1700000000000"));
        assert!(migration(&ClickHouseConfig { cluster: Some("c".into()), ..c }, 0).is_err());
    }
}
