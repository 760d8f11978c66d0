//! Producers' JSON -> the text a model reads. Every way input can be bad has a
//! [`DecodeReason`] (the dead-letter reason); nothing here panics on input.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Rendered, Template};

/// Default cap on one message's bytes (1 MiB). Longer TEXTS inside a message under the cap are
/// truncated by the model's character budget, not rejected.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeReason {
    TooLarge,
    NotUtf8,
    NotJson,
    NotObject,
    NoText,
    /// A registry route's message without Confluent's framing (magic byte, schema id).
    NotFramed,
    /// The registry does not know the message's schema id.
    SchemaNotFound,
    /// The message's schema cannot be used (it does not compile, or is another format).
    SchemaInvalid,
    /// The payload does not read with its Avro schema.
    NotAvro,
    /// The payload does not read as its Protobuf message.
    NotProtobuf,
    /// The payload does not satisfy its JSON Schema.
    SchemaMismatch,
}

impl DecodeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeReason::TooLarge => "too_large",
            DecodeReason::NotUtf8 => "not_utf8",
            DecodeReason::NotJson => "not_json",
            DecodeReason::NotObject => "not_object",
            DecodeReason::NoText => "no_text",
            DecodeReason::NotFramed => "not_framed",
            DecodeReason::SchemaNotFound => "schema_not_found",
            DecodeReason::SchemaInvalid => "schema_invalid",
            DecodeReason::NotAvro => "not_avro",
            DecodeReason::NotProtobuf => "not_protobuf",
            DecodeReason::SchemaMismatch => "schema_mismatch",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize)]
#[error("{}: {detail}", reason.as_str())]
pub struct DecodeError {
    pub reason: DecodeReason,
    pub detail: String,
}

impl DecodeError {
    fn new(reason: DecodeReason, detail: impl Into<String>) -> Self {
        DecodeError { reason, detail: detail.into() }
    }
}

/// Where to find each piece of a message: per name, candidate locations tried in order. A
/// location starting with `/` is a JSON pointer (`/ticket/subject`), otherwise a top-level key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FieldMap {
    pub id: Vec<String>,
    /// Template field name -> candidate locations. Template fields not listed here are read
    /// from the top-level key of the same name.
    pub text: BTreeMap<String, Vec<String>>,
    /// The event time (RFC 3339 string, or epoch seconds / milliseconds). Unset or absent: the
    /// Kafka message timestamp. Either way the same on every replay.
    pub timestamp: Vec<String>,
}

impl Default for FieldMap {
    fn default() -> Self {
        FieldMap {
            id: vec!["id".into(), "message_id".into(), "ticket_id".into()],
            text: BTreeMap::from([
                ("subject".to_string(), vec!["subject".to_string(), "title".to_string()]),
                ("body".to_string(), vec!["body".to_string(), "text".to_string(), "message".to_string(), "description".to_string()]),
            ]),
            timestamp: Vec::new(),
        }
    }
}

fn lookup<'v>(value: &'v Value, location: &str) -> Option<&'v Value> {
    if location.starts_with('/') {
        value.pointer(location)
    } else {
        value.get(location)
    }
}

/// A scalar as text; objects, arrays and null are not text.
fn as_text(value: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s.as_str())),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(std::borrow::Cow::Owned(b.to_string())),
        _ => None,
    }
}

/// Epoch milliseconds from a JSON timestamp: RFC 3339 text, or a number of seconds (below
/// 10^11) or milliseconds.
pub fn parse_timestamp_ms(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => {
            let v = n.as_f64()?;
            if !v.is_finite() || v < 0.0 {
                return None;
            }
            Some(if v < 1e11 { (v * 1000.0) as i64 } else { v as i64 })
        }
        Value::String(s) => {
            let t = humantime::parse_rfc3339_weak(s.trim()).ok()?;
            t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis() as i64)
        }
        _ => None,
    }
}

/// A decoded message, ready for the tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedMessage {
    pub id: Option<String>,
    pub text: Rendered,
    /// From the configured timestamp field, when present and parseable.
    pub event_time_ms: Option<i64>,
    pub json: Value,
}

impl DecodedMessage {
    /// Values at JSON locations (keys or pointers), as text; absent ones are skipped.
    pub fn metadata<'a>(&self, fields: impl IntoIterator<Item = (&'a String, &'a String)>) -> (Vec<String>, Vec<String>) {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for (name, location) in fields {
            if let Some(v) = lookup(&self.json, location) {
                keys.push(name.clone());
                values.push(as_text(v).map(|c| c.into_owned()).unwrap_or_else(|| v.to_string()));
            }
        }
        (keys, values)
    }
}

/// UTF-8 JSON bytes as a value.
pub fn parse_json(bytes: &[u8]) -> Result<Value, DecodeError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DecodeError::new(DecodeReason::NotUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    serde_json::from_str(text).map_err(|e| DecodeError::new(DecodeReason::NotJson, e.to_string()))
}

/// Decodes raw bytes with one field map, template and size limits.
#[derive(Debug, Clone)]
pub struct Decoder {
    fields: FieldMap,
    template: Template,
    max_bytes: usize,
    max_chars: usize,
}

impl Decoder {
    pub fn new(fields: FieldMap, template: Template, max_bytes: usize, max_chars: usize) -> Self {
        Decoder { fields, template, max_bytes, max_chars }
    }

    /// A JSON message's bytes.
    pub fn decode(&self, bytes: &[u8]) -> Result<DecodedMessage, DecodeError> {
        if bytes.len() > self.max_bytes {
            return Err(DecodeError::new(
                DecodeReason::TooLarge,
                format!("{} bytes exceeds the {} byte limit", bytes.len(), self.max_bytes),
            ));
        }
        self.decode_value(parse_json(bytes)?)
    }

