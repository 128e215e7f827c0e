"""How the service is served: uvicorn with the limits a reverse proxy would otherwise give, and
the separate metrics listener.

uvicorn's default parser (httptools) bounds no header: an unfinished 48 MiB header grew the
process by 48-90 MiB per connection. h11 bounds the whole request head
(`h11_max_incomplete_event_size`: a connection never holds more than that before it has a
request), so the service runs on h11, with `LimitedH11Protocol` adding what neither parser nor
uvicorn has:

- the request target, each header and the header count are bounded (414, 431, 431);
- a client has HTTP_HEADER_TIMEOUT_SECONDS to send a whole head (slow heads: 408, closed) and
  HTTP_BODY_TIMEOUT_SECONDS to send the body after it (408, closed);
- one client address holds at most HTTP_MAX_CONNECTIONS_PER_CLIENT connections (one more: 503,
  closed).

uvicorn itself enforces the rest: the keep-alive timeout and HTTP_MAX_CONNECTIONS
(`limit_concurrency`, 503 past it). Bodies are bounded per route by the routes (a webhook,
WEBHOOK_MAX_BODY_BYTES; the JSON API, 16 KiB). Every refusal here is the service's JSON error,
`Connection: close`. `token-billing serve` and the tests' servers are built by `build_server`,
so the tests exercise exactly these options.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import sys
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from token_billing.server import stream
from token_billing.server.settings import Settings

logger = logging.getLogger("token_billing.server")

# Seconds a shutdown waits for requests in flight (balance streams end at once: see
# token_billing.server.stream).
GRACEFUL_SHUTDOWN_SECONDS = 10
# uvicorn's exit status when startup fails (the lifespan raised, a port is taken).
STARTUP_FAILURE = 3


@dataclass(frozen=True)
class HttpLimits:
    """The per-connection limits LimitedH11Protocol enforces (see the HTTP_* settings)."""

    max_head_bytes: int = 32_768
    max_request_line_bytes: int = 8192
    max_header_bytes: int = 8192
    max_headers: int = 100
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    max_connections_per_client: int = 100

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_head_bytes=settings.http_max_head_bytes,
            max_request_line_bytes=settings.http_max_request_line_bytes,
            max_header_bytes=settings.http_max_header_bytes,
            max_headers=settings.http_max_headers,
            header_timeout_seconds=settings.http_header_timeout_seconds,
            body_timeout_seconds=settings.http_body_timeout_seconds,
            max_connections_per_client=settings.http_max_connections_per_client,
        )


def error_response(
    status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    """A whole HTTP/1.1 response with the service's JSON error body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# Connections per client address, per server (a ServerState is one listener's state).
_PEERS: weakref.WeakKeyDictionary[ServerState, Counter[str]] = weakref.WeakKeyDictionary()


