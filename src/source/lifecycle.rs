//! The consumer's lifecycle, shared by `triage run`'s worker and `triage escalate`, as two
//! states:
//! - consuming: receive, hand each message to the command's [`Intake`]; pause fetching as soon
//!   as `max_in_flight` messages are consumed and not yet committed (so a crash replays at most
//!   that many), resume at half, and hold it while the intake says so (a schema registry away);
//!   commit done watermarks every `commit_every`, and at every tick while paused (a pause for
//!   want of a commit ends at the next one); export each partition's oldest unfinished age and
//!   fail readiness while one is older than `max_unfinished_age`.
//! - draining (after SIGTERM, with a deadline): the intake is closed, partitions paused, but the
//!   consumer keeps polling, so a rebalance in progress completes and commits go through; it ends
//!   when the intake's downstream finished and nothing is in flight, or at the deadline (the
//!   rest is replayed by the next owner).
//!
//! Then a last commit, retried through polling (a rebalance rejects commits until this member
//! rejoins) for a few seconds. What stops it early: the ClickHouse sink ending, or an error on
//! the fatal channel (a write that can never complete, a refusing endpoint).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use tokio::task::JoinHandle;

use super::kafka::{Committed, TrackingContext};
use super::offsets::OffsetTracker;
use crate::error::WorkerError;
use crate::settle::Settler;
use crate::sink::clickhouse::SinkError;
use crate::telemetry::events::{ConsumptionPaused, InternalEvent, MessageConsumed};
use crate::telemetry::{Readiness, IN_FLIGHT};

/// What a command does with what it consumes.
pub(crate) trait Intake {
    /// Take a message (begin it in the tracker, then hand it on or settle it).
    async fn take(&mut self, m: &BorrowedMessage<'_>);
    /// Draining starts: take nothing more, let what was taken finish.
    fn close(&mut self);
    /// After [`close`](Self::close): everything downstream finished (`sink_ended`: the
    /// ClickHouse sink flushed and ended).
    fn finished(&self, sink_ended: bool) -> bool;
    /// A reason to hold consumption besides the in-flight limit.
    fn hold(&self) -> Option<String> {
        None
    }
}

pub(crate) struct Limits {
    pub commit_every: Duration,
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
    /// Oldest unfinished message age past which a partition is stalled and readiness fails
    /// (None: the ages are exported, readiness is left to the command).
    pub max_unfinished_age: Option<Duration>,
}

impl Limits {
    /// From `[kafka]` and `[shutdown]`, with the command's own in-flight limit; `watch_stalls`:
    /// fail readiness past `kafka.max_unfinished_age_ms` (0: never).
    pub fn of(config: &crate::config::Config, max_in_flight: usize, watch_stalls: bool) -> Self {
        Limits {
            commit_every: Duration::from_millis(config.kafka.commit_interval_ms),
            max_in_flight,
            drain_timeout: Duration::from_millis(config.shutdown.drain_timeout_ms),
            max_unfinished_age: Some(Duration::from_millis(config.kafka.max_unfinished_age_ms)).filter(|d| watch_stalls && !d.is_zero()),
        }
    }
}

/// How the consumer ended.
pub(crate) struct Stopped {
    /// From the first message consumed to the last commit that moved a watermark.
    pub busy: Duration,
    /// Messages unsettled at exit (replayed by the next owner).
    pub unfinished: usize,
    pub fatal: Option<WorkerError>,
}

pub(crate) struct Lifecycle<I> {
    pub kafka: StreamConsumer<TrackingContext>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub settle: Settler,
    pub limits: Limits,
    pub readiness: Arc<Readiness>,
    pub intake: I,
}

impl<I: Intake> Lifecycle<I> {
    /// Consume until `shutdown` (then drain) or a fatal error; `sink` is the ClickHouse sink's
    /// task, `fatal` what stops the command from downstream.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        sink: JoinHandle<Result<(), SinkError>>,
        mut fatal: tokio::sync::mpsc::Receiver<WorkerError>,
    ) -> Stopped {
        let mut sink = Some(sink);
        let mut tick = tokio::time::interval(self.limits.commit_every.min(Duration::from_millis(500)));
        let mut last_commit = Instant::now();
        let (mut first_consumed, mut last_progress): (Option<Instant>, Option<Instant>) = (None, None);
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut paused = false;
        tokio::pin!(shutdown);

        let fatal = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown, if deadline.is_none() => {
                    tracing::info!("shutdown requested: draining");
                    deadline = Some(tokio::time::Instant::now() + self.limits.drain_timeout);
                    self.intake.close();
                    self.set_paused(true);
                }
                ended = async { sink.as_mut().expect("guarded").await }, if sink.is_some() => {
                    sink = None;
                    match ended {
                        // The sink flushed everything after its input closed: a drain's normal end.
                        Ok(Ok(())) if deadline.is_some() => {}
                        Ok(Ok(())) => break Some(WorkerError::SinkStopped),
                        Ok(Err(e)) => break Some(e.into()),
                        Err(e) => break Some(WorkerError::TaskFailed { task: "ClickHouse sink", detail: e.to_string() }),
                    }
                }
                Some(error) = fatal.recv() => break Some(error),
                _ = tick.tick() => {
                    let in_flight = self.in_flight();
                    metrics::gauge!(IN_FLIGHT).set(in_flight as f64);
                    self.watch_for_stalls();
                    if let Some(deadline) = deadline {
                        // Partitions assigned during the drain must not start either.
                        self.set_paused(true);
                        if self.intake.finished(sink.is_none()) && in_flight == 0 {
                            break None;
                        }
                        if tokio::time::Instant::now() >= deadline {
                            tracing::warn!(
                                drain_timeout_ms = self.limits.drain_timeout.as_millis() as u64,
                                in_flight,
                                "drain deadline passed: committing what is done; the rest will be replayed"
                            );
                            break None;
                        }
                    } else {
                        self.apply_backpressure(&mut paused);
                    }
                    if deadline.is_some() || paused || last_commit.elapsed() >= self.limits.commit_every {
                        if self.commit() == Committed::Moved {
                            last_progress = Some(Instant::now());
                        }
                        last_commit = Instant::now();
                    }
                }
                message = self.kafka.recv() => match message {
                    // While draining, a message fetched before the pause took effect is skipped:
                    // not begun, so not committed; the next owner reads it.
                    Ok(m) => if deadline.is_none() {
                        first_consumed.get_or_insert_with(Instant::now);
                        MessageConsumed { topic: m.topic() }.emit(self.settle.counters());
                        self.intake.take(&m).await;
                        // At once, not at the next tick: intake between ticks would overshoot.
                        if !paused {
                            self.apply_backpressure(&mut paused);
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "Kafka consumer error"),
                },
            }
        };

