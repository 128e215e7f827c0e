"""Two ways to call the token-billing RPCs behind one small interface.

`PostgresDatabase` (DATABASE_URL) is the default and the fast path: a bounded psycopg pool whose
connections act as `service_role`, exactly the rights the Data API's service role key has.
`SupabaseDatabase` calls the same functions with supabase-py `.rpc()` through PostgREST, for
deployments that only have SUPABASE_URL and the service role key (the `supabase` extra: it is
imported only when a SupabaseDatabase opens).

Both raise the same errors (token_billing.errors): DatabaseUnavailable when the database cannot be
reached, DatabaseError with the SQLSTATE when a function refused the call.

    db = PostgresDatabase(os.environ["DATABASE_URL"])
    await db.open()
    tokens = TokenBilling(db)
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from token_billing.errors import DatabaseError, DatabaseUnavailable, database_error

if TYPE_CHECKING:
    import httpx

    from supabase import AsyncClient

logger = logging.getLogger("token_billing.db")

Row = dict[str, Any]
T = TypeVar("T")

# RPC names are identifiers we write ourselves; refuse anything else before it reaches SQL.
_FUNCTION_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class SignedInUser(Protocol):
    """A verified signed-in user a call can run as (token_billing.server.auth.User is one)."""

    @property
    def claims(self) -> Mapping[str, Any]:
        """The access token's claims, as PostgREST sets them for the request."""

    @property
    def token(self) -> str:
        """The access token itself."""


