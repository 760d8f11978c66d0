//! `triage produce`: load JSON lines (or a CSV with a header row) into a topic, as JSON or, with
//! `--format avro|protobuf|json_schema`, as a registry-aware producer writes them (the schema
//! registered under `{topic}-value`, each record encoded and framed with its id).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use triage::config::{ClientRole, KafkaConfig};
use triage::kafka_tools;
use triage::source::decode::writer::FramedWriter;
use triage::source::decode::Format;

use super::{open_input, progress_bar, Progress};

#[derive(Args)]
pub struct ProduceArgs {
    #[arg(long, env = "TRIAGE_KAFKA__BOOTSTRAP_SERVERS", default_value = "localhost:9092")]
    bootstrap_servers: String,
    #[arg(long)]
    topic: String,
    /// Messages per second at most (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// The input is a CSV with a header row (default: by the file extension).
    #[arg(long)]
    csv: bool,
    /// How to write each record: json (as it is), or avro / protobuf / json_schema in
    /// Confluent's wire format with --schema registered at --registry.
    #[arg(long, default_value = "json", value_parser = str::parse::<Format>)]
    format: Format,
    /// The schema: an .avsc, a .proto (imports: Google's well-known types only) or a JSON Schema.
    #[arg(long, required_if_eq_any = [("format", "avro"), ("format", "protobuf"), ("format", "json_schema")])]
    schema: Option<PathBuf>,
    /// Protobuf: the full name of the message each record is (default: the file's first).
    #[arg(long)]
    message: Option<String>,
    /// The schema registry's URL.
    #[arg(long, env = "TRIAGE_SCHEMA_REGISTRY_URL", required_if_eq_any = [("format", "avro"), ("format", "protobuf"), ("format", "json_schema")])]
    registry: Option<String>,
    /// The subject the schema is registered under (default: `{topic}-value`, Confluent's
    /// TopicNameStrategy).
    #[arg(long)]
    subject: Option<String>,
    /// JSON lines or CSV ("-" for stdin).
    file: String,
}

pub async fn run(args: ProduceArgs) -> Result<()> {
    let kafka = KafkaConfig { bootstrap_servers: args.bootstrap_servers.clone(), ..Default::default() };
    let producer: rdkafka::producer::FutureProducer = kafka.client(ClientRole::Producer).create()?;
    let is_csv = args.csv || args.file.ends_with(".csv");
    // A JSON-lines file's messages are its lines: count them first for the bar's total.
    let total = match (is_csv, args.file.as_str()) {
        (false, name) if name != "-" => Some(open_input(name)?.reader.split(b'\n').count() as u64),
        _ => None,
    };
    let input = open_input(&args.file)?;
    let bar = progress_bar(Progress::Items("messages"), total);
    let writer = match (args.format, &args.schema, &args.registry) {
        (Format::Json, None, _) => None,
        (Format::Json, Some(_), _) => bail!("--schema goes with --format avro, protobuf or json_schema"),
        (format, Some(schema), Some(registry)) => {
            let http = triage::http::HttpClient::new(None, std::time::Duration::from_secs(30), 16 << 20)?;
            let subject = args.subject.clone().unwrap_or_else(|| format!("{}-value", args.topic));
            let writer = FramedWriter::register(&http, registry, &subject, format, schema, args.message.as_deref())
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("registering {} under {subject}", schema.display()))?;
            eprintln!("{} registered under {subject} at {registry}: schema id {}", schema.display(), writer.schema_id());
            Some(writer)
        }
        (format, _, _) => bail!("--format {} needs --schema and --registry", format.as_str()),
    };
    let records: Box<dyn Iterator<Item = _>> =
        if is_csv { Box::new(kafka_tools::read_csv(input.reader)) } else { Box::new(kafka_tools::read_json_lines(input.reader)) };
    // A record that is not JSON or does not fit the schema is skipped with its reason (a JSON
    // producer writes bad lines as they are, for the worker's dead-letter path to show).
    let mut unencodable = Vec::new();
    let records = records.filter_map(|record| match (&writer, record) {
        (Some(writer), Ok(mut record)) => {
            let encoded = serde_json::from_slice(&record.payload).map_err(|e| e.to_string()).and_then(|json| writer.encode(&json));
            match encoded {
                Ok(bytes) => {
                    record.payload = bytes;
                    Some(Ok(record))
                }
                Err(reason) => {
                    unencodable.push(format!("{}: {reason}", record.key.as_deref().unwrap_or("a record without an id")));
                    None
                }
            }
        }
        (_, other) => Some(other),
    });
    let (sent, skipped) = kafka_tools::produce(&producer, &args.topic, records, args.rate, |n| bar.inc(n)).await?;
    bar.finish_and_clear();
    let skipped: Vec<String> = skipped.into_iter().chain(unencodable).collect();
    for s in &skipped {
        eprintln!("skipped: {s}");
    }
    eprintln!("produced {sent} messages to {} ({} skipped)", args.topic, skipped.len());
    Ok(())
}
