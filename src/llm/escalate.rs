//! `triage escalate`: a consumer group on the escalation topic. Each record is answered by a
//! large model through the OpenAI-compatible chat-completions API, and the answer is written
//! as the message's next row version in ClickHouse (same key and event time, a version that
//! outranks the small model's). Commits follow the worker's rule, through the same settle
//! path: an offset is committed only once its record's row is stored or its dead letter
//! acknowledged.
//!
//! ```text
//! escalation topic ─> record ─> already answered? ─yes─> done
//!                          │          no
//!                          │          └─> budget (rpm, tpm, spend/hour) ─> LLM ─> reply checked ─> row ─> ClickHouse ─> done
//!                          └─> unusable record / refused / invalid reply twice ─> dead letter ─> done
//! ```
//!
//! What a team paying per token needs: nothing already answered is sent again (the table is
//! asked, and records of a message already in flight here wait on nothing and are done at
//! once); a hard hourly spend cap (calls wait; nothing is dropped); an endpoint that is down
//! stalls the consumer (retried, never dead-lettered: it is not the message's fault); an
//! endpoint that refuses every call (bad key, unknown model, unsupported dialect) stops the
//! command. No message text is logged.
//!
//! Limits: the "already answered" check reads the table, so two `triage escalate` replicas
//! that receive copies of one message at the same moment (a worker replay landing on another
//! partition cannot happen: records are keyed by message id) could both call; the row versions
//! still collapse to one answer.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};

use super::answer::{answered_row, Escalation, Roles};
use super::budget::{Budget, Estimate, Reservation, Used, Wait};
use super::client::{ChatClient, ChatError, Completion, Failed};
use super::config::LlmConfig;
use super::prompt::{Answer, LabelSpace, Prompt};
use crate::config::Config;
use crate::error::WorkerError;
use crate::message::{Decoder, DEFAULT_MAX_MESSAGE_BYTES};
use crate::model::text::prefix_chars;
use crate::model::{Descriptor, Template};
use crate::retry::Backoff;
use crate::settle::Settler;
use crate::sink::clickhouse::{self as ch, ClickHouseService, ResultRow, Settle, SinkItem};
use crate::sink::kafka::{cut_at_char, SideTopics, SideTopicsConfig};
use crate::source::kafka::{self, check_topics_exist, ClientRole, TrackingContext};
use crate::source::lifecycle::{self, Intake, Lifecycle};
use crate::source::offsets::{OffsetTracker, TopicPartition};
use crate::source::Consumed;
use crate::telemetry::events::{
    Counters, DeadLetterReason, InternalEvent, LlmAnswered, LlmBudgetWaited, LlmCacheHit, LlmCallFailed, LlmCalled, LlmSkipped,
};
use crate::telemetry::{self, Readiness};

/// What one run did.
#[derive(Debug, Default, Clone)]
pub struct EscalateReport {
    pub consumed: u64,
    pub answered: u64,
    pub skipped: u64,
    /// Answered from the response cache (no call).
    pub cache_hits: u64,
    pub dead_lettered: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// From the configured prices.
    pub spend: f64,
    pub seconds: f64,
    /// Records unfinished at exit (read again by the group's next owner).
    pub unfinished: usize,
}

/// Messages remembered as answered (or in flight) here, beyond what the table is asked.
const RECENT_KEYS: usize = 100_000;

/// What answers one model's escalations: its labels and how its text is made.
#[derive(Clone)]
pub(crate) struct RouteLabels {
    pub(crate) space: LabelSpace,
    /// The space's request, rendered once.
    pub(crate) prompt: Prompt,
    pub(crate) roles: Roles,
    pub(crate) decoder: Decoder,
    /// `llm.max_text_chars`: the longest text sent, however the record came.
    pub(crate) max_text_chars: usize,
}

impl RouteLabels {
    pub(crate) fn new(
        space: LabelSpace,
        roles: Roles,
        decoder: Decoder,
        max_text_chars: usize,
        options: &super::prompt::RequestOptions,
    ) -> Self {
        let prompt = Prompt::new(&space, options);
        RouteLabels { space, prompt, roles, decoder, max_text_chars }
    }
}

type Key = (String, u32, u64);

/// A bounded map that forgets its oldest entries first: the keys answered or in flight here,
/// and the response cache.
struct Memory<K, V> {
    entries: HashMap<K, (u64, V)>,
    /// (insertion number, key), oldest first; an entry forgotten and inserted again is only
    /// removed through its newest number.
    order: VecDeque<(u64, K)>,
    capacity: usize,
    next: u64,
}

impl<K: std::hash::Hash + Eq + Clone, V> Memory<K, V> {
    fn new(capacity: usize) -> Self {
        Memory { entries: HashMap::new(), order: VecDeque::new(), capacity, next: 0 }
    }

