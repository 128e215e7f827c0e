"""Stripe as it really sends: event sequences in every delivery order, with duplicates and with 8
concurrent deliveries, for plan changes, renewals around a cancellation, the refund lifecycle,
refunds before purchases, 2025-03-31 invoice payments, inquiries, and what was sold.

Every event is derived from a vendored real payload (tests/fixtures/stripe) with `derive`, which
records each change; three API versions: 2020-08-27 (stripe-ruby-mock's captures), 2024-06-20
(the same pre-2025 shapes, the version the envelope names) and 2025-03-31 (pay-rails' basil
invoices and invoice payments). Each order runs with its own user and Stripe ids in one database;
after each, the balance, the plan and status, and `billing.check_invariants()` are asserted.
Orders: every permutation up to 4 events (24), a seeded sample of 24 beyond.
"""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from scripts.pgcluster import Database
from tests.stripe_fixtures import StripeEvent, derive, fixture_event

RUBY = "stripe-ruby-mock-webhook_fixtures"
PAY = "pay-rails-stripe"
OPENAPI = "openapi-fixtures3"
VERSIONS = ("2020-08-27", "2024-06-20", "2025-03-31")
PRICES = {"starter": "price_seq_starter", "pro": "price_seq_pro", "pack_600": "price_seq_pack600"}
# Plans as seed.sql has them: starter $29 for 5,000 tokens, pro $99 for 25,000.
STARTER, PRO = 5000, 25000
PERIOD_START, PERIOD_END, NEXT_END = 1_900_000_000, 1_902_592_000, 1_905_184_000
T0 = 1_800_000_000
PREFIXES = ("inpay", "cus", "sub", "in", "pi", "ch", "re", "dp", "cs")

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def service(db: Database) -> Iterator[Conn]:
    for code, price in PRICES.items():
        with db.connect() as conn:
            conn.execute(
                "update billing.products set stripe_price_id = %s where code = %s", [price, code]
            )
    with db.as_service_role() as conn:
        yield conn


