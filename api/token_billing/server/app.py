"""The HTTP service: the app factory, its lifespan, middleware and routes.

Routes and statuses are the public contract (docs/contract.md). Everything that touches money
is a database function: the service authenticates, talks to Stripe, and calls one RPC. Each
resource's routes are a module of token_billing.server.routes; each declares its OpenAPI
operation (token_billing.server.openapi), served at GET /openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

import token_billing
from token_billing.server import stream
from token_billing.server.api_keys import KeyAuthenticator
from token_billing.server.auth import Authenticator
from token_billing.server.database import database_from_settings, describe, wait_until_reachable
from token_billing.server.deps import Runtime
from token_billing.server.http_errors import EXCEPTION_HANDLERS
from token_billing.server.metrics import Metrics
from token_billing.server.middleware import AccessLog, Cors
from token_billing.server.openapi import openapi_document, share_paths
from token_billing.server.routes import (
    api_keys,
    balance,
    checkout,
    creators,
    dev,
    health,
    holds,
    ledger,
    ops,
    products,
    usage,
    webhooks,
)
from token_billing.server.settings import Settings, load_settings
from token_billing.server.stripe_api import StripeGateway
from token_billing.server.worker import BillingWorker

logger = logging.getLogger("token_billing.server")

API_TITLE = "token-billing"
API_DESCRIPTION = (
    "Token (credit) billing for AI apps on Supabase and Stripe: checkout, the billing portal, "
    "the user's balance and ledger, the catalog, Stripe's webhook, and usage priced by the rate "
    "card for agent backends with API keys."
)


def _metrics_where(settings: Settings) -> str:
    places = []
    if settings.metrics_port is not None:
        places.append(f"http://{settings.metrics_host}:{settings.metrics_port}/metrics")
    if settings.metrics_token is not None:
        places.append("/metrics on the API port with METRICS_TOKEN")
    return ", ".join(places) or "off (set METRICS_PORT or METRICS_TOKEN)"


def _stripe_mode(settings: Settings) -> str:
    if settings.stripe_key_generated:
        return "generated placeholder key: checkout and the portal answer 409"
    live = settings.stripe_secret_key.get_secret_value().startswith(("sk_live_", "rk_live_"))
    return f"{'live' if live else 'test'} key, {settings.stripe_api_base_url}"


def create_app(settings: Settings | None = None) -> Starlette:
    """The service. Settings come from the environment (and `.env`) unless given."""
    settings = settings if settings is not None else load_settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        http = httpx.AsyncClient(timeout=10.0)
        db = database_from_settings(settings)
        gateway = StripeGateway(settings, metrics)
        try:
            await db.open()
            waited = await wait_until_reachable(settings, db)
        except BaseException:
            await db.close()
            await gateway.close()
            await http.aclose()
            raise
        metrics.business.attach(db, settings.metrics_business_seconds)
        balances = stream.BalanceBroker.from_settings(settings, db)
        await balances.start()
        app.state.balances = balances
        app.state.runtime = Runtime(
            settings=settings,
            metrics=metrics,
            db=db,
            auth=Authenticator(settings, http),
            stripe=gateway,
            http=http,
            keys=KeyAuthenticator(
                db,
                environment=settings.api_key_environment,
                rate=settings.api_key_rate_per_second,
                burst=settings.api_key_rate_burst,
            ),
        )
        logger.info(
            "service started",
            extra={
                "fields": {
                    "version": token_billing.__version__,
                    "mode": settings.mode,
                    "environment": settings.environment,
                    "dev_routes": settings.dev_routes,
                    "database": describe(settings),
                    "database_wait_s": round(waited, 2),
                    "cors_origins": settings.cors_origins or "same origin only",
                    "metrics": _metrics_where(settings),
                    "stripe": _stripe_mode(settings),
                }
            },
        )
        stop_worker = asyncio.Event()
        worker_task: asyncio.Task[None] | None = None
        if settings.billing_worker_interval_seconds > 0:
            worker = BillingWorker(settings, db, gateway, http)
            app.state.billing_worker = worker
            worker_task = asyncio.create_task(
                worker.run(settings.billing_worker_interval_seconds, stop_worker)
            )
        try:
            yield
        finally:
            metrics.business.detach()
            stop_worker.set()
            if worker_task is not None:
                await asyncio.gather(worker_task, return_exceptions=True)
            await balances.close()
            await db.close()
            await gateway.close()
            await http.aclose()

    routes: list[BaseRoute] = [
        *checkout.routes,
        *creators.routes,
        *balance.routes,
        *products.routes,
        *webhooks.routes,
        *health.routes(settings),
        *ledger.routes,
        *usage.routes,
        *holds.routes,
        *api_keys.routes,
        *dev.routes(settings),
        *ops.routes(settings),
    ]
    share_paths(routes)
    document = openapi_document(
        routes, title=API_TITLE, version=token_billing.__version__, description=API_DESCRIPTION
    )

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes.append(Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False))
    app = Starlette(
        routes=routes,
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.openapi = document
    # Outermost last: the access log sees every answer, CORS refusals included.
    app.add_middleware(Cors, origins=settings.cors_origins)
    app.add_middleware(AccessLog, metrics=metrics)
    return app
