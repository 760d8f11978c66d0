//! The consumer's lifecycle, as two states:
//! - `Consuming`: receive, decode, submit to the route's engine; pause fetching as soon as
//!   `max_in_flight` messages are consumed and not yet committed (so a crash replays at most
//!   that many), resume at half; commit done watermarks every `commit_interval_ms`, and at
//!   every tick while paused (a pause for want of a commit ends at the next one).
//! - `Draining` (after SIGTERM, with a deadline): intake is closed (submitters dropped, engines
//!   finishing what they hold, partitions paused) but the consumer keeps polling, so a rebalance
//!   in progress completes and commits go through; it ends when everything downstream finished
//!   and nothing is in flight, or at the deadline (the rest is replayed by the next owner).
//!
//! Then a last commit, retried through polling (a rebalance rejects commits until this member
//! rejoins) for a few seconds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use tokio::task::JoinHandle;

use super::routes::{MessageTag, Route, RouteSubmitters, Tier};
use super::WorkerError;
use crate::engine::{Engine, Submitter};
use crate::settle::Settler;
use crate::sink::clickhouse::SinkError;
use crate::source::decode::{Format, Step};
use crate::source::kafka::{Committed, TrackingContext};
use crate::source::offsets::{OffsetTracker, TopicPartition};
use crate::source::{Consumed, Origin};
use crate::telemetry::events::{ConsumptionPaused, DeadLetterReason, InternalEvent, MessageConsumed, ShadowDropped};
use crate::telemetry::IN_FLIGHT;

/// The consumer's state; intake exists only while consuming.
pub(super) enum State {
    Consuming { submitters: Vec<RouteSubmitters>, engines: Vec<Engine<MessageTag>>, paused: bool },
    Draining { deadline: tokio::time::Instant, engines: Vec<JoinHandle<()>> },
}

impl State {
    /// Close intake: dropping the submitters lets the engines finish what they hold, then stop.
    fn drain(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let previous = std::mem::replace(self, State::Draining { deadline, engines: Vec::new() });
        if let State::Consuming { submitters, engines, .. } = previous {
            drop(submitters);
            let joiners = engines.into_iter().map(|e| tokio::task::spawn_blocking(move || e.shutdown())).collect();
            *self = State::Draining { deadline, engines: joiners };
        }
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        match self {
            State::Draining { deadline, .. } => Some(*deadline),
            State::Consuming { .. } => None,
        }
    }
}

/// The tasks downstream of the engines.
pub(super) struct Downstream {
    pub sink: JoinHandle<Result<(), SinkError>>,
    pub results: JoinHandle<()>,
    /// What stops the worker from downstream (a side-topic write that can never complete, a
    /// failing inference backend).
    pub fatal: tokio::sync::mpsc::Receiver<WorkerError>,
}

pub(super) struct Limits {
    pub commit_every: Duration,
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
    /// Oldest unfinished message age past which a partition is stalled (None: never).
    pub max_unfinished_age: Option<Duration>,
}

/// How the consumer ended.
pub(super) struct Stopped {
    /// From the first message consumed to the last commit that moved a watermark.
    pub busy: Duration,
    /// Messages unsettled at exit (replayed by the next owner).
    pub unfinished: usize,
    pub fatal: Option<WorkerError>,
}

pub(super) struct Consumer {
    pub kafka: StreamConsumer<TrackingContext>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub routes: Arc<Vec<Route>>,
    pub route_of: HashMap<String, usize>,
    pub settle: Settler,
    pub limits: Limits,
    pub readiness: Arc<crate::telemetry::Readiness>,
    /// Raised when the consumer drains or stops: tasks waiting on a schema look-up give up
    /// (their messages stay unfinished and are replayed).
    pub draining: tokio::sync::watch::Receiver<bool>,
    pub drain: tokio::sync::watch::Sender<bool>,
}

