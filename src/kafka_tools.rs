//! Operator tools around the worker: loading messages into a topic (`triage produce`) and
//! sending dead letters back where they came from (`triage redrive`).

use std::io::{BufRead, Read};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::{Map, Value};

use crate::headers::{HEADER_REASON, HEADER_SOURCE_TOPIC};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
    #[error("CSV line {line}: {message}")]
    Csv { line: u64, message: String },
}

/// One record to produce.
pub struct Record {
    pub key: Option<String>,
    pub payload: Vec<u8>,
}

/// JSON lines as they are (bytes untouched, so bad lines stay bad); the key is the `id` field
/// when the line is a JSON object with one.
pub fn read_json_lines(input: impl BufRead) -> impl Iterator<Item = Result<Record, ToolError>> {
    input.split(b'\n').filter_map(|line| match line {
        Err(e) => Some(Err(e.into())),
        Ok(mut bytes) => {
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return None;
            }
            let key = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("id").map(|id| id.as_str().map(String::from).unwrap_or_else(|| id.to_string())));
            Some(Ok(Record { key, payload: bytes }))
        }
    })
}

/// A CSV with a header row (e.g. the support-ticket exports) as JSON objects, one per row;
/// rows with missing fields are reported with their line and skipped by the caller.
pub fn read_csv(input: impl Read) -> impl Iterator<Item = Result<Record, ToolError>> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(input);
    let headers = reader.headers().cloned().unwrap_or_default();
    let mut row_no = 0u64;
    reader.into_records().map(move |r| {
        row_no += 1;
        let record =
            r.map_err(|e| ToolError::Csv { line: e.position().map(|p| p.line()).unwrap_or(row_no + 1), message: e.to_string() })?;
        let object: Map<String, Value> =
            headers.iter().zip(record.iter()).map(|(h, v)| (h.to_string(), Value::String(v.to_string()))).collect();
        let id = object.get("id").and_then(|v| v.as_str()).map(String::from).unwrap_or_else(|| format!("row-{row_no}"));
        let mut object = object;
        object.entry("id").or_insert_with(|| Value::String(id.clone()));
        Ok(Record { key: Some(id), payload: serde_json::to_vec(&Value::Object(object)).unwrap_or_default() })
    })
}

/// Produce records, at most `rate` per second when given; `progress` sees each delivered one.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    records: impl Iterator<Item = Result<Record, ToolError>>,
    rate: Option<f64>,
    mut progress: impl FnMut(u64),
) -> Result<(u64, Vec<String>), ToolError> {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut skipped = Vec::new();
    let mut pending = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e @ ToolError::Csv { .. }) => {
                skipped.push(e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(rate) = rate.filter(|r| *r > 0.0) {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let producer = producer.clone();
        let topic = topic.to_string();
        pending.push(async move {
            let mut fr = FutureRecord::<str, [u8]>::to(&topic).payload(&record.payload);
            if let Some(k) = &record.key {
                fr = fr.key(k.as_str());
            }
            producer.send(fr, Timeout::After(Duration::from_secs(60))).await.map(|_| ()).map_err(|(e, _)| e)
        });
        sent += 1;
        // Keep a bounded number of deliveries outstanding.
        while pending.len() >= 10_000 {
            if let Some(r) = pending.next().await {
                r?;
                progress(1);
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
        progress(1);
    }
    Ok((sent, skipped))
}

/// What one `triage redrive` run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RedriveReport {
    /// Sent back to their source topics.
    pub redriven: u64,
    /// Left: another reason than the one asked for (that reason's own position keeps them).
    pub other_reason: u64,
    /// Left: the payload was cut to fit the dead-letter topic; the original is not in Kafka.
    pub truncated: u64,
    /// Left: no `triage.source.topic` header (not written by triage).
    pub no_source: u64,
}

impl std::fmt::Display for RedriveReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "redrove {} dead letters to their source topics; left {}: {} of other reasons, {} cut to fit the topic (their original bytes are gone: \
             see triage.original.size / triage.original.sha256), {} without a source header",
            self.redriven,
            self.other_reason + self.truncated + self.no_source,
            self.other_reason,
            self.truncated,
            self.no_source
        )
    }
}

/// The consumer group a redrive reads in: one position per reason, so `--reason X` never moves
/// past letters of other reasons. (A letter redriven by both a filtered and an unfiltered run
/// goes back twice; the worker keys it by its original source, so it still reads once.)
pub fn redrive_group(group_id: &str, reason: Option<&str>) -> String {
    match reason {
        Some(r) => format!("{group_id}-redrive.{r}"),
        None => format!("{group_id}-redrive"),
    }
}

/// How often a redrive commits its position: an interrupted run resumes from here.
const REDRIVE_COMMIT_EVERY: u64 = 100;

