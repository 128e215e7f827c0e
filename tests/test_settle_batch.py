"""settle_reservations under concurrency: batches of the same holds, in opposite orders.

Two connections settle the same reservations at once, one batch in the order of the array and
the other reversed, across several accounts. Settling in input order would let each batch lock
what the other needs next (a deadlock, 40P01); settle_reservations orders the items by account
and reservation id, so both take their locks in one order. Every hold must be settled exactly
once: `applied` in one batch, `duplicate` in the other.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from typing import Any

import psycopg

from scripts.pgcluster import Database
from tests.app_support import new_user, scalar

ROUNDS = 15
USERS = 4
HOLDS_PER_USER = 5


def _connect(db: Database) -> psycopg.Connection[tuple[Any, ...]]:
    conn = psycopg.connect(db.dsn(), autocommit=True)
    conn.execute("set role service_role")
    return conn


def _holds(conn: psycopg.Connection[tuple[Any, ...]], users: list[uuid.UUID]) -> list[str]:
    holds = []
    for user in users:
        for _ in range(HOLDS_PER_USER):
            row = conn.execute(
                "select reservation_id from public.reserve_tokens(%s, 2, %s)",
                [user, f"hold-{uuid.uuid4()}"],
            ).fetchone()
            assert row is not None
            assert row[0] is not None
            holds.append(str(row[0]))
    return holds


def _settle(
    conn: psycopg.Connection[tuple[Any, ...]],
    batch: list[dict[str, Any]],
    start: threading.Barrier,
    statuses: Counter[str],
    errors: list[str],
) -> None:
    start.wait()
    try:
        rows = conn.execute(
            "select status from public.settle_reservations(%s::jsonb)", [json.dumps(batch)]
        ).fetchall()
    except psycopg.Error as exc:
        errors.append(f"{exc.sqlstate}: {exc}")
        return
    statuses.update(row[0] for row in rows)


def test_opposite_batches_of_the_same_holds_should_not_deadlock(db: Database) -> None:
    users = [new_user(db) for _ in range(USERS)]
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    with _connect(db) as setup, _connect(db) as left, _connect(db) as right:
        for _ in range(ROUNDS):
            holds = _holds(setup, users)
            batches = [
                [{"reservation_id": h, "amount": 1} for h in holds],
                [{"reservation_id": h, "amount": 1} for h in reversed(holds)],
            ]
            start = threading.Barrier(2)
            threads = [
                threading.Thread(target=_settle, args=(conn, batch, start, statuses, errors))
                for conn, batch in zip((left, right), batches, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    settled = ROUNDS * USERS * HOLDS_PER_USER
    assert errors == [], "neither batch should fail (40P01 would be a deadlock)"
    assert statuses == {"applied": settled, "duplicate": settled}
    assert scalar(db, "select count(*) from billing.reservations where status = 'pending'") == 0
    assert (
        scalar(db, "select count(*) from billing.ledger_entries where reservation_id is not null")
        == settled
    )
    assert scalar(db, "select count(*) from billing.check_invariants()") == 0
