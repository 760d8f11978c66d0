//! The compute pipeline for one model: a pool of tokenizer threads, one batcher thread and
//! one or more inference threads (each with its own [`Backend`], an ONNX Runtime session in
//! production), joined by bounded channels. Callers submit rendered text with a tag; each
//! [`Outcome`] comes back with its tag, in whatever order batches finish. Async callers use
//! [`Submitter::submit_async`] and never block a runtime thread; when the model is behind,
//! submissions wait (backpressure).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::batcher::tuner::{BatchSizeTuner, BucketChoice, SizeCaps, TunerSettings};
use crate::batcher::{Assembler, Batch, BatchPolicy};
use crate::model::{Encoded, InferenceSession, Model, ModelError, Prediction, Rendered, TextEncoder};
use crate::telemetry;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    #[serde(flatten)]
    pub policy: BatchPolicy,
    /// Threads that tokenize (one tokenizes ~15k short texts/s; inference is the bottleneck).
    pub tokenizer_threads: usize,
    /// Inference threads, each with its own session (0: one per core on CPU, one on a GPU).
    /// Unless `inference.intra_threads` is set, the cores are shared out among the sessions:
    /// on CPU, N single-threaded sessions beat one N-threaded session (`triage bench --sweep`).
    pub inference_threads: usize,
    /// Capacity of each queue between stages (messages).
    pub queue_capacity: usize,
    /// Cores this engine may use (None: all): set when several models share the machine.
    #[serde(skip)]
    pub cores: Option<usize>,
    /// The nice value of this engine's threads and its sessions' thread pools (None: the
    /// process's own): a shadow model runs below the models that answer, so when both want the
    /// cores it gets about the share of them its `shadow_share` asks for, and no more.
    #[serde(skip)]
    pub nice: Option<i32>,
    /// Keep every batch's token lengths (`triage bench` replays the worker's own batches on
    /// the model alone, to tell what batch shapes cost from what the rest of the pipeline
    /// takes). The log grows with the traffic: never set in a long-running worker.
    #[serde(skip)]
    pub record_batches: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            policy: BatchPolicy::default(),
            tokenizer_threads: 1,
            inference_threads: 0,
            queue_capacity: 1024,
            cores: None,
            nice: None,
            record_batches: false,
        }
    }
}

impl EngineConfig {
    /// (sessions, intra-op threads per session; None: the model's own setting).
    pub fn sessions_for(&self, model: &Model) -> (usize, Option<usize>) {
        let cores = self.cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
        let on_cpu = model.info().provider == crate::model::Provider::Cpu;
        split_cores(cores, self.inference_threads, on_cpu, model.intra_threads())
    }

    pub fn validate(&self, max_length: usize) -> Result<(), String> {
        self.policy.validate(max_length)?;
        if self.tokenizer_threads == 0 {
            return Err("tokenizer_threads must be at least 1".into());
        }
        if self.queue_capacity == 0 {
            return Err("queue_capacity must be at least 1".into());
        }
        Ok(())
    }
}

/// (sessions, intra-op threads each) on `cores`: on a CPU, one session per core unless
/// `inference_threads` says how many, the cores shared out among them unless the model sets
/// its own intra-op threads; a GPU runs one session (its own threads).
fn split_cores(cores: usize, inference_threads: usize, on_cpu: bool, model_intra_threads: usize) -> (usize, Option<usize>) {
    let sessions = match inference_threads {
        0 if on_cpu => cores,
        0 => 1,
        n => n,
    };
    let intra = match model_intra_threads {
        0 if on_cpu => Some((cores / sessions).max(1)),
        _ => None,
    };
    (sessions, intra)
}

/// One inference step: a padded batch of encoded texts in, one prediction per text out, in
/// batch order. Each inference thread owns one (`&mut self`: an ONNX Runtime session runs one
/// batch at a time); tests use a fake one, without ONNX Runtime.
pub trait Backend: Send + 'static {
    fn run(&mut self, batch: &[&Encoded]) -> Result<Vec<Prediction>, ModelError>;
}

impl Backend for InferenceSession {
    fn run(&mut self, batch: &[&Encoded]) -> Result<Vec<Prediction>, ModelError> {
        InferenceSession::run(self, batch)
    }
}

/// Why one message could not be classified.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ClassifyError {
    /// The message itself is unusable (callers report these through the same channel).
    #[error("bad input: {0}")]
    Input(#[from] crate::message::DecodeError),
    #[error("tokenizer failed: {0}")]
    Tokenize(String),
    /// This message fails alone (isolated by splitting its batch) while the model still
    /// answers other input: the message is at fault.
    #[error("inference failed on this message: {0}")]
    Inference(String),
    /// The backend fails on input it answered before (device lost, out of memory): nothing can
    /// be classified, and the message is not at fault.
    #[error("the inference backend is failing on every input: {0}")]
    Backend(String),
}

#[derive(Debug, Clone)]
pub struct Classified {
    pub prediction: Prediction,
    /// Tokens the model saw (after truncation, with special tokens).
    pub tokens: usize,
    pub truncated: bool,
    pub chars: usize,
    /// Submission to the start of its batch's inference.
    pub queued: Duration,
    /// Its batch's inference time.
    pub inference: Duration,
    pub batch_size: usize,
}

#[derive(Debug)]
pub struct Outcome<T> {
    pub tag: T,
    pub result: Result<Classified, ClassifyError>,
}

/// The engine is gone (shut down or a stage died); the request is handed back.
#[derive(Debug, thiserror::Error)]
#[error("the inference engine has stopped")]
pub struct EngineClosed<T>(pub T);

/// Counters since start, read at any time (and by metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub submitted: AtomicU64,
    pub classified: AtomicU64,
    pub failed: AtomicU64,
    pub batches: AtomicU64,
    pub real_tokens: AtomicU64,
    pub padded_tokens: AtomicU64,
    pub tokenize_nanos: AtomicU64,
    pub inference_nanos: AtomicU64,
    /// The batch size tuner, when the policy tunes (the batcher reads its caps, the inference
    /// threads report to it).
    tuner: std::sync::Mutex<Option<BatchSizeTuner>>,
    /// Every batch's token lengths, when `EngineConfig::record_batches` asks for them (None:
    /// nothing is locked or kept per batch).
    batch_log: Option<std::sync::Mutex<Vec<Vec<usize>>>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    pub submitted: u64,
    pub classified: u64,
    pub failed: u64,
    pub batches: u64,
    pub real_tokens: u64,
    pub padded_tokens: u64,
    pub tokenize_seconds: f64,
    pub inference_seconds: f64,
}

impl StatsSnapshot {
    /// Counters of two engines added up.
    pub fn merge(&self, o: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            submitted: self.submitted + o.submitted,
            classified: self.classified + o.classified,
            failed: self.failed + o.failed,
            batches: self.batches + o.batches,
            real_tokens: self.real_tokens + o.real_tokens,
            padded_tokens: self.padded_tokens + o.padded_tokens,
            tokenize_seconds: self.tokenize_seconds + o.tokenize_seconds,
            inference_seconds: self.inference_seconds + o.inference_seconds,
        }
    }

    pub fn mean_batch_size(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.classified as f64 / self.batches as f64
        }
    }

    /// Padded tokens / real tokens (1.0 = no padding).
    pub fn padding_ratio(&self) -> f64 {
        if self.real_tokens == 0 {
            1.0
        } else {
            self.padded_tokens as f64 / self.real_tokens as f64
        }
    }
}

