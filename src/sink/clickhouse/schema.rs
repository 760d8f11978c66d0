//! The results table and the analytics views, as SQL that runs on ClickHouse 18.16 and on
//! modern servers (23.x-25.x).
//!
//! Replays must not double-count: the table is a ReplacingMergeTree whose ORDER BY ends with
//! (topic, partition, offset) and whose PARTITION BY uses the Kafka message timestamp (the
//! same on every replay), so a replayed message's rows collapse into one. Until merges run,
//! duplicates may be visible: read with FINAL (as every view here does) or with argMax.

use super::config::ClickHouseConfig;
use super::row::COLUMNS;

pub fn create_database(c: &ClickHouseConfig) -> String {
    format!("CREATE DATABASE IF NOT EXISTS {}", c.database)
}

pub fn create_table(c: &ClickHouseConfig) -> String {
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|(name, ty, low)| {
            let ty = if *low && c.low_cardinality { format!("LowCardinality({ty})") } else { ty.to_string() };
            format!("    `{name}` {ty}")
        })
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{table}\n(\n{cols}\n)\nENGINE = ReplacingMergeTree(processed_time_ms)\n\
         PARTITION BY toYYYYMM(event_time)\nORDER BY (toDate(event_time), topic, partition, offset)",
        db = c.database,
        table = c.table,
        cols = columns.join(",\n"),
    )
}

/// Analytics views. Plain views over `FINAL`, never materialized views: a materialized view
/// sees inserted blocks, so it would count a replayed message twice.
pub fn views(c: &ClickHouseConfig) -> Vec<(String, String)> {
    let (db, t) = (&c.database, &c.table);
    vec![
        (
            format!("{t}_hourly"),
            format!(
                "CREATE VIEW IF NOT EXISTS {db}.{t}_hourly AS\nSELECT toStartOfHour(event_time) AS hour, kind, category, priority,\n       \
                 count() AS messages, sum(escalated) AS escalations, avg(confidence) AS mean_confidence\n\
                 FROM {db}.{t} FINAL\nGROUP BY hour, kind, category, priority"
            ),
        ),
        (
            format!("{t}_escalation_rate"),
            format!(
                "CREATE VIEW IF NOT EXISTS {db}.{t}_escalation_rate AS\nSELECT toDate(event_time) AS day, kind, model_name, model_version,\n       \
                 count() AS messages, sum(escalated) AS escalations, sum(escalated) / count() AS escalation_rate\n\
                 FROM {db}.{t} FINAL\nGROUP BY day, kind, model_name, model_version"
            ),
        ),
        (
            format!("{t}_confidence_by_model"),
            format!(
                "CREATE VIEW IF NOT EXISTS {db}.{t}_confidence_by_model AS\nSELECT toDate(event_time) AS day, model_name, model_version, category,\n       \
                 count() AS messages, avg(confidence) AS mean_confidence,\n       \
                 quantile(0.1)(confidence) AS p10_confidence, quantile(0.5)(confidence) AS median_confidence\n\
                 FROM {db}.{t} FINAL\nGROUP BY day, model_name, model_version, category"
            ),
        ),
    ]
}

/// Columns added after the first release: `triage schema apply` adds those a table created
/// earlier lacks. (18.16 has no `ADD COLUMN IF NOT EXISTS`, so apply checks system.columns.)
pub const ADDED_COLUMNS: &[&str] = &["ood_score", "redriven"];

pub fn add_column(c: &ClickHouseConfig, name: &str) -> Option<String> {
    let (_, ty, _) = COLUMNS.iter().find(|(n, _, _)| *n == name)?;
    Some(format!("ALTER TABLE {}.{} ADD COLUMN `{name}` {ty}", c.database, c.table))
}

/// Every statement, in the order `triage schema apply` runs them (plus any `add_column`
/// between the table and the views).
pub fn statements(c: &ClickHouseConfig) -> Vec<String> {
    let mut out = vec![create_database(c), create_table(c)];
    out.extend(views(c).into_iter().map(|(_, sql)| sql));
    out
}

/// The whole schema as one script (`triage schema print`).
pub fn script(c: &ClickHouseConfig) -> String {
    let mut s = String::from(
        "-- triage results schema. Read each message once: SELECT ... FROM <table> FINAL, or\n\
         -- argMax(column, processed_time_ms) grouped by (topic, partition, offset).\n",
    );
    for stmt in statements(c) {
        s.push_str(&stmt);
        s.push_str(";\n\n");
    }
    s.push_str("-- Upgrading a table created by an earlier release (`triage schema apply` does this itself):\n");
    for name in ADDED_COLUMNS {
        if let Some(sql) = add_column(c, name) {
            s.push_str(&format!("-- {sql};\n"));
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
        assert!(sql.contains("ReplacingMergeTree(processed_time_ms)"));
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
}
