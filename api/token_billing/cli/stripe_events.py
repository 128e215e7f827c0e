"""Realistic Stripe events for `token-billing stripe trigger`, and Stripe's webhook signature.

The templates follow the shape of real deliveries (the envelopes in
tests/fixtures/stripe/stripe-ruby-mock-webhook_fixtures and the 2025-03-31+ objects of Stripe's
openapi fixtures3), trimmed to the fields a receiver reads, with the metadata the service puts on
its own Checkout Sessions and subscriptions. They let `make dev` show a purchase land without a
Stripe account; with one, `stripe trigger` plus `stripe listen --forward-to` do the same for real.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

API_VERSION = "2025-03-31.basil"

TRIGGERABLE = (
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "customer.subscription.created",
    "invoice.paid",
    "invoice.payment_succeeded",
    "charge.refunded",
)


def stripe_signature(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header Stripe sends: `t=<unix>,v1=<hex HMAC-SHA256 of "t.payload">`."""
    ts = int(time.time()) if timestamp is None else timestamp
    signed = f"{ts}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def _id(prefix: str, length: int = 24) -> str:
    return f"{prefix}_{secrets.token_hex(length // 2)}"


def customer_id_for(user_id: str) -> str:
    """A stable fake customer id per user, so repeated triggers look like one customer."""
    return "cus_tb" + hashlib.sha256(user_id.encode()).hexdigest()[:14]


@dataclass(frozen=True)
class Product:
    """What a trigger needs to know of a billing.products row."""

    code: str
    kind: str
    tokens: int
    price_cents: int
    currency: str
    stripe_price_id: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Product:
        return cls(
            code=str(row["code"]),
            kind=str(row["kind"]),
            tokens=int(row["tokens"]),
            price_cents=int(row.get("price_cents") or 0),
            currency=str(row.get("currency") or "usd"),
            stripe_price_id=row.get("stripe_price_id"),
        )

    @property
    def price(self) -> str:
        return self.stripe_price_id or f"price_tb_{self.code}"


def envelope(event_type: str, obj: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    """A v1 snapshot event around `obj`, as Stripe delivers it."""
    return {
        "id": _id("evt"),
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": _id("req", 14), "idempotency_key": None},
        "type": event_type,
    }


def checkout_session(
    user_id: str,
    product: Product,
    *,
    quantity: int = 1,
    customer: str | None = None,
    payment_intent: str | None = None,
    paid: bool = True,
) -> dict[str, Any]:
    now = int(time.time())
    amount = product.price_cents * quantity
    metadata = {"user_id": user_id, "product": product.code, "quantity": str(quantity)}
    pack = product.kind == "pack"
    return {
        "id": _id("cs_test", 58),
        "object": "checkout.session",
        "amount_subtotal": amount,
        "amount_total": amount,
        "cancel_url": "http://localhost:3000/billing/cancel",
        "client_reference_id": user_id,
        "created": now,
        "currency": product.currency,
        "customer": customer or customer_id_for(user_id),
        "customer_details": {"email": None, "tax_exempt": "none", "tax_ids": []},
        "expires_at": now + 86_400,
        "invoice": None if pack else _id("in"),
        "livemode": False,
        "metadata": metadata,
        "mode": "payment" if pack else "subscription",
        "payment_intent": (payment_intent or _id("pi")) if pack else None,
        "payment_method_types": ["card"],
        "payment_status": "paid" if paid else "unpaid",
        "status": "complete",
        "subscription": None if pack else _id("sub"),
        "success_url": "http://localhost:3000/billing/success",
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "url": None,
    }


def subscription(
    user_id: str, product: Product, *, customer: str | None = None, sub_id: str | None = None
) -> dict[str, Any]:
    now = int(time.time())
    end = now + 30 * 86_400
    sub = sub_id or _id("sub")
    metadata = {"user_id": user_id, "product": product.code, "quantity": "1"}
    price = {
        "id": product.price,
        "object": "price",
        "active": True,
        "currency": product.currency,
        "lookup_key": f"token-billing:{product.code}",
        "product": f"prod_tb_{product.code}",
        "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
        "type": "recurring",
        "unit_amount": product.price_cents,
    }
    return {
        "id": sub,
        "object": "subscription",
        "billing_cycle_anchor": now,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "collection_method": "charge_automatically",
        "created": now,
        "currency": product.currency,
        "customer": customer or customer_id_for(user_id),
        "ended_at": None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": _id("si", 14),
                    "object": "subscription_item",
                    "current_period_end": end,
                    "current_period_start": now,
                    "price": price,
                    "quantity": 1,
                    "subscription": sub,
                }
            ],
            "has_more": False,
        },
        "latest_invoice": _id("in"),
        "livemode": False,
        "metadata": metadata,
        "start_date": now,
        "status": "active",
    }