impl EngineStats {
    /// The batch sizes in use per text length, and what was measured (empty when not tuning).
    pub fn batch_sizes(&self) -> Vec<BucketChoice> {
        self.tuner.lock().map(|t| t.as_ref().map(BatchSizeTuner::choices).unwrap_or_default()).unwrap_or_default()
    }

    /// The token lengths of every batch sent to inference so far, in order (empty unless
    /// `EngineConfig::record_batches`).
    pub fn recorded_batches(&self) -> Vec<Vec<usize>> {
        self.batch_log.as_ref().and_then(|log| log.lock().ok().map(|l| l.clone())).unwrap_or_default()
    }

    fn caps(&self) -> Option<SizeCaps> {
        self.tuner.lock().ok()?.as_ref().map(BatchSizeTuner::caps)
    }

    fn record_batch(&self, longest: usize, cap: usize, rows: usize, tokens: usize, seconds: f64) {
        if let Ok(mut tuner) = self.tuner.lock() {
            if let Some(t) = tuner.as_mut() {
                t.record(longest, cap, rows, tokens, seconds);
            }
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            submitted: get(&self.submitted),
            classified: get(&self.classified),
            failed: get(&self.failed),
            batches: get(&self.batches),
            real_tokens: get(&self.real_tokens),
            padded_tokens: get(&self.padded_tokens),
            tokenize_seconds: get(&self.tokenize_nanos) as f64 / 1e9,
            inference_seconds: get(&self.inference_nanos) as f64 / 1e9,
        }
    }
}

/// The latest of something replaced whole while readers hold on to what they took: an
/// engine's current generation, a route tier's current model version.
pub struct Latest<T>(std::sync::RwLock<Arc<T>>);

impl<T> Latest<T> {
    pub fn new(value: Arc<T>) -> Self {
        Latest(std::sync::RwLock::new(value))
    }

    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(latest) => latest.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Put `value` in; the one it replaces is returned.
    pub fn replace(&self, value: Arc<T>) -> Arc<T> {
        match self.0.write() {
            Ok(mut latest) => std::mem::replace(&mut *latest, value),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), value),
        }
    }
}

/// One loaded version of an engine's model: its tokenizer and one backend per inference
/// thread. A message is tokenized, batched and run within the generation it was submitted to,
/// so a reload never mixes versions in a batch, and batches formed before a reload finish on
/// the model they started with. A generation is freed when nothing refers to it any more: the
/// callers have moved on, its last batch has ended, and the threads have given its backends back.
pub struct Generation {
    id: u64,
    version: String,
    encoder: Arc<TextEncoder>,
    /// Backends no inference thread holds right now (each thread holds at most one).
    idle: std::sync::Mutex<Vec<Box<dyn Backend>>>,
    /// A text this generation's tokenizer has encoded: the failing-backend check.
    probe: Encoded,
    /// Replaced by a newer generation: threads give its backends back after each batch.
    retired: std::sync::atomic::AtomicBool,
    /// Its series, labelled with its model and version (they leave /metrics with it).
    metrics: GenerationMetrics,
}

struct GenerationMetrics {
    model: String,
    tokenize_seconds: metrics::Histogram,
    batch_size: metrics::Histogram,
    batch_tokens: metrics::Histogram,
    padding_ratio: metrics::Histogram,
    inference_seconds: metrics::Histogram,
}

impl GenerationMetrics {
    fn new(model: &str, version: &str) -> Self {
        let labels = [("model", model.to_string()), ("model_version", version.to_string())];
        telemetry::versions::serving(model, version);
        GenerationMetrics {
            model: model.to_string(),
            tokenize_seconds: metrics::histogram!(telemetry::TOKENIZE_SECONDS, &labels),
            batch_size: metrics::histogram!(telemetry::BATCH_SIZE, &labels),
            batch_tokens: metrics::histogram!(telemetry::BATCH_TOKENS, &labels),
            padding_ratio: metrics::histogram!(telemetry::BATCH_PADDING_RATIO, &labels),
            inference_seconds: metrics::histogram!(telemetry::INFERENCE_SECONDS, &labels),
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        telemetry::versions::released(&self.metrics.model, &self.version);
    }
}

impl Generation {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The model version it runs (the descriptor's version, else the graph's fingerprint).
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn encoder(&self) -> &TextEncoder {
        &self.encoder
    }

    fn take(&self) -> Option<Box<dyn Backend>> {
        self.idle.lock().ok()?.pop()
    }

    fn give_back(&self, backend: Box<dyn Backend>) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(backend);
        }
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation").field("id", &self.id).field("version", &self.version).finish_non_exhaustive()
    }
}

struct Request<T> {
    tag: T,
    text: Rendered,
    submitted: Instant,
    generation: Arc<Generation>,
}

struct Tokenized<T> {
    tag: T,
    encoded: Encoded,
    submitted: Instant,
    generation: Arc<Generation>,
}

/// Cloneable handle for submitting work.
pub struct Submitter<T> {
    requests: flume::Sender<Request<T>>,
    stats: Arc<EngineStats>,
    current: Arc<Latest<Generation>>,
}

impl<T> Clone for Submitter<T> {
    fn clone(&self) -> Self {
        Submitter { requests: self.requests.clone(), stats: self.stats.clone(), current: self.current.clone() }
    }
}

impl<T: Send + 'static> Submitter<T> {
    /// The generation new work goes to (the latest installed).
    pub fn current(&self) -> Arc<Generation> {
        self.current.get()
    }

    /// Blocks while the engine is full.
    pub fn submit(&self, tag: T, text: Rendered) -> Result<(), EngineClosed<T>> {
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        let request = Request { tag, text, submitted: Instant::now(), generation: self.current() };
        self.requests.send(request).map_err(|e| EngineClosed(e.into_inner().tag))
    }

    /// Waits (without blocking the runtime) while the engine is full.
    pub async fn submit_async(&self, tag: T, text: Rendered) -> Result<(), EngineClosed<T>> {
        let generation = self.current();
        self.submit_async_to(&generation, tag, text).await
    }

    /// Submit to `generation` only if the engine has room now (for work that must never make
    /// the caller wait: a shadow model's copy). Err hands the tag back, full or closed.
    pub fn try_submit_to(&self, generation: &Arc<Generation>, tag: T, text: Rendered) -> Result<(), EngineClosed<T>> {
        let request = Request { tag, text, submitted: Instant::now(), generation: generation.clone() };
        self.requests.try_send(request).map_err(|e| EngineClosed(e.into_inner().tag))?;
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Like [`Submitter::submit_async`], on a given generation: the one whose template rendered
    /// `text` (a caller that picked a generation before rendering keeps the message on it).
    pub async fn submit_async_to(&self, generation: &Arc<Generation>, tag: T, text: Rendered) -> Result<(), EngineClosed<T>> {
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        let request = Request { tag, text, submitted: Instant::now(), generation: generation.clone() };
        self.requests.send_async(request).await.map_err(|e| EngineClosed(e.into_inner().tag))
    }
}

pub struct Engine<T> {
    submitter: Option<Submitter<T>>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<EngineStats>,
    installer: Installer,
}

/// Installs new generations into a running engine (a reload). Cloneable and apart from the
/// engine: it holds no submitter, so it never keeps the engine from shutting down.
#[derive(Clone)]
pub struct Installer {
    name: String,
    current: Arc<Latest<Generation>>,
    stats: Arc<EngineStats>,
    /// Backends each generation must bring: one per inference thread.
    inference_threads: usize,
    policy: BatchPolicy,
    generations: Arc<AtomicU64>,
    /// What the engine was started with: new generations' sessions are built the same way.
    config: EngineConfig,
}

