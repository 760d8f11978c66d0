//! The producer's side of the wire format, for `triage produce --format ...` (the demo and
//! anyone loading test data): the schema registered under a subject, as Confluent's serializers
//! do, then each JSON record encoded with it and framed with the id. The worker never writes.

use std::path::Path;

use bytes::Bytes;
use hyper::header::HeaderValue;
use serde_json::{json, Value};

use super::avro::AvroReader;
use super::frame;
use super::json_schema::JsonSchemaReader;
use super::protobuf::ProtobufReader;
use super::Format;
use crate::http::HttpClient;

enum Encoding {
    Avro(AvroReader),
    /// The file's reader and the message-index path of the message written.
    Protobuf(ProtobufReader, Vec<usize>),
    JsonSchema(JsonSchemaReader),
}

/// Encodes JSON records as one registered schema; see the module.
pub struct FramedWriter {
    schema_id: u32,
    encoding: Encoding,
}

impl FramedWriter {
    /// Register `schema_file` (an `.avsc`, a `.proto` without imports beyond Google's, or a
    /// JSON Schema) under `subject` at `registry_url` and make a writer for its id. `message`:
    /// Protobuf only, the full name of the message written (default: the file's first).
    pub async fn register(
        http: &HttpClient,
        registry_url: &str,
        subject: &str,
        format: Format,
        schema_file: &Path,
        message: Option<&str>,
    ) -> Result<Self, String> {
        let text = std::fs::read_to_string(schema_file).map_err(|e| format!("schema file {}: {e}", schema_file.display()))?;
        let (encoding, schema_type) = match format {
            Format::Json => return Err("format json has no schema to register".into()),
            Format::Avro => (Encoding::Avro(AvroReader::parse(&text, &[]).map_err(|e| format!("Avro schema: {e}"))?), "AVRO"),
            Format::Protobuf => {
                let reader = ProtobufReader::compile(&text, &[]).map_err(|e| format!("Protobuf schema: {e}"))?;
                let indexes = match message {
                    Some(name) => reader.indexes_of(name)?,
                    None => vec![0],
                };
                (Encoding::Protobuf(reader, indexes), "PROTOBUF")
            }
            Format::JsonSchema => {
                (Encoding::JsonSchema(JsonSchemaReader::parse(&text, &[]).map_err(|e| format!("JSON Schema: {e}"))?), "JSON")
            }
        };
        let url = format!("{}/subjects/{}/versions", registry_url.trim_end_matches('/'), super::registry::encode_path(subject));
        let uri: hyper::Uri = url.parse().map_err(|e| format!("registry URL {url}: {e}"))?;
        let body = json!({"schema": text, "schemaType": schema_type}).to_string();
        let headers = [("content-type", HeaderValue::from_static("application/vnd.schemaregistry.v1+json"))];
        let reply = http.post(&uri, &headers, Bytes::from(body)).await.map_err(|e| format!("registering at {url}: {e}"))?;
        let answer: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        if !(200..300).contains(&reply.status) {
            return Err(format!("the registry at {url} refused the schema ({}): {answer}", reply.status));
        }
        let schema_id = answer["id"].as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| format!("no schema id in {answer}"))?;
        Ok(FramedWriter { schema_id, encoding })
    }

    pub fn schema_id(&self) -> u32 {
        self.schema_id
    }

    /// One record, encoded and framed; an error says why it does not fit the schema.
    pub fn encode(&self, record: &Value) -> Result<Vec<u8>, String> {
        match &self.encoding {
            Encoding::Avro(avro) => Ok(frame::write(self.schema_id, None, &avro.write(record)?)),
            Encoding::Protobuf(proto, indexes) => Ok(frame::write(self.schema_id, Some(indexes), &proto.write(indexes, record)?)),
            Encoding::JsonSchema(schema) => {
                let bytes = serde_json::to_vec(record).map_err(|e| e.to_string())?;
                schema.read(&bytes).map_err(|e| format!("{e:?}"))?;
                Ok(frame::write(self.schema_id, None, &bytes))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::registry::{Access, LocalSchemaRegistry};

    #[tokio::test]
    async fn a_registered_avro_schema_frames_records_that_read_back() {
        let registry = LocalSchemaRegistry::start("127.0.0.1:0", Access::Open, None).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("t.avsc");
        let avsc = r#"{"type":"record","name":"T","fields":[{"name":"id","type":"string"},{"name":"note","type":["null","string"],"default":null}]}"#;
        std::fs::write(&schema, avsc).unwrap();
        let http = HttpClient::new(None, std::time::Duration::from_secs(5), 1 << 20).unwrap();
        let writer = FramedWriter::register(&http, &registry.url(), "t-value", Format::Avro, &schema, None).await.unwrap();
        let bytes = writer.encode(&json!({"id": "a", "note": "n"})).unwrap();
        let framed = frame::parse(&bytes, false).unwrap();
        assert_eq!(framed.schema_id, writer.schema_id());
        let back = AvroReader::parse(avsc, &[]).unwrap().read(framed.payload).unwrap();
        assert_eq!(back, json!({"id": "a", "note": "n"}));
        assert!(writer.encode(&json!({"note": 3})).is_err(), "a record that does not fit is an error");
        // The same schema again keeps its id, as with a real registry.
        let again = FramedWriter::register(&http, &registry.url(), "t-value", Format::Avro, &schema, None).await.unwrap();
        assert_eq!(again.schema_id(), writer.schema_id());
    }

    #[test]
    fn subjects_are_escaped_in_paths() {
        assert_eq!(super::super::registry::encode_path("tickets-value"), "tickets-value");
        assert_eq!(super::super::registry::encode_path("a/b c.proto"), "a%2Fb%20c.proto");
    }
}
