"""POST /v1/webhooks/stripe: a signed Stripe event, handled by one RPC.

The raw body is read up to WEBHOOK_MAX_BODY_BYTES (413 beyond), its signature checked
against every configured secret (400 when none holds, or when its timestamp is older than
WEBHOOK_TOLERANCE_SECONDS or further than that in the future: Stripe's library checks only the
old side), parsed as strict JSON, and passed to
`public.handle_stripe_event` as the verified text. 200 only once the event is committed with its
outcome; 503 when the database is unavailable, so Stripe retries.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import stripe
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.db import JsonText
from token_billing.errors import DatabaseError, DatabaseUnavailable
from token_billing.server import schemas
from token_billing.server.deps import log_fields, read_body, runtime
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute, Header
from token_billing.server.settings import Settings


def _strict_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_event(payload: str) -> dict[str, Any]:
    # Strict JSON, as jsonb reads it: no NaN/Infinity, no float that overflows; and a nesting
    # too deep for the parser is a bad payload like any other, not a server error.
    try:
        event = json.loads(payload, parse_float=_strict_float, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_payload", "the body is not valid JSON") from None
    if not isinstance(event, dict):
        raise ApiError(400, "invalid_payload", "the body is not a Stripe event object")
    if event.get("object") == "v2.core.event":
        raise ApiError(
            400,
            "thin_event_unsupported",
            "thin (v2) events are not supported: send snapshot events (object 'event') to this "
            "endpoint",
        )
    try:
        schemas.StripeEvent.model_validate(event)
    except ValidationError:
        raise ApiError(
            400, "invalid_payload", "not a Stripe event: id, type and data.object are required"
        ) from None
    return event


PAID_CHECKOUT_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)


def _needs_line_items(event: dict[str, Any]) -> str | None:
    """The id of a paid payment-mode session the service did not create (no metadata.product:
    a Payment Link, the dashboard) whose event carries no line items; None otherwise."""
    if event.get("type") not in PAID_CHECKOUT_EVENTS:
        return None
    session = event.get("data", {}).get("object", {})
    if not isinstance(session, dict) or session.get("mode") != "payment":
        return None
    metadata = session.get("metadata")
    if (isinstance(metadata, dict) and metadata.get("product")) or "line_items" in session:
        return None
    session_id = session.get("id")
    return session_id if isinstance(session_id, str) and session_id.startswith("cs_") else None


def _signed_at(header: str) -> list[int]:
    """The t= timestamps of a Stripe-Signature header (malformed parts are Stripe's to refuse)."""
    stamps = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit() and len(value) <= 12:
            stamps.append(int(value))
    return stamps


def _check_not_future(header: str, tolerance: int) -> None:
    # A signature dated ahead is as suspect as an old one (a clock or a replay store gamed):
    # Stripe's library refuses only old ones.
    if any(stamp > time.time() + tolerance for stamp in _signed_at(header)):
        raise ApiError(
            400,
            "invalid_signature",
            f"signature verification failed: the Stripe-Signature timestamp is more than "
            f"{tolerance} seconds in the future",
        )


def _verify_signature(payload: bytes, header: str | None, settings: Settings) -> str:
    """The body as text once its signature holds for one of the secrets (Stripe signs UTF-8);
    decoded once here for the signature check, the parser and the RPC."""
    if not header:
        raise ApiError(400, "invalid_signature", "the Stripe-Signature header is missing")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_payload", "the body is not UTF-8") from None
    _check_not_future(header, settings.webhook_tolerance_seconds)
    failure: stripe.SignatureVerificationError | None = None
    for secret in settings.webhook_secrets:
        try:
            stripe.WebhookSignature.verify_header(
                text, header, secret, settings.webhook_tolerance_seconds
            )
            return text
        except stripe.SignatureVerificationError as exc:
            failure = exc
    message = failure.user_message if failure and failure.user_message else str(failure)
    raise ApiError(400, "invalid_signature", f"signature verification failed: {message}")


async def stripe_webhook(request: Request) -> Response:
    rt = runtime(request)
    fields = log_fields(request)
    event_type = "unknown"
    outcome = "error"
    started = time.perf_counter()
    try:
        try:
            payload = await read_body(request, rt.settings.webhook_max_body_bytes)
        except ApiError as exc:
            outcome = {413: "too_large", 408: "incomplete"}.get(exc.status, "invalid_payload")
            raise
        outcome = "invalid_signature"
        body = _verify_signature(payload, request.headers.get("stripe-signature"), rt.settings)
        outcome = "invalid_payload"
        event = _parse_event(body)
        event_type = str(event["type"])
        fields.update(event_id=event["id"], event_type=event_type, livemode=event.get("livemode"))
        outcome = "error"
        session_id = _needs_line_items(event)
        if session_id is not None and not rt.stripe.placeholder_key:
            # Stripe's events carry no line items: what such a session sold is fetched here, so
            # the one RPC can credit it only when a line's price maps to a pack. When Stripe
            # cannot say (unreachable, an unknown session), the event goes without them and is
            # parked with the reason, for an operator's replay.
            try:
                items = await rt.stripe.checkout_line_items(session_id)
            except ApiError:
                fields.update(line_items="unavailable")
            else:
                event["data"]["object"]["line_items"] = {"object": "list", "data": items}
                body = json.dumps(event, separators=(",", ":"))
        handled_at = time.perf_counter()
        try:
            # The verified body as it was signed: jsonb reads it directly, without a second
            # serialization of the parsed event.
            rows = await rt.db.rpc("handle_stripe_event", {"p_event": JsonText(body)})
        except DatabaseUnavailable:
            outcome = "database_unavailable"
            raise
        except DatabaseError as exc:
            # Class 22: the database could not take a value of the event (http_errors.py: 400).
            outcome = "invalid_payload" if (exc.sqlstate or "").startswith("22") else "error"
            raise
        row = rows[0] if rows else {}
        outcome = str(row.get("status") or "error")
        rt.metrics.webhook_latency.labels(outcome).observe(time.perf_counter() - handled_at)
        fields.update(outcome=outcome, detail=row.get("detail"))
        return schemas.respond(
            schemas.WebhookResult.model_validate(
                {"status": row.get("status"), "detail": row.get("detail")}
            )
        )
    finally:
        rt.metrics.webhook_events.labels(event_type, outcome).inc()
        fields.setdefault("outcome", outcome)
        fields["handle_ms"] = round((time.perf_counter() - started) * 1000, 2)


routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/webhooks/stripe",
        stripe_webhook,
        methods=["POST"],
        summary="A signed Stripe event, applied once by public.handle_stripe_event",
        description="200 once the event is committed with its outcome; 400 for a bad "
        "signature (or a timestamp more than WEBHOOK_TOLERANCE_SECONDS old or ahead) or "
        "payload; 413 beyond WEBHOOK_MAX_BODY_BYTES; 503 when the database is unavailable "
        "(Stripe retries).",
        body=schemas.StripeEvent,
        headers=[
            Header("Stripe-Signature", "t=<unix time>,v1=<HMAC-SHA256>", required=True),
        ],
        responses={
            200: schemas.WebhookResult,
            400: schemas.ErrorResponse,
            409: schemas.ErrorResponse,
            413: schemas.ErrorResponse,
            503: schemas.ErrorResponse,
        },
        tag="stripe",
    )
]
