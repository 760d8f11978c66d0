-- Small model vs LLM, per small-model version and label: on the messages `triage escalate`
-- answered, how often the LLM agreed with the small model's label, and what it chose instead.
-- Low agreement on a label with many answers is what to retrain on next
-- (`triage escalate --export-labels`). Runs on ClickHouse 18.16 and modern servers.
SELECT model_name, model_version, slm_category AS small_model_label,
       count() AS answered_by_llm,
       sum(category = slm_category) AS agreed,
       round(sum(category = slm_category) / count(), 4) AS agreement,
       topK(3)(category) AS llm_chose_instead
FROM triage.results FINAL
WHERE answered_by LIKE 'llm:%'
GROUP BY model_name, model_version, small_model_label
ORDER BY answered_by_llm DESC, agreement ASC
LIMIT 100
