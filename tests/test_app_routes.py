"""The app's shape: routes, operator endpoints, the catalog, and errors as contract JSON."""

from __future__ import annotations

import logging

import psycopg
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import (
    JWT_SECRET,
    NOT_YET_SERVED,
    OPERATOR_ROUTES,
    PACK_PRICE,
    STRIPE_KEY,
    WEBHOOK_SECRET,
    bearer,
    contract_routes,
    free_port,
    metrics_text,
    new_user,
    put_product,
    set_price,
    settings_for,
)
from token_billing import install
from token_billing.server.app import create_app
from token_billing.server.database import StartupError

# Reads for the browser page (issue 7): the user's own ledger history and live balance.
PAGE_ROUTES = {
    ("/v1/ledger", "GET"),
    ("/v1/balance/stream", "GET"),
}


def served(app: Starlette) -> set[tuple[str, str]]:
    return {
        (route.path, method)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }


def test_app_should_have_exactly_the_contract_routes_and_the_page_reads() -> None:
    app = create_app(settings_for(None, database_url="postgresql://x@127.0.0.1:1/x"))
    contract = contract_routes()
    assert ("/v1/checkout/sessions", "POST") in contract, "the contract table should be read"
    on_api_port = contract - {("/metrics", "GET")} - NOT_YET_SERVED - OPERATOR_ROUTES
    assert served(app) == on_api_port | PAGE_ROUTES | {("/openapi.json", "GET")}
    operated = create_app(
        settings_for(None, database_url="postgresql://x@127.0.0.1:1/x", operator_token="o" * 32)
    )
    assert served(operated) == served(app) | OPERATOR_ROUTES | {("/ops/{name}", "GET")}


def test_metrics_should_be_on_the_api_port_only_behind_a_token(db: Database) -> None:
    token = "metrics-token-0123456789abcdef"  # noqa: S105 - a test value
    with TestClient(create_app(settings_for(db))) as client:
        public = client.get("/metrics")
    with TestClient(create_app(settings_for(db, metrics_token=token))) as client:
        anonymous = client.get("/metrics")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        right = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert public.status_code == 404, "/metrics should not be public on the API port"
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="metrics"'
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert "token_billing_http_requests_total" in right.text


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
        assert client.get("/readyz").json() == {
            "status": "ready",
            "version": install.current_version(),
            "migrations": len(install.expected_migrations()),
        }


def test_readiness_should_be_503_when_the_database_goes_away(db: Database) -> None:
    settings = settings_for(db, db_pool_timeout_seconds=0.5)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        with psycopg.connect(db.cluster.dsn("postgres"), autocommit=True) as su:
            su.execute(f'alter database "{db.name}" with allow_connections false')
            su.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                [db.name],
            )
        try:
            assert client.get("/healthz").status_code == 200, "liveness needs no database"
            ready = client.get("/readyz")
        finally:
            with psycopg.connect(db.cluster.dsn("postgres"), autocommit=True) as su:
                su.execute(f'alter database "{db.name}" with allow_connections true')
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "database_unavailable"


def test_readiness_should_be_503_when_a_migration_is_missing(db: Database) -> None:
    newest = install.expected_migrations()[-1]
    with TestClient(create_app(settings_for(db))) as client:
        with db.connect_superuser() as su:
            su.execute("delete from billing.schema_migrations where version = %s", [newest])
        outdated = client.get("/readyz")
        with db.connect_superuser() as su:
            su.execute("drop function public.installed_migrations()")
        missing = client.get("/readyz")
        products = client.get("/v1/products")
    count = len(install.expected_migrations())
    version = install.current_version()
    assert outdated.status_code == 503
    assert outdated.json()["error"] == {
        "code": "schema_outdated",
        "message": f"the database lacks 1 of the {count} migrations of token-billing {version} "
        f"(first missing: {newest}): run `token-billing install` (or `supabase db push`)",
    }
    assert missing.status_code == 503
    assert missing.json()["error"]["code"] == "schema_not_installed"
    assert products.status_code == 200, "readiness is what reports it, not every route"


def test_startup_should_fail_fast_when_the_database_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    settings = settings_for(
        None,
        database_url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        db_startup_timeout_seconds=1.0,
    )
    with (
        caplog.at_level(logging.WARNING, logger="token_billing.server"),
        pytest.raises(StartupError) as caught,
        TestClient(create_app(settings)),
    ):
        pass  # pragma: no cover - startup raises
    assert str(caught.value).startswith(
        f"the database (postgres 127.0.0.1:{port}/postgres) could not be reached for 1 s "
        "(DB_STARTUP_TIMEOUT_SECONDS): connection failed:"
    ), caught.value
    assert "Connection refused" in str(caught.value)
    assert any(r.getMessage() == "waiting for the database" for r in caplog.records)


def test_startup_should_log_the_mode(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="token_billing.server"):
        with TestClient(create_app(settings_for(db, environment="production"))):
            pass
        with TestClient(create_app(settings_for(db, environment="development"))):
            pass
    started = [r for r in caplog.records if r.getMessage() == "service started"]
    modes = [r.fields["mode"] for r in started]  # type: ignore[attr-defined]
    assert modes == [
        "production (no demo page, no /dev routes)",
        "development (demo page and POST /dev/session served)",
    ]
    fields = started[0].fields  # type: ignore[attr-defined]
    assert fields["database"] == f"postgres 127.0.0.1:{db.cluster.port}/{db.name}"
    assert fields["metrics"] == "off (set METRICS_PORT or METRICS_TOKEN)"
    assert fields["cors_origins"] == "same origin only"


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
        "prices": [],
    }
    assert products["pack_250"]["purchasable"] is False, "no Stripe price yet"
    assert products["pro"]["prices"] == [
        {"interval": "month", "currency": "usd", "unit_amount": 9900, "purchasable": False},
        {"interval": "year", "currency": "usd", "unit_amount": 95000, "purchasable": False},
    ], "a plan should list its monthly and annual prices (not on sale before sync-products)"
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
        text = metrics_text(first.app)
    with TestClient(create_app(settings_for(db))) as second:
        other = metrics_text(second.app)
    assert (
        'token_billing_http_requests_total{method="GET",route="/healthz",status="200"} 2.0' in text
    )
    assert 'route="/healthz"' not in other, "each app should have its own registry"
    assert "token_billing_checkout_sessions_created_total" in other
