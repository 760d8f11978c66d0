//! `triage run`: Kafka -> decode -> engine (tokenize, batch, infer) -> policy -> settle.
//!
//! ```text
//! consumer ─> engines ─> results ─┬─> ClickHouse sink ─┐
//!    │                            └─> escalation ──────┤
//!    └─> bad input ─> dead letter ─────────────────────┴─> settle ─> offset tracker ─> commit
//! ```
//! Modules: [`consumer`] (the intake: messages to the engines; the consumer's states live in
//! [`crate::source::lifecycle`], shared with `triage escalate`), [`routes`] (engines and
//! routes), [`results`] (outcomes into rows and escalations), [`policy`] (whether to escalate),
//! [`crate::settle`] (the one path by which a message becomes done, shared with `triage
//! escalate`), [`reload`] (new model versions
//! swapped in while running). This file only wires them.

mod consumer;
pub mod policy;
mod reload;
mod results;
mod routes;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use tokio::sync::mpsc;

use crate::config::Config;
pub use crate::error::WorkerError;
use crate::settle::Settler;
use crate::sink::clickhouse::{self as ch, ClickHouseService};
use crate::sink::kafka::{SideTopics, SideTopicsConfig};
use crate::source::kafka::{check_topics_exist, ClientRole, TrackingContext};
use crate::source::lifecycle::{self, Lifecycle};
use crate::source::offsets::OffsetTracker;
use crate::telemetry::events::Counters;
use crate::telemetry::{self, Readiness};

/// What one run did.
#[derive(Debug, Default, Clone)]
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
    /// Per model (engine), the batch sizes the tuner chose per text length.
    pub batch_sizes: Vec<Vec<crate::batcher::tuner::BucketChoice>>,
    /// Every batch's token lengths, over the models (only with `batching.record_batches`).
    pub batch_lengths: Vec<Vec<usize>>,
}

