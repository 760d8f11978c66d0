//! `llm.mode = "batch"`: escalations answered through the OpenAI Batch API (half the price;
//! escalations are rarely urgent). Records' requests are collected into a JSONL file of up to
//! `batch_max_requests` lines (or whatever arrived within `batch_max_wait_ms`), uploaded,
//! started as a batch, and polled; each record's task waits for its line of the output and
//! then goes on exactly as after a live call (reply checked, row stored, offset committed).
//!
//! Nothing is lost or paid twice across restarts: every submitted request is recorded in
//! `<table>_llm_batches` (batch id, the request's custom id = the message's key) before its
//! record waits, and a batch is marked collected only once every answer it holds was taken by
//! a record. A restarted process reads the uncollected batches, polls them, and a record read
//! again waits for its answer in its recorded batch instead of being sent again.
//!
//! Limits: a process killed between creating a batch and recording it (one ClickHouse insert)
//! sends that batch's requests again on restart; answers taken by records whose rows were not
//! yet stored when the process died are fetched again from the provider (its output file),
//! not re-run. Uncollected batches are looked for over the last `LOOKBACK` only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::client::{batch_line, BatchState, ChatClient, ChatError, Completion};
use crate::sink::clickhouse::service::BatchEntry;
use crate::sink::clickhouse::ClickHouseService;

/// How a failed batch's error body starts: a batch rejected whole stops the command.
pub const BATCH_FAILED: &str = "the batch failed";

/// How far back uncollected batches are looked for at start (a batch's window is 24 h).
const LOOKBACK: Duration = Duration::from_secs(3 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub max_requests: usize,
    pub max_wait: Duration,
    pub poll_interval: Duration,
    pub completion_window: String,
}

type Reply = Result<Completion, ChatError>;

struct Job {
    custom_id: String,
    body: Value,
    reply: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct State {
    /// custom id -> the batch it was submitted in (answers not yet collected).
    in_batch: HashMap<String, String>,
    /// Records waiting for a custom id's answer.
    waiting: HashMap<String, Vec<oneshot::Sender<Reply>>>,
    /// Answers collected that no record has taken yet (a restarted process's batches: their
    /// records are read again soon), with their batch.
    unclaimed: HashMap<String, (String, Reply)>,
    /// Per batch, answers not yet taken: at 0 the batch is marked collected.
    untaken: HashMap<String, usize>,
}

struct Inner {
    client: Arc<ChatClient>,
    store: Arc<ClickHouseService>,
    settings: BatchSettings,
    state: Mutex<State>,
}

pub struct BatchQueue {
    jobs: mpsc::Sender<Job>,
    inner: Arc<Inner>,
}

/// A message's custom id in a batch file.
pub fn custom_id(topic: &str, partition: u32, offset: u64) -> String {
    format!("{topic}/{partition}/{offset}")
}

impl BatchQueue {
    /// Read the uncollected batches (and resume polling them), then take requests.
    pub async fn start(client: Arc<ChatClient>, store: Arc<ClickHouseService>, settings: BatchSettings) -> Result<Arc<Self>, String> {
        let since = (crate::time::now_ms() / 1000).saturating_sub(LOOKBACK.as_secs()) as u32;
        let pending = store.pending_batches(since).await.map_err(|e| e.to_string())?;
        let inner = Arc::new(Inner { client, store, settings, state: Mutex::new(State::default()) });
        let mut batches: HashMap<String, Vec<String>> = HashMap::new();
        if let Ok(mut state) = inner.state.lock() {
            for (batch, id) in pending {
                state.in_batch.insert(id.clone(), batch.clone());
                batches.entry(batch).or_default().push(id);
            }
        }
        for (batch, ids) in batches {
            tracing::info!(batch = %batch, requests = ids.len(), "resuming a batch submitted before this start");
            tokio::spawn(poll(inner.clone(), batch, ids, Instant::now()));
        }
        let (jobs, rx) = mpsc::channel(inner.settings.max_requests.max(1));
        tokio::spawn(collect(inner.clone(), rx));
        Ok(Arc::new(BatchQueue { jobs, inner }))
    }

