//! The ClickHouse sink against a real server, without Kafka: its one promise, seconds per check.
//! A row is reported stored only after ClickHouse confirmed its INSERT, whatever the server is
//! doing meanwhile (frozen, stopped, SIGKILLed); a row ClickHouse refuses for its content is
//! reported rejected alone; a table that can never take rows ends the sink with nothing reported.
//! (The worker tests check the same promise end to end, with Kafka offsets and SIGKILLs.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::worker::{runtime, shared_clickhouse, wait_until, PrivateClickHouse};
use tokio::sync::mpsc;
use triage::config::ClickHouseConfig;
use triage::sink::clickhouse::{self as ch, ClickHouseService, ResultRow, Settle, SinkError, SinkItem};
use triage::telemetry::events::Counters;

/// What the sink reported, in order: (ticket, None, stamp) stored, (ticket, Some(error), 0)
/// rejected; the stamp is the stored row's processed_time_ms, the same for one INSERT's rows.
#[derive(Default)]
struct Reports(Mutex<Vec<(u32, Option<String>, u64)>>);

impl Settle<u32> for Reports {
    fn stored(&self, ticket: u32, row: &ResultRow) {
        assert!(row.processed_time_ms > 0 && row.row_version > 0, "a stored row was stamped");
        self.0.lock().unwrap().push((ticket, None, row.processed_time_ms));
    }
    fn rejected(&self, ticket: u32, error: &str) {
        self.0.lock().unwrap().push((ticket, Some(error.to_string()), 0));
    }
}

impl Reports {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn stored(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.0.lock().unwrap().iter().filter(|(_, e, _)| e.is_none()).map(|(t, _, _)| *t).collect();
        v.sort_unstable();
        v
    }
    fn rejected(&self) -> Vec<(u32, String)> {
        self.0.lock().unwrap().iter().filter_map(|(t, e, _)| e.clone().map(|e| (*t, e))).collect()
    }
}

struct Sink {
    config: ClickHouseConfig,
    rows: Option<mpsc::Sender<SinkItem<u32>>>,
    reports: Arc<Reports>,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<Result<(), SinkError>>,
}

impl Sink {
    /// A sink on `database` (schema applied) of the server at `url`.
    fn start(url: &str, database: &str, edit: impl FnOnce(&mut ClickHouseConfig)) -> Sink {
        let mut config = ClickHouseConfig {
            url: url.into(),
            database: database.into(),
            insert_timeout_ms: 800,
            retry_initial_ms: 50,
            retry_max_ms: 400,
            insert_interval_ms: 50,
            ..Default::default()
        };
        edit(&mut config);
        // Twice, as every restarted worker does: applying the schema is idempotent.
        for _ in 0..2 {
            runtime().block_on(ClickHouseService::new(&config).apply_schema()).expect("apply schema");
        }
        let counters = Arc::new(Counters::default());
        let service = Arc::new(ClickHouseService::with_counters(&config, counters.clone()));
        let (tx, rx) = mpsc::channel(1024);
        let reports = Arc::new(Reports::default());
        let policy = ch::BlockPolicy { max_rows: config.insert_max_rows, max_age: Duration::from_millis(config.insert_interval_ms) };
        let settle: Arc<dyn Settle<u32>> = reports.clone();
        let task = runtime().spawn(ch::run(service, rx, policy, settle));
        Sink { config, rows: Some(tx), reports, counters, task }
    }

    fn send(&self, from: u32, n: u32) {
        let tx = self.rows.as_ref().expect("open");
        for i in from..from + n {
            let row = ResultRow {
                topic: "tickets".into(),
                offset: i as u64,
                message_id: format!("m-{i}"),
                event_time: 1_700_000_000 + i * 86_400,
                answered_by: "model:tiny".into(),
                ..Default::default()
            };
            runtime().block_on(tx.send(SinkItem { row, ticket: i })).expect("sink running");
        }
    }

    /// Close the input; the sink's result once it flushed.
    fn finish(mut self) -> (Arc<Reports>, Result<(), SinkError>) {
        self.rows = None;
        let result = runtime().block_on(self.task).expect("sink task");
        (self.reports, result)
    }