def handle(conn: Conn, event: StripeEvent) -> tuple[str, str]:
    row = conn.execute(
        "select status, detail from public.handle_stripe_event(%s)", [Jsonb(event.payload)]
    ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def one(db: Database, sql: str, params: list[object] | None = None) -> Any:
    with db.connect() as conn:
        row = conn.execute(sql, params or []).fetchone()
    return None if row is None else (row[0] if len(row) == 1 else tuple(row))


def books_balance(db: Database) -> None:
    with db.connect() as conn:
        problems = conn.execute("select * from billing.check_invariants()").fetchall()
    assert problems == [], f"ledger invariants broken: {problems}"


@dataclass
class Ids:
    """The Stripe ids and user of one run of a sequence: fresh for every order."""

    n: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    user: uuid.UUID = field(default_factory=uuid.uuid4)

    def __getattr__(self, name: str) -> str:
        """ids.cus, ids.in1, ids.reA, ids.subold: the Stripe id of that prefix for this run."""
        prefix = next(p for p in PREFIXES if name.startswith(p))
        return f"{prefix}_seq{self.n}{name[len(prefix) :]}"


def event(
    name: str,
    ids: Ids,
    label: str,
    event_type: str,
    created: int,
    patch: dict[str, Any],
    version: str = "2020-08-27",
) -> StripeEvent:
    base = fixture_event(name, event_type)
    derived = derive(
        base, event_id=f"evt_{label}_{ids.n}", event_type=event_type, created=created, patch=patch
    )
    payload = derived.payload
    if payload.get("api_version") != version:
        payload["api_version"] = version
        return StripeEvent(payload, derived.source, (*derived.changes, f"api_version={version}"))
    return derived


def orders(events: list[StripeEvent], seed: int) -> list[list[StripeEvent]]:
    """Every order of up to 4 events, else 24 seeded ones (the given order first)."""
    if len(events) <= 4:
        return [list(p) for p in itertools.permutations(events)]
    rng = random.Random(seed)
    picked = [list(events)]
    while len(picked) < 24:
        order = list(events)
        rng.shuffle(order)
        picked.append(order)
    return picked


def deliver_in_order(conn: Conn, order: list[StripeEvent]) -> None:
    """Each event, then a redelivery of it (which must answer duplicate)."""
    for ev in order:
        status, detail = handle(conn, ev)
        assert status in {"applied", "duplicate", "ignored", "stale", "parked"}, detail
        again, detail = handle(conn, ev)
        if status != "parked":
            assert again == "duplicate", f"{ev}: a redelivery answered {again} ({detail})"


def deliver_concurrently(db: Database, order: list[StripeEvent], copies: int = 8) -> None:
    """`copies` deliveries of each event at once, from their own connections, released together."""
    deliveries = [ev for ev in order for _ in range(copies)]
    barrier = threading.Barrier(len(deliveries))

    def go(ev: StripeEvent) -> str:
        with psycopg.connect(db.dsn(), autocommit=False) as conn:
            conn.execute("set role service_role")
            conn.commit()
            barrier.wait(timeout=60)
            status, _ = handle(conn, ev)
            conn.commit()
            return status

    with ThreadPoolExecutor(max_workers=len(deliveries)) as pool:
        list(pool.map(go, deliveries))


def open_user(conn: Conn, db: Database, ids: Ids) -> None:
    """The user signs up and the service links the Stripe customer before any checkout."""
    db.create_user(ids.user)
    conn.execute("select * from public.link_stripe_customer(%s, %s)", [ids.user, ids.cus])


def account(db: Database, ids: Ids) -> tuple[int, str, str | None]:
    row: tuple[int, str, str | None] = one(
        db,
        "select balance, plan, subscription_status from billing.accounts where user_id = %s",
        [ids.user],
    )
    return row


# Subscription and invoice payloads --------------------------------------------------------------


def subscription(
    ids: Ids,
    label: str,
    event_type: str,
    created: int,
    *,
    plan: str,
    status: str = "active",
    sub: str | None = None,
    version: str = "2020-08-27",
    period_end: int = PERIOD_END,
) -> StripeEvent:
    """ruby-mock's customer.subscription.* (period on the subscription, as before 2025-03-31),
    or for 2025-03-31 pay-rails' subscription.updated (period on the item)."""
    price = PRICES[plan]
    if version == "2025-03-31":
        item = {
            "id": f"si_{ids.n}",
            "price": {"id": price},
            "current_period_start": PERIOD_START,
            "current_period_end": period_end,
            "quantity": 1,
        }
        return event(
            f"{PAY}/subscription.updated.json",
            ids,
            label,
            event_type,
            created,
            {
                "id": sub or ids.sub,
                "customer": ids.cus,
                "status": status,
                "items": {"data": [item]},
                "metadata": {"user_id": str(ids.user)},
                "cancel_at_period_end": False,
            },
            version,
        )
    item = {"id": f"si_{ids.n}", "plan": {"id": price}, "price": {"id": price}, "quantity": 1}
    return event(
        f"{RUBY}/customer.subscription.updated.json",
        ids,
        label,
        event_type,
        created,
        {
            "id": sub or ids.sub,
            "customer": ids.cus,
            "status": status,
            "items": {"data": [item]},
            "metadata": {"user_id": str(ids.user)},
            "current_period_start": PERIOD_START,
            "current_period_end": period_end,
        },
        version,
    )


def line(
    plan: str, amount: int, *, proration: bool, start: int, end: int, version: str
) -> dict[str, Any]:
    """An invoice line in the shape of its version: price and proration on the line before
    2025-03-31, pricing.price_details and parent.subscription_item_details after."""
    if version == "2025-03-31":
        return {
            "object": "line_item",
            "amount": amount,
            "quantity": 1,
            "period": {"start": start, "end": end},
            "pricing": {"price_details": {"price": PRICES[plan]}, "type": "price_details"},
            "parent": {
                "type": "subscription_item_details",
                "subscription_item_details": {"proration": proration},
            },
        }
    return {
        "object": "line_item",
        "amount": amount,
        "quantity": 1,
        "period": {"start": start, "end": end},
        "price": {"id": PRICES[plan], "unit_amount": {"starter": 2900, "pro": 9900}[plan]},
        "proration": proration,
    }


def invoice(
    ids: Ids,
    label: str,
    created: int,
    *,
    invoice_id: str,
    reason: str,
    lines: list[dict[str, Any]],
    paid: int,
    version: str = "2020-08-27",
    event_type: str = "invoice.paid",
    payment_intent: str | None = None,
) -> StripeEvent:
    """ruby-mock's invoice.paid (pre-2025: subscription, payment_intent, charge on the invoice),
    or pay-rails' basil invoice (parent.subscription_details; no payment intent or charge)."""
    if version == "2025-03-31":
        return event(
            f"{PAY}/invoice.payment_failed.json",
            ids,
            label,
            event_type,
            created,
            {
                "id": invoice_id,
                "customer": ids.cus,
                "billing_reason": reason,
                "status": "paid",
                "amount_paid": paid,
                "parent": {"subscription_details": {"subscription": ids.sub, "metadata": {}}},
                "lines": {"data": lines},
            },
            version,
        )
    return event(
        f"{RUBY}/invoice.paid.json",
        ids,
        label,
        event_type,
        created,
        {
            "id": invoice_id,
            "customer": ids.cus,
            "subscription": ids.sub,
            "billing_reason": reason,
            "amount_paid": paid,
            "payment_intent": payment_intent or f"pi_{invoice_id}",
            "charge": f"ch_{invoice_id}",
            "lines": {"data": lines},
        },
        version,
    )


# 1. Plans across changes ------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_upgrade_with_prorations_on_the_next_invoice_grants_the_new_plan_in_every_order(
    db: Database, service: Conn, version: str
) -> None:
    """starter, then pro through the portal with default prorations: the next cycle invoice lists
    [unused starter, remaining pro, 1 x pro] (prorations first); it grants pro's 25,000 for the
    new period, the prorations (a period already over) nothing."""
    ids = Ids()
    events = _upgrade_events(ids, version)
    for order in orders(events, 1):
        run = Ids()
        rebuilt = _rebuild(events, ids, run)
        open_user(service, db, run)
        deliver_in_order(service, [rebuilt[e.id] for e in order])
        assert account(db, run) == (100 + STARTER + PRO, "pro", "active"), version
        expiry = one(
            db,
            "select b.expires_at from billing.credit_buckets as b join billing.ledger_entries "
            "as e on e.id = b.entry_id where e.idempotency_key = %s",
            [f"stripe:invoice:{run.in2}"],
        )
        assert expiry is not None
        assert int(expiry.timestamp()) == NEXT_END
    books_balance(db)


