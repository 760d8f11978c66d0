//! The engine under concurrency: every result returns to its own message, whatever order
//! batches finish in; huge and empty texts; backpressure through bounded queues.

mod common;

use std::sync::Arc;

use triage::batcher::BatchPolicy;
use triage::engine::{Engine, EngineConfig};
use triage::model::{Model, Rendered};

fn rendered(text: &str) -> Rendered {
    Rendered { text: text.to_string(), cut: false, has_text: !text.trim().is_empty() }
}

fn solo(model: &Model, text: &str) -> triage::Prediction {
    let enc = model.encoder().encode(text).unwrap();
    model.session().unwrap().run(&[&enc]).unwrap().pop().unwrap()
}

fn texts(n: usize) -> Vec<String> {
    let words = ["refund", "parcel", "late", "login", "broken", "invoice", "card", "charged", "twice", "password", "return", "label"];
    (0..n).map(|i| (0..(1 + (i * 7) % 40)).map(|j| words[(i * 3 + j * 5) % words.len()]).collect::<Vec<_>>().join(" ")).collect()
}

#[test]
fn results_map_back_to_their_messages_under_concurrency() {
    let model = common::load(&common::test_model_dir("multihead-tiny"));
    let texts = Arc::new(texts(600));
    let expected: Vec<_> = texts.iter().map(|t| solo(&model, t)).collect();
    let config = EngineConfig {
        policy: BatchPolicy { max_batch_size: 16, max_batch_tokens: 512, max_wait_ms: 2, bucket_window: 3, ..BatchPolicy::default() },
        tokenizer_threads: 3,
        inference_threads: 2,
        queue_capacity: 8,
        cores: None,
        nice: None,
    };
    let (tx, rx) = flume::bounded(8);
    let engine = Engine::start(model.clone(), &config, tx).unwrap();
    // Four producers interleave their submissions.
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let submitter = engine.submitter();
            let texts = texts.clone();
            std::thread::spawn(move || {
                for i in (p..texts.len()).step_by(4) {
                    submitter.submit(i, rendered(&texts[i])).unwrap();
                }
            })
        })
        .collect();
    let mut seen = vec![false; texts.len()];
    for _ in 0..texts.len() {
        let outcome = rx.recv().unwrap();
        let i = outcome.tag;
        assert!(!seen[i], "message {i} came back twice");
        seen[i] = true;
        let got = outcome.result.unwrap().prediction;
        let want = &expected[i];
        assert_eq!(got.category.as_ref().map(|c| &c.label), want.category.as_ref().map(|c| &c.label), "message {i}");
        let (a, b) = (got.category.unwrap().score, want.category.as_ref().unwrap().score);
        assert!((a - b).abs() < 1e-5, "message {i}: batched {a} vs alone {b}");
        assert_eq!(got.priority, want.priority, "message {i}");
        assert_eq!(got.tags.iter().map(|t| &t.label).collect::<Vec<_>>(), want.tags.iter().map(|t| &t.label).collect::<Vec<_>>());
    }
    for p in producers {
        p.join().unwrap();
    }
    let stats = engine.stats();
    engine.shutdown();
    assert!(seen.iter().all(|&s| s));
    assert_eq!(stats.classified, 600);
    assert!(stats.batches >= 600 / 16, "batches of at most 16: {}", stats.batches);
    assert!(stats.mean_batch_size() > 1.5, "dynamic batching formed real batches: {}", stats.mean_batch_size());
}

#[test]
fn a_one_megabyte_text_is_truncated_not_rejected() {
    let model = common::default_model();
    let (tx, rx) = flume::bounded(4);
    let engine = Engine::start(model.clone(), &EngineConfig::default(), tx).unwrap();
    let huge = "please refund my order ".repeat((1 << 20) / 23);
    assert!(huge.len() > 1_000_000);
    let decoder = triage::message::Decoder::new(Default::default(), model.template().clone(), 2 << 20, model.encoder().max_chars());
    let msg = decoder.decode(serde_json::json!({ "body": huge }).to_string().as_bytes()).unwrap();
    assert!(msg.text.cut && msg.text.text.len() <= model.encoder().max_chars() * 4);
    engine.submit("huge", msg.text).unwrap();
    engine.submit("short", rendered("card lost")).unwrap();
    let mut got = std::collections::HashMap::new();
    for _ in 0..2 {
        let o = rx.recv().unwrap();
        got.insert(o.tag, o.result.unwrap());
    }
    engine.shutdown();
    assert!(got["huge"].truncated);
    assert_eq!(got["huge"].tokens, 128);
    assert!(!got["short"].truncated);
}

#[test]
fn an_empty_text_still_gets_an_answer() {
    // Decoding rejects empty messages before they reach the model; the engine itself must
    // still answer (with [CLS][SEP] only) rather than hang or panic.
    let model = common::load(&common::test_model_dir("optimum-tiny"));
    let (tx, rx) = flume::bounded(4);
    let engine = Engine::start(model, &EngineConfig::default(), tx).unwrap();
    engine.submit(1, rendered("")).unwrap();
    let outcome = rx.recv().unwrap();
    engine.shutdown();
    assert_eq!(outcome.result.unwrap().tokens, 2);
}

#[test]
fn shutdown_delivers_everything_in_flight() {
    let model = common::load(&common::test_model_dir("optimum-tiny"));
    let (tx, rx) = flume::unbounded();
    // A long max_wait: only the flush at shutdown can release these.
    let config = EngineConfig { policy: BatchPolicy { max_wait_ms: 60_000, ..BatchPolicy::default() }, ..EngineConfig::default() };
    let engine = Engine::start(model, &config, tx).unwrap();
    for i in 0..10 {
        engine.submit(i, rendered("where is my parcel")).unwrap();
    }
    engine.shutdown();
    let tags: std::collections::BTreeSet<_> = rx.try_iter().map(|o| o.tag).collect();
    assert_eq!(tags, (0..10).collect());
}
