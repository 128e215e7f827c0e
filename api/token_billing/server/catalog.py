"""`token-billing stripe sync-products`: the Stripe Products and Prices of billing.products.

Each product with a price is a Stripe Product with the fixed id `tb_<code>` and one active Price
found by its lookup key `token-billing:<code>` (monthly recurring for plans). A plan's further
prices (billing.product_prices: annual, other currencies) are Prices of the same Product with the
lookup key `token-billing:<code>:<interval>:<currency>`. Running it again changes nothing unless
the catalog changed: a changed name updates the Product; a changed amount, currency or kind
makes a new Price that takes over the lookup key, and the old one is archived (subscriptions on
it keep running). The price ids are stored back with public.set_product_stripe_price() and
public.set_product_price(). `adopt_price` maps an existing Stripe price (`--adopt price_...`)
to its plan instead of creating one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import stripe

from token_billing.db import Database
from token_billing.server.stripe_api import idempotency_key


def lookup_key(code: str, interval: str | None = None, currency: str | None = None) -> str:
    if interval is None:
        return f"token-billing:{code}"
    return f"token-billing:{code}:{interval}:{currency}"


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


def _price_matches(
    price: Any, code: str, unit_amount: int, currency: str, want_interval: str | None
) -> bool:
    recurring = getattr(price, "recurring", None)
    interval = getattr(recurring, "interval", None) if recurring else None
    product = price.product if isinstance(price.product, str) else price.product.id
    return bool(
        price.active
        and price.unit_amount == unit_amount
        and str(price.currency).lower() == currency.lower()
        and interval == want_interval
        and product == stripe_product_id(code)
    )


async def _ensure_price(
    client: stripe.StripeClient,
    code: str,
    tokens: int,
    unit_amount: int,
    currency: str,
    interval: str | None,
    key: str,
    stored: str | None = None,
) -> tuple[str, bool]:
    """The price already stored (an adopted one) if it still matches, else the active Price
    with this lookup key, created (taking the key over) when it differs; (price id, created)."""
    if stored:
        try:
            mapped = await client.v1.prices.retrieve_async(stored)
        except stripe.InvalidRequestError as exc:
            if not _missing(exc):
                raise
        else:
            if _price_matches(mapped, code, unit_amount, currency, interval):
                return stored, False
    found = await client.v1.prices.list_async(params={"lookup_keys": [key], "limit": 1})
    current = found.data[0] if found.data else None
    if current is not None and _price_matches(current, code, unit_amount, currency, interval):
        return str(current.id), False
    params: dict[str, Any] = {
        "product": stripe_product_id(code),
        "unit_amount": unit_amount,
        "currency": currency,
        "lookup_key": key,
        "transfer_lookup_key": True,
        "metadata": {"token_billing_code": code, "tokens": str(tokens)},
    }
    if interval is not None:
        params["recurring"] = {"interval": interval}
    created = await client.v1.prices.create_async(
        params=params,  # type: ignore[arg-type]
        options={
            "idempotency_key": idempotency_key(
                "sync-price",
                code,
                unit_amount,
                currency,
                interval or "once",
                current.id if current is not None else "",
            )
        },
    )
    if current is not None and current.active:
        await client.v1.prices.update_async(
            str(current.id),
            params={"active": False},
            options={"idempotency_key": idempotency_key("sync-price-archive", current.id)},
        )
    return str(created.id), True


async def sync_one(client: stripe.StripeClient, db: Database, row: dict[str, Any]) -> SyncResult:
    code = str(row["code"])
    if not row.get("active"):
        return SyncResult(code, "skipped", row.get("stripe_price_id"), "inactive")
    if not row.get("price_cents"):
        return SyncResult(code, "skipped", row.get("stripe_price_id"), "free: nothing to sell")
    product_changed = await _ensure_product(client, row)
    price_id, created = await _ensure_price(
        client,
        code,
        int(row["tokens"]),
        int(row["price_cents"]),
        str(row["currency"]),
        "month" if row["kind"] == "plan" else None,
        lookup_key(code),
        row.get("stripe_price_id"),
    )
    action = "created" if created else ("updated" if product_changed else "unchanged")
    if row.get("stripe_price_id") != price_id:
        await db.rpc("set_product_stripe_price", {"p_code": code, "p_stripe_price_id": price_id})
        if action == "unchanged":
            action = "updated"
    return SyncResult(code, action, price_id)


async def sync_extra_price(
    client: stripe.StripeClient, db: Database, row: dict[str, Any], price: dict[str, Any]
) -> SyncResult:
    """A plan's further price (billing.product_prices): a Price of its Product, by lookup key."""
    code, interval, currency = str(row["code"]), price["billing_interval"], price["currency"]
    label = f"{code}/{interval}/{currency}"
    if not row.get("active") or not price.get("active"):
        return SyncResult(label, "skipped", price.get("stripe_price_id"), "inactive")
    await _ensure_product(client, row)
    price_id, created = await _ensure_price(
        client,
        code,
        int(row["tokens"]),
        int(price["unit_amount"]),
        currency,
        interval,
        lookup_key(code, interval, currency),
        price.get("stripe_price_id"),
    )
    action = "created" if created else "unchanged"
    if price.get("stripe_price_id") != price_id:
        await db.rpc(
            "set_product_price",
            {
                "p_code": code,
                "p_interval": interval,
                "p_currency": currency,
                "p_unit_amount": price["unit_amount"],
                "p_stripe_price_id": price_id,
            },
        )
        if action == "unchanged":
            action = "updated"
    return SyncResult(label, action, price_id)


