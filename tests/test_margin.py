"""The cost side and the operator's adjustments, against figures computed here.

A generated history (60 users over 4 months: payments in dollars and euros, refunds, lost
disputes, usage with costs from the rate card, from the caller and unknown, on several plans)
and the margin the migration's stated rule gives it, computed in this file from the generated
rows alone and compared exactly with `public.margin_report` and `token-billing report margin`;
the margin floor's alert and its exit status; `token-billing adjust`, idempotent by default.
"""

from __future__ import annotations

import csv
import io
import json
import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from scripts.pgcluster import Database
from tests.app_support import JWT_SECRET, STRIPE_KEY, WEBHOOK_SECRET, scalar
from tests.revenue_support import add_months
from token_billing.cli import main
from token_billing.cli.operator import adjustment_key

MICRO = 1_000_000


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


def half_away(x: Fraction) -> int:
    """Postgres' round() of a numeric: half away from zero."""
    n = abs(x)
    whole = int(n)
    if n - whole >= Fraction(1, 2):
        whole += 1
    return whole if x >= 0 else -whole


def month_of(t: datetime) -> datetime:
    return datetime(t.year, t.month, 1, tzinfo=UTC)


def generate(db: Database, rng: random.Random) -> tuple[list[datetime], dict[str, Any]]:
    """The history, written as the owner (payments, refunds, disputes, usage records with
    their created_at in the past), and what it is made of."""
    now = datetime.now(UTC)
    first = add_months(now.year, now.month, -3)
    months = [datetime(*add_months(*first, n), 1, tzinfo=UTC) for n in range(4)]
    end = months[-1] + timedelta(days=1)
    plans = ["free", "starter", "pro"]
    users = [uuid.uuid4() for _ in range(60)]
    # user, at, currency, cents, payment id
    money: list[tuple[uuid.UUID, datetime, str, int, str]] = []
    usage: list[
        tuple[uuid.UUID, datetime, int | None, int, str]
    ] = []  # user, at, cost, tokens, plan
    final_plan: dict[uuid.UUID, str] = {}
    with db.connect() as conn:
        for n, user in enumerate(users):
            db.create_user(user)
            currency = "eur" if n % 5 == 0 else "usd"
            for p in range(rng.randint(0, 3)):
                paid_at = rng.choice(months) + timedelta(
                    days=rng.randrange(27), seconds=rng.randrange(86_400)
                )
                if paid_at >= now:
                    paid_at = now - timedelta(hours=1)
                cents = rng.choice([500, 1000, 2000, 2900])
                pid = f"cs_test_mg{n:03d}x{p}"
                conn.execute(
                    "insert into billing.stripe_payments (id, source, user_id, product_code, "
                    "quantity, tokens, amount_paid_cents, currency, paid_at) values "
                    "(%s, 'checkout_session', %s, 'pack_250', 1, 250, %s, %s, %s)",
                    [pid, user, cents, currency, paid_at],
                )
                money.append((user, paid_at, currency, cents, pid))
                roll = rng.random()
                if roll < 0.2:
                    back = rng.choice([cents, cents // 2])
                    at = min(paid_at + timedelta(days=rng.randrange(1, 20)), now)
                    status = rng.choice(["succeeded", "succeeded", "failed"])
                    conn.execute(
                        "insert into billing.stripe_refunds (id, payment_id, amount_cents, status, "
                        "refund_created) values (%s, %s, %s, %s, %s)",
                        [f"re_mg{n:03d}x{p}", pid, back, status, at],
                    )
                    if status != "failed":
                        money.append((user, at, currency, -back, pid))
                elif roll < 0.27:
                    at = min(paid_at + timedelta(days=rng.randrange(5, 30)), now)
                    conn.execute(
                        "insert into billing.stripe_disputes (id, payment_id, amount_cents, "
                        "status, last_event_created) values (%s, %s, %s, 'lost', %s)",
                        [f"dp_mg{n:03d}x{p}", pid, cents, at],
                    )
                    money.append((user, at, currency, -cents, pid))
            plan = rng.choice(plans)
            for _ in range(rng.randint(0, 6)):
                at = rng.choice(months) + timedelta(days=rng.randrange(27))
                if at >= now:
                    at = now - timedelta(minutes=30)
                cost = None if rng.random() < 0.1 else rng.randrange(0, 1500 * MICRO)
                tokens = rng.randrange(1, 500)
                if rng.random() < 0.3:
                    plan = rng.choice(plans)  # the plan changed since
                usage.append((user, at, cost, tokens, plan))
            final_plan[user] = rng.choice(plans)
            conn.execute(
                "update billing.accounts set plan = %s where user_id = %s", [final_plan[user], user]
            )
        # Usage written with its own created_at (record_usage stamps now()); the records'
        # ids follow their time so "the last record of the period" is the newest.
        for user, at, cost, tokens, plan in sorted(usage, key=lambda u: u[1]):
            conn.execute(
                "insert into billing.usage_records (user_id, idempotency_key, line, meter_code, "
                "quantity, dimension_value, price_id, tokens, cost_microcents, plan, created_at) "
                "values (%s, %s, 1, 'gen.meter', 1, '', 1, %s, %s, %s, %s)",
                [user, f"mg-{uuid.uuid4()}", tokens, cost, plan, at],
            )
    return [*months, end], {"money": money, "usage": usage, "final_plan": final_plan}


def expected_margin(
    history: dict[str, Any], start: datetime, end: datetime, group: str
) -> list[tuple[Any, ...]]:
    """margin_report's rows by the rule of 20261202650100_margin.sql, monthly, cost currency usd."""
    revenue: dict[tuple[datetime, uuid.UUID, str], int] = defaultdict(int)
    for user, at, currency, cents, _ in history["money"]:
        if start <= at < end:
            revenue[(month_of(at), user, currency)] += cents
    used: dict[tuple[datetime, uuid.UUID], list[Any]] = {}
    for user, at, cost, tokens, plan in sorted(history["usage"], key=lambda u: u[1]):
        if start <= at < end:
            u = used.setdefault((month_of(at), user), [0, 0, 0, None])
            u[0] += cost or 0
            u[1] += cost is None
            u[2] += tokens
            u[3] = plan

    def user_currency(user: uuid.UUID, t0: datetime) -> str:
        t1 = datetime(*add_months(t0.year, t0.month, 1), 1, tzinfo=UTC)
        paid = [
            (at, pid, c) for u, at, c, cents, pid in history["money"] if u == user and cents > 0
        ]
        before = sorted(p for p in paid if p[0] < t1)
        return before[-1][2] if before else "usd"

    rows: dict[tuple[datetime, str, uuid.UUID], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for (t0, user, currency), cents in revenue.items():
        rows[(t0, currency, user)][0] += cents
    for (t0, user), (cost, uncosted, tokens, _) in used.items():
        r = rows[(t0, user_currency(user, t0), user)]
        r[1] += cost
        r[2] += uncosted
        r[3] += tokens

    grouped: dict[tuple[Any, ...], list[Any]] = {}
    for (t0, currency, user), (cents, cost, uncosted, tokens) in rows.items():
        found = used.get((t0, user))
        plan = found[3] if found is not None else history["final_plan"][user]
        key = (t0, currency, plan if group != "total" else None, user if group == "user" else None)
        g = grouped.setdefault(key, [set(), 0, 0, 0, 0])
        g[0].add(user)
        g[1] += cents
        g[2] += cost
        g[3] += uncosted
        g[4] += tokens
    out = []
    for key in sorted(grouped, key=lambda k: (k[0], k[1], k[2] or "", str(k[3] or ""))):
        users, cents, cost, uncosted, tokens = grouped[key]
        margin = cents * MICRO - cost if key[1] == "usd" else None
        bp = (
            half_away(Fraction(margin * 10000, cents * MICRO))
            if margin is not None and cents > 0
            else None
        )
        out.append((*key, len(users), cents, "usd", cost, uncosted, tokens, margin, bp))
    return out


def test_margin_report_should_match_the_generated_history_exactly(
    db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    months, history = generate(db, random.Random(1818))
    start, end = months[0], months[-1]
    with db.connect() as conn:
        got = {
            group: [
                tuple(r)
                for r in conn.execute(
                    "select * from public.margin_report(%s, %s, 'month', %s)", [start, end, group]
                ).fetchall()
            ]
            for group in ("user", "plan", "total")
        }
    for group, rows in got.items():
        assert rows == expected_margin(history, start, end, group), group
    assert sum(1 for r in got["plan"] if r[1] == "eur") >= 3, "euro payers are reported apart"
    assert all(r[10] is None for r in got["plan"] if r[1] == "eur"), "no margin across currencies"
    assert any(r[8] > 0 for r in got["plan"]), "some usage had no cost"
    assert any(r[11] is not None and r[11] < 0 for r in got["user"]), "some users cost more"
    # Per plan adds up to the total.
    for t0, currency, *_rest in got["total"]:
        parts = [r for r in got["plan"] if r[0] == t0 and r[1] == currency]
        total = next(r for r in got["total"] if r[0] == t0 and r[1] == currency)
        assert sum(r[5] for r in parts) == total[5]
        assert sum(r[7] for r in parts) == total[7]

    # The CLI prints the same rows.
    assert main(["report", "margin", "--from", start.strftime("%Y-%m-%d"),
                 "--to", end.strftime("%Y-%m-%d"), "--csv"]) == 0  # fmt: skip
    printed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [
        (r["period_start"], r["currency"], r["plan"], r["revenue_cents"], r["cost_microcents"])
        for r in printed
    ] == [(r[0].strftime("%Y-%m-%d"), r[1], r[2], str(r[5]), str(r[7])) for r in got["plan"]]


def test_margin_floor_should_alert_and_exit_3(
    db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    months, history = generate(db, random.Random(7))
    start, end = months[0], months[-1]
    args = ["report", "margin", "--from", start.strftime("%Y-%m-%d"),
            "--to", end.strftime("%Y-%m-%d"), "--check-floor"]  # fmt: skip
    assert main(args) == 0, "no floor set: nothing can be under it"
    assert "no floor set" in capsys.readouterr().out
    # The floor is checked over whole periods: every month the report's window meets.
    last = months[-2]
    whole = datetime(*add_months(last.year, last.month, 1), 1, tzinfo=UTC)
    plans = expected_margin(history, start, whole, "plan")
    under = {
        (r[0], r[2])
        for r in plans
        if r[1] == "usd" and r[5] > 0 and r[11] is not None and r[11] < 9000
    }
    assert under, "the generated history should have plans under a 90% floor"
    with db.connect() as conn:
        conn.execute("update billing.settings set margin_floor_bp = 9000")
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.count("margin floor: plan") == len(under)
    with db.connect() as conn:
        alerts = conn.execute(
            "select period_start, subject, (detail ->> 'margin_bp')::int from billing.alerts "
            "where kind = 'margin_below_floor'"
        ).fetchall()
    assert {(a[0], a[1]) for a in alerts} == under
    assert all(a[2] < 9000 for a in alerts)
    assert main(args) == 3
    assert scalar(db, "select count(*) from billing.alerts") == len(under), "raised once"


def test_adjust_should_apply_once_and_refuse_debt_unless_allowed(
    db: Database, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    user = uuid.uuid4()
    email = f"adj.{user.hex[:8]}@example.com"
    db.create_user(user, email)
    assert main(["adjust", email, "+50", "--reason", "goodwill: outage of 2 Dec"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"applied: +50 tokens for {user}, balance 150, entry ")
    assert main(["adjust", str(user), "+50", "--reason", "goodwill: outage of 2 Dec"]) == 0
    assert "(already applied: nothing changed)" in capsys.readouterr().out
    assert scalar(db, "select balance from billing.accounts where user_id = %s", [user]) == 150
    key = adjustment_key(str(user), 50, "goodwill: outage of 2 Dec")
    row = None
    with db.connect() as conn:
        row = conn.execute(
            "select kind, amount, description, metadata from billing.ledger_entries "
            "where idempotency_key = %s",
            [key],
        ).fetchone()
    assert row is not None
    assert row[:3] == ("adjustment", 50, "goodwill: outage of 2 Dec")
    assert row[3]["reason"] == "goodwill: outage of 2 Dec"
    assert row[3]["operator"], "the operator should be named (the login name by default)"

    assert main(["adjust", str(user), "-500", "--reason", "test grant back"]) == 1
    assert "insufficient_funds" in capsys.readouterr().err
    assert main(["adjust", str(user), "-500", "--reason", "test grant back", "--allow-debt",
                 "--json", "--idempotency-key", "ops-ticket-42"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert (result["status"], result["balance"], result["idempotency_key"]) == (
        "applied",
        -350,
        "ops-ticket-42",
    )
    assert scalar(db, "select count(*) from billing.check_invariants()") == 0
    assert main(["adjust", "nobody@example.com", "+5", "--reason", "who?"]) == 1
    with pytest.raises(SystemExit):
        main(["adjust", str(user), "0", "--reason", "nothing"])
