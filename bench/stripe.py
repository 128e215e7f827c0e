"""Real Stripe fixture payloads in the bench database, and fresh deliveries made from them."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.pgcluster import PgCluster
from tests.stripe_fixtures import FIXTURES as VENDORED

BENCH = Path(__file__).resolve().parent
FIXTURES = VENDORED / "stripe-ruby-mock-webhook_fixtures"
TYPES = (
    "checkout.session.completed",
    "customer.subscription.updated",
    "invoice.paid",
    "charge.succeeded",
    "payment_intent.succeeded",
)
# The plan the fixtures' subscription price stands for.
PLAN = "starter"


def fixtures_present() -> bool:
    return all((FIXTURES / f"{name}.json").exists() for name in TYPES)


def handle_stripe_event_exists(cluster: PgCluster, dbname: str) -> bool:
    out = cluster.psql(
        dbname, "select to_regprocedure('public.handle_stripe_event(jsonb)') is not null"
    )
    return out.strip() == "t"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def load(cluster: PgCluster, dbname: str) -> None:
    """bench_stripe (schema, instance()), the verbatim fixtures, and the plan's Stripe price."""
    cluster.psql(dbname, file=BENCH / "sql" / "stripe_fixtures.sql")
    values = []
    for name in TYPES:
        payload = (FIXTURES / f"{name}.json").read_text()
        json.loads(payload)  # refuse to bench on a broken fixture
        values.append(f"({_literal(name)}, {_literal(payload)}::jsonb)")
    subscription = json.loads((FIXTURES / "customer.subscription.updated.json").read_text())
    price = subscription["data"]["object"]["items"]["data"][0]["price"]["id"]
    cluster.psql(
        dbname,
        "insert into bench_stripe.templates (type, payload) values " + ", ".join(values) + ";\n"
        f"update billing.products set stripe_price_id = {_literal(price)} "
        f"where code = {_literal(PLAN)};",
    )


def deliveries(cluster: PgCluster, dbname: str, count: int) -> list[bytes]:
    """`count` fresh events in the bench mix, for users 20001..30000, as JSON bodies."""
    out = cluster.psql(
        dbname,
        "select bench_stripe.instance(1 + (n % 10), 20001 + (n * 7919) % 10000)::text "
        f"from generate_series(1, {int(count)}) as n",
    )
    return [line.encode() for line in out.splitlines() if line.strip()]


def outcomes(cluster: PgCluster, dbname: str) -> str:
    """How the stored events ended, e.g. `applied 4000, ignored 2000`."""
    out = cluster.psql(
        dbname,
        "select string_agg(status || ' ' || n, ', ' order by n desc) "
        "from (select status, count(*) as n from billing.stripe_events group by status) as s",
    )
    return out.strip() or "none"
