"""Notifications to the host app: the billing worker posts each one to NOTIFICATION_WEBHOOK_URL,
signed with the documented scheme (docs/notifications.md), retries after a failure and never
sends a delivered one again, also from a new worker after a restart.

The host is a real HTTP server in a thread that records what it receives and answers as told.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from scripts.pgcluster import Database
from tests.app_support import new_user, scalar, settings_for
from token_billing.server.database import database_from_settings
from token_billing.server.settings import Settings
from token_billing.server.worker import (
    NOTIFICATION_ID_HEADER,
    SIGNATURE_HEADER,
    BillingWorker,
    RunCounts,
    sign,
    verify,
)

SECRET = "whk_" + "9f3b" * 10


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]


@dataclass
class Host:
    """The host app's webhook endpoint: records each POST, answers `statuses` in turn, then 200."""

    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def host() -> Iterator[Host]:
    state = Host()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                state.received.append(Received(body, dict(self.headers.items())))
                status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    state.url = f"http://{host!s}:{port}/hooks/token-billing"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def settings_with_webhook(db: Database, host: Host) -> Settings:
    return settings_for(db, notification_webhook_url=host.url, notification_webhook_secret=SECRET)


async def run_worker(settings: Settings) -> RunCounts:
    """A worker with its own pool, as a freshly started service has."""
    db = database_from_settings(settings)
    await db.open()
    try:
        async with httpx.AsyncClient() as http:
            return await BillingWorker(settings, db, None, http).run_once()
    finally:
        await db.close()


def low_balance(db: Database) -> tuple[uuid.UUID, str]:
    """A free user who falls to 20 tokens (20% of the free plan's 100): one low_balance."""
    user = new_user(db)
    with db.connect() as conn:
        conn.execute("select public.deduct_tokens(%s, 80, 'use-80')", [str(user)])
    notification = scalar(
        db, "select id::text from billing.notifications where user_id = %s", [str(user)]
    )
    assert notification is not None
    return user, str(notification)