    fn count(&self, sql: &str) -> u64 {
        let client = clickhouse::Client::default().with_url(&self.config.url).with_database(&self.config.database).with_validation(false);
        runtime().block_on(client.query(sql).fetch_one::<u64>()).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn retries(&self) -> u64 {
        self.counters.snapshot().insert_retries
    }
}

/// While the server cannot take rows (`down`), nothing is reported; once it can (`up`), every
/// row is reported stored exactly once and is in the table.
fn nothing_reported_until_confirmed(name: &str, down: impl FnOnce(&mut PrivateClickHouse), up: impl FnOnce(&mut PrivateClickHouse)) {
    let mut server = PrivateClickHouse::start();
    let sink = Sink::start(&server.url(), name, |_| {});
    sink.send(0, 20);
    wait_until(Duration::from_secs(30), "the first rows stored", || sink.reports.len() == 20);
    down(&mut server);
    sink.send(20, 30);
    // Two failed attempts: the rows reached the sink and it has been trying.
    wait_until(Duration::from_secs(60), "two failed INSERTs", || sink.retries() >= 2);
    assert_eq!(sink.reports.len(), 20, "a row was reported before ClickHouse confirmed it");
    up(&mut server);
    wait_until(Duration::from_secs(60), "every row reported", || sink.reports.len() >= 50);
    assert_eq!(sink.count("SELECT count() FROM results FINAL"), 50);
    let (reports, result) = sink.finish();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(reports.stored(), (0..50).collect::<Vec<_>>(), "each row reported stored once");
    assert!(reports.rejected().is_empty());
}

#[test]
fn a_frozen_server_gets_nothing_reported_until_it_answers() {
    nothing_reported_until_confirmed("sink_frozen", |s| s.freeze(), |s| s.thaw());
}

#[test]
fn a_stopped_server_gets_nothing_reported_until_it_is_back() {
    nothing_reported_until_confirmed("sink_stopped", |s| s.stop(), |s| s.restart());
}

#[test]
fn a_killed_server_gets_nothing_reported_until_it_is_back() {
    nothing_reported_until_confirmed("sink_killed", |s| s.kill(), |s| s.restart());
}

#[test]
fn a_row_clickhouse_refuses_is_reported_rejected_alone_and_the_rest_stored() {
    let ch = shared_clickhouse();
    let sink = Sink::start(&ch.url(), "sink_rejects", |c| c.insert_max_rows = 16);
    let client = clickhouse::Client::default().with_url(ch.url()).with_database("sink_rejects").with_validation(false);
    runtime()
        .block_on(client.query("ALTER TABLE results ADD COLUMN guard UInt8 DEFAULT throwIf(message_id IN ('m-7', 'm-30'))").execute())
        .expect("guard column");
    sink.send(0, 40);
    wait_until(Duration::from_secs(60), "every row reported", || sink.reports.len() >= 40);
    assert_eq!(sink.count("SELECT count() FROM results"), 38, "exactly the others stored, once");
    // What the worker reports and exports (triage_clickhouse_rows_total, the run's summary)
    // counts the same rows as the table, across the split blocks.
    let counted = sink.counters.snapshot();
    assert_eq!((counted.rows_inserted, counted.rows_rejected), (38, 2), "counted as stored and rejected");
    let (reports, result) = sink.finish();
    assert!(result.is_ok(), "{result:?}");
    let rejected = reports.rejected();
    assert_eq!(rejected.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![7, 30]);
    assert!(rejected.iter().all(|(_, e)| e.contains("395") || e.contains("throwIf")), "ClickHouse's reason: {rejected:?}");
    assert_eq!(reports.stored(), (0..40).filter(|t| *t != 7 && *t != 30).collect::<Vec<_>>());
}

/// The sink's result once its input closed, failing the test if it does not end in time.
fn finish_within(sink: Sink, limit: Duration) -> (Arc<Reports>, Result<(), SinkError>) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(sink.finish());
    });
    done_rx.recv_timeout(limit).unwrap_or_else(|_| panic!("the sink did not end within {limit:?} of its input closing"))
}

#[test]
fn blocks_are_cut_by_size_and_a_closed_input_is_flushed() {
    let ch = shared_clickhouse();
    // An hour's age limit: only a full block or the closed input may start an INSERT.
    let sink = Sink::start(&ch.url(), "sink_blocks", |c| {
        c.insert_max_rows = 10;
        c.insert_interval_ms = 3_600_000;
    });
    sink.send(0, 35);
    let (reports, result) = finish_within(sink, Duration::from_secs(60));
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(reports.stored(), (0..35).collect::<Vec<_>>(), "the last partial block flushed at close");
    // Every row of one INSERT carries the block's stamp: 35 rows in blocks of 10 are 4 INSERTs.
    let stamps: std::collections::BTreeSet<u64> = reports.0.lock().unwrap().iter().map(|(_, _, stamp)| *stamp).collect();
    assert!(stamps.len() <= 4, "35 rows in blocks of 10 take 4 INSERTs, not {}", stamps.len());
    let client = clickhouse::Client::default().with_url(ch.url()).with_database("sink_blocks").with_validation(false);
    let rows: u64 = runtime().block_on(client.query("SELECT count() FROM results").fetch_one()).expect("rows");
    assert_eq!(rows, 35);
}

