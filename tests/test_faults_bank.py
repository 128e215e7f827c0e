"""Bank workload under faults, after Jepsen's bank test: nothing lost, nothing minted.

Concurrent clients move tokens on a few hot accounts (deduct, add, reserve, settle, release)
along both paths a backend has: the service's own client (api/client.py over the app's psycopg
pool, run on the app's event loop) and direct RPC over psycopg as `service_role`. Meanwhile a
chaos thread terminates random backends, wipes every connection of the service's pool at once,
and restarts Postgres (`pg_ctl stop -m fast` + start) on a cluster of this suite's own. A client
that loses an answer does not know whether its call committed, so it retries the very same call
(same idempotency key, same reservation id) until one answers, as a real client must.

Then the acknowledged answers are replayed through a single-threaded model and compared with the
database: every acknowledged operation applied exactly once, no ledger entry nobody asked for,
balances equal to their entries, available never negative (sampled throughout the run), no
reservation left pending once expiry ran past its TTL, and the service ready again (`/readyz`)
without being restarted.
"""

from __future__ import annotations

import functools
import random
import threading
import time
import uuid
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from anyio.from_thread import BlockingPortal
from starlette.testclient import TestClient

from scripts.pgcluster import Database, PgCluster
from tests.app_support import settings_for
from tests.fault_support import (
    STRESS_SCALE,
    Counter,
    cluster_back_up,
    ready_within,
    report,
    restart,
    retry,
    scaled,
    terminate,
)
from token_billing import InsufficientTokens, Reservation, TokenBilling
from token_billing.db import Database as ServiceDatabase
from token_billing.server.app import create_app
from token_billing.server.deps import Runtime

pytestmark = pytest.mark.stress

USERS = [uuid.UUID(f"00000000-0000-0000-0000-0000000ba{i:03d}") for i in range(4)]
SIGNUP_GRANT = 100
INITIAL = 2_000
SERVICE_CLIENTS = 4
RPC_CLIENTS = 4
OPS_PER_CLIENT = scaled(400)
# Long enough that nothing expires during the run; expire_tokens is then run past it.
TTL = timedelta(hours=1)
CALL_DEADLINE_SECONDS = 90.0
KILL_EVERY = 20  # operations per killed backend

T = TypeVar("T")


@dataclass
class Ack:
    """One acknowledged operation: what was asked, by which path, and the answer."""

    op: str
    path: str
    user: uuid.UUID
    amount: int
    key: str
    status: str
    reservation_id: uuid.UUID | None = None


@dataclass
class Pending:
    reservation_id: uuid.UUID
    user: uuid.UUID
    amount: int
    key: str
    handle: Reservation | None = None


@dataclass
class Client:
    """One client thread: a seeded random walk of operations, each retried until answered."""

    index: int
    path: str
    progress: Counter
    acks: list[Ack] = field(default_factory=list)
    abandoned: list[Pending] = field(default_factory=list)
    retries: int = 0
    replays: int = 0

    def retried(self) -> None:
        self.retries += 1

    def run(self) -> None:
        rng = random.Random(7_000 + self.index)
        pending: list[Pending] = []
        for i in range(OPS_PER_CLIENT):
            user = rng.choice(USERS)
            key = f"bank-{self.path}-{self.index}-{i}"
            roll = rng.random()
            if pending and roll < 0.30:
                p = pending.pop(rng.randrange(len(pending)))
                if rng.random() < 0.7:
                    charge = rng.randint(1, p.amount)
                    status = self.settle(p, charge)
                    self.acks.append(
                        Ack("settle", self.path, p.user, charge, p.key, status, p.reservation_id)
                    )
                else:
                    status = self.release(p)
                    self.acks.append(
                        Ack("release", self.path, p.user, p.amount, p.key, status, p.reservation_id)
                    )
            elif roll < 0.50:
                amount = rng.randint(1, 40)
                status, p_or_none = self.reserve(user, amount, key, rng)
                self.acks.append(
                    Ack(
                        "reserve",
                        self.path,
                        user,
                        amount,
                        key,
                        status,
                        p_or_none.reservation_id if p_or_none else None,
                    )
                )
                if p_or_none is not None:
                    pending.append(p_or_none)
            elif roll < 0.65:
                amount = rng.randint(1, 150)
                self.acks.append(
                    Ack("add", self.path, user, amount, key, self.add(user, amount, key, rng))
                )
            else:
                amount = rng.randint(1, 80)
                self.acks.append(
                    Ack("deduct", self.path, user, amount, key, self.deduct(user, amount, key, rng))
                )
            self.progress.add()
        # Crashed callers: their holds stay pending until expiry releases them.
        self.abandoned = pending
        self.close()

    # Each path implements these; the status is the contract's.
    def add(self, user: uuid.UUID, amount: int, key: str, rng: random.Random) -> str:
        raise NotImplementedError

    def deduct(self, user: uuid.UUID, amount: int, key: str, rng: random.Random) -> str:
        raise NotImplementedError

    def reserve(
        self, user: uuid.UUID, amount: int, key: str, rng: random.Random
    ) -> tuple[str, Pending | None]:
        raise NotImplementedError

    def settle(self, p: Pending, charge: int) -> str:
        raise NotImplementedError

    def release(self, p: Pending) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def replay_check(self, rng: random.Random, first: str, again: Callable[[], str]) -> None:
        """Now and then act as a client whose applied answer was lost: the same call again must
        be a duplicate (and, the model checks, change nothing)."""
        if first == "applied" and rng.random() < 0.1:
            status = again()
            assert status == "duplicate", (self.path, status)
            self.replays += 1