    /// False (and nothing replaced) when the key is already there.
    fn insert(&mut self, key: K, value: V) -> bool {
        if self.capacity == 0 || self.entries.contains_key(&key) {
            return false;
        }
        self.next += 1;
        self.entries.insert(key.clone(), (self.next, value));
        self.order.push_back((self.next, key));
        while self.order.len() > self.capacity {
            if let Some((number, old)) = self.order.pop_front() {
                if self.entries.get(&old).is_some_and(|(n, _)| *n == number) {
                    self.entries.remove(&old);
                }
            }
        }
        true
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(_, v)| v)
    }

    fn forget(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

/// Keys answered or in flight here.
type RecentKeys = Memory<Key, ()>;

/// Replies that answered a request, by the request's SHA-256: an identical request (the same
/// text, labels, prompt and model) is answered from here.
type ResponseCache = Memory<[u8; 32], String>;

fn request_digest(serialized: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(serialized.as_bytes()).into()
}

struct Shared {
    routes: HashMap<String, RouteLabels>,
    client: Arc<ChatClient>,
    /// Batch mode: where requests go instead of a call each.
    batches: Option<Arc<super::batch::BatchQueue>>,
    llm: LlmConfig,
    budget: Mutex<Budget>,
    calls: Semaphore,
    recent: Arc<Mutex<RecentKeys>>,
    cache: Mutex<ResponseCache>,
    /// Records escalated before this (ms since the epoch) are skipped: `llm.skip_older_than_hours`,
    /// fixed when the command starts.
    skip_before_ms: Option<i64>,
    clickhouse: Arc<ClickHouseService>,
    rows: mpsc::Sender<SinkItem<Answered>>,
    settle: Settler,
    worker_id: String,
    /// /readyz fails while the endpoint keeps failing (an outage or a wrong URL shows).
    readiness: Arc<Readiness>,
    /// Messages refused since the last answer: a streak means the endpoint refuses everything.
    refusal_streak: std::sync::atomic::AtomicUsize,
    /// Bumped at every answer: refused records held back wait on it (an answer means the
    /// endpoint answers, so their refusals were their own).
    answers_seen: tokio::sync::watch::Sender<u64>,
    /// When the endpoint last replied to any call (ms since `started`; 0: never): a message
    /// that keeps failing while others get replies is at fault itself, not the endpoint.
    last_reply_ms: std::sync::atomic::AtomicU64,
    started: Instant,
    /// With a spend cap: what every replica spends, shared through ClickHouse.
    ledger: Option<Arc<super::ledger::Ledger>>,
}

/// The sink's ticket for an answer's row: the record, and its message's key.
struct Answered {
    record: Consumed,
    key: Key,
    /// The LLM chose what the small model had said (every single-label head).
    agreed: bool,
}

/// How the sink's verdict on an answer's row is settled: stored rows count as answered; a
/// rejected row is dead-lettered and its key forgotten (a later record may try again).
struct AnswerSettle {
    settle: Settler,
    recent: Arc<Mutex<RecentKeys>>,
}

impl Settle<Answered> for AnswerSettle {
    fn stored(&self, ticket: Answered, row: &ResultRow) {
        LlmAnswered { kind: &row.kind, agreed: ticket.agreed }.emit(self.settle.counters());
        self.settle.stored(ticket.record, row);
    }

    fn rejected(&self, ticket: Answered, error: &str) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.forget(&ticket.key);
        }
        self.settle.rejected(ticket.record, error);
    }
}

/// Load the label space of every model that can escalate a route's messages: each cascade
/// tier and the canary, keyed `topic` + NUL + model name ([`labels_for`]), and the last tier
/// under the topic alone (a record naming a model no longer configured).
pub(crate) fn route_labels(config: &Config) -> Result<HashMap<String, RouteLabels>, WorkerError> {
    let mut routes = HashMap::new();
    for route in &config.routes {
        let failed = |reason: String| WorkerError::Route { topic: route.topic.clone(), reason };
        let tiers = Config::tiers(route);
        let last = tiers.last().cloned().unwrap_or_else(|| route.model.clone());
        let dirs = tiers.into_iter().chain(route.canary.as_ref().map(|c| c.model.clone()));
        for dir in dirs {
            let descriptor = Descriptor::load(&dir).map_err(|e| failed(format!("model {}: {e}", dir.display())))?;
            let mut space = LabelSpace::of_model(&descriptor, &dir, config.llm.examples_per_label)
                .map_err(|e| failed(format!("model {}: {e}", dir.display())))?;
            space.instructions = [Some(config.llm.instructions.clone()), route.llm_instructions.clone()].into_iter().flatten().collect();
            let template_text = config.inference.template.clone().unwrap_or_else(|| descriptor.template.clone());
            let template = Template::parse(&template_text).map_err(|e| failed(format!("template: {e}")))?;
            let decoder = Decoder::new(
                route.fields.clone(),
                template,
                config.max_message_bytes.max(DEFAULT_MAX_MESSAGE_BYTES),
                config.llm.max_text_chars,
            );
            let labels = RouteLabels::new(space, Roles::of(&descriptor), decoder, config.llm.max_text_chars, &config.llm.request_options());
            if dir == last {
                routes.insert(route.topic.clone(), labels.clone());
            }
            routes.insert(format!("{}\0{}", route.topic, descriptor.name), labels);
        }
    }
    Ok(routes)
}

/// The labels to ask the LLM for: those of the model that escalated the row (a cascade's
/// earlier tier, a canary), else the route's last tier.
pub(crate) fn labels_for<'a>(routes: &'a HashMap<String, RouteLabels>, row: &ResultRow) -> Option<&'a RouteLabels> {
    routes.get(&format!("{}\0{}", row.topic, row.model_name)).or_else(|| routes.get(&row.topic))
}

