"""The supabase-py path: the same RPCs through a PostgREST-shaped endpoint, no DATABASE_URL.

No PostgREST binary is installable here, so a small stand-in serves `POST /rest/v1/rpc/<fn>` the
way PostgREST does, against the real test database: it verifies the request's JWT (the service
role key, or the user's access token) with the project secret, logs in as `authenticator`,
switches to the token's role with its claims in `request.jwt.claims`, calls the function with
named arguments cast to their declared types, and answers PostgREST's JSON (rows, or
`{"code": SQLSTATE, "message", "details", "hint"}` with PostgREST's status for that SQLSTATE).
supabase-py, postgrest-py and the service's error mapping run unmodified against it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import psycopg
import pytest
from psycopg import sql
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import (
    JWT_SECRET,
    account,
    bearer,
    encode,
    new_user,
    settings_for,
    sign,
    sold_checkout_event,
)
from token_billing.client import TokenBilling
from token_billing.db import SupabaseDatabase
from token_billing.errors import DatabaseError
from token_billing.server.app import create_app

# PostgREST's HTTP status for a SQLSTATE (its documented table, the part that matters here).
_STATUS = {"23505": 409, "42501": 403, "42883": 404, "P0001": 400}


class PostgrestStandIn:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.calls: list[tuple[str, str]] = []  # (function, role)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                stand_in._reply(self, 200, {"swagger": "2.0"})

            def do_POST(self) -> None:
                stand_in._rpc(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> PostgrestStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        payload = json.dumps(body, default=str).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _rpc(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        args: dict[str, Any] = json.loads(handler.rfile.read(length) or b"{}")
        function = handler.path.removeprefix("/rest/v1/rpc/").split("?")[0]
        token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ")
        try:
            claims = jwt.decode(
                token, JWT_SECRET, algorithms=["HS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError as exc:
            self._reply(handler, 401, {"code": "PGRST301", "message": str(exc)})
            return
        role = str(claims.get("role", "anon"))
        self.calls.append((function, role))
        try:
            with self.db.as_role(role, claims=claims) as conn:
                types = dict(
                    conn.execute(
                        "select a.name, format_type(a.type, null) from pg_proc as p, "
                        "unnest(p.proargnames, p.proargtypes::oid[]) as a (name, type) "
                        "where p.oid = %s::regprocedure::oid",
                        [self._signature(function)],
                    ).fetchall()
                )
                call = sql.SQL("select * from public.{}({})").format(
                    sql.Identifier(function),
                    sql.SQL(", ").join(
                        sql.SQL("{} => {}::{}").format(
                            sql.Identifier(name), sql.Placeholder(name), sql.SQL(types[name])
                        )
                        for name in args
                    ),
                )
                values = {
                    k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in args.items()
                }
                cur = conn.cursor(row_factory=psycopg.rows.dict_row)
                rows = cur.execute(call, values).fetchall()
        except psycopg.Error as exc:
            code = exc.sqlstate or "PGRST000"
            self._reply(
                handler,
                _STATUS.get(code, 400 if exc.sqlstate else 503),
                {
                    "code": code,
                    "message": exc.diag.message_primary or str(exc),
                    "details": exc.diag.message_detail,
                    "hint": exc.diag.message_hint,
                },
            )
            return
        self._reply(handler, 200, rows)

    def _signature(self, function: str) -> str:
        with self.db.connect() as conn:
            row = conn.execute(
                "select p.oid::regprocedure::text from pg_proc as p "
                "where p.pronamespace = 'public'::regnamespace and p.proname = %s",
                [function],
            ).fetchone()
        return str(row[0]) if row else f"public.{function}()"


def service_role_key() -> str:
    now = int(time.time())
    return jwt.encode(
        {"role": "service_role", "iss": "supabase", "iat": now, "exp": now + 3600}, JWT_SECRET
    )


@pytest.fixture
def postgrest(db: Database) -> Iterator[PostgrestStandIn]:
    with PostgrestStandIn(db) as stand_in:
        yield stand_in


@pytest.fixture
def client(postgrest: PostgrestStandIn) -> Iterator[TestClient]:
    settings = settings_for(
        None,
        database_url=None,
        supabase_url=postgrest.url,
        supabase_service_role_key=service_role_key(),
    )
    # The token issuer is the project URL's /auth/v1: the test tokens carry it.
    with TestClient(create_app(settings)) as c:
        yield c


def user_headers(postgrest: PostgrestStandIn, user: uuid.UUID) -> dict[str, str]:
    return bearer(user, iss=f"{postgrest.url}/auth/v1")


def test_supabase_path_should_serve_readiness_products_and_balance(
    db: Database, postgrest: PostgrestStandIn, client: TestClient
) -> None:
    user = new_user(db)
    assert client.get("/readyz").status_code == 200
    products = client.get("/v1/products")
    balance = client.get("/v1/balance", headers=user_headers(postgrest, user))

    assert products.status_code == 200
    assert "pack_100" in {p["code"] for p in products.json()["products"]}
    assert balance.status_code == 200, balance.text
    assert balance.json()["balance"] == 100
    assert ("my_tokens", "authenticated") in postgrest.calls, (
        "the balance should be read with the user's own token, through RLS"
    )
    assert ("list_products", "service_role") in postgrest.calls


def test_supabase_path_should_handle_a_webhook_once(
    db: Database, postgrest: PostgrestStandIn, client: TestClient
) -> None:
    user = new_user(db)
    payload = encode(sold_checkout_event(db, user, "pack_100"))
    headers = {"Stripe-Signature": sign(payload)}
    first = client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    again = client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    assert first.json()["status"] == "applied"
    assert again.json()["status"] == "duplicate"
    assert account(db, user)["balance"] == 200


def test_supabase_path_should_map_sqlstates_like_the_direct_path(
    db: Database, postgrest: PostgrestStandIn, client: TestClient
) -> None:
    event = sold_checkout_event(db, new_user(db), "pack_100")
    event["created"] = "yesterday"
    payload = encode(event)
    response = client.post(
        "/v1/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload)}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_argument"


def test_token_billing_client_should_work_over_supabase(
    db: Database, postgrest: PostgrestStandIn
) -> None:
    user = new_user(db)

    async def body() -> tuple[str, str | None]:
        database = SupabaseDatabase(postgrest.url, service_role_key())
        await database.open()
        try:
            tokens = TokenBilling(database)
            async with tokens.reserve(user, 40, key="req-1") as r:
                settled = await r.settle(15)
            try:
                await tokens.deduct(user, 1, key="req-1-x")
                await tokens.deduct(user, 2, key="req-1-x")
            except DatabaseError as exc:
                return settled.status, exc.sqlstate
            return settled.status, None
        finally:
            await database.close()

    assert asyncio.run(body()) == ("applied", "TBKEY")
    assert account(db, user)["balance"] == 84
