"""A generated subscription history (tests/test_revenue.py, tests/test_ops.py): customers over
months subscribing monthly or yearly, in dollars or euros, changing plans and quantities, getting
coupons, falling past due and recovering, cancelling; each change a real-shaped
customer.subscription.* event with its own Stripe `created`."""

from __future__ import annotations

import calendar
import copy
import json
import random
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from math import floor
from typing import Any

from scripts.pgcluster import Database
from tests.app_support import record_sale
from token_billing.cli.stripe_events import (
    Product,
    checkout_session,
    envelope,
    refunded_charge,
    subscription,
)

# code: (currency, unit amount, interval)
PLANS = {
    "rv_starter": ("usd", 2900, "month"),
    "rv_pro": ("usd", 9900, "month"),
    "rv_pro_year": ("usd", 95000, "year"),
    "rv_eur": ("eur", 2700, "month"),
}
USD_PLANS = ["rv_starter", "rv_pro", "rv_pro_year"]
MONTHS_OF = {"month": 1, "year": 12}
RANK = [
    "incomplete", "trialing", "active", "past_due", "unpaid", "paused", "incomplete_expired",
    "canceled",
]  # fmt: skip


def half_up(x: Fraction) -> int:
    return floor(x + Fraction(1, 2))


def month_start(year: int, month: int) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0))


def add_months(year: int, month: int, n: int) -> tuple[int, int]:
    index = year * 12 + month - 1 + n
    return index // 12, index % 12 + 1


@dataclass
class State:
    code: str
    quantity: int
    percent_off: int
    status: str

    def mrr(self) -> int:
        if self.status not in ("active", "past_due"):
            return 0
        _, unit, interval = PLANS[self.code]
        monthly = Fraction(unit * self.quantity, MONTHS_OF[interval])
        return max(half_up(monthly * Fraction(100 - self.percent_off, 100)), 0)


@dataclass
class Change:
    event: dict[str, Any]
    payer: str
    subscription: str
    at: int
    state: State


def _event(user: str, customer: str, sub: str, at: int, state: State, kind: str) -> dict[str, Any]:
    currency, unit, interval = PLANS[state.code]
    obj = subscription(
        user, Product(state.code, "plan", 100, unit, currency, f"price_{state.code}"),
        customer=customer, sub_id=sub,
    )  # fmt: skip
    obj["status"] = state.status
    obj["created"] = at
    item = obj["items"]["data"][0]
    item["quantity"] = state.quantity
    item["price"]["recurring"]["interval"] = interval
    obj["discount"] = (
        {"object": "discount", "coupon": {"id": "rv20", "percent_off": state.percent_off}}
        if state.percent_off
        else None
    )
    return envelope(f"customer.subscription.{kind}", obj, created=at)


def generate(rng: random.Random, start: int, end: int, users: list[uuid.UUID]) -> list[Change]:
    changes: list[Change] = []
    for n, user in enumerate(users):
        customer = f"cus_rv{n:05d}"
        payer = str(user)
        at = rng.randrange(start, end - 86_400)
        eur = n % 7 == 0
        state = State("rv_eur" if eur else rng.choice(USD_PLANS), 1, 0, "active")
        sub = f"sub_rv{n:05d}"
        changes.append(Change(_event(str(user), customer, sub, at, state, "created"), payer, sub,
                              at, state))  # fmt: skip
        while True:
            # Same-second changes happen: Stripe's clock is in whole seconds.
            at += rng.choice([0, rng.randrange(3 * 86_400, 80 * 86_400)])
            if at >= end:
                break
            roll = rng.random()
            state = copy.copy(state)
            kind = "updated"
            if roll < 0.12:
                state.status, kind = "canceled", "deleted"
            elif roll < 0.35 and not eur:
                state.code = rng.choice([c for c in USD_PLANS if c != state.code])
            elif roll < 0.5:
                state.quantity = 3 - state.quantity
            elif roll < 0.6:
                state.percent_off = 20 - state.percent_off
            elif roll < 0.8:
                state.status = "past_due" if state.status == "active" else "active"
            else:
                state.status = rng.choice(["active", "trialing", "unpaid"])
            changes.append(
                Change(_event(str(user), customer, sub, at, state, kind), payer, sub, at, state)
            )
            if kind == "deleted":
                break
    return changes


