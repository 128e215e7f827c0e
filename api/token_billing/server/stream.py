"""The balance broker behind GET /v1/balance/stream (token_billing.server.routes.balance).

Server-Sent Events of the signed-in user's balance, for deployments without Supabase Realtime (a
self-hosted Postgres, the local `make dev` stack). The trigger of migration 20261121001200
notifies channel `token_billing_balance` with the id of a user whose account changed, once
`billing.set_balance_notify(true)` has installed it.

One `BalanceBroker` per service process holds ONE listening connection and fans notifications
out to the open streams. It reads a changed row (as service_role, through the pool) only when
someone is subscribed to that user, and sends it only to that user's streams. Reads of one user
are serialized and each starts after the change it answers committed, so a stream never goes
back to an older balance. A stream's queue is bounded: every message is a full snapshot, so when
a slow client falls behind the oldest messages are dropped and it still ends on the newest.

The listener reconnects with backoff when Postgres restarts; streams get `status` events
(`{"live": false}`, then `{"live": true}`) and, once it listens again, the current balance of
every subscribed user, since notifications sent meanwhile are lost. Comment lines every
BALANCE_STREAM_HEARTBEAT_SECONDS keep proxies from closing idle streams.

Streams are bounded per process (BALANCE_STREAMS_MAX, then 503) and per user
(BALANCE_STREAMS_PER_USER, then 429), so one user cannot take the slots of the others. A stream
lasts as long as the access token it was opened with: at the token's `exp` it sends `end`
`{"reason": "token_expired"}` and closes, and the client reconnects with a fresh token.

Events: `status` `{"live": bool}`; `balance` with the fields of GET /v1/balance; `end`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

import psycopg
import uvicorn
from psycopg import sql
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from token_billing.db import Database
from token_billing.errors import DatabaseError, DatabaseUnavailable
from token_billing.server.http_errors import ApiError
from token_billing.server.settings import Settings

logger = logging.getLogger("token_billing.stream")

CHANNEL: Final = "token_billing_balance"
BALANCE_FIELDS: Final = ("balance", "available", "reserved", "plan", "subscription_status")
QUEUE_SIZE: Final = 16
MAX_STREAMS: Final = 500
MAX_STREAMS_PER_USER: Final = 5
RETRY_MS: Final = 2000  # how long a browser waits before it reconnects a dropped stream
_BACKOFF_FIRST_SECONDS: Final = 0.25
_BACKOFF_MAX_SECONDS: Final = 5.0
_READ_ATTEMPTS: Final = 5


class _End:
    """The message that ends a stream (service shutdown)."""


END: Final = _End()
Message = tuple[str, Mapping[str, Any]] | _End


def balance_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a stream (and GET /v1/balance) shows of an account: no Stripe ids."""
    return {key: row.get(key) for key in BALANCE_FIELDS}


