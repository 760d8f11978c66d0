//! The operator commands: config check, schema print, broker, produce (JSON lines and CSV),
//! and redrive (dead letters back to their topic once the cause is fixed).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::worker::{messages, shared_clickhouse, Env, Exit};

fn triage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_triage"))
}

#[test]
fn config_check_validates_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triage.toml");
    let model = common::default_model_dir();
    std::fs::write(
        &path,
        format!("[kafka]\nsecurity_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"svc\"\n\n[[routes]]\ntopic = \"tickets\"\nkind = \"ticket\"\nmodel = \"{}\"\n", model.display()),
    )
    .unwrap();
    let out = triage().args(["config", "check"]).arg(&path).env("TRIAGE_KAFKA__SASL_PASSWORD", "hunter2").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("valid (1 routes)"));
    assert!(stdout.contains("sasl_password = \"***\"") && !stdout.contains("hunter2"), "{stdout}");

    std::fs::write(&path, "[[routes]]\ntopic = \"t\"\nkind = \"k\"\nmodel = \"/nonexistent\"\nunknown_key = 1\n").unwrap();
    let out = triage().args(["config", "check"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `unknown_key`"));

    // A property that would break the delivery guarantee: refused by name, file or environment.
    let route = format!("[[routes]]\ntopic = \"tickets\"\nkind = \"ticket\"\nmodel = \"{}\"\n", model.display());
    std::fs::write(&path, format!("[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n\n{route}")).unwrap();
    let out = triage().args(["config", "check"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`enable.auto.commit = true` would break"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&path, format!("[kafka.properties]\n\"auto.offset.reset\" = \"latest\"\n\n{route}")).unwrap();
    let out = triage().args(["config", "check"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "safe keys keep working: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn schema_print_is_the_ddl_the_server_accepts() {
    let out = triage().args(["schema", "print"]).output().unwrap();
    let sql = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(sql.contains("ReplacingMergeTree") && sql.contains("FINAL"));
    let ch = shared_clickhouse();
    let client = clickhouse::Client::default().with_url(ch.url()).with_validation(false);
    // The printed script, statement by statement, against the real server (twice: idempotent).
    for _ in 0..2 {
        for stmt in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty() && !s.lines().all(|l| l.starts_with("--"))) {
            let stmt: String = stmt.lines().filter(|l| !l.starts_with("--")).collect::<Vec<_>>().join("\n");
            common::worker::runtime().block_on(client.query(&stmt).execute()).unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
    }
}

#[test]
fn broker_prints_its_address_and_serves_clients() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("addr");
    let mut child = triage()
        .args(["broker", "--topic", "a:3", "--address-file"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::worker::wait_until(Duration::from_secs(20), "address file", || file.exists());
    let addr = std::fs::read_to_string(&file).unwrap();
    assert!(addr.contains("127.0.0.1:") || addr.contains("localhost:"), "{addr}");
    let jsonl = dir.path().join("in.jsonl");
    std::fs::write(&jsonl, "{\"id\": \"1\", \"body\": \"hello\"}\n{\"id\": \"2\", \"body\": \"world\"}\n").unwrap();
    let out = triage().args(["produce", "--bootstrap-servers", &addr, "--topic", "a"]).arg(&jsonl).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("produced 2 messages to a"));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn produce_loads_ticket_csvs_and_reports_partial_rows() {
    let env = Env::new("produce_csv", shared_clickhouse().url());
    env.kafka.create_topic("t", 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("tickets.csv");
    // Like the support-ticket exports: quoted multi-line bodies, and a cut-off last row.
    std::fs::write(&csv, "subject,body,queue\n\"Printer\",\"It will not print.\nPlease help.\",IT\nRefund,\"Want my money back\",Billing\nBroken,\"cut off here").unwrap();
    let out = triage().args(["produce", "--bootstrap-servers", &env.kafka.bootstrap_servers(), "--topic", "t"]).arg(&csv).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("produced 2 messages to t (1 skipped)"), "{stderr}");
    let records = env.read_topic("t", 2, Duration::from_secs(20));
    let first: serde_json::Value = serde_json::from_slice(&records[0].1).unwrap();
    assert_eq!(first["body"], "It will not print.\nPlease help.");
    assert_eq!(first["queue"], "IT");
}

#[test]
fn redrive_sends_dead_letters_back_once_the_cause_is_fixed() {
    let env = Env::new("redrive", shared_clickhouse().url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    let mut batch = messages("d", 50);
    batch.push(("big-1".into(), format!("{{\"id\": \"big-1\", \"body\": \"{}\"}}", "long text ".repeat(500)).into_bytes()));
    env.produce("tickets", &batch);
    let model = common::test_model_dir("multihead-tiny");
    // First the limit is too low for the big message: it is dead-lettered.
    let strict = env.write_config("strict", &model, &["tickets"], |c| c.max_message_bytes = 2000);
    let mut w = env.spawn_worker(&strict, "strict");
    env.wait_caught_up(&mut w, &["tickets"], Duration::from_secs(120));
    assert_eq!(w.terminate(Duration::from_secs(60)), Some(Exit::OK));
    assert_eq!(env.distinct_rows(), 50);
    // The cause is fixed (a higher limit); redrive, and the worker takes it this time.
    let relaxed = env.write_config("relaxed", &model, &["tickets"], |_| {});
    let out = triage().args(["redrive", "--config"]).arg(&relaxed).args(["--reason", "too_large"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("redrove 1 dead letters"), "{stderr}");
    let mut w = env.spawn_worker(&relaxed, "relaxed");
    env.wait_caught_up(&mut w, &["tickets"], Duration::from_secs(120));
    assert_eq!(w.terminate(Duration::from_secs(60)), Some(Exit::OK));
    assert_eq!(env.distinct_rows(), 51);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE message_id = 'big-1' AND truncated = 1"), 1);
}

#[test]
fn the_example_config_is_valid() {
    let path = common::root().join("deploy/config/triage.toml");
    let out = triage().args(["config", "check"]).arg(&path).current_dir(common::root()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn json_logs_are_json_and_carry_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret.toml");
    let model = common::test_model_dir("multihead-tiny");
    // ClickHouse on a closed port: the worker keeps logging while it waits for it.
    std::fs::write(
        &path,
        format!(
            "[kafka]\nsecurity_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"svc\"\n\
             [clickhouse]\nurl = \"http://127.0.0.1:1\"\nretry_initial_ms = 100\nretry_max_ms = 200\n[metrics]\naddress = \"\"\n\
             [[routes]]\ntopic = \"t\"\nkind = \"k\"\nmodel = \"{}\"\n",
            model.display()
        ),
    )
    .unwrap();
    let mut child = triage()
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env("TRIAGE_KAFKA__SASL_PASSWORD", "k4fka-s3cret")
        .env("TRIAGE_CLICKHOUSE__PASSWORD", "cl1ckh0use-s3cret")
        .env("RUST_LOG", "debug,ort=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    assert!(log.contains("ClickHouse not reachable yet"), "{log}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(!log.contains("k4fka-s3cret") && !log.contains("cl1ckh0use-s3cret"), "a secret reached the log:\n{log}");
}

#[test]
fn bench_runs_all_stages_and_reports_ratios() {
    let dir = tempfile::tempdir().unwrap();
    // An empty data folder: the bench must fall back to generated texts and say so.
    let out = triage()
        .args(["bench", "--messages", "300", "--workload", "short", "--format", "avro", "--data"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("GENERATED"), "{stdout}");
    assert!(stdout.contains("b/a (worker / ceiling) =") && stdout.contains("b/c (worker / batch size 1) ="), "{stdout}");
    assert!(stdout.contains("d/b (the worker on Avro / on JSON) ="), "{stdout}");
    // b/a taken apart: three factors whose product is b/a (to the printed rounding).
    let number_after = |label: &str| -> f64 {
        let at = stdout.find(label).unwrap_or_else(|| panic!("no `{label}`: {stdout}")) + label.len();
        let digits: String = stdout[at..].trim_start().chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        digits.parse().unwrap_or_else(|_| panic!("no number after `{label}`: {stdout}"))
    };
    let b_over_a = number_after("b/a (worker / ceiling) =");
    let factors = [number_after("taken apart = shapes"), number_after("x contention"), number_after("x occupancy")];
    assert!(factors.iter().all(|&f| f > 0.0), "{factors:?}");
    assert!((number_after("(=") - b_over_a).abs() < 0.011, "the factors' product is b/a: {stdout}");
    assert!((factors.iter().product::<f64>() - b_over_a).abs() < 0.03, "{factors:?} vs {b_over_a}");
    for stage in [
        "a. ceiling, sorted batches",
        "a2. b's batches, model alone",
        "b. worker, default batching",
        "c. worker, batch size 1",
        "d. worker, Avro (pinned)",
    ] {
        let line = stdout.lines().find(|l| l.contains(stage)).unwrap_or_else(|| panic!("no {stage} line: {stdout}"));
        let after = &line[line.find(stage).unwrap() + stage.len()..];
        let msgs_per_s: f64 = after.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        assert!(msgs_per_s > 0.0, "{stage}: no throughput in `{line}`");
    }
}

#[test]
fn bench_sweep_reports_each_setting_with_its_share_of_peak_and_low_load_latency() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = common::root().join("runtime/encoders/minilm-l6");
    let out = triage()
        .args(["bench", "--sweep", "--messages", "60", "--workload", "short", "--peak-gflops", "100", "--data"])
        .arg(dir.path())
        .arg("--variant")
        .arg(&encoder)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("peak: 100 GFLOP/s fp32 = given with --peak-gflops"), "{stdout}");
    for group in ["batch size", "threads", "optimisation", "truncation", "tokenization", "variant"] {
        assert!(stdout.lines().any(|l| l.trim_start().starts_with(group)), "no {group} rows: {stdout}");
    }
    // The default model declares its architecture, so its rows carry GFLOP/s and a share of peak.
    let row = stdout.lines().find(|l| l.contains("1 session x all cores (default)")).unwrap();
    assert!(row.trim_end().ends_with('%'), "{row}");
    let low = stdout.lines().find(|l| l.contains("low load")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(low.contains("within max_wait + own batch"), "{low}");
}

#[test]
fn cost_script_computes_core_hours_and_llm_cost_per_million_messages() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cost.toml");
    std::fs::write(
        &config,
        "[cpu]\nprice_per_core_hour = 1.0\n\n[[workload]]\nname = \"w\"\ncores = 1\nmessages_per_second = 1000.0\nwordpiece_tokens_per_message = 100.0\n\n\
         [llm]\nprompt_tokens = 0\noutput_tokens = 10\n\n[[llm.model]]\nname = \"m\"\ninput_per_million = 1.0\noutput_per_million = 2.0\nknown_from = \"test\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::root().join("scripts/cost")).arg("--config").arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // 10^6 messages / 1000 per s = 1000 s = 0.28 core-hours at $1; LLM: 100 x $1 + 10 x $2 = $120.
    assert!(stdout.contains("0.3 core-hours = $0.28 per million messages"), "{stdout}");
    assert!(stdout.contains("$    120.00 per million messages (432x)"), "{stdout}");
    std::fs::write(&config, "[cpu]\n").unwrap();
    let bad = std::process::Command::new(common::root().join("scripts/cost")).arg("--config").arg(&config).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("price_per_core_hour"));
}

/// A command run in the background, killed when the test fails: a command retrying forever
/// must not outlive it.
struct Reaped(std::process::Child);

impl Reaped {
    /// `command` started with its stderr (the log) written to `log`.
    fn spawn(command: &mut Command, log: &std::path::Path) -> Reaped {
        Reaped(command.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap()).spawn().unwrap())
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exit_within(child: &mut Reaped, limit: Duration) -> std::process::ExitStatus {
    let mut status = None;
    common::worker::wait_until(limit, "the command to exit", || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

#[test]
fn topics_and_schema_commands_create_idempotently_and_wait_for_what_is_missing() {
    let env = Env::new("topics_cmd", shared_clickhouse().url());
    env.kafka.create_topic("tickets", 1).unwrap();
    let model = common::test_model_dir("multihead-tiny");
    let config = env.write_config("t", &model, &["tickets"], |_| {});
    let run = |args: &[&str], vars: &[(&str, &str)]| {
        let out = triage().args(args).arg("--config").arg(&config).envs(vars.iter().copied()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    // Both side topics exist (the test cluster has them): apply changes nothing, wait returns.
    let (code, text) = run(&["topics", "apply"], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("triage.dead-letter: exists") && text.contains("triage.escalations: exists"), "{text}");
    assert_eq!(run(&["topics", "wait", "--timeout-seconds", "5"], &[]).0, Some(0));
    let (_, plan) = run(&["topics", "print"], &[]);
    assert!(plan.contains("triage.dead-letter\tpartitions=3\treplication=3"), "{plan}");
    // A missing one: wait gives up naming it.
    let missing = [("TRIAGE_KAFKA__ESCALATION_TOPIC", "triage.not-yet")];
    let (code, text) = run(&["topics", "wait", "--timeout-seconds", "2"], &missing);
    assert_eq!(code, Some(1));
    assert!(text.contains("`triage.not-yet` does not exist"), "{text}");

    // The schema: wait gives up while the table is missing, apply creates it, wait returns.
    let (code, text) = run(&["schema", "wait", "--timeout-seconds", "2"], &[]);
    assert_eq!(code, Some(1));
    assert!(text.contains("not ready after 2s") && text.contains("schema apply"), "{text}");
    // A worker's init container waits while a schema Job has not run yet: still waiting after
    // its first retry, and done once the table is there.
    let wait_log = env.dir.path().join("wait.log");
    let mut waiting = Reaped::spawn(triage().args(["schema", "wait", "--timeout-seconds", "300", "--config"]).arg(&config), &wait_log);
    let wait_text = || std::fs::read_to_string(&wait_log).unwrap_or_default();
    common::worker::wait_until(Duration::from_secs(60), "wait to retry or exit", || {
        wait_text().contains("waiting for the ClickHouse schema") || matches!(waiting.0.try_wait(), Ok(Some(_)))
    });
    assert!(waiting.0.try_wait().unwrap().is_none(), "wait gave up at once: {}", wait_text());
    assert_eq!(run(&["schema", "apply", "--wait-seconds", "10"], &[]).0, Some(0));
    let status = exit_within(&mut waiting, Duration::from_secs(60));
    assert!(status.success(), "wait returns once the table is there: {}", wait_text());
    let (code, text) = run(&["schema", "wait", "--timeout-seconds", "10"], &[]);
    assert_eq!(code, Some(0), "{text}");
    // On a cluster layout, print shows it (no server needed).
    let out = triage().args(["schema", "print", "--cluster", "prod"]).output().unwrap();
    let ddl = String::from_utf8_lossy(&out.stdout);
    assert!(
        ddl.contains("CREATE TABLE IF NOT EXISTS triage.results_local ON CLUSTER 'prod'") && ddl.contains("ENGINE = Distributed('prod'"),
        "{ddl}"
    );
}

/// A schema Job may start before ClickHouse does: `schema apply --wait-seconds` retries while
/// the server cannot be reached and applies once it answers; against a server that never comes
/// it gives up at its deadline with the reason, instead of waiting forever.
#[test]
fn schema_apply_waits_for_a_server_that_comes_up_and_gives_up_at_its_deadline_on_one_that_never_does() {
    let mut server = common::worker::PrivateClickHouse::start();
    let env = Env::new("schema_late", server.url());
    let config = env.write_config("s", &common::test_model_dir("multihead-tiny"), &["tickets"], |_| {});
    server.stop();
    let log = env.dir.path().join("apply.log");
    let mut apply = Reaped::spawn(triage().args(["schema", "apply", "--wait-seconds", "300", "--config"]).arg(&config), &log);
    common::worker::wait_until(Duration::from_secs(60), "apply to retry or exit", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("ClickHouse not ready for the schema yet")
            || matches!(apply.0.try_wait(), Ok(Some(_)))
    });
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(apply.0.try_wait().unwrap().is_none(), "apply gave up while the server was down: {}", log_text());
    server.restart();
    let status = exit_within(&mut apply, Duration::from_secs(120));
    assert!(status.success(), "{}", log_text());
    let out = triage().args(["schema", "wait", "--timeout-seconds", "10", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "the table is there: {}", String::from_utf8_lossy(&out.stderr));

    // Nothing ever listens here: a two-second wait ends in about two seconds, with the reason.
    let nowhere = format!("http://127.0.0.1:{}", triage::local::free_port().unwrap());
    let never_log = env.dir.path().join("never.log");
    let mut never = Reaped::spawn(
        triage().args(["schema", "apply", "--wait-seconds", "2", "--config"]).arg(&config).env("TRIAGE_CLICKHOUSE__URL", &nowhere),
        &never_log,
    );
    let status = exit_within(&mut never, Duration::from_secs(60));
    let stderr = std::fs::read_to_string(&never_log).unwrap_or_default();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("ClickHouse not ready for the schema yet"), "it retried before giving up: {stderr}");
}
