//! A Confluent-compatible Schema Registry client (Confluent, Apicurio's ccompat API, Redpanda,
//! Karapace): the REST subset a consumer needs. `GET /schemas/ids/{id}` gives a schema by the id
//! its messages carry; each of its references (`{name, subject, version}`) is read with
//! `GET /subjects/{subject}/versions/{version}`, recursively.
//!
//! Schemas are immutable per id, so a schema read is kept for good (up to `max_schemas`, the
//! oldest dropped first), and look-ups of one id in flight at once share one request. What a
//! look-up can end in, and what the worker does about it:
//! - the registry is unreachable, answers 5xx or 429, or times out: retried with backoff for as
//!   long as it lasts (`failing()` says why meanwhile: consumption pauses, /readyz fails);
//! - 401 / 403: [`LookupError::Refused`], naming the registry: nothing will pass, the worker stops;
//! - 404 after `not_found_retries` tries: [`LookupError::NotFound`] (dead letter
//!   `schema_not_found`), remembered for a minute so a burst of such messages costs one look-up;
//! - a schema that does not compile: [`LookupError::Invalid`] (dead letter `schema_invalid`).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::header::HeaderValue;
use hyper::Uri;
use serde::{Deserialize, Serialize};

use super::avro::AvroReader;
use super::json_schema::JsonSchemaReader;
use super::protobuf::ProtobufReader;
use crate::http::{HttpClient, HttpError};
use crate::retry::Backoff;
use crate::secret::Secret;

/// `[schema_registry]`: where schemas are read, and as whom.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistryConfig {
    /// Base URLs of the registry (`https://registry:8081`, an Apicurio `.../apis/ccompat/v7`):
    /// tried in turn while one is unreachable.
    pub urls: Vec<String>,
    /// HTTP basic auth (Confluent Cloud: the API key and secret).
    pub username: Option<String>,
    pub password: Secret,
    pub password_file: Option<PathBuf>,
    /// A bearer token instead (OAuth).
    pub token: Secret,
    pub token_file: Option<PathBuf>,
    /// A PEM file of CA certificates trusted besides the system's (a private registry).
    pub ca_location: Option<PathBuf>,
    /// Deadline of one request (milliseconds).
    pub timeout_ms: u64,
    /// Schemas kept (each id once; the oldest dropped first past this).
    pub max_schemas: usize,
    /// Tries of an id the registry says it does not know before its messages are dead-lettered
    /// (a schema registered a moment ago may not have reached every registry node).
    pub not_found_retries: u32,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        SchemaRegistryConfig {
            urls: Vec::new(),
            username: None,
            password: Secret::default(),
            password_file: None,
            token: Secret::default(),
            token_file: None,
            ca_location: None,
            timeout_ms: 5_000,
            max_schemas: 1_000,
            not_found_retries: 3,
        }
    }
}

impl SchemaRegistryConfig {
    /// Nothing configured (the section is left out of a printed config).
    pub fn is_unset(&self) -> bool {
        *self == SchemaRegistryConfig::default()
    }

    pub fn validate(&self) -> Result<(), String> {
        for url in &self.urls {
            url.parse::<Uri>().map_err(|e| format!("schema_registry.urls: `{url}` is not a URL: {e}"))?;
        }
        if self.username.is_some() && !self.token.expose().is_empty() {
            return Err("schema_registry: set username/password or token, not both".into());
        }
        if self.timeout_ms == 0 || self.max_schemas == 0 {
            return Err("schema_registry.timeout_ms and max_schemas must be above 0".into());
        }
        Ok(())
    }
}

/// A schema, ready to read messages.
#[derive(Debug)]
pub enum Schema {
    Avro(AvroReader),
    Protobuf(ProtobufReader),
    Json(JsonSchemaReader),
}

