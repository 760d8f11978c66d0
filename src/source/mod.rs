//! Where messages come from: a Kafka consumer group, and the offset tracker that decides what
//! may be committed.

pub mod decode;
pub mod kafka;
pub(crate) mod lifecycle;
pub mod offsets;

use std::sync::Arc;

pub use offsets::{Delivery, TopicPartition};

/// Where a consumed message came from, and its original bytes.
#[derive(Debug, Clone, Default)]
pub struct SourceMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp (ms), if the message had one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// For a message sent back by `triage redrive`: where it was first consumed (from the
    /// dead letter's `triage.source.*` headers, which redrive forwards).
    pub origin: Option<Origin>,
}

/// The first consumption of a redriven message: what its row and any new dead letter are keyed
/// by, so that any number of copies and redrives of one message read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
}

impl Origin {
    /// From a message's headers: all of topic, partition and offset, or none.
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a [u8]>) -> Option<Origin> {
        let text = |name: &str| header(name).and_then(|v| std::str::from_utf8(v).ok()).map(str::trim);
        use crate::headers::{HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TIMESTAMP, HEADER_SOURCE_TOPIC};
        Some(Origin {
            topic: text(HEADER_SOURCE_TOPIC).filter(|t| !t.is_empty())?.to_string(),
            partition: text(HEADER_SOURCE_PARTITION)?.parse().ok().filter(|p| *p >= 0)?,
            offset: text(HEADER_SOURCE_OFFSET)?.parse().ok().filter(|o| *o >= 0)?,
            timestamp_ms: text(HEADER_SOURCE_TIMESTAMP).and_then(|t| t.parse().ok()),
        })
    }
}

impl SourceMessage {
    /// The (topic, partition, offset, Kafka timestamp) a result is keyed by: the origin's for a
    /// redriven message, else its own.
    pub fn key_source(&self) -> (&str, i32, i64, Option<i64>) {
        match &self.origin {
            Some(o) => (&o.topic, o.partition, o.offset, o.timestamp_ms),
            None => (&self.topic, self.partition, self.offset, self.timestamp_ms),
        }
    }
}

/// A message consumed and not yet settled: what it was, and the ticket its settlement
/// acknowledges in the offset tracker.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub delivery: Delivery,
    pub message: Arc<SourceMessage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a [u8]> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_bytes())
    }

    #[test]
    fn an_origin_needs_topic_partition_and_offset() {
        let full = [
            ("triage.source.topic", "tickets"),
            ("triage.source.partition", "3"),
            ("triage.source.offset", "41"),
            ("triage.source.timestamp", "1700000000000"),
        ];
        assert_eq!(
            Origin::from_headers(headers(&full)),
            Some(Origin { topic: "tickets".into(), partition: 3, offset: 41, timestamp_ms: Some(1_700_000_000_000) })
        );
        assert_eq!(Origin::from_headers(headers(&full[..3])).unwrap().timestamp_ms, None, "a message without a timestamp");
        assert_eq!(Origin::from_headers(headers(&full[1..])), None, "no topic");
        assert_eq!(
            Origin::from_headers(headers(&[("triage.source.topic", "t"), ("triage.source.partition", "x"), ("triage.source.offset", "1")])),
            None
        );
        assert_eq!(
            Origin::from_headers(headers(&[
                ("triage.source.topic", "t"),
                ("triage.source.partition", "0"),
                ("triage.source.offset", "-1")
            ])),
            None
        );
    }

    #[test]
    fn a_redriven_message_is_keyed_by_its_origin() {
        let mut m = SourceMessage { topic: "tickets".into(), partition: 0, offset: 900, timestamp_ms: Some(5), ..Default::default() };
        assert_eq!(m.key_source(), ("tickets", 0, 900, Some(5)));
        m.origin = Some(Origin { topic: "tickets".into(), partition: 2, offset: 17, timestamp_ms: Some(1) });
        assert_eq!(m.key_source(), ("tickets", 2, 17, Some(1)));
    }
}
