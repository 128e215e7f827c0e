"""`make bench` (`python -m bench.run`): the deduct path, reservations and webhooks against
references measured in the same run, printed as one markdown table and written to
bench/results/latest.md.

The bench starts its own throwaway cluster (scripts/pgcluster.py, as the tests do), applies the
migrations with the Supabase CLI, loads the references next to them (bench/reference/), and runs
pgbench scripts (bench/scripts/) in rounds: within a round every workload runs right after its
references, the order flips each round, and each row reports the median of its per-round
ratios. On a shared, noisy machine absolute figures drift; side-by-side ratios hold.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import report, stripe
from bench.pgbench import Run, init_tpcb, run_script
from bench.report import Row
from scripts.pgcluster import OWNER, ROOT, PgCluster, build_template, temporary_cluster

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "latest.md"
TEMPLATE = "tb_bench_template"
MAIN_DB = "tb_bench"
TPCB_DB = "tb_tpcb"
# Reservations per settle_reservations call in the batch script: its reserve_tokens calls.
BATCH_SETTLE_SIZE = (
    (BENCH / "scripts" / "reserve_settle_batch.sql").read_text().count("public.reserve_tokens(")
)
SCALE_DBS = {"small": "tb_scale_small", "large": "tb_scale_large"}

# Durability stays off as in the tests (scripts/pgcluster.py); room for a 10^7-row ledger.
SETTINGS = {
    "shared_buffers": "'1GB'",
    "max_wal_size": "'8GB'",
    "checkpoint_timeout": "'30min'",
    "max_connections": "200",
}


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    rounds: int
    seconds: float
    history_rows: int
    variants: list[Path]
    output: Path
    skip_scaling: bool
    skip_webhooks: bool
    profile: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--seconds", type=float, default=4, help="seconds per pgbench run (default 4)"
    )
    parser.add_argument(
        "--history-rows",
        type=int,
        default=10_000_000,
        help="ledger rows of the large scaling database (default 10^7; the small one has 10^5)",
    )
    parser.add_argument(
        "--variant",
        type=Path,
        action="append",
        default=[],
        help="SQL applied as postgres after the migrations (to measure a proposed change)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the table goes")
    parser.add_argument("--skip-scaling", action="store_true", help="no 10^5/10^7 ledger run")
    parser.add_argument("--skip-webhooks", action="store_true", help="no HTTP webhook run")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="load pg_stat_statements (track=all) and print the costliest statements; "
        "sample the service with py-spy during one more webhook run",
    )
    ns = parser.parse_args(argv)
    return Options(
        rounds=ns.rounds,
        seconds=ns.seconds,
        history_rows=ns.history_rows,
        variants=ns.variant,
        output=ns.output,
        skip_scaling=ns.skip_scaling,
        skip_webhooks=ns.skip_webhooks,
        profile=ns.profile,
    )


# --- setup ------------------------------------------------------------------------------------


def prepare(cluster: PgCluster, opts: Options) -> list[str]:
    """Template (migrations + seed + variants), the main bench database and TPC-B's."""
    notes: list[str] = []
    started = time.monotonic()
    build_template(cluster, TEMPLATE, extensions=(), as_template=False, pgtap_helpers=None)
    for variant in opts.variants:
        cluster.psql(TEMPLATE, file=variant, user=OWNER)
        notes.append(f"variant applied after the migrations: `{variant}`")
    cluster.mark_template(TEMPLATE)
    log(f"migrated template in {time.monotonic() - started:.1f}s")

    load_fixtures(cluster, MAIN_DB)
    if stripe.handle_stripe_event_exists(cluster, MAIN_DB) and stripe.fixtures_present():
        stripe.load(cluster, MAIN_DB)
    cluster.create_database(TPCB_DB)
    init_tpcb(cluster, TPCB_DB, scale=10)
    log(f"bench databases ready in {time.monotonic() - started:.1f}s")
    return notes


def load_fixtures(cluster: PgCluster, dbname: str) -> None:
    cluster.create_database(dbname, template=TEMPLATE)
    cluster.psql(dbname, file=BENCH / "reference" / "floor.sql", user=OWNER)
    cluster.psql(dbname, file=BENCH / "reference" / "seed_guide_deduct.sql", user=OWNER)
    cluster.psql(dbname, file=BENCH / "sql" / "fixtures.sql")


def ledger_high_water(cluster: PgCluster, dbname: str) -> int:
    out = cluster.psql(dbname, "select coalesce(max(id), 0) from billing.ledger_entries")
    return int(out.strip())


def entries_since(cluster: PgCluster, dbname: str, high_water: int) -> int:
    out = cluster.psql(
        dbname, f"select count(*) from billing.ledger_entries where id > {int(high_water)}"
    )
    return int(out.strip())


