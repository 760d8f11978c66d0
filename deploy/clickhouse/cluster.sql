-- triage results on a ClickHouse cluster (23.x-25.x with ClickHouse Keeper / ZooKeeper).
-- Each shard holds a ReplicatedReplacingMergeTree; the Distributed table shards rows by the
-- dedup key (topic, partition, offset), so a replayed message lands on the same shard as its
-- first copy and FINAL (applied per shard) still reads it once. Insert into `results` with
-- synchronous distributed inserts, so an acknowledged INSERT means the row is stored on its
-- shard: in triage's config, [clickhouse.settings] insert_distributed_sync = "1"
-- (distributed_foreground_insert on 23.3+, which keeps the old name as an alias).
-- Replace {cluster} with your cluster's name, or keep the macro if it is defined.

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
    `redriven` UInt8
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/triage/results_local', '{replica}', processed_time_ms)
PARTITION BY toYYYYMM(event_time)
ORDER BY (toDate(event_time), topic, partition, offset);

CREATE TABLE IF NOT EXISTS triage.results ON CLUSTER '{cluster}' AS triage.results_local
ENGINE = Distributed('{cluster}', triage, results_local, cityHash64(topic, partition, offset));
