//! Faults a production cluster produces, injected for real where the mock cluster can (oversized
//! records, authorization failures, a missing topic), each asserting that no partition stalls
//! and nothing is lost or double-counted. Decisions the mock cannot exercise are unit-tested
//! beside the code (error classification in sink/kafka.rs, topic checks in source/kafka).

mod common;

use std::time::Duration;

use common::worker::{messages, shared_clickhouse, wait_until, Env, Exit, PrivateClickHouse};
use sha2::{Digest, Sha256};

const MIN: Duration = Duration::from_secs(60);

fn tiny() -> std::path::PathBuf {
    common::test_model_dir("multihead-tiny")
}

fn env(name: &str) -> Env {
    let env = Env::new(name, shared_clickhouse().url());
    env.apply_schema();
    env
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn a_two_mebibyte_message_is_dead_lettered_cut_and_its_partition_flows_on() {
    let env = env("oversized");
    env.kafka.create_topic("tickets", 1).unwrap();
    let huge = format!("{{\"body\": \"{}\"}}", "refund ".repeat(300_000)).into_bytes(); // 2.1 MB > max_message_bytes
    let large = format!("{{\"body\": \"{}\"}}", "parcel ".repeat(130_000)).into_bytes(); // 910 KB: under the limit
    let mut batch = messages("before", 50);
    batch.push(("huge".into(), huge.clone()));
    batch.push(("large".into(), large));
    batch.extend(messages("after", 50));
    env.produce("tickets", &batch);
    let config = env.write_config("o", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker_env(&config, "o", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "{}", worker.log_text());
    assert_eq!(env.distinct_rows(), 101, "every message but the oversized one has its row");
    let letters = env.read_topic_to_end("triage.dead-letter");
    assert_eq!(letters.len(), 1, "one dead letter, written once");
    let (key, payload, headers) = &letters[0];
    assert_eq!(key.as_deref(), Some(&b"huge"[..]));
    assert_eq!(header(headers, "triage.reason"), Some("too_large"));
    assert_eq!(header(headers, "triage.truncated"), Some("true"));
    assert_eq!(header(headers, "triage.original.size"), Some(huge.len().to_string().as_str()));
    assert_eq!(header(headers, "triage.original.sha256"), Some(hex::encode(Sha256::digest(&huge)).as_str()));
    assert!(payload.len() <= 1 << 20 && huge.starts_with(payload), "a prefix of at most max_message_bytes: {}", payload.len());
}

#[test]
fn a_record_the_topic_refuses_as_too_large_is_cut_until_it_fits() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let env = env("topic_limit");
    env.kafka.create_topic("tickets", 1).unwrap();
    let not_json = vec![b'x'; 300_000];
    let mut batch = messages("good", 20);
    batch.push(("bad".into(), not_json.clone()));
    env.produce("tickets", &batch);
    // The broker refuses the first two writes as too large (a topic with a small max.message.bytes).
    env.kafka.cluster().request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 2]);
    let config = env.write_config("t", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker_env(&config, "t", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "{}", worker.log_text());
    let letters = env.read_topic_to_end("triage.dead-letter");
    assert_eq!(letters.len(), 1, "{} dead letters", letters.len());
    let (_, payload, headers) = &letters[0];
    assert_eq!(header(headers, "triage.reason"), Some("not_json"));
    assert_eq!(header(headers, "triage.truncated"), Some("true"));
    assert_eq!(header(headers, "triage.original.size"), Some("300000"));
    assert!(payload.len() <= 75_000 && !payload.is_empty(), "halved per refusal: {} bytes", payload.len());
    assert_eq!(env.distinct_rows(), 20);
}

