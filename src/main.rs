//! The binary's edge: argument parsing (every flag also reads an environment variable),
//! logging, and exit codes. The work lives in the library.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use triage::batcher::BatchPolicy;
use triage::classify::{classify_stream, ClassifyOptions};
use triage::config::Config;
use triage::demo::DemoOptions;
use triage::engine::EngineConfig;
use triage::kafka_tools;
use triage::local::LocalKafka;
use triage::message::{FieldMap, DEFAULT_MAX_MESSAGE_BYTES};
use triage::model::{InferenceOptions, Model, Provider};
use triage::paths;
use triage::pipeline;
use triage::sink::clickhouse::ClickHouseService;

#[derive(Parser)]
#[command(name = "triage", version, about = "Classify support tickets, returns and e-mails with small ONNX language models")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "TRIAGE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume Kafka, classify, write ClickHouse, commit what is done.
    Run(RunArgs),
    /// Run the whole path on embedded defaults: mock Kafka, local ClickHouse, bundled samples, the worker.
    Demo(DemoArgs),
    /// Classify JSON lines (one result per input line, in input order).
    Classify(ClassifyArgs),
    /// Validate a configuration file without connecting to anything.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The ClickHouse results table and analytics views.
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
    /// Run a mock Kafka cluster for development (librdkafka's; real protocol over TCP).
    Broker(BrokerArgs),
    /// Load JSON lines (or a CSV with a header row) into a topic.
    Produce(ProduceArgs),
    /// Send dead letters back to the topics they came from.
    Redrive(RedriveArgs),
    /// Side-by-side benchmark: model ceiling vs the whole worker vs batch size 1, with ratios.
    Bench(BenchArgs),
    /// Train heads on your labelled CSV / JSON lines over a frozen encoder; writes a model directory.
    Train(TrainArgs),
    /// Score a model directory on labelled data, next to a TF-IDF baseline on the same split.
    Eval(EvalArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// Labelled data: CSV with a header row, or JSON lines.
    #[arg(long)]
    data: PathBuf,
    /// Text columns in template order: COLUMN or PLACEHOLDER=COLUMN (e.g. subject,body or body=text).
    #[arg(long, required = true, value_delimiter = ',')]
    text: Vec<String>,
    /// A single-label head per column: COLUMN or HEAD=COLUMN (repeatable; the first is the category).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// A multi-label head: COLUMN (tags split on | or ;, or a JSON array) or HEAD=COL1,COL2,...
    #[arg(long = "multi-label")]
    multi_label: Vec<String>,
    /// Model directory whose embedding head is the frozen encoder (default: the default model).
    #[arg(long, env = "TRIAGE_TRAIN_ENCODER")]
    encoder: Option<PathBuf>,
    /// Where to write the model directory.
    #[arg(long)]
    out: PathBuf,
    /// Model name (default: the --out folder's name).
    #[arg(long)]
    name: Option<String>,
    /// How the worker assembles text, e.g. "{subject}\n{body}" (default: the text placeholders, one per line).
    #[arg(long)]
    template: Option<String>,
    /// Recommend (and write) the confidence threshold reaching this accuracy on what is not escalated, e.g. 0.95.
    #[arg(long)]
    target_accuracy: Option<f64>,
    /// Texts unlike the training data (CSV / JSON lines) to measure the out-of-distribution gate.
    #[arg(long)]
    foreign: Option<PathBuf>,
    /// Text columns of --foreign (default: --text).
    #[arg(long, value_delimiter = ',')]
    foreign_text: Vec<String>,
    /// Lexical (TF-IDF) layer averaged with the embedding layer: auto (if it helps in cross-validation), on, off.
    #[arg(long, default_value = "auto")]
    lexical: triage::train::LexicalMode,
    /// A TOML file with a [priority] table (from_head, default, map) for model.toml (default: a head named
    /// `priority`, if one is trained, gives the priority).
    #[arg(long)]
    priority: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of the data held out for validation.
    #[arg(long, default_value_t = 0.2)]
    validation_fraction: f64,
    /// Labels with fewer examples are left out (with a warning).
    #[arg(long, default_value_t = 5)]
    min_examples: usize,
    /// Regularisation strengths tried by cross-validation (C, larger: weaker).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    c: Vec<f64>,
    #[arg(long, default_value_t = 3)]
    folds: usize,
    /// Replace a model.toml already in --out.
    #[arg(long)]
    force: bool,
    /// Markdown added to MODEL_CARD.md (architecture, data credit and licence, business rules).
    #[arg(long)]
    card_notes: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    batch: BatchArgs,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long, env = "TRIAGE_MODEL")]
    model: Option<PathBuf>,
    /// Labelled data (CSV or JSON lines).
    #[arg(long)]
    data: PathBuf,
    /// Score every row (a separate test file) instead of the model's validation split.
    #[arg(long)]
    all: bool,
    /// Text columns (default: the model's [training] record).
    #[arg(long, value_delimiter = ',')]
    text: Vec<String>,
    /// HEAD=COLUMN label columns (default: the model's [training] record).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    batch: BatchArgs,
}