class ServiceClient(Client):
    """The service's own client (TokenBilling) over the app's pool, on the app's event loop."""

    def __init__(
        self, index: int, progress: Counter, portal: BlockingPortal, db: ServiceDatabase
    ) -> None:
        super().__init__(index, "service", progress)
        self.portal = portal
        self.tokens = TokenBilling(db)

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        return retry(
            lambda: self.portal.call(fn),
            deadline_seconds=CALL_DEADLINE_SECONDS,
            on_retry=self.retried,
        )

    def _status(self, fn: Callable[[], Awaitable[Any]]) -> str:
        try:
            return str(self._call(fn).status)
        except InsufficientTokens:
            return "insufficient_funds"

    def add(self, user: uuid.UUID, amount: int, key: str, rng: random.Random) -> str:
        call = functools.partial(self.tokens.add, user, amount, key=key, kind="purchase")
        status = self._status(call)
        self.replay_check(rng, status, lambda: self._status(call))
        return status

    def deduct(self, user: uuid.UUID, amount: int, key: str, rng: random.Random) -> str:
        call = functools.partial(self.tokens.deduct, user, amount, key=key)
        status = self._status(call)
        self.replay_check(rng, status, lambda: self._status(call))
        return status

    def reserve(
        self, user: uuid.UUID, amount: int, key: str, rng: random.Random
    ) -> tuple[str, Pending | None]:
        handle = self.tokens.reserve(user, amount, key=key, ttl=TTL)
        try:
            self._call(handle.__aenter__)
        except InsufficientTokens:
            return "insufficient_funds", None
        assert handle.id is not None
        again = self.tokens.reserve(user, amount, key=key, ttl=TTL)
        if rng.random() < 0.1:
            self._call(again.__aenter__)
            assert again.id == handle.id, "a retried reserve should return the same hold"
            self.replays += 1
        return "applied", Pending(handle.id, user, amount, key, handle)

    def settle(self, p: Pending, charge: int) -> str:
        assert p.handle is not None
        handle = p.handle
        return str(self._call(functools.partial(handle.settle, charge)).status)

    def release(self, p: Pending) -> str:
        assert p.handle is not None
        return str(self._call(p.handle.release).status)


