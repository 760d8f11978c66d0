//! The worker end to end: mock Kafka (real protocol) -> `triage run` (child process) -> a real
//! ClickHouse server. Each test asserts on the rows in ClickHouse, read the documented way
//! (FINAL), and on physical rows (with merges stopped) where replays must be bounded.
//! Models: the tiny multi-head test model keeps these fast; `demo_runs_the_default_model_end_to_end`
//! runs the default model.

mod common;

use std::time::Duration;

use common::worker::{messages, shared_clickhouse, wait_until, Env, Exit, PrivateClickHouse};

const MIN: Duration = Duration::from_secs(60);

fn tiny() -> std::path::PathBuf {
    common::test_model_dir("multihead-tiny")
}

fn env(name: &str) -> Env {
    let ch = shared_clickhouse();
    let env = Env::new(name, ch.url());
    env.apply_schema();
    // Keep replayed rows visible as physical rows: merges would hide them.
    let client = clickhouse::Client::default().with_url(&env.clickhouse_url).with_validation(false);
    common::worker::runtime().block_on(client.query("SYSTEM STOP MERGES").execute()).expect("stop merges");
    env
}

#[test]
fn ten_thousand_messages_over_four_partitions_land_exactly_once() {
    let env = env("exactly_once");
    env.kafka.create_topic("tickets", 4).unwrap();
    env.produce("tickets", &messages("m", 10_000));
    let config = env.write_config("w1", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker(&config, "w1");
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "{}", worker.log_text());
    assert_eq!(env.distinct_rows(), 10_000);
    assert_eq!(env.distinct_keys(), 10_000);
    assert_eq!(env.query_u64("SELECT uniqExact(partition) FROM results"), 4);
    assert_eq!(env.raw_rows(), 10_000, "one worker, no crash: no replays at all");
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_replays_only_what_was_uncommitted() {
    let env = env("sigkill");
    env.kafka.create_topic("tickets", 4).unwrap();
    env.produce("tickets", &messages("k", 10_000));
    let max_in_flight = 1_000;
    let config = env.write_config("k", &tiny(), &["tickets"], |c| c.kafka.max_in_flight = max_in_flight);
    let mut uncommitted = Vec::new();
    for (round, kill_after) in [2_000u64, 5_000, 8_000].into_iter().enumerate() {
        let mut worker = env.spawn_worker(&config, &format!("k{round}"));
        env.wait_for(&mut worker, "progress before the kill", 3 * MIN, || env.distinct_keys() >= kill_after || env.caught_up(&["tickets"]));
        worker.kill9();
        // An INSERT the worker had sent whole may still land after its death: wait until the
        // rows stop changing, then count what the next owner replays (rows stored past the
        // group's committed offsets).
        env.wait_until_rows_settle();
        uncommitted.push(env.stored_past_commits("tickets", 4));
    }
    let mut last = env.spawn_worker(&config, "k-final");
    env.wait_caught_up(&mut last, &["tickets"], 3 * MIN);
    assert_eq!(last.terminate(MIN), Some(Exit::OK), "{}", last.log_text());
    assert_eq!(env.distinct_keys(), 10_000, "nothing missing");
    assert_eq!(env.distinct_rows(), 10_000, "nothing double-counted when read with FINAL");
    let replayed = env.raw_rows() - 10_000;
    eprintln!("replayed rows after 3 SIGKILLs: {replayed}; stored but uncommitted at each kill: {uncommitted:?}");
    // Intake pauses the moment max_in_flight messages are consumed and not yet committed, so a
    // kill leaves at most that many to replay. A worker that committed late, or not at all
    // while busy, leaves more.
    for (kill, n) in uncommitted.iter().enumerate() {
        assert!(*n <= max_in_flight as u64, "kill {kill} left {n} stored rows uncommitted (max_in_flight {max_in_flight})");
    }
    // Each replay re-stores one of those rows (a row stored twice before its commit would be a
    // replay nobody left uncommitted).
    assert!(replayed <= uncommitted.iter().sum::<u64>(), "{replayed} replays but only {uncommitted:?} were uncommitted at the kills");
}

#[test]
fn sigterm_drains_and_commits_so_a_restart_replays_nothing() {
    let env = env("sigterm");
    env.kafka.create_topic("tickets", 2).unwrap();
    env.produce("tickets", &messages("s", 6_000));
    // A drain ends when the work in flight is done, not at its deadline (five minutes here:
    // a drain waiting it out fails `terminate`'s one-minute bound).
    let config = env.write_config("s", &tiny(), &["tickets"], |c| c.shutdown.drain_timeout_ms = 300_000);
    let mut first = env.spawn_worker(&config, "s1");
    wait_until(3 * MIN, "progress", || env.distinct_keys() >= 1_500);
    assert_eq!(first.terminate(MIN), Some(Exit::OK), "SIGTERM exits 0: {}", first.log_text());
    assert!(first.log_text().contains("shutdown requested: draining"));
    let after_first = env.raw_rows();
    let mut second = env.spawn_worker(&config, "s2");
    env.wait_caught_up(&mut second, &["tickets"], 3 * MIN);
    assert_eq!(second.terminate(MIN), Some(Exit::OK));
    assert_eq!(env.distinct_keys(), 6_000);
    assert_eq!(env.raw_rows(), 6_000, "the first worker committed all it stored ({after_first} rows): nothing replayed");
}

/// The last commit at exit is retried while it is refused (a coordinator away for a moment),
/// so a restart replays nothing; refused for good, it does not hold the exit (what it could
/// not commit is replayed by the next owner, never lost).
#[test]
fn a_refused_final_commit_is_retried_and_one_refused_for_good_does_not_hold_the_exit() {
    use rdkafka::types::{RDKafkaApiKey::OffsetCommit, RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT as TimedOut};
    let env = env("final_commit");
    env.kafka.create_topic("tickets", 1).unwrap();
    // The last commit is retried until 5 s past the drain's deadline: a short drain puts that
    // within the test's reach (the drain itself ends at once: nothing is in flight).
    let config = env.write_config("f", &tiny(), &["tickets"], |c| c.shutdown.drain_timeout_ms = 1_000);
    let mut worker = env.spawn_worker(&config, "f1");
    wait_until(MIN, "partitions assigned", || worker.has_partitions());
    // An idle worker commits nothing: the errors wait for the first commit of new work.
    env.kafka.broker_request_errors(1, OffsetCommit, &[TimedOut; 40]).unwrap();
    env.produce("tickets", &messages("c", 300));
    wait_until(MIN, "every row stored", || env.distinct_rows() == 300);
    // Commits every 200 ms take the errors one by one: stop while some are left.
    wait_until(MIN, "a dozen refusals left", || env.kafka.broker_errors_left(1, OffsetCommit).unwrap() <= 12);
    assert!(env.kafka.broker_errors_left(1, OffsetCommit).unwrap() > 0, "commits still refused at the SIGTERM");
    assert_eq!(env.committed("tickets", 0), None, "nothing committed yet: every commit was refused");
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "{}", worker.log_text());
    assert_eq!(env.committed("tickets", 0), Some(300), "the last commit went through after its refusals");

    let mut worker = env.spawn_worker(&config, "f2");
    wait_until(MIN, "partitions assigned", || worker.has_partitions());
    env.kafka.broker_request_errors(1, OffsetCommit, &[TimedOut; 1000]).unwrap();
    env.produce("tickets", &messages("d", 100));
    wait_until(MIN, "every row stored", || env.distinct_rows() == 400);
    // The drain ends at once (nothing in flight); the refused commit is given up after 5 s.
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "{}", worker.log_text());
    assert_eq!(env.committed("tickets", 0), Some(300), "the refused offsets stay uncommitted: replayed, not lost");
    // The revoke at exit tries once more, is refused too, and counts what the next owner reads
    // again: the 100 done since the last commit.
    let log = worker.log_text();
    let revoke = log.lines().find(|l| l.contains("partitions revoked")).unwrap_or_else(|| panic!("no revoke at exit: {log}"));
    assert!(revoke.contains("replayed=100"), "{revoke}");
}

