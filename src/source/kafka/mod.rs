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
use rdkafka::{Offset, TopicPartitionList};

pub mod config;
pub mod topics;

use super::offsets::{OffsetTracker, TopicPartition};

pub use config::{ClientRole, KafkaConfig, SaslMechanism, SecurityProtocol};

/// Consumer context: the rebalance callbacks update the shared offset tracker;
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

/// What a revoke leaves, over its partitions (see [`Revoked`](super::offsets::Revoked)).
#[derive(Debug, Default, PartialEq, Eq)]
struct RevokeTally {
    abandoned: usize,
    replayed: usize,
    uncommitted_done: usize,
}

/// Revoke `partitions` in the tracker: the commits still to make for them, and the tally the
/// revoke's log line reports.
fn revoke_all(tracker: &mut OffsetTracker, partitions: &[TopicPartition]) -> (TopicPartitionList, RevokeTally) {
    let (mut commits, mut tally) = (TopicPartitionList::new(), RevokeTally::default());
    for tp in partitions {
        let revoked = tracker.revoke(tp);
        tally.abandoned += revoked.unfinished;
        tally.replayed += revoked.replayed;
        tally.uncommitted_done += revoked.uncommitted_done;
        if let Some(offset) = revoked.commit {
            let _ = commits.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(offset));
        }
    }
    (commits, tally)
}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        for tp in tps(list) {
            // Another member owns these now: series left at their last value would be counted
            // twice by `sum by (topic)` (the exporter cannot drop one series; 0 adds nothing).
            let labels = [("topic", tp.topic.clone()), ("partition", tp.partition.to_string())];
            for gauge in [crate::telemetry::CONSUMER_LAG, crate::telemetry::COMMITTED_OFFSET, crate::telemetry::OLDEST_UNFINISHED] {
                metrics::gauge!(gauge, &labels).set(0.0);
            }
        }
        let (commits, mut tally) = match self.tracker.lock() {
            Ok(mut tracker) => revoke_all(&mut tracker, &tps(list)),
            Err(_) => (TopicPartitionList::new(), RevokeTally::default()),
        };
        if commits.count() > 0 {
            if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
                // Seen when the group has moved on (a generation this member no longer holds).
                let uncommitted_done = tally.uncommitted_done;
                tracing::warn!(error = %e, uncommitted_done, "commit on revoke failed: the new owner replays from the last commit");
                tally.replayed += uncommitted_done;
            }
        }
        // `abandoned`: in flight here (their results are still written); `replayed`: what the
        // next owner reads again. Both bounded by max_in_flight.
        let RevokeTally { abandoned, replayed, .. } = tally;
        tracing::info!(partitions = list.count(), committing = commits.count(), abandoned, replayed, "partitions revoked");
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
    // No commit_callback: every commit is synchronous (`commit_done` records what went
    // through, the revoke's concerns partitions already out of the tracker).
}

/// A consumed Kafka message as the pipeline keeps it (owned bytes; `origin` for a redriven one).
pub fn source_message(m: &rdkafka::message::BorrowedMessage<'_>, origin: Option<super::Origin>) -> super::SourceMessage {
    use rdkafka::message::Message;
    super::SourceMessage {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        origin,
    }
}

/// Pause (or resume) every partition assigned to `consumer`; partitions assigned while paused
/// need the call again (callers repeat it on their tick).
pub fn set_paused<C: ConsumerContext>(consumer: &rdkafka::consumer::StreamConsumer<C>, pause: bool) {
    let Ok(assignment) = consumer.assignment() else { return };
    if assignment.count() == 0 {
        return;
    }
    let result = if pause { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
    if let Err(e) = result {
        tracing::warn!(error = %e, pause, "pause/resume failed");
    }
}

/// Pause consumption when `held` (messages the caller holds: unfinished, or not yet committed)
/// reaches `max`, resume at half of it (hysteresis, so a consumer near the limit does not
/// flap), and keep partitions assigned while paused paused. `paused` is the caller's state.
pub fn apply_backpressure<C: ConsumerContext>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    paused: &mut bool,
    held: usize,
    max: usize,
    counters: &crate::telemetry::events::Counters,
) {
    use crate::telemetry::events::{ConsumptionPaused, ConsumptionResumed, InternalEvent};
    if !*paused && held >= max {
        ConsumptionPaused { held }.emit(counters);
        set_paused(consumer, true);
        *paused = true;
    } else if *paused && held <= max / 2 {
        ConsumptionResumed { held }.emit(counters);
        set_paused(consumer, false);
        *paused = false;
    } else if *paused {
        // Partitions assigned while paused must not run ahead.
        set_paused(consumer, true);
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Nothing,
    Moved,
    Failed,
}

/// Commit every partition's done watermark that moved. Synchronous, so the tracker knows
/// exactly what is committed; one broker round trip per call (block_in_place keeps the
/// runtime's other tasks running).
pub fn commit_done<C: ConsumerContext>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    tracker: &Mutex<OffsetTracker>,
    counters: &crate::telemetry::events::Counters,
) -> Committed {
    use crate::telemetry::events::{InternalEvent, OffsetCommitted};
    let points = match tracker.lock() {
        Ok(t) => t.committable(),
        Err(_) => return Committed::Failed,
    };
    if points.is_empty() {
        return Committed::Nothing;
    }
    match tokio::task::block_in_place(|| consumer.commit(&commit_list(&points), CommitMode::Sync)) {
        Ok(()) => {
            if let Ok(mut t) = tracker.lock() {
                for (tp, offset) in &points {
                    t.committed(tp, *offset);
                    OffsetCommitted { topic: &tp.topic, partition: tp.partition, offset: *offset }.emit(counters);
                }
            }
            Committed::Moved
        }
        Err(e) => {
            tracing::warn!(error = %e, "offset commit failed; retried");
            Committed::Failed
        }
    }
}

