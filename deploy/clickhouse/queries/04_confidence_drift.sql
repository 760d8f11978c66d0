-- Confidence drift: daily confidence per model version and kind over 30 days. A falling median,
-- a growing low-confidence share or a rising out-of-distribution score means the traffic moved
-- away from what the model knows (ood_score is NULL for models without a gate: avg skips it).
SELECT toDate(event_time) AS day, model_version, kind, count() AS messages,
       round(avg(confidence), 4) AS mean_confidence,
       round(quantile(0.5)(confidence), 4) AS median_confidence,
       round(countIf(confidence < 0.5) / count(), 4) AS low_confidence_share,
       round(avg(ood_score), 4) AS mean_ood_score
FROM triage.results FINAL
WHERE event_time >= now() - INTERVAL 30 DAY
GROUP BY day, model_version, kind
ORDER BY day, model_version, kind
