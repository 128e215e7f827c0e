"""GET /healthz (the process answers), /readyz (the database answers, with this package's schema),
and /metrics (Prometheus text).

/metrics is never public on the API port: it is served by a listener of its own
(METRICS_PORT, see token_billing.server.serving) and, when METRICS_TOKEN is set, on the API port
too, to requests that carry that token.
"""

from __future__ import annotations

import hmac
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing import install
from token_billing.errors import DatabaseError
from token_billing.server import schemas
from token_billing.server.deps import runtime
from token_billing.server.http_errors import EXCEPTION_HANDLERS, ApiError
from token_billing.server.metrics import CONTENT_TYPE_LATEST, Metrics
from token_billing.server.openapi import ApiRoute
from token_billing.server.settings import Settings

logger = logging.getLogger("token_billing.server")

# SQLSTATEs that mean the schema is not there: no such function (42883; PostgREST's PGRST202),
# table or schema, or no grant on it.
_NOT_INSTALLED = frozenset({"42883", "42P01", "3F000", "42501"})
_RETRY = {"Retry-After": "10"}


async def healthz(request: Request) -> Response:
    return schemas.respond(schemas.Health(status="ok"))


async def readyz(request: Request) -> Response:
    rt = runtime(request)
    expected = install.expected_migrations()
    try:
        rows = await rt.db.rpc("installed_migrations", {})
    except DatabaseError as exc:
        if exc.sqlstate not in _NOT_INSTALLED:
            raise
        logger.warning(
            "token-billing is not installed in the database",
            extra={"fields": {"sqlstate": exc.sqlstate}},
        )
        raise ApiError(
            503,
            "schema_not_installed",
            f"token-billing {install.current_version()} is not installed in this database: run "
            "`token-billing install` (or `supabase db push`)",
            headers=_RETRY,
        ) from None
    applied = {str(row.get("version")) for row in rows}
    missing = [version for version in expected if version not in applied]
    if missing:
        logger.warning(
            "the database lacks migrations this service needs",
            extra={"fields": {"missing": missing}},
        )
        raise ApiError(
            503,
            "schema_outdated",
            f"the database lacks {len(missing)} of the {len(expected)} migrations of "
            f"token-billing {install.current_version()} (first missing: {missing[0]}): run "
            "`token-billing install` (or `supabase db push`)",
            headers=_RETRY,
        )
    return schemas.respond(
        schemas.Ready(status="ready", version=install.current_version(), migrations=len(expected))
    )


def check_metrics_token(request: Request, settings: Settings) -> None:
    """Refuse a /metrics request without METRICS_TOKEN when one is set."""
    if settings.metrics_token is None:
        return
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    expected = settings.metrics_token.get_secret_value()
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise ApiError(
            401,
            "unauthorized",
            "/metrics needs Authorization: Bearer <METRICS_TOKEN>",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )


def _render(metrics: Metrics) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def metrics(request: Request) -> Response:
    rt = runtime(request)
    check_metrics_token(request, rt.settings)
    await rt.metrics.refresh()
    return _render(rt.metrics)


def routes(settings: Settings) -> list[BaseRoute]:
    """/healthz and /readyz; /metrics on the API port only behind METRICS_TOKEN."""
    served: list[BaseRoute] = [
        ApiRoute(
            "/healthz",
            healthz,
            methods=["GET"],
            summary="Liveness: the process answers",
            responses={200: schemas.Health},
            tag="operators",
        ),
        ApiRoute(
            "/readyz",
            readyz,
            methods=["GET"],
            summary="Readiness: the database answers and has every migration of this version",
            responses={200: schemas.Ready, 503: schemas.ErrorResponse},
            tag="operators",
        ),
    ]
    if settings.metrics_token is not None:
        served.append(metrics_route())
    return served


def metrics_route() -> ApiRoute:
    return ApiRoute(
        "/metrics",
        metrics,
        methods=["GET"],
        summary="Prometheus metrics (text exposition format), behind METRICS_TOKEN",
        responses={200: schemas.PROMETHEUS_TEXT, 401: schemas.ErrorResponse},
        tag="operators",
        security="metricsToken",
    )


def metrics_app(registry: Metrics, settings: Settings) -> Starlette:
    """The metrics listener's app (METRICS_PORT): GET /metrics and nothing else."""

    async def endpoint(request: Request) -> Response:
        check_metrics_token(request, settings)
        await registry.refresh()
        return _render(registry)

    return Starlette(
        routes=[ApiRoute("/metrics", endpoint, methods=["GET"])],
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )
