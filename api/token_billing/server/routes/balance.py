"""GET /v1/balance and GET /v1/balance/stream: the signed-in user's balance, now and as it changes;
GET /v1/entitlements: what the user's plan entitles them to (`public.my_entitlements()`).

GET /v1/balance reads `public.my_tokens()` as the user (through RLS); with an API key
(balance:read) it reads `public.get_billing_profile` for the key's user. The stream is Server-Sent
Events from the app's BalanceBroker (token_billing.server.stream), for deployments without
Supabase Realtime.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.api_keys import looks_like_key
from token_billing.server.deps import api_key, bearer_token, broker, runtime, signed_in
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute
from token_billing.server.stream import EventStream, balance_fields


async def get_balance(request: Request) -> Response:
    rt = runtime(request)
    if looks_like_key(bearer_token(request)):
        # An agent backend's API key (balance:read): read as service_role for the key's user.
        caller = await api_key(request, rt, "balance:read")
        rows = await rt.db.rpc("get_billing_profile", {"p_user_id": str(caller.user_id)})
    else:
        user = await signed_in(request, rt)
        rows = await rt.db.rpc("my_tokens", {}, user=user)
    if not rows:
        raise ApiError(404, "unknown_account", "no billing account exists for this user")
    return schemas.respond(schemas.Balance.model_validate(balance_fields(rows[0])))


async def get_entitlements(request: Request) -> Response:
    rt = runtime(request)
    user = await signed_in(request, rt)
    rows = await rt.db.rpc("my_entitlements", {}, user=user)
    if not rows:
        raise ApiError(404, "unknown_account", "no billing account exists for this user")
    return schemas.respond(schemas.Entitlements.model_validate(rows[0]))


async def balance_stream(request: Request) -> Response:
    rt = runtime(request)
    balances = broker(request)
    user = await signed_in(request, rt)
    if not balances.available:
        raise ApiError(
            404,
            "stream_unavailable",
            "the balance stream needs DATABASE_URL; on Supabase, subscribe to billing.accounts "
            "with Realtime instead",
        )
    if not await rt.db.rpc("get_billing_profile", {"p_user_id": str(user.id)}):
        raise ApiError(404, "unknown_account", "no billing account exists for this user")
    # The stream ends when the access token does: the client reconnects with a fresh one.
    expires_at = float(user.claims["exp"])
    return EventStream(balances, balances.subscribe(user.id), expires_at=expires_at)


routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/balance",
        get_balance,
        methods=["GET"],
        summary="The signed-in user's balance (public.my_tokens()), or an API key's user's",
        description="An API key needs the scope balance:read.",
        security=("supabaseAuth", "apiKey"),
        responses={200: schemas.Balance, 404: schemas.ErrorResponse, **schemas.AGENT_ERRORS},
    ),
    ApiRoute(
        "/v1/entitlements",
        get_entitlements,
        methods=["GET"],
        summary="The signed-in user's plan, limits and features (public.my_entitlements())",
        security="supabaseAuth",
        responses={
            200: schemas.Entitlements,
            404: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/balance/stream",
        balance_stream,
        methods=["GET"],
        summary="The signed-in user's balance as Server-Sent Events, on every change",
        description="At most BALANCE_STREAMS_PER_USER streams per user (then 429) and "
        "BALANCE_STREAMS_MAX per process (then 503); a stream ends when its access token "
        "expires.",
        security="supabaseAuth",
        responses={
            200: schemas.EVENT_STREAM,
            404: schemas.ErrorResponse,
            429: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
]
