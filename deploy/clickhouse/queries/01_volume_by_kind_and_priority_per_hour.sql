-- Volume by kind and priority per hour, last 24 hours (each message once: FINAL).
SELECT toStartOfHour(event_time) AS hour, kind, priority, count() AS messages
FROM triage.results FINAL
WHERE event_time >= now() - INTERVAL 1 DAY
GROUP BY hour, kind, priority
ORDER BY hour, kind, priority
