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

/// UTC months per INSERT at most. The table is partitioned by `toYYYYMM(event_time)` in the
/// SERVER's time zone, where one UTC month can touch two months: 50 UTC months stay within
/// modern servers' default `max_partitions_per_insert_block` (100), so a backfill spanning years
/// is inserted in slices instead of failing. A server set lower makes the sink split blocks.
pub const MAX_MONTHS_PER_BLOCK: usize = 50;

/// `YYYYMM` of a Unix time in UTC.
pub fn utc_month(unix_seconds: u32) -> u32 {
    // Howard Hinnant's days-to-civil algorithm.
    let z = i64::from(unix_seconds / 86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year * 100 + month) as u32
}

/// Take the next block from `buffer`: up to `max_rows` rows, oldest first, from at most
/// `max_months` UTC months (rows of other months stay for a later block, in their order).
pub fn take_block<T>(buffer: &mut Vec<SinkItem<T>>, max_rows: usize, max_months: usize) -> Vec<SinkItem<T>> {
    let mut months: Vec<u32> = Vec::new();
    let (mut block, mut rest) = (Vec::new(), Vec::new());
    for item in buffer.drain(..) {
        let month = utc_month(item.row.event_time);
        let fits = block.len() < max_rows && (months.contains(&month) || months.len() < max_months);
        if fits {
            if !months.contains(&month) {
                months.push(month);
            }
            block.push(item);
        } else {
            rest.push(item);
        }
    }
    *buffer = rest;
    block
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
            let mut block = take_block(&mut buffer, policy.max_rows, MAX_MONTHS_PER_BLOCK);
            oldest = if buffer.is_empty() { None } else { Some(Instant::now()) };
            let now_ms = crate::time::now_ms();
            for item in &mut block {
                item.row.stamp(now_ms);
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
    fn utc_months_match_the_calendar() {
        assert_eq!(utc_month(0), 197001);
        assert_eq!(utc_month(951_782_400), 200002, "2000-02-29");
        assert_eq!(utc_month(951_868_799), 200002, "2000-02-29 23:59:59");
        assert_eq!(utc_month(951_868_800), 200003, "2000-03-01");
        assert_eq!(utc_month(1_767_225_599), 202512, "2025-12-31 23:59:59");
        assert_eq!(utc_month(1_767_225_600), 202601, "2026-01-01");
        assert_eq!(utc_month(u32::MAX), 210602, "2106-02-07, DateTime's end");
        // Around 1 March, where the era arithmetic's century terms decide the year.
        for (seconds, month) in [
            (5_097_600, 197003),
            (68_255_999, 197202),
            (68_256_000, 197203),
            (920_246_399, 199902),
            (920_246_400, 199903),
            (4_107_542_399, 210002),
            (4_107_542_400, 210003),
        ] {
            assert_eq!(utc_month(seconds), month, "{seconds}");
        }
    }

    #[test]
    fn a_backfill_spanning_years_is_sliced_by_month_and_nothing_is_lost_or_reordered_within_a_month() {
        // Ten years of rows, interleaved: every row a different month than its neighbour.
        let month_seconds = 31 * 86_400;
        let mut buffer: Vec<SinkItem<usize>> = (0..1_000)
            .map(|i| SinkItem {
                row: ResultRow { event_time: 1_500_000_000 + (i % 120) as u32 * month_seconds, ..Default::default() },
                ticket: i,
            })
            .collect();
        let mut seen = Vec::new();
        let mut blocks = 0;
        while !buffer.is_empty() {
            let block = take_block(&mut buffer, 300, MAX_MONTHS_PER_BLOCK);
            assert!(!block.is_empty(), "progress every call");
            assert!(block.len() <= 300);
            let months: std::collections::HashSet<u32> = block.iter().map(|i| utc_month(i.row.event_time)).collect();
            assert!(months.len() <= MAX_MONTHS_PER_BLOCK, "{} months in one block", months.len());
            seen.extend(block.iter().map(|i| i.ticket));
            blocks += 1;
        }
        assert!(blocks > 1_000 / 300, "ten years cannot go in blocks of 50 months: {blocks}");
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1_000).collect::<Vec<_>>(), "every row exactly once");
        let same_month: Vec<usize> = seen.iter().copied().filter(|t| t % 120 == 7).collect();
        assert!(same_month.windows(2).all(|w| w[0] < w[1]), "within a month, oldest first");
    }

    #[test]
    fn a_stream_of_one_month_fills_whole_blocks() {
        let mut buffer: Vec<SinkItem<usize>> = (0..25)
            .map(|i| SinkItem { row: ResultRow { event_time: 1_700_000_000 + i as u32, ..Default::default() }, ticket: i })
            .collect();
        assert_eq!(take_block(&mut buffer, 10, MAX_MONTHS_PER_BLOCK).len(), 10);
        assert_eq!(buffer.len(), 15);
        assert_eq!(buffer[0].ticket, 10);
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
