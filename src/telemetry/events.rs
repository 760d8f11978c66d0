//! Typed internal events. Each event's `emit` updates its metric, writes its log line and
//! counts it in the run report together, so the three can never disagree (the way Vector's
//! `internal_events` do it). Reasons are enums with a fixed label text: a metric label can
//! never take a per-message value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::{
    CASCADE_FORWARDED, CLICKHOUSE_RETRIES, CLICKHOUSE_ROWS, COMMITTED_OFFSET, END_TO_END_SECONDS, INSERT_SECONDS, KAFKA_WRITE_RETRIES,
    LLM_ANSWERS, LLM_BUDGET_WAITS, LLM_CACHE_HITS, LLM_ERRORS, LLM_REQUESTS, LLM_REQUEST_SECONDS, LLM_SKIPPED, LLM_SPEND, LLM_TOKENS,
    MESSAGES_CLASSIFIED, MESSAGES_CONSUMED, MESSAGES_DEAD_LETTERED, MESSAGES_ESCALATED, PAUSED, SIDE_RECORDS_CUT,
};
use crate::message::DecodeReason;

/// Why a message went to the dead-letter topic (the `triage.reason` header and the metric's
/// `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum DeadLetterReason {
    /// The bytes are not a usable message (too large, not UTF-8, not JSON, ...).
    Decode(DecodeReason),
    /// Consumed from a topic no route names.
    Unrouted,
    TokenizeFailed,
    InferenceFailed,
    /// ClickHouse refused the row for its content (isolated by block bisection).
    ClickhouseRejected,
    /// `triage escalate`: the escalation record is not one it can answer (not JSON, no row).
    EscalationInvalid,
    /// `triage escalate`: the LLM endpoint refused this message (400, 413, 422: too long, a
    /// content filter), which retrying cannot change.
    LlmRefused,
    /// `triage escalate`: the LLM's reply was not a valid answer twice (not JSON, an unknown
    /// label); the last reply is in `triage.detail`.
    LlmReplyInvalid,
    /// `triage escalate`: every call for this message timed out or failed with 429/5xx,
    /// `llm.max_attempts_per_message` times, while the endpoint answered other messages.
    LlmTimeout,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode(r) => r.as_str(),
            DeadLetterReason::Unrouted => "unrouted",
            DeadLetterReason::TokenizeFailed => "tokenize_failed",
            DeadLetterReason::InferenceFailed => "inference_failed",
            DeadLetterReason::ClickhouseRejected => "clickhouse_rejected",
            DeadLetterReason::EscalationInvalid => "escalation_invalid",
            DeadLetterReason::LlmRefused => "llm_refused",
            DeadLetterReason::LlmReplyInvalid => "llm_reply_invalid",
            DeadLetterReason::LlmTimeout => "llm_timeout",
        }
    }

    /// An LLM's reply or refusal may quote the message: it goes to the dead letter's header,
    /// never to the log.
    fn detail_may_quote_text(self) -> bool {
        matches!(self, DeadLetterReason::LlmRefused | DeadLetterReason::LlmReplyInvalid)
    }

    /// Faults of the pipeline rather than of the producer's bytes deserve an operator's eye.
    fn is_pipeline_fault(self) -> bool {
        matches!(
            self,
            DeadLetterReason::InferenceFailed
                | DeadLetterReason::TokenizeFailed
                | DeadLetterReason::ClickhouseRejected
                | DeadLetterReason::LlmRefused
                | DeadLetterReason::LlmReplyInvalid
                | DeadLetterReason::LlmTimeout
        )
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a classified message was escalated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EscalationReason {
    /// The deciding head's confidence is under the route's threshold.
    LowConfidence,
    /// The text is unlike the training data (OOD score over the gate).
    OutOfDistribution,
}

impl EscalationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EscalationReason::LowConfidence => "low_confidence",
            EscalationReason::OutOfDistribution => "out_of_distribution",
        }
    }
}