/// Read the dead-letter topic from the group's position up to the end it had when redrive
/// started (or until `max` were sent), send each letter whose reason matches back to its source topic
/// with its original key and its `triage.source.*` headers (so the worker keys the result by
/// the ORIGINAL message), committing as it goes.
pub fn redrive(
    consumer: &BaseConsumer,
    producer: &FutureProducer,
    dead_letter_topic: &str,
    reason: Option<&str>,
    max: Option<u64>,
    mut progress: impl FnMut(u64),
) -> Result<RedriveReport, ToolError> {
    use std::collections::HashMap;

    use rdkafka::message::{Header, OwnedHeaders};

    use crate::headers::{HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TIMESTAMP, HEADER_TRUNCATED};
    let metadata = consumer.fetch_metadata(Some(dead_letter_topic), Duration::from_secs(10))?;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(dead_letter_topic, p.id(), Duration::from_secs(10))?;
            if high > low {
                ends.insert(p.id(), high);
            }
        }
    }
    let mut report = RedriveReport::default();
    if ends.is_empty() {
        return Ok(report);
    }
    consumer.subscribe(&[dead_letter_topic])?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut uncommitted = 0u64;
    let started = Instant::now();
    while !ends.is_empty() && max.is_none_or(|m| report.redriven < m) {
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                // Partitions already read to the end by an earlier redrive have nothing to give.
                if started.elapsed() > Duration::from_secs(10) {
                    if let Ok(positions) = consumer.position() {
                        for e in positions.elements() {
                            if let rdkafka::Offset::Offset(o) = e.offset() {
                                if ends.get(&e.partition()).is_some_and(|&end| o >= end) {
                                    ends.remove(&e.partition());
                                }
                            }
                        }
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            Some(Ok(m)) => {
                let header = |name: &str| {
                    m.headers().and_then(|h| {
                        h.iter().find(|x| x.key == name).and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                    })
                };
                let wanted = reason.is_none_or(|r| header(HEADER_REASON).as_deref() == Some(r));
                let cut = header(HEADER_TRUNCATED).as_deref() == Some("true");
                match header(HEADER_SOURCE_TOPIC) {
                    _ if !wanted => report.other_reason += 1,
                    _ if cut => report.truncated += 1,
                    None => report.no_source += 1,
                    Some(topic) => {
                        let mut headers = OwnedHeaders::new();
                        for name in [HEADER_SOURCE_TOPIC, HEADER_SOURCE_PARTITION, HEADER_SOURCE_OFFSET, HEADER_SOURCE_TIMESTAMP] {
                            if let Some(value) = header(name) {
                                headers = headers.insert(Header { key: name, value: Some(value.as_str()) });
                            }
                        }
                        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).payload(m.payload().unwrap_or_default()).headers(headers);
                        if let Some(k) = m.key() {
                            record = record.key(k);
                        }
                        rt.block_on(producer.send(record, Timeout::After(Duration::from_secs(60)))).map_err(|(e, _)| e)?;
                        report.redriven += 1;
                        progress(1);
                    }
                }
                // Only after the copy is acknowledged: an interrupted run never skips a letter.
                consumer.store_offset_from_message(&m)?;
                uncommitted += 1;
                if uncommitted >= REDRIVE_COMMIT_EVERY {
                    consumer.commit_consumer_state(CommitMode::Sync)?;
                    uncommitted = 0;
                }
                if ends.get(&m.partition()).is_some_and(|&end| m.offset() + 1 >= end) {
                    ends.remove(&m.partition());
                }
            }
        }
    }
    if uncommitted > 0 {
        consumer.commit_consumer_state(CommitMode::Sync)?;
    }
    Ok(report)
}

/// Whether the group's committed offsets reached the end of every partition of `topics`.
pub fn group_caught_up(kafka: &crate::config::KafkaConfig, topics: &[String]) -> Result<bool, rdkafka::error::KafkaError> {
    use rdkafka::TopicPartitionList;
    let consumer: BaseConsumer = kafka.client(crate::config::ClientRole::Observer).create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(5))?;
    let mut list = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for t in metadata.topics().iter().filter(|t| topics.iter().any(|x| x == t.name())) {
        for p in t.partitions() {
            list.add_partition(t.name(), p.id());
            let (_, high) = consumer.fetch_watermarks(t.name(), p.id(), Duration::from_secs(5))?;
            ends.insert((t.name().to_string(), p.id()), high);
        }
    }
    if ends.is_empty() {
        return Ok(false);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(5))?;
    Ok(caught_up(&ends, committed.elements().iter().map(|e| ((e.topic().to_string(), e.partition()), e.offset()))))
}

/// Every partition in `ends` has a committed offset at its end (a partition missing from the
/// answer is not caught up: a broker may answer with fewer partitions than asked, and zipping
/// the two lists once made an empty answer "caught up").
fn caught_up(
    ends: &std::collections::HashMap<(String, i32), i64>,
    committed: impl Iterator<Item = ((String, i32), rdkafka::Offset)>,
) -> bool {
    let committed: std::collections::HashMap<(String, i32), rdkafka::Offset> = committed.collect();
    ends.iter().all(|(tp, high)| match committed.get(tp) {
        Some(rdkafka::Offset::Offset(o)) => o >= high,
        Some(_) => *high == 0,
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_caught_up_only_when_every_partition_is_answered_and_at_its_end() {
        let ends = std::collections::HashMap::from([(("t".to_string(), 0), 600), (("t".to_string(), 1), 0)]);
        let at = |o0: i64| vec![(("t".to_string(), 0), rdkafka::Offset::Offset(o0)), (("t".to_string(), 1), rdkafka::Offset::Invalid)];
        assert!(caught_up(&ends, at(600).into_iter()));
        assert!(!caught_up(&ends, at(22).into_iter()));
        assert!(!caught_up(&ends, std::iter::empty()), "an empty answer is not caught up");
        assert!(!caught_up(&ends, at(600).into_iter().skip(1)), "a partition missing from the answer");
    }
}
