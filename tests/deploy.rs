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
    for path in ["deploy/grafana/triage-dashboard.json", "deploy/k8s/base/prometheusrule.yaml", "deploy/prometheus/alerts.yml"] {
        let used = metric_names_in(&read(path));
        assert!(!used.is_empty(), "{path} uses no triage metric");
        let unknown: Vec<_> = used.difference(&known).collect();
        assert!(unknown.is_empty(), "{path} uses metrics the code does not export: {unknown:?}");
    }
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/triage-dashboard.json")).unwrap();
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 10));
    // The core signals are on the dashboard.
    let used = metric_names_in(&read("deploy/grafana/triage-dashboard.json"));
    for m in [
        "triage_consumer_lag",
        "triage_end_to_end_seconds",
        "triage_messages_dead_lettered_total",
        "triage_batch_padding_ratio",
        "triage_llm_spend_micros_total",
        "triage_llm_requests_total",
    ] {
        assert!(used.contains(m), "dashboard lacks {m}");
    }
}

#[test]
fn plain_alert_rules_equal_the_prometheus_rule_resource() {
    let docs = yaml_documents("deploy/k8s/base/prometheusrule.yaml");
    let plain = yaml_documents("deploy/prometheus/alerts.yml");
    assert_eq!(docs[0]["spec"]["groups"], plain[0]["groups"]);
    let names: Vec<&str> = plain[0]["groups"][0]["rules"].as_sequence().unwrap().iter().filter_map(|r| r["alert"].as_str()).collect();
    for a in ["TriageConsumerLagGrowing", "TriageDeadLetterRate", "TriageClickHouseInsertRetries", "TriageNotReady"] {
        assert!(names.contains(&a), "missing alert {a}");
    }
}

fn base_toml() -> String {
    read("deploy/k8s/base/triage.toml")
}

/// A pod spec's container by name (containers, then init containers).
fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|k| pod[*k].as_sequence())
        .flatten()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_of<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"].as_sequence().unwrap().iter().find(|e| e["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("no env {name}"))
}