/// Export each partition's oldest unfinished age (`triage_oldest_unfinished_seconds`, what
/// `TriagePartitionStalled` watches) and return them; the worker and `triage escalate` alike.
pub fn export_unfinished_ages(tracker: &Mutex<OffsetTracker>) -> Vec<(TopicPartition, std::time::Duration)> {
    let ages = match tracker.lock() {
        Ok(t) => t.oldest_unfinished(crate::time::now_ms()),
        Err(_) => return Vec::new(),
    };
    ages.into_iter()
        .map(|(tp, age_ms)| {
            let age = std::time::Duration::from_millis(age_ms.unwrap_or(0));
            metrics::gauge!(crate::telemetry::OLDEST_UNFINISHED, "topic" => tp.topic.clone(), "partition" => tp.partition.to_string())
                .set(age.as_secs_f64());
            (tp, age)
        })
        .collect()
}

/// Leave the group and close the consumer, but give up waiting after `timeout`: librdkafka's
/// close waits for the group coordinator (LeaveGroup, the last revoke), and a coordinator that
/// does not answer would otherwise hold the process past its grace period. Everything done is
/// committed before this is called; an unfinished close only means the group notices the member
/// gone after `session.timeout.ms` instead of at once.
pub fn close_within<C: Send + 'static>(consumer: C, timeout: std::time::Duration) {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new().name("kafka-close".into()).spawn(move || {
        drop(consumer);
        let _ = done_tx.send(());
    });
    if spawned.is_ok() && done_rx.recv_timeout(timeout).is_err() {
        tracing::warn!(
            timeout_s = timeout.as_secs(),
            "the Kafka consumer did not close in time; exiting anyway (the group rebalances after session.timeout.ms)"
        );
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

/// Topics the worker writes to that the cluster does not have.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "Kafka topic{} {} do{} not exist: triage writes {} there and does not create topics. Create {} first (e.g. `kafka-topics.sh --create --topic NAME --partitions 3 --replication-factor 3`, or a Strimzi KafkaTopic resource), or point kafka.dead_letter_topic / kafka.escalation_topic at existing ones",
    if missing.len() > 1 { "s" } else { "" },
    missing.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(" and "),
    if missing.len() > 1 { "" } else { "es" },
    if missing.len() > 1 { "dead letters and escalations" } else { "records" },
    if missing.len() > 1 { "them" } else { "it" },
)]
pub struct MissingTopics {
    pub missing: Vec<String>,
}

/// Which of `wanted` a metadata answer lacks: absent from it, or present with an error code
/// meaning it does not exist. Other per-topic errors (a leader election) count as present:
/// the topic exists and writes will be retried.
pub fn missing_topics(wanted: &[&str], answer: &[(String, Option<rdkafka::types::RDKafkaRespErr>)]) -> Vec<String> {
    use rdkafka::types::RDKafkaRespErr as E;
    wanted
        .iter()
        .filter(|w| match answer.iter().find(|(name, _)| name == *w) {
            None => true,
            Some((_, Some(E::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART | E::RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC))) => true,
            Some(_) => false,
        })
        .map(|w| w.to_string())
        .collect()
}

