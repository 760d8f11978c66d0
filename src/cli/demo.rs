//! `triage demo`: the whole path on embedded defaults (mock Kafka, a private ClickHouse, the
//! bundled samples, the worker), then what landed, in words, with messages beside their answers.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use triage::demo::{Answer, DemoOptions, DemoProgress, DemoRun};
use triage::paths;
use triage::source::decode::Format;

use super::ModelArgs;

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder with tickets.jsonl, returns.jsonl and emails.jsonl (default: deploy/demo).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Make this many messages from the bundled samples (e.g. 10000) and show the worker's
    /// throughput on them (default: each sample once).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    messages: Option<u64>,
    /// Keep Kafka and ClickHouse running after the demo, until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// How the demo's producers write: json, or avro (Confluent's wire format, the schema
    /// deploy/demo/ticket.avsc in a stand-in schema registry).
    #[arg(long, default_value = "json", value_parser = ["json", "avro"])]
    format: String,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let data_dir = match args.data {
        Some(d) => d,
        None => paths::find_in_project("deploy/demo").context("the bundled demo messages (deploy/demo) were not found")?,
    };
    let format = if args.format == "avro" { Format::Avro } else { Format::Json };
    let options =
        DemoOptions { model_dir: args.model.dir()?, data_dir, inference: args.model.inference(), messages: args.messages, format };
    let bar = super::progress_bar(super::Progress::Items("messages stored in ClickHouse"), Some(0));
    let shown = bar.clone();
    let progress = Arc::new(move |p: DemoProgress| match p {
        DemoProgress::Step(step) => shown.suspend(|| eprintln!("[demo] {step}")),
        DemoProgress::Stored { rows, of } => {
            shown.set_length(of);
            shown.set_position(rows.min(of));
        }
    });
    let run = triage::demo::run(options, progress).await?;
    bar.finish_and_clear();
    summary(&run, args.messages.is_some()).await?;
    if args.keep_running {
        println!("Kafka at {}, ClickHouse at {}: Ctrl-C stops them.", run.kafka.bootstrap_servers(), run.config.clickhouse.url);
        super::termination().await;
    }
    Ok(())
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// At most `chars` characters, with an ellipsis when cut.
fn cut(text: &str, chars: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}

