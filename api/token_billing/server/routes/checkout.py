"""POST /v1/checkout/sessions, POST /v1/payment-intents and POST /v1/portal/sessions.

The user's Stripe customer is created and stored in billing.customers before any checkout, so
every later event can be tied to the user; Checkout Sessions and PaymentIntents carry the user and
the product in their metadata (the contract's `client_reference_id`, `metadata.user_id`,
`metadata.product`, `metadata.quantity`). Each one is recorded in the database, as Stripe returned
it, before its URL or client secret leaves the service: the event handler credits only what was
recorded (record_checkout_session, record_payment_intent), the amount and currency paid checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.auth import User
from token_billing.server.deps import (
    MAX_IDEMPOTENCY_KEY_LENGTH,
    Runtime,
    active_prices,
    active_products,
    buyer,
    log_fields,
    read_model,
    request_key,
    require_stripe,
    runtime,
    signed_in,
)
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute, Header
from token_billing.server.stripe_api import StripeGateway

# Subscription statuses in which the user already has a plan: a second one is refused.
SUBSCRIBED_STATUSES = frozenset({"active", "trialing", "past_due"})
MAX_PACK_QUANTITY = 100

IDEMPOTENCY_KEY = Header(
    "Idempotency-Key",
    "Send the same key again (a retry, a double click) to get the same Stripe object back.",
    max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
)


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


async def create_checkout_session(request: Request) -> Response:
    rt = runtime(request)
    user = buyer(await signed_in(request, rt))
    require_stripe(rt)
    body = await read_model(request, schemas.PurchaseRequest)
    key = request_key(request, "checkout", user.id)
    code, quantity = body.product, body.quantity
    log_fields(request).update(product=code, quantity=quantity)

    product = next((p for p in await active_products(rt) if p["code"] == code), None)
    if product is None:
        raise ApiError(404, "unknown_product", f"no active product {code!r}")
    kind = product["kind"]
    if kind == "agent":
        return await create_agent_checkout(request, rt, user, code, quantity, key)
    if kind == "pack" and not 1 <= quantity <= MAX_PACK_QUANTITY:
        raise ApiError(
            422, "invalid_quantity", f"quantity must be between 1 and {MAX_PACK_QUANTITY}"
        )
    if kind == "plan" and quantity != 1:
        raise ApiError(422, "invalid_quantity", "a plan is bought with quantity 1")
    interval = body.interval
    if kind == "pack" and interval is not None:
        raise ApiError(422, "invalid_interval", "a pack is bought once: it has no interval")
    price_id = product.get("stripe_price_id")
    if kind == "plan" and interval == "year":
        currency = str(product.get("currency") or "usd")
        annual = next(
            (
                p
                for p in await active_prices(rt)
                if (p["product_code"], p["billing_interval"], p["currency"])
                == (code, "year", currency)
            ),
            None,
        )
        if annual is None:
            raise ApiError(404, "unknown_price", f"plan {code!r} has no annual price in {currency}")
        price_id = annual.get("stripe_price_id")
    log_fields(request).update(interval=interval or ("month" if kind == "plan" else None))
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

    fields: dict[str, Any] = {"user_id": user.id, "product": code, "quantity": quantity}
    if kind == "plan":
        fields["interval"] = interval or "month"
    metadata = StripeGateway.metadata(fields)
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
    session = await rt.stripe.create_checkout_session(params, key)
    session_id, url = str(session["id"]), str(session["url"])
    # What was sold, recorded before the URL is handed out (a retry records it again: duplicate).
    await rt.db.rpc("record_checkout_session", {"p_session": session})
    rt.metrics.checkout_sessions.labels(kind).inc()
    log_fields(request).update(checkout_session_id=session_id, stripe_customer_id=customer_id)
    return schemas.respond(schemas.CheckoutSession(id=session_id, url=url), 201)


async def create_agent_checkout(
    request: Request, rt: Runtime, user: User, code: str, quantity: int, key: str
) -> Response:
    """An agent listing: a destination charge to its creator, the platform's fee kept.

    application_fee_amount = floor(price x commission_bps / 10000) and the destination come from
    the database (quote_listing_sale), and are recorded with the session as Stripe returned it
    (record_marketplace_checkout) before its URL is handed out.
    """
    if quantity != 1:
        raise ApiError(422, "invalid_quantity", "an agent is bought with quantity 1")
    # TBLST (not for sale now) and TBENT (already owned) answer 409.
    quote = (await rt.db.rpc("quote_listing_sale", {"p_buyer_id": str(user.id), "p_code": code}))[0]
    profile = await billing_profile(rt, user)
    customer_id = await ensure_customer(rt, user, profile)
    metadata = StripeGateway.metadata({"user_id": user.id, "product": code, "quantity": 1})
    fee, destination = int(quote["application_fee_cents"]), str(quote["stripe_account_id"])
    params: dict[str, Any] = {
        "mode": "payment",
        "customer": customer_id,
        "client_reference_id": str(user.id),
        "line_items": [
            {
                "price_data": {
                    "currency": str(quote["currency"]),
                    "unit_amount": int(quote["amount_cents"]),
                    "product_data": {"name": str(quote["name"]), "metadata": {"listing": code}},
                },
                "quantity": 1,
            }
        ],
        "metadata": metadata,
        "payment_intent_data": {
            "application_fee_amount": fee,
            "transfer_data": {"destination": destination},
            "metadata": metadata,
        },
        "success_url": rt.settings.app_link(rt.settings.checkout_success_path),
        "cancel_url": rt.settings.app_link(rt.settings.checkout_cancel_path),
    }
    session = await rt.stripe.create_checkout_session(params, key)
    await rt.db.rpc(
        "record_marketplace_checkout",
        {"p_session": session, "p_application_fee_cents": fee, "p_destination": destination},
    )
    rt.metrics.checkout_sessions.labels("agent").inc()
    log_fields(request).update(
        checkout_session_id=session["id"], stripe_account_id=destination, application_fee=fee
    )
    return schemas.respond(
        schemas.CheckoutSession(id=str(session["id"]), url=str(session["url"])), 201
    )


async def create_payment_intent(request: Request) -> Response:
    """A PaymentIntent for a pack (Stripe's Payment Element); payment_intent.succeeded credits."""
    rt = runtime(request)
    user = buyer(await signed_in(request, rt))
    require_stripe(rt)
    body = await read_model(request, schemas.PurchaseRequest)
    key = request_key(request, "payment_intent", user.id)
    code, quantity = body.product, body.quantity
    log_fields(request).update(product=code, quantity=quantity)

    product = next((p for p in await active_products(rt) if p["code"] == code), None)
    if product is None:
        raise ApiError(404, "unknown_product", f"no active product {code!r}")
    if product["kind"] != "pack":
        raise ApiError(
            422, "not_a_pack", "a PaymentIntent buys a token pack; plans go through checkout"
        )
    if not 1 <= quantity <= MAX_PACK_QUANTITY:
        raise ApiError(
            422, "invalid_quantity", f"quantity must be between 1 and {MAX_PACK_QUANTITY}"
        )
    price_cents = product.get("price_cents")
    if not price_cents:
        raise ApiError(409, "product_not_priced", f"product {code!r} has no price_cents")

    profile = await billing_profile(rt, user)
    customer_id = await ensure_customer(rt, user, profile)
    metadata = StripeGateway.metadata({"user_id": user.id, "product": code, "quantity": quantity})
    params: dict[str, Any] = {
        # Integer minor units: price_cents x quantity, no rounding.
        "amount": int(price_cents) * quantity,
        "currency": str(product.get("currency") or "usd"),
        "customer": customer_id,
        "metadata": metadata,
        "automatic_payment_methods": {"enabled": True},
    }
    intent = await rt.stripe.create_payment_intent(params, key)
    # What was sold, recorded before the client secret is handed out.
    await rt.db.rpc("record_payment_intent", {"p_payment_intent": intent})
    log_fields(request).update(payment_intent_id=intent["id"], stripe_customer_id=customer_id)
    return schemas.respond(
        schemas.PaymentIntentSession(
            id=str(intent["id"]), client_secret=str(intent["client_secret"])
        ),
        201,
    )


async def create_portal_session(request: Request) -> Response:
    rt = runtime(request)
    user = buyer(await signed_in(request, rt))
    require_stripe(rt)
    key = request_key(request, "portal", user.id)
    profile = await billing_profile(rt, user)
    customer_id = profile.get("stripe_customer_id")
    if not customer_id:
        raise ApiError(409, "no_customer", "no Stripe customer yet: buy a pack or a plan first")
    url = await rt.stripe.create_portal_session(
        str(customer_id),
        rt.settings.app_link(rt.settings.portal_return_path),
        key,
    )
    rt.metrics.portal_sessions.inc()
    return schemas.respond(schemas.PortalSession(url=url), 201)


routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/checkout/sessions",
        create_checkout_session,
        methods=["POST"],
        summary="A Stripe Checkout Session for a pack (payment) or a plan (subscription)",
        body=schemas.PurchaseRequest,
        headers=[IDEMPOTENCY_KEY],
        security="supabaseAuth",
        responses={
            201: schemas.CheckoutSession,
            400: schemas.ErrorResponse,
            403: schemas.ErrorResponse,
            404: schemas.ErrorResponse,
            409: schemas.ErrorResponse,
            413: schemas.ErrorResponse,
            422: schemas.ErrorResponse,
            502: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/payment-intents",
        create_payment_intent,
        methods=["POST"],
        summary="A PaymentIntent for a pack, for Stripe's Payment Element",
        body=schemas.PurchaseRequest,
        headers=[IDEMPOTENCY_KEY],
        security="supabaseAuth",
        responses={
            201: schemas.PaymentIntentSession,
            400: schemas.ErrorResponse,
            403: schemas.ErrorResponse,
            404: schemas.ErrorResponse,
            409: schemas.ErrorResponse,
            413: schemas.ErrorResponse,
            422: schemas.ErrorResponse,
            502: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/portal/sessions",
        create_portal_session,
        methods=["POST"],
        summary="A Stripe billing portal session for the user's customer",
        headers=[IDEMPOTENCY_KEY],
        security="supabaseAuth",
        responses={
            201: schemas.PortalSession,
            400: schemas.ErrorResponse,
            403: schemas.ErrorResponse,
            409: schemas.ErrorResponse,
            502: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
]