const USERS_XML: &str = r#"<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users>
    <default><password></password><networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota></default>
    <triage_writer><password>s3cret-pass</password><networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota></triage_writer>
  </users>
  <quotas><default></default></quotas>
</yandex>
"#;

#[test]
fn a_password_protected_user_stores_rows_and_a_wrong_password_is_fatal_at_once() {
    let server = triage::local::LocalClickHouse::start_with_users(USERS_XML).expect("clickhouse-server with a users file");
    fn writer(password: &'static str) -> impl FnOnce(&mut ClickHouseConfig) {
        move |c: &mut ClickHouseConfig| {
            c.user = "triage_writer".into();
            c.password = triage::config::Secret::new(password);
        }
    }
    let sink = Sink::start(&server.url(), "sink_password", writer("s3cret-pass"));
    sink.send(0, 12);
    let (reports, result) = finish_within(sink, Duration::from_secs(60));
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(reports.stored(), (0..12).collect::<Vec<_>>());

    // A wrong password never gets better: the sink ends with the reason, reporting nothing.
    let mut config = ClickHouseConfig { url: server.url(), database: "sink_password".into(), ..Default::default() };
    writer("wrong")(&mut config);
    let service = Arc::new(ClickHouseService::new(&config));
    let (tx, rx) = mpsc::channel(16);
    let reports = Arc::new(Reports::default());
    let settle: Arc<dyn Settle<u32>> = reports.clone();
    let task = runtime().spawn(ch::run(service, rx, ch::BlockPolicy { max_rows: 10, max_age: Duration::from_millis(20) }, settle));
    let row = ResultRow { topic: "tickets".into(), message_id: "m-x".into(), event_time: 1_700_000_000, ..Default::default() };
    runtime().block_on(tx.send(SinkItem { row, ticket: 99 })).expect("sink running");
    let result = runtime().block_on(async { tokio::time::timeout(Duration::from_secs(60), task).await });
    let error = result.expect("a wrong password ends the sink, not retried forever").expect("sink task").expect_err("fatal");
    let text = error.to_string();
    assert!(text.contains("193") || text.contains("516") || text.to_lowercase().contains("password"), "{text}");
    assert_eq!(reports.len(), 0);
}

#[test]
fn a_table_that_lost_a_column_ends_the_sink_and_nothing_is_reported() {
    let ch = shared_clickhouse();
    let sink = Sink::start(&ch.url(), "sink_fatal", |_| {});
    let client = clickhouse::Client::default().with_url(ch.url()).with_database("sink_fatal").with_validation(false);
    runtime().block_on(client.query("ALTER TABLE results DROP COLUMN worker_id").execute()).expect("drop column");
    sink.send(0, 10);
    let (reports, result) = sink.finish();
    let error = result.expect_err("a table without the row's columns is fatal");
    assert!(error.to_string().contains("ClickHouse cannot store any result"), "{error}");
    assert_eq!(reports.len(), 0, "nothing reported stored or rejected: {:?}", reports.0.lock().unwrap());
}