#[test]
fn malformed_messages_go_to_the_dead_letter_topic_with_their_reason() {
    let env = env("malformed");
    env.kafka.create_topic("tickets", 2).unwrap();
    let mut batch = messages("good", 500);
    let bad: Vec<(String, Vec<u8>, &str)> = vec![
        ("bad-json".into(), b"this is not json".to_vec(), "not_json"),
        ("bad-utf8".into(), b"{\"body\": \"caf\xe9\"}".to_vec(), "not_utf8"),
        ("bad-empty".into(), br#"{"id": "e", "subject": "", "body": "  "}"#.to_vec(), "no_text"),
        ("bad-array".into(), b"[1, 2, 3]".to_vec(), "not_object"),
        ("bad-large".into(), format!("{{\"body\": \"{}\"}}", "x".repeat(10_000)).into_bytes(), "too_large"),
    ];
    for (i, (k, p, _)) in bad.iter().enumerate() {
        batch.insert(i * 97 + 13, (k.clone(), p.clone()));
    }
    env.produce("tickets", &batch);
    let config = env.write_config("m", &tiny(), &["tickets"], |c| c.max_message_bytes = 4096);
    let mut worker = env.spawn_worker(&config, "m");
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
    assert_eq!(env.distinct_rows(), 500, "every good message is in ClickHouse");
    let letters = env.read_topic_to_end("triage.dead-letter");
    assert_eq!(letters.len(), bad.len(), "each bad message dead-lettered exactly once");
    for (key, payload, reason) in &bad {
        let (_, got_payload, headers) =
            letters.iter().find(|(k, _, _)| k.as_deref() == Some(key.as_bytes())).unwrap_or_else(|| panic!("{key} not dead-lettered"));
        assert_eq!(got_payload, payload, "original bytes kept for {key}");
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(header("triage.reason"), Some(*reason), "{key}");
        assert_eq!(header("triage.source.topic"), Some("tickets"));
        assert!(header("triage.source.offset").is_some_and(|o| o.parse::<i64>().is_ok()));
        assert!(header("triage.source.partition").is_some());
    }
}

#[test]
fn two_workers_one_joining_and_one_leaving_lose_nothing() {
    let env = env("rebalance");
    env.kafka.create_topic("tickets", 4).unwrap();
    // Produced in three parts, so each event happens mid-stream however fast the machine: a
    // alone, then a and b, then b alone (the last part is on every partition, a's too).
    let all = messages("r", 12_000);
    let mut produced = 2_000;
    env.produce("tickets", &all[..produced]);
    let max_in_flight = 1_000;
    let config_a = env.write_config("a", &tiny(), &["tickets"], |c| c.kafka.max_in_flight = max_in_flight);
    let config_b = env.write_config("b", &tiny(), &["tickets"], |c| c.kafka.max_in_flight = max_in_flight);
    let mut a = env.spawn_worker(&config_a, "a");
    wait_until(3 * MIN, "a made progress", || env.distinct_keys() >= 1_000);
    let mut b = env.spawn_worker(&config_b, "b");
    // Until b's join has rebalanced the group, a is kept busy (a backlog fed as it shrinks, up
    // to 9,000 messages), so a's revoke lands mid-stream, with work done and not yet committed
    // and work in flight, however long b takes to start and join.
    wait_until(3 * MIN, "b joined and was assigned partitions", || {
        if b.has_partitions() {
            return true;
        }
        if produced < 9_000 && produced as u64 - env.distinct_keys() < 1_000 {
            env.produce("tickets", &all[produced..produced + 500]);
            produced += 500;
        }
        false
    });
    assert!(produced as u64 > env.distinct_keys(), "a was still busy when b joined (raise the 9,000 if not)");
    env.produce("tickets", &all[produced..10_000]);
    wait_until(3 * MIN, "progress with two workers", || env.distinct_keys() >= 8_000);
    assert_eq!(a.terminate(MIN), Some(Exit::OK), "a leaves cleanly: {}", a.log_text());
    env.produce("tickets", &all[10_000..]);
    env.wait_caught_up(&mut b, &["tickets"], 3 * MIN);
    assert_eq!(b.terminate(MIN), Some(Exit::OK));
    assert_eq!(env.distinct_keys(), 12_000);
    assert_eq!(env.distinct_rows(), 12_000);
    let replayed = env.raw_rows() - 12_000;
    // A revoke commits what is done and abandons what is in flight (the rebalance never waits
    // for the pipeline); the worker logs how many messages the next owner reads again (the
    // abandoned ones, those done behind them, and, when the broker refuses that commit, those
    // done since the last commit). Every replay must be one of those: a stale or missing commit
    // would replay messages no revoke counted.
    let revokes: Vec<String> = [a.log_text(), b.log_text()]
        .iter()
        .flat_map(|log| log.lines().filter(|l| l.contains("partitions revoked")).map(String::from).collect::<Vec<_>>())
        .collect();
    let field = |name: &str| -> u64 {
        revokes
            .iter()
            .map(|l| common::worker::log_field(l, name).unwrap_or_else(|| panic!("a revoke line without {name}=: {revokes:?}")))
            .sum()
    };
    let (counted, abandoned) = (field("replayed"), field("abandoned"));
    eprintln!("replayed rows across a join and a leave: {replayed} (counted at revokes: {counted}, abandoned: {abandoned})");
    if replayed > counted {
        eprintln!("--- worker a ---\n{}\n--- worker b ---\n{}", a.log_text(), b.log_text());
    }
    assert!(replayed <= counted, "{replayed} replays but revokes counted {counted}: a commit was stale or missing");
    // Nor is the bound slack: a revoke counts at most what the in-flight limit let in.
    assert!(counted <= (revokes.len() * max_in_flight) as u64, "{counted} counted over {} revokes", revokes.len());
    assert!(b.log_text().matches("partitions assigned").count() >= 2, "b took a's partitions when a left:\n{}", b.log_text());
}

#[test]
fn the_survivor_takes_over_a_sigkilled_workers_partitions() {
    // No goodbye from a SIGKILLed member: the group notices after session.timeout.ms (6 s here)
    // and gives its partitions to the survivor, which replays what the dead one left uncommitted.
    // (On tansu, which evicts a dead member only while handling another member's request, the
    // survivor's heartbeats are that request.)
    let env = env("survivor");
    env.kafka.create_topic("tickets", 4).unwrap();
    let all = messages("v", 6_000);
    env.produce("tickets", &all[..2_000]);
    let config_a = env.write_config("a", &tiny(), &["tickets"], |_| {});
    let config_b = env.write_config("b", &tiny(), &["tickets"], |_| {});
    let mut a = env.spawn_worker(&config_a, "a");
    let mut b = env.spawn_worker(&config_b, "b");
    let (log_a, log_b) = (a.whole_log(), b.whole_log());
    let has_partitions =
        |log: &common::worker::LogMark| log.text().lines().any(|l| l.contains("partitions assigned") && !l.contains("partitions=0"));
    env.wait_for(&mut a, "a has partitions", 2 * MIN, || has_partitions(&log_a));
    env.wait_for(&mut b, "b has partitions", 2 * MIN, || has_partitions(&log_b));
    a.kill9();
    let after_kill = b.mark();
    env.produce("tickets", &all[2_000..]);
    // Incremental (cooperative) assignment: b is given a's partitions on top of its own.
    env.wait_for(&mut b, "b takes over a's partitions", 2 * MIN, || has_partitions(&after_kill));
    env.wait_caught_up(&mut b, &["tickets"], 3 * MIN);
    assert_eq!(b.terminate(MIN), Some(Exit::OK), "{}", b.log_text());
    assert_eq!(env.distinct_keys(), 6_000);
}

#[test]
fn broker_errors_are_retried_and_nothing_is_lost() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let env = env("broker_errors");
    env.kafka.create_topic("tickets", 2).unwrap();
    let mut batch = messages("b", 2_000);
    for i in 0..20 {
        batch.insert(i * 50, (format!("junk-{i}"), format!("junk {i}").into_bytes()));
    }
    env.produce("tickets", &batch);
    let cluster = env.kafka.cluster();
    // Fetches, commits and dead-letter writes all fail a few times before they pass.
    cluster.request_errors(RDKafkaApiKey::Fetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4]);
    cluster.request_errors(RDKafkaApiKey::OffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 4]);
    cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 4]);
    let config = env.write_config("e", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker(&config, "e");
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
    assert_eq!(env.distinct_rows(), 2_000);
    // Retried writes are idempotent: each junk message once, by its source key.
    let letters = env.read_topic_to_end("triage.dead-letter");
    let sources: std::collections::HashSet<String> = letters
        .iter()
        .map(|(_, _, h)| h.iter().filter(|(k, _)| k.starts_with("triage.source.")).map(|(_, v)| v.as_str()).collect::<Vec<_>>().join("/"))
        .collect();
    assert_eq!((sources.len(), letters.len()), (20, 20), "20 junk messages, no duplicate dead letters");
}

