//! The Kafka consumer group: client settings from the config, and rebalance handling.
//!
//! Rebalance callbacks run inside librdkafka's poll and must return quickly: they never wait
//! for the pipeline. On revoke, what is already done for the revoked partitions is committed
//! (synchronously, it is quick) and the partitions are forgotten; results still in flight for
//! them are ignored when they arrive (their epoch is over) and the new owner replays them. On
//! assign, each partition gets a new epoch and consumption resumes from its committed offset.

use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::{OffsetTracker, TopicPartition};
use crate::config::{KafkaConfig, SaslMechanism, SecurityProtocol};

/// Settings shared by every client (consumer, producers, admin): brokers and security.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers);
    c.set(
        "security.protocol",
        match k.security_protocol {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        },
    );
    if let Some(m) = k.sasl_mechanism {
        c.set(
            "sasl.mechanism",
            match m {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            },
        );
    }
    if let Some(u) = &k.sasl_username {
        c.set("sasl.username", u);
    }
    if !k.sasl_password.expose().is_empty() {
        c.set("sasl.password", k.sasl_password.expose());
    }
    if let Some(ca) = &k.ssl_ca_location {
        c.set("ssl.ca.location", ca.display().to_string());
    }
    c
}

fn apply_properties(c: &mut ClientConfig, k: &KafkaConfig) {
    for (key, value) in &k.properties {
        c.set(key, value);
    }
}

pub fn consumer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(k);
    c.set("group.id", &k.group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Offsets are committed by the worker, only for what is done.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.auto_offset_reset)
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("max.poll.interval.ms", k.max_poll_interval_ms.to_string())
        // librdkafka's own prefetch is memory too: keep it modest (pausing bounds the rest).
        .set("queued.max.messages.kbytes", "16384")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "5000");
    apply_properties(&mut c, k);
    c
}

pub fn producer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(k);
    c.set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "5").set("compression.type", "zstd");
    apply_properties(&mut c, k);
    c
}

/// Consumer context: rebalance and commit callbacks update the shared offset tracker;
/// librdkafka's statistics feed the lag gauges and the group-joined readiness check.
pub struct TrackingContext {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub readiness: Arc<crate::telemetry::Readiness>,
}

fn tps(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements().iter().map(|e| TopicPartition::new(e.topic(), e.partition())).collect()
}

impl ClientContext for TrackingContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let joined = statistics.cgrp.as_ref().is_some_and(|g| g.state == "up");
        self.readiness.kafka_joined.store(joined, std::sync::atomic::Ordering::Relaxed);
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // librdkafka reports -1 for partitions this member does not consume.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(crate::telemetry::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        let mut commits = TopicPartitionList::new();
        let mut abandoned = 0;
        if let Ok(mut tracker) = self.tracker.lock() {
            for tp in tps(list) {
                let (offset, unfinished) = tracker.revoke(&tp);
                abandoned += unfinished;
                if let Some(offset) = offset {
                    let _ = commits.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(offset));
                }
            }
        }
        // `abandoned`: in flight here, replayed by the next owner (bounded by max_in_flight).
        tracing::info!(partitions = list.count(), committing = commits.count(), abandoned, "partitions revoked");
        if commits.count() > 0 {
            if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on revoke failed: the new owner replays from the last commit");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            if let Ok(mut tracker) = self.tracker.lock() {
                for tp in tps(list) {
                    tracker.assign(tp);
                }
            }
            tracing::info!(partitions = list.count(), "partitions assigned");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                if let Ok(mut tracker) = self.tracker.lock() {
                    for e in offsets.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            tracker.committed(&TopicPartition::new(e.topic(), e.partition()), o);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "offset commit failed; retried at the next interval"),
        }
    }
}

/// Build a commit list from (partition, next offset) pairs.
pub fn commit_list(points: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (tp, offset) in points {
        let _ = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn security_and_pass_through_properties_reach_librdkafka() {
        let k = KafkaConfig {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("svc".into()),
            sasl_password: Secret::new("pw"),
            properties: [("fetch.max.bytes".to_string(), "1048576".to_string()), ("auto.offset.reset".to_string(), "latest".to_string())]
                .into(),
            ..KafkaConfig::default()
        };
        let c = consumer_config(&k);
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.password"), Some("pw"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("partition.assignment.strategy"), Some("cooperative-sticky"));
        assert_eq!(c.get("fetch.max.bytes"), Some("1048576"));
        assert_eq!(c.get("auto.offset.reset"), Some("latest"), "pass-through properties are applied last");
    }
}
