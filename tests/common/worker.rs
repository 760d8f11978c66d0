//! Harness for worker tests: a shared private ClickHouse server, a mock Kafka cluster per test,
//! `triage run` as a child process, and queries that read results the documented way.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use triage::config::{ClickHouseConfig, KafkaConfig};
use triage::local::{LocalClickHouse, LocalKafka};
use triage::sink::clickhouse::ClickHouseService;

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime"))
}

/// One ClickHouse server for the whole test binary; each test has its own database.
pub fn shared_clickhouse() -> Arc<LocalClickHouse> {
    static CH: OnceLock<Arc<LocalClickHouse>> = OnceLock::new();
    CH.get_or_init(|| Arc::new(LocalClickHouse::start().expect("start clickhouse-server (scripts/setup installs it)"))).clone()
}

pub struct Env {
    pub kafka: LocalKafka,
    pub clickhouse_url: String,
    pub database: String,
    pub dir: tempfile::TempDir,
    pub group: String,
}

impl Env {
    pub fn new(name: &str, clickhouse_url: String) -> Env {
        let kafka = LocalKafka::start(1).expect("mock cluster");
        let env = Env {
            kafka,
            clickhouse_url,
            database: format!("t_{name}"),
            dir: tempfile::tempdir().expect("tempdir"),
            group: format!("g-{name}"),
        };
        env.kafka.create_topic("triage.dead-letter", 1).unwrap();
        env.kafka.create_topic("triage.escalations", 1).unwrap();
        env
    }

    pub fn clickhouse(&self) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.clickhouse_url.clone(),
            database: self.database.clone(),
            insert_interval_ms: 200,
            retry_initial_ms: 100,
            retry_max_ms: 2000,
            ..Default::default()
        }
    }

    pub fn apply_schema(&self) {
        runtime().block_on(ClickHouseService::new(&self.clickhouse()).apply_schema()).expect("apply schema");
    }

    pub fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig { bootstrap_servers: self.kafka.bootstrap_servers(), group_id: self.group.clone(), ..Default::default() }
    }

    /// A config file for `triage run`; `extra` is TOML placed before the [kafka] section
    /// (top-level keys first, then any tables of its own).
    pub fn write_config(&self, name: &str, model: &Path, topics: &[&str], extra: &str) -> PathBuf {
        let mut text = format!(
            "worker_id = \"{name}\"\n{extra}\n[kafka]\nbootstrap_servers = \"{}\"\ngroup_id = \"{}\"\nsession_timeout_ms = 6000\ncommit_interval_ms = 200\n\n\
             [clickhouse]\nurl = \"{}\"\ndatabase = \"{}\"\ninsert_interval_ms = 200\nretry_initial_ms = 100\nretry_max_ms = 2000\n\n\
             [batching]\nmax_wait_ms = 5\n\n[shutdown]\ndrain_timeout_ms = 20000\n\n[metrics]\naddress = \"\"\n\n",
            self.kafka.bootstrap_servers(),
            self.group,
            self.clickhouse_url,
            self.database
        );
        for t in topics {
            text.push_str(&format!(
                "[[routes]]\ntopic = \"{t}\"\nkind = \"ticket\"\nmodel = \"{}\"\nfields.timestamp = [\"timestamp\"]\n\n",
                model.display()
            ));
        }
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn spawn_worker(&self, config: &Path, log_name: &str) -> Worker {
        self.spawn_worker_env(config, log_name, &[])
    }

    /// `triage run` with extra environment variables (e.g. `TRIAGE_KAFKA__ESCALATION_TOPIC`).
    pub fn spawn_worker_env(&self, config: &Path, log_name: &str, vars: &[(&str, &str)]) -> Worker {
        self.spawn_command("run", config, log_name, vars)
    }

    /// `triage <command> --config <config>` as a child process logging to `<log_name>.log`.
    pub fn spawn_command(&self, command: &str, config: &Path, log_name: &str, vars: &[(&str, &str)]) -> Worker {
        let log = self.dir.path().join(format!("{log_name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_triage"))
            .args([command, "--config"])
            .arg(config)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn,ort=warn")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn triage {command}: {e}"));
        Worker { child: Some(child), log }
    }

    pub fn produce(&self, topic: &str, messages: &[(String, Vec<u8>)]) {
        self.produce_at(topic, messages, None)
    }

    /// Produce with a given Kafka timestamp (ms) on every message (None: now).
    pub fn produce_at(&self, topic: &str, messages: &[(String, Vec<u8>)], timestamp_ms: Option<i64>) {
        // Large enough for the oversized messages the fault tests send.
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap_servers())
            .set("linger.ms", "5")
            .set("message.max.bytes", "16000000")
            .create()
            .unwrap();
        for (key, payload) in messages {
            loop {
                let mut record = BaseRecord::to(topic).key(key.as_str()).payload(payload.as_slice());
                if let Some(t) = timestamp_ms {
                    record = record.timestamp(t);
                }
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, _)) => {
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30)).expect("flush");
    }

    /// Wait until the group committed everything; fails early with the worker's log.
    pub fn wait_caught_up(&self, worker: &mut Worker, topics: &[&str], timeout: Duration) {
        self.wait_for(worker, "all offsets committed", timeout, || self.caught_up(topics));
    }

    /// Wait for `cond`; on timeout, fail with the worker's log tail.
    pub fn wait_for(&self, worker: &mut Worker, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if let Some(code) = worker.exited() {
                panic!("the worker exited ({code}) while waiting for {what}; its log:\n{}", worker.log_text());
            }
            if start.elapsed() > timeout {
                let log = worker.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("timed out after {timeout:?} waiting for {what}; worker log tail:\n{}", tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn caught_up(&self, topics: &[&str]) -> bool {
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        triage::kafka_tools::group_caught_up(&self.kafka_config(), &topics).unwrap_or(false)
    }

    pub fn query_u64(&self, sql: &str) -> u64 {
        let client = clickhouse::Client::default().with_url(&self.clickhouse_url).with_database(&self.database).with_validation(false);
        runtime().block_on(client.query(sql).fetch_one::<u64>()).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Messages present, read once each (FINAL).
    pub fn distinct_rows(&self) -> u64 {
        self.query_u64("SELECT count() FROM results FINAL")
    }

    /// Physical rows before dedup: replays show up here.
    pub fn raw_rows(&self) -> u64 {
        self.query_u64("SELECT count() FROM results")
    }

    /// Distinct (topic, partition, offset) keys.
    pub fn distinct_keys(&self) -> u64 {
        self.query_u64("SELECT uniqExact(topic, partition, offset) FROM results")
    }

    /// Every record of a topic, read to the end offsets it has now (not "stop at N": a
    /// duplicate or an extra record shows).
    pub fn read_topic_to_end(&self, topic: &str) -> Vec<Record> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap_servers())
            .set("group.id", format!("reader-end-{topic}-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        let mut remaining = 0i64;
        for p in metadata.topics()[0].partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
            remaining += high - low;
            list.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&list).unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        while (out.len() as i64) < remaining {
            assert!(start.elapsed() < Duration::from_secs(60), "read {} of {remaining} records of {topic}", out.len());
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(record_of(&m));
            }
        }
        out
    }

    /// The group's committed offset of one partition (None: nothing committed).
    pub fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        let consumer: BaseConsumer = self.kafka_config().client(triage::config::ClientRole::Observer).create().unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition(topic, partition);
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        let offset = committed.elements().first().map(|e| e.offset());
        match offset {
            Some(rdkafka::Offset::Offset(o)) => Some(o),
            _ => None,
        }
    }

    /// All records of a topic: (key, payload, headers).
    pub fn read_topic(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
        // Assigned directly from the beginning: no group to join, nothing committed.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap_servers())
            .set("group.id", format!("reader-{topic}-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            list.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&list).unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < expected && start.elapsed() < timeout {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(record_of(&m));
            }
        }
        out
    }
}

