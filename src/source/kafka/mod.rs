//! The Kafka consumer group: rebalance handling and commit lists (client settings: [`config`]).
//!
//! Rebalance callbacks run inside librdkafka's poll and must return quickly: they never wait
//! for the pipeline. On revoke, what is already done for the revoked partitions is committed
//! (synchronously, it is quick) and the partitions are forgotten; results still in flight for
//! them are ignored when they arrive (their epoch is over) and the new owner replays them. On
//! assign, each partition gets a new epoch and consumption resumes from its committed offset.

use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

pub mod config;

use super::offsets::{OffsetTracker, TopicPartition};

pub use config::{ClientRole, KafkaConfig, SaslMechanism, SecurityProtocol};

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
