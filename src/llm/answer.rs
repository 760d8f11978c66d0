//! An escalation record in, the LLM's answer as the message's next row out. Pure.
//!
//! The record carries the small model's row as stored (`"row"`), so the new version has the
//! same key (topic, partition, offset) and event time, and keeps what the small model said in
//! the `slm_*` columns. The answer replaces the labels: the category head's label, the
//! priority derived from its head as the model would, every multi-label head's tags, every
//! single-label head in `head_names` / `head_labels`. An LLM gives no calibrated probability:
//! its labels carry score 1, and `answered_by = 'llm:<model>'` tells them apart.

use serde_json::Value;

use super::client::Completion;
use super::prompt::Answer;
use crate::model::{Descriptor, HeadKind, PrioritySpec};
use crate::sink::clickhouse::ResultRow;

/// Which of a model's heads make the row's category, priority and tags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Roles {
    pub category_head: Option<String>,
    pub priority: Option<PrioritySpec>,
    /// Multi-label heads, in the model's order (their labels are the row's tags).
    pub tag_heads: Vec<String>,
    /// Single-label heads, in the model's order (`head_names`).
    pub label_heads: Vec<String>,
}

impl Roles {
    pub fn of(descriptor: &Descriptor) -> Self {
        let named = |kind: HeadKind| descriptor.heads.iter().filter(|h| h.kind == kind).map(|h| h.name.clone()).collect();
        Roles {
            category_head: descriptor.category_head.map(|i| descriptor.heads[i].name.clone()),
            priority: descriptor.priority.clone(),
            tag_heads: named(HeadKind::MultiLabel),
            label_heads: named(HeadKind::SingleLabel),
        }
    }
}

/// Why a record cannot be answered (it is dead-lettered with this).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("the escalation record is not JSON: {0}")]
    NotJson(String),
    #[error("the escalation record has no usable `row` (written by a worker older than the LLM tier?): {0}")]
    NoRow(String),
}

/// What `triage escalate` reads from a record.
#[derive(Debug, Clone)]
pub struct Escalation {
    pub row: ResultRow,
    /// The original message (JSON as produced), or its text when it was not JSON or was cut.
    pub message: Value,
    /// The worker cut the message to fit the topic.
    pub truncated: bool,
}

impl Escalation {
    pub fn parse(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut value: Value = serde_json::from_slice(bytes).map_err(|e| RecordError::NotJson(e.to_string()))?;
        let row = value.get_mut("row").map(Value::take).ok_or_else(|| RecordError::NoRow("no `row` field".into()))?;
        let row: ResultRow = serde_json::from_value(row).map_err(|e| RecordError::NoRow(e.to_string()))?;
        if row.topic.is_empty() {
            return Err(RecordError::NoRow("its topic is empty".into()));
        }
        let truncated = value["message_truncated"].as_bool().unwrap_or(false);
        Ok(Escalation { row, message: value.get_mut("message").map(Value::take).unwrap_or(Value::Null), truncated })
    }

    /// The row's identity: what "already answered" is checked by.
    pub fn key(&self) -> (String, u32, u64) {
        (self.row.topic.clone(), self.row.partition, self.row.offset)
    }
}

/// Whether the LLM chose what the small model had said, on every single-label head it
/// answered (not only the category: a model without a category head agrees or not too).
pub fn agrees(small: &ResultRow, answer: &Answer, roles: &Roles) -> bool {
    roles.label_heads.iter().all(|head| {
        let said = small.head_names.iter().position(|h| h == head).and_then(|i| small.head_labels.get(i));
        match (said, answer.labels.get(head).and_then(|l| l.first())) {
            (Some(said), Some(chosen)) => said == chosen,
            _ => true,
        }
    })
}