/// `triage eval --shadow` against rows as the worker, `triage escalate` and a person leave them:
/// replays counted once, a person's answer outranking an LLM's, messages outside the window or
/// without a shadow answer left out, each topic and shadow version apart. The expected counts
/// are computed here from the same labelling rules the rows were written with.
#[test]
fn shadow_answers_are_scored_against_later_answers_once_per_message() {
    use triage::train::shadow::{summarize, Score};
    let clickhouse = shared_clickhouse();
    let config = ClickHouseConfig { url: clickhouse.url(), database: "shadow_eval".into(), ..Default::default() };
    let service = ClickHouseService::new(&config);
    runtime().block_on(service.apply_schema()).expect("apply schema");
    let shadow_service = ClickHouseService::new(&config.shadow());
    let labels = ["card_lost", "refund", "transfer"];
    let route_label = |i: u64| labels[(i % 3) as usize];
    let llm_label = |i: u64| labels[((i / 2) % 3) as usize];
    let person_label = |i: u64| labels[((i + 1) % 3) as usize];
    let shadow_label = |i: u64| labels[((i * 7 / 5) % 3) as usize];
    let now = (triage::time::now_ms() / 1000) as u32;
    let row = |topic: &str, offset: u64, days_ago: u32, category: &str, answered_by: &str, version: &str| {
        let mut r = ResultRow {
            topic: topic.into(),
            offset,
            event_time: now - days_ago * 86_400,
            model_name: "support".into(),
            model_version: version.into(),
            category: category.into(),
            answered_by: answered_by.into(),
            ..Default::default()
        };
        if !answered_by.starts_with("model:") {
            r.slm_category = route_label(offset).into();
        }
        r.stamp(triage::time::now_ms());
        r
    };
    let mut primary = Vec::new();
    let mut shadow = Vec::new();
    for i in 0..60 {
        primary.push(row("tickets", i, 1, route_label(i), "model:support", "v7"));
    }
    for i in 0..40 {
        primary.push(row("tickets", i, 1, llm_label(i), "llm:qwen", "v7"));
    }
    for i in 30..40 {
        primary.push(row("tickets", i, 1, person_label(i), "person:ana", "v7"));
    }
    for i in 0..50 {
        shadow.push(row("tickets", i, 1, shadow_label(i), "model:support", "v8"));
    }
    // Outside a 30-day window, though answered and shadowed.
    primary.push(row("tickets", 100, 40, route_label(100), "model:support", "v7"));
    primary.push(row("tickets", 100, 40, llm_label(100), "llm:qwen", "v7"));
    shadow.push(row("tickets", 100, 40, shadow_label(100), "model:support", "v8"));
    // Another topic, another shadow version.
    primary.push(row("returns", 0, 2, route_label(0), "model:support", "v7"));
    primary.push(row("returns", 0, 2, llm_label(0), "llm:qwen", "v7"));
    shadow.push(row("returns", 0, 2, llm_label(0), "model:support", "v9"));
    // Replays after the answers: the worker's rows again, the shadow's again (a later stamp).
    std::thread::sleep(Duration::from_millis(2));
    for i in 0..10 {
        primary.push(row("tickets", i, 1, route_label(i), "model:support", "v7"));
        shadow.push(row("tickets", i, 1, shadow_label(i), "model:support", "v8"));
    }
    for (service, rows) in [(&service, &primary), (&shadow_service, &shadow)] {
        let rejected = runtime().block_on(service.insert(rows)).expect("insert");
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    let mut expected = Score::default();
    let (mut by_person, mut person_right) = (0, 0);
    for i in 0..40 {
        let reference = if i >= 30 { person_label(i) } else { llm_label(i) };
        let (p, s) = (route_label(i) == reference, shadow_label(i) == reference);
        expected.messages += 1;
        expected.primary_right += p as u64;
        expected.shadow_right += s as u64;
        expected.only_shadow_right += (s && !p) as u64;
        expected.only_primary_right += (p && !s) as u64;
        if i >= 30 {
            by_person += 1;
            person_right += s as u64;
        }
    }
    let since = now - 30 * 86_400;
    let reports = summarize(&runtime().block_on(service.shadow_counts(since, "")).expect("shadow counts"));
    assert_eq!(reports.len(), 2, "{reports:?}");
    let tickets = reports.iter().find(|r| r.topic == "tickets").expect("tickets");
    assert_eq!((tickets.shadow_version.as_str(), tickets.primary_version.as_str()), ("v8", "v7"));
    assert_eq!(tickets.overall, expected);
    assert_eq!((tickets.by_judge["person"].messages, tickets.by_judge["person"].shadow_right), (by_person, person_right));
    assert_eq!(tickets.by_label.iter().map(|(_, s)| s.messages).sum::<u64>(), 40);
    let returns = reports.iter().find(|r| r.topic == "returns").expect("returns");
    assert_eq!((returns.shadow_version.as_str(), returns.overall.messages, returns.overall.shadow_right), ("v9", 1, 1));
    let only_returns = summarize(&runtime().block_on(service.shadow_counts(since, "returns")).expect("shadow counts"));
    assert_eq!(only_returns.len(), 1);
    let wider = summarize(&runtime().block_on(service.shadow_counts(now - 60 * 86_400, "tickets")).expect("shadow counts"));
    assert_eq!(wider[0].overall.messages, 41, "the 40-day-old message is in a 60-day window");

    // The command prints the same numbers.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.toml");
    let model = common::default_model_dir();
    std::fs::write(
        &path,
        format!(
            "[clickhouse]\nurl = \"{}\"\ndatabase = \"shadow_eval\"\n[[routes]]\ntopic = \"tickets\"\nkind = \"ticket\"\nmodel = \"{}\"\n",
            config.url,
            model.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["eval", "--shadow", "--topic", "tickets", "--config"])
        .arg(&path)
        .output()
        .expect("run triage eval");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let line =
        format!("accuracy: shadow {:.3}, route model {:.3}", expected.shadow_right as f64 / 40.0, expected.primary_right as f64 / 40.0);
    assert!(text.contains(&line), "{line} not in:\n{text}");
    assert!(text.contains("on 40 messages"), "{text}");
}
