//! One OpenAI-compatible chat-completions call (what vLLM, llama.cpp's server, Ollama, TGI,
//! OpenAI and Azure OpenAI serve), with the retries a team paying per token expects: 429 and
//! 5xx and timeouts are retried with backoff, honouring `Retry-After`; other 4xx are not (a
//! bad key or a refused request stays refused); every call has a deadline. The message text is
//! never logged: errors carry the server's reply, cut short. The key goes in a header marked
//! sensitive (`Authorization: Bearer`, or Azure OpenAI's `api-key`), never in a log line.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::retry::Backoff;
use crate::secret::Secret;

/// Longest wait a `Retry-After` can ask for before a retry (longer ones are capped).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Largest reply body read: a chat completion of a few hundred tokens is a few kB; a body past
/// this is a misbehaving endpoint, refused rather than held in memory.
pub const MAX_REPLY_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatError {
    /// A status that retrying cannot change (400, 401, 403, 404, 422, ...), or a retryable one
    /// still failing after every retry.
    #[error("the LLM endpoint answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the LLM endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the LLM endpoint cannot be reached: {0}")]
    Transport(String),
    /// 200, but not a chat completion (no choices[0].message.content).
    #[error("the LLM endpoint's reply is not a chat completion: {0}")]
    Envelope(String),
}

impl ChatError {
    /// Worth another attempt later (rate limits, server errors, timeouts, connection trouble).
    pub fn is_retryable(&self) -> bool {
        match self {
            ChatError::Status { status, .. } => *status == 429 || *status >= 500,
            ChatError::Timeout(_) | ChatError::Transport(_) => true,
            ChatError::Envelope(_) => false,
        }
    }

    /// A label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ChatError::Status { status: 429, .. } => "rate_limited",
            ChatError::Status { status, .. } if *status >= 500 => "server_error",
            ChatError::Status { .. } => "refused",
            ChatError::Timeout(_) => "timeout",
            ChatError::Transport(_) => "transport",
            ChatError::Envelope(_) => "bad_envelope",
        }
    }
}

/// A completed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of the prompt tokens, those the provider served from its prompt cache
    /// (`usage.prompt_tokens_details.cached_tokens`; 0 when not said).
    pub cached_prompt_tokens: u64,
    /// Of the successful attempt.
    pub latency: Duration,
    /// Attempts it took (1: no retry).
    pub attempts: u32,
    /// Whether the reply said what it used (`usage`); without it the tokens above are 0 and
    /// the budget counts the call's estimate.
    pub usage_reported: bool,
}

/// A call that failed, after how many HTTP attempts (each one a request the provider counts).
#[derive(Debug)]
pub struct Failed {
    pub error: ChatError,
    pub attempts: u32,
}

#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// The server's base URL (`http://host:8000/v1`) or the full `.../chat/completions` URL.
    pub url: String,
    pub api_key: Option<Secret>,
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    pub backoff: Backoff,
    /// Which header carries the key.
    pub key_header: KeyHeader,
    /// Extra CA certificates (PEM) trusted besides the system's: a private endpoint.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Where the API key goes: `Authorization: Bearer <key>` (OpenAI, vLLM, LiteLLM, ...) or
/// `api-key: <key>` (Azure OpenAI).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyHeader {
    #[default]
    Authorization,
    ApiKey,
}

pub struct ChatClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: Uri,
    settings: ChatSettings,
}

impl ChatClient {
    pub fn new(settings: ChatSettings) -> Result<Self, ChatError> {
        let full = completions_url(&settings.url);
        let uri: Uri = full.parse().map_err(|e| ChatError::Transport(format!("`{full}` is not a URL: {e}")))?;
        let connector =
            crate::http::https_connector(settings.ca_file.as_deref(), settings.timeout).map_err(|e| ChatError::Transport(e.to_string()))?;
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(ChatClient { http, uri, settings })
    }

    /// The key's header, marked sensitive (kept out of debug output and HTTP/2 header tables).
    fn key_header(&self) -> Option<(HeaderName, HeaderValue)> {
        let key = self.settings.api_key.as_ref()?;
        let (name, value) = match self.settings.key_header {
            KeyHeader::Authorization => (AUTHORIZATION, format!("Bearer {}", key.expose())),
            KeyHeader::ApiKey => (HeaderName::from_static("api-key"), key.expose().to_string()),
        };
        let mut value = HeaderValue::from_str(&value).ok()?;
        value.set_sensitive(true);
        Some((name, value))
    }

