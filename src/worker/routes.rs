//! From `[[routes]]` to running engines: one engine per model directory (shared by the routes
//! that name it), each route with its decoder and its resolved escalation policy.

use std::path::PathBuf;
use std::sync::Arc;

use super::policy::EscalationPolicy;
use super::WorkerError;
use crate::config::{Config, RouteConfig};
use crate::engine::{Classified, Engine, EngineConfig, Generation, Latest, Outcome, StatsSnapshot, Submitter};
use crate::message::Decoder;
use crate::model::{Model, ModelInfo};
use crate::source::decode::registry::Registry;
use crate::source::decode::{Format, RecordReader};
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
    /// The cascade tier now classifying it (0: the route's first model).
    pub tier: usize,
    /// What the earlier tiers answered, first tier first.
    pub earlier: Vec<Classified>,
    /// The model (version) of each tier it has reached, first tier first: the last is the one
    /// now classifying it. Pinned when it enters a tier, so a reload mid-way changes nothing
    /// about this message: its row names the version that answered it.
    pub versions: Vec<Arc<TierModel>>,
    /// A shadow model's copy: its answer goes to the shadow table, and nothing settles it.
    pub shadow: bool,
    /// The record read from an Avro / Protobuf / JSON Schema payload (a JSON payload is its own
    /// record): what later tiers and the escalation record read.
    pub record: Option<Arc<serde_json::Value>>,
}

impl MessageTag {
    /// The model version now classifying this message.
    pub fn answering(&self) -> &TierModel {
        self.versions.last().expect("a message carries the model of every tier it has entered")
    }
}

/// One tier as one version of its model serves it: the field map and the model's template,
/// the model's identity, its escalation policy (the model's calibration), and the engine
/// generation that runs it.
pub(super) struct TierModel {
    pub decoder: Decoder,
    pub model: ModelInfo,
    pub policy: EscalationPolicy,
    /// None only in tests that build rows without an engine.
    pub generation: Option<Arc<Generation>>,
}

/// One model of a route's cascade: its engine, and the version now serving it (replaced
/// whole by a reload).
pub(super) struct Tier {
    /// Index into the started engines (one per model directory, shared by routes).
    pub engine: usize,
    current: Latest<TierModel>,
}

impl Tier {
    pub fn new(engine: usize, model: TierModel) -> Self {
        Tier { engine, current: Latest::new(Arc::new(model)) }
    }

    pub fn current(&self) -> Arc<TierModel> {
        self.current.get()
    }

    pub fn replace(&self, model: Arc<TierModel>) {
        self.current.replace(model);
    }
}

/// What the consumer and the results side need to know about a route.
pub(super) struct Route {
    pub config: RouteConfig,
    /// How its payloads become records (JSON, or Avro / Protobuf / JSON Schema).
    pub reader: Arc<RecordReader>,
    /// First tier first; one tier without a cascade.
    pub tiers: Vec<Tier>,
    /// A candidate model classifying a share of the messages for comparison only.
    pub shadow: Option<Tier>,
    /// A candidate answering a share of the messages for real, in place of the first tier.
    pub canary: Option<Tier>,
}

impl Route {
    /// Whether the shadow classifies this message: by a hash of its key (or its topic,
    /// partition and offset), so the same messages every run and on every replica.
    pub fn shadows(&self, message: &crate::source::SourceMessage) -> bool {
        if self.shadow.is_none() {
            return false;
        }
        let share = self.config.shadow_share;
        share >= 1.0 || sampled(message, b"", share)
    }

    /// Whether the canary answers this message (by key hash, salted apart from the shadow's
    /// so the two samples are independent).
    pub fn canaries(&self, message: &crate::source::SourceMessage) -> bool {
        match (&self.canary, &self.config.canary) {
            (Some(_), Some(canary)) => sampled(message, b"\0canary", canary.share),
            _ => false,
        }
    }
}

/// Whether a message falls in a `share` of messages, by its key (or topic/partition/offset).
pub(super) fn sampled(message: &crate::source::SourceMessage, salt: &[u8], share: f64) -> bool {
    // Per message: the key is hashed in place; only keyless messages format a name.
    let hash = match &message.key {
        Some(key) => sample_hash(&[key, salt]),
        None => sample_hash(&[format!("{}/{}/{}", message.topic, message.partition, message.offset).as_bytes(), salt]),
    };
    (hash as f64 / u64::MAX as f64) < share
}

