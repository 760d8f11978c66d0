//! Telemetry: every metric's name declared once (with its description), the Prometheus
//! recorder with explicit histogram buckets (real histograms, aggregatable across pods), and
//! the project's own small HTTP server for /metrics, /healthz and /readyz on one port.
//!
//! Labels are bounded by configuration (topic, kind, model, reason, partition) and by the model
//! versions serving (`model_version`; a replaced version's series leave /metrics, [`versions`]):
//! never a per-message value.

pub mod events;
pub mod versions;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// (name, type, labels, meaning): the README's metric table is this list.
pub const METRICS: &[(&str, &str, &str, &str)] = &[
    (MESSAGES_CONSUMED, "counter", "topic", "Messages received from Kafka."),
    (MESSAGES_CLASSIFIED, "counter", "kind, model, model_version", "Messages whose row a model's answer became (with a cascade: the tier that had the last word)."),
    (
        CASCADE_FORWARDED,
        "counter",
        "kind, from, to",
        "Messages a cascade tier doubted and passed on to the next model (from / to: model names).",
    ),
    (MESSAGES_DEAD_LETTERED, "counter", "reason", "Messages written to the dead-letter topic (acknowledged by Kafka)."),
    (
        MESSAGES_ESCALATED,
        "counter",
        "kind, reason",
        "Messages written to the escalation topic (acknowledged by Kafka); reason: low_confidence or out_of_distribution.",
    ),
    (BATCH_SIZE, "histogram", "model, model_version", "Messages per inference batch."),
    (BATCH_TOKENS, "histogram", "model, model_version", "Padded tokens (rows x longest row) per batch."),
    (BATCH_PADDING_RATIO, "histogram", "model, model_version", "Padded tokens / real tokens per batch (1 = no padding)."),
    (TOKENIZE_SECONDS, "histogram", "model, model_version", "Time to tokenize one message."),
    (INFERENCE_SECONDS, "histogram", "model, model_version", "Time to run one batch through the model."),
    (INSERT_SECONDS, "histogram", "", "Time of one ClickHouse INSERT, retries included."),
    (END_TO_END_SECONDS, "histogram", "kind", "From consuming a message to ClickHouse acknowledging its row."),
    (CLICKHOUSE_ROWS, "counter", "result", "Rows ClickHouse stored (result=inserted) or rejected (result=rejected)."),
    (CLICKHOUSE_RETRIES, "counter", "", "ClickHouse INSERT attempts that failed and were retried."),
    (KAFKA_WRITE_RETRIES, "counter", "", "Dead-letter / escalation writes that failed and were retried."),
    (
        SIDE_RECORDS_CUT,
        "counter",
        "topic",
        "Dead letters / escalation records too large for their topic, written cut (marked truncated, with the original's size and SHA-256).",
    ),
    (
        CONSUMER_LAG,
        "gauge",
        "topic, partition",
        "Messages between the consumer's position and the partition's end (from librdkafka statistics).",
    ),
    (COMMITTED_OFFSET, "gauge", "topic, partition", "Last committed offset."),
    (IN_FLIGHT, "gauge", "", "Messages consumed but not yet done (stored, dead-lettered or escalated)."),
    (
        OLDEST_UNFINISHED,
        "gauge",
        "topic, partition",
        "Age of the partition's oldest unfinished message (0: nothing unfinished, or not assigned here).",
    ),
    (PAUSED, "gauge", "", "1 while consumption is paused because downstream is behind."),
    (MODEL_INFO, "gauge", "model, model_version, provider", "1 for each model version serving. Series of a version a reload replaced leave /metrics once its last batch is done."),
    (SHADOW_DROPPED, "counter", "kind, reason", "Messages a shadow model did not classify or whose answer was not stored: reason `queue_full` (its engine was busy), `sink_behind` (its table's writer was), `failed` (it failed on the message)."),
    (MODEL_RELOADS, "counter", "model, outcome", "Reloads of a model directory: outcome `loaded` or `refused` (the old version kept serving)."),
    (MODEL_RELOAD_FAILURES, "counter", "model", "Reloads refused: a changed model directory that failed a check (the old version kept serving)."),
    (LLM_REQUESTS, "counter", "model, result", "`triage escalate`: chat-completions calls that got a reply (result=reply) or failed after retries (result=error)."),
    (LLM_TOKENS, "counter", "model, type", "`triage escalate`: tokens the LLM counted (type=prompt or completion)."),
    (LLM_REQUEST_SECONDS, "histogram", "model", "`triage escalate`: time of one call that got a reply, retries included."),
    (
        LLM_ERRORS,
        "counter",
        "model, kind",
        "`triage escalate`: failures by kind (rate_limited, server_error, refused, timeout, transport, bad_envelope, invalid_reply).",
    ),
    (
        LLM_SPEND,
        "counter",
        "model",
        "`triage escalate`: spend from the configured prices, in millionths of the price unit (per answer: the cost per million messages).",
    ),
    (LLM_ANSWERS, "counter", "kind, agreed", "`triage escalate`: LLM answers stored; agreed=true when it chose the small model's category."),
    (
        LLM_SKIPPED,
        "counter",
        "reason",
        "`triage escalate`: records settled without a call or a row (reason=already_answered: stored or in flight; too_old: older than llm.skip_older_than_hours).",
    ),
    (LLM_CACHE_HITS, "counter", "model", "`triage escalate`: answers given from the response cache (an identical request answered before): no call, no spend."),
    (LLM_BUDGET_WAITS, "counter", "limit", "`triage escalate`: calls that waited for a limit (requests, tokens, spend)."),
    (READY, "gauge", "", "1 when /readyz answers 200."),
];

