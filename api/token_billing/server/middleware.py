"""The access log (one JSON line and the HTTP metrics per request) and CORS."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from token_billing.server.logs import LOG_SCOPE_KEY
from token_billing.server.metrics import Metrics

# What a page on another origin may send: the routes' methods, the user's token, a JSON body,
# the client's Idempotency-Key and request id. It may read Retry-After (429/503) and the id.
CORS_METHODS = ("GET", "POST")
CORS_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id")
CORS_EXPOSED = ("Retry-After", "X-Request-Id")
# How long a browser may reuse a preflight's answer.
CORS_MAX_AGE_SECONDS = 600


class AccessLog:
    """One JSON log line and the HTTP metrics per request (pure ASGI, so streaming is intact)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.logger = logging.getLogger("token_billing.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        fields: dict[str, Any] = {}
        scope[LOG_SCOPE_KEY] = fields
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.http_requests.labels(template, method, str(status)).inc()
            self.metrics.http_latency.labels(template, method).observe(elapsed)
            headers = dict(scope.get("headers") or [])
            request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or None
            self.logger.info(
                "request",
                extra={
                    "fields": {
                        "method": method,
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "request_id": request_id,
                        **fields,
                    }
                },
            )


class Cors(CORSMiddleware):
    """Starlette's CORS middleware, answering only the origins of CORS_ORIGINS.

    Starlette's own adds `Access-Control-Allow-Credentials: true` to every answer, a refused
    origin's included; here a refused origin gets no Access-Control-* header at all, and a
    refused preflight is the service's JSON error (400).
    """

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        super().__init__(
            app,
            allow_origins=list(origins),
            allow_methods=CORS_METHODS,
            allow_headers=CORS_HEADERS,
            allow_credentials=True,
            expose_headers=CORS_EXPOSED,
            max_age=CORS_MAX_AGE_SECONDS,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        origin = request_headers["origin"]
        if not self.is_allowed_origin(origin):
            message = "this origin may not call the API from a browser (it is not in CORS_ORIGINS)"
            code = "cors_origin_refused"
        else:
            message = bytes(response.body).decode().replace("Disallowed CORS", "refused CORS")
            code = "cors_refused"
        return JSONResponse(
            {"error": {"code": code, "message": message}},
            status_code=400,
            headers={"Vary": "Origin"},
        )

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        origin = request_headers.get("origin")
        if (
            message["type"] != "http.response.start"
            or origin is None
            or self.is_allowed_origin(origin)
        ):
            await super().send(message, send, request_headers)
            return
        headers = MutableHeaders(scope=message)
        headers.append("Vary", "Origin")
        await send(message)
