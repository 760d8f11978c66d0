//! `triage demo`: the whole path on embedded defaults. A mock Kafka cluster, a private
//! ClickHouse server, the bundled sample of tickets, returns and e-mails (or N messages made
//! from them), and the worker; then what landed, read back from ClickHouse the way analysts
//! read it (FINAL), with the messages beside their answers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use serde_json::Value;

use crate::config::ClientRole;
use crate::config::{ClickHouseConfig, Config, RouteConfig};
use crate::headers::{HEADER_DETAIL, HEADER_REASON};
use crate::kafka_tools::{produce, read_json_lines, Record};
use crate::local::registry::{Access, LocalSchemaRegistry};
use crate::local::{local_kafka_config, local_worker_config, until_caught_up, LocalClickHouse, LocalKafka, LocalRunError};
use crate::message::FieldMap;
use crate::model::{Descriptor, InferenceOptions};
use crate::sink::clickhouse::ClickHouseService;
use crate::source::decode::writer::FramedWriter;
use crate::source::decode::Format;
use crate::worker::policy::EscalationPolicy;
use crate::worker::{self, RunReport};

pub type DemoError = LocalRunError;

pub struct DemoOptions {
    pub model_dir: PathBuf,
    /// Folder with tickets.jsonl, returns.jsonl, emails.jsonl.
    pub data_dir: PathBuf,
    pub inference: InferenceOptions,
    /// Make this many messages from the samples (each sample in turn, with its own id) instead
    /// of sending each sample once.
    pub messages: Option<u64>,
    /// How the producers write: JSON, or Avro in Confluent's wire format with the schema
    /// (`<data_dir>/ticket.avsc`) in a stand-in registry started for the demo.
    pub format: Format,
}

/// How far the demo is.
pub enum DemoProgress<'a> {
    Step(&'a str),
    /// Rows stored in ClickHouse so far, of the messages sent.
    Stored {
        rows: u64,
        of: u64,
    },
}

/// (topic, kind, sample file, partitions)
const STREAMS: &[(&str, &str, &str, i32)] = &[
    ("support-tickets", "ticket", "tickets.jsonl", 3),
    ("product-returns", "return", "returns.jsonl", 2),
    ("customer-emails", "email", "emails.jsonl", 2),
];

/// One bundled message, as a reader sees it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub kind: &'static str,
    pub text: String,
}

pub struct DemoRun {
    pub report: RunReport,
    pub produced: u64,
    pub config: Config,
    pub clickhouse: LocalClickHouse,
    pub kafka: LocalKafka,
    /// The bundled messages by id (the first copy's id when messages were made from them).
    pub samples: HashMap<String, Sample>,
    /// The escalation rule the routes resolved to (all use the same model).
    pub policy: EscalationPolicy,
    /// The stand-in schema registry of an Avro demo.
    pub registry: Option<LocalSchemaRegistry>,
}

/// The bundled lines of one stream, as records (bytes untouched: a bad line stays bad).
fn read_samples(path: &std::path::Path) -> Result<Vec<Record>, DemoError> {
    let file = std::fs::File::open(path).map_err(|e| DemoError::Other(format!("{}: {e}", path.display())))?;
    read_json_lines(std::io::BufReader::new(file)).collect::<Result<Vec<_>, _>>().map_err(|e| DemoError::Other(e.to_string()))
}

/// The text a reader would recognise: subject and body.
fn sample_text(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let part = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().trim().to_string();
    let (subject, body) = (part("subject"), part("body"));
    Some(match (subject.is_empty(), body.is_empty()) {
        (false, false) => format!("{subject}: {body}"),
        (false, true) => subject,
        _ => body,
    })
}

/// Copy `n` of a stream's samples, in turn; copy `i` of a JSON sample gets the id `<id>-<i>`.
fn copies(samples: &[Record], total_streams_share: u64) -> impl Iterator<Item = Result<Record, crate::kafka_tools::ToolError>> + '_ {
    (0..total_streams_share).map(move |i| {
        let sample = &samples[(i as usize) % samples.len()];
        let round = i / samples.len() as u64;
        let copy = match serde_json::from_slice::<Value>(&sample.payload) {
            Ok(Value::Object(mut object)) if sample.key.is_some() => {
                let id = format!("{}-{round}", sample.key.as_deref().unwrap_or_default());
                object.insert("id".into(), Value::String(id.clone()));
                Record { key: Some(id), payload: Value::Object(object).to_string().into_bytes() }
            }
            _ => Record { key: None, payload: sample.payload.clone() },
        };
        Ok(copy)
    })
}

