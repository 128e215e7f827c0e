"""Webhook storms: every event many times, in parallel, out of order, across a Postgres restart.

The app runs under uvicorn (a real HTTP server) on the suite's own cluster. Like Stripe, the
senders deliver each event several times, shuffled, from eight connections at once, and retry
every non-2xx answer. Meanwhile one of the service's pool connections is killed every few
deliveries, and Postgres is stopped (`pg_ctl stop -m fast`) for a while and started again;
`/readyz` is polled during the outage. The kills follow the deliveries, not the clock: on a slow
machine a killer on a timer kills more of each request's connections, until nothing gets
through. Each 200 is checked the moment it arrives: its event must already be committed in
billing.stripe_events with a final status (a 200 for an uncommitted event would make Stripe drop
an event the books never saw). Afterwards every purchase is credited exactly once, every
subscription ends in the state of its newest event, and every event is stored.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
import uuid
from collections import Counter as Tally
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx2
import psycopg
import pytest

from scripts.pgcluster import Database, PgCluster
from tests.app_support import (
    encode,
    put_product,
    running_server,
    settings_for,
    sign,
    sold_checkout_event,
)
from tests.fault_support import (
    STRESS_SCALE,
    cluster_back_up,
    ready_within,
    report,
    scaled,
    terminate,
)
from tests.stripe_fixtures import derive, fixture_event
from token_billing.cli import stripe_events

pytestmark = pytest.mark.stress

WEBHOOK = "/v1/webhooks/stripe"
FINAL_STATUSES = {"applied", "duplicate", "ignored", "stale", "parked"}
SENDERS = 8
COPIES = 3
PACKS = {"pack_100": 100, "pack_250": 250, "pack_600": 600}
PLAN_TOKENS = 5_000
PLAN_PRICE = "price_tb_starter"
OUTAGE_SECONDS = 1.5
KILL_EVERY = 4  # deliveries per killed pool connection
DELIVERY_DEADLINE_SECONDS = 120.0


@dataclass
class Purchase:
    user: uuid.UUID
    session_id: str
    tokens: int
    events: list[dict[str, Any]]


@dataclass
class Plan:
    user: uuid.UUID
    subscription_id: str
    invoice_id: str
    events: list[dict[str, Any]]  # in Stripe's order: created, updated, invoice.paid


def _purchases(db: Database, users: list[uuid.UUID], rng: random.Random) -> list[Purchase]:
    purchases = []
    for user in users:
        for _ in range(2):
            code = rng.choice(sorted(PACKS))
            quantity = rng.randint(1, 3)
            completed = sold_checkout_event(db, user, code, quantity=quantity)
            session_id = completed["data"]["object"]["id"]
            events = [completed]
            if rng.random() < 0.5:
                # The same payment told twice (a delayed method): one credit between them.
                events.append(
                    sold_checkout_event(
                        db,
                        user,
                        code,
                        quantity=quantity,
                        session_id=session_id,
                        event_type="checkout.session.async_payment_succeeded",
                    )
                )
            purchases.append(Purchase(user, session_id, PACKS[code] * quantity, events))
    return purchases


def _plans(users: list[uuid.UUID]) -> list[Plan]:
    product = stripe_events.Product("starter", "plan", PLAN_TOKENS, 2900, "usd", PLAN_PRICE)
    plans = []
    base = int(time.time()) - 600
    for user in users:
        customer = stripe_events.customer_id_for(str(user))
        sub = stripe_events.subscription(str(user), product, customer=customer)
        incomplete = {**sub, "status": "incomplete"}
        invoice = stripe_events.invoice(
            str(user),
            product,
            customer=customer,
            sub_id=sub["id"],
            billing_reason="subscription_create",
        )
        plans.append(
            Plan(
                user,
                sub["id"],
                invoice["id"],
                [
                    stripe_events.envelope(
                        "customer.subscription.created", incomplete, created=base
                    ),
                    stripe_events.envelope("customer.subscription.updated", sub, created=base + 5),
                    stripe_events.envelope("invoice.paid", invoice, created=base + 6),
                ],
            )
        )
    return plans


def _noise(count: int) -> list[dict[str, Any]]:
    """Events the handler stores as ignored: types it does not act on."""
    source = fixture_event("stripe-ruby-mock-webhook_fixtures/payment_intent.succeeded.json")
    return [
        derive(source, event_id=f"evt_storm_noise_{i}_{uuid.uuid4().hex[:8]}").payload
        for i in range(count)
    ]


@dataclass
class Storm:
    url: str
    db: Database
    deliveries: queue.Queue[dict[str, Any]]
    remaining: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    codes: Tally[int] = field(default_factory=Tally)
    ok_statuses: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # Every answer per event, as `code` or `code:error` (`0` is no answer), for the anomalies.
    answers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    anomalies: list[str] = field(default_factory=list)
    uncommitted_200s: int = 0
    delivered: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def sender(self, index: int) -> None:
        deadline = time.monotonic() + DELIVERY_DEADLINE_SECONDS * STRESS_SCALE
        with httpx2.Client(base_url=self.url, timeout=30) as http, _Verifier(self.db) as verify:
            # Bounded: a sender that lost track still ends; the checks below say what is missing.
            while not self.done.is_set() and time.monotonic() < deadline + 30:
                try:
                    event = self.deliveries.get(timeout=0.1)
                except queue.Empty:
                    continue
                payload = encode(event)
                try:
                    response = http.post(
                        WEBHOOK,
                        content=payload,
                        headers={
                            "Content-Type": "application/json",
                            "Stripe-Signature": sign(payload),
                        },
                    )
                    code = response.status_code
                except httpx2.TransportError as exc:
                    code = 0  # no answer at all: Stripe retries
                    answer = f"0:{type(exc).__name__}"
                else:
                    answer = str(code) if code == 200 else f"{code}:{_error_code(response)}"
                with self.lock:
                    self.codes[code] += 1
                    self.delivered += 1
                    self.answers[event["id"]].append(answer)
                if code == 200:
                    status = str(response.json().get("status"))
                    stored = verify.status(event["id"])
                    with self.lock:
                        self.ok_statuses[event["id"]].append(status)
                        if status not in FINAL_STATUSES:
                            self.anomalies.append(f"200 with status {status} for {event['id']}")
                        if stored not in FINAL_STATUSES:
                            self.uncommitted_200s += 1
                            self.anomalies.append(
                                f"200 ({status}) for {event['id']} but stored as {stored}"
                            )
                        self.remaining -= 1
                        if self.remaining == 0:
                            self.done.set()
                elif code in (0, 503):
                    if code == 503 and not response.headers.get("retry-after"):
                        with self.lock:
                            self.anomalies.append("503 without Retry-After")
                    if time.monotonic() > deadline:
                        with self.lock:
                            self.anomalies.append(
                                f"{event['id']} never accepted; its answers: "
                                + " ".join(self.answers[event["id"]][-12:])
                            )
                            self.remaining -= 1
                            if self.remaining == 0:
                                self.done.set()
                        continue
                    time.sleep(0.05)  # Stripe backs off; so do we, briefly
                    self.deliveries.put(event)
                else:
                    with self.lock:
                        self.anomalies.append(f"{code} for {event['id']}: {response.text[:200]}")
                        self.remaining -= 1
                        if self.remaining == 0:
                            self.done.set()


def _error_code(response: httpx2.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


class _Verifier:
    """A superuser connection that reads the stored status of an event, across restarts."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def __enter__(self) -> _Verifier:
        return self

    def __exit__(self, *_: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def status(self, event_id: str) -> str | None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = self.db.connect_superuser()
                row = self.conn.execute(
                    "select status from billing.stripe_events where id = %s", [event_id]
                ).fetchone()
                return None if row is None else str(row[0])
            except psycopg.OperationalError:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@dataclass
class Outage:
    """Kills a pool connection every KILL_EVERY deliveries; once a third of the deliveries are
    made, stops Postgres for OUTAGE_SECONDS while polling /readyz, then starts it again."""

    url: str
    db: Database
    cluster: PgCluster
    storm: Storm
    total: int
    stop: threading.Event = field(default_factory=threading.Event)
    kills: int = 0
    restarts: int = 0
    readyz_during: Tally[int] = field(default_factory=Tally)

    def run(self) -> None:
        next_kill = KILL_EVERY
        with httpx2.Client(base_url=self.url, timeout=10) as http:
            while not self.stop.is_set():
                if not self.restarts and self.storm.delivered >= self.total / 3:
                    self.cluster.stop("fast")
                    try:
                        until = time.monotonic() + OUTAGE_SECONDS
                        while time.monotonic() < until:
                            self.readyz_during[http.get("/readyz").status_code] += 1
                            time.sleep(0.1)
                    finally:
                        self.cluster.start()
                    self.restarts += 1
                    continue
                if self.storm.delivered >= next_kill:
                    next_kill = self.storm.delivered + KILL_EVERY
                    with contextlib.suppress(psycopg.OperationalError):
                        self.kills += terminate(
                            self.db, "application_name = 'token-billing'", limit=1
                        )
                time.sleep(0.005)


@pytest.mark.timeout(240 * STRESS_SCALE)
def test_webhook_storm_across_a_restart_credits_each_purchase_once(
    chaos_db: Database, chaos_cluster: tuple[PgCluster, Database]
) -> None:
    db = chaos_db
    cluster, _ = chaos_cluster
    rng = random.Random(42)
    put_product(
        db, "starter", kind="plan", tokens=PLAN_TOKENS, price_cents=2900, stripe_price_id=PLAN_PRICE
    )
    users = [uuid.uuid4() for _ in range(scaled(8))]
    for user in users:
        db.create_user(user)
    purchases = _purchases(db, users, rng)
    plans = _plans(users[::2])
    noise = _noise(len(users))
    events = [e for p in purchases for e in p.events] + [e for p in plans for e in p.events] + noise
    deliveries = [e for e in events for _ in range(COPIES)]
    rng.shuffle(deliveries)

    work: queue.Queue[dict[str, Any]] = queue.Queue()
    for event in deliveries:
        work.put(event)
    settings = settings_for(db, db_pool_max_size=4, db_pool_timeout_seconds=1.0)
    started = time.monotonic()
    with cluster_back_up(cluster), running_server(settings) as url:
        storm = Storm(url, db, work, remaining=len(deliveries))
        outage = Outage(url, db, cluster, storm, len(deliveries))
        outage_thread = threading.Thread(target=outage.run, name="outage")
        outage_thread.start()
        try:
            with ThreadPoolExecutor(max_workers=SENDERS) as pool:
                for future in [pool.submit(storm.sender, i) for i in range(SENDERS)]:
                    future.result()
        finally:
            outage.stop.set()
            outage_thread.join()
        seconds = time.monotonic() - started
        with httpx2.Client(base_url=url, timeout=10) as http:
            ready_after, ready_seconds = ready_within(lambda: http.get("/readyz").status_code, 30.0)
        # An operator's replay of whatever is parked (nothing should be: every event names its
        # user and a known product).
        with db.as_service_role() as conn:
            replayed = conn.execute("select * from public.replay_parked_stripe_events()").fetchall()

    anomalies = list(storm.anomalies)
    with db.connect_superuser() as conn:
        stored = dict(conn.execute("select id, status from billing.stripe_events").fetchall())
        balances = dict(
            conn.execute(
                "select user_id, balance from billing.accounts where user_id = any(%s)", [users]
            ).fetchall()
        )
        keys = Tally(
            key
            for (key,) in conn.execute(
                "select idempotency_key from billing.ledger_entries where kind <> 'signup'"
            )
        )
        subscriptions = dict(
            conn.execute("select id, status from billing.subscriptions").fetchall()
        )
        accounts = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                "select user_id, plan, subscription_status from billing.accounts "
                "where user_id = any(%s)",
                [users],
            )
        }
        problems = conn.execute("select * from billing.check_invariants()").fetchall()

    # Every event stored, each with a final status.
    anomalies += [f"event {e['id']} not stored" for e in events if e["id"] not in stored]
    anomalies += [
        f"event {i} stored as {s}"
        for i, s in stored.items()
        if s not in FINAL_STATUSES - {"parked"}
    ]
    # Every purchase and every invoice credited exactly once, nothing else.
    want: dict[uuid.UUID, int] = dict.fromkeys(users, 100)
    expected_keys = set()
    for purchase in purchases:
        want[purchase.user] += purchase.tokens
        expected_keys.add(f"stripe:checkout:{purchase.session_id}")
    for plan in plans:
        want[plan.user] += PLAN_TOKENS
        expected_keys.add(f"stripe:invoice:{plan.invoice_id}")
    anomalies += [f"{k} applied {n} times" for k, n in keys.items() if n != 1]
    anomalies += [f"{k} never applied" for k in expected_keys - set(keys)]
    anomalies += [f"{k} applied but not expected" for k in set(keys) - expected_keys]
    anomalies += [
        f"user {u}: balance {balances[u]} != {want[u]}" for u in users if balances[u] != want[u]
    ]
    # At most one 200 said `applied` per payment (its answer may have been lost in the outage).
    for purchase in purchases:
        applied = sum(storm.ok_statuses[e["id"]].count("applied") for e in purchase.events)
        if applied > 1:
            anomalies.append(f"session {purchase.session_id}: {applied} applied answers")
    # Subscriptions end in the state of their newest event, whatever order they came in.
    for plan in plans:
        if subscriptions.get(plan.subscription_id) != "active":
            anomalies.append(f"{plan.subscription_id}: {subscriptions.get(plan.subscription_id)}")
        if accounts[plan.user] != ("starter", "active"):
            anomalies.append(f"user {plan.user}: plan {accounts[plan.user]}")
    anomalies += [f"invariant: {p}" for p in problems]

    report(
        "webhook storm",
        events=len(events),
        deliveries=storm.delivered,
        answered_200=storm.codes[200],
        answered_503=storm.codes[503],
        no_answer=storm.codes[0],
        other_answers=sum(n for c, n in storm.codes.items() if c not in (0, 200, 503)),
        purchases=len(purchases),
        subscriptions=len(plans),
        pool_connections_killed=outage.kills,
        postgres_restarts=outage.restarts,
        readyz_during_outage=dict(outage.readyz_during),
        uncommitted_200s=storm.uncommitted_200s,
        ready_again_after_s=round(ready_seconds, 2),
        replayed_parked=len(replayed),
        seconds=round(seconds, 1),
        anomalies=len(anomalies),
    )
    assert outage.restarts == 1
    assert outage.kills > 0, "no pool connection was killed: the storm tested less than it says"
    assert storm.codes[503] > 0, "Stripe should have seen 503s during the outage"
    assert outage.readyz_during[503] > 0, "/readyz should report the outage while it lasts"
    assert set(outage.readyz_during) == {503}, "/readyz should never be 200 while Postgres is down"
    assert ready_after == 200, "/readyz should be 200 again once Postgres is back"
    assert replayed == []
    assert anomalies == []