#[test]
fn a_missing_escalation_topic_stops_the_worker_at_start_naming_it() {
    let env = env("missing_topic");
    env.kafka.create_topic("tickets", 1).unwrap();
    env.produce("tickets", &messages("m", 20));
    let config = env.write_config("m", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker_env(&config, "m", &[("TRIAGE_KAFKA__ESCALATION_TOPIC", "triage.nowhere")]);
    wait_until(MIN, "the worker exits", || worker.exited().is_some());
    assert_eq!(worker.exited(), Some(Exit::Code(1)));
    let log = worker.log_text();
    assert!(log.contains("Kafka topic `triage.nowhere` does not exist") && log.contains("--create"), "{log}");
    assert_eq!(env.committed("tickets", 0), None, "nothing committed");
    assert_eq!(env.raw_rows(), 0, "nothing classified and stored");
    assert!(env.read_topic_to_end("triage.dead-letter").is_empty(), "nothing dead-lettered");
}

#[test]
fn a_dead_letter_that_can_never_be_written_stops_the_worker_committing_only_below_it() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // The dead-letter topic alone on broker 2, which refuses every write.
    let env = Env::with_brokers("forbidden", shared_clickhouse().url(), 2);
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    let cluster = env.kafka.cluster();
    cluster.partition_leader("tickets", 0, Some(1)).unwrap();
    cluster.partition_leader("triage.escalations", 0, Some(1)).unwrap();
    cluster.partition_leader("triage.dead-letter", 0, Some(2)).unwrap();
    drop(cluster);
    env.kafka
        .broker_request_errors(2, RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 100])
        .expect("inject");
    let config = env.write_config("f", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker_env(&config, "f", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    // Twenty stored and committed first, so a commit past the poison would show.
    env.produce("tickets", &messages("a", 20));
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    let mut batch = vec![("poison".to_string(), b"not json".to_vec())]; // offset 20
    batch.extend(messages("b", 20));
    env.produce("tickets", &batch);
    wait_until(2 * MIN, "the worker exits", || worker.exited().is_some());
    assert_eq!(worker.exited(), Some(Exit::Code(1)));
    let log = worker.log_text();
    assert!(log.contains("cannot write to Kafka topic `triage.dead-letter`") && log.contains("uthorization"), "{log}");
    assert_eq!(env.committed("tickets", 0), Some(20), "committed up to the message whose dead letter was never written, not past it");
    assert!(env.read_topic_to_end("triage.dead-letter").is_empty());
}

#[test]
fn sigkill_while_side_topic_writes_fail_loses_no_dead_letter_and_no_escalation() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // Side topics on broker 2, the source on broker 1: errors aimed at broker 2's produce
    // requests hit only the worker's dead letters and escalations.
    let env = Env::with_brokers("side_kill", shared_clickhouse().url(), 2);
    env.apply_schema();
    env.kafka.create_topic("tickets", 2).unwrap();
    let cluster = env.kafka.cluster();
    for p in 0..2 {
        cluster.partition_leader("tickets", p, Some(1)).unwrap();
    }
    for topic in ["triage.dead-letter", "triage.escalations"] {
        cluster.partition_leader(topic, 0, Some(2)).unwrap();
    }
    drop(cluster);
    let mut batch = messages("k", 300);
    for i in 0..30 {
        batch.insert(i * 10, (format!("junk-{i}"), format!("junk {i}").into_bytes()));
    }
    env.produce("tickets", &batch);
    let failures = 30;
    env.kafka
        .broker_request_errors(2, RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 30])
        .expect("inject");
    // Everything below 0.99 is escalated: most rows need an escalation record too.
    let config = env.write_config("k", &tiny(), &["tickets"], |c| c.escalation.default_threshold = 0.99);
    let mut worker = env.spawn_worker(&config, "k1");
    // Killed while its side-topic writes are being refused and retried, once every row is
    // stored (a message whose row is stored but whose escalation is not must not be committed).
    env.wait_for(&mut worker, "rows stored while side-topic writes fail", 2 * MIN, || {
        env.kafka.broker_errors_left(2, RDKafkaApiKey::Produce).unwrap() < failures && env.raw_rows() >= 300
    });
    // And the commits have caught up with whatever is done (a commit made with the rows alone
    // would now be past messages whose escalation is not written).
    env.wait_until_commits_settle("tickets", 2);
    assert!(env.kafka.broker_errors_left(2, RDKafkaApiKey::Produce).unwrap() > 0, "still failing at the kill");
    worker.kill9();
    let mut next = env.spawn_worker(&config, "k2");
    env.wait_caught_up(&mut next, &["tickets"], 3 * MIN);
    assert_eq!(next.terminate(MIN), Some(Exit::OK), "{}", next.log_text());
    assert_eq!(env.distinct_rows(), 300);
    // Every junk message has its dead letter, every escalated row its record.
    let letters = env.read_topic_to_end("triage.dead-letter");
    let mut junk: Vec<String> =
        letters.iter().map(|(k, ..)| String::from_utf8_lossy(k.as_deref().unwrap_or_default()).into_owned()).collect();
    junk.sort();
    junk.dedup();
    assert_eq!(junk.len(), 30, "a dead letter for each junk message: {junk:?}");
    let escalated = env.query_u64("SELECT sum(escalated) FROM results FINAL");
    assert!(escalated > 100, "{escalated} escalated");
    let records = env.read_topic_to_end("triage.escalations");
    let mut ids: Vec<String> = records
        .iter()
        .map(|(_, payload, _)| serde_json::from_slice::<serde_json::Value>(payload).unwrap()["message_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as u64, escalated, "an escalation record for every escalated row");
}

#[test]
fn an_escalation_that_can_never_be_written_stops_the_worker_committing_only_below_it() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // The escalation topic alone on broker 2, which refuses every write: a message's row is
    // stored, its escalation never is, so the message is not done.
    let env = Env::with_brokers("escalation_forbidden", shared_clickhouse().url(), 2);
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    let cluster = env.kafka.cluster();
    cluster.partition_leader("tickets", 0, Some(1)).unwrap();
    cluster.partition_leader("triage.dead-letter", 0, Some(1)).unwrap();
    cluster.partition_leader("triage.escalations", 0, Some(2)).unwrap();
    drop(cluster);
    env.produce("tickets", &messages("e", 20));
    // Refused for a while (rows are stored meanwhile), then for good.
    let (retried, refused) =
        ([RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 8], [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 100]);
    env.kafka.broker_request_errors(2, RDKafkaApiKey::Produce, &retried).expect("inject");
    env.kafka.broker_request_errors(2, RDKafkaApiKey::Produce, &refused).expect("inject");
    let config = env.write_config("e", &tiny(), &["tickets"], |c| c.escalation.default_threshold = 0.99);
    let mut worker = env.spawn_worker(&config, "e");
    wait_until(2 * MIN, "the worker exits", || worker.exited().is_some());
    assert_eq!(worker.exited(), Some(Exit::Code(1)));
    let log = worker.log_text();
    assert!(log.contains("cannot write to Kafka topic `triage.escalations`"), "{log}");
    // The first message below 0.99 is the first escalated one: nothing at or past it committed.
    // The messages whose escalation could not be written, as the worker reported them.
    let unwritten: Vec<i64> = log
        .lines()
        .filter(|l| l.contains("a side-topic write cannot complete"))
        .filter_map(|l| l.split(" offset=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    let first = *unwritten.iter().min().unwrap_or_else(|| panic!("no unwritten escalation reported: {log}"));
    assert!(env.query_u64("SELECT count() FROM results") > 0, "rows were stored before the refusals: the test needs them");
    let committed = env.committed("tickets", 0).unwrap_or(0);
    assert!(committed <= first, "committed {committed}: past message {first}, whose escalation was never written");
}

fn alter(env: &Env, sql: &str) {
    let client = clickhouse::Client::default().with_url(&env.clickhouse_url).with_database(&env.database).with_validation(false);
    common::worker::runtime().block_on(client.query(sql).execute()).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[test]
fn when_every_row_is_rejected_and_the_table_is_unchanged_the_rows_are_dead_lettered_not_a_crash_loop() {
    let env = env("all_rejected");
    env.kafka.create_topic("tickets", 1).unwrap();
    alter(&env, "ALTER TABLE results ADD COLUMN guard UInt8 DEFAULT throwIf(message_id LIKE 'x-%')");
    env.produce("tickets", &messages("x", 60));
    let config = env.write_config("r", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker_env(&config, "r", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    env.produce("tickets", &messages("y", 40));
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "the worker kept running: {}", worker.log_text());
    let letters = env.read_topic_to_end("triage.dead-letter");
    let mut keys: Vec<String> =
        letters.iter().map(|(k, ..)| String::from_utf8_lossy(k.as_deref().unwrap_or_default()).into_owned()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((letters.len(), keys.len()), (60, 60), "each rejected message dead-lettered once");
    assert!(keys.iter().all(|k| k.starts_with("x-")));
    assert_eq!(env.distinct_rows(), 40, "the good messages after them landed");
}

#[test]
fn a_column_changed_under_a_running_worker_stops_it_instead_of_dead_lettering_the_stream() {
    let env = env("changed_column");
    env.kafka.create_topic("tickets", 1).unwrap();
    env.produce("tickets", &messages("a", 100));
    let config = env.write_config("c", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker_env(&config, "c", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    alter(&env, "ALTER TABLE results MODIFY COLUMN text_chars UInt64");
    env.produce("tickets", &messages("b", 100));
    wait_until(2 * MIN, "the worker exits", || worker.exited().is_some());
    assert_eq!(worker.exited(), Some(Exit::Code(1)));
    let log = worker.log_text();
    assert!(log.contains("text_chars is UInt64, expected UInt32"), "{log}");
    assert!(env.read_topic_to_end("triage.dead-letter").is_empty(), "nothing dead-lettered for the table's fault");
    assert_eq!(env.committed("tickets", 0), Some(100), "committed up to what was stored");
}

#[test]
fn a_hung_clickhouse_times_out_and_retries_and_every_message_reads_once() {
    // Its own server: this test freezes it.
    let server = PrivateClickHouse::start();
    let env = Env::new("hung", server.url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 2).unwrap();
    // Event times spread over three years: FINAL must collapse replays across partitions.
    let mut batch = messages("h", 3_000);
    for (i, (_, payload)) in batch.iter_mut().enumerate() {
        let mut v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        v["timestamp"] = serde_json::json!(1_640_000_000 + (i as u64 % 36) * 2_700_000);
        *payload = v.to_string().into_bytes();
    }
    env.produce("tickets", &batch[..1_000]);
    let config = env.write_config("h", &tiny(), &["tickets"], |c| c.clickhouse.insert_timeout_ms = 1500);
    let mut worker = env.spawn_worker_env(&config, "h", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    server.freeze();
    let frozen = worker.mark();
    env.produce("tickets", &batch[1_000..]);
    env.wait_for(&mut worker, "an insert times out", MIN, || frozen.text().contains("ClickHouse insert failed; retrying"));
    server.thaw();
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
    // A timed-out INSERT may still have landed: rows may repeat physically, never when read with FINAL.
    assert_eq!(env.distinct_rows(), 3_000);
    assert_eq!(env.distinct_keys(), 3_000);
    assert!(env.query_u64("SELECT uniqExact(toYYYYMM(event_time)) FROM results") >= 30, "rows span many partitions");
}

#[test]
fn a_message_the_model_fails_on_is_dead_lettered_alone_and_the_rest_land() {
    let env = env("poison_model");
    env.kafka.create_topic("tickets", 1).unwrap();
    let mut batch = messages("p", 200);
    // "thyroid" is token 29610: past the poison model's embedding table, so ONNX Runtime fails.
    batch.insert(77, ("marked".into(), br#"{"subject": "thyroid", "body": "my thyroid results"}"#.to_vec()));
    env.produce("tickets", &batch);
    let config = env.write_config("p", &common::test_model_dir("poison-tiny"), &["tickets"], |_| {});
    let mut worker = env.spawn_worker_env(&config, "p", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK), "{}", worker.log_text());
    assert_eq!(env.distinct_rows(), 200, "the marked message's batch-mates all landed");
    let letters = env.read_topic_to_end("triage.dead-letter");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0.as_deref(), Some(&b"marked"[..]));
    assert_eq!(header(&letters[0].2, "triage.reason"), Some("inference_failed"));
    assert!(header(&letters[0].2, "triage.detail").is_some_and(|d| d.contains("Gather") || d.contains("out of")), "{:?}", letters[0].2);
}

#[test]
fn a_model_that_fails_on_everything_stops_the_worker_without_dead_lettering_the_stream() {
    let env = env("broken_model");
    env.kafka.create_topic("tickets", 1).unwrap();
    env.produce("tickets", &messages("b", 300));
    let config = env.write_config("b", &common::test_model_dir("broken-tiny"), &["tickets"], |_| {});
    let mut worker = env.spawn_worker_env(&config, "b", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    wait_until(2 * MIN, "the worker exits", || worker.exited().is_some());
    assert_eq!(worker.exited(), Some(Exit::Code(1)));
    let log = worker.log_text();
    assert!(log.contains("the inference backend is failing on every input") && log.contains("broken-tiny"), "{log}");
    assert!(env.read_topic_to_end("triage.dead-letter").is_empty(), "not one message blamed");
    assert!(env.committed("tickets", 0).is_none(), "nothing committed");
}

#[test]
fn sigterm_while_waiting_for_clickhouse_at_start_exits_at_once() {
    // Nothing listens on this port: the worker waits for ClickHouse, retrying.
    let port = triage::local::free_port().unwrap();
    let env = Env::new("startup_sigterm", format!("http://127.0.0.1:{port}"));
    env.kafka.create_topic("tickets", 1).unwrap();
    let config = env.write_config("s", &tiny(), &["tickets"], |_| {});
    let mut worker = env.spawn_worker(&config, "s");
    wait_until(MIN, "the worker waits for ClickHouse", || worker.log_text().contains("ClickHouse not reachable yet"));
    // terminate() sends SIGTERM and waits up to the timeout: an exit well inside it is the proof.
    assert_eq!(worker.terminate(Duration::from_secs(20)), Some(Exit::OK), "{}", worker.log_text());
    assert!(worker.log_text().contains("shutdown requested during start-up"));
}

#[test]
fn a_stalled_partition_fails_readiness_naming_it_until_it_moves_again() {
    // Its own server: this test freezes it.
    let server = PrivateClickHouse::start();
    let env = Env::new("stall", server.url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 2).unwrap();
    env.produce("tickets", &messages("s", 200));
    let port = triage::local::free_port().unwrap();
    let path = env.write_config("s", &tiny(), &["tickets"], |c| {
        c.metrics.address = format!("127.0.0.1:{port}");
        c.kafka.max_unfinished_age_ms = 3000;
        c.clickhouse.insert_timeout_ms = 1000;
    });
    let mut worker = env.spawn_worker_env(&path, "s", &[("TRIAGE_ESCALATION__ENABLED", "false")]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    env.wait_for(&mut worker, "/readyz 200", MIN, || common::worker::http_get(port, "/readyz").0 == 200);
    let idle = common::worker::http_get(port, "/metrics").1;
    assert!(idle.contains("triage_oldest_unfinished_seconds{topic=\"tickets\",partition=\"0\"} 0"), "idle is not stalled:\n{idle}");
    server.freeze();
    env.produce("tickets", &messages("t", 50));
    let mut body = String::new();
    env.wait_for(&mut worker, "/readyz 503 naming a stalled partition", MIN, || {
        let (status, text) = common::worker::http_get(port, "/readyz");
        body = text;
        status == 503 && body.contains("stalled: oldest unfinished message older than 3s in tickets/")
    });
    let metrics = common::worker::http_get(port, "/metrics").1;
    let age = metrics
        .lines()
        .filter(|l| l.starts_with("triage_oldest_unfinished_seconds{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    assert!(age > 3.0, "the gauge shows the stall: {age}");
    let in_flight = metrics.lines().find_map(|l| l.strip_prefix("triage_in_flight_messages ")?.parse::<f64>().ok());
    assert!(in_flight.is_some_and(|n| (1.0..=50.0).contains(&n)), "the stalled messages are in flight: {in_flight:?}");
    server.thaw();
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    env.wait_for(&mut worker, "/readyz 200 again", MIN, || common::worker::http_get(port, "/readyz").0 == 200);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
    assert_eq!(env.distinct_rows(), 250);
}

fn redrive(config: &std::path::Path, args: &[&str]) -> String {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_triage")).args(["redrive", "--config"]).arg(config).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "redrive {args:?}: {stderr}");
    stderr
}

#[test]
fn redrive_is_safe_to_interrupt_filter_and_repeat() {
    let env = env("redrive_safe");
    env.kafka.create_topic("tickets", 1).unwrap();
    // ClickHouse refuses the r- messages until the cause is fixed.
    alter(&env, "ALTER TABLE results ADD COLUMN guard UInt8 DEFAULT throwIf(message_id LIKE 'r-%')");
    env.produce("tickets", &messages("g", 30));
    // Their Kafka time is in 2020: a redriven copy must keep it (the row's key and partition).
    let without_event_time: Vec<(String, Vec<u8>)> = messages("r", 30)
        .into_iter()
        .map(|(k, p)| {
            let mut v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            v.as_object_mut().unwrap().remove("timestamp");
            (k, v.to_string().into_bytes())
        })
        .collect();
    env.produce_at("tickets", &without_event_time, Some(1_590_000_000_000));
    let mut junk: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("junk-{i}"), format!("junk {i}").into_bytes())).collect();
    junk.push(("huge".into(), vec![b'x'; 2 << 20]));
    env.produce("tickets", &junk);
    let config = env.write_config("d", &tiny(), &["tickets"], |_| {});
    let vars = [("TRIAGE_ESCALATION__ENABLED", "false")];
    let mut worker = env.spawn_worker_env(&config, "d1", &vars);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
    assert_eq!((env.distinct_rows(), env.read_topic_to_end("triage.dead-letter").len()), (30, 36));
    alter(&env, "ALTER TABLE results DROP COLUMN guard"); // the cause is fixed

    // Interrupted after 10 letters: the next run goes on from there.
    let first = redrive(&config, &["--reason", "clickhouse_rejected", "--max", "10"]);
    assert!(first.contains("redrove 10 dead letters"), "{first}");
    let rest = redrive(&config, &["--reason", "clickhouse_rejected"]);
    assert!(rest.contains("redrove 20 dead letters"), "resumed where the first stopped: {rest}");
    // An unfiltered run has its own position: it sends the 30 again, and the junk, but never
    // the letter cut to fit the topic.
    let all = redrive(&config, &[]);
    assert!(all.contains("redrove 35 dead letters") && all.contains("1 cut to fit"), "{all}");

    let mut worker = env.spawn_worker_env(&config, "d2", &vars);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
    // Every message reads once: the r- messages were stored twice, under their original keys.
    assert_eq!(env.distinct_rows(), 60);
    assert_eq!(env.query_u64("SELECT count() FROM results WHERE message_id LIKE 'r-%'"), 60, "two physical copies each");
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE message_id LIKE 'r-%' AND redriven = 1"), 30);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE message_id LIKE 'r-%' AND toYear(event_time) = 2020"), 30);
    assert_eq!(env.query_u64("SELECT max(offset) FROM results FINAL WHERE message_id LIKE 'r-%'"), 59, "keyed by original offsets");
    // The junk failed again: its new dead letters name the ORIGINAL source, so they dedupe.
    let letters = env.read_topic_to_end("triage.dead-letter");
    let mut sources: Vec<String> = letters
        .iter()
        .filter(|(_, _, h)| header(h, "triage.reason") == Some("not_json"))
        .map(|(_, _, h)| format!("{:?}/{:?}", header(h, "triage.source.partition"), header(h, "triage.source.offset")))
        .collect();
    assert_eq!(sources.len(), 10, "5 letters, each written twice");
    sources.sort();
    sources.dedup();
    assert_eq!(sources.len(), 5, "one source key per message");
}

/// Sum of a gauge's series in a /metrics text.
fn gauge_sum(metrics: &str, name: &str) -> f64 {
    metrics.lines().filter(|l| l.starts_with(&format!("{name}{{"))).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn series_of_revoked_partitions_stop_counting_so_sums_across_workers_stay_right() {
    let env = env("revoked_series");
    env.kafka.create_topic("tickets", 4).unwrap();
    env.produce("tickets", &messages("v", 400));
    let ports = [triage::local::free_port().unwrap(), triage::local::free_port().unwrap()];
    let configs: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| env.write_config(&format!("v{i}"), &tiny(), &["tickets"], |c| c.metrics.address = format!("127.0.0.1:{port}")))
        .collect();
    let vars = [("TRIAGE_ESCALATION__ENABLED", "false")];
    let mut a = env.spawn_worker_env(&configs[0], "v0", &vars);
    env.wait_caught_up(&mut a, &["tickets"], 3 * MIN);
    let metrics = |port| common::worker::http_get(port, "/metrics").1;
    // Alone, worker A committed all four partitions: 100 messages each.
    env.wait_for(&mut a, "A's committed series", MIN, || gauge_sum(&metrics(ports[0]), "triage_committed_offset") == 400.0);
    let mut b = env.spawn_worker_env(&configs[1], "v1", &vars);
    env.wait_for(&mut b, "B gets partitions", MIN, || common::worker::log_has_partitions(&env.dir.path().join("v1.log")));
    env.produce("tickets", &messages("w", 400));
    env.wait_caught_up(&mut b, &["tickets"], 3 * MIN);
    // B took some partitions: A's series for them must not keep their old offsets, or the
    // sum over both workers counts them twice.
    let mut seen = String::new();
    let start = std::time::Instant::now();
    loop {
        let (ma, mb) = (metrics(ports[0]), metrics(ports[1]));
        let (sa, sb) = (gauge_sum(&ma, "triage_committed_offset"), gauge_sum(&mb, "triage_committed_offset"));
        if sb > 0.0 && sa + sb == 800.0 {
            break;
        }
        let series = |m: &str| m.lines().filter(|l| l.starts_with("triage_committed_offset{")).collect::<Vec<_>>().join("; ");
        seen = format!("A {sa} [{}], B {sb} [{}]", series(&ma), series(&mb));
        assert!(start.elapsed() < MIN, "the committed series of A and B must add up to the partitions' ends (800): {seen}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = seen;
    assert_eq!(b.terminate(MIN), Some(Exit::OK));
    assert_eq!(a.terminate(MIN), Some(Exit::OK));
    assert_eq!(env.distinct_rows(), 800);
}