class RpcClient(Client):
    """Direct RPC over its own psycopg connection as service_role (what supabase-py reaches)."""

    def __init__(self, index: int, progress: Counter, db: Database) -> None:
        super().__init__(index, "rpc", progress)
        self.db = db
        self.conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = psycopg.connect(
            self.db.dsn("authenticator"),
            autocommit=True,
            application_name=f"tb-bank-{self.index}",
            connect_timeout=5,
        )
        conn.execute("set role service_role")
        return conn

    def _row(self, sql: str, params: list[object]) -> tuple[Any, ...]:
        def once() -> tuple[Any, ...]:
            if self.conn is None or self.conn.closed:
                self.conn = self._connect()
            try:
                row = self.conn.execute(sql, params).fetchone()
            except psycopg.Error:
                self.conn.close()
                self.conn = None
                raise
            assert row is not None
            return row

        return retry(once, deadline_seconds=CALL_DEADLINE_SECONDS, on_retry=self.retried)

    def _status(self, sql: str, params: list[object], rng: random.Random) -> str:
        status = str(self._row(sql, params)[0])
        self.replay_check(rng, status, lambda: str(self._row(sql, params)[0]))
        return status

    def add(self, user: uuid.UUID, amount: int, key: str, rng: random.Random) -> str:
        sql = "select status from public.add_tokens(%s, %s, %s, 'purchase')"
        return self._status(sql, [user, amount, key], rng)

    def deduct(self, user: uuid.UUID, amount: int, key: str, rng: random.Random) -> str:
        sql = "select status from public.deduct_tokens(%s, %s, %s)"
        return self._status(sql, [user, amount, key], rng)

    def reserve(
        self, user: uuid.UUID, amount: int, key: str, rng: random.Random
    ) -> tuple[str, Pending | None]:
        sql = "select status, reservation_id from public.reserve_tokens(%s, %s, %s, %s)"
        status, reservation_id = self._row(sql, [user, amount, key, TTL])
        if status == "applied" and rng.random() < 0.1:
            again = self._row(sql, [user, amount, key, TTL])
            assert again == ("duplicate", reservation_id), again
            self.replays += 1
        if status in ("applied", "duplicate"):
            return "applied", Pending(reservation_id, user, amount, key)
        return str(status), None

    def settle(self, p: Pending, charge: int) -> str:
        sql = "select status from public.settle_reservation(%s, %s)"
        return str(self._row(sql, [p.reservation_id, charge])[0])

    def release(self, p: Pending) -> str:
        sql = "select status from public.release_reservation(%s)"
        return str(self._row(sql, [p.reservation_id])[0])

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class Chaos:
    """Kills a busy backend every KILL_EVERY operations; wipes the service's pool once and
    restarts Postgres once, at fixed points of the workload's progress. Progress, not the clock,
    paces every fault: every run injects them all, and a slow machine gets no more of them per
    operation than a fast one."""

    db: Database
    cluster: PgCluster
    progress: Counter
    total: int
    stop: threading.Event = field(default_factory=threading.Event)
    kills: int = 0
    pool_wipes: int = 0
    pool_connections_wiped: int = 0
    restarts: int = 0
    down_seconds: float = 0.0
    samples: int = 0
    anomalies: list[str] = field(default_factory=list)

    def run(self) -> None:
        rng = random.Random(11)
        next_kill = KILL_EVERY
        while not self.stop.is_set():
            done = self.progress.value
            try:
                if not self.pool_wipes and done >= self.total * 0.3:
                    self.pool_connections_wiped = terminate(
                        self.db, "application_name = 'token-billing'"
                    )
                    self.pool_wipes += 1
                elif not self.restarts and done >= self.total * 0.55:
                    self.down_seconds = restart(self.cluster, down_seconds=0.5)
                    self.restarts += 1
                else:
                    if done >= next_kill:
                        killed = terminate(
                            self.db,
                            "state = 'active' and (application_name = 'token-billing' "
                            "or application_name like 'tb-bank-%%')",
                            limit=1,
                        )
                        self.kills += killed
                        if killed:
                            next_kill = done + KILL_EVERY
                    if rng.random() < 0.2:
                        self.sample()
            except psycopg.OperationalError:
                pass  # the server is restarting: the next round finds it back
            time.sleep(rng.uniform(0.005, 0.02))

    def sample(self) -> None:
        """The invariants at one instant of the run (one statement, one snapshot)."""
        with self.db.connect_superuser() as conn:
            problems = conn.execute("select * from billing.check_invariants()").fetchall()
            negative = conn.execute(
                "select user_id, balance, reserved from billing.accounts "
                "where balance - reserved < 0"
            ).fetchall()
        self.samples += 1
        if problems:
            self.anomalies.append(f"invariants broken mid-run: {problems}")
        if negative:
            self.anomalies.append(f"negative available mid-run: {negative}")