def _upgrade_events(ids: Ids, version: str) -> list[StripeEvent]:
    mid = (PERIOD_START + PERIOD_END) // 2
    return [
        subscription(
            ids, "created", "customer.subscription.created", T0, plan="starter", version=version
        ),
        invoice(
            ids,
            "first",
            T0,
            invoice_id=ids.in1,
            reason="subscription_create",
            paid=2900,
            lines=[
                line(
                    "starter",
                    2900,
                    proration=False,
                    start=PERIOD_START,
                    end=PERIOD_END,
                    version=version,
                )
            ],
            version=version,
        ),
        subscription(
            ids, "upgraded", "customer.subscription.updated", T0 + 100, plan="pro", version=version
        ),
        invoice(
            ids,
            "cycle",
            T0 + 200,
            invoice_id=ids.in2,
            reason="subscription_cycle",
            paid=9900 + 3500,
            version=version,
            lines=[
                line("starter", -1450, proration=True, start=mid, end=PERIOD_END, version=version),
                line("pro", 4950, proration=True, start=mid, end=PERIOD_END, version=version),
                line("pro", 9900, proration=False, start=PERIOD_END, end=NEXT_END, version=version),
            ],
        ),
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_upgrade_invoiced_at_once_grants_the_difference_for_the_unused_part(
    db: Database, service: Conn, version: str
) -> None:
    """Policy: an upgrade paid at once (subscription_update) grants (pro - starter) x the unused
    part of the period = 20,000 x 1/2; a downgrade invoiced at once grants nothing."""
    mid = (PERIOD_START + PERIOD_END) // 2
    for upgrade in (True, False):
        ids = Ids()
        old, new = ("starter", "pro") if upgrade else ("pro", "starter")
        prices = {"starter": 2900, "pro": 9900}
        events = [
            subscription(
                ids, "created", "customer.subscription.created", T0, plan=old, version=version
            ),
            invoice(
                ids,
                "first",
                T0,
                invoice_id=ids.in1,
                reason="subscription_create",
                paid=prices[old],
                version=version,
                lines=[
                    line(
                        old,
                        prices[old],
                        proration=False,
                        start=PERIOD_START,
                        end=PERIOD_END,
                        version=version,
                    )
                ],
            ),
            subscription(
                ids, "changed", "customer.subscription.updated", T0 + 100, plan=new, version=version
            ),
            invoice(
                ids,
                "change",
                T0 + 100,
                invoice_id=ids.in2,
                reason="subscription_update",
                paid=max(prices[new] // 2 - prices[old] // 2, 0),
                version=version,
                lines=[
                    line(
                        old,
                        -(prices[old] // 2),
                        proration=True,
                        start=mid,
                        end=PERIOD_END,
                        version=version,
                    ),
                    line(
                        new,
                        prices[new] // 2,
                        proration=True,
                        start=mid,
                        end=PERIOD_END,
                        version=version,
                    ),
                ],
            ),
        ]
        for order in orders(events, 2):
            run = Ids()
            rebuilt = _rebuild(events, ids, run)
            open_user(service, db, run)
            deliver_in_order(service, [rebuilt[e.id] for e in order])
            first = STARTER if upgrade else PRO
            # floor(20000 x 4950/9900) = 10000 for the upgrade; nothing for the downgrade.
            extra = (PRO - STARTER) // 2 if upgrade else 0
            assert account(db, run) == (100 + first + extra, new, "active"), (upgrade, version)
        books_balance(db)


def _rebuild(events: list[StripeEvent], old: Ids, new: Ids) -> dict[str, StripeEvent]:
    """The same events with another run's ids (by text substitution of the run's suffix)."""
    import json

    out = {}
    for ev in events:
        text = json.dumps(ev.payload).replace(old.n, new.n).replace(str(old.user), str(new.user))
        out[ev.id] = StripeEvent(json.loads(text), ev.source, (*ev.changes, "ids of its own run"))
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_events_sharing_a_second_end_in_the_state_further_along(
    db: Database, service: Conn, version: str
) -> None:
    """.created (incomplete) and .updated (active) with the same created, plus the first invoice:
    active on starter in every order; and active then deleted in one second: canceled."""
    ids = Ids()
    events = [
        subscription(
            ids,
            "created",
            "customer.subscription.created",
            T0,
            plan="starter",
            status="incomplete",
            version=version,
        ),
        subscription(
            ids, "active", "customer.subscription.updated", T0, plan="starter", version=version
        ),
        invoice(
            ids,
            "first",
            T0,
            invoice_id=ids.in1,
            reason="subscription_create",
            paid=2900,
            version=version,
            lines=[
                line(
                    "starter",
                    2900,
                    proration=False,
                    start=PERIOD_START,
                    end=PERIOD_END,
                    version=version,
                )
            ],
        ),
    ]
    for order in orders(events, 3):
        run = Ids()
        rebuilt = _rebuild(events, ids, run)
        open_user(service, db, run)
        deliver_in_order(service, [rebuilt[e.id] for e in order])
        assert account(db, run) == (100 + STARTER, "starter", "active")
    ended = [
        subscription(
            ids, "active", "customer.subscription.updated", T0, plan="starter", version=version
        ),
        subscription(
            ids,
            "deleted",
            "customer.subscription.deleted",
            T0,
            plan="starter",
            status="canceled",
            version=version,
        ),
    ]
    for order in orders(ended, 4):
        run = Ids()
        rebuilt = _rebuild(ended, ids, run)
        open_user(service, db, run)
        deliver_in_order(service, [rebuilt[e.id] for e in order])
        assert account(db, run) == (100, "free", "canceled")
    books_balance(db)


# 3. What was paid for is granted ----------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_renewal_paid_before_the_cancellation_grants_its_period_in_every_order(
    db: Database, service: Conn, version: str
) -> None:
    ids = Ids()
    events = [
        subscription(
            ids, "created", "customer.subscription.created", T0, plan="starter", version=version
        ),
        invoice(
            ids,
            "renewal",
            T0 + 100,
            invoice_id=ids.in1,
            reason="subscription_cycle",
            paid=2900,
            version=version,
            lines=[
                line(
                    "starter",
                    2900,
                    proration=False,
                    start=PERIOD_END,
                    end=NEXT_END,
                    version=version,
                )
            ],
        ),
        subscription(
            ids,
            "deleted",
            "customer.subscription.deleted",
            T0 + 200,
            plan="starter",
            status="canceled",
            version=version,
        ),
    ]
    for order in orders(events, 5):
        run = Ids()
        rebuilt = _rebuild(events, ids, run)
        open_user(service, db, run)
        deliver_in_order(service, [rebuilt[e.id] for e in order])
        assert account(db, run) == (100 + STARTER, "free", "canceled")
    books_balance(db)


# 8. Two subscriptions of one user race -----------------------------------------------------------


def test_two_subscriptions_changing_at_once_leave_the_entitled_plan(
    db: Database, service: Conn
) -> None:
    """The old subscription's deleted and the new one's updated (active), each delivered 8 times
    at once: the account ends pro/active every time (the plan is computed under the account's
    lock)."""
    for _ in range(3):
        ids = Ids()
        open_user(service, db, ids)
        old = subscription(
            ids, "old", "customer.subscription.created", T0, plan="starter", sub=ids.subold
        )
        handle(service, old)
        deliver_concurrently(
            db,
            [
                subscription(
                    ids,
                    "olddeleted",
                    "customer.subscription.deleted",
                    T0 + 100,
                    plan="starter",
                    status="canceled",
                    sub=ids.subold,
                ),
                subscription(
                    ids,
                    "new",
                    "customer.subscription.updated",
                    T0 + 100,
                    plan="pro",
                    sub=ids.subnew,
                ),
            ],
        )
        assert account(db, ids)[1:] == ("pro", "active")
    books_balance(db)


# Packs: what was sold, refunds, disputes ---------------------------------------------------------


def sold_session(conn: Conn, ids: Ids, *, amount: int = 2000, record: bool = True) -> StripeEvent:
    """ruby-mock's checkout.session.completed for 1 x pack_600 ($20) the service created."""
    ev = event(
        f"{RUBY}/checkout.session.completed.json",
        ids,
        "paid",
        "checkout.session.completed",
        T0,
        {
            "id": ids.cs,
            "customer": ids.cus,
            "payment_intent": ids.pi,
            "amount_total": amount,
            "currency": "usd",
            "payment_status": "paid",
            "client_reference_id": str(ids.user),
            "metadata": {"user_id": str(ids.user), "product": "pack_600", "quantity": "1"},
        },
    )
    if record:
        conn.execute("select * from public.record_checkout_session(%s)", [Jsonb(ev.object)])
    return ev


def refund(
    ids: Ids,
    label: str,
    event_type: str,
    created: int,
    *,
    refund_id: str,
    amount: int,
    status: str,
    pi: str | None = None,
) -> StripeEvent:
    return event(
        f"{OPENAPI}/refund.json",
        ids,
        label,
        event_type,
        created,
        {
            "id": refund_id,
            "amount": amount,
            "status": status,
            "charge": ids.ch,
            "payment_intent": pi or ids.pi,
        },
    )


def charge_refunded(ids: Ids, label: str, created: int, refunded: int) -> StripeEvent:
    return event(
        f"{RUBY}/charge.refunded.json",
        ids,
        label,
        "charge.refunded",
        created,
        {
            "id": ids.ch,
            "payment_intent": ids.pi,
            "amount": 2000,
            "amount_refunded": refunded,
            "refunds": {"data": []},
        },
    )


def dispute(
    ids: Ids, label: str, event_type: str, created: int, status: str, pi: str | None = None
) -> StripeEvent:
    return event(
        f"{RUBY}/charge.dispute.created.json",
        ids,
        label,
        event_type,
        created,
        {
            "id": ids.dp,
            "amount": 2000,
            "status": status,
            "charge": ids.ch,
            "payment_intent": pi or ids.pi,
        },
    )


def run_pack_orders(
    db: Database,
    service: Conn,
    build: Callable[[Ids], list[StripeEvent]],
    want_balance: int,
    seed: int,
    *,
    concurrent: bool = False,
) -> None:
    template = Ids()
    for order in orders(build(template), seed):
        ids = Ids()
        db.create_user(ids.user)
        built = {e.id.split("_")[1]: e for e in build(ids)}
        sequence = [built[e.id.split("_")[1]] for e in order]
        if concurrent:
            deliver_concurrently(db, sequence)
        else:
            deliver_in_order(service, sequence)
        assert account(db, ids)[0] == want_balance, [e.payload["type"] for e in order]
    books_balance(db)


def test_a_refund_that_fails_gives_back_what_it_clawed_and_its_replacement_claws_once(
    db: Database, service: Conn
) -> None:
    """Purchase 600 tokens for 2000 cents; refund A of 1000 (pending), charge.refunded 1000, A
    fails, replacement B of 1000 succeeds, charge.refunded 1000 again: 300 clawed back in all,
    whatever the order, with a clawback_reversed entry of its own when A's clawback came first."""

    def build(ids: Ids) -> list[StripeEvent]:
        return [
            sold_session(service, ids),
            refund(
                ids,
                "acreated",
                "refund.created",
                T0 + 100,
                refund_id=ids.reA,
                amount=1000,
                status="pending",
            ),
            charge_refunded(ids, "reported", T0 + 150, 1000),
            refund(
                ids,
                "afailed",
                "refund.failed",
                T0 + 200,
                refund_id=ids.reA,
                amount=1000,
                status="failed",
            ),
            refund(
                ids,
                "bcreated",
                "refund.created",
                T0 + 300,
                refund_id=ids.reB,
                amount=1000,
                status="succeeded",
            ),
            charge_refunded(ids, "reportedagain", T0 + 350, 1000),
        ]

    run_pack_orders(db, service, build, 100 + 600 - 300, 6)
    ids = Ids()
    db.create_user(ids.user)
    events = build(ids)
    deliver_in_order(service, events[:4])
    kinds = [
        r[0]
        for r in db_rows(
            db, "select kind from billing.ledger_entries where user_id = %s order by id", [ids.user]
        )
    ]
    assert kinds == ["signup", "purchase", "clawback", "clawback_reversed"]
    assert account(db, ids)[0] == 700


def db_rows(db: Database, sql: str, params: list[object]) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute(sql, params).fetchall()


def test_a_refund_delivered_before_its_purchase_heals_in_the_same_transaction(
    db: Database, service: Conn
) -> None:
    """refund.created and charge.refunded of a quarter arrive before checkout.session.completed:
    they park, and the purchase applies them: +450 net in every order, 8 at once included."""

    def build(ids: Ids) -> list[StripeEvent]:
        return [
            sold_session(service, ids),
            refund(
                ids,
                "quarter",
                "refund.created",
                T0 + 100,
                refund_id=ids.re,
                amount=500,
                status="succeeded",
            ),
            charge_refunded(ids, "reported", T0 + 100, 500),
        ]

    run_pack_orders(db, service, build, 100 + 600 - 150, 7)
    run_pack_orders(db, service, build, 100 + 600 - 150, 7, concurrent=True)
    assert one(db, "select count(*) from billing.stripe_events where status = 'parked'") == 0


def test_an_inquiry_holds_nothing_so_a_refund_during_it_takes_everything(
    db: Database, service: Conn
) -> None:
    """Inquiries withdraw no funds: warning_needs_response holds 0, a full refund claws all 600,
    warning_closed changes nothing: 100 left in every order."""

    def build(ids: Ids) -> list[StripeEvent]:
        return [
            sold_session(service, ids),
            dispute(ids, "inquiry", "charge.dispute.created", T0 + 100, "warning_needs_response"),
            refund(
                ids,
                "full",
                "refund.created",
                T0 + 200,
                refund_id=ids.re,
                amount=2000,
                status="succeeded",
            ),
            dispute(ids, "closed", "charge.dispute.closed", T0 + 300, "warning_closed"),
        ]

    run_pack_orders(db, service, build, 100, 8)


def test_refunds_and_a_lost_dispute_take_exactly_what_was_paid_back(
    db: Database, service: Conn
) -> None:
    """Half refunded, then a dispute of the other half lost: 0 of the 600 left, in every order;
    a won dispute of a chargeback gives its hold back."""

    def build(ids: Ids) -> list[StripeEvent]:
        lost = dispute(ids, "lost", "charge.dispute.closed", T0 + 300, "lost")
        lost.payload["data"]["object"]["amount"] = 1000
        opened = dispute(ids, "opened", "charge.dispute.created", T0 + 200, "needs_response")
        opened.payload["data"]["object"]["amount"] = 1000
        return [
            sold_session(service, ids),
            refund(
                ids,
                "half",
                "refund.created",
                T0 + 100,
                refund_id=ids.re,
                amount=1000,
                status="succeeded",
            ),
            opened,
            lost,
        ]

    run_pack_orders(db, service, build, 100, 9)

    def won(ids: Ids) -> list[StripeEvent]:
        return [
            sold_session(service, ids),
            dispute(ids, "opened", "charge.dispute.created", T0 + 100, "needs_response"),
            dispute(ids, "withdrawn", "charge.dispute.funds_withdrawn", T0 + 100, "needs_response"),
            dispute(ids, "won", "charge.dispute.closed", T0 + 300, "won"),
        ]

    run_pack_orders(db, service, won, 700, 10)


# 6. 2025-03-31 invoices: refunds and disputes of subscription charges ---------------------------


def test_basil_invoice_refund_and_dispute_apply_through_invoice_payment_paid(
    db: Database, service: Conn
) -> None:
    """A basil invoice names no payment intent; invoice_payment.paid (pay-rails' real one)
    links it. A half refund of the subscription charge claws back half the plan's tokens, in
    every order of invoice.paid, invoice_payment.paid and refund.created."""

    def build(ids: Ids) -> list[StripeEvent]:
        version = "2025-03-31"
        paid = invoice(
            ids,
            "paid",
            T0,
            invoice_id=ids.in1,
            reason="subscription_cycle",
            paid=2900,
            version=version,
            lines=[
                line(
                    "starter",
                    2900,
                    proration=False,
                    start=PERIOD_START,
                    end=PERIOD_END,
                    version=version,
                )
            ],
        )
        link = event(
            f"{PAY}/invoice.updated.json",
            ids,
            "inpay",
            "invoice_payment.paid",
            T0,
            {
                "id": ids.inpay,
                "invoice": ids.in1,
                "amount_paid": 2900,
                "payment": {"type": "payment_intent", "payment_intent": ids.pi},
            },
            version,
        )
        half = refund(
            ids,
            "half",
            "refund.created",
            T0 + 100,
            refund_id=ids.re,
            amount=1450,
            status="succeeded",
        )
        return [paid, link, half]

    template = Ids()
    for order in orders(build(template), 11):
        ids = Ids()
        open_user(service, db, ids)
        built = {e.id.split("_")[1]: e for e in build(ids)}
        deliver_in_order(service, [built[e.id.split("_")[1]] for e in order])
        assert account(db, ids)[0] == 100 + STARTER - STARTER // 2
    books_balance(db)


# 9. Credit only what was sold -------------------------------------------------------------------


def test_credits_come_from_the_record_never_from_metadata(db: Database, service: Conn) -> None:
    ids = Ids()
    db.create_user(ids.user)
    recorded = sold_session(service, ids)
    # The paid event claims 999,999 x pack_600 for 50 JPY: the amount and currency disagree.
    forged = derive(
        recorded, patch={"amount_total": 50, "currency": "jpy", "metadata": {"quantity": "999999"}}
    )
    status, detail = handle(service, forged)
    assert status == "parked", detail
    assert "sold for 2000 usd" in detail, detail
    assert account(db, ids)[0] == 100

    # Never recorded and no pack price in its line items: parked with the reason.
    other = Ids()
    db.create_user(other.user)
    status, detail = handle(service, sold_session(service, other, record=False))
    assert status == "parked", detail
    assert "not recorded" in detail, detail

    # client_reference_id wins over nothing: disagreeing names park.
    third = Ids()
    db.create_user(third.user)
    split = derive(
        sold_session(service, third, record=False), patch={"metadata": {"user_id": str(ids.user)}}
    )
    status, detail = handle(service, split)
    assert status == "parked", detail
    assert "disagree" in detail, detail

    # A customer linked to another user: nothing credited to the named one.
    fourth = Ids()
    db.create_user(fourth.user)
    service.execute("select * from public.link_stripe_customer(%s, %s)", [ids.user, fourth.cus])
    status, detail = handle(service, sold_session(service, fourth))
    assert status == "ignored", detail
    assert "belongs to user" in detail, detail
    assert account(db, fourth)[0] == 100

    # Livemode not the deployment's, or a connected account's event: stored ignored.
    fifth = Ids()
    db.create_user(fifth.user)
    live = sold_session(service, fifth)
    live.payload["livemode"] = True
    status, detail = handle(service, live)
    assert status == "ignored", detail
    assert "live mode" in detail, detail
    connected = derive(sold_session(service, Ids()), event_id=f"evt_connected_{fifth.n}")
    connected.payload["account"] = "acct_1Connected"
    status, detail = handle(service, connected)
    assert status == "ignored", detail
    assert "connected account" in detail, detail
    assert account(db, fifth)[0] == 100
    books_balance(db)


# 10. Payment Element, trials, deleted customers, pauses, void invoices ---------------------------


def payment_intent(ids: Ids, label: str, created: int, *, amount: int = 2000) -> StripeEvent:
    return event(
        f"{OPENAPI}/payment_intent.json",
        ids,
        label,
        "payment_intent.succeeded",
        created,
        {
            "id": ids.pi,
            "amount": amount,
            "amount_received": amount,
            "currency": "usd",
            "status": "succeeded",
            "customer": None,
            "metadata": {"user_id": str(ids.user), "product": "pack_600", "quantity": "1"},
        },
    )


def test_payment_element_credits_once_and_once_across_checkout(db: Database, service: Conn) -> None:
    ids = Ids()
    db.create_user(ids.user)
    succeeded = payment_intent(ids, "pi", T0)
    status, _ = service.execute(
        "select status, detail from public.record_payment_intent(%s)", [Jsonb(succeeded.object)]
    ).fetchone() or ("", "")
    assert status == "applied"
    deliver_concurrently(db, [succeeded])
    assert account(db, ids)[0] == 700
    assert handle(service, succeeded)[0] == "duplicate"

    # A Checkout Session's payment intent: its payment_intent.succeeded credits nothing more,
    # in either order.
    for first_intent in (True, False):
        other = Ids()
        db.create_user(other.user)
        session = sold_session(service, other)
        intent = payment_intent(other, "pi", T0 + 1)
        deliver_in_order(service, [intent, session] if first_intent else [session, intent])
        assert account(db, other)[0] == 700
    books_balance(db)


def test_trials_deleted_customers_pauses_and_void_invoices(db: Database, service: Conn) -> None:
    ids = Ids()
    open_user(service, db, ids)
    trial = invoice(
        ids,
        "trial",
        T0,
        invoice_id=ids.in1,
        reason="subscription_create",
        paid=0,
        lines=[
            line(
                "starter",
                0,
                proration=False,
                start=PERIOD_START,
                end=PERIOD_END,
                version="2020-08-27",
            )
        ],
    )
    with db.connect() as conn:
        conn.execute("update billing.products set trial_tokens = 0 where code = 'starter'")
    status, detail = handle(service, trial)
    assert status == "ignored", detail
    assert "grants no tokens" in detail, detail
    with db.connect() as conn:
        conn.execute("update billing.products set trial_tokens = 1000 where code = 'starter'")
    second = Ids()
    open_user(service, db, second)
    status, detail = handle(service, _rebuild([trial], ids, second)[trial.id])
    assert status == "applied", detail
    assert "1000 tokens of plan starter (trial)" in detail, detail

    paused = subscription(
        ids, "paused", "customer.subscription.paused", T0, plan="starter", status="paused"
    )
    assert handle(service, paused)[0] == "applied"
    assert account(db, ids)[1:] == ("free", "paused")
    resumed = subscription(ids, "resumed", "customer.subscription.resumed", T0 + 10, plan="starter")
    assert handle(service, resumed)[0] == "applied"
    assert account(db, ids)[1:] == ("starter", "active")

    for kind in ("invoice.voided", "invoice.marked_uncollectible"):
        void = invoice(
            ids,
            kind,
            T0 + 20,
            invoice_id=ids.in9,
            reason="subscription_cycle",
            paid=0,
            event_type=kind,
            lines=[],
        )
        status, detail = handle(service, void)
        assert status == "ignored", detail
        assert "grants nothing" in detail, detail

    deleted = event(
        f"{PAY}/customer.deleted.json", ids, "gone", "customer.deleted", T0 + 30, {"id": ids.cus}
    )
    assert handle(service, deleted)[0] == "applied"
    assert (
        one(db, "select count(*) from billing.customers where stripe_customer_id = %s", [ids.cus])
        == 0
    )
    books_balance(db)
