//! `triage run`: Kafka -> decode -> engine (tokenize, batch, infer) -> ClickHouse, with dead
//! letters and escalations on the side, and offsets committed only for what is done.
//!
//! Tasks: the consumer loop (this task: receive, decode, submit; pause/resume; commit), one
//! engine per model (threads), the results task (rows, escalations, failures), the ClickHouse
//! sink, and short-lived tasks for each Kafka write. Acknowledgements flow into the offset
//! tracker; the consumer loop commits its watermarks every `commit_interval_ms`.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::{Config, RouteConfig};
use crate::engine::{Classified, ClassifyError, Engine, Outcome, Submitter};
use crate::message::Decoder;
use crate::model::{HeadOutput, Model, ModelError, ModelInfo};
use crate::retry::Backoff;
use crate::sink::clickhouse::{self as ch, Acknowledge, ClickHouseService, ResultRow, SinkError, SinkItem};
use crate::sink::kafka::{KafkaSink, SourceMessage};
use crate::source::kafka::{commit_list, consumer_config, producer_config, TrackingContext};
use crate::source::offsets::{AckResult, Delivery, OffsetTracker, TopicPartition};
use crate::telemetry::{self, Readiness};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("{0}")]
    Startup(String),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
}

/// What one run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunReport {
    pub consumed: u64,
    pub rows_inserted: u64,
    pub dead_lettered: u64,
    pub escalated: u64,
    pub seconds: f64,
    /// From the first message consumed to the last commit that moved a watermark: the time
    /// the backlog took, without start-up, group join and shutdown.
    pub busy_seconds: f64,
    /// Messages still unfinished at exit (replayed by the next owner).
    pub unfinished: usize,
    /// Batching and inference counters, summed over the models.
    pub engine: crate::engine::StatsSnapshot,
}

/// Everything the pipeline needs to know about a message besides its text.
pub struct MessageTag {
    delivery: Delivery,
    source: Arc<SourceMessage>,
    route: usize,
    message_id: String,
    event_time_ms: i64,
    consumed_ms: u64,
    metadata: (Vec<String>, Vec<String>),
}

/// What the results side needs to know about a route. Submitters are kept apart (only the
/// consumer loop holds them), so dropping them at shutdown is what closes the engines.
struct Route {
    config: RouteConfig,
    decoder: Decoder,
    model: ModelInfo,
    threshold: f32,
    /// Escalate when the message's OOD score is above this (models with a gate).
    ood_threshold: Option<f32>,
}

struct TrackerAcks(Arc<Mutex<OffsetTracker>>);

impl Acknowledge for TrackerAcks {
    fn ack(&self, delivery: &Delivery) {
        if let Ok(mut t) = self.0.lock() {
            if t.ack(delivery) == AckResult::Stale {
                tracing::debug!(tp = %delivery.tp, offset = delivery.offset, "late acknowledgement of a revoked assignment ignored");
            }
        }
    }
}

