//! One configuration for `triage run`: a TOML file, every field overridable from the
//! environment, unknown fields rejected, secrets redacted. Validated without connecting to
//! anything (`triage config check`).
//!
//! Each section's type lives beside its component (`[kafka]`: `source::kafka::config`,
//! `[clickhouse]`: `sink::clickhouse::config`, `[batching]`: `engine`, `[inference]`: `model`);
//! this module composes them, cross-checks them, and reads the environment ([`env`]).

pub mod env;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::engine::EngineConfig;
use crate::message::{FieldMap, DEFAULT_MAX_MESSAGE_BYTES};
pub use crate::model::InferenceOptions;
/// Re-exported: configuration is where users meet it.
pub use crate::secret::Secret;
pub use crate::sink::clickhouse::config::ClickHouseConfig;
pub use crate::source::decode::registry::SchemaRegistryConfig;
pub use crate::source::decode::{Format, PinnedSchema};
pub use crate::source::kafka::config::{ClientRole, KafkaConfig, SaslMechanism, SecurityProtocol};
pub use env::ENV_PREFIX;

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Kafka topic this route consumes.
    pub topic: String,
    /// Message kind recorded with each row (ticket, return, email, ...).
    pub kind: String,
    /// Model directory (with `cascade`: its first tier, which may be left out).
    #[serde(default)]
    pub model: PathBuf,
    /// Models tried in order, e.g. `["models/fast", "models/accurate"]`: a message goes to the
    /// next when the previous one doubts it (below its calibrated escalation threshold, or
    /// above its OOD threshold); only what the last doubts is escalated. The route's own
    /// thresholds apply to the last tier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cascade: Vec<PathBuf>,
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
    /// What producers write: `json` (default), `avro`, `protobuf`, `json_schema`. The last
    /// three read Confluent's wire format with schemas from `[schema_registry]`, or raw payloads
    /// against a pinned `schema`.
    #[serde(default, skip_serializing_if = "is_json")]
    pub format: Format,
    /// A pinned schema for producers that write without a registry.
    #[serde(default, skip_serializing_if = "PinnedSchema::is_empty")]
    pub schema: PinnedSchema,
    /// Escalate when the out-of-distribution score is above this (default: the model's
    /// calibrated `[ood] threshold`; models without a gate never escalate on it).
    pub ood_threshold: Option<f32>,
    /// A candidate model that also classifies this route's messages, on its own engine, for
    /// comparison only: its answers go to the `<table>_shadow` table, never to the route's rows,
    /// escalations or dead letters, and it never delays a commit (when it falls behind, the
    /// messages it would have read are dropped and counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<PathBuf>,
    /// The share of messages the shadow classifies, picked by a hash of the message's key (or
    /// its topic/partition/offset), so the same messages every time (default 1.0: all).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub shadow_share: f64,
    /// A candidate that answers a share of the route's messages FOR REAL (its rows, its
    /// escalations), picked by key hash: `canary = { model = "models/v8", share = 0.05 }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryConfig>,
    /// What `triage escalate`'s large model should know about this route's messages (after
    /// `llm.instructions`), e.g. "Returns of furniture bought online; damage claims need photos".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_instructions: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The candidate's model directory.
    pub model: PathBuf,
    /// The share of messages it answers, in (0, 1).
    pub share: f64,
}

fn one() -> f64 {
    1.0
}

fn is_one(share: &f64) -> bool {
    *share == 1.0
}

impl RouteConfig {
    /// A route of `topic` to `model` with every other setting at its default.
    pub fn new(topic: impl Into<String>, kind: impl Into<String>, model: impl Into<PathBuf>) -> Self {
        RouteConfig {
            topic: topic.into(),
            kind: kind.into(),
            model: model.into(),
            cascade: Vec::new(),
            fields: FieldMap::default(),
            metadata: BTreeMap::new(),
            escalation_threshold: None,
            escalation_head: None,
            ood_threshold: None,
            format: Format::Json,
            schema: PinnedSchema::default(),
            shadow: None,
            shadow_share: 1.0,
            canary: None,
            llm_instructions: None,
        }
    }
}

fn is_json(format: &Format) -> bool {
    *format == Format::Json
}

