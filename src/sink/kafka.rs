//! The dead-letter and escalation producer: one idempotent Kafka producer writing the two side
//! topics. A write returns once Kafka acknowledged it, or with a [`WriteError`] when retrying
//! cannot help. Counting and acknowledging the message is the settle path's job.
//!
//! Errors are sorted by librdkafka's code ([`classify`]): transient ones (a broker away, a
//! leader election, a timeout) are retried with backoff for as long as they last; a record too
//! large for the topic is cut to fit and written ([`Fit`]); an unknown topic is retried for a
//! bounded time (metadata can lag a topic's creation), then permanent; authorization and
//! invalid-record errors are permanent at once. A permanent error stops the worker rather than
//! dropping the message or retrying forever while the partition's commits stall unseen.
//!
//! Dead letters carry the original bytes and key, and headers saying why and where from:
//! `triage.reason`, `triage.detail`, `triage.source.topic`, `triage.source.partition`,
//! `triage.source.offset`, `triage.source.timestamp`, `triage.worker`. A dead letter whose
//! payload had to be cut also carries `triage.truncated` = `true`, `triage.original.size` (bytes)
//! and `triage.original.sha256` (hex, of the original bytes), so it can be recognised and never
//! redriven as if it were whole.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use sha2::{Digest, Sha256};

use crate::retry::Backoff;
use crate::source::SourceMessage;
use crate::telemetry::events::{Counters, DeadLetterReason, InternalEvent, KafkaWriteRetried, SideRecordCut};

use crate::headers::{
    HEADER_DETAIL, HEADER_ORIGINAL_SHA256, HEADER_ORIGINAL_SIZE, HEADER_REASON, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TIMESTAMP, HEADER_SOURCE_TOPIC, HEADER_TRUNCATED, HEADER_WORKER,
};

/// Room for headers and the record's framing on top of the payload in the producer's
/// `message.max.bytes` (the detail header is capped well below this).
pub const HEADER_ROOM_BYTES: usize = 64 * 1024;
/// The producer's `message.max.bytes` for a worker accepting messages of up to
/// `max_message_bytes`: any of them fits with its headers, and never below librdkafka's own
/// default (a low `max_message_bytes` must not make dead letters of larger messages shrink).
pub fn producer_message_limit(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_add(HEADER_ROOM_BYTES).max(1_000_000)
}

/// The largest payload written as it is: what the producer takes, less room for headers.
pub fn payload_limit(max_message_bytes: usize) -> usize {
    producer_message_limit(max_message_bytes) - HEADER_ROOM_BYTES
}

/// The `triage.detail` header is cut to this many bytes.
const DETAIL_MAX_BYTES: usize = 4 * 1024;
/// Below this, cutting further would leave nothing worth keeping: the topic's limit is absurd.
const SMALLEST_CUT_BYTES: usize = 1024;

/// Where the side topics are and who writes them.
#[derive(Debug, Clone)]
pub struct SideTopicsConfig {
    pub dead_letter_topic: String,
    pub escalation_topic: String,
    pub worker_id: String,
    pub backoff: Backoff,
    /// Largest payload written as it is ([`payload_limit`]); larger ones are cut.
    pub max_payload_bytes: usize,
    /// How long an unknown topic is retried before it counts as missing.
    pub unknown_topic_grace: Duration,
}

impl SideTopicsConfig {
    /// The side topics of `config`, written by `worker_id`, with the writer's usual patience.
    pub fn of(config: &crate::config::Config, worker_id: &str) -> Self {
        SideTopicsConfig {
            dead_letter_topic: config.kafka.dead_letter_topic.clone(),
            escalation_topic: config.kafka.escalation_topic.clone(),
            worker_id: worker_id.to_string(),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            max_payload_bytes: payload_limit(config.max_message_bytes),
            unknown_topic_grace: Duration::from_secs(60),
        }
    }
}

/// A side-topic write that retrying cannot complete.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("cannot write to Kafka topic `{topic}`: {cause}")]
pub struct WriteError {
    pub topic: String,
    pub cause: String,
}

/// What to do about a failed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Wait and try again (brokers away, elections, timeouts, throttling).
    Retry,
    /// The record is too large for the producer or the topic: cut it and try again.
    TooLarge,
    /// The topic may not exist yet in the metadata: retry within a grace period.
    UnknownTopic,
    /// Retrying cannot help (authorization, invalid record, a policy).
    Permanent,
}

pub fn classify(error: &KafkaError) -> Verdict {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize) => Verdict::TooLarge,
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition | C::UnknownTopicId) => Verdict::UnknownTopic,
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::InvalidTopic
            | C::PolicyViolation
            | C::InvalidMessage,
        ) => Verdict::Permanent,
        _ => Verdict::Retry,
    }
}