pub async fn run(options: DemoOptions, progress: Arc<dyn Fn(DemoProgress) + Send + Sync>) -> Result<DemoRun, DemoError> {
    let step = |s: &str| progress(DemoProgress::Step(s));
    step("starting a mock Kafka cluster (librdkafka's, real protocol on loopback)");
    let kafka = LocalKafka::start(1)?;
    step("starting a private ClickHouse server on loopback");
    let clickhouse = tokio::task::spawn_blocking(LocalClickHouse::start).await.map_err(|e| DemoError::Other(e.to_string()))??;

    let registry = match options.format {
        Format::Json => None,
        Format::Avro => {
            step("starting a stand-in schema registry on loopback (Confluent's REST subset)");
            Some(
                LocalSchemaRegistry::start("127.0.0.1:0", Access::Open, None)
                    .await
                    .map_err(|e| DemoError::Other(format!("schema registry: {e}")))?,
            )
        }
        other => return Err(DemoError::Other(format!("the demo runs on json or avro, not {}", other.as_str()))),
    };
    let fields = FieldMap { timestamp: vec!["created_at".into()], ..FieldMap::default() };
    let routes: Vec<RouteConfig> = STREAMS
        .iter()
        .map(|(topic, kind, _, _)| {
            let mut route = RouteConfig::new(*topic, *kind, options.model_dir.clone());
            route.fields = fields.clone();
            route.metadata = [("tier".to_string(), "/customer/tier".to_string())].into();
            route.format = options.format;
            route
        })
        .collect();
    let mut config = local_worker_config(
        "demo-worker",
        local_kafka_config(&kafka, "triage-demo"),
        ClickHouseConfig { url: clickhouse.url(), insert_interval_ms: 200, ..ClickHouseConfig::default() },
        routes,
        options.inference.clone(),
    );
    if let Some(registry) = &registry {
        config.schema_registry.urls = vec![registry.url()];
    }
    config.validate().map_err(|e| DemoError::Other(e.to_string()))?;
    let descriptor = Descriptor::load(&options.model_dir)?;
    let policy = EscalationPolicy::resolve(&config.routes[0], &descriptor, descriptor.ood.is_some(), config.escalation.default_threshold);
    for (topic, _, _, partitions) in STREAMS {
        kafka.create_topic(topic, *partitions)?;
    }
    kafka.create_topic(&config.kafka.dead_letter_topic, 1)?;
    kafka.create_topic(&config.kafka.escalation_topic, 1)?;
    ClickHouseService::new(&config.clickhouse).apply_schema().await?;

    let mut streams = Vec::new();
    let mut samples = HashMap::new();
    for (topic, kind, file, _) in STREAMS {
        let records = read_samples(&options.data_dir.join(file))?;
        for r in &records {
            if let (Some(id), Some(text)) = (&r.key, sample_text(&r.payload)) {
                let id = if options.messages.is_some() { format!("{id}-0") } else { id.clone() };
                samples.insert(id, Sample { kind, text });
            }
        }
        streams.push((*topic, records));
    }
    let bundled: u64 = streams.iter().map(|(_, r)| r.len() as u64).sum();
    let producer: FutureProducer = config.kafka.client(ClientRole::Producer).create()?;
    let mut produced = 0;
    let http = crate::http::HttpClient::new(None, Duration::from_secs(10), 1 << 20).map_err(|e| DemoError::Other(e.to_string()))?;
    for (topic, records) in &streams {
        let writer = match &registry {
            Some(registry) => {
                let schema = options.data_dir.join("ticket.avsc");
                let writer = FramedWriter::register(&http, &registry.url(), &format!("{topic}-value"), Format::Avro, &schema, None)
                    .await
                    .map_err(|e| DemoError::Other(format!("{}: {e}", schema.display())))?;
                step(&format!("registered {} as {topic}-value (schema id {})", schema.display(), writer.schema_id()));
                Some(writer)
            }
            None => None,
        };
        // Avro: each JSON record encoded and framed; a line that is not JSON (or does not fit
        // the schema) stays as it is, for the worker to dead-letter (not_framed).
        let encode = |record: Record| match &writer {
            Some(writer) => match serde_json::from_slice::<Value>(&record.payload).map(|json| writer.encode(&json)) {
                Ok(Ok(payload)) => Record { key: record.key, payload },
                _ => record,
            },
            None => record,
        };
        let n = match options.messages {
            // Each stream's share of N, in proportion to its samples.
            Some(total) => {
                let share = total * records.len() as u64 / bundled.max(1);
                produce(&producer, topic, copies(records, share).map(|r| r.map(encode)), None, |_| {}).await?.0
            }
            None => {
                produce(
                    &producer,
                    topic,
                    records.iter().map(|r| Ok(encode(Record { key: r.key.clone(), payload: r.payload.clone() }))),
                    None,
                    |_| {},
                )
                .await?
                .0
            }
        };
        step(&format!("produced {n} messages to {topic}"));
        produced += n;
    }

    step("running the worker until every message is committed");
    let watcher = {
        let (progress, url) = (progress.clone(), config.clickhouse.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if let Ok(rows) = stored_rows(&url).await {
                    progress(DemoProgress::Stored { rows, of: produced });
                }
            }
        })
    };
    let done = until_caught_up(config.kafka.clone(), STREAMS.iter().map(|s| s.0.to_string()).collect());
    let report = worker::run(config.clone(), done).await;
    watcher.abort();
    let report = report?;
    Ok(DemoRun { report, produced, config, clickhouse, kafka, samples, policy, registry })
}