pub const MESSAGES_CONSUMED: &str = "triage_messages_consumed_total";
pub const MESSAGES_CLASSIFIED: &str = "triage_messages_classified_total";
pub const CASCADE_FORWARDED: &str = "triage_cascade_forwarded_total";
pub const MESSAGES_DEAD_LETTERED: &str = "triage_messages_dead_lettered_total";
pub const MESSAGES_ESCALATED: &str = "triage_messages_escalated_total";
pub const BATCH_SIZE: &str = "triage_batch_size";
pub const BATCH_TOKENS: &str = "triage_batch_tokens";
pub const BATCH_PADDING_RATIO: &str = "triage_batch_padding_ratio";
pub const TOKENIZE_SECONDS: &str = "triage_tokenize_seconds";
pub const INFERENCE_SECONDS: &str = "triage_inference_seconds";
pub const INSERT_SECONDS: &str = "triage_clickhouse_insert_seconds";
pub const END_TO_END_SECONDS: &str = "triage_end_to_end_seconds";
pub const CLICKHOUSE_ROWS: &str = "triage_clickhouse_rows_total";
pub const CLICKHOUSE_RETRIES: &str = "triage_clickhouse_retries_total";
pub const KAFKA_WRITE_RETRIES: &str = "triage_kafka_write_retries_total";
pub const SIDE_RECORDS_CUT: &str = "triage_side_records_cut_total";
pub const CONSUMER_LAG: &str = "triage_consumer_lag";
pub const COMMITTED_OFFSET: &str = "triage_committed_offset";
pub const IN_FLIGHT: &str = "triage_in_flight_messages";
pub const OLDEST_UNFINISHED: &str = "triage_oldest_unfinished_seconds";
pub const PAUSED: &str = "triage_consumer_paused";
pub const MODEL_INFO: &str = "triage_model_info";
pub const MODEL_RELOADS: &str = "triage_model_reloads_total";
pub const SHADOW_DROPPED: &str = "triage_shadow_dropped_total";
pub const MODEL_RELOAD_FAILURES: &str = "triage_model_reload_failures_total";
pub const READY: &str = "triage_ready";
pub const LLM_REQUESTS: &str = "triage_llm_requests_total";
pub const LLM_TOKENS: &str = "triage_llm_tokens_total";
pub const LLM_REQUEST_SECONDS: &str = "triage_llm_request_seconds";
pub const LLM_ERRORS: &str = "triage_llm_errors_total";
pub const LLM_SPEND: &str = "triage_llm_spend_micros_total";
pub const LLM_ANSWERS: &str = "triage_llm_answers_total";
pub const LLM_SKIPPED: &str = "triage_llm_skipped_total";
pub const LLM_CACHE_HITS: &str = "triage_llm_cache_hits_total";
pub const LLM_BUDGET_WAITS: &str = "triage_llm_budget_waits_total";

