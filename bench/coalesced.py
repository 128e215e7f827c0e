"""Batched deducts through the client's coalescer (token_billing.coalescer).

`callers` concurrent asyncio tasks each call `TokenBilling.deduct` in a loop, a fresh key per
call, over a `PostgresDatabase` pool logged in as `authenticator` acting as `service_role` (as
the service does). The coalescer gathers their calls into `deduct_tokens_batch` calls; the rate
is debits per second as the callers saw them answered `applied`. Python drives this one, so its
figure includes the client's own cost, which the pgbench references do not pay.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from bench.pgbench import API_LOGIN, Run
from scripts.pgcluster import PgCluster
from token_billing.client import TokenBilling
from token_billing.coalescer import DeductCoalescer
from token_billing.db import PostgresDatabase

WINDOW_SECONDS = 0.0005
MAX_IN_FLIGHT = 4


def account(n: int) -> str:
    """User n of bench/sql/fixtures.sql."""
    return str(uuid.UUID(f"{n:032x}"))


async def _drive(
    cluster: PgCluster, dbname: str, first: int, last: int, callers: int, seconds: float
) -> tuple[int, float, float]:
    db = PostgresDatabase(
        cluster.dsn(dbname, user=API_LOGIN), min_size=MAX_IN_FLIGHT, max_size=MAX_IN_FLIGHT + 2
    )
    await db.open()
    coalescer = DeductCoalescer(db, window_seconds=WINDOW_SECONDS, max_in_flight=MAX_IN_FLIGHT)
    tokens = TokenBilling(db, coalescer=coalescer)
    users = [account(n) for n in range(first, last + 1)]
    applied = 0
    stop = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal applied
        while time.monotonic() < stop:
            result = await tokens.deduct(
                random.choice(users), 1, key=str(uuid.uuid4()), description="bench"
            )
            if result.status == "applied":
                applied += 1

    try:
        # Warm the pool and the functions' plans first.
        await asyncio.gather(*(tokens.deduct(users[0], 1, key=str(uuid.uuid4())) for _ in range(8)))
        batches_before, items_before = coalescer.batches_sent, coalescer.items_sent
        started = time.monotonic()
        stop = started + seconds
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.monotonic() - started
        await coalescer.aclose()
        batches = coalescer.batches_sent - batches_before
        items = coalescer.items_sent - items_before
    finally:
        await db.close()
    return applied, elapsed, items / max(1, batches)


def run_coalesced(
    cluster: PgCluster,
    dbname: str,
    *,
    first: int,
    last: int,
    callers: int,
    seconds: float,
    label: str,
) -> tuple[Run, float]:
    """The run, and the mean number of items per deduct_tokens_batch call."""
    applied, elapsed, per_batch = asyncio.run(
        _drive(cluster, dbname, first, last, callers, seconds)
    )
    run = Run(
        label=label,
        clients=callers,
        seconds=seconds,
        tps=applied / elapsed,
        processed=applied,
        failed=0,
    )
    return run, per_batch