#[test]
fn escalations_carry_message_and_result_and_are_marked_in_clickhouse() {
    let env = env("escalation");
    env.kafka.create_topic("tickets", 1).unwrap();
    env.produce("tickets", &messages("x", 300));
    // A threshold above any softmax top score of 5 labels escalates everything below 0.99.
    let config = env.write_config("x", &tiny(), &["tickets"], |c| c.escalation.default_threshold = 0.99);
    let mut worker = env.spawn_worker(&config, "x");
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
    let escalated = env.query_u64("SELECT sum(escalated) FROM results FINAL");
    assert!(escalated > 0);
    let records = env.read_topic_to_end("triage.escalations");
    assert_eq!(records.len() as u64, escalated, "one escalation record per escalated row, no more");
    let (key, payload, _) = &records[0];
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(key.as_deref(), v["message_id"].as_str().map(str::as_bytes), "keyed by message id");
    assert!(v["message"]["body"].is_string() && v["result"]["category"].is_string());
    assert!(v["reason"]["confidence"].as_f64().unwrap() < 0.99);
}

#[test]
fn a_row_clickhouse_rejects_is_dead_lettered_and_the_rest_land() {
    let env = env("rejects");
    env.kafka.create_topic("tickets", 1).unwrap();
    // A column whose default throws for one message: ClickHouse rejects any block holding it.
    let client = clickhouse::Client::default().with_url(&env.clickhouse_url).with_database(&env.database).with_validation(false);
    common::worker::runtime()
        .block_on(client.query("ALTER TABLE results ADD COLUMN guard UInt8 DEFAULT throwIf(message_id = 'p-137')").execute())
        .unwrap();
    env.produce("tickets", &messages("p", 400));
    let mut worker = env.spawn_worker(&env.write_config("p", &tiny(), &["tickets"], |_| {}), "p");
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "{}", worker.log_text());
    assert_eq!(env.distinct_rows(), 399, "all but the rejected row");
    let letters = env.read_topic_to_end("triage.dead-letter");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0.as_deref(), Some(&b"p-137"[..]));
    assert!(letters[0].2.iter().any(|(k, v)| k == "triage.reason" && v == "clickhouse_rejected"));
}

