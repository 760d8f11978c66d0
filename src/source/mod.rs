//! Where messages come from: a Kafka consumer group, and the offset tracker that decides what
//! may be committed.

pub mod kafka;
pub mod offsets;

use std::sync::Arc;

pub use offsets::{Delivery, TopicPartition};

/// Where a consumed message came from, and its original bytes.
#[derive(Debug, Clone)]
pub struct SourceMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp (ms), if the message had one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// A message consumed and not yet settled: what it was, and the ticket its settlement
/// acknowledges in the offset tracker.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub delivery: Delivery,
    pub message: Arc<SourceMessage>,
}
