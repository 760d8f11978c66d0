//! Changing a model while `triage run` works (issue 21). Hot reload: a new version published the way a
//! Kubernetes volume publishes it (a symlink switched atomically) is loaded, checked and swapped
//! in mid-stream with no message lost or doubled and no consumer-group rebalance; a broken
//! candidate (a graph that does not load, labels that do not match the graph, NaN answers) is
//! refused while the old version keeps serving, and said so on /readyz without going unready.
//! Shadow models: a candidate classifies exactly its documented share of the messages into
//! its own table, never touching the route's rows, escalations or commits, even when its table
//! is gone.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::worker::{http_get, messages, metric, shared_clickhouse, Env, Exit};

const MIN: Duration = Duration::from_secs(60);

/// A copy of test model `name` at `to`, with its model.toml's version set to `version`.
fn model_copy(name: &str, to: &Path, version: &str) -> PathBuf {
    let from = common::test_model_dir(name);
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let descriptor = to.join("model.toml");
    let text = std::fs::read_to_string(&descriptor).unwrap();
    let changed: String =
        text.lines().map(|l| if l.starts_with("version = ") { format!("version = \"{version}\"\n") } else { format!("{l}\n") }).collect();
    assert_ne!(text, changed, "{name}'s model.toml has a version line");
    std::fs::write(&descriptor, changed).unwrap();
    to.to_path_buf()
}

/// Point `link` at `target` atomically (a new symlink renamed over the old): how a Kubernetes
/// volume switches its `..data`, and the documented way to publish a model.
fn switch(link: &Path, target: &Path) {
    let staged = link.with_extension("staged");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(target, &staged).unwrap();
    std::fs::rename(&staged, link).unwrap();
}

