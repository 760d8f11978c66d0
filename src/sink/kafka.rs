//! Dead-letter and escalation producers. A message that goes to one of these topics counts as
//! done only once Kafka acknowledged the write; failures are retried with backoff, never
//! dropped (a stuck topic stalls the partition's commits instead of losing the message).
//!
//! Dead letters carry the original bytes and key, and headers saying why and where from:
//! `triage.reason`, `triage.detail`, `triage.source.topic`, `triage.source.partition`,
//! `triage.source.offset`, `triage.source.timestamp`, `triage.worker`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::retry::Backoff;

pub const HEADER_REASON: &str = "triage.reason";
pub const HEADER_DETAIL: &str = "triage.detail";
pub const HEADER_SOURCE_TOPIC: &str = "triage.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "triage.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "triage.source.offset";
pub const HEADER_SOURCE_TIMESTAMP: &str = "triage.source.timestamp";
pub const HEADER_WORKER: &str = "triage.worker";

/// Where a consumed message came from, and its original bytes.
#[derive(Debug, Clone)]
pub struct SourceMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp (ms), if the message had one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct ProducerStats {
    pub dead_lettered: AtomicU64,
    pub escalated: AtomicU64,
    pub retries: AtomicU64,
}

pub struct KafkaSink {
    producer: FutureProducer,
    dead_letter_topic: String,
    escalation_topic: String,
    worker_id: String,
    backoff: Backoff,
    pub stats: Arc<ProducerStats>,
}

impl KafkaSink {
    pub fn new(producer: FutureProducer, dead_letter_topic: String, escalation_topic: String, worker_id: String, backoff: Backoff) -> Self {
        KafkaSink { producer, dead_letter_topic, escalation_topic, worker_id, backoff, stats: Arc::default() }
    }

    /// Write a dead letter; returns once Kafka acknowledged it.
    pub async fn dead_letter(&self, source: &SourceMessage, reason: &str, detail: &str) {
        let partition = source.partition.to_string();
        let offset = source.offset.to_string();
        let timestamp = source.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
        let headers = || {
            OwnedHeaders::new()
                .insert(Header { key: HEADER_REASON, value: Some(reason) })
                .insert(Header { key: HEADER_DETAIL, value: Some(detail) })
                .insert(Header { key: HEADER_SOURCE_TOPIC, value: Some(source.topic.as_str()) })
                .insert(Header { key: HEADER_SOURCE_PARTITION, value: Some(partition.as_str()) })
                .insert(Header { key: HEADER_SOURCE_OFFSET, value: Some(offset.as_str()) })
                .insert(Header { key: HEADER_SOURCE_TIMESTAMP, value: Some(timestamp.as_str()) })
                .insert(Header { key: HEADER_WORKER, value: Some(self.worker_id.as_str()) })
        };
        self.send_until_acked(&self.dead_letter_topic, source.key.as_deref(), &source.payload, headers).await;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    /// Write an escalation record keyed by the message id; returns once acknowledged.
    pub async fn escalate(&self, key: &str, payload: &[u8]) {
        self.send_until_acked(&self.escalation_topic, Some(key.as_bytes()), payload, OwnedHeaders::new).await;
        self.stats.escalated.fetch_add(1, Ordering::Relaxed);
    }

    async fn send_until_acked(&self, topic: &str, key: Option<&[u8]>, payload: &[u8], headers: impl Fn() -> OwnedHeaders) {
        let mut attempt = 0u32;
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload).headers(headers());
            if let Some(k) = key {
                record = record.key(k);
            }
            match self.producer.send(record, Timeout::After(Duration::from_secs(30))).await {
                Ok(_) => return,
                Err((e, _)) => {
                    attempt += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::telemetry::KAFKA_WRITE_RETRIES).increment(1);
                    let delay = self.backoff.delay(attempt);
                    tracing::warn!(topic, error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "Kafka write failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
