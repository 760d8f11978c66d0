//! `[llm]`: where `triage escalate` asks, and what it may spend. Only `triage escalate` needs
//! it; `triage run` ignores it. Every field reads the environment too (`TRIAGE_LLM__URL`, ...).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::budget::Limits;
use super::client::{ChatSettings, KeyHeader};
use super::prompt::{RequestOptions, StructuredOutput, TokenLimitField};
use crate::retry::Backoff;
use crate::secret::Secret;

/// How calls are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmMode {
    /// One chat-completions call per record.
    #[default]
    Realtime,
    /// Requests collected into OpenAI Batch API batches (half price, answers within the
    /// completion window).
    Batch,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// `realtime` (a call per record) or `batch` (the OpenAI Batch API: `/files` and
    /// `/batches` under `url`).
    pub mode: LlmMode,
    /// Batch mode: most requests in one batch (the Batch API takes up to 50,000). Records wait
    /// unfinished until their batch ends, so `max_in_flight` should be at least this.
    pub batch_max_requests: usize,
    /// Batch mode: a batch is submitted this long after its first request at the latest.
    pub batch_max_wait_ms: u64,
    /// Batch mode: how often a submitted batch is asked about.
    pub batch_poll_interval_ms: u64,
    /// Batch mode: the Batch API's `completion_window`.
    pub batch_completion_window: String,
    /// The OpenAI-compatible server: its base URL (`http://vllm:8000/v1`) or the full
    /// `.../chat/completions` URL.
    pub url: String,
    /// The model name the server knows (`gpt-4o-mini`, `Qwen/Qwen2.5-7B-Instruct`, ...).
    pub model: String,
    /// The API key (prefer `api_key_file`); sent as `Authorization: Bearer`.
    pub api_key: Secret,
    /// A file holding the API key (a mounted Kubernetes Secret).
    pub api_key_file: Option<PathBuf>,
    /// The header the key goes in: `authorization` (`Bearer <key>`: OpenAI, vLLM, LiteLLM) or
    /// `api-key` (Azure OpenAI, with a url like
    /// `https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT?api-version=2024-06-01`).
    pub api_key_header: KeyHeader,
    /// Extra CA certificates (PEM) to trust besides the system's (a private endpoint).
    pub ca_file: Option<PathBuf>,
    /// Send the key over plain `http://` to a host that is not this machine. Off: the key
    /// would cross the network readable; turn on only inside a network you trust (a
    /// cluster-internal LiteLLM proxy).
    pub allow_key_over_http: bool,
    /// How the server is told to answer only with known labels: `json_schema` (OpenAI, Azure
    /// OpenAI, vLLM), `json_object` (llama-cpp-python's server), `none` (reply parsed and checked).
    pub structured_output: StructuredOutput,
    /// Deadline of one HTTP call (milliseconds).
    pub timeout_ms: u64,
    /// Retries of one call on 429 / 5xx / timeouts (honouring Retry-After), after the first try.
    pub retries: u32,
    pub max_concurrent_requests: usize,
    /// Longest reply (tokens).
    pub max_tokens: u32,
    /// The field `max_tokens` is sent in: `max_tokens`, or `max_completion_tokens` (OpenAI's
    /// o-series and gpt-5 models refuse `max_tokens`).
    pub token_limit_field: TokenLimitField,
    /// Sampling temperature (0: the same message gets the same answer). `send_temperature =
    /// false` leaves it out, for models that refuse it (OpenAI's reasoning models).
    pub temperature: f64,
    pub send_temperature: bool,
    /// Sent as `seed` when set (OpenAI, vLLM: repeatable sampling).
    pub seed: Option<u64>,
    /// Sent as `reasoning_effort` when set (`minimal`, `low`, `medium`, `high` on OpenAI's
    /// reasoning models): less effort, fewer billed reasoning tokens.
    pub reasoning_effort: Option<String>,
    /// Fields added to every request as they are (vLLM's `top_k` or `chat_template_kwargs`, a
    /// proxy's options): `extra_body = { top_k = 1 }`. Cannot replace `model` or `messages`.
    pub extra_body: serde_json::Map<String, serde_json::Value>,
    /// What the model should know about the messages, in every route's system prompt (a
    /// route's `llm_instructions` follow it).
    pub instructions: String,
    /// Few-shot examples shown per label, from the model directory's `few_shot.jsonl`
    /// (written by `triage train`); 0 sends none. Each example is prompt tokens on every call.
    pub examples_per_label: usize,
    /// Answers remembered by their exact request (identical messages are common: "where is
    /// my card?"): a repeat is answered from memory, with no call and no spend. 0: off.
    pub cache_entries: usize,
    /// Start from now: records escalated more than this many hours ago are skipped, settled
    /// and counted (`triage_llm_skipped_total{reason="too_old"}`), not sent. For a first
    /// deployment over a backlog; the small model's rows stay as they are.
    pub skip_older_than_hours: Option<f64>,
    /// The message text sent is cut to this many characters (the model's context, less the
    /// prompt; a cut text is still answered).
    pub max_text_chars: usize,
    /// Escalation records consumed but not yet answered before consumption pauses.
    pub max_in_flight: usize,
    /// The consumer group of `triage escalate` (apart from the workers').
    pub group_id: String,
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// The provider's prices per million tokens (0 for a self-hosted server).
    pub prompt_price_per_million: f64,
    pub completion_price_per_million: f64,
    /// The price of prompt tokens the provider served from its prompt cache (`usage.
    /// prompt_tokens_details.cached_tokens`; OpenAI bills them at a discount). Unset: the
    /// prompt price.
    pub cached_prompt_price_per_million: Option<f64>,
    /// Hard cap: no call starts while the last hour's spend is at or above it (consumption
    /// waits; nothing is dropped).
    pub max_spend_per_hour: Option<f64>,
    /// This many refusals in a row (4xx naming no request parameter), of different messages
    /// and with no answer between, mean the endpoint refuses every call: the command stops
    /// instead of dead-lettering the rest of the topic.
    pub max_consecutive_refusals: usize,
    /// A refused record waits this long (milliseconds) for an answer to another message before
    /// it is dead-lettered, so that the records of a streak that stops the command stay
    /// uncommitted (none are dead-lettered). 0: dead-letter at once.
    pub refusal_hold_ms: u64,
    /// A message whose calls keep failing (timeouts, 429, 5xx: each attempt is one call with
    /// its `retries`) while the endpoint answers other messages is dead-lettered
    /// (`llm_timeout`) after this many attempts. While the endpoint answers nothing, records
    /// wait however long it takes.
    pub max_attempts_per_message: u32,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            mode: LlmMode::Realtime,
            batch_max_requests: 1_000,
            batch_max_wait_ms: 60_000,
            batch_poll_interval_ms: 30_000,
            batch_completion_window: "24h".into(),
            url: String::new(),
            model: String::new(),
            api_key: Secret::default(),
            api_key_file: None,
            api_key_header: KeyHeader::Authorization,
            ca_file: None,
            allow_key_over_http: false,
            structured_output: StructuredOutput::JsonSchema,
            timeout_ms: 60_000,
            retries: 3,
            max_concurrent_requests: 4,
            max_consecutive_refusals: 5,
            refusal_hold_ms: 30_000,
            max_attempts_per_message: 3,
            max_tokens: 256,
            token_limit_field: TokenLimitField::MaxTokens,
            temperature: 0.0,
            send_temperature: true,
            seed: None,
            reasoning_effort: None,
            extra_body: serde_json::Map::new(),
            instructions: String::new(),
            examples_per_label: 1,
            cache_entries: 10_000,
            skip_older_than_hours: None,
            max_text_chars: 16_000,
            max_in_flight: 64,
            group_id: "triage-escalate".into(),
            requests_per_minute: None,
            tokens_per_minute: None,
            prompt_price_per_million: 0.0,
            completion_price_per_million: 0.0,
            cached_prompt_price_per_million: None,
            max_spend_per_hour: None,
        }
    }
}