/// Run until `shutdown` resolves (then drain) or a fatal error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<EscalateReport, WorkerError> {
    let started = Instant::now();
    config.llm.validate().map_err(|reason| WorkerError::Llm(format!("configuration: {reason}")))?;
    let worker_id = config.worker_id();
    let counters = Arc::new(Counters::default());
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let readiness = Arc::new(Readiness::default());
    readiness.model_loaded.store(true, std::sync::atomic::Ordering::Relaxed);
    let server = match config.metrics.address.as_str() {
        "" => None,
        address => Some(telemetry::serve(address, telemetry::install()?, readiness.clone()).await?),
    };
    let routes = route_labels(&config)?;

    // The table must keep an LLM's answer over replays of the small model's rows.
    let clickhouse = Arc::new(ClickHouseService::with_counters(&config.clickhouse, counters.clone()));
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        ready = clickhouse.wait_for_schema() => ready?,
        _ = &mut shutdown => return Ok(EscalateReport::default()),
    }
    let version = clickhouse.version_column().await.map_err(|e| WorkerError::Sink(ch::SinkError::Fatal(e.to_string())))?;
    if version.as_deref() != Some(ch::schema::VERSION_COLUMN) {
        return Err(WorkerError::Llm(format!(
            "table {}.{} is versioned by `{}`, so a replayed small-model row would replace an LLM answer: run `triage schema migrate` first",
            config.clickhouse.database,
            config.clickhouse.table,
            version.unwrap_or_else(|| "nothing".into())
        )));
    }
    readiness.clickhouse_reachable.store(true, std::sync::atomic::Ordering::Relaxed);

    let kafka_config = config.kafka.clone();
    let topics = [config.kafka.escalation_topic.clone(), config.kafka.dead_letter_topic.clone()];
    tokio::task::spawn_blocking(move || {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        check_topics_exist(&kafka_config, &names, Duration::from_secs(30))
    })
    .await
    .map_err(|e| WorkerError::TaskFailed { task: "topic check", detail: e.to_string() })??;

    let producer: FutureProducer = config.kafka.client(ClientRole::SideTopics { max_message_bytes: config.max_message_bytes }).create()?;
    let side_topics = SideTopicsConfig::of(&config, &worker_id);
    let (fatal_tx, fatal_rx) = mpsc::channel(4);
    let settle =
        Settler::new(Arc::new(SideTopics::new(producer, side_topics, counters.clone())), tracker.clone(), counters.clone(), fatal_tx);
    let recent = Arc::new(Mutex::new(RecentKeys::new(RECENT_KEYS)));

    let (row_tx, row_rx) = mpsc::channel(1024);
    let block_policy = ch::BlockPolicy {
        max_rows: config.clickhouse.insert_max_rows,
        max_age: Duration::from_millis(config.clickhouse.insert_interval_ms),
    };
    let sink_settle = Arc::new(AnswerSettle { settle: settle.clone(), recent: recent.clone() });
    let sink = tokio::spawn(ch::run(clickhouse.clone(), row_rx, block_policy, sink_settle));

    // With a spend cap, the cap is shared through the ledger table (`triage schema apply`).
    let (ledger, ledger_task) = if config.llm.max_spend_per_hour.is_some() {
        let (ledger, task) = super::ledger::Ledger::start(clickhouse.clone(), &worker_id, &config.llm.model).await.map_err(|e| {
            WorkerError::Llm(format!(
                "the spend ledger {}.{} cannot be read ({e}): run `triage schema apply` (llm.max_spend_per_hour is shared through it)",
                config.clickhouse.database,
                ch::schema::ledger_table(&config.clickhouse)
            ))
        })?;
        (Some(ledger), Some(task))
    } else {
        (None, None)
    };

    let client = Arc::new(ChatClient::new(config.llm.chat_settings()).map_err(|e| WorkerError::Llm(e.to_string()))?);
    let batches = match config.llm.mode {
        super::config::LlmMode::Realtime => None,
        super::config::LlmMode::Batch => {
            Some(super::batch::BatchQueue::start(client.clone(), clickhouse.clone(), config.llm.batch_settings()).await.map_err(|e| {
                WorkerError::Llm(format!(
                    "the batch record {}.{} cannot be read ({e}): run `triage schema apply` (llm.mode = \"batch\" keeps its batches there)",
                    config.clickhouse.database,
                    ch::schema::batches_table(&config.clickhouse)
                ))
            })?)
        }
    };
    // A call slot per request in flight: in batch mode a request holds one until its batch ends.
    let call_slots = match config.llm.mode {
        super::config::LlmMode::Realtime => config.llm.max_concurrent_requests,
        super::config::LlmMode::Batch => config.llm.max_in_flight,
    };
    let shared = Arc::new(Shared {
        routes,
        client,
        batches,
        llm: config.llm.clone(),
        budget: Mutex::new(Budget::new(config.llm.limits())),
        calls: Semaphore::new(call_slots),
        recent,
        cache: Mutex::new(ResponseCache::new(config.llm.cache_entries)),
        skip_before_ms: config.llm.skip_before_ms(crate::time::now_ms()),
        clickhouse,
        rows: row_tx,
        settle: settle.clone(),
        worker_id: worker_id.clone(),
        readiness: readiness.clone(),
        refusal_streak: std::sync::atomic::AtomicUsize::new(0),
        answers_seen: tokio::sync::watch::Sender::new(0),
        last_reply_ms: std::sync::atomic::AtomicU64::new(0),
        started,
        ledger,
    });

    let mut kafka_config = config.kafka.clone();
    kafka_config.group_id = config.llm.group_id.clone();
    let kafka: StreamConsumer<TrackingContext> = kafka_config
        .client(ClientRole::Consumer)
        .create_with_context(TrackingContext { tracker: tracker.clone(), readiness: readiness.clone() })?;
    kafka.subscribe(&[config.kafka.escalation_topic.as_str()])?;
    tracing::info!(worker = %worker_id, group = %config.llm.group_id, topic = %config.kafka.escalation_topic, model = %config.llm.model, "answering escalations");

    // Records being worked on (the "already answered?" query, the budget wait, the call): at
    // most max_in_flight, however many librdkafka delivers after the pause took effect, so a
    // backlog never turns into thousands of concurrent ClickHouse queries.
    let intake =
        EscalateIntake { shared: shared.clone(), tracker: tracker.clone(), slots: Arc::new(Semaphore::new(config.llm.max_in_flight)) };
    let lifecycle = Lifecycle {
        kafka,
        tracker,
        settle,
        // Records wait out LLM outages and batches by design: the ages are exported (the stall
        // alert fires), readiness follows the endpoint instead.
        limits: lifecycle::Limits::of(&config, config.llm.max_in_flight, false),
        readiness: readiness.clone(),
        intake,
    };
    let stopped = lifecycle.run(shutdown, sink, fatal_rx).await;
    let (unfinished, fatal) = (stopped.unfinished, stopped.fatal);
    // The ledger's last calls are written once nothing holds it (bounded: calls still running
    // at a drain deadline keep it open).
    drop(shared);
    if let Some(task) = ledger_task {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    if let Some(server) = server {
        server.abort();
    }
    if let Some(fatal) = fatal {
        return Err(fatal);
    }
    let c = counters.snapshot();
    Ok(EscalateReport {
        consumed: c.consumed,
        answered: c.llm_answered,
        skipped: c.llm_skipped,
        cache_hits: c.llm_cache_hits,
        dead_lettered: c.dead_lettered,
        prompt_tokens: c.llm_prompt_tokens,
        completion_tokens: c.llm_completion_tokens,
        spend: c.llm_spend_micros as f64 / 1e6,
        seconds: started.elapsed().as_secs_f64(),
        unfinished,
    })
}

