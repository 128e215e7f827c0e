"""Privilege escalation: everything a browser can reach, tried as `anon` and as a signed-in user.

A browser has no SQL. It reaches the database only through PostgREST (RPCs in the exposed
schemas, table reads and writes with its JWT's role and claims), through Realtime (rows of the
supabase_realtime publication, filtered by the same RLS), and through the token-billing service
(its JWT). So the tests act like PostgREST does: log in as `authenticator`, `set role` to the
JWT's role, `request.jwt.claims` set. They enumerate the catalog (every billing table, every
function in every exposed schema), so something added later is covered without a new test.

`authenticator` is a member of `service_role` here as on hosted Supabase (PostgREST must switch
to it for service-key requests), so a session that can run arbitrary SQL can `set role
service_role`: that is why no browser is ever given SQL, and why what is tested below is the
surface PostgREST and Realtime expose, including claims a browser may forge in its own token.
"""

from __future__ import annotations

import json
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from psycopg import sql
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import (
    JWT_SECRET,
    PACK_PRICE,
    bearer,
    put_product,
    settings_for,
    user_token,
)
from tests.fault_support import report
from tests.stripe_double import StripeDouble
from token_billing.db import PostgresDatabase
from token_billing.server.app import create_app
from token_billing.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
ALICE = uuid.UUID("00000000-0000-0000-0000-0000000e5c0a")
BOB = uuid.UUID("00000000-0000-0000-0000-0000000e5c0b")
# The one function a signed-in browser may call (docs/contract.md).
BROWSER_RPCS = {
    "my_tokens",
    "my_usage",
    "my_entitlements",
    # The marketplace's (issue 19): each reads the caller's own rows through RLS.
    "my_creator",
    "my_agents",
    "my_creator_earnings",
    "my_creator_payouts",
}

Conn = psycopg.Connection[tuple[Any, ...]]


def exposed_schemas() -> list[str]:
    """The schemas PostgREST serves, as supabase/config.toml configures it."""
    config = tomllib.loads((ROOT / "supabase" / "config.toml").read_text())
    return list(config["api"]["schemas"])


@pytest.fixture
def two_users(db: Database) -> Database:
    """Alice with a purchase, a hold and a Stripe customer; Bob with only the signup grant."""
    db.create_user(ALICE)
    db.create_user(BOB)
    with db.as_service_role() as conn:
        conn.execute("select * from public.add_tokens(%s, 5000, 'esc-1', 'purchase')", [ALICE])
        conn.execute("select * from public.reserve_tokens(%s, 40, 'esc-hold')", [ALICE])
        conn.execute("select * from public.link_stripe_customer(%s, 'cus_alice0001')", [ALICE])
    return db


def _refused(conn: Conn, statement: sql.Composed | str, params: list[Any] | None = None) -> str:
    """Run one statement; the SQLSTATE it fails with, or 'ALLOWED'."""
    try:
        conn.execute(statement, params or [])
    except psycopg.Error as exc:
        return exc.sqlstate or "client"
    return "ALLOWED"


# --- tables ---------------------------------------------------------------------------------------


def test_no_browser_role_can_write_any_billing_table(two_users: Database) -> None:
    db = two_users
    with db.connect_superuser() as su:
        tables = [
            (row[0], row[1])
            for row in su.execute(
                # The first column a plain update may set (not an identity column).
                "select c.relname, (select a.attname from pg_attribute as a "
                "where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped "
                "and a.attidentity = '' and a.attgenerated = '' order by a.attnum limit 1) "
                "from pg_class as c join pg_namespace as n on n.oid = c.relnamespace "
                "where n.nspname = 'billing' and c.relkind in ('r', 'p') order by 1"
            )
        ]
        counts_before = _row_counts(su, [t for t, _ in tables])
    assert len(tables) >= 10, tables
    attempts = 0
    allowed: list[str] = []
    for session in (
        db.as_anon(),
        db.as_user(BOB),
        db.as_user(BOB, claims={"role": "service_role"}),
    ):
        with session as conn:
            role = conn.execute("select current_user").fetchone()
            for table, column in tables:
                target = sql.Identifier("billing", table)
                col = sql.Identifier(column)
                for statement in (
                    sql.SQL("insert into {} default values").format(target),
                    sql.SQL("update {} set {} = {}").format(target, col, col),
                    sql.SQL("delete from {}").format(target),
                    sql.SQL("truncate {}").format(target),
                ):
                    attempts += 1
                    outcome = _refused(conn, statement)
                    if outcome != "42501":
                        allowed.append(f"{role}: {statement.as_string(conn)} -> {outcome}")
    with db.connect_superuser() as su:
        assert _row_counts(su, [t for t, _ in tables]) == counts_before
    assert allowed == [], "every write should be refused for lack of privilege (42501)"
    report("escalation tables", write_attempts=attempts, tables=len(tables), allowed=len(allowed))


