//! A real ClickHouse cluster on loopback: ZooKeeper and four `clickhouse-server` processes
//! (2 shards x 2 replicas, generated configs with remote_servers and macros), a first release's
//! schema upgraded ON CLUSTER by `triage schema apply` with `[clickhouse] cluster` set, two workers writing
//! through the Distributed table (to different shards' nodes), and the replica one of them
//! writes through SIGKILLed mid-stream (rows stored, more to come) and restarted once that
//! worker's INSERTs failed. Then: every message read once with FINAL on the Distributed table
//! (after SYSTEM SYNC REPLICA), nothing missing, the replicas of each shard equal, and the
//! analyst queries run on the cluster.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::worker::{messages, runtime, Env, Exit};
use triage::local::{free_port, watched_command, LocalClickHouse};

const CLUSTER: &str = "triage_cluster";
const MIN: Duration = Duration::from_secs(60);

struct ZooKeeper {
    child: Child,
    port: u16,
}

impl ZooKeeper {
    fn start(dir: &Path) -> ZooKeeper {
        let port = free_port().unwrap();
        let data = dir.join("zk");
        std::fs::create_dir_all(&data).unwrap();
        let cfg = dir.join("zoo.cfg");
        // The admin server would take port 8080; the four-letter words tell when it is up.
        std::fs::write(
            &cfg,
            format!(
                "tickTime=2000\ndataDir={}\nclientPort={port}\nadmin.enableServer=false\n4lw.commands.whitelist=ruok\n",
                data.display()
            ),
        )
        .unwrap();
        let mut cmd = watched_command(
            Path::new("/usr/share/zookeeper/bin/zkServer.sh"),
            &["start-foreground".into(), cfg.display().to_string()],
            None,
        );
        cmd.env("ZOO_LOG_DIR", dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("ZooKeeper (scripts/setup installs Debian's zookeeper)");
        let zk = ZooKeeper { child, port };
        let started = Instant::now();
        while !zk.ruok() {
            assert!(started.elapsed() < MIN, "ZooKeeper did not answer on {port}");
            std::thread::sleep(Duration::from_millis(200));
        }
        zk
    }

    fn ruok(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut answer = String::new();
        s.write_all(b"ruok").is_ok() && s.read_to_string(&mut answer).is_ok() && answer == "imok"
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { kill(-(self.child.id() as i32), 15) };
        let _ = self.child.wait();
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

struct Node {
    dir: PathBuf,
    config: PathBuf,
    http: u16,
    tcp: u16,
    server: Option<LocalClickHouse>,
}

impl Node {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// Start (or restart) the node. ClickHouse 18.16 restarted at once on the data directory
    /// of a process just killed can abort during start-up (seen once in a full run, a crash
    /// inside its own thread pool); a second start is what an operator's supervisor does, and
    /// what the worker's promise is tested under.
    fn start(&mut self) {
        let mut last = None;
        for _ in 0..2 {
            match LocalClickHouse::start_with_config(&self.dir, &self.config, self.http, self.tcp) {
                Ok(server) => {
                    self.server = Some(server);
                    return;
                }
                Err(e) => {
                    eprintln!("cluster node on port {} did not start ({e}); starting it again", self.http);
                    last = Some(e);
                }
            }
        }
        panic!("cluster node: {last:?}");
    }

    fn client(&self) -> clickhouse::Client {
        clickhouse::Client::default().with_url(self.url()).with_validation(false)
    }

    fn count(&self, sql: &str) -> u64 {
        runtime().block_on(self.client().query(sql).fetch_one::<u64>()).unwrap_or_else(|e| panic!("{sql} on {}: {e}", self.url()))
    }

    fn text(&self, sql: &str) -> String {
        runtime().block_on(self.client().query(sql).fetch_one::<String>()).unwrap_or_else(|e| panic!("{sql} on {}: {e}", self.url()))
    }
}

/// Four nodes: shard 1 = nodes 0 and 1, shard 2 = nodes 2 and 3.
fn cluster(root: &Path, zk_port: u16) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..4)
        .map(|i| {
            let dir = root.join(format!("node{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            Node { config: dir.join("config.xml"), dir, http: free_port().unwrap(), tcp: free_port().unwrap(), server: None }
        })
        .collect();
    let replica = |n: &Node| format!("<replica><host>127.0.0.1</host><port>{}</port></replica>", n.tcp);
    let remote = format!(
        "<remote_servers><{CLUSTER}><shard><internal_replication>true</internal_replication>{}{}</shard>\
         <shard><internal_replication>true</internal_replication>{}{}</shard></{CLUSTER}></remote_servers>",
        replica(&nodes[0]),
        replica(&nodes[1]),
        replica(&nodes[2]),
        replica(&nodes[3])
    );
    for (i, node) in nodes.iter_mut().enumerate() {
        let d = node.dir.display();
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog><size>100M</size><count>2</count></logger>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <interserver_http_port>{inter}</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <listen_host>127.0.0.1</listen_host>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>1073741824</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>{d}/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>/etc/clickhouse-server/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    {remote}
    <zookeeper><node><host>127.0.0.1</host><port>{zk_port}</port></node></zookeeper>
    <macros><shard>0{shard}</shard><replica>r{replica}</replica></macros>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
</yandex>
"#,
            http = node.http,
            tcp = node.tcp,
            inter = free_port().unwrap(),
            shard = i / 2 + 1,
            replica = i % 2 + 1,
        );
        std::fs::write(&node.config, config).unwrap();
    }
    for node in &mut nodes {
        node.start();
    }
    nodes
}

fn timestamped(prefix: &str, n: usize, recent: bool) -> Vec<(String, Vec<u8>)> {
    let now = triage::time::now_ms() / 1000;
    messages(prefix, n)
        .into_iter()
        .enumerate()
        .map(|(i, (k, p))| {
            let mut v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            if recent {
                v["timestamp"] = serde_json::json!(now - (i as u64 % 72) * 3600);
            }
            (k, v.to_string().into_bytes())
        })
        .collect()
}

#[test]
fn two_workers_through_a_replicated_sharded_cluster_with_a_replica_killed_mid_stream() {
    let root = tempfile::tempdir().unwrap();
    let zk = ZooKeeper::start(root.path());
    let mut nodes = cluster(root.path(), zk.port);

    let env = Env::new("cluster", nodes[0].url());
    let clickhouse = triage::config::ClickHouseConfig {
        url: nodes[0].url(),
        database: "triage".into(),
        cluster: Some(CLUSTER.into()),
        ..Default::default()
    };
    // The tables as a first release made them (without the columns added since), so apply must
    // UPGRADE them on every node and on the Distributed table (18.16: no ADD COLUMN IF NOT EXISTS).
    use triage::sink::clickhouse::schema;
    let admin = nodes[0].client();
    for ddl in [
        schema::create_database(&clickhouse),
        common::first_release_table(&schema::create_table(&clickhouse)),
        schema::create_distributed(&clickhouse).unwrap(),
    ] {
        runtime().block_on(admin.query(&ddl).execute()).unwrap_or_else(|e| panic!("{ddl}\n{e}"));
    }
    let service = triage::sink::clickhouse::ClickHouseService::new(&clickhouse);
    assert!(runtime().block_on(service.check_schema()).is_err(), "the old tables lack columns");
    // As the schema Job runs it (`--wait-seconds`): 18.16 answers a distributed DDL task slower
    // than distributed_ddl_task_timeout with code 159 while the task goes on in the background;
    // apply is idempotent, so it waits and applies again.
    runtime().block_on(service.apply_schema_waiting(Duration::from_secs(420))).expect("schema apply ON CLUSTER");
    runtime().block_on(service.apply_schema()).expect("schema apply is idempotent on a cluster");
    for node in &nodes {
        for table in ["results_local", "results"] {
            for column in schema::ADDED_COLUMNS {
                let sql =
                    format!("SELECT count() FROM system.columns WHERE database = 'triage' AND table = '{table}' AND name = '{column}'");
                assert_eq!(node.count(&sql), 1, "{table}.{column} on {}", node.url());
            }
        }
    }
    assert!(runtime().block_on(service.check_schema()).is_ok());

    env.kafka.create_topic("tickets", 4).unwrap();
    let configs: Vec<PathBuf> = [0usize, 2]
        .iter()
        .map(|&n| {
            env.write_config(&format!("c{n}"), &common::test_model_dir("multihead-tiny"), &["tickets"], |c| {
                c.clickhouse.url = nodes[n].url();
                c.clickhouse.database = "triage".into();
                c.clickhouse.cluster = Some(CLUSTER.into());
                c.clickhouse.insert_timeout_ms = 5000;
            })
        })
        .collect();
    let vars = [("TRIAGE_ESCALATION__ENABLED", "false")];
    let mut a = env.spawn_worker_env(&configs[0], "a", &vars);
    let mut b = env.spawn_worker_env(&configs[1], "b", &vars);
    env.produce("tickets", &timestamped("old", 2_000, false));
    env.produce("tickets", &timestamped("new", 500, true));
    // Mid-stream (rows stored, more to come): the replica worker a writes through dies.
    let stored = |node: &Node| node.count("SELECT count() FROM triage.results");
    env.wait_for(&mut a, "the first rows stored", 3 * MIN, || stored(&nodes[3]) > 0);
    let a_log = a.mark();
    nodes[0].server.as_ref().expect("node 1 running").signal(triage::local::SIGKILL).expect("SIGKILL to node 1");
    drop(nodes[0].server.take());
    let at_kill = stored(&nodes[3]);
    assert!(at_kill > 0 && at_kill < 4_000, "killed mid-stream: {at_kill} of 4000 rows stored");
    env.produce("tickets", &timestamped("more", 1_500, false));
    // Worker a felt it (its INSERTs fail and are retried) before the replica comes back.
    env.wait_for(&mut a, "worker a's INSERT through the killed replica fails", 3 * MIN, || {
        a_log.text().contains("ClickHouse insert failed; retrying")
    });
    nodes[0].start();
    env.wait_caught_up(&mut a, &["tickets"], 5 * MIN);
    assert_eq!(b.terminate(MIN), Some(Exit::OK), "{}", b.log_text());
    assert_eq!(a.terminate(MIN), Some(Exit::OK), "{}", a.log_text());

    for node in &nodes {
        runtime().block_on(node.client().query("SYSTEM SYNC REPLICA triage.results_local").execute()).expect("sync replica");
    }
    // Read once through the Distributed table, nothing missing.
    assert_eq!(nodes[0].count("SELECT count() FROM triage.results FINAL"), 4_000);
    assert_eq!(nodes[3].count("SELECT uniqExact(message_id) FROM triage.results"), 4_000);
    // Each shard's replicas hold the same rows (by key and version, not only as many); the
    // shards together hold everything once. A replica back from a SIGKILL catches up on its own
    // (18.16's SYNC REPLICA can return before it has read the log it missed): wait for that.
    let digest = |node: &Node| {
        node.text(
            "SELECT concat(toString(count()), ' rows, hash ', toString(sum(cityHash64(topic, partition, offset, row_version)))) FROM triage.results_local FINAL",
        )
    };
    let per_shard: Vec<u64> = [(0, 1), (2, 3)]
        .iter()
        .map(|&(x, y)| {
            let started = Instant::now();
            while digest(&nodes[x]) != digest(&nodes[y]) {
                assert!(started.elapsed() < 3 * MIN, "replicas {x} and {y} differ: {} vs {}", digest(&nodes[x]), digest(&nodes[y]));
                runtime().block_on(nodes[x].client().query("SYSTEM SYNC REPLICA triage.results_local").execute()).expect("sync");
                runtime().block_on(nodes[y].client().query("SYSTEM SYNC REPLICA triage.results_local").execute()).expect("sync");
                std::thread::sleep(Duration::from_millis(500));
            }
            nodes[x].count("SELECT count() FROM triage.results_local FINAL")
        })
        .collect();
    assert_eq!(per_shard.iter().sum::<u64>(), 4_000, "{per_shard:?}");
    assert!(per_shard.iter().all(|&n| n > 0), "both shards hold rows: {per_shard:?}");

    // A few messages answered again by an LLM (`triage escalate`), for the agreement query.
    let client = nodes[2].client().with_database("triage").with_validation(false);
    // 18.16 has answered this read over a replica just back from SIGKILL with a memory-limit
    // error (code 241) in some runs, and answered it later: retried like the sink retries 241.
    let started = Instant::now();
    let answered: Vec<triage::sink::clickhouse::ResultRow> = loop {
        match runtime().block_on(client.query("SELECT * FROM triage.results FINAL ORDER BY offset LIMIT 5").fetch_all()) {
            Ok(rows) => break rows,
            Err(e) if e.to_string().contains("Code: 241") && started.elapsed() < 2 * MIN => {
                eprintln!("reading rows back: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!("read rows back: {e}"),
        }
    };
    let answered: Vec<_> = answered
        .into_iter()
        .map(|mut row| {
            row.slm_category = row.category.clone();
            row.answered_by = "llm:big".into();
            row.stamp(triage::time::now_ms());
            row
        })
        .collect();
    assert!(runtime().block_on(service.insert(&answered)).expect("insert LLM answers").is_empty());
    // A shadow model's answers for the same messages, through the shadow table's Distributed
    // table (query 07 joins them).
    let shadow_rows: Vec<_> = answered
        .iter()
        .map(|row| {
            let mut row = row.clone();
            row.model_name = "candidate".into();
            row.answered_by = "model:candidate".into();
            row
        })
        .collect();
    let shadow_service = triage::sink::clickhouse::ClickHouseService::new(&clickhouse.shadow());
    assert!(runtime().block_on(shadow_service.insert(&shadow_rows)).expect("insert shadow answers").is_empty());
    for node in &nodes {
        runtime().block_on(node.client().query("SYSTEM SYNC REPLICA triage.results_shadow_local").execute()).expect("sync shadow replica");
        runtime().block_on(node.client().query("SYSTEM SYNC REPLICA triage.results_local").execute()).expect("sync replica");
    }
    assert_eq!(nodes[0].count("SELECT count() FROM triage.results FINAL WHERE answered_by = 'llm:big'"), 5);
    assert_eq!(nodes[0].count("SELECT count() FROM triage.results FINAL"), 4_000, "answers are versions, not rows");

    // The analyst queries run on the cluster, each reading once.
    let mut queries: Vec<_> =
        std::fs::read_dir(common::root().join("deploy/clickhouse/queries")).unwrap().map(|e| e.unwrap().path()).collect();
    queries.sort();
    for path in queries {
        let sql = std::fs::read_to_string(&path).unwrap();
        let body: String = sql.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        let body = body.trim().trim_end_matches(';');
        assert!(nodes[2].count(&format!("SELECT count() FROM ({body})")) > 0, "{} returned nothing on the cluster", path.display());
    }
    // The views were created everywhere too.
    assert_eq!(nodes[1].count("SELECT toUInt64(sum(messages)) FROM triage.results_hourly"), 4_000);
}