#[test]
fn a_model_switched_mid_stream_serves_new_messages_with_nothing_lost_doubled_or_rebalanced() {
    let env = Env::new("reload_switch", shared_clickhouse().url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 4).unwrap();
    let models = env.dir.path().join("models");
    let v1 = model_copy("multihead-tiny", &models.join("v1"), "1.0.0");
    let v2 = model_copy("multihead-tiny", &models.join("v2"), "2.0.0");
    let current = models.join("current");
    switch(&current, &v1);
    let port = triage::local::free_port().unwrap();
    let config = env.write_config("w", &current, &["tickets"], |c| {
        c.models.reload_interval_ms = 200;
        c.metrics.address = format!("127.0.0.1:{port}");
    });
    let mut worker = env.spawn_worker(&config, "w");
    let log = worker.whole_log();

    let all = messages("m", 10_000);
    env.produce("tickets", &all[..5_000]);
    env.wait_for(&mut worker, "the first rows", 2 * MIN, || env.distinct_rows() >= 1_000);
    assert_eq!(metric(port, "triage_model_info{model=\"multihead-tiny\",model_version=\"1.0.0\""), Some(1.0));
    switch(&current, &v2);
    env.wait_for(&mut worker, "the reload", MIN, || log.count("model reloaded") == 1);
    env.produce("tickets", &all[5_000..]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    env.wait_until_rows_settle();

    let rows_of = |version: &str| env.query_u64(&format!("SELECT count() FROM results FINAL WHERE model_version = '{version}'"));
    assert_eq!((env.distinct_rows(), env.raw_rows()), (10_000, 10_000), "every message stored once, none replayed");
    assert!(rows_of("1.0.0") >= 1_000, "the old version answered what came before the switch");
    assert_eq!(
        env.query_u64("SELECT count() FROM results FINAL WHERE model_version = '2.0.0' AND toUInt64(substring(message_id, 3)) >= 5000"),
        5_000,
        "every message produced after the reload was answered by the new version"
    );
    assert_eq!(rows_of("1.0.0") + rows_of("2.0.0"), 10_000);
    // Per partition, the old version's last message comes before the new version's first.
    let crossed = env.query_u64(
        "SELECT count() FROM (SELECT partition, maxIf(offset, model_version = '1.0.0') AS last_old, \
         minIf(offset, model_version = '2.0.0') AS first_new FROM results FINAL GROUP BY partition) \
         WHERE last_old > first_new AND first_new > 0",
    );
    assert_eq!(crossed, 0, "a partition went back to the old version after the swap");
    assert_eq!((log.count("partitions assigned"), log.count("partitions revoked")), (1, 0), "no rebalance:\n{}", log.text());
    assert_eq!(metric(port, "triage_model_info{model=\"multihead-tiny\",model_version=\"2.0.0\""), Some(1.0));
    // The old version's series leave /metrics once its last batch is done; the new one's stay.
    let series_of = |version: &str| {
        let (_, body) = http_get(port, "/metrics");
        let label = format!("model_version=\"{version}\"");
        body.lines().filter(|l| !l.starts_with('#') && l.contains(&label)).count()
    };
    env.wait_for(&mut worker, "the old version's series to leave /metrics", MIN, || series_of("1.0.0") == 0);
    let (_, body) = http_get(port, "/metrics");
    for name in ["triage_model_info{", "triage_inference_seconds_count{", "triage_batch_size_count{", "triage_messages_classified_total{"] {
        assert!(
            body.lines().any(|l| l.starts_with(name) && l.contains("model_version=\"2.0.0\"")),
            "{name} has no series for the serving version:\n{body}"
        );
    }
    assert_eq!(metric(port, "triage_model_reloads_total{model=\"multihead-tiny\",outcome=\"loaded\""), Some(1.0));
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
}

#[test]
fn broken_candidates_are_refused_on_sighup_and_the_old_version_keeps_serving() {
    let env = Env::new("reload_refused", shared_clickhouse().url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    let models = env.dir.path().join("models");
    let good = model_copy("multihead-tiny", &models.join("good"), "1.0.0");
    let bad_graph = model_copy("multihead-tiny", &models.join("bad-graph"), "6.6.6");
    std::fs::write(bad_graph.join("model.onnx"), b"not an onnx graph, cut short by a failed upload").unwrap();
    let wrong_labels = model_copy("multihead-tiny", &models.join("wrong-labels"), "7.7.7");
    let descriptor = std::fs::read_to_string(wrong_labels.join("model.toml")).unwrap();
    let three = descriptor.replacen(
        r#"labels = ["account", "billing", "delivery", "returns", "technical"]"#,
        r#"labels = ["account", "billing", "delivery"]"#,
        1,
    );
    assert_ne!(three, descriptor);
    std::fs::write(wrong_labels.join("model.toml"), three).unwrap();
    let nan = model_copy("nan-tiny", &models.join("nan"), "8.8.8");
    let next = model_copy("multihead-tiny", &models.join("next"), "2.0.0");
    let current = models.join("current");
    switch(&current, &good);
    let port = triage::local::free_port().unwrap();
    // No polling: only SIGHUP reloads.
    let config = env.write_config("w", &current, &["tickets"], |c| {
        c.models.reload_interval_ms = 0;
        c.metrics.address = format!("127.0.0.1:{port}");
    });
    let mut worker = env.spawn_worker(&config, "w");
    let log = worker.whole_log();
    let ready = || http_get(port, "/readyz");
    env.wait_for(&mut worker, "/readyz 200", MIN, || ready().0 == 200);

    let mut produced = 0;
    for (refusals, (candidate, why)) in
        [(&bad_graph, "model.onnx"), (&wrong_labels, "category"), (&nan, "non-finite")].into_iter().enumerate()
    {
        switch(&current, candidate);
        worker.signal(triage::local::SIGHUP);
        env.wait_for(&mut worker, "the refusal", MIN, || log.count("model reload refused") == refusals + 1);
        let (status, body) = ready();
        assert_eq!(status, 200, "a refused reload does not make the worker unready: {body}");
        assert!(body.contains("model reload refused") && body.contains(why), "/readyz says why ({why}): {body}");
        let batch = messages(&format!("r{refusals}"), 50);
        env.produce("tickets", &batch);
        produced += batch.len() as u64;
        env.wait_for(&mut worker, "the batch stored", MIN, || env.distinct_rows() == produced);
        assert_eq!(
            env.query_u64("SELECT count() FROM results FINAL WHERE model_version = '1.0.0'"),
            produced,
            "the old version answered everything"
        );
    }
    assert_eq!(metric(port, "triage_model_reload_failures_total{model=\"multihead-tiny\""), Some(3.0));

    // A good version after the refusals: loaded, and /readyz no longer mentions a refusal.
    switch(&current, &next);
    worker.signal(triage::local::SIGHUP);
    env.wait_for(&mut worker, "the reload", MIN, || log.count("model reloaded") == 1);
    assert!(!ready().1.contains("model reload refused"), "{}", ready().1);
    env.produce("tickets", &messages("after", 50));
    env.wait_for(&mut worker, "the last batch stored", MIN, || env.distinct_rows() == produced + 50);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE model_version = '2.0.0'"), 50);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE isNaN(confidence)"), 0, "no NaN answer was ever stored");
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
}

