-- Top categories this week (since Monday), with their share of all messages this week.
SELECT category, count() AS messages,
       round(count() / (SELECT count() FROM triage.results FINAL WHERE toDate(event_time) >= toMonday(today())), 4) AS share
FROM triage.results FINAL
WHERE toDate(event_time) >= toMonday(today())
GROUP BY category
ORDER BY messages DESC
LIMIT 10
