"""GET /v1/products: the active catalog, for anyone (no Stripe ids, no inactive products)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.deps import active_products, runtime
from token_billing.server.openapi import ApiRoute

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
    return schemas.respond(
        schemas.ProductList(
            products=[
                schemas.Product.model_validate(
                    {
                        **{key: row.get(key) for key in PUBLIC_PRODUCT_FIELDS},
                        "purchasable": bool(row.get("stripe_price_id")),
                    }
                )
                for row in rows
                # Agent listings are the marketplace's (GET /v1/listings).
                if row.get("kind") in ("pack", "plan")
            ]
        )
    )


routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/products",
        list_products,
        methods=["GET"],
        summary="The active catalog: packs and plans, with their prices",
        responses={200: schemas.ProductList, 503: schemas.ErrorResponse},
    )
]
