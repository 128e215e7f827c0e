"""POST /v1/holds and POST /v1/holds/{id}/settle|release|extend: two-phase usage for agents.

An API key with usage:write holds tokens before a model call (an amount, or the quote of the
usage expected: "estimated, then actual"), then settles what the call used: usage items, priced
and charged in one transaction (`public.record_usage` with the hold), or a number of tokens
(`public.settle_reservation`; 0 releases). A hold of another user is answered 404, like an
unknown one.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.deps import api_key, read_model, runtime
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute
from token_billing.server.routes.usage import (
    IDEMPOTENCY_KEY,
    call_key,
    charge_outcome,
    items_json,
    own_hold,
)


def _hold_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(str(request.path_params["hold_id"]))
    except ValueError:
        raise ApiError(404, "hold_not_found", "no such hold") from None


async def create_hold(request: Request) -> Response:
    rt = runtime(request)
    caller = await api_key(request, rt, "usage:write")
    body = await read_model(request, schemas.HoldRequest)
    if (body.amount is None) == (body.items is None):
        raise ApiError(422, "invalid_request", "give either amount or items")
    key = call_key(request, caller.user_id)
    amount = body.amount or 0
    if body.items is not None:
        quote = await rt.db.rpc(
            "quote_usage",
            {"p_user_id": str(caller.user_id), "p_items": items_json(body.items)},
        )
        amount = int(quote[0]["tokens"])
        if amount <= 0:
            raise ApiError(422, "invalid_amount", "the items cost nothing: nothing to hold")
    rows = await rt.db.rpc(
        "reserve_tokens",
        {
            "p_user_id": str(caller.user_id),
            "p_amount": amount,
            "p_idempotency_key": key,
            "p_ttl": timedelta(seconds=body.ttl_seconds),
        },
    )
    row = rows[0]
    charge_outcome(row, requested=amount)
    if row["status"] == "duplicate":
        # The key names an existing hold (reserve_tokens answers duplicate for any, as the
        # contract says): a live one is handed back, a resolved one is never a second hold.
        held = await rt.db.rpc("get_reservation", {"p_reservation_id": str(row["reservation_id"])})
        if held and held[0]["status"] != "pending":
            raise ApiError(
                409, "hold_resolved", f"the hold of this Idempotency-Key was {held[0]['status']}"
            )
    hold = schemas.Hold(
        id=row["reservation_id"], status=row["status"], amount=amount, available=row["available"]
    )
    return schemas.respond(hold, 201 if row["status"] == "applied" else 200)


async def settle_hold(request: Request) -> Response:
    rt = runtime(request)
    caller = await api_key(request, rt, "usage:write")
    hold_id = _hold_id(request)
    body = await read_model(request, schemas.SettleRequest)
    if (body.amount is None) == (body.items is None):
        raise ApiError(422, "invalid_request", "give either amount or items")
    await own_hold(request, caller.user_id, hold_id)
    if body.items is not None:
        rows = await rt.db.rpc(
            "record_usage",
            {
                "p_user_id": str(caller.user_id),
                "p_items": items_json(body.items),
                # A hold settles once: its id is the settlement's key.
                "p_idempotency_key": f"api:{caller.user_id}:hold:{hold_id}",
                "p_reservation_id": str(hold_id),
            },
        )
        row = rows[0]
    elif body.amount == 0:
        released = (await rt.db.rpc("release_reservation", {"p_reservation_id": str(hold_id)}))[0]
        row = {"status": released["status"], "balance": None, "entry_id": None, "tokens": 0}
    else:
        row = (
            await rt.db.rpc(
                "settle_reservation", {"p_reservation_id": str(hold_id), "p_amount": body.amount}
            )
        )[0]
        row = {**row, "tokens": None}
    charge_outcome(row)
    return schemas.respond(schemas.Settlement.model_validate(row))


async def release_hold(request: Request) -> Response:
    rt = runtime(request)
    caller = await api_key(request, rt, "usage:write")
    hold_id = _hold_id(request)
    await own_hold(request, caller.user_id, hold_id)
    row = (await rt.db.rpc("release_reservation", {"p_reservation_id": str(hold_id)}))[0]
    charge_outcome(row)
    return schemas.respond(schemas.Release.model_validate(row))


async def extend_hold(request: Request) -> Response:
    rt = runtime(request)
    caller = await api_key(request, rt, "usage:write")
    hold_id = _hold_id(request)
    body = await read_model(request, schemas.ExtendRequest)
    await own_hold(request, caller.user_id, hold_id)
    row = (
        await rt.db.rpc(
            "extend_reservation",
            {"p_reservation_id": str(hold_id), "p_ttl": timedelta(seconds=body.ttl_seconds)},
        )
    )[0]
    charge_outcome(row)
    return schemas.respond(schemas.Extension.model_validate(row))


_HOLD_ERRORS = {
    400: schemas.ErrorResponse,
    404: schemas.ErrorResponse,
    409: schemas.ErrorResponse,
    413: schemas.ErrorResponse,
    422: schemas.ErrorResponse,
    **schemas.AGENT_ERRORS,
}

routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/holds",
        create_hold,
        methods=["POST"],
        summary="Hold tokens for work about to run: an amount or the quote of usage items",
        description="Needs an API key with usage:write; the Idempotency-Key header makes a "
        "retry return the same hold (200 duplicate). 402 when not enough is available.",
        body=schemas.HoldRequest,
        headers=[IDEMPOTENCY_KEY],
        security="apiKey",
        responses={
            200: schemas.Hold,
            201: schemas.Hold,
            402: schemas.ErrorResponse,
            **_HOLD_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/holds/{hold_id}/settle",
        settle_hold,
        methods=["POST"],
        summary="Settle a hold with the usage items the work used (or a number of tokens)",
        description="Items are priced and charged in one transaction; above the hold the excess "
        "comes from available tokens, capped at zero (partial). amount 0 releases the hold.",
        body=schemas.SettleRequest,
        security="apiKey",
        responses={200: schemas.Settlement, **_HOLD_ERRORS},
    ),
    ApiRoute(
        "/v1/holds/{hold_id}/release",
        release_hold,
        methods=["POST"],
        summary="Release a hold without charging",
        security="apiKey",
        responses={200: schemas.Release, **_HOLD_ERRORS},
    ),
    ApiRoute(
        "/v1/holds/{hold_id}/extend",
        extend_hold,
        methods=["POST"],
        summary="Extend a pending hold's expiry (public.extend_reservation)",
        body=schemas.ExtendRequest,
        security="apiKey",
        responses={200: schemas.Extension, **_HOLD_ERRORS},
    ),
]
