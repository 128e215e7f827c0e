"""The HTTP service: checkout, billing portal, balance, catalog, and the Stripe webhook.

Routes and statuses are the public contract (docs/contract.md). Everything that touches
money is a database function: the service authenticates, talks to Stripe, and calls one RPC.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import history, stream, web
from api.auth import Authenticator, User
from api.db import Database, JsonText, database_from_settings
from api.errors import EXCEPTION_HANDLERS, ApiError, DatabaseError, DatabaseUnavailable
from api.metrics import CONTENT_TYPE_LATEST, Metrics
from api.settings import Settings, load_settings
from api.stripe_api import StripeGateway, idempotency_key

# Subscription statuses in which the user already has a plan: a second one is refused.
SUBSCRIBED_STATUSES = frozenset({"active", "trialing", "past_due"})
MAX_PACK_QUANTITY = 100
# Bodies of the JSON API routes are tiny; the webhook has its own (larger) limit.
MAX_JSON_BODY_BYTES = 16 * 1024
LOG_SCOPE_KEY = "token_billing.log"


@dataclass
class Runtime:
    """What the lifespan opens: shared by every request of one app."""

    settings: Settings
    metrics: Metrics
    db: Database
    auth: Authenticator
    stripe: StripeGateway
    http: httpx.AsyncClient


def runtime(request: Request) -> Runtime:
    rt = getattr(request.app.state, "runtime", None)
    if not isinstance(rt, Runtime):
        raise RuntimeError("the app's lifespan has not run (use TestClient as a context manager)")
    return rt


def log_fields(request: Request) -> dict[str, Any]:
    """Fields added to this request's single log line."""
    fields: dict[str, Any] = request.scope.setdefault(LOG_SCOPE_KEY, {})
    return fields


