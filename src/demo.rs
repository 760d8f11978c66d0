//! `triage demo`: the whole path on embedded defaults. A mock Kafka cluster, a private
//! ClickHouse server, the bundled sample of tickets, returns and e-mails, and the worker; then
//! what landed, read back from ClickHouse the way analysts read it (FINAL).

use std::path::PathBuf;

use rdkafka::producer::FutureProducer;
use serde::Deserialize;

use crate::config::ClientRole;
use crate::config::{ClickHouseConfig, Config, RouteConfig};
use crate::kafka_tools::{produce, read_json_lines};
use crate::local::{local_kafka_config, local_worker_config, until_caught_up, LocalClickHouse, LocalKafka, LocalRunError};
use crate::message::FieldMap;
use crate::model::InferenceOptions;
use crate::sink::clickhouse::ClickHouseService;
use crate::worker::{self, RunReport};

pub type DemoError = LocalRunError;

pub struct DemoOptions {
    pub model_dir: PathBuf,
    /// Folder with tickets.jsonl, returns.jsonl, emails.jsonl.
    pub data_dir: PathBuf,
    pub inference: InferenceOptions,
}

/// (topic, kind, sample file, partitions)
const STREAMS: &[(&str, &str, &str, i32)] = &[
    ("support-tickets", "ticket", "tickets.jsonl", 3),
    ("product-returns", "return", "returns.jsonl", 2),
    ("customer-emails", "email", "emails.jsonl", 2),
];

pub struct DemoRun {
    pub report: RunReport,
    pub produced: u64,
    pub config: Config,
    pub clickhouse: LocalClickHouse,
    pub kafka: LocalKafka,
}

pub async fn run(options: DemoOptions, progress: impl Fn(&str)) -> Result<DemoRun, DemoError> {
    progress("starting a mock Kafka cluster (librdkafka's, real protocol on loopback)");
    let kafka = LocalKafka::start(1)?;
    progress("starting a private ClickHouse server on loopback");
    let clickhouse = tokio::task::spawn_blocking(LocalClickHouse::start).await.map_err(|e| DemoError::Other(e.to_string()))??;

    let fields = FieldMap { timestamp: vec!["created_at".into()], ..FieldMap::default() };
    let routes = STREAMS
        .iter()
        .map(|(topic, kind, _, _)| RouteConfig {
            topic: topic.to_string(),
            kind: kind.to_string(),
            model: options.model_dir.clone(),
            fields: fields.clone(),
            metadata: [("tier".to_string(), "/customer/tier".to_string())].into(),
            escalation_threshold: None,
            escalation_head: None,
            ood_threshold: None,
            cascade: Vec::new(),
        })
        .collect();
    let config = local_worker_config(
        "demo-worker",
        local_kafka_config(&kafka, "triage-demo"),
        ClickHouseConfig { url: clickhouse.url(), insert_interval_ms: 200, ..ClickHouseConfig::default() },
        routes,
        options.inference.clone(),
    );
    config.validate().map_err(|e| DemoError::Other(e.to_string()))?;
    for (topic, _, _, partitions) in STREAMS {
        kafka.create_topic(topic, *partitions)?;
    }
    kafka.create_topic(&config.kafka.dead_letter_topic, 1)?;
    kafka.create_topic(&config.kafka.escalation_topic, 1)?;
    ClickHouseService::new(&config.clickhouse).apply_schema().await?;

    let producer: FutureProducer = config.kafka.client(ClientRole::Producer).create()?;
    let mut produced = 0;
    for (topic, _, file, _) in STREAMS {
        let path = options.data_dir.join(file);
        let reader = std::io::BufReader::new(std::fs::File::open(&path).map_err(|e| DemoError::Other(format!("{}: {e}", path.display())))?);
        let (n, _) = produce(&producer, topic, read_json_lines(reader), None, |_| {}).await?;
        progress(&format!("produced {n} messages to {topic}"));
        produced += n;
    }

    progress("running the worker until every message is committed");
    let done = until_caught_up(config.kafka.clone(), STREAMS.iter().map(|s| s.0.to_string()).collect());
    let report = worker::run(config.clone(), done).await?;
    Ok(DemoRun { report, produced, config, clickhouse, kafka })
}

#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct CountRow {
    pub key: String,
    pub messages: u64,
}

/// Counts grouped by an expression, read once per message (FINAL).
pub async fn counts(config: &ClickHouseConfig, expr: &str, limit: usize) -> Result<Vec<CountRow>, clickhouse::error::Error> {
    let client = clickhouse::Client::default().with_url(&config.url).with_database(&config.database).with_validation(false);
    client
        .query(&format!(
            "SELECT toString({expr}) AS key, count() AS messages FROM {} FINAL GROUP BY key ORDER BY messages DESC, key LIMIT {limit}",
            config.table
        ))
        .fetch_all()
        .await
}
