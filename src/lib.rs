//! triage: classify business text (support tickets, returns, customer e-mails) with small ONNX
//! language models, at high volume, on your own CPUs or GPUs.
//!
//! The flow, one module per stage:
//! `source` (Kafka consumer group, offset tracker) -> `message` (bytes -> text) -> `engine`
//! (tokenizer pool -> `batcher` -> inference threads running a `model`) -> `sink` (ClickHouse
//! rows; dead-letter and escalation topics). `worker` wires them for `triage run` and owns the
//! one settle path; `classify` drives the engine from JSON lines. `config` composes each
//! component's configuration; `telemetry` declares the metrics and the typed events.

pub mod batcher;
pub mod bench;
pub mod classify;
pub mod config;
pub mod demo;
pub mod engine;
pub mod error;
pub mod headers;
pub mod http;
pub mod kafka_tools;
pub mod llm;
pub mod local;
pub mod message;
pub mod model;
pub mod paths;
pub mod retry;
pub mod secret;
pub mod settle;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod time;
pub mod train;
pub mod worker;

pub use engine::{Classified, ClassifyError, Engine, EngineConfig, Outcome};
pub use model::{InferenceOptions, Model, ModelError, Prediction};
