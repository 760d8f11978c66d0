-- A shadow model against the model serving the route (`shadow = "models/candidate"` in a route),
-- per day and primary label, on the messages both classified: how often they agree, their mean
-- confidences, how many of the primary's escalations the shadow would have answered itself (it
-- would not have escalated them, by its own calibration), and where the LLM tier answered, each
-- model's agreement with the LLM. Runs on ClickHouse 18.16 and modern servers.
SELECT toDate(event_time) AS day, model_name AS primary_model, shadow_model, shadow_version,
       model_category AS primary_label,
       count() AS messages,
       round(avg(shadow_category = model_category), 4) AS agreement,
       round(avg(model_confidence), 4) AS primary_confidence,
       round(avg(shadow_confidence), 4) AS shadow_confidence,
       sum(escalated) AS primary_escalated,
       sum(escalated AND NOT shadow_escalated) AS shadow_would_have_answered,
       sum(answered_by LIKE 'llm:%') AS answered_by_llm,
       round(avgIf(model_category = category, answered_by LIKE 'llm:%'), 4) AS primary_agrees_with_llm,
       round(avgIf(shadow_category = category, answered_by LIKE 'llm:%'), 4) AS shadow_agrees_with_llm
FROM
(
    SELECT topic, partition, offset, event_time, model_name, category, escalated, answered_by,
           if(answered_by LIKE 'llm:%', slm_category, category) AS model_category,
           if(answered_by LIKE 'llm:%', slm_confidence, confidence) AS model_confidence
    FROM triage.results FINAL
) AS primary
ALL INNER JOIN
(
    SELECT topic, partition, offset, model_name AS shadow_model, model_version AS shadow_version,
           category AS shadow_category, confidence AS shadow_confidence, escalated AS shadow_escalated
    FROM triage.results_shadow FINAL
) AS shadow USING (topic, partition, offset)
GROUP BY day, primary_model, shadow_model, shadow_version, primary_label
ORDER BY day DESC, messages DESC
LIMIT 100
