//! Hot reload of model directories, without a restart or a consumer-group rebalance.
//!
//! Each engine's model directory is looked at every `[models] reload_interval_ms`, and at once
//! on SIGHUP. A changed directory is loaded only once it has looked the same for a whole
//! interval (a copy still in progress is never loaded; SIGHUP means "it is complete now"), and
//! off the hot path. The new version is checked before it serves: its descriptor and labels
//! against the graph (as at start), finite answers on known texts from every new session (which
//! also warms them up), and each route's escalation head among its heads. Then it is installed:
//! messages already submitted finish on the version they started with (each batch holds its
//! generation), new messages go to the new version, rows name the version that answered, and
//! the old version is freed after its last batch. A directory that fails a check leaves the old
//! version serving: logged, counted (`triage_model_reload_failures_total`) and shown on /readyz
//! (which stays ready). It is tried again when the directory changes again.
//!
//! What a change is: the directory's visible files (names, sizes, modification times, inodes;
//! symlinks followed, so a Kubernetes volume's `..data` switch shows) and where the directory
//! itself resolves (a `current -> v2` symlink switched). The supported ways to publish a model
//! (README "Changing a model"): switch a symlink, `mv` a complete directory into place, or a
//! mounted volume; anything else is caught by the stability wait and the checks.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::routes::{tier_model, Route, TierModel};
use crate::config::Config;
use crate::engine::{Backend, Installer};
use crate::model::{HeadOutput, Model, ModelInfo, Prediction};
use crate::telemetry::{self, Readiness};

/// Texts every new version must answer with finite scores before it serves.
const CHECK_TEXTS: [&str; 3] =
    ["where is my order", "I was charged twice for the same purchase, please refund one", "cannot log in to the app after the update"];

/// What a model directory looks like without reading its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DirState {
    resolved: PathBuf,
    files: Vec<(String, u64, Option<SystemTime>, u64)>,
}

pub(super) fn dir_state(dir: &Path) -> std::io::Result<DirState> {
    let resolved = std::fs::canonicalize(dir)?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&resolved)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Kubernetes keeps its `..data` / `..2024_…` bookkeeping in dot names; editors their
        // swap files. The model's files are what counts (followed through their symlinks).
        if name.starts_with('.') {
            continue;
        }
        let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
        if meta.is_file() {
            files.push((name, meta.len(), meta.modified().ok(), meta.ino()));
        }
    }
    files.sort();
    Ok(DirState { resolved, files })
}

/// Why a reload did not happen.
#[derive(Debug)]
enum NotLoaded {
    /// The directory changed while it was being loaded: try again once it is stable.
    Changed,
    /// It failed a check: the old version keeps serving until the directory changes again.
    Refused(String),
}

pub(super) struct Reloader {
    pub config: Arc<Config>,
    /// Per engine: its model directory, its installer, what serves it now.
    pub dirs: Vec<PathBuf>,
    pub installers: Vec<Installer>,
    pub serving: Vec<ModelInfo>,
    pub routes: Arc<Vec<Route>>,
    pub readiness: Arc<Readiness>,
    /// Per engine: the directory as last loaded or refused, and as last seen.
    loaded: Vec<Option<DirState>>,
    seen: Vec<Option<DirState>>,
}

impl Reloader {
    /// `dirs[i]` is engine i's directory, as loaded at start.
    pub fn new(
        config: Arc<Config>,
        dirs: Vec<PathBuf>,
        installers: Vec<Installer>,
        serving: Vec<ModelInfo>,
        routes: Arc<Vec<Route>>,
        readiness: Arc<Readiness>,
    ) -> Self {
        let loaded: Vec<Option<DirState>> = dirs.iter().map(|d| dir_state(d).ok()).collect();
        let seen = loaded.clone();
        Reloader { config, dirs, installers, serving, routes, readiness, loaded, seen }
    }

