"""GET /v1/ledger: the signed-in user's recent balance changes, newest first.

Read as service_role through `public.list_ledger_entries` for the user id the access token
proves, so it works over both database paths; amounts, kinds and descriptions only (metadata and
idempotency keys stay server-side).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.deps import query_model, runtime, signed_in
from token_billing.server.openapi import ApiRoute


async def list_ledger(request: Request) -> Response:
    rt = runtime(request)
    user = await signed_in(request, rt)
    limit = query_model(request, schemas.LedgerQuery).limit
    rows = await rt.db.rpc("list_ledger_entries", {"p_user_id": str(user.id), "p_limit": limit})
    # Only the entry fields leave the server (no metadata, no idempotency keys).
    return schemas.respond(
        schemas.LedgerPage(entries=[schemas.LedgerEntry.model_validate(row) for row in rows])
    )


routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/ledger",
        list_ledger,
        methods=["GET"],
        summary="The signed-in user's most recent ledger entries, newest first",
        query=schemas.LedgerQuery,
        security="supabaseAuth",
        responses={200: schemas.LedgerPage, 422: schemas.ErrorResponse, **schemas.SIGNED_IN_ERRORS},
    )
]