/// A record read back from a topic: (key, payload, headers).
pub type Record = (Option<Vec<u8>>, Vec<u8>, Vec<(String, String)>);

fn record_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let headers = m
        .headers()
        .map(|h| {
            h.iter().map(|x| (x.key.to_string(), x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())).collect()
        })
        .unwrap_or_default();
    (m.key().map(<[u8]>::to_vec), m.payload().unwrap_or_default().to_vec(), headers)
}

pub struct Worker {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        extern "C" {
            fn kill(pid: i32, sig: i32) -> i32;
        }
        // SAFETY: signalling our own child.
        unsafe {
            kill(self.pid(), sig);
        }
    }

    pub fn kill9(&mut self) {
        self.signal(9);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.signal(15);
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn exited(&mut self) -> Option<i32> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).and_then(|s| s.code())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory (kB) so far.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` ticket-like JSON messages with varied lengths.
pub fn messages(prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    let words = [
        "refund", "parcel", "late", "login", "broken", "invoice", "card", "charged", "twice", "password", "return", "label", "screen",
        "cracked",
    ];
    (0..n)
        .map(|i| {
            let body: Vec<&str> = (0..(3 + (i * 7) % 30)).map(|j| words[(i + j * 3) % words.len()]).collect();
            let id = format!("{prefix}-{i}");
            // Event times over three years: rows land in ~36 monthly partitions, so reading once
            // with FINAL is tested across partitions.
            let timestamp = 1_600_000_000 + (i as u64 % 36) * 2_600_000;
            let message = serde_json::json!({"id": id, "subject": format!("ticket {i}"), "body": body.join(" "), "timestamp": timestamp});
            (id.clone(), message.to_string().into_bytes())
        })
        .collect()
}

/// GET a path on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes());
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}
