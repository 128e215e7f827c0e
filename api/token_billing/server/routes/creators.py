"""The marketplace: creators onboard to Stripe Connect, list agents, and see what they earn.

POST /v1/creators/onboard creates the signed-in user's Stripe Express account once (the
Idempotency-Key is derived from the user, and the account is recorded with register_creator
before any link is handed out) and answers an onboarding AccountLink; POST /v1/creators/dashboard
a login link to the Express dashboard. Stripe's account.updated events (handle_stripe_event)
keep charges_enabled and payouts_enabled; only a creator with charges_enabled can list
(POST /v1/creators/listings). GET /v1/listings is the marketplace's catalog, GET /v1/creators/me
the creator's Stripe state (what Stripe still needs), earnings (micro-cents: the statement, the
latest entries read through RLS) and payouts.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.auth import User
from token_billing.server.deps import (
    Runtime,
    buyer,
    log_fields,
    read_model,
    request_key,
    require_stripe,
    runtime,
    signed_in,
)
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute

# Where Stripe sends the creator back after onboarding (return) or when the link expired
# (refresh: the page asks for a new link), under APP_URL.
ONBOARDING_RETURN_PATH = "/?creator=onboarded"
ONBOARDING_REFRESH_PATH = "/?creator=refresh"


async def creator_of(rt: Runtime, user: User) -> dict[str, Any] | None:
    rows = await rt.db.rpc("get_creator", {"p_user_id": str(user.id)})
    return rows[0] if rows else None


async def onboard(request: Request) -> Response:
    rt = runtime(request)
    user = buyer(await signed_in(request, rt))
    require_stripe(rt)
    creator = await creator_of(rt, user)
    if creator is None:
        # Made once per user: the key is the user's, so a retry or a concurrent first call gets
        # the same account back, and it is recorded before any link leaves the service.
        account_id = await rt.stripe.create_express_account(str(user.id), user.email)
        await rt.db.rpc(
            "register_creator", {"p_user_id": str(user.id), "p_stripe_account_id": account_id}
        )
        creator = await creator_of(rt, user)
        if creator is None:  # pragma: no cover - register_creator just wrote it
            raise ApiError(500, "internal_error", "the creator was not recorded")
    account_id = str(creator["stripe_account_id"])
    log_fields(request).update(stripe_account_id=account_id)
    url = await rt.stripe.create_account_link(
        account_id,
        rt.settings.app_link(ONBOARDING_REFRESH_PATH),
        rt.settings.app_link(ONBOARDING_RETURN_PATH),
        request_key(request, "account_link", user.id),
    )
    return schemas.respond(
        schemas.CreatorOnboarding(
            stripe_account_id=account_id,
            url=url,
            charges_enabled=bool(creator["charges_enabled"]),
            payouts_enabled=bool(creator["payouts_enabled"]),
        ),
        201,
    )


async def dashboard(request: Request) -> Response:
    rt = runtime(request)
    user = buyer(await signed_in(request, rt))
    require_stripe(rt)
    creator = await creator_of(rt, user)
    if creator is None:
        raise ApiError(409, "not_a_creator", "not a creator yet: POST /v1/creators/onboard first")
    if not creator["details_submitted"]:
        raise ApiError(
            409,
            "onboarding_incomplete",
            "the Stripe onboarding is not finished: POST /v1/creators/onboard for a new link",
        )
    url = await rt.stripe.create_login_link(
        str(creator["stripe_account_id"]), request_key(request, "login_link", user.id)
    )
    return schemas.respond(schemas.CreatorDashboard(url=url), 201)


async def upsert_listing(request: Request) -> Response:
    rt = runtime(request)
    user = buyer(await signed_in(request, rt))
    body = await read_model(request, schemas.ListingRequest)
    if body.price_cents is None and body.tokens_per_run == 0:
        raise ApiError(
            422, "invalid_price", "a listing needs price_cents or tokens_per_run (or both)"
        )
    rows = await rt.db.rpc(
        "upsert_listing",
        {
            "p_creator_id": str(user.id),
            "p_code": body.code,
            "p_name": body.name,
            "p_price_cents": body.price_cents,
            "p_tokens_per_run": body.tokens_per_run,
            "p_description": body.description,
            "p_currency": "usd",
            "p_active": body.active,
        },
    )
    result = schemas.ListingResult.model_validate(rows[0])
    return schemas.respond(result, 201 if result.status == "applied" else 200)


async def list_listings(request: Request) -> Response:
    rt = runtime(request)
    rows = await rt.db.rpc("list_listings", {"p_code": None})
    return schemas.respond(
        schemas.ListingList(listings=[schemas.Listing.model_validate(row) for row in rows])
    )


async def me(request: Request) -> Response:
    rt = runtime(request)
    user = await signed_in(request, rt)
    creator = await creator_of(rt, user)
    if creator is None:
        raise ApiError(404, "not_a_creator", "not a creator yet: POST /v1/creators/onboard first")
    statement = (await rt.db.rpc("creator_statement", {"p_creator_id": str(user.id)}))[0]
    payouts = await rt.db.rpc("list_creator_payouts", {"p_creator_id": str(user.id)})
    # As the user, through RLS, as a browser's Data API call would read them.
    entries = await rt.db.rpc(
        "my_creator_earnings", {"p_limit": schemas.CreatorSummary.RECENT_EARNINGS}, user=user
    )
    return schemas.respond(
        schemas.CreatorSummary.model_validate(
            {
                **creator,
                **statement,
                **stripe_requirements(creator["requirements"]),
                "recent_earnings": [schemas.CreatorEarning.model_validate(e) for e in entries],
                "payouts": [schemas.CreatorPayout.model_validate(p) for p in payouts],
            }
        )
    )


def stripe_requirements(requirements: Any) -> dict[str, Any]:
    """What Stripe's requirements object (as the last account.updated stored it) asks now:
    the fields currently due and past due, in Stripe's order without repeats, and why the
    account is disabled."""
    if not isinstance(requirements, dict):
        return {"requirements_due": [], "disabled_reason": None}
    due: list[str] = []
    for key in ("past_due", "currently_due"):
        values = requirements.get(key)
        if isinstance(values, list):
            due.extend(v for v in values if isinstance(v, str) and v not in due)
    reason = requirements.get("disabled_reason")
    return {
        "requirements_due": due,
        "disabled_reason": reason if isinstance(reason, str) and reason else None,
    }


routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/creators/onboard",
        onboard,
        methods=["POST"],
        summary="Become a creator: the Stripe Express account (made once) and an onboarding link",
        security="supabaseAuth",
        responses={
            201: schemas.CreatorOnboarding,
            403: schemas.ErrorResponse,
            409: schemas.ErrorResponse,
            502: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/creators/dashboard",
        dashboard,
        methods=["POST"],
        summary="A login link to the creator's Stripe Express dashboard",
        security="supabaseAuth",
        responses={
            201: schemas.CreatorDashboard,
            403: schemas.ErrorResponse,
            409: schemas.ErrorResponse,
            502: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/creators/me",
        me,
        methods=["GET"],
        summary="The signed-in creator's account state, earnings and payouts",
        security="supabaseAuth",
        responses={
            200: schemas.CreatorSummary,
            404: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/creators/listings",
        upsert_listing,
        methods=["POST"],
        summary="List an agent (or change a listing): a one-off price and/or tokens per run",
        body=schemas.ListingRequest,
        security="supabaseAuth",
        responses={
            200: schemas.ListingResult,
            201: schemas.ListingResult,
            400: schemas.ErrorResponse,
            403: schemas.ErrorResponse,
            409: schemas.ErrorResponse,
            413: schemas.ErrorResponse,
            422: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/listings",
        list_listings,
        methods=["GET"],
        summary="The marketplace: active agent listings",
        responses={200: schemas.ListingList, 503: schemas.ErrorResponse},
    ),
]