    /// A record already read (from JSON, or from Avro / Protobuf / JSON Schema by
    /// [`crate::source::decode`]): its id, text, event time.
    pub fn decode_value(&self, json: Value) -> Result<DecodedMessage, DecodeError> {
        if !json.is_object() {
            return Err(DecodeError::new(DecodeReason::NotObject, "expected a JSON object"));
        }
        let id = self.fields.id.iter().find_map(|loc| lookup(&json, loc).and_then(as_text)).map(|s| s.into_owned());
        let texts: BTreeMap<&str, std::borrow::Cow<'_, str>> = self
            .template
            .fields()
            .filter_map(|name| {
                let default_location = [name.to_string()];
                let locations = self.fields.text.get(name).map(Vec::as_slice).unwrap_or(&default_location);
                locations.iter().find_map(|loc| lookup(&json, loc).and_then(as_text)).map(|v| (name, v))
            })
            .collect();
        let rendered = self.template.render(|name| texts.get(name).map(|c| c.as_ref()), self.max_chars);
        if !rendered.has_text {
            let wanted: Vec<&str> = self.template.fields().collect();
            return Err(DecodeError::new(DecodeReason::NoText, format!("no text in any of the fields {wanted:?}")));
        }
        drop(texts);
        let event_time_ms = self.fields.timestamp.iter().find_map(|loc| lookup(&json, loc).and_then(parse_timestamp_ms));
        Ok(DecodedMessage { id, text: rendered, event_time_ms, json })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decoder() -> Decoder {
        Decoder::new(FieldMap::default(), Template::parse("{subject}\n{body}").unwrap(), 1000, 200)
    }

    #[test]
    fn subject_and_body_render_in_template_order() {
        let m = decoder().decode(br#"{"id": 7, "title": "Card", "text": "It never arrived"}"#).unwrap();
        assert_eq!(m.id.as_deref(), Some("7"));
        assert_eq!(m.text.text, "Card\nIt never arrived");
    }

    #[test]
    fn json_pointers_reach_nested_fields() {
        let mut fields = FieldMap::default();
        fields.text.insert("body".into(), vec!["/email/content".into()]);
        fields.id = vec!["/meta/uuid".into()];
        let d = Decoder::new(fields, Template::parse("{body}").unwrap(), 1000, 200);
        let m = d.decode(br#"{"meta": {"uuid": "u-1"}, "email": {"content": "refund please"}}"#).unwrap();
        assert_eq!((m.id.as_deref(), m.text.text.as_str()), (Some("u-1"), "refund please"));
    }

    #[test]
    fn every_bad_input_has_its_reason() {
        let d = decoder();
        let reason = |b: &[u8]| d.decode(b).unwrap_err().reason;
        assert_eq!(reason(b"{\"body\": \"\xff\xfe\"}"), DecodeReason::NotUtf8);
        assert_eq!(reason(b"not json"), DecodeReason::NotJson);
        assert_eq!(reason(b"[1,2]"), DecodeReason::NotObject);
        assert_eq!(reason(br#"{"body": "   ", "subject": null}"#), DecodeReason::NoText);
        assert_eq!(reason(br#"{"body": {"nested": "object"}}"#), DecodeReason::NoText);
        assert_eq!(reason(&vec![b' '; 1001]), DecodeReason::TooLarge);
    }

    #[test]
    fn long_text_is_cut_not_rejected() {
        let body = "word ".repeat(150);
        let m = decoder().decode(format!(r#"{{"body": "{body}"}}"#).as_bytes()).unwrap();
        assert!(m.text.cut);
        assert!(m.text.text.chars().count() <= 200);
    }

    #[test]
    fn timestamps_parse_from_text_seconds_and_milliseconds() {
        assert_eq!(parse_timestamp_ms(&serde_json::json!("2024-03-01T12:00:00Z")), Some(1_709_294_400_000));
        assert_eq!(parse_timestamp_ms(&serde_json::json!(1_709_294_400)), Some(1_709_294_400_000));
        assert_eq!(parse_timestamp_ms(&serde_json::json!(1_709_294_400_123i64)), Some(1_709_294_400_123));
        assert_eq!(parse_timestamp_ms(&serde_json::json!("yesterday")), None);
        let fields = FieldMap { timestamp: vec!["created_at".into()], ..FieldMap::default() };
        let d = Decoder::new(fields, Template::parse("{body}").unwrap(), 1000, 100);
        let m = d.decode(br#"{"body": "x", "created_at": "2024-03-01T12:00:00Z", "customer": {"tier": "gold"}}"#).unwrap();
        assert_eq!(m.event_time_ms, Some(1_709_294_400_000));
        let meta = [("tier".to_string(), "/customer/tier".to_string()), ("missing".to_string(), "nope".to_string())];
        assert_eq!(m.metadata(meta.iter().map(|(a, b)| (a, b))), (vec!["tier".to_string()], vec!["gold".to_string()]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decoder().decode(&bytes);
        }

        #[test]
        fn never_panics_on_arbitrary_json_strings(subject in ".{0,80}", body in "\\PC{0,400}") {
            let msg = serde_json::json!({"subject": subject, "body": body}).to_string();
            match decoder().decode(msg.as_bytes()) {
                Ok(m) => prop_assert!(m.text.text.chars().count() <= 200),
                Err(e) => prop_assert!(matches!(e.reason, DecodeReason::NoText | DecodeReason::TooLarge)),
            }
        }
    }
}
