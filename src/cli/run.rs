//! `triage run`: the worker.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct RunArgs {
    #[arg(long, short, env = "TRIAGE_CONFIG")]
    config: PathBuf,
}

pub async fn run(args: RunArgs) -> Result<()> {
    let report = super::until_terminated(&args.config, |config, stop| {
        triage::worker::run(config, async move {
            let _ = stop.await;
        })
    })
    .await??;
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
