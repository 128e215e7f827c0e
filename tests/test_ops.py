"""The operator dashboard: GET /ops and GET /v1/ops/summary, against every credential, and the
page in headless Chromium showing the figures the SQL reports."""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from scripts.pgcluster import Database
from tests.app_support import running_server, settings_for, user_token
from tests.browser_support import ARTIFACTS, Browser, missing_prerequisites
from tests.revenue_support import (
    PLANS,
    add_months,
    deliver_all,
    generate,
    month_start,
    pack_history,
)

TOKEN = "operator-token-0123456789abcdef-0123456789"  # noqa: S105 - a test value


@pytest.fixture
def service(db: Database) -> Iterator[str]:
    with running_server(settings_for(db, operator_token=TOKEN)) as url:
        yield url


def _history(db: Database, customers: int = 40) -> tuple[datetime, datetime]:
    """A year of subscriptions (tests/test_revenue.py's generator), delivered; the period."""
    now = datetime.now(UTC)
    first = add_months(now.year, now.month, -11)
    start = month_start(*first)
    with db.connect() as conn:
        for code, (currency, unit, _) in PLANS.items():
            conn.execute(
                "insert into billing.products (code, kind, name, tokens, price_cents, currency, "
                "stripe_price_id) values (%s, 'plan', %s, 1000, %s, %s, %s)",
                [code, code, unit, currency, f"price_{code}"],
            )
    users = [uuid.uuid4() for _ in range(customers)]
    for n, user in enumerate(users):
        db.create_user(user)
        with db.connect() as conn:
            conn.execute(
                "select * from public.link_stripe_customer(%s, %s)", [str(user), f"cus_rv{n:05d}"]
            )
    rng = random.Random(7)
    changes = generate(rng, start, int(now.timestamp()) - 60, users)
    payments, _ = pack_history(db, rng, start, int(now.timestamp()) - 60, count=40)
    deliver_all(db, [c.event for c in changes] + payments, workers=4)
    return datetime.fromtimestamp(start, UTC), now


