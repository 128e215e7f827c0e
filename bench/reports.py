"""The report rows of the scaling measurement: revenue_report and mrr_report for one month over
the 10^5- and the 10^7-entry databases (with the Stripe history of bench/sql/revenue_history.sql
beside the ledger's), interleaved in rounds, and the plans of the statements inside each report
(auto_explain of the nested statements) for the results' notes."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from datetime import UTC, datetime

from bench.report import Row
from scripts.pgcluster import PgCluster

RUNS_PER_ROUND = 5


def last_full_month() -> tuple[str, str]:
    now = datetime.now(UTC)
    first = datetime(now.year, now.month, 1, tzinfo=UTC)
    previous = datetime(first.year - (first.month == 1), (first.month - 2) % 12 + 1, 1, tzinfo=UTC)
    return previous.isoformat(), first.isoformat()


def report_sql(name: str) -> str:
    start, end = last_full_month()
    if name == "revenue_report":
        return f"select * from public.revenue_report('{start}', '{end}', 'month')"
    return f"select * from public.mrr_report('{start}', '{end}')"


def execution_ms(cluster: PgCluster, dbname: str, sql: str) -> float:
    """The executor's time of one call (planning excluded), as EXPLAIN ANALYZE reports it."""
    out = cluster.psql(dbname, f"explain (analyze, timing off, summary on, format json) {sql}")
    return float(json.loads(out)[0]["Execution Time"])


def nested_plans(cluster: PgCluster, dbname: str, sql: str) -> str:
    """The plans of the statements a report runs (auto_explain, as the superuser)."""
    script = (
        "load 'auto_explain'; set auto_explain.log_min_duration = 0; "
        "set auto_explain.log_nested_statements = on; set auto_explain.log_analyze = on; "
        "set auto_explain.log_timing = off; set client_min_messages = log; "
        f"{sql};"
    )
    proc = subprocess.run(
        ["psql", "-X", "-q", "-d", cluster.dsn(dbname), "-c", script],
        capture_output=True,
        text=True,
        env=cluster.env(dbname),
        check=False,
    )
    plans = [
        block for block in re.split(r"^LOG:  ", proc.stderr, flags=re.M) if "Query Text" in block
    ]
    # The report's own statement (the biggest plan), not the function call around it.
    return max(plans, key=len).rstrip() if plans else proc.stderr.strip()


def report_rows(
    cluster: PgCluster, dbs: dict[str, str], labels: dict[str, str], rounds: int
) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    for name in ("revenue_report", "mrr_report"):
        sql = report_sql(name)
        per_round: dict[str, list[float]] = {"small": [], "large": []}
        for index in range(rounds):
            order = ["small", "large"] if index % 2 == 0 else ["large", "small"]
            for size in order:
                times = [execution_ms(cluster, dbs[size], sql) for _ in range(RUNS_PER_ROUND)]
                per_round[size].append(statistics.median(times))
        rows.append(
            Row(
                f"{name}, one month, {labels['large']} vs {labels['small']} ledger rows "
                "(Stripe history beside it, bench/sql/revenue_history.sql)",
                "1",
                "ms",
                per_round["large"],
                labels["small"],
                per_round["small"],
                "<=",
                1.5,
            )
        )
        for size in ("small", "large"):
            plan = nested_plans(cluster, dbs[size], sql)
            indented = "\n".join("    " + line for line in plan.splitlines())
            notes.append(f"plan of `{sql}` in the {labels[size]} database:\n\n{indented}\n")
    return rows, notes