    /// POST `body` (a chat-completions request), retrying what may succeed later.
    pub async fn complete(&self, body: &Value) -> Result<Completion, ChatError> {
        self.complete_counted(body).await.map_err(|f| f.error)
    }

    /// [`complete`](Self::complete), saying how many attempts a failure took.
    pub async fn complete_counted(&self, body: &Value) -> Result<Completion, Failed> {
        let bytes = Bytes::from(serde_json::to_vec(body).map_err(|e| Failed { error: ChatError::Envelope(e.to_string()), attempts: 0 })?);
        let (reply, attempts, latency) =
            self.send_with_retries(Method::POST, &self.uri, "application/json", bytes, MAX_REPLY_BYTES).await?;
        let reply: Value = serde_json::from_slice(&reply)
            .map_err(|e| Failed { error: ChatError::Envelope(format!("{e}: {}", cut(&String::from_utf8_lossy(&reply), 200))), attempts })?;
        let mut completion = completion_of(&reply).map_err(|error| Failed { error, attempts })?;
        completion.latency = latency;
        completion.attempts = attempts;
        Ok(completion)
    }

    /// One request with the call's retries (429, 5xx, timeouts, honouring Retry-After): the
    /// 200 reply's body (at most `limit` bytes), the attempts, the successful one's latency.
    async fn send_with_retries(
        &self,
        method: Method,
        uri: &Uri,
        content_type: &str,
        body: Bytes,
        limit: usize,
    ) -> Result<(Bytes, u32, Duration), Failed> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let start = Instant::now();
            let result =
                tokio::time::timeout(self.settings.timeout, self.send(method.clone(), uri, content_type, body.clone(), limit)).await;
            let (error, retry_after) = match result {
                Ok(Ok(reply)) => return Ok((reply, attempt, start.elapsed())),
                Ok(Err((error, retry_after))) => (error, retry_after),
                Err(_) => (ChatError::Timeout(self.settings.timeout), None),
            };
            if !error.is_retryable() || attempt > self.settings.retries {
                return Err(Failed { error, attempts: attempt });
            }
            let wait = retry_after.map_or_else(|| self.settings.backoff.delay(attempt - 1), |d| d.min(MAX_RETRY_AFTER));
            tracing::warn!(attempt, kind = error.kind(), wait_ms = wait.as_millis() as u64, "LLM call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn send(
        &self,
        method: Method,
        uri: &Uri,
        content_type: &str,
        body: Bytes,
        limit: usize,
    ) -> Result<Bytes, (ChatError, Option<Duration>)> {
        let mut request = Request::builder().method(method).uri(uri.clone());
        if !body.is_empty() {
            request = request.header(CONTENT_TYPE, content_type);
        }
        if let Some((name, value)) = self.key_header() {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(body)).map_err(|e| (ChatError::Transport(e.to_string()), None))?;
        let response = self.http.request(request).await.map_err(|e| (ChatError::Transport(e.to_string()), None))?;
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let body = match http_body_util::Limited::new(response.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err((ChatError::Envelope(format!("the reply is larger than {limit} bytes")), None))
            }
            Err(e) => return Err((ChatError::Transport(e.to_string()), None)),
        };
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            return Err((ChatError::Status { status: status.as_u16(), body: cut(&text, 300) }, retry_after));
        }
        Ok(body)
    }

    /// `<base>/<path>` of the server's API (`files`, `batches/ID`), the base being the
    /// configured URL without `/chat/completions`.
    fn api_uri(&self, path: &str) -> Result<Uri, ChatError> {
        let (base, query) = match self.settings.url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (self.settings.url.as_str(), None),
        };
        let base = base.trim_end_matches('/').trim_end_matches("/chat/completions");
        let full = match query {
            Some(q) => format!("{base}/{path}?{q}"),
            None => format!("{base}/{path}"),
        };
        full.parse().map_err(|e| ChatError::Transport(format!("`{full}` is not a URL: {e}")))
    }

    async fn json_call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, ChatError> {
        let uri = self.api_uri(path)?;
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let (reply, _, _) = self.send_with_retries(method, &uri, "application/json", bytes, MAX_REPLY_BYTES).await.map_err(|f| f.error)?;
        serde_json::from_slice(&reply).map_err(|e| ChatError::Envelope(format!("{e}: {}", cut(&String::from_utf8_lossy(&reply), 200))))
    }

    /// OpenAI Batch API: upload a JSONL of requests (`purpose=batch`); its file id.
    pub async fn upload_batch_file(&self, jsonl: Vec<u8>) -> Result<String, ChatError> {
        let boundary = format!("triage-{:016x}", crate::time::now_ms() ^ 0x5eed_cafe);
        let mut body = Vec::with_capacity(jsonl.len() + 512);
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"triage-batch.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(&jsonl);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let uri = self.api_uri("files")?;
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let (reply, _, _) =
            self.send_with_retries(Method::POST, &uri, &content_type, Bytes::from(body), MAX_REPLY_BYTES).await.map_err(|f| f.error)?;
        let reply: Value = serde_json::from_slice(&reply).map_err(|e| ChatError::Envelope(e.to_string()))?;
        reply["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ChatError::Envelope(format!("no file id in {}", cut(&reply.to_string(), 200))))
    }

    /// OpenAI Batch API: start a batch of chat completions over an uploaded file.
    pub async fn create_batch(&self, input_file_id: &str, completion_window: &str) -> Result<BatchState, ChatError> {
        let body =
            serde_json::json!({"input_file_id": input_file_id, "endpoint": "/v1/chat/completions", "completion_window": completion_window});
        BatchState::of(&self.json_call(Method::POST, "batches", Some(&body)).await?)
    }

    /// OpenAI Batch API: where a batch is.
    pub async fn batch_state(&self, batch_id: &str) -> Result<BatchState, ChatError> {
        BatchState::of(&self.json_call(Method::GET, &format!("batches/{batch_id}"), None).await?)
    }

    /// A file's content (a batch's output or errors), up to `MAX_BATCH_FILE_BYTES`.
    pub async fn file_content(&self, file_id: &str) -> Result<Bytes, ChatError> {
        let uri = self.api_uri(&format!("files/{file_id}/content"))?;
        let (reply, _, _) = self.send_with_retries(Method::GET, &uri, "", Bytes::new(), MAX_BATCH_FILE_BYTES).await.map_err(|f| f.error)?;
        Ok(reply)
    }
}

