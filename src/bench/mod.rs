//! `triage bench`: in ONE process, side by side on the same machine, for each workload:
//!   a. the ceiling: the model alone on pre-tokenized, globally length-sorted batches (no I/O);
//!   b. the whole worker at default settings on a backlog: mock Kafka -> tokenize -> batch ->
//!      model -> ClickHouse, timed from the first message consumed to the last commit;
//!   c. the same worker with max_batch_size 1 (inserts and commits batched as usual).
//!   a2. stage b's own batches (recorded by its engine), rebuilt and run on the model alone:
//!      with a and b it takes b/a apart into batch shapes x contention x occupancy ([`Gap`]).
//!   d. (`--format avro`) stage b again with the same messages written as raw Avro and read
//!      through a pinned schema: what decoding Avro instead of JSON costs the whole worker (d/b).
//!   e. (`--shadow-share S`) stage b with a shadow model classifying a share S of the messages
//!      on its own engine: what a shadow costs the route's model (e/b; the shadow sheds what
//!      its engine cannot take, so e/b should not fall much below 1 - S).
//! and the ratios b/a and b/c. Workloads: short customer messages (Banking77) and e-mail-length
//! tickets, read from ../shared/data when present, generated otherwise (and said so).
//! `sweep` tunes what decides the ceiling itself (threads, sessions, optimisation level,
//! truncation, batch size, encoder variants) and measures latency at low load.

pub mod sweep;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::json;

use crate::config::ClientRole;
use crate::config::{ClickHouseConfig, RouteConfig};
use crate::engine::EngineConfig;
use crate::kafka_tools::{produce, Record};
use crate::local::{local_kafka_config, local_worker_config, until_caught_up, LocalClickHouse, LocalKafka, LocalRunError};
use crate::message::{Decoder, FieldMap};
use crate::model::{Encoded, InferenceOptions, Model};
use crate::sink::clickhouse::ClickHouseService;
use crate::worker;

pub type BenchError = LocalRunError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Short,
    Tickets,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Short => "short messages (Banking77)",
            Workload::Tickets => "e-mail-length tickets",
        }
    }
}

pub struct BenchOptions {
    pub model_dir: PathBuf,
    pub shared_data: PathBuf,
    pub messages: usize,
    pub workloads: Vec<Workload>,
    pub inference: InferenceOptions,
    pub batching: EngineConfig,
    /// Batch size of the ceiling run (sorted, no padding to speak of); None: the best found.
    pub ceiling_batch_size: Option<usize>,
    /// Also run stage d: the worker on the same messages as raw Avro.
    pub avro: bool,
    /// Also run stage e: the worker with a shadow model (its directory, default the model's
    /// own) classifying this share of the messages.
    pub shadow: Option<(Option<PathBuf>, f64)>,
}

/// Stage e's shadow: how much of its share it classified and stored.
#[derive(Debug, Clone)]
pub struct ShadowStage {
    pub share: f64,
    pub stage: StageResult,
    /// Rows in the shadow table: its answers stored (the rest of its share was shed).
    pub shadow_rows: u64,
}

/// The Avro schema of every workload's messages (stage d): a subject that may be absent (the
/// short messages have none) and a body.
pub const AVRO_SCHEMA: &str = r#"{"type": "record", "name": "BenchMessage", "namespace": "triage.bench", "fields": [
    {"name": "subject", "type": ["null", "string"], "default": null},
    {"name": "body", "type": "string"}
]}"#;

