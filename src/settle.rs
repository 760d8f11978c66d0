//! The ONE path by which a consumed message becomes done. Whatever happens to a message, it
//! ends here as exactly one or more of: its row stored in ClickHouse, its dead letter
//! acknowledged by Kafka, its escalation record acknowledged by Kafka. Each outcome is written
//! until acknowledged, then acknowledged in the offset tracker, then emitted as an event. The
//! no-loss argument is therefore this file: the tracker never sees an acknowledgement for a
//! write that did not complete, so a commit covers only what is done (never an offset stored
//! past a rejected event).
//!
//! A message that needs more than one outcome (a row AND an escalation) asks the tracker for
//! the extra acknowledgement BEFORE the extra write starts, so the row cannot finish it early.
//!
//! A write that can never complete (a side topic deleted or forbidden) is not acknowledged: it
//! is reported on the fatal channel and the worker stops, committing only below it.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::error::WorkerError;
use crate::sink::clickhouse::{ResultRow, Settle};
use crate::sink::kafka::{Fit, SideTopics, WriteError};
use crate::source::offsets::{AckResult, Delivery, OffsetTracker};
use crate::source::Consumed;
use crate::telemetry::events::{Counters, DeadLetterReason, DeadLettered, Escalated, EscalationReason, InternalEvent, RowStored};

/// Cheap to clone: every stage that settles holds one.
#[derive(Clone)]
pub struct Settler {
    side_topics: Arc<SideTopics>,
    tracker: Arc<Mutex<OffsetTracker>>,
    counters: Arc<Counters>,
    fatal: mpsc::Sender<WorkerError>,
}

impl Settler {
    /// `fatal` receives writes that can never complete; the worker stops on the first.
    pub fn new(
        side_topics: Arc<SideTopics>,
        tracker: Arc<Mutex<OffsetTracker>>,
        counters: Arc<Counters>,
        fatal: mpsc::Sender<WorkerError>,
    ) -> Self {
        Settler { side_topics, tracker, counters, fatal }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Settle a message as a dead letter: written (original bytes and key, reason headers),
    /// then acknowledged.
    pub fn dead_letter(&self, message: Consumed, reason: DeadLetterReason, detail: String) {
        let side_topics = self.side_topics.clone();
        let source = message.message.clone();
        let logged = detail.clone();
        self.after(message.delivery, async move { side_topics.dead_letter(&source, reason, &detail).await }, move |counters| {
            let m = &message.message;
            DeadLettered { reason, topic: &m.topic, partition: m.partition, offset: m.offset, detail: &logged }.emit(counters)
        });
    }

    /// Add an escalation to a message that will also be settled another way (its row). Returns
    /// false when the message's partition was revoked meanwhile: the next owner redoes it all.
    pub fn escalate(&self, message: &Consumed, key: String, record: impl Fit + 'static, kind: String, reason: EscalationReason) -> bool {
        let added = self.tracker.lock().map(|mut t| t.add_acks(&message.delivery, 1)).unwrap_or(false);
        if added {
            let side_topics = self.side_topics.clone();
            self.after(message.delivery.clone(), async move { side_topics.escalate(&key, &record).await }, move |counters| {
                Escalated { kind: &kind, reason }.emit(counters)
            });
        }
        added
    }

    /// Run `write` to completion (it retries until acknowledged), then acknowledge and emit;
    /// or, when it can never complete, leave the message unacknowledged and report it.
    fn after(
        &self,
        delivery: Delivery,
        write: impl Future<Output = Result<(), WriteError>> + Send + 'static,
        emit: impl FnOnce(&Counters) + Send + 'static,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            match write.await {
                Ok(()) => {
                    emit(&this.counters);
                    this.ack(&delivery);
                }
                Err(error) => {
                    tracing::error!(%error, tp = %delivery.tp, offset = delivery.offset, "a side-topic write cannot complete: stopping");
                    this.stop(error.into());
                }
            }
        });
    }

    /// Stop the worker: something no message can get past. The messages concerned stay
    /// unacknowledged, so nothing past them is committed.
    pub fn stop(&self, error: WorkerError) {
        // One report is enough; a full channel already holds one.
        let _ = self.fatal.try_send(error);
    }

    /// Settle a message that needed no write (`triage escalate`: already answered).
    pub fn done(&self, delivery: &Delivery) {
        self.ack(delivery);
    }

    fn ack(&self, delivery: &Delivery) {
        if let Ok(mut tracker) = self.tracker.lock() {
            if tracker.ack(delivery) == AckResult::Stale {
                tracing::debug!(tp = %delivery.tp, offset = delivery.offset, "late acknowledgement of a revoked assignment ignored");
            }
        }
    }
}

/// The ClickHouse sink reports each row here: stored rows are done; rejected rows become dead
/// letters (the row is the message's only outcome that failed, so the message is not lost).
impl Settle<Consumed> for Settler {
    fn stored(&self, message: Consumed, row: &ResultRow) {
        let waited_ms = crate::time::now_ms().saturating_sub(row.consumed_time_ms);
        RowStored { kind: &row.kind, waited: std::time::Duration::from_millis(waited_ms) }.emit(&self.counters);
        self.ack(&message.delivery);
    }

    fn rejected(&self, message: Consumed, error: &str) {
        self.dead_letter(message, DeadLetterReason::ClickhouseRejected, format!("ClickHouse rejected the row: {error}"));
    }
}
