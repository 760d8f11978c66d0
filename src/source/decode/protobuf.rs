//! Protobuf messages -> JSON. The schema is `.proto` text (a registry's, with its references as
//! the files it imports) compiled at run time by protox, or a pinned descriptor set; messages are
//! read by prost-reflect and written in the proto3 JSON mapping with the `.proto` field names
//! (`customer_id`, not `customerId`, so field maps read like the schema): oneofs as the field
//! that is set, enums as names, well-known types as their JSON forms (Timestamp -> RFC 3339 text,
//! wrappers -> the plain value, Struct -> an object), 64-bit integers as text (the mapping's
//! rule), fields at their default value left out.

use std::collections::HashMap;

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};
use serde_json::Value;

/// The file name a registry schema is compiled under (its references keep their own names).
const MAIN_FILE: &str = "triage_registry_schema.proto";

/// Where messages are found.
#[derive(Debug)]
enum Messages {
    /// A schema file: message-index paths select a message of it.
    File { pool: DescriptorPool, file: String },
    /// A pinned descriptor set and the one message every payload is.
    Pinned(MessageDescriptor),
}

#[derive(Debug)]
pub struct ProtobufReader {
    messages: Messages,
}

/// `.proto` sources by the name they are imported as.
struct Sources(HashMap<String, String>);