/// `messages` as raw Avro datums of [`AVRO_SCHEMA`].
pub fn avro_records(messages: &[serde_json::Value]) -> Result<Vec<Vec<u8>>, BenchError> {
    let writer = crate::source::decode::avro::AvroReader::parse(AVRO_SCHEMA, &[]).map_err(BenchError::Other)?;
    messages
        .iter()
        .map(|m| {
            let record =
                json!({"subject": m.get("subject").cloned().unwrap_or_default(), "body": m.get("body").cloned().unwrap_or_default()});
            writer.write(&record).map_err(BenchError::Other)
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
pub struct StageResult {
    pub messages: usize,
    pub seconds: f64,
    pub tokens: u64,
    pub padding_ratio: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub peak_rss_mb: f64,
    /// Estimated floating-point operations done (ceiling runs of models with an architecture).
    pub flops: f64,
    /// Worker runs: the batch sizes the tuner chose per text length.
    pub batch_sizes: String,
    /// Time spent in the model (ONNX Runtime and the heads), summed over the inference threads.
    pub inference_seconds: f64,
    /// Stage b: every batch's token lengths, in the order the batcher closed them.
    pub batch_lengths: Vec<Vec<usize>>,
}

impl StageResult {
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.messages as f64 / self.seconds
        } else {
            0.0
        }
    }
    /// Model time per message, seconds.
    pub fn inference_per_message(&self) -> f64 {
        self.inference_seconds / self.messages.max(1) as f64
    }
    /// How many inference threads were in the model on average (at most the session count).
    pub fn threads_in_model(&self) -> f64 {
        self.inference_seconds / self.seconds.max(f64::MIN_POSITIVE)
    }
    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        }
    }
}

pub struct WorkloadResult {
    pub workload: Workload,
    pub source: String,
    pub ceiling_batch_size: usize,
    pub ceiling: StageResult,
    /// a2. The worker's own batches (stage b's, replayed) on the model alone.
    pub worker_batches: StageResult,
    pub worker: StageResult,
    pub batch_one: StageResult,
    pub avro: Option<StageResult>,
    pub shadow: Option<ShadowStage>,
}

impl WorkloadResult {
    pub fn worker_over_ceiling(&self) -> f64 {
        self.worker.per_second() / self.ceiling.per_second().max(1e-9)
    }
    pub fn worker_over_batch_one(&self) -> f64 {
        self.worker.per_second() / self.batch_one.per_second().max(1e-9)
    }
    /// b/a, taken apart: b/a = shapes x contention x occupancy, exactly (each a ratio of
    /// measured figures of this run).
    pub fn gap(&self) -> Gap {
        let (a, a2, b) = (&self.ceiling, &self.worker_batches, &self.worker);
        let ratio = |x: f64, y: f64| x / y.max(f64::MIN_POSITIVE);
        Gap {
            shapes: ratio(a.inference_per_message(), a2.inference_per_message()),
            contention: ratio(a2.inference_per_message(), b.inference_per_message()),
            occupancy: ratio(b.threads_in_model(), a.threads_in_model()),
        }
    }
    /// d/b: the worker's throughput on Avro over the same worker on JSON.
    pub fn avro_over_json(&self) -> Option<f64> {
        self.avro.as_ref().map(|d| d.per_second() / self.worker.per_second().max(1e-9))
    }
}

/// Where b/a goes. A stage's rate is (threads in the model) / (model time per message), so
/// b/a = (a's model time per message / b's) x (b's threads in the model / a's), and the first
/// factor splits at a2 (the worker's batches, replayed on the model alone):
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gap {
    /// a / a2 model time per message: the ceiling's batches (one best size, globally
    /// length-sorted) against the batches the worker formed (per length bucket, at the sizes
    /// its tuner chose, as messages arrived). Below 1: the worker's batch shapes cost more.
    pub shapes: f64,
    /// a2 / b model time per message: the same batches alone, and inside the running pipeline
    /// (the other threads and processes on the same cores: tokenizer, batcher, Kafka, the
    /// ClickHouse client and, in the bench, the ClickHouse server). Below 1: the model runs
    /// slower beside them.
    pub contention: f64,
    /// b / a threads in the model on average: below 1 when the inference threads wait for
    /// batches (start, end, intake paused at `max_in_flight`), or their cores are taken.
    pub occupancy: f64,
}

impl Gap {
    pub fn product(&self) -> f64 {
        self.shapes * self.contention * self.occupancy
    }
}

