//! `triage demo`: the whole path on embedded defaults (mock Kafka, a private ClickHouse, the
//! bundled samples, the worker), then what landed.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use triage::demo::{CountRow, DemoOptions};
use triage::paths;

use super::ModelArgs;

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder with tickets.jsonl, returns.jsonl and emails.jsonl (default: deploy/demo).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Keep Kafka and ClickHouse running after the demo, until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let data_dir = match args.data {
        Some(d) => d,
        None => paths::find_in_project("deploy/demo").context("the bundled demo messages (deploy/demo) were not found")?,
    };
    let options = DemoOptions { model_dir: args.model.dir()?, data_dir, inference: args.model.inference() };
    let run = triage::demo::run(options, |step| eprintln!("[demo] {step}")).await?;
    let ch = &run.config.clickhouse;
    let show = |title: &str, rows: Vec<CountRow>| {
        let items: Vec<String> =
            rows.iter().map(|r| format!("{} {}", if r.key.is_empty() { "(none)" } else { &r.key }, r.messages)).collect();
        println!("  {title:<16} {}", items.join(", "));
    };
    println!("\nlanded in ClickHouse {}.{} (each message read once, with FINAL):", ch.database, ch.table);
    show("by kind", triage::demo::counts(ch, "kind", 10).await?);
    show("by priority", triage::demo::counts(ch, "priority", 10).await?);
    show("top categories", triage::demo::counts(ch, "category", 8).await?);
    show("escalated", triage::demo::counts(ch, "escalated", 2).await?);
    let r = &run.report;
    println!(
        "  {:<16} {} produced, {} consumed, {} rows, {} dead letters, {} escalations",
        "messages", run.produced, r.consumed, r.rows_inserted, r.dead_lettered, r.escalated
    );
    println!(
        "  {:<16} {:.1} messages/s over {:.1}s (including start-up and group join)",
        "throughput",
        r.consumed as f64 / r.seconds.max(1e-9),
        r.seconds
    );
    println!(
        "\nquery it: clickhouse-client --port {} --query \"SELECT category, priority, confidence, escalated FROM {}.{} FINAL ORDER BY event_time LIMIT 10\"",
        run.clickhouse.tcp_port, ch.database, ch.table
    );
    if args.keep_running {
        println!("Kafka at {}, ClickHouse at {}: Ctrl-C stops them", run.kafka.bootstrap_servers(), ch.url);
        super::termination().await;
    } else {
        println!("(--keep-running keeps Kafka and ClickHouse up to explore)");
    }
    Ok(())
}