/// How a record is made smaller when it does not fit: cut to at most `limit` bytes.
pub trait Fit: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// A version of at most `limit` bytes (it may be smaller), or None if none can be made.
    fn cut(&self, limit: usize) -> Option<Vec<u8>>;
}

/// Raw bytes (a dead letter's payload): the first `limit` bytes.
pub struct RawBytes<'a>(pub &'a [u8]);

impl Fit for RawBytes<'_> {
    fn bytes(&self) -> &[u8] {
        self.0
    }
    fn cut(&self, limit: usize) -> Option<Vec<u8>> {
        Some(self.0[..limit.min(self.0.len())].to_vec())
    }
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

    /// Write a dead letter; returns once Kafka acknowledged it.
    pub async fn dead_letter(&self, source: &SourceMessage, reason: DeadLetterReason, detail: &str) -> Result<(), WriteError> {
        // A redriven message that fails again keeps its first source: copies of one message
        // share one key, however often they go round.
        let (topic, partition, offset, timestamp) = source.key_source();
        let (partition, offset) = (partition.to_string(), offset.to_string());
        let timestamp = timestamp.map(|t| t.to_string()).unwrap_or_default();
        let detail = cut_at_char(detail, DETAIL_MAX_BYTES);
        let headers = |cut: bool| {
            let h = OwnedHeaders::new()
                .insert(Header { key: HEADER_REASON, value: Some(reason.as_str()) })
                .insert(Header { key: HEADER_DETAIL, value: Some(detail) })
                .insert(Header { key: HEADER_SOURCE_TOPIC, value: Some(topic) })
                .insert(Header { key: HEADER_SOURCE_PARTITION, value: Some(partition.as_str()) })
                .insert(Header { key: HEADER_SOURCE_OFFSET, value: Some(offset.as_str()) })
                .insert(Header { key: HEADER_SOURCE_TIMESTAMP, value: Some(timestamp.as_str()) })
                .insert(Header { key: HEADER_WORKER, value: Some(self.config.worker_id.as_str()) });
            if cut {
                // Only a cut letter needs the original's size and digest (rare: not per letter).
                let (size, digest) = (source.payload.len().to_string(), hex::encode(Sha256::digest(&source.payload)));
                h.insert(Header { key: HEADER_TRUNCATED, value: Some("true") })
                    .insert(Header { key: HEADER_ORIGINAL_SIZE, value: Some(size.as_str()) })
                    .insert(Header { key: HEADER_ORIGINAL_SHA256, value: Some(digest.as_str()) })
            } else {
                h
            }
        };
        self.write(&self.config.dead_letter_topic, source.key.as_deref(), &RawBytes(&source.payload), headers).await
    }

    /// Write an escalation record keyed by the message id; returns once acknowledged.
    pub async fn escalate(&self, key: &str, record: &dyn Fit) -> Result<(), WriteError> {
        self.write(&self.config.escalation_topic, Some(key.as_bytes()), record, |_| OwnedHeaders::new()).await
    }

    /// Send until acknowledged, cutting the record when it is too large, or a permanent error.
    async fn write(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        record: &dyn Fit,
        headers: impl Fn(bool) -> OwnedHeaders,
    ) -> Result<(), WriteError> {
        let permanent = |cause: String| WriteError { topic: topic.to_string(), cause };
        let mut payload: Option<Vec<u8>> = None; // Some: a cut version
        if record.bytes().len() > self.config.max_payload_bytes {
            payload = Some(self.cut(topic, record, self.config.max_payload_bytes)?);
        }
        let (mut attempt, mut unknown_since) = (0u32, None::<Instant>);
        loop {
            let bytes = payload.as_deref().unwrap_or(record.bytes());
            let mut r = FutureRecord::<[u8], [u8]>::to(topic).payload(bytes).headers(headers(payload.is_some()));
            if let Some(k) = key {
                r = r.key(k);
            }
            let error = match self.producer.send(r, Timeout::After(Duration::from_secs(30))).await {
                Ok(_) => return Ok(()),
                Err((error, _)) => error,
            };
            match classify(&error) {
                Verdict::Permanent => return Err(permanent(error.to_string())),
                Verdict::TooLarge => {
                    let now = payload.as_ref().map_or(record.bytes().len(), Vec::len);
                    if now / 2 < SMALLEST_CUT_BYTES {
                        return Err(permanent(format!("{error}, even cut to {now} bytes")));
                    }
                    payload = Some(self.cut(topic, record, now / 2)?);
                    continue;
                }
                Verdict::UnknownTopic => {
                    let since = *unknown_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.unknown_topic_grace {
                        return Err(permanent(format!("{error} for {}s: the topic does not exist", since.elapsed().as_secs())));
                    }
                }
                Verdict::Retry => unknown_since = None,
            }
            attempt += 1;
            let delay = self.config.backoff.delay(attempt);
            KafkaWriteRetried { topic, attempt, error: &error, delay }.emit(&self.counters);
            tokio::time::sleep(delay).await;
        }
    }

    fn cut(&self, topic: &str, record: &dyn Fit, limit: usize) -> Result<Vec<u8>, WriteError> {
        let cut = record
            .cut(limit)
            .ok_or_else(|| WriteError { topic: topic.to_string(), cause: format!("the record cannot be cut to {limit} bytes") })?;
        SideRecordCut { topic, original_bytes: record.bytes().len(), written_bytes: cut.len() }.emit(&self.counters);
        Ok(cut)
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn cut_at_char(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_what_retrying_can_do() {
        let produce = |c| KafkaError::MessageProduction(c);
        assert_eq!(classify(&produce(RDKafkaErrorCode::MessageSizeTooLarge)), Verdict::TooLarge);
        assert_eq!(classify(&produce(RDKafkaErrorCode::MessageBatchTooLarge)), Verdict::TooLarge);
        assert_eq!(classify(&produce(RDKafkaErrorCode::TopicAuthorizationFailed)), Verdict::Permanent);
        assert_eq!(classify(&produce(RDKafkaErrorCode::InvalidRecord)), Verdict::Permanent);
        assert_eq!(classify(&produce(RDKafkaErrorCode::UnknownTopicOrPartition)), Verdict::UnknownTopic);
        assert_eq!(classify(&produce(RDKafkaErrorCode::UnknownTopic)), Verdict::UnknownTopic);
        for transient in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            assert_eq!(classify(&produce(transient)), Verdict::Retry, "{transient:?}");
        }
    }

    #[test]
    fn the_producer_takes_every_accepted_message_and_small_limits_do_not_shrink_it() {
        assert_eq!(payload_limit(1 << 20), 1 << 20, "a 1 MiB message's dead letter is written whole");
        assert_eq!(producer_message_limit(1 << 20), (1 << 20) + HEADER_ROOM_BYTES);
        assert_eq!(producer_message_limit(2_000), 1_000_000, "never below librdkafka's default");
        assert!(payload_limit(2_000) > 900_000, "a 5 kB message over a 2 kB limit is dead-lettered whole");
    }

    /// A record that counts how often it was cut (a cut version is its first `limit` bytes).
    struct Counted(Vec<u8>, std::sync::atomic::AtomicUsize);

    impl Counted {
        fn new(bytes: Vec<u8>) -> Self {
            Counted(bytes, Default::default())
        }
        fn cuts(&self) -> usize {
            self.1.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl Fit for Counted {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
        fn cut(&self, limit: usize) -> Option<Vec<u8>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some(self.0[..limit.min(self.0.len())].to_vec())
        }
    }

    /// Side topics on a fresh mock cluster (with `topic`), writing payloads of up to `max_payload_bytes` whole.
    fn side_topics(kafka: &crate::local::LocalKafka, topic: &str, max_payload_bytes: usize) -> SideTopics {
        kafka.create_topic(topic, 1).expect("topic");
        let kafka_config = crate::local::local_kafka_config(kafka, "side-topics-test");
        // As against a cluster that does not create topics on first use (the mock would).
        let producer: FutureProducer = kafka_config
            .client(crate::config::ClientRole::SideTopics { max_message_bytes: 1 << 20 })
            .set("allow.auto.create.topics", "false")
            .set("topic.metadata.propagation.max.ms", "1000")
            .create()
            .expect("producer");
        let config = SideTopicsConfig {
            dead_letter_topic: topic.into(),
            escalation_topic: topic.into(),
            worker_id: "w".into(),
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(10)),
            max_payload_bytes,
            unknown_topic_grace: Duration::from_secs(5),
        };
        SideTopics::new(producer, config, Arc::new(Counters::default()))
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    #[test]
    fn a_record_of_exactly_the_limit_is_written_whole_and_one_byte_more_is_cut() {
        let kafka = crate::local::LocalKafka::start(1).expect("mock cluster");
        let side = side_topics(&kafka, "esc", 2_000);
        let exact = Counted::new(vec![b'x'; 2_000]);
        runtime().block_on(side.escalate("k", &exact)).expect("written");
        assert_eq!(exact.cuts(), 0, "a record of exactly the limit is not cut");
        let over = Counted::new(vec![b'x'; 2_001]);
        runtime().block_on(side.escalate("k", &over)).expect("written");
        assert_eq!(over.cuts(), 1, "one byte over the limit is cut once");
    }

    #[test]
    fn a_record_refused_as_too_large_is_halved_until_cutting_further_would_leave_too_little() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let kafka = crate::local::LocalKafka::start(1).expect("mock cluster");
        let side = side_topics(&kafka, "esc", 1 << 20);
        // Refused at every size: 4,096 -> 2,048 -> 1,024 bytes (exactly the smallest cut), and
        // 512 would be below it.
        kafka.cluster().request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 20]);
        let record = Counted::new(vec![b'x'; 4_096]);
        let error = runtime().block_on(side.escalate("k", &record)).expect_err("refused at every size");
        assert!(error.cause.contains("even cut to 1024 bytes"), "{error}");
        assert_eq!(record.cuts(), 2, "halved twice");
    }

    #[test]
    fn a_dead_letter_carries_its_reason_source_and_a_detail_cut_to_4_kib_and_a_cut_payload_says_so() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        let kafka = crate::local::LocalKafka::start(1).expect("mock cluster");
        let side = side_topics(&kafka, "dlq", 2_000);
        let payload: Vec<u8> = (0..3_000u32).map(|i| (i % 251) as u8).collect();
        let source = SourceMessage {
            topic: "tickets".into(),
            partition: 3,
            offset: 41,
            timestamp_ms: Some(1_700_000_000_000),
            key: Some(b"k1".to_vec()),
            payload: payload.clone(),
            origin: None,
        };
        let detail = "é".repeat(3_000); // 6,000 bytes, two per character
        runtime().block_on(side.dead_letter(&source, DeadLetterReason::TokenizeFailed, &detail)).expect("written");

        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("group.id", "dlq-reader")
            .create()
            .expect("consumer");
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment.add_partition_offset("dlq", 0, rdkafka::Offset::Beginning).expect("offset");
        consumer.assign(&assignment).expect("assign");
        let started = std::time::Instant::now();
        let letter = loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => break m.detach(),
                Some(Err(e)) => panic!("reading the dead letter: {e}"),
                None => assert!(started.elapsed() < Duration::from_secs(30), "no dead letter within 30 s"),
            }
        };
        let headers = letter.headers().expect("headers");
        let header =
            |key: &str| headers.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(header(HEADER_REASON).as_deref(), Some("tokenize_failed"));
        assert_eq!(header(HEADER_DETAIL).map(|d| d.len()), Some(4 * 1024), "the detail is cut to 4 KiB");
        assert_eq!(header(HEADER_SOURCE_TOPIC).as_deref(), Some("tickets"));
        assert_eq!(header(HEADER_SOURCE_PARTITION).as_deref(), Some("3"));
        assert_eq!(header(HEADER_SOURCE_OFFSET).as_deref(), Some("41"));
        assert_eq!(header(HEADER_SOURCE_TIMESTAMP).as_deref(), Some("1700000000000"));
        assert_eq!(header(HEADER_WORKER).as_deref(), Some("w"));
        assert_eq!(header(HEADER_TRUNCATED).as_deref(), Some("true"));
        assert_eq!(header(HEADER_ORIGINAL_SIZE).as_deref(), Some("3000"));
        assert_eq!(header(HEADER_ORIGINAL_SHA256), Some(hex::encode(Sha256::digest(&payload))));
        assert_eq!(letter.key(), Some(&b"k1"[..]));
        assert_eq!(letter.payload(), Some(&payload[..2_000]), "the payload's first max_payload_bytes");
        assert_eq!(HEADER_ROOM_BYTES, 64 * 1024, "the room the README promises for headers");
    }

    #[test]
    fn an_unknown_topic_is_retried_within_its_grace_and_is_permanent_after_it() {
        let kafka = crate::local::LocalKafka::start(1).expect("mock cluster");
        let mut side = side_topics(&kafka, "esc", 1 << 20);
        side.config.escalation_topic = "created-late".into();
        side.config.unknown_topic_grace = Duration::ZERO;
        let record = Counted::new(b"answer me".to_vec());
        // Bounded: a writer that never gives up on a missing topic fails here instead of hanging.
        let error = runtime()
            .block_on(async { tokio::time::timeout(Duration::from_secs(20), side.escalate("k", &record)).await })
            .expect("given up within 20 s")
            .expect_err("a topic that does not exist, no grace");
        assert!(error.cause.contains("the topic does not exist"), "{error}");

        side.config.unknown_topic_grace = Duration::from_secs(60);
        let created = std::thread::scope(|scope| {
            let writer = scope.spawn(|| runtime().block_on(side.escalate("k", &record)));
            std::thread::sleep(Duration::from_millis(500));
            kafka.create_topic("created-late", 1).expect("topic");
            writer.join().expect("writer")
        });
        created.expect("written once the topic exists, within the grace");
    }

    #[test]
    fn cuts_end_on_character_boundaries() {
        assert_eq!(cut_at_char("héllo", 2), "h");
        assert_eq!(cut_at_char("héllo", 3), "hé");
        assert_eq!(cut_at_char("abc", 10), "abc");
        assert_eq!(RawBytes(b"abcdef").cut(4).unwrap(), b"abcd");
    }
}
