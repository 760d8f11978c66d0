//! Local stand-ins for the real services, for `triage demo`, `triage broker` and the tests:
//! librdkafka's mock Kafka cluster (real protocol over TCP) and a private ClickHouse server
//! on loopback (Debian's `clickhouse-server`, installed by scripts/setup) with its own data
//! directory, stopped when dropped.

pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("clickhouse-server is not installed (scripts/setup installs it: apt-get install clickhouse-server)")]
    NoClickHouse,
    #[error("starting clickhouse-server: {0}")]
    Spawn(std::io::Error),
    #[error("clickhouse-server did not answer on {url} within {seconds}s; its log: {log}")]
    NotReady { url: String, seconds: u64, log: String },
    #[error("Kafka mock cluster: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// `program args...` under a small shell watchdog that ends it (and removes `remove_dir`, if
/// given) when THIS process is gone, however it went: a value kept in a static is never
/// dropped, and a parent-death signal fires when the spawning THREAD ends (test threads end all
/// the time), so neither can be relied on. The child leads its own process group: signalling
/// the group reaches the watchdog and the program alike.
pub fn watched_command(program: &Path, args: &[String], remove_dir: Option<&Path>) -> Command {
    const WATCHDOG: &str = r#""$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server; exit 0' TERM INT
while kill -0 "$TRIAGE_OWNER_PID" 2>/dev/null && kill -0 $server 2>/dev/null; do sleep 1; done
kill -TERM $server 2>/dev/null
for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 $server 2>/dev/null || break; sleep 1; done
kill -KILL $server 2>/dev/null
wait $server
[ -n "$TRIAGE_REMOVE_DIR" ] && rm -rf "$TRIAGE_REMOVE_DIR"
exit 0"#;
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(WATCHDOG).arg("triage-watchdog").arg(program).args(args);
    cmd.env("TRIAGE_OWNER_PID", std::process::id().to_string());
    cmd.env("TRIAGE_REMOVE_DIR", remove_dir.map(|d| d.display().to_string()).unwrap_or_default());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    cmd
}

/// A ClickHouse server owned by this process.
pub struct LocalClickHouse {
    child: Option<Child>,
    pub http_port: u16,
    pub tcp_port: u16,
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// A free TCP port on loopback for a server started a moment later (tests and demos).
///
/// Taken from BELOW the kernel's ephemeral range: a port the kernel hands out for `bind(0)` is
/// also one it may hand any process as the source port of an outgoing connection, and a
/// ClickHouse node's session to ZooKeeper held exactly such a port for minutes while another
/// node waited to listen on it (CI: "Address already in use"). Outside that range only a
/// listener can take a port. A port is handed out once per process, so two servers of one test
/// never get the same one; the start is spread by the process id so test binaries differ.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if let Some((low, high)) = ports_below_ephemeral() {
        let span = u32::from(high - low) + 1;
        let _ = NEXT.compare_exchange(u32::MAX, std::process::id().wrapping_mul(7919) % span, Ordering::SeqCst, Ordering::SeqCst);
        for _ in 0..span {
            let port = low + (NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    // No room below the range, or all of it taken: the kernel's choice.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Ports 20000 up to the start of the ephemeral range (Linux: 32768 by default), as the kernel
/// says; from 20000 to stay clear of well-known services. None when the kernel hands out
/// nearly every port.
fn ports_below_ephemeral() -> Option<(u16, u16)> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u16>().ok()))
        .unwrap_or(32768);
    (ephemeral_start > 21000).then(|| (20000, ephemeral_start - 1))
}

fn find_server() -> Option<PathBuf> {
    ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH")
                .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("clickhouse-server")).find(|p| p.exists()))
        })
}

