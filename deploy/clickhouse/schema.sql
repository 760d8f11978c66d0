-- triage results schema. Read each message once: SELECT ... FROM <table> FINAL, or
-- argMax(column, row_version) grouped by (topic, partition, offset).
CREATE DATABASE IF NOT EXISTS triage;

CREATE TABLE IF NOT EXISTS triage.results
(
    `topic` String,
    `partition` UInt32,
    `offset` UInt64,
    `message_id` String,
    `kind` String,
    `event_time` DateTime,
    `event_time_ms` UInt64,
    `consumed_time_ms` UInt64,
    `processed_time_ms` UInt64,
    `model_name` String,
    `model_version` String,
    `category` String,
    `confidence` Float32,
    `priority` String,
    `tags` Array(String),
    `tag_scores` Array(Float32),
    `head_names` Array(String),
    `head_labels` Array(String),
    `head_scores` Array(Float32),
    `escalated` UInt8,
    `text_chars` UInt32,
    `tokens` UInt32,
    `truncated` UInt8,
    `metadata_keys` Array(String),
    `metadata_values` Array(String),
    `worker_id` String,
    `ood_score` Nullable(Float32),
    `redriven` UInt8,
    `tier` UInt8,
    `first_model_name` String,
    `first_category` String,
    `first_confidence` Float32,
    `answered_by` String,
    `row_version` UInt64,
    `slm_category` String,
    `slm_confidence` Float32,
    `slm_priority` String,
    `slm_tags` Array(String),
    `llm_prompt_tokens` UInt32,
    `llm_completion_tokens` UInt32,
    `llm_latency_ms` UInt32
)
ENGINE = ReplacingMergeTree(row_version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (toDate(event_time), topic, partition, offset);

CREATE TABLE IF NOT EXISTS triage.results_shadow
(
    `topic` String,
    `partition` UInt32,
    `offset` UInt64,
    `message_id` String,
    `kind` String,
    `event_time` DateTime,
    `event_time_ms` UInt64,
    `consumed_time_ms` UInt64,
    `processed_time_ms` UInt64,
    `model_name` String,
    `model_version` String,
    `category` String,
    `confidence` Float32,
    `priority` String,
    `tags` Array(String),
    `tag_scores` Array(Float32),
    `head_names` Array(String),
    `head_labels` Array(String),
    `head_scores` Array(Float32),
    `escalated` UInt8,
    `text_chars` UInt32,
    `tokens` UInt32,
    `truncated` UInt8,
    `metadata_keys` Array(String),
    `metadata_values` Array(String),
    `worker_id` String,
    `ood_score` Nullable(Float32),
    `redriven` UInt8,
    `tier` UInt8,
    `first_model_name` String,
    `first_category` String,
    `first_confidence` Float32,
    `answered_by` String,
    `row_version` UInt64,
    `slm_category` String,
    `slm_confidence` Float32,
    `slm_priority` String,
    `slm_tags` Array(String),
    `llm_prompt_tokens` UInt32,
    `llm_completion_tokens` UInt32,
    `llm_latency_ms` UInt32
)
ENGINE = ReplacingMergeTree(row_version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (toDate(event_time), topic, partition, offset);

CREATE TABLE IF NOT EXISTS triage.results_llm_spend
(
    `time` DateTime,
    `time_ms` UInt64,
    `instance` String,
    `worker_id` String,
    `model` String,
    `prompt_tokens` UInt64,
    `completion_tokens` UInt64,
    `cost` Float64
)
ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY time;

CREATE TABLE IF NOT EXISTS triage.results_llm_batches
(
    `time` DateTime,
    `batch_id` String,
    `custom_id` String,
    `state` String
)
ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(time)
ORDER BY (batch_id, custom_id);

CREATE VIEW IF NOT EXISTS triage.results_hourly AS
SELECT toStartOfHour(event_time) AS hour, kind, category, priority,
       count() AS messages, sum(escalated) AS escalations, avg(confidence) AS mean_confidence
FROM triage.results FINAL
GROUP BY hour, kind, category, priority;

CREATE VIEW IF NOT EXISTS triage.results_escalation_rate AS
SELECT toDate(event_time) AS day, kind, model_name, model_version,
       count() AS messages, sum(escalated) AS escalations, sum(escalated) / count() AS escalation_rate
FROM triage.results FINAL
GROUP BY day, kind, model_name, model_version;

CREATE VIEW IF NOT EXISTS triage.results_confidence_by_model AS
SELECT toDate(event_time) AS day, model_name, model_version, category,
       count() AS messages, avg(confidence) AS mean_confidence,
       quantile(0.1)(confidence) AS p10_confidence, quantile(0.5)(confidence) AS median_confidence
FROM triage.results FINAL
GROUP BY day, model_name, model_version, category;

-- Upgrading a table created by an earlier release (`triage schema apply` does this itself):
-- (the columns it lacks, from the first it lacks on, in this order)
-- ALTER TABLE triage.results ADD COLUMN `ood_score` Nullable(Float32), ADD COLUMN `redriven` UInt8, ADD COLUMN `tier` UInt8, ADD COLUMN `first_model_name` String, ADD COLUMN `first_category` String, ADD COLUMN `first_confidence` Float32, ADD COLUMN `answered_by` String, ADD COLUMN `row_version` UInt64, ADD COLUMN `slm_category` String, ADD COLUMN `slm_confidence` Float32, ADD COLUMN `slm_priority` String, ADD COLUMN `slm_tags` Array(String), ADD COLUMN `llm_prompt_tokens` UInt32, ADD COLUMN `llm_completion_tokens` UInt32, ADD COLUMN `llm_latency_ms` UInt32;