/// `triage escalate`'s intake: each record begun in the tracker, then answered on a task of its
/// own once one of `max_in_flight` slots is free.
struct EscalateIntake {
    shared: Arc<Shared>,
    tracker: Arc<Mutex<OffsetTracker>>,
    slots: Arc<Semaphore>,
}

impl Intake for EscalateIntake {
    async fn take(&mut self, m: &BorrowedMessage<'_>) {
        if let Some(consumed) = begin(m, &self.tracker) {
            let (shared, slots) = (self.shared.clone(), self.slots.clone());
            tokio::spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else { return };
                answer(shared, consumed).await;
            });
        }
    }

    /// Records taken go on to their end (or the drain deadline).
    fn close(&mut self) {}

    /// Done when nothing is in flight (which the lifecycle checks): every row was stored.
    fn finished(&self, _sink_ended: bool) -> bool {
        true
    }
}

fn begin(m: &BorrowedMessage<'_>, tracker: &Mutex<OffsetTracker>) -> Option<Consumed> {
    let tp = TopicPartition::new(m.topic(), m.partition());
    let delivery = tracker.lock().ok().and_then(|mut t| t.begin(&tp, m.offset(), 1))?;
    // Escalation records are keyed by their own place: no origin.
    Some(Consumed { delivery, message: Arc::new(kafka::source_message(m, None)) })
}

/// The text the LLM reads: the route's template over the original message; when the worker
/// had to cut the message (its JSON no longer parses) or it was not JSON, the message as it
/// travelled. Either way no longer than `llm.max_text_chars`.
pub(crate) fn text_of(route: &RouteLabels, record: &Escalation) -> Result<String, String> {
    let text = match &record.message {
        Value::Object(_) if !record.truncated => {
            let bytes = serde_json::to_vec(&record.message).map_err(|e| e.to_string())?;
            return route
                .decoder
                .decode(&bytes)
                .map(|d| prefix_chars(&d.text.text, route.max_text_chars).0.to_string())
                .map_err(|e| e.detail);
        }
        // A cut message: whatever of the template's fields survived whole, else the raw cut.
        Value::String(raw) if record.truncated => salvaged_fields(route, raw).unwrap_or_else(|| raw.clone()),
        Value::String(text) => text.clone(),
        Value::Null => return Err("the record has no message".into()),
        other => other.to_string(),
    };
    Ok(prefix_chars(&text, route.max_text_chars).0.to_string())
}

/// The route's template over the fields of a cut JSON message that are still whole: the
/// message is closed where it was cut (an open string and its containers) and read again.
fn salvaged_fields(route: &RouteLabels, raw: &str) -> Option<String> {
    let closed = close_cut_json(raw)?;
    route.decoder.decode(closed.as_bytes()).ok().map(|d| d.text.text)
}

/// Close a JSON text cut short: end an open string, drop a dangling key or separator, close
/// open arrays and objects. None when what is left is not an object.
fn close_cut_json(raw: &str) -> Option<String> {
    let mut closers = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    for c in raw.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => closers.push('}'),
            '[' => closers.push(']'),
            '}' | ']' => {
                closers.pop();
            }
            _ => {}
        }
    }
    let mut text = raw.to_string();
    if escaped {
        text.pop();
    }
    if in_string {
        text.push('"');
    }
    // Try the text as closed; failing that, drop the last unfinished member and try again.
    for _ in 0..4 {
        let mut candidate = text.trim_end().trim_end_matches([',', ':']).to_string();
        candidate.extend(closers.iter().rev());
        if let Ok(Value::Object(_)) = serde_json::from_str::<Value>(&candidate) {
            return Some(candidate);
        }
        let cut = text.rfind([',', '{'])?;
        text.truncate(if text.as_bytes()[cut] == b'{' { cut + 1 } else { cut });
    }
    None
}

/// How one record ends.
enum Fate {
    Answer(Box<ResultRow>, bool),
    DeadLetter(DeadLetterReason, String),
    /// Settled without a write (already answered).
    Done,
    /// Refused by the endpoint: dead-lettered once an answer to another message shows the
    /// refusal was this message's own (or `llm.refusal_hold_ms` passed); left unsettled if the
    /// streak it belongs to stops the command.
    Refused(String),
    /// Left unsettled: the command is stopping for a reason no record can get past, so its
    /// offset must not be committed (the next start reads it again).
    Abandoned,
}

async fn answer(shared: Arc<Shared>, consumed: Consumed) {
    let record = match Escalation::parse(&consumed.message.payload) {
        Ok(r) => r,
        Err(e) => return shared.settle.dead_letter(consumed, DeadLetterReason::EscalationInvalid, e.to_string()),
    };
    // Start from now: a backlog escalated before the cutoff is settled without a call.
    if let (Some(cutoff), Some(escalated)) = (shared.skip_before_ms, consumed.message.timestamp_ms) {
        if escalated < cutoff {
            LlmSkipped { reason: "too_old" }.emit(shared.settle.counters());
            return shared.settle.done(&consumed.delivery);
        }
    }
    let key = record.key();
    match fate_of(&shared, &record, &key).await {
        Fate::Answer(row, agreed) => {
            // The sink stopped (fatal): the record stays unfinished and is read again.
            let _ = shared.rows.send(SinkItem { row: *row, ticket: Answered { record: consumed, key, agreed } }).await;
        }
        Fate::DeadLetter(reason, detail) => {
            if let Ok(mut recent) = shared.recent.lock() {
                recent.forget(&key);
            }
            shared.settle.dead_letter(consumed, reason, detail);
        }
        Fate::Done => shared.settle.done(&consumed.delivery),
        Fate::Refused(detail) => {
            let mut answers = shared.answers_seen.subscribe();
            let hold = Duration::from_millis(shared.llm.refusal_hold_ms);
            let _ = tokio::time::timeout(hold, answers.changed()).await;
            if shared.refusal_streak.load(std::sync::atomic::Ordering::SeqCst) >= shared.llm.max_consecutive_refusals {
                // The endpoint refuses everyone and the command is stopping: not committed.
                return;
            }
            if let Ok(mut recent) = shared.recent.lock() {
                recent.forget(&key);
            }
            shared.settle.dead_letter(consumed, DeadLetterReason::LlmRefused, detail);
        }
        Fate::Abandoned => {}
    }
}

