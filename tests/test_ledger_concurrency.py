"""Many clients, few hot accounts, connections killed mid-call: nothing lost, nothing twice.

Eight threads, each with its own connection as `service_role`, run thousands of mixed
deduct/add/reserve/settle/release calls on three hot accounts. A chaos thread terminates their
backends (`pg_terminate_backend`) at random moments; a client whose call died does not know
whether it committed, so it reconnects and retries with the same idempotency key (or the same
reservation id), exactly as a real client must. Afterwards the acknowledged results are replayed
through a single-threaded model and compared with the database.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from scripts.pgcluster import Database

THREADS = 8
CALLS_PER_THREAD = 400
INITIAL = 5_000
USERS = [uuid.UUID(f"00000000-0000-0000-0000-0000000c0{i:03d}") for i in range(3)]


@dataclass
class Ack:
    """One acknowledged call: what was asked and the answer the client finally got."""

    op: str
    user: uuid.UUID
    amount: int
    key: str
    status: str
    reservation_id: uuid.UUID | None = None


@dataclass
class Worker:
    db: Database
    index: int
    seed: int
    acks: list[Ack] = field(default_factory=list)
    retries: int = 0
    replays: int = 0
    conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = psycopg.connect(
            self.db.dsn(), autocommit=True, application_name=f"tb-worker-{self.index}"
        )
        conn.execute("set role service_role")
        return conn

    def call(self, sql: str, params: list[object]) -> tuple[Any, ...]:
        """Run one RPC until an answer arrives; a killed connection is retried verbatim."""
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = self.connect()
                row = self.conn.execute(sql, params).fetchone()
                assert row is not None
                return row
            except psycopg.OperationalError:
                self.retries += 1
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                time.sleep(0.005)

    def replay(self, rng: random.Random, sql: str, params: list[object], first: str) -> None:
        """Now and then act as a client that lost an applied answer: the same call again must
        come back as a duplicate and change nothing."""
        if first == "applied" and rng.random() < 0.1:
            again = self.call(sql, params)[0]
            assert again == "duplicate", (sql, params, again)
            self.replays += 1

    def run(self) -> None:
        rng = random.Random(self.seed)
        pending: list[tuple[uuid.UUID, uuid.UUID, int]] = []
        for i in range(CALLS_PER_THREAD):
            user = rng.choice(USERS)
            key = f"w{self.index}-{i}"
            roll = rng.random()
            if pending and roll < 0.35:
                reservation_id, owner, held = pending.pop(rng.randrange(len(pending)))
                if rng.random() < 0.7:
                    charge = rng.randint(1, held)
                    sql = "select status from public.settle_reservation(%s, %s)"
                    (status,) = self.call(sql, [reservation_id, charge])
                    self.replay(rng, sql, [reservation_id, charge], status)
                    self.acks.append(Ack("settle", owner, charge, key, status, reservation_id))
                else:
                    sql = "select status from public.release_reservation(%s)"
                    (status,) = self.call(sql, [reservation_id])
                    self.replay(rng, sql, [reservation_id], status)
                    self.acks.append(Ack("release", owner, held, key, status, reservation_id))
            elif roll < 0.55:
                amount = rng.randint(1, 40)
                sql = "select status, reservation_id from public.reserve_tokens(%s, %s, %s)"
                status, reservation_id = self.call(sql, [user, amount, key])
                self.replay(rng, sql, [user, amount, key], status)
                self.acks.append(Ack("reserve", user, amount, key, status, reservation_id))
                if status in ("applied", "duplicate"):
                    pending.append((reservation_id, user, amount))
            elif roll < 0.70:
                amount = rng.randint(1, 60)
                sql = "select status from public.add_tokens(%s, %s, %s, 'purchase')"
                (status,) = self.call(sql, [user, amount, key])
                self.replay(rng, sql, [user, amount, key], status)
                self.acks.append(Ack("add", user, amount, key, status))
            else:
                amount = rng.randint(1, 80)
                sql = "select status from public.deduct_tokens(%s, %s, %s)"
                (status,) = self.call(sql, [user, amount, key])
                self.replay(rng, sql, [user, amount, key], status)
                self.acks.append(Ack("deduct", user, amount, key, status))
        if self.conn is not None:
            self.conn.close()


def chaos(db: Database, stop: threading.Event, kills: list[int]) -> None:
    rng = random.Random(7)
    with db.connect_superuser() as conn:
        while not stop.is_set():
            time.sleep(rng.uniform(0.005, 0.03))
            row = conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where application_name like 'tb-worker-%%' and state = 'active' "
                "order by random() limit 1"
            ).fetchone()
            if row is not None and row[0]:
                kills.append(1)


@pytest.mark.timeout(240)
def test_hot_accounts_survive_killed_connections(db: Database) -> None:
    for user in USERS:
        db.create_user(user)
    with db.as_service_role() as conn:
        for user in USERS:
            conn.execute(
                "select * from public.add_tokens(%s, %s, %s, 'purchase')",
                [user, INITIAL, f"seed-{user}"],
            )

    workers = [Worker(db, i, seed=1000 + i) for i in range(THREADS)]
    threads = [threading.Thread(target=w.run, name=f"worker-{w.index}") for w in workers]
    stop = threading.Event()
    kills: list[int] = []
    killer = threading.Thread(target=chaos, args=(db, stop, kills))
    killer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    killer.join()

    acks = [ack for w in workers for ack in w.acks]
    retries = sum(w.retries for w in workers)
    replays = sum(w.replays for w in workers)
    assert len(acks) == THREADS * CALLS_PER_THREAD
    assert kills, "the chaos thread should have killed some backends"
    assert retries > 0, "some calls should have been retried after a killed connection"
    assert replays > 100, "many applied calls should have been replayed as duplicates"

    # The single-threaded model of what the clients were told.
    expected_balance: dict[uuid.UUID, int] = dict.fromkeys(USERS, 100 + INITIAL)
    held: dict[uuid.UUID, int] = defaultdict(int)
    statuses = Counter(ack.status for ack in acks)
    for ack in acks:
        effective = ack.status in ("applied", "duplicate")
        if ack.op == "add" and effective:
            expected_balance[ack.user] += ack.amount
        elif ack.op == "deduct" and effective:
            expected_balance[ack.user] -= ack.amount
        elif ack.op == "settle":
            assert ack.status in ("applied", "duplicate"), ack
            expected_balance[ack.user] -= ack.amount
        elif ack.op == "release":
            assert ack.status in ("applied", "duplicate"), ack
        elif ack.op == "reserve" and effective:
            held[ack.user] += ack.amount
    for ack in acks:
        if ack.op in ("settle", "release"):
            held[ack.user] -= ack.amount if ack.op == "release" else _held_amount(acks, ack)

    with db.connect_superuser() as conn:
        assert conn.execute("select * from billing.check_invariants()").fetchall() == []
        rows = conn.execute(
            "select user_id, balance, reserved from billing.accounts where user_id = any(%s)",
            [USERS],
        ).fetchall()
        actual = {row[0]: (row[1], row[2]) for row in rows}
        for user in USERS:
            assert actual[user] == (expected_balance[user], held[user]), user
            assert actual[user][0] - actual[user][1] >= 0, "available must never go negative"

        # Exactly one entry for every acknowledged effect, none for a refusal.
        keys = Counter(
            key
            for (key,) in conn.execute(
                "select idempotency_key from billing.ledger_entries where user_id = any(%s)",
                [USERS],
            )
        )
        for ack in acks:
            if ack.op in ("add", "deduct"):
                want = 1 if ack.status in ("applied", "duplicate") else 0
                assert keys[ack.key] == want, ack
            if ack.op == "settle":
                assert keys[f"reservation:{ack.reservation_id}"] == 1, ack
        assert max(keys.values()) == 1

    print(
        f"\n{len(acks)} calls, {replays} replayed, {retries} retried after {len(kills)} "
        f"killed backends, "
        f"statuses {dict(statuses)}"
    )


def _held_amount(acks: list[Ack], settle: Ack) -> int:
    """The amount a settled reservation held (its reserve call's amount)."""
    for ack in acks:
        if ack.op == "reserve" and ack.reservation_id == settle.reservation_id:
            return ack.amount
    raise AssertionError(f"no reservation for {settle}")
