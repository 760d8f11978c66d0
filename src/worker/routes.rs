//! From `[[routes]]` to running engines: one engine per model directory (shared by the routes
//! that name it), each route with its decoder and its resolved escalation policy.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::policy::EscalationPolicy;
use super::WorkerError;
use crate::config::{Config, RouteConfig};
use crate::engine::{Engine, Outcome, StatsSnapshot, Submitter};
use crate::message::Decoder;
use crate::model::{Model, ModelInfo};
use crate::source::Consumed;
use crate::telemetry;

/// Everything the results side needs to know about a message besides its text.
pub(super) struct MessageTag {
    pub message: Consumed,
    pub route: usize,
    pub message_id: String,
    pub event_time_ms: i64,
    pub consumed_ms: u64,
    pub metadata: (Vec<String>, Vec<String>),
}

/// What the consumer and the results side need to know about a route.
pub(super) struct Route {
    pub config: RouteConfig,
    pub decoder: Decoder,
    pub model: ModelInfo,
    pub policy: EscalationPolicy,
}

/// The started engines and the routes over them. Submitters are kept apart from the routes:
/// only the consumer holds them, so dropping them at shutdown is what closes the engines.
pub(super) struct Started {
    pub routes: Arc<Vec<Route>>,
    pub submitters: Vec<Submitter<MessageTag>>,
    pub engines: Vec<Engine<MessageTag>>,
    pub outcomes: flume::Receiver<Outcome<MessageTag>>,
}

impl Started {
    pub fn engine_stats(&self) -> Vec<Arc<crate::engine::EngineStats>> {
        self.engines.iter().map(|e| e.stats_handle()).collect()
    }
}

/// Counters of several engines added up.
pub(super) fn merged(stats: &[Arc<crate::engine::EngineStats>]) -> StatsSnapshot {
    stats.iter().map(|s| s.snapshot()).fold(StatsSnapshot::default(), |a, b| a.merge(&b))
}

pub(super) async fn start(config: &Config) -> Result<Started, WorkerError> {
    let (outcome_tx, outcomes) = flume::bounded::<Outcome<MessageTag>>(config.batching.queue_capacity);
    let mut engine_of: HashMap<PathBuf, usize> = HashMap::new();
    let mut engines: Vec<Engine<MessageTag>> = Vec::new();
    let mut models: Vec<Arc<Model>> = Vec::new();
    let (mut routes, mut submitters) = (Vec::new(), Vec::new());
    for route in &config.routes {
        let index = match engine_of.get(&route.model) {
            Some(&i) => i,
            None => {
                let (dir, options) = (route.model.clone(), config.inference.clone());
                let model = tokio::task::spawn_blocking(move || Model::load(&dir, &options))
                    .await
                    .map_err(|e| WorkerError::TaskFailed { task: "model loading", detail: e.to_string() })??;
                let model = Arc::new(model);
                engines.push(Engine::start(model.clone(), &config.batching, outcome_tx.clone())?);
                models.push(model);
                engine_of.insert(route.model.clone(), engines.len() - 1);
                engines.len() - 1
            }
        };
        let model = &models[index];
        let info = model.info();
        metrics::gauge!(telemetry::MODEL_INFO, "model" => info.name.clone(), "version" => info.version.clone(), "provider" => info.provider.to_string()).set(1.0);
        if let Some(head) = &route.escalation_head {
            if !model.heads().heads().iter().any(|h| &h.name == head) {
                return Err(WorkerError::Route {
                    topic: route.topic.clone(),
                    reason: format!("escalation_head `{head}` is not a head of {}", info.name),
                });
            }
        }
        submitters.push(engines[index].submitter());
        routes.push(Route {
            config: route.clone(),
            decoder: Decoder::new(route.fields.clone(), model.template().clone(), config.max_message_bytes, model.encoder().max_chars()),
            model: info.clone(),
            policy: EscalationPolicy::resolve(
                route,
                model.descriptor(),
                model.heads().ood().is_some(),
                config.escalation.default_threshold,
            ),
        });
    }
    Ok(Started { routes: Arc::new(routes), submitters, engines, outcomes })
}