class _Connection(h11.Connection):
    """h11's server connection, showing its protocol each request head and each body's end."""

    def __init__(self, protocol: LimitedH11Protocol, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self._protocol = protocol

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                self._protocol.on_head(event)
            elif isinstance(event, h11.EndOfMessage):
                self._protocol.on_body_end()
        except h11.RemoteProtocolError as exc:
            # uvicorn answers it with send_400_response(), which reads the status from here.
            self._protocol.refusal = exc
            raise
        return event


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with bounded heads, read timeouts and connections per client.

    `limits` is set on the subclass `protocol_class()` makes for one configuration.
    """

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(self, self.limits.max_head_bytes)
        self.refusal: h11.RemoteProtocolError | None = None
        self._peer: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # --- connections per client ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.limits.max_connections_per_client
        peer = self.client[0] if self.client else None
        if limit and peer is not None:
            peers = _PEERS.setdefault(self.server_state, Counter())
            if peers[peer] >= limit:
                logger.warning(
                    "too many connections from one client",
                    extra={"fields": {"client": peer, "limit": limit}},
                )
                self._refuse(
                    503,
                    "too_many_connections",
                    f"at most {limit} connections at once from one client",
                    (("retry-after", "5"),),
                )
                return
            peers[peer] += 1
            self._peer = peer
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._peer is not None:
            peers = _PEERS.get(self.server_state)
            if peers is not None:
                peers[self._peer] -= 1
                if peers[self._peer] <= 0:
                    del peers[self._peer]
            self._peer = None
        super().connection_lost(exc)

    # --- heads --------------------------------------------------------------------------------
    def on_head(self, event: h11.Request) -> None:
        """A whole request head arrived: check its parts, then give the body its time."""
        self._cancel(self._head_timer)
        self._head_timer = None
        limits = self.limits
        if len(event.target) > limits.max_request_line_bytes:
            raise h11.RemoteProtocolError(
                f"the request target exceeds {limits.max_request_line_bytes} bytes",
                error_status_hint=414,
            )
        if len(event.headers) > limits.max_headers:
            raise h11.RemoteProtocolError(
                f"more than {limits.max_headers} headers", error_status_hint=431
            )
        if any(len(name) + len(value) > limits.max_header_bytes for name, value in event.headers):
            raise h11.RemoteProtocolError(
                f"a header exceeds {limits.max_header_bytes} bytes", error_status_hint=431
            )
        self._cancel(self._body_timer)
        self._body_timer = self.loop.call_later(limits.body_timeout_seconds, self._body_timeout)

    def on_body_end(self) -> None:
        self._cancel(self._body_timer)
        self._body_timer = None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 (or on_head) refused: the status h11 hints at."""
        refusal, self.refusal = self.refusal, None
        status = refusal.error_status_hint if refusal is not None else 400
        if status == 431 and refusal is not None and "Receive buffer too long" in str(refusal):
            message = f"the request head exceeds {self.limits.max_head_bytes} bytes"
        else:
            message = str(refusal) if refusal is not None else msg
        code = {414: "uri_too_long", 431: "headers_too_large"}.get(status, "bad_request")
        self._refuse(status, code, message)

    def on_response_complete(self) -> None:
        # The next head gets its time from here (before super(), which may read a pipelined
        # head at once).
        if not self.transport.is_closing():
            self._arm_head_timer()
        super().on_response_complete()

    # --- timeouts -----------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._cancel(self._head_timer)
        self._head_timer = self.loop.call_later(
            self.limits.header_timeout_seconds, self._head_timeout
        )

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered
        partial, _ = self.conn.trailing_data
        if partial:
            self._refuse(
                408,
                "request_timeout",
                f"the request head did not arrive within {self.limits.header_timeout_seconds:g} s",
            )
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # The app stops waiting for the body (a disconnect) and cannot answer any more.
            cycle.disconnected = True
            cycle.message_event.set()
            self._refuse(
                408,
                "request_timeout",
                f"the request body did not arrive within {self.limits.body_timeout_seconds:g} s",
            )
        else:
            self.transport.close()

    def _refuse(
        self, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        if not self.transport.is_closing():
            self.transport.write(error_response(status, code, message, headers))
            self.transport.close()

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            self._cancel(timer)
        self._head_timer = self._body_timer = None


def protocol_class(limits: HttpLimits) -> type[LimitedH11Protocol]:
    """LimitedH11Protocol with these limits (uvicorn instantiates the class it is given)."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


def uvicorn_config(
    app: Starlette,
    settings: Settings,
    *,
    host: str,
    port: int,
    log_level: str | None = None,
    lifespan: str = "on",
) -> uvicorn.Config:
    """uvicorn's options for the service: h11 with the limits, no websockets, one worker."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(HttpLimits.from_settings(settings)),
        ws="none",
        lifespan=lifespan,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.http_max_head_bytes,
        timeout_keep_alive=settings.http_keep_alive_seconds,
        limit_concurrency=settings.http_max_connections,
        workers=1,
        access_log=False,  # the app writes one JSON line per request itself
        server_header=False,
        log_level=log_level or settings.log_level.lower(),
        proxy_headers=True,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


class Server(stream.Server):
    """The service's uvicorn server, and the metrics listener when METRICS_PORT is set.

    Both listen in one event loop and stop together; the metrics listener binds first, so a
    taken port fails the start like a taken API port does.
    """

    def __init__(self, config: uvicorn.Config, metrics: uvicorn.Config | None = None) -> None:
        super().__init__(config)
        self.metrics_config = metrics
        self._metrics_listener: asyncio.Server | None = None
        self._metrics_state = ServerState()

    async def startup(self, sockets: Any = None) -> None:
        await self._start_metrics()
        try:
            await super().startup(sockets)
        except BaseException:
            await self._stop_metrics()
            raise

    async def shutdown(self, sockets: Any = None) -> None:
        await self._stop_metrics()
        await super().shutdown(sockets)

    async def _start_metrics(self) -> None:
        config = self.metrics_config
        if config is None:
            return
        if not config.loaded:
            config.load()
        state = self._metrics_state
        loop = asyncio.get_running_loop()

        def protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state={}, _loop=_loop
            )
            return made

        try:
            self._metrics_listener = await loop.create_server(
                protocol, host=config.host, port=config.port, backlog=config.backlog
            )
        except OSError as exc:
            logger.error(
                "the metrics listener cannot start",
                extra={"fields": {"host": config.host, "port": config.port, "error": str(exc)}},
            )
            sys.exit(STARTUP_FAILURE)
        logger.info(
            "metrics listener started",
            extra={"fields": {"url": f"http://{config.host}:{config.port}/metrics"}},
        )

    async def _stop_metrics(self) -> None:
        listener, self._metrics_listener = self._metrics_listener, None
        if listener is None:
            return
        listener.close()
        for connection in list(self._metrics_state.connections):
            connection.shutdown()
        await listener.wait_closed()


def build_server(
    settings: Settings,
    *,
    host: str,
    port: int,
    app: Starlette | None = None,
    log_level: str | None = None,
) -> Server:
    """The server `token-billing serve` runs: the app (made from the settings unless given) on
    host:port, and the metrics listener on METRICS_HOST:METRICS_PORT when that is set."""
    from token_billing.server.app import create_app
    from token_billing.server.routes.health import metrics_app

    app = app if app is not None else create_app(settings)
    metrics = None
    if settings.metrics_port is not None:
        metrics = uvicorn_config(
            metrics_app(app.state.metrics, settings),
            settings,
            host=settings.metrics_host,
            port=settings.metrics_port,
            log_level=log_level,
            lifespan="off",
        )
    return Server(uvicorn_config(app, settings, host=host, port=port, log_level=log_level), metrics)
