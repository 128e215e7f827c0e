"""Holds racing expiry on hot accounts, backends killed mid-call: charged exactly once, never
below zero.

Eight worker threads, each with its own connection as `service_role`, run thousands of mixed
calls on three hot accounts: holds with short and long TTLs (settled for 0, below, at and above
their amount, released, extended), credits that expire soon, deductions, and retried keys of
holds that already resolved. An expiry thread runs `expire_tokens(as_of)` with an explicit
`as_of` that runs ahead of the clock, so buckets expire under pending holds and holds expire
under the work that holds them; a worker whose hold expired charges the work with one
`deduct_tokens` keyed `hold-expired:<reservation id>`, as `api.client` does. A chaos thread
terminates backends (`pg_terminate_backend`) at random moments, the expiry thread's included;
a caller whose call died retries it verbatim, not knowing whether it committed.

Afterwards: `billing.check_invariants()` is empty; no balance is below zero (there are no
refunds or disputes here); every acknowledged settlement charged exactly what it asked (less
only when the answer said `partial`), and nothing else was charged; every retried key of a
resolved hold answered `duplicate` with that hold's id, and `get_reservation` how it finally
resolved; every ledger entry is one a caller was
told about (or an expiry). `STRESS_SCALE` multiplies the calls.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from scripts.pgcluster import Database
from tests.fault_support import STRESS_SCALE, report, scaled

pytestmark = pytest.mark.stress

THREADS = 8
CALLS_PER_THREAD = scaled(300)
INITIAL = 3_000
USERS = [uuid.UUID(f"00000000-0000-0000-0000-0000000c1{i:03d}") for i in range(3)]
TTLS = ("1 minute", "3 minutes", "1 hour")
# How far the expiry thread's as_of runs ahead of the clock per run.
EXPIRY_STEP_SECONDS = 15
RESOLVED = ("settled", "released", "expired")
RESERVE = "select status, reservation_id from public.reserve_tokens(%s, %s, %s, %s::interval)"
HOLD_STATUS = "select status from public.get_reservation(%s)"


@dataclass
class Ack:
    """One acknowledged call: what was asked and the answer the caller finally got."""

    op: str
    user: uuid.UUID
    amount: int
    key: str
    status: str
    reservation_id: uuid.UUID | None = None


@dataclass
class Clock:
    """The expiry thread's as_of, as seconds ahead of now(): credits expire after it."""

    ahead_seconds: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self) -> int:
        with self.lock:
            self.ahead_seconds += EXPIRY_STEP_SECONDS
            return self.ahead_seconds

    def now(self) -> int:
        with self.lock:
            return self.ahead_seconds


