//! The spend ledger `triage escalate` replicas share, so that `max_spend_per_hour` caps them
//! together and a restart does not reset it: each call's cost is appended to a small
//! ClickHouse table (`<table>_llm_spend`), and each process counts what the others (its own
//! earlier incarnations included) spent in the last hour on top of its own.
//!
//! Limits: what another replica spent reaches this one within about `REFRESH` plus the
//! other's `FLUSH`, so replicas starting calls in that window can pass the cap by the calls
//! they start meanwhile (at most `max_concurrent_requests` each). A process killed before its
//! last flush leaves up to `FLUSH` of its calls out of the ledger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::sink::clickhouse::service::SpendEntry;
use crate::sink::clickhouse::ClickHouseService;

/// How often the others' spend is read again.
const REFRESH: Duration = Duration::from_secs(5);
/// How often this process's calls are written.
const FLUSH: Duration = Duration::from_secs(1);
/// Calls held while ClickHouse cannot take them (older ones are dropped, with a warning).
const MAX_PENDING: usize = 100_000;

pub struct Ledger {
    /// What other instances spent in the last hour, in millionths.
    elsewhere_micros: AtomicU64,
    entries: mpsc::Sender<SpendEntry>,
    instance: String,
    worker_id: String,
    model: String,
}

impl Ledger {
    /// Check the ledger can be read (the table exists), then keep it: the returned task
    /// writes this process's calls and reads the others' spend until the ledger is dropped.
    pub async fn start(
        clickhouse: Arc<ClickHouseService>,
        worker_id: &str,
        model: &str,
    ) -> Result<(Arc<Ledger>, tokio::task::JoinHandle<()>), clickhouse::error::Error> {
        let instance = format!("{worker_id}/{}/{}", std::process::id(), crate::time::now_ms());
        let first = clickhouse.spent_elsewhere(&instance, hour_ago()).await?;
        let (tx, rx) = mpsc::channel(4096);
        let ledger = Arc::new(Ledger {
            elsewhere_micros: AtomicU64::new(micros(first)),
            entries: tx,
            instance,
            worker_id: worker_id.to_string(),
            model: model.to_string(),
        });
        let task = tokio::spawn(keep(Arc::downgrade(&ledger), clickhouse, rx));
        Ok((ledger, task))
    }

    /// What other instances spent in the last hour (as of the last read).
    pub fn elsewhere(&self) -> f64 {
        self.elsewhere_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Append a call.
    pub fn record(&self, prompt_tokens: u64, completion_tokens: u64, cost: f64) {
        let now = crate::time::now_ms();
        let entry = SpendEntry {
            time: (now / 1000) as u32,
            time_ms: now,
            instance: self.instance.clone(),
            worker_id: self.worker_id.clone(),
            model: self.model.clone(),
            prompt_tokens,
            completion_tokens,
            cost,
        };
        if self.entries.try_send(entry).is_err() {
            tracing::warn!("the spend ledger's queue is full: a call's cost is left out of what other replicas see");
        }
    }
}

fn micros(cost: f64) -> u64 {
    (cost.max(0.0) * 1e6).round() as u64
}

fn hour_ago() -> u64 {
    crate::time::now_ms().saturating_sub(3_600_000)
}

/// Write this process's calls every `FLUSH` (kept and retried while ClickHouse cannot take
/// them) and read the others' spend every `REFRESH`, until the ledger is dropped and flushed.
async fn keep(ledger: std::sync::Weak<Ledger>, clickhouse: Arc<ClickHouseService>, mut rx: mpsc::Receiver<SpendEntry>) {
    let mut pending: Vec<SpendEntry> = Vec::new();
    let mut flush = tokio::time::interval(FLUSH);
    let mut refresh = tokio::time::interval(REFRESH);
    let mut open = true;
    loop {
        tokio::select! {
            entry = rx.recv(), if open => match entry {
                Some(e) => pending.push(e),
                None => open = false,
            },
            _ = flush.tick() => {
                if !pending.is_empty() {
                    match clickhouse.record_spend(&pending).await {
                        Ok(()) => pending.clear(),
                        Err(e) => {
                            tracing::warn!(error = %e, calls = pending.len(), "cannot write the spend ledger; retrying");
                            if pending.len() > MAX_PENDING {
                                let excess = pending.len() - MAX_PENDING;
                                pending.drain(..excess);
                            }
                        }
                    }
                }
                if !open && pending.is_empty() {
                    return;
                }
            }
            _ = refresh.tick() => {
                let Some(ledger) = ledger.upgrade() else { continue };
                match clickhouse.spent_elsewhere(&ledger.instance, hour_ago()).await {
                    Ok(spent) => ledger.elsewhere_micros.store(micros(spent), Ordering::Relaxed),
                    // The last value stands: an unreadable ledger does not lift the cap.
                    Err(e) => tracing::warn!(error = %e, "cannot read the spend ledger; using the last value"),
                }
            }
        }
    }
}