impl Schema {
    pub fn kind(&self) -> &'static str {
        match self {
            Schema::Avro(_) => "AVRO",
            Schema::Protobuf(_) => "PROTOBUF",
            Schema::Json(_) => "JSON",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LookupError {
    #[error("the schema registry {url} refused triage ({status}: {body}): check schema_registry.username/password or token, and the registry's permissions")]
    Refused { url: String, status: u16, body: String },
    #[error("schema id {0} is not in the schema registry")]
    NotFound(u32),
    #[error("schema id {id}: {detail}")]
    Invalid { id: u32, detail: String },
}

/// What one registry answer means.
enum Answer {
    Body(serde_json::Value),
    NotFound,
    Refused {
        status: u16,
        body: String,
    },
    /// Worth waiting for: down, 5xx, 429, a timeout, a garbled body.
    Transient(String),
}

#[derive(Deserialize)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

#[derive(Default)]
struct Cache {
    schemas: HashMap<u32, Arc<Schema>>,
    order: VecDeque<u32>,
    not_found: HashMap<u32, Instant>,
}

/// How long a 404 is believed.
const NOT_FOUND_MEMORY: Duration = Duration::from_secs(60);
/// References deeper than this are a loop, not a schema.
const MAX_REFERENCE_DEPTH: usize = 16;
/// A registry answer larger than this is not a schema.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// One look-up of a schema id that every message waiting for it shares.
type SharedLookup = Arc<tokio::sync::OnceCell<Result<Arc<Schema>, LookupError>>>;

pub struct Registry {
    http: HttpClient,
    urls: Vec<String>,
    auth: Option<HeaderValue>,
    config: SchemaRegistryConfig,
    backoff: Backoff,
    cache: Mutex<Cache>,
    in_flight: Mutex<HashMap<u32, SharedLookup>>,
    failing: Mutex<Option<String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("urls", &self.urls).finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(config: &SchemaRegistryConfig) -> Result<Self, String> {
        if config.urls.is_empty() {
            return Err("a route reads a registry format but [schema_registry] urls is empty".into());
        }
        let http = HttpClient::new(config.ca_location.as_deref(), Duration::from_millis(config.timeout_ms), MAX_ANSWER_BYTES)
            .map_err(|e| format!("schema registry: {e}"))?;
        let auth = match (&config.username, config.token.expose()) {
            (Some(user), _) => {
                let pair = format!("{user}:{}", config.password.expose());
                Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
            }
            (None, token) if !token.is_empty() => Some(format!("Bearer {token}")),
            _ => None,
        };
        let auth = auth
            .map(|a| {
                HeaderValue::from_str(&a).map(|mut v| {
                    v.set_sensitive(true);
                    v
                })
            })
            .transpose()
            .map_err(|_| "schema registry credentials hold characters a header cannot".to_string())?;
        Ok(Registry {
            http,
            urls: config.urls.iter().map(|u| u.trim_end_matches('/').to_string()).collect(),
            auth,
            config: config.clone(),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            cache: Mutex::new(Cache::default()),
            in_flight: Mutex::new(HashMap::new()),
            failing: Mutex::new(None),
        })
    }

    /// The schema if it is known now: Some(Ok) read before, Some(Err) the registry said lately
    /// it has no such id, None a look-up is needed.
    pub fn cached(&self, id: u32) -> Option<Result<Arc<Schema>, LookupError>> {
        let mut cache = self.cache.lock().ok()?;
        if let Some(s) = cache.schemas.get(&id) {
            return Some(Ok(s.clone()));
        }
        match cache.not_found.get(&id) {
            Some(at) if at.elapsed() < NOT_FOUND_MEMORY => Some(Err(LookupError::NotFound(id))),
            Some(_) => {
                cache.not_found.remove(&id);
                None
            }
            None => None,
        }
    }

    /// Why the registry cannot be read right now (None: it answers).
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().ok().and_then(|f| f.clone())
    }

    /// The schema of `id`, waiting out a registry that is away for as long as it is; concurrent
    /// calls for one id share one look-up.
    pub async fn schema(&self, id: u32) -> Result<Arc<Schema>, LookupError> {
        if let Some(known) = self.cached(id) {
            return known;
        }
        let cell = {
            let mut in_flight = self.in_flight.lock().map_err(|_| LookupError::Invalid { id, detail: "lock poisoned".into() })?;
            in_flight.entry(id).or_default().clone()
        };
        let result = cell.get_or_init(|| self.look_up(id)).await.clone();
        if let Ok(mut in_flight) = self.in_flight.lock() {
            in_flight.remove(&id);
        }
        if let Ok(mut cache) = self.cache.lock() {
            match &result {
                Ok(schema) if !cache.schemas.contains_key(&id) => {
                    cache.schemas.insert(id, schema.clone());
                    cache.order.push_back(id);
                    while cache.order.len() > self.config.max_schemas {
                        if let Some(old) = cache.order.pop_front() {
                            cache.schemas.remove(&old);
                        }
                    }
                }
                Err(LookupError::NotFound(_)) => {
                    cache.not_found.insert(id, Instant::now());
                }
                _ => {}
            }
        }
        result
    }

    async fn look_up(&self, id: u32) -> Result<Arc<Schema>, LookupError> {
        let body = self.get(&format!("/schemas/ids/{id}"), id).await?;
        let schema = self.build(id, &body, 0).await?;
        tracing::info!(schema_id = id, kind = schema.kind(), "schema read from the registry");
        Ok(Arc::new(schema))
    }

    /// A schema document (`{"schema", "schemaType", "references"}`) -> a reader.
    async fn build(&self, id: u32, body: &serde_json::Value, depth: usize) -> Result<Schema, LookupError> {
        let invalid = |detail: String| LookupError::Invalid { id, detail };
        let text = body["schema"].as_str().ok_or_else(|| invalid("the registry's answer has no `schema`".into()))?;
        let kind = body["schemaType"].as_str().unwrap_or("AVRO");
        let references: Vec<Reference> = match body.get("references") {
            Some(r) if !r.is_null() => serde_json::from_value(r.clone()).map_err(|e| invalid(format!("bad `references`: {e}")))?,
            _ => Vec::new(),
        };
        // Every referenced document, depth first (a reference's own references before it).
        let mut texts: Vec<(String, String)> = Vec::new();
        self.referenced(id, &references, depth, &mut texts).await?;
        match kind {
            "AVRO" => {
                let refs: Vec<String> = texts.into_iter().map(|(_, t)| t).collect();
                AvroReader::parse(text, &refs).map(Schema::Avro).map_err(|e| invalid(format!("Avro schema: {e}")))
            }
            "PROTOBUF" => ProtobufReader::compile(text, &texts).map(Schema::Protobuf).map_err(|e| invalid(format!("Protobuf schema: {e}"))),
            "JSON" => JsonSchemaReader::parse(text, &texts).map(Schema::Json).map_err(|e| invalid(format!("JSON Schema: {e}"))),
            other => Err(invalid(format!("schema type `{other}` is not one triage reads"))),
        }
    }

    fn referenced<'a>(
        &'a self,
        id: u32,
        references: &'a [Reference],
        depth: usize,
        out: &'a mut Vec<(String, String)>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), LookupError>> + Send + 'a>> {
        Box::pin(async move {
            if depth > MAX_REFERENCE_DEPTH {
                return Err(LookupError::Invalid { id, detail: "schema references nest too deep (a loop?)".into() });
            }
            for r in references {
                if out.iter().any(|(name, _)| name == &r.name) {
                    continue;
                }
                let version = if r.version < 0 { "latest".to_string() } else { r.version.to_string() };
                let body = self.get(&format!("/subjects/{}/versions/{version}", encode_path(&r.subject)), id).await?;
                let nested: Vec<Reference> = match body.get("references") {
                    Some(n) if !n.is_null() => serde_json::from_value(n.clone()).unwrap_or_default(),
                    _ => Vec::new(),
                };
                self.referenced(id, &nested, depth + 1, out).await?;
                let text = body["schema"].as_str().ok_or_else(|| LookupError::Invalid {
                    id,
                    detail: format!("reference `{}` ({} v{version}) has no `schema`", r.name, r.subject),
                })?;
                out.push((r.name.clone(), text.to_string()));
            }
            Ok(())
        })
    }

    /// GET a path, waiting out outages; a 404 is believed after `not_found_retries` tries.
    async fn get(&self, path: &str, id: u32) -> Result<serde_json::Value, LookupError> {
        let (mut attempt, mut not_found) = (0u32, 0u32);
        loop {
            let url = &self.urls[attempt as usize % self.urls.len()];
            let answer = self.get_once(url, path).await;
            let reason = match answer {
                Answer::Body(body) => {
                    self.set_failing(None);
                    return Ok(body);
                }
                Answer::Refused { status, body } => {
                    return Err(LookupError::Refused { url: url.clone(), status, body });
                }
                Answer::NotFound => {
                    self.set_failing(None);
                    not_found += 1;
                    if not_found >= self.config.not_found_retries.max(1) {
                        return Err(LookupError::NotFound(id));
                    }
                    None
                }
                Answer::Transient(reason) => Some(reason),
            };
            attempt += 1;
            let delay = self.backoff.delay(attempt);
            if let Some(reason) = &reason {
                let why = format!("schema registry {url}: {reason}");
                tracing::warn!(schema_id = id, reason = %why, retry_in_ms = delay.as_millis() as u64, "schema registry not answering; waiting");
                self.set_failing(Some(why));
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn get_once(&self, base: &str, path: &str) -> Answer {
        let uri: Uri = match format!("{base}{path}").parse() {
            Ok(u) => u,
            Err(e) => return Answer::Transient(format!("bad URL: {e}")),
        };
        let mut headers = vec![("accept", HeaderValue::from_static("application/vnd.schemaregistry.v1+json, application/json"))];
        if let Some(auth) = &self.auth {
            headers.push(("authorization", auth.clone()));
        }
        let reply = match self.http.get(&uri, &headers).await {
            Ok(r) => r,
            Err(HttpError::TooLarge(n)) => return Answer::Transient(format!("an answer over {n} bytes")),
            Err(e) => return Answer::Transient(e.to_string()),
        };
        let text = || String::from_utf8_lossy(&reply.body).chars().take(200).collect::<String>();
        match reply.status {
            200 => match serde_json::from_slice(&reply.body) {
                Ok(body) => Answer::Body(body),
                Err(e) => Answer::Transient(format!("an answer that is not JSON ({e}): {}", text())),
            },
            401 | 403 => Answer::Refused { status: reply.status, body: text() },
            404 => Answer::NotFound,
            status => Answer::Transient(format!("HTTP {status}: {}", text())),
        }
    }

    fn set_failing(&self, reason: Option<String>) {
        if let Ok(mut failing) = self.failing.lock() {
            if failing.is_some() && reason.is_none() {
                tracing::info!("schema registry answering again");
            }
            *failing = reason;
        }
    }
}

/// A subject in a URL path (subjects like `shop.Ticket-value` or `a/b.proto`).
pub(crate) fn encode_path(subject: &str) -> String {
    subject
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_escaped_in_paths() {
        assert_eq!(encode_path("shop.Ticket-value"), "shop.Ticket-value");
        assert_eq!(encode_path("google/type/money.proto"), "google%2Ftype%2Fmoney.proto");
    }

    #[test]
    fn a_config_is_checked_without_connecting() {
        let ok = SchemaRegistryConfig { urls: vec!["http://registry:8081".into()], ..Default::default() };
        assert!(ok.validate().is_ok());
        let both = SchemaRegistryConfig { username: Some("u".into()), token: Secret::new("t"), ..ok.clone() };
        assert!(both.validate().unwrap_err().contains("not both"));
        let bad = SchemaRegistryConfig { urls: vec!["not a url at all".into()], ..ok.clone() };
        assert!(bad.validate().is_err());
        assert!(Registry::new(&SchemaRegistryConfig::default()).is_err(), "no URL");
    }
}
