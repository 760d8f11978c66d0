//! The `triage.*` Kafka headers: what dead letters carry (why, and where the message was first
//! consumed), what `triage redrive` forwards, and what the worker reads back from a redriven
//! message. A leaf both sides share: the source reads them, the side-topic sink writes them.

pub const HEADER_REASON: &str = "triage.reason";
pub const HEADER_DETAIL: &str = "triage.detail";
pub const HEADER_SOURCE_TOPIC: &str = "triage.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "triage.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "triage.source.offset";
pub const HEADER_SOURCE_TIMESTAMP: &str = "triage.source.timestamp";
pub const HEADER_WORKER: &str = "triage.worker";
pub const HEADER_TRUNCATED: &str = "triage.truncated";
pub const HEADER_ORIGINAL_SIZE: &str = "triage.original.size";
pub const HEADER_ORIGINAL_SHA256: &str = "triage.original.sha256";