    /// The answer to `body`, through a batch: an answer already collected for this custom
    /// id, its recorded batch's, or a new batch's.
    pub async fn complete(&self, custom_id: String, body: Value) -> Reply {
        let (reply, answer) = oneshot::channel();
        let queued = {
            let Ok(mut state) = self.inner.state.lock() else { return Err(stopped()) };
            if let Some((batch, reply)) = state.unclaimed.remove(&custom_id) {
                let done = state.untaken.get_mut(&batch).map(|n| {
                    *n -= 1;
                    *n == 0
                });
                if done == Some(true) {
                    state.untaken.remove(&batch);
                    tokio::spawn(mark_collected(self.inner.clone(), batch));
                }
                return reply;
            }
            if state.in_batch.contains_key(&custom_id) {
                state.waiting.entry(custom_id.clone()).or_default().push(reply);
                None
            } else {
                Some(Job { custom_id, body, reply })
            }
        };
        if let Some(job) = queued {
            if self.jobs.send(job).await.is_err() {
                return Err(stopped());
            }
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> ChatError {
    ChatError::Transport("the batch queue stopped".into())
}

/// Close a batch at `max_requests`, or `max_wait` after its first request.
async fn collect(inner: Arc<Inner>, mut rx: mpsc::Receiver<Job>) {
    let mut open: Vec<Job> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let wake = deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            job = rx.recv() => match job {
                Some(job) => {
                    if open.is_empty() {
                        deadline = Some(tokio::time::Instant::now() + inner.settings.max_wait);
                    }
                    open.push(job);
                    if open.len() >= inner.settings.max_requests {
                        tokio::spawn(submit(inner.clone(), std::mem::take(&mut open)));
                        deadline = None;
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep_until(wake), if deadline.is_some() => {
                tokio::spawn(submit(inner.clone(), std::mem::take(&mut open)));
                deadline = None;
            }
        }
    }
}

/// Upload, start and record one batch; its records then wait for its answers.
async fn submit(inner: Arc<Inner>, jobs: Vec<Job>) {
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut replies: HashMap<String, Vec<oneshot::Sender<Reply>>> = HashMap::new();
    for job in jobs {
        // Two records of one message share a line (a custom id appears once per file).
        if !replies.contains_key(&job.custom_id) {
            let line = json!({"custom_id": job.custom_id, "method": "POST", "url": "/v1/chat/completions", "body": job.body});
            lines.extend_from_slice(line.to_string().as_bytes());
            lines.push(b'\n');
        }
        replies.entry(job.custom_id).or_default().push(job.reply);
    }
    let created = async {
        let file = inner.client.upload_batch_file(lines).await?;
        inner.client.create_batch(&file, &inner.settings.completion_window).await
    };
    let batch: BatchState = match created.await {
        Ok(batch) => batch,
        Err(error) => {
            tracing::warn!(kind = error.kind(), requests = replies.len(), "a batch could not be submitted; its records will try again");
            for reply in replies.into_values().flatten() {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
    };
    let now = (crate::time::now_ms() / 1000) as u32;
    let entries: Vec<BatchEntry> = replies
        .keys()
        .map(|id| BatchEntry { time: now, batch_id: batch.id.clone(), custom_id: id.clone(), state: "submitted".into() })
        .collect();
    record(&inner, &entries, "submitted").await;
    tracing::info!(batch = %batch.id, requests = entries.len(), "batch submitted");
    let ids: Vec<String> = replies.keys().cloned().collect();
    if let Ok(mut state) = inner.state.lock() {
        for (id, waiting) in replies {
            state.in_batch.insert(id.clone(), batch.id.clone());
            state.waiting.entry(id).or_default().extend(waiting);
        }
    }
    tokio::spawn(poll(inner, batch.id, ids, started));
}

/// Write rows of the batch record, retrying a while: without them a restart would send the
/// batch's requests again (paid twice), but the answers still come to this process.
async fn record(inner: &Inner, entries: &[BatchEntry], what: &str) {
    let backoff = crate::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    for attempt in 0..8 {
        match inner.store.record_batch(entries).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot record a batch ({what}) in ClickHouse; retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
            }
        }
    }
    tracing::error!("a batch ({what}) could not be recorded: a restart before it is collected would send its requests again");
}

async fn mark_collected(inner: Arc<Inner>, batch: String) {
    let entry =
        BatchEntry { time: (crate::time::now_ms() / 1000) as u32, batch_id: batch, custom_id: String::new(), state: "collected".into() };
    record(&inner, &[entry], "collected").await;
}

/// Ask about a batch until it ends, then give each record its answer.
async fn poll(inner: Arc<Inner>, batch: String, ids: Vec<String>, started: Instant) {
    let state = loop {
        tokio::time::sleep(inner.settings.poll_interval).await;
        match inner.client.batch_state(&batch).await {
            Ok(s) if s.is_running() => continue,
            Ok(s) => break Ok(s),
            Err(e) if e.is_retryable() => tracing::warn!(batch = %batch, kind = e.kind(), "cannot read a batch's state; asking again"),
            // Unknown to the provider (another account, deleted): its requests go again.
            Err(e) => break Err(e),
        }
    };
    let mut answers: HashMap<String, Reply> = HashMap::new();
    let ended = match state {
        Ok(s) => s,
        Err(error) => {
            deliver(&inner, &batch, ids.into_iter().map(|id| (id, Err(error.clone()))).collect());
            return;
        }
    };
    for file in [&ended.output_file_id, &ended.error_file_id].into_iter().flatten() {
        let content = loop {
            match inner.client.file_content(file).await {
                Ok(c) => break c,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(batch = %batch, kind = e.kind(), "cannot read a batch's results; trying again");
                    tokio::time::sleep(inner.settings.poll_interval).await;
                }
                Err(e) => {
                    tracing::warn!(batch = %batch, error = %e, "a batch's result file cannot be read");
                    break bytes::Bytes::new();
                }
            }
        };
        for line in String::from_utf8_lossy(&content).lines().filter(|l| !l.trim().is_empty()) {
            if let Some((id, mut reply)) = batch_line(line) {
                if let Ok(c) = &mut reply {
                    c.latency = started.elapsed();
                }
                answers.insert(id, reply);
            }
        }
    }
    let missing = |id: &str| match ended.status.as_str() {
        // Not done within the window (or cancelled): the request goes again in a new batch.
        "expired" | "cancelled" => ChatError::Timeout(Duration::ZERO),
        "failed" => ChatError::Status { status: 400, body: format!("{BATCH_FAILED}: {}", ended.errors) },
        other => ChatError::Envelope(format!("{id} is not in the output of batch {} ({other})", ended.id)),
    };
    let results = ids
        .into_iter()
        .map(|id| {
            let answer = answers.remove(&id).unwrap_or_else(|| Err(missing(&id)));
            (id, answer)
        })
        .collect();
    tracing::info!(batch = %batch, status = %ended.status, "batch ended");
    deliver(&inner, &batch, results);
}

fn deliver(inner: &Arc<Inner>, batch: &str, results: Vec<(String, Reply)>) {
    let Ok(mut state) = inner.state.lock() else { return };
    let mut untaken = 0;
    for (id, reply) in results {
        if state.in_batch.get(&id).is_some_and(|b| b == batch) {
            state.in_batch.remove(&id);
        }
        match state.waiting.remove(&id) {
            Some(waiting) if !waiting.is_empty() => {
                for w in waiting {
                    let _ = w.send(reply.clone());
                }
            }
            _ => {
                untaken += 1;
                state.unclaimed.insert(id, (batch.to_string(), reply));
            }
        }
    }
    if untaken == 0 {
        tokio::spawn(mark_collected(inner.clone(), batch.to_string()));
    } else {
        state.untaken.insert(batch.to_string(), untaken);
    }
}
