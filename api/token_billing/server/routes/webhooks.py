"""POST /v1/webhooks/stripe: a signed Stripe event, handled by one RPC.

The raw body is read up to WEBHOOK_MAX_BODY_BYTES (413 beyond), its signature checked
against every configured secret (400 when none holds), parsed as strict JSON, and passed to
`public.handle_stripe_event` as the verified text. 200 only once the event is committed with its
outcome; 503 when the database is unavailable, so Stripe retries.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from token_billing.db import JsonText
from token_billing.errors import DatabaseError, DatabaseUnavailable
from token_billing.server.deps import log_fields, read_body, runtime
from token_billing.server.http_errors import ApiError
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
    data = event.get("data")
    if (
        event.get("object") != "event"
        or not isinstance(event.get("id"), str)
        or not isinstance(event.get("type"), str)
        or not isinstance(data, dict)
        or not isinstance(data.get("object"), dict)
    ):
        raise ApiError(
            400, "invalid_payload", "not a Stripe event: id, type and data.object are required"
        )
    return event


def _verify_signature(payload: bytes, header: str | None, settings: Settings) -> str:
    """The body as text once its signature holds for one of the secrets (Stripe signs UTF-8);
    decoded once here for the signature check, the parser and the RPC."""
    if not header:
        raise ApiError(400, "invalid_signature", "the Stripe-Signature header is missing")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_payload", "the body is not UTF-8") from None
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
            outcome = "too_large" if exc.status == 413 else "invalid_payload"
            raise
        outcome = "invalid_signature"
        body = _verify_signature(payload, request.headers.get("stripe-signature"), rt.settings)
        outcome = "invalid_payload"
        event = _parse_event(body)
        event_type = str(event["type"])
        fields.update(event_id=event["id"], event_type=event_type, livemode=event.get("livemode"))
        outcome = "error"
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
        return JSONResponse({"status": row.get("status"), "detail": row.get("detail")})
    finally:
        rt.metrics.webhook_events.labels(event_type, outcome).inc()
        fields.setdefault("outcome", outcome)
        fields["handle_ms"] = round((time.perf_counter() - started) * 1000, 2)


routes: list[BaseRoute] = [Route("/v1/webhooks/stripe", stripe_webhook, methods=["POST"])]
