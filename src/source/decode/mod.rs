//! Producers' bytes -> a JSON record, by the route's format: JSON as it is; Avro, Protobuf and
//! JSON Schema in Confluent's wire format with their schemas from a registry ([`registry`]), or
//! unframed against a schema the route pins. The record then goes through the SAME field map
//! and template as a JSON message ([`crate::message::Decoder::decode_value`]), so ids, event
//! times, texts and metadata are configured one way whatever the producer wrote.
//!
//! Reading never waits: a record whose schema is not known yet asks for a look-up
//! ([`Step::Fetch`]), which the caller runs off its hot path and then reads again.

pub mod avro;
pub mod frame;
pub mod json_schema;
pub mod protobuf;
pub mod registry;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::message::{DecodeError, DecodeReason};
use registry::{LookupError, Registry, Schema};

/// What producers write to a route's topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Json,
    Avro,
    Protobuf,
    JsonSchema,
}

impl std::str::FromStr for Format {
    type Err = String;

    /// The config's spelling: `json`, `avro`, `protobuf`, `json_schema`.
    fn from_str(text: &str) -> Result<Self, String> {
        [Format::Json, Format::Avro, Format::Protobuf, Format::JsonSchema]
            .into_iter()
            .find(|f| f.as_str() == text)
            .ok_or_else(|| format!("unknown format `{text}` (json, avro, protobuf, json_schema)"))
    }
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
            Format::Protobuf => "protobuf",
            Format::JsonSchema => "json_schema",
        }
    }

    /// The dead-letter reason of a payload its schema cannot read.
    fn unreadable(self) -> DecodeReason {
        match self {
            Format::Avro => DecodeReason::NotAvro,
            Format::Protobuf => DecodeReason::NotProtobuf,
            Format::Json | Format::JsonSchema => DecodeReason::SchemaMismatch,
        }
    }
}

/// A route's pinned schema: producers write raw (unframed) payloads with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PinnedSchema {
    /// An `.avsc` file (Avro), a serialized FileDescriptorSet (Protobuf: `protoc
    /// --include_imports --descriptor_set_out`), or a JSON Schema file.
    pub file: Option<PathBuf>,
    /// Protobuf: the full name of the message every payload is (`shop.Ticket`).
    pub message: Option<String>,
}

impl PinnedSchema {
    pub fn is_empty(&self) -> bool {
        self.file.is_none() && self.message.is_none()
    }
}

/// Where a route's schemas come from.
#[derive(Debug)]
enum Schemas {
    Json,
    Registry(Arc<Registry>),
    Pinned(Arc<Schema>),
}

/// How one route's payloads become JSON records.
#[derive(Debug)]
pub struct RecordReader {
    format: Format,
    schemas: Schemas,
    max_bytes: usize,
}

/// One step of reading a payload.
#[derive(Debug)]
pub enum Step {
    Record(Value),
    Bad(DecodeError),
    /// The schema with this id must be looked up first ([`RecordReader::fetch`]).
    Fetch(u32),
}

impl RecordReader {
    /// Plain JSON.
    pub fn json(max_bytes: usize) -> Self {
        RecordReader { format: Format::Json, schemas: Schemas::Json, max_bytes }
    }

