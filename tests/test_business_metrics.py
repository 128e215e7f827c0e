"""The business figures on GET /metrics: what public.business_metrics() counts (exactly, and
incrementally: the ledger's totals advance by the entries created since the last call), their
Prometheus names and types, and the cache that keeps a scrape from asking the database more
than once every METRICS_BUSINESS_SECONDS."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import scalar, settings_for
from token_billing.server.app import create_app

TOKEN = "metrics-token-0123456789"  # noqa: S105 - a test value


def figures(db: Database, lag: str = "0 seconds") -> dict[tuple[str, str], int]:
    with db.connect() as conn:
        rows = conn.execute(
            "select metric, labels::text, value from public.business_metrics(%s::interval)", [lag]
        ).fetchall()
    return {(m, labels): int(v) for m, labels, v in rows}


def ledger_truth(db: Database) -> dict[str, tuple[int, int]]:
    with db.connect() as conn:
        rows = conn.execute(
            "select kind, coalesce(sum(amount) filter (where amount > 0), 0), "
            "coalesce(-sum(amount) filter (where amount < 0), 0) "
            "from billing.ledger_entries group by kind"
        ).fetchall()
    return {kind: (int(c), int(d)) for kind, c, d in rows}


def activity(db: Database, n: int) -> None:
    for _ in range(n):
        user = uuid.uuid4()
        db.create_user(user)
        for sql in [
            "select status from public.add_tokens(%s, 300, %s, 'purchase')",
            "select status from public.deduct_tokens(%s, 120, %s)",
            "select status from public.adjust_tokens(%s, -30, 'test: take back', %s)",
        ]:
            assert scalar(db, sql, [str(user), f"bm-{uuid.uuid4()}"]) == "applied"


def test_ledger_totals_should_count_every_entry_once_across_calls(db: Database) -> None:
    activity(db, 3)
    first = figures(db)
    activity(db, 4)
    second = figures(db)
    truth = ledger_truth(db)
    assert second[("token_billing_tokens_used_total", "{}")] == truth["usage"][1] == 7 * 120
    assert second[("token_billing_tokens_granted_total", '{"kind": "purchase"}')] == 7 * 300
    assert (
        second[("token_billing_tokens_granted_total", '{"kind": "signup"}')] == truth["signup"][0]
    )
    assert second[("token_billing_tokens_taken_back_total", '{"kind": "adjustment"}')] == 7 * 30
    assert second[("token_billing_tokens_expired_total", "{}")] == 0
    assert first[("token_billing_tokens_used_total", "{}")] == 3 * 120, "the first call counted 3"
    # With the default lag, what was just written is not counted yet, and nothing twice.
    lagged = figures(db, "10 minutes")
    assert lagged[("token_billing_tokens_used_total", "{}")] == 7 * 120
    with db.connect() as conn:
        through = conn.execute("select ledger_through from billing.metric_state").fetchone()
    assert through is not None


def test_metrics_should_serve_the_business_figures_cached(db: Database) -> None:
    user = uuid.uuid4()
    db.create_user(user)
    with db.connect() as conn:
        conn.execute(
            "insert into billing.stripe_payments (id, source, user_id, product_code, quantity, "
            "tokens, amount_paid_cents, currency) values "
            "('cs_test_bm_1', 'checkout_session', %s, 'pack_250', 1, 250, 1000, 'usd')",
            [user],
        )
    settings = settings_for(db, metrics_token=TOKEN, metrics_business_seconds=1)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def scrape(client: TestClient) -> dict[tuple[Any, ...], Any]:
        response = client.get("/metrics", headers=auth)
        assert response.status_code == 200
        out: dict[tuple[Any, ...], Any] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                out[(family.type, sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    with TestClient(create_app(settings)) as client:
        first = scrape(client)
        revenue = ("counter", "token_billing_revenue_cents_total", (("currency", "usd"),))
        assert first[revenue] == 1000
        assert ("gauge", "token_billing_stripe_events_parked", ()) in first
        assert ("counter", "token_billing_tokens_used_total", ()) in first
        assert first[("counter", "token_billing_business_metrics_failures_total", ())] == 0
        with db.connect() as conn:
            conn.execute(
                "insert into billing.stripe_payments (id, source, user_id, product_code, "
                "quantity, tokens, amount_paid_cents, currency) values "
                "('cs_test_bm_2', 'checkout_session', %s, 'pack_250', 1, 250, 500, 'usd')",
                [user],
            )
        assert scrape(client)[revenue] == 1000, "within METRICS_BUSINESS_SECONDS: the cache"
        time.sleep(1.1)
        assert scrape(client)[revenue] == 1500, "after it: asked again"


def test_no_business_figures_when_turned_off(db: Database) -> None:
    settings = settings_for(db, metrics_token=TOKEN, metrics_business_seconds=0)
    with TestClient(create_app(settings)) as client:
        text = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert "token_billing_http_requests" in text or "token_billing_webhook" in text
    assert "token_billing_revenue_cents_total" not in text
