"""MRR, its movements and churn over a generated history, against figures computed here.

300 customers over 14 months subscribe monthly or yearly, in dollars or euros, change plans and
quantities, get coupons, fall past due and recover, and cancel. Each change is a real-shaped
customer.subscription.* event with its own Stripe `created`. The events are delivered in a
shuffled order, some twice, from 8 connections at once: MRR history must not depend on delivery.
The expected figures are computed in this file from the generated events alone, with exact
fractions and the rounding the migration states, and must match `public.mrr_report` exactly.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import pytest

from scripts.pgcluster import Database
from tests.app_support import scalar
from tests.revenue_support import (
    PLANS,
    RANK,
    Change,
    add_months,
    deliver_all,
    generate,
    half_up,
    month_start,
    pack_history,
)


def expected_report(changes: list[Change], months: list[tuple[int, int]]) -> list[tuple[Any, ...]]:
    by_sub: dict[str, list[Change]] = defaultdict(list)
    for c in changes:
        by_sub[c.subscription].append(c)
    for history in by_sub.values():
        history.sort(key=lambda c: (c.at, RANK.index(c.state.status), c.event["id"]))

    def worth(at: int) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = defaultdict(int)
        for history in by_sub.values():
            current = [c for c in history if c.at <= at]
            if current:
                c = current[-1]
                out[(c.payer, PLANS[c.state.code][0])] += c.state.mrr()
        return out

    rows = []
    for t0, t1 in months:
        a, b = worth(t0), worth(t1)
        for currency in ("eur", "usd"):
            keys = {k for k in a.keys() | b.keys() if k[1] == currency}
            pairs = [(a.get(k, 0), b.get(k, 0)) for k in keys]
            start = sum(x for x, _ in pairs)
            end = sum(y for _, y in pairs)
            if start == 0 and end == 0:
                continue
            subs_start = sum(x > 0 for x, _ in pairs)
            subs_end = sum(y > 0 for _, y in pairs)
            churned_subs = sum(x > 0 and y == 0 for x, y in pairs)
            rows.append(
                (
                    datetime.fromtimestamp(t0, UTC),
                    currency,
                    start,
                    end,
                    sum(y for x, y in pairs if x == 0 and y > 0),
                    sum(y - x for x, y in pairs if 0 < x < y),
                    sum(x - y for x, y in pairs if 0 < y < x),
                    sum(x for x, y in pairs if x > 0 and y == 0),
                    subs_start,
                    subs_end,
                    sum(x == 0 and y > 0 for x, y in pairs),
                    churned_subs,
                    half_up(Fraction(10000 * churned_subs, subs_start)) if subs_start else None,
                    half_up(Fraction(end, subs_end)) if subs_end else None,
                    half_up(Fraction(end * subs_start, subs_end * churned_subs))
                    if subs_start and churned_subs and subs_end
                    else None,
                )
            )
    return rows


def test_mrr_report_should_match_the_generated_history_exactly(db: Database) -> None:
    rng = random.Random(18)
    now = datetime.now(UTC)
    first = add_months(now.year, now.month, -13)
    months = [add_months(*first, n) for n in range(14)]
    bounds = [(month_start(*m), month_start(*add_months(*m, 1))) for m in months]
    start, end = bounds[0][0], int(now.timestamp()) - 60

    with db.connect() as conn:
        for code, (currency, unit, _) in PLANS.items():
            conn.execute(
                "insert into billing.products (code, kind, name, tokens, price_cents, currency, "
                "stripe_price_id) values (%s, 'plan', %s, 1000, %s, %s, %s)",
                [code, code, unit, currency, f"price_{code}"],
            )
    users = [uuid.uuid4() for _ in range(300)]
    for n, user in enumerate(users):
        db.create_user(user)
        scalar(
            db,
            "select status from public.link_stripe_customer(%s, %s)",
            [str(user), f"cus_rv{n:05d}"],
        )
    changes = generate(rng, start, end, users)
    events = [c.event for c in changes]
    deliveries = events + rng.sample(events, len(events) // 10)  # a tenth delivered twice
    rng.shuffle(deliveries)
    deliver_all(db, deliveries)

    with db.connect() as conn:
        got = conn.execute(
            "select * from public.mrr_report(%s, %s)",
            [datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(bounds[-1][1], UTC)],
        ).fetchall()
    want = expected_report(changes, bounds)
    assert len(changes) > 900, "the history should be long enough to mean something"
    assert sum(1 for c in changes if c.event["type"].endswith("deleted")) > 50
    assert [tuple(r) for r in got] == want
    # The lifetimes the report narrows by are what the states say, whatever the delivery order.
    assert (
        scalar(
            db,
            "select count(*) from billing.subscription_lifetimes as l "
            "full join (select distinct on (subscription_id) subscription_id, "
            "min(at) over (partition by subscription_id) as first_at, at, mrr_cents "
            "from billing.subscription_states "
            "order by subscription_id, at desc, status_rank desc, event_id desc) as s "
            "using (subscription_id) "
            "where l.first_at is distinct from s.first_at or l.last_at is distinct from s.at "
            "or l.last_mrr_cents is distinct from s.mrr_cents",
        )
        == 0
    )
    # Movements explain MRR: start + new + expansion - contraction - churned = end.
    for r in want:
        assert r[2] + r[4] + r[5] - r[6] - r[7] == r[3]
    assert scalar(db, "select count(*) from billing.check_invariants()") == 0


def test_mrr_report_refusals_and_one_currency(db: Database) -> None:
    with db.connect() as conn:
        for bad, said in [
            ("select * from public.mrr_report(now(), now() - interval '1 day')", "later than"),
            ("select * from public.mrr_report(now() - interval '11 years', now())", "10 years"),
        ]:
            with pytest.raises(Exception, match=said):
                conn.execute(bad)
            conn.rollback()
    # A history in both currencies: one currency's report is exactly that currency's rows of
    # the full report, whatever the case of the code.
    rng = random.Random(1805)
    now = datetime.now(UTC)
    start = month_start(*add_months(now.year, now.month, -3))
    with db.connect() as conn:
        for code, (currency, unit, _) in PLANS.items():
            conn.execute(
                "insert into billing.products (code, kind, name, tokens, price_cents, currency, "
                "stripe_price_id) values (%s, 'plan', %s, 1000, %s, %s, %s)",
                [code, code, unit, currency, f"price_{code}"],
            )
    users = [uuid.uuid4() for _ in range(30)]
    for n, user in enumerate(users):
        db.create_user(user)
        scalar(
            db,
            "select status from public.link_stripe_customer(%s, %s)",
            [str(user), f"cus_rv{n:05d}"],
        )
    deliver_all(db, [c.event for c in generate(rng, start, int(now.timestamp()) - 60, users)])
    window = [datetime.fromtimestamp(start, UTC), now]
    with db.connect() as conn:
        every = conn.execute("select * from public.mrr_report(%s, %s)", window).fetchall()
        eur = conn.execute("select * from public.mrr_report(%s, %s, 'EUR')", window).fetchall()
        usd = conn.execute("select * from public.mrr_report(%s, %s, 'usd')", window).fetchall()
    assert {r[1] for r in every} == {"eur", "usd"}, "the history should have both currencies"
    assert eur == [r for r in every if r[1] == "eur"]
    assert usd == [r for r in every if r[1] == "usd"]
    assert eur, "the euro rows should not be empty"


def test_token_flow_report_should_sum_each_kind_of_the_period(db: Database) -> None:
    user = uuid.uuid4()
    db.create_user(user)
    for sql in [
        "select status from public.add_tokens(%s, 500, 'tf-pack', 'purchase')",
        "select status from public.deduct_tokens(%s, 120, 'tf-use-1')",
        "select status from public.deduct_tokens(%s, 30, 'tf-use-2')",
    ]:
        assert scalar(db, sql, [str(user)]) == "applied"
    with db.connect() as conn:
        rows = conn.execute(
            "select kind, entries, tokens from public.token_flow_report("
            "date_trunc('day', now()), now() + interval '1 second', 'day') order by kind"
        ).fetchall()
        with pytest.raises(Exception, match="p_granularity must be day, week or month"):
            conn.execute("select * from public.token_flow_report(now(), now(), 'year')")
    assert ("purchase", 1, 500) in rows
    assert ("usage", 2, -150) in rows
    assert ("signup", 1, 100) in rows


def test_revenue_report_should_match_the_generated_payments_exactly(db: Database) -> None:
    rng = random.Random(180)
    now = datetime.now(UTC)
    first = add_months(now.year, now.month, -13)
    start, end = month_start(*first), int(now.timestamp()) - 60
    events, expected = pack_history(db, rng, start, end)
    deliveries = events + rng.sample(events, len(events) // 10)
    rng.shuffle(deliveries)  # refunds and disputes before their purchase park, then heal
    deliver_all(db, deliveries)

    with db.connect() as conn:
        statuses = dict(
            conn.execute(
                "select status, count(*) from billing.stripe_events group by status"
            ).fetchall()
        )
        got = conn.execute(
            "select period_start, currency, payments, gross_cents, refunds, refunded_cents, "
            "disputes_lost, disputed_cents, net_cents, packs_cents, plans_cents "
            "from public.revenue_report(%s, %s, 'month')",
            [datetime.fromtimestamp(start, UTC), now],
        ).fetchall()
        products = conn.execute(
            "select product_code, currency, payments, gross_cents from "
            "public.revenue_by_product(%s, %s)",
            [datetime.fromtimestamp(start, UTC), now],
        ).fetchall()
    assert statuses.get("parked", 0) == 0, "every refund or dispute found its payment"
    want: list[tuple[Any, ...]] = [
        (month, currency, *row[:2], *row[2:6], row[1] - row[3] - row[5], row[1], 0)
        for (month, currency), row in sorted(expected.items())
    ]
    reordered = [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10]) for r in got]
    assert reordered == want
    assert sum(int(r[4]) for r in want) > 20, "refunds happened"
    assert sum(int(r[6]) for r in want) > 3, "disputes were lost"
    gross: dict[str, int] = defaultdict(int)
    for r in want:
        gross[str(r[1])] += int(r[3])
    by_currency: dict[str, int] = defaultdict(int)
    for _code, currency, _, cents in products:
        by_currency[currency] += cents
    assert dict(by_currency) == dict(gross), "by product adds up to the same gross"
    assert scalar(db, "select count(*) from billing.check_invariants()") == 0
