//! The ClickHouse sink: rows in, acknowledgements out. Rows are gathered into blocks (by size
//! or age), inserted one block at a time while new rows keep arriving, and each row's message
//! is acknowledged only after ClickHouse confirmed the INSERT. Rows ClickHouse rejects go to
//! the dead-letter topic instead.

pub mod row;
pub mod schema;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

pub use row::ResultRow;
pub use service::{ClickHouseService, SinkError, SinkStats};

use crate::sink::kafka::{KafkaSink, SourceMessage};
use crate::source::offsets::Delivery;

/// A row and what is needed to acknowledge it, or to dead-letter its message if rejected.
pub struct SinkItem {
    pub row: ResultRow,
    pub delivery: Delivery,
    pub source: Arc<SourceMessage>,
}

/// Receives acknowledgements (the offset tracker, behind the pipeline).
pub trait Acknowledge: Send + Sync + 'static {
    fn ack(&self, delivery: &Delivery);
}

pub struct BlockPolicy {
    pub max_rows: usize,
    pub max_age: Duration,
}

type InsertResult = (Vec<SinkItem>, Result<Vec<usize>, SinkError>);

/// Run until `rows` closes and everything is stored (or a fatal error).
pub async fn run(
    service: Arc<ClickHouseService>,
    mut rows: mpsc::Receiver<SinkItem>,
    policy: BlockPolicy,
    acks: Arc<dyn Acknowledge>,
    dead_letters: Arc<KafkaSink>,
) -> Result<(), SinkError> {
    let mut buffer: Vec<SinkItem> = Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut running: Option<tokio::task::JoinHandle<InsertResult>> = None;
    let mut open = true;
    loop {
        let flush_due =
            !buffer.is_empty() && (buffer.len() >= policy.max_rows || !open || oldest.is_some_and(|t| t.elapsed() >= policy.max_age));
        if running.is_none() && flush_due {
            let take = buffer.len().min(policy.max_rows);
            let mut block: Vec<SinkItem> = buffer.drain(..take).collect();
            oldest = if buffer.is_empty() { None } else { Some(Instant::now()) };
            let now_ms = crate::time::now_ms();
            for item in &mut block {
                item.row.processed_time_ms = now_ms;
            }
            let service = service.clone();
            running = Some(tokio::spawn(async move {
                let rows: Vec<ResultRow> = block.iter().map(|i| i.row.clone()).collect();
                let result = service.insert(&rows).await;
                (block, result)
            }));
        }
        if !open && buffer.is_empty() && running.is_none() {
            return Ok(());
        }
        let deadline = oldest.map(|t| t + policy.max_age).unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            finished = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                running = None;
                let (block, result) = finished.unwrap_or_else(|e| (Vec::new(), Err(SinkError::Fatal(format!("insert task failed: {e}")))));
                let rejected = result?;
                settle(block, &rejected, &acks, &dead_letters);
            }
            item = rows.recv(), if open => match item {
                Some(item) => {
                    oldest.get_or_insert_with(Instant::now);
                    buffer.push(item);
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(deadline), if running.is_none() && !buffer.is_empty() => {}
        }
    }
}

/// Acknowledge stored rows; dead-letter rejected ones (acknowledged once Kafka has them).
fn settle(block: Vec<SinkItem>, rejected: &[usize], acks: &Arc<dyn Acknowledge>, dead_letters: &Arc<KafkaSink>) {
    for (i, item) in block.into_iter().enumerate() {
        if rejected.binary_search(&i).is_ok() {
            tracing::warn!(topic = %item.source.topic, partition = item.source.partition, offset = item.source.offset, "row rejected by ClickHouse: dead-lettering its message");
            let (acks, dead_letters) = (acks.clone(), dead_letters.clone());
            tokio::spawn(async move {
                dead_letters.dead_letter(&item.source, "clickhouse_rejected", "ClickHouse rejected the row for its content").await;
                metrics::counter!(crate::telemetry::MESSAGES_DEAD_LETTERED, "reason" => "clickhouse_rejected").increment(1);
                acks.ack(&item.delivery);
            });
        } else {
            let waited_ms = crate::time::now_ms().saturating_sub(item.row.consumed_time_ms);
            metrics::histogram!(crate::telemetry::END_TO_END_SECONDS, "kind" => item.row.kind.clone()).record(waited_ms as f64 / 1000.0);
            acks.ack(&item.delivery);
        }
    }
}
