"""The HTTP service: the app factory, its lifespan, middleware and routes.

Routes and statuses are the public contract (the README lists them). Everything that touches money
is a database function: the service authenticates, talks to Stripe, and calls one RPC. Each
resource's routes are a module of token_billing.server.routes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette

from token_billing.server import stream
from token_billing.server.auth import Authenticator
from token_billing.server.database import database_from_settings
from token_billing.server.deps import Runtime
from token_billing.server.http_errors import EXCEPTION_HANDLERS
from token_billing.server.metrics import Metrics
from token_billing.server.middleware import AccessLog
from token_billing.server.routes import balance, checkout, dev, health, ledger, products, webhooks
from token_billing.server.settings import Settings, load_settings
from token_billing.server.stripe_api import StripeGateway


def create_app(settings: Settings | None = None) -> Starlette:
    """The service. Settings come from the environment (and `.env`) unless given."""
    settings = settings if settings is not None else load_settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        http = httpx.AsyncClient(timeout=10.0)
        db = database_from_settings(settings)
        gateway = StripeGateway(settings, metrics)
        await db.open()
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
        )
        try:
            yield
        finally:
            await balances.close()
            await db.close()
            await gateway.close()
            await http.aclose()

    app = Starlette(
        routes=[
            *checkout.routes,
            *balance.routes,
            *products.routes,
            *webhooks.routes,
            *health.routes,
            *ledger.routes,
            *dev.routes(settings),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    app.add_middleware(AccessLog, metrics=metrics)
    return app
