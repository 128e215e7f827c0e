"""The marketplace end to end: a creator onboards (Stripe Connect Express), lists an agent, a user
buys it (a destination charge: the platform's fee, the rest to the creator), spends tokens on it
(the creator's revenue share), refunds and disputes take back exactly the creator's share, and a
payout run pays each creator once.

Every request the service and the CLI make reaches the local Stripe double (tests/stripe_double.py)
and is asserted: path, amounts, fee, destination, Idempotency-Key. Every webhook is signed with a
real HMAC and starts from a vendored Stripe payload (tests/fixtures/stripe), derived where the
marketplace needs other values (tests/stripe_fixtures.derive records each change).
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import (
    APP_URL,
    JWT_SECRET,
    STRIPE_KEY,
    WEBHOOK_SECRET,
    bearer,
    derived_checkout_event,
    encode,
    new_user,
    record_sale,
    scalar,
    settings_for,
    sign,
)
from tests.stripe_double import StripeDouble
from tests.stripe_fixtures import StripeEvent, account_updated, derive, fixture_event
from token_billing.cli import main
from token_billing.server.app import create_app

WEBHOOK = "/v1/webhooks/stripe"
REFUND = "openapi-fixtures3/refund.json"
DISPUTE = "stripe-ruby-mock-webhook_fixtures/charge.dispute.created.json"
CHECKOUT = "stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json"
CHARGE_REFUNDED = "stripe-ruby-mock-webhook_fixtures/charge.refunded.json"
EVENT = "openapi-fixtures3/event.json"
TOKEN_VALUE = 3_333_333  # billing.settings.creator_token_value_microcents, the default


@pytest.fixture
def double() -> Iterator[StripeDouble]:
    with StripeDouble() as d:
        yield d


@pytest.fixture
def client(db: Database, double: StripeDouble) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(db, stripe_url=double.url))) as c:
        yield c


@pytest.fixture
def cli_env(
    db: Database, double: StripeDouble, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in {
        "ENVIRONMENT": "test",
        "DATABASE_URL": db.dsn(),
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_API_BASE": double.url,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "STRIPE_TIMEOUT_SECONDS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)


_counter = iter(range(1, 1_000_000))


def deliver(client: TestClient, event: StripeEvent) -> dict[str, Any]:
    payload = encode(event.payload)
    response = client.post(
        WEBHOOK,
        content=payload,
        headers={"Content-Type": "application/json", "Stripe-Signature": sign(payload)},
    )
    assert response.status_code == 200, (str(event), response.text)
    body: dict[str, Any] = response.json()
    return body


def event_detail(db: Database, event: StripeEvent) -> tuple[str, str]:
    with db.connect() as conn:
        row = conn.execute(
            "select status, detail from billing.stripe_events where id = %s", [event.id]
        ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def onboarded_creator(
    db: Database, client: TestClient, double: StripeDouble, *, payouts: bool = True
) -> tuple[uuid.UUID, str]:
    creator = new_user(db)
    response = client.post("/v1/creators/onboard", headers=bearer(creator))
    assert response.status_code == 201, response.text
    account_id = str(response.json()["stripe_account_id"])
    assert (
        deliver(
            client,
            account_updated(account_id, charges=True, payouts=payouts, created=1_800_000_000),
        )["status"]
        == "applied"
    )
    return creator, account_id


def list_agent(client: TestClient, creator: uuid.UUID, code: str, **body: Any) -> Any:
    return client.post(
        "/v1/creators/listings",
        json={"code": code, "name": code.replace("_", " ").title(), **body},
        headers=bearer(creator),
    )


def paid_session_event(session_id: str, buyer: uuid.UUID, code: str, amount: int) -> StripeEvent:
    """stripe-ruby-mock's real checkout.session.completed (payment mode, paid), for this sale."""
    return derive(
        fixture_event(CHECKOUT),
        event_id=f"evt_sale_{next(_counter)}",
        created=1_800_000_100,
        paths={
            "id": session_id,
            "amount_total": amount,
            "currency": "usd",
            "client_reference_id": str(buyer),
            "metadata": {"user_id": str(buyer), "product": code, "quantity": "1"},
            "payment_intent": f"pi_sale{next(_counter)}",
        },
    )


def refund_event(
    refund_id: str,
    intent: str,
    amount: int,
    *,
    status: str = "succeeded",
    reversal: str | None = None,
    created: int = 1_800_000_200,
    event_type: str = "refund.created",
) -> StripeEvent:
    """The openapi fixture's refund object as a refund.* event of this sale's payment intent."""
    return derive(
        fixture_event(REFUND, event_type),
        event_id=f"evt_refund_{next(_counter)}",
        created=created,
        paths={
            "id": refund_id,
            "amount": amount,
            "payment_intent": intent,
            "status": status,
            "transfer_reversal": reversal,
        },
    )