def deliver_all(db: Database, events: list[dict[str, Any]], workers: int = 8) -> None:
    queue = list(events)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        with db.connect() as conn:
            while True:
                with lock:
                    if not queue:
                        return
                    event = queue.pop()
                try:
                    conn.execute(
                        "select * from public.handle_stripe_event(%s::jsonb)", [json.dumps(event)]
                    )
                except BaseException as exc:  # re-raised below, in the test's thread
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def pack_history(
    db: Database, rng: random.Random, start: int, end: int, *, count: int = 250
) -> tuple[list[dict[str, Any]], dict[tuple[datetime, str], list[int]]]:
    """Pack purchases over the window in two currencies, some refunded (in full or in part),
    some lost in a dispute; the events, and what each month should report per currency as
    [payments, gross, refunds, refunded, disputes lost, disputed]."""
    packs = [
        Product("pack_100", "pack", 100, 500, "usd", None),
        Product("pack_250", "pack", 250, 1000, "usd", None),
        Product("rv_pack_eur", "pack", 300, 900, "eur", None),
    ]
    with db.connect() as conn:
        conn.execute(
            "insert into billing.products (code, kind, name, tokens, price_cents, currency) "
            "values ('rv_pack_eur', 'pack', 'Euro pack', 300, 900, 'eur')"
        )
    expected: dict[tuple[datetime, str], list[int]] = defaultdict(lambda: [0] * 6)

    def month_of(at: int) -> datetime:
        t = datetime.fromtimestamp(at, UTC)
        return datetime(t.year, t.month, 1, tzinfo=UTC)

    events: list[dict[str, Any]] = []
    for n in range(count):
        user = uuid.uuid4()
        db.create_user(user)
        product = rng.choice(packs)
        quantity = rng.randint(1, 3)
        paid_at = rng.randrange(start, end - 90 * 86_400)
        session = checkout_session(str(user), product, quantity=quantity)
        session["created"] = paid_at - 60
        purchase = envelope("checkout.session.completed", session, created=paid_at)
        record_sale(db, purchase)
        events.append(purchase)
        paid = product.price_cents * quantity
        row = expected[(month_of(paid_at), product.currency)]
        row[0] += 1
        row[1] += paid
        roll = rng.random()
        if roll < 0.15:
            refunded_at = paid_at + rng.randrange(86_400, 40 * 86_400)
            amount = paid if rng.random() < 0.5 else paid // 2
            charge = refunded_charge(
                str(user), product, payment_intent=session["payment_intent"],
                amount_cents=amount, quantity=quantity,
            )  # fmt: skip
            charge["created"] = paid_at
            charge["refunds"]["data"][0]["created"] = refunded_at
            events.append(envelope("charge.refunded", charge, created=refunded_at))
            row = expected[(month_of(refunded_at), product.currency)]
            row[2] += 1
            row[3] += amount
        elif roll < 0.18:
            lost_at = paid_at + rng.randrange(10 * 86_400, 60 * 86_400)
            dispute = {
                "id": f"dp_rv{n:05d}",
                "object": "dispute",
                "amount": paid,
                "currency": product.currency,
                "charge": f"ch_rv{n:05d}",
                "payment_intent": session["payment_intent"],
                "created": lost_at - 7 * 86_400,
                "status": "lost",
                "reason": "fraudulent",
                "livemode": False,
            }
            events.append(envelope("charge.dispute.closed", dispute, created=lost_at))
            row = expected[(month_of(lost_at), product.currency)]
            row[4] += 1
            row[5] += paid
    return events, expected
