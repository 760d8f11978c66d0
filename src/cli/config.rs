//! `triage config check`: parse, apply the environment, validate, print (secrets hidden).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use triage::config::Config;

#[derive(Subcommand)]
pub enum ConfigAction {
    /// Parse, apply environment overrides, validate; print the effective config (secrets hidden).
    Check {
        #[arg(env = "TRIAGE_CONFIG")]
        file: PathBuf,
    },
}

pub fn run(action: ConfigAction) -> Result<()> {
    match action {
        ConfigAction::Check { file } => check(&file),
    }
}

fn check(file: &Path) -> Result<()> {
    let config = Config::load(file)?;
    for route in &config.routes {
        let dir = &route.model;
        if !dir.join("model.onnx").exists() || !dir.join("tokenizer.json").exists() {
            bail!("route `{}`: {} is not a model directory (model.onnx and tokenizer.json)", route.topic, dir.display());
        }
        triage::model::Descriptor::load(dir).with_context(|| format!("route `{}`", route.topic))?;
    }
    print!("{}", toml::to_string(&config).context("printing the configuration")?);
    eprintln!("{}: valid ({} routes)", file.display(), config.routes.len());
    Ok(())
}
