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
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import coalesced, report, reports, stripe
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

# Room for a 10^7-row ledger. Durability is set per phase of a round (DURABILITY below).
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
    scaling_only: bool = False


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--seconds", type=float, default=3, help="seconds per pgbench run (default 3)"
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
    parser.add_argument(
        "--skip-webhooks",
        action="store_true",
        help="no HTTP runs (the webhooks, and the API key against the JWT path)",
    )
    parser.add_argument(
        "--scaling-only",
        action="store_true",
        help="only the 10^5/10^7 ledger rows (deduct latency, the revenue and MRR reports)",
    )
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
        scaling_only=ns.scaling_only,
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

    load_fixtures(cluster, MAIN_DB, reservations=True)
    if stripe.handle_stripe_event_exists(cluster, MAIN_DB) and stripe.fixtures_present():
        stripe.load(cluster, MAIN_DB)
    cluster.create_database(TPCB_DB)
    init_tpcb(cluster, TPCB_DB, scale=10)
    log(f"bench databases ready in {time.monotonic() - started:.1f}s")
    return notes


def load_fixtures(cluster: PgCluster, dbname: str, *, reservations: bool = False) -> None:
    cluster.create_database(dbname, template=TEMPLATE)
    load_references(cluster, dbname, reservations=reservations)


def load_references(cluster: PgCluster, dbname: str, *, reservations: bool = False) -> None:
    """The references (bench/reference/) and the fixtures into a migrated database."""
    cluster.psql(dbname, file=BENCH / "reference" / "floor.sql", user=OWNER)
    cluster.psql(dbname, file=BENCH / "reference" / "seed_guide_token_billing.sql", user=OWNER)
    cluster.psql(dbname, file=BENCH / "reference" / "seed_guide_lean.sql", user=OWNER)
    cluster.psql(dbname, file=BENCH / "sql" / "fixtures.sql")
    if reservations:
        cluster.psql(dbname, file=BENCH / "sql" / "fixtures_reservations.sql")


def ledger_high_water(cluster: PgCluster, dbname: str) -> int:
    out = cluster.psql(dbname, "select coalesce(max(id), 0) from billing.ledger_entries")
    return int(out.strip())


def entries_since(cluster: PgCluster, dbname: str, high_water: int) -> int:
    out = cluster.psql(
        dbname, f"select count(*) from billing.ledger_entries where id > {int(high_water)}"
    )
    return int(out.strip())


# --- the rounds -------------------------------------------------------------------------------

