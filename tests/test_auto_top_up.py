"""Auto top-up: a threshold crossing charges the saved card off-session, once.

The billing worker (token_billing.server.worker) claims each crossing's request and charges it
through the stripe library against the local Stripe double; the double's record of requests is
what reached "Stripe". The credit comes from the PaymentIntent's own payment_intent.succeeded,
posted to the service's webhook route signed with a real HMAC, as Stripe would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests import stripe_fixtures
from tests.app_support import account, new_user, scalar, settings_for, sign
from tests.stripe_double import StripeDouble
from token_billing.server.app import create_app
from token_billing.server.database import database_from_settings
from token_billing.server.metrics import Metrics
from token_billing.server.settings import Settings
from token_billing.server.stripe_api import StripeGateway
from token_billing.server.worker import BillingWorker, RunCounts

# Pro: 25,000 tokens a period, pack_600 ($20.00) bought when 20% (5,000) is left.
THRESHOLD = 5000


@pytest.fixture
def stripe_double() -> Iterator[StripeDouble]:
    with StripeDouble() as double:
        yield double


def pro_user(db: Database, double: StripeDouble, card: str | None = "succeeded") -> uuid.UUID:
    """A pro subscriber with 5,100 tokens available (100 above the threshold) and a saved card."""
    user = new_user(db)
    customer = f"cus_topup{user.hex[:12]}"
    double.state.customers[customer] = {"id": customer, "object": "customer", "metadata": {}}
    if card is not None:
        double.save_card(customer, card)
    with db.connect() as conn:
        conn.execute(
            "update billing.accounts set plan = 'pro', subscription_status = 'active' "
            "where user_id = %s",
            [str(user)],
        )
        conn.execute("select public.link_stripe_customer(%s, %s)", [str(user), customer])
        conn.execute(
            "select public.add_tokens(%s, 5000, %s, 'subscription')", [str(user), f"grant-{user}"]
        )
    return user


def deduct(db: Database, user: uuid.UUID, amount: int, key: str) -> tuple[Any, ...]:
    with db.connect() as conn:
        row = conn.execute(
            "select status, balance from public.deduct_tokens(%s, %s, %s)", [str(user), amount, key]
        ).fetchone()
    assert row is not None
    return tuple(row)


def top_ups(db: Database, user: uuid.UUID) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                "select n, status, stripe_payment_intent_id, detail from billing.auto_top_ups "
                "where user_id = %s order by n",
                [str(user)],
            ).fetchall()
        ]


def notifications(db: Database, user: uuid.UUID) -> list[str]:
    with db.connect() as conn:
        return [
            str(r[0])
            for r in conn.execute(
                "select kind from billing.notifications where user_id = %s "
                "and kind like 'auto_top_up%%' order by created_at",
                [str(user)],
            ).fetchall()
        ]


def worker_settings(db: Database, double: StripeDouble) -> Settings:
    return settings_for(db, stripe_url=double.url)


async def run_workers(settings: Settings, count: int = 1) -> list[RunCounts]:
    """`count` workers, each with its own pool, running once at the same time."""
    metrics = Metrics()
    async with httpx.AsyncClient() as http:
        workers = []
        for _ in range(count):
            db = database_from_settings(settings)
            await db.open()
            workers.append(
                (BillingWorker(settings, db, StripeGateway(settings, metrics), http), db)
            )
        try:
            return list(await asyncio.gather(*(w.run_once() for w, _ in workers)))
        finally:
            for worker, db in workers:
                assert worker.stripe is not None
                await worker.stripe.close()
                await db.close()


def succeeded_event(intent: dict[str, Any], event_id: str) -> dict[str, Any]:
    """payment_intent.succeeded for the intent the double made: the openapi fixture's object
    with the intent's fields, in an event envelope."""
    obj = copy.deepcopy(stripe_fixtures.load("openapi-fixtures3/payment_intent.json"))
    obj.update(
        {
            "id": intent["id"],
            "amount": intent["amount"],
            "amount_received": intent["amount"],
            "currency": intent["currency"],
            "customer": intent["customer"],
            "metadata": intent["metadata"],
            "status": "succeeded",
            "livemode": False,
        }
    )
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1767225600,
        "livemode": False,
        "type": "payment_intent.succeeded",
        "data": {"object": obj},
    }


