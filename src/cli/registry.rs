//! `triage registry`: a stand-in Schema Registry for demos and tests (Confluent's REST subset, in
//! memory; not for production: see src/local/registry.rs).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use triage::local::registry::{Access, LocalSchemaRegistry};

#[derive(Args)]
pub struct RegistryArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: String,
    /// Require HTTP basic auth with this `user:password`.
    #[arg(long, conflicts_with = "token")]
    basic_auth: Option<String>,
    /// Require this bearer token.
    #[arg(long)]
    token: Option<String>,
    /// Also write the URL to this file (useful with port 0).
    #[arg(long)]
    url_file: Option<PathBuf>,
    /// Keep the schemas in this JSON file (read at start, written after each change), so a
    /// restarted registry knows its ids; without it they live in memory only.
    #[arg(long)]
    data: Option<PathBuf>,
}

pub async fn run(args: RegistryArgs) -> Result<()> {
    let access = match (args.basic_auth, args.token) {
        (Some(pair), _) => Access::Basic(pair),
        (None, Some(token)) => Access::Bearer(token),
        (None, None) => Access::Open,
    };
    let registry = LocalSchemaRegistry::start(&args.listen, access, args.data.clone())
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let url = registry.url();
    if let Some(file) = &args.url_file {
        std::fs::write(file, &url).with_context(|| format!("writing {}", file.display()))?;
    }
    println!("{url}");
    let kept = args.data.as_ref().map_or("in memory".to_string(), |d| format!("kept in {}", d.display()));
    eprintln!("stand-in schema registry at {url} ({kept}; for demos and tests); Ctrl-C stops it");
    super::termination().await;
    Ok(())
}