#[test]
fn a_missing_table_stops_the_worker_with_a_clear_message() {
    let ch = shared_clickhouse();
    let env = Env::new("missing_table", ch.url());
    env.kafka.create_topic("tickets", 1).unwrap();
    let config = env.write_config("n", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker(&config, "n");
    wait_until(MIN, "the worker exits", || worker.exited().is_some());
    assert_eq!(worker.exited(), Some(Exit::Code(1)));
    let log = worker.log_text();
    assert!(log.contains("t_missing_table doesn't exist") && log.contains("triage schema apply"), "{log}");
}

#[test]
fn clickhouse_outage_pauses_consumption_commits_nothing_and_recovers_without_loss() {
    // Its own server: this test stops and restarts it.
    let mut clickhouse = PrivateClickHouse::start();
    let env = Env::new("outage", clickhouse.url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 2).unwrap();
    let all = messages("o", 10_000);
    env.produce("tickets", &all[..2_000]);
    let max_in_flight = 1_000;
    let port = triage::local::free_port().unwrap();
    let config = env.write_config("o", &tiny(), &["tickets"], |c| {
        c.kafka.max_in_flight = max_in_flight;
        c.clickhouse.insert_timeout_ms = 3000;
        c.metrics.address = format!("127.0.0.1:{port}");
    });
    let mut worker = env.spawn_worker(&config, "o");
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    let committed = env.committed_all("tickets", 2);
    assert_eq!(committed.iter().flatten().sum::<i64>(), 2_000, "{committed:?}");
    env.wait_stored(2_000);
    // Rows the sink has reported stored (each ends a message's end-to-end wait).
    let reported_stored = || common::worker::metric(port, "triage_end_to_end_seconds_count").unwrap_or(-1.0);
    let stored_before = reported_stored();
    assert_eq!(stored_before, 2_000.0, "every row stored before the outage is reported once");
    clickhouse.stop();
    let during = worker.mark();
    // 8,000 more arrive while ClickHouse is down.
    env.produce("tickets", &all[2_000..]);
    // The pause is the worker's own signal that max_in_flight messages wait unstored; one more
    // failed insert after it shows the worker went on trying (and committing) while paused.
    env.wait_for(&mut worker, "consumption paused", 2 * MIN, || during.text().contains("pausing consumption"));
    let paused = worker.mark();
    env.wait_for(&mut worker, "an insert retried while paused", MIN, || paused.text().contains("ClickHouse insert failed; retrying"));
    let text = during.text();
    assert!(!text.contains("resuming consumption"), "no resume while ClickHouse is down: {text}");
    assert_eq!(env.committed_all("tickets", 2), committed, "nothing was stored while down, so no commit may move");
    // A block is out to ClickHouse (its insert is being retried), and none of its rows may be
    // reported stored: the commit check above alone can miss a sink that acknowledges at
    // hand-off, when the block it handed off lacks the oldest message of each partition.
    assert_eq!(reported_stored(), stored_before, "no row reported stored while ClickHouse is down");
    let rss = worker.peak_rss_kb().unwrap_or(0);
    assert!(rss < 600_000, "peak RSS {rss} kB: memory stayed bounded while 8,000 messages waited");
    // Not ready, saying why (the ping that feeds readiness fails): a load balancer or an
    // operator sees ClickHouse named.
    env.wait_for(&mut worker, "/readyz 503 naming ClickHouse", MIN, || {
        let (status, text) = common::worker::http_get(port, "/readyz");
        status == 503 && text.contains("clickhouse: waiting")
    });
    clickhouse.restart();
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert!(during.text().contains("resuming consumption"));
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "{}", worker.log_text());
    assert_eq!(env.distinct_keys(), 10_000);
    assert_eq!(env.distinct_rows(), 10_000);
}

