"""Helpers shared by the service's tests: settings, user tokens, products, signatures, servers."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt
import stripe

from scripts.pgcluster import Database
from tests import stripe_fixtures
from token_billing.server.serving import Server, build_server
from token_billing.server.settings import Settings

# Test values, not secrets.
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"  # noqa: S105
WEBHOOK_SECRET = "whsec_test_0123456789abcdefghijklmnop"  # noqa: S105
OLD_WEBHOOK_SECRET = "whsec_test_old_9876543210zyxwvutsrq"  # noqa: S105
STRIPE_KEY = "sk_test_51DoubleKey0123456789"
APP_URL = "https://app.example.test"

# Prices the tests give the seeded products (the double knows them as Stripe prices).
PACK_PRICE = "price_test_pack100"
PLAN_PRICE = "price_test_starter"


def settings_for(
    db: Database | None,
    *,
    stripe_url: str = "http://127.0.0.1:9",
    database_url: str | None = None,
    **overrides: Any,
) -> Settings:
    """Settings of a test app: the clone as DATABASE_URL, the Stripe double as STRIPE_API_BASE."""
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": database_url or (db.dsn() if db is not None else None),
        "supabase_jwt_secret": JWT_SECRET,
        "stripe_secret_key": STRIPE_KEY,
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_api_base": stripe_url,
        "stripe_max_network_retries": 1,
        "app_url": APP_URL,
        "db_pool_min_size": 1,
        "db_pool_max_size": 4,
        "db_pool_timeout_seconds": 2.0,
        "db_connect_timeout_seconds": 2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def user_token(
    user_id: uuid.UUID | str,
    *,
    secret: str = JWT_SECRET,
    expires_in: int = 3600,
    audience: str = "authenticated",
    role: str = "authenticated",
    **claims: Any,
) -> str:
    """A Supabase-shaped access token (HS256)."""
    now = int(time.time())
    payload = {
        "sub": str(user_id),
        "aud": audience,
        "role": role,
        "iat": now,
        "exp": now + expires_in,
        "email": f"{user_id}@example.com",
        "aal": "aal1",
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
        **claims,
    }
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(user_id: uuid.UUID | str, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {user_token(user_id, **claims)}"}


def new_user(db: Database) -> uuid.UUID:
    """A user in auth.users; the signup trigger opens the account with the free grant."""
    user_id = uuid.uuid4()
    db.create_user(user_id)
    return user_id


def put_product(
    db: Database,
    code: str,
    *,
    kind: str = "pack",
    tokens: int = 100,
    price_cents: int | None = 500,
    stripe_price_id: str | None = None,
    active: bool = True,
) -> None:
    """Insert or overwrite a catalog row (as the migration owner, like seed.sql)."""
    with db.connect() as conn:
        conn.execute(
            "insert into billing.products "
            "(code, kind, name, tokens, price_cents, stripe_price_id, active) "
            "values (%s, %s, %s, %s, %s, %s, %s) "
            "on conflict (code) do update set kind = excluded.kind, name = excluded.name, "
            "tokens = excluded.tokens, price_cents = excluded.price_cents, "
            "stripe_price_id = excluded.stripe_price_id, active = excluded.active",
            [
                code,
                kind,
                code.replace("_", " ").title(),
                tokens,
                price_cents,
                stripe_price_id,
                active,
            ],
        )


def set_price(db: Database, code: str, stripe_price_id: str | None) -> None:
    """Give a seeded product its Stripe price (what sync-products stores)."""
    with db.connect() as conn:
        conn.execute(
            "update billing.products set stripe_price_id = %s where code = %s",
            [stripe_price_id, code],
        )


def account(db: Database, user_id: uuid.UUID) -> dict[str, Any]:
    with db.connect() as conn:
        row = conn.execute(
            "select balance, reserved, plan, subscription_status from billing.accounts "
            "where user_id = %s",
            [str(user_id)],
        ).fetchone()
    assert row is not None
    return {"balance": row[0], "reserved": row[1], "plan": row[2], "status": row[3]}


def scalar(db: Database, query: str, params: list[Any] | None = None) -> Any:
    with db.connect() as conn:
        row = conn.execute(query, params or []).fetchone()
    return None if row is None else row[0]


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """Stripe-Signature exactly as Stripe computes it, with the stripe library's own HMAC."""
    ts = int(time.time()) if timestamp is None else timestamp
    signature = stripe.WebhookSignature._compute_signature(f"{ts}.{payload.decode()}", secret)
    return f"t={ts},v1={signature}"


