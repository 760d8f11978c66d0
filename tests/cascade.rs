//! A route with `cascade = [fast, accurate]` in a real worker (mock Kafka, real ClickHouse):
//! what the first tier doubts goes to the second before its row is written; rows say which
//! tier answered and keep the first tier's answer; only the last tier's doubts are escalated;
//! a second tier that fails on one message leaves the first tier's answer, escalated, instead
//! of losing it; tiers that share a model share its engine.

mod common;

use std::path::Path;
use std::time::Duration;

use common::worker::{shared_clickhouse, Env, Exit};
use serde_json::{json, Value};

/// The default model under another name, doubting everything below 0.97: a stand-in for a
/// cheap first tier (same network, so the test knows what the second tier will say).
fn doubtful_copy_of_the_default(dir: &Path) {
    let src = common::default_model_dir();
    for file in ["model.onnx", "tokenizer.json", "heads.safetensors", "priority.toml"] {
        if src.join(file).exists() {
            std::fs::hard_link(src.join(file), dir.join(file))
                .or_else(|_| std::fs::copy(src.join(file), dir.join(file)).map(|_| ()))
                .unwrap();
        }
    }
    let descriptor = std::fs::read_to_string(src.join("model.toml")).unwrap();
    let descriptor = descriptor.replacen("name = \"customer-service\"", "name = \"customer-service-fast\"", 1);
    let at = descriptor.find("threshold = ").expect("the default model has an escalation threshold");
    let end = at + descriptor[at..].find('\n').unwrap();
    assert!(descriptor[..at].contains("[escalation]"), "the first threshold is the escalation one");
    std::fs::write(dir.join("model.toml"), format!("{}threshold = 0.97{}", &descriptor[..at], &descriptor[end..])).unwrap();
}

fn message(id: &str, body: &str) -> (String, Vec<u8>) {
    (id.to_string(), json!({"id": id, "body": body, "timestamp": 1_700_000_000}).to_string().into_bytes())
}