#[test]
fn sigkill_while_clickhouse_is_down_loses_nothing() {
    // While ClickHouse is down nothing is stored, so nothing may be committed: a worker killed
    // then must leave every one of those messages to its successor.
    let mut clickhouse = PrivateClickHouse::start();
    let env = Env::new("down_kill", clickhouse.url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 2).unwrap();
    let all = messages("d", 3_000);
    env.produce("tickets", &all[..1_000]);
    let max_in_flight = 500;
    let config = env.write_config("d", &tiny(), &["tickets"], |c| {
        c.kafka.max_in_flight = max_in_flight;
        // One block holds everything in flight (every count here is a multiple of it).
        common::worker::one_block_of(&mut c.clickhouse, max_in_flight);
    });
    let mut worker = env.spawn_worker(&config, "d1");
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    env.wait_stored(1_000);
    clickhouse.stop();
    let down = worker.mark();
    env.produce("tickets", &all[1_000..]);
    // Failed INSERTs, the pause (max_in_flight consumed, none stored), and a retry after it.
    env.wait_for(&mut worker, "failed INSERTs and the pause", 2 * MIN, || down.text().contains("pausing consumption"));
    let paused = worker.mark();
    env.wait_for(&mut worker, "an insert retried while paused", MIN, || paused.text().contains("ClickHouse insert failed; retrying"));
    worker.kill9();
    clickhouse.restart();
    let mut next = env.spawn_worker(&config, "d2");
    env.wait_caught_up(&mut next, &["tickets"], 3 * MIN);
    assert_eq!(next.terminate(MIN), Some(Exit::OK), "{}", next.log_text());
    assert_eq!(env.distinct_keys(), 3_000, "every message stored, none skipped by a commit made while ClickHouse was down");
}