/// A model on a loop of "feeds" edges, if any.
fn cascade_cycle<'a>(edges: &[(&'a PathBuf, &'a PathBuf)]) -> Option<&'a PathBuf> {
    // Repeatedly remove models nothing feeds; what remains lies on (or behind) a loop.
    let mut remaining: Vec<(&PathBuf, &PathBuf)> = edges.to_vec();
    loop {
        let fed: std::collections::BTreeSet<&PathBuf> = remaining.iter().map(|(_, to)| *to).collect();
        let before = remaining.len();
        remaining.retain(|(from, _)| fed.contains(from));
        if remaining.is_empty() {
            return None;
        }
        if remaining.len() == before {
            return remaining.first().map(|(from, _)| *from);
        }
    }
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
pub struct ModelsConfig {
    /// How often each route's model directory is checked for a new version (milliseconds; 0:
    /// only on SIGHUP). A change is loaded once the directory has looked the same for one
    /// whole interval (a copy still in progress is never loaded).
    pub reload_interval_ms: u64,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig { reload_interval_ms: 10_000 }
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
    pub models: ModelsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The LLM tier (`triage escalate` only).
    #[serde(default)]
    pub llm: crate::llm::config::LlmConfig,
    /// Where Avro / Protobuf / JSON Schema routes read their schemas.
    #[serde(default, skip_serializing_if = "SchemaRegistryConfig::is_unset")]
    pub schema_registry: SchemaRegistryConfig,
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
        let applied = env::apply(&mut value, env).map_err(|(key, message)| ConfigError::Parse { origin: key, message })?;
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
        let resolve = |path: &mut PathBuf| {
            if !path.as_os_str().is_empty() && path.is_relative() && !path.exists() {
                let candidate = base.join(&*path);
                if candidate.exists() {
                    *path = candidate;
                }
            }
        };
        for route in &mut self.routes {
            resolve(&mut route.model);
            route.cascade.iter_mut().for_each(resolve);
            if let Some(shadow) = &mut route.shadow {
                resolve(shadow);
            }
            if let Some(canary) = &mut route.canary {
                resolve(&mut canary.model);
            }
            if let Some(file) = &mut route.schema.file {
                resolve(file);
            }
            if route.model.as_os_str().is_empty() {
                if let Some(first) = route.cascade.first() {
                    route.model = first.clone();
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
        if let Some(path) = &self.llm.api_key_file {
            self.llm.api_key = read(path)?;
        }
        if let Some(path) = &self.schema_registry.password_file {
            self.schema_registry.password = read(path)?;
        }
        if let Some(path) = &self.schema_registry.token_file {
            self.schema_registry.token = read(path)?;
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
            if r.model.as_os_str().is_empty() {
                return bad(format!("route `{}` names no model: set `model` or `cascade`", r.topic));
            }
            match (r.format, &r.schema.file) {
                (Format::Json, Some(_)) => return bad(format!("route `{}`: format = \"json\" takes no schema", r.topic)),
                (Format::Json, None) => {}
                (_, Some(_)) => {}
                (format, None) if self.schema_registry.urls.is_empty() => {
                    return bad(format!(
                        "route `{}`: format = \"{}\" reads schemas from [schema_registry] urls (none set), or pin one with schema.file",
                        r.topic,
                        format.as_str()
                    ))
                }
                _ => {}
            }
            if !(r.shadow_share > 0.0 && r.shadow_share <= 1.0) {
                return bad(format!("route `{}`: shadow_share {} must be in (0, 1]", r.topic, r.shadow_share));
            }
            if let Some(shadow) = &r.shadow {
                if !r.cascade.is_empty() {
                    return bad(format!("route `{}`: a shadow compares against one model; this route has a cascade", r.topic));
                }
                if *shadow == r.model {
                    return bad(format!("route `{}`: its shadow is its own model `{}`", r.topic, shadow.display()));
                }
            }
            if let Some(canary) = &r.canary {
                if !(canary.share > 0.0 && canary.share < 1.0) {
                    return bad(format!(
                        "route `{}`: canary share {} must be in (0, 1) (1: make it the route's model)",
                        r.topic, canary.share
                    ));
                }
                if !r.cascade.is_empty() {
                    return bad(format!("route `{}`: a canary replaces one model; this route has a cascade", r.topic));
                }
                if canary.model == r.model {
                    return bad(format!("route `{}`: its canary is its own model `{}`", r.topic, canary.model.display()));
                }
            }
            if r.format == Format::Protobuf && r.schema.file.is_some() && r.schema.message.is_none() {
                return bad(format!("route `{}`: a pinned Protobuf schema needs schema.message (the message's full name)", r.topic));
            }
            if let Some(first) = r.cascade.first() {
                if *first != r.model {
                    return bad(format!(
                        "route `{}`: model `{}` is not the first tier of its cascade (`{}`): leave `model` out",
                        r.topic,
                        r.model.display(),
                        first.display()
                    ));
                }
                let distinct: std::collections::BTreeSet<&PathBuf> = r.cascade.iter().collect();
                if distinct.len() != r.cascade.len() {
                    return bad(format!("route `{}`: a model appears twice in its cascade", r.topic));
                }
            }
        }
        // Each tier feeds the next through bounded queues: a model that feeds one which (in
        // another route) feeds it back could wait on itself.
        let mut edges: Vec<(&PathBuf, &PathBuf)> = Vec::new();
        for r in &self.routes {
            edges.extend(r.cascade.windows(2).map(|w| (&w[0], &w[1])));
        }
        if let Some(model) = cascade_cycle(&edges) {
            return bad(format!(
                "the routes' cascades form a loop through `{}` (one route sends it work, another takes work from it): give one route its own copy of the model",
                model.display()
            ));
        }
        if !(0.0..=1.0).contains(&self.escalation.default_threshold) {
            return bad(format!("escalation.default_threshold {} is outside 0..1", self.escalation.default_threshold));
        }
        self.kafka.validate().map_err(ConfigError::Invalid)?;
        self.clickhouse.validate().map_err(ConfigError::Invalid)?;
        self.schema_registry.validate().map_err(ConfigError::Invalid)?;
        self.batching.validate(8).map_err(|m| ConfigError::Invalid(format!("batching: {m}")))?;
        Ok(())
    }

    /// A route's models, first tier first.
    pub fn tiers(route: &RouteConfig) -> Vec<PathBuf> {
        if route.cascade.is_empty() {
            vec![route.model.clone()]
        } else {
            route.cascade.clone()
        }
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| {
                std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "triage".into())
            })
        })
    }
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
    fn flat_aliases_reach_the_worker_and_lose_to_sectioned_names() {
        let c = parse(MINIMAL, &[("TRIAGE_MAX_BATCH_SIZE", "8"), ("TRIAGE_PROVIDERS", "cuda,cpu"), ("TRIAGE_INTRA_THREADS", "1")]).unwrap();
        assert_eq!(c.batching.policy.max_batch_size, 8);
        assert_eq!(c.inference.providers, vec![crate::model::Provider::Cuda, crate::model::Provider::Cpu]);
        assert_eq!(c.inference.intra_threads, 1);
        let c = parse(MINIMAL, &[("TRIAGE_MAX_BATCH_SIZE", "8"), ("TRIAGE_BATCHING__MAX_BATCH_SIZE", "16")]).unwrap();
        assert_eq!(c.batching.policy.max_batch_size, 16);
        let c = parse(MINIMAL, &[("TRIAGE_METRICS_SERVICE_HOST", "10.0.0.1"), ("TRIAGE_METRICS_SERVICE_PORT", "9464")]).unwrap();
        assert_eq!(c.metrics.address, MetricsConfig::default().address, "Kubernetes service variables are not settings");
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
        let cascade = |routes: &str| parse(routes, &[]).map(|c| c.routes.iter().map(Config::tiers).collect::<Vec<_>>());
        let tiers = cascade("[[routes]]\ntopic = \"t\"\nkind = \"x\"\ncascade = [\"fast\", \"accurate\"]").unwrap();
        assert_eq!(tiers, vec![vec![PathBuf::from("fast"), PathBuf::from("accurate")]], "model defaults to the first tier");
        let err = |routes: &str| cascade(routes).unwrap_err().to_string();
        assert!(err("[[routes]]\ntopic = \"t\"\nkind = \"x\"").contains("names no model"));
        assert!(err("[[routes]]\ntopic = \"t\"\nkind = \"x\"\nmodel = \"b\"\ncascade = [\"a\", \"b\"]").contains("not the first tier"));
        assert!(err("[[routes]]\ntopic = \"t\"\nkind = \"x\"\ncascade = [\"a\", \"a\"]").contains("twice"));
        let looped = "[[routes]]\ntopic = \"t\"\nkind = \"x\"\ncascade = [\"a\", \"b\"]\n[[routes]]\ntopic = \"u\"\nkind = \"x\"\ncascade = [\"b\", \"a\"]";
        assert!(err(looped).contains("loop"), "{}", err(looped));
        let shared = "[[routes]]\ntopic = \"t\"\nkind = \"x\"\ncascade = [\"a\", \"b\"]\n[[routes]]\ntopic = \"u\"\nkind = \"x\"\ncascade = [\"b\", \"c\"]";
        assert_eq!(cascade(shared).unwrap().len(), 2, "a chain through a shared model is no loop");
    }
}
