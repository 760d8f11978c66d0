//! `triage escalate --export-labels FILE`: the LLM-answered messages as labelled training data
//! for the next `triage train` (the loop that makes the small model better every week).
//!
//! Labels come from ClickHouse (the answer each message has now, `FINAL`); texts from the
//! escalation topic, read from its beginning to the end it had when the export started,
//! without joining or moving any consumer group. So only messages still within the topic's
//! retention can be exported: set the escalation topic's `retention.ms` to the retraining
//! cadence or longer. Each line: `text`, one field per label head (a label, or a list for a
//! multi-label head), and where it came from. A message escalated more than once is written
//! once.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Map, Value};

use super::answer::Escalation;
use super::escalate::{labels_for, route_labels, text_of, RouteLabels};
use crate::config::{ClientRole, Config};
use crate::sink::clickhouse::service::LlmAnswer;
use crate::sink::clickhouse::ClickHouseService;
use crate::train::Progress;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("reading the LLM answers from ClickHouse: {0}")]
    ClickHouse(String),
    #[error("reading the escalation topic: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the escalation topic `{topic}` stopped giving records at partition {partition} offset {position} (its end is {end}) for {waited:?}")]
    Stalled { topic: String, partition: i32, position: i64, end: i64, waited: Duration },
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
    #[error(transparent)]
    Setup(#[from] crate::error::WorkerError),
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ExportReport {
    /// LLM answers in the table.
    pub answers: usize,
    pub records_read: u64,
    pub written: u64,
    /// Records whose message has no LLM answer (yet).
    pub unanswered: u64,
    /// Further records of a message already written.
    pub duplicates: u64,
    /// Records that cannot be read or have no route here.
    pub unreadable: u64,
    /// Answers whose record is gone from the topic (past retention).
    pub past_retention: usize,
}

/// One labelled example from a record and its answer (None: its text cannot be made).
fn example(route: &RouteLabels, record: &Escalation, answer: &LlmAnswer) -> Option<Value> {
    let text = text_of(route, record).ok()?;
    let mut line = Map::new();
    line.insert("text".into(), Value::String(text));
    for head in &route.space.heads {
        if head.multi {
            let tags: Vec<&String> = answer.tags.iter().filter(|t| head.labels.iter().any(|(l, _)| l == *t)).collect();
            line.insert(head.name.clone(), json!(tags));
        } else if let Some(i) = answer.head_names.iter().position(|n| n == &head.name) {
            line.insert(head.name.clone(), json!(answer.head_labels.get(i)));
        }
    }
    line.insert("message_id".into(), json!(record.row.message_id));
    line.insert("kind".into(), json!(record.row.kind));
    line.insert("answered_by".into(), json!(answer.answered_by));
    line.insert("small_model".into(), json!(format!("{}@{}", record.row.model_name, record.row.model_version)));
    line.insert("small_category".into(), json!(record.row.category));
    Some(Value::Object(line))
}

/// Write every LLM-answered message still in the escalation topic to `out` as JSON lines.
pub async fn export_labels(config: &Config, out: &mut dyn Write, progress: &dyn Progress) -> Result<ExportReport, ExportError> {
    let routes = route_labels(config)?;
    let clickhouse = ClickHouseService::new(&config.clickhouse);
    let answers: HashMap<(String, u32, u64), LlmAnswer> = clickhouse
        .llm_answers()
        .await
        .map_err(|e| ExportError::ClickHouse(e.to_string()))?
        .into_iter()
        .map(|a| ((a.topic.clone(), a.partition, a.offset), a))
        .collect();
    let mut report = ExportReport { answers: answers.len(), ..ExportReport::default() };
    progress.note(&format!("{} LLM answers in {}.{}", answers.len(), config.clickhouse.database, config.clickhouse.table));
    if answers.is_empty() {
        return Ok(report);
    }

    let topic = config.kafka.escalation_topic.clone();
    let consumer: BaseConsumer = config.kafka.client(ClientRole::Observer).set("enable.auto.commit", "false").create()?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let (mut ends, mut assignment) = (HashMap::new(), TopicPartitionList::new());
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
        if high > low {
            ends.insert(p.id(), (low, high));
            assignment.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
        }
    }
    let total: i64 = ends.values().map(|(low, high)| high - low).sum();
    progress.stage("reading the escalation topic", total.max(0) as u64);
    consumer.assign(&assignment)?;
    let mut written: HashSet<(String, u32, u64)> = HashSet::new();
    let mut last_record = Instant::now();
    let stall_limit = Duration::from_secs(60);
    while !ends.is_empty() {
        let m = match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "escalation topic read error; retrying");
                continue;
            }
            None => {
                if last_record.elapsed() > stall_limit {
                    let (&partition, &(_, end)) = ends.iter().next().expect("not empty");
                    let position = consumer
                        .position()
                        .ok()
                        .and_then(|p| p.find_partition(&topic, partition).and_then(|e| e.offset().to_raw()))
                        .unwrap_or(-1);
                    return Err(ExportError::Stalled { topic, partition, position, end, waited: stall_limit });
                }
                continue;
            }
        };
        last_record = Instant::now();
        report.records_read += 1;
        progress.advance(1);
        if ends.get(&m.partition()).is_some_and(|&(_, end)| m.offset() + 1 >= end) {
            ends.remove(&m.partition());
        }
        let Some(record) = m.payload().and_then(|p| Escalation::parse(p).ok()) else {
            report.unreadable += 1;
            continue;
        };
        let key = record.key();
        let (Some(answer), Some(route)) = (answers.get(&key), labels_for(&routes, &record.row)) else {
            if routes.contains_key(&record.row.topic) {
                report.unanswered += 1;
            } else {
                report.unreadable += 1;
            }
            continue;
        };
        if written.contains(&key) {
            report.duplicates += 1;
            continue;
        }
        match example(route, &record, answer) {
            Some(line) => {
                serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::from)?;
                out.write_all(b"\n")?;
                written.insert(key);
                report.written += 1;
            }
            None => report.unreadable += 1,
        }
    }
    out.flush()?;
    progress.finish_stage();
    report.past_retention = answers.keys().filter(|k| !written.contains(*k)).count();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::answer::Roles;
    use crate::llm::prompt::{HeadLabels, LabelSpace};
    use crate::message::{Decoder, FieldMap};
    use crate::model::Template;
    use crate::sink::clickhouse::ResultRow;

    #[test]
    fn an_example_has_the_text_the_model_reads_and_every_head_answered() {
        let route = RouteLabels::new(
            LabelSpace {
                heads: vec![
                    HeadLabels {
                        name: "intent".into(),
                        multi: false,
                        labels: vec![("card_arrival".into(), None)],
                        max_items: 1,
                        examples: Default::default(),
                    },
                    HeadLabels {
                        name: "flags".into(),
                        multi: true,
                        labels: vec![("vip".into(), None), ("angry".into(), None)],
                        max_items: 2,
                        examples: Default::default(),
                    },
                ],
                instructions: Vec::new(),
            },
            Roles::default(),
            Decoder::new(FieldMap::default(), Template::parse("{subject}\n{body}").unwrap(), 1 << 20, 10_000),
            10_000,
            &crate::llm::prompt::RequestOptions::new("m", crate::llm::prompt::StructuredOutput::None, 16),
        );
        let row = ResultRow {
            topic: "tickets".into(),
            message_id: "t-9".into(),
            model_name: "cs".into(),
            model_version: "3".into(),
            category: "pin".into(),
            ..ResultRow::default()
        };
        let record = Escalation { row, message: json!({"subject": "Card", "body": "where is it"}), truncated: false };
        let answer = LlmAnswer {
            topic: "tickets".into(),
            partition: 0,
            offset: 5,
            head_names: vec!["intent".into()],
            head_labels: vec!["card_arrival".into()],
            tags: vec!["vip".into(), "other-head-tag".into()],
            answered_by: "llm:qwen".into(),
        };
        let line = example(&route, &record, &answer).unwrap();
        assert_eq!(line["text"], "Card\nwhere is it");
        assert_eq!(line["intent"], "card_arrival");
        assert_eq!(line["flags"], json!(["vip"]), "a multi-label head gets only its own labels");
        assert_eq!((line["small_category"].as_str(), line["small_model"].as_str()), (Some("pin"), Some("cs@3")));
    }
}