impl std::fmt::Display for EscalationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a run did, counted by the events themselves.
#[derive(Debug, Default)]
pub struct Counters {
    consumed: AtomicU64,
    classified: AtomicU64,
    rows_inserted: AtomicU64,
    rows_rejected: AtomicU64,
    dead_lettered: AtomicU64,
    escalated: AtomicU64,
    insert_retries: AtomicU64,
    kafka_write_retries: AtomicU64,
    forwarded: AtomicU64,
    llm_answered: AtomicU64,
    llm_skipped: AtomicU64,
    llm_cache_hits: AtomicU64,
    llm_prompt_tokens: AtomicU64,
    llm_completion_tokens: AtomicU64,
    llm_spend_micros: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    pub consumed: u64,
    pub classified: u64,
    pub rows_inserted: u64,
    pub rows_rejected: u64,
    pub dead_lettered: u64,
    pub escalated: u64,
    pub insert_retries: u64,
    pub kafka_write_retries: u64,
    /// Messages a cascade tier passed on to the next.
    pub forwarded: u64,
    /// `triage escalate`: answers stored, records skipped (already answered), tokens, spend
    /// in millionths of the price unit.
    pub llm_answered: u64,
    pub llm_skipped: u64,
    pub llm_cache_hits: u64,
    pub llm_prompt_tokens: u64,
    pub llm_completion_tokens: u64,
    pub llm_spend_micros: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            consumed: get(&self.consumed),
            classified: get(&self.classified),
            rows_inserted: get(&self.rows_inserted),
            rows_rejected: get(&self.rows_rejected),
            dead_lettered: get(&self.dead_lettered),
            escalated: get(&self.escalated),
            insert_retries: get(&self.insert_retries),
            kafka_write_retries: get(&self.kafka_write_retries),
            forwarded: get(&self.forwarded),
            llm_answered: get(&self.llm_answered),
            llm_skipped: get(&self.llm_skipped),
            llm_cache_hits: get(&self.llm_cache_hits),
            llm_prompt_tokens: get(&self.llm_prompt_tokens),
            llm_completion_tokens: get(&self.llm_completion_tokens),
            llm_spend_micros: get(&self.llm_spend_micros),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// An event: one call updates the metric, the log and the run report.
pub trait InternalEvent {
    fn emit(self, counters: &Counters);
}

pub struct MessageConsumed<'a> {
    pub topic: &'a str,
}

impl InternalEvent for MessageConsumed<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.consumed, 1);
        metrics::counter!(MESSAGES_CONSUMED, "topic" => self.topic.to_string()).increment(1);
    }
}

pub struct MessageClassified<'a> {
    pub kind: &'a str,
    pub model: &'a str,
    pub version: &'a str,
}

impl InternalEvent for MessageClassified<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.classified, 1);
        metrics::counter!(MESSAGES_CLASSIFIED, "kind" => self.kind.to_string(), "model" => self.model.to_string(), "model_version" => self.version.to_string())
            .increment(1);
    }
}

/// A cascade tier doubted a message and passed it to the next model.
pub struct CascadeForwarded<'a> {
    pub kind: &'a str,
    pub from: &'a str,
    pub to: &'a str,
}

impl InternalEvent for CascadeForwarded<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.forwarded, 1);
        metrics::counter!(CASCADE_FORWARDED, "kind" => self.kind.to_string(), "from" => self.from.to_string(), "to" => self.to.to_string())
            .increment(1);
    }
}

/// A shadow model's copy of a message was dropped: its engine or its table's writer was
/// behind (the shadow never slows the primary), or it failed on the message.
pub struct ShadowDropped<'a> {
    pub kind: &'a str,
    pub reason: &'static str,
}

impl InternalEvent for ShadowDropped<'_> {
    fn emit(self, _counters: &Counters) {
        metrics::counter!(crate::telemetry::SHADOW_DROPPED, "kind" => self.kind.to_string(), "reason" => self.reason).increment(1);
    }
}

/// Kafka acknowledged a dead letter.
pub struct DeadLettered<'a> {
    pub reason: DeadLetterReason,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub detail: &'a str,
}

impl InternalEvent for DeadLettered<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.dead_lettered, 1);
        metrics::counter!(MESSAGES_DEAD_LETTERED, "reason" => self.reason.as_str()).increment(1);
        let detail = if self.reason.detail_may_quote_text() { "(in the dead letter's triage.detail header)" } else { self.detail };
        let (topic, partition, offset, reason) = (self.topic, self.partition, self.offset, self.reason.as_str());
        if self.reason.is_pipeline_fault() {
            tracing::warn!(topic, partition, offset, reason, detail, "message dead-lettered");
        } else {
            tracing::debug!(topic, partition, offset, reason, detail, "message dead-lettered");
        }
    }
}

/// Kafka acknowledged an escalation record.
pub struct Escalated<'a> {
    pub kind: &'a str,
    pub reason: EscalationReason,
}

impl InternalEvent for Escalated<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.escalated, 1);
        metrics::counter!(MESSAGES_ESCALATED, "kind" => self.kind.to_string(), "reason" => self.reason.as_str()).increment(1);
        tracing::debug!(kind = self.kind, reason = self.reason.as_str(), "message escalated");
    }
}

pub struct KafkaWriteRetried<'a> {
    pub topic: &'a str,
    pub attempt: u32,
    pub error: &'a dyn std::fmt::Display,
    pub delay: Duration,
}