def invoice(
    user_id: str,
    product: Product,
    *,
    customer: str | None = None,
    sub_id: str | None = None,
    billing_reason: str = "subscription_create",
) -> dict[str, Any]:
    now = int(time.time())
    end = now + 30 * 86_400
    sub = sub_id or _id("sub")
    metadata = {"user_id": user_id, "product": product.code, "quantity": "1"}
    invoice_id = _id("in")
    return {
        "id": invoice_id,
        "object": "invoice",
        "amount_due": product.price_cents,
        "amount_paid": product.price_cents,
        "amount_remaining": 0,
        "attempt_count": 1,
        "attempted": True,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "created": now,
        "currency": product.currency,
        "customer": customer or customer_id_for(user_id),
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": _id("il", 14),
                    "object": "line_item",
                    "amount": product.price_cents,
                    "currency": product.currency,
                    "invoice": invoice_id,
                    "metadata": metadata,
                    "parent": {
                        "type": "subscription_item_details",
                        "subscription_item_details": {
                            "invoice_item": None,
                            "proration": False,
                            "subscription": sub,
                            "subscription_item": _id("si", 14),
                        },
                    },
                    "period": {"end": end, "start": now},
                    "pricing": {
                        "type": "price_details",
                        "price_details": {
                            "price": product.price,
                            "product": f"prod_tb_{product.code}",
                        },
                        "unit_amount_decimal": str(product.price_cents),
                    },
                    "quantity": 1,
                }
            ],
            "has_more": False,
        },
        "livemode": False,
        "metadata": {},
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": metadata, "subscription": sub},
        },
        "period_end": now,
        "period_start": now,
        "status": "paid",
        "status_transitions": {"paid_at": now, "finalized_at": now},
        "subtotal": product.price_cents,
        "total": product.price_cents,
    }


def refunded_charge(
    user_id: str,
    product: Product,
    *,
    payment_intent: str,
    amount_cents: int | None = None,
    customer: str | None = None,
    quantity: int = 1,
) -> dict[str, Any]:
    now = int(time.time())
    paid = product.price_cents * quantity
    refunded = paid if amount_cents is None else amount_cents
    charge_id = _id("ch")
    return {
        "id": charge_id,
        "object": "charge",
        "amount": paid,
        "amount_captured": paid,
        "amount_refunded": refunded,
        "captured": True,
        "created": now,
        "currency": product.currency,
        "customer": customer or customer_id_for(user_id),
        "livemode": False,
        "metadata": {"user_id": user_id, "product": product.code, "quantity": str(quantity)},
        "paid": True,
        "payment_intent": payment_intent,
        "refunded": refunded >= paid,
        "refunds": {
            "object": "list",
            "data": [
                {
                    "id": _id("re"),
                    "object": "refund",
                    "amount": refunded,
                    "charge": charge_id,
                    "created": now,
                    "currency": product.currency,
                    "payment_intent": payment_intent,
                    "status": "succeeded",
                }
            ],
            "has_more": False,
        },
        "status": "succeeded",
    }


def build_event(
    event_type: str,
    user_id: str,
    product: Product,
    *,
    quantity: int = 1,
    customer: str | None = None,
    payment_intent: str | None = None,
    amount_cents: int | None = None,
) -> dict[str, Any]:
    """The event `stripe trigger <event_type>` would make for this user and product."""
    if event_type in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        obj = checkout_session(
            user_id, product, quantity=quantity, customer=customer, payment_intent=payment_intent
        )
    elif event_type == "customer.subscription.created":
        _require_plan(event_type, product)
        obj = subscription(user_id, product, customer=customer)
    elif event_type in ("invoice.paid", "invoice.payment_succeeded"):
        _require_plan(event_type, product)
        obj = invoice(user_id, product, customer=customer)
    elif event_type == "charge.refunded":
        if product.kind != "pack":
            raise ValueError("charge.refunded is triggered for a token pack")
        if not payment_intent:
            raise ValueError(
                "charge.refunded needs --payment-intent pi_... (printed by the checkout trigger)"
            )
        obj = refunded_charge(
            user_id,
            product,
            payment_intent=payment_intent,
            amount_cents=amount_cents,
            customer=customer,
            quantity=quantity,
        )
    else:
        raise ValueError(f"cannot trigger {event_type}; one of: {', '.join(TRIGGERABLE)}")
    return envelope(event_type, obj)


def _require_plan(event_type: str, product: Product) -> None:
    if product.kind != "plan":
        raise ValueError(f"{event_type} is triggered for a plan, {product.code} is a pack")