/// Messages as producers would write them, and where they came from.
pub fn workload_messages(workload: Workload, shared: &Path, n: usize) -> (Vec<serde_json::Value>, String) {
    let from_shared = match workload {
        Workload::Short => read_banking(&shared.join("banking77/train.csv"), n),
        Workload::Tickets => read_tickets(&shared.join("support-tickets/tickets-v5.csv"), n),
    };
    match from_shared {
        Some(messages) if !messages.is_empty() => {
            let source = format!("{n} messages, {} distinct, from {}", messages.len().min(n), shared.display());
            (cycle(messages, n), source)
        }
        _ => (generated(workload, n), format!("{n} GENERATED messages ({} absent)", shared.display())),
    }
}

fn cycle(messages: Vec<serde_json::Value>, n: usize) -> Vec<serde_json::Value> {
    (0..n).map(|i| messages[i % messages.len()].clone()).collect()
}

fn read_banking(path: &Path, n: usize) -> Option<Vec<serde_json::Value>> {
    let mut reader = csv::Reader::from_path(path).ok()?;
    Some(reader.records().filter_map(Result::ok).take(n).map(|r| json!({"body": r.get(0).unwrap_or_default()})).collect())
}

fn read_tickets(path: &Path, n: usize) -> Option<Vec<serde_json::Value>> {
    let mut reader = csv::Reader::from_path(path).ok()?;
    let headers = reader.headers().ok()?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let (subject, body) = (col("subject")?, col("body")?);
    Some(
        reader
            .records()
            .filter_map(Result::ok)
            .filter(|r| r.get(body).is_some_and(|b| !b.is_empty()))
            .take(n)
            .map(|r| json!({"subject": r.get(subject).unwrap_or_default(), "body": r.get(body).unwrap_or_default()}))
            .collect(),
    )
}

