-- Retention: drop results a while after their event time. Needs ClickHouse 19.6+ (not 18.16).
-- Whole monthly partitions expire at once with ttl_only_drop_parts (20.x+), which is cheap.
-- Single server (schema.sql). On a cluster (cluster.sql) use ttl-cluster.sql instead: a TTL
-- belongs to the table that stores rows, never to the Distributed table.
ALTER TABLE triage.results MODIFY TTL event_time + INTERVAL 400 DAY;
-- Shadow models' answers (results_shadow) are for comparison: keep them shorter.
ALTER TABLE triage.results_shadow MODIFY TTL event_time + INTERVAL 90 DAY;
-- `triage escalate`'s spend ledger counts only the last hour, and its batch record only the
-- last three days: a month of each is plenty for audits.
ALTER TABLE triage.results_llm_spend MODIFY TTL time + INTERVAL 30 DAY;
ALTER TABLE triage.results_llm_batches MODIFY TTL time + INTERVAL 30 DAY;
