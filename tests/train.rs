//! `triage train` and `triage eval` end to end, as a user runs them: a labelled CSV made here
//! (four support queues with their own vocabulary, a priority, free tags), trained over the
//! project's encoder, evaluated, and served by the worker unchanged (real ClickHouse, mock Kafka).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const QUEUES: &[(&str, &[&str], &[&str])] = &[
    (
        "billing",
        &["Invoice question", "Charged twice", "Refund please", "Payment problem"],
        &[
            "I was charged twice for my subscription this month",
            "the invoice shows the wrong amount",
            "please refund the extra payment on my credit card",
            "my card was billed but the order was cancelled",
            "why is there a late fee on my statement",
            "the payment failed but money left my account",
        ],
    ),
    (
        "shipping",
        &["Where is my parcel", "Delivery delayed", "Tracking number", "Courier issue"],
        &[
            "my package has not arrived and tracking shows no update",
            "the courier left the parcel at the wrong address",
            "delivery was promised for monday and it is now friday",
            "the tracking number you sent does not work",
            "can you ship to a different address",
            "the box arrived crushed by the delivery driver",
        ],
    ),
    (
        "account",
        &["Cannot log in", "Password reset", "Two-factor problem", "Account locked"],
        &[
            "I cannot sign in to my account after the update",
            "the password reset email never arrives",
            "my two-factor code is always rejected",
            "the app says my account is locked",
            "how do I change the email address on my profile",
            "I get an error when I try to log in on my phone",
        ],
    ),
    (
        "returns",
        &["Return request", "Exchange size", "Damaged item", "Wrong item sent"],
        &[
            "I want to return the shoes, they are too small",
            "can I exchange this jacket for a larger size",
            "the lamp arrived broken, I want to send it back",
            "you sent me the wrong colour, how do I return it",
            "what is your return policy for opened items",
            "please send a return label for my order",
        ],
    ),
];
const FILLERS: &[&str] = &["Hello,", "Hi team,", "Good morning.", "Dear support,", ""];
const CLOSINGS: &[&str] = &["Thanks.", "Regards, Sam", "Please help.", "Best wishes", ""];

/// A labelled CSV: `rows_per_queue` per queue, a priority that follows urgent wording, tags.
fn labelled_csv(path: &Path, rows_per_queue: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["subject", "body", "queue", "priority", "tag_1", "tag_2"]).unwrap();
    for _ in 0..rows_per_queue {
        for (queue, subjects, bodies) in QUEUES {
            let urgent = rng.random_bool(0.4);
            let mobile = rng.random_bool(0.5);
            let body = format!(
                "{} {}{}{} {}",
                FILLERS.choose(&mut rng).unwrap(),
                bodies.choose(&mut rng).unwrap(),
                if mobile { " using the mobile app" } else { "" },
                if urgent { ". This is urgent, I need it fixed immediately!" } else { "." },
                CLOSINGS.choose(&mut rng).unwrap()
            );
            let priority = if urgent { "high" } else { "normal" };
            let tags = [if mobile { "mobile" } else { "" }, if urgent { "escalate" } else { "" }];
            w.write_record([subjects.choose(&mut rng).unwrap(), body.trim(), queue, priority, tags[0], tags[1]]).unwrap();
        }
    }
    w.flush().unwrap();
}

