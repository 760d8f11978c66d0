//! `triage bench --sweep`: what decides the model's own ceiling, measured side by side in one
//! process on pre-tokenized, length-sorted batches (no Kafka, no ClickHouse):
//! batch size; intra-op threads per session vs number of sessions; ONNX Runtime's graph
//! optimisation level; truncation length; tokenization alone and overlapped with inference by
//! the engine; cheaper encoder variants. Each row also gets GFLOP/s and its share of the CPU's
//! peak (an estimate: see [`cpu_peak`]). Then latency at low load through the engine, against
//! its bound: max_wait plus the message's own batch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ceiling_on, pretokenize, rendered, workload_messages, BenchError, StageResult, Workload};
use crate::engine::{Engine, EngineConfig, Outcome};
use crate::model::{InferenceOptions, Model, OptimizationLevel};

pub struct SweepOptions {
    pub model_dir: PathBuf,
    pub shared_data: PathBuf,
    pub messages: usize,
    pub workloads: Vec<Workload>,
    /// Other encoder / model directories to compare (e.g. int8, 3 layers).
    pub variants: Vec<PathBuf>,
    pub inference: InferenceOptions,
    pub batching: EngineConfig,
    /// Overrides the detected peak (GFLOP/s).
    pub peak_gflops: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Peak {
    pub gflops: f64,
    pub how: String,
}

/// Peak fp32 FLOP/s of this machine: cores x clock x FLOPs per cycle, where a core with
/// AVX-512 does 2 FMA units x 16 lanes x 2 = 64 per cycle, AVX2 + FMA 32, else 16. The clock is
/// /proc/cpuinfo's (nominal; turbo would raise the peak, lowering the shares shown).
pub fn cpu_peak() -> Peak {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let per_cycle = if has("avx512f") {
        64.0
    } else if has("avx2") && has("fma") {
        32.0
    } else {
        16.0
    };
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(2000.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let model = info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("?").trim().to_string();
    Peak {
        gflops: cores * mhz / 1000.0 * per_cycle,
        how: format!("{cores} cores x {mhz:.0} MHz x {per_cycle} fp32 FLOP/cycle ({model}; two FMA units assumed)"),
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub group: &'static str,
    pub setting: String,
    pub result: StageResult,
    /// Throughput relative to the group's reference row.
    pub ratio: f64,
}

#[derive(Debug, Clone, Default)]
pub struct LowLoad {
    pub messages: usize,
    pub rate_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub max_wait_ms: u64,
    /// Messages whose latency stayed within max_wait + their batch's inference (+2 ms slack).
    pub within_bound: usize,
}

pub struct WorkloadSweep {
    pub workload: Workload,
    pub source: String,
    pub rows: Vec<Row>,
    pub low_load: LowLoad,
}

pub struct SweepReport {
    pub peak: Peak,
    pub workloads: Vec<WorkloadSweep>,
}

fn load(dir: &std::path::Path, options: &InferenceOptions) -> Result<Model, BenchError> {
    Ok(Model::load(dir, options)?)
}

pub fn run(options: &SweepOptions, progress: impl Fn(&str)) -> Result<SweepReport, BenchError> {
    let peak = match options.peak_gflops {
        Some(g) => Peak { gflops: g, how: "given with --peak-gflops".into() },
        None => cpu_peak(),
    };
    // The ceiling's batches are limited by rows only (the sweep varies them).
    let max_tokens = usize::MAX;
    let base_model = load(&options.model_dir, &options.inference)?;
    let mut workloads = Vec::new();
    for &workload in &options.workloads {
        let (messages, source) = workload_messages(workload, &options.shared_data, options.messages);
        progress(&format!("{}: {source}", workload.name()));
        let encoded = pretokenize(&base_model, &messages);
        let mut rows: Vec<Row> = Vec::new();
        let push = |rows: &mut Vec<Row>, group: &'static str, setting: String, result: StageResult, reference: Option<f64>| {
            let ratio = reference.map_or(1.0, |r| result.per_second() / r.max(1e-9));
            rows.push(Row { group, setting, result, ratio });
        };

        progress("  batch size");
        let mut best = (64usize, 0.0f64);
        let mut reference = None;
        for size in [1usize, 8, 16, 32, 64, 128] {
            let r = ceiling_on(&base_model, &encoded, size, max_tokens, 1, None)?;
            if r.per_second() > best.1 {
                best = (size, r.per_second());
            }
            let rate = r.per_second();
            push(&mut rows, "batch size", format!("{size}"), r, reference);
            reference.get_or_insert(rate);
        }
        let batch_size = best.0;
        let default = ceiling_on(&base_model, &encoded, batch_size, max_tokens, 1, None)?;
        let default_rate = default.per_second();

        progress("  threads: intra-op threads per session vs sessions");
        push(&mut rows, "threads", "1 session x all cores (default)".into(), default.clone(), None);
        let one_thread = load(&options.model_dir, &InferenceOptions { intra_threads: 1, ..options.inference.clone() })?;
        push(
            &mut rows,
            "threads",
            "1 session x 1 thread".into(),
            ceiling_on(&one_thread, &encoded, batch_size, max_tokens, 1, None)?,
            Some(default_rate),
        );
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        push(
            &mut rows,
            "threads",
            format!("{cores} sessions x 1 thread"),
            ceiling_on(&one_thread, &encoded, batch_size, max_tokens, cores, None)?,
            Some(default_rate),
        );
        push(
            &mut rows,
            "threads",
            format!("{cores} sessions x all cores (oversubscribed)"),
            ceiling_on(&base_model, &encoded, batch_size, max_tokens, cores, None)?,
            Some(default_rate),
        );
        drop(one_thread);

        progress("  graph optimisation level");
        for (name, level) in
            [("basic", OptimizationLevel::Basic), ("extended", OptimizationLevel::Extended), ("all (default)", OptimizationLevel::All)]
        {
            let m = load(&options.model_dir, &InferenceOptions { optimization: level, ..options.inference.clone() })?;
            push(&mut rows, "optimisation", name.into(), ceiling_on(&m, &encoded, batch_size, max_tokens, 1, None)?, Some(default_rate));
        }

        progress("  truncation length");
        for length in [64usize, 128, 256] {
            let m = load(&options.model_dir, &InferenceOptions { max_length: Some(length), ..options.inference.clone() })?;
            let e = pretokenize(&m, &messages);
            push(
                &mut rows,
                "truncation",
                format!("max_length {length}"),
                ceiling_on(&m, &e, batch_size, max_tokens, 1, None)?,
                Some(default_rate),
            );
        }

        progress("  tokenization: alone, and overlapped with inference by the engine");
        let start = Instant::now();
        let tokenized = pretokenize(&base_model, &messages);
        let tokenize_seconds = start.elapsed().as_secs_f64();
        let tokens: u64 = tokenized.iter().map(|e| e.len() as u64).sum();
        let tokenize_only = StageResult { messages: tokenized.len(), seconds: tokenize_seconds, tokens, ..Default::default() };
        push(&mut rows, "tokenization", "tokenize alone (1 thread)".into(), tokenize_only.clone(), Some(default_rate));
        let serial_seconds = tokenize_seconds + default.seconds;
        push(
            &mut rows,
            "tokenization",
            "serial estimate (tokenize, then infer)".into(),
            StageResult { messages: tokenized.len(), seconds: serial_seconds, tokens, ..Default::default() },
            Some(default_rate),
        );
        let engine = engine_throughput(Arc::new(load(&options.model_dir, &options.inference)?), &messages, &options.batching)?;
        push(&mut rows, "tokenization", "engine: tokenizer thread || inference".into(), engine, Some(default_rate));

        for dir in &options.variants {
            progress(&format!("  variant {}", dir.display()));
            let m = load(dir, &options.inference)?;
            let e = pretokenize(&m, &messages);
            push(&mut rows, "variant", m.info().name.clone(), ceiling_on(&m, &e, batch_size, max_tokens, 1, None)?, Some(default_rate));
        }

        progress("  latency at low load");
        let low_load = low_load_latency(Arc::new(load(&options.model_dir, &options.inference)?), &messages, &options.batching, 40.0, 80)?;
        workloads.push(WorkloadSweep { workload, source, rows, low_load });
    }
    Ok(SweepReport { peak, workloads })
}

/// Texts through the whole engine (tokenizer pool, batcher, inference), as fast as it takes them.
fn engine_throughput(model: Arc<Model>, messages: &[serde_json::Value], config: &EngineConfig) -> Result<StageResult, BenchError> {
    let texts = rendered(&model, messages);
    let (tx, rx) = flume::bounded::<Outcome<usize>>(config.queue_capacity);
    let engine = Engine::start(model, config, tx)?;
    let submitter = engine.submitter();
    let start = Instant::now();
    let n = texts.len();
    let feeder = std::thread::spawn(move || {
        for (i, t) in texts.into_iter().enumerate() {
            if submitter.submit(i, t).is_err() {
                return;
            }
        }
    });
    let mut tokens = 0u64;
    for _ in 0..n {
        let Ok(o) = rx.recv() else { break };
        tokens += o.result.map(|c| c.tokens as u64).unwrap_or(0);
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = feeder.join();
    let stats = engine.stats();
    engine.shutdown();
    Ok(StageResult { messages: n, seconds, tokens, padding_ratio: stats.padding_ratio(), ..Default::default() })
}

/// One message every 1/rate seconds through the engine; latency = submit to result.
fn low_load_latency(
    model: Arc<Model>,
    messages: &[serde_json::Value],
    config: &EngineConfig,
    rate: f64,
    count: usize,
) -> Result<LowLoad, BenchError> {
    let texts = rendered(&model, messages);
    let (tx, rx) = flume::bounded::<Outcome<Instant>>(config.queue_capacity);
    let engine = Engine::start(model, config, tx)?;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut latencies = Vec::with_capacity(count);
    let mut within = 0;
    let max_wait = config.policy.max_wait();
    let start = Instant::now();
    for (i, text) in texts.iter().cycle().take(count).enumerate() {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let submitted = Instant::now();
        engine.submit(submitted, text.clone()).map_err(|_| BenchError::Other("the engine stopped".into()))?;
        // At this rate each result is back long before the next message: collect it now.
        let outcome = rx.recv().map_err(|_| BenchError::Other("the engine stopped".into()))?;
        let latency = outcome.tag.elapsed();
        if let Ok(c) = &outcome.result {
            if latency <= max_wait + c.inference + Duration::from_millis(2) {
                within += 1;
            }
        }
        latencies.push(latency.as_secs_f64() * 1000.0);
    }
    engine.shutdown();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(LowLoad {
        messages: count,
        rate_per_second: rate,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: pick(1.0),
        max_wait_ms: config.policy.max_wait_ms,
        within_bound: within,
    })
}

pub fn render(report: &SweepReport) -> String {
    let mut out = format!("peak: {:.0} GFLOP/s fp32 = {}\n", report.peak.gflops, report.peak.how);
    for w in &report.workloads {
        out.push_str(&format!("\n{}  [{}]\n", w.workload.name(), w.source));
        out.push_str("  group         setting                                    seq/s  x ref   tokens/s  padded/real  GFLOP/s  % peak\n");
        for r in &w.rows {
            let gflops = if r.result.flops > 0.0 { r.result.flops / r.result.seconds.max(1e-9) / 1e9 } else { 0.0 };
            let (g, p) = if gflops > 0.0 {
                (format!("{gflops:.0}"), format!("{:.0}%", 100.0 * gflops / report.peak.gflops))
            } else {
                ("-".into(), "-".into())
            };
            out.push_str(&format!(
                "  {:<13} {:<40} {:>9.1} {:>6.2} {:>10.0} {:>12.2} {:>8} {:>7}\n",
                r.group,
                r.setting,
                r.result.per_second(),
                r.ratio,
                r.result.tokens_per_second(),
                r.result.padding_ratio,
                g,
                p
            ));
        }
        let l = &w.low_load;
        out.push_str(&format!(
            "  low load ({:.0} msg/s, {} messages, max_wait {} ms): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {}/{} within max_wait + own batch\n",
            l.rate_per_second, l.messages, l.max_wait_ms, l.p50_ms, l.p99_ms, l.max_ms, l.within_bound, l.messages
        ));
    }
    out
}