#[test]
fn demo_runs_the_default_model_end_to_end_and_explains_what_landed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triage")).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("39 of 40 messages classified: 18 tickets, 11 returns, 10 e-mails."), "{stdout}");
    assert!(stdout.contains("1 message was dead-lettered") && stdout.contains("1 not_json"), "{stdout}");
    assert!(stdout.contains("Escalated ") && stdout.contains("out-of-distribution score above"), "escalations and why: {stdout}");
    // Messages beside their answers: a sure one, and the out-of-domain ones escalated with why.
    let after = |id: &str| stdout.split(id).nth(1).and_then(|rest| rest.lines().nth(1)).unwrap_or_default().to_string();
    assert!(stdout.contains("\"PIN locked: I typed my PIN wrong") && after("T-1003").contains("-> pin_blocked"), "{stdout}");
    for out_of_domain in ["E-3008", "R-2010"] {
        assert!(after(out_of_domain).contains("-> escalated: out of distribution"), "{out_of_domain}: {stdout}");
    }
    assert!(stdout.contains("the slowest stage is") && stdout.contains("scripts/demo --messages 10000"), "{stdout}");
    assert!(stdout.contains("scripts/demo --format avro"), "the Avro demo is suggested: {stdout}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains(" INFO "), "the demo keeps the worker's log to warnings");
}

