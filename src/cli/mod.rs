//! The commands: each file owns its `Args`, their conversion into the library's options (the
//! library validates them and owns their defaults), and its printing. What several commands
//! share lives here: argument groups, the default model's lookup, input/output files with `-`
//! for the standard streams, progress bars, signals.
//!
//! Every flag that is also a configuration field reads the same environment variable as
//! `triage run` (`TRIAGE_<SECTION>__<FIELD>`); the flat names of earlier releases are aliases
//! (`triage::config::env::ALIASES`).

pub mod bench;
pub mod broker;
pub mod classify;
pub mod config;
pub mod demo;
pub mod escalate;
pub mod eval;
pub mod produce;
pub mod redrive;
pub mod registry;
pub mod run;
pub mod schema;
pub mod topics;
pub mod train;

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use triage::batcher::BatchPolicy;
use triage::engine::EngineConfig;
use triage::message::{FieldMap, DEFAULT_MAX_MESSAGE_BYTES};
use triage::model::{InferenceOptions, Model, Provider};
use triage::paths;

/// Where ONNX Runtime comes from and how sessions run (every command that loads a model).
#[derive(Args, Clone)]
pub struct RuntimeArgs {
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH, then runtime/onnxruntime/ of the project).
    #[arg(long, env = "TRIAGE_INFERENCE__ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    /// Execution providers in order of preference (cpu, cuda, tensorrt); CPU is the fallback.
    #[arg(long, env = "TRIAGE_INFERENCE__PROVIDERS", value_delimiter = ',', default_value = "cpu")]
    providers: Vec<Provider>,
    /// Intra-op threads per inference session (0: the cores shared out among the sessions).
    #[arg(long, env = "TRIAGE_INFERENCE__INTRA_THREADS", default_value_t = InferenceOptions::default().intra_threads)]
    intra_threads: usize,
}

impl RuntimeArgs {
    pub fn options(&self) -> InferenceOptions {
        InferenceOptions {
            ort_library: self.ort_library.clone(),
            providers: self.providers.clone(),
            intra_threads: self.intra_threads,
            ..InferenceOptions::default()
        }
    }
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model directory (model.onnx, tokenizer.json, model.toml and/or config.json).
    #[arg(long, env = "TRIAGE_MODEL")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Override the model's truncation length (tokens).
    #[arg(long, env = "TRIAGE_INFERENCE__MAX_LENGTH")]
    max_length: Option<usize>,
    /// Override the model's text template, e.g. "{subject}\n{body}".
    #[arg(long, env = "TRIAGE_INFERENCE__TEMPLATE")]
    template: Option<String>,
}

impl ModelArgs {
    pub fn dir(&self) -> Result<PathBuf> {
        model_dir(&self.model)
    }

    pub fn inference(&self) -> InferenceOptions {
        InferenceOptions { max_length: self.max_length, template: self.template.clone(), ..self.runtime.options() }
    }

    pub fn load(&self) -> Result<Arc<Model>> {
        let dir = self.dir()?;
        let model = Model::load(&dir, &self.inference()).with_context(|| format!("loading model {}", dir.display()))?;
        Ok(Arc::new(model))
    }
}

