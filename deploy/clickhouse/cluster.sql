-- triage results schema. Read each message once: SELECT ... FROM <table> FINAL, or
-- argMax(column, row_version) grouped by (topic, partition, offset).
-- Cluster layout (`triage schema print --cluster '{cluster}'`): a ReplicatedReplacingMergeTree
-- `results_local` on every replica, the Distributed `results` over them, sharded by the dedup key.
-- Needs ZooKeeper / ClickHouse Keeper, the {shard} and {replica} macros, and `{cluster}` in
-- remote_servers. triage inserts into `results` with insert_distributed_sync = 1 (set for you),
-- so an acknowledged INSERT is stored on its shard.
CREATE DATABASE IF NOT EXISTS triage ON CLUSTER '{cluster}';

CREATE TABLE IF NOT EXISTS triage.results_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/triage/results_local', '{replica}', row_version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (toDate(event_time), topic, partition, offset);

CREATE TABLE IF NOT EXISTS triage.results ON CLUSTER '{cluster}' AS triage.results_local
ENGINE = Distributed('{cluster}', triage, results_local, cityHash64(topic, partition, offset));

CREATE TABLE IF NOT EXISTS triage.results_shadow_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/triage/results_shadow_local', '{replica}', row_version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (toDate(event_time), topic, partition, offset);

CREATE TABLE IF NOT EXISTS triage.results_shadow ON CLUSTER '{cluster}' AS triage.results_shadow_local
ENGINE = Distributed('{cluster}', triage, results_shadow_local, cityHash64(topic, partition, offset));

CREATE TABLE IF NOT EXISTS triage.results_llm_spend_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/triage/results_llm_spend_local', '{replica}')
PARTITION BY toYYYYMMDD(time)
ORDER BY time;

CREATE TABLE IF NOT EXISTS triage.results_llm_spend ON CLUSTER '{cluster}' AS triage.results_llm_spend_local
ENGINE = Distributed('{cluster}', triage, results_llm_spend_local, rand());

CREATE TABLE IF NOT EXISTS triage.results_llm_batches_local ON CLUSTER '{cluster}'
(
    `time` DateTime,
    `batch_id` String,
    `custom_id` String,
    `state` String
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/triage/results_llm_batches_local', '{replica}')
PARTITION BY toYYYYMMDD(time)
ORDER BY (batch_id, custom_id);

CREATE TABLE IF NOT EXISTS triage.results_llm_batches ON CLUSTER '{cluster}' AS triage.results_llm_batches_local
ENGINE = Distributed('{cluster}', triage, results_llm_batches_local, rand());

CREATE VIEW IF NOT EXISTS triage.results_hourly ON CLUSTER '{cluster}' AS
SELECT toStartOfHour(event_time) AS hour, kind, category, priority,
       count() AS messages, sum(escalated) AS escalations, avg(confidence) AS mean_confidence
FROM triage.results FINAL
GROUP BY hour, kind, category, priority;

CREATE VIEW IF NOT EXISTS triage.results_escalation_rate ON CLUSTER '{cluster}' AS
SELECT toDate(event_time) AS day, kind, model_name, model_version,
       count() AS messages, sum(escalated) AS escalations, sum(escalated) / count() AS escalation_rate
FROM triage.results FINAL
GROUP BY day, kind, model_name, model_version;

CREATE VIEW IF NOT EXISTS triage.results_confidence_by_model ON CLUSTER '{cluster}' AS
SELECT toDate(event_time) AS day, model_name, model_version, category,
       count() AS messages, avg(confidence) AS mean_confidence,
       quantile(0.1)(confidence) AS p10_confidence, quantile(0.5)(confidence) AS median_confidence
FROM triage.results FINAL
GROUP BY day, model_name, model_version, category;

-- Upgrading a table created by an earlier release (`triage schema apply` does this itself):
-- (the columns it lacks, from the first it lacks on, in this order)
-- ALTER TABLE triage.results_local ON CLUSTER '{cluster}' ADD COLUMN `ood_score` Nullable(Float32), ADD COLUMN `redriven` UInt8, ADD COLUMN `tier` UInt8, ADD COLUMN `first_model_name` String, ADD COLUMN `first_category` String, ADD COLUMN `first_confidence` Float32, ADD COLUMN `answered_by` String, ADD COLUMN `row_version` UInt64, ADD COLUMN `slm_category` String, ADD COLUMN `slm_confidence` Float32, ADD COLUMN `slm_priority` String, ADD COLUMN `slm_tags` Array(String), ADD COLUMN `llm_prompt_tokens` UInt32, ADD COLUMN `llm_completion_tokens` UInt32, ADD COLUMN `llm_latency_ms` UInt32;
-- then the Distributed table, made again over the new columns (18.16 cannot ALTER it ON CLUSTER):
-- DROP TABLE IF EXISTS triage.results ON CLUSTER '{cluster}';
-- CREATE TABLE IF NOT EXISTS triage.results ON CLUSTER '{cluster}' AS triage.results_local ENGINE = Distributed('{cluster}', triage, results_local, cityHash64(topic, partition, offset));
