//! The error that stops a consumer (`triage run`'s worker or `triage escalate`): below both,
//! beside the settle path they share, so neither depends on the other.

use rdkafka::error::KafkaError;

use crate::model::ModelError;
use crate::sink::clickhouse::SinkError;
use crate::source::kafka::CheckTopicsError;
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("route `{topic}`: {reason}")]
    Route { topic: String, reason: String },
    #[error("the {task} task failed: {detail}")]
    TaskFailed { task: &'static str, detail: String },
    #[error("the ClickHouse sink stopped unexpectedly")]
    SinkStopped,
    #[error(transparent)]
    Topics(#[from] CheckTopicsError),
    #[error("model `{model}`: the inference backend is failing on every input, even input it answered before ({detail}). The worker stopped without dead-lettering (the messages are not at fault); check the device, memory and model, then restart")]
    Backend { model: String, detail: String },
    #[error("LLM tier: {0}")]
    Llm(String),
    #[error("{0}; the worker stopped with offsets committed below the messages that needed it")]
    SchemaRegistry(String),
    #[error("{0}; the worker stopped with offsets committed up to the message it could not settle (fix the topic, then restart)")]
    SideTopic(#[from] crate::sink::kafka::WriteError),
}