    /// Until the task is aborted: look every interval (if any) and on each SIGHUP.
    pub async fn run(mut self) {
        let interval = Duration::from_millis(self.config.models.reload_interval_ms);
        let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: model directories are reloaded only by polling");
                None
            }
        };
        loop {
            let forced = tokio::select! {
                _ = tokio::time::sleep(interval), if !interval.is_zero() => false,
                Some(()) = async { match hangups.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            if forced {
                tracing::info!("SIGHUP: checking the model directories now");
            }
            for engine in 0..self.dirs.len() {
                self.check(engine, forced).await;
            }
        }
    }

    async fn check(&mut self, engine: usize, forced: bool) {
        let dir = self.dirs[engine].clone();
        let state = match dir_state(&dir) {
            Ok(state) => state,
            Err(e) => {
                // Gone or unreadable: keep serving what is loaded, and say so.
                let why = format!("cannot read the directory: {e}");
                if self.seen[engine].is_some() {
                    tracing::warn!(dir = %dir.display(), error = %e, "model directory unreadable: the loaded version keeps serving");
                    self.readiness.set_model_reload(&dir.display().to_string(), Some(why));
                }
                self.seen[engine] = None;
                return;
            }
        };
        if self.loaded[engine].as_ref() == Some(&state) {
            self.seen[engine] = Some(state);
            return;
        }
        let stable = self.seen[engine].as_ref() == Some(&state);
        self.seen[engine] = Some(state.clone());
        if !stable && !forced {
            tracing::info!(dir = %dir.display(), "model directory changed: loading it once it has stayed the same for one interval");
            return;
        }
        let name = self.serving[engine].name.clone();
        match self.reload(engine, state.clone()).await {
            Ok(info) => {
                tracing::info!(model = %info.name, from = %self.serving[engine].version, to = %info.version, dir = %dir.display(), "model reloaded: new messages go to the new version");
                metrics::counter!(telemetry::MODEL_RELOADS, "model" => name.clone(), "outcome" => "loaded").increment(1);
                let old = &self.serving[engine];
                metrics::gauge!(telemetry::MODEL_INFO, "model" => old.name.clone(), "model_version" => old.version.clone(), "provider" => old.provider.to_string()).set(0.0);
                metrics::gauge!(telemetry::MODEL_INFO, "model" => info.name.clone(), "model_version" => info.version.clone(), "provider" => info.provider.to_string()).set(1.0);
                self.readiness.set_model_reload(&dir.display().to_string(), None);
                self.serving[engine] = info;
                self.loaded[engine] = Some(state);
            }
            Err(NotLoaded::Changed) => {
                tracing::info!(dir = %dir.display(), "model directory changed while loading: trying again once it is stable");
            }
            Err(NotLoaded::Refused(why)) => {
                tracing::error!(model = %name, dir = %dir.display(), reason = %why, "model reload refused: the previous version keeps serving");
                metrics::counter!(telemetry::MODEL_RELOADS, "model" => name.clone(), "outcome" => "refused").increment(1);
                metrics::counter!(telemetry::MODEL_RELOAD_FAILURES, "model" => name).increment(1);
                self.readiness.set_model_reload(&dir.display().to_string(), Some(why));
                self.loaded[engine] = Some(state);
            }
        }
    }

    /// Load, check, warm up and install engine `engine`'s directory as it is in `state`.
    async fn reload(&self, engine: usize, state: DirState) -> Result<ModelInfo, NotLoaded> {
        let (dir, installer) = (self.dirs[engine].clone(), self.installers[engine].clone());
        let (config, routes) = (self.config.clone(), self.routes.clone());
        let load = move || -> Result<ModelInfo, NotLoaded> {
            let refused = |e: &dyn std::fmt::Display| NotLoaded::Refused(e.to_string());
            let model = Model::load(&dir, &config.inference).map_err(|e| refused(&e))?;
            // Every route tier this engine serves, as the new version would serve it.
            let mut tiers: Vec<(usize, usize, TierModel)> = Vec::new();
            // Shadows and canaries served by this engine: (route, is the canary, as served).
            let mut shadows: Vec<(usize, bool, TierModel)> = Vec::new();
            for (r, route) in routes.iter().enumerate() {
                for (position, _) in route.tiers.iter().enumerate().filter(|(_, t)| t.engine == engine) {
                    let last = position + 1 == route.tiers.len();
                    tiers.push((r, position, tier_model(&config, &route.config, last, &model, None).map_err(|e| refused(&e))?));
                }
                for (is_canary, tier) in [(false, &route.shadow), (true, &route.canary)] {
                    if tier.as_ref().is_some_and(|t| t.engine == engine) {
                        shadows.push((r, is_canary, tier_model(&config, &route.config, true, &model, None).map_err(|e| refused(&e))?));
                    }
                }
            }
            let mut sessions = installer.sessions_of(&model).map_err(|e| refused(&e))?;
            check_answers(&model, &mut sessions).map_err(NotLoaded::Refused)?;
            // Read from a directory that moved underneath: not the version it claims to be.
            if dir_state(&dir).ok().as_ref() != Some(&state) {
                return Err(NotLoaded::Changed);
            }
            let generation =
                installer.install(&model.info().version, Arc::new(model.encoder().clone()), sessions).map_err(|e| refused(&e))?;
            for (r, position, tier) in tiers {
                routes[r].tiers[position].replace(Arc::new(TierModel { generation: Some(generation.clone()), ..tier }));
            }
            for (r, is_canary, tier) in shadows {
                let slot = if is_canary { &routes[r].canary } else { &routes[r].shadow };
                if let Some(slot) = slot {
                    slot.replace(Arc::new(TierModel { generation: Some(generation.clone()), ..tier }));
                }
            }
            Ok(model.info().clone())
        };
        tokio::task::spawn_blocking(load).await.unwrap_or_else(|e| Err(NotLoaded::Refused(format!("loading panicked: {e}"))))
    }
}