/// Run the worker until `shutdown` resolves (then drain) or a fatal error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<RunReport, WorkerError> {
    let started = Instant::now();
    let worker_id = config.worker_id();
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let acks: Arc<dyn Acknowledge> = Arc::new(TrackerAcks(tracker.clone()));
    let readiness = Arc::new(Readiness::default());
    let server = if config.metrics.address.is_empty() {
        None
    } else {
        Some(telemetry::serve(&config.metrics.address, telemetry::install()?, readiness.clone()).await?)
    };

    // ClickHouse first: a missing table is a configuration error, found before consuming.
    let clickhouse = Arc::new(ClickHouseService::new(&config.clickhouse));
    wait_for_schema(&clickhouse, &config).await?;
    readiness.clickhouse_reachable.store(true, std::sync::atomic::Ordering::Relaxed);
    let pinger = {
        let (clickhouse, readiness) = (clickhouse.clone(), readiness.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let up = clickhouse.ping().await.is_ok();
                readiness.clickhouse_reachable.store(up, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };

    let producer: FutureProducer = producer_config(&config.kafka).create()?;
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let kafka_sink = Arc::new(KafkaSink::new(
        producer,
        config.kafka.dead_letter_topic.clone(),
        config.kafka.escalation_topic.clone(),
        worker_id.clone(),
        backoff,
    ));

    // One engine per model directory, shared by the routes that use it.
    let (outcome_tx, outcome_rx) = flume::bounded::<Outcome<MessageTag>>(config.batching.queue_capacity);
    let mut engines: HashMap<PathBuf, Engine<MessageTag>> = HashMap::new();
    let mut engine_stats = Vec::new();
    let mut routes = Vec::new();
    let mut submitters = Vec::new();
    for route in &config.routes {
        if !engines.contains_key(&route.model) {
            let (dir, options) = (route.model.clone(), config.inference.clone());
            let model = tokio::task::spawn_blocking(move || Model::load(&dir, &options))
                .await
                .map_err(|e| WorkerError::Startup(format!("model loading task failed: {e}")))??;
            let engine = Engine::start(Arc::new(model), &config.batching, outcome_tx.clone())?;
            engine_stats.push(engine.stats_handle());
            engines.insert(route.model.clone(), engine);
        }
        let engine = &engines[&route.model];
        let model = engine.model();
        let info = model.info();
        metrics::gauge!(telemetry::MODEL_INFO, "model" => info.name.clone(), "version" => info.version.clone(), "provider" => info.provider.to_string()).set(1.0);
        if let Some(head) = &route.escalation_head {
            if !model.heads().heads().iter().any(|h| &h.name == head) {
                return Err(WorkerError::Startup(format!(
                    "route `{}`: escalation_head `{head}` is not a head of {}",
                    route.topic,
                    model.info().name
                )));
            }
        }
        submitters.push(engine.submitter());
        routes.push(Route {
            config: route.clone(),
            decoder: Decoder::new(route.fields.clone(), model.template().clone(), config.max_message_bytes, model.encoder().max_chars()),
            model: model.info().clone(),
            threshold: config.threshold(route, model.descriptor()),
            ood_threshold: route
                .ood_threshold
                .or(model.descriptor().ood.as_ref().map(|o| o.threshold))
                .filter(|_| model.heads().ood().is_some()),
        });
    }
    drop(outcome_tx);
    readiness.model_loaded.store(true, std::sync::atomic::Ordering::Relaxed);
    let routes = Arc::new(routes);

    let (row_tx, row_rx) = mpsc::channel::<SinkItem>(4096);
    let sink_task = tokio::spawn(ch::run(
        clickhouse.clone(),
        row_rx,
        ch::BlockPolicy {
            max_rows: config.clickhouse.insert_max_rows,
            max_age: Duration::from_millis(config.clickhouse.insert_interval_ms),
        },
        acks.clone(),
        kafka_sink.clone(),
    ));
    let results_task = tokio::spawn(results_loop(
        outcome_rx,
        routes.clone(),
        row_tx,
        acks.clone(),
        tracker.clone(),
        kafka_sink.clone(),
        worker_id.clone(),
        config.escalation.enabled,
    ));

    let consumer: StreamConsumer<TrackingContext> =
        consumer_config(&config.kafka).create_with_context(TrackingContext { tracker: tracker.clone(), readiness: readiness.clone() })?;
    let topics: Vec<&str> = config.routes.iter().map(|r| r.topic.as_str()).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(worker = %worker_id, group = %config.kafka.group_id, topics = ?topics, "consuming");

    let route_of: HashMap<String, usize> = config.routes.iter().enumerate().map(|(i, r)| (r.topic.clone(), i)).collect();
    let mut consumed = 0u64;
    let mut paused = false;
    let mut tick = tokio::time::interval(Duration::from_millis(config.kafka.commit_interval_ms.min(500)));
    let mut last_commit = Instant::now();
    let commit_every = Duration::from_millis(config.kafka.commit_interval_ms);
    let max_in_flight = config.kafka.max_in_flight;
    tokio::pin!(shutdown);
    let mut fatal: Option<WorkerError> = None;
    let mut sink_task = Some(sink_task);
    let mut submitters = Some(submitters);
    let mut engines = Some(engines);
    let mut engine_joiners: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    // Set when shutdown starts. Draining keeps this loop polling the consumer (partitions
    // paused, no intake) so that a rebalance in progress can complete and commits go through.
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut first_consumed: Option<Instant> = None;
    let mut last_progress_commit: Option<Instant> = None;

    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown, if drain_deadline.is_none() => {
                tracing::info!("shutdown requested: draining");
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_millis(config.shutdown.drain_timeout_ms));
                set_paused(&consumer, true);
                // Closing the engines' input lets them finish what they hold, then stop.
                submitters = None;
                engine_joiners = engines.take().into_iter().flat_map(|e| e.into_values()).map(|e| tokio::task::spawn_blocking(move || e.shutdown())).collect();
            }
            result = async { sink_task.as_mut().expect("present").await }, if sink_task.is_some() => {
                sink_task = None;
                match result {
                    // The sink flushed everything after its input closed: a drain's normal end.
                    Ok(Ok(())) if drain_deadline.is_some() => {}
                    Ok(Ok(())) => {
                        fatal = Some(WorkerError::Startup("the ClickHouse sink stopped unexpectedly".into()));
                        break;
                    }
                    Ok(Err(e)) => {
                        fatal = Some(e.into());
                        break;
                    }
                    Err(e) => {
                        fatal = Some(WorkerError::Startup(format!("the ClickHouse sink task failed: {e}")));
                        break;
                    }
                }
            }
            _ = tick.tick() => {
                let in_flight = tracker.lock().map(|t| t.in_flight()).unwrap_or(0);
                metrics::gauge!(telemetry::IN_FLIGHT).set(in_flight as f64);
                if let Some(deadline) = drain_deadline {
                    // Partitions assigned during the drain must not start either.
                    set_paused(&consumer, true);
                    let pipeline_done = sink_task.is_none() && results_task.is_finished() && engine_joiners.iter().all(|j| j.is_finished());
                    if pipeline_done && in_flight == 0 {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(
                            drain_timeout_ms = config.shutdown.drain_timeout_ms,
                            in_flight,
                            "drain deadline passed: committing what is done; the rest will be replayed"
                        );
                        break;
                    }
                } else if !paused && in_flight >= max_in_flight {
                    tracing::warn!(in_flight, "downstream is behind: pausing consumption");
                    set_paused(&consumer, true);
                    paused = true;
                    metrics::gauge!(telemetry::PAUSED).set(1.0);
                } else if paused && in_flight <= max_in_flight / 2 {
                    tracing::info!(in_flight, "caught up: resuming consumption");
                    set_paused(&consumer, false);
                    paused = false;
                    metrics::gauge!(telemetry::PAUSED).set(0.0);
                } else if paused {
                    // Partitions assigned while paused must not run ahead.
                    set_paused(&consumer, true);
                }
                if drain_deadline.is_some() || last_commit.elapsed() >= commit_every {
                    // One broker round trip per interval; synchronous so the tracker knows
                    // exactly what is committed (block_in_place keeps other tasks running).
                    if tokio::task::block_in_place(|| commit(&consumer, &tracker)) == Committed::Moved {
                        last_progress_commit = Some(Instant::now());
                    }
                    last_commit = Instant::now();
                }
            }
            message = consumer.recv() => match message {
                // While draining, a message fetched before the pause took effect is skipped:
                // not begun, so not committed; the next owner reads it.
                Ok(m) => {
                    if let Some(submitters) = &submitters {
                        consumed += 1;
                        first_consumed.get_or_insert_with(Instant::now);
                        metrics::counter!(telemetry::MESSAGES_CONSUMED, "topic" => m.topic().to_string()).increment(1);
                        handle_message(&m, &routes, submitters, &route_of, &tracker, &acks, &kafka_sink).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Kafka consumer error"),
            },
        }
    }

    // Commit what is done. A rebalance in progress rejects commits until this member rejoins,
    // which needs polling: poll (paused) and retry until the deadline.
    let commit_deadline = drain_deadline.unwrap_or_else(tokio::time::Instant::now) + Duration::from_secs(5);
    loop {
        match tokio::task::block_in_place(|| commit(&consumer, &tracker)) {
            Committed::Moved => last_progress_commit = Some(Instant::now()),
            Committed::Nothing => break,
            Committed::Failed if tokio::time::Instant::now() >= commit_deadline => break,
            Committed::Failed => {
                let _ = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
            }
        }
    }
    let unfinished = tracker.lock().map(|t| t.in_flight()).unwrap_or(0);
    consumer.unsubscribe();
    pinger.abort();
    if let Some(server) = server {
        server.abort();
    }
    let report = RunReport {
        consumed,
        rows_inserted: clickhouse.stats.rows_inserted.load(std::sync::atomic::Ordering::Relaxed),
        dead_lettered: kafka_sink.stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed),
        escalated: kafka_sink.stats.escalated.load(std::sync::atomic::Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        busy_seconds: match (first_consumed, last_progress_commit) {
            (Some(first), Some(last)) if last > first => (last - first).as_secs_f64(),
            _ => 0.0,
        },
        unfinished,
        engine: engine_stats.iter().map(|s| s.snapshot()).fold(crate::engine::StatsSnapshot::default(), |a, b| a.merge(&b)),
    };
    match fatal {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

async fn wait_for_schema(clickhouse: &ClickHouseService, config: &Config) -> Result<(), WorkerError> {
    let backoff =
        Backoff::new(Duration::from_millis(config.clickhouse.retry_initial_ms), Duration::from_millis(config.clickhouse.retry_max_ms));
    let mut attempt = 0;
    loop {
        match clickhouse.check_schema().await {
            Ok(()) => return Ok(()),
            Err(Err(fatal)) => return Err(fatal.into()),
            Err(Ok(transient)) => {
                attempt += 1;
                let delay = backoff.delay(attempt);
                tracing::warn!(error = %transient, url = %config.clickhouse.url, retry_in_ms = delay.as_millis() as u64, "ClickHouse not reachable yet");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn set_paused(consumer: &StreamConsumer<TrackingContext>, pause: bool) {
    let Ok(assignment) = consumer.assignment() else { return };
    if assignment.count() == 0 {
        return;
    }
    let result = if pause { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
    if let Err(e) = result {
        tracing::warn!(error = %e, pause, "pause/resume failed");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Committed {
    Nothing,
    Moved,
    Failed,
}

/// Commit every partition's done watermark that moved (synchronously).
fn commit(consumer: &StreamConsumer<TrackingContext>, tracker: &Arc<Mutex<OffsetTracker>>) -> Committed {
    let points = match tracker.lock() {
        Ok(t) => t.committable(),
        Err(_) => return Committed::Failed,
    };
    if points.is_empty() {
        return Committed::Nothing;
    }
    match consumer.commit(&commit_list(&points), CommitMode::Sync) {
        Ok(()) => {
            if let Ok(mut t) = tracker.lock() {
                for (tp, offset) in &points {
                    t.committed(tp, *offset);
                    metrics::gauge!(telemetry::COMMITTED_OFFSET, "topic" => tp.topic.clone(), "partition" => tp.partition.to_string())
                        .set(*offset as f64);
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

#[allow(clippy::too_many_arguments)]
async fn handle_message(
    m: &BorrowedMessage<'_>,
    routes: &Arc<Vec<Route>>,
    submitters: &[Submitter<MessageTag>],
    route_of: &HashMap<String, usize>,
    tracker: &Arc<Mutex<OffsetTracker>>,
    acks: &Arc<dyn Acknowledge>,
    kafka_sink: &Arc<KafkaSink>,
) {
    let tp = TopicPartition::new(m.topic(), m.partition());
    let Some(delivery) = tracker.lock().ok().and_then(|mut t| t.begin(&tp, m.offset(), 1)) else {
        tracing::debug!(%tp, offset = m.offset(), "message of a partition no longer assigned: skipped (its owner reads it)");
        return;
    };
    let source = Arc::new(SourceMessage {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    });
    let Some(&route_index) = route_of.get(m.topic()) else {
        dead_letter(kafka_sink, acks, delivery, source, "unrouted", "no route for this topic".into());
        return;
    };
    let route = &routes[route_index];
    match route.decoder.decode(&source.payload) {
        Ok(decoded) => {
            let event_time_ms = decoded.event_time_ms.or(source.timestamp_ms).unwrap_or(0);
            let tag = MessageTag {
                message_id: decoded.id.clone().unwrap_or_else(|| format!("{}-{}-{}", source.topic, source.partition, source.offset)),
                metadata: decoded.metadata(&route.config.metadata),
                delivery,
                source,
                route: route_index,
                event_time_ms,
                consumed_ms: crate::time::now_ms(),
            };
            if let Err(closed) = submitters[route_index].submit_async(tag, decoded.text).await {
                tracing::error!(offset = closed.0.source.offset, "engine stopped; the message will be replayed");
            }
        }
        Err(e) => dead_letter(kafka_sink, acks, delivery, source, e.reason.as_str(), e.detail),
    }
}

fn dead_letter(
    kafka_sink: &Arc<KafkaSink>,
    acks: &Arc<dyn Acknowledge>,
    delivery: Delivery,
    source: Arc<SourceMessage>,
    reason: &'static str,
    detail: String,
) {
    let (kafka_sink, acks) = (kafka_sink.clone(), acks.clone());
    tokio::spawn(async move {
        kafka_sink.dead_letter(&source, reason, &detail).await;
        metrics::counter!(telemetry::MESSAGES_DEAD_LETTERED, "reason" => reason).increment(1);
        acks.ack(&delivery);
    });
}

#[allow(clippy::too_many_arguments)]
async fn results_loop(
    outcomes: flume::Receiver<Outcome<MessageTag>>,
    routes: Arc<Vec<Route>>,
    rows: mpsc::Sender<SinkItem>,
    acks: Arc<dyn Acknowledge>,
    tracker: Arc<Mutex<OffsetTracker>>,
    kafka_sink: Arc<KafkaSink>,
    worker_id: String,
    escalation_enabled: bool,
) {
    while let Ok(outcome) = outcomes.recv_async().await {
        let tag = outcome.tag;
        let classified = match outcome.result {
            Ok(c) => c,
            Err(e) => {
                let reason = match &e {
                    ClassifyError::Input(d) => d.reason.as_str(),
                    ClassifyError::Tokenize(_) => "tokenize_failed",
                    ClassifyError::Inference(_) => "inference_failed",
                };
                dead_letter(&kafka_sink, &acks, tag.delivery, tag.source, reason, e.to_string());
                continue;
            }
        };
        let route = &routes[tag.route];
        let confidence = classified.prediction.confidence(route.config.escalation_head.as_deref());
        // Unlike the training data says more than a low score does, so it is the reason given.
        let reason = if classified.prediction.ood_score.zip(route.ood_threshold).is_some_and(|(score, limit)| score > limit) {
            Some("out_of_distribution")
        } else if confidence.is_some_and(|c| c < route.threshold) {
            Some("low_confidence")
        } else {
            None
        };
        let escalate = escalation_enabled && reason.is_some();
        if let (true, Some(reason)) = (escalate, reason) {
            let added = tracker.lock().map(|mut t| t.add_acks(&tag.delivery, 1)).unwrap_or(false);
            if added {
                let payload = escalation_record(&tag, &classified, route, confidence.unwrap_or(0.0), reason);
                let (kafka_sink, acks, delivery, key) = (kafka_sink.clone(), acks.clone(), tag.delivery.clone(), tag.message_id.clone());
                let kind = route.config.kind.clone();
                tokio::spawn(async move {
                    kafka_sink.escalate(&key, &payload).await;
                    metrics::counter!(telemetry::MESSAGES_ESCALATED, "kind" => kind, "reason" => reason).increment(1);
                    acks.ack(&delivery);
                });
            }
        }
        metrics::counter!(telemetry::MESSAGES_CLASSIFIED, "kind" => route.config.kind.clone(), "model" => route.model.name.clone())
            .increment(1);
        let row = build_row(&tag, &classified, route, escalate, &worker_id);
        if rows.send(SinkItem { row, delivery: tag.delivery, source: tag.source }).await.is_err() {
            return; // the sink stopped (fatal): nothing more can be stored
        }
    }
}

fn build_row(tag: &MessageTag, c: &Classified, route: &Route, escalated: bool, worker_id: &str) -> ResultRow {
    let p = &c.prediction;
    let (mut head_names, mut head_labels, mut head_scores) = (Vec::new(), Vec::new(), Vec::new());
    for h in &p.heads {
        if let HeadOutput::Label(l) = &h.output {
            head_names.push(h.head.clone());
            head_labels.push(l.label.clone());
            head_scores.push(l.score);
        }
    }
    ResultRow {
        topic: tag.source.topic.clone(),
        partition: tag.source.partition.max(0) as u32,
        offset: tag.source.offset.max(0) as u64,
        message_id: tag.message_id.clone(),
        kind: route.config.kind.clone(),
        event_time: (tag.event_time_ms.max(0) / 1000).min(u32::MAX as i64) as u32,
        event_time_ms: tag.event_time_ms.max(0) as u64,
        consumed_time_ms: tag.consumed_ms,
        processed_time_ms: 0,
        model_name: route.model.name.clone(),
        model_version: route.model.version.clone(),
        category: p.category.as_ref().map(|c| c.label.clone()).unwrap_or_default(),
        confidence: p.category.as_ref().map(|c| c.score).unwrap_or(0.0),
        priority: p.priority.clone().unwrap_or_default(),
        tags: p.tags.iter().map(|t| t.label.clone()).collect(),
        tag_scores: p.tags.iter().map(|t| t.score).collect(),
        head_names,
        head_labels,
        head_scores,
        escalated: u8::from(escalated),
        text_chars: c.chars as u32,
        tokens: c.tokens as u32,
        truncated: u8::from(c.truncated),
        metadata_keys: tag.metadata.0.clone(),
        metadata_values: tag.metadata.1.clone(),
        worker_id: worker_id.to_string(),
        ood_score: p.ood_score,
    }
}

fn escalation_record(tag: &MessageTag, c: &Classified, route: &Route, confidence: f32, reason: &str) -> Vec<u8> {
    let original: Value = serde_json::from_slice(&tag.source.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&tag.source.payload).into_owned()));
    let p = &c.prediction;
    let heads: serde_json::Map<String, Value> = p
        .heads
        .iter()
        .filter_map(|h| match &h.output {
            HeadOutput::Label(l) => Some((h.head.clone(), json!({"label": l.label, "score": l.score}))),
            HeadOutput::Tags(t) => Some((h.head.clone(), json!(t))),
            HeadOutput::Embedding(_) => None,
        })
        .collect();
    serde_json::to_vec(&json!({
        "message_id": tag.message_id,
        "kind": route.config.kind,
        "source": {"topic": tag.source.topic, "partition": tag.source.partition, "offset": tag.source.offset, "timestamp_ms": tag.source.timestamp_ms},
        "reason": {
            "why": reason,
            "head": route.config.escalation_head.clone().unwrap_or_else(|| "category".into()),
            "confidence": confidence,
            "threshold": route.threshold,
            "ood_score": p.ood_score,
            "ood_threshold": route.ood_threshold,
        },
        "result": {
            "category": p.category.as_ref().map(|c| &c.label),
            "confidence": p.category.as_ref().map(|c| c.score),
            "priority": p.priority,
            "tags": p.tags.iter().map(|t| &t.label).collect::<Vec<_>>(),
            "heads": heads,
            "model": route.model.name,
            "model_version": route.model.version,
        },
        "message": original,
    }))
    .unwrap_or_default()
}
