"""GET /v1/products: the active catalog, for anyone (no Stripe ids, no inactive products)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.deps import active_prices, active_products, runtime
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


def plan_prices(row: dict[str, Any], prices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A plan's prices: its products row's (monthly) first, then product_prices'."""
    if row.get("kind") != "plan" or not row.get("price_cents"):
        return []
    listed = [
        {
            "interval": "month",
            "currency": row.get("currency") or "usd",
            "unit_amount": row["price_cents"],
            "purchasable": bool(row.get("stripe_price_id")),
        }
    ]
    for price in prices:
        if price["product_code"] != row["code"]:
            continue
        same = (price["billing_interval"], price["currency"]) == ("month", listed[0]["currency"])
        if same:
            continue
        listed.append(
            {
                "interval": price["billing_interval"],
                "currency": price["currency"],
                "unit_amount": price["unit_amount"],
                "purchasable": bool(price.get("stripe_price_id")),
            }
        )
    return listed


async def list_products(request: Request) -> Response:
    rt = runtime(request)
    rows = await active_products(rt)
    prices = await active_prices(rt)
    return schemas.respond(
        schemas.ProductList(
            products=[
                schemas.Product.model_validate(
                    {
                        **{key: row.get(key) for key in PUBLIC_PRODUCT_FIELDS},
                        "purchasable": bool(row.get("stripe_price_id")),
                        "prices": plan_prices(row, prices),
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