impl LocalClickHouse {
    /// Start a server with data in a fresh temporary directory.
    pub fn start() -> Result<Self, LocalError> {
        let temp = tempfile::Builder::new().prefix("triage-clickhouse-").tempdir().map_err(LocalError::Spawn)?;
        let dir = temp.path().to_path_buf();
        let ports = (free_port().map_err(LocalError::Spawn)?, free_port().map_err(LocalError::Spawn)?);
        let mut server = Self::launch(&dir, ports.0, ports.1, true, None)?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Start a server in a fresh temporary directory whose users are those of `users_xml` (a
    /// complete users file: profiles, users, quotas), e.g. to test a password-protected user.
    pub fn start_with_users(users_xml: &str) -> Result<Self, LocalError> {
        let temp = tempfile::Builder::new().prefix("triage-clickhouse-").tempdir().map_err(LocalError::Spawn)?;
        let dir = temp.path().to_path_buf();
        let users = dir.join("users.xml");
        std::fs::write(&users, users_xml).map_err(LocalError::Spawn)?;
        let ports = (free_port().map_err(LocalError::Spawn)?, free_port().map_err(LocalError::Spawn)?);
        let mut server = Self::launch(&dir, ports.0, ports.1, true, Some(&users))?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Start (or restart) a server on the given data directory and ports.
    pub fn start_in(dir: &Path, http_port: u16, tcp_port: u16) -> Result<Self, LocalError> {
        Self::launch(dir, http_port, tcp_port, false, None)
    }

    /// Start a server from a complete config file of its own (ports, paths, cluster, macros
    /// inside it), e.g. one node of a test cluster. `dir` holds its data and logs.
    pub fn start_with_config(dir: &Path, config_file: &Path, http_port: u16, tcp_port: u16) -> Result<Self, LocalError> {
        let binary = find_server().ok_or(LocalError::NoClickHouse)?;
        let mut args = Vec::new();
        if binary.ends_with("clickhouse") {
            args.push("server".into());
        }
        args.push(format!("--config-file={}", config_file.display()));
        let mut cmd = watched_command(&binary, &args, None);
        cmd.current_dir(dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().map_err(LocalError::Spawn)?;
        let server = LocalClickHouse { child: Some(child), http_port, tcp_port, dir: dir.to_path_buf(), _temp: None };
        server.wait_ready(Duration::from_secs(60))?;
        Ok(server)
    }

    fn launch(dir: &Path, http_port: u16, tcp_port: u16, remove_dir_after: bool, users: Option<&Path>) -> Result<Self, LocalError> {
        let binary = find_server().ok_or(LocalError::NoClickHouse)?;
        let d = dir.display();
        let mut args: Vec<String> = Vec::new();
        if binary.ends_with("clickhouse") {
            args.push("server".into());
        }
        let interserver = free_port().map_err(LocalError::Spawn)?;
        args.extend([
            "--config-file=/etc/clickhouse-server/config.xml".to_string(),
            "--".into(),
            format!("--path={d}/"),
            format!("--tmp_path={d}/tmp/"),
            format!("--user_files_path={d}/user_files/"),
            format!("--format_schema_path={d}/format_schemas/"),
            format!("--http_port={http_port}"),
            format!("--tcp_port={tcp_port}"),
            format!("--interserver_http_port={interserver}"),
            "--listen_host=127.0.0.1".into(),
            format!("--logger.log={d}/server.log"),
            format!("--logger.errorlog={d}/server.err.log"),
            "--logger.level=warning".into(),
        ]);
        if let Some(users) = users {
            args.push(format!("--users_config={}", users.display()));
        }
        let mut cmd = watched_command(&binary, &args, remove_dir_after.then_some(dir));
        cmd.current_dir(dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().map_err(LocalError::Spawn)?;
        let server = LocalClickHouse { child: Some(child), http_port, tcp_port, dir: dir.to_path_buf(), _temp: None };
        server.wait_ready(Duration::from_secs(60))?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<(), LocalError> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if ping(self.http_port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self.dir.join("server.err.log")).unwrap_or_default();
        Err(LocalError::NotReady {
            url: self.url(),
            seconds: timeout.as_secs(),
            log: log.lines().rev().take(5).collect::<Vec<_>>().join(" | "),
        })
    }

    /// Send a signal to the server's process group (SIGSTOP / SIGCONT to make it hang and
    /// come back, in fault tests).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        match &self.child {
            Some(child) => signal_process(-(child.id() as i32), signal),
            None => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the ClickHouse server is not running")),
        }
    }

    /// Stop the server (SIGTERM, then SIGKILL after 10 s); the data directory stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal_process(-(child.id() as i32), SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Linux's signal numbers (x86-64 and arm64 alike), for [`signal_process`].
pub const SIGHUP: i32 = 1;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;

/// kill(2): send `signal` to `pid` (a negative pid: that process group). For the local servers
/// and the tests' fault injection (SIGSTOP / SIGCONT / SIGKILL), without the `kill` program,
/// which a minimal image lacks (procps).
pub fn signal_process(pid: i32, signal: i32) -> std::io::Result<()> {
    // 0 and -1 would signal our own process group, or every process we may signal.
    if pid == 0 || pid == -1 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("refusing to signal pid {pid}")));
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc_kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// GET /ping on loopback, without an HTTP client dependency.
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.") && buf.contains(" 200 ") && buf.ends_with("Ok.\n")
}

/// A mock Kafka cluster owned by this process, with topics created up front.
///
/// The cluster lives inside an idle client (`test.mock.num.brokers`): the rdkafka crate wraps
/// only cluster-wide error injection, and through the client's handle the fault tests also
/// reach librdkafka's per-broker error stacks (errors aimed at one broker's clients).
pub struct LocalKafka {
    client: rdkafka::producer::BaseProducer,
}

type MockCluster<'a> = rdkafka::mocking::MockCluster<'a, rdkafka::producer::DefaultProducerContext>;

impl LocalKafka {
    pub fn start(brokers: i32) -> Result<Self, LocalError> {
        let client: rdkafka::producer::BaseProducer =
            rdkafka::ClientConfig::new().set("test.mock.num.brokers", brokers.to_string()).create()?;
        let this = LocalKafka { client };
        this.raw_cluster()?;
        Ok(this)
    }

    fn raw_cluster(&self) -> Result<*mut rdkafka::bindings::rd_kafka_mock_cluster_t, LocalError> {
        // SAFETY: the handle is alive as long as `self.client`; librdkafka returns NULL for a
        // client without a mock cluster.
        let raw =
            unsafe { rdkafka::bindings::rd_kafka_handle_mock_cluster(rdkafka::producer::Producer::client(&self.client).native_ptr()) };
        if raw.is_null() {
            return Err(LocalError::Kafka(rdkafka::error::KafkaError::MockCluster(rdkafka::types::RDKafkaErrorCode::Fail)));
        }
        Ok(raw)
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), LocalError> {
        Ok(self.cluster().create_topic(topic, partitions, 1)?)
    }

    pub fn cluster(&self) -> MockCluster<'_> {
        rdkafka::producer::Producer::client(&self.client).mock_cluster().expect("the client was made with a mock cluster")
    }

    /// Make `broker` answer its next requests of `api` with `errors`, one per request, whoever
    /// sends them (cluster-wide injection hits the first client to ask, often the test's own).
    pub fn broker_request_errors(
        &self,
        broker: i32,
        api: rdkafka::types::RDKafkaApiKey,
        errors: &[rdkafka::types::RDKafkaRespErr],
    ) -> Result<(), LocalError> {
        let raw = self.raw_cluster()?;
        for &error in errors {
            // SAFETY: a live mock cluster; one (error, round-trip ms) pair per call, as C ints.
            let code =
                unsafe { rdkafka::bindings::rd_kafka_mock_broker_push_request_error_rtts(raw, broker, api as i16, 1, error as i32, 0i32) };
            if code != rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(LocalError::Kafka(rdkafka::error::KafkaError::MockCluster(code.into())));
            }
        }
        Ok(())
    }

