//! The fault soak: two workers in one group on the mock cluster, a private ClickHouse, and a
//! stream of messages with a share of malformed and oversized ones, while faults are injected at
//! random: SIGKILL of a worker (and its restart), SIGSTOP/SIGCONT of ClickHouse, a restart of
//! ClickHouse, broker errors, a third worker joining and leaving. Then the faults stop, a redrive
//! sends every dead letter back once, and the end state is judged:
//! - every produced message is exactly one of {a row read once with FINAL, a dead letter} by
//!   its key (dead letters deduplicated by their `triage.source.*` headers; rows never repeat);
//! - no partition stalled: the group committed every partition to its end.
//!
//! Bounded in time and count. `TRIAGE_SOAK_SECONDS` (default 45) sets how long faults run;
//! `TRIAGE_SOAK_SEED` replays a run (the seed is printed first). The table is printed at the end
//! (README's reliability section shows one).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::worker::{messages, Env, Worker};
use rand::{Rng, SeedableRng};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const PARTITIONS: i32 = 4;

struct Soak {
    env: Env,
    config: std::path::PathBuf,
    workers: Vec<Worker>,
    spawned: usize,
    peak_rss_kb: u64,
}

impl Soak {
    fn spawn(&mut self) -> Worker {
        self.spawned += 1;
        self.env.spawn_worker(&self.config, &format!("w{}", self.spawned))
    }

    fn sample_rss(&mut self) {
        for w in &self.workers {
            self.peak_rss_kb = self.peak_rss_kb.max(w.peak_rss_kb().unwrap_or(0));
        }
    }

    /// Restart any worker that exited on its own (it must not: report it).
    fn check_alive(&mut self) {
        for i in 0..self.workers.len() {
            if let Some(code) = self.workers[i].exited() {
                panic!("worker exited by itself ({code}); its log:\n{}", self.workers[i].log_text());
            }
        }
    }
}

/// One batch of the stream: good messages with event times spread over two years, a share of
/// malformed ones and, now and then, one over `max_message_bytes`.
fn batch(rng: &mut impl Rng, round: usize, size: usize) -> Vec<(String, Vec<u8>)> {
    let mut out = messages(&format!("s{round}"), size);
    for (i, (_, payload)) in out.iter_mut().enumerate() {
        let mut v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        v["timestamp"] = serde_json::json!(1_700_000_000u64 + rng.random_range(0..730u64) * 86_400 + i as u64);
        *payload = v.to_string().into_bytes();
    }
    for i in 0..size / 20 {
        let at = rng.random_range(0..out.len());
        out.insert(at, (format!("bad{round}-{i}"), format!("not json {round} {i}").into_bytes()));
    }
    if rng.random_bool(0.3) {
        out.push((format!("huge{round}"), format!("{{\"body\": \"{}\"}}", "x".repeat(1_200_000)).into_bytes()));
    }
    out
}