async def adopt_price(client: stripe.StripeClient, db: Database, price_id: str) -> SyncResult:
    """Maps an existing recurring Stripe price to the plan its Product is (tb_<code>, or the
    product's metadata.token_billing_code); nothing is created in Stripe."""
    price = await client.v1.prices.retrieve_async(price_id, params={"expand": ["product"]})
    product = price.product
    raw_metadata = getattr(product, "metadata", None)
    metadata: dict[str, Any] = raw_metadata.to_dict() if raw_metadata is not None else {}
    product_id = product if isinstance(product, str) else product.id
    code = metadata.get("token_billing_code") or (
        product_id[3:] if product_id.startswith("tb_") else None
    )
    recurring = getattr(price, "recurring", None)
    interval = getattr(recurring, "interval", None) if recurring else None
    if not code or interval not in ("month", "year"):
        return SyncResult(
            price_id,
            "skipped",
            price_id,
            "not a monthly or yearly price of a token-billing plan (tb_<code> product)",
        )
    rows = {r["code"]: r for r in await db.rpc("list_products", {"p_include_inactive": True})}
    row = rows.get(code)
    currency = str(price.currency).lower()
    if row is None or row["kind"] != "plan":
        return SyncResult(price_id, "skipped", price_id, f"no plan {code!r} in billing.products")
    if interval == "month" and currency == str(row["currency"]).lower():
        await db.rpc("set_product_stripe_price", {"p_code": code, "p_stripe_price_id": price_id})
    else:
        await db.rpc(
            "set_product_price",
            {
                "p_code": code,
                "p_interval": interval,
                "p_currency": currency,
                "p_unit_amount": int(price.unit_amount or 0),
                "p_stripe_price_id": price_id,
            },
        )
    return SyncResult(f"{code}/{interval}/{currency}", "adopted", price_id)


async def sync_products(
    client: stripe.StripeClient,
    db: Database,
    report: Callable[[SyncResult], None] = lambda _: None,
    adopt: Sequence[str] = (),
) -> list[SyncResult]:
    """Make Stripe match billing.products and billing.product_prices (after adopting the given
    existing prices); return what happened to each product and price."""
    results = []
    for price_id in adopt:
        result = await adopt_price(client, db, price_id)
        report(result)
        results.append(result)
    rows = await db.rpc("list_products", {"p_include_inactive": True})
    for row in rows:
        if row["kind"] == "agent":
            # A creator's listing is sold with price_data, to the creator's account: no Price.
            continue
        result = await sync_one(client, db, row)
        report(result)
        results.append(result)
    by_code = {str(r["code"]): r for r in rows}
    for price in await db.rpc("list_product_prices", {"p_include_inactive": True}):
        plan = by_code.get(str(price["product_code"]))
        if plan is None:
            continue
        result = await sync_extra_price(client, db, plan, price)
        report(result)
        results.append(result)
    return results
