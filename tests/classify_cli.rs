//! `triage classify` as a user runs it: JSON lines in, one result per line out, in order.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

fn classify(input: &[u8], extra: &[&str]) -> (Vec<Value>, String, i32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_triage"))
        .arg("classify")
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run triage");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let records = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (records, String::from_utf8_lossy(&out.stderr).into_owned(), out.status.code().unwrap_or(-1))
}

#[test]
fn bad_lines_become_error_records_and_the_run_goes_on() {
    let huge = "my parcel never arrived ".repeat(43_000); // 1.03 MB: under the 1 MiB message limit
    let too_big = "x".repeat(1_100_000);
    let mut input = Vec::new();
    input.extend_from_slice(b"{\"id\": \"a\", \"subject\": \"Lost card\", \"body\": \"I lost my card\"}\n");
    input.extend_from_slice(b"not json\n");
    input.extend_from_slice(b"{\"id\": \"c\", \"body\": \"caf\xe9 latte\"}\n"); // Latin-1 byte: not UTF-8
    input.extend_from_slice(b"\n"); // blank lines are skipped, but still counted
    input.extend_from_slice(b"{\"id\": \"e\", \"body\": \"\"}\n");
    input.extend_from_slice(format!("{{\"id\": \"f\", \"body\": \"{huge}\"}}\n").as_bytes());
    input.extend_from_slice(b"[\"an\", \"array\"]\n");
    input.extend_from_slice(format!("{{\"id\": \"h\", \"body\": \"{too_big}\"}}\n").as_bytes());
    input.extend_from_slice(b"{\"id\": \"i\", \"text\": \"How do I change my PIN?\"}"); // no final newline
    let (records, stderr, code) = classify(&input, &[]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<u64> = records.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![1, 2, 3, 5, 6, 7, 8, 9], "one record per non-blank line, in input order");
    let reason = |i: usize| records[i]["error"]["reason"].as_str().map(String::from);
    assert_eq!(records[0]["category"], "lost_or_stolen_card");
    assert_eq!(records[0]["id"], "a");
    assert_eq!(reason(1).as_deref(), Some("not_json"));
    assert_eq!(reason(2).as_deref(), Some("not_utf8"));
    assert_eq!(reason(3).as_deref(), Some("no_text"));
    assert_eq!(reason(4), None, "a 1 MB text is classified (truncated), not rejected");
    assert_eq!(records[4]["truncated"], true);
    assert_eq!(records[4]["tokens"], 128);
    assert_eq!(reason(5).as_deref(), Some("not_object"));
    assert_eq!(reason(6).as_deref(), Some("too_large"));
    assert_eq!(records[7]["category"], "change_pin");
    // The default model's OOD gate scores every message: a banking question sits near its intents.
    let ood = records[7]["ood_score"].as_f64().expect("ood_score");
    assert!((0.0..0.5).contains(&ood), "{ood}");
    assert!(stderr.contains("8 messages (3 classified, 5 errors)"), "summary on stderr: {stderr}");
}

#[test]
fn output_order_is_input_order_across_many_batches() {
    let texts = [
        "card lost",
        "I was charged twice for the same thing at the restaurant last night",
        "pin",
        "where is my new card, it has been two weeks already",
    ];
    let input: String = (0..300).map(|i| format!("{{\"id\": {i}, \"body\": \"{}\"}}\n", texts[i % texts.len()])).collect();
    let (records, stderr, code) = classify(input.as_bytes(), &["--max-batch-size", "8", "--max-wait-ms", "1"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(records.len(), 300);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["id"], Value::String(i.to_string()), "record {i} out of order");
    }
    // Same text, same answer, wherever it was batched.
    for r in &records {
        let twin = &records[r["id"].as_str().unwrap().parse::<usize>().unwrap() % texts.len()];
        assert_eq!(r["category"], twin["category"]);
    }
    assert!(stderr.contains("messages/s") && stderr.contains("padding ratio"), "{stderr}");
}

#[test]
fn field_options_and_files_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(&input, "{\"ticket\": {\"no\": \"T-9\", \"content\": \"I want to close my account\"}}\n").unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["classify", "--id-field", "/ticket/no", "--body-field", "/ticket/content", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    let record: Value = serde_json::from_str(std::fs::read_to_string(&output).unwrap().trim()).unwrap();
    assert_eq!(record["id"], "T-9");
    assert_eq!(record["category"], "terminate_account");
    assert_eq!(record["model"], "customer-service");
}

#[test]
fn flags_read_the_sectioned_variables_and_their_flat_aliases() {
    // An invalid batch size must be refused whichever name carries it: proof the value arrived.
    for (name, value) in [("TRIAGE_BATCHING__MAX_BATCH_SIZE", "0"), ("TRIAGE_MAX_BATCH_SIZE", "0")] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_triage")).arg("classify").env(name, value).stdin(Stdio::null()).output().expect("run triage");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{name}={value} was ignored: {stderr}");
        assert!(stderr.contains("max_batch_size"), "{name}: {stderr}");
    }
    // The sectioned name wins over the alias.
    let out = Command::new(env!("CARGO_BIN_EXE_triage"))
        .arg("classify")
        .env("TRIAGE_MAX_BATCH_SIZE", "0")
        .env("TRIAGE_BATCHING__MAX_BATCH_SIZE", "8")
        .stdin(Stdio::null())
        .output()
        .expect("run triage");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}