#[test]
fn demo_makes_n_messages_from_the_samples() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triage")).args(["demo", "--messages", "400"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // 180 tickets, 120 returns (10 copies of the malformed line), 100 e-mails.
    assert!(stdout.contains("390 of 400 messages classified: 180 tickets, 110 returns, 100 e-mails."), "{stdout}");
    assert!(stdout.contains("10 messages were dead-lettered"), "{stdout}");
    assert!(stdout.contains("Throughput: 400 messages in"), "{stdout}");
}

#[test]
fn metrics_health_and_readiness_are_served_on_one_port() {
    let env = env("metrics");
    env.kafka.create_topic("tickets", 2).unwrap();
    let mut batch = messages("q", 1_000);
    batch.push(("junk".into(), b"not json".to_vec()));
    env.produce("tickets", &batch);
    let port = triage::local::free_port().unwrap();
    let path = env.write_config("q", &tiny(), &["tickets"], |c| c.metrics.address = format!("127.0.0.1:{port}"));
    let mut worker = env.spawn_worker(&path, "q");
    env.wait_for(&mut worker, "/healthz", MIN, || common::worker::http_get(port, "/healthz").0 == 200);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    // librdkafka statistics (group state, lag) arrive every 5 s.
    env.wait_for(&mut worker, "/readyz 200", MIN, || common::worker::http_get(port, "/readyz").0 == 200);
    // Lag comes from librdkafka's statistics (every 5 s), valid once a commit is known to them.
    // Caught up: both partitions' lag is 0 (librdkafka's -1, "not known", is never exported).
    let lags = |text: &str| -> Vec<f64> {
        text.lines().filter(|l| l.starts_with("triage_consumer_lag{")).filter_map(|l| l.rsplit(' ').next()?.parse().ok()).collect()
    };
    env.wait_for(&mut worker, "lag 0 on both partitions", MIN, || lags(&common::worker::http_get(port, "/metrics").1) == [0.0, 0.0]);
    let (status, metrics) = common::worker::http_get(port, "/metrics");
    assert_eq!(status, 200);
    assert!(lags(&metrics).iter().all(|&lag| lag >= 0.0), "{metrics}");
    for needle in [
        "triage_messages_consumed_total{topic=\"tickets\"} 1001",
        "triage_messages_classified_total{kind=\"ticket\",model=\"multihead-tiny\",model_version=\"0.0.1\"} 1000",
        "triage_messages_dead_lettered_total{reason=\"not_json\"} 1",
        "triage_batch_size_bucket{model=\"multihead-tiny\",model_version=\"0.0.1\",le=\"64\"}",
        "triage_batch_padding_ratio_bucket",
        "triage_end_to_end_seconds_bucket{kind=\"ticket\",le=",
        "triage_clickhouse_rows_total{result=\"inserted\"} 1000",
        "triage_model_info{model=\"multihead-tiny\",model_version=\"0.0.1\",provider=\"cpu\"} 1",
        "triage_committed_offset{topic=\"tickets\",partition=",
        "triage_consumer_lag{topic=\"tickets\",partition=",
        "triage_in_flight_messages",
        "# HELP triage_end_to_end_seconds",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }
    assert_eq!(common::worker::http_get(port, "/nope").0, 404);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
}

