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
    /// Who gave this version's answer: `model:<name>` (the worker's tier), `llm:<model>`
    /// (`triage escalate`). Its rank leads `row_version`.
    pub answered_by: String,
    /// The ReplacingMergeTree version: answer rank (0 small model, 1 LLM, 2 person) in the
    /// high bits, `processed_time_ms` below, so `FINAL` keeps an LLM's answer over any later
    /// replay of the small model's row. Set by the sink ([`ResultRow::stamp`]).
    pub row_version: u64,
    /// On a row answered by an LLM: what the small model (its last tier) had said.
    pub slm_category: String,
    pub slm_confidence: f32,
    pub slm_priority: String,
    pub slm_tags: Vec<String>,
    /// On a row answered by an LLM: its call's tokens and latency (retries included).
    pub llm_prompt_tokens: u32,
    pub llm_completion_tokens: u32,
    pub llm_latency_ms: u32,
}

/// Bits of `row_version` below the answer rank: milliseconds until the year 10889.
pub const RANK_SHIFT: u32 = 48;

/// How an answer ranks against others for the same message: a later replay of a lower rank
/// never replaces a higher one.
pub fn answer_rank(answered_by: &str) -> u64 {
    if answered_by.starts_with("person:") {
        2
    } else if answered_by.starts_with("llm:") {
        1
    } else {
        0
    }
}

impl ResultRow {
    /// Mark the row as handed to ClickHouse now: its processing time and its version.
    pub fn stamp(&mut self, now_ms: u64) {
        self.processed_time_ms = now_ms;
        self.row_version = (answer_rank(&self.answered_by) << RANK_SHIFT) | (now_ms & ((1 << RANK_SHIFT) - 1));
    }
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
    ("answered_by", "String", true),
    ("row_version", "UInt64", false),
    ("slm_category", "String", true),
    ("slm_confidence", "Float32", false),
    ("slm_priority", "String", true),
    ("slm_tags", "Array(String)", false),
    ("llm_prompt_tokens", "UInt32", false),
    ("llm_completion_tokens", "UInt32", false),
    ("llm_latency_ms", "UInt32", false),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_fields_and_columns_are_in_the_same_order() {
        let row = ResultRow::default();
        let serde_json::Value::Object(fields) = serde_json::to_value(&row).unwrap() else { panic!() };
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        let columns: Vec<&str> = COLUMNS.iter().map(|c| c.0).collect();
        assert_eq!(names, columns);
    }

    #[test]
    fn an_llm_answer_outranks_any_later_small_model_row() {
        let mut llm = ResultRow { answered_by: "llm:qwen".into(), ..ResultRow::default() };
        llm.stamp(1_700_000_000_000);
        let mut replay = ResultRow { answered_by: "model:customer-service".into(), ..ResultRow::default() };
        replay.stamp(4_000_000_000_000); // a replay decades later
        assert!(llm.row_version > replay.row_version);
        let mut person = ResultRow { answered_by: "person:ana".into(), ..ResultRow::default() };
        person.stamp(1);
        assert!(person.row_version > llm.row_version);
        let mut later_llm = llm.clone();
        later_llm.stamp(1_700_000_000_001);
        assert!(later_llm.row_version > llm.row_version, "within a rank, the later answer wins");
        assert_eq!(replay.row_version, 4_000_000_000_000, "rank 0 keeps the plain time");
    }
}