const SECONDS_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 48.0, 64.0, 96.0, 128.0, 256.0];
const TOKEN_BUCKETS: &[f64] = &[64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];
const RATIO_BUCKETS: &[f64] = &[1.0, 1.05, 1.1, 1.2, 1.35, 1.5, 2.0, 3.0, 5.0];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics recorder: {0}")]
    Recorder(String),
    #[error("metrics address {address}: {source}")]
    Bind { address: String, source: std::io::Error },
}

/// Install the global Prometheus recorder (once per process) and describe every metric.
pub fn install() -> Result<PrometheusHandle, TelemetryError> {
    static HANDLE: std::sync::OnceLock<Result<PrometheusHandle, String>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), SIZE_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_TOKENS.into()), TOKEN_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_PADDING_RATIO.into()), RATIO_BUCKETS))
                .map_err(|e| e.to_string())?;
            let handle = builder.install_recorder().map_err(|e| e.to_string())?;
            for (name, kind, _, help) in METRICS {
                match *kind {
                    "counter" => metrics::describe_counter!(*name, *help),
                    "gauge" => metrics::describe_gauge!(*name, *help),
                    _ => metrics::describe_histogram!(*name, *help),
                }
            }
            Ok(handle)
        })
        .clone()
        .map_err(TelemetryError::Recorder)
}

/// What /readyz checks: every flag must be up and no partition stalled.
#[derive(Debug, Default)]
pub struct Readiness {
    pub model_loaded: AtomicBool,
    pub kafka_joined: AtomicBool,
    pub clickhouse_reachable: AtomicBool,
    /// Why the worker is stalled, if it is (a partition's oldest unfinished message too old).
    pub stalled: std::sync::Mutex<Option<String>>,
    /// Why the schema registry cannot be read, while it cannot.
    pub schema_registry: std::sync::Mutex<Option<String>>,
    /// The last refused model reload, per model directory: shown, never unready (the old
    /// version keeps serving).
    pub model_reloads: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.model_loaded.load(Ordering::Relaxed)
            && self.kafka_joined.load(Ordering::Relaxed)
            && self.clickhouse_reachable.load(Ordering::Relaxed)
            && self.stalled.lock().map(|s| s.is_none()).unwrap_or(false)
            && self.schema_registry.lock().map(|s| s.is_none()).unwrap_or(false)
    }

    pub fn set_schema_registry(&self, failing: Option<String>) {
        if let Ok(mut s) = self.schema_registry.lock() {
            *s = failing;
        }
    }

    /// A model directory's last reload: Some(why) when it was refused, None when it loaded.
    pub fn set_model_reload(&self, dir: &str, refused: Option<String>) {
        if let Ok(mut reloads) = self.model_reloads.lock() {
            match refused {
                Some(why) => reloads.insert(dir.to_string(), why),
                None => reloads.remove(dir),
            };
        }
    }

    pub fn set_stalled(&self, reason: Option<String>) {
        if let Ok(mut s) = self.stalled.lock() {
            *s = reason;
        }
    }

    fn report(&self) -> String {
        let flag = |b: &AtomicBool| if b.load(Ordering::Relaxed) { "ok" } else { "waiting" };
        let stalled = self.stalled.lock().ok().and_then(|s| s.clone()).unwrap_or_else(|| "no".into());
        let registry = self.schema_registry.lock().ok().and_then(|s| s.clone()).unwrap_or_else(|| "ok".into());
        let reloads = self
            .model_reloads
            .lock()
            .map(|r| {
                r.iter()
                    .map(|(dir, why)| format!("model reload refused: {dir}: {why} (the previous version is serving)\n"))
                    .collect::<String>()
            })
            .unwrap_or_default();
        format!(
            "model: {}\nkafka group: {}\nclickhouse: {}\nstalled: {stalled}\nschema registry: {registry}\n{reloads}",
            flag(&self.model_loaded),
            flag(&self.kafka_joined),
            flag(&self.clickhouse_reachable)
        )
    }
}

