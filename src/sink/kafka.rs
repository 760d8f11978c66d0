//! The dead-letter and escalation producer: one idempotent Kafka producer writing the two side
//! topics. A write returns only once Kafka acknowledged it; failures are retried with backoff,
//! never dropped (a stuck topic stalls the partition's commits instead of losing the message).
//! Counting and acknowledging the message is the settle path's job, not this writer's.
//!
//! Dead letters carry the original bytes and key, and headers saying why and where from:
//! `triage.reason`, `triage.detail`, `triage.source.topic`, `triage.source.partition`,
//! `triage.source.offset`, `triage.source.timestamp`, `triage.worker`.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::retry::Backoff;
use crate::source::SourceMessage;
use crate::telemetry::events::{Counters, DeadLetterReason, InternalEvent, KafkaWriteRetried};

pub const HEADER_REASON: &str = "triage.reason";
pub const HEADER_DETAIL: &str = "triage.detail";
pub const HEADER_SOURCE_TOPIC: &str = "triage.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "triage.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "triage.source.offset";
pub const HEADER_SOURCE_TIMESTAMP: &str = "triage.source.timestamp";
pub const HEADER_WORKER: &str = "triage.worker";

/// Where the side topics are and who writes them.
#[derive(Debug, Clone)]
pub struct SideTopicsConfig {
    pub dead_letter_topic: String,
    pub escalation_topic: String,
    pub worker_id: String,
    pub backoff: Backoff,
}

pub struct SideTopics {
    producer: FutureProducer,
    config: SideTopicsConfig,
    counters: Arc<Counters>,
}

impl SideTopics {
    pub fn new(producer: FutureProducer, config: SideTopicsConfig, counters: Arc<Counters>) -> Self {
        SideTopics { producer, config, counters }
    }

    pub fn dead_letter_topic(&self) -> &str {
        &self.config.dead_letter_topic
    }

    /// Write a dead letter; returns once Kafka acknowledged it.
    pub async fn dead_letter(&self, source: &SourceMessage, reason: DeadLetterReason, detail: &str) {
        let partition = source.partition.to_string();
        let offset = source.offset.to_string();
        let timestamp = source.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
        let headers = || {
            OwnedHeaders::new()
                .insert(Header { key: HEADER_REASON, value: Some(reason.as_str()) })
                .insert(Header { key: HEADER_DETAIL, value: Some(detail) })
                .insert(Header { key: HEADER_SOURCE_TOPIC, value: Some(source.topic.as_str()) })
                .insert(Header { key: HEADER_SOURCE_PARTITION, value: Some(partition.as_str()) })
                .insert(Header { key: HEADER_SOURCE_OFFSET, value: Some(offset.as_str()) })
                .insert(Header { key: HEADER_SOURCE_TIMESTAMP, value: Some(timestamp.as_str()) })
                .insert(Header { key: HEADER_WORKER, value: Some(self.config.worker_id.as_str()) })
        };
        self.send_until_acked(&self.config.dead_letter_topic, source.key.as_deref(), &source.payload, headers).await;
    }

    /// Write an escalation record keyed by the message id; returns once acknowledged.
    pub async fn escalate(&self, key: &str, payload: &[u8]) {
        self.send_until_acked(&self.config.escalation_topic, Some(key.as_bytes()), payload, OwnedHeaders::new).await;
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
                Err((error, _)) => {
                    attempt += 1;
                    let delay = self.config.backoff.delay(attempt);
                    KafkaWriteRetried { topic, attempt, error: &error, delay }.emit(&self.counters);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