/// `[batching]` as flags; defaults are the library's.
#[derive(Args, Clone)]
pub struct BatchArgs {
    #[arg(long, env = "TRIAGE_BATCHING__MAX_BATCH_SIZE", default_value_t = BatchPolicy::default().max_batch_size)]
    max_batch_size: usize,
    /// Padded tokens (rows x longest row) per batch.
    #[arg(long, env = "TRIAGE_BATCHING__MAX_BATCH_TOKENS", default_value_t = BatchPolicy::default().max_batch_tokens)]
    max_batch_tokens: usize,
    /// Longest a message waits for a batch to fill (milliseconds).
    #[arg(long, env = "TRIAGE_BATCHING__MAX_WAIT_MS", default_value_t = BatchPolicy::default().max_wait_ms)]
    max_wait_ms: u64,
    /// Batches' worth of messages grouped by length (1: arrival order).
    #[arg(long, env = "TRIAGE_BATCHING__BUCKET_WINDOW", default_value_t = BatchPolicy::default().bucket_window)]
    bucket_window: usize,
    /// Fixed cost of one batch in tokens (higher: fuller batches, more padding).
    #[arg(long, env = "TRIAGE_BATCHING__BATCH_COST_TOKENS", default_value_t = BatchPolicy::default().batch_cost_tokens)]
    batch_cost_tokens: usize,
    /// Measure batch sizes up to --max-batch-size per text length on live traffic and use the fastest
    /// (false: always fill batches up to --max-batch-size).
    #[arg(long, env = "TRIAGE_BATCHING__TUNE_BATCH_SIZE", default_value_t = BatchPolicy::default().tune_batch_size, action = clap::ArgAction::Set)]
    tune_batch_size: bool,
    #[arg(long, env = "TRIAGE_BATCHING__TOKENIZER_THREADS", default_value_t = EngineConfig::default().tokenizer_threads)]
    tokenizer_threads: usize,
    /// Inference sessions, each on its own thread (0: one per core on CPU, one on GPU).
    #[arg(long, env = "TRIAGE_BATCHING__INFERENCE_THREADS", default_value_t = EngineConfig::default().inference_threads)]
    inference_threads: usize,
}

impl BatchArgs {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            policy: BatchPolicy {
                max_batch_size: self.max_batch_size,
                max_batch_tokens: self.max_batch_tokens,
                max_wait_ms: self.max_wait_ms,
                bucket_window: self.bucket_window,
                batch_cost_tokens: self.batch_cost_tokens,
                tune_batch_size: self.tune_batch_size,
            },
            tokenizer_threads: self.tokenizer_threads,
            inference_threads: self.inference_threads,
            ..EngineConfig::default()
        }
    }
}

/// A route's `fields` as flags.
#[derive(Args, Clone)]
pub struct FieldArgs {
    /// Where the message id is (top-level key or JSON pointer); repeat for fallbacks.
    #[arg(long = "id-field", env = "TRIAGE_ID_FIELDS", value_delimiter = ',')]
    id_fields: Vec<String>,
    /// Where the subject is (top-level key or JSON pointer such as /email/subject).
    #[arg(long = "subject-field", env = "TRIAGE_SUBJECT_FIELDS", value_delimiter = ',')]
    subject_fields: Vec<String>,
    /// Where the body / text is.
    #[arg(long = "body-field", alias = "text-field", env = "TRIAGE_BODY_FIELDS", value_delimiter = ',')]
    body_fields: Vec<String>,
    /// Messages larger than this are rejected (bytes).
    #[arg(long, env = "TRIAGE_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
}

impl FieldArgs {
    pub fn field_map(&self) -> FieldMap {
        let mut map = FieldMap::default();
        if !self.id_fields.is_empty() {
            map.id = self.id_fields.clone();
        }
        if !self.subject_fields.is_empty() {
            map.text.insert("subject".into(), self.subject_fields.clone());
        }
        if !self.body_fields.is_empty() {
            map.text.insert("body".into(), self.body_fields.clone());
        }
        map
    }
}

/// The model directory given, else the default model near the executable or the cwd.
pub fn model_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(dir) => Ok(dir.clone()),
        None => paths::find_in_project(paths::DEFAULT_MODEL_DIR).with_context(|| {
            format!(
                "no --model given and the default model ({}) was not found near the executable or the working directory",
                paths::DEFAULT_MODEL_DIR
            )
        }),
    }
}

/// An input named on the command line ("-": standard input), with its size when it is a file.
pub struct Input {
    pub reader: Box<dyn BufRead + Send>,
    pub bytes: Option<u64>,
}

