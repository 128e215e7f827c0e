"""Checkout and billing portal: the stripe library talking to a local double of Stripe.

What reaches "Stripe" is asserted from the double's record of each request: method, path,
form parameters and Idempotency-Key headers.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import (
    APP_URL,
    PACK_PRICE,
    PLAN_PRICE,
    STRIPE_KEY,
    bearer,
    metrics_text,
    new_user,
    put_product,
    scalar,
    settings_for,
)
from tests.stripe_double import StripeDouble
from token_billing.server.app import create_app

CHECKOUT = "/v1/checkout/sessions"
PORTAL = "/v1/portal/sessions"


@pytest.fixture
def stripe_double() -> Iterator[StripeDouble]:
    with StripeDouble() as double:
        double.add_price(PACK_PRICE, unit_amount=500, currency="usd")
        double.add_price(
            PLAN_PRICE, unit_amount=2900, currency="usd", recurring={"interval": "month"}
        )
        yield double


@pytest.fixture
def priced(db: Database) -> Database:
    """The seeded catalog with Stripe prices for pack_100 and starter."""
    put_product(db, "pack_100", tokens=100, price_cents=500, stripe_price_id=PACK_PRICE)
    put_product(
        db, "starter", kind="plan", tokens=5000, price_cents=2900, stripe_price_id=PLAN_PRICE
    )
    return db


@pytest.fixture
def client(priced: Database, stripe_double: StripeDouble) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(priced, stripe_url=stripe_double.url))) as c:
        yield c


def customer_of(db: Database, user: uuid.UUID) -> str | None:
    value = scalar(
        db, "select stripe_customer_id from billing.customers where user_id = %s", [str(user)]
    )
    return None if value is None else str(value)


def checkout(client: TestClient, user: uuid.UUID, **body: Any) -> Any:
    return client.post(CHECKOUT, json=body, headers=bearer(user))


# --- the happy paths ----------------------------------------------------------------------------


def test_pack_checkout_should_create_customer_then_payment_session(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)

    response = checkout(client, user, product="pack_100", quantity=3)

    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "url"}
    assert body["url"].startswith("https://checkout.stripe.com/")
    customer_post, session_post = stripe_double.posts()
    assert customer_post.path == "/v1/customers"
    assert customer_post.params["metadata[user_id]"] == str(user)
    assert customer_post.params["email"] == f"{user}@example.com"
    assert customer_post.idempotency_key, "customer creation should carry an Idempotency-Key"
    assert customer_post.authorization == f"Bearer {STRIPE_KEY}"
    customer_id = stripe_double.state.customers.popitem()[0]
    assert customer_of(priced, user) == customer_id, "the customer should be stored before checkout"

    assert session_post.path == "/v1/checkout/sessions"
    p = session_post.params
    assert p["mode"] == "payment"
    assert p["customer"] == customer_id
    assert p["line_items[0][price]"] == PACK_PRICE
    assert p["line_items[0][quantity]"] == "3"
    assert p["client_reference_id"] == str(user)
    assert p["metadata[user_id]"] == str(user)
    assert p["metadata[product]"] == "pack_100"
    assert p["metadata[quantity]"] == "3"
    assert p["payment_intent_data[metadata][user_id]"] == str(user)
    assert p["success_url"].startswith(f"{APP_URL}/billing/success")
    assert "{CHECKOUT_SESSION_ID}" in p["success_url"]
    assert p["cancel_url"] == f"{APP_URL}/billing/cancel"
    assert not any(key.startswith("subscription_data") for key in p)
    assert session_post.idempotency_key
    assert session_post.idempotency_key != customer_post.idempotency_key
    assert body["id"] in stripe_double.state.sessions


def test_plan_checkout_should_be_a_subscription_with_metadata(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)

    response = checkout(client, user, product="starter")

    assert response.status_code == 201, response.text
    p = stripe_double.posts("/v1/checkout/sessions")[0].params
    assert p["mode"] == "subscription"
    assert p["line_items[0][price]"] == PLAN_PRICE
    assert p["line_items[0][quantity]"] == "1"
    assert p["subscription_data[metadata][user_id]"] == str(user)
    assert p["subscription_data[metadata][product]"] == "starter"
    assert p["metadata[product]"] == "starter"
    assert not any(key.startswith("payment_intent_data") for key in p)


def test_second_checkout_should_reuse_the_stored_customer(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    checkout(client, user, product="pack_100")
    checkout(client, user, product="pack_100")

    assert len(stripe_double.posts("/v1/customers")) == 1
    sessions = stripe_double.posts("/v1/checkout/sessions")
    assert len(sessions) == 2
    assert sessions[0].params["customer"] == sessions[1].params["customer"]
    assert sessions[0].idempotency_key != sessions[1].idempotency_key, (
        "two checkouts without a client key should be two sessions"
    )


def test_concurrent_first_checkouts_should_make_one_customer(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        codes = list(
            pool.map(lambda _: checkout(client, user, product="pack_100").status_code, range(4))
        )
    assert codes == [201] * 4
    assert len(stripe_double.state.customers) == 1, "the derived key should dedupe customers"
    assert len({r.idempotency_key for r in stripe_double.posts("/v1/customers")}) == 1
    assert scalar(priced, "select count(*) from billing.customers") == 1


def test_client_idempotency_key_should_return_the_same_session(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    headers = {**bearer(user), "Idempotency-Key": "order-42"}
    first = client.post(CHECKOUT, json={"product": "pack_100"}, headers=headers)
    again = client.post(CHECKOUT, json={"product": "pack_100"}, headers=headers)
    other = client.post(CHECKOUT, json={"product": "starter"}, headers=headers)

    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert len(stripe_double.state.sessions) == 1
    assert other.status_code == 409, "the same key for another product should be refused"
    assert other.json()["error"]["code"] == "idempotency_key_reused"


# --- refusals before Stripe is called -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"product": "pack_999"}, 404, "unknown_product"),
        ({"product": "inactive_pack"}, 404, "unknown_product"),
        ({"product": "free"}, 409, "product_not_priced"),
        ({"product": "pack_250"}, 409, "product_not_priced"),
        ({"product": "pack_100", "quantity": 0}, 422, "invalid_quantity"),
        ({"product": "pack_100", "quantity": 101}, 422, "invalid_quantity"),
        ({"product": "pack_100", "quantity": "2"}, 422, "invalid_quantity"),
        ({"product": "pack_100", "quantity": True}, 422, "invalid_quantity"),
        ({"product": "starter", "quantity": 2}, 422, "invalid_quantity"),
        ({}, 422, "invalid_request"),
        ({"product": 7}, 422, "invalid_request"),
    ],
)
def test_invalid_checkout_should_be_refused_without_calling_stripe(
    priced: Database,
    client: TestClient,
    stripe_double: StripeDouble,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    put_product(priced, "inactive_pack", price_cents=100, stripe_price_id="price_old", active=False)
    response = checkout(client, new_user(priced), **body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert stripe_double.requests == []


def test_malformed_json_body_should_be_a_400(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    response = client.post(
        CHECKOUT,
        content=b"{product: pack_100",
        headers={**bearer(new_user(priced)), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert stripe_double.requests == []


@pytest.mark.parametrize("status", ["active", "trialing", "past_due"])
def test_plan_while_subscribed_should_be_409(
    priced: Database, client: TestClient, stripe_double: StripeDouble, status: str
) -> None:
    user = new_user(priced)
    with priced.connect() as conn:
        conn.execute(
            "update billing.accounts set plan = 'starter', subscription_status = %s "
            "where user_id = %s",
            [status, str(user)],
        )
    response = checkout(client, user, product="starter")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "already_subscribed"
    assert "portal" in response.json()["error"]["message"]
    assert stripe_double.requests == []
    assert checkout(client, user, product="pack_100").status_code == 201, (
        "a subscriber should still be able to buy packs"
    )


def test_anonymous_user_should_not_buy(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    response = client.post(
        CHECKOUT, json={"product": "pack_100"}, headers=bearer(user, is_anonymous=True)
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "anonymous_user"
    assert stripe_double.requests == []


def test_checkout_without_a_token_should_be_401(
    client: TestClient, stripe_double: StripeDouble
) -> None:
    response = client.post(CHECKOUT, json={"product": "pack_100"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert stripe_double.requests == []


# --- Stripe failing ------------------------------------------------------------------------------


def test_one_stripe_500_should_be_retried_with_the_same_key(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    checkout(client, user, product="pack_100")  # the customer exists now
    stripe_double.clear()
    stripe_double.fail_next(500)

    response = checkout(client, user, product="pack_100")

    assert response.status_code == 201, response.text
    attempts = stripe_double.posts("/v1/checkout/sessions")
    assert len(attempts) == 2
    assert attempts[0].idempotency_key == attempts[1].idempotency_key


def test_dropped_connection_should_be_retried(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    stripe_double.drop_next()

    response = checkout(client, user, product="pack_100")

    assert response.status_code == 201, response.text
    customers = stripe_double.posts("/v1/customers")
    assert len(customers) == 2
    assert customers[0].idempotency_key == customers[1].idempotency_key
    assert len(stripe_double.state.customers) == 1


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        ({"status": 500, "count": 5}, 502, "stripe_error"),
        ({"status": 0, "count": 5}, 503, "stripe_unavailable"),
        (
            {"status": 402, "error_type": "card_error", "code": "card_declined"},
            402,
            "payment_failed",
        ),
        ({"status": 429, "error_type": "rate_limit_error", "count": 5}, 503, "stripe_busy"),
        ({"status": 401, "error_type": "invalid_request_error"}, 502, "stripe_misconfigured"),
        ({"status": 400, "error_type": "invalid_request_error"}, 502, "stripe_error"),
    ],
)
def test_stripe_errors_should_map_to_clean_json(
    priced: Database,
    client: TestClient,
    stripe_double: StripeDouble,
    failure: dict[str, Any],
    status: int,
    code: str,
) -> None:
    user = new_user(priced)
    checkout(client, user, product="pack_100")
    count = failure.pop("count", 1)
    stripe_double.fail_next(count=count, message="sk_test_leak internal detail", **failure)

    response = checkout(client, user, product="pack_100")

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert "sk_test" not in response.text, "no Stripe internals or keys in the answer"
    assert "Traceback" not in response.text
    metrics = metrics_text(client.app)
    assert 'token_billing_stripe_errors_total{error="' in metrics


def test_session_failure_should_leave_the_customer_stored(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    stripe_double.fail_next(500, count=2, path="/v1/checkout/sessions")

    failed = checkout(client, user, product="pack_100")
    retried = checkout(client, user, product="pack_100")

    assert failed.status_code == 502
    assert retried.status_code == 201
    assert len(stripe_double.posts("/v1/customers")) == 1
    (customer_id,) = stripe_double.state.customers
    assert customer_of(priced, user) == customer_id, "stored before the session was attempted"
    assert [r.params["customer"] for r in stripe_double.posts("/v1/checkout/sessions")] == [
        customer_id
    ] * 3


# --- the billing portal --------------------------------------------------------------------------


def test_portal_without_a_customer_should_be_409(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    response = client.post(PORTAL, headers=bearer(new_user(priced)))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_customer"
    assert stripe_double.requests == []


def test_portal_should_open_for_the_stored_customer(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    checkout(client, user, product="pack_100")
    stripe_double.clear()

    response = client.post(PORTAL, headers=bearer(user))

    assert response.status_code == 201, response.text
    assert set(response.json()) == {"url"}
    assert response.json()["url"].startswith("https://billing.stripe.com/")
    (post,) = stripe_double.posts()
    assert post.path == "/v1/billing_portal/sessions"
    assert post.params == {
        "customer": customer_of(priced, user),
        "return_url": f"{APP_URL}/billing",
    }
    assert post.idempotency_key


def test_portal_should_refuse_anonymous_users(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    response = client.post(PORTAL, headers=bearer(new_user(priced), is_anonymous=True))
    assert response.status_code == 403


# --- what was sold is recorded; the Payment Element ---------------------------------------------


def test_checkout_session_should_be_recorded_before_its_url_is_returned(
    priced: Database, client: TestClient
) -> None:
    user = new_user(priced)
    response = checkout(client, user, product="pack_100", quantity=2)
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    row = scalar(
        priced,
        "select row(kind, user_id::text, product_code, quantity, amount_cents, currency, "
        "livemode)::text from billing.stripe_sales where id = %s",
        [session_id],
    )
    assert row == f"(checkout_session,{user},pack_100,2,1000,usd,f)"


def test_payment_intent_should_be_created_for_a_pack_and_recorded(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    response = client.post(
        "/v1/payment-intents", json={"product": "pack_100", "quantity": 3}, headers=bearer(user)
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "client_secret"}
    assert body["id"].startswith("pi_")
    assert body["client_secret"].startswith(f"{body['id']}_secret_")
    intent_post = stripe_double.posts("/v1/payment_intents")[0]
    p = intent_post.params
    assert p["amount"] == "1500", "price_cents x quantity, in minor units"
    assert p["currency"] == "usd"
    assert p["customer"] == customer_of(priced, user)
    assert p["metadata[user_id]"] == str(user)
    assert p["metadata[product]"] == "pack_100"
    assert p["metadata[quantity]"] == "3"
    assert p["automatic_payment_methods[enabled]"] == "true"
    assert intent_post.idempotency_key, "the PaymentIntent should carry an Idempotency-Key"
    assert (
        scalar(
            priced,
            "select row(kind, product_code, quantity, amount_cents)::text "
            "from billing.stripe_sales where id = %s",
            [body["id"]],
        )
        == "(payment_intent,pack_100,3,1500)"
    )


def test_payment_intent_should_refuse_plans_and_unknown_products(
    priced: Database, client: TestClient, stripe_double: StripeDouble
) -> None:
    user = new_user(priced)
    plan = client.post("/v1/payment-intents", json={"product": "starter"}, headers=bearer(user))
    assert plan.status_code == 422
    assert plan.json()["error"]["code"] == "not_a_pack"
    unknown = client.post("/v1/payment-intents", json={"product": "nope"}, headers=bearer(user))
    assert unknown.status_code == 404
    assert stripe_double.posts("/v1/payment_intents") == []


# --- plans by interval (monthly, annual) -------------------------------------------------------

ANNUAL_PRICE = "price_test_pro_year"
MONTHLY_PRO_PRICE = "price_test_pro_month"


def test_plan_checkout_with_an_interval_should_sell_that_price(
    priced: Database, stripe_double: StripeDouble
) -> None:
    stripe_double.add_price(
        MONTHLY_PRO_PRICE, unit_amount=9900, currency="usd", recurring={"interval": "month"}
    )
    stripe_double.add_price(
        ANNUAL_PRICE, unit_amount=95000, currency="usd", recurring={"interval": "year"}
    )
    with priced.connect() as conn:
        conn.execute(
            "update billing.products set stripe_price_id = %s where code = 'pro'",
            [MONTHLY_PRO_PRICE],
        )
        conn.execute(
            "select public.set_product_price('pro', 'year', 'usd', 95000, %s)", [ANNUAL_PRICE]
        )
    with TestClient(create_app(settings_for(priced, stripe_url=stripe_double.url))) as client:
        products = client.get("/v1/products").json()["products"]
        yearly = checkout(client, new_user(priced), product="pro", interval="year")
        monthly = checkout(client, new_user(priced), product="pro", interval="month")
        default = checkout(client, new_user(priced), product="pro")
        no_annual = checkout(client, new_user(priced), product="starter", interval="year")
        pack = checkout(client, new_user(priced), product="pack_100", interval="month")
        bad = checkout(client, new_user(priced), product="pro", interval="week")

    pro = next(p for p in products if p["code"] == "pro")
    assert pro["prices"] == [
        {"interval": "month", "currency": "usd", "unit_amount": 9900, "purchasable": True},
        {"interval": "year", "currency": "usd", "unit_amount": 95000, "purchasable": True},
    ], "the pricing cards should get both of pro's prices"
    assert next(p for p in products if p["code"] == "pack_100")["prices"] == []

    assert yearly.status_code == 201, yearly.text
    sessions = stripe_double.posts("/v1/checkout/sessions")
    assert [s.params["line_items[0][price]"] for s in sessions] == [
        ANNUAL_PRICE,
        MONTHLY_PRO_PRICE,
        MONTHLY_PRO_PRICE,
    ]
    assert (monthly.status_code, default.status_code) == (201, 201)
    assert sessions[0].params["mode"] == "subscription"
    assert sessions[0].params["metadata[interval]"] == "year"
    assert sessions[0].params["subscription_data[metadata][interval]"] == "year"
    assert sessions[2].params["metadata[interval]"] == "month", "month is the default"
    assert (no_annual.status_code, no_annual.json()["error"]["code"]) == (404, "unknown_price")
    assert (pack.status_code, pack.json()["error"]["code"]) == (422, "invalid_interval")
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_interval")
    assert len(sessions) == 3, "refused checkouts should not reach Stripe"