def _row_counts(conn: Conn, tables: list[str]) -> dict[str, int]:
    counts = {}
    for table in tables:
        row = conn.execute(
            sql.SQL("select count(*) from {}").format(sql.Identifier("billing", table))
        ).fetchone()
        counts[table] = int(row[0]) if row else -1
    return counts


def test_browser_roles_read_only_their_own_rows(two_users: Database) -> None:
    db = two_users
    with db.connect_superuser() as su:
        owned = [
            row[0]
            for row in su.execute(
                "select c.relname from pg_class as c "
                "join pg_namespace as n on n.oid = c.relnamespace "
                "join pg_attribute as a on a.attrelid = c.oid and a.attname = 'user_id' "
                "where n.nspname = 'billing' and c.relkind in ('r', 'p') order by 1"
            )
        ]
        unprotected = su.execute(
            "select c.relname from pg_class as c join pg_namespace as n on n.oid = c.relnamespace "
            "where n.nspname = 'billing' and c.relkind in ('r', 'p') and not c.relrowsecurity"
        ).fetchall()
    assert unprotected == [], "every billing table should have row-level security on"
    leaks: list[str] = []
    # Bob, plainly and with a forged role claim: RLS keys on auth.uid(), not on the claim.
    for claims in (None, {"role": "service_role"}, {"role": "supabase_admin", "is_admin": True}):
        with db.as_user(BOB, claims=claims) as conn:
            for table in owned:
                query = sql.SQL("select count(*) from {} where user_id = %s").format(
                    sql.Identifier("billing", table)
                )
                try:
                    row = conn.execute(query, [ALICE]).fetchone()
                except psycopg.errors.InsufficientPrivilege:
                    continue  # service-only table: no grant at all
                if row != (0,):
                    leaks.append(f"bob ({claims}) sees {row} of alice's rows in {table}")
    with db.as_anon() as conn:
        for table in owned:
            outcome = _refused(
                conn, sql.SQL("select 1 from {}").format(sql.Identifier("billing", table))
            )
            if outcome != "42501":
                leaks.append(f"anon reads billing.{table}: {outcome}")
    assert leaks == []


# --- functions ------------------------------------------------------------------------------------


def _functions(conn: Conn, schemas: list[str]) -> list[tuple[str, str, str]]:
    """(schema, name, a call with a null per argument) of every function in `schemas`, except
    the ones extensions install."""
    rows = conn.execute(
        "select n.nspname, p.proname, "
        "coalesce((select string_agg(format('null::%%s', format_type(t, null)), ', ' "
        "order by i) from unnest(p.proargtypes) with ordinality as a (t, i)), '') "
        "from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace "
        "where n.nspname = any(%s) and p.prokind = 'f' "
        "and not exists (select 1 from pg_depend as d where d.objid = p.oid "
        "and d.deptype = 'e') "
        "and p.prorettype <> 'trigger'::regtype "
        "order by 1, 2",
        [schemas],
    ).fetchall()
    return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]


