"""GET /v1/products: the active catalog, for anyone (no Stripe ids, no inactive products)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from token_billing.server.deps import active_products, runtime

PUBLIC_PRODUCT_FIELDS = (
    "code",
    "kind",
    "name",
    "description",
    "tokens",
    "price_cents",
    "currency",
    "rollover",
    "sort_order",
)


async def list_products(request: Request) -> Response:
    rt = runtime(request)
    rows = await active_products(rt)
    return JSONResponse(
        {
            "products": [
                {
                    **{key: row.get(key) for key in PUBLIC_PRODUCT_FIELDS},
                    "purchasable": bool(row.get("stripe_price_id")),
                }
                for row in rows
            ]
        }
    )


routes: list[BaseRoute] = [Route("/v1/products", list_products, methods=["GET"])]
