"""The lock order: every function locks the account row first, with the statement that changes
it (supabase/migrations/20261202400100_fast_ledger.sql, README "How it works").

Deducts on a hot account queue behind whoever holds its row. A transaction that credits and
then deducts the same user holds the row from its credit on, so its deduct finds the row its
own and never waits behind the queue it holds up: no deadlock, however many deducts wait.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from scripts.pgcluster import Database

USER = uuid.UUID("00000000-0000-0000-0000-0000000d0001")
DEDUCTERS = 6
TRANSACTIONS = 15


class Deducters:
    """Threads deducting 1 token from USER in a loop, each call its own transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.applied = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(DEDUCTERS)]

    def _run(self) -> None:
        with self.db.as_service_role() as conn:
            conn.execute("set application_name = 'tb-deducter'")
            while not self.stop.is_set():
                try:
                    row = conn.execute(
                        "select status from public.deduct_tokens(%s, 1, %s)",
                        [USER, str(uuid.uuid4())],
                    ).fetchone()
                except psycopg.Error as exc:
                    with self._lock:
                        self.errors.append(exc)
                    continue
                assert row is not None
                if row[0] == "applied":
                    with self._lock:
                        self.applied += 1

    def __enter__(self) -> Deducters:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def wait_for_a_waiting_deducter(observer: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Until a deducter is blocked on a lock (the queue behind the open transaction)."""
    for _ in range(2000):
        row = observer.execute(
            "select count(*) from pg_stat_activity "
            "where application_name = 'tb-deducter' and wait_event_type = 'Lock'"
        ).fetchone()
        if row is not None and row[0] > 0:
            return
        time.sleep(0.005)
    raise AssertionError("no deducter ever waited behind the open transaction")


def setup_user(db: Database) -> None:
    db.create_user(USER)
    with db.as_service_role() as conn:
        conn.execute(
            "select * from public.add_tokens(%s, 1000000, 'lock-order-seed', 'purchase')", [USER]
        )


@pytest.mark.timeout(180)
def test_credit_then_deduct_in_one_transaction_does_not_deadlock(db: Database) -> None:
    setup_user(db)
    committed = 0
    with (
        Deducters(db) as deducters,
        db.connect_superuser() as observer,
        db.as_service_role(autocommit=False) as conn,
    ):
        for n in range(TRANSACTIONS):
            conn.execute(
                "select * from public.add_tokens(%s, 10, %s, 'purchase')", [USER, f"lo-add-{n}"]
            )
            wait_for_a_waiting_deducter(observer)
            row = conn.execute(
                "select status from public.deduct_tokens(%s, 3, %s)", [USER, f"lo-use-{n}"]
            ).fetchone()
            conn.commit()
            assert row is not None
            assert row[0] == "applied"
            committed += 1
    assert committed == TRANSACTIONS, "every credit-then-deduct transaction should commit"
    assert deducters.errors == [], "no concurrent deduct should fail (40P01 or otherwise)"
    assert deducters.applied > 0, "the concurrent deducts should have run"
    with db.connect_superuser() as conn:
        assert conn.execute("select * from billing.check_invariants()").fetchall() == []
