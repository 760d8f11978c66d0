-- Retention on the cluster layout (cluster.sql): the TTL goes on every replica's local
-- ReplicatedReplacingMergeTree, ON CLUSTER; the Distributed table `results` stores nothing.
-- Replace {cluster} with your cluster's name, or keep the macro if it is defined.
ALTER TABLE triage.results_local ON CLUSTER '{cluster}' MODIFY TTL event_time + INTERVAL 400 DAY;
-- Shadow models' answers (results_shadow_local) are for comparison: keep them shorter.
ALTER TABLE triage.results_shadow_local ON CLUSTER '{cluster}' MODIFY TTL event_time + INTERVAL 90 DAY;
-- `triage escalate`'s spend ledger counts only the last hour, and its batch record only the
-- last three days: a month of each is plenty for audits.
ALTER TABLE triage.results_llm_spend_local ON CLUSTER '{cluster}' MODIFY TTL time + INTERVAL 30 DAY;
ALTER TABLE triage.results_llm_batches_local ON CLUSTER '{cluster}' MODIFY TTL time + INTERVAL 30 DAY;