impl Installer {
    /// Sessions of `model` for a new generation (as many as the engine has inference threads,
    /// with the threads and priority the engine was started with): built off the hot path,
    /// before [`Installer::install`].
    pub fn sessions_of(&self, model: &Model) -> Result<Vec<Box<dyn Backend>>, ModelError> {
        let intra = self.config.sessions_for(model).1;
        on_priority_thread(self.config.nice, || backends_of(model, self.inference_threads, intra))
    }

    /// Make a new generation current: work submitted from now on (and by callers that pick it
    /// up with [`Submitter::current`]) runs on `backends`; what was submitted before finishes on
    /// its own generation, which is freed after. `backends` must be one per inference thread.
    pub fn install(
        &self,
        version: &str,
        encoder: Arc<TextEncoder>,
        backends: Vec<Box<dyn Backend>>,
    ) -> Result<Arc<Generation>, ModelError> {
        if backends.len() != self.inference_threads {
            return Err(ModelError::invalid(
                &self.name,
                format!("a new generation needs {} backends (one per inference thread), not {}", self.inference_threads, backends.len()),
            ));
        }
        let id = self.generations.fetch_add(1, Ordering::Relaxed);
        let generation = Arc::new(new_generation(&self.name, id, version, encoder, backends)?);
        let previous = self.current.replace(generation.clone());
        previous.retired.store(true, Ordering::Release);
        // What was measured for the old model says nothing about the new one.
        if let Ok(mut tuner) = self.stats.tuner.lock() {
            if tuner.is_some() {
                *tuner = Some(BatchSizeTuner::new(self.policy.max_batch_size, TunerSettings::default()));
            }
        }
        Ok(generation)
    }

    /// The generation new work goes to.
    pub fn current(&self) -> Arc<Generation> {
        self.current.get()
    }
}

impl<T: Send + 'static> Engine<T> {
    /// Start the threads over a loaded model: as many sessions as `config` asks for the model's
    /// provider. Sessions are created here, so model problems surface now.
    pub fn start(model: Arc<Model>, config: &EngineConfig, outcomes: flume::Sender<Outcome<T>>) -> Result<Self, ModelError> {
        config.validate(model.info().max_length).map_err(|reason| ModelError::invalid(&model.info().dir, reason))?;
        let (count, intra) = config.sessions_for(&model);
        let sessions = on_priority_thread(config.nice, || backends_of(&model, count, intra))?;
        Self::with_generation(&model.info().name, &model.info().version, Arc::new(model.encoder().clone()), sessions, config, outcomes)
    }

    /// Installs new generations (reloads) into this engine.
    pub fn installer(&self) -> Installer {
        self.installer.clone()
    }

    /// Make a new generation current (see [`Installer::install`]).
    pub fn install(
        &self,
        version: &str,
        encoder: Arc<TextEncoder>,
        backends: Vec<Box<dyn Backend>>,
    ) -> Result<Arc<Generation>, ModelError> {
        self.installer.install(version, encoder, backends)
    }

    /// The generation new work goes to.
    pub fn current(&self) -> Arc<Generation> {
        self.installer.current()
    }

    /// Start the threads over any backends: one inference thread per backend. `name` labels the
    /// engine's metrics.
    pub fn with_backends(
        name: &str,
        encoder: Arc<TextEncoder>,
        backends: Vec<Box<dyn Backend>>,
        config: &EngineConfig,
        outcomes: flume::Sender<Outcome<T>>,
    ) -> Result<Self, ModelError> {
        Self::with_generation(name, "", encoder, backends, config, outcomes)
    }

    fn with_generation(
        name: &str,
        version: &str,
        encoder: Arc<TextEncoder>,
        backends: Vec<Box<dyn Backend>>,
        config: &EngineConfig,
        outcomes: flume::Sender<Outcome<T>>,
    ) -> Result<Self, ModelError> {
        config.validate(encoder.max_length()).map_err(|reason| ModelError::invalid(name, reason))?;
        if backends.is_empty() {
            return Err(ModelError::invalid(name, "an engine needs at least one inference backend"));
        }
        let count = backends.len();
        let first = Arc::new(new_generation(name, 0, version, encoder, backends)?);
        let stats = Arc::new(EngineStats { batch_log: config.record_batches.then(Default::default), ..EngineStats::default() });
        if config.policy.tune_batch_size && config.policy.max_batch_size > 1 {
            if let Ok(mut tuner) = stats.tuner.lock() {
                *tuner = Some(BatchSizeTuner::new(config.policy.max_batch_size, TunerSettings::default()));
            }
        }
        let (request_tx, request_rx) = flume::bounded::<Request<T>>(config.queue_capacity);
        let (token_tx, token_rx) = flume::bounded::<Tokenized<T>>(config.queue_capacity);
        // One batch in hand per inference thread: the batcher keeps sorting while they compute.
        let (batch_tx, batch_rx) = flume::bounded::<Batch<Tokenized<T>>>(count);
        let mut threads = Vec::new();

        for i in 0..config.tokenizer_threads {
            let (rx, tx, out, stats) = (request_rx.clone(), token_tx.clone(), outcomes.clone(), stats.clone());
            threads.push(spawn(format!("triage-tokenize-{i}"), config.nice, move || tokenize_loop(rx, tx, out, &stats)));
        }
        drop((request_rx, token_tx));

        let policy = config.policy.clone();
        let batch_stats = stats.clone();
        threads.push(spawn("triage-batcher".into(), config.nice, move || batch_loop(policy, token_rx, batch_tx, &batch_stats)));

        for i in 0..count {
            let (rx, out, stats, name) = (batch_rx.clone(), outcomes.clone(), stats.clone(), name.to_string());
            threads.push(spawn(format!("triage-infer-{i}"), config.nice, move || inference_loop(rx, out, &stats, &name)));
        }
        let current = Arc::new(Latest::new(first));
        let installer = Installer {
            name: name.to_string(),
            current: current.clone(),
            stats: stats.clone(),
            inference_threads: count,
            policy: config.policy.clone(),
            generations: Arc::new(AtomicU64::new(1)),
            config: config.clone(),
        };
        Ok(Engine { submitter: Some(Submitter { requests: request_tx, stats: stats.clone(), current }), threads, stats, installer })
    }

    pub fn submitter(&self) -> Submitter<T> {
        self.submitter.clone().expect("submitter lives until shutdown")
    }

    pub fn submit(&self, tag: T, text: Rendered) -> Result<(), EngineClosed<T>> {
        match &self.submitter {
            Some(s) => s.submit(tag, text),
            None => Err(EngineClosed(tag)),
        }
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub fn stats_handle(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    /// Stop accepting work, let everything in flight finish, and join the threads. Outcomes of
    /// in-flight messages are still delivered. Other `Submitter` clones must be dropped first.
    pub fn shutdown(mut self) {
        self.submitter = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("an engine thread panicked");
            }
        }
    }
}

/// Give the calling thread the nice value `nice` (Linux: nice is per thread, and the threads it
/// creates inherit it, ONNX Runtime's intra-op pools included). Lowering needs no privilege.
fn lower_priority(nice: Option<i32>) {
    let Some(nice) = nice.filter(|n| *n > 0) else { return };
    // SAFETY: setpriority reads no memory of ours; `0` names the calling thread on Linux.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if result != 0 {
        tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower a thread's priority: the shadow competes evenly");
    }
}