def test_no_rpc_but_my_tokens_answers_a_browser(two_users: Database) -> None:
    db = two_users
    with db.connect_superuser() as su:
        exposed = _functions(su, exposed_schemas())
        private = _functions(su, ["billing"])
    assert {name for _, name, _ in exposed} >= {
        "add_tokens",
        "deduct_tokens",
        "handle_stripe_event",
        "my_tokens",
    }
    calls = 0
    allowed: list[str] = []
    with db.connect_superuser() as su:
        before = _row_counts(su, ["accounts", "ledger_entries", "reservations", "stripe_events"])
    for label, session in (
        ("anon", db.as_anon()),
        ("bob", db.as_user(BOB)),
        ("bob+role claim", db.as_user(BOB, claims={"role": "service_role"})),
    ):
        with session as conn:
            for schema, name, args in exposed + private:
                call = sql.SQL("select * from {}.{}(" + args + ")").format(
                    sql.Identifier(schema), sql.Identifier(name)
                )
                calls += 1
                outcome = _refused(conn, call)
                browser_may = label != "anon" and schema == "public" and name in BROWSER_RPCS
                if browser_may:
                    assert outcome == "ALLOWED", f"{label} should be able to call {name}"
                elif outcome != "42501":
                    allowed.append(f"{label}: {schema}.{name}({args}) -> {outcome}")
    with db.connect_superuser() as su:
        after = _row_counts(su, ["accounts", "ledger_entries", "reservations", "stripe_events"])
    assert allowed == [], "every other function should be refused for lack of privilege"
    assert after == before
    report(
        "escalation rpc",
        calls=calls,
        functions=len(exposed) + len(private),
        exposed_schemas=",".join(exposed_schemas()),
        allowed=len(allowed),
    )


def test_my_tokens_answers_with_the_callers_row_only(two_users: Database) -> None:
    db = two_users
    with db.as_user(BOB) as conn:
        mine = conn.execute("select balance, reserved from public.my_tokens()").fetchall()
    with db.as_user(BOB, claims={"role": "service_role", "user_id": str(ALICE)}) as conn:
        forged = conn.execute("select balance, reserved from public.my_tokens()").fetchall()
    with db.as_role("authenticated", claims={"aud": "authenticated"}) as conn:
        nobody = conn.execute("select * from public.my_tokens()").fetchall()
    assert mine == [(100, 0)], "bob's own row only"
    assert forged == [(100, 0)], "a forged role or user_id claim should change nothing"
    assert nobody == [], "no sub, no row"
    with db.connect_superuser() as su:
        definer, source = su.execute(
            "select prosecdef, prosrc from pg_proc where oid = 'public.my_tokens()'::regprocedure"
        ).fetchone() or (None, "")
    assert definer is False, "my_tokens should run with the caller's rights (RLS)"
    assert "set_config" not in source
    assert "role" not in source.lower()


# --- roles ----------------------------------------------------------------------------------------


def test_request_session_cannot_become_an_owner_or_superuser(two_users: Database) -> None:
    db = two_users
    outcomes = {}
    with db.as_user(BOB) as conn:
        for target in ("postgres", "supabase_admin", "supabase_auth_admin"):
            outcomes[f"set role {target}"] = _refused(
                conn, sql.SQL("set role {}").format(sql.Identifier(target))
            )
            outcomes[f"set session authorization {target}"] = _refused(
                conn, sql.SQL("set session authorization {}").format(sql.Identifier(target))
            )
    assert set(outcomes.values()) == {"42501"}, outcomes
    with db.connect_superuser() as su:
        member = su.execute(
            "select pg_has_role('authenticator', 'service_role', 'member'), "
            "pg_has_role('authenticator', 'postgres', 'member'), "
            "(select rolbypassrls from pg_roles where rolname = 'authenticated'), "
            "(select rolbypassrls from pg_roles where rolname = 'anon')"
        ).fetchone()
    # authenticator may become service_role (PostgREST needs it, as on hosted Supabase): that is
    # exactly why browsers never get SQL. It can never become the owner, and the browser roles
    # do not bypass RLS.
    assert member == (True, False, False, False)


