//! `triage run`: the worker.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use triage::config::Config;

#[derive(Args)]
pub struct RunArgs {
    #[arg(long, short, env = "TRIAGE_CONFIG")]
    config: PathBuf,
}

pub async fn run(args: RunArgs) -> Result<()> {
    // Catch SIGTERM from the very start: one arriving while the model loads still drains.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        super::termination().await;
        let _ = stop_tx.send(());
    });
    tokio::task::yield_now().await;
    let config = Config::load(&args.config)?;
    let report = triage::worker::run(config, async move {
        let _ = stop_rx.await;
    })
    .await;
    signals.abort();
    let report = report?;
    tracing::info!(
        consumed = report.consumed,
        rows = report.rows_inserted,
        dead_lettered = report.dead_lettered,
        escalated = report.escalated,
        unfinished = report.unfinished,
        seconds = format!("{:.1}", report.seconds),
        "worker stopped"
    );
    Ok(())
}
