"""The app's shape: routes, operator endpoints, the catalog, and errors as contract JSON."""

from __future__ import annotations

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import (
    JWT_SECRET,
    PACK_PRICE,
    STRIPE_KEY,
    WEBHOOK_SECRET,
    bearer,
    free_port,
    new_user,
    put_product,
    set_price,
    settings_for,
)
from token_billing.server.app import create_app

CONTRACT_ROUTES = {
    ("/v1/checkout/sessions", "POST"),
    ("/v1/portal/sessions", "POST"),
    ("/v1/balance", "GET"),
    ("/v1/products", "GET"),
    ("/v1/webhooks/stripe", "POST"),
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/metrics", "GET"),
}
# Reads for the browser page (issue 7): the user's own ledger history and live balance.
PAGE_ROUTES = {
    ("/v1/ledger", "GET"),
    ("/v1/balance/stream", "GET"),
}


def test_app_should_have_exactly_the_contract_routes_and_the_page_reads() -> None:
    app = create_app(settings_for(None, database_url="postgresql://x@127.0.0.1:1/x"))
    served = {
        (route.path, method)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    assert served == CONTRACT_ROUTES | PAGE_ROUTES


def test_create_app_without_settings_should_read_the_environment(
    monkeypatch: pytest.MonkeyPatch, db: Database
) -> None:
    monkeypatch.chdir(db.cluster.datadir.parent)
    for name, value in {
        "DATABASE_URL": db.dsn(),
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ENVIRONMENT": "test",
    }.items():
        monkeypatch.setenv(name, value)
    with TestClient(create_app()) as client:
        assert client.get("/readyz").status_code == 200


def test_health_and_readiness_should_be_200_with_a_database(db: Database) -> None:
    with TestClient(create_app(settings_for(db))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}


def test_readiness_should_be_503_when_the_database_is_unreachable() -> None:
    settings = settings_for(
        None,
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        db_pool_timeout_seconds=0.5,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200, "liveness does not need the database"
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "database_unavailable"


def test_products_should_list_the_active_catalog_without_login(db: Database) -> None:
    set_price(db, "pack_100", PACK_PRICE)
    put_product(db, "retired", price_cents=100, active=False)
    with TestClient(create_app(settings_for(db))) as client:
        response = client.get("/v1/products")
    assert response.status_code == 200
    products = {p["code"]: p for p in response.json()["products"]}
    assert {"pack_100", "pack_250", "pack_600", "free", "starter", "pro"} <= set(products)
    assert "retired" not in products, "inactive products should not be listed"
    assert products["pack_100"] == {
        "code": "pack_100",
        "kind": "pack",
        "name": "100 tokens",
        "description": "A one-off pack of 100 tokens.",
        "tokens": 100,
        "price_cents": 500,
        "currency": "usd",
        "rollover": False,
        "sort_order": 10,
        "purchasable": True,
    }
    assert products["pack_250"]["purchasable"] is False, "no Stripe price yet"
    assert "stripe_price_id" not in products["pack_100"]


def test_balance_should_reflect_reservations(db: Database) -> None:
    user = new_user(db)
    with db.as_service_role() as conn:
        conn.execute("select * from public.reserve_tokens(%s, 30, 'req-1')", [str(user)])
    with TestClient(create_app(settings_for(db))) as client:
        response = client.get("/v1/balance", headers=bearer(user))
    assert response.json() == {
        "balance": 100,
        "available": 70,
        "reserved": 30,
        "plan": "free",
        "subscription_status": "none",
    }


def test_balance_of_a_user_without_account_should_be_404(db: Database) -> None:
    with TestClient(create_app(settings_for(db))) as client:
        response = client.get("/v1/balance", headers=bearer("00000000-0000-0000-0000-00000000dead"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_account"


def test_unknown_route_and_wrong_method_should_be_json_errors(db: Database) -> None:
    with TestClient(create_app(settings_for(db))) as client:
        missing = client.get("/v1/nothing")
        wrong = client.get("/v1/webhooks/stripe")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_metrics_should_be_prometheus_text_per_app(db: Database) -> None:
    with TestClient(create_app(settings_for(db))) as first:
        first.get("/healthz")
        first.get("/healthz")
        text = first.get("/metrics").text
    with TestClient(create_app(settings_for(db))) as second:
        other = second.get("/metrics").text
    assert (
        'token_billing_http_requests_total{method="GET",route="/healthz",status="200"} 2.0' in text
    )
    assert 'route="/healthz"' not in other, "each app should have its own registry"
    assert "token_billing_checkout_sessions_created_total" in other
