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
    // On the CPU, with no threads set in the model: a session per core, one thread each.
    assert_eq!(EngineConfig { cores: Some(4), ..EngineConfig::default() }.sessions_for(&model), (4, Some(1)));
    let texts = Arc::new(texts(600));
    let expected: Vec<_> = texts.iter().map(|t| solo(&model, t)).collect();
    let config = EngineConfig {
        policy: BatchPolicy { max_batch_size: 16, max_batch_tokens: 512, max_wait_ms: 2, bucket_window: 3, ..BatchPolicy::default() },
        tokenizer_threads: 3,
        inference_threads: 2,
        queue_capacity: 8,
        ..EngineConfig::default()
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

/// `triage bench` takes b/a apart by replaying the worker's own batches on the model alone:
/// that is only sound if the engine records every batch it ran, with its members' true token
/// lengths, and if the replay rebuilds exactly those shapes.
#[test]
fn recorded_batches_are_every_batch_with_its_token_lengths_and_replay_rebuilds_those_shapes() {
    let model = common::load(&common::test_model_dir("multihead-tiny"));
    let texts = texts(300);
    let run = |record_batches: bool| {
        let config = EngineConfig {
            policy: BatchPolicy { max_batch_size: 16, max_batch_tokens: 512, max_wait_ms: 2, bucket_window: 3, ..BatchPolicy::default() },
            inference_threads: 2,
            record_batches,
            ..EngineConfig::default()
        };
        let (tx, rx) = flume::bounded(8);
        let engine = Engine::start(model.clone(), &config, tx).unwrap();
        let submitter = engine.submitter();
        // The first message alone, answered before the rest: a batch of one is recorded too.
        submitter.submit(0, rendered(&texts[0])).unwrap();
        rx.recv().unwrap().result.unwrap();
        let feeder = {
            let texts = texts.clone();
            std::thread::spawn(move || {
                for (i, t) in texts.iter().enumerate().skip(1) {
                    submitter.submit(i, rendered(t)).unwrap();
                }
            })
        };
        for _ in 1..texts.len() {
            rx.recv().unwrap().result.unwrap();
        }
        feeder.join().unwrap();
        let (handle, stats) = (engine.stats_handle(), engine.stats());
        engine.shutdown();
        (handle.recorded_batches(), stats)
    };
    let (unrecorded, _) = run(false);
    assert!(unrecorded.is_empty(), "nothing is kept unless asked: {} batches", unrecorded.len());

    let (recorded, stats) = run(true);
    assert_eq!(recorded.len() as u64, stats.batches, "one entry per batch");
    assert_eq!(recorded[0], vec![model.encoder().encode(&texts[0]).unwrap().len()], "the lone first message's batch");
    assert!(recorded.iter().all(|b| !b.is_empty() && b.len() <= 16), "batch sizes within the cap");
    let mut lengths: Vec<usize> = recorded.iter().flatten().copied().collect();
    let mut expected: Vec<usize> = texts.iter().map(|t| model.encoder().encode(t).unwrap().len()).collect();
    lengths.sort_unstable();
    expected.sort_unstable();
    assert_eq!(lengths, expected, "every message once, with its own token length");
    let padded: usize = recorded.iter().map(|b| b.len() * b.iter().max().unwrap()).sum();
    assert_eq!(padded as u64, stats.padded_tokens, "the padding the engine counted");

    // The replay, on the texts as the bench renders messages.
    let messages: Vec<serde_json::Value> = texts.iter().map(|t| serde_json::json!({ "body": t })).collect();
    let encoded = triage::bench::pretokenize(&model, &messages);
    let available: std::collections::HashSet<usize> = encoded.iter().map(|e| e.len()).collect();
    let replayable: Vec<Vec<usize>> = recorded.iter().filter(|b| b.iter().all(|l| available.contains(l))).cloned().collect();
    assert!(replayable.len() * 2 > recorded.len(), "most batches replayable from the rendered messages");
    let replayed =
        triage::bench::replay(&model, &encoded, &replayable, &EngineConfig { inference_threads: 2, ..EngineConfig::default() }).unwrap();
    let real: usize = replayable.iter().flatten().sum();
    let padded: usize = replayable.iter().map(|b| b.len() * b.iter().max().unwrap()).sum();
    assert_eq!(replayed.messages, replayable.iter().map(Vec::len).sum::<usize>());
    assert_eq!(replayed.tokens, real as u64);
    assert!((replayed.padding_ratio - padded as f64 / real as f64).abs() < 1e-12, "{}", replayed.padding_ratio);
    assert!(replayed.inference_seconds > 0.0 && replayed.inference_seconds <= 2.0 * replayed.seconds + 1e-3);

    // A length the messages cannot give is refused, not replayed as something else.
    let impossible = vec![vec![100_000]];
    let err = triage::bench::replay(&model, &encoded, &impossible, &EngineConfig::default()).unwrap_err();
    assert!(err.to_string().contains("100000-token message"), "{err}");
}