impl Consumer {
    pub async fn run(self, shutdown: impl Future<Output = ()>, mut state: State, downstream: Downstream) -> Stopped {
        let Downstream { sink, results, mut fatal } = downstream;
        let mut sink = Some(sink);
        let mut tick = tokio::time::interval(self.limits.commit_every.min(Duration::from_millis(500)));
        let mut last_commit = Instant::now();
        let (mut first_consumed, mut last_progress): (Option<Instant>, Option<Instant>) = (None, None);
        tokio::pin!(shutdown);

        let fatal = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown, if state.deadline().is_none() => {
                    tracing::info!("shutdown requested: draining");
                    self.drain.send_replace(true);
                    state.drain(self.limits.drain_timeout);
                    self.set_paused(true);
                }
                ended = async { sink.as_mut().expect("guarded").await }, if sink.is_some() => {
                    sink = None;
                    match ended {
                        // The sink flushed everything after its input closed: a drain's normal end.
                        Ok(Ok(())) if state.deadline().is_some() => {}
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
                    match &mut state {
                        State::Draining { deadline, engines } => {
                            // Partitions assigned during the drain must not start either.
                            self.set_paused(true);
                            let downstream_done = sink.is_none() && results.is_finished() && engines.iter().all(|j| j.is_finished());
                            if downstream_done && in_flight == 0 {
                                break None;
                            }
                            if tokio::time::Instant::now() >= *deadline {
                                tracing::warn!(
                                    drain_timeout_ms = self.limits.drain_timeout.as_millis() as u64,
                                    in_flight,
                                    "drain deadline passed: committing what is done; the rest will be replayed"
                                );
                                break None;
                            }
                        }
                        State::Consuming { paused, .. } => self.apply_backpressure(paused),
                    }
                    let paused = matches!(state, State::Consuming { paused: true, .. });
                    if state.deadline().is_some() || paused || last_commit.elapsed() >= self.limits.commit_every {
                        if self.commit() == Committed::Moved {
                            last_progress = Some(Instant::now());
                        }
                        last_commit = Instant::now();
                    }
                }
                message = self.kafka.recv() => match message {
                    // While draining, a message fetched before the pause took effect is skipped:
                    // not begun, so not committed; the next owner reads it.
                    Ok(m) => if let State::Consuming { submitters, paused, .. } = &mut state {
                        first_consumed.get_or_insert_with(Instant::now);
                        MessageConsumed { topic: m.topic() }.emit(self.settle.counters());
                        self.intake(&m, submitters).await;
                        // At once, not at the next tick: intake between ticks would overshoot.
                        if !*paused {
                            self.apply_backpressure(paused);
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "Kafka consumer error"),
                },
            }
        };

        self.drain.send_replace(true);
        // Commit what is done; a rebalance in progress rejects commits until this member
        // rejoins, which needs polling: poll (paused) and retry until the deadline.
        let commit_deadline = state.deadline().unwrap_or_else(tokio::time::Instant::now) + Duration::from_secs(5);
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
        crate::source::kafka::close_within(self.kafka, Duration::from_secs(10));
        let busy = match (first_consumed, last_progress) {
            (Some(first), Some(last)) if last > first => last - first,
            _ => Duration::ZERO,
        };
        Stopped { busy, unfinished, fatal }
    }

    /// Export each partition's oldest unfinished age; fail readiness while one is too old.
    fn watch_for_stalls(&self) {
        let mut stalled = Vec::new();
        for (tp, age) in crate::source::kafka::export_unfinished_ages(&self.tracker) {
            if self.limits.max_unfinished_age.is_some_and(|limit| age > limit) {
                stalled.push(format!("{tp} ({}s)", age.as_secs()));
            }
        }
        let reason = (!stalled.is_empty()).then(|| {
            format!(
                "oldest unfinished message older than {}s in {}",
                self.limits.max_unfinished_age.map_or(0, |l| l.as_secs()),
                stalled.join(", ")
            )
        });
        if reason.is_some() && self.readiness.stalled.lock().map(|s| s.is_none()).unwrap_or(false) {
            tracing::warn!(reason = reason.as_deref().unwrap_or(""), "a partition is stalled: /readyz fails until it moves");
        }
        self.readiness.set_stalled(reason);
    }