@pytest.mark.timeout(240 * STRESS_SCALE)
def test_bank_workload_under_faults_loses_nothing_and_mints_nothing(
    chaos_db: Database, chaos_cluster: tuple[PgCluster, Database]
) -> None:
    db = chaos_db
    cluster, _ = chaos_cluster
    for user in USERS:
        db.create_user(user)
    with db.as_service_role() as conn:
        for user in USERS:
            conn.execute(
                "select * from public.add_tokens(%s, %s, %s, 'purchase')",
                [user, INITIAL, f"bank-seed-{user}"],
            )

    settings = settings_for(db, db_pool_max_size=SERVICE_CLIENTS, db_pool_timeout_seconds=2.0)
    progress = Counter()
    total = (SERVICE_CLIENTS + RPC_CLIENTS) * OPS_PER_CLIENT
    chaos = Chaos(db, cluster, progress, total)
    started = time.monotonic()
    app = create_app(settings)
    with cluster_back_up(cluster), TestClient(app) as client:
        assert client.portal is not None
        rt = app.state.runtime
        assert isinstance(rt, Runtime)
        clients: list[Client] = [
            ServiceClient(i, progress, client.portal, rt.db) for i in range(SERVICE_CLIENTS)
        ]
        clients += [RpcClient(SERVICE_CLIENTS + i, progress, db) for i in range(RPC_CLIENTS)]
        chaos_thread = threading.Thread(target=chaos.run, name="chaos")
        chaos_thread.start()
        try:
            with ThreadPoolExecutor(max_workers=len(clients)) as pool:
                for future in [pool.submit(c.run) for c in clients]:
                    future.result()  # re-raises a client's failure here
        finally:
            chaos.stop.set()
            chaos_thread.join()
        workload_seconds = time.monotonic() - started

        # The service recovers by itself: same app, same pool, no restart.
        ready, ready_after = ready_within(lambda: client.get("/readyz").status_code, 30.0)
        assert ready == 200, "the service should be ready again without a restart"
        profile = client.portal.call(TokenBilling(rt.db).balance, USERS[0])
        assert profile["balance"] >= 0

    acks = [a for c in clients for a in c.acks]
    abandoned = [p for c in clients for p in c.abandoned]
    assert len(acks) == total
    assert chaos.restarts == 1, "Postgres should have been restarted once during the run"
    assert chaos.pool_wipes == 1
    assert chaos.pool_connections_wiped > 0
    assert chaos.kills > 0, "backends should have been killed during the run"
    retries = sum(c.retries for c in clients)
    assert retries > 0, "some calls should have had to be retried"
    assert chaos.anomalies == []

    anomalies = _check_against_model(db, acks, abandoned)

    # Expiry past the TTL releases every abandoned hold and nothing else.
    with db.as_service_role() as conn:
        row = conn.execute(
            "select expired_buckets, expired_reservations "
            "from public.expire_tokens(now() + interval '2 hours')"
        ).fetchone()
    assert row == (0, len(abandoned)), "exactly the abandoned holds should expire"
    with db.connect_superuser() as conn:
        assert conn.execute("select * from billing.check_invariants()").fetchall() == []
        stuck = conn.execute(
            "select count(*) from billing.reservations where status = 'pending'"
        ).fetchone()
        assert stuck == (0,), "no reservation should stay pending after expiry"
        held = conn.execute(
            "select count(*) from billing.accounts where reserved <> 0 or balance < 0"
        ).fetchone()
        assert held == (0,)

    statuses = Tally(f"{a.op}:{a.status}" for a in acks)
    report(
        "bank",
        operations=len(acks),
        service_ops=sum(1 for a in acks if a.path == "service"),
        rpc_ops=sum(1 for a in acks if a.path == "rpc"),
        duplicate_replays=sum(c.replays for c in clients),
        retried_calls=retries,
        backends_killed=chaos.kills,
        pool_wipes=f"{chaos.pool_wipes} ({chaos.pool_connections_wiped} connections)",
        postgres_restarts=chaos.restarts,
        abandoned_holds_expired=len(abandoned),
        invariant_samples=chaos.samples,
        ready_after_s=round(ready_after, 2),
        seconds=round(workload_seconds, 1),
        anomalies=len(anomalies) + len(chaos.anomalies),
    )
    print(dict(statuses))
    assert anomalies == []


