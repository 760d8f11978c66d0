//! triage: classify business text (support tickets, returns, customer e-mails) with small ONNX
//! language models, at high volume, on your own CPUs or GPUs.
//!
//! The flow, one module per stage:
//! `message` (bytes -> text) -> `engine` (tokenizer pool -> `batcher` -> inference threads
//! running a `model`) -> results. `classify` drives it from JSON lines.

pub mod batcher;
pub mod classify;
pub mod engine;
pub mod message;
pub mod model;
pub mod paths;

pub use engine::{Classified, ClassifyError, Engine, EngineConfig, Outcome};
pub use model::{InferenceOptions, Model, ModelError, Prediction};