    fn in_flight(&self) -> usize {
        self.tracker.lock().map(|t| t.in_flight()).unwrap_or(0)
    }

    fn apply_backpressure(&self, paused: &mut bool) {
        // While a schema registry cannot be read, nothing more is taken in: its messages would
        // only wait (never dead-lettered for an outage).
        let registry_down = self.routes.iter().filter_map(|r| r.reader.registry()).find_map(|r| r.failing());
        self.readiness.set_schema_registry(registry_down.clone());
        if let Some(reason) = registry_down {
            if !*paused {
                ConsumptionPaused { held: self.tracker.lock().map(|t| t.uncommitted()).unwrap_or(0) }.emit(self.settle.counters());
                tracing::warn!(%reason, "schema registry unavailable: pausing consumption until it answers");
                *paused = true;
            }
            self.set_paused(true);
            return;
        }
        let uncommitted = self.tracker.lock().map(|t| t.uncommitted()).unwrap_or(0);
        crate::source::kafka::apply_backpressure(&self.kafka, paused, uncommitted, self.limits.max_in_flight, self.settle.counters());
    }

    /// Begin a message in the tracker, then hand it to its route's engine, or settle it as a
    /// dead letter when it cannot be classified. A message whose schema must be looked up first
    /// waits on a task of its own, so a slow or absent registry never blocks this loop (commits,
    /// rebalances and SIGTERM go on; consumption pauses while the registry is away).
    async fn intake(&self, m: &BorrowedMessage<'_>, submitters: &[RouteSubmitters]) {
        let tp = TopicPartition::new(m.topic(), m.partition());
        let Some(delivery) = self.tracker.lock().ok().and_then(|mut t| t.begin(&tp, m.offset(), 1)) else {
            tracing::debug!(%tp, offset = m.offset(), "message of a partition no longer assigned: skipped (its owner reads it)");
            return;
        };
        let header = |name: &str| m.headers().and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value));
        // Redrive sends a dead letter back to the topic it came from: an origin naming another
        // topic is not one of ours.
        let origin = Origin::from_headers(header).filter(|o| o.topic == m.topic());
        let message = Arc::new(crate::source::kafka::source_message(m, origin));
        let consumed = Consumed { delivery, message };
        let Some(&route_index) = self.route_of.get(m.topic()) else {
            self.settle.dead_letter(consumed, DeadLetterReason::Unrouted, "no route for this topic".into());
            return;
        };
        let reader = self.routes[route_index].reader.clone();
        match reader.read(&consumed.message.payload) {
            Step::Fetch(id) => {
                let submitter = RouteSubmitters {
                    primary: submitters[route_index].primary.clone(),
                    shadow: submitters[route_index].shadow.clone(),
                    canary: submitters[route_index].canary.clone(),
                };
                let (routes, settle, mut draining) = (self.routes.clone(), self.settle.clone(), self.draining.clone());
                tokio::spawn(async move {
                    let fetched = tokio::select! {
                        fetched = reader.fetch(id) => fetched,
                        // Shutting down: the message stays unfinished, the next owner reads it.
                        _ = draining.wait_for(|d| *d) => return,
                    };
                    if let Err(refused) = fetched {
                        tracing::error!(error = %refused, "the schema registry refuses triage: stopping");
                        return settle.stop(WorkerError::SchemaRegistry(refused.to_string()));
                    }
                    match reader.read(&consumed.message.payload) {
                        Step::Record(record) => submit(&routes, route_index, consumed, record, &submitter, &settle).await,
                        Step::Bad(e) => settle.dead_letter(consumed, DeadLetterReason::Decode(e.reason), e.detail),
                        // Read and dropped again already (a cache smaller than the ids in use):
                        // left unfinished, replayed by the next owner, and the cache is a setting.
                        Step::Fetch(id) => tracing::warn!(
                            schema_id = id,
                            "schema dropped from the cache as soon as read: raise schema_registry.max_schemas"
                        ),
                    }
                });
            }
            Step::Record(record) => submit(&self.routes, route_index, consumed, record, &submitters[route_index], &self.settle).await,
            Step::Bad(e) => self.settle.dead_letter(consumed, DeadLetterReason::Decode(e.reason), e.detail),
        }
    }

    fn set_paused(&self, pause: bool) {
        crate::source::kafka::set_paused(&self.kafka, pause);
    }

    fn commit(&self) -> Committed {
        crate::source::kafka::commit_done(&self.kafka, &self.tracker, self.settle.counters())
    }
}