async fn summary(run: &DemoRun, generated: bool) -> Result<()> {
    let ch = &run.config.clickhouse;
    let r = &run.report;
    let policy = &run.policy;
    println!("\nWhat landed in ClickHouse ({}.{}, each message read once with FINAL):", ch.database, ch.table);
    let kinds = triage::demo::counts(ch, "kind", 10).await?;
    let rows: u64 = kinds.iter().map(|k| k.messages).sum();
    let by_kind: Vec<String> = kinds
        .iter()
        .map(|k| match k.key.as_str() {
            "email" => plural(k.messages, "e-mail", "e-mails"),
            kind => plural(k.messages, kind, &format!("{kind}s")),
        })
        .collect();
    println!("  {rows} of {} messages classified: {}.", run.produced, by_kind.join(", "));

    let letters = triage::demo::dead_letters(run)?;
    if letters.is_empty() {
        println!("  Nothing dead-lettered.");
    } else {
        let mut reasons: Vec<(String, u64)> = Vec::new();
        for (_, reason, _) in &letters {
            match reasons.iter_mut().find(|(r, _)| r == reason) {
                Some((_, n)) => *n += 1,
                None => reasons.push((reason.clone(), 1)),
            }
        }
        let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        println!(
            "  {} to {} with the reason and the original bytes: {}.",
            plural(letters.len() as u64, "message was dead-lettered", "messages were dead-lettered"),
            run.config.kafka.dead_letter_topic,
            reasons.join(", ")
        );
        for (key, reason, detail) in letters.iter().take(3) {
            println!("    {key}: {reason} ({})", cut(detail, 70));
        }
    }

    let (escalated, ood, low) = triage::demo::escalations(ch, policy).await?;
    let mut why = Vec::new();
    if let Some(limit) = policy.ood_threshold {
        why.push(format!("{ood} unlike anything the model was trained on (out-of-distribution score above {limit:.2})"));
    }
    why.push(format!("{low} with the model's confidence below {:.2}", policy.threshold));
    println!(
        "  Escalated {escalated} of {rows} for a second opinion (the escalation topic, which `triage escalate` answers): {}.",
        why.join(", ")
    );
    let priorities: Vec<String> =
        triage::demo::counts(ch, "priority", 5).await?.iter().map(|p| format!("{} {}", p.messages, p.key)).collect();
    println!("  Priority: {}.", priorities.join(", "));

    // A few messages beside their answers: per kind, the surest answers and the escalated ones.
    let mut ids: Vec<String> = run.samples.keys().cloned().collect();
    ids.sort();
    let answers = triage::demo::answers(ch, &ids).await?;
    println!("\nMessages and their answers (the default model knows Banking77's 77 intents; returns and e-mails are mostly outside them):");
    for kind in ["ticket", "return", "email"] {
        let of_kind: Vec<&Answer> = answers.iter().filter(|a| a.kind == kind).collect();
        let mut sure: Vec<&Answer> = of_kind.iter().copied().filter(|a| a.escalated == 0).collect();
        sure.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        let doubted: Vec<&Answer> = of_kind.iter().copied().filter(|a| a.escalated == 1).collect();
        for a in sure.iter().take(2).chain(doubted.iter().take(2)) {
            let text = run.samples.get(&a.message_id).map(|s| s.text.as_str()).unwrap_or("");
            println!("  {:<6} {:<8} \"{}\"", a.kind, a.message_id, cut(text, 72));
            if a.escalated == 1 {
                let reason = match (a.ood_score, policy.ood_threshold) {
                    (Some(score), Some(limit)) if score > limit => {
                        format!("out of distribution (score {score:.2} > {limit:.2})")
                    }
                    _ => format!("confidence {:.2} below {:.2}", a.confidence, policy.threshold),
                };
                println!("                  -> escalated: {reason}; the model's guess: {} {:.2}", a.category, a.confidence);
            } else {
                println!("                  -> {}, confidence {:.2}, priority {}", a.category, a.confidence, a.priority);
            }
        }
    }

    let busy = r.busy_seconds.max(1e-9);
    println!(
        "\nThroughput: {} in {:.1} s: {:.0} messages/s while busy ({:.1} s with start-up and the group join).",
        plural(r.consumed, "message", "messages"),
        busy,
        r.consumed as f64 / busy,
        r.seconds
    );
    let (inference, tokenize) = (r.engine.inference_seconds, r.engine.tokenize_seconds);
    let rest = (busy - inference - tokenize).max(0.0);
    let stages = [("inference", inference), ("tokenizing", tokenize), ("Kafka, JSON, ClickHouse and waiting", rest)];
    let slowest = stages.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|s| s.0).unwrap_or("inference");
    println!("  Time in inference {inference:.1} s, tokenizing {tokenize:.2} s, the rest {rest:.1} s: the slowest stage is {slowest}.");

    println!("\nNext:");
    println!(
        "  scripts/demo --keep-running     keep Kafka and ClickHouse up; then query: clickhouse-client --port {} --query \"SELECT kind, category, confidence, escalated FROM {}.{} FINAL LIMIT 10\"",
        run.clickhouse.tcp_port, ch.database, ch.table
    );
    if !generated {
        println!("  scripts/demo --messages 10000   the worker's throughput on a bigger stream, with a progress bar");
    }
    if run.config.routes.first().map(|r| r.format) == Some(Format::Json) {
        println!("  scripts/demo --format avro      the same messages as Avro through a schema registry (README \"Formats\")");
    }
    println!("  scripts/setup --llm             a local LLM server for the escalations (README: \"The LLM tier\")");
    println!("  deploy/clickhouse/queries/      the analysts' queries; README \"For analysts\"");
    Ok(())
}
