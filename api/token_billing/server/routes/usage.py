"""POST /v1/usage, POST /v1/usage/quote, GET /v1/usage: usage priced by the rate card.

For agent backends with an API key (Authorization: Bearer tb_...): `POST /v1/usage` prices the
items and charges them in one database transaction (`public.record_usage`), as a deduct or
settling a hold; the Idempotency-Key header is required and is the call's key (a retry with the
same items answers `duplicate`, other items 409). `POST /v1/usage/quote` prices without
charging. `GET /v1/usage` (an API key with usage:read, or the user's own access token) sums a
period per meter.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.deps import api_key, query_model, read_model, reader, runtime
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute, Header

MAX_CLIENT_KEY_LENGTH = 200

IDEMPOTENCY_KEY = Header(
    "Idempotency-Key",
    "Required: the call's key. A retry with the same key and items answers duplicate and "
    "charges nothing; the same key with other items is a 409.",
    required=True,
    max_length=MAX_CLIENT_KEY_LENGTH,
)


def call_key(request: Request, user_id: uuid.UUID) -> str:
    """The database key of this call: the client's Idempotency-Key, in the user's namespace
    (two users' agents may pick the same key)."""
    client_key = request.headers.get("idempotency-key", "")
    if not client_key.strip():
        raise ApiError(400, "missing_idempotency_key", "the Idempotency-Key header is required")
    if len(client_key) > MAX_CLIENT_KEY_LENGTH:
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be at most {MAX_CLIENT_KEY_LENGTH} characters",
        )
    return f"api:{user_id}:{client_key}"


def items_json(items: list[schemas.UsageItem]) -> list[dict[str, Any]]:
    return [item.model_dump(exclude_none=True) for item in items]


def charge_outcome(row: dict[str, Any], *, requested: int | None = None) -> None:
    """Raise the HTTP error for a record_usage / settle status that charged nothing."""
    status = row["status"]
    if status == "insufficient_funds":
        raise ApiError(
            402,
            "insufficient_tokens",
            f"not enough tokens available for the {requested or row.get('tokens')} asked",
        )
    if status == "unknown_account":
        raise ApiError(404, "unknown_account", "no billing account exists for this user")
    if status == "not_pending":
        raise ApiError(409, "hold_not_pending", "the hold was already settled, released or expired")


async def own_hold(request: Request, user_id: uuid.UUID, hold_id: uuid.UUID) -> dict[str, Any]:
    """The hold, if it is this user's (another user's hold is not found, as if unknown)."""
    rows = await runtime(request).db.rpc("get_reservation", {"p_reservation_id": str(hold_id)})
    if not rows or str(rows[0]["user_id"]) != str(user_id):
        raise ApiError(404, "hold_not_found", f"no hold {hold_id} for this user")
    return rows[0]


async def record_usage(request: Request) -> Response:
    rt = runtime(request)
    caller = await api_key(request, rt, "usage:write")
    body = await read_model(request, schemas.UsageRequest)
    key = call_key(request, caller.user_id)
    if body.hold_id is not None:
        await own_hold(request, caller.user_id, body.hold_id)
    rows = await rt.db.rpc(
        "record_usage",
        {
            "p_user_id": str(caller.user_id),
            "p_items": items_json(body.items),
            "p_idempotency_key": key,
            "p_reservation_id": str(body.hold_id) if body.hold_id else None,
        },
    )
    charge_outcome(rows[0])
    return schemas.respond(schemas.UsageResult.model_validate(rows[0]))


async def quote_usage(request: Request) -> Response:
    rt = runtime(request)
    caller = await api_key(request, rt, "usage:read")
    body = await read_model(request, schemas.QuoteRequest)
    rows = await rt.db.rpc(
        "quote_usage", {"p_user_id": str(caller.user_id), "p_items": items_json(body.items)}
    )
    return schemas.respond(schemas.Quote.model_validate(rows[0]))


def _aware(value: datetime | None) -> datetime | None:
    """A time without a zone is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


async def usage_summary(request: Request) -> Response:
    rt = runtime(request)
    user_id = await reader(request, rt, "usage:read")
    query = query_model(request, schemas.UsageQuery)
    now = datetime.now(UTC)
    start = _aware(query.from_) or now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = _aware(query.to) or now
    if end <= start:
        raise ApiError(422, "invalid_period", "from must be before to")
    rows = await rt.db.rpc(
        "usage_summary",
        {"p_user_id": str(user_id), "p_from": start, "p_to": end, "p_group_by": query.group_by},
    )
    return schemas.respond(
        schemas.UsageSummary(
            from_=start,
            to=end,
            meters=[schemas.UsageLine.model_validate(row) for row in rows],
        )
    )


routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/usage",
        record_usage,
        methods=["POST"],
        summary="Price usage items and charge them in one transaction (public.record_usage)",
        description="Needs an API key with usage:write. With hold_id it settles that hold "
        "(overrun capped at zero: partial), else it deducts. 402 when the tokens available do "
        "not cover it; 409 when the hold is resolved or the key was used with other items.",
        body=schemas.UsageRequest,
        headers=[IDEMPOTENCY_KEY],
        security="apiKey",
        responses={
            200: schemas.UsageResult,
            400: schemas.ErrorResponse,
            402: schemas.ErrorResponse,
            404: schemas.ErrorResponse,
            409: schemas.ErrorResponse,
            413: schemas.ErrorResponse,
            422: schemas.ErrorResponse,
            **schemas.AGENT_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/usage/quote",
        quote_usage,
        methods=["POST"],
        summary="Price usage items without charging (public.quote_usage)",
        description="Needs an API key with usage:read. Counts this period's usage so far for "
        "graduated prices; use the total as a hold's amount.",
        body=schemas.QuoteRequest,
        security="apiKey",
        responses={
            200: schemas.Quote,
            400: schemas.ErrorResponse,
            413: schemas.ErrorResponse,
            422: schemas.ErrorResponse,
            **schemas.AGENT_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/usage",
        usage_summary,
        methods=["GET"],
        summary="Usage per meter (and dimension) for a period (public.usage_summary)",
        query=schemas.UsageQuery,
        security=("apiKey", "supabaseAuth"),
        responses={200: schemas.UsageSummary, 422: schemas.ErrorResponse, **schemas.AGENT_ERRORS},
        name="usage_summary",
    ),
]
