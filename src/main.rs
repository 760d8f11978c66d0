//! The binary's edge: argument parsing (every flag also reads an environment variable),
//! logging, and exit codes. The work lives in the library.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use triage::batcher::BatchPolicy;
use triage::classify::{classify_stream, ClassifyOptions, ClassifySummary};
use triage::engine::EngineConfig;
use triage::message::{FieldMap, DEFAULT_MAX_MESSAGE_BYTES};
use triage::model::{InferenceOptions, Model, OptimizationLevel, Provider};
use triage::paths;

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
    /// Classify JSON lines (one result per input line, in input order).
    Classify(ClassifyArgs),
    /// Run the main job on embedded defaults: classify the bundled examples with the default model.
    Demo(DemoArgs),
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model directory (model.onnx, tokenizer.json, model.toml and/or config.json).
    #[arg(long, env = "TRIAGE_MODEL")]
    model: Option<PathBuf>,
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH, then runtime/onnxruntime/ of the project).
    #[arg(long, env = "TRIAGE_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    /// Execution providers in order of preference (cpu, cuda, tensorrt); CPU is the fallback.
    #[arg(long, env = "TRIAGE_PROVIDERS", value_delimiter = ',', default_value = "cpu")]
    providers: Vec<Provider>,
    /// Intra-op threads per inference session (0: one per core).
    #[arg(long, env = "TRIAGE_INTRA_THREADS", default_value_t = 0)]
    intra_threads: usize,
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
    /// The messages to classify (default: the bundled examples).
    #[arg(long)]
    input: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Classify(args) => run_classify(args),
        Command::Demo(args) => run_demo(args),
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

fn load_model(args: &ModelArgs) -> Result<Arc<Model>> {
    let dir = model_dir(&args.model)?;
    let options = InferenceOptions {
        ort_library: args.ort_library.clone(),
        providers: args.providers.clone(),
        gpu_device_id: 0,
        intra_threads: args.intra_threads,
        optimization: OptimizationLevel::All,
        max_length: args.max_length,
        template: args.template.clone(),
    };
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

fn run_demo(args: DemoArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let input_path = match args.input {
        Some(p) => p,
        None => model.info().dir.join("examples.jsonl"),
    };
    let file = std::fs::File::open(&input_path).with_context(|| format!("opening {}", input_path.display()))?;
    let info = model.info().clone();
    eprintln!(
        "triage demo: classifying {} with model {} {} on {} (ONNX Runtime loaded)",
        input_path.display(),
        info.name,
        info.version,
        info.provider
    );
    let options = ClassifyOptions {
        engine: EngineConfig::default(),
        fields: FieldMap::default(),
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        include_embeddings: false,
    };
    let mut results = Vec::new();
    let summary = classify_stream(model, &options, BufReader::new(file), &mut results, |_| {})?;
    let texts = read_texts(&input_path)?;
    print_table(&results, &texts)?;
    print_summary(&summary);
    Ok(())
}

/// Line number -> a short text preview, for the demo table.
fn read_texts(path: &Path) -> Result<std::collections::HashMap<u64, String>> {
    let file = std::fs::File::open(path)?;
    let mut out = std::collections::HashMap::new();
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        let preview = serde_json::from_slice::<serde_json::Value>(&line)
            .ok()
            .map(|v| {
                let subject = v.get("subject").and_then(|s| s.as_str()).unwrap_or("");
                let body = v.get("body").or_else(|| v.get("text")).and_then(|s| s.as_str()).unwrap_or("");
                format!("{subject} {body}").trim().to_string()
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&line).into_owned());
        out.insert(i as u64 + 1, preview);
    }
    Ok(out)
}

fn print_table(results: &[u8], texts: &std::collections::HashMap<u64, String>) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "{:>4}  {:<40} {:>5}  {:<8}  text", "line", "category", "conf", "priority")?;
    for line in results.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let record: serde_json::Value = serde_json::from_slice(line)?;
        let n = record["line"].as_u64().unwrap_or(0);
        let preview: String = texts.get(&n).map(|t| t.chars().take(60).collect()).unwrap_or_default();
        if let Some(err) = record.get("error") {
            writeln!(out, "{n:>4}  {:<40} {:>5}  {:<8}  {preview}", format!("ERROR {}", err["reason"].as_str().unwrap_or("?")), "", "")?;
        } else {
            writeln!(
                out,
                "{n:>4}  {:<40} {:>5.2}  {:<8}  {preview}",
                record["category"].as_str().unwrap_or("-"),
                record["confidence"].as_f64().unwrap_or(0.0),
                record["priority"].as_str().unwrap_or("-"),
            )?;
        }
    }
    Ok(())
}

fn print_summary(summary: &ClassifySummary) {
    eprintln!("\nsummary: {summary}");
    if summary.lines == 0 {
        eprintln!("(the input had no messages)");
    }
}