#[test]
fn faults_at_random_lose_nothing_and_stall_nothing() {
    let seconds: u64 = std::env::var("TRIAGE_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(45);
    let seed: u64 = std::env::var("TRIAGE_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("soak: seed {seed}, {seconds}s of faults (replay: TRIAGE_SOAK_SEED={seed} TRIAGE_SOAK_SECONDS={seconds})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let (http, tcp) = (triage::local::free_port().unwrap(), triage::local::free_port().unwrap());
    let mut clickhouse = Some(triage::local::LocalClickHouse::start_in(dir.path(), http, tcp).expect("clickhouse"));
    let env = Env::new("soak", format!("http://127.0.0.1:{http}"));
    env.apply_schema();
    env.kafka.create_topic("tickets", PARTITIONS).unwrap();
    let config = env.write_config("soak", &common::test_model_dir("multihead-tiny"), &["tickets"], "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("commit_interval_ms = 200\n", "commit_interval_ms = 200\nmax_in_flight = 2000\n")
        .replacen("insert_interval_ms = 200\n", "insert_interval_ms = 200\ninsert_timeout_ms = 2000\n", 1);
    std::fs::write(&config, text).unwrap();
    let mut soak = Soak { env, config, workers: Vec::new(), spawned: 0, peak_rss_kb: 0 };
    for _ in 0..2 {
        let w = soak.spawn();
        soak.workers.push(w);
    }

    let mut produced: Vec<String> = Vec::new();
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        round += 1;
        let b = batch(&mut rng, round, 150);
        produced.extend(b.iter().map(|(k, _)| k.clone()));
        soak.env.produce("tickets", &b);
        soak.sample_rss();
        soak.check_alive();
        match rng.random_range(0..6) {
            0 => {
                let i = rng.random_range(0..soak.workers.len());
                soak.workers[i].kill9();
                let restarted = soak.spawn();
                soak.workers[i] = restarted;
                *faults.entry("worker SIGKILL + restart").or_default() += 1;
            }
            1 => {
                let ch = clickhouse.as_ref().unwrap();
                ch.signal(19);
                std::thread::sleep(Duration::from_millis(rng.random_range(1_000..4_000)));
                ch.signal(18);
                *faults.entry("ClickHouse SIGSTOP/SIGCONT").or_default() += 1;
            }
            2 => {
                drop(clickhouse.take()); // stops it; the data directory stays
                std::thread::sleep(Duration::from_millis(rng.random_range(500..3_000)));
                clickhouse = Some(triage::local::LocalClickHouse::start_in(dir.path(), http, tcp).expect("restart clickhouse"));
                *faults.entry("ClickHouse restart").or_default() += 1;
            }
            3 => {
                let cluster = soak.env.kafka.cluster();
                let (api, code) = match rng.random_range(0..3) {
                    0 => (RDKafkaApiKey::Fetch, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION),
                    1 => (RDKafkaApiKey::OffsetCommit, RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT),
                    _ => (RDKafkaApiKey::Produce, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS),
                };
                cluster.request_errors(api, &vec![code; rng.random_range(1..6)]);
                *faults.entry("broker errors").or_default() += 1;
            }
            4 => {
                let mut extra = soak.spawn();
                std::thread::sleep(Duration::from_millis(rng.random_range(3_000..8_000)));
                soak.peak_rss_kb = soak.peak_rss_kb.max(extra.peak_rss_kb().unwrap_or(0));
                assert_eq!(extra.terminate(Duration::from_secs(60)), Some(0), "{}", extra.log_text());
                *faults.entry("worker joins, then leaves").or_default() += 1;
            }
            _ => std::thread::sleep(Duration::from_millis(rng.random_range(200..1_500))),
        }
    }
    // Faults stop. The end state must come by itself: every partition committed to its end.
    let ch = clickhouse.as_ref().unwrap();
    ch.signal(18);
    let topics = ["tickets"];
    let mut first = soak.workers.remove(0);
    soak.env.wait_caught_up(&mut first, &topics, Duration::from_secs(240));
    soak.workers.insert(0, first);
    soak.sample_rss();

    // Redrive every dead letter once: the junk comes back, fails again, is dead-lettered again
    // under its original source key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triage")).args(["redrive", "--config"]).arg(&soak.config).output().unwrap();
    let redrive = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{redrive}");
    let mut first = soak.workers.remove(0);
    soak.env.wait_caught_up(&mut first, &topics, Duration::from_secs(240));
    soak.workers.insert(0, first);
    for mut w in soak.workers.drain(..) {
        assert_eq!(w.terminate(Duration::from_secs(60)), Some(0), "{}", w.log_text());
    }

    // Judge: rows (read once with FINAL) and dead letters (deduplicated by source) partition the
    // produced keys exactly.
    let env = &soak.env;
    let duplicated = env.query_u64("SELECT count() FROM (SELECT message_id FROM results FINAL GROUP BY message_id HAVING count() > 1)");
    assert_eq!(duplicated, 0, "a message read twice with FINAL");
    let rows: HashSet<String> = {
        let client = clickhouse::Client::default().with_url(&env.clickhouse_url).with_database(&env.database).with_validation(false);
        let ids: Vec<String> =
            common::worker::runtime().block_on(client.query("SELECT message_id FROM results FINAL").fetch_all()).expect("rows");
        ids.into_iter().collect()
    };
    let letters = env.read_topic_to_end("triage.dead-letter");
    let mut by_source: HashMap<String, String> = HashMap::new();
    for (key, _, headers) in &letters {
        let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
        let source = format!("{}/{}/{}", h("triage.source.topic"), h("triage.source.partition"), h("triage.source.offset"));
        let key = String::from_utf8_lossy(key.as_deref().unwrap_or_default()).into_owned();
        if let Some(previous) = by_source.insert(source.clone(), key.clone()) {
            assert_eq!(previous, key, "two different messages dead-lettered under one source key {source}");
        }
    }
    let dead: HashSet<String> = by_source.values().cloned().collect();
    let produced_set: HashSet<String> = produced.iter().cloned().collect();
    assert_eq!(produced_set.len(), produced.len(), "keys are unique");
    let both: Vec<_> = rows.intersection(&dead).take(5).collect();
    assert!(both.is_empty(), "stored AND dead-lettered: {both:?}");
    let missing: Vec<_> = produced_set.iter().filter(|k| !rows.contains(*k) && !dead.contains(*k)).take(5).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let extra: Vec<_> = rows.union(&dead).filter(|k| !produced_set.contains(*k)).take(5).collect();
    assert!(extra.is_empty(), "never produced: {extra:?}");
    let expected_dead = produced.iter().filter(|k| k.starts_with("bad") || k.starts_with("huge")).count();
    assert_eq!(dead.len(), expected_dead, "exactly the malformed and oversized messages are dead letters");

    let raw = env.raw_rows();
    let table = format!(
        "| seed | fault seconds | produced | rows (FINAL) | dead letters (unique / written) | raw replays | peak worker RSS | faults injected |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n\
         | {seed} | {seconds} | {} | {} | {} / {} | {} | {} MB | {} |",
        produced.len(),
        rows.len(),
        dead.len(),
        letters.len(),
        raw - rows.len() as u64,
        soak.peak_rss_kb / 1024,
        faults.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    );
    eprintln!("soak result (every message exactly once: a row or a dead letter; every partition committed to its end):\n{table}\nredrive: {redrive}");
    assert!(faults.values().sum::<u32>() > 0 || seconds < 5, "no fault was injected");
}