async fn stored_rows(config: &ClickHouseConfig) -> Result<u64, clickhouse::error::Error> {
    client(config).query(&format!("SELECT count() FROM {}", config.table)).fetch_one().await
}

fn client(config: &ClickHouseConfig) -> clickhouse::Client {
    clickhouse::Client::default().with_url(&config.url).with_database(&config.database).with_validation(false)
}

#[derive(Debug, clickhouse::Row, Deserialize)]
pub struct CountRow {
    pub key: String,
    pub messages: u64,
}

/// Counts grouped by an expression, read once per message (FINAL).
pub async fn counts(config: &ClickHouseConfig, expr: &str, limit: usize) -> Result<Vec<CountRow>, clickhouse::error::Error> {
    client(config)
        .query(&format!(
            "SELECT toString({expr}) AS key, count() AS messages FROM {} FINAL GROUP BY key ORDER BY messages DESC, key LIMIT {limit}",
            config.table
        ))
        .fetch_all()
        .await
}

/// Escalated messages, and why: (all, out of distribution, low confidence), by the rule the
/// worker applied (the OOD gate first, as it does).
pub async fn escalations(config: &ClickHouseConfig, policy: &EscalationPolicy) -> Result<(u64, u64, u64), clickhouse::error::Error> {
    #[derive(clickhouse::Row, Deserialize)]
    struct Why {
        all: u64,
        ood: u64,
        low: u64,
    }
    let ood = policy.ood_threshold.map_or("0".to_string(), |t| format!("ifNull(ood_score, 0) > {t}"));
    let sql = format!(
        "SELECT countIf(escalated = 1) AS all, countIf(escalated = 1 AND {ood}) AS ood, countIf(escalated = 1 AND NOT ({ood}) AND confidence < {}) AS low FROM {} FINAL",
        policy.threshold, config.table
    );
    let Why { all, ood, low } = client(config).query(&sql).fetch_one().await?;
    Ok((all, ood, low))
}

/// One message's answer, as the summary shows it.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct Answer {
    pub message_id: String,
    pub kind: String,
    pub category: String,
    pub confidence: f32,
    pub priority: String,
    pub escalated: u8,
    pub ood_score: Option<f32>,
}

/// The answers for `ids` (read once, FINAL).
pub async fn answers(config: &ClickHouseConfig, ids: &[String]) -> Result<Vec<Answer>, clickhouse::error::Error> {
    let list: Vec<String> = ids.iter().map(|id| format!("'{}'", id.replace('\\', "\\\\").replace('\'', "\\'"))).collect();
    let sql = format!(
        "SELECT message_id, kind, category, confidence, priority, escalated, ood_score FROM {} FINAL WHERE message_id IN ({}) ORDER BY message_id",
        config.table,
        if list.is_empty() { "''".to_string() } else { list.join(", ") }
    );
    client(config).query(&sql).fetch_all().await
}

/// Every dead letter of the run: (the message's key, reason, detail).
pub fn dead_letters(run: &DemoRun) -> Result<Vec<(String, String, String)>, rdkafka::error::KafkaError> {
    let topic = run.config.kafka.dead_letter_topic.as_str();
    let consumer: BaseConsumer = run.config.kafka.client(ClientRole::Observer).create()?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(5))?;
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)?;
    consumer.assign(&list)?;
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    while (out.len() as i64) < high - low && started.elapsed() < Duration::from_secs(10) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_else(|| "(no key)".into());
        out.push((key, header(HEADER_REASON), header(HEADER_DETAIL)));
    }
    Ok(out)
}
