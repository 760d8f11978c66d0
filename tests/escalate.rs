//! `triage escalate` against real ClickHouse and the mock Kafka cluster: LLM answers become the
//! message's row version and outrank replays of the small model's row; bad replies are retried
//! once, then dead-lettered with the reply; refusals and unusable records are dead-lettered;
//! nothing answered is sent again; the hourly spend cap holds calls without losing them; an
//! endpoint that refuses every call stops the command; a table versioned the old way is refused
//! until `triage schema migrate`; `--export-labels` writes training data. The LLM is a scripted
//! OpenAI-compatible server in this file, and (last test) llama.cpp's real server.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::worker::{runtime, shared_clickhouse, Env, Exit, PrivateClickHouse, Worker};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use triage::config::Config;
use triage::llm::prompt::StructuredOutput;
use triage::sink::clickhouse::{ClickHouseService, ResultRow};

/// What the scripted LLM saw: (user message text, HTTP status answered).
type Seen = Arc<Mutex<Vec<(String, u16)>>>;

/// Every request body the scripted LLM received, whole.
type Bodies = Arc<Mutex<Vec<Value>>>;

/// A chat-completions server answering by the user message's content: `SLOW` -> after 3 s
/// (never rate-limited), `HANG` -> after 20 s (past any test's timeout), `NOUSAGE` -> an answer
/// without `usage`, `GARBAGE` -> prose,
/// `UNKNOWNLABEL` -> a label the model lacks, `REFUSE` -> 400; the very first other request
/// -> 429 with Retry-After; everything else -> `{"intent": "card_arrival"}`. `always` overrides
/// every answer with one status (401: a bad key; 400: OpenAI's refusal of `max_tokens` for its
/// reasoning models, a configuration error every message gets).
fn scripted_llm(always: Option<u16>) -> (String, Seen) {
    let (url, seen, _) = scripted_llm_keeping_bodies(always);
    (url, seen)
}

/// One HTTP request from a scripted server's socket: its head, and its body (Content-Length
/// bytes). None when the client went away first.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let n = socket.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            return Some((head, buf[end + 4..end + 4 + length].to_vec()));
        }
    }
}