class Database(Protocol):
    """The RPC layer of token-billing, however it is reached."""

    async def open(self) -> None:
        """Start connecting; must not fail when the database is down (readiness will say so)."""

    async def close(self) -> None:
        """Release every connection."""

    async def rpc(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        user: SignedInUser | None = None,
    ) -> list[Row]:
        """Call `public.<name>(...)` with named arguments; return its rows.

        Without `user` the call runs as `service_role`. With `user` it runs as that signed-in
        user (role `authenticated`, their JWT claims), as a browser's Data API call would, so
        security invoker functions such as `my_tokens()` read through RLS.
        """

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless the database answers."""


class JsonText(str):
    """A JSON document already serialized (a webhook's verified body): sent to jsonb as it is,
    instead of being parsed and dumped again."""


def _as_is(text: Any) -> str:
    return str(text)


@functools.lru_cache(maxsize=256)
def _call_sql(name: str, keys: tuple[str, ...]) -> str:
    """`select * from public.<name>(k => %(k)s, ...)`, composed once per name and arguments."""
    _check_name(name)
    return (
        sql.SQL("select * from public.{}({})")
        .format(
            sql.Identifier(name),
            sql.SQL(", ").join(
                sql.SQL("{} => {}").format(sql.Identifier(key), sql.Placeholder(key))
                for key in keys
            ),
        )
        .as_string(None)
    )


def _check_name(name: str) -> None:
    if not _FUNCTION_NAME.match(name):
        raise ValueError(f"not an RPC name: {name!r}")


BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1


def _adapt(name: str, value: Any) -> Any:
    """Python values as psycopg parameters: dicts and lists are jsonb.

    An int beyond bigint is refused here with the SQLSTATE Postgres would use (22003): psycopg
    would send it as numeric, and no function would match.
    """
    if isinstance(value, JsonText):
        return Jsonb(value, dumps=_as_is)
    if isinstance(value, dict | list):
        return Jsonb(value)
    if isinstance(value, int) and not BIGINT_MIN <= value <= BIGINT_MAX:
        raise DatabaseError("22003", f"{name} is out of range for type bigint")
    return value


def _translate(exc: psycopg.Error, function: str) -> Exception:
    """The token_billing.errors exception for a psycopg error."""
    sqlstate = exc.sqlstate
    if sqlstate is None and isinstance(exc, psycopg.DataError):
        # Refused by psycopg before sending (a NUL byte in a text): what Postgres says of one.
        return DatabaseError("22021", str(exc), function=function)
    if sqlstate is not None and not sqlstate.startswith("08"):
        primary = exc.diag.message_primary or str(exc)
        return database_error(sqlstate, primary, function=function)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        logger.warning(
            "database unavailable",
            extra={"fields": {"function": function, "error": type(exc).__name__}},
        )
        return DatabaseUnavailable()
    return DatabaseError(sqlstate, str(exc), function=function)


def _connection_lost(exc: psycopg.Error) -> bool:
    """Whether the pooled connection died under the call (a Postgres restart, a killed
    backend), as opposed to the database refusing it or the pool timing out.

    Such a call is retried on another connection. That is safe for every RPC of
    token-billing: the writes are idempotent (a key, a Stripe event id), so a call whose commit
    did land answers `duplicate` the second time, and the reads have nothing to repeat.
    """
    if isinstance(exc, PoolTimeout | TooManyRequests):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return isinstance(exc, psycopg.OperationalError)
    return sqlstate.startswith("08") or sqlstate in ("57P01", "57P02")


class PostgresDatabase:
    """A bounded psycopg 3 pool; every connection runs `set role service_role`."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout_seconds: float = 5.0,
        connect_timeout_seconds: int = 5,
        statement_timeout_ms: int = 15_000,
    ) -> None:
        self._statement_timeout_ms = statement_timeout_ms
        # A call that finds its connection dead tries the next one: after a Postgres restart
        # every pooled connection may be dead, and each dead one is dropped as it fails.
        self._attempts = max_size + 1
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] = AsyncConnectionPool(
            conninfo,
            connection_class=psycopg.AsyncConnection[DictRow],
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "connect_timeout": connect_timeout_seconds,
                "application_name": "token-billing",
            },
            min_size=min_size,
            max_size=max_size,
            open=False,
            configure=self._configure,
            # No check on checkout: it is a round trip per request (13% of the service's CPU
            # under the webhook bench). A call on a connection found dead is retried instead.
            timeout=timeout_seconds,
            # A request queue longer than this fails at once instead of waiting for a slot.
            max_waiting=max_size * 20,
            reconnect_timeout=30.0,
            name="token-billing",
        )

    async def _configure(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        # The login role (postgres or authenticator) may do more than the service needs; the
        # service must not. service_role is what the Data API's service key gets.
        await conn.execute("set role service_role")
        await conn.execute(
            sql.SQL("set statement_timeout = {}").format(sql.Literal(self._statement_timeout_ms))
        )

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    async def rpc(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        user: SignedInUser | None = None,
    ) -> list[Row]:
        params = dict(params or {})
        call = _call_sql(name, tuple(params))
        try:
            values = {key: _adapt(key, value) for key, value in params.items()}
        except DatabaseError as exc:
            exc.function = name
            raise

        async def call_as(conn: psycopg.AsyncConnection[DictRow]) -> list[Row]:
            if user is None:
                cur = await conn.execute(call, values)
                return await cur.fetchall()
            async with conn.transaction():
                # What PostgREST does for a request with the user's JWT; both revert at commit,
                # back to service_role.
                await conn.execute(
                    "select set_config('request.jwt.claims', %s, true)",
                    [json.dumps(dict(user.claims))],
                )
                await conn.execute("set local role authenticated")
                cur = await conn.execute(call, values)
                return await cur.fetchall()

        try:
            return await self._on_a_connection(name, call_as)
        except UnicodeEncodeError as exc:
            # A lone surrogate in a text argument: not UTF-8, so nothing was sent.
            raise DatabaseError(
                "22021", f"an argument of {name} is not valid UTF-8 text", function=name
            ) from exc

    async def ping(self) -> None:
        async def select_1(conn: psycopg.AsyncConnection[DictRow]) -> None:
            await conn.execute("select 1")

        await self._on_a_connection("ping", select_1)

    async def _on_a_connection(
        self, name: str, work: Callable[[psycopg.AsyncConnection[DictRow]], Awaitable[T]]
    ) -> T:
        """`work` on a pooled connection; on the next one while the connection it got turns out
        dead (see _connection_lost), up to pool size + 1 times; psycopg errors as
        token_billing.errors."""
        attempt = 1
        while True:
            try:
                async with self._pool.connection() as conn:
                    return await work(conn)
            except psycopg.Error as exc:
                if attempt < self._attempts and _connection_lost(exc):
                    attempt += 1
                    continue
                raise _translate(exc, name) from exc


def _postgrest_error(exc: Exception, function: str) -> Exception:
    """The token_billing.errors exception for a PostgREST error (its `code` is the SQLSTATE)."""
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    if code is None or str(code).startswith(("PGRST0", "08")):
        # PGRST000-003: PostgREST cannot reach the database or its pool timed out.
        logger.warning(
            "database unavailable via PostgREST",
            extra={"fields": {"function": function, "code": code}},
        )
        return DatabaseUnavailable()
    if code == "PGRST202":
        return DatabaseError("42883", message, function=function)
    if str(code).startswith("PGRST3"):
        # JWT problems: the service role key is wrong or the user's token was refused.
        return DatabaseError("42501", message, function=function)
    return database_error(str(code), message, function=function)


def _plain(value: Any) -> Any:
    """Parameters as JSON for PostgREST."""
    if isinstance(value, JsonText):
        return json.loads(value)
    if isinstance(value, timedelta):
        return f"{value.total_seconds()} seconds"
    if isinstance(value, dict | list | str | int | float | bool) or value is None:
        return value
    return str(value)


class SupabaseDatabase:
    """The RPCs through PostgREST with supabase-py: no database URL needed."""

    def __init__(self, url: str, service_role_key: str, *, timeout_seconds: float = 15.0) -> None:
        self._url = url.rstrip("/")
        self._key = service_role_key
        self._timeout = timeout_seconds
        self._client: AsyncClient | None = None
        self._http: httpx.AsyncClient | None = None

    async def open(self) -> None:
        import httpx

        from supabase import AsyncClientOptions, acreate_client

        self._http = httpx.AsyncClient(timeout=self._timeout)
        self._client = await acreate_client(
            self._url,
            self._key,
            options=AsyncClientOptions(
                httpx_client=self._http, auto_refresh_token=False, persist_session=False
            ),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._client = None
        self._http = None

    async def rpc(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        user: SignedInUser | None = None,
    ) -> list[Row]:
        import httpx
        from postgrest import APIError, AsyncPostgrestClient

        _check_name(name)
        if self._client is None or self._http is None:
            raise RuntimeError("SupabaseDatabase.open() was not called")
        body = {key: _plain(value) for key, value in (params or {}).items()}
        try:
            if user is None:
                response = await self._client.rpc(name, body).execute()
            else:
                # The user's own token: PostgREST switches to `authenticated` with their claims.
                scoped = AsyncPostgrestClient(
                    f"{self._url}/rest/v1",
                    headers={"apikey": self._key, "Authorization": f"Bearer {user.token}"},
                    http_client=self._http,
                )
                response = await scoped.rpc(name, body).execute()
        except APIError as exc:
            raise _postgrest_error(exc, name) from exc
        except httpx.HTTPError as exc:
            raise _postgrest_error(exc, name) from exc
        data = response.data
        if data is None:
            return []
        if isinstance(data, list):
            return [dict(row) for row in data]
        return [dict(data)] if isinstance(data, dict) else [{name: data}]

    async def ping(self) -> None:
        import httpx

        if self._http is None:
            raise RuntimeError("SupabaseDatabase.open() was not called")
        try:
            headers = {"apikey": self._key}
            if self._key.startswith("eyJ"):
                # A legacy JWT key is also the bearer; new sb_secret_ keys go as apikey only.
                headers["Authorization"] = f"Bearer {self._key}"
            response = await self._http.get(f"{self._url}/rest/v1/", headers=headers)
        except httpx.HTTPError as exc:
            raise DatabaseUnavailable() from exc
        if response.status_code >= 500:
            raise DatabaseUnavailable()