/// What an escalation record becomes: nothing to do (already answered), a dead letter (no
/// route, no text, refused, invalid twice, failing alone), or the LLM's answer as a row.
async fn fate_of(shared: &Shared, record: &Escalation, key: &Key) -> Fate {
    match prepare(shared, record, key).await {
        Ok(asked) => ask(shared, record, key, &asked).await,
        Err(fate) => fate,
    }
}

/// A record's request, made once and sent as many times as its attempts take.
struct Asked<'a> {
    route: &'a RouteLabels,
    request: Value,
    /// The response cache's key.
    digest: [u8; 32],
    /// What a call holds of the limits until the server says what it used.
    estimate: Estimate,
}

/// The record's route, whether its message is answered already, and its request.
async fn prepare<'a>(shared: &'a Shared, record: &Escalation, key: &Key) -> Result<Asked<'a>, Fate> {
    let Some(route) = labels_for(&shared.routes, &record.row) else {
        return Err(Fate::DeadLetter(
            DeadLetterReason::Unrouted,
            format!("no route for the message's topic `{}` in this configuration (its labels are unknown)", record.row.topic),
        ));
    };
    let fresh = shared.recent.lock().map(|mut r| r.insert(key.clone(), ())).unwrap_or(true);
    if !fresh || shared.already_answered(&record.row).await {
        LlmSkipped { reason: "already_answered" }.emit(shared.settle.counters());
        return Err(Fate::Done);
    }
    let text = text_of(route, record)
        .map_err(|detail| Fate::DeadLetter(DeadLetterReason::EscalationInvalid, format!("the message's text: {detail}")))?;
    let request = route.prompt.request(&text);
    // Serialized once (a system prompt of every label is kilobytes): the cache key and the size.
    let serialized = request.to_string();
    let digest = request_digest(&serialized);
    // About four characters a token, plus the longest reply (and what counts if the server
    // never says what it used).
    let estimate = Estimate { prompt_tokens: (serialized.len() / 4) as u64, completion_tokens: u64::from(shared.llm.max_tokens) };
    Ok(Asked { route, request, digest, estimate })
}

/// How a record's attempts have gone so far, for the retry policy.
#[derive(Default)]
struct Attempts {
    /// Attempts that failed for want of a reply (timeouts, 429, 5xx).
    unanswered: u32,
    /// Replies that did not parse or named unknown labels.
    invalid: u32,
    /// When the first unanswered attempt began: replies to other calls after it show the
    /// endpoint is up, so this message is what fails.
    failing_since: Option<u64>,
    last_reply: String,
}

/// What the retry policy says after an attempt that gave no answer.
enum Next {
    Retry(Duration),
    /// At once (an invalid reply is asked once more).
    RetryNow,
    End(Fate),
}

/// Ask until the record has its fate: a call per attempt, the policy between attempts.
async fn ask(shared: &Shared, record: &Escalation, key: &Key, asked: &Asked<'_>) -> Fate {
    let mut attempts = Attempts::default();
    loop {
        // Held for one attempt only: a record waiting out a backoff leaves its slot to others.
        let Ok(slot) = shared.calls.acquire().await else { return Fate::Abandoned };
        // Looked up with the slot held: identical messages of a backlog queue here behind the
        // first, and find its answer (no call, no spend) instead of all missing at once.
        if let Some(cached) = shared.cached_answer(asked.route, record, &asked.digest) {
            return cached;
        }
        let began = shared.elapsed_ms();
        let reservation = shared.wait_for_budget(asked.estimate).await;
        let reply = shared.call(&asked.request, key).await;
        let reply = shared.account(reservation, reply);
        drop(slot);
        let next = match reply {
            Ok(call) => match asked.route.space.parse(&call.content) {
                Ok(answer) => {
                    shared.refusal_streak.store(0, std::sync::atomic::Ordering::SeqCst);
                    shared.answers_seen.send_modify(|n| *n += 1);
                    if let Ok(mut cache) = shared.cache.lock() {
                        cache.insert(asked.digest, call.content.clone());
                    }
                    let agreed = super::answer::agrees(&record.row, &answer, &asked.route.roles);
                    return Fate::Answer(Box::new(shared.row(&record.row, &answer, asked.route, &call)), agreed);
                }
                Err(e) => {
                    attempts.last_reply = cut_at_char(&call.content, 2_000).to_string();
                    invalid_reply(shared, &mut attempts, e.to_string())
                }
            },
            Err(e) => after_failure(shared, &mut attempts, e, began),
        };
        match next {
            Next::End(fate) => return fate,
            Next::RetryNow => {}
            Next::Retry(delay) => tokio::time::sleep(delay).await,
        }
    }
}

/// An answer that is no answer: asked once more, then dead-lettered with the reply.
fn invalid_reply(shared: &Shared, attempts: &mut Attempts, why: String) -> Next {
    attempts.invalid += 1;
    LlmCallFailed { model: &shared.llm.model, kind: "invalid_reply" }.emit(shared.settle.counters());
    if attempts.invalid >= 2 {
        return Next::End(Fate::DeadLetter(DeadLetterReason::LlmReplyInvalid, format!("{why}; reply: {}", attempts.last_reply)));
    }
    Next::RetryNow
}