class Subscription:
    """One open stream: a user and a bounded queue of messages for it."""

    def __init__(self, user_id: uuid.UUID, maxsize: int = QUEUE_SIZE) -> None:
        self.user_id = user_id
        self.dropped = 0
        self.last: Mapping[str, Any] | None = None
        """The last balance queued, so the same snapshot is not sent twice in a row."""
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize)

    def offer(self, message: Message) -> None:
        """Queue without waiting; a full queue drops its oldest message (each is a snapshot)."""
        if isinstance(message, tuple) and message[0] == "balance":
            if message[1] == self.last:
                return
            self.last = message[1]
        while True:
            try:
                self._queue.put_nowait(message)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()
                self.dropped += 1

    async def next(self, timeout: float) -> Message | None:
        """The next message, or None when `timeout` seconds pass without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None


# Brokers of this process, so a server shutting down can end their streams (see Server).
_BROKERS: weakref.WeakSet[BalanceBroker] = weakref.WeakSet()


class BalanceBroker:
    """One LISTEN connection per process, fanned out to per-user subscriptions."""

    def __init__(
        self,
        conninfo: str | None,
        db: Database,
        *,
        heartbeat_seconds: float = 15.0,
        connect_timeout_seconds: int = 5,
        max_streams: int = MAX_STREAMS,
        max_streams_per_user: int = MAX_STREAMS_PER_USER,
    ) -> None:
        self._conninfo = conninfo
        self._db = db
        self.heartbeat_seconds = heartbeat_seconds
        self._connect_timeout = connect_timeout_seconds
        self._max_streams = max_streams
        self._max_streams_per_user = max_streams_per_user
        self._subscriptions: dict[uuid.UUID, set[Subscription]] = {}
        self._dirty: set[uuid.UUID] = set()
        self._readers: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.live = False
        """True while the listening connection is up and LISTENing."""
        self.connections = 0
        """How many times the listener has connected (1 + reconnections)."""

    @classmethod
    def from_settings(cls, settings: Settings, db: Database) -> BalanceBroker:
        """A broker on DATABASE_URL; without one (the PostgREST path) streams are unavailable."""
        return cls(
            settings.database_url.get_secret_value() if settings.database_url else None,
            db,
            heartbeat_seconds=settings.balance_stream_heartbeat_seconds,
            connect_timeout_seconds=settings.db_connect_timeout_seconds,
            max_streams=settings.balance_streams_max,
            max_streams_per_user=settings.balance_streams_per_user,
        )

    @property
    def available(self) -> bool:
        return self._conninfo is not None

    @property
    def stream_count(self) -> int:
        return sum(len(subs) for subs in self._subscriptions.values())

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start listening in the background; never fails when the database is down."""
        if self._conninfo is None or self._listener is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._listener = asyncio.create_task(
            self._listen_forever(self._conninfo), name="balance-listener"
        )
        _BROKERS.add(self)

    def end_streams(self) -> None:
        """Ask every open stream to finish (they answer their last bytes and close)."""
        for subs in self._subscriptions.values():
            for sub in subs:
                sub.offer(END)

    async def close(self) -> None:
        """End the streams, stop the listener and the reads, close the connection."""
        _BROKERS.discard(self)
        self.end_streams()
        tasks = [t for t in (self._listener, *self._readers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._listener = None
        self._readers.clear()

    # --- subscriptions ------------------------------------------------------------------------
    def subscribe(self, user_id: uuid.UUID) -> Subscription:
        """A new stream of the user's balance: the listener's state now, the balance next."""
        if self.stream_count >= self._max_streams:
            raise ApiError(
                503,
                "too_many_streams",
                "too many open balance streams; retry shortly",
                headers={"Retry-After": "5"},
            )
        if len(self._subscriptions.get(user_id, ())) >= self._max_streams_per_user:
            raise ApiError(
                429,
                "too_many_streams",
                f"this user already has {self._max_streams_per_user} balance streams open (the "
                "most one user may): close one, e.g. another tab",
                headers={"Retry-After": "5"},
            )
        sub = Subscription(user_id)
        self._subscriptions.setdefault(user_id, set()).add(sub)
        sub.offer(("status", {"live": self.live}))
        # Through the user's serialized reads, so it cannot overtake a newer one.
        self._changed(user_id)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscriptions.get(sub.user_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subscriptions[sub.user_id]
            self._dirty.discard(sub.user_id)

    def _broadcast_status(self) -> None:
        for subs in self._subscriptions.values():
            for sub in subs:
                sub.offer(("status", {"live": self.live}))

    # --- reading changed rows -----------------------------------------------------------------
    def _changed(self, user_id: uuid.UUID) -> None:
        """The user's account changed (or may have): send their streams the current row."""
        if user_id not in self._subscriptions:
            return
        self._dirty.add(user_id)
        if user_id not in self._readers:
            task = asyncio.create_task(self._read(user_id), name=f"balance-read-{user_id}")
            self._readers[user_id] = task
            task.add_done_callback(lambda _: self._readers.pop(user_id, None))

    async def _read(self, user_id: uuid.UUID) -> None:
        failures = 0
        while user_id in self._dirty and user_id in self._subscriptions:
            self._dirty.discard(user_id)
            try:
                rows = await self._db.rpc("get_billing_profile", {"p_user_id": str(user_id)})
            except (DatabaseUnavailable, DatabaseError) as exc:
                failures += 1
                self._dirty.add(user_id)
                if failures >= _READ_ATTEMPTS:
                    # The listener's reconnection (or the next change) reads it again.
                    logger.warning(
                        "balance read failed",
                        extra={"fields": {"user_id": str(user_id), "error": type(exc).__name__}},
                    )
                    return
                await asyncio.sleep(min(_BACKOFF_FIRST_SECONDS * 2**failures, 2.0))
                continue
            failures = 0
            if not rows:
                continue
            message = ("balance", balance_fields(rows[0]))
            for sub in self._subscriptions.get(user_id, ()):
                sub.offer(message)

    # --- the listening connection -------------------------------------------------------------
    async def _listen_forever(self, conninfo: str) -> None:
        delay = _BACKOFF_FIRST_SECONDS
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    conninfo,
                    autocommit=True,
                    connect_timeout=self._connect_timeout,
                    application_name="token-billing-listener",
                )
            except psycopg.Error as exc:
                logger.warning(
                    "balance listener cannot connect; retrying",
                    extra={"fields": {"error": type(exc).__name__, "retry_s": delay}},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_SECONDS)
                continue
            try:
                await conn.execute(sql.SQL("listen {}").format(sql.Identifier(CHANNEL)))
                self.connections += 1
                self.live = True
                delay = _BACKOFF_FIRST_SECONDS
                logger.info("balance listener connected", extra={"fields": {"channel": CHANNEL}})
                self._broadcast_status()
                # Changes committed while nobody listened were never announced: resend every
                # subscribed user's balance, even an unchanged one (it confirms the state).
                for user_id, subs in list(self._subscriptions.items()):
                    for sub in subs:
                        sub.last = None
                    self._changed(user_id)
                while True:
                    async for notify in conn.notifies(timeout=self.heartbeat_seconds):
                        self._on_notify(notify.payload)
                    # A quiet spell: make sure the connection is still there (a dead peer
                    # otherwise goes unnoticed until TCP gives up).
                    await conn.execute("select 1")
            except psycopg.Error as exc:
                logger.warning(
                    "balance listener lost its connection; reconnecting",
                    extra={"fields": {"error": type(exc).__name__}},
                )
            finally:
                self.live = False
                self._broadcast_status()
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_SECONDS)

    def _on_notify(self, payload: str) -> None:
        try:
            user_id = uuid.UUID(payload)
        except ValueError:
            return
        self._changed(user_id)


def end_streams() -> None:
    """End the open streams of every broker running in this event loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    for broker in list(_BROKERS):
        if broker._loop is loop:
            broker.end_streams()


class Server(uvicorn.Server):
    """uvicorn's server, ending the balance streams first when it shuts down.

    A graceful shutdown waits for open responses to finish, and a stream never finishes on its
    own: without this, Ctrl-C would wait for every browser tab to go away.
    """

    async def shutdown(self, sockets: Any = None) -> None:
        end_streams()
        await super().shutdown(sockets)


# --- the response ------------------------------------------------------------------------------


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStream(StreamingResponse):
    """A subscription as `text/event-stream`, until `expires_at` (the access token's exp, Unix
    time) when given; unsubscribes however the response ends."""

    def __init__(
        self, broker: BalanceBroker, sub: Subscription, *, expires_at: float | None = None
    ) -> None:
        self._broker = broker
        self._sub = sub
        self._expires_at = expires_at
        self._events = self._generate()
        super().__init__(
            self._events,
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # nginx: pass events through as they come
            },
        )

    async def _generate(self) -> AsyncGenerator[bytes]:
        yield f"retry: {RETRY_MS}\n\n".encode()
        while True:
            wait = self._broker.heartbeat_seconds
            if self._expires_at is not None:
                left = self._expires_at - time.time()
                if left <= 0:
                    yield _event("end", {"reason": "token_expired"})
                    return
                wait = min(wait, left)
            message = await self._sub.next(wait)
            if message is None:
                if self._expires_at is not None and time.time() >= self._expires_at:
                    continue  # the token ran out, not the heartbeat interval
                yield b": heartbeat\n\n"
            elif isinstance(message, _End):
                return
            else:
                yield _event(*message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._broker.unsubscribe(self._sub)
            await self._events.aclose()