/// A record of a route: through its first tier's field map and template to its engine, or to the
/// dead-letter topic when it has no text.
async fn submit(
    routes: &[Route],
    route_index: usize,
    consumed: Consumed,
    record: serde_json::Value,
    submitters: &RouteSubmitters,
    settle: &Settler,
) {
    let route = &routes[route_index];
    if let (Some(shadow), Some(submitter)) = (&route.shadow, &submitters.shadow) {
        if route.shadows(&consumed.message) {
            submit_to_shadow(route, route_index, &consumed, &record, shadow, submitter, settle);
        }
    }
    // The canary answers its share for real, in the first tier's place.
    let (submitter, tier_model) = match (&route.canary, &submitters.canary) {
        (Some(canary), Some(submitter)) if route.canaries(&consumed.message) => (submitter, canary.current()),
        // The version that renders the text is the one that classifies it (a reload may come between).
        _ => (&submitters.primary, route.first().current()),
    };
    // Kept for later tiers and the escalation record when the payload is not itself JSON.
    let keep = (route.reader.format() != Format::Json).then(|| Arc::new(record.clone()));
    match tier_model.decoder.decode_value(record) {
        Ok(decoded) => {
            let tag = first_tag(route, route_index, consumed, &decoded, tier_model.clone(), false, keep);
            let submitted = match &tier_model.generation {
                Some(generation) => submitter.submit_async_to(generation, tag, decoded.text).await,
                None => submitter.submit_async(tag, decoded.text).await,
            };
            if let Err(closed) = submitted {
                tracing::error!(offset = closed.0.message.message.offset, "engine stopped; the message will be replayed");
            }
        }
        Err(e) => settle.dead_letter(consumed, DeadLetterReason::Decode(e.reason), e.detail),
    }
}

/// A copy of a message for the route's shadow model, if its engine has room right now: the
/// shadow never makes the consumer wait, and nothing settles its copy (the primary's answer is
/// what commits the offset).
fn submit_to_shadow(
    route: &Route,
    route_index: usize,
    consumed: &Consumed,
    record: &serde_json::Value,
    shadow: &Tier,
    submitter: &Submitter<MessageTag>,
    settle: &Settler,
) {
    let model = shadow.current();
    let Ok(decoded) = model.decoder.decode_value(record.clone()) else { return };
    let tag = first_tag(route, route_index, consumed.clone(), &decoded, model.clone(), true, None);
    let submitted = match &model.generation {
        Some(generation) => submitter.try_submit_to(generation, tag, decoded.text),
        None => Err(crate::engine::EngineClosed(tag)),
    };
    if submitted.is_err() {
        ShadowDropped { kind: &route.config.kind, reason: "queue_full" }.emit(settle.counters());
    }
}

/// The tag of a message entering its route's first model (or its shadow / canary).
fn first_tag(
    route: &Route,
    route_index: usize,
    consumed: Consumed,
    decoded: &crate::message::DecodedMessage,
    model: Arc<super::routes::TierModel>,
    shadow: bool,
    record: Option<Arc<serde_json::Value>>,
) -> MessageTag {
    let (topic, partition, offset, timestamp_ms) = consumed.message.key_source();
    MessageTag {
        message_id: decoded.id.clone().unwrap_or_else(|| format!("{topic}-{partition}-{offset}")),
        metadata: decoded.metadata(&route.config.metadata),
        event_time_ms: decoded.event_time_ms.or(timestamp_ms).unwrap_or(0),
        consumed_ms: crate::time::now_ms(),
        route: route_index,
        message: consumed,
        tier: 0,
        earlier: Vec::new(),
        versions: vec![model],
        shadow,
        record,
    }
}
