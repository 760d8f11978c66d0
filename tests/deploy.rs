//! deploy/ checked offline: the files agree with the code (metric names, probe paths and port,
//! drain deadline vs grace period, DDL), and the ClickHouse SQL runs against a real server.

mod common;

use std::collections::BTreeSet;

use serde_yaml::Value;
use triage::sink::clickhouse::row::COLUMNS;
use triage::telemetry::METRICS;

fn read(path: &str) -> String {
    std::fs::read_to_string(common::root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}"))).collect()
}

use serde::Deserialize;

/// Every `triage_*` identifier in a text, with histogram suffixes folded to the metric name.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("triage_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let folded = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        out.insert(folded.to_string());
        i = end;
    }
    out
}

fn known_metrics() -> BTreeSet<String> {
    METRICS.iter().map(|m| m.0.to_string()).collect()
}

#[test]
fn dashboard_and_alerts_use_only_metrics_the_code_exports() {
    let known = known_metrics();
    for path in ["deploy/grafana/triage-dashboard.json", "deploy/k8s/prometheusrule.yaml", "deploy/prometheus/alerts.yml"] {
        let used = metric_names_in(&read(path));
        assert!(!used.is_empty(), "{path} uses no triage metric");
        let unknown: Vec<_> = used.difference(&known).collect();
        assert!(unknown.is_empty(), "{path} uses metrics the code does not export: {unknown:?}");
    }
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/triage-dashboard.json")).unwrap();
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 10));
    // The core signals are on the dashboard.
    let used = metric_names_in(&read("deploy/grafana/triage-dashboard.json"));
    for m in ["triage_consumer_lag", "triage_end_to_end_seconds", "triage_messages_dead_lettered_total", "triage_batch_padding_ratio"] {
        assert!(used.contains(m), "dashboard lacks {m}");
    }
}

#[test]
fn plain_alert_rules_equal_the_prometheus_rule_resource() {
    let docs = yaml_documents("deploy/k8s/prometheusrule.yaml");
    let plain = yaml_documents("deploy/prometheus/alerts.yml");
    assert_eq!(docs[0]["spec"]["groups"], plain[0]["groups"]);
    let names: Vec<&str> = plain[0]["groups"][0]["rules"].as_sequence().unwrap().iter().filter_map(|r| r["alert"].as_str()).collect();
    for a in ["TriageConsumerLagGrowing", "TriageDeadLetterRate", "TriageClickHouseInsertRetries", "TriageNotReady"] {
        assert!(names.contains(&a), "missing alert {a}");
    }
}

#[test]
fn probes_ports_and_grace_period_match_the_binary() {
    let deployment = &yaml_documents("deploy/k8s/deployment.yaml")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(9464));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    // The config the pod runs, from the ConfigMap, parses and validates, with the same port.
    let configmap = &yaml_documents("deploy/k8s/configmap.yaml")[0];
    let toml_text = configmap["data"]["triage.toml"].as_str().unwrap();
    let env = [("TRIAGE_KAFKA__SASL_PASSWORD".to_string(), "x".to_string()), ("TRIAGE_CLICKHOUSE__PASSWORD".to_string(), "y".to_string())];
    let text_without_files = toml_text.lines().filter(|l| !l.contains("password_file")).collect::<Vec<_>>().join("\n");
    let config = triage::config::Config::from_toml(&text_without_files, "configmap", env, std::path::Path::new("/"))
        .expect("ConfigMap config is valid");
    assert!(config.metrics.address.ends_with(":9464"));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        config.shutdown.drain_timeout_ms / 1000 + 5 <= grace,
        "drain ({} ms) must end before the grace period ({grace} s)",
        config.shutdown.drain_timeout_ms
    );
    // The Deployment mounts what the config reads.
    assert!(toml_text.contains("/var/run/secrets/triage/kafka-password"));
    assert_eq!(pod["volumes"][1]["secret"]["secretName"].as_str(), Some("triage-secrets"));
    // Service and ServiceMonitor scrape the same named port.
    assert_eq!(yaml_documents("deploy/k8s/service.yaml")[0]["spec"]["ports"][0]["targetPort"].as_str(), Some("metrics"));
    assert_eq!(yaml_documents("deploy/k8s/servicemonitor.yaml")[0]["spec"]["endpoints"][0]["path"].as_str(), Some("/metrics"));
    // KEDA scales the Deployment by name, within 1 .. partitions.
    let scaled = &yaml_documents("deploy/k8s/scaledobject.yaml")[0];
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    assert!(scaled["spec"]["triggers"].as_sequence().unwrap().iter().all(|t| t["type"].as_str() == Some("kafka")));
}

