"""`token-billing stripe reconcile` against the local Stripe double and the real database.

Stripe's lists are paged (100 a page at most, `starting_after`), so the window holds more events
than one page: the command must follow the pages, store exactly the events the database lacks,
once however often it runs, and report the paid objects whose credit is missing or wrong.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.pgcluster import Database
from tests.app_support import (
    JWT_SECRET,
    STRIPE_KEY,
    WEBHOOK_SECRET,
    account,
    new_user,
    record_sale,
    scalar,
)
from tests.stripe_double import StripeDouble
from token_billing.cli import main
from token_billing.cli.stripe_events import Product, checkout_session, envelope, invoice
from token_billing.server.reconcile import parse_since

PACK = Product("pack_250", "pack", 250, 1000, "usd", None)
PLAN_PRICE = "price_reconcile_starter"


@pytest.fixture
def stripe_env(
    db: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[StripeDouble]:
    with StripeDouble() as double:
        env = {
            "ENVIRONMENT": "test",
            "DATABASE_URL": db.dsn(),
            "SUPABASE_JWT_SECRET": JWT_SECRET,
            "STRIPE_SECRET_KEY": STRIPE_KEY,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_MAX_NETWORK_RETRIES": "0",
            "STRIPE_API_BASE": double.url,
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(tmp_path)  # no stray .env
        yield double


def _deliver(db: Database, event: dict[str, Any]) -> str:
    """What the webhook does with a delivered event: the one RPC."""
    status = scalar(
        db, "select status from public.handle_stripe_event(%s::jsonb)", [json.dumps(event)]
    )
    return str(status)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    code = main(["stripe", "reconcile", "--output", "json", *args])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def _purchases(
    db: Database,
    double: StripeDouble,
    users: list[uuid.UUID],
    start: int,
    *,
    amount: int | None = None,
) -> list[dict[str, Any]]:
    """One paid pack session per user (recorded, as the service records what it sells) and its
    checkout.session.completed, both listed by the double, a minute apart from `start`."""
    events = []
    for n, user in enumerate(users):
        session = checkout_session(str(user), PACK)
        session["created"] = start + 60 * n
        event = envelope("checkout.session.completed", dict(session), created=start + 60 * n + 1)
        record_sale(db, event)
        if amount is not None:
            session["amount_total"] = amount  # what Stripe's list says was paid
        double.add_listed(session)
        double.add_listed(event)
        events.append(event)
    return events


def test_since_should_be_a_span_stripe_still_keeps() -> None:
    assert parse_since("72h") == 72 * 3600
    assert parse_since("30d") == 30 * 86_400
    assert parse_since("15m") == 900
    for bad, said in [("31d", "keeps 30 days"), ("yesterday", "a span like"), ("0h", "than 0")]:
        with pytest.raises(ValueError, match=said):
            parse_since(bad)


def test_reconcile_should_store_lost_events_once_and_report_drift(
    db: Database, stripe_env: StripeDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    double = stripe_env
    now = int(time.time())
    start = now - 48 * 3600
    users = [new_user(db) for _ in range(230)]
    events = _purchases(db, double, users, start)
    lost = {events[n]["id"] for n in (0, 57, 101, 199, 229)}
    for event in events:
        if event["id"] not in lost:
            assert _deliver(db, event) == "applied"
    # Outside the window: listed by Stripe, never stored, and not this run's business.
    old_user = new_user(db)
    old = _purchases(db, double, [old_user], now - 80 * 3600)[0]
    # A paid session whose event never reached Stripe's list either: nothing can heal it.
    orphan_user = new_user(db)
    orphan = checkout_session(str(orphan_user), PACK)
    orphan["created"] = now - 3600
    double.add_listed(orphan)
    # A payment Stripe says was for more than the credit recorded.
    short_user = new_user(db)
    short = _purchases(db, double, [short_user], now - 1800, amount=1500)[0]
    assert _deliver(db, short) == "applied"
    # Another product line of the same Stripe account: not this plugin's, never reported.
    foreign = checkout_session(str(new_user(db)), PACK)
    foreign["metadata"] = {"sku": "tshirt"}
    foreign["created"] = now - 600
    double.add_listed(foreign)
    balances = {u: account(db, u)["balance"] for u in users}
    entries = scalar(db, "select count(*) from billing.ledger_entries")

    # A dry run reports and stores nothing.
    code, lines = _run(capsys, "--since", "72h", "--dry-run")
    assert code == 1
    assert {x["event_id"] for x in lines if x["kind"] == "replay"} == lost
    assert {x["status"] for x in lines if x["kind"] == "replay"} == {"dry_run"}
    assert scalar(db, "select count(*) from billing.ledger_entries") == entries

    double.clear()
    run_started = int(time.time())
    code, lines = _run(capsys, "--since", "72h")
    run_ended = int(time.time())
    replays = [x for x in lines if x["kind"] == "replay"]
    assert [x["event_id"] for x in replays] == [e["id"] for e in events if e["id"] in lost]
    assert {x["status"] for x in replays} == {"applied"}
    for n, user in enumerate(users):
        expected = balances[user] + (PACK.tokens if events[n]["id"] in lost else 0)
        assert account(db, user)["balance"] == expected, "each lost purchase credits once"
    assert account(db, old_user)["balance"] == 100, "an event outside --since is left alone"
    drifts = {x["object_id"]: x for x in lines if x["kind"] == "drift"}
    assert set(drifts) == {orphan["id"], short["data"]["object"]["id"]}
    assert drifts[orphan["id"]]["problem"] == "not_credited"
    assert drifts[orphan["id"]]["detail"] == "no stored event credited it"
    short_drift = drifts[short["data"]["object"]["id"]]
    assert short_drift["problem"] == "amount_differs"
    assert (short_drift["paid_cents"], short_drift["credited_cents"]) == (1500, 1000)
    summary = lines[-1]
    assert summary == {
        "kind": "summary",
        "since": summary["since"],
        "events_listed": 231,
        "events_unknown": 5,
        "replayed": 5,
        "failed": 0,
        "objects_checked": 233,
        "drifts": 2,
    }
    # The window starts 72 hours before the run (timed around the run: setting up 230 users
    # can take over a minute on a loaded machine).
    assert run_started - 72 * 3600 - 1 <= summary["since"] <= run_ended - 72 * 3600 + 1
    assert code == 1, "a drift that remains is a failure cron can alert on"
    # Stripe's pages were followed: 231 events at 100 a page.
    pages = [r for r in double.requests if r.path == "/v1/events"]
    assert len(pages) == 3
    assert [r.params.get("starting_after") is not None for r in pages] == [False, True, True]
    assert {r.params["created[gte]"] for r in pages} == {str(summary["since"])}
    assert scalar(db, "select count(*) from billing.check_invariants()") == 0
    assert old["id"] not in {x.get("event_id") for x in lines}

    # Running again replays nothing and reports the same drifts.
    code, again = _run(capsys, "--since", "72h")
    assert [x for x in again if x["kind"] == "replay"] == []
    assert {x["object_id"] for x in again if x["kind"] == "drift"} == set(drifts)
    assert code == 1


def test_reconcile_should_report_parked_replays_and_unmapped_invoices(
    db: Database, stripe_env: StripeDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invoice for a plan whose price is not mapped parks when replayed, and the drift names
    the parked event; an invoice for a price of another product is not reported."""
    double = stripe_env
    now = int(time.time())
    user = new_user(db)
    plan = Product("starter", "plan", 5000, 2900, "usd", PLAN_PRICE)
    inv = invoice(str(user), plan)
    inv["created"] = now - 7200
    event = envelope("invoice.paid", dict(inv), created=now - 7100)
    double.add_listed(inv)
    double.add_listed(event)
    other = invoice(str(user), Product("other", "plan", 1, 500, "usd", "price_not_ours"))
    other["created"] = now - 3600
    double.add_listed(other)

    code, lines = _run(capsys, "--since", "24h")
    # The plan has no stripe_price_id yet: the replayed event parks; the invoice is not ours.
    assert [x["status"] for x in lines if x["kind"] == "replay"] == ["parked"]
    assert [x for x in lines if x["kind"] == "drift"] == []
    assert code == 0

    with db.connect() as conn:
        conn.execute(
            "update billing.products set stripe_price_id = %s where code = 'starter'",
            [PLAN_PRICE],
        )
    code, lines = _run(capsys, "--since", "24h")
    drifts = [x for x in lines if x["kind"] == "drift"]
    assert [(d["object_id"], d["problem"]) for d in drifts] == [(inv["id"], "not_credited")]
    assert drifts[0]["detail"].startswith(f"its event {event['id']} is parked: invoice ")
    assert code == 1


def test_reconcile_text_output_and_refusals(
    db: Database, stripe_env: StripeDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    user = new_user(db)
    _purchases(db, stripe_env, [user], int(time.time()) - 600)
    assert main(["stripe", "reconcile", "--output", "text", "--since", "1h"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("events: 1 listed since ")
    assert out[0].endswith(" UTC, 1 never stored")
    assert out[1].startswith("replayed evt_")
    assert ": applied (credited 250 tokens (pack_250 x 1) to user " in out[1]
    assert out[-1] == "reconcile: 1 replayed, 0 failed, 0 drifts"
    assert account(db, user)["balance"] == 100 + PACK.tokens

    assert main(["stripe", "reconcile", "--since", "45d"]) == 2
    assert "keeps 30 days" in capsys.readouterr().err
    stripe_env.fail_next(401, error_type="invalid_request_error", message="Invalid API Key")
    assert main(["stripe", "reconcile", "--since", "1h"]) == 1
    assert "Stripe refused" in capsys.readouterr().err