def fixture_event(relative: str) -> dict[str, Any]:
    """A fresh copy of a vendored fixture, verified against its INDEX.json checksum."""
    return stripe_fixtures.load(relative)


def derived_checkout_event(
    user_id: uuid.UUID,
    product: str,
    *,
    quantity: int = 1,
    event_id: str | None = None,
    session_id: str | None = None,
    event_type: str = "checkout.session.completed",
) -> dict[str, Any]:
    """stripe-ruby-mock's real checkout.session.completed envelope (payment mode, paid), derived:
    linked to a test user and a pack the way the service's sessions are (client_reference_id and
    metadata), with fresh ids so each test's event is its own."""
    event = fixture_event("stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json")
    session = event["data"]["object"]
    event["id"] = event_id or f"evt_derived{uuid.uuid4().hex[:16]}"
    event["type"] = event_type
    session["id"] = session_id or f"cs_test_derived{uuid.uuid4().hex}"
    session["client_reference_id"] = str(user_id)
    session["metadata"] = {"user_id": str(user_id), "product": product, "quantity": str(quantity)}
    session["payment_intent"] = f"pi_derived{uuid.uuid4().hex[:16]}"
    session["customer"] = f"cus_derived{uuid.uuid4().hex[:14]}"
    return event


def record_sale(db: Database, event: Mapping[str, Any]) -> None:
    """Record the event's Checkout Session the way the service does when it creates one
    (public.record_checkout_session, before the URL is handed out), so its paid events credit."""
    from psycopg.types.json import Jsonb

    with db.connect() as conn:
        conn.execute(
            "select * from public.record_checkout_session(%s)", [Jsonb(event["data"]["object"])]
        )


def sold_checkout_event(
    db: Database, user_id: uuid.UUID, product: str, **kwargs: Any
) -> dict[str, Any]:
    """derived_checkout_event, for a session the service sold (recorded first)."""
    event = derived_checkout_event(user_id, product, **kwargs)
    record_sale(db, event)
    return event


def metrics_text(app: Any) -> str:
    """What the app's metrics listener would serve (GET /metrics is not on the API port)."""
    text: str = app.state.metrics.render().decode()
    return text


def encode(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event).encode()


# --- the contract's routes ---------------------------------------------------------------------

CONTRACT = Path(__file__).resolve().parents[1] / "docs" / "contract.md"
# Routes the contract lists that another issue adds (none left).
NOT_YET_SERVED: set[tuple[str, str]] = set()


def contract_routes() -> set[tuple[str, str]]:
    """The `METHOD /path` of each row of docs/contract.md's HTTP service table."""
    text = CONTRACT.read_text(encoding="utf-8").split("## HTTP service", 1)[1]
    found = set()
    for line in text.splitlines():
        cell = line.split("|")[1] if line.startswith("|") else ""
        for method, path in re.findall(r"`(GET|POST) (/[^` ]*)`", cell):
            found.add((path, method))
    return found


# --- a real uvicorn server in a thread ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, Server]]:
    """The service as `token-billing serve` runs it (token_billing.server.serving: uvicorn with
    its limits, the metrics listener when METRICS_PORT is set) in a thread, on a free port;
    yields its base URL and the server."""
    port = free_port()
    server = build_server(settings, host="127.0.0.1", port=port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextlib.contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    """The service as `token-billing serve` runs it, on a free port; yields its base URL."""
    with serving(settings) as (url, _):
        yield url
