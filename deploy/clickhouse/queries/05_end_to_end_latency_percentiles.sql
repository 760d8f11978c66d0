-- Latency percentiles by kind, in milliseconds: inside the worker (consumed -> handed to
-- ClickHouse) and since the event happened (event time -> handed to ClickHouse).
SELECT kind, count() AS messages,
       quantiles(0.5, 0.9, 0.99)(toInt64(processed_time_ms) - toInt64(consumed_time_ms)) AS worker_ms_p50_p90_p99,
       quantiles(0.5, 0.9, 0.99)(toInt64(processed_time_ms) - toInt64(event_time_ms)) AS since_event_ms_p50_p90_p99
FROM triage.results FINAL
WHERE event_time >= now() - INTERVAL 1 DAY
GROUP BY kind
ORDER BY kind