/// The response for one request path: (status, content type, body).
pub fn respond(path: &str, handle: &PrometheusHandle, readiness: &Readiness) -> (u16, &'static str, String) {
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            metrics::gauge!(READY).set(if readiness.is_ready() { 1.0 } else { 0.0 });
            (200, "text/plain; version=0.0.4", versions::without_replaced(&handle.render()))
        }
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" if readiness.is_ready() => (200, "text/plain", readiness.report()),
        "/readyz" => (503, "text/plain", readiness.report()),
        _ => (404, "text/plain", "not found: /metrics, /healthz, /readyz\n".into()),
    }
}

/// Bind now (so a bad address fails at start-up), serve until `shutdown`.
pub async fn serve(
    address: &str,
    handle: PrometheusHandle,
    readiness: Arc<Readiness>,
) -> Result<tokio::task::JoinHandle<()>, TelemetryError> {
    let listener = TcpListener::bind(address).await.map_err(|source| TelemetryError::Bind { address: address.to_string(), source })?;
    tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics, /healthz, /readyz");
    Ok(tokio::spawn(async move {
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep.tick() => handle.run_upkeep(),
                accepted = listener.accept() => {
                    let Ok((mut stream, _)) = accepted else { continue };
                    let (handle, readiness) = (handle.clone(), readiness.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 8192];
                        let mut len = 0;
                        // Read the request head only (bounded, with a deadline).
                        let read = tokio::time::timeout(Duration::from_secs(5), async {
                            while len < buf.len() {
                                let n = stream.read(&mut buf[len..]).await?;
                                if n == 0 { break; }
                                len += n;
                                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") { break; }
                            }
                            Ok::<_, std::io::Error>(())
                        }).await;
                        if !matches!(read, Ok(Ok(()))) { return; }
                        let head = String::from_utf8_lossy(&buf[..len]);
                        let mut parts = head.split_whitespace();
                        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                        let (status, content_type, body) = if method == "GET" || method == "HEAD" {
                            respond(path, &handle, &readiness)
                        } else {
                            (405, "text/plain", "GET only\n".to_string())
                        };
                        let reason = match status { 200 => "OK", 404 => "Not Found", 405 => "Method Not Allowed", _ => "Service Unavailable" };
                        let head = format!("HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                        let _ = stream.write_all(head.as_bytes()).await;
                        if method != "HEAD" {
                            let _ = stream.write_all(body.as_bytes()).await;
                        }
                        let _ = stream.shutdown().await;
                    });
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_declared_once_with_a_triage_prefix() {
        let mut names: Vec<&str> = METRICS.iter().map(|m| m.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
        assert!(names.iter().all(|n| n.starts_with("triage_")));
        for (name, kind, _, _) in METRICS {
            assert_eq!(name.ends_with("_total"), *kind == "counter", "{name}: counters and only counters end in _total");
        }
    }

    #[test]
    fn readiness_needs_every_check_and_paths_route() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let r = Readiness::default();
        assert_eq!(respond("/healthz", &handle, &r).0, 200);
        assert_eq!(respond("/readyz", &handle, &r).0, 503);
        r.model_loaded.store(true, Ordering::Relaxed);
        r.kafka_joined.store(true, Ordering::Relaxed);
        assert_eq!(respond("/readyz", &handle, &r).0, 503);
        r.clickhouse_reachable.store(true, Ordering::Relaxed);
        let (status, _, body) = respond("/readyz", &handle, &r);
        assert_eq!((status, body.contains("clickhouse: ok")), (200, true));
        r.set_stalled(Some("tickets/3: oldest unfinished message 700s old (limit 600s)".into()));
        let (status, _, body) = respond("/readyz", &handle, &r);
        assert_eq!((status, body.contains("stalled: tickets/3")), (503, true), "{body}");
        r.set_stalled(None);
        assert_eq!(respond("/readyz", &handle, &r).0, 200);
        assert_eq!(respond("/nope", &handle, &r).0, 404);
        assert_eq!(respond("/metrics?x=1", &handle, &r).0, 200);
    }
}

#[cfg(test)]
mod readme_tests {
    #[test]
    fn the_readme_documents_every_metric() {
        let readme = include_str!("../../README.md");
        for (name, kind, _, _) in super::METRICS {
            assert!(readme.contains(&format!("| `{name}` | {kind} |")), "README lacks {name}");
        }
    }
}