    /// Errors injected on `broker` for `api` that no request has taken yet.
    pub fn broker_errors_left(&self, broker: i32, api: rdkafka::types::RDKafkaApiKey) -> Result<usize, LocalError> {
        let raw = self.raw_cluster()?;
        let mut left = 0usize;
        // SAFETY: a live mock cluster and a valid out pointer.
        let code = unsafe { rdkafka::bindings::rd_kafka_mock_broker_error_stack_cnt(raw, broker, api as i16, &mut left) };
        if code != rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(LocalError::Kafka(rdkafka::error::KafkaError::MockCluster(code.into())));
        }
        Ok(left)
    }
}

/// Why a run on local services (`triage demo`, `triage bench`) failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalRunError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error(transparent)]
    Worker(#[from] crate::error::WorkerError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("producing messages: {0}")]
    Produce(#[from] crate::kafka_tools::ToolError),
    #[error("{0}")]
    Other(String),
}

/// Kafka settings for a group on a local mock cluster: short session timeout and commit
/// interval, so starts, stops and checks take seconds.
pub fn local_kafka_config(kafka: &LocalKafka, group_id: &str) -> crate::config::KafkaConfig {
    crate::config::KafkaConfig {
        bootstrap_servers: kafka.bootstrap_servers(),
        group_id: group_id.into(),
        session_timeout_ms: 6_000,
        commit_interval_ms: 200,
        ..Default::default()
    }
}

/// A worker configuration on local services: defaults elsewhere, and no metrics port (a
/// developer's machine has no port to spare for it).
pub fn local_worker_config(
    worker_id: &str,
    kafka: crate::config::KafkaConfig,
    clickhouse: crate::config::ClickHouseConfig,
    routes: Vec<crate::config::RouteConfig>,
    inference: crate::model::InferenceOptions,
) -> crate::config::Config {
    crate::config::Config {
        worker_id: Some(worker_id.into()),
        kafka,
        routes,
        escalation: Default::default(),
        clickhouse,
        batching: Default::default(),
        inference,
        max_message_bytes: crate::message::DEFAULT_MAX_MESSAGE_BYTES,
        shutdown: Default::default(),
        models: Default::default(),
        metrics: crate::config::MetricsConfig { address: String::new() },
        llm: Default::default(),
        schema_registry: Default::default(),
    }
}

/// Resolves once the group's committed offsets reach the end of every topic (a shutdown
/// signal for runs over a fixed backlog).
pub async fn until_caught_up(kafka: crate::config::KafkaConfig, topics: Vec<String>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (k, t) = (kafka.clone(), topics.clone());
        let done = tokio::task::spawn_blocking(move || crate::kafka_tools::group_caught_up(&k, &t).unwrap_or(false)).await;
        if done.unwrap_or(false) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range_and_never_twice() {
        let (low, high) = ports_below_ephemeral().expect("a default kernel leaves room below 32768");
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        assert!(ports.iter().all(|p| (low..=high).contains(p)), "{ports:?} outside {low}..={high}");
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice: {ports:?}");
    }

    #[test]
    fn a_signal_reaches_its_process_and_never_our_own_group_or_everyone() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = Command::new("sleep").arg("600").spawn().expect("spawn sleep");
        signal_process(child.id() as i32, SIGKILL).expect("SIGKILL to the child");
        assert_eq!(child.wait().expect("wait").signal(), Some(SIGKILL));
        // Signal 0 only checks: unguarded, both would succeed (and a real signal would hit the
        // test runner's group, or every process of the user).
        for pid in [0, -1] {
            let refused = signal_process(pid, 0).expect_err("refused");
            assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput, "pid {pid}");
        }
    }
}