# --- the rounds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One pgbench run of a round. `ledger` jobs check that each transaction (one run of the
    script) wrote `per_txn` entries."""

    key: str
    script: str
    clients: int
    ledger: bool = False
    builtin: str | None = None
    dbname: str = MAIN_DB
    per_txn: int = 1


def round_groups(with_stripe: bool) -> list[list[Job]]:
    """Each group runs back to back (order flipped every other round)."""
    groups: list[list[Job]] = [[Job("tpcb/8", "", 8, builtin="tpcb-like", dbname=TPCB_DB)]]
    for clients in (1, 8, 32):
        group = [
            Job(f"floor/{clients}", "floor_deduct", clients),
            Job(f"guide/{clients}", "guide_deduct", clients),
            Job(f"deduct/{clients}", "deduct", clients, ledger=True),
        ]
        if clients == 8:
            group += [
                Job("floor_rpc/8", "floor_rpc_deduct", 8),
                Job("reserve_settle/8", "reserve_settle", 8, ledger=True),
                Job(
                    "reserve_settle_batch/8",
                    "reserve_settle_batch",
                    8,
                    ledger=True,
                    per_txn=BATCH_SETTLE_SIZE,
                ),
                Job("add_tokens/8", "add_tokens", 8, ledger=True),
                Job("record_usage_unit/8", "record_usage_unit", 8, ledger=True),
                Job("record_usage_tiered/8", "record_usage_tiered", 8, ledger=True),
            ]
            if with_stripe:
                group.append(Job("stripe/8", "stripe_event", 8))
        groups.append(group)
    for clients in (8, 32):
        groups.append(
            [
                Job(f"floor_hot/{clients}", "floor_hot", clients),
                Job(f"guide_hot/{clients}", "guide_hot", clients),
                Job(f"deduct_hot/{clients}", "deduct_hot", clients, ledger=True),
            ]
        )
    return groups


def run_rounds(
    cluster: PgCluster, opts: Options, with_stripe: bool
) -> tuple[dict[str, list[Run]], list[str]]:
    runs: dict[str, list[Run]] = {}
    shortfalls: list[str] = []
    groups = round_groups(with_stripe)
    for index in range(opts.rounds):
        started = time.monotonic()
        for group in groups:
            ordered = group if index % 2 == 0 else list(reversed(group))
            for job in ordered:
                high_water = ledger_high_water(cluster, job.dbname) if job.ledger else 0
                run = run_script(
                    cluster,
                    job.dbname,
                    job.script,
                    clients=job.clients,
                    seconds=opts.seconds,
                    label=job.key,
                    as_api=job.builtin is None,
                    builtin=job.builtin,
                )
                if job.ledger:
                    written = entries_since(cluster, job.dbname, high_water)
                    if written < run.processed * job.per_txn:
                        shortfalls.append(
                            f"round {index + 1} {job.key}: {run.processed} transactions wrote "
                            f"{written} ledger entries, not {job.per_txn} each "
                            "(not every call was applied)"
                        )
                runs.setdefault(job.key, []).append(run)
        log(f"round {index + 1}/{opts.rounds} done in {time.monotonic() - started:.0f}s")
    return runs, shortfalls


def tps(runs: dict[str, list[Run]], key: str) -> list[float]:
    return [run.tps for run in runs.get(key, [])]


def throughput_rows(runs: dict[str, list[Run]], with_stripe: bool) -> list[Row]:
    rows = [
        Row("pgbench TPC-B (yardstick, as superuser)", "8", "tps", tps(runs, "tpcb/8")),
    ]
    for clients in (1, 8, 32):
        target_guide = 1.2 if clients in (8, 32) else None
        target_floor = 0.7 if clients in (8, 32) else None
        rows += [
            Row(
                "deduct_tokens, 10,000 accounts, vs seed guide",
                str(clients),
                "tps",
                tps(runs, f"deduct/{clients}"),
                "seed guide",
                tps(runs, f"guide/{clients}"),
                ">=",
                target_guide,
            ),
            Row(
                "deduct_tokens, 10,000 accounts, vs floor",
                str(clients),
                "tps",
                tps(runs, f"deduct/{clients}"),
                "floor",
                tps(runs, f"floor/{clients}"),
                ">=",
                target_floor,
            ),
        ]
    rows.append(
        Row(
            "the floor's statement in a plpgsql RPC (ceiling of any RPC) vs floor",
            "8",
            "tps",
            tps(runs, "floor_rpc/8"),
            "floor",
            tps(runs, "floor/8"),
        )
    )
    for clients in (8, 32):
        rows += [
            Row(
                "deduct_tokens, one hot account, vs seed guide",
                str(clients),
                "tps",
                tps(runs, f"deduct_hot/{clients}"),
                "seed guide",
                tps(runs, f"guide_hot/{clients}"),
                ">=",
                1.2 if clients == 32 else None,
            ),
            Row(
                "deduct_tokens, one hot account, vs floor",
                str(clients),
                "tps",
                tps(runs, f"deduct_hot/{clients}"),
                "floor",
                tps(runs, f"floor_hot/{clients}"),
            ),
        ]
    rows += [
        Row(
            "reserve_tokens + settle_reservation pairs vs deduct_tokens",
            "8",
            "pairs/s",
            tps(runs, "reserve_settle/8"),
            "deduct_tokens",
            tps(runs, "deduct/8"),
            ">=",
            0.5,
            reference_unit="tps",
        ),
        Row(
            f"reserve_tokens x{BATCH_SETTLE_SIZE}, then one settle_reservations of them, "
            "vs deduct_tokens",
            "8",
            "pairs/s",
            [t * BATCH_SETTLE_SIZE for t in tps(runs, "reserve_settle_batch/8")],
            "deduct_tokens",
            tps(runs, "deduct/8"),
            ">=",
            0.5,
            reference_unit="tps",
        ),
        Row(
            "add_tokens vs deduct_tokens",
            "8",
            "tps",
            tps(runs, "add_tokens/8"),
            "deduct_tokens",
            tps(runs, "deduct/8"),
        ),
        # Issue 16: at most 1.3x (per unit) and 1.5x (graduated, 4 tiers) the cost of a deduct,
        # i.e. at least 1/1.3 and 1/1.5 of its throughput.
        Row(
            "record_usage, 1 item, per-unit price, vs deduct_tokens",
            "8",
            "tps",
            tps(runs, "record_usage_unit/8"),
            "deduct_tokens",
            tps(runs, "deduct/8"),
            ">=",
            round(1 / 1.3, 2),
        ),
        Row(
            "record_usage, 1 item, graduated price with 4 tiers, vs deduct_tokens",
            "8",
            "tps",
            tps(runs, "record_usage_tiered/8"),
            "deduct_tokens",
            tps(runs, "deduct/8"),
            ">=",
            round(1 / 1.5, 2),
        ),
    ]
    if with_stripe:
        rows.append(
            Row(
                "handle_stripe_event, real fixture payloads, vs deduct_tokens",
                "8",
                "ev/s",
                tps(runs, "stripe/8"),
                "deduct_tokens",
                tps(runs, "deduct/8"),
                reference_unit="tps",
            )
        )
    else:
        rows.append(
            Row(
                "handle_stripe_event, real fixture payloads",
                "8",
                "ev/s",
                [],
                note="public.handle_stripe_event or the Stripe fixtures are missing",
            )
        )
    return rows


# --- scaling ----------------------------------------------------------------------------------


def scaling_rows(cluster: PgCluster, opts: Options) -> tuple[list[Row], list[str]]:
    """deduct_tokens latency with 10^5 and with 10^7 ledger rows, interleaved in rounds."""
    per_user = 100
    sizes = {"small": 100_000, "large": opts.history_rows}
    notes = []
    counts: dict[str, int] = {}
    for name, size in sizes.items():
        dbname = SCALE_DBS[name]
        started = time.monotonic()
        load_fixtures(cluster, dbname)
        cluster.psql(
            dbname,
            file=BENCH / "sql" / "history.sql",
            extra=["-v", f"users={max(1, size // per_user)}", "-v", f"per_user={per_user}"],
        )
        elapsed = time.monotonic() - started
        counts[name] = int(cluster.psql(dbname, "select count(*) from billing.ledger_entries"))
        notes.append(
            f"{name} scaling database: {counts[name]:,} ledger rows ({size:,} of synthetic "
            f"history), loaded in {elapsed:.0f}s"
        )
        log(notes[-1])
    runs: dict[str, list[Run]] = {"small": [], "large": []}
    for index in range(opts.rounds):
        order = ["small", "large"] if index % 2 == 0 else ["large", "small"]
        for name in order:
            runs[name].append(
                run_script(
                    cluster,
                    SCALE_DBS[name],
                    "deduct",
                    clients=1,
                    seconds=opts.seconds,
                    label=f"scale/{name}",
                    log_latencies=True,
                )
            )
    large, small = rows_label(counts["large"]), rows_label(counts["small"])
    rows = [
        Row(
            f"deduct_tokens p50 latency, {large} vs {small} ledger rows",
            "1",
            "ms",
            [run.p50_ms for run in runs["large"]],
            small,
            [run.p50_ms for run in runs["small"]],
            "<=",
            1.25,
        ),
        Row(
            f"deduct_tokens p99 latency, {large} vs {small} ledger rows",
            "1",
            "ms",
            [run.p99_ms for run in runs["large"]],
            small,
            [run.p99_ms for run in runs["small"]],
        ),
    ]
    for name in ("small", "large"):
        cluster.drop_database(SCALE_DBS[name])
    return rows, notes


def rows_label(count: int) -> str:
    """1.0e7-style row counts: `10.0M`, `130k`."""
    return f"{count / 1e6:.1f}M" if count >= 1_000_000 else f"{count / 1e3:.0f}k"


# --- profile ----------------------------------------------------------------------------------


def top_statements(cluster: PgCluster, dbname: str, limit: int = 15) -> str:
    return cluster.psql(
        dbname,
        "select calls, round(mean_exec_time::numeric * 1000, 1) as mean_us, "
        "round(total_exec_time::numeric) as total_ms, "
        "left(regexp_replace(query, '\\s+', ' ', 'g'), 140) "
        f"from pg_stat_statements where calls > 100 order by total_exec_time desc limit {limit}",
        extra=["-F", " | ", "-P", "footer=off"],
    )


# --- main -------------------------------------------------------------------------------------


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} cores, load average {load} at the end"


def git_commit() -> str:
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or "unknown"


def render(
    rows: list[Row], notes: list[str], opts: Options, cluster: PgCluster, elapsed: float
) -> str:
    version = cluster.psql("postgres", "show server_version").strip()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# token-billing bench",
        "",
        f"`make bench` at {when}, commit {git_commit()}; {machine()}; PostgreSQL {version} "
        "(throwaway cluster, fsync off as in the tests).",
        f"{opts.rounds} rounds of {opts.seconds:g} s per run, references and ours interleaved "
        "(order flipped every other round); ratio = ours / reference per round, median "
        "(min-max). pgbench with prepared statements, logged in as `authenticator` acting as "
        "`service_role` (PGOPTIONS `-c role=service_role`), as the Data API does; TPC-B as "
        f"superuser. Whole run: {elapsed / 60:.1f} min.",
        "",
    ]
    body = [report.table(rows), "", report.summary(rows), ""]
    if notes:
        body += ["Notes:", *[f"- {note}" for note in notes], ""]
    return "\n".join(head + body)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    settings = dict(SETTINGS)
    if opts.profile:
        settings.update(
            shared_preload_libraries="'pg_stat_statements'",
            **{"pg_stat_statements.track": "'all'"},
        )
    rows: list[Row] = []
    notes: list[str] = []
    with temporary_cluster(**settings) as cluster:
        log(f"cluster on port {cluster.port}")
        notes += prepare(cluster, opts)
        with_stripe = (
            stripe.handle_stripe_event_exists(cluster, MAIN_DB) and stripe.fixtures_present()
        )
        if opts.profile:
            cluster.psql(MAIN_DB, "create extension if not exists pg_stat_statements")
        runs, shortfalls = run_rounds(cluster, opts, with_stripe)
        rows += throughput_rows(runs, with_stripe)
        notes += shortfalls or [
            "every deduct, reserve+settle and add_tokens transaction of ours wrote its ledger "
            "entry (all applied: no insufficient_funds, no duplicate)"
        ]
        invariants = cluster.psql(MAIN_DB, "select count(*) from billing.check_invariants()")
        notes.append(
            f"billing.check_invariants() after the rounds: {invariants.strip()} violations"
        )
        if opts.profile:
            print(top_statements(cluster, MAIN_DB), file=sys.stderr)
        if opts.skip_scaling:
            rows.append(Row("deduct_tokens latency, 10^7 vs 10^5", "1", "ms", [], note="skipped"))
        else:
            scale_rows, scale_notes = scaling_rows(cluster, opts)
            rows += scale_rows
            notes += scale_notes
        rows += webhook_rows(cluster, opts, notes, tps(runs, "stripe/8"))
        text = render(rows, notes, opts, cluster, time.monotonic() - started)
    print(text)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(text)
    log(f"wrote {opts.output}")
    return 0


def webhook_rows(
    cluster: PgCluster, opts: Options, notes: list[str], handler_tps: list[float]
) -> list[Row]:
    if opts.skip_webhooks:
        return [Row("webhooks end to end", "32", "ev/s", [], note="skipped")]
    from bench import webhooks

    return webhooks.webhook_rows(cluster, opts, notes, handler_tps)


if __name__ == "__main__":
    sys.exit(main())