pub fn open_input(name: &str) -> Result<Input> {
    if name == "-" {
        return Ok(Input { reader: Box::new(BufReader::new(std::io::stdin())), bytes: None });
    }
    let file = std::fs::File::open(name).with_context(|| format!("opening {name}"))?;
    let bytes = file.metadata().ok().map(|m| m.len());
    Ok(Input { reader: Box::new(BufReader::with_capacity(1 << 16, file)), bytes })
}

/// An output named on the command line ("-": standard output).
pub fn open_output(name: &str) -> Result<Box<dyn Write>> {
    Ok(if name == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(name).with_context(|| format!("creating {name}"))?)
    })
}

/// Progress bar styles, in one place.
pub enum Progress {
    /// Bytes of an input read so far.
    Bytes,
    /// Items (messages, rows) against a known total.
    Items(&'static str),
    /// A named stage.
    Stage,
}

pub fn progress_bar(kind: Progress, total: Option<u64>) -> ProgressBar {
    let template = match kind {
        Progress::Bytes => "{bar:40} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}".to_string(),
        Progress::Items(unit) => format!("{{bar:40}} {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}"),
        Progress::Stage => "{msg} {bar:30} {pos}/{len} {per_sec} eta {eta}".to_string(),
    };
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    match total {
        Some(_) => bar.with_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar())),
        None => bar,
    }
}

/// Progress of `train` / `eval` stages: a bar on a terminal, a line every 10% otherwise (logs).
pub struct StageProgress {
    bar: std::sync::Mutex<Option<(ProgressBar, String, u64, u64)>>,
    terminal: bool,
}

impl StageProgress {
    pub fn new() -> Self {
        StageProgress { bar: std::sync::Mutex::new(None), terminal: std::io::stderr().is_terminal() }
    }
}

impl triage::train::Progress for StageProgress {
    fn stage(&self, name: &str, total: u64) {
        let bar = progress_bar(Progress::Stage, Some(total));
        bar.set_message(name.to_string());
        if !self.terminal {
            eprintln!("{name}: 0/{total}");
        }
        if let Ok(mut slot) = self.bar.lock() {
            *slot = Some((bar, name.to_string(), total, 0));
        }
    }
    fn advance(&self, n: u64) {
        if let Ok(mut slot) = self.bar.lock() {
            if let Some((bar, name, total, done)) = slot.as_mut() {
                bar.inc(n);
                let before = *done * 10 / (*total).max(1);
                *done += n;
                if !self.terminal && *done * 10 / (*total).max(1) > before {
                    let elapsed = bar.elapsed().as_secs_f64();
                    let eta = elapsed / *done as f64 * (*total - (*done).min(*total)) as f64;
                    eprintln!("{name}: {done}/{total} ({:.0}/s, eta {eta:.0}s)", *done as f64 / elapsed.max(1e-9));
                }
            }
        }
    }
    fn finish_stage(&self) {
        if let Ok(mut slot) = self.bar.lock() {
            if let Some((bar, ..)) = slot.take() {
                bar.finish_and_clear();
            }
        }
    }
    fn note(&self, line: &str) {
        match self.bar.lock().ok().and_then(|s| s.as_ref().map(|(b, ..)| b.clone())) {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Catch SIGTERM/SIGINT from the very start (one arriving while a model loads still drains),
/// load the config, and run `job` until it stops or a signal asks it to.
pub async fn until_terminated<R, F>(
    config: &std::path::Path,
    job: impl FnOnce(triage::config::Config, tokio::sync::oneshot::Receiver<()>) -> F,
) -> Result<R>
where
    F: std::future::Future<Output = R>,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        termination().await;
        let _ = stop_tx.send(());
    });
    tokio::task::yield_now().await;
    let config = triage::config::Config::load(config);
    let result = match config {
        Ok(config) => Ok(job(config, stop_rx).await),
        Err(e) => Err(e.into()),
    };
    signals.abort();
    result
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