/// Run the worker until `shutdown` resolves (then drain) or a fatal error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<RunReport, WorkerError> {
    let started = Instant::now();
    // Read once: it may come from the environment or /etc/hostname.
    let worker_id = config.worker_id();
    let counters = Arc::new(Counters::default());
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let readiness = Arc::new(Readiness::default());
    let server = match config.metrics.address.as_str() {
        "" => None,
        address => Some(telemetry::serve(address, telemetry::install()?, readiness.clone()).await?),
    };

    // Start-up waits (for ClickHouse, for Kafka, for the models) give way to a SIGTERM.
    let mut shutdown = std::pin::pin!(shutdown);
    let stopped_early = || {
        tracing::info!("shutdown requested during start-up: exiting");
        if let Some(server) = &server {
            server.abort();
        }
        Ok(RunReport { seconds: started.elapsed().as_secs_f64(), ..RunReport::default() })
    };

    // ClickHouse first: a missing table is a configuration error, found before consuming.
    let clickhouse = Arc::new(ClickHouseService::with_counters(&config.clickhouse, counters.clone()));
    let Some(schema) = unless_stopped(async { Ok(clickhouse.wait_for_schema().await?) }, &mut shutdown).await else {
        return stopped_early();
    };
    schema?;
    readiness.clickhouse_reachable.store(true, Ordering::Relaxed);
    let pinger = tokio::spawn(ping_forever(clickhouse.clone(), readiness.clone()));

    // The side topics must exist before anything is consumed: a missing one would stall the
    // first message that needs it.
    let mut side: Vec<String> = vec![config.kafka.dead_letter_topic.clone()];
    if config.escalation.enabled {
        side.push(config.kafka.escalation_topic.clone());
    }
    let kafka_config = config.kafka.clone();
    let topic_check = async {
        tokio::task::spawn_blocking(move || {
            let topics: Vec<&str> = side.iter().map(String::as_str).collect();
            check_topics_exist(&kafka_config, &topics, Duration::from_secs(30))
        })
        .await
        .map_err(|e| WorkerError::TaskFailed { task: "topic check", detail: e.to_string() })?
        .map_err(WorkerError::from)
    };
    let Some(topics) = unless_stopped(topic_check, &mut shutdown).await else {
        pinger.abort();
        return stopped_early();
    };
    topics?;

    let producer: FutureProducer = config.kafka.client(ClientRole::SideTopics { max_message_bytes: config.max_message_bytes }).create()?;
    let side_topics = SideTopicsConfig::of(&config, &worker_id);
    let (fatal_tx, fatal_rx) = mpsc::channel(4);
    let side_topics = Arc::new(SideTopics::new(producer, side_topics, counters.clone()));
    let settle = Settler::new(side_topics, tracker.clone(), counters.clone(), fatal_tx);

    let Some(started_routes) = unless_stopped(routes::start(&config), &mut shutdown).await else {
        pinger.abort();
        return stopped_early();
    };
    let started_routes = started_routes?;
    readiness.model_loaded.store(true, Ordering::Relaxed);
    let engine_stats = started_routes.engine_stats();
    let routes::Started { routes, submitters, engines, outcomes, next_tiers, dirs, serving } = started_routes;
    let reloader = reload::Reloader::new(
        Arc::new(config.clone()),
        dirs,
        engines.iter().map(|e| e.installer()).collect(),
        serving,
        routes.clone(),
        readiness.clone(),
    );
    let reloads = tokio::spawn(reloader.run());

    let (row_tx, row_rx) = mpsc::channel(4096);
    let block_policy = ch::BlockPolicy {
        max_rows: config.clickhouse.insert_max_rows,
        max_age: Duration::from_millis(config.clickhouse.insert_interval_ms),
    };
    let sink = tokio::spawn(ch::run(clickhouse.clone(), row_rx, block_policy, Arc::new(settle.clone())));
    // Shadow models' answers: their own table and writer, which nothing waits on.
    let (shadow_rows, shadow_sink) = if routes.iter().any(|r| r.shadow.is_some()) {
        let (tx, rx) = mpsc::channel(4096);
        let service = Arc::new(ClickHouseService::new(&config.clickhouse.shadow()));
        let policy = ch::BlockPolicy {
            max_rows: config.clickhouse.insert_max_rows,
            max_age: Duration::from_millis(config.clickhouse.insert_interval_ms),
        };
        let task = tokio::spawn(async move {
            if let Err(e) = ch::run(service, rx, policy, Arc::new(results::ShadowRows)).await {
                tracing::error!(error = %e, "the shadow table's writer stopped: shadow answers are dropped from now on (the routes' own rows are unaffected)");
            }
        });
        (Some(tx), Some(task))
    } else {
        (None, None)
    };
    // One results task per engine (see ResultsLoop::run); they end when their engines do.
    let result_tasks: Vec<_> = outcomes
        .into_iter()
        .zip(next_tiers)
        .map(|(outcomes, next_tiers)| {
            let results = results::ResultsLoop {
                routes: routes.clone(),
                rows: row_tx.clone(),
                settle: settle.clone(),
                worker_id: worker_id.clone(),
                escalation_enabled: config.escalation.enabled,
                next_tiers,
                shadow_rows: shadow_rows.clone(),
            };
            tokio::spawn(results.run(outcomes))
        })
        .collect();
    drop((row_tx, shadow_rows));
    let results = tokio::spawn(async move {
        for task in result_tasks {
            if let Err(e) = task.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    });

    let kafka = config
        .kafka
        .client(ClientRole::Consumer)
        .create_with_context(TrackingContext { tracker: tracker.clone(), readiness: readiness.clone() })?;
    let topics: Vec<&str> = config.routes.iter().map(|r| r.topic.as_str()).collect();
    rdkafka::consumer::Consumer::subscribe(&kafka, &topics)?;
    tracing::info!(worker = %worker_id, group = %config.kafka.group_id, topics = ?topics, "consuming");

    let (drain, draining) = tokio::sync::watch::channel(false);
    let intake = consumer::WorkerIntake {
        engines: consumer::Engines::Open { submitters, engines },
        results,
        tracker: tracker.clone(),
        route_of: config.routes.iter().enumerate().map(|(i, r)| (r.topic.clone(), i)).collect(),
        routes,
        settle: settle.clone(),
        readiness: readiness.clone(),
        draining,
        drain,
    };
    let lifecycle = Lifecycle {
        kafka,
        tracker,
        settle,
        limits: lifecycle::Limits::of(&config, config.kafka.max_in_flight, true),
        readiness: readiness.clone(),
        intake,
    };
    let stopped = lifecycle.run(shutdown, sink, fatal_rx).await;

    pinger.abort();
    reloads.abort();
    if let Some(task) = shadow_sink {
        // Its last rows, briefly: shadow answers are for comparison, not worth a slow exit.
        if tokio::time::timeout(Duration::from_secs(10), task).await.is_err() {
            tracing::warn!("the shadow table's writer did not finish within 10 s: its last rows are dropped");
        }
    }
    if let Some(server) = server {
        server.abort();
    }
    if let Some(fatal) = stopped.fatal {
        return Err(fatal);
    }
    let counted = counters.snapshot();
    let batch_sizes: Vec<_> = engine_stats.iter().map(|s| s.batch_sizes()).collect();
    for choices in batch_sizes.iter().filter(|c| !c.is_empty()) {
        tracing::info!(batch_sizes = %crate::batcher::tuner::describe(choices), "batch sizes chosen per text length");
    }
    Ok(RunReport {
        consumed: counted.consumed,
        rows_inserted: counted.rows_inserted,
        dead_lettered: counted.dead_lettered,
        escalated: counted.escalated,
        seconds: started.elapsed().as_secs_f64(),
        busy_seconds: stopped.busy.as_secs_f64(),
        unfinished: stopped.unfinished,
        engine: routes::merged(&engine_stats),
        batch_sizes,
        batch_lengths: engine_stats.iter().flat_map(|s| s.recorded_batches()).collect(),
    })
}

/// A start-up step, abandoned (None) when shutdown is requested first.
async fn unless_stopped<T>(
    step: impl Future<Output = Result<T, WorkerError>>,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Option<Result<T, WorkerError>> {
    tokio::select! {
        result = step => Some(result),
        _ = shutdown => None,
    }
}

async fn ping_forever(clickhouse: Arc<ClickHouseService>, readiness: Arc<Readiness>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let up = clickhouse.ping().await.is_ok();
        readiness.clickhouse_reachable.store(up, Ordering::Relaxed);
    }
}
