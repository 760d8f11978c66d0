//! `[kafka]`: brokers, security, the consumer group, the side topics, and how every Kafka
//! client the project makes is configured: [`KafkaConfig::client`] builds each role's
//! librdkafka settings and applies `[kafka.properties]` last, for every role alike.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::config::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// The Kafka clients triage makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRole {
    /// The worker's group member: manual commits of what is done, cooperative rebalancing.
    Consumer,
    /// `triage produce` and redrive's writes: idempotent, acks=all.
    Producer,
    /// The worker's dead-letter / escalation producer: a Producer whose `message.max.bytes`
    /// admits any payload the worker accepts (its `max_message_bytes`) plus headers.
    SideTopics { max_message_bytes: usize },
    /// `triage redrive` reading the dead-letter topic in its own group: `<group_id>-redrive`,
    /// or `<group_id>-redrive.<reason>` for one reason (each keeps its own position).
    Redrive { reason: Option<String> },
    /// Reads the group's committed offsets and the partitions' ends; joins nothing.
    Observer,
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
    /// Consumed-but-not-committed messages at which fetching pauses (until a commit covers
    /// half). Bounds memory, what a SIGTERM must finish, and what a crash (SIGKILL, OOM kill)
    /// replays: at most this many per worker. Keep it to a few seconds of the model's
    /// throughput, well under shutdown.drain_timeout_ms (5,000 is ~5 s of the default model on
    /// 2 cores); throughput is capped near max_in_flight per commit round trip (commits run at
    /// every 200-500 ms tick while paused), far above what a CPU model reaches.
    pub max_in_flight: usize,
    /// A partition whose oldest unfinished message is older than this is stalled: /readyz fails
    /// naming it, and `triage_oldest_unfinished_seconds` shows it (0: never). An idle partition
    /// is not stalled.
    pub max_unfinished_age_ms: u64,
    /// Any librdkafka property, passed through (applied last).
    pub properties: BTreeMap<String, String>,
    pub dead_letter_topic: String,
    pub escalation_topic: String,
    /// `triage topics apply`: partitions and replication factor of the side topics it creates.
    pub side_topic_partitions: i32,
    pub side_topic_replication: i32,
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
            max_unfinished_age_ms: 600_000,
            properties: BTreeMap::new(),
            dead_letter_topic: "triage.dead-letter".into(),
            escalation_topic: "triage.escalations".into(),
            side_topic_partitions: 3,
            side_topic_replication: 3,
        }
    }
}

/// Settings triage makes for its delivery guarantee, which `[kafka.properties]` may not undo:
/// (key, the only accepted values, why). `group.id` is refused outright (use `kafka.group_id`).
pub const GUARANTEE_SETTINGS: &[(&str, &[&str], &str)] = &[
    ("enable.auto.commit", &["false"], "offsets are committed only for messages that are done"),
    ("enable.auto.offset.store", &["false"], "offsets are stored only for messages that are done"),
    ("enable.idempotence", &["true"], "a retried dead letter or escalation must not be written twice"),
    ("acks", &["all", "-1"], "an acknowledged dead letter or escalation must be on every in-sync replica"),
];