/// Where ONNX Runtime comes from and how sessions run (every command that loads a model).
#[derive(Args, Clone)]
struct RuntimeArgs {
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH, then runtime/onnxruntime/ of the project).
    #[arg(long, env = "TRIAGE_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    /// Execution providers in order of preference (cpu, cuda, tensorrt); CPU is the fallback.
    #[arg(long, env = "TRIAGE_PROVIDERS", value_delimiter = ',', default_value = "cpu")]
    providers: Vec<Provider>,
    /// Intra-op threads per inference session (0: the cores shared out among the sessions).
    #[arg(long, env = "TRIAGE_INTRA_THREADS", default_value_t = 0)]
    intra_threads: usize,
}

impl RuntimeArgs {
    fn options(&self) -> InferenceOptions {
        InferenceOptions {
            ort_library: self.ort_library.clone(),
            providers: self.providers.clone(),
            intra_threads: self.intra_threads,
            ..InferenceOptions::default()
        }
    }
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Messages per workload (the backlog each worker run drains; default 10000, 1000 with --sweep).
    /// Fewer make the fixed tail (last insert, last commit) a visible share of stage b.
    #[arg(long)]
    messages: Option<usize>,
    /// Which workloads: short, tickets, or both.
    #[arg(long, default_value = "both")]
    workload: String,
    /// The datasets folder (banking77/, support-tickets/); generated texts when absent.
    #[arg(long, default_value = "../shared/data")]
    data: PathBuf,
    /// Batch size of the ceiling run (default: the best of 8, 16, 32, 64 on a sample).
    #[arg(long)]
    ceiling_batch_size: Option<usize>,
    /// Tune the ceiling instead: batch size, threads vs sessions, optimisation level, truncation,
    /// tokenization overlap, --variant directories, GFLOP/s and share of peak; latency at low load.
    #[arg(long)]
    sweep: bool,
    /// With --sweep: another model or encoder directory to compare (repeatable).
    #[arg(long = "variant")]
    variants: Vec<PathBuf>,
    /// With --sweep: the CPU's peak fp32 GFLOP/s (default: estimated from /proc/cpuinfo).
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// The worker's batching and threads (stage b; stage c changes only max_batch_size).
    #[command(flatten)]
    batch: BatchArgs,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Parse, apply environment overrides, validate; print the effective config (secrets hidden).
    Check {
        #[arg(env = "TRIAGE_CONFIG")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum SchemaAction {
    /// Print the DDL for the configured database and table.
    Print {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Create the database, table and views (idempotent).
    Apply {
        #[arg(long, env = "TRIAGE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    #[arg(long, short, env = "TRIAGE_CONFIG")]
    config: PathBuf,
}

#[derive(Args)]
struct BrokerArgs {
    #[arg(long, default_value_t = 1)]
    brokers: i32,
    /// Topics to create, as NAME or NAME:PARTITIONS.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Also write the bootstrap address to this file.
    #[arg(long)]
    address_file: Option<PathBuf>,
}

#[derive(Args)]
struct ProduceArgs {
    #[arg(long, env = "TRIAGE_KAFKA__BOOTSTRAP_SERVERS", default_value = "localhost:9092")]
    bootstrap_servers: String,
    #[arg(long)]
    topic: String,
    /// Messages per second at most (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// The input is a CSV with a header row (default: by the file extension).
    #[arg(long)]
    csv: bool,
    /// JSON lines or CSV ("-" for stdin).
    file: String,
}

#[derive(Args)]
struct RedriveArgs {
    #[arg(long, short, env = "TRIAGE_CONFIG")]
    config: PathBuf,
    /// Only dead letters with this reason (e.g. clickhouse_rejected).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model directory (model.onnx, tokenizer.json, model.toml and/or config.json).
    #[arg(long, env = "TRIAGE_MODEL")]
    model: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Override the model's truncation length (tokens).
    #[arg(long, env = "TRIAGE_MAX_LENGTH")]
    max_length: Option<usize>,
    /// Override the model's text template, e.g. "{subject}\n{body}".
    #[arg(long, env = "TRIAGE_TEMPLATE")]
    template: Option<String>,
}

#[derive(Args, Clone)]
struct BatchArgs {
    #[arg(long, env = "TRIAGE_MAX_BATCH_SIZE", default_value_t = BatchPolicy::default().max_batch_size)]
    max_batch_size: usize,
    /// Padded tokens (rows x longest row) per batch.
    #[arg(long, env = "TRIAGE_MAX_BATCH_TOKENS", default_value_t = BatchPolicy::default().max_batch_tokens)]
    max_batch_tokens: usize,
    /// Longest a message waits for a batch to fill (milliseconds).
    #[arg(long, env = "TRIAGE_MAX_WAIT_MS", default_value_t = BatchPolicy::default().max_wait_ms)]
    max_wait_ms: u64,
    /// Batches' worth of messages grouped by length (1: arrival order).
    #[arg(long, env = "TRIAGE_BUCKET_WINDOW", default_value_t = BatchPolicy::default().bucket_window)]
    bucket_window: usize,
    /// Fixed cost of one batch in tokens (higher: fuller batches, more padding).
    #[arg(long, env = "TRIAGE_BATCH_COST_TOKENS", default_value_t = BatchPolicy::default().batch_cost_tokens)]
    batch_cost_tokens: usize,
    #[arg(long, env = "TRIAGE_TOKENIZER_THREADS", default_value_t = EngineConfig::default().tokenizer_threads)]
    tokenizer_threads: usize,
    /// Inference sessions, each on its own thread (0: one per core on CPU, one on GPU).
    #[arg(long, env = "TRIAGE_INFERENCE_THREADS", default_value_t = EngineConfig::default().inference_threads)]
    inference_threads: usize,
}

#[derive(Args, Clone)]
struct FieldArgs {
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
    max_message_bytes: usize,
}

#[derive(Args)]
struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    fields: FieldArgs,
    /// JSON lines to classify ("-" for stdin).
    #[arg(long, short, default_value = "-")]
    input: String,
    /// Where results go ("-" for stdout).
    #[arg(long, short, default_value = "-")]
    output: String,
    /// Include embedding heads' vectors in the output.
    #[arg(long)]
    embeddings: bool,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder with tickets.jsonl, returns.jsonl and emails.jsonl (default: deploy/demo).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Keep Kafka and ClickHouse running after the demo, until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Classify(args) => run_classify(args),
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(run_demo(args))),
        Command::Run(args) => runtime().and_then(|rt| rt.block_on(run_worker(args))),
        Command::Config { action: ConfigAction::Check { file } } => check_config(&file),
        Command::Schema { action } => runtime().and_then(|rt| rt.block_on(schema(action))),
        Command::Broker(args) => runtime().and_then(|rt| rt.block_on(run_broker(args))),
        Command::Produce(args) => runtime().and_then(|rt| rt.block_on(run_produce(args))),
        Command::Redrive(args) => run_redrive(args),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(run_bench(args))),
        Command::Train(args) => run_train(args),
        Command::Eval(args) => run_eval(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn model_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
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

/// Progress of `train` / `eval` stages: a bar on a terminal, a line every 10% otherwise (logs).
struct StageProgress {
    bar: std::sync::Mutex<Option<(ProgressBar, String, u64, u64)>>,
    terminal: bool,
}

impl StageProgress {
    fn new() -> Self {
        StageProgress { bar: std::sync::Mutex::new(None), terminal: std::io::stderr().is_terminal() }
    }
}

impl triage::train::Progress for StageProgress {
    fn stage(&self, name: &str, total: u64) {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {per_sec} eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
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

fn run_train(args: TrainArgs) -> Result<()> {
    use triage::train::{Columns, TrainOptions};
    let columns = Columns::parse(&args.text, &args.labels, &args.multi_label)?;
    let encoder = model_dir(&args.encoder)?;
    let mut options = TrainOptions::new(args.data, columns, encoder, args.out);
    options.name = args.name;
    options.template = args.template.map(|t| t.replace("\\n", "\n"));
    options.target_accuracy = args.target_accuracy;
    if let Some(t) = options.target_accuracy {
        if !(0.0..1.0).contains(&t) {
            bail!("--target-accuracy {t} must be a fraction below 1 (e.g. 0.95)");
        }
    }
    options.foreign = args.foreign;
    if !args.foreign_text.is_empty() {
        options.foreign_text = Some(Columns::parse_text(&args.foreign_text)?);
    }
    options.lexical = args.lexical;
    options.priority = args.priority;
    options.seed = args.seed;
    options.validation_fraction = args.validation_fraction;
    options.min_examples = args.min_examples.max(2);
    if args.c.is_empty() || args.c.iter().any(|c| !(*c > 0.0)) {
        bail!("--c values must be positive numbers");
    }
    options.c_grid = args.c;
    options.c_grid.sort_by(f64::total_cmp);
    options.folds = args.folds.clamp(2, 10);
    options.inference = args.runtime.options();
    options.engine = engine_config(&args.batch);
    options.force = args.force;
    options.card_notes = args.card_notes;
    let report = triage::train::train(&options, &StageProgress::new())?;
    for h in &report.single {
        println!(
            "{}: accuracy {:.3}, macro-F1 {:.3} (embedding alone {:.3}; TF-IDF baseline {:.3})",
            h.name,
            h.validation.accuracy,
            h.validation.macro_f1,
            h.validation_embedding_only.accuracy,
            h.validation_tfidf_baseline.accuracy
        );
    }
    for m in &report.multi {
        println!("{}: micro-F1 {:.3} (TF-IDF baseline {:.3})", m.name, m.validation_micro_f1, m.validation_tfidf_baseline_micro_f1);
    }
    if let Some(p) = report.escalation.as_ref().and_then(|e| e.recommended) {
        println!("escalation threshold {:.2}: escalates {:.1}% of validation", p.threshold, p.escalated * 100.0);
    }
    if let Some(f) = report.ood.as_ref().and_then(|o| o.foreign.as_ref()) {
        println!("out-of-distribution AUROC {:.3} (1 - confidence: {:.3})", f.auroc, f.confidence_auroc);
    }
    println!("model written to {} (see MODEL_CARD.md)", options.out.display());
    Ok(())
}

fn run_eval(args: EvalArgs) -> Result<()> {
    use triage::train::{eval, Columns};
    let columns = if args.text.is_empty() && args.labels.is_empty() { None } else { Some(Columns::parse(&args.text, &args.labels, &[])?) };
    let options = eval::EvalOptions {
        model: model_dir(&args.model)?,
        data: args.data,
        all: args.all,
        columns,
        inference: args.runtime.options(),
        engine: engine_config(&args.batch),
    };
    let report = eval::evaluate(&options, &StageProgress::new())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", eval::render(&report));
    }
    Ok(())
}

fn load_model(args: &ModelArgs) -> Result<Arc<Model>> {
    let dir = model_dir(&args.model)?;
    let options = inference_options(args);
    let model = Model::load(&dir, &options).with_context(|| format!("loading model {}", dir.display()))?;
    Ok(Arc::new(model))
}

fn engine_config(b: &BatchArgs) -> EngineConfig {
    EngineConfig {
        policy: BatchPolicy {
            max_batch_size: b.max_batch_size,
            max_batch_tokens: b.max_batch_tokens,
            max_wait_ms: b.max_wait_ms,
            bucket_window: b.bucket_window,
            batch_cost_tokens: b.batch_cost_tokens,
        },
        tokenizer_threads: b.tokenizer_threads,
        inference_threads: b.inference_threads,
        ..EngineConfig::default()
    }
}

fn field_map(f: &FieldArgs) -> FieldMap {
    let mut map = FieldMap::default();
    if !f.id_fields.is_empty() {
        map.id = f.id_fields.clone();
    }
    if !f.subject_fields.is_empty() {
        map.text.insert("subject".into(), f.subject_fields.clone());
    }
    if !f.body_fields.is_empty() {
        map.text.insert("body".into(), f.body_fields.clone());
    }
    map
}

fn progress_bar(total: Option<u64>) -> ProgressBar {
    let target = ProgressDrawTarget::stderr();
    match total {
        Some(len) => ProgressBar::with_draw_target(Some(len), target).with_style(
            ProgressStyle::with_template("{bar:40} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::with_draw_target(None, target),
    }
}

fn run_classify(args: ClassifyArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let options = ClassifyOptions {
        engine: engine_config(&args.batch),
        fields: field_map(&args.fields),
        max_message_bytes: args.fields.max_message_bytes,
        include_embeddings: args.embeddings,
    };
    let (input, total): (Box<dyn BufRead + Send>, Option<u64>) = if args.input == "-" {
        (Box::new(BufReader::new(std::io::stdin())), None)
    } else {
        let file = std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input))?;
        let len = file.metadata().ok().map(|m| m.len());
        (Box::new(BufReader::with_capacity(1 << 16, file)), len)
    };
    let bar = progress_bar(total);
    let bar_for_reader = bar.clone();
    let output: Box<dyn Write> = if args.output == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&args.output).with_context(|| format!("creating {}", args.output))?)
    };
    let summary = classify_stream(model, &options, input, output, move |bytes| bar_for_reader.set_position(bytes));
    bar.finish_and_clear();
    let summary = match summary {
        Err(triage::classify::ClassifyRunError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        other => other?,
    };
    eprintln!("{summary}");
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

fn inference_options(args: &ModelArgs) -> InferenceOptions {
    InferenceOptions { max_length: args.max_length, template: args.template.clone(), ..args.runtime.options() }
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
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

async fn run_worker(args: RunArgs) -> Result<()> {
    // Catch SIGTERM from the very start: one arriving while the model loads still drains.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        termination().await;
        let _ = stop_tx.send(());
    });
    tokio::task::yield_now().await;
    let config = Config::load(&args.config)?;
    let report = pipeline::run(config, async move {
        let _ = stop_rx.await;
    })
    .await;
    signals.abort();
    let report = report?;
    tracing::info!(
        consumed = report.consumed,
        rows = report.rows_inserted,
        dead_lettered = report.dead_lettered,
        escalated = report.escalated,
        unfinished = report.unfinished,
        seconds = format!("{:.1}", report.seconds),
        "worker stopped"
    );
    Ok(())
}

fn check_config(file: &Path) -> Result<()> {
    let config = Config::load(file)?;
    for route in &config.routes {
        let dir = &route.model;
        if !dir.join("model.onnx").exists() || !dir.join("tokenizer.json").exists() {
            bail!("route `{}`: {} is not a model directory (model.onnx and tokenizer.json)", route.topic, dir.display());
        }
        triage::model::Descriptor::load(dir).with_context(|| format!("route `{}`", route.topic))?;
    }
    print!("{}", toml::to_string(&config).context("printing the configuration")?);
    eprintln!("{}: valid ({} routes)", file.display(), config.routes.len());
    Ok(())
}

async fn schema(action: SchemaAction) -> Result<()> {
    match action {
        SchemaAction::Print { config } => {
            let ch = match config {
                Some(path) => Config::load(&path)?.clickhouse,
                None => triage::config::ClickHouseConfig::default(),
            };
            print!("{}", triage::sink::clickhouse::schema::script(&ch));
        }
        SchemaAction::Apply { config } => {
            let config = Config::load(&config)?;
            ClickHouseService::new(&config.clickhouse)
                .apply_schema()
                .await
                .with_context(|| format!("applying the schema at {}", config.clickhouse.url))?;
            eprintln!("schema applied: {}.{} and its views", config.clickhouse.database, config.clickhouse.table);
        }
    }
    Ok(())
}

async fn run_broker(args: BrokerArgs) -> Result<()> {
    let kafka = LocalKafka::start(args.brokers)?;
    for spec in &args.topics {
        let (name, partitions) = match spec.split_once(':') {
            Some((n, p)) => (n, p.parse::<i32>().with_context(|| format!("partitions in `{spec}`"))?),
            None => (spec.as_str(), 1),
        };
        kafka.create_topic(name, partitions)?;
    }
    let address = kafka.bootstrap_servers();
    if let Some(file) = &args.address_file {
        std::fs::write(file, &address).with_context(|| format!("writing {}", file.display()))?;
    }
    // librdkafka's mock cluster binds its own ports: the address differs per start.
    println!("{address}");
    eprintln!("mock Kafka cluster at {address} ({} broker(s)); Ctrl-C stops it", args.brokers);
    termination().await;
    Ok(())
}

async fn run_produce(args: ProduceArgs) -> Result<()> {
    let kafka = triage::config::KafkaConfig { bootstrap_servers: args.bootstrap_servers.clone(), ..Default::default() };
    let producer: rdkafka::producer::FutureProducer = triage::source::kafka::producer_config(&kafka).create()?;
    let is_csv = args.csv || args.file.ends_with(".csv");
    let (reader, total): (Box<dyn BufRead + Send>, Option<u64>) = if args.file == "-" {
        (Box::new(BufReader::new(std::io::stdin())), None)
    } else {
        let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file))?;
        let lines = if is_csv { None } else { Some(BufReader::new(std::fs::File::open(&args.file)?).split(b'\n').count() as u64) };
        (Box::new(BufReader::new(file)), lines)
    };
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr()).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} messages {per_sec} eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let records: Box<dyn Iterator<Item = _>> =
        if is_csv { Box::new(kafka_tools::read_csv(reader)) } else { Box::new(kafka_tools::read_json_lines(reader)) };
    let (sent, skipped) = kafka_tools::produce(&producer, &args.topic, records, args.rate, |n| bar.inc(n)).await?;
    bar.finish_and_clear();
    for s in &skipped {
        eprintln!("skipped: {s}");
    }
    eprintln!("produced {sent} messages to {} ({} skipped)", args.topic, skipped.len());
    Ok(())
}

