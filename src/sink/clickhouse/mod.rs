//! The ClickHouse sink: rows in, settlements out. Rows are gathered into blocks (by size or
//! age), inserted one block at a time while new rows keep arriving, and each row is reported
//! to the caller's [`Settle`] only after ClickHouse confirmed the INSERT, or as rejected when
//! ClickHouse refused it for its content. What "settled" means (an offset acknowledged, a
//! dead letter written) is the caller's business: the sink knows rows and tickets only.

pub mod config;
pub mod row;
pub mod schema;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

pub use config::ClickHouseConfig;
pub use row::ResultRow;
pub use service::{ClickHouseService, SinkError};

/// A row and the caller's ticket for it (returned through [`Settle`]).
pub struct SinkItem<T> {
    pub row: ResultRow,
    pub ticket: T,
}

/// How the sink hands each row's fate back.
pub trait Settle<T>: Send + Sync + 'static {
    /// ClickHouse acknowledged the row.
    fn stored(&self, ticket: T, row: &ResultRow);
    /// ClickHouse refused the row itself (not the server's state): `error` says why.
    fn rejected(&self, ticket: T, error: &str);
}

pub struct BlockPolicy {
    pub max_rows: usize,
    pub max_age: Duration,
}

type InsertResult<T> = (Vec<SinkItem<T>>, Result<Vec<(usize, String)>, SinkError>);

/// Run until `rows` closes and everything is stored (or a fatal error).
pub async fn run<T: Send + 'static>(
    service: Arc<ClickHouseService>,
    mut rows: mpsc::Receiver<SinkItem<T>>,
    policy: BlockPolicy,
    settle: Arc<dyn Settle<T>>,
) -> Result<(), SinkError> {
    let mut buffer: Vec<SinkItem<T>> = Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut running: Option<tokio::task::JoinHandle<InsertResult<T>>> = None;
    let mut open = true;
    loop {
        let flush_due =
            !buffer.is_empty() && (buffer.len() >= policy.max_rows || !open || oldest.is_some_and(|t| t.elapsed() >= policy.max_age));
        if running.is_none() && flush_due {
            let take = buffer.len().min(policy.max_rows);
            let mut block: Vec<SinkItem<T>> = buffer.drain(..take).collect();
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
                report(block, &rejected, settle.as_ref());
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

/// Hand each row of a finished block back: stored, or rejected with ClickHouse's reason.
/// `rejected` is sorted by row index.
fn report<T: 'static>(block: Vec<SinkItem<T>>, rejected: &[(usize, String)], settle: &dyn Settle<T>) {
    for (i, item) in block.into_iter().enumerate() {
        match rejected.binary_search_by_key(&i, |(index, _)| *index) {
            Ok(at) => settle.rejected(item.ticket, &rejected[at].1),
            Err(_) => settle.stored(item.ticket, &item.row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(u32, Option<String>)>>);

    impl Settle<u32> for Recorded {
        fn stored(&self, ticket: u32, _: &ResultRow) {
            self.0.lock().unwrap().push((ticket, None));
        }
        fn rejected(&self, ticket: u32, error: &str) {
            self.0.lock().unwrap().push((ticket, Some(error.to_string())));
        }
    }

    #[test]
    fn every_row_of_a_block_is_settled_once_with_its_own_fate() {
        let block: Vec<SinkItem<u32>> = (0..5).map(|i| SinkItem { row: ResultRow::default(), ticket: 100 + i }).collect();
        let settle = Recorded::default();
        report(block, &[(1, "bad".into()), (4, "worse".into())], &settle);
        let got = settle.0.into_inner().unwrap();
        assert_eq!(got, vec![(100, None), (101, Some("bad".into())), (102, None), (103, None), (104, Some("worse".into()))]);
    }
}
