"""Every error the service answers with, and the one table from SQLSTATE to HTTP status.

Responses are `{"error": {"code": ..., "message": ...}}`. Messages are written for the caller:
no stack traces, no SQL, no secrets. What the caller cannot act on (a misconfigured database, a
bug) is logged in full and answered with a generic message. The database layer's own errors
(token_billing.errors: DatabaseError, DatabaseUnavailable) become responses here too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from token_billing.errors import DatabaseError, DatabaseUnavailable, TokenBillingError

logger = logging.getLogger("token_billing.errors")

# Seconds a client is told to wait before retrying a call the database could not take.
DATABASE_RETRY_AFTER = {"Retry-After": "5"}


class ApiError(TokenBillingError):
    """An error answered as JSON with `status`; `message` is safe to show the caller."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def unavailable(message: str) -> ApiError:
    """503 database_unavailable: the caller (Stripe, for webhooks) should retry; nothing was
    committed."""
    return ApiError(503, "database_unavailable", message, headers=DATABASE_RETRY_AFTER)


# SQLSTATE -> (HTTP status, error code, whether the database's message may be shown).
# The token-billing functions raise these on purpose (see 20261121000100_billing_schema.sql).
SQLSTATE_STATUS: Mapping[str, tuple[int, str, bool]] = {
    "22023": (400, "invalid_argument", True),
    "TBKEY": (409, "idempotency_key_reused", True),
    "TBRES": (404, "reservation_not_found", True),
    "TBAPP": (409, "append_only", True),
    "TBCUS": (409, "customer_conflict", True),
    "TBPRC": (422, "no_price", True),  # a meter without a price in effect
    # The marketplace (issue 19): a creator's other account, a listing not for sale, an agent
    # the buyer owns, a payout in another state.
    "TBCRE": (409, "creator_conflict", True),
    "TBLST": (409, "listing_unavailable", True),
    "TBENT": (409, "already_owned", True),
    "TBPAY": (409, "payout_conflict", True),
    "23505": (409, "conflict", True),  # unique violation, e.g. a Stripe price on two products
    # Privileges: the service's role lacks a grant. The caller cannot fix it; an operator must.
    "42501": (500, "misconfigured", False),
    # The function does not exist: a migration is missing.
    "42883": (500, "misconfigured", False),
    "57014": (503, "database_timeout", False),  # statement_timeout
    "40001": (503, "database_busy", False),  # serialization failure
    "40P01": (503, "database_busy", False),  # deadlock
    "53300": (503, "database_unavailable", False),  # too many connections
    "57P01": (503, "database_unavailable", False),  # admin shutdown
    "57P02": (503, "database_unavailable", False),
    "57P03": (503, "database_unavailable", False),
}


# Class 22 (data exception) beyond the codes above: Postgres could not take a value the caller
# sent (22P02 not a uuid or not JSON, 22P05 \u0000 in JSON, 22008 a date out of range, 22021 a
# NUL byte, 22003 a number beyond bigint). The caller's input is at fault, so a 400.
DATA_EXCEPTION = (400, "invalid_argument", True)


def from_sqlstate(exc: DatabaseError) -> ApiError:
    """The ApiError for a failed database call; unknown SQLSTATEs are a 500, logged."""
    sqlstate = exc.sqlstate or ""
    fallback = DATA_EXCEPTION if sqlstate.startswith("22") else (500, "internal_error", False)
    status, code, public = SQLSTATE_STATUS.get(sqlstate, fallback)
    if status >= 500:
        logger.log(
            logging.WARNING if status == 503 else logging.ERROR,
            "database call failed",
            extra={
                "fields": {
                    "function": exc.function,
                    "sqlstate": exc.sqlstate,
                    "detail": exc.message,
                }
            },
        )
    if public:
        return ApiError(status, code, exc.message)
    if status == 503:
        return unavailable("the database is busy or unavailable; retry later")
    return ApiError(status, code, "internal error: the operator has been told")


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))


_HTTP_CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


async def handle_api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ApiError):
        return await handle_unexpected(request, exc)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def handle_database_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, DatabaseError):
        return await handle_unexpected(request, exc)
    return await handle_api_error(request, from_sqlstate(exc))


async def handle_database_unavailable(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, DatabaseUnavailable):
        return await handle_unexpected(request, exc)
    return await handle_api_error(request, unavailable(exc.message))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):
        return await handle_unexpected(request, exc)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error: the operator has been told")


EXCEPTION_HANDLERS: Mapping[Any, Any] = {
    ApiError: handle_api_error,
    DatabaseError: handle_database_error,
    DatabaseUnavailable: handle_database_unavailable,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
