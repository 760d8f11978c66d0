-- Escalation rate by model version: did the new model send fewer messages to people?
SELECT model_name, model_version, count() AS messages, sum(escalated) AS escalations,
       round(sum(escalated) / count(), 4) AS escalation_rate
FROM triage.results FINAL
GROUP BY model_name, model_version
ORDER BY model_name, model_version