def dispute_event(
    dispute_id: str, intent: str, amount: int, status: str, created: int, event_type: str
) -> StripeEvent:
    return derive(
        fixture_event(DISPUTE),
        event_id=f"evt_dispute_{next(_counter)}",
        event_type=event_type,
        created=created,
        paths={"id": dispute_id, "amount": amount, "payment_intent": intent, "status": status},
    )


def earnings(db: Database, creator: uuid.UUID) -> list[tuple[str, int]]:
    with db.connect() as conn:
        rows = conn.execute(
            "select kind, amount_microcents from billing.creator_earnings where creator_id = %s "
            "order by id",
            [str(creator)],
        ).fetchall()
    return [(str(k), int(a)) for k, a in rows]


def balance_microcents(db: Database, creator: uuid.UUID) -> int:
    return int(
        scalar(
            db,
            "select coalesce(sum(amount_microcents), 0) from billing.creator_earnings "
            "where creator_id = %s",
            [str(creator)],
        )
    )


def buy(
    db: Database, client: TestClient, double: StripeDouble, buyer: uuid.UUID, code: str
) -> tuple[str, StripeEvent]:
    """Checkout for an agent, then its paid event delivered; (session id, the event)."""
    response = client.post("/v1/checkout/sessions", json={"product": code}, headers=bearer(buyer))
    assert response.status_code == 201, response.text
    session_id = str(response.json()["id"])
    session = double.state.sessions[session_id]
    event = paid_session_event(session_id, buyer, code, int(session["amount_total"]))
    assert deliver(client, event)["status"] == "applied"
    return session_id, event


# --- onboarding, account.updated, listings -------------------------------------------------------