/// Run `f` on a thread of priority `nice` (so what it creates, sessions' thread pools, runs at
/// it), or here when `nice` is None.
fn on_priority_thread<R: Send>(nice: Option<i32>, f: impl FnOnce() -> R + Send) -> R {
    if nice.is_none() {
        return f();
    }
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            lower_priority(nice);
            f()
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// The nice value that gives a thread about `share` of the CPU against threads at nice 0 when
/// both want it (Linux CFS: each nice step is a weight factor of 1.25).
pub fn nice_for_share(share: f64) -> i32 {
    if !(share > 0.0 && share < 0.5) {
        return 0;
    }
    (((1.0 - share) / share).ln() / 1.25f64.ln()).round().clamp(0.0, 19.0) as i32
}

/// `count` sessions of `model` with `intra` intra-op threads each, as engine backends.
fn backends_of(model: &Model, count: usize, intra: Option<usize>) -> Result<Vec<Box<dyn Backend>>, ModelError> {
    (0..count).map(|_| model.session_with_threads(intra).map(|s| Box::new(s) as Box<dyn Backend>)).collect()
}

fn new_generation(
    name: &str,
    id: u64,
    version: &str,
    encoder: Arc<TextEncoder>,
    backends: Vec<Box<dyn Backend>>,
) -> Result<Generation, ModelError> {
    // What a failing backend is checked against: a text any model must take.
    let probe = encoder.encode(PROBE_TEXT).map_err(|e| ModelError::invalid(name, format!("the tokenizer fails on a plain text: {e}")))?;
    Ok(Generation {
        id,
        version: version.to_string(),
        encoder,
        idle: std::sync::Mutex::new(backends),
        probe,
        retired: std::sync::atomic::AtomicBool::new(false),
        metrics: GenerationMetrics::new(name, version),
    })
}

fn spawn(name: String, nice: Option<i32>, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            lower_priority(nice);
            f()
        })
        .expect("the OS refused to start an engine thread")
}

fn tokenize_loop<T>(
    requests: flume::Receiver<Request<T>>,
    tokens: flume::Sender<Tokenized<T>>,
    outcomes: flume::Sender<Outcome<T>>,
    stats: &EngineStats,
) {
    for req in requests.iter() {
        let start = Instant::now();
        // A tokenizer panic on some odd input must cost one message, not the worker.
        let encoded = std::panic::catch_unwind(AssertUnwindSafe(|| req.generation.encoder.encode_rendered(&req.text)))
            .unwrap_or_else(|_| Err("tokenizer panicked on this input".to_string()));
        let elapsed = start.elapsed();
        req.generation.metrics.tokenize_seconds.record(elapsed.as_secs_f64());
        stats.tokenize_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        let sent = match encoded {
            Ok(encoded) => tokens.send(Tokenized { tag: req.tag, encoded, submitted: req.submitted, generation: req.generation }).is_ok(),
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                outcomes.send(Outcome { tag: req.tag, result: Err(ClassifyError::Tokenize(e)) }).is_ok()
            }
        };
        if !sent {
            return;
        }
    }
}

fn batch_loop<T>(
    policy: BatchPolicy,
    tokens: flume::Receiver<Tokenized<T>>,
    batches: flume::Sender<Batch<Tokenized<T>>>,
    stats: &EngineStats,
) {
    let mut assembler = Assembler::new(policy);
    let mut input_open = true;
    // The generation of what the assembler holds: a batch never mixes two (a reload).
    let mut holding: Option<u64> = None;
    let mut push = |assembler: &mut Assembler<Tokenized<T>>, t: Tokenized<T>| -> bool {
        if holding.is_some_and(|id| id != t.generation.id) {
            while let Some(batch) = assembler.pop_due(Instant::now(), true) {
                if !send_batch(batch, &batches, stats) {
                    return false;
                }
            }
        }
        holding = Some(t.generation.id);
        let len = t.encoded.len();
        assembler.push(t, len, Instant::now());
        true
    };
    loop {
        // Take everything already waiting without blocking, so the window sees it.
        while let Ok(t) = tokens.try_recv() {
            if !push(&mut assembler, t) {
                return;
            }
        }
        if let Some(caps) = stats.caps() {
            assembler.set_caps(caps);
        }
        if let Some(batch) = assembler.pop_due(Instant::now(), !input_open) {
            if !send_batch(batch, &batches, stats) {
                return;
            }
            continue;
        }
        if !input_open {
            return; // flushed everything
        }
        let next = match assembler.deadline() {
            Some(deadline) => tokens.recv_deadline(deadline),
            None => tokens.recv().map_err(|_| flume::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(t) => {
                if !push(&mut assembler, t) {
                    return;
                }
            }
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => input_open = false,
        }
    }
}

/// Count a batch and hand it to the inference threads; false when they are gone.
fn send_batch<T>(batch: Batch<Tokenized<T>>, batches: &flume::Sender<Batch<Tokenized<T>>>, stats: &EngineStats) -> bool {
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.real_tokens.fetch_add(batch.real_tokens() as u64, Ordering::Relaxed);
    stats.padded_tokens.fetch_add(batch.padded_tokens() as u64, Ordering::Relaxed);
    if let Some(Ok(mut log)) = stats.batch_log.as_ref().map(|l| l.lock()) {
        log.push(batch.lengths.clone());
    }
    if let Some(first) = batch.items.first() {
        let m = &first.generation.metrics;
        m.batch_size.record(batch.len() as f64);
        m.batch_tokens.record(batch.padded_tokens() as f64);
        m.padding_ratio.record(batch.padding_ratio());
    }
    batches.send(batch).is_ok()
}

/// Checked against when messages fail, to tell a poison message from a failing backend.
const PROBE_TEXT: &str = "where is my order";

/// Run a batch; a panic in the backend counts as a failure of the batch.
fn run_guarded(backend: &mut dyn Backend, batch: &[&Encoded]) -> Result<Vec<Prediction>, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| backend.run(batch))) {
        Ok(Ok(predictions)) if predictions.len() == batch.len() => Ok(predictions),
        Ok(Ok(predictions)) => Err(format!("the backend returned {} predictions for {} messages", predictions.len(), batch.len())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!(
            "the backend panicked: {}",
            panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied()).unwrap_or("(no message)")
        )),
    }
}

/// Run a batch; when it fails, split it in halves until every message that fails, fails alone.
/// Returns one result per message, in batch order, and how many backend runs it took.
pub fn run_isolating(backend: &mut dyn Backend, batch: &[&Encoded]) -> (Vec<Result<Prediction, String>>, usize) {
    match run_guarded(backend, batch) {
        Ok(predictions) => (predictions.into_iter().map(Ok).collect(), 1),
        Err(e) if batch.len() <= 1 => (vec![Err(e)], 1),
        Err(_) => {
            let mid = batch.len() / 2;
            let (mut left, a) = run_isolating(backend, &batch[..mid]);
            let (right, b) = run_isolating(backend, &batch[mid..]);
            left.extend(right);
            (left, 1 + a + b)
        }
    }
}

/// A backend an inference thread holds, with the generation it belongs to (and returns to).
struct Held {
    generation: Arc<Generation>,
    backend: Option<Box<dyn Backend>>,
    probe: Encoded,
}

impl Held {
    fn release(mut self) {
        if let Some(backend) = self.backend.take() {
            self.generation.give_back(backend);
        }
    }
}

