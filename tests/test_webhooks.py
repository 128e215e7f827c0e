"""POST /v1/webhooks/stripe end to end: real payloads, a real HMAC, the real database.

Every delivery goes through the Starlette app (TestClient as a context manager, so the lifespan
opens the psycopg pool) into `public.handle_stripe_event` of a fresh migrated database. Fixtures
come from tests/fixtures/stripe; the ones changed to belong to a test user are marked
"derived" where they are built (tests/app_support.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import psycopg
import pytest
from starlette.testclient import TestClient

from scripts.pgcluster import Database, PgCluster
from tests.app_support import (
    OLD_WEBHOOK_SECRET,
    WEBHOOK_SECRET,
    account,
    encode,
    metrics_text,
    new_user,
    running_server,
    scalar,
    settings_for,
    sign,
    sold_checkout_event,
)
from tests.stripe_fixtures import FIXTURES
from token_billing.server.app import create_app

WEBHOOK = "/v1/webhooks/stripe"
OTHER_SECRET = "whsec_someone_else_0123456789"  # noqa: S105 - a test value, not a secret
CONTRACT_STATUSES = {"applied", "duplicate", "ignored", "stale", "parked"}


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(db))) as c:
        yield c


def deliver(
    client: TestClient | httpx2.Client,
    payload: bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
    header: str | None = None,
) -> httpx2.Response:
    signature = header if header is not None else sign(payload, secret, timestamp)
    return client.post(
        WEBHOOK,
        content=payload,
        headers={"Content-Type": "application/json", "Stripe-Signature": signature},
    )


def stored_events(db: Database) -> int:
    return int(scalar(db, "select count(*) from billing.stripe_events"))


def error_code(response: httpx2.Response) -> str:
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}, "errors should have the contract's shape"
    assert set(body["error"]) == {"code", "message"}
    return str(body["error"]["code"])


# --- real payloads ------------------------------------------------------------------------------


def test_signed_checkout_should_credit_the_pack_once(db: Database, client: TestClient) -> None:
    user = new_user(db)
    event = sold_checkout_event(db, user, "pack_100", quantity=2)
    before = account(db, user)["balance"]

    response = deliver(client, encode(event))

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "applied"
    assert set(response.json()) == {"status", "detail"}
    assert account(db, user)["balance"] == before + 200, "2 x pack_100 should add 200 tokens"
    assert scalar(db, "select status from billing.stripe_events where id = %s", [event["id"]]) == (
        "applied"
    )


def test_the_event_should_be_stored_as_the_signed_body_says(
    db: Database, client: TestClient
) -> None:
    # The body goes to jsonb as it was signed, not parsed and dumped again: escapes, non-ASCII
    # text and numbers must arrive value for value.
    user = new_user(db)
    event = sold_checkout_event(db, user, "pack_100")
    event["data"]["object"]["metadata"]["note"] = 'caf\u00e9 \u2603 "q" \\ / \U0001f600 \t'
    event["data"]["object"]["metadata"]["ratio"] = 0.1
    payloads = [encode(event), json.dumps(event, ensure_ascii=False, indent=2).encode()]

    answers = [deliver(client, payload) for payload in payloads]

    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert [a.json()["status"] for a in answers] == ["applied", "duplicate"]
    stored = scalar(db, "select payload from billing.stripe_events where id = %s", [event["id"]])
    assert stored == event, "the stored event should be the signed one, value for value"
    assert account(db, user)["balance"] == 100 + 100


def test_redelivery_should_answer_duplicate_and_credit_nothing(
    db: Database, client: TestClient
) -> None:
    user = new_user(db)
    payload = encode(sold_checkout_event(db, user, "pack_250"))
    first = deliver(client, payload)
    balance = account(db, user)["balance"]

    again = deliver(client, payload)

    assert first.json()["status"] == "applied"
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert account(db, user)["balance"] == balance


def test_async_payment_succeeded_for_the_same_session_should_not_credit_twice(
    db: Database, client: TestClient
) -> None:
    # Derived: the README's recipe for a full-envelope async_payment_succeeded event.
    user = new_user(db)
    session_id = f"cs_test_derived{uuid.uuid4().hex}"
    completed = sold_checkout_event(db, user, "pack_100", session_id=session_id)
    succeeded = sold_checkout_event(
        db,
        user,
        "pack_100",
        session_id=session_id,
        event_type="checkout.session.async_payment_succeeded",
    )
    before = account(db, user)["balance"]

    statuses = [deliver(client, encode(e)).json()["status"] for e in (completed, succeeded)]

    assert statuses == ["applied", "duplicate"]
    assert account(db, user)["balance"] == before + 100


def test_parallel_duplicate_deliveries_should_have_one_effect(db: Database) -> None:
    user = new_user(db)
    payload = encode(sold_checkout_event(db, user, "pack_600"))
    before = account(db, user)["balance"]

    with running_server(settings_for(db, db_pool_max_size=8)) as url:

        def post(_: int) -> tuple[int, str]:
            with httpx2.Client(base_url=url, timeout=30) as http:
                response = deliver(http, payload)
                return response.status_code, str(response.json().get("status"))

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(post, range(8)))

    assert all(code == 200 for code, _ in results), results
    assert sorted(status for _, status in results) == ["applied"] + ["duplicate"] * 7
    assert account(db, user)["balance"] == before + 600


@pytest.mark.parametrize(
    "fixture",
    [
        "stripe-ruby-mock-webhook_fixtures/checkout.session.completed.json",
        "stripe-ruby-mock-webhook_fixtures/invoice.paid.json",
        "stripe-ruby-mock-webhook_fixtures/customer.subscription.created.json",
        "stripe-ruby-mock-webhook_fixtures/charge.refunded.json",
        "stripe-ruby-mock-webhook_fixtures/charge.dispute.created.json",
        "stripe-ruby-mock-webhook_fixtures/payment_intent.succeeded.json",
    ],
)
def test_verbatim_fixture_should_be_stored_with_a_contract_status(
    db: Database, client: TestClient, fixture: str
) -> None:
    # Byte for byte as published: no user is tied to them, so nothing may be credited.
    payload = (FIXTURES / fixture).read_bytes()
    event_id = json.loads(payload)["id"]

    response = deliver(client, payload)

    assert response.status_code == 200, response.text
    assert response.json()["status"] in CONTRACT_STATUSES - {"applied"}
    assert scalar(db, "select count(*) from billing.stripe_events where id = %s", [event_id]) == 1
    assert scalar(db, "select count(*) from billing.ledger_entries where kind <> 'signup'") == 0


# --- refused deliveries: 400 and nothing stored --------------------------------------------------


def test_wrong_secret_should_be_refused(db: Database, client: TestClient) -> None:
    user = new_user(db)
    response = deliver(
        client, encode(sold_checkout_event(db, user, "pack_100")), secret=OTHER_SECRET
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_signature"
    assert stored_events(db) == 0


@pytest.mark.parametrize("ahead", [301, 3600, 10**9])
def test_future_timestamp_should_be_refused(db: Database, ahead: int) -> None:
    """Stripe's library refuses only old signatures; one dated ahead is refused the same way.
    Against the service under uvicorn, as Stripe reaches it."""
    user = new_user(db)
    payload = encode(sold_checkout_event(db, user, "pack_100"))
    with running_server(settings_for(db)) as url, httpx2.Client(base_url=url) as http:
        response = deliver(http, payload, timestamp=int(time.time()) + ahead)
        within = deliver(http, payload, timestamp=int(time.time()) + 60)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_signature",
        "message": "signature verification failed: the Stripe-Signature timestamp is more "
        "than 300 seconds in the future",
    }
    assert within.status_code == 200, "a clock a minute ahead is within the tolerance"
    assert account(db, user)["balance"] == 200, "only the delivery within tolerance credits"
    assert stored_events(db) == 1


def test_stale_timestamp_should_be_refused(db: Database, client: TestClient) -> None:
    user = new_user(db)
    response = deliver(
        client,
        encode(sold_checkout_event(db, user, "pack_100")),
        timestamp=int(time.time()) - 301,
    )
    assert response.status_code == 400
    assert error_code(response) == "invalid_signature"
    assert "tolerance" in response.json()["error"]["message"].lower()
    assert stored_events(db) == 0


def test_one_changed_byte_should_be_refused(db: Database, client: TestClient) -> None:
    user = new_user(db)
    payload = encode(sold_checkout_event(db, user, "pack_100", quantity=1))
    header = sign(payload)
    tampered = payload.replace(b'"quantity": "1"', b'"quantity": "9"')
    assert len(tampered) == len(payload)
    assert tampered != payload

    response = deliver(client, tampered, header=header)

    assert response.status_code == 400
    assert error_code(response) == "invalid_signature"
    assert stored_events(db) == 0
    assert account(db, user)["balance"] == 100, "only the signup grant"


@pytest.mark.parametrize("header", ["", "t=123", "v1=abc", "garbage", "t=notanumber,v1=00"])
def test_missing_or_malformed_signature_header_should_be_refused(
    db: Database, client: TestClient, header: str
) -> None:
    payload = encode(sold_checkout_event(db, new_user(db), "pack_100"))
    response = deliver(client, payload, header=header)
    assert response.status_code == 400
    assert error_code(response) == "invalid_signature"
    assert stored_events(db) == 0


def test_no_signature_header_at_all_should_be_refused(db: Database, client: TestClient) -> None:
    payload = encode(sold_checkout_event(db, new_user(db), "pack_100"))
    response = client.post(WEBHOOK, content=payload)
    assert response.status_code == 400
    assert "missing" in response.json()["error"]["message"]
    assert stored_events(db) == 0


def test_malformed_json_should_be_refused(db: Database, client: TestClient) -> None:
    payload = b'{"id": "evt_1", "object": "event", "type": '
    response = deliver(client, payload)
    assert response.status_code == 400
    assert error_code(response) == "invalid_payload"
    assert stored_events(db) == 0


def test_json_that_is_not_an_event_should_be_refused(db: Database, client: TestClient) -> None:
    for payload in (b"[1, 2]", b'{"object": "event", "id": "evt_x"}', b'"evt"'):
        response = deliver(client, payload)
        assert response.status_code == 400, payload
        assert error_code(response) == "invalid_payload"
    assert stored_events(db) == 0


def test_event_the_database_refuses_should_be_a_400_and_store_nothing(
    db: Database, client: TestClient
) -> None:
    event = sold_checkout_event(db, new_user(db), "pack_100")
    event["created"] = "yesterday"  # handle_stripe_event raises 22023
    response = deliver(client, encode(event))
    assert response.status_code == 400
    assert error_code(response) == "invalid_argument"
    assert "created" in response.json()["error"]["message"]
    assert stored_events(db) == 0


def test_thin_event_should_be_refused_with_a_clear_message(
    db: Database, client: TestClient
) -> None:
    # The shape of a v2 thin event notification (Stripe's event destinations docs).
    thin = {
        "id": "evt_test_65R9Ijk8fjK2vT7WNdV16R9Ijk8fSQcJJ1dY2W1OBmOMZb",
        "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered",
        "livemode": False,
        "created": "2024-09-17T06:20:52.246Z",
        "related_object": {
            "id": "mtr_test_61R9IjkKCSBn9j8kR41IJkUZ0rr7FNx4",
            "type": "billing.meter",
            "url": "/v1/billing/meters/mtr_test_61R9IjkKCSBn9j8kR41IJkUZ0rr7FNx4",
        },
    }
    response = deliver(client, encode(thin))
    assert response.status_code == 400
    assert error_code(response) == "thin_event_unsupported"
    assert "snapshot" in response.json()["error"]["message"]
    assert stored_events(db) == 0


def test_oversized_body_should_be_refused_with_413(db: Database, client: TestClient) -> None:
    payload = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    response = deliver(client, payload)
    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"
    assert stored_events(db) == 0


def test_oversized_chunked_body_should_be_refused_with_413(
    db: Database, client: TestClient
) -> None:
    chunks_sent = 0

    def body() -> Iterator[bytes]:
        nonlocal chunks_sent
        for _ in range(40):  # 40 x 64 KiB = 2.5 MiB, no Content-Length
            chunks_sent += 1
            yield b"x" * 65536

    response = client.post(WEBHOOK, content=body(), headers={"Stripe-Signature": "t=1,v1=0"})
    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"


# --- secret rotation ----------------------------------------------------------------------------


def test_rotation_should_accept_both_configured_secrets(db: Database) -> None:
    user = new_user(db)
    settings = settings_for(db, stripe_webhook_secret=f"{WEBHOOK_SECRET},{OLD_WEBHOOK_SECRET}")
    with TestClient(create_app(settings)) as rotating:
        new = deliver(rotating, encode(sold_checkout_event(db, user, "pack_100")))
        old = deliver(
            rotating,
            encode(sold_checkout_event(db, user, "pack_100")),
            secret=OLD_WEBHOOK_SECRET,
        )
        other = deliver(
            rotating, encode(sold_checkout_event(db, user, "pack_100")), secret=OTHER_SECRET
        )
    assert (new.status_code, old.status_code, other.status_code) == (200, 200, 400)
    assert account(db, user)["balance"] == 100 + 200


# --- the database going away ---------------------------------------------------------------------


def _wait_for_lock_wait(db: Database, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = scalar(
            db,
            "select count(*) from pg_stat_activity "
            "where application_name = 'token-billing' and wait_event_type = 'Lock'",
        )
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError("the webhook never reached the database")


@pytest.mark.slow
def test_database_stopped_mid_request_should_503_then_the_retry_credits_once(
    db: Database, pg_cluster: PgCluster
) -> None:
    user = new_user(db)
    event = sold_checkout_event(db, user, "pack_100")
    payload = encode(event)
    header = sign(payload)
    before = account(db, user)["balance"]

    with TestClient(create_app(settings_for(db, db_pool_timeout_seconds=1.0))) as client:
        # Hold the user's account row so the handler blocks inside its transaction, then stop
        # the server under it.
        blocker = db.connect_superuser(autocommit=False)
        blocker.execute("select 1 from billing.accounts where user_id = %s for update", [str(user)])
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(deliver, client, payload, header=header)
            _wait_for_lock_wait(db)
            pg_cluster.stop("fast")
            try:
                during = pending.result(timeout=30)
                while_down = deliver(client, payload, header=header)
            finally:
                pg_cluster.start()
        with pytest.raises(psycopg.OperationalError):
            blocker.execute("select 1")  # the stop really cut the database's sessions
        blocker.close()

        # Stripe retries with backoff; the pool reconnects with its own. Retry like Stripe
        # (faster): every answer is a 503 until one is the 200.
        retries: list[int] = []
        deadline = time.monotonic() + 40
        while True:
            after_restart = deliver(client, payload, header=header)
            if after_restart.status_code != 503 or time.monotonic() > deadline:
                break
            retries.append(after_restart.status_code)
            time.sleep(0.5)
        redelivered = deliver(client, payload, header=header)

    assert during.status_code == 503, during.text
    assert error_code(during) == "database_unavailable"
    assert during.headers.get("retry-after")
    assert while_down.status_code == 503
    assert after_restart.status_code == 200, after_restart.text
    assert after_restart.json()["status"] == "applied"
    assert redelivered.json()["status"] == "duplicate"
    assert account(db, user)["balance"] == before + 100, "credited exactly once"
    assert (
        scalar(
            db,
            "select count(*) from billing.ledger_entries where idempotency_key like %s",
            ["stripe:checkout:%"],
        )
        == 1
    )


# --- observability --------------------------------------------------------------------------------


def test_metrics_should_count_events_by_type_and_outcome(db: Database, client: TestClient) -> None:
    user = new_user(db)
    deliver(client, encode(sold_checkout_event(db, user, "pack_100")))
    deliver(client, b"{}", secret=OTHER_SECRET)

    text = metrics_text(client.app)

    applied = 'outcome="applied",type="checkout.session.completed"} 1.0'
    assert f"token_billing_webhook_events_total{{{applied}" in text
    assert (
        'token_billing_webhook_events_total{outcome="invalid_signature",type="unknown"} 1.0' in text
    )
    assert "token_billing_webhook_handle_duration_seconds_bucket" in text


def test_log_line_should_name_the_event_and_never_the_secret(
    db: Database, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    event = sold_checkout_event(db, new_user(db), "pack_100")
    payload = encode(event)
    header = sign(payload)
    with caplog.at_level(logging.INFO, logger="token_billing"):
        deliver(client, payload, header=header)
    lines = [r for r in caplog.records if r.name == "token_billing.access"]
    assert len(lines) == 1, "one line per request"
    fields = lines[0].__dict__["fields"]
    assert fields["event_id"] == event["id"]
    assert fields["outcome"] == "applied"
    assert fields["status"] == 200
    everything = " ".join(
        json.dumps(r.__dict__.get("fields", {}), default=str) for r in caplog.records
    )
    assert WEBHOOK_SECRET not in everything
    assert header.split("v1=")[1] not in everything


def test_app_should_serve_concurrent_webhooks_from_one_pool(db: Database) -> None:
    # Many users at once through a pool of 2: requests wait for a slot, none fails.
    users = [new_user(db) for _ in range(6)]
    with TestClient(create_app(settings_for(db, db_pool_max_size=2))) as client:
        lock = threading.Lock()
        codes: list[int] = []

        def post(user: uuid.UUID) -> None:
            response = deliver(client, encode(sold_checkout_event(db, user, "pack_100")))
            with lock:
                codes.append(response.status_code)

        threads = [threading.Thread(target=post, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert codes == [200] * 6
    assert all(account(db, u)["balance"] == 200 for u in users)


def test_a_session_made_elsewhere_should_credit_through_its_line_items(db: Database) -> None:
    """A Payment Link's session (no metadata.product, never recorded): the service fetches its
    line items from Stripe (the double) into the event, and a pack's price there credits it."""
    from tests.app_support import PACK_PRICE, derived_checkout_event, put_product
    from tests.stripe_double import StripeDouble

    put_product(db, "pack_100", tokens=100, price_cents=500, stripe_price_id=PACK_PRICE)
    user = new_user(db)
    event = derived_checkout_event(user, "pack_100")
    session = event["data"]["object"]
    session["metadata"] = {}
    with db.connect() as conn:
        conn.execute(
            "select * from public.link_stripe_customer(%s, %s)", [user, session["customer"]]
        )
    before = account(db, user)["balance"]
    with StripeDouble() as double:
        double.add_price(PACK_PRICE, unit_amount=500, currency="usd")
        double.add_line_items(session["id"], PACK_PRICE, quantity=2)
        with TestClient(create_app(settings_for(db, stripe_url=double.url))) as client:
            response = deliver(client, encode(event))
        fetched = [r for r in double.requests if r.method == "GET"]
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "applied", response.text
    assert account(db, user)["balance"] == before + 200
    assert [r.path for r in fetched] == [f"/v1/checkout/sessions/{session['id']}/line_items"]