impl InternalEvent for KafkaWriteRetried<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.kafka_write_retries, 1);
        metrics::counter!(KAFKA_WRITE_RETRIES).increment(1);
        tracing::warn!(topic = self.topic, error = %self.error, attempt = self.attempt, retry_in_ms = self.delay.as_millis() as u64, "Kafka write failed; retrying");
    }
}

/// A dead letter or escalation record too large for its topic was cut to fit.
pub struct SideRecordCut<'a> {
    pub topic: &'a str,
    pub original_bytes: usize,
    pub written_bytes: usize,
}

impl InternalEvent for SideRecordCut<'_> {
    fn emit(self, _: &Counters) {
        metrics::counter!(SIDE_RECORDS_CUT, "topic" => self.topic.to_string()).increment(1);
        tracing::warn!(
            topic = self.topic,
            original_bytes = self.original_bytes,
            written_bytes = self.written_bytes,
            "record too large for its topic: written cut, marked as truncated"
        );
    }
}

pub struct InsertRetried<'a> {
    pub rows: usize,
    pub attempt: u32,
    pub error: &'a dyn std::fmt::Display,
    pub delay: Duration,
}

impl InternalEvent for InsertRetried<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.insert_retries, 1);
        metrics::counter!(CLICKHOUSE_RETRIES).increment(1);
        tracing::warn!(error = %self.error, attempt = self.attempt, retry_in_ms = self.delay.as_millis() as u64, rows = self.rows, "ClickHouse insert failed; retrying");
    }
}

/// One INSERT (retries included) finished with every row stored.
pub struct BlockInserted {
    pub rows: usize,
    pub elapsed: Duration,
}

impl InternalEvent for BlockInserted {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.rows_inserted, self.rows as u64);
        metrics::histogram!(INSERT_SECONDS).record(self.elapsed.as_secs_f64());
        metrics::counter!(CLICKHOUSE_ROWS, "result" => "inserted").increment(self.rows as u64);
    }
}

/// ClickHouse refused a block for its content: it is split to isolate the rows at fault.
pub struct BlockSplit<'a> {
    pub rows: usize,
    pub error: &'a str,
}

impl InternalEvent for BlockSplit<'_> {
    fn emit(self, _: &Counters) {
        tracing::warn!(rows = self.rows, error = self.error, "ClickHouse rejected a block; splitting it to find the rows");
    }
}

/// Rows isolated as rejected for their content (their messages are dead-lettered).
pub struct RowsRejected {
    pub rows: usize,
}

impl InternalEvent for RowsRejected {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.rows_rejected, self.rows as u64);
        metrics::counter!(CLICKHOUSE_ROWS, "result" => "rejected").increment(self.rows as u64);
    }
}

/// A row is safely in ClickHouse: its message's wait from consumption ends here.
pub struct RowStored<'a> {
    pub kind: &'a str,
    pub waited: Duration,
}

impl InternalEvent for RowStored<'_> {
    fn emit(self, _: &Counters) {
        metrics::histogram!(END_TO_END_SECONDS, "kind" => self.kind.to_string()).record(self.waited.as_secs_f64());
    }
}

/// `held`: the messages consumed and not yet settled (the worker: not yet committed).
pub struct ConsumptionPaused {
    pub held: usize,
}

impl InternalEvent for ConsumptionPaused {
    fn emit(self, _: &Counters) {
        metrics::gauge!(PAUSED).set(1.0);
        tracing::warn!(held = self.held, "downstream is behind: pausing consumption");
    }
}

pub struct ConsumptionResumed {
    pub held: usize,
}

impl InternalEvent for ConsumptionResumed {
    fn emit(self, _: &Counters) {
        metrics::gauge!(PAUSED).set(0.0);
        tracing::info!(held = self.held, "caught up: resuming consumption");
    }
}

pub struct OffsetCommitted<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl InternalEvent for OffsetCommitted<'_> {
    fn emit(self, _: &Counters) {
        metrics::gauge!(COMMITTED_OFFSET, "topic" => self.topic.to_string(), "partition" => self.partition.to_string())
            .set(self.offset as f64);
    }
}

/// One chat-completions call finished with a reply (valid or not).
pub struct LlmCalled<'a> {
    pub model: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency: Duration,
    /// In millionths of the configured price unit.
    pub cost_micros: u64,
}

impl InternalEvent for LlmCalled<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.llm_prompt_tokens, self.prompt_tokens);
        Counters::add(&counters.llm_completion_tokens, self.completion_tokens);
        Counters::add(&counters.llm_spend_micros, self.cost_micros);
        let model = self.model.to_string();
        metrics::counter!(LLM_REQUESTS, "model" => model.clone(), "result" => "reply").increment(1);
        metrics::counter!(LLM_TOKENS, "model" => model.clone(), "type" => "prompt").increment(self.prompt_tokens);
        metrics::counter!(LLM_TOKENS, "model" => model.clone(), "type" => "completion").increment(self.completion_tokens);
        metrics::counter!(LLM_SPEND, "model" => model.clone()).increment(self.cost_micros);
        metrics::histogram!(LLM_REQUEST_SECONDS, "model" => model).record(self.latency.as_secs_f64());
    }
}