/// Every session answers the known texts, each score finite: a graph that loads but answers
/// NaN (a bad training run, a broken export) never serves. Runs each session once: a warm-up.
fn check_answers(model: &Model, sessions: &mut [Box<dyn Backend>]) -> Result<(), String> {
    let encoded = CHECK_TEXTS
        .iter()
        .map(|t| model.encoder().encode(t).map_err(|e| format!("the tokenizer fails on a known text: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let batch: Vec<_> = encoded.iter().collect();
    for session in sessions.iter_mut() {
        let predictions = session.run(&batch).map_err(|e| format!("inference fails on known texts: {e}"))?;
        if predictions.len() != batch.len() {
            return Err(format!("{} answers for {} known texts", predictions.len(), batch.len()));
        }
        if let Some((text, _)) = CHECK_TEXTS.iter().zip(&predictions).find(|(_, p)| !finite(p)) {
            return Err(format!("a non-finite score (NaN or infinity) on the known text {text:?}"));
        }
    }
    Ok(())
}

fn finite(p: &Prediction) -> bool {
    let label_ok = |l: &crate::model::LabelScore| l.score.is_finite();
    p.category.as_ref().is_none_or(label_ok)
        && p.tags.iter().all(label_ok)
        && p.ood_score.is_none_or(f32::is_finite)
        && p.heads.iter().all(|h| match &h.output {
            HeadOutput::Label(l) => label_ok(l),
            HeadOutput::Tags(tags) => tags.iter().all(label_ok),
            HeadOutput::Embedding(v) => v.iter().all(|x| x.is_finite()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_state_changes_with_its_files_and_where_it_points() {
        let root = tempfile::tempdir().unwrap();
        let (v1, v2) = (root.path().join("v1"), root.path().join("v2"));
        for v in [&v1, &v2] {
            std::fs::create_dir(v).unwrap();
            std::fs::write(v.join("model.onnx"), b"graph").unwrap();
        }
        let current = root.path().join("current");
        std::os::unix::fs::symlink(&v1, &current).unwrap();
        let before = dir_state(&current).unwrap();
        assert_eq!(dir_state(&current).unwrap(), before, "nothing changed, nothing to do");
        // Kubernetes bookkeeping and editor files do not count.
        std::fs::write(v1.join(".model.toml.swp"), b"x").unwrap();
        assert_eq!(dir_state(&current).unwrap(), before);
        // The symlink switched to a directory with the same file names and sizes.
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink(&v2, &current).unwrap();
        assert_ne!(dir_state(&current).unwrap(), before, "a switched symlink is a new version");
        let switched = dir_state(&current).unwrap();
        std::fs::write(v2.join("model.toml"), b"version = \"2\"").unwrap();
        assert_ne!(dir_state(&current).unwrap(), switched, "a new file is a change");
        assert!(dir_state(&root.path().join("missing")).is_err());
    }

    #[test]
    fn only_finite_answers_pass() {
        let label = |score| crate::model::LabelScore { label: "x".into(), score };
        let good =
            Prediction { category: Some(label(0.9)), priority: None, tags: vec![label(0.7)], heads: Vec::new(), ood_score: Some(0.2) };
        assert!(finite(&good));
        assert!(!finite(&Prediction { category: Some(label(f32::NAN)), ..good.clone() }));
        assert!(!finite(&Prediction { ood_score: Some(f32::INFINITY), ..good.clone() }));
        let head = crate::model::HeadResult { head: "e".into(), output: HeadOutput::Embedding(vec![0.1, f32::NAN]) };
        assert!(!finite(&Prediction { heads: vec![head], ..good }));
    }
}