#[test]
fn doubted_messages_go_to_the_next_tier_and_rows_say_which_answered() {
    let ch = shared_clickhouse();
    let env = Env::new("cascade", ch.url());
    env.apply_schema();
    let fast = tempfile::tempdir().unwrap();
    doubtful_copy_of_the_default(fast.path());
    let accurate = common::default_model_dir();
    let poison = common::test_model_dir("poison-tiny");

    let bodies = [
        "I am still waiting on my card?",
        "Someone stole my card, please block it",
        "Why did my transfer fail?",
        "How do I activate my new card",
        "The ATM gave me less money than I asked for",
        "Which currencies can I hold and exchange in the app?",
        "card payment pending for 3 days",
        "pin blocked",
        "top up reverted",
        "I was charged twice for the same coffee",
        "Whisk the eggs and fold in the melted chocolate, then bake",
        "My refund has not arrived yet",
    ];
    let tickets: Vec<_> = bodies.iter().enumerate().map(|(i, b)| message(&format!("c-{i}"), b)).collect();
    // "thyroid" is past poison-tiny's embedding table: that second tier fails on it alone.
    let returns = vec![message("p-0", "hello, a question about my account"), message("p-1", "a thyroid question")];
    env.kafka.create_topic("tickets", 1).unwrap();
    env.kafka.create_topic("returns", 1).unwrap();
    env.kafka.create_topic("emails", 1).unwrap();
    env.produce("tickets", &tickets);
    env.produce("returns", &returns);
    let emails: Vec<_> = bodies.iter().enumerate().map(|(i, b)| message(&format!("e-{i}"), b)).collect();
    env.produce("emails", &emails);

    // The route's own rule decides what leaves the last tier (here a 0.999 threshold; on the
    // returns route, the category head named; on emails, an OOD limit of 0 that escalates
    // everything); an earlier tier passes on what its own calibration (0.97) doubts, whatever
    // the route says.
    let config = env.write_config("cascade", fast.path(), &["tickets", "returns", "emails"], |c| {
        c.routes[0].cascade = vec![fast.path().to_path_buf(), accurate.clone()];
        c.routes[0].escalation_threshold = Some(0.999);
        c.routes[1].cascade = vec![fast.path().to_path_buf(), poison.clone()];
        c.routes[1].escalation_head = Some("category".into());
        c.routes[2].cascade = vec![fast.path().to_path_buf(), accurate.clone()];
        c.routes[2].ood_threshold = Some(0.0);
    });

    let mut worker = env.spawn_worker(&config, "cascade");
    env.wait_caught_up(&mut worker, &["tickets", "returns", "emails"], Duration::from_secs(180));
    assert_eq!(worker.terminate(Duration::from_secs(60)), Some(Exit::OK), "{}", worker.log_text());
    let log = worker.log_text();
    assert_eq!(log.matches("model loaded").count(), 3, "one engine per distinct model, shared by the routes: {log}");

    assert_eq!(env.distinct_rows(), 26, "every message has its row, none lost");
    assert!(env.read_topic_to_end("triage.dead-letter").is_empty(), "nothing dead-lettered");
    let q = |sql: &str| env.query_u64(sql);
    let forwarded = q("SELECT count() FROM results FINAL WHERE topic = 'tickets' AND tier = 1");
    assert!((3..12).contains(&forwarded), "the 0.97 first tier keeps some and passes some on: {forwarded} of 12 went on");
    assert_eq!(
        q("SELECT count() FROM results FINAL WHERE topic = 'tickets' AND tier = 1 AND model_name = 'customer-service' AND first_model_name = 'customer-service-fast' AND first_confidence < 0.97"),
        forwarded,
        "second-tier rows name their model and keep the first tier's (doubted) answer"
    );
    assert_eq!(
        q("SELECT count() FROM results FINAL WHERE topic = 'tickets' AND tier = 0 AND model_name = 'customer-service-fast' AND first_confidence >= 0.97 AND category = first_category"),
        12 - forwarded,
        "what the first tier is sure of, it answers"
    );
    // (Same network on both tiers, yet a doubtful label may still differ: the int8 encoder's
    // activation scale is per batch, and the second tier batches the message with others.)
    assert_eq!(q("SELECT count() FROM results FINAL WHERE topic = 'tickets' AND (first_category = '' OR category = '')"), 0);
    assert_eq!(
        q("SELECT count() FROM results FINAL WHERE topic = 'tickets' AND escalated = 1 AND tier = 0"),
        0,
        "only the last tier escalates"
    );
    assert_eq!(
        q("SELECT count() FROM results FINAL WHERE topic = 'tickets' AND tier = 1 AND confidence < 0.999 AND escalated = 0"),
        0,
        "the last tier escalates by the route's threshold"
    );
    let emails_on = q("SELECT count() FROM results FINAL WHERE topic = 'emails' AND tier = 1");
    assert!((1..12).contains(&emails_on), "the route's OOD limit is not the first tier's: {emails_on} of 12 went on");
    assert_eq!(
        q("SELECT count() FROM results FINAL WHERE topic = 'emails' AND tier = 1 AND escalated = 0"),
        0,
        "the last tier escalates by the route's OOD limit"
    );
    assert_eq!(
        q("SELECT count() FROM results FINAL WHERE message_id = 'c-10' AND tier = 1 AND escalated = 1"),
        1,
        "the recipe is doubted by both tiers and escalated by the last"
    );

    // The second tier failed on the poisoned message: the first tier's answer stands, escalated.
    assert_eq!(
        q("SELECT count() FROM results FINAL WHERE message_id = 'p-1' AND tier = 0 AND model_name = 'customer-service-fast' AND escalated = 1"),
        1
    );
    assert_eq!(q("SELECT count() FROM results FINAL WHERE message_id = 'p-0' AND tier = 1 AND model_name = 'poison-tiny'"), 1);

    let escalations: Vec<Value> =
        env.read_topic_to_end("triage.escalations").iter().map(|r| serde_json::from_slice(&r.1).unwrap()).collect();
    assert_eq!(escalations.len() as u64, q("SELECT sum(escalated) FROM results FINAL"));
    let recipe = escalations.iter().find(|e| e["message_id"] == "c-10").expect("the recipe's escalation");
    assert_eq!(recipe["result"]["tier"], 1);
    assert_eq!(recipe["result"]["model"], "customer-service");
    assert_eq!(recipe["earlier_tiers"][0]["model"], "customer-service-fast");
}

#[test]
fn a_route_escalating_on_a_head_its_last_tier_lacks_is_refused_at_start() {
    let env = Env::new("cascade_head", shared_clickhouse().url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    let fast = tempfile::tempdir().unwrap();
    doubtful_copy_of_the_default(fast.path());
    // The tiny model has a `priority` head; the default model (the last tier) has none.
    let tiny = common::test_model_dir("multihead-tiny");
    let config = env.write_config("cascade_head", &tiny, &["tickets"], |c| {
        c.routes[0].cascade = vec![tiny.clone(), fast.path().to_path_buf()];
        c.routes[0].escalation_head = Some("priority".into());
    });
    let mut worker = env.spawn_worker(&config, "cascade_head");
    common::worker::wait_until(Duration::from_secs(120), "the worker to refuse its configuration", || worker.exited().is_some());
    assert_ne!(worker.exited(), Some(Exit::OK));
    let log = worker.log_text();
    assert!(log.contains("escalation_head `priority` is not a head of customer-service-fast"), "{log}");
}