def test_user_context_never_outlives_its_request_on_a_pooled_connection(
    two_users: Database,
) -> None:
    """The service runs a user's call as `authenticated` with their claims (set local) on a
    pooled connection: the next call on that connection must be service_role again, claims
    gone, even when the user's call failed."""
    from token_billing.server.auth import User

    db = two_users
    with db.connect() as owner:
        owner.execute(
            "create function public.tb_test_whoami() returns table (who text, claims text) "
            "language sql security invoker set search_path = '' as "
            "$$ select current_user::text, current_setting('request.jwt.claims', true) $$"
        )
        owner.execute("revoke all on function public.tb_test_whoami() from public, anon")
        owner.execute("grant execute on function public.tb_test_whoami() to service_role")
    bob = User(id=BOB, claims={"sub": str(BOB), "role": "authenticated"}, token="")
    pool = PostgresDatabase(db.dsn(), min_size=1, max_size=1)

    async def scenario() -> list[Any]:
        await pool.open()
        try:
            seen: list[Any] = [await pool.rpc("my_tokens", user=bob)]
            seen.append(await pool.rpc("tb_test_whoami"))
            try:
                await pool.rpc("add_tokens", {"p_user_id": str(BOB), "p_amount": 1}, user=bob)
            except Exception as exc:  # refused: authenticated may not execute it
                seen.append(type(exc).__name__)
            seen.append(await pool.rpc("tb_test_whoami"))
            return seen
        finally:
            await pool.close()

    import asyncio

    mine, after_call, refused, after_failure = asyncio.run(scenario())
    assert mine[0]["balance"] == 100
    assert refused == "DatabaseError"
    for row in (after_call, after_failure):
        assert row[0]["who"] == "service_role"
        assert row[0]["claims"] in (None, ""), "a user's claims should not survive the request"


def test_realtime_publishes_only_rows_rls_lets_the_subscriber_read(two_users: Database) -> None:
    db = two_users
    with db.connect_superuser() as su:
        published = su.execute(
            "select p.schemaname, p.tablename, c.relrowsecurity from pg_publication_tables as p "
            "join pg_class as c on c.relname = p.tablename "
            "join pg_namespace as n on n.oid = c.relnamespace and n.nspname = p.schemaname "
            "where p.pubname = 'supabase_realtime'"
        ).fetchall()
    assert ("billing", "accounts", True) in published
    assert all(rls for _, _, rls in published), "every published table should have RLS"
    # Realtime's check before it forwards a change: select the row as the subscriber's role
    # with the subscriber's claims. Bob, even with a forged role claim, sees none of Alice's.
    for claims in (None, {"role": "service_role"}):
        with db.as_user(BOB, claims=claims) as conn:
            for schema, table, _ in published:
                row = conn.execute(
                    sql.SQL("select count(*) from {} where user_id = %s").format(
                        sql.Identifier(schema, table)
                    ),
                    [ALICE],
                ).fetchone()
                assert row == (0,), f"bob should not receive alice's {schema}.{table} changes"
    with db.as_anon() as conn:
        for schema, table, _ in published:
            outcome = _refused(
                conn, sql.SQL("select 1 from {}").format(sql.Identifier(schema, table))
            )
            assert outcome == "42501", f"anon should not read {schema}.{table}"


# --- the HTTP service -----------------------------------------------------------------------------


@pytest.fixture
def stripe_double() -> Iterator[StripeDouble]:
    with StripeDouble() as double:
        double.add_price(PACK_PRICE, unit_amount=500, currency="usd")
        yield double


@pytest.fixture
def service(two_users: Database, stripe_double: StripeDouble) -> Iterator[TestClient]:
    put_product(two_users, "pack_100", tokens=100, price_cents=500, stripe_price_id=PACK_PRICE)
    with TestClient(create_app(settings_for(two_users, stripe_url=stripe_double.url))) as c:
        yield c


def _token(claims: dict[str, Any], secret: str = JWT_SECRET) -> dict[str, str]:
    now = int(time.time())
    payload = {"iat": now, "exp": now + 600, **claims}
    return {"Authorization": f"Bearer {jwt.encode(payload, secret, algorithm='HS256')}"}