def delivery(db: Database, notification: str) -> tuple[Any, ...]:
    with db.connect() as conn:
        row = conn.execute(
            "select status, attempts, last_error from billing.notification_deliveries "
            "where notification_id = %s",
            [notification],
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_a_notification_should_be_delivered_signed_and_verifiable(db: Database, host: Host) -> None:
    user, notification = low_balance(db)

    counts = asyncio.run(run_worker(settings_with_webhook(db, host)))

    assert counts.delivered == 1, counts
    [got] = host.received
    body = json.loads(got.body)
    assert body["id"] == notification
    assert body["object"] == "token_billing.notification"
    assert body["type"] == "low_balance"
    assert body["user_id"] == str(user)
    assert body["data"]["threshold_percent"] == 20
    assert body["data"]["available"] == 20
    assert got.headers[NOTIFICATION_ID_HEADER] == notification
    assert verify(SECRET, got.body, got.headers[SIGNATURE_HEADER]), (
        "the documented check should pass"
    )
    assert not verify(SECRET, got.body + b" ", got.headers[SIGNATURE_HEADER]), "a changed body"
    assert not verify("another" * 5, got.body, got.headers[SIGNATURE_HEADER]), "another secret"
    assert delivery(db, notification)[:2] == ("delivered", 1)


def test_the_signature_scheme_should_be_stripes(db: Database) -> None:
    body = b'{"id":"n"}'
    header = sign(SECRET, body, 1767225600)
    timestamp, v1 = header.split(",")
    assert timestamp == "t=1767225600"
    import hashlib
    import hmac

    expected = hmac.new(SECRET.encode(), b"1767225600." + body, hashlib.sha256).hexdigest()
    assert v1 == f"v1={expected}"
    assert verify(SECRET, body, header, now=1767225600 + 299)
    assert not verify(SECRET, body, header, now=1767225600 + 301), "older than the tolerance"
    assert not verify(SECRET, body, "v1=" + expected), "no timestamp"


def test_a_failed_delivery_should_be_retried_after_its_backoff(db: Database, host: Host) -> None:
    _, notification = low_balance(db)
    host.statuses = [500]
    settings = settings_with_webhook(db, host)

    first = asyncio.run(run_worker(settings))
    assert first.delivery_failures == 1
    assert delivery(db, notification) == ("pending", 1, "HTTP 500")
    assert asyncio.run(run_worker(settings)).delivered == 0, "not before the backoff"

    with db.connect() as conn:  # the backoff (10 s) has passed
        conn.execute(
            "update billing.notification_deliveries set next_attempt_at = now() "
            "where notification_id = %s",
            [notification],
        )
    second = asyncio.run(run_worker(settings))

    assert second.delivered == 1
    assert [json.loads(r.body)["id"] for r in host.received] == [notification, notification]
    assert delivery(db, notification)[:2] == ("delivered", 2)


def test_a_delivered_notification_should_not_be_sent_again_after_a_restart(
    db: Database, host: Host
) -> None:
    _, notification = low_balance(db)
    settings = settings_with_webhook(db, host)
    asyncio.run(run_worker(settings))
    assert len(host.received) == 1

    # A new service (a new pool, a new worker) and time passing: nothing is sent twice.
    with db.connect() as conn:
        conn.execute(
            "update billing.notification_deliveries set next_attempt_at = now() - interval '1 day'"
        )
    again = asyncio.run(run_worker(settings))

    assert again.delivered == 0
    assert len(host.received) == 1
    assert delivery(db, notification)[0] == "delivered"


def test_a_crashed_worker_should_hand_its_delivery_on_after_the_lease(
    db: Database, host: Host
) -> None:
    _, notification = low_balance(db)
    with db.connect() as conn:  # a worker claimed it and died before posting
        conn.execute("select * from public.claim_notification_deliveries(10, '1 minute')")
    settings = settings_with_webhook(db, host)
    assert asyncio.run(run_worker(settings)).delivered == 0, "the lease holds it"
    with db.connect() as conn:
        conn.execute("update billing.notification_deliveries set locked_until = now()")
    assert asyncio.run(run_worker(settings)).delivered == 1
    assert [json.loads(r.body)["id"] for r in host.received] == [notification]


def test_without_a_webhook_notifications_should_stay_pending(db: Database, host: Host) -> None:
    _, notification = low_balance(db)
    counts = asyncio.run(run_worker(settings_for(db)))
    assert counts.delivered == 0
    assert host.received == []
    assert delivery(db, notification)[:2] == ("pending", 0)


def test_a_webhook_url_needs_its_secret_and_https_in_production() -> None:
    from token_billing.server.settings import ConfigError

    with pytest.raises(ConfigError) as missing:
        settings_for(None, notification_webhook_url="https://host.example/hooks")
    assert "NOTIFICATION_WEBHOOK_SECRET is required" in str(missing.value)
    with pytest.raises(ConfigError) as plain:
        settings_for(
            None,
            environment="production",
            notification_webhook_url="http://host.example/hooks",
            notification_webhook_secret=SECRET,
            database_url="postgresql://u:p@localhost:5432/db",
        )
    assert "NOTIFICATION_WEBHOOK_URL must be an https:// URL" in str(plain.value)
    with pytest.raises(ConfigError) as short:
        settings_for(
            None,
            notification_webhook_url="https://host.example/hooks",
            notification_webhook_secret="s" * 20,
            database_url="postgresql://u:p@localhost:5432/db",
        )
    assert "NOTIFICATION_WEBHOOK_SECRET must be at least 32 characters" in str(short.value)


def test_the_worker_should_run_in_the_service_when_configured(db: Database, host: Host) -> None:
    _, notification = low_balance(db)
    from starlette.testclient import TestClient

    from token_billing.server.app import create_app

    settings = settings_for(
        db,
        notification_webhook_url=host.url,
        notification_webhook_secret=SECRET,
        billing_worker_interval_seconds=0.1,
    )
    with TestClient(create_app(settings)):
        deadline = time.monotonic() + 10
        while not host.received and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [json.loads(r.body)["id"] for r in host.received] == [notification]
    assert delivery(db, notification)[0] == "delivered"
