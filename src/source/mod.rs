//! Where messages come from: a Kafka consumer group, and the offset tracker that decides what
//! may be committed.

pub mod kafka;
pub mod offsets;