fn inference_loop<T>(batches: flume::Receiver<Batch<Tokenized<T>>>, outcomes: flume::Sender<Outcome<T>>, stats: &EngineStats, model: &str) {
    let mut held: Option<Held> = None;
    loop {
        // Waking now and then lets an idle thread give back a retired generation's backend,
        // so the old model is freed without waiting for traffic.
        let batch = match batches.recv_timeout(Duration::from_millis(500)) {
            Ok(batch) => batch,
            Err(flume::RecvTimeoutError::Timeout) => {
                if held.as_ref().is_some_and(|h| h.generation.retired()) {
                    if let Some(h) = held.take() {
                        h.release();
                    }
                }
                continue;
            }
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        let Some(generation) = batch.items.first().map(|t| t.generation.clone()) else { continue };
        if held.as_ref().is_none_or(|h| h.generation.id != generation.id) {
            if let Some(h) = held.take() {
                h.release();
            }
            // Each generation has one backend per thread and a thread holds at most one, so
            // one is always free.
            let Some(backend) = generation.take() else {
                tracing::error!(model, generation = generation.id, "no free backend for a batch: this is a bug");
                for item in batch.items {
                    let result = Err(ClassifyError::Backend("no free inference backend".into()));
                    if outcomes.send(Outcome { tag: item.tag, result }).is_err() {
                        return;
                    }
                }
                continue;
            };
            held = Some(Held { probe: generation.probe.clone(), generation: generation.clone(), backend: Some(backend) });
        }
        let Some(Held { backend: Some(backend), probe, .. }) = held.as_mut() else { continue };
        let start = Instant::now();
        let encoded: Vec<&Encoded> = batch.items.iter().map(|t| &t.encoded).collect();
        // When the batch fails, ask the backend about input it has answered before: if that
        // fails too the backend is broken (no bisection, no blame); else isolate the culprits.
        let (results, backend_broken) = match run_guarded(backend.as_mut(), &encoded) {
            Ok(predictions) => (predictions.into_iter().map(Ok).collect::<Vec<_>>(), false),
            Err(e) => match run_guarded(backend.as_mut(), &[probe]) {
                Err(_) => (vec![Err(e); encoded.len()], true),
                Ok(_) if encoded.len() == 1 => (vec![Err(e)], false),
                Ok(_) => (run_isolating(backend.as_mut(), &encoded).0, false),
            },
        };
        let inference = start.elapsed();
        generation.metrics.inference_seconds.record(inference.as_secs_f64());
        if results.iter().all(Result::is_ok) {
            let longest = batch.lengths.iter().copied().max().unwrap_or(1);
            stats.record_batch(longest, batch.cap, batch.len(), batch.real_tokens(), inference.as_secs_f64());
        }
        stats.inference_nanos.fetch_add(inference.as_nanos() as u64, Ordering::Relaxed);
        let batch_size = batch.items.len();
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            tracing::error!(batch_size, failed, backend_broken, "inference failed");
            stats.failed.fetch_add(failed as u64, Ordering::Relaxed);
        }
        stats.classified.fetch_add((batch_size - failed) as u64, Ordering::Relaxed);
        // The next check uses input this backend has just answered.
        if let Some(answered) = batch.items.iter().zip(&results).find(|(_, r)| r.is_ok()) {
            *probe = answered.0.encoded.clone();
        }
        if generation.retired() {
            if let Some(h) = held.take() {
                h.release();
            }
        }
        for (item, result) in batch.items.into_iter().zip(results) {
            let result = match result {
                Ok(prediction) => Ok(Classified {
                    prediction,
                    tokens: item.encoded.len(),
                    truncated: item.encoded.truncated,
                    chars: item.encoded.chars,
                    queued: start.saturating_duration_since(item.submitted),
                    inference,
                    batch_size,
                }),
                Err(e) if backend_broken => Err(ClassifyError::Backend(e)),
                Err(e) => Err(ClassifyError::Inference(e)),
            };
            if outcomes.send(Outcome { tag: item.tag, result }).is_err() {
                return;
            }
        }
    }
    if let Some(h) = held {
        h.release();
    }
}