impl KafkaConfig {
    /// The librdkafka settings of one client role, `[kafka.properties]` applied last.
    pub fn client(&self, role: ClientRole) -> ClientConfig {
        let mut c = self.connection();
        match role {
            ClientRole::Consumer => {
                c.set("group.id", &self.group_id)
                    .set("partition.assignment.strategy", "cooperative-sticky")
                    // Offsets are committed by the worker, only for what is done.
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    .set("auto.offset.reset", &self.auto_offset_reset)
                    .set("session.timeout.ms", self.session_timeout_ms.to_string())
                    .set("max.poll.interval.ms", self.max_poll_interval_ms.to_string())
                    // librdkafka's own prefetch is memory too: keep it modest (pausing bounds the rest).
                    .set("queued.max.messages.kbytes", "16384")
                    .set("enable.partition.eof", "false")
                    .set("statistics.interval.ms", "5000");
            }
            ClientRole::Producer => {
                c.set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "5").set("compression.type", "zstd");
            }
            ClientRole::SideTopics { max_message_bytes } => {
                c.set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "5").set("compression.type", "zstd");
                // librdkafka's default (1,000,000) refuses a dead letter of a 1 MiB message.
                c.set("message.max.bytes", crate::sink::kafka::producer_message_limit(max_message_bytes).to_string());
            }
            ClientRole::Redrive { reason } => {
                c.set("group.id", crate::kafka_tools::redrive_group(&self.group_id, reason.as_deref()))
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    .set("auto.offset.reset", "earliest");
            }
            ClientRole::Observer => {
                c.set("group.id", &self.group_id);
            }
        }
        for (key, value) in &self.properties {
            c.set(key, value);
        }
        c
    }

    /// Brokers and security: what every role shares.
    fn connection(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c.set(
            "security.protocol",
            match self.security_protocol {
                SecurityProtocol::Plaintext => "plaintext",
                SecurityProtocol::Ssl => "ssl",
                SecurityProtocol::SaslPlaintext => "sasl_plaintext",
                SecurityProtocol::SaslSsl => "sasl_ssl",
            },
        );
        if let Some(m) = self.sasl_mechanism {
            c.set(
                "sasl.mechanism",
                match m {
                    SaslMechanism::Plain => "PLAIN",
                    SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                    SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
                },
            );
        }
        if let Some(u) = &self.sasl_username {
            c.set("sasl.username", u);
        }
        if !self.sasl_password.expose().is_empty() {
            c.set("sasl.password", self.sasl_password.expose());
        }
        if let Some(ca) = &self.ssl_ca_location {
            c.set("ssl.ca.location", ca.display().to_string());
        }
        c
    }

    /// Everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), String> {
        if self.bootstrap_servers.trim().is_empty() || self.group_id.trim().is_empty() {
            return Err("kafka.bootstrap_servers and kafka.group_id are required".into());
        }
        let sasl = matches!(self.security_protocol, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl);
        if sasl && (self.sasl_mechanism.is_none() || self.sasl_username.is_none() || self.sasl_password.expose().is_empty()) {
            return Err(
                "kafka.security_protocol is SASL: set sasl_mechanism, sasl_username and sasl_password (or sasl_password_file)".into()
            );
        }
        if !sasl && self.sasl_mechanism.is_some() {
            return Err("kafka.sasl_mechanism is set but security_protocol is not sasl_plaintext or sasl_ssl".into());
        }
        if self.max_in_flight == 0 || self.commit_interval_ms == 0 {
            return Err("kafka.max_in_flight and kafka.commit_interval_ms must be positive".into());
        }
        if !["earliest", "latest"].contains(&self.auto_offset_reset.as_str()) {
            return Err(format!("kafka.auto_offset_reset must be earliest or latest, not `{}`", self.auto_offset_reset));
        }
        if self.side_topic_partitions < 1 || self.side_topic_replication < 1 {
            return Err("kafka.side_topic_partitions and kafka.side_topic_replication must be at least 1".into());
        }
        for (key, value) in &self.properties {
            let key = key.trim().to_ascii_lowercase();
            if key == "group.id" {
                return Err("kafka.properties may not set `group.id`: set kafka.group_id (redrive derives its own group from it)".into());
            }
            if let Some((_, accepted, why)) = GUARANTEE_SETTINGS.iter().find(|(k, ..)| *k == key) {
                if !accepted.iter().any(|a| a.eq_ignore_ascii_case(value.trim())) {
                    return Err(format!(
                        "kafka.properties `{key} = {value}` would break triage's delivery guarantee ({why}); remove it (triage sets {key} = {})",
                        accepted[0]
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secured() -> KafkaConfig {
        KafkaConfig {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("svc".into()),
            sasl_password: Secret::new("pw"),
            properties: [("fetch.max.bytes".to_string(), "1048576".to_string()), ("auto.offset.reset".to_string(), "latest".to_string())]
                .into(),
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn security_and_pass_through_properties_reach_librdkafka() {
        let c = secured().client(ClientRole::Consumer);
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.password"), Some("pw"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("partition.assignment.strategy"), Some("cooperative-sticky"));
        assert_eq!(c.get("fetch.max.bytes"), Some("1048576"));
        assert_eq!(c.get("auto.offset.reset"), Some("latest"), "pass-through properties are applied last");
    }

    #[test]
    fn properties_that_would_break_the_guarantee_are_refused_by_name() {
        let with = |k: &str, v: &str| KafkaConfig { properties: [(k.to_string(), v.to_string())].into(), ..KafkaConfig::default() };
        for (key, value) in [
            ("enable.auto.commit", "true"),
            ("enable.auto.offset.store", "true"),
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("ACKS", "0"),
        ] {
            let err = with(key, value).validate().unwrap_err();
            assert!(err.contains(&format!("`{} = {value}`", key.to_ascii_lowercase())) && err.contains("guarantee"), "{err}");
        }
        assert!(with("group.id", "x").validate().unwrap_err().contains("kafka.group_id"));
        for (key, value) in [
            ("enable.auto.commit", "false"),
            ("acks", "-1"),
            ("auto.offset.reset", "latest"),
            ("fetch.max.bytes", "1048576"),
            ("ssl.endpoint.identification.algorithm", "none"),
            ("sasl.oauthbearer.config", "x"),
        ] {
            assert_eq!(with(key, value).validate(), Ok(()), "{key} is safe to set");
        }
    }

    #[test]
    fn every_role_gets_the_security_settings_and_the_properties() {
        let k = secured();
        for role in [
            ClientRole::Consumer,
            ClientRole::Producer,
            ClientRole::SideTopics { max_message_bytes: 1 },
            ClientRole::Redrive { reason: None },
            ClientRole::Observer,
        ] {
            let c = k.client(role.clone());
            assert_eq!(c.get("sasl.username"), Some("svc"), "{role:?}");
            assert_eq!(c.get("security.protocol"), Some("sasl_ssl"), "{role:?}");
            assert_eq!(c.get("fetch.max.bytes"), Some("1048576"), "{role:?}: [kafka.properties] reach every client");
        }
        assert_eq!(k.client(ClientRole::Redrive { reason: None }).get("group.id"), Some("triage-redrive"));
        assert_eq!(k.client(ClientRole::Redrive { reason: Some("not_json".into()) }).get("group.id"), Some("triage-redrive.not_json"));
        assert_eq!(k.client(ClientRole::Observer).get("group.id"), Some("triage"));
        assert_eq!(k.client(ClientRole::Producer).get("enable.idempotence"), Some("true"));
        assert_eq!(k.client(ClientRole::Producer).get("group.id"), None);
        let side = k.client(ClientRole::SideTopics { max_message_bytes: 2 << 20 });
        assert_eq!(side.get("message.max.bytes"), Some((2 * 1024 * 1024 + 64 * 1024).to_string().as_str()), "any accepted payload fits");
        assert_eq!(side.get("acks"), Some("all"));
    }
}