/// Largest batch output file read (a line per request, a few kB each).
pub const MAX_BATCH_FILE_BYTES: usize = 512 << 20;

/// A batch as the Batch API describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchState {
    pub id: String,
    /// validating, in_progress, finalizing, completed, failed, expired, cancelling, cancelled.
    pub status: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// A failed batch's reasons (`errors.data[].message`).
    pub errors: String,
}

impl BatchState {
    fn of(v: &Value) -> Result<Self, ChatError> {
        let id = v["id"].as_str().ok_or_else(|| ChatError::Envelope(format!("not a batch: {}", cut(&v.to_string(), 200))))?;
        let text = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        let errors = v["errors"]["data"]
            .as_array()
            .map(|d| d.iter().filter_map(|e| e["message"].as_str()).collect::<Vec<_>>().join("; "))
            .unwrap_or_default();
        Ok(BatchState {
            id: id.to_string(),
            status: text("status").unwrap_or_default(),
            output_file_id: text("output_file_id"),
            error_file_id: text("error_file_id"),
            errors,
        })
    }

    /// Still running: ask again later.
    pub fn is_running(&self) -> bool {
        matches!(self.status.as_str(), "validating" | "in_progress" | "finalizing" | "cancelling")
    }
}

/// A line of a batch's output or error file: its request's id and how it ended.
pub fn batch_line(line: &str) -> Option<(String, Result<Completion, ChatError>)> {
    let v: Value = serde_json::from_str(line).ok()?;
    let id = v["custom_id"].as_str()?.to_string();
    let response = &v["response"];
    let status = response["status_code"].as_u64().unwrap_or(0) as u16;
    let result = if status == 200 {
        completion_of(&response["body"])
    } else if !v["error"].is_null() || status != 0 {
        let body = if response["body"].is_null() { v["error"].to_string() } else { response["body"].to_string() };
        Err(ChatError::Status { status: if status == 0 { 500 } else { status }, body: cut(&body, 300) })
    } else {
        Err(ChatError::Envelope(format!("no response in {}", cut(line, 200))))
    };
    Some((id, result))
}