/// FNV-1a with MurmurHash3's finalizer, written again here: the shadow's sample must be this
/// exact, documented set of keys.
fn sample_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    for (shift, multiplier) in [(33, 0xff51afd7ed558ccd_u64), (33, 0xc4ceb9fe1a85ec53)] {
        hash ^= hash >> shift;
        hash = hash.wrapping_mul(multiplier);
    }
    hash ^ (hash >> 33)
}

fn shadow_dropped(port: u16) -> u64 {
    let (_, body) = http_get(port, "/metrics");
    body.lines()
        .filter(|l| l.starts_with("triage_shadow_dropped_total{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

#[test]
fn a_shadow_classifies_its_share_into_its_own_table_and_never_touches_the_routes_rows() {
    let env = Env::new("shadow_share", shared_clickhouse().url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 2).unwrap();
    let models = env.dir.path().join("models");
    let primary = model_copy("multihead-tiny", &models.join("primary"), "1.0.0");
    let candidate = model_copy("multihead-tiny", &models.join("candidate"), "2.0.0-rc1");
    let port = triage::local::free_port().unwrap();
    let config = env.write_config("w", &primary, &["tickets"], |c| {
        c.routes[0].shadow = Some(candidate.clone());
        c.routes[0].shadow_share = 0.5;
        c.metrics.address = format!("127.0.0.1:{port}");
    });
    let mut worker = env.spawn_worker(&config, "w");
    let all = messages("s", 2_000);
    env.produce("tickets", &all);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    env.wait_until_rows_settle();
    let sampled: std::collections::BTreeSet<String> =
        all.iter().map(|(k, _)| k.clone()).filter(|k| (sample_hash(k.as_bytes()) as f64 / u64::MAX as f64) < 0.5).collect();
    assert!((900..=1_100).contains(&sampled.len()), "a 0.5 share of 2,000 keys: {}", sampled.len());
    // Every shadow answer is one of the sampled messages; with the drops, all of them.
    let dropped = shadow_dropped(port);
    let shadow_ids: Vec<String> = common::worker::runtime()
        .block_on(
            clickhouse::Client::default()
                .with_url(&env.clickhouse_url)
                .with_validation(false)
                .query(&format!("SELECT DISTINCT message_id FROM {}.results_shadow", env.database))
                .fetch_all::<String>(),
        )
        .unwrap();
    assert!(shadow_ids.iter().all(|id| sampled.contains(id)), "a shadow answer for a message outside its share");
    assert_eq!(shadow_ids.len() as u64 + dropped, sampled.len() as u64, "each sampled message answered or counted as dropped");
    assert!(shadow_ids.len() > sampled.len() / 2, "the shadow kept up with most of its share: {} of {}", shadow_ids.len(), sampled.len());
    let shadow_versions = env.query_u64("SELECT count() FROM results_shadow WHERE model_version != '2.0.0-rc1'");
    assert_eq!(shadow_versions, 0);
    // The route's own rows, escalations and commits are the primary's alone.
    assert_eq!((env.distinct_rows(), env.raw_rows()), (2_000, 2_000));
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE model_version != '1.0.0'"), 0);
    let escalations = env.read_topic_to_end("triage.escalations");
    assert_eq!(escalations.len() as u64, env.query_u64("SELECT count() FROM results FINAL WHERE escalated = 1"));
    assert!(escalations.iter().all(|(_, payload, _)| !String::from_utf8_lossy(payload).contains("2.0.0-rc1")), "the shadow escalated");
    assert!(env.read_topic_to_end("triage.dead-letter").is_empty());
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
}

#[test]
fn a_shadow_whose_table_is_gone_costs_the_route_nothing() {
    let env = Env::new("shadow_gone", shared_clickhouse().url());
    env.apply_schema();
    env.query_u64("SELECT count() FROM system.one"); // the database exists
    common::worker::runtime()
        .block_on(
            clickhouse::Client::default()
                .with_url(&env.clickhouse_url)
                .query(&format!("DROP TABLE {}.results_shadow", env.database))
                .execute(),
        )
        .unwrap();
    env.kafka.create_topic("tickets", 2).unwrap();
    let models = env.dir.path().join("models");
    let primary = model_copy("multihead-tiny", &models.join("primary"), "1.0.0");
    let candidate = model_copy("multihead-tiny", &models.join("candidate"), "2.0.0-rc1");
    let port = triage::local::free_port().unwrap();
    let config = env.write_config("w", &primary, &["tickets"], |c| {
        c.routes[0].shadow = Some(candidate.clone());
        c.metrics.address = format!("127.0.0.1:{port}");
    });
    let mut worker = env.spawn_worker(&config, "w");
    let log = worker.whole_log();
    let all = messages("g", 2_000);
    env.produce("tickets", &all[..1_000]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    env.wait_for(&mut worker, "the shadow writer's failure", MIN, || log.count("the shadow table's writer stopped") == 1);
    // After it stopped, the shadow's answers are counted as dropped; the route goes on.
    env.produce("tickets", &all[1_000..]);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    assert_eq!((env.distinct_rows(), env.raw_rows()), (2_000, 2_000), "every message stored once and committed");
    assert!(shadow_dropped(port) >= 900, "the shadow's answers counted as dropped: {}", shadow_dropped(port));
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
}

#[test]
fn a_canary_answers_exactly_its_share_for_real_and_rows_say_which_model_answered() {
    let env = Env::new("canary_share", shared_clickhouse().url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 2).unwrap();
    let models = env.dir.path().join("models");
    let primary = model_copy("multihead-tiny", &models.join("primary"), "1.0.0");
    let candidate = model_copy("multihead-tiny", &models.join("candidate"), "2.0.0-canary");
    let config = env.write_config("w", &primary, &["tickets"], |c| {
        c.routes[0].canary = Some(triage::config::CanaryConfig { model: candidate.clone(), share: 0.2 });
        // Most answers doubted: escalations from both models to compare.
        c.routes[0].escalation_threshold = Some(0.99);
    });
    let mut worker = env.spawn_worker(&config, "w");
    let all = messages("c", 2_000);
    env.produce("tickets", &all);
    env.wait_caught_up(&mut worker, &["tickets"], 3 * MIN);
    env.wait_until_rows_settle();
    assert_eq!((env.distinct_rows(), env.raw_rows()), (2_000, 2_000), "every message answered once");
    // The canary's share: the keys whose salted hash falls under 0.2, every one of them.
    let chosen: std::collections::BTreeSet<String> = all
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| (sample_hash(&[k.as_bytes(), b"\0canary"].concat()) as f64 / u64::MAX as f64) < 0.2)
        .collect();
    // Within 4 standard deviations of 400 (sd 17.9): the sample is the share it claims.
    assert!((328..=472).contains(&chosen.len()), "a 0.2 share of 2,000 keys: {}", chosen.len());
    let answered: std::collections::BTreeSet<String> = common::worker::runtime()
        .block_on(
            clickhouse::Client::default()
                .with_url(&env.clickhouse_url)
                .with_validation(false)
                .query(&format!("SELECT message_id FROM {}.results FINAL WHERE model_version = '2.0.0-canary'", env.database))
                .fetch_all::<String>(),
        )
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(answered, chosen, "the canary answered exactly its share");
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE model_version = '1.0.0'"), 2_000 - chosen.len() as u64);
    // Its answers are real: its doubts are escalated like the primary's, naming it.
    let escalated = env.query_u64("SELECT count() FROM results FINAL WHERE model_version = '2.0.0-canary' AND escalated = 1");
    let letters = env.read_topic_to_end("triage.escalations");
    let from_canary = letters.iter().filter(|(_, p, _)| String::from_utf8_lossy(p).contains("2.0.0-canary")).count() as u64;
    assert!(escalated > 0, "the tiny model doubts some of the canary's share");
    assert_eq!(from_canary, escalated);
    assert_eq!(worker.terminate(MIN), Some(Exit::OK));
}