class Caller:
    """One connection, and calls retried verbatim until an answer arrives."""

    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        self.name = name
        self.conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self.retries = 0

    def call(self, sql: str, params: list[object]) -> tuple[Any, ...]:
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg.connect(
                        self.db.dsn(), autocommit=True, application_name=self.name
                    )
                    self.conn.execute("set role service_role")
                row = self.conn.execute(sql, params).fetchone()
                assert row is not None
                return row
            except psycopg.OperationalError:
                # A killed backend (57P01, the connection gone) or a deadlock (40P01, a
                # TransactionRollbackError): the outcome is unknown or nothing was done; the
                # very same call again is safe.
                self.retries += 1
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                time.sleep(0.005)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class Worker:
    db: Database
    index: int
    seed: int
    clock: Clock
    acks: list[Ack] = field(default_factory=list)
    retried_keys: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    caller: Caller | None = None

    def run(self) -> None:
        rng = random.Random(self.seed)
        caller = self.caller = Caller(self.db, f"tb-hold-{self.index}")
        pending: list[tuple[uuid.UUID, uuid.UUID, int, str, str]] = []
        resolved: list[tuple[uuid.UUID, int, str, str]] = []
        for i in range(CALLS_PER_THREAD):
            user = rng.choice(USERS)
            key = f"h{self.index}-{i}"
            roll = rng.random()
            if pending and roll < 0.30:
                reservation_id, owner, held, hold_key, ttl = pending.pop(
                    rng.randrange(len(pending))
                )
                if rng.random() < 0.8:
                    # 0, below, at and above the hold (an overrun comes from available).
                    charge = rng.choice((0, rng.randint(1, held), held, held + rng.randint(1, 30)))
                    self.settle(caller, reservation_id, owner, charge, key)
                else:
                    (status,) = caller.call(
                        "select status from public.release_reservation(%s)", [reservation_id]
                    )
                    self.acks.append(Ack("release", owner, held, key, status, reservation_id))
                resolved.append((owner, held, hold_key, ttl))
            elif pending and roll < 0.38:
                reservation_id, owner, held, hold_key, ttl = rng.choice(pending)
                (status,) = caller.call(
                    "select status from public.extend_reservation(%s, %s::interval)",
                    [reservation_id, rng.choice(TTLS)],
                )
                self.acks.append(Ack("extend", owner, 0, key, status, reservation_id))
            elif resolved and roll < 0.43:
                # A retried request: the key of a hold that already resolved.
                owner, held, hold_key, ttl = rng.choice(resolved)
                status, reservation_id = caller.call(
                    RESERVE,
                    [owner, held, hold_key, ttl],
                )
                # The contract's answer for any existing key; get_reservation tells the outcome.
                assert status == "duplicate", (hold_key, status)
                (status,) = caller.call(HOLD_STATUS, [reservation_id])
                assert status in RESOLVED, (hold_key, status)
                self.acks.append(Ack("retry", owner, held, hold_key, status, reservation_id))
            elif roll < 0.65:
                amount = rng.randint(1, 60)
                ttl = rng.choice(TTLS)
                status, reservation_id = caller.call(
                    RESERVE,
                    [user, amount, key, ttl],
                )
                self.acks.append(Ack("reserve", user, amount, key, status, reservation_id))
                if status == "duplicate":
                    # A retry after a killed connection found its own hold: still pending, or
                    # expired already.
                    (hold_status,) = caller.call(HOLD_STATUS, [reservation_id])
                    if hold_status != "pending":
                        resolved.append((user, amount, key, ttl))
                        continue
                if status in ("applied", "duplicate"):
                    pending.append((reservation_id, user, amount, key, ttl))
            elif roll < 0.80:
                amount = rng.randint(1, 80)
                expires = self.clock.now() + rng.randint(5, 90)
                (status,) = caller.call(
                    "select status from public.add_tokens(%s, %s, %s, 'purchase', null, "
                    "now() + make_interval(secs => %s))",
                    [user, amount, key, expires],
                )
                self.acks.append(Ack("add", user, amount, key, status))
            else:
                amount = rng.randint(1, 50)
                (status,) = caller.call(
                    "select status from public.deduct_tokens(%s, %s, %s)", [user, amount, key]
                )
                self.acks.append(Ack("deduct", user, amount, key, status))
        # Whatever is still held is released, as a client leaving its block does.
        for reservation_id, owner, held, _key, _ttl in pending:
            (status,) = caller.call(
                "select status from public.release_reservation(%s)", [reservation_id]
            )
            self.acks.append(
                Ack("release", owner, held, f"end-{reservation_id}", status, reservation_id)
            )
        caller.close()

    def settle(
        self, caller: Caller, reservation_id: uuid.UUID, owner: uuid.UUID, charge: int, key: str
    ) -> None:
        (status,) = caller.call(
            "select status from public.settle_reservation(%s, %s)", [reservation_id, charge]
        )
        self.acks.append(Ack("settle", owner, charge, key, status, reservation_id))
        if status != "not_pending":
            return
        (state,) = caller.call("select status from public.get_reservation(%s)", [reservation_id])
        assert state == "expired", (reservation_id, state)
        if charge > 0:
            # The work outlived its hold: charged anyway, once, as api.client does.
            (status,) = caller.call(
                "select status from public.deduct_tokens(%s, %s, %s)",
                [owner, charge, f"hold-expired:{reservation_id}"],
            )
            self.acks.append(
                Ack(
                    "fallback",
                    owner,
                    charge,
                    f"hold-expired:{reservation_id}",
                    status,
                    reservation_id,
                )
            )


def expiry(db: Database, clock: Clock, stop: threading.Event, runs: Counter[str]) -> None:
    caller = Caller(db, "tb-hold-expiry")
    while not stop.is_set():
        ahead = clock.advance()
        expired_buckets, expired_holds = caller.call(
            "select * from public.expire_tokens(now() + make_interval(secs => %s))", [ahead]
        )
        (held_expired,) = caller.call(
            "select coalesce(sum(held_expired), 0) from billing.accounts", []
        )
        runs["runs"] += 1
        runs["buckets"] += expired_buckets
        runs["holds"] += expired_holds
        if held_expired > 0:
            runs["held_expired_seen"] += 1
        time.sleep(0.01)
    runs["retries"] += caller.retries
    caller.close()


def chaos(db: Database, stop: threading.Event, kills: list[int]) -> None:
    rng = random.Random(12)
    with db.connect_superuser() as conn:
        while not stop.is_set():
            time.sleep(rng.uniform(0.005, 0.03))
            row = conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where application_name like 'tb-hold-%%' and state = 'active' "
                "order by random() limit 1"
            ).fetchone()
            if row is not None and row[0]:
                kills.append(1)


