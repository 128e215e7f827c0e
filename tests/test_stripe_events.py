"""public.handle_stripe_event against real Stripe payloads, through psycopg as service_role.

Events come from tests/fixtures/stripe (tests/stripe_fixtures.py verifies each file against
its INDEX.json checksum). An event a test adapts says so: `derive` records every change, and the
event's `str()` in an assertion message names the source file and the changes. Every scenario ends
with the ledger invariants (`billing.check_invariants()`) holding.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from scripts.pgcluster import Database
from tests.stripe_fixtures import StripeEvent, derive, fixture_event, fixture_names

RUBY = "stripe-ruby-mock-webhook_fixtures"
PAY = "pay-rails-stripe"
DJ = "dj-stripe-objects"
OPENAPI = "openapi-fixtures3"

USER = uuid.UUID("00000000-0000-0000-0000-0000000003a1")
OTHER = uuid.UUID("00000000-0000-0000-0000-0000000003a2")

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def service(db: Database) -> Iterator[Conn]:
    """A service_role connection (login as authenticator, `set role service_role`), autocommit."""
    with db.as_service_role() as conn:
        yield conn


def handle(conn: Conn, event: StripeEvent | None) -> tuple[str, str]:
    payload = None if event is None else Jsonb(event.payload)
    row = conn.execute(
        "select status, detail from public.handle_stripe_event(%s)", [payload]
    ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def scalar(db: Database, sql: str, params: list[object] | None = None) -> Any:
    """One value, read as the owner (postgres), who may read every billing table."""
    with db.connect() as conn:
        row = conn.execute(sql, params or []).fetchone()
    return None if row is None else row[0]


def balance(db: Database, user_id: uuid.UUID) -> int:
    return int(scalar(db, "select balance from billing.accounts where user_id = %s", [user_id]))


def assert_books_balance(db: Database) -> None:
    with db.connect() as conn:
        problems = conn.execute("select * from billing.check_invariants()").fetchall()
    assert problems == [], f"ledger invariants broken: {problems}"


def set_price(db: Database, code: str, price_id: str) -> None:
    with db.connect() as conn:
        conn.execute(
            "update billing.products set stripe_price_id = %s where code = %s", [price_id, code]
        )


def pack_checkout(
    session: str,
    *,
    event_id: str,
    user_id: uuid.UUID | None = USER,
    product: str = "pack_100",
    quantity: int | None = None,
    amount_cents: int = 500,
    event_type: str = "checkout.session.completed",
    customer: str | None = None,
) -> StripeEvent:
    """The ruby-mock checkout.session.completed envelope, adapted the way the service creates
    sessions: client_reference_id and metadata (user_id, product, quantity)."""
    metadata: dict[str, Any] = {"product": product}
    if user_id is not None:
        metadata["user_id"] = str(user_id)
    if quantity is not None:
        metadata["quantity"] = str(quantity)
    patch: dict[str, Any] = {
        "id": session,
        "payment_intent": f"pi_{session.removeprefix('cs_')}",
        "amount_total": amount_cents,
        "client_reference_id": None if user_id is None else str(user_id),
        "metadata": metadata,
        "payment_status": "paid",
    }
    if customer is not None:
        patch["customer"] = customer
    return derive(
        fixture_event(f"{RUBY}/checkout.session.completed.json"),
        event_id=event_id,
        event_type=event_type,
        patch=patch,
    )


def sold(conn: Conn, event: StripeEvent) -> StripeEvent:
    """The event of a session the service sold: its Checkout Session recorded first, as the
    service records each session it creates (public.record_checkout_session)."""
    conn.execute("select * from public.record_checkout_session(%s)", [Jsonb(event.object)])
    return event


# Every real full event, verbatim -----------------------------------------------------------------

# What each verbatim envelope should come to on a fresh database: none names a user or one of our
# products or prices, so nothing may be credited; the ruby-mock charge.dispute.closed has no
# dispute id at all, which is malformed.
VERBATIM_OUTCOMES = {
    f"{RUBY}/charge.dispute.closed.json": "22023",
    f"{RUBY}/charge.dispute.created.json": "parked",
    f"{RUBY}/charge.refunded.json": "parked",
    f"{RUBY}/charge.refund.updated.json": "parked",
    f"{RUBY}/charge.dispute.updated.json": "22023",
    f"{RUBY}/charge.dispute.funds_withdrawn.json": "parked",
    f"{RUBY}/charge.dispute.funds_reinstated.json": "parked",
    f"{RUBY}/checkout.session.completed.json": "parked",
    f"{RUBY}/checkout.session.completed.payment_mode.json": "parked",
    f"{RUBY}/checkout.session.completed.setup_mode.json": "ignored",
    f"{RUBY}/customer.subscription.created.json": "parked",
    f"{RUBY}/customer.subscription.deleted.json": "parked",
    f"{RUBY}/customer.subscription.updated.json": "parked",
}
ENVELOPES = [
    *fixture_names(RUBY, envelopes_only=True),
    *fixture_names(PAY, envelopes_only=True),
    f"{OPENAPI}/event.json",
]


@pytest.mark.parametrize("name", ENVELOPES)
def test_every_real_envelope_should_get_a_contract_status_and_credit_nothing(
    db: Database, service: Conn, name: str
) -> None:
    event = fixture_event(name)
    assert not event.derived
    expected = VERBATIM_OUTCOMES.get(name, "ignored")
    if expected == "22023":
        with pytest.raises(psycopg.Error) as raised:
            handle(service, event)
        assert raised.value.sqlstate == "22023", str(event)
        assert scalar(db, "select count(*) from billing.stripe_events") == 0
    else:
        status, detail = handle(service, event)
        assert status == expected, f"{event}: {status} ({detail})"
        stored = scalar(db, "select payload from billing.stripe_events where id = %s", [event.id])
        assert stored == event.payload, "the event should be stored exactly as received"
    assert scalar(db, "select count(*) from billing.ledger_entries") == 0
    assert_books_balance(db)


# Token packs -------------------------------------------------------------------------------------


def test_paid_checkout_should_credit_once_across_redelivery_and_async_succeeded(
    db: Database, service: Conn
) -> None:
    db.create_user(USER)
    completed = sold(service, pack_checkout("cs_test_py_paid", event_id="evt_py_paid", quantity=3))
    assert completed.derived
    assert handle(service, completed)[0] == "applied", str(completed)
    assert handle(service, completed)[0] == "duplicate"
    async_succeeded = derive(
        completed,
        event_id="evt_py_paid_async",
        event_type="checkout.session.async_payment_succeeded",
    )
    assert handle(service, async_succeeded)[0] == "duplicate", str(async_succeeded)

    assert balance(db, USER) == 100 + 3 * 100
    assert (
        scalar(
            db,
            "select count(*) from billing.ledger_entries "
            "where idempotency_key = 'stripe:checkout:cs_test_py_paid'",
        )
        == 1
    )
    assert scalar(db, "select attempts from billing.stripe_events where id = 'evt_py_paid'") == 1
    assert_books_balance(db)


def test_parked_checkout_should_be_credited_when_the_customer_is_linked(
    db: Database, service: Conn
) -> None:
    db.create_user(USER)
    set_price(db, "pack_250", "price_py_pack250")
    # The payment-mode fixture as a session the service did not create (a Payment Link): its one
    # line item is pack_250's price; no user, customer cus_00000000000000.
    event = derive(
        fixture_event(f"{RUBY}/checkout.session.completed.payment_mode.json"),
        patch={"line_items": {"data": [{"price": {"id": "price_py_pack250"}, "quantity": 1}]}},
    )
    status, detail = handle(service, event)
    assert status == "parked", str(event)
    assert "customer cus_00000000000000 is not linked" in detail

    # The link heals the parked event in the same transaction: no replay needed.
    row = service.execute(
        "select status from public.link_stripe_customer(%s, 'cus_00000000000000')", [USER]
    ).fetchone()
    assert row == ("applied",)
    assert scalar(db, "select status from billing.stripe_events where id = %s", [event.id]) == (
        "applied"
    )
    assert balance(db, USER) == 100 + 250
    assert (
        scalar(
            db,
            "select amount_paid_cents from billing.stripe_payments where id = %s",
            [event.object["id"]],
        )
        == 25000
    )
    assert service.execute("select * from public.replay_parked_stripe_events()").fetchall() == []
    assert_books_balance(db)


# Subscriptions (API 2025-03-31 "basil" shapes from pay-rails) -------------------------------------


def test_basil_invoice_should_grant_the_plan_once_and_its_failure_make_the_account_past_due(
    db: Database, service: Conn
) -> None:
    db.create_user(USER)
    set_price(db, "pro", "price_1234")
    service.execute("select * from public.link_stripe_customer(%s, 'cus_1234')", [USER])

    # pay-rails' subscription.created (data only), as the subscription the invoices belong to.
    subscription = derive(
        fixture_event(f"{PAY}/subscription.created.json", "customer.subscription.created"),
        event_id="evt_py_sub",
        created=1_700_000_000,
        patch={"id": "sub_1234", "customer": "cus_1234"},
        paths={"items.data.0.price.id": "price_1234"},
    )
    assert handle(service, subscription)[0] == "applied", str(subscription)

    # pay-rails' basil invoice.payment_failed, as the renewal that was paid.
    failed = fixture_event(f"{PAY}/invoice.payment_failed.json", "invoice.payment_failed")
    paid = derive(
        failed,
        event_id="evt_py_invoice_paid",
        event_type="invoice.paid",
        created=1_700_000_100,
        patch={"status": "paid", "amount_paid": 24900},
    )
    succeeded = derive(
        paid, event_id="evt_py_invoice_succeeded", event_type="invoice.payment_succeeded"
    )
    assert handle(service, paid)[0] == "applied", str(paid)
    assert handle(service, succeeded)[0] == "duplicate", str(succeeded)
    with db.connect() as conn:
        grants = conn.execute(
            "select e.amount, b.expires_at = to_timestamp(1776969906) "
            "from billing.ledger_entries as e "
            "join billing.credit_buckets as b on b.entry_id = e.id "
            "where e.kind = 'subscription'"
        ).fetchall()
    assert grants == [(25000, True)], "one grant, expiring at the basil line's period end"

    # The real failure (envelope added, created after the subscription event): past_due.
    failed = derive(failed, created=1_700_000_200)
    assert handle(service, failed)[0] == "applied", str(failed)
    with db.connect() as conn:
        account = conn.execute(
            "select plan, subscription_status from billing.accounts where user_id = %s", [USER]
        ).fetchone()
    assert account == ("pro", "past_due")

    # An update older than the failure arrives late: stale, nothing changes.
    late = derive(
        subscription,
        event_id="evt_py_sub_late",
        event_type="customer.subscription.updated",
        created=1_700_000_150,
    )
    assert handle(service, late)[0] == "stale", str(late)
    assert (
        scalar(db, "select status from billing.subscriptions where id = 'sub_1234'") == "past_due"
    )
    assert_books_balance(db)


# Refunds and disputes ----------------------------------------------------------------------------


def test_refund_should_claw_back_and_may_leave_debt(db: Database, service: Conn) -> None:
    db.create_user(USER)
    buy = sold(service, pack_checkout("cs_test_py_refund", event_id="evt_py_buy", amount_cents=100))
    assert handle(service, buy)[0] == "applied"
    spent = service.execute(
        "select status from public.deduct_tokens(%s, 150, 'py-use')", [USER]
    ).fetchone()
    assert spent == ("applied",)

    # The ruby-mock charge.refunded (a full refund of 100 cents), tied to the purchase.
    refunded = derive(
        fixture_event(f"{RUBY}/charge.refunded.json"),
        event_id="evt_py_refunded",
        patch={"payment_intent": "pi_test_py_refund"},
    )
    status, detail = handle(service, refunded)
    assert status == "applied", f"{refunded}: {detail}"
    assert balance(db, USER) == 100 + 100 - 150 - 100
    # The same refund as refund.created (openapi's refund object): counted once.
    refund_created = derive(
        fixture_event(f"{OPENAPI}/refund.json", "refund.created"),
        event_id="evt_py_refund_created",
        patch={"id": "re_000000000000000000000000", "charge": "ch_000000000000000000000000"},
    )
    assert handle(service, refund_created)[0] == "duplicate", str(refund_created)
    assert balance(db, USER) == -50
    refused = service.execute(
        "select status from public.deduct_tokens(%s, 1, 'py-use-2')", [USER]
    ).fetchone()
    assert refused == ("insufficient_funds",)
    assert_books_balance(db)


@pytest.mark.parametrize(("closing", "kept"), [("won", False), ("lost", True)])
def test_dispute_should_hold_tokens_then_return_or_keep_them(
    db: Database, service: Conn, closing: str, kept: bool
) -> None:
    db.create_user(USER)
    # dj-stripe's dispute (a bare object) names pi_1JAyTwJSZQVUcJYgBbsz0NuH: buy with it.
    buy = sold(
        service,
        pack_checkout(
            "cs_test_py_dispute", event_id="evt_py_buy", product="pack_250", amount_cents=1000
        ),
    )
    buy = derive(buy, patch={"payment_intent": "pi_1JAyTwJSZQVUcJYgBbsz0NuH"})
    assert handle(service, buy)[0] == "applied", str(buy)

    opened = derive(
        fixture_event(f"{DJ}/dispute_dp_fakefakefakefake01.json", "charge.dispute.created"),
        created=1_700_000_100,
    )
    status, detail = handle(service, opened)
    assert status == "applied", f"{opened}: {detail}"
    assert balance(db, USER) == 100, "the disputed 250 tokens should leave the balance at once"

    closed = derive(
        opened,
        event_id="evt_py_dispute_closed",
        event_type="charge.dispute.closed",
        created=1_700_000_200,
        patch={"status": closing},
    )
    assert handle(service, closed)[0] == "applied", str(closed)
    assert balance(db, USER) == (100 if kept else 350)
    assert scalar(db, "select resolution from billing.stripe_disputes") == (
        "kept" if kept else "returned"
    )
    assert_books_balance(db)


# Malformed events and privileges -----------------------------------------------------------------

MALFORMED: dict[str, dict[str, Any] | list[Any] | None] = {
    "null": None,
    "array": [],
    "no id": {"object": "event", "type": "charge.succeeded", "created": 1, "data": {"object": {}}},
    "no type": {"id": "evt_x", "object": "event", "created": 1, "data": {"object": {}}},
    "no data.object": {"id": "evt_x", "object": "event", "type": "charge.succeeded", "created": 1},
    "thin v2 event": {
        "id": "evt_test_65R8yVWZ8fGNgLYAX5BUy3Fp",
        "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered",
        "created": "2024-09-17T06:20:52.246Z",
        "related_object": {
            "id": "mtr_1",
            "type": "billing.meter",
            "url": "/v1/billing/meters/mtr_1",
        },
    },
}


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_event_should_raise_22023_and_store_nothing(
    db: Database, service: Conn, payload: dict[str, Any] | list[Any] | None
) -> None:
    with pytest.raises(psycopg.Error) as raised:
        service.execute(
            "select * from public.handle_stripe_event(%s)",
            [None if payload is None else Jsonb(payload)],
        )
    assert raised.value.sqlstate == "22023"
    assert scalar(db, "select count(*) from billing.stripe_events") == 0


@pytest.mark.parametrize(
    "call",
    [
        "select * from public.handle_stripe_event('{}')",
        "select * from public.replay_parked_stripe_events()",
        f"select * from public.link_stripe_customer('{USER}', 'cus_x')",
    ],
)
def test_api_roles_should_not_reach_the_stripe_rpcs(db: Database, call: str) -> None:
    with db.as_anon() as anon, pytest.raises(psycopg.errors.InsufficientPrivilege):
        anon.execute(call)
    with db.as_user(USER) as user, pytest.raises(psycopg.errors.InsufficientPrivilege):
        user.execute(call)


# Concurrency -------------------------------------------------------------------------------------


def deliver_at_once(db: Database, events: list[StripeEvent]) -> list[str]:
    """Each event from its own service_role connection, released together; every transaction
    lingers after the call so that the others arrive while it still holds its locks."""
    barrier = threading.Barrier(len(events))

    def deliver(event: StripeEvent) -> str:
        with psycopg.connect(db.dsn(), autocommit=False) as conn:
            conn.execute("set role service_role")
            conn.commit()
            barrier.wait(timeout=30)
            status, _ = handle(conn, event)
            conn.execute("select pg_sleep(0.2)")
            conn.commit()
            return status

    with ThreadPoolExecutor(max_workers=len(events)) as pool:
        return list(pool.map(deliver, events))


def test_same_event_from_8_connections_should_credit_exactly_once(
    db: Database, service: Conn
) -> None:
    db.create_user(USER)
    event = sold(
        service,
        pack_checkout("cs_test_py_parallel", event_id="evt_py_parallel", product="pack_600"),
    )
    statuses = deliver_at_once(db, [event] * 8)
    assert Counter(statuses) == {"applied": 1, "duplicate": 7}
    assert balance(db, USER) == 100 + 600
    assert scalar(db, "select count(*) from billing.stripe_events") == 1
    assert_books_balance(db)


def test_both_events_of_one_payment_at_once_should_credit_exactly_once(
    db: Database, service: Conn
) -> None:
    db.create_user(USER)
    completed = sold(service, pack_checkout("cs_test_py_pair", event_id="evt_py_pair_completed"))
    succeeded = derive(
        completed,
        event_id="evt_py_pair_async",
        event_type="checkout.session.async_payment_succeeded",
    )
    # Four deliveries of each, all at once.
    statuses = deliver_at_once(db, [completed, succeeded] * 4)
    assert Counter(statuses) == {"applied": 1, "duplicate": 7}
    assert balance(db, USER) == 100 + 100
    with db.connect() as conn:
        stored = conn.execute(
            "select status, count(*) from billing.stripe_events group by status order by status"
        ).fetchall()
    assert stored == [("applied", 1), ("duplicate", 1)]
    assert_books_balance(db)


def test_both_descriptions_of_one_refund_at_once_should_claw_back_exactly_once(
    db: Database, service: Conn
) -> None:
    db.create_user(OTHER)
    buy = sold(
        service,
        pack_checkout(
            "cs_test_py_refund_pair", event_id="evt_py_buy", user_id=OTHER, amount_cents=100
        ),
    )
    assert handle(service, buy)[0] == "applied"
    refunded = derive(
        fixture_event(f"{RUBY}/charge.refunded.json"),
        event_id="evt_py_refunded",
        patch={"payment_intent": "pi_test_py_refund_pair"},
    )
    refund_created = derive(
        fixture_event(f"{OPENAPI}/refund.json", "refund.created"),
        event_id="evt_py_refund_created",
        patch={
            "id": "re_000000000000000000000000",
            "charge": "ch_000000000000000000000000",
            "payment_intent": "pi_test_py_refund_pair",
        },
    )
    statuses = deliver_at_once(db, [refunded, refund_created] * 4)
    assert Counter(statuses) == {"applied": 1, "duplicate": 7}
    assert balance(db, OTHER) == 100
    assert scalar(db, "select count(*) from billing.ledger_entries where kind = 'clawback'") == 1
    assert_books_balance(db)