def test_a_creator_should_onboard_once_and_list_only_with_charges_enabled(
    db: Database, client: TestClient, double: StripeDouble
) -> None:
    creator = new_user(db)
    first = client.post("/v1/creators/onboard", headers=bearer(creator))
    assert first.status_code == 201, first.text
    account_id = first.json()["stripe_account_id"]
    assert first.json()["charges_enabled"] is False
    accounts = double.posts("/v1/accounts")
    assert [r.path for r in accounts] == ["/v1/accounts"], "one account, then one link"
    made = accounts[0]
    assert made.params["type"] == "express"
    assert made.params["metadata[user_id]"] == str(creator)
    assert made.params["capabilities[transfers][requested]"] == "true"
    assert made.params["capabilities[card_payments][requested]"] == "true"
    assert made.idempotency_key is not None
    assert made.idempotency_key.startswith("tb-creator-account-")
    link = double.posts("/v1/account_links")[0]
    assert link.params == {
        "account": account_id,
        "refresh_url": f"{APP_URL}/?creator=refresh",
        "return_url": f"{APP_URL}/?creator=onboarded",
        "type": "account_onboarding",
    }
    assert first.json()["url"].startswith("https://connect.stripe.com/setup/")

    # Again (the link expired): the same account, a new link; no second account.
    double.clear()
    again = client.post("/v1/creators/onboard", headers=bearer(creator))
    assert again.status_code == 201
    assert again.json()["stripe_account_id"] == account_id
    assert [r.path for r in double.posts()] == ["/v1/account_links"]

    # Not charges_enabled yet: no listing, no dashboard.
    refused = list_agent(client, creator, "agent_early", price_cents=1999)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "listing_unavailable"
    assert (
        client.post("/v1/creators/dashboard", headers=bearer(creator)).json()["error"]["code"]
        == "onboarding_incomplete"
    )

    # account.updated (signed, the Connect endpoint's event): the state as Stripe says.
    enabled = account_updated(
        account_id,
        charges=True,
        payouts=False,
        created=1_800_000_000,
        requirements={
            "currently_due": ["external_account", "tos_acceptance.date"],
            "past_due": ["tos_acceptance.date"],
            "disabled_reason": "requirements.past_due",
        },
    )
    assert deliver(client, enabled)["status"] == "applied"
    assert (
        scalar(
            db,
            "select (charges_enabled, payouts_enabled, details_submitted)::text "
            "from billing.creators where user_id = %s",
            [str(creator)],
        )
        == "(t,f,t)"
    )
    summary = client.get("/v1/creators/me", headers=bearer(creator)).json()
    assert summary["requirements_due"] == ["tos_acceptance.date", "external_account"], (
        "what Stripe needs should be past due first, each once"
    )
    assert summary["disabled_reason"] == "requirements.past_due"
    assert summary["deauthorized_at"] is None
    assert summary["recent_earnings"] == []
    # An older event of the account is stale; another platform's account is ignored.
    older = account_updated(account_id, charges=False, payouts=False, created=1_799_999_999)
    assert deliver(client, older)["status"] == "stale"
    assert scalar(
        db, "select charges_enabled from billing.creators where user_id = %s", [str(creator)]
    )
    stranger = account_updated("acct_1NotOurs", charges=True, payouts=True, created=1_800_000_001)
    assert deliver(client, stranger)["status"] == "ignored"
    assert "not bill for" in event_detail(db, stranger)[1]

    listed = list_agent(client, creator, "agent_writer", price_cents=1999, tokens_per_run=7)
    assert listed.status_code == 201, listed.text
    assert listed.json() == {"status": "applied", "code": "agent_writer"}
    assert (
        list_agent(client, creator, "agent_writer", price_cents=1999, tokens_per_run=7).json()[
            "status"
        ]
        == "duplicate"
    )
    other = new_user(db)
    taken = list_agent(client, other, "agent_writer", price_cents=500)
    assert taken.status_code == 409, "someone who is not a creator cannot take a listing"
    catalog = client.get("/v1/listings").json()["listings"]
    assert [
        (item["code"], item["price_cents"], item["tokens_per_run"], item["purchasable"])
        for item in catalog
    ] == [("agent_writer", 1999, 7, True)]
    assert "agent_writer" not in [p["code"] for p in client.get("/v1/products").json()["products"]]

    dashboard = client.post("/v1/creators/dashboard", headers=bearer(creator))
    assert dashboard.status_code == 201, dashboard.text
    login = double.posts(f"/v1/accounts/{account_id}/login_links")
    assert len(login) == 1
    assert login[0].idempotency_key

    # Stripe disables charges: the listing can no longer be bought.
    disabled = account_updated(account_id, charges=False, payouts=False, created=1_800_000_002)
    assert deliver(client, disabled)["status"] == "applied"
    buyer = new_user(db)
    blocked = client.post(
        "/v1/checkout/sessions", json={"product": "agent_writer"}, headers=bearer(buyer)
    )
    assert blocked.status_code == 409, blocked.text
    assert blocked.json()["error"]["code"] == "listing_unavailable"
    assert not double.posts("/v1/checkout/sessions"), "nothing should be asked of Stripe"

    # Deauthorized (account.application.deauthorized: data.object is the application).
    deauthorized = derive(
        fixture_event(EVENT),
        event_id=f"evt_deauth_{next(_counter)}",
        event_type="account.application.deauthorized",
        created=1_800_000_003,
        patch={"object": "application", "id": "ca_test_platform", "name": "token-billing"},
    )
    deauthorized.payload["account"] = account_id
    assert deliver(client, deauthorized)["status"] == "applied"
    assert scalar(
        db,
        "select deauthorized_at is not null from billing.creators where user_id = %s",
        [str(creator)],
    )
    # A known creator's other events stay ignored (its owner wrote them).
    foreign = derive(paid_session_event("cs_test_foreign", buyer, "agent_writer", 1999))
    foreign.payload["account"] = account_id
    assert deliver(client, foreign)["status"] == "ignored"
    assert "only account.updated" in event_detail(db, foreign)[1]


# --- a sale, refunds, a dispute ------------------------------------------------------------------