/// The chat-completions URL of a base URL (`http://vllm:8000/v1`) or of a full one, keeping a
/// query (Azure OpenAI's `.../deployments/NAME?api-version=2024-06-01`).
fn completions_url(url: &str) -> String {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    let path = path.trim_end_matches('/');
    let path = if path.ends_with("/chat/completions") { path.to_string() } else { format!("{path}/chat/completions") };
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from LLM servers: treated as absent).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64)
}

fn completion_of(reply: &Value) -> Result<Completion, ChatError> {
    let content = reply["choices"][0]["message"]["content"]
        .as_str()
        .ok_or_else(|| ChatError::Envelope(format!("no choices[0].message.content in {}", cut(&reply.to_string(), 200))))?;
    let usage = &reply["usage"];
    let (prompt, completion) = (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64());
    Ok(Completion {
        content: content.to_string(),
        prompt_tokens: prompt.unwrap_or(0),
        completion_tokens: completion.unwrap_or(0),
        cached_prompt_tokens: usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
        latency: Duration::ZERO,
        attempts: 1,
        usage_reported: prompt.is_some() && completion.is_some(),
    })
}

fn cut(text: &str, chars: usize) -> String {
    let mut out: String = text.chars().take(chars).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    //! Against a scripted HTTP server on loopback.

    use std::sync::{Arc, Mutex};

    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// (delay before answering, raw HTTP response) per request, in order; the requests seen.
    async fn stub(script: Vec<(Duration, String)>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            // Each connection is answered on its own task: a slow answer does not hold up the
            // retry that follows it.
            for (delay, response) in script {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Headers, then Content-Length bytes of body.
                    loop {
                        let n = socket.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if request.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    log.lock().unwrap().push(String::from_utf8_lossy(&request).to_string());
                    tokio::time::sleep(delay).await;
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        (url, seen)
    }

    fn http(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n{body}",
            body.len()
        )
    }

    fn ok(content: &str) -> String {
        let body = json!({"choices": [{"message": {"role": "assistant", "content": content}}], "usage": {"prompt_tokens": 120, "completion_tokens": 9}});
        http("200 OK", "", &body.to_string())
    }

    fn client(url: String, retries: u32, timeout_ms: u64) -> ChatClient {
        ChatClient::new(ChatSettings {
            url,
            api_key: Some(Secret::new("sk-test")),
            timeout: Duration::from_millis(timeout_ms),
            retries,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
            key_header: KeyHeader::Authorization,
            ca_file: None,
        })
        .unwrap()
    }

    fn request() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "my card is gone"}]})
    }

    #[tokio::test]
    async fn rate_limits_and_server_errors_are_retried_honouring_retry_after() {
        let script = vec![
            (Duration::ZERO, http("429 Too Many Requests", "retry-after: 0.3\r\n", "{\"error\": \"slow down\"}")),
            (Duration::ZERO, http("503 Service Unavailable", "", "busy")),
            (Duration::ZERO, ok("{\"intent\": \"card_arrival\"}")),
        ];
        let (url, seen) = stub(script).await;
        let start = Instant::now();
        let done = client(url, 3, 2_000).complete(&request()).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(300), "waited as Retry-After asked: {:?}", start.elapsed());
        assert_eq!(done.content, "{\"intent\": \"card_arrival\"}");
        assert_eq!((done.prompt_tokens, done.completion_tokens, done.attempts, done.cached_prompt_tokens), (120, 9, 3, 0));
        let cached = json!({"choices": [{"message": {"content": "{}"}}], "usage": {"prompt_tokens": 1200, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 1024}}});
        assert_eq!(completion_of(&cached).unwrap().cached_prompt_tokens, 1024);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(seen[0].starts_with("POST /v1/chat/completions ") && seen[0].contains("authorization: Bearer sk-test"), "{}", seen[0]);
        assert!(seen[0].contains("my card is gone"), "the body is sent");
    }

    #[tokio::test]
    async fn refusals_are_not_retried_and_retries_end() {
        let (url, seen) = stub(vec![(Duration::ZERO, http("401 Unauthorized", "", "{\"error\": \"bad key\"}"))]).await;
        let err = client(url, 3, 2_000).complete(&request()).await.unwrap_err();
        assert_eq!(err, ChatError::Status { status: 401, body: "{\"error\": \"bad key\"}".into() });
        assert_eq!((err.is_retryable(), err.kind()), (false, "refused"));
        assert_eq!(seen.lock().unwrap().len(), 1, "a bad key is not tried again");

        let script = (0..3).map(|_| (Duration::ZERO, http("500 Internal Server Error", "", "oops"))).collect();
        let (url, seen) = stub(script).await;
        let err = client(url, 2, 2_000).complete(&request()).await.unwrap_err();
        assert_eq!((err.kind(), seen.lock().unwrap().len()), ("server_error", 3), "1 attempt + 2 retries");
    }

    #[tokio::test]
    async fn a_slow_server_times_out_and_a_malformed_reply_is_an_error() {
        let (url, _) = stub(vec![(Duration::from_millis(800), ok("late")), (Duration::ZERO, ok("{}"))]).await;
        let done = client(url, 1, 200).complete(&request()).await.unwrap();
        assert_eq!((done.content.as_str(), done.attempts), ("{}", 2), "the timed-out attempt was retried");

        let (url, _) = stub(vec![(Duration::from_millis(800), ok("late"))]).await;
        assert_eq!(client(url, 0, 200).complete(&request()).await.unwrap_err(), ChatError::Timeout(Duration::from_millis(200)));

        let (url, _) = stub(vec![(Duration::ZERO, http("200 OK", "", "{\"choices\": []}"))]).await;
        let err = client(url, 2, 2_000).complete(&request()).await.unwrap_err();
        assert!(matches!(err, ChatError::Envelope(_)) && !err.is_retryable(), "{err}");
        let (url, _) = stub(vec![(Duration::ZERO, http("200 OK", "", "not json"))]).await;
        assert!(matches!(client(url, 0, 2_000).complete(&request()).await.unwrap_err(), ChatError::Envelope(_)));
        // A reply too large to be an answer is refused, not read whole (and not retried).
        let huge = format!("{{\"choices\": [{{\"message\": {{\"content\": \"{}\"}}}}]}}", "x".repeat(MAX_REPLY_BYTES + 1));
        let (url, seen) = stub(vec![(Duration::ZERO, http("200 OK", "", &huge))]).await;
        let err = client(url, 2, 5_000).complete(&request()).await.unwrap_err();
        assert!(matches!(&err, ChatError::Envelope(m) if m.contains("larger than")), "{err}");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn retry_after_in_seconds_and_urls_in_both_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        let settings = |url: &str| ChatSettings {
            url: url.into(),
            api_key: None,
            timeout: Duration::from_secs(1),
            retries: 0,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
            key_header: KeyHeader::Authorization,
            ca_file: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        assert_eq!(ChatClient::new(settings("http://llm:8000/v1/")).unwrap().uri.path(), "/v1/chat/completions");
        assert_eq!(ChatClient::new(settings("http://llm:8000/v1/chat/completions")).unwrap().uri.path(), "/v1/chat/completions");
        assert!(ChatClient::new(settings("not a url")).is_err());
        let azure = ChatClient::new(settings("https://acme.openai.azure.com/openai/deployments/gpt4o?api-version=2024-06-01")).unwrap();
        assert_eq!(azure.uri.path(), "/openai/deployments/gpt4o/chat/completions");
        assert_eq!(azure.uri.query(), Some("api-version=2024-06-01"));
    }

    #[test]
    fn the_key_goes_in_a_sensitive_header_of_the_chosen_kind() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        let with = |key_header| {
            ChatClient::new(ChatSettings {
                url: "https://llm.example/v1".into(),
                api_key: Some(Secret::new("sk-test")),
                timeout: Duration::from_secs(1),
                retries: 0,
                backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
                key_header,
                ca_file: None,
            })
            .unwrap()
        };
        let (name, value) = with(KeyHeader::Authorization).key_header().unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap(), value.is_sensitive()), ("authorization", "Bearer sk-test", true));
        let (name, value) = with(KeyHeader::ApiKey).key_header().unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap(), value.is_sensitive()), ("api-key", "sk-test", true));
        assert!(!format!("{value:?}").contains("sk-test"), "debug output hides it");
    }
}