/// [`scripted_llm`], also keeping each request's body.
fn scripted_llm_keeping_bodies(always: Option<u16>) -> (String, Seen, Bodies) {
    let bodies: Bodies = Arc::default();
    let kept = bodies.clone();
    let listener = runtime().block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let log = seen.clone();
    runtime().spawn(async move {
        let limited_once = Arc::new(Mutex::new(false));
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let (log, limited_once, kept) = (log.clone(), limited_once.clone(), kept.clone());
            tokio::spawn(async move {
                let Some((_, body)) = read_request(&mut socket).await else { return };
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                kept.lock().unwrap().push(request.clone());
                let text = request["messages"][1]["content"].as_str().unwrap_or_default().to_string();
                let reply = |content: &str| {
                    let mut body = json!({
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
                    });
                    if text.contains("NOUSAGE") {
                        body.as_object_mut().map(|o| o.remove("usage"));
                    }
                    body.to_string()
                };
                let (status, extra, payload) = if let Some(status) = always {
                    let error = match status {
                        400 => json!({"error": {
                            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
                            "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}}),
                        _ => json!({"error": {"message": "invalid api key"}}),
                    };
                    (status, "", error.to_string())
                } else if text.contains("GARBAGE") {
                    (200, "", reply("It is probably about a card."))
                } else if text.contains("UNKNOWNLABEL") {
                    (200, "", reply(r#"{"intent": "no_such_label"}"#))
                } else if text.contains("REFUSE") {
                    (400, "", json!({"error": {"message": "maximum context length exceeded"}}).to_string())
                } else if !text.contains("SLOW") && !text.contains("HANG") && !text.contains("NOUSAGE") && !std::mem::replace(&mut *limited_once.lock().unwrap(), true) {
                    (429, "Retry-After: 1\r\n", json!({"error": {"message": "rate limited"}}).to_string())
                } else {
                    (200, "", reply(r#"{"intent": "card_arrival"}"#))
                };
                log.lock().unwrap().push((text.clone(), status));
                if text.contains("SLOW") {
                    // A call that takes a while: the test changes the world meanwhile.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                if text.contains("HANG") {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                }
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{payload}",
                    payload.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, seen, bodies)
}

/// The worker's config plus `[llm]` (url and model of the server, then `edit`): every route
/// escalates everything (threshold 1).
fn escalate_config(env: &Env, name: &str, url: &str, model: &str, edit: impl FnOnce(&mut Config)) -> PathBuf {
    env.write_config(name, &common::default_model_dir(), &["tickets"], |c| {
        c.routes[0].escalation_threshold = Some(1.0);
        c.shutdown.drain_timeout_ms = 3000;
        c.llm.group_id = format!("{}-llm", env.group);
        c.llm.url = url.into();
        c.llm.model = model.into();
        // A refused record waits this long for another answer before its dead letter.
        c.llm.refusal_hold_ms = 2_000;
        edit(c)
    })
}

/// A test's own Kafka and database on the shared ClickHouse, schema applied, `tickets` made.
fn escalate_env(name: &str) -> Env {
    let env = Env::new(name, shared_clickhouse().url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    env
}

fn escalate_caught_up(env: &Env) -> bool {
    let kafka = triage::config::KafkaConfig { group_id: format!("{}-llm", env.group), ..env.kafka_config() };
    triage::kafka_tools::group_caught_up(&kafka, &["triage.escalations".to_string()]).unwrap_or(false)
}

fn message(id: &str, body: &str) -> (String, Vec<u8>) {
    (id.to_string(), json!({"id": id, "body": body, "timestamp": 1_700_000_000}).to_string().into_bytes())
}

/// An escalation record as the worker writes it, for a message of `tickets` at `offset`.
fn record(offset: u64, body: &str) -> (String, Vec<u8>) {
    let row = ResultRow {
        topic: "tickets".into(),
        offset,
        message_id: format!("r-{offset}"),
        kind: "ticket".into(),
        event_time: 1_700_000_000,
        event_time_ms: 1_700_000_000_000,
        model_name: "customer-service".into(),
        category: "card_linking".into(),
        confidence: 0.3,
        escalated: 1,
        answered_by: "model:customer-service".into(),
        ..ResultRow::default()
    };
    (format!("r-{offset}"), serde_json::to_vec(&json!({"message_id": row.message_id, "row": row, "message": {"body": body}})).unwrap())
}

fn reasons(env: &Env) -> Vec<String> {
    let mut out: Vec<String> = env
        .read_topic_to_end("triage.dead-letter")
        .iter()
        .map(|(_, _, headers)| headers.iter().find(|(k, _)| k == "triage.reason").map(|(_, v)| v.clone()).unwrap_or_default())
        .collect();
    out.sort();
    out
}

#[test]
fn llm_answers_become_the_rows_version_and_nothing_is_lost_or_sent_twice() {
    let ch = shared_clickhouse();
    let env = escalate_env("escalate");
    let normal = [
        "where is my new card",
        "my card has not arrived yet",
        "how long does card delivery take",
        "card still not here",
        "when will the card come",
    ];
    let mut messages: Vec<_> = normal.iter().enumerate().map(|(i, b)| message(&format!("n-{i}"), b)).collect();
    messages.push(message("g", "GARBAGE my card"));
    messages.push(message("u", "UNKNOWNLABEL my card"));
    messages.push(message("x", "REFUSE my card"));
    env.produce("tickets", &messages);

    // The small model's pass: everything escalated (threshold 1).
    let (url, seen) = scripted_llm(None);
    let config = escalate_config(&env, "escalate", &url, "stub-llm", |c| c.llm.max_concurrent_requests = 2);
    let mut worker = env.spawn_worker(&config, "worker");
    env.wait_caught_up(&mut worker, &["tickets"], Duration::from_secs(180));
    assert_eq!(worker.terminate(Duration::from_secs(60)), Some(Exit::OK), "{}", worker.log_text());
    let escalations = env.read_topic_to_end("triage.escalations");
    assert_eq!(escalations.len(), 8);
    // A second record of one message (a replay of the worker) and a record nobody can use.
    // (Records are written in the order messages finish, so find one of an answerable message.)
    let first = escalations
        .iter()
        .find(|(_, payload, _)| serde_json::from_slice::<Value>(payload).is_ok_and(|v| normal.iter().any(|b| v["message"]["body"] == *b)))
        .expect("an answerable message's record")
        .clone();
    // A record of a topic this configuration has no route (so no labels) for.
    let (_, elsewhere) = record(7, "a message from another route");
    let elsewhere = common::replaced(&String::from_utf8(elsewhere).unwrap(), "\"topic\":\"tickets\"", "\"topic\":\"returns\"");
    assert!(elsewhere.contains("\"topic\":\"returns\""));
    env.produce(
        "triage.escalations",
        &[
            (String::from_utf8(first.0.unwrap()).unwrap(), first.1),
            ("junk".into(), b"not json".to_vec()),
            ("elsewhere".into(), elsewhere.into_bytes()),
        ],
    );

    let mut escalate = env.spawn_command("escalate", &config, "escalate", &[]);
    env.wait_for(&mut escalate, "escalations committed", Duration::from_secs(120), || escalate_caught_up(&env));
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());

    let q = |sql: &str| env.query_u64(sql);
    assert_eq!(env.distinct_rows(), 8, "answers are versions of the messages' rows, not new rows");
    assert_eq!(
        q("SELECT count() FROM results FINAL WHERE answered_by = 'llm:stub-llm' AND category = 'card_arrival' AND slm_category != '' \
           AND llm_prompt_tokens = 100 AND llm_completion_tokens = 10 AND model_name = 'customer-service' AND event_time = toDateTime(1700000000)"),
        5,
        "the five answerable messages carry the LLM's answer, the small model's, tokens, and their own event time"
    );
    assert_eq!(q("SELECT count() FROM results FINAL WHERE answered_by LIKE 'model:%'"), 3, "the others keep the small model's row");
    assert_eq!(reasons(&env), vec!["escalation_invalid", "llm_refused", "llm_reply_invalid", "llm_reply_invalid", "unrouted"]);
    let letters = env.read_topic_to_end("triage.dead-letter");
    let garbage = letters.iter().find(|(k, _, _)| k.as_deref() == Some(b"g".as_slice())).expect("the garbage reply's letter");
    let detail = garbage.2.iter().find(|(k, _)| k == "triage.detail").map(|(_, v)| v.as_str()).unwrap_or_default();
    assert!(detail.contains("It is probably about a card."), "the reply travels with the letter: {detail}");

    // A snapshot of the calls so far: `seen` itself keeps recording (the second group below).
    let first_calls = seen.lock().unwrap().clone();
    let calls = |needle: &str, status: u16| first_calls.iter().filter(|(t, s)| t.contains(needle) && *s == status).count();
    for body in normal {
        assert_eq!(calls(body, 200), 1, "`{body}` answered exactly once (the duplicate record was not sent)");
    }
    assert_eq!(first_calls.iter().filter(|(_, s)| *s == 429).count(), 1, "the 429 was retried");
    assert_eq!(
        (calls("GARBAGE", 200), calls("UNKNOWNLABEL", 200), calls("REFUSE", 400)),
        (2, 2, 1),
        "bad replies retried once, refusals not"
    );
    let log = escalate.log_text();
    for body in normal.iter().chain(&["GARBAGE my card", "It is probably"]) {
        assert!(!log.contains(body), "no message or reply text in the log: found `{body}`");
    }

    // A replay of the small model's row, much later, does not replace the LLM's answer.
    let key_row = |sql: &str| {
        let client = clickhouse::Client::default().with_url(ch.url()).with_database(&env.database).with_validation(false);
        runtime().block_on(client.query(sql).fetch_one::<ResultRow>()).unwrap()
    };
    let mut replay = key_row("SELECT * FROM results FINAL WHERE answered_by LIKE 'llm:%' LIMIT 1");
    let offset = replay.offset;
    replay.answered_by = "model:customer-service".into();
    replay.category = "card_linking".into();
    replay.stamp(triage::time::now_ms() + 86_400_000);
    let service = ClickHouseService::new(&env.clickhouse());
    assert!(runtime().block_on(service.insert(&[replay])).unwrap().is_empty());
    runtime()
        .block_on(
            clickhouse::Client::default().with_url(ch.url()).query(&format!("OPTIMIZE TABLE {}.results FINAL", env.database)).execute(),
        )
        .unwrap();
    let now = key_row(&format!("SELECT * FROM results FINAL WHERE offset = {offset}"));
    assert_eq!((now.answered_by.as_str(), now.category.as_str()), ("llm:stub-llm", "card_arrival"), "the LLM's answer outranks the replay");

    // A second group reading the whole topic again (a new deployment, a reset) sends nothing
    // already answered: the table is asked first.
    let before = seen.lock().unwrap().len();
    let again = escalate_config(&env, "escalate-again", &url, "stub-llm", |c| c.llm.group_id = format!("{}-llm2", env.group));
    let mut second = env.spawn_command("escalate", Path::new(&again), "escalate-again", &[]);
    let kafka = triage::config::KafkaConfig { group_id: format!("{}-llm2", env.group), ..env.kafka_config() };
    env.wait_for(&mut second, "the second group caught up", Duration::from_secs(120), || {
        triage::kafka_tools::group_caught_up(&kafka, &["triage.escalations".to_string()]).unwrap_or(false)
    });
    assert_eq!(second.terminate(Duration::from_secs(30)), Some(Exit::OK));
    let repeated: Vec<_> = seen_after(&seen.lock().unwrap(), before);
    assert!(
        repeated.iter().all(|(t, _)| t.contains("GARBAGE") || t.contains("UNKNOWNLABEL") || t.contains("REFUSE")),
        "only the never-answered messages are asked again: {repeated:?}"
    );
    // And they are: the second group did read the topic (this check is not vacuous).
    assert!(repeated.iter().any(|(t, _)| t.contains("GARBAGE")), "the second group asked nothing at all: {repeated:?}");

    // The answered messages as training data.
    let out = env.dir.path().join("labels.jsonl");
    let export = std::process::Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["escalate", "--config"])
        .arg(&config)
        .arg("--export-labels")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert!(export.status.success(), "{stderr}");
    let lines: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "one example per answered message, the duplicate record once: {stderr}");
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    for body in normal {
        assert!(texts.contains(&body), "{body} exported: {texts:?}");
    }
    assert!(lines.iter().all(|l| l["intent"] == "card_arrival" && l["answered_by"] == "llm:stub-llm"));
    assert!(stderr.contains("5 examples written") && stderr.contains("1 duplicates") && stderr.contains("2 unreadable"), "{stderr}");
}

fn seen_after(seen: &[(String, u16)], before: usize) -> Vec<(String, u16)> {
    seen[before.min(seen.len())..].to_vec()
}

#[test]
fn the_hourly_spend_cap_holds_calls_and_commits_only_what_was_answered() {
    let env = escalate_env("escalate_cap");
    env.produce("triage.escalations", &(1..=4).map(|o| record(o, &format!("card question {o}"))).collect::<Vec<_>>());
    let (url, seen) = scripted_llm(None);
    // 110 tokens at 1 per token: the first answered call spends over the cap of 50 an hour.
    let config = escalate_config(&env, "cap", &url, "stub-llm", |c| {
        c.llm.max_concurrent_requests = 1;
        c.llm.prompt_price_per_million = 1_000_000.0;
        c.llm.completion_price_per_million = 1_000_000.0;
        c.llm.max_spend_per_hour = Some(50.0);
    });
    let mut escalate = env.spawn_command("escalate", &config, "escalate-cap", &[]);
    env.wait_for(&mut escalate, "the first answer stored", Duration::from_secs(60), || {
        env.query_u64("SELECT count() FROM results WHERE answered_by = 'llm:stub-llm'") == 1
    });
    std::thread::sleep(Duration::from_secs(4));
    let answered: Vec<_> = seen.lock().unwrap().iter().filter(|(_, s)| *s == 200).cloned().collect();
    assert_eq!(answered.len(), 1, "the cap holds every further call: {answered:?}");
    assert_eq!(env.query_u64("SELECT count() FROM results WHERE answered_by = 'llm:stub-llm'"), 1);
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "a held call does not block shutdown: {}", escalate.log_text());
    let kafka = triage::config::KafkaConfig { group_id: format!("{}-llm", env.group), ..env.kafka_config() };
    let committed = committed_offset(&kafka, "triage.escalations");
    assert!(committed.is_some_and(|c| c <= 1), "only the answered record is committed; the held ones are read again: {committed:?}");
    assert!(escalate.log_text().contains("spend cap is reached"), "{}", escalate.log_text());
    assert!(reasons(&env).is_empty(), "nothing held is dead-lettered");
}

fn committed_offset(kafka: &triage::config::KafkaConfig, topic: &str) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka.client(triage::config::ClientRole::Observer).create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, 0);
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    committed.elements().first().and_then(|e| e.offset().to_raw()).filter(|o| *o >= 0).or(Some(0))
}

/// The LLM answers while the answers' ClickHouse is down: nothing is stored, so nothing may be
/// committed. Then escalate is SIGKILLed (`kill`) or ClickHouse comes back, and every record
/// ends answered in the table.
fn answers_while_clickhouse_is_down(name: &str, kill: bool) {
    let mut clickhouse = PrivateClickHouse::start();
    let env = Env::new(name, clickhouse.url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    let (url, seen) = scripted_llm(None);
    let config = escalate_config(&env, name, &url, "stub-llm", |c| {
        c.clickhouse.insert_timeout_ms = 1000;
        // One block holds all four answers; two failed inserts mean a commit tick went by.
        common::worker::one_block_of(&mut c.clickhouse, 4);
    });
    let mut escalate = env.spawn_command("escalate", &config, "e1", &[]);
    let log = escalate.whole_log();
    env.wait_for(&mut escalate, "escalate consuming", Duration::from_secs(60), || log.text().contains("answering escalations"));
    env.produce("triage.escalations", &(1..=4).map(|o| record(o, &format!("SLOW card question {o}"))).collect::<Vec<_>>());
    // Every call under way (asked after the table said "not answered yet"), then ClickHouse goes.
    env.wait_for(&mut escalate, "four calls in flight", Duration::from_secs(60), || {
        seen.lock().unwrap().iter().filter(|(_, status)| *status == 200).count() >= 4
    });
    // SIGKILL: gone at once (a clean stop keeps answering while it shuts down).
    clickhouse.kill();
    let down = escalate.mark();
    env.wait_for(&mut escalate, "answers whose INSERT fails, twice", Duration::from_secs(60), || {
        down.text().matches("ClickHouse insert failed; retrying").count() >= 2
    });
    let kafka = triage::config::KafkaConfig { group_id: format!("{}-llm", env.group), ..env.kafka_config() };
    assert_eq!(committed_offset(&kafka, "triage.escalations"), Some(0), "answered but not stored: nothing committed");
    if kill {
        escalate.kill9();
        clickhouse.restart();
        escalate = env.spawn_command("escalate", &config, "e2", &[]);
    } else {
        clickhouse.restart();
    }
    env.wait_for(&mut escalate, "escalate caught up", Duration::from_secs(120), || escalate_caught_up(&env));
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE answered_by = 'llm:stub-llm'"), 4, "every record answered, stored");
    assert_eq!(committed_offset(&kafka, "triage.escalations"), Some(4));
}

#[test]
fn an_answer_is_committed_only_once_clickhouse_stored_it() {
    answers_while_clickhouse_is_down("escalate_ch_down", false);
}

#[test]
fn sigkill_while_answers_cannot_be_stored_loses_no_answer() {
    answers_while_clickhouse_is_down("escalate_ch_kill", true);
}

#[test]
fn an_endpoint_refusing_every_call_stops_escalate_without_losing_anything() {
    refused_everywhere("escalate_401", 401, "401");
}

/// Issue 22: a 400 naming a request parameter is the configuration's fault, not the message's:
/// before, every escalation was dead-lettered `llm_refused` and committed within seconds.
#[test]
fn a_refused_request_parameter_stops_escalate_instead_of_draining_the_topic() {
    refused_everywhere("escalate_param", 400, "max_tokens");
}

fn refused_everywhere(name: &str, status: u16, named: &str) {
    let ch = shared_clickhouse();
    let env = Env::new(name, ch.url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    env.produce("triage.escalations", &[record(1, "where is my card"), record(2, "card please")]);
    let (url, seen) = scripted_llm(Some(status));
    let config = escalate_config(&env, "refused", &url, "stub-llm", |_| {});
    let mut escalate = env.spawn_command("escalate", &config, name, &[]);
    common::worker::wait_until(Duration::from_secs(60), "escalate to stop", || escalate.exited().is_some());
    assert!(matches!(escalate.exited(), Some(Exit::Code(c)) if c != 0), "{:?}", escalate.exited());
    let log = escalate.log_text();
    assert!(log.contains("refuses every call") && log.contains(named), "{log}");
    assert!(!seen.lock().unwrap().is_empty());
    assert!(reasons(&env).is_empty(), "a bad key is not the messages' fault: nothing dead-lettered");
    let kafka = triage::config::KafkaConfig { group_id: format!("{}-llm", env.group), ..env.kafka_config() };
    assert_eq!(committed_offset(&kafka, "triage.escalations"), Some(0), "nothing committed");
}

#[test]
fn an_endpoint_that_stays_down_fails_readiness_and_loses_nothing() {
    let env = escalate_env("escalate_down");
    env.produce("triage.escalations", &[record(1, "where is my card")]);
    let (url, seen) = scripted_llm(Some(503));
    let config = escalate_config(&env, "down", &url, "stub-llm", |c| {
        c.llm.retries = 0;
        c.llm.max_attempts_per_message = 2;
    });
    let port = triage::local::free_port().unwrap();
    let address = format!("127.0.0.1:{port}");
    let mut escalate = env.spawn_command("escalate", &config, "escalate-down", &[("TRIAGE_METRICS__ADDRESS", address.as_str())]);
    env.wait_for(&mut escalate, "/readyz to name the failing endpoint", Duration::from_secs(60), || {
        let (status, body) = common::worker::http_get(port, "/readyz");
        status == 503 && body.contains("LLM endpoint keeps failing (server_error)")
    });
    // Past llm.max_attempts_per_message: with no other message answered, it is an outage.
    env.wait_for(&mut escalate, "more attempts than max_attempts_per_message", Duration::from_secs(60), || seen.lock().unwrap().len() >= 4);
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
    assert!(reasons(&env).is_empty(), "an outage is not the message's fault: nothing dead-lettered");
    let kafka = triage::config::KafkaConfig { group_id: format!("{}-llm", env.group), ..env.kafka_config() };
    assert_eq!(committed_offset(&kafka, "triage.escalations"), Some(0), "the unanswered record is read again");
}

#[test]
fn a_table_versioned_the_old_way_is_refused_until_migrated_and_keeps_its_rows() {
    let ch = shared_clickhouse();
    let env = Env::new("escalate_migrate", ch.url());
    let clickhouse = env.clickhouse();
    let admin = clickhouse::Client::default().with_url(ch.url());
    // The table as the previous release made it: versioned by processed_time_ms, fewer columns.
    let old = common::replaced(
        &triage::sink::clickhouse::schema::create_table(&clickhouse),
        "ReplacingMergeTree(row_version)",
        "ReplacingMergeTree(processed_time_ms)",
    );
    let old: String = old
        .lines()
        .filter(|l| !["answered_by", "row_version", "slm_", "llm_"].iter().any(|c| l.contains(&format!("`{c}"))))
        .collect::<Vec<_>>()
        .join("\n");
    let old = common::replaced(&old, "`first_confidence` Float32,", "`first_confidence` Float32");
    runtime().block_on(admin.query(&format!("CREATE DATABASE IF NOT EXISTS {}", env.database)).execute()).unwrap();
    runtime().block_on(admin.query(&old).execute()).unwrap_or_else(|e| panic!("{old}\n{e}"));
    runtime()
        .block_on(
            admin
                .query(&format!(
                    "INSERT INTO {}.results (topic, partition, offset, event_time, processed_time_ms, category) VALUES ('tickets', 0, 1, 1700000000, 5, 'a'), ('tickets', 0, 2, 1700000000, 6, 'b'), ('tickets', 0, 2, 1700000000, 7, 'c')",
                    env.database
                ))
                .execute(),
        )
        .unwrap();
    env.kafka.create_topic("tickets", 1).unwrap();
    let (url, _) = scripted_llm(None);
    let config = escalate_config(&env, "migrate", &url, "stub-llm", |_| {});
    let triage = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_triage")).args(args).arg(&config).output().unwrap();
    // The worker's own schema step adds the columns, but cannot change the version.
    let apply = triage(&["schema", "apply", "--config"]);
    assert!(apply.status.success(), "{}", String::from_utf8_lossy(&apply.stderr));
    let refused = triage(&["escalate", "--config"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("triage schema migrate"), "{stderr}");

    let migrate = triage(&["schema", "migrate", "--config"]);
    let stderr = String::from_utf8_lossy(&migrate.stderr);
    assert!(migrate.status.success(), "{stderr}");
    assert!(stderr.contains("step 5/5") && stderr.contains("results_before_row_version"), "progress shown: {stderr}");
    let service = ClickHouseService::new(&clickhouse);
    assert_eq!(runtime().block_on(service.version_column()).unwrap().as_deref(), Some("row_version"));
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL"), 2, "every message kept");
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE offset = 2 AND category = 'c'"), 1, "the newest version still wins");
    assert_eq!(env.query_u64("SELECT min(row_version) FROM results"), 5, "old rows are versioned by their time");
    let again = triage(&["schema", "migrate", "--config"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to do"));
}

/// The OpenAI-compatible server of llama.cpp (llama-cpp-python, built by scripts/setup) with
/// a tiny random-weight model: its JSON-schema grammar makes any model answer with a label.
struct LlamaServer {
    child: std::process::Child,
    url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn llama_server(log: &Path) -> LlamaServer {
    let python = common::root().join(".venv/bin/python");
    let model = common::root().join("runtime/llm/tiny-llm.gguf");
    assert!(model.exists(), "{} is missing: run scripts/setup", model.display());
    let port = triage::local::free_port().unwrap();
    let file = std::fs::File::create(log).unwrap();
    let child = std::process::Command::new(python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(&model)
        .args(["--model_alias", "tiny", "--host", "127.0.0.1", "--port", &port.to_string(), "--n_ctx", "16384"])
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("start llama_cpp.server (scripts/setup installs it)");
    let server = LlamaServer { child, url: format!("http://127.0.0.1:{port}/v1") };
    common::worker::wait_until(Duration::from_secs(120), "llama.cpp's server to answer", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && common::worker::http_get(port, "/v1/models").0 == 200
    });
    server
}

#[test]
fn the_demo_escalations_are_answered_by_llama_cpp_and_land_as_row_versions() {
    let ch = shared_clickhouse();
    let env = escalate_env("escalate_llama");
    let demo = std::fs::read_to_string(common::root().join("deploy/demo/tickets.jsonl")).unwrap();
    let messages: Vec<(String, Vec<u8>)> =
        demo.lines().filter(|l| !l.trim().is_empty()).enumerate().map(|(i, l)| (format!("d-{i}"), l.as_bytes().to_vec())).collect();
    env.produce("tickets", &messages);
    let server = llama_server(&env.dir.path().join("llama.log"));
    // The demo's messages: subject + body, their own ids and times.
    let config = escalate_config(&env, "llama", &server.url, "tiny", |c| {
        c.llm.structured_output = StructuredOutput::JsonObject;
        c.llm.max_concurrent_requests = 2;
        let fields = &mut c.routes[0].fields;
        fields.timestamp = vec!["created_at".into()];
        fields.id = vec!["id".into()];
        fields.text = [("subject", "subject"), ("body", "body")].map(|(k, v)| (k.to_string(), vec![v.to_string()])).into();
    });

    let mut worker: Worker = env.spawn_worker(&config, "worker");
    env.wait_caught_up(&mut worker, &["tickets"], Duration::from_secs(180));
    assert_eq!(worker.terminate(Duration::from_secs(60)), Some(Exit::OK), "{}", worker.log_text());
    let escalated = env.read_topic_to_end("triage.escalations").len() as u64;
    assert_eq!(escalated, messages.len() as u64, "threshold 1: every demo message is escalated");

    let mut escalate = env.spawn_command("escalate", &config, "escalate", &[]);
    env.wait_for(&mut escalate, "escalations committed", Duration::from_secs(300), || escalate_caught_up(&env));
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());

    let labels: std::collections::BTreeSet<String> = {
        let descriptor = triage::model::Descriptor::load(&common::default_model_dir()).unwrap();
        descriptor.heads.iter().flat_map(|h| h.labels.clone()).collect()
    };
    let client = clickhouse::Client::default().with_url(ch.url()).with_database(&env.database).with_validation(false);
    let rows: Vec<ResultRow> = runtime().block_on(client.query("SELECT * FROM results FINAL").fetch_all::<ResultRow>()).unwrap();
    assert_eq!(rows.len(), messages.len(), "one row per message");
    let dead = reasons(&env);
    let by_llm: Vec<&ResultRow> = rows.iter().filter(|r| r.answered_by == "llm:tiny").collect();
    eprintln!("llama.cpp answered {} of {} escalations; dead letters: {dead:?}", by_llm.len(), messages.len());
    // The grammar built from the schema allows only the model's labels, so even random weights
    // answer every message: a dead letter here is a broken request or reply check.
    assert!(dead.is_empty(), "every escalation answered, none dead-lettered: {dead:?}");
    assert_eq!(by_llm.len(), messages.len(), "every escalation answered by the LLM");
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in &by_llm {
        assert!(labels.contains(&r.category), "`{}` is one of the model's labels", r.category);
        assert!(r.row_version >> triage::sink::clickhouse::row::RANK_SHIFT == 1, "an LLM-ranked version");
        assert!(r.llm_prompt_tokens > 0 && r.llm_completion_tokens > 0, "the server's token counts are kept");
        assert!(!r.slm_category.is_empty());
        *counts.entry(r.message_id.as_str()).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1));
}

/// Issue 22: refusals that name nothing (a 413 for every message: a gateway's limit, a model
/// swapped behind the URL) are each one message's fault until a streak shows otherwise; then
/// the command stops instead of dead-lettering the topic. The refused records of the streak are
/// held back meanwhile, so none is dead-lettered or committed: fixing the endpoint and
/// restarting answers them all.
#[test]
fn a_streak_of_refusals_with_no_answer_stops_escalate_with_nothing_dead_lettered_or_committed() {
    let env = escalate_env("escalate_streak");
    let records: Vec<_> = (1..=20).map(|i| record(i, &format!("my card number {i} never arrived"))).collect();
    env.produce("triage.escalations", &records);
    let (url, _seen) = scripted_llm(Some(413));
    let config = escalate_config(&env, "streak", &url, "stub-llm", |c| c.llm.refusal_hold_ms = 60_000);
    let mut escalate = env.spawn_command("escalate", &config, "escalate-streak", &[]);
    common::worker::wait_until(Duration::from_secs(60), "escalate to stop", || escalate.exited().is_some());
    assert!(matches!(escalate.exited(), Some(Exit::Code(c)) if c != 0), "{:?}", escalate.exited());
    let log = escalate.log_text();
    assert!(log.contains("5 messages in a row refused"), "{log}");
    assert_eq!(reasons(&env), Vec::<String>::new(), "the streak's refusals were held, not dead-lettered");
    let kafka = triage::config::KafkaConfig { group_id: format!("{}-llm", env.group), ..env.kafka_config() };
    assert!(committed_offset(&kafka, "triage.escalations").unwrap_or(0) == 0, "nothing committed");
}

/// Issue 22: a refusal held back as a possible streak is dead-lettered as soon as another
/// message is answered (the endpoint works: the refusal was that message's own), long before
/// the hold runs out.
#[test]
fn held_refusals_are_dead_lettered_once_another_message_is_answered() {
    let env = escalate_env("escalate_heldrefusal");
    let mut records = vec![record(1, "REFUSE my card one"), record(2, "REFUSE my card two")];
    records.extend((3..=5).map(|i| record(i, &format!("SLOW where is card {i}"))));
    env.produce("triage.escalations", &records);
    let (url, _seen) = scripted_llm(None);
    let config = escalate_config(&env, "heldrefusal", &url, "stub-llm", |c| c.llm.refusal_hold_ms = 600_000);
    let mut escalate = env.spawn_command("escalate", &config, "escalate-heldrefusal", &[]);
    env.wait_for(&mut escalate, "every record settled and committed", Duration::from_secs(60), || escalate_caught_up(&env));
    assert_eq!(reasons(&env), vec!["llm_refused", "llm_refused"]);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE answered_by = 'llm:stub-llm'"), 3);
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
}

/// Issue 22: a message whose calls always time out no longer holds the tier: while the endpoint
/// answers the others, it is dead-lettered `llm_timeout` after llm.max_attempts_per_message
/// attempts, and everything is committed.
#[test]
fn a_message_that_always_times_out_is_dead_lettered_while_the_others_are_answered() {
    let env = escalate_env("escalate_hang");
    let mut records = vec![record(1, "HANG my card")];
    records.extend((2..=8).map(|i| record(i, &format!("where is card {i}"))));
    env.produce("triage.escalations", &records);
    let (url, seen) = scripted_llm(None);
    let config = escalate_config(&env, "hang", &url, "stub-llm", |c| {
        c.llm.timeout_ms = 700;
        c.llm.retries = 0;
        c.llm.max_attempts_per_message = 2;
        c.llm.max_concurrent_requests = 2;
    });
    let mut escalate = env.spawn_command("escalate", &config, "escalate-hang", &[]);
    env.wait_for(&mut escalate, "every record settled and committed", Duration::from_secs(90), || escalate_caught_up(&env));
    assert_eq!(reasons(&env), vec!["llm_timeout"]);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE answered_by = 'llm:stub-llm'"), 7);
    let hangs = seen.lock().unwrap().iter().filter(|(t, _)| t.contains("HANG")).count();
    assert_eq!(hangs, 2, "llm.max_attempts_per_message calls for the hanging message");
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
}

/// Issue 22: every received record used to become a task at once, each querying ClickHouse
/// before waiting for a call slot: after a backlog, thousands of concurrent queries. Now at
/// most llm.max_in_flight records are worked on, and consumption pauses as soon as that many
/// are unfinished: the in-flight gauge stays near the limit through a backlog.
#[test]
fn a_backlog_is_taken_in_at_max_in_flight_not_all_at_once() {
    let env = escalate_env("escalate_backlog");
    let records: Vec<_> = (1..=600).map(|i| record(i, &format!("card question number {i}"))).collect();
    env.produce("triage.escalations", &records);
    let (url, seen) = scripted_llm(None);
    let config = escalate_config(&env, "backlog", &url, "stub-llm", |c| {
        c.llm.max_in_flight = 8;
        c.llm.max_concurrent_requests = 4;
    });
    let port = triage::local::free_port().unwrap();
    let address = format!("127.0.0.1:{port}");
    let mut escalate = env.spawn_command("escalate", &config, "escalate-backlog", &[("TRIAGE_METRICS__ADDRESS", address.as_str())]);
    let mut peak = 0.0f64;
    env.wait_for(&mut escalate, "the backlog answered", Duration::from_secs(180), || {
        let (_, body) = common::worker::http_get(port, "/metrics");
        if let Some(v) =
            body.lines().find(|l| l.starts_with("triage_in_flight_messages ")).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        {
            peak = peak.max(v);
        }
        escalate_caught_up(&env)
    });
    let kafka = triage::config::KafkaConfig { group_id: format!("{}-llm", env.group), ..env.kafka_config() };
    let committed = committed_offset(&kafka, "triage.escalations");
    let ends = env.kafka.end_offsets("triage.escalations");
    assert_eq!(
        env.query_u64("SELECT count() FROM results FINAL WHERE answered_by = 'llm:stub-llm'"),
        600,
        "committed {committed:?}, end offsets {ends:?}, calls {}",
        seen.lock().unwrap().len()
    );
    assert!(seen.lock().unwrap().len() >= 600);
    eprintln!("peak in-flight: {peak}");
    assert!(peak > 0.0, "the gauge was read");
    assert!(peak <= 16.0, "in flight peaked at {peak} with max_in_flight 8");
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
}

/// Issue 22: only finished calls counted against the hourly cap, so max_concurrent_requests
/// calls could all start just under it. Now each call holds its estimate from the start: with
/// four slots and a cap below one call's estimate, one call runs (nothing was spent) and the
/// other three wait.
#[test]
fn concurrent_calls_cannot_all_start_under_the_cap() {
    let env = escalate_env("escalate_cap_concurrent");
    env.produce("triage.escalations", &(1..=4).map(|o| record(o, &format!("SLOW card question {o}"))).collect::<Vec<_>>());
    let (url, seen) = scripted_llm(None);
    let config = escalate_config(&env, "capc", &url, "stub-llm", |c| {
        c.llm.max_concurrent_requests = 4;
        c.llm.prompt_price_per_million = 1_000_000.0;
        c.llm.completion_price_per_million = 1_000_000.0;
        c.llm.max_spend_per_hour = Some(50.0);
    });
    let mut escalate = env.spawn_command("escalate", &config, "escalate-capc", &[]);
    env.wait_for(&mut escalate, "the first answer stored", Duration::from_secs(60), || {
        env.query_u64("SELECT count() FROM results WHERE answered_by = 'llm:stub-llm'") == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(seen.lock().unwrap().len(), 1, "one call started; three waited for the cap: {:?}", seen.lock().unwrap());
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
}

/// Issue 22: a reply without `usage` counted 0 tokens (and cost nothing against the cap). Now it
/// counts the call's estimate, which the row carries.
#[test]
fn a_reply_without_usage_counts_its_estimate() {
    let env = escalate_env("escalate_nousage");
    env.produce("triage.escalations", &[record(1, "NOUSAGE where is my card")]);
    let (url, _seen) = scripted_llm(None);
    let config = escalate_config(&env, "nousage", &url, "stub-llm", |c| c.llm.max_tokens = 200);
    let mut escalate = env.spawn_command("escalate", &config, "escalate-nousage", &[]);
    env.wait_for(&mut escalate, "the answer stored", Duration::from_secs(60), || {
        env.query_u64("SELECT count() FROM results WHERE answered_by = 'llm:stub-llm'") == 1
    });
    let prompt = env.query_u64("SELECT toUInt64(llm_prompt_tokens) FROM results WHERE answered_by = 'llm:stub-llm'");
    let completion = env.query_u64("SELECT toUInt64(llm_completion_tokens) FROM results WHERE answered_by = 'llm:stub-llm'");
    // The prompt lists the default model's 77 labels: hundreds of tokens at 4 characters each.
    assert!(prompt > 200, "the estimated prompt tokens, not 0: {prompt}");
    assert_eq!(completion, 200, "the longest reply allowed");
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
}

/// Issue 22: the hourly cap was per process, so N replicas spent N times it and a restart
/// reset it. Every call's cost now goes to a ledger table all replicas read: a process started
/// after another spent most of the hour's cap makes no call.
#[test]
fn the_spend_cap_is_shared_through_the_ledger_across_processes_and_restarts() {
    let env = escalate_env("escalate_ledger");
    env.produce("triage.escalations", &[record(1, "card one"), record(2, "card two")]);
    let (url, seen) = scripted_llm(None);
    // 1 per token: each answered call costs 110 (the scripted usage).
    let priced = |cap: f64| {
        move |c: &mut Config| {
            c.llm.prompt_price_per_million = 1_000_000.0;
            c.llm.completion_price_per_million = 1_000_000.0;
            c.llm.max_spend_per_hour = Some(cap);
        }
    };
    let first = escalate_config(&env, "ledger1", &url, "stub-llm", priced(1e9));
    let mut escalate = env.spawn_command("escalate", &first, "escalate-ledger1", &[]);
    env.wait_for(&mut escalate, "both answered and in the ledger", Duration::from_secs(60), || {
        env.query_u64("SELECT toUInt64(sum(cost)) FROM results_llm_spend") == 220
    });
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
    let calls_before = seen.lock().unwrap().iter().filter(|(_, s)| *s == 200).count();
    assert_eq!(calls_before, 2);

    // Another process (a replica, or this one restarted) under a cap of 300: 220 already spent
    // this hour, so a call of its estimate does not fit.
    env.produce("triage.escalations", &[record(3, "card three")]);
    let second = escalate_config(&env, "ledger2", &url, "stub-llm", priced(300.0));
    let mut escalate = env.spawn_command("escalate", &second, "escalate-ledger2", &[]);
    let log = escalate.whole_log();
    env.wait_for(&mut escalate, "the cap to hold the call", Duration::from_secs(60), || log.text().contains("spend cap is reached"));
    std::thread::sleep(Duration::from_secs(2));
    let calls_after = seen.lock().unwrap().iter().filter(|(_, s)| *s == 200).count();
    assert_eq!(calls_after, calls_before, "no call: the other process's spend counts");
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
}

/// Issue 22: identical messages are common ("where is my card?"); each used to cost a call.
/// Now a repeat of an answered request is answered from the cache: its own row, no call, no
/// spend. And the request carries what reasoning models and self-hosted servers need:
/// max_completion_tokens instead of max_tokens, no temperature, a seed, reasoning_effort,
/// extra fields, and the operators' instructions for the route.
#[test]
fn identical_messages_are_answered_once_and_requests_carry_the_configured_fields() {
    let env = escalate_env("escalate_cache");
    let mut records: Vec<_> = (1..=6).map(|i| record(i, "Where is my new card?")).collect();
    records.push(record(7, "my card was eaten by the ATM"));
    records.push(record(8, "Where is my new card?!"));
    env.produce("triage.escalations", &records);
    let (url, seen, bodies) = scripted_llm_keeping_bodies(None);
    let config = escalate_config(&env, "cache", &url, "stub-llm", |c| {
        // One call at a time: the repeats queue behind the first and must find its answer.
        c.llm.max_concurrent_requests = 1;
        c.llm.token_limit_field = triage::llm::prompt::TokenLimitField::MaxCompletionTokens;
        c.llm.send_temperature = false;
        c.llm.seed = Some(7);
        c.llm.reasoning_effort = Some("low".into());
        c.llm.extra_body = json!({"top_k": 1}).as_object().unwrap().clone();
        c.llm.instructions = "Messages from a bank's app.".into();
        c.routes[0].llm_instructions = Some("Tickets, often about cards.".into());
    });
    let mut escalate = env.spawn_command("escalate", &config, "escalate-cache", &[]);
    env.wait_for(&mut escalate, "every record answered and committed", Duration::from_secs(60), || escalate_caught_up(&env));
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
    assert!(escalate.log_text().contains("cache_hits=5"), "{}", escalate.log_text());
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE answered_by = 'llm:stub-llm'"), 8, "every message its row");
    let answered: Vec<String> = seen.lock().unwrap().iter().filter(|(_, s)| *s == 200).map(|(t, _)| t.clone()).collect();
    assert_eq!(answered.len(), 3, "three distinct texts, three calls: {answered:?}");
    // The cached answers' rows spent nothing; the calls' rows carry their tokens.
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE answered_by = 'llm:stub-llm' AND llm_prompt_tokens = 0"), 5);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE llm_prompt_tokens = 100"), 3);

    let bodies = bodies.lock().unwrap();
    let body = &bodies[0];
    assert_eq!(
        (&body["max_completion_tokens"], &body["seed"], &body["reasoning_effort"], &body["top_k"]),
        (&json!(256), &json!(7), &json!("low"), &json!(1))
    );
    assert!(body.get("max_tokens").is_none() && body.get("temperature").is_none(), "{body}");
    let system = body["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.contains("About these messages: Messages from a bank's app.\nAbout these messages: Tickets, often about cards.\n"),
        "{system}"
    );
}

/// Issue 22: a first deployment over a months-old escalation topic should not pay for the
/// backlog: llm.skip_older_than_hours settles records escalated before the cutoff without a
/// call, counts them, and commits them; newer ones are answered.
#[test]
fn a_backlog_older_than_the_cutoff_is_skipped_counted_and_committed() {
    let env = escalate_env("escalate_fromnow");
    let hours_ago = |h: i64| chrono_free_now_ms() - h * 3_600_000;
    env.produce_at("triage.escalations", &[record(1, "old card one"), record(2, "old card two")], Some(hours_ago(30)));
    env.produce_at("triage.escalations", &[record(3, "recent card three")], Some(hours_ago(1)));
    env.produce("triage.escalations", &[record(4, "new card four")]);
    let (url, seen) = scripted_llm(None);
    let config = escalate_config(&env, "fromnow", &url, "stub-llm", |c| {
        c.llm.skip_older_than_hours = Some(24.0);
    });
    let mut escalate = env.spawn_command("escalate", &config, "escalate-fromnow", &[]);
    env.wait_for(&mut escalate, "every record settled and committed", Duration::from_secs(60), || escalate_caught_up(&env));
    assert_eq!(escalate.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", escalate.log_text());
    let answered: Vec<String> = seen.lock().unwrap().iter().filter(|(_, s)| *s == 200).map(|(t, _)| t.clone()).collect();
    assert_eq!(answered.len(), 2, "{answered:?}");
    assert!(answered.iter().all(|t| !t.contains("old card")), "{answered:?}");
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE answered_by = 'llm:stub-llm'"), 2);
    assert!(reasons(&env).is_empty(), "skipped, not dead-lettered");
    let log = escalate.log_text();
    assert!(log.contains("skipped=2"), "the report counts them: {log}");
}

fn chrono_free_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A scripted OpenAI Batch API, written from its reference: `POST /v1/files` (multipart, purpose
/// batch), `POST /v1/batches`, `GET /v1/batches/ID` (`in_progress` until released, then
/// `completed` with an output file), `GET /v1/files/ID/content` (every request answered
/// `{"intent": "card_arrival"}` with usage).
struct BatchApi {
    url: String,
    /// The custom ids of each uploaded file.
    uploads: Arc<Mutex<Vec<Vec<String>>>>,
    created: Arc<std::sync::atomic::AtomicUsize>,
    polls: Arc<std::sync::atomic::AtomicUsize>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

fn batch_api() -> BatchApi {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let listener = runtime().block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let api = BatchApi {
        url: format!("http://{}/v1", listener.local_addr().unwrap()),
        uploads: Arc::default(),
        created: Arc::new(AtomicUsize::new(0)),
        polls: Arc::new(AtomicUsize::new(0)),
        release: Arc::new(AtomicBool::new(false)),
    };
    let (uploads, created, polls, release) = (api.uploads.clone(), api.created.clone(), api.polls.clone(), api.release.clone());
    // file id -> custom ids; batch id -> its input file.
    let files: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let batches: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    runtime().spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let (uploads, created, polls, release, files, batches) =
                (uploads.clone(), created.clone(), polls.clone(), release.clone(), files.clone(), batches.clone());
            tokio::spawn(async move {
                let Some((head, body)) = read_request(&mut socket).await else { return };
                let body = String::from_utf8_lossy(&body).to_string();
                let request_line = head.lines().next().unwrap_or_default().to_string();
                let mut parts = request_line.split(' ');
                let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                let batch_json = |id: &str, done: bool| {
                    let mut b = json!({"id": id, "object": "batch", "endpoint": "/v1/chat/completions", "status": if done { "completed" } else { "in_progress" }});
                    if done {
                        b["output_file_id"] = json!(format!("out-{id}"));
                    }
                    b.to_string()
                };
                let (status, payload) = match (method, path) {
                    ("POST", "/v1/files") => {
                        // The JSONL part: after the file part's headers, up to the closing boundary.
                        let ids: Vec<String> = body
                            .lines()
                            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
                            .filter_map(|v| v["custom_id"].as_str().map(str::to_owned))
                            .collect();
                        assert!(body.contains("name=\"purpose\"") && body.contains("batch"), "purpose=batch");
                        let id = format!("file-{}", files.lock().unwrap().len() + 1);
                        uploads.lock().unwrap().push(ids.clone());
                        files.lock().unwrap().insert(id.clone(), ids);
                        (200, json!({"id": id, "object": "file", "purpose": "batch"}).to_string())
                    }
                    ("POST", "/v1/batches") => {
                        let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        let file = request["input_file_id"].as_str().unwrap_or_default().to_string();
                        assert_eq!(request["endpoint"], "/v1/chat/completions");
                        let n = created.fetch_add(1, Ordering::SeqCst) + 1;
                        let id = format!("batch-{n}");
                        batches.lock().unwrap().insert(id.clone(), file);
                        (200, batch_json(&id, false))
                    }
                    ("GET", p) if p.starts_with("/v1/batches/") => {
                        polls.fetch_add(1, Ordering::SeqCst);
                        let id = p.trim_start_matches("/v1/batches/");
                        if batches.lock().unwrap().contains_key(id) {
                            (200, batch_json(id, release.load(Ordering::SeqCst)))
                        } else {
                            (404, json!({"error": {"message": "No such batch"}}).to_string())
                        }
                    }
                    ("GET", p) if p.starts_with("/v1/files/out-") && p.ends_with("/content") => {
                        let batch = p.trim_start_matches("/v1/files/out-").trim_end_matches("/content");
                        let file = batches.lock().unwrap().get(batch).cloned().unwrap_or_default();
                        let ids = files.lock().unwrap().get(&file).cloned().unwrap_or_default();
                        let lines: Vec<String> = ids
                            .iter()
                            .map(|id| {
                                json!({"id": format!("req-{id}"), "custom_id": id, "error": null, "response": {"status_code": 200, "body": {
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "{\"intent\": \"card_arrival\"}"}}],
                                    "usage": {"prompt_tokens": 100, "completion_tokens": 10}}}})
                                .to_string()
                            })
                            .collect();
                        (200, lines.join("\n") + "\n")
                    }
                    _ => (404, json!({"error": {"message": format!("no route {method} {path}")}}).to_string()),
                };
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                    payload.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    api
}

/// Issue 22: the OpenAI Batch API (half price). Records are collected into one batch, which is
/// recorded in ClickHouse before anything waits on it; a process killed while the batch runs is
/// replaced by one that finds the batch, waits for it, and stores its answers: every message
/// answered once, nothing submitted twice, everything committed.
#[test]
fn batch_mode_survives_a_sigkill_mid_batch_without_losing_or_repeating_a_request() {
    use std::sync::atomic::Ordering;
    let env = escalate_env("escalate_batch");
    let records: Vec<_> = (1..=6).map(|i| record(i, &format!("card question {i}"))).collect();
    env.produce("triage.escalations", &records);
    let api = batch_api();
    let config = escalate_config(&env, "batch", &api.url, "gpt-4o-mini", |c| {
        c.llm.mode = triage::llm::config::LlmMode::Batch;
        c.llm.batch_max_requests = 6;
        c.llm.batch_max_wait_ms = 60_000;
        c.llm.batch_poll_interval_ms = 200;
    });
    let mut first = env.spawn_command("escalate", &config, "escalate-batch-1", &[]);
    env.wait_for(&mut first, "one batch of six submitted and recorded", Duration::from_secs(60), || {
        api.created.load(Ordering::SeqCst) == 1 && env.query_u64("SELECT count() FROM results_llm_batches WHERE state = 'submitted'") == 6
    });
    assert_eq!(api.uploads.lock().unwrap()[0].len(), 6);
    first.kill9();
    let polls_before = api.polls.load(Ordering::SeqCst);

    let mut second = env.spawn_command("escalate", &config, "escalate-batch-2", &[]);
    env.wait_for(&mut second, "the restarted process to poll the recorded batch", Duration::from_secs(60), || {
        api.polls.load(Ordering::SeqCst) > polls_before + 2
    });
    assert!(second.log_text().contains("resuming a batch"), "{}", second.log_text());
    api.release.store(true, Ordering::SeqCst);
    env.wait_for(&mut second, "every answer stored and committed", Duration::from_secs(60), || escalate_caught_up(&env));
    assert_eq!(second.terminate(Duration::from_secs(30)), Some(Exit::OK), "{}", second.log_text());

    assert_eq!(api.created.load(Ordering::SeqCst), 1, "the batch was not submitted again");
    let submitted: usize = api.uploads.lock().unwrap().iter().map(Vec::len).sum();
    assert_eq!(submitted, 6, "no request sent twice");
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE answered_by = 'llm:gpt-4o-mini'"), 6);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE llm_prompt_tokens = 100"), 6, "the batch's usage is kept");
    assert!(reasons(&env).is_empty(), "{:?}", reasons(&env));
    assert_eq!(env.query_u64("SELECT count() FROM results_llm_batches WHERE state = 'collected'"), 1, "marked collected once taken");
}