#[test]
fn every_manifest_has_kind_and_metadata_and_kustomization_lists_them() {
    let kustomization = &yaml_documents("deploy/k8s/kustomization.yaml")[0];
    let listed: BTreeSet<String> =
        kustomization["resources"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    for entry in std::fs::read_dir(common::root().join("deploy/k8s")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name == "kustomization.yaml" {
            continue;
        }
        assert!(listed.contains(&name), "{name} is not in kustomization.yaml");
        for doc in yaml_documents(&format!("deploy/k8s/{name}")) {
            assert!(doc["apiVersion"].is_string() && doc["kind"].is_string() && doc["metadata"]["name"].is_string(), "{name}: {doc:?}");
        }
    }
}

#[test]
fn compose_file_wires_the_stack() {
    let compose = &yaml_documents("deploy/docker-compose.yml")[0];
    let services = compose["services"].as_mapping().unwrap();
    for s in ["kafka", "clickhouse", "schema", "triage"] {
        assert!(services.contains_key(s), "compose lacks {s}");
    }
    let triage = &compose["services"]["triage"];
    assert_eq!(triage["environment"]["TRIAGE_KAFKA__BOOTSTRAP_SERVERS"].as_str(), Some("kafka:9092"));
    assert!(triage["ports"][0].as_str().unwrap().ends_with(":9464"));
    assert_eq!(
        compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"].as_str(),
        Some("broker,controller"),
        "KRaft, no ZooKeeper"
    );
}

#[test]
fn dockerfiles_run_as_non_root_and_ship_the_library_and_model() {
    for path in ["deploy/Dockerfile", "deploy/Dockerfile.gpu"] {
        let text = read(path);
        assert!(text.matches("FROM ").count() >= 2, "{path}: multi-stage");
        assert!(text.contains("USER 10001"), "{path}: non-root");
        assert!(text.contains("models/customer-service") && text.contains("runtime/onnxruntime"), "{path}");
        assert!(text.contains("EXPOSE 9464"));
    }
}

#[test]
fn the_shipped_ddl_is_what_the_binary_prints_and_the_cluster_ddl_has_the_same_columns() {
    let printed = triage::sink::clickhouse::schema::script(&triage::config::ClickHouseConfig::default());
    assert_eq!(read("deploy/clickhouse/schema.sql"), printed, "regenerate with: triage schema print > deploy/clickhouse/schema.sql");
    let cluster = read("deploy/clickhouse/cluster.sql");
    for (name, ty, _) in COLUMNS {
        assert!(cluster.contains(&format!("`{name}` {ty}")), "cluster.sql lacks {name} {ty}");
    }
    assert!(cluster.contains("ReplicatedReplacingMergeTree") && cluster.contains("cityHash64(topic, partition, offset)"));
    assert!(cluster.contains("insert_distributed_sync"));
}

#[test]
fn schema_views_and_analytics_queries_run_on_clickhouse() {
    use triage::sink::clickhouse::{ClickHouseService, ResultRow};
    let ch = common::worker::shared_clickhouse();
    let config = triage::config::ClickHouseConfig { url: ch.url(), ..Default::default() };
    let rt = common::worker::runtime();
    let service = ClickHouseService::new(&config);
    rt.block_on(service.apply_schema()).unwrap();
    let now_ms = triage::time::now_ms();
    let row = |offset: u64, kind: &str, category: &str, escalated: u8, version: &str| ResultRow {
        topic: "tickets".into(),
        partition: 0,
        offset,
        message_id: format!("m{offset}"),
        kind: kind.into(),
        event_time: (now_ms / 1000 - offset) as u32,
        event_time_ms: now_ms - offset * 1000,
        consumed_time_ms: now_ms - 50,
        processed_time_ms: now_ms,
        model_name: "customer-service".into(),
        model_version: version.into(),
        category: category.into(),
        confidence: 0.3 + (offset % 7) as f32 / 10.0,
        priority: if offset % 3 == 0 { "urgent".into() } else { "low".into() },
        tags: vec![],
        tag_scores: vec![],
        head_names: vec!["intent".into()],
        head_labels: vec![category.into()],
        head_scores: vec![0.9],
        escalated,
        text_chars: 40,
        tokens: 12,
        truncated: 0,
        metadata_keys: vec![],
        metadata_values: vec![],
        worker_id: "w".into(),
        ood_score: Some(0.25),
        redriven: 0,
    };
    let mut rows: Vec<ResultRow> = (0..60)
        .map(|o| {
            row(
                o,
                ["ticket", "return", "email"][o as usize % 3],
                ["card_arrival", "refund", "pin"][o as usize % 3],
                (o % 4 == 0) as u8,
                "1.0.0",
            )
        })
        .collect();
    // A replay of ten messages: FINAL must read them once.
    rows.extend((0..10).map(|o| {
        row(
            o,
            ["ticket", "return", "email"][o as usize % 3],
            ["card_arrival", "refund", "pin"][o as usize % 3],
            (o % 4 == 0) as u8,
            "1.0.0",
        )
    }));
    assert!(rt.block_on(service.insert(&rows)).unwrap().is_empty());
    let client = clickhouse::Client::default().with_url(ch.url()).with_validation(false);
    let count = |sql: &str| {
        rt.block_on(client.query(&format!("SELECT toUInt64(count()) FROM ({sql})")).fetch_one::<u64>())
            .unwrap_or_else(|e| panic!("{sql}\n{e}"))
    };
    assert_eq!(count("SELECT * FROM triage.results FINAL"), 60);
    assert_eq!(
        rt.block_on(client.query("SELECT toUInt64(sum(messages)) FROM triage.results_hourly").fetch_one::<u64>()).unwrap(),
        60,
        "views read once"
    );
    let mut dir: Vec<_> = std::fs::read_dir(common::root().join("deploy/clickhouse/queries")).unwrap().map(|e| e.unwrap().path()).collect();
    dir.sort();
    assert_eq!(dir.len(), 5);
    for path in dir {
        let sql = std::fs::read_to_string(&path).unwrap();
        let body: String = sql.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        assert!(body.contains("FINAL"), "{} must read each message once", path.display());
        assert!(count(&body) > 0, "{} returned no rows", path.display());
    }
    // Top categories: three categories of at most 20 messages each (replays not counted).
    let top = rt
        .block_on(client.query(&read("deploy/clickhouse/queries/02_top_categories_this_week.sql")).fetch_all::<(String, u64, f64)>())
        .unwrap();
    assert!(!top.is_empty() && top.len() <= 3 && top.iter().all(|(_, n, _)| *n <= 20), "{top:?}");
}

/// Run a validator installed by scripts/setup; its absence is a setup failure, not a skip.
fn run_tool(program: &std::path::Path, args: &[&str]) -> String {
    assert!(program.exists() || program.components().count() == 1, "{} is missing: run scripts/setup", program.display());
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(common::root())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup)", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} {args:?} failed:\n{text}", program.display());
    text
}