/// A call (after the client's own retries) or a reply failed; `kind`: rate_limited,
/// server_error, refused, timeout, transport, bad_envelope, invalid_reply.
pub struct LlmCallFailed<'a> {
    pub model: &'a str,
    pub kind: &'static str,
}

impl InternalEvent for LlmCallFailed<'_> {
    fn emit(self, _: &Counters) {
        metrics::counter!(LLM_ERRORS, "model" => self.model.to_string(), "kind" => self.kind).increment(1);
        if self.kind != "invalid_reply" {
            metrics::counter!(LLM_REQUESTS, "model" => self.model.to_string(), "result" => "error").increment(1);
        }
    }
}

/// An LLM answer was stored as the message's row.
pub struct LlmAnswered<'a> {
    pub kind: &'a str,
    /// Whether the LLM chose the small model's category.
    pub agreed: bool,
}

impl InternalEvent for LlmAnswered<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.llm_answered, 1);
        metrics::counter!(LLM_ANSWERS, "kind" => self.kind.to_string(), "agreed" => if self.agreed { "true" } else { "false" })
            .increment(1);
    }
}

/// An escalation record needed no call: its message is already answered (stored, or in
/// flight here under an earlier record).
pub struct LlmSkipped {
    pub reason: &'static str,
}

impl InternalEvent for LlmSkipped {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.llm_skipped, 1);
        metrics::counter!(LLM_SKIPPED, "reason" => self.reason).increment(1);
    }
}

/// An escalation answered from the response cache: the same request was answered before.
pub struct LlmCacheHit<'a> {
    pub model: &'a str,
}

impl InternalEvent for LlmCacheHit<'_> {
    fn emit(self, counters: &Counters) {
        Counters::add(&counters.llm_cache_hits, 1);
        metrics::counter!(LLM_CACHE_HITS, "model" => self.model.to_string()).increment(1);
    }
}

/// A call waited for a limit: `limit` is requests, tokens or spend.
pub struct LlmBudgetWaited {
    pub limit: &'static str,
    pub wait: Duration,
}

impl InternalEvent for LlmBudgetWaited {
    fn emit(self, _: &Counters) {
        metrics::counter!(LLM_BUDGET_WAITS, "limit" => self.limit).increment(1);
        // Once a minute at most: every waiting call re-checks every few seconds.
        static LAST_WARNED_S: AtomicU64 = AtomicU64::new(0);
        let now_s = crate::time::now_ms() / 1000;
        if self.limit == "spend" && now_s >= LAST_WARNED_S.load(Ordering::Relaxed) + 60 {
            LAST_WARNED_S.store(now_s, Ordering::Relaxed);
            tracing::warn!(wait_s = self.wait.as_secs(), "the hourly LLM spend cap is reached: calls wait (nothing is dropped)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_keep_the_label_texts_dashboards_and_alerts_use() {
        assert_eq!(DeadLetterReason::Decode(DecodeReason::NotJson).as_str(), "not_json");
        assert_eq!(DeadLetterReason::ClickhouseRejected.as_str(), "clickhouse_rejected");
        assert_eq!(DeadLetterReason::InferenceFailed.as_str(), "inference_failed");
        assert_eq!(DeadLetterReason::Unrouted.as_str(), "unrouted");
        assert_eq!(EscalationReason::OutOfDistribution.as_str(), "out_of_distribution");
        assert_eq!(serde_json::to_string(&EscalationReason::LowConfidence).unwrap(), "\"low_confidence\"");
    }

    #[test]
    fn one_emit_counts_in_the_report_and_the_metric() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counters = Counters::default();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                DeadLettered { reason: DeadLetterReason::Decode(DecodeReason::NotJson), topic: "t", partition: 0, offset: 1, detail: "x" }
                    .emit(&counters);
            }
            InsertRetried { rows: 10, attempt: 1, error: &"boom", delay: Duration::from_millis(5) }.emit(&counters);
            BlockInserted { rows: 7, elapsed: Duration::from_millis(3) }.emit(&counters);
        });
        let s = counters.snapshot();
        assert_eq!((s.dead_lettered, s.insert_retries, s.rows_inserted), (3, 1, 7));
        let text = handle.render();
        assert!(text.contains("triage_messages_dead_lettered_total{reason=\"not_json\"} 3"), "{text}");
        assert!(text.contains("triage_clickhouse_retries_total 1"), "{text}");
        assert!(text.contains("triage_clickhouse_rows_total{result=\"inserted\"} 7"), "{text}");
    }
}