# Durability settings, applied with ALTER SYSTEM + reload between the phases of a round.
# "on" is a real deployment's (the targets are on it); "off" is the tests' (scripts/pgcluster.py).
DURABILITY = {
    "on": {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"},
    "off": {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
}
DURABILITY_LABEL = {
    "on": "fsync=on, synchronous_commit=on",
    "off": "fsync=off",
}
# The accounts a workload draws from (users of bench/sql/fixtures.sql), uniformly.
ACCOUNTS = {"2k": (1, 2000), "10k": (1, 10000), "hot": (10001, 10001)}
ACCOUNTS_LABEL = {"2k": "2,000 accounts", "10k": "10,000 accounts", "hot": "one hot account"}
# The bench's tables: every pgbench script must reach them through an index, never a scan.
BENCH_TABLES = (
    "billing.accounts",
    "billing.ledger_entries",
    "billing.credit_buckets",
    "billing.reservations",
    "seed_guide.users",
    "seed_guide.token_transactions",
    "seed_guide_lean.profiles",
    "seed_guide_lean.token_transactions",
    "bench_floor.accounts",
    "bench_floor.ledger",
)
COALESCED_CALLERS = 32
# GET /v1/balance requests per path and round of the API-key rows (bench/api_keys.py).
API_KEY_REQUESTS = 1000


@dataclass(frozen=True)
class Job:
    """One run of a round: a pgbench script, or (`coalesced`) Python callers through the client's
    coalescer. `ledger` jobs check that each transaction (one run of the script) wrote `per_txn`
    entries."""

    key: str
    script: str
    clients: int
    accounts: str = "10k"
    ledger: bool = False
    builtin: str | None = None
    dbname: str = MAIN_DB
    per_txn: int = 1
    search_path: str | None = None
    coalesced: bool = False


def deduct_jobs(durability: str, accounts: str, clients: int, lean: bool = True) -> list[Job]:
    """The guide's deduct_tokens, its lean rewrite, the floor's statement in a plpgsql function
    and ours, on the same accounts with the same clients."""
    tag = f"{durability}/{accounts}/{clients}"
    jobs = [
        Job(f"guide/{tag}", "guide_deduct", clients, accounts, search_path="seed_guide"),
        Job(f"floor_rpc/{tag}", "floor_rpc_deduct", clients, accounts),
        Job(f"deduct/{tag}", "deduct", clients, accounts, ledger=True),
    ]
    if lean:
        jobs.insert(1, Job(f"lean/{tag}", "lean_deduct", clients, accounts))
    return jobs


def round_groups(durability: str, with_stripe: bool) -> list[list[Job]]:
    """Each group runs back to back (order flipped every other round)."""
    groups: list[list[Job]] = []
    if durability == "on":
        for accounts in ("2k", "10k"):
            for clients in (8, 32):
                group = deduct_jobs("on", accounts, clients)
                if accounts == "10k" and clients == 8:
                    group += [
                        Job("floor/on/10k/8", "floor_deduct", 8),
                        Job("reserve_settle/on/8", "reserve_settle", 8, ledger=True),
                        Job("reserve_release/on/8", "reserve_release", 8),
                        Job(
                            "reserve_settle_batch/on/8",
                            "reserve_settle_batch",
                            8,
                            ledger=True,
                            per_txn=BATCH_SETTLE_SIZE,
                        ),
                        Job("add_tokens/on/8", "add_tokens", 8, ledger=True),
                        Job("record_usage_unit/on/8", "record_usage_unit", 8, ledger=True),
                        Job("record_usage_tiered/on/8", "record_usage_tiered", 8, ledger=True),
                        Job("deduct_thresholds/on/8", "deduct_thresholds", 8, ledger=True),
                        Job("deduct_listing/on/8", "deduct_listing", 8, ledger=True),
                    ]
                if accounts == "10k" and clients == 32:
                    group.append(
                        Job("coalesced/on/10k", "", COALESCED_CALLERS, "10k", coalesced=True)
                    )
                groups.append(group)
        group = deduct_jobs("on", "hot", 32)
        group.append(Job("coalesced/on/hot", "", COALESCED_CALLERS, "hot", coalesced=True))
        groups.append(group)
    else:
        groups.append([Job("tpcb/off/8", "", 8, builtin="tpcb-like", dbname=TPCB_DB)])
        for accounts, clients in (("10k", 8), ("10k", 32), ("hot", 32)):
            group = deduct_jobs("off", accounts, clients, lean=False)
            if accounts == "10k" and clients == 8 and with_stripe:
                group.append(Job("stripe/off/8", "stripe_event", 8))
            groups.append(group)
    return groups


def set_durability(cluster: PgCluster, durability: str) -> None:
    """ALTER SYSTEM the phase's settings, reload, and wait until a new session sees them."""
    settings = DURABILITY[durability]
    for name, value in settings.items():
        cluster.psql("postgres", f"alter system set {name} = {value}")
    cluster.psql("postgres", "select pg_reload_conf()")
    deadline = time.monotonic() + 10
    while True:
        shown = cluster.psql(
            "postgres",
            "select string_agg(setting, ',' order by name) from pg_settings "
            f"where name in ({', '.join(repr(n) for n in settings)})",
        ).strip()
        if shown == ",".join(settings[n] for n in sorted(settings)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"durability settings not applied: {shown}")
        time.sleep(0.1)


def seq_scans(cluster: PgCluster, dbname: str) -> dict[str, int]:
    """Sequential scans so far of each bench table, once the counters have settled.

    A backend adds its counts to the shared statistics as it exits, after its client has
    already disconnected: read at once, the bench's own bookkeeping (`entries_since`,
    `check_invariants()`) and a run's last pgbench sessions showed up in the next job's count.
    """
    previous = _seq_scans_now(cluster, dbname)
    for _ in range(20):
        time.sleep(0.15)
        current = _seq_scans_now(cluster, dbname)
        if current == previous:
            break
        previous = current
    return previous


def _seq_scans_now(cluster: PgCluster, dbname: str) -> dict[str, int]:
    names = ", ".join(f"'{name}'" for name in BENCH_TABLES)
    out = cluster.psql(
        dbname,
        "select schemaname || '.' || relname, seq_scan from pg_stat_user_tables "
        f"where schemaname || '.' || relname in ({names})",
        extra=["-F", "|"],
    )
    scans = {}
    for line in out.strip().splitlines():
        name, count = line.split("|")
        scans[name] = int(count)
    return scans


def scanned(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return [
        f"{name} ({after[name] - before.get(name, 0)})"
        for name in sorted(after)
        if after[name] > before.get(name, 0)
    ]


@dataclass
class RoundsOutcome:
    runs: dict[str, list[Run]]
    shortfalls: list[str]
    invariants: list[str]
    scans: list[str]
    per_batch: dict[str, list[float]]


def run_job(cluster: PgCluster, opts: Options, job: Job, outcome: RoundsOutcome) -> Run:
    first, last = ACCOUNTS[job.accounts]
    if job.coalesced:
        run, per_batch = coalesced.run_coalesced(
            cluster,
            job.dbname,
            first=first,
            last=last,
            callers=job.clients,
            seconds=opts.seconds,
            label=job.key,
        )
        outcome.per_batch.setdefault(job.key, []).append(per_batch)
        return run
    return run_script(
        cluster,
        job.dbname,
        job.script,
        clients=job.clients,
        seconds=opts.seconds,
        label=job.key,
        as_api=job.builtin is None,
        builtin=job.builtin,
        defines={"first": first, "last": last} if job.builtin is None else None,
        search_path=job.search_path,
    )


def run_rounds(cluster: PgCluster, opts: Options, with_stripe: bool) -> RoundsOutcome:
    outcome = RoundsOutcome({}, [], [], [], {})
    for index in range(opts.rounds):
        started = time.monotonic()
        phases = ["on", "off"] if index % 2 == 0 else ["off", "on"]
        for durability in phases:
            set_durability(cluster, durability)
            for group in round_groups(durability, with_stripe):
                ordered = group if index % 2 == 0 else list(reversed(group))
                for job in ordered:
                    high_water = ledger_high_water(cluster, job.dbname) if job.ledger else 0
                    scans_before = seq_scans(cluster, MAIN_DB) if job.dbname == MAIN_DB else {}
                    run = run_job(cluster, opts, job, outcome)
                    if job.dbname == MAIN_DB:
                        tables = scanned(scans_before, seq_scans(cluster, MAIN_DB))
                        if tables:
                            outcome.scans.append(
                                f"round {index + 1} {job.key}: sequential scans of "
                                + ", ".join(tables)
                            )
                    if job.ledger:
                        written = entries_since(cluster, job.dbname, high_water)
                        if written < run.processed * job.per_txn:
                            outcome.shortfalls.append(
                                f"round {index + 1} {job.key}: {run.processed} transactions "
                                f"wrote {written} ledger entries, not {job.per_txn} each "
                                "(not every call was applied)"
                            )
                    outcome.runs.setdefault(job.key, []).append(run)
        violations = cluster.psql(MAIN_DB, "select count(*) from billing.check_invariants()")
        outcome.invariants.append(violations.strip())
        log(f"round {index + 1}/{opts.rounds} done in {time.monotonic() - started:.0f}s")
    set_durability(cluster, "off")
    return outcome


def tps(runs: dict[str, list[Run]], key: str) -> list[float]:
    return [run.tps for run in runs.get(key, [])]


def deduct_rows(runs: dict[str, list[Run]], durability: str) -> list[Row]:
    """ours vs the guide, the lean rewrite and the floor-in-plpgsql, per workload."""
    on = durability == "on"
    label = DURABILITY_LABEL[durability]
    workloads = (
        [("2k", 8), ("2k", 32), ("10k", 8), ("10k", 32), ("hot", 32)]
        if on
        else [("10k", 8), ("10k", 32), ("hot", 32)]
    )
    rows = []
    for accounts, clients in workloads:
        tag = f"{durability}/{accounts}/{clients}"
        ours = tps(runs, f"deduct/{tag}")
        name = f"deduct_tokens, {ACCOUNTS_LABEL[accounts]} [{label}]"
        hot = accounts == "hot"
        rows.append(
            Row(
                f"{name} vs the seed guide's deduct_tokens",
                str(clients),
                "tps",
                ours,
                "guide",
                tps(runs, f"guide/{tag}"),
                ">=" if on else "",
                (1.3 if hot else 1.1) if on else None,
            )
        )
        if on:
            rows.append(
                Row(
                    f"{name} vs the lean rewrite of the guide",
                    str(clients),
                    "tps",
                    ours,
                    "lean rewrite",
                    tps(runs, f"lean/{tag}"),
                )
            )
        rows.append(
            Row(
                f"{name} vs the floor's statement in a plpgsql function",
                str(clients),
                "tps",
                ours,
                "floor in plpgsql",
                tps(runs, f"floor_rpc/{tag}"),
                ">=" if on and not hot else "",
                0.85 if on and not hot else None,
            )
        )
    return rows


def throughput_rows(runs: dict[str, list[Run]], with_stripe: bool) -> list[Row]:
    on = DURABILITY_LABEL["on"]
    rows = deduct_rows(runs, "on")
    rows += [
        Row(
            f"the floor's bare statement vs its plpgsql function [{on}]",
            "8",
            "tps",
            tps(runs, "floor/on/10k/8"),
            "floor in plpgsql",
            tps(runs, "floor_rpc/on/10k/8"),
        ),
        Row(
            f"deduct_tokens_batch through the client's coalescer, one hot account, vs the "
            f"guide's deduct_tokens [{on}]",
            str(COALESCED_CALLERS),
            "debits/s",
            tps(runs, "coalesced/on/hot"),
            "guide",
            tps(runs, "guide/on/hot/32"),
            ">=",
            5.0,
            reference_unit="tps",
        ),
        Row(
            f"deduct_tokens_batch through the client's coalescer, 10,000 accounts, vs the "
            f"guide's deduct_tokens [{on}]",
            str(COALESCED_CALLERS),
            "debits/s",
            tps(runs, "coalesced/on/10k"),
            "guide",
            tps(runs, "guide/on/10k/32"),
            ">=",
            3.0,
            reference_unit="tps",
        ),
        Row(
            f"reserve_tokens + settle_reservation pairs vs deduct_tokens [{on}]",
            "8",
            "pairs/s",
            tps(runs, "reserve_settle/on/8"),
            "deduct_tokens",
            tps(runs, "deduct/on/10k/8"),
            ">=",
            0.5,
            reference_unit="tps",
        ),
        Row(
            f"reserve_tokens + release_reservation pairs vs deduct_tokens [{on}]",
            "8",
            "pairs/s",
            tps(runs, "reserve_release/on/8"),
            "deduct_tokens",
            tps(runs, "deduct/on/10k/8"),
            reference_unit="tps",
        ),
        Row(
            f"reserve_tokens x{BATCH_SETTLE_SIZE}, then one settle_reservations of them, "
            f"vs deduct_tokens [{on}]",
            "8",
            "pairs/s",
            [t * BATCH_SETTLE_SIZE for t in tps(runs, "reserve_settle_batch/on/8")],
            "deduct_tokens",
            tps(runs, "deduct/on/10k/8"),
            reference_unit="tps",
        ),
        Row(
            f"add_tokens vs deduct_tokens [{on}]",
            "8",
            "tps",
            tps(runs, "add_tokens/on/8"),
            "deduct_tokens",
            tps(runs, "deduct/on/10k/8"),
            ">=",
            0.8,
        ),
        # Issue 16: at most 1.3x (per unit) and 1.5x (graduated, 4 tiers) the cost of a deduct,
        # i.e. at least 1/1.3 and 1/1.5 of its throughput.
        Row(
            f"record_usage, 1 item, per-unit price, vs deduct_tokens [{on}]",
            "8",
            "tps",
            tps(runs, "record_usage_unit/on/8"),
            "deduct_tokens",
            tps(runs, "deduct/on/10k/8"),
            ">=",
            round(1 / 1.3, 2),
        ),
        Row(
            f"record_usage, 1 item, graduated price with 4 tiers, vs deduct_tokens [{on}]",
            "8",
            "tps",
            tps(runs, "record_usage_tiered/on/8"),
            "deduct_tokens",
            tps(runs, "deduct/on/10k/8"),
            ">=",
            round(1 / 1.5, 2),
        ),
        # Issue 17: on a plan with thresholds and auto top-up, a deduct that crosses none costs
        # at most 1.1x a deduct on a plan without auto top-up.
        Row(
            f"deduct_tokens, thresholds and auto top-up, none crossed, vs deduct_tokens [{on}]",
            "8",
            "tps",
            tps(runs, "deduct_thresholds/on/8"),
            "deduct_tokens",
            tps(runs, "deduct/on/10k/8"),
            ">=",
            round(1 / 1.1, 2),
        ),
        # Issue 19: what accruing a creator's share costs a deduct (no target).
        Row(
            f"deduct_tokens naming an agent listing (creator's share) vs deduct_tokens [{on}]",
            "8",
            "tps",
            tps(runs, "deduct_listing/on/8"),
            "deduct_tokens",
            tps(runs, "deduct/on/10k/8"),
        ),
    ]
    rows += deduct_rows(runs, "off")
    off = DURABILITY_LABEL["off"]
    rows.append(
        Row(f"pgbench TPC-B (yardstick, as superuser) [{off}]", "8", "tps", tps(runs, "tpcb/off/8"))
    )
    if with_stripe:
        rows.append(
            Row(
                f"handle_stripe_event, real fixture payloads, vs deduct_tokens [{off}]",
                "8",
                "ev/s",
                tps(runs, "stripe/off/8"),
                "deduct_tokens",
                tps(runs, "deduct/off/10k/8"),
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
        cluster.psql(
            dbname,
            file=BENCH / "sql" / "revenue_history.sql",
            extra=["-v", f"users={max(1, size // per_user)}"],
        )
        elapsed = time.monotonic() - started
        counts[name] = int(cluster.psql(dbname, "select count(*) from billing.ledger_entries"))
        notes.append(
            f"{name} scaling database: {counts[name]:,} ledger rows ({size:,} of synthetic "
            f"history), loaded in {elapsed:.0f}s"
        )
        log(notes[-1])
    runs: dict[str, list[Run]] = {"small": [], "large": []}
    set_durability(cluster, "on")
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
                    defines={"first": ACCOUNTS["10k"][0], "last": ACCOUNTS["10k"][1]},
                )
            )
    set_durability(cluster, "off")
    large, small = rows_label(counts["large"]), rows_label(counts["small"])
    rows = [
        Row(
            f"deduct_tokens p50 latency, {large} vs {small} ledger rows [{DURABILITY_LABEL['on']}]",
            "1",
            "ms",
            [run.p50_ms for run in runs["large"]],
            small,
            [run.p50_ms for run in runs["small"]],
            "<=",
            1.25,
        ),
        Row(
            f"deduct_tokens p99 latency, {large} vs {small} ledger rows [{DURABILITY_LABEL['on']}]",
            "1",
            "ms",
            [run.p99_ms for run in runs["large"]],
            small,
            [run.p99_ms for run in runs["small"]],
        ),
    ]
    report_figures, plans = reports.report_rows(
        cluster, SCALE_DBS, {"small": small, "large": large}, opts.rounds
    )
    rows += report_figures
    notes += plans
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
        "(throwaway cluster).",
        f"{opts.rounds} rounds of {opts.seconds:g} s per run, references and ours interleaved "
        "(order flipped every other round, and the two durability phases of a round too); "
        "ratio = ours / reference per round, median (min-max). Each row names its durability: "
        "`fsync=on, synchronous_commit=on` (full_page_writes on: a real deployment; the targets "
        "are on it) or `fsync=off` (synchronous_commit and full_page_writes off, as the tests "
        "run). References: `guide` is the seed guide's own deduct_tokens, tables and indexes "
        "(`bench/reference/seed_guide_token_billing.sql`); `lean rewrite` the leaner rewrite "
        "earlier runs used (`seed_guide_lean.sql`); `floor in plpgsql` the bare update + insert "
        "statement inside a security definer plpgsql function (`floor.sql`). pgbench with "
        "prepared statements, logged in as `authenticator` acting as `service_role` (PGOPTIONS "
        "`-c role=service_role`), as the Data API does; TPC-B as superuser. "
        f"Whole run: {elapsed / 60:.1f} min.",
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
        if opts.scaling_only:
            scale_rows, scale_notes = scaling_rows(cluster, opts)
            elapsed = time.monotonic() - started
            text = render(scale_rows, notes + scale_notes, opts, cluster, elapsed)
            print(text)
            opts.output.parent.mkdir(parents=True, exist_ok=True)
            opts.output.write_text(text)
            log(f"wrote {opts.output}")
            return 0
        outcome = run_rounds(cluster, opts, with_stripe)
        runs = outcome.runs
        rows += throughput_rows(runs, with_stripe)
        notes += outcome.shortfalls or [
            "every deduct, reserve+settle and add_tokens transaction of ours wrote its ledger "
            "entry (all applied: no insufficient_funds, no duplicate)"
        ]
        notes.append(
            "billing.check_invariants() after each round: "
            + ", ".join(outcome.invariants)
            + " violations"
        )
        notes += outcome.scans or [
            "no sequential scan of a bench table during any run: every script's user lookup "
            "is an index lookup (pg_stat_user_tables.seq_scan, before and after each run)"
        ]
        for key, sizes in sorted(outcome.per_batch.items()):
            notes.append(
                f"{key}: {statistics.median(sizes):.1f} items per deduct_tokens_batch call "
                f"(median of the rounds; window {coalesced.WINDOW_SECONDS * 1000:g} ms, "
                f"{coalesced.MAX_IN_FLIGHT} batches in flight at most)"
            )
        if opts.profile:
            print(top_statements(cluster, MAIN_DB), file=sys.stderr)
        if opts.skip_scaling:
            rows.append(Row("deduct_tokens latency, 10^7 vs 10^5", "1", "ms", [], note="skipped"))
        else:
            scale_rows, scale_notes = scaling_rows(cluster, opts)
            rows += scale_rows
            notes += scale_notes
        rows += webhook_rows(cluster, opts, notes, tps(runs, "stripe/off/8"))
        rows += api_key_rows(opts)
        text = render(rows, notes, opts, cluster, time.monotonic() - started)
    print(text)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(text)
    log(f"wrote {opts.output}")
    return 0


def api_key_rows(opts: Options) -> list[Row]:
    """What an API key adds to a request over the JWT path (issue 16), on its own cluster."""
    if opts.skip_webhooks:
        return [Row("API key vs Supabase JWT", "1", "ms", [], note="skipped")]
    from bench import api_keys

    return api_keys.api_key_rows(API_KEY_REQUESTS, opts.rounds)


def webhook_rows(
    cluster: PgCluster, opts: Options, notes: list[str], handler_tps: list[float]
) -> list[Row]:
    if opts.skip_webhooks:
        return [Row("webhooks end to end", "32", "ev/s", [], note="skipped")]
    from bench import webhooks

    return webhooks.webhook_rows(cluster, opts, notes, handler_tps)


if __name__ == "__main__":
    sys.exit(main())
