"""GET /v1/ledger: the signed-in user's recent balance changes, newest first.

Read as service_role through `public.list_ledger_entries` for the user id the access token
proves, so it works over both database paths; amounts, kinds and descriptions only (metadata and
idempotency keys stay server-side).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from token_billing.server.deps import runtime, signed_in
from token_billing.server.http_errors import ApiError

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def _entry(row: dict[str, Any]) -> dict[str, Any]:
    created = row.get("created_at")
    return {
        "id": row.get("id"),
        "amount": row.get("amount"),
        "balance_after": row.get("balance_after"),
        "kind": row.get("kind"),
        "description": row.get("description"),
        "created_at": created.isoformat() if isinstance(created, datetime) else created,
    }


async def list_ledger(request: Request) -> Response:
    rt = runtime(request)
    user = await signed_in(request, rt)
    raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(422, "invalid_limit", f"limit must be an integer from 1 to {MAX_LIMIT}")
    rows = await rt.db.rpc("list_ledger_entries", {"p_user_id": str(user.id), "p_limit": limit})
    return JSONResponse({"entries": [_entry(row) for row in rows]})


routes: list[BaseRoute] = [Route("/v1/ledger", list_ledger, methods=["GET"])]
