"""What the routes need of a request: the app's runtime, the caller, the body, log fields.

Routes import this module, never the app: the app imports the routes to list them, so a route
that imported the app back would make a cycle.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from token_billing.db import Database
from token_billing.server.api_keys import KeyAuthenticator, KeyCaller, looks_like_key
from token_billing.server.auth import Authenticator, User
from token_billing.server.http_errors import ApiError
from token_billing.server.logs import LOG_SCOPE_KEY
from token_billing.server.metrics import Metrics
from token_billing.server.schemas import Model
from token_billing.server.settings import Settings
from token_billing.server.stream import BalanceBroker
from token_billing.server.stripe_api import StripeGateway, idempotency_key, stripe_not_configured

# Bodies of the JSON API routes are tiny; the webhook has its own (larger) limit.
MAX_JSON_BODY_BYTES = 16 * 1024

M = TypeVar("M", bound=Model)
MAX_IDEMPOTENCY_KEY_LENGTH = 255


@dataclass
class Runtime:
    """What the lifespan opens: shared by every request of one app."""

    settings: Settings
    metrics: Metrics
    db: Database
    auth: Authenticator
    stripe: StripeGateway
    http: httpx.AsyncClient
    keys: KeyAuthenticator


def runtime(request: Request) -> Runtime:
    rt = getattr(request.app.state, "runtime", None)
    if not isinstance(rt, Runtime):
        raise RuntimeError("the app's lifespan has not run (use TestClient as a context manager)")
    return rt


def log_fields(request: Request) -> dict[str, Any]:
    """Fields added to this request's single log line."""
    fields: dict[str, Any] = request.scope.setdefault(LOG_SCOPE_KEY, {})
    return fields


def broker(request: Request) -> BalanceBroker:
    """The app's balance broker (the lifespan starts it; GET /v1/balance/stream reads it)."""
    value = getattr(request.app.state, "balances", None)
    if not isinstance(value, BalanceBroker):
        raise RuntimeError("the app's lifespan has not run (use TestClient as a context manager)")
    return value


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
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large", f"the body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client left, or its body took longer than HTTP_BODY_TIMEOUT_SECONDS (408 sent by
        # token_billing.server.serving): nobody reads this answer, nothing was done.
        raise ApiError(
            408,
            "request_timeout",
            "the request body did not arrive (the client left, or took longer than "
            "HTTP_BODY_TIMEOUT_SECONDS)",
        ) from None
    return b"".join(chunks)


async def read_json_object(request: Request, limit: int = MAX_JSON_BODY_BYTES) -> dict[str, Any]:
    body = await read_body(request, limit)
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return value


def _invalid(model: type[Model], exc: ValidationError) -> ApiError:
    """A 422 naming the first bad field, with the model's code for that field."""
    first = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or "body"
    top = str(first["loc"][0]) if first["loc"] else ""
    code = model.error_codes.get(top, "invalid_request")
    message = str(first["msg"]).removeprefix("Value error, ")
    return ApiError(422, code, f"{field}: {message[:1].lower()}{message[1:]}")


async def read_model(request: Request, model: type[M], limit: int = MAX_JSON_BODY_BYTES) -> M:
    """The JSON body validated by `model` (400 not JSON, 413 too large, 422 invalid)."""
    value = await read_json_object(request, limit)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _invalid(model, exc) from None


def query_model(request: Request, model: type[M]) -> M:
    """The query string validated by `model` (422 invalid)."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise _invalid(model, exc) from None


def require_stripe(rt: Runtime) -> None:
    """409 when the Stripe key is the one `make dev` made up (the real Stripe would refuse it);
    checked before anything else is done (the gateway refuses such calls too)."""
    if rt.settings.stripe_key_generated:
        raise stripe_not_configured()


async def signed_in(request: Request, rt: Runtime) -> User:
    user = await rt.auth.user(request.headers.get("authorization"))
    log_fields(request)["user_id"] = str(user.id)
    return user


def bearer_token(request: Request) -> str:
    """The token of `Authorization: Bearer <token>`, or empty."""
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def api_key(request: Request, rt: Runtime, scope: str) -> KeyCaller:
    """The caller of a route for agent backends: an API key (Bearer tb_...) with `scope`."""
    token = bearer_token(request)
    if not looks_like_key(token):
        if token:
            raise ApiError(
                403,
                "api_key_required",
                "this route takes an API key (Authorization: Bearer tb_...), not a user's "
                "session: make one with POST /v1/api-keys",
            )
        raise ApiError(
            401,
            "unauthorized",
            "missing Authorization: Bearer <API key>",
            headers={"WWW-Authenticate": 'Bearer realm="token-billing"'},
        )
    caller = await rt.keys.caller(token)
    caller.require(scope)
    fields = log_fields(request)
    fields["user_id"] = str(caller.user_id)
    fields["api_key_id"] = str(caller.api_key_id)
    return caller


async def reader(request: Request, rt: Runtime, scope: str) -> uuid.UUID:
    """The user of a read route: an API key with `scope`, or a signed-in user's access token."""
    if looks_like_key(bearer_token(request)):
        return (await api_key(request, rt, scope)).user_id
    return (await signed_in(request, rt)).id


def buyer(user: User) -> User:
    if user.is_anonymous:
        raise ApiError(
            403,
            "anonymous_user",
            "anonymous users cannot buy: link an email or sign in first",
        )
    return user


def request_key(request: Request, *parts: object) -> str:
    """The Idempotency-Key of a Stripe POST made for this request.

    A client that sends its own Idempotency-Key gets the same Stripe object back on a retry; a
    client that does not gets a fresh key (the stripe library still reuses it on its retries).
    """
    client_key = request.headers.get("idempotency-key")
    if client_key is not None and len(client_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        # Stripe's own bound, so that a key means the same here as there.
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters",
        )
    return idempotency_key(*parts, client_key if client_key else uuid.uuid4())


async def active_products(rt: Runtime) -> list[dict[str, Any]]:
    return await rt.db.rpc("list_products", {"p_include_inactive": False})


async def active_prices(rt: Runtime) -> list[dict[str, Any]]:
    """The plans' further prices (annual, other currencies): public.list_product_prices."""
    return await rt.db.rpc("list_product_prices", {"p_include_inactive": False})