def test_without_operator_token_neither_route_exists(db: Database) -> None:
    with running_server(settings_for(db)) as url:
        assert httpx.get(f"{url}/ops").status_code == 404
        response = httpx.get(f"{url}/v1/ops/summary", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer x"},
        {"Authorization": f"Bearer {TOKEN.upper()}"},
    ],
    ids=["missing", "no-scheme", "basic", "short", "long", "other", "case"],
)
def test_summary_should_refuse_a_missing_or_forged_token(
    service: str, headers: dict[str, str]
) -> None:
    response = httpx.get(f"{service}/v1/ops/summary", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == 'Bearer realm="operator"'


def test_summary_should_refuse_a_users_supabase_token(db: Database, service: str) -> None:
    user = uuid.uuid4()
    db.create_user(user)
    response = httpx.get(
        f"{service}/v1/ops/summary", headers={"Authorization": f"Bearer {user_token(user)}"}
    )
    assert response.status_code == 401


def test_summary_should_report_what_the_sql_reports(db: Database, service: str) -> None:
    start, now = _history(db)
    with db.connect() as conn:
        conn.execute(
            "insert into billing.alerts (kind, subject, period_start, currency, detail) values "
            "('margin_below_floor', 'pro', date_trunc('month', now()), 'usd', "
            '\'{"margin_bp": 1200, "floor_bp": 2000}\')'
        )
    until = datetime(now.year + 1, 1, 1, tzinfo=UTC)
    period = {"from": start.date().isoformat(), "to": until.date().isoformat()}
    response = httpx.get(
        f"{service}/v1/ops/summary", params=period, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert (body["period_from"], body["period_to"]) == (period["from"], period["to"])
    with db.connect() as conn:
        mrr = conn.execute(
            "select month_start, currency, mrr_end_cents, churned_cents, ltv_cents "
            "from public.mrr_report(%s, %s)",
            [start, until],
        ).fetchall()
        flow = conn.execute(
            "select kind, tokens from public.token_flow_report(%s, %s, 'month')",
            [start, until],
        ).fetchall()
    got = [
        (
            datetime.fromisoformat(r["month_start"]),
            r["currency"],
            r["mrr_end_cents"],
            r["churned_cents"],
            r["ltv_cents"],
        )
        for r in body["mrr"]
    ]
    assert got == [tuple(r) for r in mrr]
    assert len(got) > 12, "a year of months, per currency"
    assert [(r["kind"], r["tokens"]) for r in body["token_flow"]] == [tuple(r) for r in flow]
    with db.connect() as conn:
        revenue = conn.execute(
            "select currency, gross_cents, net_cents from public.revenue_report(%s, %s, 'month')",
            [start, until],
        ).fetchall()
    assert [(r["currency"], r["gross_cents"], r["net_cents"]) for r in body["revenue"]] == [
        tuple(r) for r in revenue
    ]
    assert len(revenue) > 5
    assert [(a["kind"], a["subject"], a["detail"]["margin_bp"]) for a in body["alerts"]] == [
        ("margin_below_floor", "pro", 1200)
    ]

    bad = httpx.get(
        f"{service}/v1/ops/summary",
        params={"from": "2026-05-01", "to": "2026-04-01"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert bad.status_code == 422


def test_page_should_be_static_and_locked_down(service: str) -> None:
    page = httpx.get(f"{service}/ops")
    assert page.status_code == 200
    assert "operator dashboard" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    script = httpx.get(f"{service}/ops/ops.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{service}/ops/..%2Fsettings.py").status_code == 404
    assert httpx.get(f"{service}/ops/index.html").status_code == 404


@pytest.mark.slow
def test_dashboard_page_should_chart_the_figures_in_chromium(db: Database, service: str) -> None:
    missing = missing_prerequisites()
    if missing:
        pytest.fail("the browser tests need: " + ", ".join(missing))
    start, _ = _history(db)
    with db.connect() as conn:
        rows: list[Any] = conn.execute(
            "select currency, mrr_end_cents, subscribers_end, month_start "
            "from public.mrr_report(%s, now() + interval '1 day') order by month_start",
            [start],
        ).fetchall()
    last_usd = [r for r in rows if r[0] == "usd"][-1]
    months = len({r[3] for r in rows})
    with Browser() as browser:
        browser.goto(f"{service}/ops")
        browser.fill("#token", "wrong-token")
        browser.click("button[type=submit]")
        browser.wait_for_text("#status", "OPERATOR_TOKEN")
        assert not browser.visible("#dashboard")

        browser.fill("#token", TOKEN)
        browser.fill("#from", start.date().isoformat())
        browser.click("button[type=submit]")
        dollars = re.escape(f"${last_usd[1] / 100:,.2f}")
        browser.wait_for_text("[data-testid=mrr-usd] .value", f"^{dollars}$")
        assert browser.text("[data-testid=subscribers-usd] .value") == str(last_usd[2])
        assert browser.count("#mrr-chart polyline") == len({r[0] for r in rows})
        assert browser.count("#mrr-chart circle") == months * len({r[0] for r in rows})
        assert browser.count("#movement-chart rect") == months * 4
        assert browser.count("#token-chart rect") >= 3
        assert browser.count("#revenue-chart rect") >= 4
        assert browser.text("[data-testid=revenue-usd] .value").startswith("$")
        shot = browser.screenshot(ARTIFACTS / "ops-dashboard.png")
        assert shot.stat().st_size > 20_000, "a page with charts, not a blank one"
        errors = [line for line in browser.console() if "error" in line.lower()]
        # The one refused request (the wrong token) and nothing else: no script error, no CSP
        # violation.
        assert errors == [
            "error: Failed to load resource: the server responded with a status of 401 "
            "(Unauthorized)"
        ]

        browser.reload()  # the token stays for the tab
        browser.wait_for_text("[data-testid=mrr-usd] .value", r"\$")