# --- request helpers ---------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed `limit` (never read on)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_large = int(declared) > limit
        except ValueError:
            raise ApiError(400, "bad_request", "invalid Content-Length") from None
        if too_large:
            raise ApiError(413, "payload_too_large", f"the body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request) -> dict[str, Any]:
    body = await read_body(request, MAX_JSON_BODY_BYTES)
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return value


async def signed_in(request: Request, rt: Runtime) -> User:
    user = await rt.auth.user(request.headers.get("authorization"))
    log_fields(request)["user_id"] = str(user.id)
    return user


def buyer(user: User) -> User:
    if user.is_anonymous:
        raise ApiError(
            403,
            "anonymous_user",
            "anonymous users cannot buy: link an email or sign in first",
        )
    return user


async def products(rt: Runtime) -> list[dict[str, Any]]:
    return await rt.db.rpc("list_products", {"p_include_inactive": False})


async def billing_profile(rt: Runtime, user: User) -> dict[str, Any]:
    rows = await rt.db.rpc("get_billing_profile", {"p_user_id": str(user.id)})
    if not rows:
        raise ApiError(409, "unknown_account", "no billing account exists for this user")
    return rows[0]


async def ensure_customer(rt: Runtime, user: User, profile: Mapping[str, Any]) -> str:
    """The user's Stripe customer id, created and stored in billing.customers first if new."""
    existing = profile.get("stripe_customer_id")
    if existing:
        return str(existing)
    # The key is derived from the user: concurrent or retried first checkouts get one customer.
    customer_id = await rt.stripe.create_customer(str(user.id), user.email)
    # Stored before any checkout exists, so every later event can be tied to the user.
    # Statuses applied or duplicate; a customer of another user raises TBCUS (409).
    await rt.db.rpc(
        "link_stripe_customer",
        {"p_user_id": str(user.id), "p_stripe_customer_id": customer_id},
    )
    return customer_id


def request_key(request: Request, *parts: object) -> str:
    """The Idempotency-Key of a Stripe POST made for this request.

    A client that sends its own Idempotency-Key gets the same Stripe object back on a retry; a
    client that does not gets a fresh key (the stripe library still reuses it on its retries).
    """
    client_key = request.headers.get("idempotency-key")
    return idempotency_key(*parts, client_key if client_key else uuid.uuid4())


# --- routes ------------------------------------------------------------------------------------


async def create_checkout_session(request: Request) -> Response:
    rt = runtime(request)
    user = buyer(await signed_in(request, rt))
    body = await read_json_object(request)
    code = body.get("product")
    quantity = body.get("quantity", 1)
    if not isinstance(code, str) or not code:
        raise ApiError(422, "invalid_request", "product must be a product code, e.g. pack_100")
    if not isinstance(quantity, int) or isinstance(quantity, bool):
        raise ApiError(422, "invalid_quantity", "quantity must be an integer")
    log_fields(request).update(product=code, quantity=quantity)

    product = next((p for p in await products(rt) if p["code"] == code), None)
    if product is None:
        raise ApiError(404, "unknown_product", f"no active product {code!r}")
    kind = product["kind"]
    if kind == "pack" and not 1 <= quantity <= MAX_PACK_QUANTITY:
        raise ApiError(
            422, "invalid_quantity", f"quantity must be between 1 and {MAX_PACK_QUANTITY}"
        )
    if kind == "plan" and quantity != 1:
        raise ApiError(422, "invalid_quantity", "a plan is bought with quantity 1")
    price_id = product.get("stripe_price_id")
    if not price_id:
        raise ApiError(
            409,
            "product_not_priced",
            f"product {code!r} has no Stripe price; run `token-billing stripe sync-products`",
        )

    profile = await billing_profile(rt, user)
    if kind == "plan" and profile.get("subscription_status") in SUBSCRIBED_STATUSES:
        raise ApiError(
            409,
            "already_subscribed",
            f"already subscribed to {profile.get('plan')!r}: change plans in the billing portal",
        )
    customer_id = await ensure_customer(rt, user, profile)

    metadata = StripeGateway.metadata({"user_id": user.id, "product": code, "quantity": quantity})
    params: dict[str, Any] = {
        "mode": "payment" if kind == "pack" else "subscription",
        "customer": customer_id,
        "client_reference_id": str(user.id),
        "line_items": [{"price": price_id, "quantity": quantity}],
        "metadata": metadata,
        "success_url": rt.settings.app_link(rt.settings.checkout_success_path),
        "cancel_url": rt.settings.app_link(rt.settings.checkout_cancel_path),
    }
    if kind == "pack":
        # Copied onto the charge, so refunds and disputes name the user and the product too.
        params["payment_intent_data"] = {"metadata": metadata}
    else:
        params["subscription_data"] = {"metadata": metadata}
    key = request_key(request, "checkout", user.id)
    session_id, url = await rt.stripe.create_checkout_session(params, key)
    rt.metrics.checkout_sessions.labels(kind).inc()
    log_fields(request).update(checkout_session_id=session_id, stripe_customer_id=customer_id)
    return JSONResponse({"id": session_id, "url": url}, status_code=201)


async def create_portal_session(request: Request) -> Response:
    rt = runtime(request)
    user = buyer(await signed_in(request, rt))
    profile = await billing_profile(rt, user)
    customer_id = profile.get("stripe_customer_id")
    if not customer_id:
        raise ApiError(409, "no_customer", "no Stripe customer yet: buy a pack or a plan first")
    url = await rt.stripe.create_portal_session(
        str(customer_id),
        rt.settings.app_link(rt.settings.portal_return_path),
        request_key(request, "portal", user.id),
    )
    rt.metrics.portal_sessions.inc()
    return JSONResponse({"url": url}, status_code=201)


async def get_balance(request: Request) -> Response:
    rt = runtime(request)
    user = await signed_in(request, rt)
    rows = await rt.db.rpc("my_tokens", {}, user=user)
    if not rows:
        raise ApiError(404, "unknown_account", "no billing account exists for this user")
    row = rows[0]
    return JSONResponse(
        {
            key: row.get(key)
            for key in ("balance", "available", "reserved", "plan", "subscription_status")
        }
    )


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
    rows = await products(rt)
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
            # Class 22: the database could not take a value of the event (errors.py: 400).
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


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    rt = runtime(request)
    await rt.db.ping()
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    return Response(runtime(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/v1/checkout/sessions", create_checkout_session, methods=["POST"]),
    Route("/v1/portal/sessions", create_portal_session, methods=["POST"]),
    Route("/v1/balance", get_balance, methods=["GET"]),
    Route("/v1/products", list_products, methods=["GET"]),
    Route("/v1/webhooks/stripe", stripe_webhook, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


# --- access log and request metrics ------------------------------------------------------------


class AccessLog:
    """One JSON log line and the HTTP metrics per request (pure ASGI, so streaming is intact)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.logger = logging.getLogger("api.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        fields: dict[str, Any] = {}
        scope[LOG_SCOPE_KEY] = fields
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.http_requests.labels(template, method, str(status)).inc()
            self.metrics.http_latency.labels(template, method).observe(elapsed)
            headers = dict(scope.get("headers") or [])
            request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or None
            self.logger.info(
                "request",
                extra={
                    "fields": {
                        "method": method,
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "request_id": request_id,
                        **fields,
                    }
                },
            )


# --- the app -----------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> Starlette:
    """The service. Settings come from the environment (and `.env`) unless given."""
    settings = settings if settings is not None else load_settings()
    metrics_ = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        http = httpx.AsyncClient(timeout=10.0)
        db = database_from_settings(settings)
        gateway = StripeGateway(settings, metrics_)
        await db.open()
        balances = stream.BalanceBroker.from_settings(settings, db)
        await balances.start()
        app.state.balances = balances
        app.state.runtime = Runtime(
            settings=settings,
            metrics=metrics_,
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
        routes=[*routes, *history.routes, *stream.routes, *web.routes(settings)],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    app.add_middleware(AccessLog, metrics=metrics_)
    return app
