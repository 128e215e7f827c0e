"""GET /v1/balance/stream: Server-Sent Events fed by the accounts trigger's NOTIFY.

The service runs under real uvicorn (token_billing.server.stream.Server, as `token-billing serve`
runs it) against a real database; the streams are read with httpx as a browser's fetch reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from starlette.applications import Starlette

from scripts.pgcluster import Database, build_template, temporary_cluster
from tests.app_support import bearer, free_port, new_user, settings_for, user_token
from token_billing.server import stream
from token_billing.server.app import create_app
from token_billing.server.settings import Settings

HEARTBEAT_SECONDS = 0.5


def enable_notify(db: Database, enabled: bool = True) -> None:
    """What `make dev` does: install the trigger that announces balance changes."""
    db.psql(f"select billing.set_balance_notify({str(enabled).lower()})")


def deduct(db: Database, user: uuid.UUID, amount: int, *, notify: bool = True) -> int:
    if not notify:
        enable_notify(db, False)
    with db.as_service_role() as conn:
        row = conn.execute(
            "select status, balance from public.deduct_tokens(%s, %s, %s)",
            [str(user), amount, f"stream-{uuid.uuid4()}"],
        ).fetchone()
    if not notify:
        enable_notify(db)
    assert row is not None
    assert row[0] == "applied"
    return int(row[1])


def credit(db: Database, user: uuid.UUID, amount: int) -> int:
    with db.as_service_role() as conn:
        row = conn.execute(
            "select status, balance from public.add_tokens(%s, %s, %s, 'promotion')",
            [str(user), amount, f"stream-{uuid.uuid4()}"],
        ).fetchone()
    assert row is not None
    assert row[0] == "applied"
    return int(row[1])


def service_connections(db: Database) -> dict[str, int]:
    with db.connect_superuser() as conn:
        rows = conn.execute(
            "select application_name, count(*) from pg_stat_activity "
            "where datname = %s and application_name like 'token-billing%%' "
            "group by application_name",
            [db.name],
        ).fetchall()
    return {str(name): int(count) for name, count in rows}


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, Starlette, stream.Server]]:
    """The app under the server `token-billing serve` uses, in a thread, on a free port."""
    app = create_app(settings)
    port = free_port()
    server = stream.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during startup"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app, server
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        assert not thread.is_alive(), "the server did not shut down"


def broker(app: Starlette) -> stream.BalanceBroker:
    value = app.state.balances
    assert isinstance(value, stream.BalanceBroker)
    return value


class Events:
    """The events of one open stream, pumped into a queue by a task."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.balances: list[int] = []

    async def pump(self) -> None:
        event, data = "message", list[str]()
        async for line in self.response.aiter_lines():
            if line == "":
                if data:
                    payload = json.loads("\n".join(data))
                    if event == "balance":
                        self.balances.append(payload["balance"])
                    await self.queue.put((event, payload))
                event, data = "message", list[str]()
            elif line.startswith(":"):
                await self.queue.put(("comment", line))
            else:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
        await self.queue.put(("end", None))

    async def next(self, kind: str, timeout: float = 10.0) -> Any:
        """The next event of this kind (others are skipped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                event, data = await asyncio.wait_for(self.queue.get(), max(left, 0.001))
            except TimeoutError:
                raise AssertionError(f"no {kind} event within {timeout}s") from None
            if event == kind:
                return data
            if event == "end" and kind != "end":
                raise AssertionError(f"the stream ended while waiting for {kind}")

    async def none(self, kind: str, within: float) -> None:
        """No event of this kind arrives within `within` seconds."""
        try:
            data = await self.next(kind, within)
        except AssertionError:
            return
        raise AssertionError(f"unexpected {kind} event: {data}")


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, url: str, user: uuid.UUID | str
) -> AsyncIterator[Events]:
    async with client.stream("GET", f"{url}/v1/balance/stream", headers=bearer(user)) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = Events(response)
        task = asyncio.create_task(events.pump())
        try:
            yield events
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await task


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=30.0))


# --- the trigger -------------------------------------------------------------------------------


def test_notifications_should_be_off_until_they_are_turned_on(db: Database) -> None:
    """The hot path pays nothing by default; turned on, the payload is the user id alone."""
    user = new_user(db)
    with psycopg.connect(db.dsn(), autocommit=True) as listener:
        listener.execute("listen token_billing_balance")
        deduct(db, user, 1)
        assert list(listener.notifies(timeout=0.5)) == []

        enable_notify(db)
        deduct(db, user, 2)
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload) for n in notes] == [("token_billing_balance", str(user))]


# --- the stream --------------------------------------------------------------------------------


def test_two_users_should_each_see_only_their_own_balance(db: Database) -> None:
    enable_notify(db)
    alice, bob = new_user(db), new_user(db)
    settings = settings_for(db, balance_stream_heartbeat_seconds=HEARTBEAT_SECONDS)

    async def scenario(url: str) -> tuple[list[int], list[int], list[int]]:
        async with (
            client() as http,
            open_stream(http, url, alice) as a1,
            open_stream(http, url, alice) as a2,
            open_stream(http, url, bob) as b,
        ):
            for events in (a1, a2, b):
                assert await events.next("status") == {"live": True}
                first = await events.next("balance")
                assert first == {
                    "balance": 100,
                    "available": 100,
                    "reserved": 0,
                    "plan": "free",
                    "subscription_status": "none",
                }
            assert deduct(db, alice, 7) == 93
            assert (await a1.next("balance"))["balance"] == 93
            assert (await a2.next("balance"))["balance"] == 93
            await b.none("balance", 1.0)
            assert credit(db, bob, 5) == 105
            assert (await b.next("balance"))["balance"] == 105
            await a1.none("balance", 1.0)
            assert service_connections(db).get("token-billing-listener") == 1
            return a1.balances, a2.balances, b.balances

    with serving(settings) as (url, _, _):
        a1, a2, b = asyncio.run(scenario(url))
    assert a1 == [100, 93], "alice's stream should carry exactly alice's balances"
    assert a2 == [100, 93], "every stream of a user should get the change once (fan-out)"
    assert b == [100, 105], "bob's stream should never carry alice's row"


def test_stream_should_send_heartbeats_and_unsubscribe_when_the_client_leaves(
    db: Database,
) -> None:
    enable_notify(db)
    user = new_user(db)
    settings = settings_for(db, balance_stream_heartbeat_seconds=0.2)

    async def scenario(url: str, app: Starlette) -> None:
        async with client() as http:
            async with open_stream(http, url, user) as events:
                await events.next("balance")
                assert await events.next("comment", 2.0) == ": heartbeat"
                assert broker(app).stream_count == 1
            for _ in range(100):
                if broker(app).stream_count == 0:
                    break
                await asyncio.sleep(0.05)
            assert broker(app).stream_count == 0, "a closed stream should unsubscribe"

    with serving(settings) as (url, app, _):
        asyncio.run(scenario(url, app))


def test_stream_should_refuse_missing_tokens_and_unknown_accounts(db: Database) -> None:
    with serving(settings_for(db)) as (url, _, _):
        missing = httpx.get(f"{url}/v1/balance/stream", timeout=5)
        unknown = httpx.get(f"{url}/v1/balance/stream", headers=bearer(uuid.uuid4()), timeout=5)
    assert missing.status_code == 401
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_account"


def test_server_shutdown_should_end_streams_and_release_every_connection(db: Database) -> None:
    enable_notify(db)
    user = new_user(db)
    settings = settings_for(db, balance_stream_heartbeat_seconds=HEARTBEAT_SECONDS)
    ends: list[Any] = []
    with serving(settings) as (url, app, server):
        balances = broker(app)

        async def scenario() -> float:
            async with (
                client() as http,
                open_stream(http, url, user) as first,
                open_stream(http, url, user) as second,
            ):
                await first.next("balance")
                await second.next("balance")
                started = time.monotonic()
                server.should_exit = True
                ends.append(await first.next("end", 8.0))
                ends.append(await second.next("end", 8.0))
                return time.monotonic() - started

        elapsed = asyncio.run(scenario())
    assert ends == [None, None]
    assert elapsed < 5, f"streams should end at shutdown, not at the grace timeout ({elapsed:.1f}s)"
    assert balances.stream_count == 0
    assert not balances.live
    assert balances._listener is None, "the listener task should be gone"
    assert balances._readers == {}, "no read task should outlive the app"
    for _ in range(50):
        if not service_connections(db):
            break
        time.sleep(0.1)
    assert service_connections(db) == {}, "the listener and the pool should be closed"


# --- per-user caps and token expiry -----------------------------------------------------------


def test_a_sixth_stream_of_one_user_should_be_refused_while_others_get_theirs(
    db: Database,
) -> None:
    enable_notify(db)
    alice, bob = new_user(db), new_user(db)
    settings = settings_for(db, balance_stream_heartbeat_seconds=HEARTBEAT_SECONDS)

    async def scenario(url: str) -> tuple[int, dict[str, Any], str | None, int, int]:
        async with client() as http, contextlib.AsyncExitStack() as stack:
            for _ in range(5):
                events = await stack.enter_async_context(open_stream(http, url, alice))
                await events.next("balance")
            sixth = await http.get(f"{url}/v1/balance/stream", headers=bearer(alice))
            open_after = broker(app).stream_count
            async with open_stream(http, url, bob) as theirs:
                bob_first = (await theirs.next("balance"))["balance"]
            return (
                sixth.status_code,
                sixth.json(),
                sixth.headers.get("retry-after"),
                bob_first,
                open_after,
            )

    with serving(settings) as (url, app, _):
        status, body, retry, bob_first, open_after = asyncio.run(scenario(url))
    assert status == 429
    assert body["error"] == {
        "code": "too_many_streams",
        "message": "this user already has 5 balance streams open (the most one user may): "
        "close one, e.g. another tab",
    }
    assert retry == "5"
    assert bob_first == 100, "another user's first stream should be served"
    assert open_after == 5, "the refused stream should hold no slot"


def test_the_process_wide_cap_should_still_hold(db: Database) -> None:
    enable_notify(db)
    users = [new_user(db) for _ in range(3)]
    settings = settings_for(db, balance_streams_max=2)

    async def scenario(url: str) -> httpx.Response:
        async with (
            client() as http,
            open_stream(http, url, users[0]),
            open_stream(http, url, users[1]),
        ):
            return await http.get(f"{url}/v1/balance/stream", headers=bearer(users[2]))

    with serving(settings) as (url, _, _):
        third = asyncio.run(scenario(url))
    assert third.status_code == 503
    assert third.json()["error"]["code"] == "too_many_streams"


def test_a_stream_should_close_when_its_token_expires(db: Database) -> None:
    enable_notify(db)
    user = new_user(db)
    settings = settings_for(db, balance_stream_heartbeat_seconds=30.0, jwt_leeway_seconds=0)

    async def scenario(url: str, app: Starlette) -> tuple[Any, Any, int]:
        headers = {"Authorization": f"Bearer {user_token(user, expires_in=2)}"}
        async with (
            client() as http,
            http.stream("GET", f"{url}/v1/balance/stream", headers=headers) as response,
        ):
            assert response.status_code == 200
            events = Events(response)
            task = asyncio.create_task(events.pump())
            await events.next("balance")
            ended = await events.next("end", 15.0)  # the service's `end` event
            closed = await _closed(events)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await task
        for _ in range(100):
            if broker(app).stream_count == 0:
                break
            await asyncio.sleep(0.05)
        return ended, closed, broker(app).stream_count

    with serving(settings) as (url, app, _):
        ended, closed, still_open = asyncio.run(scenario(url, app))
    assert ended == {"reason": "token_expired"}, "the stream should say why it ends"
    assert closed is None, "then the response should end (the client reconnects)"
    assert still_open == 0


async def _closed(events: Events) -> Any:
    """The end of the response itself (the pump's ("end", None), after the `end` event)."""
    while True:
        event, data = await asyncio.wait_for(events.queue.get(), 15.0)
        if event == "end" and data is None:
            return None


# --- a Postgres restart (on a cluster of its own: the session's is shared) ---------------------


@pytest.fixture(scope="module")
def restartable_db() -> Iterator[Database]:
    with temporary_cluster() as cluster:
        build_template(cluster, "tb_restart", as_template=False)
        yield Database(cluster, "tb_restart")


def test_stream_should_survive_a_postgres_restart_and_resend_the_balance(
    restartable_db: Database,
) -> None:
    db = restartable_db
    enable_notify(db)
    user = new_user(db)
    cluster = db.cluster
    settings = settings_for(db, balance_stream_heartbeat_seconds=HEARTBEAT_SECONDS)

    async def scenario(url: str, app: Starlette) -> list[int]:
        async with client() as http, open_stream(http, url, user) as events:
            assert await events.next("status") == {"live": True}
            assert (await events.next("balance"))["balance"] == 100
            # A change nobody announces (notifications off meanwhile): not sent now...
            assert deduct(db, user, 7, notify=False) == 93
            await events.none("balance", 1.0)

            await asyncio.to_thread(cluster.stop, "fast")
            assert await events.next("status", 10.0) == {"live": False}
            await asyncio.to_thread(cluster.start)
            assert await events.next("status", 15.0) == {"live": True}
            # ...but resent once the listener is back, since changes may have been missed.
            assert (await events.next("balance", 15.0))["balance"] == 93
            assert broker(app).connections == 2, "the listener should have reconnected once"

            assert deduct(db, user, 3) == 90
            assert (await events.next("balance"))["balance"] == 90
            return events.balances

    with serving(settings) as (url, app, _):
        seen = asyncio.run(scenario(url, app))
    assert seen[0] == 100
    assert seen[-2:] == [93, 90]
    assert set(seen) <= {100, 93, 90}


# --- bounded queues ----------------------------------------------------------------------------


def test_a_slow_clients_queue_should_drop_the_oldest_snapshots() -> None:
    async def scenario() -> tuple[list[Any], int]:
        sub = stream.Subscription(uuid.uuid4(), maxsize=4)
        for balance in range(10):
            sub.offer(("balance", {"balance": balance}))
        got = []
        while (message := await sub.next(0.01)) is not None:
            assert isinstance(message, tuple)
            got.append(message[1]["balance"])
        return got, sub.dropped

    got, dropped = asyncio.run(scenario())
    assert got == [6, 7, 8, 9], "the newest snapshots should be kept, in order"
    assert dropped == 6