def test_a_users_token_reads_only_the_users_own_balance_and_ledger(service: TestClient) -> None:
    smuggled = {"user_id": str(ALICE), "sub": str(ALICE), "p_user_id": str(ALICE)}
    headers = {**bearer(BOB), "X-User-Id": str(ALICE), "X-Supabase-User": str(ALICE)}
    balance = service.get("/v1/balance", params=smuggled, headers=headers)
    ledger = service.get("/v1/ledger", params=smuggled, headers=headers)
    assert balance.status_code == 200
    assert balance.json()["balance"] == 100, "bob's balance, never alice's 5100"
    assert ledger.status_code == 200
    assert [e["amount"] for e in ledger.json()["entries"]] == [100], "bob's signup grant only"


def test_a_user_cannot_buy_for_someone_else(
    service: TestClient, stripe_double: StripeDouble
) -> None:
    response = service.post(
        "/v1/checkout/sessions",
        json={
            "product": "pack_100",
            "quantity": 1,
            "user_id": str(ALICE),
            "client_reference_id": str(ALICE),
            "customer": "cus_alice0001",
            "metadata": {"user_id": str(ALICE)},
        },
        headers=bearer(BOB),
    )
    assert response.status_code == 201, response.text
    params = stripe_double.posts("/v1/checkout/sessions")[0].params
    assert params["client_reference_id"] == str(BOB)
    assert params["metadata[user_id]"] == str(BOB)
    assert params["payment_intent_data[metadata][user_id]"] == str(BOB)
    assert params["customer"] != "cus_alice0001", "never alice's customer"


@pytest.mark.parametrize(
    ("label", "headers"),
    [
        ("service role key (a JWT with role service_role)", _token({"role": "service_role"})),
        (
            "service role key with a user's sub",
            _token({"role": "service_role", "sub": str(BOB), "aud": "authenticated"}),
        ),
        ("anon key", _token({"role": "anon"})),
        (
            "role claim forged to service_role",
            {"Authorization": f"Bearer {user_token(BOB, role='service_role')}"},
        ),
        (
            "a token signed with another secret",
            {"Authorization": f"Bearer {user_token(BOB, secret='s' * 40)}"},
        ),
        (
            "alg none",
            {"Authorization": "Bearer " + jwt.encode({"sub": str(ALICE)}, "", algorithm="none")},
        ),
    ],
)
def test_tokens_that_are_not_a_signed_in_users_are_refused(
    service: TestClient, stripe_double: StripeDouble, label: str, headers: dict[str, str]
) -> None:
    for method, path in (
        ("GET", "/v1/balance"),
        ("GET", "/v1/ledger"),
        ("POST", "/v1/checkout/sessions"),
        ("POST", "/v1/portal/sessions"),
    ):
        response = service.request(method, path, json={"product": "pack_100"}, headers=headers)
        assert response.status_code == 401, f"{label}: {method} {path} {response.text}"
    assert stripe_double.requests == [], "nothing should reach Stripe"


def test_an_anonymous_sign_in_cannot_buy(service: TestClient, stripe_double: StripeDouble) -> None:
    headers = bearer(BOB, is_anonymous=True)
    for path in ("/v1/checkout/sessions", "/v1/portal/sessions"):
        response = service.post(path, json={"product": "pack_100"}, headers=headers)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "anonymous_user"
    assert stripe_double.requests == []


@pytest.mark.parametrize("environment", ["test", "production"])
def test_dev_sign_in_does_not_exist_outside_development(
    two_users: Database, environment: str
) -> None:
    values: dict[str, Any] = {"environment": environment}
    if environment == "production":
        values["stripe_secret_key"] = "sk_live_51RealLookingKey0123456789"  # noqa: S105
    settings: Settings = settings_for(two_users, **values)
    with TestClient(create_app(settings)) as client:
        response = client.post("/dev/session")
    assert response.status_code in (404, 405), "no demo token minting outside development"
    assert "access_token" not in response.text
    json.loads(response.text)  # an error body, JSON like every other