    /// `format` through a registry (shared by the routes that use it), or with a pinned schema.
    pub fn new(format: Format, pinned: &PinnedSchema, registry: Option<Arc<Registry>>, max_bytes: usize) -> Result<Self, String> {
        let schemas = match (format, &pinned.file, registry) {
            (Format::Json, None, _) => Schemas::Json,
            (Format::Json, Some(_), _) => return Err("format = \"json\" takes no schema".into()),
            (_, Some(file), _) => Schemas::Pinned(Arc::new(load_pinned(format, file, pinned.message.as_deref())?)),
            (_, None, Some(registry)) => Schemas::Registry(registry),
            (_, None, None) => {
                return Err(format!("format = \"{}\" needs [schema_registry] urls, or a pinned schema.file", format.as_str()))
            }
        };
        Ok(RecordReader { format, schemas, max_bytes })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Read `bytes` now if everything needed is at hand.
    pub fn read(&self, bytes: &[u8]) -> Step {
        if bytes.len() > self.max_bytes {
            return bad(DecodeReason::TooLarge, format!("{} bytes exceeds the {} byte limit", bytes.len(), self.max_bytes));
        }
        match &self.schemas {
            Schemas::Json => match crate::message::parse_json(bytes) {
                Ok(v) => Step::Record(v),
                Err(e) => Step::Bad(e),
            },
            Schemas::Pinned(schema) => self.with_schema(schema, &[], bytes),
            Schemas::Registry(registry) => {
                let frame = match frame::parse(bytes, self.format == Format::Protobuf) {
                    Ok(f) => f,
                    Err(e) => return bad(DecodeReason::NotFramed, e.to_string()),
                };
                match registry.cached(frame.schema_id) {
                    Some(Ok(schema)) => self.with_schema(&schema, &frame.message_indexes, frame.payload),
                    Some(Err(e)) => lookup_failed(e),
                    None => Step::Fetch(frame.schema_id),
                }
            }
        }
    }

    /// Look the schema `id` up (waiting out a registry that is away). Err: the registry refuses
    /// triage, which no message can get past.
    pub async fn fetch(&self, id: u32) -> Result<(), LookupError> {
        match &self.schemas {
            Schemas::Registry(registry) => match registry.schema(id).await {
                Err(e @ LookupError::Refused { .. }) => Err(e),
                // A 404 or a broken schema is remembered: the next read dead-letters it.
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// The registry behind this route, if any (for readiness and pausing while it is away).
    pub fn registry(&self) -> Option<&Arc<Registry>> {
        match &self.schemas {
            Schemas::Registry(r) => Some(r),
            _ => None,
        }
    }

    fn with_schema(&self, schema: &Schema, indexes: &[usize], payload: &[u8]) -> Step {
        let read = match (self.format, schema) {
            (Format::Avro, Schema::Avro(r)) => r.read(payload),
            (Format::Protobuf, Schema::Protobuf(r)) => r.read(indexes, payload),
            (Format::JsonSchema, Schema::Json(r)) => r.read(payload).map_err(|m| match m {
                json_schema::Mismatch::NotJson(e) => format!("not JSON: {e}"),
                json_schema::Mismatch::Schema(e) => e,
            }),
            (format, schema) => {
                return bad(
                    DecodeReason::SchemaMismatch,
                    format!("the route reads {} but the message's schema is {}", format.as_str(), schema.kind()),
                )
            }
        };
        match read {
            Ok(v) if v.is_object() => Step::Record(v),
            Ok(_) => bad(DecodeReason::NotObject, "the record is not an object".into()),
            Err(e) => bad(self.format.unreadable(), e),
        }
    }
}

fn bad(reason: DecodeReason, detail: String) -> Step {
    Step::Bad(DecodeError { reason, detail })
}

fn lookup_failed(e: LookupError) -> Step {
    match e {
        LookupError::NotFound(_) => bad(DecodeReason::SchemaNotFound, e.to_string()),
        LookupError::Invalid { .. } | LookupError::Refused { .. } => bad(DecodeReason::SchemaInvalid, e.to_string()),
    }
}

fn load_pinned(format: Format, file: &std::path::Path, message: Option<&str>) -> Result<Schema, String> {
    let read = |f: &std::path::Path| std::fs::read(f).map_err(|e| format!("schema.file {}: {e}", f.display()));
    match format {
        Format::Avro => {
            let text = String::from_utf8(read(file)?).map_err(|_| format!("{} is not UTF-8", file.display()))?;
            avro::AvroReader::parse(&text, &[]).map(Schema::Avro).map_err(|e| format!("{}: {e}", file.display()))
        }
        Format::Protobuf => {
            let message = message.ok_or("format = \"protobuf\" with a pinned schema needs schema.message (the message's full name)")?;
            protobuf::ProtobufReader::pinned(&read(file)?, message).map(Schema::Protobuf).map_err(|e| format!("{}: {e}", file.display()))
        }
        Format::JsonSchema => {
            let text = String::from_utf8(read(file)?).map_err(|_| format!("{} is not UTF-8", file.display()))?;
            json_schema::JsonSchemaReader::parse(&text, &[]).map(Schema::Json).map_err(|e| format!("{}: {e}", file.display()))
        }
        Format::Json => Err("format = \"json\" takes no schema".into()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn avsc(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("t.avsc");
        std::fs::write(
            &path,
            r#"{"type": "record", "name": "T", "fields": [{"name": "body", "type": "string"}, {"name": "n", "type": ["null", "long"]}]}"#,
        )
        .unwrap();
        path
    }

    #[test]
    fn a_pinned_avro_schema_reads_raw_payloads_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = PinnedSchema { file: Some(avsc(dir.path())), message: None };
        let reader = RecordReader::new(Format::Avro, &pinned, None, 1000).unwrap();
        let schema = avro::AvroReader::parse(&std::fs::read_to_string(dir.path().join("t.avsc")).unwrap(), &[]).unwrap();
        let bytes = schema.write(&json!({"body": "hi", "n": 4})).unwrap();
        assert!(matches!(reader.read(&bytes), Step::Record(v) if v == json!({"body": "hi", "n": 4})));
        let reason = |b: &[u8]| match reader.read(b) {
            Step::Bad(e) => e.reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(b"\x02"), DecodeReason::NotAvro);
        assert_eq!(reason(&[0u8; 1001]), DecodeReason::TooLarge);
    }

    #[test]
    fn a_route_is_checked_for_what_its_format_needs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RecordReader::new(Format::Avro, &PinnedSchema::default(), None, 10).unwrap_err().contains("[schema_registry]"));
        assert!(RecordReader::new(Format::Json, &PinnedSchema { file: Some(avsc(dir.path())), message: None }, None, 10).is_err());
        let proto = PinnedSchema { file: Some(avsc(dir.path())), message: None };
        assert!(RecordReader::new(Format::Protobuf, &proto, None, 10).unwrap_err().contains("schema.message"));
        let missing = PinnedSchema { file: Some(dir.path().join("nope.avsc")), message: None };
        assert!(RecordReader::new(Format::Avro, &missing, None, 10).unwrap_err().contains("nope.avsc"));
    }

    #[test]
    fn json_routes_read_as_before() {
        let reader = RecordReader::json(100);
        assert!(matches!(reader.read(br#"{"body": "x"}"#), Step::Record(_)));
        assert!(matches!(reader.read(b"nope"), Step::Bad(e) if e.reason == DecodeReason::NotJson));
    }
}