fn generated(workload: Workload, n: usize) -> Vec<serde_json::Value> {
    let words = [
        "card", "refund", "payment", "account", "transfer", "declined", "arrived", "charged", "twice", "balance", "app", "login", "support",
    ];
    let words_per_message = |i: usize| match workload {
        Workload::Short => 6 + i % 14,
        Workload::Tickets => 40 + (i * 37) % 120,
    };
    (0..n).map(|i| json!({"subject": "help", "body": (0..words_per_message(i)).map(|j| words[(i + j * 7) % words.len()]).collect::<Vec<_>>().join(" ")})).collect()
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Messages' texts as the worker renders them.
pub fn rendered(model: &Model, messages: &[serde_json::Value]) -> Vec<crate::model::Rendered> {
    let decoder = Decoder::new(FieldMap::default(), model.template().clone(), usize::MAX, model.encoder().max_chars());
    messages.iter().filter_map(|m| decoder.decode(m.to_string().as_bytes()).ok()).map(|d| d.text).collect()
}

/// Messages tokenized as the worker would, sorted by length.
pub fn pretokenize(model: &Model, messages: &[serde_json::Value]) -> Vec<Encoded> {
    let mut encoded: Vec<Encoded> =
        rendered(model, messages).iter().filter_map(|text| model.encoder().encode_rendered(text).ok()).collect();
    encoded.sort_by_key(|e| e.len());
    encoded
}

/// Consecutive batches of sorted sequences: at most `batch_size` rows and `max_tokens` padded.
fn batches(encoded: &[Encoded], batch_size: usize, max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < encoded.len() {
        let mut end = i + 1;
        while end < encoded.len() && end - i < batch_size && (end + 1 - i) * encoded[end].len() <= max_tokens {
            end += 1;
        }
        out.push(i..end);
        i = end;
    }
    out
}

/// a. The model alone on sorted, pre-tokenized batches, with the worker's sessions and threads,
/// at the best batch size (`batch_size`, or the best of 8 / 16 / 32 / 64 on a sample).
pub fn ceiling(
    model: &Model,
    encoded: &[Encoded],
    batch_size: Option<usize>,
    max_tokens: usize,
    engine: &EngineConfig,
) -> Result<(StageResult, usize), BenchError> {
    let (sessions, intra) = engine.sessions_for(model);
    let batch_size = match batch_size {
        Some(b) => b,
        None => {
            // Every k-th of the length-sorted messages keeps the length mix.
            let step = (encoded.len() / 400).max(1);
            let sample: Vec<Encoded> = encoded.iter().step_by(step).cloned().collect();
            let mut best = (32, 0.0);
            for size in [8, 16, 32, 64] {
                let rate = ceiling_on(model, &sample, size, usize::MAX, sessions, intra)?.per_second();
                if rate > best.1 {
                    best = (size, rate);
                }
            }
            best.0
        }
    };
    Ok((ceiling_on(model, encoded, batch_size, max_tokens.max(batch_size * model.info().max_length), sessions, intra)?, batch_size))
}

/// The ceiling with `sessions` sessions (`intra` threads each), each on its own thread,
/// taking batches in turn.
pub fn ceiling_on(
    model: &Model,
    encoded: &[Encoded],
    batch_size: usize,
    max_tokens: usize,
    sessions: usize,
    intra: Option<usize>,
) -> Result<StageResult, BenchError> {
    let plan = batches(encoded, batch_size, max_tokens);
    let batches: Vec<Vec<&Encoded>> = plan.iter().map(|range| encoded[range.clone()].iter().collect()).collect();
    run_stage(model, &batches, sessions, intra)
}

/// a2. The batches stage b formed (their token lengths, in order), rebuilt from the same
/// messages and run on the model alone, as the ceiling runs: the same padding, the same sizes,
/// nothing else on the cores.
pub fn replay(model: &Model, encoded: &[Encoded], recorded: &[Vec<usize>], engine: &EngineConfig) -> Result<StageResult, BenchError> {
    let mut by_length: std::collections::HashMap<usize, (Vec<&Encoded>, usize)> = std::collections::HashMap::new();
    for e in encoded {
        by_length.entry(e.len()).or_default().0.push(e);
    }
    let mut batches = Vec::with_capacity(recorded.len());
    for lengths in recorded {
        let mut batch = Vec::with_capacity(lengths.len());
        for &length in lengths {
            let Some((pool, next)) = by_length.get_mut(&length) else {
                return Err(BenchError::Other(format!(
                    "stage b formed a batch with a {length}-token message that tokenizing its messages again does not give"
                )));
            };
            batch.push(pool[*next % pool.len()]);
            *next += 1;
        }
        batches.push(batch);
    }
    let (sessions, intra) = engine.sessions_for(model);
    run_stage(model, &batches, sessions, intra)
}

/// A model-alone stage: `batches` run as [`run_batches`] runs them, with their real and padded
/// tokens and the model's FLOPs for those shapes.
fn run_stage(model: &Model, batches: &[Vec<&Encoded>], sessions: usize, intra: Option<usize>) -> Result<StageResult, BenchError> {
    let (mut real, mut padded, mut flops) = (0u64, 0u64, 0f64);
    let architecture = model.descriptor().architecture;
    for batch in batches {
        let width = batch.iter().map(|e| e.len()).max().unwrap_or(0);
        real += batch.iter().map(|e| e.len() as u64).sum::<u64>();
        padded += (batch.len() * width) as u64;
        flops += architecture.map_or(0.0, |a| a.flops(batch.len(), width));
    }
    let (seconds, inference_seconds) = run_batches(model, batches, sessions, intra)?;
    Ok(StageResult {
        messages: batches.iter().map(Vec::len).sum(),
        seconds,
        tokens: real,
        padding_ratio: padded as f64 / real.max(1) as f64,
        peak_rss_mb: peak_rss_mb(),
        flops,
        inference_seconds,
        ..Default::default()
    })
}

/// Run `batches` on `sessions` sessions (`intra` threads each), each on its own thread, taking
/// batches in turn: (wall seconds, seconds in the model summed over the threads).
fn run_batches(model: &Model, batches: &[Vec<&Encoded>], sessions: usize, intra: Option<usize>) -> Result<(f64, f64), BenchError> {
    let sessions = sessions.max(1);
    let mut session_list = (0..sessions).map(|_| model.session_with_threads(intra)).collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    let inference_seconds = std::thread::scope(|scope| -> Result<f64, BenchError> {
        let handles: Vec<_> = session_list
            .iter_mut()
            .enumerate()
            .map(|(k, session)| {
                scope.spawn(move || -> Result<f64, crate::model::ModelError> {
                    let mut in_model = 0.0;
                    for batch in batches.iter().skip(k).step_by(sessions) {
                        let started = Instant::now();
                        session.run(batch)?;
                        in_model += started.elapsed().as_secs_f64();
                    }
                    Ok(in_model)
                })
            })
            .collect();
        let mut total = 0.0;
        for h in handles {
            total += h.join().map_err(|_| BenchError::Other("a ceiling thread panicked".into()))??;
        }
        Ok(total)
    })?;
    Ok((start.elapsed().as_secs_f64(), inference_seconds))
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Latency {
    p50: f64,
    p99: f64,
}

/// b to e. The whole worker on a backlog already in the topic.
#[allow(clippy::too_many_arguments)] // one function for every worker stage, each its own variant
async fn worker_stage(
    name: &str,
    kafka: &LocalKafka,
    clickhouse: &LocalClickHouse,
    options: &BenchOptions,
    batching: EngineConfig,
    records: &[Vec<u8>],
    avro_schema: Option<&Path>,
    shadow: Option<(&Path, f64)>,
) -> Result<(StageResult, u64), BenchError> {
    let topic = format!("bench-{name}");
    kafka.create_topic(&topic, 4)?;
    let kafka_config = local_kafka_config(kafka, &format!("bench-{name}"));
    let producer: rdkafka::producer::FutureProducer = kafka_config.client(ClientRole::Producer).create()?;
    let items = records.iter().map(|p| Ok(Record { key: None, payload: p.clone() }));
    produce(&producer, &topic, items, None, |_| {}).await?;
    kafka.create_topic(&kafka_config.dead_letter_topic, 1).ok();
    kafka.create_topic(&kafka_config.escalation_topic, 1).ok();
    let ch = ClickHouseConfig {
        url: clickhouse.url(),
        database: format!("bench_{}", name.replace('-', "_")),
        insert_interval_ms: 200,
        ..Default::default()
    };
    ClickHouseService::new(&ch).apply_schema().await?;
    let mut route = RouteConfig::new(topic.clone(), "bench", options.model_dir.clone());
    if let Some(file) = avro_schema {
        route.format = crate::source::decode::Format::Avro;
        route.schema = crate::source::decode::PinnedSchema { file: Some(file.to_path_buf()), message: None };
    }
    if let Some((dir, share)) = shadow {
        route.shadow = Some(dir.to_path_buf());
        route.shadow_share = share;
    }
    let mut config = local_worker_config("bench", kafka_config.clone(), ch.clone(), vec![route], options.inference.clone());
    // Only the pipeline is timed: no escalation writes.
    config.escalation.enabled = false;
    config.batching = batching;
    let done = until_caught_up(kafka_config, vec![topic.clone()]);
    let report = worker::run(config, done).await?;
    // A stage that dead-lettered its input measured nothing (a schema that does not fit, say).
    if report.dead_lettered > 0 || report.rows_inserted < records.len() as u64 {
        return Err(BenchError::Other(format!(
            "stage {name}: {} of {} messages stored, {} dead-lettered: the figures would not measure classification",
            report.rows_inserted,
            records.len(),
            report.dead_lettered
        )));
    }
    let client = clickhouse::Client::default().with_url(&ch.url).with_database(&ch.database).with_validation(false);
    let latency: Latency = client
        .query("SELECT quantile(0.5)(toFloat64(processed_time_ms) - toFloat64(consumed_time_ms)) AS p50, quantile(0.99)(toFloat64(processed_time_ms) - toFloat64(consumed_time_ms)) AS p99 FROM results FINAL")
        .fetch_one()
        .await?;
    let shadow_rows =
        if shadow.is_some() { client.query("SELECT toUInt64(count()) FROM results_shadow").fetch_one::<u64>().await? } else { 0 };
    let stage = StageResult {
        messages: report.consumed as usize,
        seconds: report.busy_seconds,
        tokens: report.engine.real_tokens,
        padding_ratio: report.engine.padding_ratio(),
        p50_ms: latency.p50,
        p99_ms: latency.p99,
        peak_rss_mb: peak_rss_mb(),
        flops: 0.0,
        batch_sizes: report.batch_sizes.iter().map(|c| crate::batcher::tuner::describe(c)).collect::<Vec<_>>().join(" | "),
        inference_seconds: report.engine.inference_seconds,
        batch_lengths: report.batch_lengths,
    };
    Ok((stage, shadow_rows))
}

pub async fn run(options: BenchOptions, progress: impl Fn(&str)) -> Result<Vec<WorkloadResult>, BenchError> {
    let model = {
        let (dir, inference) = (options.model_dir.clone(), options.inference.clone());
        Arc::new(tokio::task::spawn_blocking(move || Model::load(&dir, &inference)).await.map_err(|e| BenchError::Other(e.to_string()))??)
    };
    progress("starting the mock Kafka cluster and a private ClickHouse server");
    let kafka = LocalKafka::start(1)?;
    let clickhouse = tokio::task::spawn_blocking(LocalClickHouse::start).await.map_err(|e| BenchError::Other(e.to_string()))??;
    let schema_dir = tempfile::tempdir().map_err(|e| BenchError::Other(format!("a temporary directory: {e}")))?;
    let schema_file = schema_dir.path().join("bench-message.avsc");
    std::fs::write(&schema_file, AVRO_SCHEMA).map_err(|e| BenchError::Other(format!("{}: {e}", schema_file.display())))?;
    let mut results = Vec::new();
    for (index, &workload) in options.workloads.iter().enumerate() {
        let (messages, source) = workload_messages(workload, &options.shared_data, options.messages);
        progress(&format!("{}: {source}", workload.name()));
        let records: Vec<Vec<u8>> = messages.iter().map(|m| m.to_string().into_bytes()).collect();
        progress("  a. ceiling: the model alone on sorted batches");
        let m = model.clone();
        let (batch_size, max_tokens, engine) =
            (options.ceiling_batch_size, options.batching.policy.max_batch_tokens, options.batching.clone());
        let msgs = messages.clone();
        // Tokenized once: the ceiling and the replay of stage b's batches both run these.
        let (encoded, (ceiling, ceiling_batch_size)) = tokio::task::spawn_blocking(move || {
            let encoded = pretokenize(&m, &msgs);
            let stage = ceiling(&m, &encoded, batch_size, max_tokens, &engine);
            stage.map(|stage| (encoded, stage))
        })
        .await
        .map_err(|e| BenchError::Other(e.to_string()))??;
        progress("  b. the whole worker at default settings");
        let recording = EngineConfig { record_batches: true, ..options.batching.clone() };
        let mut worker = worker_stage(&format!("{index}-b"), &kafka, &clickhouse, &options, recording, &records, None, None).await?.0;
        progress("  a2. stage b's own batches, replayed on the model alone");
        let (m, recorded, engine) = (model.clone(), std::mem::take(&mut worker.batch_lengths), options.batching.clone());
        let worker_batches = tokio::task::spawn_blocking(move || replay(&m, &encoded, &recorded, &engine))
            .await
            .map_err(|e| BenchError::Other(e.to_string()))??;
        progress("  c. the same worker with max_batch_size 1");
        let mut one = options.batching.clone();
        one.policy.max_batch_size = 1;
        let batch_one = worker_stage(&format!("{index}-c"), &kafka, &clickhouse, &options, one, &records, None, None).await?.0;
        let avro = if options.avro {
            progress("  d. stage b on the same messages as raw Avro (pinned schema)");
            let avro_records = avro_records(&messages)?;
            let batching = options.batching.clone();
            Some(
                worker_stage(&format!("{index}-d"), &kafka, &clickhouse, &options, batching, &avro_records, Some(&schema_file), None)
                    .await?
                    .0,
            )
        } else {
            None
        };
        let shadow = match &options.shadow {
            Some((dir, share)) => {
                progress(&format!("  e. stage b with a shadow model classifying {:.0}% of the messages", share * 100.0));
                let dir = dir.clone().unwrap_or_else(|| options.model_dir.clone());
                let batching = options.batching.clone();
                let (stage, shadow_rows) =
                    worker_stage(&format!("{index}-e"), &kafka, &clickhouse, &options, batching, &records, None, Some((&dir, *share)))
                        .await?;
                Some(ShadowStage { share: *share, stage, shadow_rows })
            }
            None => None,
        };
        results.push(WorkloadResult { workload, source, ceiling_batch_size, ceiling, worker_batches, worker, batch_one, avro, shadow });
    }
    Ok(results)
}

/// The report, ratios first.
pub fn render(results: &[WorkloadResult]) -> String {
    let mut out = String::new();
    for r in results {
        out.push_str(&format!(
            "\n{}  [{}]\n  b/a (worker / ceiling) = {:.2}    b/c (worker / batch size 1) = {:.2}\n",
            r.workload.name(),
            r.source,
            r.worker_over_ceiling(),
            r.worker_over_batch_one()
        ));
        if let Some(ratio) = r.avro_over_json() {
            out.push_str(&format!("  d/b (the worker on Avro / on JSON) = {ratio:.2}\n"));
        }
        if let Some(e) = &r.shadow {
            let ratio = e.stage.per_second() / r.worker.per_second().max(f64::MIN_POSITIVE);
            let asked = (e.share * e.stage.messages as f64).round();
            out.push_str(&format!(
                "  e/b (the route's model with a {:.0}% shadow / without) = {ratio:.2} (its share's bound: {:.2}); \
                 the shadow stored {} answers, {:.0}% of its share (the rest shed, never waited for)\n",
                e.share * 100.0,
                1.0 - e.share,
                e.shadow_rows,
                100.0 * e.shadow_rows as f64 / asked.max(1.0)
            ));
        }
        let gap = r.gap();
        out.push_str(&format!(
            "  b/a taken apart = shapes {:.2} x contention {:.2} x occupancy {:.2} (= {:.2})\n\
             \x20   shapes: model time per message, a's batches / b's own (a2) on the model alone\n\
             \x20   contention: the same batches alone (a2) / inside the running worker (b)\n\
             \x20   occupancy: inference threads in the model on average, b {:.2} / a {:.2}\n",
            gap.shapes,
            gap.contention,
            gap.occupancy,
            gap.product(),
            r.worker.threads_in_model(),
            r.ceiling.threads_in_model()
        ));
        out.push_str(&format!("  (a: pre-tokenized, length-sorted batches of {}, the best of 8/16/32/64 here)\n", r.ceiling_batch_size));
        out.push_str("  stage                          msg/s   tokens/s  padded/real   p50 ms   p99 ms  peak RSS MB\n");
        for (name, s) in [
            ("a. ceiling, sorted batches", &r.ceiling),
            ("a2. b's batches, model alone", &r.worker_batches),
            ("b. worker, default batching", &r.worker),
            ("c. worker, batch size 1", &r.batch_one),
        ]
        .into_iter()
        .chain(r.avro.as_ref().map(|d| ("d. worker, Avro (pinned)", d)))
        .chain(r.shadow.as_ref().map(|e| ("e. worker + shadow", &e.stage)))
        {
            let lat = |v: f64| if name.starts_with('a') { "-".to_string() } else { format!("{v:.0}") };
            out.push_str(&format!(
                "  {name:<28} {:>8.1} {:>10.0} {:>12.2} {:>8} {:>8} {:>12.0}\n",
                s.per_second(),
                s.tokens_per_second(),
                s.padding_ratio,
                lat(s.p50_ms),
                lat(s.p99_ms),
                s.peak_rss_mb
            ));
        }
        if !r.worker.batch_sizes.is_empty() {
            out.push_str(&format!("  b's batch sizes, tuned per length: {}\n", r.worker.batch_sizes));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Template;

    /// The three factors are read off the report as b/a's explanation: they must multiply back
    /// to b/a exactly, whatever the stages' message counts and times.
    #[test]
    fn the_gap_factors_multiply_back_to_b_over_a() {
        let stage = |messages: usize, seconds: f64, inference_seconds: f64| StageResult {
            messages,
            seconds,
            inference_seconds,
            ..Default::default()
        };
        let cases = [
            (stage(10_000, 6.7, 13.1), stage(9_800, 7.2, 14.0), stage(10_000, 8.1, 15.2)),
            (stage(500, 2.5, 4.9), stage(480, 2.3, 4.5), stage(520, 2.7, 3.1)),
            (stage(1_000, 1.0, 1.0), stage(1_000, 1.0, 1.0), stage(1_000, 1.0, 1.0)),
        ];
        for (a, a2, b) in cases {
            let r = WorkloadResult {
                workload: Workload::Short,
                source: String::new(),
                ceiling_batch_size: 32,
                ceiling: a.clone(),
                worker_batches: a2.clone(),
                worker: b.clone(),
                batch_one: StageResult::default(),
                avro: None,
                shadow: None,
            };
            let gap = r.gap();
            assert!((gap.product() - r.worker_over_ceiling()).abs() < 1e-12, "{gap:?} vs {}", r.worker_over_ceiling());
            // Each factor is the ratio it is named for.
            let per = |s: &StageResult| s.inference_seconds / s.messages as f64;
            assert!((gap.shapes - per(&a) / per(&a2)).abs() < 1e-12);
            assert!((gap.contention - per(&a2) / per(&b)).abs() < 1e-12);
            assert!((gap.occupancy - (b.inference_seconds / b.seconds) / (a.inference_seconds / a.seconds)).abs() < 1e-12);
        }
    }

    /// Stage d is only a fair comparison if each Avro message renders the same text as its
    /// JSON twin (the short messages have no subject: null in Avro, absent in JSON).
    #[test]
    fn avro_messages_render_the_same_text_as_their_json_twins() {
        let reader = crate::source::decode::avro::AvroReader::parse(AVRO_SCHEMA, &[]).unwrap();
        let template = Template::parse("{subject}\n{body}").unwrap();
        let decoder = Decoder::new(FieldMap::default(), template, usize::MAX, usize::MAX);
        for workload in [Workload::Short, Workload::Tickets] {
            let mut messages = generated(workload, 50);
            messages.push(json!({"body": "a message without a subject, as Banking77's are"}));
            let avro = avro_records(&messages).unwrap();
            assert_eq!(avro.len(), messages.len());
            for (json, datum) in messages.iter().zip(&avro) {
                let from_avro = decoder.decode_value(reader.read(datum).unwrap()).unwrap();
                let from_json = decoder.decode(json.to_string().as_bytes()).unwrap();
                assert_eq!(from_avro.text, from_json.text);
            }
        }
        let short = json!({"body": "my card"});
        let read = reader.read(&avro_records(&[short]).unwrap()[0]).unwrap();
        assert_eq!(read, json!({"subject": null, "body": "my card"}));
    }
}