/// The retry policy for a call that failed.
fn after_failure(shared: &Shared, attempts: &mut Attempts, e: ChatError, began: u64) -> Next {
    match e {
        e @ ChatError::Envelope(_) => invalid_reply(shared, attempts, e.to_string()),
        e if refuses_every_call(&e) => {
            shared.settle.stop(WorkerError::Llm(format!(
                "{e}: the endpoint refuses every call (check llm.url, llm.model, the API key and llm.structured_output)"
            )));
            Next::End(Fate::Abandoned)
        }
        e if e.is_retryable() => {
            // Timeouts, 429 and 5xx after the call's own retries. While the endpoint answers
            // nothing it is away, and the message is not at fault: wait as long as it lasts
            // (the consumer pauses when too much is waiting). But a message that keeps failing
            // while other calls get replies (a body that always times out, one that crashes
            // the server) is dead-lettered after `llm.max_attempts_per_message`, or it would
            // hold the tier.
            attempts.unanswered += 1;
            let since = *attempts.failing_since.get_or_insert(began);
            let others_answered = shared.last_reply_ms.load(std::sync::atomic::Ordering::SeqCst) > since;
            if attempts.unanswered >= shared.llm.max_attempts_per_message && others_answered {
                return Next::End(Fate::DeadLetter(
                    DeadLetterReason::LlmTimeout,
                    format!(
                        "{e}: {} attempts of {} call(s) each failed while the endpoint answered other messages",
                        attempts.unanswered,
                        shared.llm.retries + 1
                    ),
                ));
            }
            if attempts.unanswered >= 3 && !others_answered {
                shared.readiness.set_stalled(Some(format!("the LLM endpoint keeps failing ({})", e.kind())));
            }
            let delay = Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).delay(attempts.unanswered);
            tracing::warn!(
                kind = e.kind(),
                attempt = attempts.unanswered,
                retry_in_s = delay.as_secs(),
                "an LLM call keeps failing; the record waits"
            );
            Next::Retry(delay)
        }
        e => {
            shared.replied();
            // One message's fault, unless every message gets it: a streak of refusals with no
            // answer between stops the command before it dead-letters the whole topic.
            let streak = shared.refusal_streak.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if streak >= shared.llm.max_consecutive_refusals {
                shared.settle.stop(WorkerError::Llm(format!(
                    "{e}: {streak} messages in a row refused and none answered, so the endpoint refuses every call (check llm.model and what the server accepts; llm.max_consecutive_refusals)"
                )));
                return Next::End(Fate::Abandoned);
            }
            Next::End(Fate::Refused(e.to_string()))
        }
    }
}

/// Statuses that no message can get past: the key, the URL, the model name, the dialect, a
/// request parameter the model does not take, a spent budget or quota. A refusal of one
/// message (too long for the context, say) is not among them.
fn refuses_every_call(e: &ChatError) -> bool {
    match e {
        ChatError::Status { status, body } => {
            (401..=405).contains(status)
                || (*status >= 400 && body.contains("response_format"))
                // A batch the Batch API rejected whole (its file, its model): every batch would be.
                || body.starts_with(super::batch::BATCH_FAILED)
                || (*status >= 400 && (names_a_request_parameter(body) || spent(body)))
        }
        _ => false,
    }
}

/// An error body blaming a parameter of the request itself (OpenAI's `unsupported_parameter`
/// for `max_tokens` / `temperature` on reasoning models, vLLM's and LiteLLM's "extra inputs",
/// a `param` other than the messages): every call sends it, so every call fails.
fn names_a_request_parameter(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    let phrases = [
        "unsupported parameter",
        "unsupported_parameter",
        "unsupported value",
        "unrecognized request argument",
        "unknown parameter",
        "extra inputs are not permitted",
        "extra_forbidden",
    ];
    if phrases.iter().any(|p| lower.contains(p)) {
        return true;
    }
    // OpenAI-style `"param": "max_tokens"`; `messages` / `input` point at the message instead.
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["param"].as_str().map(str::to_owned))
        .is_some_and(|param| !matches!(param.as_str(), "messages" | "input" | "prompt" | ""))
}

/// A budget or quota that is spent: no message gets through until someone acts.
fn spent(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    ["insufficient_quota", "exceeded your current quota", "budget has been exceeded", "budget_exceeded", "exceededbudget"]
        .iter()
        .any(|p| lower.contains(p))
}