fn venv_bin(name: &str) -> std::path::PathBuf {
    common::root().join(".venv/bin").join(name)
}

#[test]
fn core_manifests_validate_against_kubernetes_schemas() {
    let files = ["namespace.yaml", "configmap.yaml", "deployment.yaml", "pdb.yaml", "service.yaml"].map(|f| format!("deploy/k8s/{f}"));
    let mut args = vec!["--strict", "--kubernetes-version", "1.31.0"];
    args.extend(files.iter().map(String::as_str));
    let out = run_tool(&venv_bin("kubernetes-validate"), &args);
    assert_eq!(out.matches(" passed for resource ").count(), 5, "{out}");
}

#[test]
fn custom_resources_validate_against_their_schemas() {
    let out = run_tool(
        std::path::Path::new("node"),
        &[
            "tests/deploy/validate_crds.mjs",
            "deploy/k8s/scaledobject.yaml",
            "deploy/k8s/servicemonitor.yaml",
            "deploy/k8s/prometheusrule.yaml",
        ],
    );
    for kind in ["ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"] {
        assert!(out.contains(&format!("/{kind} ")) && out.contains("valid"), "{kind} not validated:\n{out}");
    }
    // The validator does reject a broken resource.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata:\n  name: x\nspec:\n  minReplicaCount: one\n")
        .unwrap();
    let status = std::process::Command::new("node")
        .arg("tests/deploy/validate_crds.mjs")
        .arg(&bad)
        .current_dir(common::root())
        .output()
        .unwrap()
        .status;
    assert!(!status.success());
}

#[test]
fn dockerfiles_pass_hadolint() {
    run_tool(&venv_bin("hadolint"), &["--config", "deploy/.hadolint.yaml", "deploy/Dockerfile", "deploy/Dockerfile.gpu"]);
}

#[test]
fn the_sql_also_runs_on_a_modern_clickhouse_engine() {
    let out = run_tool(&venv_bin("python"), &["tests/deploy/check_sql_chdb.py"]);
    assert!(out.contains("schema, TTL, views and 5 queries ok"), "{out}");
}

#[test]
fn schema_apply_adds_new_columns_to_a_table_from_an_earlier_release() {
    use triage::sink::clickhouse::schema;
    let ch = common::worker::shared_clickhouse();
    let config = triage::config::ClickHouseConfig { url: ch.url(), database: "triage_upgrade".into(), ..Default::default() };
    let rt = common::worker::runtime();
    let client = clickhouse::Client::default().with_url(ch.url());
    // The table as the first release created it: every column but the added ones.
    let old_ddl = schema::create_table(&config)
        .lines()
        .filter(|l| !schema::ADDED_COLUMNS.iter().any(|c| l.contains(&format!("`{c}`"))))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("`worker_id` String,", "`worker_id` String");
    rt.block_on(client.query("DROP DATABASE IF EXISTS triage_upgrade").execute()).unwrap();
    rt.block_on(client.query(&schema::create_database(&config)).execute()).unwrap();
    rt.block_on(client.query(&old_ddl).execute()).unwrap_or_else(|e| panic!("{old_ddl}\n{e}"));
    let service = triage::sink::clickhouse::ClickHouseService::new(&config);
    assert!(rt.block_on(service.check_schema()).is_err(), "the old table lacks ood_score: the worker must refuse it");
    rt.block_on(service.apply_schema()).unwrap();
    rt.block_on(service.apply_schema()).unwrap();
    assert!(rt.block_on(service.check_schema()).is_ok(), "after apply the table has every column");
}
