"""The billing worker: what the database queues and only the service can do.

Four outboxes, each claimed with `for update skip locked` and a lease, so several services may
run it and a crash hands the work to the next run:

- notifications (billing.notification_deliveries) go to the host app's webhook
  (NOTIFICATION_WEBHOOK_URL), signed like Stripe's webhooks (`sign`, `verify`), retried with
  backoff until the host answers 2xx, then never sent again;
- auto top-ups (billing.auto_top_ups, one per threshold crossing) charge the customer's saved
  card off-session (a PaymentIntent with off_session and confirm, the crossing's idempotency key,
  so a retry or a second worker charges once); the outcome is reported with
  public.finish_auto_top_up, and payment_intent.succeeded credits the pack;
- annual plans' scheduled months are granted (public.grant_scheduled_tokens);
- postpaid overage of ended periods becomes a Stripe invoice item (idempotent per user and
  period), then public.mark_postpaid_invoiced.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import stripe

from token_billing.db import Database
from token_billing.server.settings import Settings
from token_billing.server.stripe_api import StripeGateway

logger = logging.getLogger("token_billing.worker")

SIGNATURE_HEADER = "Token-Billing-Signature"
NOTIFICATION_ID_HEADER = "Token-Billing-Notification-Id"
DEFAULT_TOLERANCE_SECONDS = 300


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header of a notification body: `t=<unix time>,v1=<hex HMAC-SHA256 of
    "<t>." + body>` keyed with the secret (Stripe's scheme)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether `header` signs `body` with `secret` within the tolerance: what a host app runs."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_seconds:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def notification_body(row: Mapping[str, Any]) -> bytes:
    """The JSON a host receives for one notification."""
    created: Any = row.get("created_at")
    return json.dumps(
        {
            "id": str(row["notification_id"]),
            "object": "token_billing.notification",
            "type": row["kind"],
            "created": created.isoformat() if isinstance(created, datetime) else created,
            "user_id": str(row["user_id"]),
            "message": row["message"],
            "data": row.get("data") or {},
        },
        separators=(",", ":"),
        sort_keys=True,
        default=str,
    ).encode()


@dataclass
class RunCounts:
    """What one run did."""

    delivered: int = 0
    delivery_failures: int = 0
    top_ups_charged: int = 0
    top_ups_failed: int = 0
    top_ups_retried: int = 0
    months_granted: int = 0
    postpaid_invoiced: int = 0
    errors: list[str] = field(default_factory=list)


class BillingWorker:
    """One run (`run_once`) or a loop (`run`) over the outboxes."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        stripe_gateway: StripeGateway | None,
        http: httpx.AsyncClient,
    ) -> None:
        self.settings = settings
        self.db = db
        self.stripe = stripe_gateway
        self.http = http

    # --- notifications ----------------------------------------------------------------------
    async def deliver_notifications(self, counts: RunCounts, limit: int = 20) -> None:
        url = self.settings.notification_webhook_url
        secret = self.settings.notification_webhook_secret
        if url is None or secret is None:
            return
        for row in await self.db.rpc("claim_notification_deliveries", {"p_limit": limit}):
            body = notification_body(row)
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(secret.get_secret_value(), body, int(time.time())),
                NOTIFICATION_ID_HEADER: str(row["notification_id"]),
            }
            error: str | None = None
            try:
                response = await self.http.post(str(url), content=body, headers=headers)
                if not response.is_success:
                    error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            await self.db.rpc(
                "complete_notification_delivery",
                {
                    "p_notification_id": str(row["notification_id"]),
                    "p_delivered": error is None,
                    "p_error": error,
                },
            )
            if error is None:
                counts.delivered += 1
            else:
                counts.delivery_failures += 1
                logger.warning(
                    "notification webhook failed",
                    extra={
                        "fields": {"notification_id": str(row["notification_id"]), "error": error}
                    },
                )

    # --- auto top-up ------------------------------------------------------------------------
    async def _finish(
        self, top_up_id: str, outcome: str, intent: Mapping[str, Any] | None, detail: str | None
    ) -> None:
        await self.db.rpc(
            "finish_auto_top_up",
            {
                "p_id": top_up_id,
                "p_outcome": outcome,
                "p_payment_intent": dict(intent) if intent is not None else None,
                "p_detail": detail,
            },
        )

    async def _saved_payment_method(
        self, client: stripe.StripeClient, customer_id: str
    ) -> str | None:
        customer = await client.v1.customers.retrieve_async(customer_id)
        settings = getattr(customer, "invoice_settings", None)
        method = getattr(settings, "default_payment_method", None) if settings else None
        if method is None:
            return None
        return method if isinstance(method, str) else str(method.id)

    async def charge_auto_top_ups(self, counts: RunCounts, limit: int = 10) -> None:
        if self.stripe is None or self.stripe.placeholder_key:
            return
        client = self.stripe.client
        for row in await self.db.rpc("claim_auto_top_ups", {"p_limit": limit}):
            top_up_id = str(row["id"])
            customer_id = row.get("stripe_customer_id")
            try:
                method = (
                    await self._saved_payment_method(client, str(customer_id))
                    if customer_id
                    else None
                )
                if method is None:
                    await self._finish(top_up_id, "failed", None, "no saved payment method")
                    counts.top_ups_failed += 1
                    continue
                intent = await client.v1.payment_intents.create_async(
                    params={
                        # Integer minor units: the pack's price_cents, no rounding.
                        "amount": int(row["amount_cents"]),
                        "currency": str(row["currency"]),
                        "customer": str(customer_id),
                        "payment_method": method,
                        "off_session": True,
                        "confirm": True,
                        "metadata": StripeGateway.metadata(
                            {
                                "user_id": row["user_id"],
                                "product": row["product_code"],
                                "quantity": 1,
                                "token_billing_auto_top_up": top_up_id,
                            }
                        ),
                    },
                    options={"idempotency_key": str(row["idempotency_key"])},
                )
            except stripe.CardError as exc:
                payment_intent = getattr(exc.error, "payment_intent", None) if exc.error else None
                intent_dict = payment_intent.to_dict() if payment_intent is not None else None
                sca = exc.code == "authentication_required"
                decline = getattr(exc.error, "decline_code", None) if exc.error else None
                await self._finish(
                    top_up_id,
                    "requires_action" if sca else "failed",
                    intent_dict if intent_dict and intent_dict.get("id") else None,
                    str(decline or exc.code or "card_error"),
                )
                counts.top_ups_failed += 1
                continue
            except stripe.StripeError as exc:
                # Stripe unreachable or failing: the lease runs out and the next run tries
                # again with the same idempotency key (one charge whatever happened).
                counts.top_ups_retried += 1
                counts.errors.append(f"auto top-up {top_up_id}: {type(exc).__name__}")
                continue
            answer = intent.to_dict()
            status = str(answer.get("status"))
            if status in ("succeeded", "processing"):
                await self._finish(top_up_id, status, answer, None)
                counts.top_ups_charged += 1
            elif status == "requires_action":
                await self._finish(top_up_id, "requires_action", None, "authentication_required")
                counts.top_ups_failed += 1
            else:
                await self._finish(top_up_id, "failed", None, f"payment intent {status}")
                counts.top_ups_failed += 1

    # --- annual grants and postpaid ---------------------------------------------------------
    async def grant_scheduled(self, counts: RunCounts) -> None:
        rows = await self.db.rpc("grant_scheduled_tokens", {})
        counts.months_granted += int(rows[0]["granted"]) if rows else 0

    async def invoice_postpaid(self, counts: RunCounts) -> None:
        if self.stripe is None or self.stripe.placeholder_key:
            return
        client = self.stripe.client
        for row in await self.db.rpc("postpaid_due", {}):
            if not row.get("stripe_customer_id") or int(row["amount_cents"]) <= 0:
                continue
            try:
                item = await client.v1.invoice_items.create_async(
                    params={
                        "customer": str(row["stripe_customer_id"]),
                        "amount": int(row["amount_cents"]),
                        "currency": str(row["currency"]),
                        "description": (
                            f"Usage beyond the plan: {row['overage_tokens']} tokens "
                            f"(period from {row['period_start']})"
                        ),
                        "metadata": StripeGateway.metadata(
                            {"user_id": row["user_id"], "period_start": row["period_start"]}
                        ),
                    },
                    options={"idempotency_key": str(row["idempotency_key"])},
                )
            except stripe.StripeError as exc:
                counts.errors.append(f"postpaid {row['user_id']}: {type(exc).__name__}")
                continue
            await self.db.rpc(
                "mark_postpaid_invoiced",
                {
                    "p_user_id": str(row["user_id"]),
                    "p_period_start": row["period_start"],
                    "p_stripe_invoice_item_id": str(item.id),
                },
            )
            counts.postpaid_invoiced += 1

    # --- the loop ---------------------------------------------------------------------------
    async def run_once(self) -> RunCounts:
        counts = RunCounts()
        for step in (
            self.charge_auto_top_ups,
            self.deliver_notifications,
            self.grant_scheduled,
            self.invoice_postpaid,
        ):
            try:
                await step(counts)
            except Exception as exc:  # one failing outbox must not stop the others
                counts.errors.append(f"{step.__name__}: {type(exc).__name__}: {exc}"[:500])
                logger.exception(
                    "billing worker step failed", extra={"fields": {"step": step.__name__}}
                )
        return counts

    async def run(self, interval_seconds: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