impl Shared {
    fn elapsed_ms(&self) -> u64 {
        // +1 so that 0 keeps meaning "never".
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// The endpoint replied (to any call): it is up.
    fn replied(&self) {
        self.last_reply_ms.fetch_max(self.elapsed_ms(), std::sync::atomic::Ordering::SeqCst);
        self.readiness.set_stalled(None);
    }

    /// Whether the table already holds an LLM's answer for this message (asked through the
    /// primary key: day, topic, partition, offset). Retried while ClickHouse is away: the
    /// call it would save costs money.
    async fn already_answered(&self, row: &ResultRow) -> bool {
        let mut attempt = 0;
        loop {
            match self.clickhouse.has_llm_answer(row).await {
                Ok(answered) => return answered,
                Err(e) => {
                    attempt += 1;
                    let delay = Backoff::new(Duration::from_millis(200), Duration::from_secs(10)).delay(attempt);
                    tracing::warn!(error = %e, "cannot ask ClickHouse whether a message is answered; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Wait until the limits let a call expected to use `estimate` start; its reservation
    /// (None only if the budget's lock was poisoned by a panic: the call is not held back).
    async fn wait_for_budget(&self, estimate: Estimate) -> Option<Reservation> {
        loop {
            let now = Instant::now();
            let verdict = match self.budget.lock() {
                Ok(mut b) => b.try_start(now, estimate, self.ledger.as_ref().map_or(0.0, |l| l.elsewhere())),
                Err(_) => return None,
            };
            let wait = match verdict {
                Ok(reservation) => return Some(reservation),
                Err(wait) => wait,
            };
            let limit = match wait {
                Wait::Requests(_) => "requests",
                Wait::Tokens(_) => "tokens",
                Wait::Spend(_) => "spend",
            };
            LlmBudgetWaited { limit, wait: wait.duration() }.emit(self.settle.counters());
            // Waits are re-checked at least every few seconds (other calls finish meanwhile).
            tokio::time::sleep(wait.duration().clamp(Duration::from_millis(50), Duration::from_secs(5))).await;
        }
    }

    /// Settle a call's reservation: (prompt tokens, completion tokens, cost) counted.
    fn finish_call(&self, reservation: Option<Reservation>, used: Used, attempts: u32) -> (u64, u64, f64) {
        let counted = match (reservation, self.budget.lock()) {
            (Some(r), Ok(mut b)) => b.finish(Instant::now(), r, used, attempts),
            _ => match used {
                Used::Reported(p, c, cached) => (p, c, self.llm.limits().cost_with_cached(p, cached, c)),
                _ => (0, 0, 0.0),
            },
        };
        if let (Some(ledger), (prompt, completion, cost)) = (&self.ledger, counted) {
            if cost > 0.0 {
                ledger.record(prompt, completion, cost);
            }
        }
        counted
    }

    /// A call's cost settled in the budget, the ledger and the metrics; a reply without
    /// `usage` (or a timeout) counts its estimate, which the row then carries.
    fn account(&self, reservation: Option<Reservation>, call: Result<Completion, Failed>) -> Result<Completion, ChatError> {
        let model = self.llm.model.as_str();
        let counters = self.settle.counters();
        match call {
            Ok(mut c) => {
                let used = if c.usage_reported {
                    Used::Reported(c.prompt_tokens, c.completion_tokens, c.cached_prompt_tokens)
                } else {
                    Used::Unknown
                };
                let (prompt, completion, cost) = self.finish_call(reservation, used, c.attempts);
                (c.prompt_tokens, c.completion_tokens) = (prompt, completion);
                LlmCalled {
                    model,
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    latency: c.latency,
                    cost_micros: (cost * 1e6).round() as u64,
                }
                .emit(counters);
                self.replied();
                Ok(c)
            }
            Err(Failed { error, attempts }) => {
                // A timed-out call may have run on the server: it costs its estimate.
                let used = if matches!(error, ChatError::Timeout(_)) { Used::Unknown } else { Used::Nothing };
                let (prompt, completion, cost) = self.finish_call(reservation, used, attempts);
                if cost > 0.0 {
                    LlmCalled {
                        model,
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                        latency: Duration::ZERO,
                        cost_micros: (cost * 1e6).round() as u64,
                    }
                    .emit(counters);
                }
                LlmCallFailed { model, kind: error.kind() }.emit(counters);
                Err(error)
            }
        }
    }

    /// One call: over HTTP now, or as a line of a batch.
    async fn call(&self, request: &Value, key: &Key) -> Result<Completion, Failed> {
        match &self.batches {
            None => self.client.complete_counted(request).await,
            Some(queue) => {
                let id = super::batch::custom_id(&key.0, key.1, key.2);
                queue.complete(id, request.clone()).await.map_err(|error| Failed { error, attempts: 1 })
            }
        }
    }

    /// The answer an identical request got before, if the cache holds one: a row with no
    /// tokens spent (the call that paid for it has its own row).
    fn cached_answer(&self, route: &RouteLabels, record: &Escalation, digest: &[u8; 32]) -> Option<Fate> {
        let content = self.cache.lock().ok()?.get(digest).cloned()?;
        let answer = route.space.parse(&content).ok()?;
        LlmCacheHit { model: &self.llm.model }.emit(self.settle.counters());
        let call = Completion {
            content,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_prompt_tokens: 0,
            latency: Duration::ZERO,
            attempts: 0,
            usage_reported: true,
        };
        let agreed = super::answer::agrees(&record.row, &answer, &route.roles);
        Some(Fate::Answer(Box::new(self.row(&record.row, &answer, route, &call)), agreed))
    }

    fn row(&self, small: &ResultRow, answer: &Answer, route: &RouteLabels, call: &Completion) -> ResultRow {
        answered_row(small, answer, &route.roles, &self.llm.model, call, &self.worker_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_keys_refuse_a_second_copy_and_forget_the_oldest() {
        let mut recent = RecentKeys::new(RECENT_KEYS);
        let key = |o: u64| ("tickets".to_string(), 0u32, o);
        assert!(recent.insert(key(1), ()));
        assert!(!recent.insert(key(1), ()), "a second record of one message is not sent again");
        recent.forget(&key(1));
        assert!(recent.insert(key(1), ()), "a dead-lettered answer may be tried again");
        for o in 2..(RECENT_KEYS as u64 + 3) {
            recent.insert(key(o), ());
        }
        assert!(recent.entries.len() <= RECENT_KEYS && recent.order.len() <= RECENT_KEYS);
        assert!(recent.insert(key(1), ()), "the oldest is forgotten (the table still remembers it)");
    }

    #[test]
    fn a_forgotten_and_reinserted_entry_lives_its_full_turn_and_capacity_zero_remembers_nothing() {
        let mut memory: Memory<u32, &str> = Memory::new(3);
        assert!(memory.insert(1, "a"));
        memory.forget(&1);
        assert!(memory.insert(1, "b"));
        // Inserting 3 ages out the first turn of 1; its second turn must survive that.
        assert!(memory.insert(2, "c") && memory.insert(3, "d"));
        assert_eq!(memory.get(&1), Some(&"b"), "evicting a stale turn kept the newer entry");
        assert!(memory.insert(4, "e"));
        assert_eq!((memory.get(&1), memory.get(&2)), (None, Some(&"c")), "then the oldest goes first");
        assert!(!memory.insert(2, "z") && memory.get(&2) == Some(&"c"), "nothing replaced");
        let mut off: Memory<u32, ()> = Memory::new(0);
        assert!(!off.insert(1, ()) && off.get(&1).is_none(), "cache_entries = 0: off");
    }

    fn route(max_text_chars: usize) -> RouteLabels {
        use crate::llm::prompt::HeadLabels;
        let intent = HeadLabels {
            name: "intent".into(),
            multi: false,
            labels: vec![("card_arrival".into(), None)],
            max_items: 1,
            examples: Default::default(),
        };
        RouteLabels::new(
            LabelSpace { heads: vec![intent], instructions: Vec::new() },
            Roles::default(),
            Decoder::new(crate::message::FieldMap::default(), Template::parse("{subject}\n{body}").unwrap(), 1 << 20, max_text_chars),
            max_text_chars,
            &crate::llm::prompt::RequestOptions::new("m", crate::llm::prompt::StructuredOutput::None, 16),
        )
    }

    /// Issue 22: a record the worker had to cut went to the LLM raw and whole (up to ~1 MB of
    /// JSON, every field). Now it goes through the template where its fields survived, and is
    /// capped like any other text.
    #[test]
    fn a_cut_record_goes_through_the_template_and_the_length_cap() {
        let route = route(500);
        let raw = format!(r#"{{"customer_ssn": "123-45-6789", "subject": "card missing", "body": "{}"#, "a".repeat(1_000_000));
        let record = Escalation { row: ResultRow::default(), message: Value::String(raw.clone()), truncated: true };
        let text = text_of(&route, &record).unwrap();
        assert!(text.starts_with("card missing\naaaa"), "{}", &text[..40]);
        assert!(!text.contains("123-45-6789"), "fields the template does not name stay out");
        assert!(text.chars().count() <= 500, "{} chars", text.chars().count());
        // Not JSON at all: the raw text, capped.
        let garbled = Escalation { row: ResultRow::default(), message: Value::String("x".repeat(10_000)), truncated: true };
        assert_eq!(text_of(&route, &garbled).unwrap().chars().count(), 500);
        let plain = Escalation { row: ResultRow::default(), message: Value::String("é".repeat(10_000)), truncated: false };
        assert_eq!(text_of(&route, &plain).unwrap().chars().count(), 500);
    }

    /// Issue 22: the last cascade tier's labels were asked for even when an earlier tier (or a
    /// canary) had escalated the message.
    #[test]
    fn the_llm_is_asked_for_the_labels_of_the_model_that_escalated() {
        let mut fast = route(100);
        fast.space.heads[0].name = "fast_intent".into();
        let last = route(100);
        let routes = HashMap::from([
            ("tickets".to_string(), last.clone()),
            ("tickets\0accurate".to_string(), last),
            ("tickets\0fast".to_string(), fast),
        ]);
        let row = |model: &str| ResultRow { topic: "tickets".into(), model_name: model.into(), ..ResultRow::default() };
        let head = |model: &str| labels_for(&routes, &row(model)).map(|r| r.space.heads[0].name.clone());
        assert_eq!(head("fast").as_deref(), Some("fast_intent"));
        assert_eq!(head("accurate").as_deref(), Some("intent"));
        assert_eq!(head("renamed-since").as_deref(), Some("intent"), "an unknown model: the route's last tier");
        let other = ResultRow { topic: "returns".into(), ..ResultRow::default() };
        assert!(labels_for(&routes, &other).is_none());
    }

    #[test]
    fn cut_json_is_closed_where_it_was_cut() {
        let parse = |s: &str| close_cut_json(s).map(|c| serde_json::from_str::<Value>(&c).unwrap());
        assert_eq!(parse(r#"{"a": "x", "b": "yy"#), Some(serde_json::json!({"a": "x", "b": "yy"})));
        assert_eq!(parse(r#"{"a": "x", "b": ["p", "q"#), Some(serde_json::json!({"a": "x", "b": ["p", "q"]})));
        assert_eq!(parse(r#"{"a": "x", "b":"#), Some(serde_json::json!({"a": "x"})));
        assert_eq!(parse(r#"{"a": "x", "b"#), Some(serde_json::json!({"a": "x"})));
        assert_eq!(parse(r#"{"a": "x\"#), Some(serde_json::json!({"a": "x"})));
        assert_eq!(parse(r#"{"a": {"n": 1, "m": tr"#), Some(serde_json::json!({"a": {"n": 1}})));
        assert_eq!(parse("[1, 2"), None, "not an object");
    }

    #[test]
    fn only_statuses_no_message_can_pass_stop_the_command() {
        let status = |status: u16, body: &str| ChatError::Status { status, body: body.into() };
        assert!(refuses_every_call(&status(401, "invalid api key")));
        assert!(refuses_every_call(&status(404, "model not found")));
        assert!(refuses_every_call(&status(500, "Input should be 'text' or 'json_object' at response_format.type")));
        assert!(!refuses_every_call(&status(400, "maximum context length exceeded")), "one message too long");
        let openai = |message: &str, param: &str, code: &str| {
            serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}).to_string()
        };
        let max_tokens =
            openai("Unsupported parameter: 'max_tokens' is not supported with this model.", "max_tokens", "unsupported_parameter");
        assert!(refuses_every_call(&status(400, &max_tokens)));
        let temperature =
            openai("Unsupported value: 'temperature' does not support 0 with this model.", "temperature", "unsupported_value");
        assert!(refuses_every_call(&status(400, &temperature)));
        assert!(refuses_every_call(&status(400, r#"{"detail": [{"type": "extra_forbidden", "loc": ["body", "seed"]}]}"#)));
        assert!(refuses_every_call(&status(400, "LiteLLM: Budget has been exceeded! Current cost: 10.2, Max budget: 10.0")));
        assert!(refuses_every_call(&status(429, &openai("You exceeded your current quota", "", "insufficient_quota"))));
        let too_long = openai("This model's maximum context length is 8192 tokens.", "messages", "context_length_exceeded");
        assert!(!refuses_every_call(&status(400, &too_long)), "the message's own fault");
        assert!(!refuses_every_call(&status(429, &openai("Rate limit reached", "", "rate_limit_exceeded"))), "a rate limit passes");
        assert!(!refuses_every_call(&status(429, "slow down")));
        assert!(!refuses_every_call(&ChatError::Timeout(Duration::from_secs(1))));
    }
}