        self.intake.close();
        // Commit what is done; a rebalance in progress rejects commits until this member
        // rejoins, which needs polling: poll (paused) and retry until the deadline.
        let commit_deadline = deadline.unwrap_or_else(tokio::time::Instant::now) + Duration::from_secs(5);
        loop {
            match self.commit() {
                Committed::Moved => last_progress = Some(Instant::now()),
                Committed::Nothing => break,
                Committed::Failed if tokio::time::Instant::now() >= commit_deadline => break,
                Committed::Failed => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), self.kafka.recv()).await;
                }
            }
        }
        let unfinished = self.in_flight();
        self.kafka.unsubscribe();
        super::kafka::close_within(self.kafka, Duration::from_secs(10));
        let busy = match (first_consumed, last_progress) {
            (Some(first), Some(last)) if last > first => last - first,
            _ => Duration::ZERO,
        };
        Stopped { busy, unfinished, fatal }
    }

    /// Export each partition's oldest unfinished age; fail readiness while one is too old.
    fn watch_for_stalls(&self) {
        let ages = super::kafka::export_unfinished_ages(&self.tracker);
        let Some(limit) = self.limits.max_unfinished_age else { return };
        let stalled: Vec<String> =
            ages.iter().filter(|(_, age)| *age > limit).map(|(tp, age)| format!("{tp} ({}s)", age.as_secs())).collect();
        let reason =
            (!stalled.is_empty()).then(|| format!("oldest unfinished message older than {}s in {}", limit.as_secs(), stalled.join(", ")));
        if reason.is_some() && self.readiness.stalled.lock().map(|s| s.is_none()).unwrap_or(false) {
            tracing::warn!(reason = reason.as_deref().unwrap_or(""), "a partition is stalled: /readyz fails until it moves");
        }
        self.readiness.set_stalled(reason);
    }

    fn in_flight(&self) -> usize {
        self.tracker.lock().map(|t| t.in_flight()).unwrap_or(0)
    }

    fn apply_backpressure(&self, paused: &mut bool) {
        if let Some(reason) = self.intake.hold() {
            if !*paused {
                ConsumptionPaused { held: self.tracker.lock().map(|t| t.uncommitted()).unwrap_or(0) }.emit(self.settle.counters());
                tracing::warn!(%reason, "pausing consumption until this passes");
                *paused = true;
            }
            self.set_paused(true);
            return;
        }
        let uncommitted = self.tracker.lock().map(|t| t.uncommitted()).unwrap_or(0);
        super::kafka::apply_backpressure(&self.kafka, paused, uncommitted, self.limits.max_in_flight, self.settle.counters());
    }

    fn set_paused(&self, pause: bool) {
        super::kafka::set_paused(&self.kafka, pause);
    }

    fn commit(&self) -> Committed {
        super::kafka::commit_done(&self.kafka, &self.tracker, self.settle.counters())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_unfinished_age_ms: u64) -> crate::config::Config {
        let kafka = crate::config::KafkaConfig { max_unfinished_age_ms, commit_interval_ms: 250, ..Default::default() };
        crate::local::local_worker_config("w", kafka, Default::default(), vec![], Default::default())
    }

    #[test]
    fn stalls_are_watched_only_when_asked_and_the_age_limit_is_set() {
        let limits = Limits::of(&config(90_000), 7, true);
        assert_eq!(limits.max_unfinished_age, Some(Duration::from_secs(90)));
        assert_eq!((limits.max_in_flight, limits.commit_every), (7, Duration::from_millis(250)));
        // `triage escalate` exports the ages but leaves readiness alone.
        assert_eq!(Limits::of(&config(90_000), 7, false).max_unfinished_age, None);
        // 0 turns the watch off: every partition would otherwise count as stalled at once.
        assert_eq!(Limits::of(&config(0), 7, true).max_unfinished_age, None);
    }
}