/// Ask the cluster whether `topics` exist, with a metadata request that does not create them.
pub fn check_topics_exist(config: &KafkaConfig, topics: &[&str], timeout: std::time::Duration) -> Result<(), CheckTopicsError> {
    let mut client = config.client(ClientRole::Observer);
    client.set("allow.auto.create.topics", "false");
    let consumer: BaseConsumer = client.create()?;
    let mut answer = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        answer.extend(metadata.topics().iter().map(|t| (t.name().to_string(), t.error())));
    }
    let missing = missing_topics(topics, &answer);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CheckTopicsError::Missing(MissingTopics { missing }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckTopicsError {
    #[error(transparent)]
    Missing(#[from] MissingTopics),
    #[error("asking Kafka which topics exist: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

#[cfg(test)]
mod tests {
    use rdkafka::types::RDKafkaRespErr as E;

    use super::super::offsets::AckResult;
    use super::*;

    #[test]
    fn a_revoke_commits_what_is_done_and_tallies_what_the_next_owner_reads_again() {
        let (a, b, idle) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1), TopicPartition::new("t", 2));
        let mut tracker = OffsetTracker::new();
        [&a, &b, &idle].into_iter().for_each(|tp| {
            tracker.assign(tp.clone());
        });
        // a: 0 and 1 done, 2..5 unfinished; b: 0..3 done; idle: nothing consumed.
        let on_a: Vec<_> = (0..5).map(|o| tracker.begin(&a, o, 1).unwrap()).collect();
        on_a[..2].iter().for_each(|d| assert_eq!(tracker.ack(d), AckResult::Done));
        for o in 0..3 {
            let d = tracker.begin(&b, o, 1).unwrap();
            assert_eq!(tracker.ack(&d), AckResult::Done);
        }
        let (commits, tally) = revoke_all(&mut tracker, &[a.clone(), b.clone(), idle]);
        assert_eq!(tally, RevokeTally { abandoned: 3, replayed: 3, uncommitted_done: 5 });
        let commits: Vec<_> = commits.elements().iter().map(|e| (e.partition(), e.offset())).collect();
        assert_eq!(commits, [(0, Offset::Offset(2)), (1, Offset::Offset(3))], "done prefixes only; nothing for the idle one");
        assert_eq!(tracker.in_flight(), 3, "the abandoned messages are still in the pipeline");
    }

    #[test]
    fn a_topic_is_missing_when_absent_or_unknown_but_not_when_merely_unavailable() {
        let answer = vec![
            ("dead".to_string(), None),
            ("esc".to_string(), Some(E::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)),
            ("electing".to_string(), Some(E::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE)),
        ];
        assert_eq!(missing_topics(&["dead", "electing"], &answer), Vec::<String>::new());
        assert_eq!(missing_topics(&["dead", "esc", "gone"], &answer), vec!["esc".to_string(), "gone".to_string()]);
    }

    #[test]
    fn the_error_names_each_missing_topic_and_how_to_create_it() {
        let one = MissingTopics { missing: vec!["triage.escalations".into()] }.to_string();
        assert!(one.starts_with("Kafka topic `triage.escalations` does not exist"), "{one}");
        assert!(one.contains("kafka-topics.sh --create"), "{one}");
        let two = MissingTopics { missing: vec!["a".into(), "b".into()] }.to_string();
        assert!(two.starts_with("Kafka topics `a` and `b` do not exist"), "{two}");
    }

    /// Stands in for a consumer whose close (its drop) blocks: on `release`, or forever.
    struct ClosingConsumer {
        release: std::sync::mpsc::Receiver<()>,
        closed: std::sync::mpsc::Sender<()>,
    }

    impl Drop for ClosingConsumer {
        fn drop(&mut self) {
            if self.release.recv().is_ok() {
                let _ = self.closed.send(());
            }
        }
    }

    /// Runs `close_within` on its own thread; what it sends once `close_within` has returned.
    fn close_in_background(consumer: ClosingConsumer, limit: std::time::Duration) -> std::sync::mpsc::Receiver<()> {
        let (returned_tx, returned) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            close_within(consumer, limit);
            let _ = returned_tx.send(());
        });
        returned
    }

    #[test]
    fn a_close_that_never_ends_is_given_up_at_the_limit() {
        let (_never_released, release) = std::sync::mpsc::channel();
        let (closed, _) = std::sync::mpsc::channel();
        let returned = close_in_background(ClosingConsumer { release, closed }, std::time::Duration::from_millis(100));
        // The bound only keeps a broken build from hanging the suite; the limit is 100 ms.
        assert!(returned.recv_timeout(std::time::Duration::from_secs(60)).is_ok(), "close_within waited past its limit");
    }

    #[test]
    fn a_close_that_ends_within_the_limit_is_waited_for() {
        let (release_tx, release) = std::sync::mpsc::channel();
        let (closed, closed_rx) = std::sync::mpsc::channel();
        let returned = close_in_background(ClosingConsumer { release, closed }, std::time::Duration::from_secs(600));
        // Still closing: close_within must not have returned (it would exit before LeaveGroup).
        assert!(returned.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "close_within returned before the consumer closed");
        release_tx.send(()).unwrap();
        assert!(returned.recv_timeout(std::time::Duration::from_secs(60)).is_ok(), "close_within returned");
        assert!(closed_rx.try_recv().is_ok(), "the consumer closed before close_within returned");
    }
}