def _check_against_model(db: Database, acks: list[Ack], abandoned: list[Pending]) -> list[str]:
    """Replay the acknowledged answers single-threaded and compare with the books; the list of
    differences (each also fails the assertions below)."""
    anomalies: list[str] = []
    balance: dict[uuid.UUID, int] = dict.fromkeys(USERS, SIGNUP_GRANT + INITIAL)
    reserved: dict[uuid.UUID, int] = defaultdict(int)
    entries: dict[str, tuple[uuid.UUID, int]] = {}  # expected ledger: key -> (user, amount)
    for user in USERS:
        entries[f"signup:{user}"] = (user, SIGNUP_GRANT)
        entries[f"bank-seed-{user}"] = (user, INITIAL)
    holds: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}
    resolution: dict[uuid.UUID, str] = {}
    for ack in acks:
        effective = ack.status in ("applied", "duplicate")
        if ack.op == "add":
            if ack.status not in ("applied", "duplicate"):
                anomalies.append(f"add answered {ack.status}: {ack}")
            balance[ack.user] += ack.amount
            entries[ack.key] = (ack.user, ack.amount)
        elif ack.op == "deduct":
            if ack.status not in ("applied", "duplicate", "insufficient_funds"):
                anomalies.append(f"deduct answered {ack.status}: {ack}")
            if effective:
                balance[ack.user] -= ack.amount
                entries[ack.key] = (ack.user, -ack.amount)
        elif ack.op == "reserve":
            if ack.status not in ("applied", "duplicate", "insufficient_funds"):
                anomalies.append(f"reserve answered {ack.status}: {ack}")
            if effective:
                assert ack.reservation_id is not None
                holds[ack.reservation_id] = (ack.user, ack.amount)
                reserved[ack.user] += ack.amount
        elif ack.op in ("settle", "release"):
            assert ack.reservation_id is not None
            if ack.status not in ("applied", "duplicate"):
                anomalies.append(f"{ack.op} answered {ack.status}: {ack}")
            user, held = holds[ack.reservation_id]
            reserved[user] -= held
            resolution[ack.reservation_id] = "settled" if ack.op == "settle" else "released"
            if ack.op == "settle":
                balance[user] -= ack.amount
                entries[f"reservation:{ack.reservation_id}"] = (user, -ack.amount)

    with db.connect_superuser() as conn:
        actual = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                "select user_id, balance, reserved from billing.accounts where user_id = any(%s)",
                [USERS],
            )
        }
        for user in USERS:
            if actual[user] != (balance[user], reserved[user]):
                anomalies.append(
                    f"user {user}: (balance, reserved) {actual[user]} != model "
                    f"{(balance[user], reserved[user])}"
                )
        ledger = conn.execute(
            "select idempotency_key, user_id, amount from billing.ledger_entries "
            "where user_id = any(%s)",
            [USERS],
        ).fetchall()
        keys = Tally(key for key, _, _ in ledger)
        anomalies += [f"key {k} applied {n} times" for k, n in keys.items() if n != 1]
        found = {key: (user, amount) for key, user, amount in ledger}
        anomalies += [
            f"acknowledged {key} {want} is {found.get(key)} in the ledger"
            for key, want in entries.items()
            if found.get(key) != want
        ]
        anomalies += [
            f"ledger entry {key} {got} was never acknowledged (minted)"
            for key, got in found.items()
            if key not in entries
        ]
        reservations = {
            row[0]: (row[1], row[2], row[3])
            for row in conn.execute(
                "select id, user_id, amount, status from billing.reservations "
                "where user_id = any(%s)",
                [USERS],
            )
        }
        if set(reservations) != set(holds):
            anomalies.append(f"reservations {len(reservations)} != acknowledged holds {len(holds)}")
        for rid, (user, amount) in holds.items():
            want = resolution.get(rid, "pending")
            got = reservations.get(rid)
            if got != (user, amount, want):
                anomalies.append(f"reservation {rid}: {got} != model {(user, amount, want)}")
        if {p.reservation_id for p in abandoned} != {
            rid for rid, (_, _, status) in reservations.items() if status == "pending"
        }:
            anomalies.append("pending reservations differ from the abandoned holds")
        problems = conn.execute("select * from billing.check_invariants()").fetchall()
        anomalies += [f"invariant: {p}" for p in problems]
    return anomalies