def test_a_sale_should_split_the_payment_exactly_and_refunds_take_back_the_creators_share(
    db: Database,
    client: TestClient,
    double: StripeDouble,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    creator, account_id = onboarded_creator(db, client, double)
    assert list_agent(client, creator, "agent_sale", price_cents=1999).status_code == 201
    buyer = new_user(db)

    response = client.post(
        "/v1/checkout/sessions",
        json={"product": "agent_sale"},
        headers={**bearer(buyer), "Idempotency-Key": "buy-1"},
    )
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    sent = double.posts("/v1/checkout/sessions")
    assert len(sent) == 1
    params = sent[0].params
    # 20% of 1999 is 399.8: the fee is rounded down, the creator gets the fraction.
    assert params["payment_intent_data[application_fee_amount]"] == "399"
    assert params["payment_intent_data[transfer_data][destination]"] == account_id
    assert params["payment_intent_data[metadata][product]"] == "agent_sale"
    assert params["line_items[0][price_data][unit_amount]"] == "1999"
    assert params["line_items[0][price_data][currency]"] == "usd"
    assert params["line_items[0][quantity]"] == "1"
    assert params["mode"] == "payment"
    assert params["metadata[user_id]"] == str(buyer)
    assert sent[0].idempotency_key
    assert sent[0].idempotency_key.startswith("tb-checkout-")
    with db.connect() as conn:
        sale = conn.execute(
            "select amount_cents, application_fee_cents, commission_bps, stripe_account_id, status "
            "from billing.marketplace_sales where id = %s",
            [session_id],
        ).fetchone()
    assert sale == (1999, 399, 2000, account_id, "open")

    paid = paid_session_event(session_id, buyer, "agent_sale", 1999)
    assert deliver(client, paid)["status"] == "applied"
    assert "platform fee 399, 1600 to creator" in event_detail(db, paid)[1]
    again = derive(paid, event_id=f"evt_again_{next(_counter)}")
    assert deliver(client, again)["status"] == "duplicate"
    assert deliver(client, paid)["status"] == "duplicate"
    assert (
        scalar(db, "select count(*) from billing.entitlements where user_id = %s", [str(buyer)])
        == 1
    )
    owned = client.post(
        "/v1/checkout/sessions", json={"product": "agent_sale"}, headers=bearer(buyer)
    )
    assert owned.status_code == 409
    assert owned.json()["error"]["code"] == "already_owned"
    with db.as_user(buyer) as conn:
        mine = conn.execute("select product_code, revoked_at from public.my_agents()").fetchall()
    assert mine == [("agent_sale", None)]

    # The refund command: reverse_transfer and refund_application_fee, one refund per request.
    intent = paid.object["payment_intent"]
    double.clear()
    assert main(["creators", "refund", session_id, "--amount", "1000"]) == 0
    refunds = double.posts("/v1/refunds")
    assert len(refunds) == 1
    assert refunds[0].params == {
        "payment_intent": intent,
        "amount": "1000",
        "reverse_transfer": "true",
        "refund_application_fee": "true",
        "metadata[sale_id]": session_id,
    }
    assert refunds[0].idempotency_key
    made = next(iter(double.state.refunds.values()))
    assert made["transfer_reversal"], "the double reverses the transfer when asked"
    through_stripe = refund_event(made["id"], intent, 1000, reversal=made["transfer_reversal"])
    assert deliver(client, through_stripe)["status"] == "applied"
    assert earnings(db, creator) == [], "Stripe took the creator's share back: nothing owed"

    # A Dashboard refund of the rest without reversing the transfer: the creator's share,
    # 999 - floor(399 x 999 / 1999) = 999 - 199 = 800 cents, comes from the earnings (a debt).
    dashboard = refund_event("re_dashboard1", intent, 999, created=1_800_000_300)
    assert deliver(client, dashboard)["status"] == "applied"
    assert earnings(db, creator) == [("debt", -800_000_000)]
    assert (
        scalar(
            db, "select revoked_reason from billing.entitlements where sale_id = %s", [session_id]
        )
        == "refunded"
    )
    # Redelivered: nothing more. It fails later: the share and the agent come back.
    assert deliver(client, dashboard)["status"] == "duplicate"
    failed = refund_event(
        "re_dashboard1",
        intent,
        999,
        status="failed",
        created=1_800_000_400,
        event_type="refund.failed",
    )
    assert deliver(client, failed)["status"] == "applied"
    assert earnings(db, creator) == [("debt", -800_000_000), ("sale_refund_reversed", 800_000_000)]
    assert balance_microcents(db, creator) == 0
    assert (
        scalar(db, "select revoked_at from billing.entitlements where sale_id = %s", [session_id])
        is None
    )
    # An older event of that refund changes nothing.
    late = refund_event(
        "re_dashboard1", intent, 999, created=1_800_000_350, event_type="refund.updated"
    )
    assert deliver(client, late)["status"] == "applied"
    assert balance_microcents(db, creator) == 0


def test_a_dispute_should_hold_the_creators_share_until_it_is_won(
    db: Database, client: TestClient, double: StripeDouble
) -> None:
    creator, _ = onboarded_creator(db, client, double)
    assert list_agent(client, creator, "agent_disputed", price_cents=2500).status_code == 201
    buyer = new_user(db)
    session_id, paid = buy(db, client, double, buyer, "agent_disputed")
    intent = paid.object["payment_intent"]
    # fee floor(2500 x 0.2) = 500; the creator's share of a 2500 dispute: 2500 - 500 = 2000.
    opened = dispute_event(
        "dp_market1", intent, 2500, "needs_response", 1_800_000_500, "charge.dispute.created"
    )
    assert deliver(client, opened)["status"] == "applied"
    assert earnings(db, creator) == [("debt", -2_000_000_000)]
    # An inquiry-era event older than it: stale. Won: the share comes back, the agent stays.
    stale = dispute_event(
        "dp_market1",
        intent,
        2500,
        "warning_needs_response",
        1_800_000_400,
        "charge.dispute.updated",
    )
    assert deliver(client, stale)["status"] == "stale"
    won = dispute_event("dp_market1", intent, 2500, "won", 1_800_000_600, "charge.dispute.closed")
    assert deliver(client, won)["status"] == "applied"
    assert balance_microcents(db, creator) == 0
    assert (
        scalar(db, "select revoked_at from billing.entitlements where sale_id = %s", [session_id])
        is None
    )

    # Another sale, lost: the share stays taken and the agent is revoked.
    other = new_user(db)
    second, paid2 = buy(db, client, double, other, "agent_disputed")
    intent2 = paid2.object["payment_intent"]
    lost = dispute_event(
        "dp_market2", intent2, 2500, "lost", 1_800_000_700, "charge.dispute.closed"
    )
    assert deliver(client, lost)["status"] == "applied"
    assert balance_microcents(db, creator) == -2_000_000_000
    assert scalar(
        db, "select revoked_reason from billing.entitlements where sale_id = %s", [second]
    ) == ("dispute lost")


def test_an_agent_paid_before_recorded_events_should_park_and_heal(
    db: Database, client: TestClient, double: StripeDouble
) -> None:
    """A refund delivered before its sale's paid event parks, and heals when the sale is paid."""
    creator, _ = onboarded_creator(db, client, double)
    assert list_agent(client, creator, "agent_early_refund", price_cents=1000).status_code == 201
    buyer = new_user(db)
    response = client.post(
        "/v1/checkout/sessions", json={"product": "agent_early_refund"}, headers=bearer(buyer)
    )
    session_id = response.json()["id"]
    paid = paid_session_event(session_id, buyer, "agent_early_refund", 1000)
    early = refund_event("re_early1", paid.object["payment_intent"], 1000, created=1_800_000_050)
    assert deliver(client, early)["status"] == "parked"
    assert deliver(client, paid)["status"] == "applied"
    assert event_detail(db, early)[0] == "applied"
    # fee 200; the creator's share of the full refund: 1000 - 200 = 800.
    assert earnings(db, creator) == [("debt", -800_000_000)]
    assert (
        scalar(
            db, "select revoked_reason from billing.entitlements where sale_id = %s", [session_id]
        )
        == "refunded"
    )


# --- the usage revenue share ---------------------------------------------------------------------


def test_tokens_spent_on_an_agent_should_earn_the_creator_an_exact_share(
    db: Database, client: TestClient, double: StripeDouble
) -> None:
    creator, _ = onboarded_creator(db, client, double)
    assert list_agent(client, creator, "agent_runs", tokens_per_run=7).status_code == 201
    user = new_user(db)
    with db.as_service_role() as conn:
        for n in range(3):
            row = conn.execute(
                "select status from public.deduct_tokens(%s, 7, %s, 'run', %s)",
                [str(user), f"run-{n}", Jsonb({"listing": "agent_runs"})],
            ).fetchone()
            assert row == ("applied",)
        # A retry of a run: duplicate, no second share.
        assert conn.execute(
            "select status from public.deduct_tokens(%s, 7, 'run-0', 'run', %s)",
            [str(user), Jsonb({"listing": "agent_runs"})],
        ).fetchone() == ("duplicate",)
        # A deduct that names no listing earns nobody anything.
        conn.execute("select * from public.deduct_tokens(%s, 5, 'plain', 'plain')", [str(user)])
        # A listing that does not exist: refused, nothing charged.
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not an agent"):
            conn.execute(
                "select * from public.deduct_tokens(%s, 5, 'bad', 'x', %s)",
                [str(user), Jsonb({"listing": "pack_100"})],
            )
    # floor(7 x 3333333 x 8000 / 10000) = floor(18666664.8) = 18666664 micro-cents a run.
    assert earnings(db, creator) == [("usage_share", 18_666_664)] * 3
    assert (
        scalar(db, "select balance from billing.accounts where user_id = %s", [str(user)])
        == 100 - 21 - 5
    )

    # A per-creator commission (15%) applies from then on.
    with db.connect() as conn:
        conn.execute(
            "update billing.creators set commission_bps = 1500 where user_id = %s", [str(creator)]
        )
    with db.as_service_role() as conn:
        conn.execute(
            "select * from public.deduct_tokens(%s, 7, 'run-3', 'run', %s)",
            [str(user), Jsonb({"listing": "agent_runs"})],
        )
        # record_usage: an item whose dimensions name the listing (gpt-4o output: 800 -> 8 tokens).
        row = conn.execute(
            "select status, tokens from public.record_usage(%s, %s, 'call-1')",
            [
                str(user),
                Jsonb(
                    [
                        {
                            "meter": "llm.output_tokens",
                            "quantity": 800,
                            "dimensions": {"model": "gpt-4o", "listing": "agent_runs"},
                        }
                    ]
                ),
            ],
        ).fetchone()
        assert row == ("applied", 8)
    # floor(7 x 3333333 x 8500 / 10000) = 19833331; floor(8 x 3333333 x 0.85) = 22666664.
    assert earnings(db, creator)[3:] == [("usage_share", 19_833_331), ("usage_share", 22_666_664)]
    assert balance_microcents(db, creator) == 3 * 18_666_664 + 19_833_331 + 22_666_664

    with db.as_user(creator) as conn:
        mine = conn.execute(
            "select kind, amount_microcents, balance_microcents from public.my_creator_earnings()"
        ).fetchall()
        mine_full = conn.execute(
            "select kind, amount_microcents, balance_microcents, tokens "
            "from public.my_creator_earnings()"
        ).fetchall()
    assert mine[0] == ("usage_share", 22_666_664, balance_microcents(db, creator))
    assert len(mine) == 5
    with db.as_user(creator) as conn:
        latest = conn.execute(
            "select kind, amount_microcents, balance_microcents from public.my_creator_earnings(2)"
        ).fetchall()
    assert latest == mine[:2], "a limit should keep the newest entries and their balances"
    with db.as_user(user) as conn:
        assert conn.execute("select count(*) from public.my_creator_earnings()").fetchone() == (0,)
    summary = client.get("/v1/creators/me", headers=bearer(creator)).json()
    assert summary["balance_microcents"] == balance_microcents(db, creator)
    assert [
        (e["kind"], e["amount_microcents"], e["balance_microcents"], e["tokens"])
        for e in summary["recent_earnings"]
    ] == [tuple(row) for row in mine_full], (
        "the summary should carry the entries my_creator_earnings() shows the creator"
    )
    assert summary["recent_earnings"][0]["product_code"] == "agent_runs"
    assert summary["requirements_due"] == []
    assert summary["earned_microcents"] == balance_microcents(db, creator)
    assert summary["commission_bps"] == 1500
    assert client.get("/v1/creators/me", headers=bearer(user)).status_code == 404


def test_every_writer_of_usage_should_accrue_the_creators_share_once(
    db: Database, client: TestClient, double: StripeDouble
) -> None:
    """deduct_tokens_batch (one statement, and item by item) and a plan's overage accrue too."""
    creator, _ = onboarded_creator(db, client, double)
    assert list_agent(client, creator, "agent_batched", tokens_per_run=3).status_code == 201
    share = 3 * TOKEN_VALUE * 8000 // 10000  # floor(3 x 3333333 x 0.8) = 7999999
    user, other = new_user(db), new_user(db)
    listing = {"listing": "agent_batched"}

    def item(user_id: uuid.UUID, key: str, metadata: dict[str, str] | None) -> dict[str, Any]:
        return {"user_id": str(user_id), "amount": 3, "idempotency_key": key, "metadata": metadata}

    def batch(conn: psycopg.Connection[Any], items: list[dict[str, Any]]) -> list[str]:
        rows = conn.execute(
            "select status from public.deduct_tokens_batch(%s) order by item", [Jsonb(items)]
        ).fetchall()
        return [str(r[0]) for r in rows]

    with db.as_service_role() as conn:
        # One statement for the whole batch: two items on the listing, one plain.
        assert (
            batch(
                conn,
                [item(user, "b-1", listing), item(other, "b-2", listing), item(user, "b-3", None)],
            )
            == ["applied"] * 3
        )
        # A retried key sends the batch item by item: the retry earns nothing, the new item does.
        assert batch(conn, [item(user, "b-1", listing), item(user, "b-4", listing)]) == [
            "duplicate",
            "applied",
        ]
        # An item naming a listing that is not an agent refuses the whole batch.
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not an agent"):
            batch(conn, [item(user, "b-5", listing), item(other, "b-6", {"listing": "pack_100"})])
    assert earnings(db, creator) == [("usage_share", share)] * 3
    assert (
        scalar(
            db,
            "select count(*) from billing.ledger_entries where idempotency_key in ('b-5', 'b-6')",
        )
        == 0
    ), "a refused batch should charge nothing"

    # A postpaid plan's deduct past zero (billing.debit_overage) earns the creator too.
    with db.connect() as conn:
        conn.execute(
            "update billing.accounts set plan = 'enterprise', subscription_status = 'active' "
            "where user_id = %s",
            [str(other)],
        )
    with db.as_service_role() as conn:
        row = conn.execute(
            "select status, balance from public.deduct_tokens(%s, 3000, 'pp-agent', 'run', %s)",
            [str(other), Jsonb(listing)],
        ).fetchone()
    assert row == ("applied", 100 - 3 - 3000)
    assert earnings(db, creator)[3:] == [("usage_share", 3000 * TOKEN_VALUE * 8000 // 10000)]
    assert (
        scalar(
            db,
            "select count(*) from billing.creator_earnings where idempotency_key = 'ledger:' || "
            "(select id from billing.ledger_entries where idempotency_key = 'pp-agent')::text",
        )
        == 1
    )
    with db.connect() as conn:
        assert conn.execute("select * from billing.check_invariants()").fetchall() == []


def test_earnings_on_tokens_later_refunded_should_be_reversed_with_a_debt_beyond_the_balance(
    db: Database, client: TestClient, double: StripeDouble
) -> None:
    creator, _ = onboarded_creator(db, client, double)
    assert (
        list_agent(client, creator, "agent_refunded_tokens", tokens_per_run=10).status_code == 201
    )
    user = new_user(db)
    pack = derived_checkout_event(user, "pack_100")
    record_sale(db, pack)
    with db.as_service_role() as conn:
        assert conn.execute(
            "select status from public.handle_stripe_event(%s)", [Jsonb(pack)]
        ).fetchone() == ("applied",)
        # 200 tokens (signup + pack); 19 runs of 10 on the agent: 190 spent, 10 left.
        for n in range(19):
            conn.execute(
                "select * from public.deduct_tokens(%s, 10, %s, 'run', %s)",
                [str(user), f"r{n}", Jsonb({"listing": "agent_refunded_tokens"})],
            )
    share = 10 * TOKEN_VALUE * 8000 // 10000  # 26666664 micro-cents a run
    assert balance_microcents(db, creator) == 19 * share
    # The creator was paid most of it already (a payout entry, as a run would write it).
    with db.connect() as conn:
        conn.execute(
            "insert into billing.creator_earnings "
            "(creator_id, kind, amount_microcents, idempotency_key) "
            "values (%s, 'payout', %s, 'test-payout')",
            [str(creator), -(19 * share - 5 * share)],
        )
    # The pack is refunded in full: 100 tokens clawed back, the balance is 10 - 100 = -90, so
    # 90 of the spent tokens had been paid back: 9 runs' shares are reversed, newest first; the
    # balance covers 5 of them, the other 4 are a debt.
    refunded = copy.deepcopy(fixture_event(CHARGE_REFUNDED).payload)
    refunded["id"] = "evt_pack_refunded"
    charge = refunded["data"]["object"]
    charge["payment_intent"] = pack["data"]["object"]["payment_intent"]
    charge["amount"] = charge["amount_captured"] = pack["data"]["object"]["amount_total"]
    charge["amount_refunded"] = pack["data"]["object"]["amount_total"]
    charge["refunds"] = {"object": "list", "data": [], "has_more": False}
    with db.as_service_role() as conn:
        assert conn.execute(
            "select status from public.handle_stripe_event(%s)", [Jsonb(refunded)]
        ).fetchone() == ("applied",)
    assert scalar(db, "select balance from billing.accounts where user_id = %s", [str(user)]) == -90
    kinds = earnings(db, creator)[20:]
    assert kinds == [("usage_share_reversed", -share)] * 5 + [("debt", -share)] * 4
    assert balance_microcents(db, creator) == -4 * share
    latest = client.get("/v1/creators/me", headers=bearer(creator)).json()["recent_earnings"]
    assert [(e["kind"], e["balance_microcents"]) for e in latest[:2]] == [
        ("debt", -4 * share),
        ("debt", -3 * share),
    ], "the latest entries should come newest first, each with the balance after it"
    assert len(latest) == 10, "the summary should carry the latest 10 of the 29 entries"
    assert (
        scalar(
            db,
            "select sum(tokens) from billing.creator_earnings "
            "where creator_id = %s and reverses_id is not null",
            [str(creator)],
        )
        == 90
    )


# --- payouts -------------------------------------------------------------------------------------


def earn(db: Database, creator_code: str, user: uuid.UUID, runs: int, tokens: int) -> None:
    with db.as_service_role() as conn:
        for n in range(runs):
            conn.execute(
                "select * from public.deduct_tokens(%s, %s, %s, 'run', %s)",
                [
                    str(user),
                    tokens,
                    f"{creator_code}-{uuid.uuid4()}-{n}",
                    Jsonb({"listing": creator_code}),
                ],
            )


def test_payouts_should_pay_each_creator_once_across_concurrent_runs_and_timeouts(
    db: Database,
    client: TestClient,
    double: StripeDouble,
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with db.connect() as conn:
        conn.execute(
            "update billing.settings set creator_payout_minimum_cents = 100, "
            "creator_earnings_hold = interval '0'"
        )
    first, first_account = onboarded_creator(db, client, double)
    second, second_account = onboarded_creator(db, client, double)
    unpaid, _ = onboarded_creator(db, client, double, payouts=False)
    for creator, code in ((first, "agent_p1"), (second, "agent_p2"), (unpaid, "agent_p3")):
        assert list_agent(client, creator, code, tokens_per_run=50).status_code == 201
    spender = new_user(db)
    with db.as_service_role() as conn:
        conn.execute("select * from public.add_tokens(%s, 1000, 'topup')", [str(spender)])
    earn(db, "agent_p1", spender, 3, 50)  # 3 x floor(50 x 3333333 x 0.8) = 3 x 133333320
    earn(db, "agent_p2", spender, 1, 50)  # 133333320 micro-cents: 133 cents
    earn(db, "agent_p3", spender, 1, 50)  # payouts_enabled false: not paid
    first_cents = 3 * 133_333_320 // 1_000_000  # 399 cents, 999960 micro-cents stay

    # Dry run: what would be paid, nothing written or sent.
    double.clear()
    assert main(["creators", "payout", "--dry-run", "--period", "2026-12-01"]) == 0
    out = capsys.readouterr().out
    assert "would_pay" in out
    assert f" {first_cents} usd" in out
    assert " 133 usd" in out
    assert not double.posts("/v1/transfers")
    assert scalar(db, "select count(*) from billing.creator_payouts") == 0

    # The first transfer gets no answer (Stripe made it; the client timed out).
    double.drop_answer_next("/v1/transfers")
    assert main(["creators", "payout", "--period", "2026-12-01"]) == 1
    assert "pending" in capsys.readouterr().out
    # Two runs at once retry it: Stripe answers the same transfer for the same key.
    codes: list[int] = []
    runs = [
        threading.Thread(
            target=lambda: codes.append(main(["creators", "payout", "--period", "2026-12-01"]))
        )
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert codes == [0, 0]
    capsys.readouterr()
    transfers = sorted((t["destination"], t["amount"]) for t in double.state.transfers.values())
    assert transfers == sorted([(first_account, first_cents), (second_account, 133)]), (
        "each creator should be paid exactly once"
    )
    keys = {r.idempotency_key for r in double.posts("/v1/transfers")}
    assert keys == {f"creator-payout:{first}:2026-12-01", f"creator-payout:{second}:2026-12-01"}
    for request in double.posts("/v1/transfers"):
        assert request.params["currency"] == "usd"
        assert request.params["metadata[period]"] == "2026-12-01"
    with db.connect() as conn:
        payouts = conn.execute(
            "select creator_id, amount_cents, status from billing.creator_payouts "
            "order by amount_cents"
        ).fetchall()
    assert payouts == [(second, 133, "paid"), (first, first_cents, "paid")]
    assert balance_microcents(db, first) == 3 * 133_333_320 - first_cents * 1_000_000 == 999_960
    # The same period again: nothing new.
    double.clear()
    assert main(["creators", "payout", "--period", "2026-12-01"]) == 0
    assert not double.posts("/v1/transfers")

    # Stripe reverses the first creator's transfer in part: the reversed cents come back.
    transfer = next(t for t in double.state.transfers.values() if t["destination"] == first_account)
    reversed_event = derive(
        fixture_event(EVENT),
        event_id="evt_transfer_reversed",
        event_type="transfer.reversed",
        created=1_800_001_000,
        patch={**transfer, "object": "transfer", "amount_reversed": 100, "reversed": False},
    )
    assert deliver(client, reversed_event)["status"] == "applied"
    assert (
        deliver(client, derive(reversed_event, event_id="evt_transfer_reversed_again"))["status"]
        == "duplicate"
    )
    assert balance_microcents(db, first) == 999_960 + 100_000_000

    # A transfer Stripe refuses: the payout fails and its money returns to the balance.
    earn(db, "agent_p2", spender, 2, 50)
    double.fail_next(
        400, count=2, error_type="invalid_request_error", message="No funds", path="/v1/transfers"
    )
    assert main(["creators", "payout", "--period", "2026-12-02"]) == 1
    capsys.readouterr()
    with db.connect() as conn:
        failed = conn.execute(
            "select creator_id, status from billing.creator_payouts where period = '2026-12-02' "
            "order by status"
        ).fetchall()
    assert (second, "failed") in failed
    assert balance_microcents(db, second) == 3 * 133_333_320 - 133_000_000

    # The creator sees the payouts through RLS, and nobody else does.
    with db.as_user(first) as conn:
        paid_rows = conn.execute(
            "select amount_cents, status, reversed_cents from public.my_creator_payouts() "
            "where status = 'paid'"
        ).fetchall()
    assert paid_rows == [(first_cents, "paid", 100)]
    with db.as_user(spender) as conn:
        assert conn.execute("select count(*) from billing.creator_payouts").fetchone() == (0,)
