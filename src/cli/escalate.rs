//! `triage escalate`: the LLM tier. Answers the escalation topic with a large model and writes
//! each answer as the message's row; with `--export-labels`, writes the answered messages as
//! training data instead.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use triage::config::Config;

#[derive(Args)]
pub struct EscalateArgs {
    #[arg(long, short, env = "TRIAGE_CONFIG")]
    config: PathBuf,
    /// Do not answer anything: write the LLM-answered messages still in the escalation topic
    /// to this file as JSON lines (text + one field per label head) for `triage train`; `-` for stdout.
    #[arg(long)]
    export_labels: Option<String>,
}

pub async fn run(args: EscalateArgs) -> Result<()> {
    if let Some(path) = &args.export_labels {
        let config = Config::load(&args.config)?;
        let mut out = super::open_output(path)?;
        let progress = super::StageProgress::new();
        let report = triage::llm::export::export_labels(&config, &mut out, &progress)
            .await
            .with_context(|| format!("exporting labels to {path}"))?;
        eprintln!(
            "{} examples written to {path} ({} LLM answers in the table; {} records read: {} not answered yet, {} duplicates, {} unreadable; {} answers past the topic's retention)",
            report.written,
            report.answers,
            report.records_read,
            report.unanswered,
            report.duplicates,
            report.unreadable,
            report.past_retention
        );
        eprintln!("train on them: triage train --data {path} --text text --label <head> ... (see README, \"The LLM tier\")");
        return Ok(());
    }
    let report = super::until_terminated(&args.config, |config, stop| {
        triage::llm::escalate::run(config, async move {
            let _ = stop.await;
        })
    })
    .await??;
    tracing::info!(
        consumed = report.consumed,
        answered = report.answered,
        skipped = report.skipped,
        cache_hits = report.cache_hits,
        dead_lettered = report.dead_lettered,
        prompt_tokens = report.prompt_tokens,
        completion_tokens = report.completion_tokens,
        spend = format!("{:.4}", report.spend),
        unfinished = report.unfinished,
        seconds = format!("{:.1}", report.seconds),
        "escalate stopped"
    );
    Ok(())
}