@pytest.mark.timeout(240 * STRESS_SCALE)
def test_holds_racing_expiry_are_charged_exactly_once(db: Database) -> None:
    for user in USERS:
        db.create_user(user)
    with db.as_service_role() as conn:
        for user in USERS:
            conn.execute(
                "select * from public.add_tokens(%s, %s, %s, 'purchase')",
                [user, INITIAL, f"seed-{user}"],
            )
            # Credits that expire within the first expiry runs, under the first holds.
            conn.execute(
                "select * from public.add_tokens(%s, 400, %s, 'subscription', null, "
                "now() + interval '20 seconds')",
                [user, f"seed-expiring-{user}"],
            )

    clock = Clock()
    workers = [Worker(db, i, seed=2000 + i, clock=clock) for i in range(THREADS)]
    threads = [threading.Thread(target=w.run, name=f"hold-worker-{w.index}") for w in workers]
    stop = threading.Event()
    kills: list[int] = []
    runs: Counter[str] = Counter()
    killer = threading.Thread(target=chaos, args=(db, stop, kills))
    expirer = threading.Thread(target=expiry, args=(db, clock, stop, runs))
    killer.start()
    expirer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    killer.join()
    expirer.join()

    acks = [ack for w in workers for ack in w.acks]
    retries = sum(w.caller.retries for w in workers if w.caller) + runs["retries"]
    statuses = Counter((ack.op, ack.status) for ack in acks)
    assert kills, "the chaos thread should have killed some backends"
    assert retries > 0, "some calls should have been retried after a killed connection"
    assert runs["buckets"] > 0, "buckets should have expired during the run"
    assert runs["holds"] > 0, "holds should have expired under the work that held them"
    assert runs["held_expired_seen"] > 0, "buckets should have expired under pending holds"
    assert statuses[("retry", "settled")] > 0, "resolved keys should have been retried"

    with db.connect_superuser() as conn:
        assert conn.execute("select * from billing.check_invariants()").fetchall() == []
        negative = conn.execute(
            "select user_id, balance from billing.accounts where balance < 0 or balance < reserved"
        ).fetchall()
        assert negative == [], "no balance below zero without a refund or dispute"
        holds = {
            row[0]: row[1:]
            for row in conn.execute(
                "select r.id, r.status, r.settle_amount, -e.amount from billing.reservations as r "
                "left join billing.ledger_entries as e "
                "on e.idempotency_key = 'reservation:' || r.id::text "
                "where r.user_id = any(%s)",
                [USERS],
            )
        }
        entries = {
            row[0]: row[1]
            for row in conn.execute(
                "select idempotency_key, amount from billing.ledger_entries "
                "where user_id = any(%s)",
                [USERS],
            )
        }
        pending = conn.execute(
            "select count(*) from billing.reservations "
            "where status = 'pending' and user_id = any(%s)",
            [USERS],
        ).fetchone()

    assert pending == (0,), "every hold should have resolved"
    told: set[str] = {f"seed-{u}" for u in USERS} | {f"seed-expiring-{u}" for u in USERS}
    told |= {f"signup:{u}" for u in USERS}
    for ack in acks:
        if ack.op == "settle" and ack.status != "not_pending":
            status, settle_amount, charged = holds[ack.reservation_id]
            assert (status, settle_amount) == ("settled", ack.amount), ack
            if ack.status == "applied":
                assert (charged or 0) == ack.amount, (
                    f"charged {charged}, not what was settled: {ack}"
                )
            else:
                assert ack.status in ("partial", "duplicate"), ack
                assert (charged or 0) <= ack.amount, ack
            if charged:
                told.add(f"reservation:{ack.reservation_id}")
        elif ack.op == "settle":
            assert holds[ack.reservation_id][0] == "expired", ack
            assert holds[ack.reservation_id][2] is None, "an expired hold charges nothing itself"
        elif ack.op == "release":
            assert ack.status in ("applied", "not_pending"), ack
            assert holds[ack.reservation_id][2] is None, "a released hold charges nothing"
        elif ack.op == "retry":
            assert ack.status == holds[ack.reservation_id][0], "a resolved key answers its outcome"
        elif ack.op in ("add", "deduct", "fallback"):
            if ack.status in ("applied", "duplicate"):
                assert abs(entries[ack.key]) == ack.amount, ack
                told.add(ack.key)
            else:
                assert ack.key not in entries, ack
    unexplained = {key for key in entries if key not in told and not key.startswith("expiry:")}
    assert unexplained == set(), "every entry should be one a caller was told about"

    report(
        "holds-expiry",
        calls=len(acks),
        retried_after_kill=retries,
        killed_backends=len(kills),
        expiry_runs=runs["runs"],
        buckets_expired=runs["buckets"],
        holds_expired=runs["holds"],
        runs_with_held_expired=runs["held_expired_seen"],
        settled=sum(n for (op, s), n in statuses.items() if op == "settle" and s != "not_pending"),
        charged_after_expiry=statuses[("fallback", "applied")]
        + statuses[("fallback", "duplicate")],
        resolved_keys_retried=sum(n for (op, _), n in statuses.items() if op == "retry"),
    )