impl LlmConfig {
    pub fn limits(&self) -> Limits {
        Limits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            prompt_price_per_million: self.prompt_price_per_million,
            completion_price_per_million: self.completion_price_per_million,
            max_spend_per_hour: self.max_spend_per_hour,
            cached_prompt_price_per_million: self.cached_prompt_price_per_million,
        }
    }

    /// What every request carries besides the messages.
    pub fn request_options(&self) -> RequestOptions {
        RequestOptions {
            model: self.model.clone(),
            dialect: self.structured_output,
            max_tokens: self.max_tokens,
            token_limit_field: self.token_limit_field,
            temperature: Some(self.temperature).filter(|_| self.send_temperature),
            seed: self.seed,
            reasoning_effort: self.reasoning_effort.clone(),
            extra_body: self.extra_body.clone(),
        }
    }

    pub fn batch_settings(&self) -> super::batch::BatchSettings {
        super::batch::BatchSettings {
            max_requests: self.batch_max_requests,
            max_wait: Duration::from_millis(self.batch_max_wait_ms),
            poll_interval: Duration::from_millis(self.batch_poll_interval_ms),
            completion_window: self.batch_completion_window.clone(),
        }
    }

    /// Records escalated before this (ms since the epoch) are skipped, if a limit is set.
    pub fn skip_before_ms(&self, now_ms: u64) -> Option<i64> {
        self.skip_older_than_hours.map(|h| now_ms as i64 - (h * 3_600_000.0) as i64)
    }

    pub fn chat_settings(&self) -> ChatSettings {
        ChatSettings {
            url: self.url.clone(),
            api_key: Some(self.api_key.clone()).filter(|k| !k.expose().is_empty()),
            timeout: Duration::from_millis(self.timeout_ms),
            retries: self.retries,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            key_header: self.api_key_header,
            ca_file: self.ca_file.clone(),
        }
    }

    /// What `triage escalate` needs (checked when it starts, not by `triage run`).
    pub fn validate(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err("llm.url is empty: name the OpenAI-compatible server (e.g. http://vllm:8000/v1)".into());
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("llm.url `{}` must start with http:// or https://", self.url));
        }
        if !self.api_key.expose().is_empty() && self.url.starts_with("http://") && !self.allow_key_over_http && !is_loopback(&self.url) {
            return Err(format!(
                "llm.url `{}` is plain http:// and an API key is set: the key would cross the network readable. Use https:// (llm.ca_file for a private CA), or set llm.allow_key_over_http = true inside a network you trust",
                self.url
            ));
        }
        if self.model.trim().is_empty() {
            return Err("llm.model is empty: name the model the server serves".into());
        }
        if self.timeout_ms == 0
            || self.max_concurrent_requests == 0
            || self.max_tokens == 0
            || self.max_in_flight == 0
            || self.max_text_chars == 0
            || self.max_consecutive_refusals == 0
            || self.max_attempts_per_message == 0
        {
            return Err("llm: timeout_ms, max_concurrent_requests, max_tokens, max_text_chars, max_in_flight, max_consecutive_refusals and max_attempts_per_message must be at least 1".into());
        }
        if self.group_id.trim().is_empty() {
            return Err("llm.group_id is empty".into());
        }
        if let Some(field) = ["model", "messages"].iter().find(|f| self.extra_body.contains_key(**f)) {
            return Err(format!("llm.extra_body cannot set `{field}`: use llm.model, and the prompt is the command's own"));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err("llm.temperature must be a number >= 0".into());
        }
        if self.reasoning_effort.as_deref().is_some_and(|e| e.trim().is_empty()) {
            return Err("llm.reasoning_effort is empty: leave it out, or name one (low, medium, high)".into());
        }
        if self.mode == LlmMode::Batch {
            if !(1..=50_000).contains(&self.batch_max_requests) || self.batch_max_wait_ms == 0 || self.batch_poll_interval_ms == 0 {
                return Err("llm: batch_max_requests must be 1 to 50000, batch_max_wait_ms and batch_poll_interval_ms at least 1".into());
            }
            if self.batch_completion_window.trim().is_empty() {
                return Err("llm.batch_completion_window is empty (the Batch API takes \"24h\")".into());
            }
        }
        if self.skip_older_than_hours.is_some_and(|h| !h.is_finite() || h <= 0.0) {
            return Err("llm.skip_older_than_hours must be above 0 (leave it out to answer every record)".into());
        }
        self.limits().validate()
    }
}

