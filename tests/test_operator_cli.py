"""`token-billing user` and `token-billing events parked|replay` against the real database."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scripts.pgcluster import Database
from tests.app_support import JWT_SECRET, STRIPE_KEY, WEBHOOK_SECRET, record_sale, scalar
from token_billing.cli import main
from token_billing.cli.stripe_events import Product, checkout_session, envelope, invoice


@pytest.fixture
def cli_env(db: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {
        "ENVIRONMENT": "test",
        "DATABASE_URL": db.dsn(),
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)


def _sql(db: Database, query: str, params: list[Any] | None = None) -> Any:
    return scalar(db, query, params)


def _user_with_history(db: Database) -> uuid.UUID:
    """A user with a pack bought, an expiring grant, a pending hold and some usage."""
    user = uuid.uuid4()
    db.create_user(user, f"Ops.{user.hex[:8]}@Example.com")
    _sql(db, "select status from public.add_tokens(%s, 250, 'ops-pack', 'purchase')", [str(user)])
    _sql(
        db,
        "select status from public.add_tokens(%s, 40, 'ops-promo', 'promotion', 'welcome', "
        "now() + interval '30 days')",
        [str(user)],
    )
    _sql(
        db,
        "select status from public.deduct_tokens(%s, 15, 'ops-use', 'one agent run')",
        [str(user)],
    )
    _sql(
        db,
        "select status from public.reserve_tokens(%s, 60, 'ops-hold', interval '10 minutes')",
        [str(user)],
    )
    return user


def test_user_should_show_balance_holds_buckets_and_entries(
    db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    user = _user_with_history(db)
    assert main(["user", str(user)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"user {user} Ops.{user.hex[:8]}@Example.com"
    assert out[1] == "account: balance 375, available 315, reserved 60; plan free (none)"
    assert out[2] == "holds: 1 pending"
    assert re.fullmatch(
        r"  [0-9a-f-]{36} 60 tokens, expires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(key ops-hold\)",
        out[3],
    )
    buckets = out[out.index("buckets: 3 live") + 1 : out.index("entries: newest 4")]
    assert any(b.startswith("  40 of 40 (promotion, entry ") and "expires" in b for b in buckets)
    assert any(b.endswith("no expiry") and "(purchase, entry " in b for b in buckets)
    entries = out[out.index("entries: newest 4") + 1 :][:4]
    assert entries[0].split()[4:8] == ["usage", "-15", "->", "375"]
    assert entries[0].endswith("  one agent run")
    assert [e.split()[4] for e in entries] == ["usage", "promotion", "purchase", "signup"]
    assert "stripe customers: none" in out
    assert out[-1] == "parked events: 0"


def test_user_should_be_found_by_email_any_case_and_as_json(
    db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    user = _user_with_history(db)
    assert main(["user", f"ops.{user.hex[:8]}@example.COM", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["user_id"] == str(user)
    assert report["account"]["balance"] == 375
    assert report["account"]["available"] == 315
    assert [h["amount"] for h in report["holds"]] == [60]
    # Usage draws from the buckets lazily: what they hold less what is undrawn is the balance.
    assert sum(b["remaining"] for b in report["buckets"]) - report["account"]["undrawn"] == 375
    assert len(report["entries"]) == 4

    assert main(["user", "nobody@example.com"]) == 1
    assert "no user 'nobody@example.com'" in capsys.readouterr().err


def test_events_parked_lists_why_and_replay_applies_once_the_cause_is_fixed(
    db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    user = uuid.uuid4()
    db.create_user(user)
    plan = Product("starter", "plan", 5000, 2900, "usd", "price_ops_starter")
    event = envelope("invoice.paid", invoice(str(user), plan))
    status = _sql(
        db, "select status from public.handle_stripe_event(%s::jsonb)", [json.dumps(event)]
    )
    assert status == "parked"

    assert main(["events", "parked"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{event['id']} invoice.paid ")
    assert "price_ops_starter" in lines[0]

    assert main(["user", str(user), "--json"]) == 0
    parked = json.loads(capsys.readouterr().out)["parked_events"]
    assert [p["id"] for p in parked] == [event["id"]], "the user's report names the parked event"

    assert main(["events", "replay", "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["event_id"], row["status"]) == (event["id"], "parked"), "still unmapped"

    with db.connect() as conn:
        conn.execute(
            "update billing.products set stripe_price_id = 'price_ops_starter' "
            "where code = 'starter'"
        )
    assert main(["events", "replay", "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["status"] != "parked"
    assert main(["events", "parked"]) == 0
    assert capsys.readouterr().out == "no parked events\n"

    assert main(["events", "parked", "--limit", "0"]) == 1
    assert "p_limit must be between 1 and 10000, got 0" in capsys.readouterr().err


def test_report_usage_and_mrr_as_table_and_csv(
    db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _user_with_history(db)
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)
    assert (
        main(["report", "usage", "--from", str(today), "--to", str(tomorrow), "--by", "day"]) == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["period_start", "kind", "entries", "tokens"]
    assert [str(today), "promotion", "1", "40"] in [line.split() for line in table]
    assert [str(today), "usage", "1", "-15"] in [line.split() for line in table]
    end_of_entries = table[0].index("entries") + len("entries")
    assert table[1][end_of_entries - 1] == "1", "numbers align right under their header"

    args = ["report", "usage", "--from", str(today), "--to", str(tomorrow), "--csv"]
    assert main(args) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["period_start", "kind", "entries", "tokens"]
    assert [today.replace(day=1).isoformat(), "purchase", "1", "250"] in rows

    user = uuid.uuid4()
    db.create_user(user)
    event = envelope(
        "checkout.session.completed",
        checkout_session(str(user), Product("pack_250", "pack", 250, 1000, "usd", None)),
    )
    record_sale(db, event)
    _sql(db, "select status from public.handle_stripe_event(%s::jsonb)", [json.dumps(event)])
    assert main(["report", "revenue", "--from", str(today), "--to", str(tomorrow), "--csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0][:4] == ["period_start", "currency", "payments", "gross_cents"]
    assert rows[1][1:4] == ["usd", "1", "1000"]
    assert rows[1][-1] == "1000", "net"
    assert main(["report", "products", "--from", str(today), "--to", str(tomorrow)]) == 0
    product_rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert product_rows[1][:4] == ["pack_250", "pack", "usd", "1"]

    assert main(["report", "failures", "--from", str(today), "--to", str(tomorrow)]) == 0
    assert capsys.readouterr().out == "(no rows)\n"

    assert main(["report", "mrr", "--from", str(today), "--to", str(tomorrow)]) == 0
    assert capsys.readouterr().out == "(no rows)\n"
    assert main(["report", "mrr", "--from", str(tomorrow), "--to", str(today)]) == 2
    assert "--to must be later than --from" in capsys.readouterr().err
