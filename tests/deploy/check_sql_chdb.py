#!/usr/bin/env python3
"""Run deploy/clickhouse SQL on a modern ClickHouse engine (chdb: ClickHouse 26.x in-process).

    .venv/bin/python tests/deploy/check_sql_chdb.py

The same files run against Debian's ClickHouse 18.16 in tests/deploy.rs: together they show the
DDL, the TTL option, the views and the analytics queries work on both. Replays are inserted on
purpose: FINAL must read each message once. Exits non-zero with the failing statement.
"""
import os
import sys
import tempfile

from chdb import session

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CH = os.path.join(ROOT, "deploy", "clickhouse")


def statements(path):
    text = open(path).read()
    body = "\n".join(l for l in text.splitlines() if not l.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        s = session.Session(tmp)
        version = s.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
        for stmt in statements(os.path.join(CH, "schema.sql")) + statements(os.path.join(CH, "ttl.sql")):
            s.query(stmt)
        rows = []
        for o in list(range(60)) + list(range(10)):  # ten replays
            kind = ["ticket", "return", "email"][o % 3]
            category = ["card_arrival", "refund", "pin"][o % 3]
            rows.append(
                f"('tickets', 0, {o}, 'm{o}', '{kind}', now() - {o}, toUInt64(toUnixTimestamp(now()) - {o}) * 1000, "
                f"toUInt64(toUnixTimestamp(now())) * 1000 - 50, toUInt64(toUnixTimestamp(now())) * 1000, 'customer-service', '1.0.0', "
                f"'{category}', {0.3 + (o % 7) / 10}, 'low', [], [], ['intent'], ['{category}'], [0.9], {int(o % 4 == 0)}, 40, 12, 0, [], [], 'w', {0.1 * (o % 5)}, 0, "
                f"0, 'customer-service', '{category}', {0.3 + (o % 7) / 10}, "
                f"'model:customer-service', toUInt64(toUnixTimestamp(now())) * 1000, '', 0, '', [], 0, 0, 0)"
            )
        # Ten messages answered again by an LLM (a higher-ranked version): FINAL keeps its answer.
        for o in range(0, 20, 2):
            kind = ["ticket", "return", "email"][o % 3]
            category = ["card_arrival", "refund", "pin"][o % 3]
            answer = category if o % 4 == 0 else "card_linking"
            rows.append(
                f"('tickets', 0, {o}, 'm{o}', '{kind}', now() - {o}, toUInt64(toUnixTimestamp(now()) - {o}) * 1000, "
                f"toUInt64(toUnixTimestamp(now())) * 1000 - 50, toUInt64(toUnixTimestamp(now())) * 1000, 'customer-service', '1.0.0', "
                f"'{answer}', 1, 'low', [], [], ['intent'], ['{answer}'], [1], 1, 40, 12, 0, [], [], 'e', NULL, 0, "
                f"0, 'customer-service', '{category}', 0.3, "
                f"'llm:big', bitShiftLeft(toUInt64(1), 48) + toUInt64(toUnixTimestamp(now())) * 1000, '{category}', 0.3, 'low', [], 120, 8, 900)"
            )
        s.query("INSERT INTO triage.results VALUES " + ", ".join(rows))
        # A shadow model's answers for the first 30 messages (query 07 joins them).
        s.query("INSERT INTO triage.results_shadow SELECT * REPLACE ('candidate' AS model_name, '2.0.0-rc1' AS model_version) "
                "FROM triage.results WHERE offset < 30 AND answered_by = 'model:customer-service'")
        final = int(s.query("SELECT count() FROM triage.results FINAL", "CSV").bytes().decode().strip())
        assert final == 60, f"FINAL read {final} rows, expected 60"
        llm = int(s.query("SELECT count() FROM triage.results FINAL WHERE answered_by = 'llm:big'", "CSV").bytes().decode().strip())
        assert llm == 10, f"FINAL kept {llm} LLM answers, expected 10"
        hourly = int(s.query("SELECT sum(messages) FROM triage.results_hourly", "CSV").bytes().decode().strip())
        assert hourly == 60, f"results_hourly counted {hourly}, expected 60"
        for view in ["results_escalation_rate", "results_confidence_by_model"]:
            s.query(f"SELECT * FROM triage.{view}", "CSV")
        queries = sorted(os.listdir(os.path.join(CH, "queries")))
        for name in queries:
            (sql,) = statements(os.path.join(CH, "queries", name))
            out = s.query(sql, "CSV").bytes().decode().strip()
            assert out, f"{name} returned no rows"
        print(f"chdb {version}: schema, TTL, views and {len(queries)} queries ok")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report any failure as one line for the Rust test
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