/// Whether an http:// URL's host is this machine.
fn is_loopback(url: &str) -> bool {
    let rest = url.trim_start_matches("http://");
    let host_port = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_escalate_cannot_work_without_is_named() {
        let ok = LlmConfig { url: "http://127.0.0.1:8080/v1".into(), model: "tiny".into(), ..LlmConfig::default() };
        assert!(ok.validate().is_ok());
        assert!(LlmConfig::default().validate().unwrap_err().contains("llm.url"));
        assert!(LlmConfig { model: String::new(), ..ok.clone() }.validate().unwrap_err().contains("llm.model"));
        assert!(LlmConfig { url: "vllm:8000".into(), ..ok.clone() }.validate().unwrap_err().contains("http://"));
        assert!(LlmConfig { max_concurrent_requests: 0, ..ok.clone() }.validate().is_err());
        let body = |v: serde_json::Value| v.as_object().unwrap().clone();
        let renamed = LlmConfig { extra_body: body(serde_json::json!({"model": "x"})), ..ok.clone() };
        assert!(renamed.validate().unwrap_err().contains("`model`"));
        assert!(LlmConfig { extra_body: body(serde_json::json!({"top_k": 1})), ..ok.clone() }.validate().is_ok());
        assert!(LlmConfig { skip_older_than_hours: Some(0.0), ..ok.clone() }.validate().unwrap_err().contains("skip_older_than_hours"));
        assert!(LlmConfig { reasoning_effort: Some(" ".into()), ..ok.clone() }.validate().is_err());
        assert!(LlmConfig { temperature: f64::NAN, ..ok.clone() }.validate().is_err());
        let reasoning = LlmConfig { send_temperature: false, ..ok.clone() }.request_options();
        assert_eq!(reasoning.temperature, None, "left out for models that refuse it");
        let hours = LlmConfig { skip_older_than_hours: Some(2.0), ..ok.clone() };
        assert_eq!(hours.skip_before_ms(10_000_000), Some(10_000_000 - 7_200_000));
        assert_eq!(ok.skip_before_ms(10_000_000), None);
        let capped = LlmConfig { max_spend_per_hour: Some(5.0), ..ok.clone() };
        assert!(capped.validate().unwrap_err().contains("price"), "a cap needs prices");
        assert!(ok.chat_settings().api_key.is_none(), "no key: no Authorization header");
        let key = crate::secret::Secret::new("sk-live");
        let remote = LlmConfig { url: "http://llm.internal:4000/v1".into(), api_key: key.clone(), ..ok.clone() };
        assert!(remote.validate().unwrap_err().contains("allow_key_over_http"), "a key over plain http to another host");
        assert!(LlmConfig { allow_key_over_http: true, ..remote.clone() }.validate().is_ok());
        assert!(LlmConfig { url: "https://llm.internal/v1".into(), ..remote.clone() }.validate().is_ok());
        for local in ["http://127.0.0.1:8080/v1", "http://localhost:8080/v1", "http://[::1]:8080/v1"] {
            assert!(LlmConfig { url: local.into(), ..remote.clone() }.validate().is_ok(), "{local}");
        }
    }
}