#[cfg(test)]
mod tests {
    //! The engine on a fake backend: the committed tokenizer, no ONNX Runtime.

    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Condvar, Mutex};

    use super::*;

    #[test]
    fn cores_are_split_into_sessions_and_their_threads() {
        assert_eq!(split_cores(4, 0, true, 0), (4, Some(1)), "a session per core");
        assert_eq!(split_cores(4, 2, true, 0), (2, Some(2)));
        assert_eq!(split_cores(4, 3, true, 0), (3, Some(1)));
        assert_eq!(split_cores(2, 4, true, 0), (4, Some(1)), "never below one thread");
        assert_eq!(split_cores(4, 2, true, 3), (2, None), "the model's own threads");
        assert_eq!(split_cores(4, 0, false, 0), (1, None), "a GPU: one session");
        assert_eq!(split_cores(4, 2, false, 0), (2, None));
    }

    #[test]
    fn an_engine_config_refuses_no_tokenizer_threads_no_queue_or_a_bad_policy() {
        let ok = EngineConfig::default();
        assert_eq!(ok.validate(64), Ok(()));
        assert!(EngineConfig { tokenizer_threads: 0, ..ok.clone() }.validate(64).unwrap_err().contains("tokenizer_threads"));
        assert!(EngineConfig { queue_capacity: 0, ..ok.clone() }.validate(64).unwrap_err().contains("queue_capacity"));
        assert!(ok.validate(100_000).unwrap_err().contains("max_length"), "the batch policy is checked too");
    }

    #[test]
    fn merged_stats_add_every_counter() {
        let a = StatsSnapshot {
            submitted: 1,
            classified: 2,
            failed: 3,
            batches: 4,
            real_tokens: 5,
            padded_tokens: 6,
            tokenize_seconds: 7.0,
            inference_seconds: 8.0,
        };
        let b = StatsSnapshot {
            submitted: 10,
            classified: 20,
            failed: 30,
            batches: 40,
            real_tokens: 50,
            padded_tokens: 60,
            tokenize_seconds: 70.0,
            inference_seconds: 80.0,
        };
        let sum = StatsSnapshot {
            submitted: 11,
            classified: 22,
            failed: 33,
            batches: 44,
            real_tokens: 55,
            padded_tokens: 66,
            tokenize_seconds: 77.0,
            inference_seconds: 88.0,
        };
        assert_eq!(a.merge(&b), sum);
    }

    #[test]
    fn mean_batch_size_and_padding_ratio_are_ratios_with_safe_empty_values() {
        let stats = StatsSnapshot { classified: 10, batches: 4, real_tokens: 8, padded_tokens: 10, ..StatsSnapshot::default() };
        assert_eq!((stats.mean_batch_size(), stats.padding_ratio()), (2.5, 1.25));
        let empty = StatsSnapshot::default();
        assert_eq!((empty.mean_batch_size(), empty.padding_ratio()), (0.0, 1.0), "no batches yet: no size, no padding");
    }

    #[test]
    fn a_shadows_nice_value_gives_it_about_its_share_of_a_busy_cpu() {
        // CFS weights: 1024 at nice 0, / 1.25 per step.
        let share_at = |nice: i32| {
            let w = 1024.0 / 1.25f64.powi(nice);
            w / (1024.0 + w)
        };
        for share in [0.05, 0.1, 0.25, 0.4] {
            let got = share_at(nice_for_share(share));
            assert!((got / share - 1.0).abs() < 0.15, "share {share}: nice {} gives {got}", nice_for_share(share));
        }
        assert_eq!(nice_for_share(0.5), 0);
        assert_eq!(nice_for_share(1.0), 0);
        assert_eq!(nice_for_share(0.0), 0);
        assert_eq!(nice_for_share(0.0001), 19);
    }

    #[test]
    fn an_engine_with_a_nice_value_runs_its_threads_at_it() {
        let nice_of_thread = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let before = nice_of_thread();
        let seen = on_priority_thread(Some(before + 3), || {
            let inner = std::thread::spawn(nice_of_thread).join().unwrap();
            (nice_of_thread(), inner)
        });
        assert_eq!(seen, (before + 3, before + 3), "the thread and what it starts run lower");
        assert_eq!(nice_of_thread(), before, "the caller keeps its own priority");
    }
    use crate::model::LabelScore;

    fn encoder() -> Arc<TextEncoder> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/customer-service/tokenizer.json");
        Arc::new(TextEncoder::from_file(&path, 128).unwrap())
    }

    fn rendered(text: &str) -> Rendered {
        Rendered { text: text.to_string(), cut: false, has_text: !text.trim().is_empty() }
    }

    /// A prediction that depends only on the message's own tokens: a result delivered to the
    /// wrong message shows.
    fn predict(encoded: &Encoded) -> Prediction {
        let sum: u64 = encoded.ids.iter().map(|&i| u64::from(i)).sum();
        Prediction {
            category: Some(LabelScore { label: format!("n{}", encoded.len()), score: (sum % 1000) as f32 / 1000.0 }),
            priority: Some(format!("p{}", sum % 7)),
            tags: Vec::new(),
            heads: Vec::new(),
            ood_score: None,
        }
    }

    /// Open/closed gate a backend waits on before each batch.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        changed: Condvar,
    }

    impl Gate {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.changed.notify_all();
        }
        fn wait(&self) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.changed.wait(open).unwrap();
            }
        }
    }

    struct Fake {
        /// Fail any batch holding this token id.
        poison: Option<u32>,
        /// Panic on any batch holding this token id.
        panic_on: Option<u32>,
        /// Fail everything once this many batches have run (a device lost mid-stream).
        broken_after: Option<usize>,
        runs: usize,
        /// Sleep per batch (backends of different speeds finish batches out of order).
        delay: Duration,
        /// Sleep this times rows squared on top: per row, larger batches are slower.
        per_row_squared: Duration,
        gate: Option<Arc<Gate>>,
        /// Written into every answer's priority: which model version answered.
        mark: Option<&'static str>,
        /// Answer every batch but its last message (a backend bug, not a failure it reports).
        short: bool,
    }

    impl Backend for Fake {
        fn run(&mut self, batch: &[&Encoded]) -> Result<Vec<Prediction>, ModelError> {
            if let Some(gate) = &self.gate {
                gate.wait();
            }
            std::thread::sleep(self.delay + self.per_row_squared * (batch.len() * batch.len()) as u32);
            self.runs += 1;
            if self.broken_after.is_some_and(|n| self.runs > n) {
                return Err(ModelError::Inference("CUDA error: device lost".into()));
            }
            if let Some(p) = self.panic_on {
                assert!(!batch.iter().any(|e| e.ids.contains(&p)), "a bug in a head on this input");
            }
            if let Some(p) = self.poison {
                if batch.iter().any(|e| e.ids.contains(&p)) {
                    return Err(ModelError::Inference("the fake backend fails on the poison token".into()));
                }
            }
            let mark = |mut p: Prediction| {
                if let Some(mark) = self.mark {
                    p.priority = Some(mark.to_string());
                }
                p
            };
            let answered = if self.short { batch.len().saturating_sub(1) } else { batch.len() };
            Ok(batch[..answered].iter().map(|e| mark(predict(e))).collect())
        }
    }

    impl Default for Fake {
        fn default() -> Self {
            Fake {
                poison: None,
                panic_on: None,
                broken_after: None,
                runs: 0,
                delay: Duration::ZERO,
                per_row_squared: Duration::ZERO,
                gate: None,
                mark: None,
                short: false,
            }
        }
    }

    fn fake(delay_ms: u64) -> Box<dyn Backend> {
        Box::new(Fake { delay: Duration::from_millis(delay_ms), ..Fake::default() })
    }

    fn texts(n: usize) -> Vec<String> {
        let words = ["refund", "parcel", "late", "login", "broken", "invoice", "card", "charged", "twice", "password", "return"];
        (0..n).map(|i| (0..(1 + (i * 7) % 40)).map(|j| words[(i * 3 + j * 5) % words.len()]).collect::<Vec<_>>().join(" ")).collect()
    }

    fn config(max_batch_size: usize, queue_capacity: usize) -> EngineConfig {
        EngineConfig {
            policy: BatchPolicy { max_batch_size, max_batch_tokens: 4096, max_wait_ms: 2, bucket_window: 3, ..BatchPolicy::default() },
            tokenizer_threads: 3,
            inference_threads: 0,
            queue_capacity,
            ..EngineConfig::default()
        }
    }

    #[test]
    fn results_return_to_their_own_message_whatever_order_batches_finish() {
        let encoder = encoder();
        let texts = Arc::new(texts(400));
        let expected: Vec<Prediction> = texts.iter().map(|t| predict(&encoder.encode(t).unwrap())).collect();
        let (tx, rx) = flume::bounded(8);
        // A fast and a slow backend: batches overtake each other.
        let engine = Engine::with_backends("fake", encoder, vec![fake(0), fake(3)], &config(16, 8), tx).unwrap();
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let (submitter, texts) = (engine.submitter(), texts.clone());
                std::thread::spawn(move || {
                    for i in (p..texts.len()).step_by(4) {
                        submitter.submit(i, rendered(&texts[i])).unwrap();
                    }
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for _ in 0..texts.len() {
            let outcome = rx.recv().unwrap();
            assert!(seen.insert(outcome.tag), "message {} came back twice", outcome.tag);
            assert_eq!(outcome.result.unwrap().prediction, expected[outcome.tag], "message {}", outcome.tag);
        }
        producers.into_iter().for_each(|p| p.join().unwrap());
        let stats = engine.stats();
        engine.shutdown();
        assert_eq!((seen.len(), stats.classified), (400, 400));
        assert!(stats.mean_batch_size() > 1.5, "dynamic batching formed real batches: {}", stats.mean_batch_size());
        assert!(rx.try_recv().is_err(), "nothing beyond one outcome per message");
    }

    fn outcomes_of(backend: Fake, inputs: &[&str], batch_size: usize) -> Vec<Outcome<usize>> {
        outcomes_and_stats_of(backend, inputs, batch_size).0
    }

    fn outcomes_and_stats_of(backend: Fake, inputs: &[&str], batch_size: usize) -> (Vec<Outcome<usize>>, StatsSnapshot) {
        let (tx, rx) = flume::unbounded();
        // One batch holds every input: a long max_wait, released by the flush at shutdown.
        let config =
            EngineConfig { policy: BatchPolicy { max_wait_ms: 60_000, ..config(batch_size, 64).policy }, ..config(batch_size, 64) };
        let engine = Engine::with_backends("fake", encoder(), vec![Box::new(backend)], &config, tx).unwrap();
        for (i, text) in inputs.iter().enumerate() {
            engine.submit(i, rendered(text)).unwrap();
        }
        let stats = engine.stats.clone();
        engine.shutdown();
        let mut outcomes: Vec<_> = rx.try_iter().collect();
        outcomes.sort_by_key(|o| o.tag);
        assert_eq!(outcomes.len(), inputs.len());
        (outcomes, stats.snapshot())
    }

    const INPUTS: [&str; 8] =
        ["card lost", "where is my parcel", "refund please", "xylophone", "charged twice", "login broken", "return label", "hello"];

    #[test]
    fn a_poison_message_is_isolated_from_its_batch_and_fails_alone() {
        let encoder = encoder();
        let poison = encoder.encode("xylophone").unwrap().ids[1];
        let (outcomes, stats) = outcomes_and_stats_of(Fake { poison: Some(poison), ..Fake::default() }, &INPUTS, 16);
        assert_eq!((stats.classified, stats.failed), (7, 1));
        for outcome in outcomes {
            match (outcome.tag, &outcome.result) {
                (3, Err(ClassifyError::Inference(e))) => assert!(e.contains("poison"), "{e}"),
                (3, other) => panic!("the poisoned message must fail alone: {other:?}"),
                (i, Ok(c)) => assert_eq!(c.prediction, predict(&encoder.encode(INPUTS[i]).unwrap())),
                (i, Err(e)) => panic!("message {i} failed with the poisoned one's batch: {e}"),
            }
        }
    }

    #[test]
    fn bisection_finds_the_poison_in_logarithmic_runs() {
        let encoder = encoder();
        let poison = encoder.encode("xylophone").unwrap().ids[1];
        let texts: Vec<String> = (0..32).map(|i| if i == 21 { "xylophone".into() } else { format!("parcel {i}") }).collect();
        let encoded: Vec<Encoded> = texts.iter().map(|t| encoder.encode(t).unwrap()).collect();
        let refs: Vec<&Encoded> = encoded.iter().collect();
        let mut backend = Fake { poison: Some(poison), ..Fake::default() };
        let (results, runs) = run_isolating(&mut backend, &refs);
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        assert!(results[21].is_err());
        // The whole, then per level the half holding the poison and its clean sibling.
        assert_eq!(runs, 2 * 5 + 1, "32 messages, one poison");
    }

    #[test]
    fn a_backend_answering_fewer_messages_than_it_was_given_fails_them_all() {
        let (outcomes, stats) = outcomes_and_stats_of(Fake { short: true, ..Fake::default() }, &INPUTS, 16);
        for outcome in outcomes {
            match &outcome.result {
                Err(e) => assert!(e.to_string().contains("predictions for"), "{e}"),
                Ok(c) => panic!("message {} got an answer from a backend that miscounts: {c:?}", outcome.tag),
            }
        }
        assert_eq!((stats.classified, stats.failed), (0, 8));
    }

    #[test]
    fn a_panicking_backend_costs_the_one_message_that_makes_it_panic() {
        let encoder = encoder();
        let marker = encoder.encode("xylophone").unwrap().ids[1];
        for outcome in outcomes_of(Fake { panic_on: Some(marker), ..Fake::default() }, &INPUTS, 16) {
            match (outcome.tag, &outcome.result) {
                (3, Err(ClassifyError::Inference(e))) => assert!(e.contains("panicked") && e.contains("a bug in a head"), "{e}"),
                (3, other) => panic!("{other:?}"),
                (i, r) => assert!(r.is_ok(), "message {i}: {r:?}"),
            }
        }
    }

    #[test]
    fn a_backend_that_fails_on_everything_is_reported_as_broken_not_as_poison() {
        // The first batch (the probe's check included) passes; then the device is lost.
        let backend = Fake { broken_after: Some(1), ..Fake::default() };
        let (tx, rx) = flume::unbounded();
        let engine = Engine::with_backends("fake", encoder(), vec![Box::new(backend)], &config(4, 64), tx).unwrap();
        engine.submit(0, rendered("card lost")).unwrap();
        let first = rx.recv().unwrap();
        assert!(first.result.is_ok());
        for i in 1..=8 {
            engine.submit(i, rendered(INPUTS[i % INPUTS.len()])).unwrap();
        }
        engine.shutdown();
        let rest: Vec<_> = rx.try_iter().collect();
        assert_eq!(rest.len(), 8);
        for o in rest {
            assert!(matches!(&o.result, Err(ClassifyError::Backend(e)) if e.contains("device lost")), "message {}: {:?}", o.tag, o.result);
        }
    }

    #[test]
    fn shutdown_delivers_everything_in_flight() {
        let (tx, rx) = flume::unbounded();
        // A long max_wait: only the flush at shutdown can release these.
        let config = EngineConfig { policy: BatchPolicy { max_wait_ms: 60_000, ..BatchPolicy::default() }, ..config(32, 8) };
        let engine = Engine::with_backends("fake", encoder(), vec![fake(0)], &config, tx).unwrap();
        for i in 0..10 {
            engine.submit(i, rendered("where is my parcel")).unwrap();
        }
        engine.shutdown();
        let tags: std::collections::BTreeSet<_> = rx.try_iter().map(|o| o.tag).collect();
        assert_eq!(tags, (0..10).collect());
    }

    #[test]
    fn submissions_wait_while_the_backend_is_stuck_then_all_complete() {
        let gate = Arc::new(Gate::default());
        let backend = Box::new(Fake { gate: Some(gate.clone()), ..Fake::default() });
        let (tx, rx) = flume::unbounded();
        let engine = Engine::with_backends("fake", encoder(), vec![backend], &config(1, 2), tx).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let producer = {
            let (submitter, accepted) = (engine.submitter(), accepted.clone());
            std::thread::spawn(move || {
                for i in 0..200 {
                    submitter.submit(i, rendered("card charged twice")).unwrap();
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // However long this waits, bounded queues stop the producer well short of 200.
        std::thread::sleep(Duration::from_millis(300));
        let held = accepted.load(Ordering::SeqCst);
        assert!(held < 200, "a stuck backend must stop intake (bounded queues), but {held} were accepted");
        gate.open();
        producer.join().unwrap();
        engine.shutdown();
        assert_eq!(rx.try_iter().filter(|o| o.result.is_ok()).count(), 200);
    }

    /// Issue 21: a reload while batches of the old version are still queued and running.
    #[test]
    fn work_finishes_on_the_generation_it_was_submitted_to_and_the_old_one_is_freed() {
        let gate = Arc::new(Gate::default());
        let old = |_| Box::new(Fake { gate: Some(gate.clone()), mark: Some("v1"), ..Fake::default() }) as Box<dyn Backend>;
        let (tx, rx) = flume::bounded(256);
        let engine = Engine::with_backends("fake", encoder(), (0..2).map(old).collect(), &config(8, 256), tx).unwrap();
        let first = engine.current();
        let texts = texts(120);
        for (i, text) in texts.iter().enumerate().take(60) {
            engine.submit(i, rendered(text)).unwrap();
        }
        // The wrong number of backends is refused and changes nothing.
        assert!(engine.install("v2", encoder(), vec![fake(0)]).is_err());
        assert_eq!(engine.current().id(), first.id());
        let new = |_| Box::new(Fake { mark: Some("v2"), ..Fake::default() }) as Box<dyn Backend>;
        let second = engine.install("v2", encoder(), (0..2).map(new).collect()).unwrap();
        assert_eq!((engine.current().id(), second.version()), (second.id(), "v2"));
        let old_generation = Arc::downgrade(&first);
        drop(first);
        for (i, text) in texts.iter().enumerate().skip(60) {
            engine.submit(i, rendered(text)).unwrap();
        }
        gate.open();
        let mut answered_by = vec![String::new(); texts.len()];
        for _ in 0..texts.len() {
            let outcome = rx.recv_timeout(Duration::from_secs(30)).expect("every message answered");
            answered_by[outcome.tag] = outcome.result.unwrap().prediction.priority.unwrap();
        }
        let expected: Vec<&str> = (0..texts.len()).map(|i| if i < 60 { "v1" } else { "v2" }).collect();
        assert_eq!(answered_by, expected, "each message answered by the version it was submitted to");
        // The old generation (and its backends) is freed once its last batch has ended.
        let deadline = Instant::now() + Duration::from_secs(10);
        while old_generation.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the retired generation is still referenced");
            std::thread::yield_now();
        }
        engine.shutdown();
    }

    /// A backend whose cost per row grows with the batch: the tuner must walk the size down,
    /// the batcher must assemble at the tuner's cap, and what it chose must be reported.
    #[test]
    fn the_tuner_learns_from_each_batch_and_the_batcher_assembles_at_its_cap() {
        let quadratic = || Box::new(Fake { per_row_squared: Duration::from_micros(200), ..Fake::default() }) as Box<dyn Backend>;
        let (tx, rx) = flume::unbounded();
        let mut config = config(16, 1024);
        config.policy.tune_batch_size = true;
        config.record_batches = true;
        let started = Instant::now();
        let engine = Engine::with_backends("fake-tuned", encoder(), vec![quadratic()], &config, tx).unwrap();
        // One length: one bucket of the tuner.
        for i in 0..600 {
            engine.submit(i, rendered("refund parcel late")).unwrap();
        }
        for _ in 0..600 {
            rx.recv_timeout(Duration::from_secs(60)).expect("every message answered").result.unwrap();
        }
        let (stats, choices, batches) = (engine.stats(), engine.stats.batch_sizes(), engine.stats.recorded_batches());
        let elapsed = started.elapsed().as_secs_f64();
        engine.shutdown();
        assert_eq!(choices.len(), 1, "{choices:?}");
        let choice = &choices[0];
        assert!(choice.settled && choice.batch_size <= 2, "rows cost their square: the smallest sizes win: {choice:?}");
        assert!(choice.measured.iter().any(|&(size, _)| size == 16), "the walk starts at the largest: {choice:?}");
        let tail = &batches[batches.len() - 100..];
        assert!(tail.iter().all(|b| b.len() <= choice.batch_size), "batches assembled at the chosen cap: {tail:?}");
        // Seconds, not nanoseconds: one inference thread cannot spend more than the wall time.
        assert!(stats.inference_seconds > 0.0 && stats.inference_seconds <= elapsed, "{} of {elapsed}", stats.inference_seconds);
        assert!(stats.tokenize_seconds > 0.0 && stats.tokenize_seconds <= 3.0 * elapsed, "{} of {elapsed}", stats.tokenize_seconds);
    }

    /// A reload while the threads are idle: the first batch after it runs on the new backends
    /// (a thread still holding an old one swaps it), the thread no traffic reaches gives the old
    /// backend back by itself, and the old version leaves /metrics.
    #[test]
    fn after_a_reload_threads_swap_backends_and_idle_ones_free_the_old_generation() {
        let (tx, rx) = flume::unbounded();
        let model = "fake-idle-reload";
        let marked = |mark| Box::new(Fake { mark: Some(mark), ..Fake::default() }) as Box<dyn Backend>;
        let engine = Engine::with_backends(model, encoder(), vec![marked("v1"), marked("v1")], &config(8, 64), tx).unwrap();
        let first = engine.current();
        for i in 0..40 {
            engine.submit(i, rendered(&texts(40)[i])).unwrap();
        }
        for _ in 0..40 {
            rx.recv_timeout(Duration::from_secs(30)).expect("answered").result.unwrap();
        }
        let old_version = first.version().to_string();
        let second = engine.install("v2", encoder(), vec![marked("v2"), marked("v2")]).unwrap();
        assert_ne!(second.id(), first.id(), "a new generation has a new id");
        // At once, while a thread still holds the old backend: it must change backends.
        for i in 0..8 {
            engine.submit(100 + i, rendered("refund parcel late")).unwrap();
        }
        for _ in 0..8 {
            let outcome = rx.recv_timeout(Duration::from_secs(30)).expect("answered");
            assert_eq!(outcome.result.unwrap().prediction.priority.as_deref(), Some("v2"), "message {}", outcome.tag);
        }
        let old_generation = Arc::downgrade(&first);
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(10);
        while old_generation.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the idle threads still hold the replaced generation");
            std::thread::sleep(Duration::from_millis(20));
        }
        let line = |v: &str| format!("triage_batch_size_count{{model=\"{model}\",model_version=\"{v}\"}} 1\n");
        let text = format!("{}{}", line(&old_version), line("v2"));
        assert_eq!(telemetry::versions::without_replaced(&text), line("v2"), "only the serving version is shown");
        engine.shutdown();
    }

    /// The worker's ways in: async submission to the current or a chosen generation, and a
    /// shadow's submission that never waits. Every message comes back once, to its own tag.
    #[test]
    fn async_and_non_blocking_submissions_all_come_back() {
        let (tx, rx) = flume::unbounded();
        let mut config = config(8, 64);
        config.policy.tune_batch_size = false;
        let engine = Engine::with_backends("fake-async", encoder(), vec![fake(0)], &config, tx).unwrap();
        let (submitter, generation) = (engine.submitter(), engine.current());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            for i in 0..5 {
                submitter.submit_async(i, rendered("where is my parcel")).await.unwrap();
                submitter.submit_async_to(&generation, 10 + i, rendered("refund please")).await.unwrap();
            }
        });
        for i in 0..5 {
            // Room is plenty (64): a non-blocking submission is taken.
            submitter.try_submit_to(&generation, 20 + i, rendered("card charged twice")).unwrap();
        }
        let mut tags: Vec<usize> = (0..15).map(|_| rx.recv_timeout(Duration::from_secs(30)).expect("answered").tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24]);
        assert_eq!(engine.stats().submitted, 15);
        assert!(engine.stats.batch_sizes().is_empty(), "tune_batch_size = false: no tuner");
        drop(submitter); // the engine's threads end once every submitter is gone
        engine.shutdown();
    }

    /// Messages of the old generation still waiting in the batcher when the new one's arrive:
    /// they leave as a batch of their own at once (a batch never mixes versions), and the
    /// batcher goes on with the new ones (sent by the flush at shutdown: nothing is due by age).
    #[test]
    fn a_reload_flushes_the_old_generations_waiting_messages_and_batching_goes_on() {
        let (tx, rx) = flume::unbounded();
        let mut config = config(16, 64);
        config.policy.max_wait_ms = 60_000;
        config.record_batches = true;
        let v1 = Box::new(Fake { mark: Some("v1"), ..Fake::default() }) as Box<dyn Backend>;
        let engine = Engine::with_backends("fake-switch", encoder(), vec![v1], &config, tx).unwrap();
        for i in 0..3 {
            engine.submit(i, rendered("refund parcel late")).unwrap();
        }
        let v2 = Box::new(Fake { mark: Some("v2"), ..Fake::default() }) as Box<dyn Backend>;
        engine.install("v2", encoder(), vec![v2]).unwrap();
        for i in 3..11 {
            engine.submit(i, rendered("refund parcel late")).unwrap();
        }
        let answer = |o: Outcome<usize>| (o.tag, o.result.unwrap().prediction.priority.unwrap());
        // Three tokenizer threads: answers come in any order.
        let mut first: Vec<_> = (0..3).map(|_| answer(rx.recv_timeout(Duration::from_secs(20)).expect("flushed by the switch"))).collect();
        first.sort();
        assert_eq!(first, [(0, "v1".to_string()), (1, "v1".into()), (2, "v1".into())]);
        let stats = engine.stats.clone();
        engine.shutdown();
        let mut rest: Vec<_> = rx.try_iter().map(answer).collect();
        rest.sort();
        assert_eq!(rest, (3..11).map(|i| (i, "v2".to_string())).collect::<Vec<_>>(), "the batcher went on after the switch");
        let sizes: Vec<usize> = stats.recorded_batches().iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 8]);
    }

    #[test]
    fn an_engine_without_backends_is_refused() {
        let (tx, _rx) = flume::unbounded::<Outcome<u8>>();
        let err = Engine::with_backends("fake", encoder(), Vec::new(), &config(8, 8), tx).err().unwrap();
        assert!(err.to_string().contains("at least one"), "{err}");
    }
}