/// The LLM's answer as the message's next row (stamped with its version by the sink).
pub fn answered_row(small: &ResultRow, answer: &Answer, roles: &Roles, llm_model: &str, call: &Completion, worker_id: &str) -> ResultRow {
    let first = |head: &str| answer.labels.get(head).and_then(|l| l.first()).cloned();
    let mut row = small.clone();
    row.slm_category = small.category.clone();
    row.slm_confidence = small.confidence;
    row.slm_priority = small.priority.clone();
    row.slm_tags = small.tags.clone();
    if let Some(category) = roles.category_head.as_deref().and_then(first) {
        row.category = category;
        row.confidence = 1.0;
    }
    if let Some(spec) = &roles.priority {
        if let Some(label) = first(&spec.from_head) {
            // A label the mapping does not know (and no default) has no priority: keeping the
            // small model's, given for another label, would be wrong.
            row.priority = spec.priority_of(&label).unwrap_or_default();
        }
    }
    row.tags = roles.tag_heads.iter().flat_map(|h| answer.labels.get(h).cloned().unwrap_or_default()).collect();
    row.tag_scores = vec![1.0; row.tags.len()];
    let answered: Vec<(String, String)> = roles.label_heads.iter().filter_map(|h| first(h).map(|l| (h.clone(), l))).collect();
    row.head_scores = vec![1.0; answered.len()];
    (row.head_names, row.head_labels) = answered.into_iter().unzip();
    row.answered_by = format!("llm:{llm_model}");
    row.llm_prompt_tokens = call.prompt_tokens.min(u64::from(u32::MAX)) as u32;
    row.llm_completion_tokens = call.completion_tokens.min(u64::from(u32::MAX)) as u32;
    row.llm_latency_ms = call.latency.as_millis().min(u128::from(u32::MAX)) as u32;
    row.worker_id = worker_id.to_string();
    row
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

    fn small_row() -> ResultRow {
        ResultRow {
            topic: "tickets".into(),
            partition: 2,
            offset: 41,
            message_id: "t-1".into(),
            event_time: 1_700_000_123,
            event_time_ms: 1_700_000_123_456,
            model_name: "support".into(),
            model_version: "v7".into(),
            category: "card_lost".into(),
            confidence: 0.42,
            priority: "high".into(),
            tags: vec!["urgent".into()],
            tag_scores: vec![0.9],
            head_names: vec!["intent".into(), "urgency".into()],
            head_labels: vec!["card_lost".into(), "p1".into()],
            head_scores: vec![0.42, 0.7],
            escalated: 1,
            answered_by: "model:support".into(),
            ..ResultRow::default()
        }
    }

    fn roles() -> Roles {
        Roles {
            category_head: Some("intent".into()),
            priority: Some(PrioritySpec { from_head: "urgency".into(), default: None, map: BTreeMap::from([("p3".into(), "low".into())]) }),
            tag_heads: vec!["tags".into()],
            label_heads: vec!["intent".into(), "urgency".into()],
        }
    }

    #[test]
    fn the_answer_replaces_the_labels_and_keeps_key_time_and_the_small_models_answer() {
        let answer = Answer {
            labels: BTreeMap::from([
                ("intent".into(), vec!["card_arrival".into()]),
                ("urgency".into(), vec!["p3".into()]),
                ("tags".into(), vec!["vip".into(), "angry".into()]),
            ]),
        };
        let call = Completion {
            content: String::new(),
            prompt_tokens: 812,
            completion_tokens: 14,
            cached_prompt_tokens: 0,
            latency: Duration::from_millis(1_250),
            attempts: 2,
            usage_reported: true,
        };
        let row = answered_row(&small_row(), &answer, &roles(), "qwen2.5-7b", &call, "escalate-0");
        let small = small_row();
        assert_eq!((row.topic.as_str(), row.partition, row.offset, row.event_time_ms), ("tickets", 2, 41, small.event_time_ms));
        assert_eq!((row.category.as_str(), row.confidence, row.priority.as_str()), ("card_arrival", 1.0, "low"));
        assert_eq!(row.tags, vec!["vip", "angry"]);
        assert_eq!(row.head_labels, vec!["card_arrival", "p3"]);
        assert_eq!(row.head_scores, vec![1.0, 1.0]);
        assert_eq!((row.slm_category.as_str(), row.slm_confidence, row.slm_priority.as_str()), ("card_lost", 0.42, "high"));
        assert_eq!(row.slm_tags, vec!["urgent"]);
        assert_eq!(row.answered_by, "llm:qwen2.5-7b");
        assert_eq!((row.llm_prompt_tokens, row.llm_completion_tokens, row.llm_latency_ms), (812, 14, 1_250));
        assert_eq!((row.model_name.as_str(), row.model_version.as_str()), ("support", "v7"), "which small model doubted it stays");
        assert_eq!(row.worker_id, "escalate-0");
    }

    fn answer_of(pairs: &[(&str, &str)]) -> Answer {
        Answer { labels: pairs.iter().map(|(h, l)| (h.to_string(), vec![l.to_string()])).collect() }
    }

    /// Issue 22: an LLM label the priority mapping lacks kept the small model's priority,
    /// which was given for another label.
    #[test]
    fn a_label_without_a_priority_has_none_not_the_small_models() {
        let call = Completion {
            content: String::new(),
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_prompt_tokens: 0,
            latency: Duration::ZERO,
            attempts: 1,
            usage_reported: true,
        };
        let unmapped = answer_of(&[("intent", "card_arrival"), ("urgency", "p9")]);
        let row = answered_row(&small_row(), &unmapped, &roles(), "qwen", &call, "e");
        assert_eq!(row.priority, "", "p9 has no priority (the small model said high for p1)");
        let mut with_default = roles();
        with_default.priority.as_mut().unwrap().default = Some("normal".into());
        assert_eq!(answered_row(&small_row(), &unmapped, &with_default, "qwen", &call, "e").priority, "normal");
    }

    /// Issue 22: `agreed` compared only the category, so a model without a category head
    /// always "agreed".
    #[test]
    fn agreement_is_judged_on_every_single_label_head() {
        let small = small_row();
        assert!(agrees(&small, &answer_of(&[("intent", "card_lost"), ("urgency", "p1")]), &roles()));
        assert!(!agrees(&small, &answer_of(&[("intent", "card_lost"), ("urgency", "p3")]), &roles()), "the urgency differs");
        let no_category = Roles { category_head: None, ..roles() };
        assert!(!agrees(&small, &answer_of(&[("intent", "card_arrival"), ("urgency", "p1")]), &no_category));
    }

    #[test]
    fn records_are_read_whole_or_refused_with_a_reason() {
        let record = serde_json::json!({"message_id": "t-1", "row": small_row(), "message": {"body": "where is my card"}});
        let e = Escalation::parse(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(e.key(), ("tickets".to_string(), 2, 41));
        assert_eq!(e.message["body"], "where is my card");
        assert!(!e.truncated);
        let cut = serde_json::json!({"row": small_row(), "message": "{\"body\": \"where is my ca", "message_truncated": true});
        assert!(Escalation::parse(&serde_json::to_vec(&cut).unwrap()).unwrap().truncated);
        assert!(matches!(Escalation::parse(b"not json"), Err(RecordError::NotJson(_))));
        let old = serde_json::json!({"message_id": "t-1", "message": {"body": "x"}});
        let err = Escalation::parse(&serde_json::to_vec(&old).unwrap()).unwrap_err();
        assert!(err.to_string().contains("older than the LLM tier"), "{err}");
        let broken = serde_json::json!({"row": {"topic": 3}, "message": "x"});
        assert!(matches!(Escalation::parse(&serde_json::to_vec(&broken).unwrap()), Err(RecordError::NoRow(_))));
    }
}