def post_webhook(client: TestClient, event: dict[str, Any]) -> Any:
    payload = json.dumps(event).encode()
    return client.post(
        "/v1/webhooks/stripe",
        content=payload,
        headers={"Stripe-Signature": sign(payload), "Content-Type": "application/json"},
    )


def test_a_crossing_should_charge_the_saved_card_once_and_credit_once(
    db: Database, stripe_double: StripeDouble
) -> None:
    user = pro_user(db, stripe_double)
    assert deduct(db, user, 99, "use-1") == ("applied", 5001)
    assert top_ups(db, user) == [], "above the threshold nothing should be bought"
    assert deduct(db, user, 1, "use-2") == ("applied", THRESHOLD)

    settings = worker_settings(db, stripe_double)
    [counts] = asyncio.run(run_workers(settings))

    assert counts.top_ups_charged == 1, counts
    [charge] = stripe_double.posts("/v1/payment_intents")
    p = charge.params
    assert p["off_session"] == "true"
    assert p["confirm"] == "true"
    assert p["payment_method"].startswith("pm_double_succeeded")
    assert p["amount"] == "2000", "pack_600's price_cents"
    assert p["currency"] == "usd"
    assert p["metadata[user_id]"] == str(user)
    assert p["metadata[product]"] == "pack_600"
    [(n, status, intent_id, _)] = top_ups(db, user)
    assert (n, status) == (1, "charged")
    top_up_id = scalar(db, "select id from billing.auto_top_ups where user_id = %s", [str(user)])
    assert charge.idempotency_key == f"tb-auto-top-up-{top_up_id}", "one key per crossing"
    assert notifications(db, user) == ["auto_top_up_charged"]
    assert account(db, user)["balance"] == THRESHOLD, (
        "nothing should be credited before Stripe says"
    )

    intent = stripe_double.state.sessions[intent_id]
    event = succeeded_event(intent, "evt_topup_1")
    with TestClient(create_app(settings)) as client:
        first = post_webhook(client, event)
        again = post_webhook(client, event)
        other_copy = post_webhook(client, {**event, "id": "evt_topup_1b"})
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "applied"
    assert again.json()["status"] == "duplicate"
    assert other_copy.json()["status"] == "duplicate", "one payment should credit once"
    assert account(db, user)["balance"] == THRESHOLD + 600
    assert (
        scalar(
            db,
            "select count(*) from billing.ledger_entries where user_id = %s and kind = 'purchase'",
            [str(user)],
        )
        == 1
    )

    [again_counts] = asyncio.run(run_workers(settings))
    assert again_counts.top_ups_charged == 0
    assert len(stripe_double.posts("/v1/payment_intents")) == 1, (
        "a second run should charge nothing"
    )


def test_a_webhook_that_overtakes_the_record_should_credit_when_recorded(
    db: Database, stripe_double: StripeDouble
) -> None:
    user = pro_user(db, stripe_double)
    deduct(db, user, 200, "use-1")
    settings = worker_settings(db, stripe_double)
    # What the worker does, with the webhook in between: the charge, then Stripe's event, then
    # the service's record of the intent.
    with db.connect() as conn:
        claimed = conn.execute(
            "select id, amount_cents, currency, stripe_customer_id, idempotency_key "
            "from public.claim_auto_top_ups()"
        ).fetchone()
    assert claimed is not None
    top_up_id, amount, currency, customer, key = claimed
    method = stripe_double.state.customers[customer]["invoice_settings"]["default_payment_method"]
    intent = httpx.post(
        f"{stripe_double.url}/v1/payment_intents",
        data={
            "amount": str(amount),
            "currency": currency,
            "customer": customer,
            "payment_method": method,
            "off_session": "true",
            "confirm": "true",
            "metadata[user_id]": str(user),
            "metadata[product]": "pack_600",
            "metadata[quantity]": "1",
            "metadata[token_billing_auto_top_up]": str(top_up_id),
        },
        headers={
            "Authorization": f"Bearer {settings.stripe_secret_key.get_secret_value()}",
            "Idempotency-Key": key,
        },
    ).json()
    with TestClient(create_app(settings)) as client:
        early = post_webhook(client, succeeded_event(intent, "evt_topup_early"))
    assert early.json()["status"] == "parked", early.text
    assert account(db, user)["balance"] == 4900

    with db.connect() as conn:
        conn.execute(
            "select * from public.finish_auto_top_up(%s, 'succeeded', %s::jsonb)",
            [top_up_id, json.dumps(intent)],
        )
    assert account(db, user)["balance"] == 4900 + 600, "recording the intent should heal its event"
    assert scalar(db, "select status from billing.stripe_events where id = 'evt_topup_early'") == (
        "applied"
    )


