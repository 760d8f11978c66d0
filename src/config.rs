//! One configuration for `triage run`: a TOML file, every field overridable from the
//! environment, unknown fields rejected, secrets redacted. Validated without connecting to
//! anything (`triage config check`).
//!
//! Environment overrides: `TRIAGE_<SECTION>__<FIELD>` (double underscore between levels,
//! case-insensitive), e.g. `TRIAGE_KAFKA__BOOTSTRAP_SERVERS=broker:9092`,
//! `TRIAGE_CLICKHOUSE__INSERT_MAX_ROWS=20000`. Values parse as TOML (numbers, booleans,
//! arrays) and fall back to strings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;
use crate::message::{FieldMap, DEFAULT_MAX_MESSAGE_BYTES};
use crate::model::InferenceOptions;

pub const ENV_PREFIX: &str = "TRIAGE_";
/// Top-level scalar fields, overridable as TRIAGE_<FIELD> (sections need TRIAGE_<SECTION>__<FIELD>).
const TOP_LEVEL_FIELDS: &[&str] = &["worker_id", "max_message_bytes"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("secret file {}: {source}", path.display())]
    Secret { path: PathBuf, source: std::io::Error },
}

/// A secret value: never printed, never logged.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password: Secret,
    /// Read the SASL password from this file (e.g. a mounted Kubernetes Secret).
    pub sasl_password_file: Option<PathBuf>,
    /// CA bundle for SSL / SASL_SSL (default: the system's).
    pub ssl_ca_location: Option<PathBuf>,
    pub session_timeout_ms: u32,
    pub max_poll_interval_ms: u32,
    /// Where the consumer starts in a partition without a committed offset.
    pub auto_offset_reset: String,
    /// How often done offsets are committed.
    pub commit_interval_ms: u64,
    /// Consumed-but-not-done messages above which fetching pauses. Bounds memory and what a
    /// SIGTERM must finish: keep it to a few seconds of the model's throughput, well under
    /// shutdown.drain_timeout_ms (5,000 is ~10 s of the default model on 2 cores).
    pub max_in_flight: usize,
    /// Any librdkafka property, passed through (applied last).
    pub properties: BTreeMap<String, String>,
    pub dead_letter_topic: String,
    pub escalation_topic: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "localhost:9092".into(),
            group_id: "triage".into(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: Secret::default(),
            sasl_password_file: None,
            ssl_ca_location: None,
            session_timeout_ms: 45_000,
            max_poll_interval_ms: 300_000,
            auto_offset_reset: "earliest".into(),
            commit_interval_ms: 1_000,
            max_in_flight: 5_000,
            properties: BTreeMap::new(),
            dead_letter_topic: "triage.dead-letter".into(),
            escalation_topic: "triage.escalations".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Kafka topic this route consumes.
    pub topic: String,
    /// Message kind recorded with each row (ticket, return, email, ...).
    pub kind: String,
    /// Model directory.
    pub model: PathBuf,
    /// Where the text, id and event time are in the JSON.
    #[serde(default)]
    pub fields: FieldMap,
    /// JSON locations copied as metadata (name -> location); stored as two arrays.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Escalate when the confidence is below this (default: [escalation].default_threshold).
    pub escalation_threshold: Option<f32>,
    /// The single-label head whose confidence decides escalation (default: the category head).
    pub escalation_head: Option<String>,
    /// Escalate when the out-of-distribution score is above this (default: the model's
    /// calibrated `[ood] threshold`; models without a gate never escalate on it).
    pub ood_threshold: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationConfig {
    pub enabled: bool,
    pub default_threshold: f32,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        EscalationConfig { enabled: true, default_threshold: 0.5 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint, e.g. http://clickhouse:8123 or https://xyz.clickhouse.cloud:8443.
    pub url: String,
    pub database: String,
    pub table: String,
    pub user: String,
    pub password: Secret,
    pub password_file: Option<PathBuf>,
    /// Rows per INSERT at most.
    pub insert_max_rows: usize,
    /// Longest a row waits before its INSERT starts (milliseconds).
    pub insert_interval_ms: u64,
    /// An INSERT that has not finished after this long is abandoned and retried (milliseconds).
    pub insert_timeout_ms: u64,
    /// Retry backoff: first delay, cap (milliseconds); jittered.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Use LowCardinality(String) for low-cardinality columns in the DDL (ClickHouse >= 19;
    /// 18.x needs allow_experimental_low_cardinality_type).
    pub low_cardinality: bool,
    /// Extra settings sent with every INSERT (e.g. async_insert = "0" on modern servers).
    pub settings: BTreeMap<String, String>,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://localhost:8123".into(),
            database: "triage".into(),
            table: "results".into(),
            user: "default".into(),
            password: Secret::default(),
            password_file: None,
            insert_max_rows: 10_000,
            insert_interval_ms: 1_000,
            insert_timeout_ms: 30_000,
            retry_initial_ms: 200,
            retry_max_ms: 30_000,
            low_cardinality: false,
            settings: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: time to finish in-flight work, flush and commit (milliseconds).
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain_timeout_ms: 30_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of /metrics, /healthz, /readyz (empty: off).
    pub address: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { address: "0.0.0.0:9464".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Recorded with every row (default: the host name).
    #[serde(default)]
    pub worker_id: Option<String>,
    #[serde(default)]
    pub kafka: KafkaConfig,
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub escalation: EscalationConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub batching: EngineConfig,
    #[serde(default)]
    pub inference: InferenceOptions,
    /// Messages larger than this go to the dead-letter topic (bytes).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

impl Config {
    /// Read a file, apply environment overrides, resolve secret files, validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, &path.display().to_string(), std::env::vars(), base)
    }

    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
        base_dir: &Path,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ConfigError::Parse { origin: origin.into(), message: e.to_string() })?;
        let mut applied = Vec::new();
        for (key, raw) in env {
            let Some(path) =
                key.strip_prefix(ENV_PREFIX).filter(|k| k.contains("__") || TOP_LEVEL_FIELDS.contains(&k.to_ascii_lowercase().as_str()))
            else {
                continue;
            };
            let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut value, &segments, parse_env_value(&raw))
                .map_err(|message| ConfigError::Parse { origin: key.clone(), message })?;
            applied.push(key);
        }
        let mut config: Config = value.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: if applied.is_empty() {
                origin.to_string()
            } else {
                format!("{origin} (with {} from the environment)", applied.join(", "))
            },
            message: e.to_string(),
        })?;
        config.resolve_paths(base_dir);
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for route in &mut self.routes {
            if route.model.is_relative() && !route.model.exists() {
                let candidate = base.join(&route.model);
                if candidate.exists() {
                    route.model = candidate;
                }
            }
        }
    }

    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
                .map_err(|source| ConfigError::Secret { path: path.clone(), source })
        };
        if let Some(path) = &self.kafka.sasl_password_file {
            self.kafka.sasl_password = read(path)?;
        }
        if let Some(path) = &self.clickhouse.password_file {
            self.clickhouse.password = read(path)?;
        }
        Ok(())
    }

    /// Everything that can be checked without connecting or loading models.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.routes.is_empty() {
            return bad("no [[routes]]: name at least one topic and the model that classifies it".into());
        }
        let mut topics = std::collections::BTreeSet::new();
        for r in &self.routes {
            if !topics.insert(&r.topic) {
                return bad(format!("topic `{}` is routed twice", r.topic));
            }
            if r.kind.trim().is_empty() {
                return bad(format!("route for `{}` has an empty kind", r.topic));
            }
            if r.topic == self.kafka.dead_letter_topic || r.topic == self.kafka.escalation_topic {
                return bad(format!("topic `{}` is both consumed and written to", r.topic));
            }
            if let Some(t) = r.escalation_threshold {
                if !(0.0..=1.0).contains(&t) {
                    return bad(format!("route `{}`: escalation_threshold {t} is outside 0..1", r.topic));
                }
            }
            if let Some(t) = r.ood_threshold {
                if !t.is_finite() || t < 0.0 {
                    return bad(format!("route `{}`: ood_threshold {t} must be a number >= 0", r.topic));
                }
            }
        }
        if !(0.0..=1.0).contains(&self.escalation.default_threshold) {
            return bad(format!("escalation.default_threshold {} is outside 0..1", self.escalation.default_threshold));
        }
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() || k.group_id.trim().is_empty() {
            return bad("kafka.bootstrap_servers and kafka.group_id are required".into());
        }
        let sasl = matches!(k.security_protocol, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl);
        if sasl && (k.sasl_mechanism.is_none() || k.sasl_username.is_none() || k.sasl_password.expose().is_empty()) {
            return bad(
                "kafka.security_protocol is SASL: set sasl_mechanism, sasl_username and sasl_password (or sasl_password_file)".into()
            );
        }
        if !sasl && k.sasl_mechanism.is_some() {
            return bad("kafka.sasl_mechanism is set but security_protocol is not sasl_plaintext or sasl_ssl".into());
        }
        if k.max_in_flight == 0 || k.commit_interval_ms == 0 {
            return bad("kafka.max_in_flight and kafka.commit_interval_ms must be positive".into());
        }
        if !["earliest", "latest"].contains(&k.auto_offset_reset.as_str()) {
            return bad(format!("kafka.auto_offset_reset must be earliest or latest, not `{}`", k.auto_offset_reset));
        }
        let c = &self.clickhouse;
        if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
            return bad(format!("clickhouse.url must start with http:// or https:// (got `{}`)", c.url));
        }
        for (what, name) in [("database", &c.database), ("table", &c.table)] {
            if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                return bad(format!("clickhouse.{what} `{name}` must be letters, digits and _"));
            }
        }
        if c.insert_max_rows == 0 || c.retry_initial_ms == 0 || c.retry_max_ms < c.retry_initial_ms {
            return bad("clickhouse.insert_max_rows and retry_initial_ms must be positive, retry_max_ms >= retry_initial_ms".into());
        }
        self.batching.validate(8).map_err(|m| ConfigError::Invalid(format!("batching: {m}")))?;
        Ok(())
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| {
                std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "triage".into())
            })
        })
    }

    /// The escalation threshold of a route: its own, else the one its model was calibrated
    /// for (when the route escalates on the category head), else the default.
    pub fn threshold(&self, route: &RouteConfig, model: &crate::model::Descriptor) -> f32 {
        let calibrated = model.escalation.as_ref().map(|e| e.threshold).filter(|_| route.escalation_head.is_none());
        route.escalation_threshold.or(calibrated).unwrap_or(self.escalation.default_threshold)
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(root: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty override path")?;
    let mut node = root;
    for seg in parents {
        let table = node.as_table_mut().ok_or_else(|| format!("`{seg}` is not a section"))?;
        node = table.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Array(items) = node {
            return Err(format!("`{seg}` is a list ({} entries): override it in the file", items.len()));
        }
    }
    node.as_table_mut().ok_or_else(|| format!("cannot set `{last}`: its parent is not a section"))?.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[routes]]
        topic = "tickets"
        kind = "ticket"
        model = "models/customer-service"
    "#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(text, "test.toml", env.iter().map(|(k, v)| (k.to_string(), v.to_string())), Path::new("."))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.kafka.group_id, "triage");
        assert_eq!(c.clickhouse.table, "results");
        assert_eq!(c.max_message_bytes, 1 << 20);
        let heads = "[[heads]]\nname = \"intent\"\noutput = \"p\"\nkind = \"single_label\"\nlabels = [\"a\", \"b\"]\n";
        let plain = crate::model::Descriptor::parse(heads, Path::new("m")).unwrap();
        assert_eq!(c.threshold(&c.routes[0], &plain), 0.5);
        let calibrated = crate::model::Descriptor::parse(&format!("{heads}[escalation]\nthreshold = 0.7\n"), Path::new("m")).unwrap();
        assert_eq!(c.threshold(&c.routes[0], &calibrated), 0.7, "the model's calibrated threshold beats the default");
        let mut own = c.clone();
        own.routes[0].escalation_threshold = Some(0.2);
        assert_eq!(own.threshold(&own.routes[0], &calibrated), 0.2, "a route's own threshold beats the model's");
        own.routes[0].escalation_threshold = None;
        own.routes[0].escalation_head = Some("other".into());
        assert_eq!(own.threshold(&own.routes[0], &calibrated), 0.5, "calibrated for the category head only");
    }

    #[test]
    fn env_overrides_any_field_with_typed_values() {
        let c = parse(
            MINIMAL,
            &[
                ("TRIAGE_KAFKA__BOOTSTRAP_SERVERS", "b1:9092,b2:9092"),
                ("TRIAGE_CLICKHOUSE__INSERT_MAX_ROWS", "123"),
                ("TRIAGE_BATCHING__MAX_BATCH_SIZE", "8"),
                ("TRIAGE_MODEL", "ignored: no double underscore"),
                ("TRIAGE_WORKER_ID", "pod-7"),
            ],
        )
        .unwrap();
        assert_eq!(c.worker_id.as_deref(), Some("pod-7"));
        assert_eq!(c.kafka.bootstrap_servers, "b1:9092,b2:9092");
        assert_eq!(c.clickhouse.insert_max_rows, 123);
        assert_eq!(c.batching.policy.max_batch_size, 8);
    }

    #[test]
    fn unknown_fields_are_rejected_by_name_even_from_env() {
        let err = parse(&format!("{MINIMAL}\n[kafka]\nbootstrap_server = \"x\""), &[]).unwrap_err().to_string();
        assert!(err.contains("bootstrap_server"), "{err}");
        let err = parse(MINIMAL, &[("TRIAGE_KAFKA__GROUPID", "x")]).unwrap_err().to_string();
        assert!(err.contains("groupid") && err.contains("TRIAGE_KAFKA__GROUPID"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let c = parse(
            &format!("{MINIMAL}\n[kafka]\nsecurity_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"u\"\nsasl_password = \"hunter2\""),
            &[("TRIAGE_CLICKHOUSE__PASSWORD", "s3cret")],
        )
        .unwrap();
        let shown = format!("{c:?} {}", toml::to_string(&c).unwrap());
        assert!(!shown.contains("hunter2") && !shown.contains("s3cret"), "{shown}");
        assert_eq!(c.kafka.sasl_password.expose(), "hunter2");
    }

    #[test]
    fn secret_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "from-file\n").unwrap();
        let c = parse(MINIMAL, &[("TRIAGE_CLICKHOUSE__PASSWORD_FILE", f.to_str().unwrap())]).unwrap();
        assert_eq!(c.clickhouse.password.expose(), "from-file");
    }

    #[test]
    fn validation_explains() {
        let check = |extra: &str| parse(&format!("{MINIMAL}\n{extra}"), &[]).unwrap_err().to_string();
        assert!(check("[kafka]\nsecurity_protocol = \"sasl_ssl\"").contains("sasl_mechanism"));
        assert!(check("[clickhouse]\nurl = \"localhost:8123\"").contains("http://"));
        assert!(check("[clickhouse]\ntable = \"bad-name;\"").contains("table"));
        assert!(check("[escalation]\ndefault_threshold = 1.5").contains("outside"));
        assert!(check("[[routes]]\ntopic = \"tickets\"\nkind = \"x\"\nmodel = \"m\"").contains("routed twice"));
        assert!(parse("routes = []", &[]).unwrap_err().to_string().contains("no [[routes]]"));
    }
}
