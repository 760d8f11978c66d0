//! JSON Schema records: the payload is JSON; it must satisfy its schema (the check Confluent's
//! JSON deserializer makes), whose `$ref`s to other registered schemas resolve by their reference
//! names.

use std::collections::HashMap;

use jsonschema::{Retrieve, Uri, Validator};
use serde_json::Value;

pub struct JsonSchemaReader {
    validator: Validator,
}

impl std::fmt::Debug for JsonSchemaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonSchemaReader")
    }
}

/// Referenced schemas by their reference name (matched against the `$ref` URI's last segment).
struct References(HashMap<String, Value>);

impl Retrieve for References {
    fn retrieve(&self, uri: &Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let text = uri.as_str();
        let last = text.rsplit('/').next().unwrap_or(text);
        self.0
            .get(text)
            .or_else(|| self.0.get(last))
            .cloned()
            .ok_or_else(|| format!("`{text}` is not one of the schema's references").into())
    }
}

impl JsonSchemaReader {
    /// `references`: (reference name, schema text) of the schemas `schema` refers to.
    pub fn parse(schema: &str, references: &[(String, String)]) -> Result<Self, String> {
        let schema: Value = serde_json::from_str(schema).map_err(|e| format!("the schema is not JSON: {e}"))?;
        let mut refs = HashMap::new();
        for (name, text) in references {
            let value: Value = serde_json::from_str(text).map_err(|e| format!("reference `{name}` is not JSON: {e}"))?;
            refs.insert(name.clone(), value);
        }
        let validator = jsonschema::options().with_retriever(References(refs)).build(&schema).map_err(|e| e.to_string())?;
        Ok(JsonSchemaReader { validator })
    }

    /// The payload as JSON, if it satisfies the schema.
    pub fn read(&self, payload: &[u8]) -> Result<Value, Mismatch> {
        let value: Value = serde_json::from_slice(payload).map_err(|e| Mismatch::NotJson(e.to_string()))?;
        let errors: Vec<String> = self.validator.iter_errors(&value).take(3).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(Mismatch::Schema(errors.join("; ")))
        }
    }
}

/// Why a JSON Schema payload was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Mismatch {
    NotJson(String),
    Schema(String),
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_record_is_checked_against_its_schema_and_references() {
        let customer = r#"{"type": "object", "properties": {"tier": {"enum": ["gold", "standard"]}}, "required": ["tier"]}"#;
        let ticket = r#"{"type": "object", "properties": {"body": {"type": "string"}, "customer": {"$ref": "customer.json"}}, "required": ["body"]}"#;
        let r = JsonSchemaReader::parse(ticket, &[("customer.json".to_string(), customer.to_string())]).unwrap();
        assert_eq!(
            r.read(br#"{"body": "hi", "customer": {"tier": "gold"}}"#).unwrap(),
            json!({"body": "hi", "customer": {"tier": "gold"}})
        );
        assert!(matches!(r.read(br#"{"customer": {"tier": "gold"}}"#), Err(Mismatch::Schema(e)) if e.contains("body")));
        assert!(matches!(r.read(br#"{"body": "x", "customer": {"tier": "iron"}}"#), Err(Mismatch::Schema(_))));
        assert!(matches!(r.read(b"not json"), Err(Mismatch::NotJson(_))));
        assert!(
            JsonSchemaReader::parse(ticket, &[]).is_err()
                || JsonSchemaReader::parse(ticket, &[]).unwrap().read(br#"{"body": "x", "customer": {}}"#).is_err()
        );
        assert!(JsonSchemaReader::parse("not json", &[]).is_err());
    }
}