/// Peak RSS of `triage run` alone (not the bench process with its own stages) by inference
/// sessions and text length, with the default model: the figures deploy/k8s/base/deployment.yaml
/// sizes memory from. Run: cargo test --release --test worker worker_memory -- --ignored --nocapture
#[test]
#[ignore = "a measurement (a few minutes), not a check"]
fn worker_memory_by_sessions_and_text_length() {
    let model = common::default_model_dir();
    let mut table = vec!["| sessions | texts | messages | peak RSS (MB) |".to_string(), "| --- | --- | --- | --- |".to_string()];
    for sessions in [1, 2] {
        for (label, words) in [("short (~12 words)", 12usize), ("e-mail length (~250 words)", 250)] {
            // Merges on (env() stops them to count replays): parts must not pile up here.
            let env = Env::new(&format!("rss_{sessions}_{words}"), shared_clickhouse().url());
            env.apply_schema();
            env.kafka.create_topic("tickets", 2).unwrap();
            let batch: Vec<(String, Vec<u8>)> = messages("m", 2_000)
                .into_iter()
                .enumerate()
                .map(|(i, (k, _))| {
                    let body: Vec<String> = (0..words).map(|j| format!("word{}", (i * 7 + j * 13) % 997)).collect();
                    (k, serde_json::json!({"subject": "ticket", "body": body.join(" ")}).to_string().into_bytes())
                })
                .collect();
            env.produce("tickets", &batch);
            let config = env.write_config("r", &model, &["tickets"], |_| {});
            let mut worker = env.spawn_worker_env(
                &config,
                "r",
                &[("TRIAGE_BATCHING__INFERENCE_THREADS", &sessions.to_string()), ("TRIAGE_INFERENCE__INTRA_THREADS", "1")],
            );
            let started = std::time::Instant::now();
            while !env.caught_up(&["tickets"]) {
                assert!(worker.exited().is_none() && started.elapsed() < 20 * MIN, "{}", worker.log_text());
                std::thread::sleep(Duration::from_millis(500));
            }
            // VmHWM: the process's high-water mark, however brief the peak.
            let peak = worker.peak_rss_kb().unwrap_or(0);
            assert_eq!(worker.terminate(MIN), Some(Exit::OK));
            table.push(format!("| {sessions} | {label} | 2000 | {} |", peak / 1024));
        }
    }
    eprintln!("{}", table.join("\n"));
}