@pytest.mark.parametrize(
    ("card", "outcome", "reason"),
    [
        ("card_declined", "failed", "generic_decline"),
        ("authentication_required", "requires_action", "authentication_required"),
    ],
)
def test_a_declined_or_sca_top_up_should_turn_auto_top_up_off_and_notify(
    db: Database, stripe_double: StripeDouble, card: str, outcome: str, reason: str
) -> None:
    user = pro_user(db, stripe_double, card)
    deduct(db, user, 100, "use-1")
    settings = worker_settings(db, stripe_double)

    [counts] = asyncio.run(run_workers(settings))

    assert counts.top_ups_failed == 1, counts
    [(n, status, _, detail)] = top_ups(db, user)
    assert (n, status, detail) == (1, outcome, reason)
    assert (
        scalar(
            db,
            "select enabled from billing.auto_top_up_preferences where user_id = %s",
            [str(user)],
        )
        is False
    )
    assert notifications(db, user) == ["auto_top_up_failed"]
    assert account(db, user)["balance"] == THRESHOLD, "a failed charge should credit nothing"
    # The next crossing buys nothing while auto top-up is off.
    with db.connect() as conn:
        conn.execute("select public.add_tokens(%s, 1000, %s)", [str(user), f"refill-{user}"])
    deduct(db, user, 1000, "use-2")
    asyncio.run(run_workers(settings))
    assert len(top_ups(db, user)) == 1
    assert len(stripe_double.posts("/v1/payment_intents")) == 1


def test_a_customer_without_a_saved_card_should_fail_without_a_charge(
    db: Database, stripe_double: StripeDouble
) -> None:
    user = pro_user(db, stripe_double, card=None)
    deduct(db, user, 100, "use-1")
    [counts] = asyncio.run(run_workers(worker_settings(db, stripe_double)))
    assert counts.top_ups_failed == 1
    assert top_ups(db, user)[0][1:] == ("failed", None, "no saved payment method")
    assert stripe_double.posts("/v1/payment_intents") == []


def test_concurrent_crossings_and_workers_should_charge_once(
    db: Database, stripe_double: StripeDouble
) -> None:
    user = pro_user(db, stripe_double)
    # Eight deducts at once, each enough to cross the threshold from where it starts.
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda n: deduct(db, user, 150, f"race-{n}"), range(8)))
    assert all(status == "applied" for status, _ in results)
    assert len(top_ups(db, user)) == 1, "one crossing should raise one request"

    counts = asyncio.run(run_workers(worker_settings(db, stripe_double), count=3))

    assert sum(c.top_ups_charged for c in counts) == 1, counts
    assert len(stripe_double.posts("/v1/payment_intents")) == 1, "three workers, one charge"


def test_a_stripe_failure_should_retry_later_with_the_same_key(
    db: Database, stripe_double: StripeDouble
) -> None:
    user = pro_user(db, stripe_double)
    deduct(db, user, 100, "use-1")
    settings = worker_settings(db, stripe_double)
    stripe_double.fail_next(500, count=2, path="/v1/payment_intents")

    [first] = asyncio.run(run_workers(settings))
    assert first.top_ups_retried == 1, first
    assert top_ups(db, user)[0][1] == "pending"
    # The lease runs out (here: at once), and the next run charges with the same key.
    with db.connect() as conn:
        conn.execute(
            "update billing.auto_top_ups set locked_until = now() where user_id = %s", [str(user)]
        )
    [second] = asyncio.run(run_workers(settings))

    assert second.top_ups_charged == 1, second
    keys = {r.idempotency_key for r in stripe_double.posts("/v1/payment_intents")}
    assert len(keys) == 1, "every attempt should carry the crossing's one key"
    assert top_ups(db, user)[0][1] == "charged"
