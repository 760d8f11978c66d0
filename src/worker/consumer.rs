//! `triage run`'s intake, in the consumer lifecycle it shares with `triage escalate`
//! ([`crate::source::lifecycle`]): each message is begun in the tracker, read (a schema
//! fetched first on a task of its own), and submitted to its route's engine, or settled as a
//! dead letter. Closing the intake drops the submitters, so the engines finish what they hold
//! and stop; the intake is finished once they, the results tasks and the sink have.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::message::{BorrowedMessage, Headers, Message};
use tokio::task::JoinHandle;

use super::routes::{MessageTag, Route, RouteSubmitters, Tier};
use super::WorkerError;
use crate::engine::{Engine, Submitter};
use crate::settle::Settler;
use crate::source::decode::{Format, Step};
use crate::source::lifecycle::Intake;
use crate::source::offsets::{OffsetTracker, TopicPartition};
use crate::source::{Consumed, Origin};
use crate::telemetry::events::{DeadLetterReason, InternalEvent, ShadowDropped};

/// Open: messages go to the engines. Closed: the engines finish what they hold.
pub(super) enum Engines {
    Open { submitters: Vec<RouteSubmitters>, engines: Vec<Engine<MessageTag>> },
    Closed { engines: Vec<JoinHandle<()>> },
}

pub(super) struct WorkerIntake {
    pub engines: Engines,
    /// The results tasks (they end when their engines do).
    pub results: JoinHandle<()>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub routes: Arc<Vec<Route>>,
    pub route_of: HashMap<String, usize>,
    pub settle: Settler,
    pub readiness: Arc<crate::telemetry::Readiness>,
    /// Raised when the consumer drains or stops: tasks waiting on a schema look-up give up
    /// (their messages stay unfinished and are replayed).
    pub draining: tokio::sync::watch::Receiver<bool>,
    pub drain: tokio::sync::watch::Sender<bool>,
}

impl Intake for WorkerIntake {
    async fn take(&mut self, m: &BorrowedMessage<'_>) {
        if let Engines::Open { submitters, .. } = &self.engines {
            self.intake(m, submitters).await;
        }
    }

    fn close(&mut self) {
        self.drain.send_replace(true);
        if let Engines::Open { .. } = self.engines {
            let Engines::Open { submitters, engines } = std::mem::replace(&mut self.engines, Engines::Closed { engines: Vec::new() })
            else {
                return;
            };
            // Dropping the submitters lets the engines finish what they hold, then stop.
            drop(submitters);
            let joiners = engines.into_iter().map(|e| tokio::task::spawn_blocking(move || e.shutdown())).collect();
            self.engines = Engines::Closed { engines: joiners };
        }
    }

    fn finished(&self, sink_ended: bool) -> bool {
        let engines_done = match &self.engines {
            Engines::Closed { engines } => engines.iter().all(|j| j.is_finished()),
            Engines::Open { .. } => false,
        };
        sink_ended && self.results.is_finished() && engines_done
    }

    /// While a schema registry cannot be read, nothing more is taken in: its messages would
    /// only wait (never dead-lettered for an outage).
    fn hold(&self) -> Option<String> {
        let registry_down = self.routes.iter().filter_map(|r| r.reader.registry()).find_map(|r| r.failing());
        self.readiness.set_schema_registry(registry_down.clone());
        registry_down.map(|reason| format!("schema registry unavailable ({reason})"))
    }
}

impl WorkerIntake {
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