fn run_redrive(args: RedriveArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    let consumer: rdkafka::consumer::BaseConsumer = triage::source::kafka::client_config(&config.kafka)
        .set("group.id", format!("{}-redrive", config.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let producer: rdkafka::producer::FutureProducer = triage::source::kafka::producer_config(&config.kafka).create()?;
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let (redriven, skipped) =
        kafka_tools::redrive(&consumer, &producer, &config.kafka.dead_letter_topic, args.reason.as_deref(), |n| bar.inc(n))?;
    bar.finish_and_clear();
    eprintln!("redrove {redriven} dead letters to their source topics ({skipped} left: other reasons or no source header)");
    Ok(())
}

async fn run_bench(args: BenchArgs) -> Result<()> {
    use triage::bench::{BenchOptions, Workload};
    let workloads = match args.workload.as_str() {
        "short" => vec![Workload::Short],
        "tickets" => vec![Workload::Tickets],
        "both" => vec![Workload::Short, Workload::Tickets],
        other => bail!("--workload must be short, tickets or both, not `{other}`"),
    };
    if args.sweep {
        let options = triage::bench::sweep::SweepOptions {
            model_dir: model_dir(&args.model.model)?,
            shared_data: args.data.clone(),
            messages: args.messages.unwrap_or(1000),
            workloads,
            variants: args.variants.clone(),
            inference: inference_options(&args.model),
            batching: engine_config(&args.batch),
            peak_gflops: args.peak_gflops,
        };
        let report = tokio::task::spawn_blocking(move || triage::bench::sweep::run(&options, |step| eprintln!("[sweep] {step}"))).await??;
        println!("{}", triage::bench::sweep::render(&report));
        return Ok(());
    }
    let options = BenchOptions {
        model_dir: model_dir(&args.model.model)?,
        shared_data: args.data.clone(),
        messages: args.messages.unwrap_or(10_000),
        workloads,
        inference: inference_options(&args.model),
        batching: engine_config(&args.batch),
        ceiling_batch_size: args.ceiling_batch_size,
    };
    let results = triage::bench::run(options, |step| eprintln!("[bench] {step}")).await?;
    println!("{}", triage::bench::render(&results));
    Ok(())
}

async fn run_demo(args: DemoArgs) -> Result<()> {
    let model_dir = model_dir(&args.model.model)?;
    let data_dir = match args.data {
        Some(d) => d,
        None => paths::find_in_project("deploy/demo").context("the bundled demo messages (deploy/demo) were not found")?,
    };
    let options = DemoOptions { model_dir, data_dir, inference: inference_options(&args.model) };
    let run = triage::demo::run(options, |step| eprintln!("[demo] {step}")).await?;
    let ch = &run.config.clickhouse;
    let show = |title: &str, rows: Vec<triage::demo::CountRow>| {
        let items: Vec<String> =
            rows.iter().map(|r| format!("{} {}", if r.key.is_empty() { "(none)" } else { &r.key }, r.messages)).collect();
        println!("  {title:<16} {}", items.join(", "));
    };
    println!("\nlanded in ClickHouse {}.{} (each message read once, with FINAL):", ch.database, ch.table);
    show("by kind", triage::demo::counts(ch, "kind", 10).await?);
    show("by priority", triage::demo::counts(ch, "priority", 10).await?);
    show("top categories", triage::demo::counts(ch, "category", 8).await?);
    show("escalated", triage::demo::counts(ch, "escalated", 2).await?);
    let r = &run.report;
    println!(
        "  {:<16} {} produced, {} consumed, {} rows, {} dead letters, {} escalations",
        "messages", run.produced, r.consumed, r.rows_inserted, r.dead_lettered, r.escalated
    );
    println!(
        "  {:<16} {:.1} messages/s over {:.1}s (including start-up and group join)",
        "throughput",
        r.consumed as f64 / r.seconds.max(1e-9),
        r.seconds
    );
    println!(
        "\nquery it: clickhouse-client --port {} --query \"SELECT category, priority, confidence, escalated FROM {}.{} FINAL ORDER BY event_time LIMIT 10\"",
        run.clickhouse.tcp_port, ch.database, ch.table
    );
    if args.keep_running {
        println!("Kafka at {}, ClickHouse at {}: Ctrl-C stops them", run.kafka.bootstrap_servers(), ch.url);
        termination().await;
    } else {
        println!("(--keep-running keeps Kafka and ClickHouse up to explore)");
    }
    Ok(())
}