impl FileResolver for Sources {
    fn resolve_path(&self, path: &std::path::Path) -> Option<String> {
        let name = path.to_str()?;
        self.0.contains_key(name).then(|| name.to_string())
    }

    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.0.get(name) {
            Some(source) => match serialized_descriptor(source) {
                Some(mut descriptor) => {
                    descriptor.name = Some(name.to_string());
                    Ok(File::from_file_descriptor_proto(descriptor))
                }
                None => File::from_source(name, source),
            },
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// A schema registered as a base64 `FileDescriptorProto` rather than `.proto` text: what
/// Confluent's Python `ProtobufSerializer` sends, and what a registry returns for
/// `?format=serialized`. `.proto` text always has spaces or braces, so it is never mistaken.
fn serialized_descriptor(source: &str) -> Option<prost_types::FileDescriptorProto> {
    use base64::Engine as _;
    let text = source.trim();
    if text.is_empty() || text.contains(|c: char| c.is_whitespace() || c == '{' || c == ';') {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    prost_types::FileDescriptorProto::decode(bytes.as_slice()).ok()
}

impl ProtobufReader {
    /// `schema`: the `.proto` text; `references`: (import name, `.proto` text) of the files it
    /// imports (Google's well-known types are built in).
    pub fn compile(schema: &str, references: &[(String, String)]) -> Result<Self, String> {
        let mut sources: HashMap<String, String> = references.iter().cloned().collect();
        sources.insert(MAIN_FILE.to_string(), schema.to_string());
        let mut resolver = ChainFileResolver::new();
        resolver.add(Sources(sources));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.include_imports(true);
        compiler.open_file(MAIN_FILE).map_err(|e| e.to_string())?;
        Ok(ProtobufReader { messages: Messages::File { pool: compiler.descriptor_pool(), file: MAIN_FILE.to_string() } })
    }

    /// A serialized `FileDescriptorSet` (`protoc --include_imports --descriptor_set_out`) and
    /// the full name of the message every payload is (`shop.Ticket`).
    pub fn pinned(descriptor_set: &[u8], message: &str) -> Result<Self, String> {
        let pool = DescriptorPool::decode(descriptor_set).map_err(|e| format!("not a FileDescriptorSet: {e}"))?;
        let descriptor = pool.get_message_by_name(message).ok_or_else(|| {
            let known: Vec<String> = pool.all_messages().map(|m| m.full_name().to_string()).take(20).collect();
            format!("no message `{message}` in the descriptor set (it has {})", known.join(", "))
        })?;
        Ok(ProtobufReader { messages: Messages::Pinned(descriptor) })
    }

    /// The message at a Confluent message-index path ([] or [0]: the file's first message).
    pub fn message(&self, indexes: &[usize]) -> Result<MessageDescriptor, String> {
        match &self.messages {
            Messages::Pinned(m) => Ok(m.clone()),
            Messages::File { pool, file } => {
                let file = pool.get_file_by_name(file).ok_or("the compiled schema lost its file")?;
                let path = if indexes.is_empty() { &[0][..] } else { indexes };
                let mut message = file.messages().nth(path[0]).ok_or_else(|| format!("the schema has no message #{}", path[0]))?;
                for &i in &path[1..] {
                    let child = message.child_messages().nth(i);
                    message = child.ok_or_else(|| format!("{} has no nested message #{i}", message.full_name()))?;
                }
                Ok(message)
            }
        }
    }

    /// The message at `indexes` read from `payload`, as JSON.
    pub fn read(&self, indexes: &[usize], payload: &[u8]) -> Result<Value, String> {
        let descriptor = self.message(indexes)?;
        let message = DynamicMessage::decode(descriptor.clone(), payload).map_err(|e| format!("{}: {e}", descriptor.full_name()))?;
        let options = SerializeOptions::new().use_proto_field_name(true);
        message.serialize_with_options(serde_json::value::Serializer, &options).map_err(|e| e.to_string())
    }

    /// A JSON record (proto3 JSON mapping) as the message at `indexes`: what `triage produce
    /// --format protobuf` writes.
    pub fn write(&self, indexes: &[usize], json: &Value) -> Result<Vec<u8>, String> {
        let descriptor = self.message(indexes)?;
        let message = DynamicMessage::deserialize(descriptor, json.clone()).map_err(|e| e.to_string())?;
        Ok(message.encode_to_vec())
    }

    /// The index path of a message by full name (what a producer frames with).
    pub fn indexes_of(&self, full_name: &str) -> Result<Vec<usize>, String> {
        let Messages::File { pool, file } = &self.messages else { return Ok(vec![0]) };
        let file = pool.get_file_by_name(file).ok_or("the compiled schema lost its file")?;
        fn find(messages: Vec<MessageDescriptor>, name: &str, path: &mut Vec<usize>) -> bool {
            for (i, m) in messages.into_iter().enumerate() {
                path.push(i);
                if m.full_name() == name || find(m.child_messages().collect(), name, path) {
                    return true;
                }
                path.pop();
            }
            false
        }
        let mut path = Vec::new();
        if find(file.messages().collect(), full_name, &mut path) {
            Ok(path)
        } else {
            Err(format!("no message `{full_name}` in the schema"))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const TICKET: &str = r#"
        syntax = "proto3";
        package shop;
        import "google/protobuf/timestamp.proto";
        import "google/protobuf/wrappers.proto";
        import "customer.proto";

        message Ticket {
          string id = 1;
          string subject = 2;
          string body = 3;
          google.protobuf.Timestamp created = 4;
          google.protobuf.StringValue note = 5;
          oneof contact { string email = 6; string phone = 7; }
          Priority priority = 8;
          crm.Customer customer = 9;
          repeated string tags = 10;
          map<string, int64> counts = 11;
          message Line { string sku = 1; int32 quantity = 2; }
          repeated Line lines = 12;
          enum Priority { LOW = 0; HIGH = 1; }
        }
        message Other { string x = 1; }
    "#;
    const CUSTOMER: &str = r#"syntax = "proto3"; package crm; message Customer { string tier = 1; }"#;

    fn reader() -> ProtobufReader {
        ProtobufReader::compile(TICKET, &[("customer.proto".to_string(), CUSTOMER.to_string())]).unwrap()
    }

    #[test]
    fn oneofs_nested_types_references_and_well_known_types_read_as_json() {
        let r = reader();
        let record = json!({
            "id": "T-1", "subject": "Refund", "body": "where is it", "created": "2024-03-01T12:00:00Z",
            "note": "vip", "phone": "+351", "priority": "HIGH", "customer": {"tier": "gold"},
            "tags": ["a", "b"], "counts": {"n": "3"}, "lines": [{"sku": "S1", "quantity": 2}]
        });
        let bytes = r.write(&[0], &record).unwrap();
        let back = r.read(&[0], &bytes).unwrap();
        assert_eq!(back["created"], "2024-03-01T12:00:00Z");
        assert_eq!(back["note"], "vip", "a wrapper is its plain value");
        assert_eq!(back["phone"], "+351");
        assert!(back.get("email").is_none(), "only the oneof member that is set");
        assert_eq!(back["priority"], "HIGH");
        assert_eq!(back["customer"], json!({"tier": "gold"}));
        assert_eq!(back["counts"], json!({"n": "3"}), "int64 as text, as the proto3 JSON mapping says");
        assert_eq!(back["lines"], json!([{"sku": "S1", "quantity": 2}]));
    }

    #[test]
    fn message_indexes_select_top_level_and_nested_messages() {
        let r = reader();
        assert_eq!(r.message(&[]).unwrap().full_name(), "shop.Ticket");
        assert_eq!(r.message(&[1]).unwrap().full_name(), "shop.Other");
        // Nested messages in declaration order; a map field's entry type counts (Confluent's
        // serializers index the descriptor's nested types the same way).
        assert_eq!(r.message(&[0, 0]).unwrap().full_name(), "shop.Ticket.CountsEntry");
        assert_eq!(r.message(&[0, 1]).unwrap().full_name(), "shop.Ticket.Line");
        assert_eq!(r.indexes_of("shop.Ticket.Line").unwrap(), vec![0, 1]);
        assert!(r.message(&[2]).is_err());
        assert!(r.message(&[0, 5]).is_err());
    }

    #[test]
    fn bytes_that_are_not_the_message_and_broken_schemas_are_errors() {
        let r = reader();
        assert!(r.read(&[0], &[0xff, 0xff, 0xff]).is_err());
        assert!(r.read(&[0], &[0x0a, 0x05, b'a']).is_err(), "a string cut short");
        assert!(ProtobufReader::compile("syntax = \"proto3\"; message { }", &[]).is_err());
        let missing = ProtobufReader::compile(TICKET, &[]).unwrap_err();
        assert!(missing.contains("customer.proto"), "{missing}");
    }

    #[test]
    fn a_schema_registered_as_a_base64_descriptor_reads_like_its_proto_text() {
        use base64::Engine as _;
        // What Confluent's Python ProtobufSerializer registers: each file's FileDescriptorProto.
        let text = reader();
        let Messages::File { pool, .. } = &text.messages else { panic!("a file") };
        let b64 = |name: &str| {
            let file = pool.get_file_by_name(name).unwrap();
            base64::engine::general_purpose::STANDARD.encode(file.file_descriptor_proto().encode_to_vec())
        };
        let serialized = ProtobufReader::compile(&b64(MAIN_FILE), &[("customer.proto".to_string(), b64("customer.proto"))]).unwrap();
        let record = json!({"id": "T-2", "created": "2024-03-01T12:00:00Z", "customer": {"tier": "gold"}, "email": "a@b"});
        let bytes = text.write(&[0], &record).unwrap();
        assert_eq!(serialized.read(&[0], &bytes).unwrap(), text.read(&[0], &bytes).unwrap());
        assert_eq!(serialized.message(&[0, 1]).unwrap().full_name(), "shop.Ticket.Line");
        assert!(ProtobufReader::compile("bm90IGEgZGVzY3JpcHRvcg==", &[]).is_err(), "base64 of something else");
    }

    #[test]
    fn a_pinned_descriptor_set_reads_its_one_message() {
        let mut sources = HashMap::new();
        sources.insert("t.proto".to_string(), "syntax = \"proto3\"; package p; message M { string body = 1; }".to_string());
        let mut compiler = protox::Compiler::with_file_resolver(Sources(sources));
        compiler.open_file("t.proto").unwrap();
        let set = compiler.encode_file_descriptor_set();
        let r = ProtobufReader::pinned(&set, "p.M").unwrap();
        let bytes = r.write(&[], &json!({"body": "hi"})).unwrap();
        assert_eq!(r.read(&[], &bytes).unwrap(), json!({"body": "hi"}));
        assert!(ProtobufReader::pinned(&set, "p.Nope").unwrap_err().contains("p.M"));
        assert!(ProtobufReader::pinned(b"garbage", "p.M").is_err());
    }
}
