//! One ClickHouse row per classified message. Column order here IS the table's column order
//! (RowBinary without validation, needed for ClickHouse 18.x): `schema.rs` builds the DDL from
//! the same list, and a test keeps the two in step.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct ResultRow {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub message_id: String,
    pub kind: String,
    /// Kafka message timestamp, seconds (DateTime) and milliseconds (18.x has no DateTime64).
    pub event_time: u32,
    pub event_time_ms: u64,
    /// When the worker consumed the message, ms.
    pub consumed_time_ms: u64,
    /// When the row was handed to ClickHouse, ms (also the ReplacingMergeTree version).
    pub processed_time_ms: u64,
    pub model_name: String,
    pub model_version: String,
    pub category: String,
    pub confidence: f32,
    pub priority: String,
    pub tags: Vec<String>,
    pub tag_scores: Vec<f32>,
    /// Every single-label head: name, label, score (parallel arrays).
    pub head_names: Vec<String>,
    pub head_labels: Vec<String>,
    pub head_scores: Vec<f32>,
    pub escalated: u8,
    pub text_chars: u32,
    pub tokens: u32,
    pub truncated: u8,
    pub metadata_keys: Vec<String>,
    pub metadata_values: Vec<String>,
    pub worker_id: String,
    /// Out-of-distribution score (models with a gate; NULL otherwise). Last, so tables
    /// created before it get it by `ALTER TABLE ... ADD COLUMN` (`triage schema apply`).
    pub ood_score: Option<f32>,
    /// 1 when the message came back through `triage redrive`: the row is keyed by the ORIGINAL
    /// message's (topic, partition, offset) and event time, so it replaces, never adds.
    pub redriven: u8,
    /// Which tier of the route's cascade answered (0: the first, or the only, model); its model
    /// is `model_name` / `model_version`. The first tier's answer is kept beside it, so
    /// analysts see what the cheap model said and how often the next one changed it.
    pub tier: u8,
    pub first_model_name: String,
    pub first_category: String,
    pub first_confidence: f32,
}

/// (column, ClickHouse type, low-cardinality candidate) in row order.
pub const COLUMNS: &[(&str, &str, bool)] = &[
    ("topic", "String", true),
    ("partition", "UInt32", false),
    ("offset", "UInt64", false),
    ("message_id", "String", false),
    ("kind", "String", true),
    ("event_time", "DateTime", false),
    ("event_time_ms", "UInt64", false),
    ("consumed_time_ms", "UInt64", false),
    ("processed_time_ms", "UInt64", false),
    ("model_name", "String", true),
    ("model_version", "String", true),
    ("category", "String", true),
    ("confidence", "Float32", false),
    ("priority", "String", true),
    ("tags", "Array(String)", false),
    ("tag_scores", "Array(Float32)", false),
    ("head_names", "Array(String)", false),
    ("head_labels", "Array(String)", false),
    ("head_scores", "Array(Float32)", false),
    ("escalated", "UInt8", false),
    ("text_chars", "UInt32", false),
    ("tokens", "UInt32", false),
    ("truncated", "UInt8", false),
    ("metadata_keys", "Array(String)", false),
    ("metadata_values", "Array(String)", false),
    ("worker_id", "String", true),
    ("ood_score", "Nullable(Float32)", false),
    ("redriven", "UInt8", false),
    ("tier", "UInt8", false),
    ("first_model_name", "String", true),
    ("first_category", "String", true),
    ("first_confidence", "Float32", false),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_fields_and_columns_are_in_the_same_order() {
        let row = ResultRow {
            topic: String::new(),
            partition: 0,
            offset: 0,
            message_id: String::new(),
            kind: String::new(),
            event_time: 0,
            event_time_ms: 0,
            consumed_time_ms: 0,
            processed_time_ms: 0,
            model_name: String::new(),
            model_version: String::new(),
            category: String::new(),
            confidence: 0.0,
            priority: String::new(),
            tags: vec![],
            tag_scores: vec![],
            head_names: vec![],
            head_labels: vec![],
            head_scores: vec![],
            escalated: 0,
            text_chars: 0,
            tokens: 0,
            truncated: 0,
            metadata_keys: vec![],
            metadata_values: vec![],
            worker_id: String::new(),
            ood_score: None,
            redriven: 0,
            tier: 0,
            first_model_name: String::new(),
            first_category: String::new(),
            first_confidence: 0.0,
        };
        let serde_json::Value::Object(fields) = serde_json::to_value(&row).unwrap() else { panic!() };
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        let columns: Vec<&str> = COLUMNS.iter().map(|c| c.0).collect();
        assert_eq!(names, columns);
    }
}
