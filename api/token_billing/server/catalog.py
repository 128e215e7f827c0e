"""`token-billing stripe sync-products`: the Stripe Products and Prices of billing.products.

Each product with a price is a Stripe Product with the fixed id `tb_<code>` and one active Price
found by its lookup key `token-billing:<code>` (monthly recurring for plans). Running it again
changes nothing unless the catalog changed: a changed name updates the Product; a changed
amount, currency or kind makes a new Price that takes over the lookup key, and the old one is
archived (subscriptions on it keep running). The price ids are stored back with
public.set_product_stripe_price().
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import stripe

from token_billing.db import Database
from token_billing.server.stripe_api import idempotency_key


def lookup_key(code: str) -> str:
    return f"token-billing:{code}"


def stripe_product_id(code: str) -> str:
    return f"tb_{code}"


@dataclass(frozen=True)
class SyncResult:
    code: str
    action: str  # created, updated, unchanged, skipped
    price_id: str | None
    detail: str = ""

    def line(self) -> str:
        price = self.price_id or "-"
        return f"{self.code:<16} {self.action:<9} {price}" + (
            f"  ({self.detail})" if self.detail else ""
        )


def _missing(exc: stripe.InvalidRequestError) -> bool:
    return exc.http_status == 404 or exc.code == "resource_missing"


async def _ensure_product(client: stripe.StripeClient, row: dict[str, Any]) -> bool:
    """Create or update the Stripe Product; True when something changed."""
    code = str(row["code"])
    product_id = stripe_product_id(code)
    name = str(row["name"])
    description = row.get("description") or None
    try:
        current = await client.v1.products.retrieve_async(product_id)
    except stripe.InvalidRequestError as exc:
        if not _missing(exc):
            raise
        params: dict[str, Any] = {
            "id": product_id,
            "name": name,
            "metadata": {"token_billing_code": code},
        }
        if description:
            params["description"] = description
        await client.v1.products.create_async(
            params=params,  # type: ignore[arg-type]
            options={"idempotency_key": idempotency_key("sync-product", code, name, description)},
        )
        return True
    if current.name == name and (current.description or None) == description and current.active:
        return False
    await client.v1.products.update_async(
        product_id,
        params={"name": name, "description": description or "", "active": True},
        options={
            "idempotency_key": idempotency_key("sync-product-update", code, name, description)
        },
    )
    return True


def _price_matches(price: Any, row: dict[str, Any]) -> bool:
    recurring = getattr(price, "recurring", None)
    interval = getattr(recurring, "interval", None) if recurring else None
    want_interval = "month" if row["kind"] == "plan" else None
    product = price.product if isinstance(price.product, str) else price.product.id
    return bool(
        price.active
        and price.unit_amount == row["price_cents"]
        and str(price.currency).lower() == str(row["currency"]).lower()
        and interval == want_interval
        and product == stripe_product_id(str(row["code"]))
    )


async def sync_one(client: stripe.StripeClient, db: Database, row: dict[str, Any]) -> SyncResult:
    code = str(row["code"])
    if not row.get("active"):
        return SyncResult(code, "skipped", row.get("stripe_price_id"), "inactive")
    if not row.get("price_cents"):
        return SyncResult(code, "skipped", row.get("stripe_price_id"), "free: nothing to sell")
    product_changed = await _ensure_product(client, row)
    key = lookup_key(code)
    found = await client.v1.prices.list_async(params={"lookup_keys": [key], "limit": 1})
    current = found.data[0] if found.data else None
    if current is not None and _price_matches(current, row):
        price_id = str(current.id)
        action = "updated" if product_changed else "unchanged"
    else:
        params: dict[str, Any] = {
            "product": stripe_product_id(code),
            "unit_amount": row["price_cents"],
            "currency": row["currency"],
            "lookup_key": key,
            "transfer_lookup_key": True,
            "metadata": {"token_billing_code": code, "tokens": str(row["tokens"])},
        }
        if row["kind"] == "plan":
            params["recurring"] = {"interval": "month"}
        created = await client.v1.prices.create_async(
            params=params,  # type: ignore[arg-type]
            options={
                "idempotency_key": idempotency_key(
                    "sync-price",
                    code,
                    row["price_cents"],
                    row["currency"],
                    row["kind"],
                    current.id if current is not None else "",
                )
            },
        )
        price_id = str(created.id)
        if current is not None and current.active:
            await client.v1.prices.update_async(
                str(current.id),
                params={"active": False},
                options={"idempotency_key": idempotency_key("sync-price-archive", current.id)},
            )
        action = "created"
    if row.get("stripe_price_id") != price_id:
        await db.rpc("set_product_stripe_price", {"p_code": code, "p_stripe_price_id": price_id})
        if action == "unchanged":
            action = "updated"
    return SyncResult(code, action, price_id)


async def sync_products(
    client: stripe.StripeClient,
    db: Database,
    report: Callable[[SyncResult], None] = lambda _: None,
) -> list[SyncResult]:
    """Make Stripe match billing.products; return what happened to each product."""
    results = []
    for row in await db.rpc("list_products", {"p_include_inactive": True}):
        if row["kind"] == "agent":
            # A creator's listing is sold with price_data, to the creator's account: no Price.
            continue
        result = await sync_one(client, db, row)
        report(result)
        results.append(result)
    return results