/// FNV-1a, then MurmurHash3's 64-bit finalizer (FNV alone leaves the high bits of short keys
/// that differ only at the end nearly equal): stable across runs, machines and Rust versions,
/// which std's hasher does not promise.
fn sample_hash(parts: &[&[u8]]) -> u64 {
    let mut h =
        parts.iter().flat_map(|p| p.iter()).fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Where the consumer sends a route's messages: its first tier, and its shadow's engine.
pub(super) struct RouteSubmitters {
    pub primary: Submitter<MessageTag>,
    pub shadow: Option<Submitter<MessageTag>>,
    pub canary: Option<Submitter<MessageTag>>,
}

impl Route {
    pub fn first(&self) -> &Tier {
        &self.tiers[0]
    }
}

/// The started engines and the routes over them. Submitters are kept apart from the routes:
/// only the consumer holds the first tiers' (and each results task the next tiers' it feeds),
/// so dropping them at shutdown is what closes the engines, upstream tiers first.
pub(super) struct Started {
    pub routes: Arc<Vec<Route>>,
    /// Per route, its first tier's engine (and its shadow's).
    pub submitters: Vec<RouteSubmitters>,
    pub engines: Vec<Engine<MessageTag>>,
    /// Per engine, its outcomes (each engine its own channel: a tier's results task that
    /// waits on the next tier's queue never blocks the next tier's outcomes).
    pub outcomes: Vec<flume::Receiver<Outcome<MessageTag>>>,
    /// Per engine, the submitters of the engines its results may go on to.
    pub next_tiers: Vec<Vec<(usize, Submitter<MessageTag>)>>,
    /// Per engine, its model directory and the version loaded at start (for reloads).
    pub dirs: Vec<PathBuf>,
    pub serving: Vec<ModelInfo>,
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

/// The cores each engine may use: all of them for one model; shared out when several models
/// answer (cascade tiers, canaries, routes with their own models), so N models do not start N
/// sessions per core. An explicit `inference_threads` is taken as given.
fn engine_config(config: &Config, engines: usize) -> EngineConfig {
    let mut engine = config.batching.clone();
    if engines > 1 && engine.inference_threads == 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        engine.cores = Some((cores / engines).max(1));
    }
    engine
}

/// A shadow's engine takes no cores from the models that answer: one session over every core,
/// at a lower priority weighted by its share (`engine::nice_for_share`), so when the machine is
/// busy it gets about `share` of it and sheds the rest of its copies; when idle, all of it.
fn shadow_engine_config(config: &Config, share: f64) -> EngineConfig {
    let mut engine = config.batching.clone();
    if engine.inference_threads == 0 {
        engine.inference_threads = 1;
    }
    engine.cores = None;
    engine.nice = Some(crate::engine::nice_for_share(share));
    engine
}

/// Every model directory the routes use, once (in order of first use), with the settings of
/// its engine: those that answer messages share the cores; one only a shadow uses runs apart.
fn engine_plan(config: &Config) -> Vec<(PathBuf, EngineConfig)> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for route in &config.routes {
        for dir in Config::tiers(route).into_iter().chain(route.shadow.clone()).chain(route.canary.as_ref().map(|c| c.model.clone())) {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    let answering =
        |dir: &PathBuf| config.routes.iter().any(|r| Config::tiers(r).contains(dir) || r.canary.as_ref().is_some_and(|c| &c.model == dir));
    let shadow_share =
        |dir: &PathBuf| config.routes.iter().filter(|r| r.shadow.as_ref() == Some(dir)).map(|r| r.shadow_share).fold(0.0, f64::max);
    let shared = engine_config(config, dirs.iter().filter(|d| answering(d)).count());
    dirs.into_iter()
        .map(|dir| {
            let engine = if answering(&dir) { shared.clone() } else { shadow_engine_config(config, shadow_share(&dir)) };
            (dir, engine)
        })
        .collect()
}

pub(super) async fn start(config: &Config) -> Result<Started, WorkerError> {
    let plan = engine_plan(config);
    let dirs: Vec<PathBuf> = plan.iter().map(|(dir, _)| dir.clone()).collect();
    let mut engines: Vec<Engine<MessageTag>> = Vec::new();
    let mut models: Vec<Arc<Model>> = Vec::new();
    let mut outcomes = Vec::new();
    for (dir, this_config) in plan {
        let options = config.inference.clone();
        let model = tokio::task::spawn_blocking(move || Model::load(&dir, &options))
            .await
            .map_err(|e| WorkerError::TaskFailed { task: "model loading", detail: e.to_string() })??;
        let model = Arc::new(model);
        let (outcome_tx, outcome_rx) = flume::bounded::<Outcome<MessageTag>>(config.batching.queue_capacity);
        engines.push(Engine::start(model.clone(), &this_config, outcome_tx)?);
        outcomes.push(outcome_rx);
        let info = model.info();
        metrics::gauge!(telemetry::MODEL_INFO, "model" => info.name.clone(), "model_version" => info.version.clone(), "provider" => info.provider.to_string()).set(1.0);
        models.push(model);
    }
    let mut next_tiers: Vec<Vec<(usize, Submitter<MessageTag>)>> = (0..engines.len()).map(|_| Vec::new()).collect();
    // One registry client for every route that reads through it (one cache, one look-up per id).
    let registry = if config.routes.iter().any(|r| r.format != Format::Json && r.schema.file.is_none()) {
        Some(Arc::new(Registry::new(&config.schema_registry).map_err(|reason| WorkerError::Route { topic: "*".into(), reason })?))
    } else {
        None
    };
    let (mut routes, mut submitters) = (Vec::new(), Vec::new());
    for route in &config.routes {
        let tier_dirs = Config::tiers(route);
        let mut tiers = Vec::new();
        for (position, dir) in tier_dirs.iter().enumerate() {
            let engine = dirs.iter().position(|d| d == dir).unwrap_or_default();
            let model = &models[engine];
            let last = position + 1 == tier_dirs.len();
            if position > 0 {
                let from = tiers.last().map_or(0, |t: &Tier| t.engine);
                if !next_tiers[from].iter().any(|(e, _)| *e == engine) {
                    next_tiers[from].push((engine, engines[engine].submitter()));
                }
            }
            tiers.push(Tier::new(engine, tier_model(config, route, last, model, Some(engines[engine].current()))?));
        }
        let shadow = match &route.shadow {
            Some(dir) => {
                let engine = dirs.iter().position(|d| d == dir).unwrap_or_default();
                let model = &models[engine];
                Some(Tier::new(engine, tier_model(config, route, true, model, Some(engines[engine].current()))?))
            }
            None => None,
        };
        let canary = match &route.canary {
            Some(canary) => {
                let engine = dirs.iter().position(|d| *d == canary.model).unwrap_or_default();
                let model = &models[engine];
                Some(Tier::new(engine, tier_model(config, route, true, model, Some(engines[engine].current()))?))
            }
            None => None,
        };
        submitters.push(RouteSubmitters {
            primary: engines[tiers[0].engine].submitter(),
            shadow: shadow.as_ref().map(|s| engines[s.engine].submitter()),
            canary: canary.as_ref().map(|c| engines[c.engine].submitter()),
        });
        let reader = RecordReader::new(route.format, &route.schema, registry.clone(), config.max_message_bytes)
            .map_err(|reason| WorkerError::Route { topic: route.topic.clone(), reason })?;
        routes.push(Route { config: route.clone(), reader: Arc::new(reader), tiers, shadow, canary });
    }
    let serving = models.iter().map(|m| m.info().clone()).collect();
    Ok(Started { routes: Arc::new(routes), submitters, engines, outcomes, next_tiers, dirs, serving })
}

/// A route's tier as `model` serves it. Err when the route cannot use this model (its
/// escalation head is not one of the model's heads): at start a configuration error, on a
/// reload a reason to keep the old version.
pub(super) fn tier_model(
    config: &Config,
    route: &RouteConfig,
    last: bool,
    model: &Model,
    generation: Option<Arc<Generation>>,
) -> Result<TierModel, WorkerError> {
    if let Some(head) = route.escalation_head.as_ref().filter(|_| last) {
        if !model.heads().heads().iter().any(|h| &h.name == head) {
            return Err(WorkerError::Route {
                topic: route.topic.clone(),
                reason: format!("escalation_head `{head}` is not a head of {}", model.info().name),
            });
        }
    }
    // The route's own thresholds decide what leaves the last tier; earlier tiers pass on what
    // their own calibration doubts.
    let policy_route = if last {
        route.clone()
    } else {
        RouteConfig { escalation_threshold: None, escalation_head: None, ood_threshold: None, ..route.clone() }
    };
    Ok(TierModel {
        decoder: Decoder::new(route.fields.clone(), model.template().clone(), config.max_message_bytes, model.encoder().max_chars()),
        model: model.info().clone(),
        policy: EscalationPolicy::resolve(
            &policy_route,
            model.descriptor(),
            model.heads().ood().is_some(),
            config.escalation.default_threshold,
        ),
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CanaryConfig, RouteConfig};

    fn dir(name: &str) -> PathBuf {
        PathBuf::from(format!("models/{name}"))
    }

    fn config(routes: Vec<RouteConfig>, inference_threads: usize) -> Config {
        let mut config = crate::local::local_worker_config("w", Default::default(), Default::default(), routes, Default::default());
        config.batching.inference_threads = inference_threads;
        config
    }

    /// A cascade (small -> big) with a shadow, and a second route on the small model with a
    /// canary: four models, three of them answering.
    fn busy_routes() -> Vec<RouteConfig> {
        let mut tickets = RouteConfig::new("tickets", "ticket", dir("small"));
        tickets.cascade = vec![dir("small"), dir("big")];
        tickets.shadow = Some(dir("candidate"));
        tickets.shadow_share = 0.25;
        let mut returns = RouteConfig::new("returns", "return", dir("small"));
        returns.canary = Some(CanaryConfig { model: dir("canary"), share: 0.1 });
        vec![tickets, returns]
    }

    /// The cores an answering engine gets when `n` share them: the largest whole share that
    /// fits, at least one.
    fn assert_fair_share(each: Option<usize>, n: usize) {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let each = each.unwrap_or_else(|| panic!("{n} answering models must share the cores"));
        assert!(each >= 1 && (each * n <= cores || each == 1) && (each + 1) * n > cores, "{each} cores each for {n} models on {cores}");
    }

    #[test]
    fn answering_models_share_the_cores_and_a_shadow_runs_apart_at_its_share() {
        let plan = engine_plan(&config(busy_routes(), 0));
        let dirs: Vec<_> = plan.iter().map(|(d, _)| d.clone()).collect();
        assert_eq!(dirs, [dir("small"), dir("big"), dir("candidate"), dir("canary")], "each model once, in order of first use");
        for (d, engine) in plan.iter().filter(|(d, _)| *d != dir("candidate")) {
            assert_fair_share(engine.cores, 3);
            assert_eq!((engine.inference_threads, engine.nice), (0, None), "{}", d.display());
        }
        let shadow = &plan[2].1;
        assert_eq!(shadow.cores, None, "a shadow takes no cores from the answering models");
        assert_eq!(shadow.inference_threads, 1, "one session over every core");
        assert_eq!(shadow.nice, Some(crate::engine::nice_for_share(0.25)));
        assert!(shadow.nice > Some(0), "a quarter share runs at a lower priority");

        // Two answering models: half each.
        let mut tickets = RouteConfig::new("tickets", "ticket", dir("small"));
        tickets.cascade = vec![dir("small"), dir("big")];
        let plan = engine_plan(&config(vec![tickets], 0));
        assert_eq!(plan.len(), 2);
        plan.iter().for_each(|(_, engine)| assert_fair_share(engine.cores, 2));
    }

    #[test]
    fn one_model_takes_every_core_and_explicit_threads_are_taken_as_given() {
        let plan = engine_plan(&config(vec![RouteConfig::new("tickets", "ticket", dir("small"))], 0));
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].1, config(vec![], 0).batching, "one model: the settings as configured");

        let plan = engine_plan(&config(busy_routes(), 3));
        for (d, engine) in &plan {
            assert_eq!(engine.inference_threads, 3, "{}", d.display());
            assert_eq!(engine.cores, None, "explicit threads: no share of cores imposed ({})", d.display());
        }
        assert_eq!(plan[2].1.nice, Some(crate::engine::nice_for_share(0.25)), "the shadow still yields");
        assert_eq!(plan[0].1.nice, None);
    }
}