/// Texts from nowhere near support: recipes and football.
fn foreign_jsonl(path: &Path) {
    let lines = [
        "Whisk two eggs with sugar, fold in the flour and bake for twenty minutes",
        "The striker scored twice in the second half and the home side won the derby",
        "Simmer the tomatoes with garlic and basil until the sauce thickens",
        "The goalkeeper saved a penalty in the last minute of extra time",
        "Knead the dough, let it rise for an hour, then shape the loaves",
        "The league table tightened after the champions drew away from home",
        "Roast the vegetables with olive oil, rosemary and sea salt",
        "Fans sang through the rain as the cup final went to penalties",
        "Marinate the chicken overnight in yoghurt, lemon and spices",
        "The coach praised the midfield for pressing high all match",
        "Caramelise the onions slowly over a low heat for forty minutes",
        "A late header from the defender sealed promotion for the club",
    ];
    let text: String = lines.iter().map(|l| serde_json::json!({ "body": l }).to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

fn encoder() -> PathBuf {
    let dir = common::root().join("runtime/encoders/minilm-l6");
    assert!(dir.is_dir(), "{} is missing: run scripts/setup", dir.display());
    dir
}

fn triage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_triage")).args(args).env("RUST_LOG", "warn").output().expect("run triage")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_eval_and_serve_a_model_from_a_labelled_csv() {
    let dir = tempfile::tempdir().unwrap();
    let (data, foreign, model) = (dir.path().join("tickets.csv"), dir.path().join("foreign.jsonl"), dir.path().join("support-model"));
    labelled_csv(&data, 40, 7);
    foreign_jsonl(&foreign);
    let encoder = encoder();
    let train_args: Vec<&str> = vec![
        "train",
        "--data",
        s(&data),
        "--text",
        "subject,body",
        "--label",
        "queue",
        "--label",
        "priority",
        "--multi-label",
        "tags=tag_1,tag_2",
        "--encoder",
        s(&encoder),
        "--target-accuracy",
        "0.9",
        "--foreign",
        s(&foreign),
        "--foreign-text",
        "body",
    ];
    let mut args = train_args.clone();
    args.extend(["--out", s(&model)]);
    let out = triage(&args);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("embedding") && log.contains("model written to"), "progress and result are shown: {log}");

    // Far above chance (0.25 for queue, 0.5 for priority) on the held-out part.
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(model.join("metrics.json")).unwrap()).unwrap();
    let queue = &metrics["single"][0];
    assert_eq!(queue["name"], "queue");
    let accuracy = queue["validation"]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.85, "queue accuracy {accuracy}");
    assert!(metrics["single"][1]["validation"]["accuracy"].as_f64().unwrap() > 0.75, "priority: {}", metrics["single"][1]);
    assert!(queue["validation_tfidf_baseline"]["accuracy"].as_f64().is_some());
    assert!(metrics["multi"][0]["validation_micro_f1"].as_f64().unwrap() > 0.6, "tags: {}", metrics["multi"][0]);
    assert_eq!(metrics["validation_examples"].as_u64(), Some(32), "20% of 160, stratified");
    let auroc = metrics["ood"]["foreign"]["auroc"].as_f64().unwrap();
    assert!(auroc > 0.9, "recipes and football must look foreign: AUROC {auroc}");

    // The descriptor carries the calibrated thresholds; the card the comparison.
    let descriptor = triage::model::Descriptor::load(&model).unwrap();
    assert!(descriptor.escalation.as_ref().is_some_and(|e| e.target_accuracy == Some(0.9)));
    assert!(descriptor.ood.as_ref().is_some_and(|o| o.threshold > 0.0 && o.auroc.is_some()));
    let card = std::fs::read_to_string(model.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("logistic regression baseline") && card.contains("## Out-of-distribution gate"), "{card}");
    // Refitted on every row by default: figures and thresholds come from out-of-fold predictions.
    assert_eq!(metrics["refit_full"], true);
    let refit = &queue["refit"];
    assert_eq!(refit["examples"].as_u64(), Some(160));
    assert!(refit["accuracy"].as_f64().unwrap() > 0.85, "out-of-fold accuracy over every row: {refit}");
    assert!(metrics["calibrated_on"].as_str().unwrap().contains("out-of-fold"), "{}", metrics["calibrated_on"]);
    assert!(card.contains("Refitted on all 160 rows"), "{card}");
    let record = descriptor.training.as_ref().unwrap();
    assert!(record.refit_full && record.fitted.len() == 3, "settings recorded for eval: {:?}", record.fitted);

    // Few-shot examples for the LLM tier: three per label of each single-label head (the
    // default), training texts, read back by escalate's prompt.
    let few_shot = std::fs::read_to_string(model.join("few_shot.jsonl")).unwrap();
    let examples: Vec<Value> = few_shot.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let queues = descriptor.heads.iter().find(|h| h.name == "queue").unwrap().labels.len();
    let priorities = descriptor.heads.iter().find(|h| h.name == "priority").unwrap().labels.len();
    assert_eq!(examples.len(), 3 * (queues + priorities), "{few_shot}");
    let csv = std::fs::read_to_string(&data).unwrap();
    assert!(examples.iter().all(|e| csv.contains(e["text"].as_str().unwrap().split(' ').next().unwrap())), "texts of the data");
    let space = triage::llm::prompt::LabelSpace::of_model(&descriptor, &model, 2).unwrap();
    assert!(space
        .heads
        .iter()
        .filter(|h| !h.multi)
        .all(|h| h.examples.values().all(|e| e.len() == 2) && h.examples.len() == h.labels.len()));

    // The shipped heads saw the validation split: eval refits the recorded recipe on the training
    // part and scores the split exactly as training measured it in memory.
    let out = triage(&["eval", "--model", s(&model), "--data", s(&data), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let eval: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(eval["evaluated"].as_u64(), Some(32));
    assert!(eval["split"].as_str().unwrap().contains("refitted on the training part"), "{}", eval["split"]);
    for (i, head) in ["queue", "priority"].iter().enumerate() {
        assert_eq!(eval["heads"][i]["name"], *head);
        assert_eq!(eval["heads"][i]["report"]["accuracy"], metrics["single"][i]["validation"]["accuracy"], "{head}");
        assert_eq!(eval["heads"][i]["report"]["confused"], metrics["single"][i]["validation"]["confused"], "{head}");
        assert!(eval["heads"][i]["baseline"]["accuracy"].as_f64().is_some());
    }
    assert!((eval["multi"][0]["micro_f1"].as_f64().unwrap() - metrics["multi"][0]["validation_micro_f1"].as_f64().unwrap()).abs() < 1e-9);
    let human = triage(&["eval", "--model", s(&model), "--data", s(&data)]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("TF-IDF + logistic regression (same split)") && human.contains("precision"), "{human}");

    // Without the refit, the shipped heads are the training part's and eval scores them as they are.
    let partial = dir.path().join("model-train-part");
    let mut args: Vec<&str> = train_args.clone();
    args.extend(["--out", s(&partial), "--refit-full", "false", "--lexical-features", "word-pieces"]);
    let out = triage(&args);
    assert!(out.status.success(), "{}", text(&out));
    let partial_metrics: Value = serde_json::from_str(&std::fs::read_to_string(partial.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(partial_metrics["refit_full"], false);
    assert_eq!(partial_metrics["single"][0]["lexical_features"], "word_pieces");
    assert!(partial_metrics["single"][0]["refit"].is_null());
    let out = triage(&["eval", "--model", s(&partial), "--data", s(&data), "--json"]);
    let partial_eval: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!partial_eval["split"].as_str().unwrap().contains("refitted"), "{}", partial_eval["split"]);
    assert_eq!(partial_eval["heads"][0]["report"]["accuracy"], partial_metrics["single"][0]["validation"]["accuracy"]);

    // The two as a cascade (same data and split): every message answered by one tier, figures
    // side by side; a model with another split is refused with what differs.
    let pair = format!("{},{}", s(&partial), s(&model));
    let out = triage(&["eval", "--cascade", &pair, "--data", s(&data), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let cascade: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cascade["evaluated"].as_u64(), Some(32));
    let tiers = cascade["tiers"].as_array().unwrap();
    assert_eq!(tiers.len(), 2);
    let answered: f64 = tiers.iter().map(|t| t["answered_in_cascade"].as_f64().unwrap()).sum();
    assert!((answered - 1.0).abs() < 1e-9, "every message is answered by exactly one tier: {cascade}");
    assert_eq!(tiers[0]["answered_in_cascade"].as_f64().unwrap(), 1.0 - tiers[0]["doubted"].as_f64().unwrap());
    assert_eq!(tiers[1]["refitted"], true);
    assert!(tiers.iter().all(|t| t["messages_per_second"].as_f64().unwrap() > 0.0));
    assert!(cascade["accuracy"].as_f64().unwrap() > 0.85 && cascade["messages_per_second"].as_f64().unwrap() > 0.0);
    let human = triage(&["eval", "--cascade", &pair, "--data", s(&data)]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("cascade vs support-model alone"), "{}", text(&human));
    let other_split = dir.path().join("model-other-split");
    let mut args: Vec<&str> = train_args.clone();
    args.extend(["--out", s(&other_split), "--seed", "7", "--refit-full", "false"]);
    assert!(triage(&args).status.success());
    let out = triage(&["eval", "--cascade", &format!("{},{}", s(&other_split), s(&model)), "--data", s(&data)]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not trained on the same data and split") && text(&out).contains("seed 42 vs 7"), "{}", text(&out));

    // The worker serves the directory as it is: rows land with its labels and an OOD score;
    // foreign messages are escalated as out of distribution.
    let ch = common::worker::shared_clickhouse();
    let env = common::worker::Env::new("trained", ch.url());
    env.apply_schema();
    env.kafka.create_topic("tickets", 1).unwrap();
    let mut messages: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            let (_, subjects, bodies) = QUEUES[i % 4];
            (
                format!("t-{i}"),
                serde_json::json!({"id": format!("t-{i}"), "subject": subjects[0], "body": bodies[i % bodies.len()]})
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect();
    messages.push((
        "f-1".into(),
        serde_json::json!({"id": "f-1", "body": "Whisk the eggs and fold in the melted chocolate, then bake"}).to_string().into_bytes(),
    ));
    env.produce("tickets", &messages);
    let config = env.write_config("trained", &model, &["tickets"], |_| {});
    let mut worker = env.spawn_worker(&config, "trained");
    env.wait_caught_up(&mut worker, &["tickets"], Duration::from_secs(180));
    assert_eq!(worker.terminate(Duration::from_secs(60)), Some(common::worker::Exit::OK), "{}", worker.log_text());
    assert_eq!(env.distinct_rows(), 13);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE category IN ('billing', 'shipping', 'account', 'returns')"), 13);
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE priority IN ('high', 'normal')"), 13, "priority head");
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE isNotNull(ood_score)"), 13);
    let correct = env.query_u64(
        "SELECT count() FROM results FINAL WHERE message_id LIKE 't-%' AND \
         category = ['billing', 'shipping', 'account', 'returns'][toUInt32(substring(message_id, 3)) % 4 + 1]",
    );
    assert!(correct >= 11, "{correct}/12 in-domain messages routed to their queue");
    assert_eq!(env.query_u64("SELECT count() FROM results FINAL WHERE message_id = 'f-1' AND escalated = 1"), 1, "the recipe is escalated");
    let escalated = env.query_u64("SELECT sum(escalated) FROM results FINAL") as usize;
    let escalations = env.read_topic_to_end("triage.escalations");
    assert_eq!(escalations.len(), escalated);
    let recipe = escalations
        .iter()
        .map(|(_, payload, _)| serde_json::from_slice::<Value>(payload).unwrap())
        .find(|v| v["message_id"] == "f-1")
        .expect("escalation record for the recipe");
    assert_eq!(recipe["reason"]["why"], "out_of_distribution", "{recipe}");
}

#[test]
fn bad_input_gets_clear_errors_and_warnings_with_row_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tickets.csv");
    labelled_csv(&data, 12, 3);
    // Rows with problems appended: an empty text, a rare label, a cut-off row.
    let mut raw = std::fs::read_to_string(&data).unwrap();
    raw.push_str(",,billing,normal,,\nVIP,please call me,vip-desk,high,,\nCut off,no label");
    std::fs::write(&data, raw).unwrap();
    let out_dir = dir.path().join("m");

    let out = triage(&[
        "train",
        "--data",
        s(&data),
        "--text",
        "subject,body",
        "--label",
        "team",
        "--encoder",
        s(&encoder()),
        "--out",
        s(&out_dir),
    ]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("unknown column(s) team") && msg.contains("subject, body, queue"), "{msg}");

    let out = triage(&["train", "--data", s(&data), "--text", "subject,body", "--encoder", s(&encoder()), "--out", s(&out_dir)]);
    assert!(!out.status.success() && text(&out).contains("--label"), "{}", text(&out));

    let out = triage(&["train", "--data", s(&dir.path().join("nope.csv")), "--text", "body", "--label", "queue", "--out", s(&out_dir)]);
    assert!(!out.status.success() && text(&out).contains("nope.csv"), "{}", text(&out));

    let out = triage(&[
        "train",
        "--data",
        s(&data),
        "--text",
        "subject,body",
        "--label",
        "queue",
        "--encoder",
        s(&encoder()),
        "--out",
        s(&out_dir),
        "--lexical",
        "off",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("empty text (rows 49)"), "{log}");
    assert!(log.contains("missing fields (a cut-off row?) (rows 51)"), "{log}");
    assert!(log.contains("fewer than 5 examples left out: vip-desk (1)"), "{log}");
    let descriptor = triage::model::Descriptor::load(&out_dir).unwrap();
    assert!(!descriptor.heads[0].labels.contains(&"vip-desk".to_string()));
    assert_eq!(descriptor.heads[0].lexical_share, None, "--lexical off");

    // An existing model is not overwritten by accident.
    let again = triage(&[
        "train",
        "--data",
        s(&data),
        "--text",
        "subject,body",
        "--label",
        "queue",
        "--encoder",
        s(&encoder()),
        "--out",
        s(&out_dir),
    ]);
    assert!(!again.status.success() && text(&again).contains("--force"), "{}", text(&again));

    // A label column with one usable label cannot train a classifier.
    let one = dir.path().join("one.csv");
    std::fs::write(&one, "body,queue\n".to_string() + &"refund my order,billing\n".repeat(8)).unwrap();
    let out = triage(&[
        "train",
        "--data",
        s(&one),
        "--text",
        "body",
        "--label",
        "queue",
        "--encoder",
        s(&encoder()),
        "--out",
        s(&dir.path().join("x")),
    ]);
    assert!(!out.status.success() && text(&out).contains("two or more"), "{}", text(&out));
}

/// `--validation-fold K/N`: the runs 1/N..N/N hold out every row exactly once (their pooled
/// validation figures are out of fold), the fold is recorded, and `triage eval` scores the
/// model on the same fold.
#[test]
fn validation_folds_hold_out_every_row_once_and_eval_scores_the_recorded_fold() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tickets.csv");
    labelled_csv(&data, 30, 11);
    let encoder = encoder();
    let base =
        ["train", "--data", s(&data), "--text", "subject,body", "--label", "queue", "--encoder", s(&encoder), "--refit-full", "false"];
    let mut held = Vec::new();
    for fold in ["1/2", "2/2"] {
        let model = dir.path().join(format!("fold-{}", &fold[..1]));
        let mut args = base.to_vec();
        args.extend(["--validation-fold", fold, "--out", s(&model)]);
        let out = triage(&args);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(&format!("fold {} of 2", &fold[..1])), "the split is said: {}", text(&out));
        let metrics: Value = serde_json::from_str(&std::fs::read_to_string(model.join("metrics.json")).unwrap()).unwrap();
        let rows: Vec<u64> = metrics["validation_data_rows"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
        assert_eq!(rows.len(), 60, "fold {fold}: half of 120 rows held out");
        held.extend(rows);
        let record = triage::model::Descriptor::load(&model).unwrap().training.unwrap();
        assert_eq!(record.validation_fold.as_deref(), Some(fold));
        assert!(std::fs::read_to_string(model.join("MODEL_CARD.md")).unwrap().contains(&format!("fold {} of 2", &fold[..1])));

        let out = triage(&["eval", "--model", s(&model), "--data", s(&data), "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let eval: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(eval["evaluated"].as_u64(), Some(60), "eval holds out the recorded fold");
        assert!(eval["split"].as_str().unwrap().contains(&format!("fold {} of 2", &fold[..1])), "{}", eval["split"]);
        assert_eq!(eval["heads"][0]["report"]["accuracy"], metrics["single"][0]["validation"]["accuracy"], "fold {fold}");
    }
    held.sort_unstable();
    let rows_in_file = held.len();
    held.dedup();
    assert_eq!(held.len(), rows_in_file, "no row held out twice");
    assert_eq!(held.len(), 120, "every row held out once");

    let refused = dir.path().join("refused");
    for (flags, says) in [
        (vec!["--validation-fold", "3/2"], "validation fold `3/2`"),
        (vec!["--validation-fold", "1/3", "--validation-fraction", "0.3"], "cannot be used with"),
    ] {
        let mut args = base.to_vec();
        args.extend(flags.iter().copied());
        args.extend(["--out", s(&refused)]);
        let out = triage(&args);
        assert!(!out.status.success() && text(&out).contains(says), "{flags:?}: {}", text(&out));
    }
}

#[test]
fn the_default_model_was_built_by_triage_train_and_carries_its_gates() {
    let d = triage::model::Descriptor::load(&common::default_model_dir()).unwrap();
    let record = d.training.expect("the default model records how triage train built it");
    assert_eq!(record.labels, ["intent=category"]);
    assert!(d.escalation.is_some() && d.ood.is_some());
    assert!(d.heads[0].weights.is_some(), "computed head");
    // With Banking77 at hand, eval re-derives the split (and refits the heads on its training
    // part) and must reproduce the recorded accuracy: to a few messages, because the int8
    // encoder's per-batch activation scale lets an embedding move with its batch neighbours.
    let data = common::shared_data("banking77/train.csv");
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(common::default_model_dir().join("metrics.json")).unwrap()).unwrap();
    let out = triage(&["eval", "--model", s(&common::default_model_dir()), "--data", s(&data), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let eval: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (derived, recorded) =
        (eval["heads"][0]["report"]["accuracy"].as_f64().unwrap(), metrics["single"][0]["validation"]["accuracy"].as_f64().unwrap());
    let evaluated = eval["evaluated"].as_f64().unwrap();
    assert!((derived - recorded).abs() * evaluated <= 3.0, "eval {derived} vs recorded {recorded} on {evaluated} messages");
    assert!(eval["split"].as_str().unwrap().contains("refitted"), "{}", eval["split"]);
    assert!(derived > 0.9);
}

fn train_python() -> PathBuf {
    let python = common::root().join(triage::train::fine_tune::DEFAULT_PYTHON);
    assert!(python.exists(), "{} is missing: run scripts/setup --tests (it makes .venv-train)", python.display());
    python
}

#[test]
fn fine_tuning_moves_the_encoder_quantizes_it_and_the_card_sets_it_beside_the_frozen_model() {
    let dir = tempfile::tempdir().unwrap();
    let (data, frozen, tuned) = (dir.path().join("tickets.csv"), dir.path().join("frozen"), dir.path().join("tuned"));
    labelled_csv(&data, 16, 11);
    let encoder = encoder();
    let python = train_python();
    let common_args = ["train", "--data", s(&data), "--text", "subject,body", "--label", "queue", "--encoder", s(&encoder)];
    let mut args = common_args.to_vec();
    args.extend(["--out", s(&frozen), "--refit-full", "false"]);
    let out = triage(&args);
    assert!(out.status.success(), "{}", text(&out));

    let mut args = common_args.to_vec();
    args.extend(["--out", s(&tuned), "--fine-tune", "--fine-tune-epochs", "2", "--fine-tune-batch", "8"]);
    args.extend(["--fine-tune-python", s(&python), "--compare", s(&frozen)]);
    let out = triage(&args);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("fine-tuning") && log.contains("epoch 1: training loss"), "progress is shown: {log}");

    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(tuned.join("metrics.json")).unwrap()).unwrap();
    let fine = &metrics["fine_tune"];
    assert!(fine["steps"].as_u64().unwrap() >= 6, "{fine}");
    assert!(fine["parameter_change"].as_f64().unwrap() > 1e-4, "training moved the weights: {fine}");
    assert_eq!(fine["epochs"].as_array().unwrap().len(), 2, "{fine}");
    let seen = fine["train_rows"].as_u64().unwrap() + fine["dev_rows"].as_u64().unwrap();
    assert_eq!(Some(seen), metrics["train_examples"].as_u64(), "the training part only: {fine}");
    assert!(fine["dev_rows"].as_u64().unwrap() >= 4, "a dev split decides early stopping: {fine}");
    // The encoder never saw the validation rows, so no refit on every row and calibration on them.
    assert_eq!(metrics["refit_full"], false);
    assert!(metrics["calibrated_on"].as_str().unwrap().contains("validation"), "{}", metrics["calibrated_on"]);
    assert!(metrics["single"][0]["validation"]["accuracy"].as_f64().unwrap() > 0.85, "{}", metrics["single"][0]["validation"]);

    // An int8 encoder directory of its own, whose graph the model uses, and which serves.
    let graph = std::fs::read(tuned.join("encoder/model.onnx")).unwrap();
    assert_eq!(graph, std::fs::read(tuned.join("model.onnx")).unwrap());
    assert_ne!(graph, std::fs::read(common::root().join("runtime/encoders/minilm-l6-int8/model.onnx")).unwrap());
    let graph_text = String::from_utf8_lossy(&graph);
    assert!(graph_text.contains("MatMulInteger"), "int8-quantized");
    let out = triage(&["eval", "--model", s(&tuned), "--data", s(&data), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let eval: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(eval["heads"][0]["report"]["accuracy"], metrics["single"][0]["validation"]["accuracy"]);

    let card = std::fs::read_to_string(tuned.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("fine-tuned on the training part") && card.contains("## Fine-tuning") && card.contains("| 2"), "{card}");
    assert!(card.contains(&format!("## Against `{}`", frozen.display())) && card.contains("points"), "{card}");
    assert!(!card.contains("Not comparable"), "the same data and seed give the same split: {card}");
}

#[test]
fn fine_tuning_refuses_what_cannot_work_before_any_long_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tickets.csv");
    labelled_csv(&data, 8, 3);
    let base = ["train", "--data", s(&data), "--text", "subject,body", "--label", "queue", "--fine-tune"];
    let python = train_python();
    let int8 = common::root().join("runtime/encoders/minilm-l6-int8");
    let fp32 = encoder();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--encoder", s(&fp32), "--fine-tune-python", "/nonexistent/python3"], "scripts/setup --train"),
        (vec!["--encoder", s(&fp32), "--fine-tune-python", "/usr/bin/python3"], "scripts/setup --train"),
        (vec!["--encoder", int8.to_str().unwrap(), "--fine-tune-python", s(&python)], "int8-quantized"),
        (vec!["--encoder", s(&fp32), "--fine-tune-python", s(&python), "--fine-tune-lr", "2"], "learning rate"),
        (vec!["--encoder", s(&fp32), "--fine-tune-python", s(&python), "--compare", "/nonexistent"], "--compare"),
    ];
    for (i, (extra, expected)) in cases.into_iter().enumerate() {
        let out_dir = dir.path().join(format!("out-{i}"));
        let mut args = base.to_vec();
        args.extend(extra);
        args.extend(["--out", s(&out_dir)]);
        let out = triage(&args);
        let log = text(&out);
        assert!(!out.status.success() && log.contains(expected), "case {i}: expected {expected:?} in: {log}");
        assert!(!out_dir.join("model.toml").exists(), "case {i}: no model written");
    }
}