#[test]
fn probes_ports_and_grace_period_match_the_binary() {
    let deployment = &yaml_documents("deploy/k8s/base/deployment.yaml")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let worker = container(pod, "triage");
    assert_eq!(worker["ports"][0]["containerPort"].as_u64(), Some(9464));
    assert_eq!(worker["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(worker["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    // The config the pod runs (generated into the ConfigMap) parses and validates, same port.
    let toml_text = base_toml();
    let env = [("TRIAGE_KAFKA__SASL_PASSWORD".to_string(), "x".to_string()), ("TRIAGE_CLICKHOUSE__PASSWORD".to_string(), "y".to_string())];
    let text_without_files = toml_text.lines().filter(|l| !l.contains("password_file")).collect::<Vec<_>>().join("\n");
    let config = triage::config::Config::from_toml(&text_without_files, "triage.toml", env, std::path::Path::new("/"))
        .expect("the deployed config is valid");
    assert!(config.metrics.address.ends_with(":9464"));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        config.shutdown.drain_timeout_ms / 1000 + 5 <= grace,
        "drain ({} ms) must end before the grace period ({grace} s)",
        config.shutdown.drain_timeout_ms
    );
    // The Deployment mounts what the config reads.
    assert!(toml_text.contains("/var/run/secrets/triage/kafka-password"));
    let volumes = pod["volumes"].as_sequence().unwrap();
    assert!(volumes.iter().any(|v| v["secret"]["secretName"].as_str() == Some("triage-secrets")));
    // Service and ServiceMonitor scrape the same named port.
    assert_eq!(yaml_documents("deploy/k8s/base/service.yaml")[0]["spec"]["ports"][0]["targetPort"].as_str(), Some("metrics"));
    assert_eq!(yaml_documents("deploy/k8s/base/servicemonitor.yaml")[0]["spec"]["endpoints"][0]["path"].as_str(), Some("/metrics"));
}

#[test]
fn the_deployment_sizes_sessions_from_its_cpu_request_and_lets_the_autoscaler_own_replicas() {
    let deployment = &yaml_documents("deploy/k8s/base/deployment.yaml")[0];
    assert!(deployment["spec"].get("replicas").is_none(), "a replicas field resets KEDA's/the HPA's count on every apply");
    let pod = &deployment["spec"]["template"]["spec"];
    let worker = container(pod, "triage");
    // Sessions = requested cores, single-threaded: never one per NODE core.
    let sessions = env_of(worker, "TRIAGE_BATCHING__INFERENCE_THREADS");
    assert_eq!(sessions["valueFrom"]["resourceFieldRef"]["resource"].as_str(), Some("requests.cpu"), "{sessions:?}");
    assert_eq!(env_of(worker, "TRIAGE_INFERENCE__INTRA_THREADS")["value"].as_str(), Some("1"));
    assert!(worker["resources"]["requests"]["cpu"].is_string() && worker["resources"]["limits"]["memory"].is_string());
    // Hardening: no API token, a writable /tmp under a read-only root, spread over zones.
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(worker["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    let tmp_mount =
        worker["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["mountPath"].as_str() == Some("/tmp")).expect("/tmp mounted");
    let tmp = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == tmp_mount["name"]).unwrap();
    assert!(tmp["emptyDir"].is_mapping(), "{tmp:?}");
    let spread = pod["topologySpreadConstraints"].as_sequence().unwrap();
    assert!(spread.iter().any(|c| c["topologyKey"].as_str() == Some("topology.kubernetes.io/zone")));
    // A fresh cluster never crash-loops: the init container waits for the schema and topics.
    let init = container(pod, "wait-for-schema-and-topics");
    let script = init["args"][0].as_str().unwrap();
    assert!(script.contains("schema wait") && script.contains("topics wait"), "{script}");
    // The Jobs create them, idempotently, with the same config.
    for (job, words) in [("schema", ["schema", "apply"]), ("topics", ["topics", "apply"])] {
        let doc = &yaml_documents(&format!("deploy/k8s/base/{job}-job.yaml"))[0];
        assert_eq!(doc["kind"].as_str(), Some("Job"));
        let args: Vec<&str> =
            doc["spec"]["template"]["spec"]["containers"][0]["args"].as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(&args[..2], &words, "{job}");
        assert!(args.contains(&"/etc/triage/triage.toml"));
    }
    // Node drains are never blocked by pods that are unready because ClickHouse is down.
    let pdb = &yaml_documents("deploy/k8s/base/pdb.yaml")[0];
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"].as_str(), Some("AlwaysAllow"));
}

#[test]
fn keda_scales_on_every_consumed_topic_with_its_own_sasl_spelling() {
    let deployment = &yaml_documents("deploy/k8s/base/deployment.yaml")[0];
    let docs = yaml_documents("deploy/k8s/keda/scaledobject.yaml");
    let scaled = docs.iter().find(|d| d["kind"].as_str() == Some("ScaledObject")).unwrap();
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let triggers = scaled["spec"]["triggers"].as_sequence().unwrap();
    let topics: BTreeSet<&str> = triggers.iter().filter_map(|t| t["metadata"]["topic"].as_str()).collect();
    let config: toml::Value = toml::from_str(&base_toml()).unwrap();
    let routed: BTreeSet<&str> = config["routes"].as_array().unwrap().iter().filter_map(|r| r["topic"].as_str()).collect();
    assert_eq!(topics, routed, "one lag trigger per consumed topic");
    let group = config["kafka"]["group_id"].as_str().unwrap();
    for t in triggers {
        assert_eq!(t["metadata"]["consumerGroup"].as_str(), Some(group));
        let sasl = t["metadata"]["sasl"].as_str().unwrap_or("none");
        assert!(
            ["none", "plaintext", "scram_sha256", "scram_sha512", "oauthbearer", "gssapi"].contains(&sasl),
            "KEDA spells it scram_sha512: {sasl}"
        );
    }
    // cooldownPeriod only matters when scaling to zero; the floor here is one worker.
    assert!(scaled["spec"].get("cooldownPeriod").is_none() || scaled["spec"]["minReplicaCount"].as_u64() == Some(0));
    // kube-prometheus-stack selects monitors and rules by release label.
    for path in ["deploy/k8s/base/servicemonitor.yaml", "deploy/k8s/base/prometheusrule.yaml"] {
        assert!(yaml_documents(path)[0]["metadata"]["labels"]["release"].is_string(), "{path}");
    }
}

#[test]
fn every_manifest_has_kind_and_metadata_and_the_base_lists_them() {
    let kustomization = &yaml_documents("deploy/k8s/base/kustomization.yaml")[0];
    let listed: BTreeSet<String> =
        kustomization["resources"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    for entry in std::fs::read_dir(common::root().join("deploy/k8s/base")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name == "kustomization.yaml" || !name.ends_with(".yaml") {
            continue;
        }
        assert!(listed.contains(&name), "{name} is not in the base kustomization.yaml");
        for doc in yaml_documents(&format!("deploy/k8s/base/{name}")) {
            assert!(doc["apiVersion"].is_string() && doc["kind"].is_string() && doc["metadata"]["name"].is_string(), "{name}: {doc:?}");
        }
    }
    // Edits to the config roll the pods: it is generated (hash-suffixed), not a plain ConfigMap.
    assert_eq!(kustomization["configMapGenerator"][0]["name"].as_str(), Some("triage-config"));
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
        // The build stage installs what building needs, not the test tools.
        assert!(text.contains("scripts/setup --runtime"), "{path}");
    }
    let setup = read("scripts/setup");
    // Test tools are installed only under --tests, and --runtime does not turn that on.
    let tests_gate = setup.find("if [ \"$TESTS\" = 1 ]; then").expect("setup --tests gate");
    let before_gate = &setup[..tests_gate];
    assert!(!before_gate.lines().any(|l| l.trim() == "install_test_tools"), "test tools installed outside the --tests gate");
    assert!(setup[tests_gate..].contains("install_test_tools"), "the --tests gate installs the test tools");
    let runtime_case = setup.lines().find(|l| l.trim_start().starts_with("--runtime)")).expect("--runtime case");
    assert!(!runtime_case.contains("TESTS=1"), "--runtime must not install test tools: {runtime_case}");
    // The build context leaves host artifacts out (a host venv breaks setup inside the build).
    let ignore = read(".dockerignore");
    for entry in [".venv", "runtime", "target", ".git"] {
        assert!(ignore.lines().any(|l| l.trim() == entry), ".dockerignore lacks {entry}");
    }
    // GPU: the device plugin's libcuda path survives; CUDA 13 wheel layout; pinned wheels.
    let gpu = read("deploy/Dockerfile.gpu");
    assert!(gpu.contains("LD_LIBRARY_PATH=/opt/triage/runtime/onnxruntime:${LD_LIBRARY_PATH}"), "LD_LIBRARY_PATH must extend, not replace");
    for old in ["cublas/lib", "cuda_runtime/lib", "cufft/lib", "curand/lib", "cuda_nvrtc/lib"] {
        assert!(!gpu.contains(old), "{old} is the CUDA 12 wheels' layout; CUDA 13 wheels use nvidia/cu13/lib");
    }
    assert!(gpu.contains("nvidia/cu13/lib") && gpu.contains("-r deploy/gpu-requirements.txt"));
    for line in read("deploy/gpu-requirements.txt").lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        assert!(line.contains("=="), "unpinned GPU wheel: {line}");
    }
}

#[test]
fn retention_goes_on_the_table_that_stores_rows() {
    let single = read("deploy/clickhouse/ttl.sql");
    assert!(single.contains("ALTER TABLE triage.results MODIFY TTL"));
    let cluster = read("deploy/clickhouse/ttl-cluster.sql");
    assert!(cluster.contains("ALTER TABLE triage.results_local ON CLUSTER"), "{cluster}");
    assert!(!cluster.contains("ALTER TABLE triage.results ON"), "a TTL on the Distributed table fails");
    // The shadow table's rows expire too, on the table that stores them.
    assert!(single.contains("ALTER TABLE triage.results_shadow MODIFY TTL"));
    assert!(cluster.contains("ALTER TABLE triage.results_shadow_local ON CLUSTER"), "{cluster}");
    // escalate's side tables (schema.sql makes them; a TTL on them needs 19.6+ like the rest).
    let schema = read("deploy/clickhouse/schema.sql");
    for table in ["results_llm_spend", "results_llm_batches"] {
        assert!(schema.contains(&format!("CREATE TABLE IF NOT EXISTS triage.{table}\n")), "{table} is in schema.sql");
        assert!(single.contains(&format!("ALTER TABLE triage.{table} MODIFY TTL time")), "{table} expires");
        assert!(cluster.contains(&format!("ALTER TABLE triage.{table}_local ON CLUSTER")), "{table}_local expires on a cluster");
    }
}

#[test]
fn alert_rules_fire_on_synthetic_series_and_stay_silent_on_healthy_ones() {
    let promtool = std::path::Path::new("promtool");
    let check = run_tool(promtool, &["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(check.contains("SUCCESS"), "{check}");
    let tests = run_tool(promtool, &["test", "rules", "deploy/prometheus/alerts_test.yml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");
    // Every rule has its test.
    let plain = yaml_documents("deploy/prometheus/alerts.yml");
    let test_text = read("deploy/prometheus/alerts_test.yml");
    for rule in plain[0]["groups"][0]["rules"].as_sequence().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        assert!(test_text.contains(&format!("alertname: {name}")), "{name} has no promtool test");
    }
}

/// Render an overlay with the machine's kubectl (Debian's 1.20 bundles kustomize v2; newer
/// ones v5: the overlays are written for both).
fn render(overlay: &str) -> Vec<Value> {
    let out = run_tool(std::path::Path::new("kubectl"), &["kustomize", &format!("deploy/k8s/overlays/{overlay}")]);
    let yaml: String = out.lines().filter(|l| !l.starts_with("# Warning:")).collect::<Vec<_>>().join("\n");
    serde_yaml::Deserializer::from_str(&yaml).map(|d| Value::deserialize(d).unwrap()).filter(|v| !v.is_null()).collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

#[test]
fn every_overlay_renders_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in ["cpu", "gpu", "no-keda", "custom-model"] {
        let docs = render(overlay);
        // Core resources against Kubernetes' schemas, custom resources against theirs.
        let (custom, core): (Vec<&Value>, Vec<&Value>) = docs
            .iter()
            .partition(|d| ["keda.sh", "monitoring.coreos.com"].iter().any(|g| d["apiVersion"].as_str().unwrap().starts_with(g)));
        let core_file = dir.path().join(format!("{overlay}-core.yaml"));
        let custom_file = dir.path().join(format!("{overlay}-custom.yaml"));
        let dump = |docs: &[&Value]| docs.iter().map(|d| serde_yaml::to_string(d).unwrap()).collect::<Vec<_>>().join("---\n");
        std::fs::write(&core_file, dump(&core)).unwrap();
        std::fs::write(&custom_file, dump(&custom)).unwrap();
        let out = run_tool(&venv_bin("kubernetes-validate"), &["--strict", "--kubernetes-version", "1.31.0", core_file.to_str().unwrap()]);
        assert_eq!(out.matches(" passed for resource ").count(), core.len(), "{overlay}: {out}");
        let out = run_tool(std::path::Path::new("node"), &["tests/deploy/validate_crds.mjs", custom_file.to_str().unwrap()]);
        assert_eq!(out.matches(" valid").count(), custom.len(), "{overlay}: {out}");

        // The pods read the generated, hash-named ConfigMap; no env var is set twice.
        let config_name = of_kind(&docs, "ConfigMap")[0]["metadata"]["name"].as_str().unwrap().to_string();
        assert!(config_name.starts_with("triage-config-"), "{overlay}: {config_name}");
        // Two Deployments (the workers, `triage escalate`), in whatever order this kustomize
        // renders them: the checks below name the one they mean.
        let deployments = of_kind(&docs, "Deployment");
        let names: BTreeSet<&str> = deployments.iter().filter_map(|d| d["metadata"]["name"].as_str()).collect();
        assert_eq!(names, BTreeSet::from(["triage", "triage-escalate"]), "{overlay}");
        let deployment = *deployments.iter().find(|d| d["metadata"]["name"] == "triage").expect("the worker Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        for d in &deployments {
            let pod = &d["spec"]["template"]["spec"];
            assert!(pod["volumes"].as_sequence().unwrap().iter().any(|v| v["configMap"]["name"].as_str() == Some(&config_name)));
            assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false), "{overlay}: {:?}", d["metadata"]["name"]);
        }
        let escalate = deployments.iter().find(|d| d["metadata"]["name"] == "triage-escalate").expect("the escalate Deployment");
        let escalate_pod = &escalate["spec"]["template"]["spec"];
        assert_eq!(container(escalate_pod, "escalate")["args"][0].as_str(), Some("escalate"));
        // It reads the routes' models for their labels: wherever the workers get a model from,
        // so does it.
        let mounts = |pod: &Value, name: &str| -> BTreeSet<String> {
            container(pod, name)["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|m| m["mountPath"].as_str().map(String::from))
                .collect()
        };
        assert!(
            mounts(pod, "triage").iter().filter(|m| m.contains("models")).all(|m| mounts(escalate_pod, "escalate").contains(m)),
            "{overlay}"
        );
        let all_containers = deployments.iter().flat_map(|d| {
            let pod = &d["spec"]["template"]["spec"];
            pod["containers"].as_sequence().into_iter().flatten().chain(pod["initContainers"].as_sequence().into_iter().flatten())
        });
        for c in all_containers {
            let names: Vec<&str> =
                c["env"].as_sequence().map(|e| e.iter().filter_map(|v| v["name"].as_str()).collect()).unwrap_or_default();
            let unique: BTreeSet<&str> = names.iter().copied().collect();
            assert_eq!(unique.len(), names.len(), "{overlay}: {:?} sets an env var twice: {names:?}", c["name"]);
            for e in c["env"].as_sequence().into_iter().flatten() {
                assert!(!(e.get("value").is_some() && e.get("valueFrom").is_some()), "{overlay}: {e:?} has value and valueFrom");
            }
        }
        let worker = container(pod, "triage");
        let scaled = of_kind(&docs, "ScaledObject");
        let hpa = of_kind(&docs, "HorizontalPodAutoscaler");
        match overlay {
            "no-keda" => {
                assert!(scaled.is_empty(), "no KEDA resources");
                assert_eq!(hpa[0]["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
            }
            _ => assert!(scaled.len() == 1 && hpa.is_empty(), "{overlay}: KEDA scales it"),
        }
        if overlay == "gpu" {
            assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"].as_u64(), Some(1));
            assert_eq!(pod["runtimeClassName"].as_str(), Some("nvidia"));
            assert!(pod["tolerations"].as_sequence().unwrap().iter().any(|t| t["key"].as_str() == Some("nvidia.com/gpu")));
            assert_eq!(env_of(worker, "TRIAGE_BATCHING__INFERENCE_THREADS")["value"].as_str(), Some("1"), "one session per GPU");
            assert!(worker["image"].as_str().unwrap().ends_with("-gpu"));
        }
        if overlay == "custom-model" {
            // The routes point into the volume the init container fills, mounted in the worker.
            let config = of_kind(&docs, "ConfigMap")[0]["data"]["triage.toml"].as_str().unwrap();
            let parsed: toml::Value = toml::from_str(config).unwrap();
            let copy = container(pod, "copy-model");
            let mount = copy["volumeMounts"][0]["mountPath"].as_str().unwrap();
            assert!(worker["volumeMounts"].as_sequence().unwrap().iter().any(|m| m["mountPath"].as_str() == Some(mount)));
            for route in parsed["routes"].as_array().unwrap() {
                assert!(route["model"].as_str().unwrap().starts_with(mount), "{route:?} outside {mount}");
            }
        }
    }
}

#[test]
fn the_shipped_ddl_is_what_the_binary_prints_and_the_cluster_ddl_has_the_same_columns() {
    let printed = triage::sink::clickhouse::schema::script(&triage::config::ClickHouseConfig::default());
    assert_eq!(read("deploy/clickhouse/schema.sql"), printed, "regenerate with: triage schema print > deploy/clickhouse/schema.sql");
    let cluster = read("deploy/clickhouse/cluster.sql");
    let printed_cluster = triage::sink::clickhouse::schema::script(&triage::config::ClickHouseConfig {
        cluster: Some("{cluster}".into()),
        ..Default::default()
    });
    assert_eq!(cluster, printed_cluster, "regenerate with: triage schema print --cluster '{{cluster}}' > deploy/clickhouse/cluster.sql");
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
        tier: 0,
        first_model_name: "customer-service".into(),
        first_category: category.into(),
        first_confidence: 0.3 + (offset % 7) as f32 / 10.0,
        answered_by: "model:customer-service".into(),
        ..ResultRow::default()
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
    // Ten messages answered again by an LLM, later replayed by the small model: FINAL keeps
    // the LLM's (higher-ranked) answer, and query 06 compares the two.
    for o in (0..20).step_by(2) {
        let mut small = rows[o as usize].clone();
        let mut llm = small.clone();
        llm.answered_by = "llm:big".into();
        llm.slm_category = small.category.clone();
        llm.category = if o % 4 == 0 { small.category.clone() } else { "card_linking".into() };
        llm.stamp(now_ms);
        small.stamp(now_ms + 60_000);
        rows.push(llm);
        rows.push(small);
    }
    assert!(rt.block_on(service.insert(&rows)).unwrap().is_empty());
    // A shadow model's answers for 30 of the messages (query 07 joins them to the primary's).
    let shadow: Vec<ResultRow> = (0..30)
        .map(|o| {
            let mut r =
                row(o, ["ticket", "return", "email"][o as usize % 3], ["card_arrival", "refund", "refund"][o as usize % 3], 0, "2.0.0-rc1");
            r.model_name = "candidate".into();
            r
        })
        .collect();
    let shadow_service = ClickHouseService::new(&config.shadow());
    assert!(rt.block_on(shadow_service.insert(&shadow)).unwrap().is_empty());
    let client = clickhouse::Client::default().with_url(ch.url()).with_validation(false);
    let count = |sql: &str| {
        rt.block_on(client.query(&format!("SELECT toUInt64(count()) FROM ({sql})")).fetch_one::<u64>())
            .unwrap_or_else(|e| panic!("{sql}\n{e}"))
    };
    assert_eq!(count("SELECT * FROM triage.results FINAL"), 60);
    assert_eq!(count("SELECT * FROM triage.results FINAL WHERE answered_by = 'llm:big'"), 10, "LLM answers outrank later replays");
    assert_eq!(
        rt.block_on(client.query("SELECT toUInt64(sum(messages)) FROM triage.results_hourly").fetch_one::<u64>()).unwrap(),
        60,
        "views read once"
    );
    let mut dir: Vec<_> = std::fs::read_dir(common::root().join("deploy/clickhouse/queries")).unwrap().map(|e| e.unwrap().path()).collect();
    dir.sort();
    assert_eq!(dir.len(), 7);
    for path in dir {
        let sql = std::fs::read_to_string(&path).unwrap();
        let body: String = sql.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        assert!(body.contains("FINAL"), "{} must read each message once", path.display());
        assert!(count(&body) > 0, "{} returned no rows", path.display());
    }
    // Top categories: each message once, with the LLM's answer where it gave one (five
    // messages moved to card_linking), replays not counted.
    let top = rt
        .block_on(client.query(&read("deploy/clickhouse/queries/02_top_categories_this_week.sql")).fetch_all::<(String, u64, f64)>())
        .unwrap();
    assert_eq!(top.iter().map(|(_, n, _)| n).sum::<u64>(), 60, "{top:?}");
    assert!(top.iter().any(|(c, n, _)| c == "card_linking" && *n == 5), "{top:?}");
    // Shadow agreement: the 30 messages both answered, the shadow wrong on every `pin` one, and
    // where the LLM answered, the primary's own answer (not the LLM's) compared.
    let shadow_query = read("deploy/clickhouse/queries/07_shadow_model_agreement.sql");
    let per_label: Vec<(String, u64, f64)> = rt
        .block_on(
            client
                .query(&format!("SELECT primary_label, toUInt64(sum(messages)), toFloat64(min(agreement)) FROM ({shadow_query}) GROUP BY primary_label ORDER BY primary_label"))
                .fetch_all(),
        )
        .unwrap();
    assert_eq!(
        per_label,
        vec![("card_arrival".to_string(), 10, 1.0), ("pin".to_string(), 10, 0.0), ("refund".to_string(), 10, 1.0)],
        "query 07 per primary label"
    );
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
    let files =
        ["namespace.yaml", "deployment.yaml", "pdb.yaml", "service.yaml", "networkpolicy.yaml", "schema-job.yaml", "topics-job.yaml"]
            .map(|f| format!("deploy/k8s/base/{f}"));
    let mut args = vec!["--strict", "--kubernetes-version", "1.31.0"];
    args.extend(files.iter().map(String::as_str));
    let out = run_tool(&venv_bin("kubernetes-validate"), &args);
    assert_eq!(out.matches(" passed for resource ").count(), files.len(), "{out}");
}

#[test]
fn custom_resources_validate_against_their_schemas() {
    let out = run_tool(
        std::path::Path::new("node"),
        &[
            "tests/deploy/validate_crds.mjs",
            "deploy/k8s/keda/scaledobject.yaml",
            "deploy/k8s/base/servicemonitor.yaml",
            "deploy/k8s/base/prometheusrule.yaml",
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
    assert!(out.contains("schema, TTL, views and 7 queries ok"), "{out}");
}

#[test]
fn schema_apply_adds_new_columns_to_a_table_from_an_earlier_release() {
    use triage::sink::clickhouse::schema;
    let ch = common::worker::shared_clickhouse();
    let config = triage::config::ClickHouseConfig { url: ch.url(), database: "triage_upgrade".into(), ..Default::default() };
    let rt = common::worker::runtime();
    let client = clickhouse::Client::default().with_url(ch.url());
    // The table as the first release created it: every column but the added ones.
    let old_ddl = common::first_release_table(&schema::create_table(&config));
    rt.block_on(client.query("DROP DATABASE IF EXISTS triage_upgrade").execute()).unwrap();
    rt.block_on(client.query(&schema::create_database(&config)).execute()).unwrap();
    rt.block_on(client.query(&old_ddl).execute()).unwrap_or_else(|e| panic!("{old_ddl}\n{e}"));
    let service = triage::sink::clickhouse::ClickHouseService::new(&config);
    assert!(rt.block_on(service.check_schema()).is_err(), "the old table lacks ood_score: the worker must refuse it");
    rt.block_on(service.apply_schema()).unwrap();
    rt.block_on(service.apply_schema()).unwrap();
    assert!(rt.block_on(service.check_schema()).is_ok(), "after apply the table has every column");
    assert_eq!(
        rt.block_on(service.version_column()).unwrap().as_deref(),
        Some("processed_time_ms"),
        "apply cannot change a table's version: `triage schema migrate` does (tests/escalate.rs)"
    );
}
