"""POST /v1/api-keys, GET /v1/api-keys, DELETE /v1/api-keys/{id}: a signed-in user's API keys.

The user (Supabase access token) makes keys for their agent backends, lists them and revokes
them; the database functions are service-role only, so this is the only way in for a user. A
new key is answered once (201, `key`); the database keeps only its SHA-256. The keys made are
tb_live_ with a live Stripe key, else tb_test_, and the service accepts only those.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.deps import read_model, runtime, signed_in
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute


def _info(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "id": row["api_key_id"]}


async def create_key(request: Request) -> Response:
    rt = runtime(request)
    user = await signed_in(request, rt)
    body = await read_model(request, schemas.ApiKeyRequest)
    rows = await rt.db.rpc(
        "create_api_key",
        {
            "p_user_id": str(user.id),
            "p_name": body.name,
            # A text[] as its array literal (a list would be sent as jsonb); scopes are a closed
            # set of plain words, so no quoting is needed.
            "p_scopes": "{" + ",".join(body.scopes) + "}",
            "p_expires_at": body.expires_at,
            "p_environment": rt.settings.api_key_environment,
        },
    )
    made = rows[0]
    if made["status"] == "unknown_account":
        raise ApiError(404, "unknown_account", "no billing account exists for this user")
    listed = await rt.db.rpc("list_api_keys", {"p_user_id": str(user.id)})
    info = next(row for row in listed if str(row["api_key_id"]) == str(made["api_key_id"]))
    return schemas.respond(
        schemas.NewApiKey.model_validate({**_info(info), "key": made["api_key"]}), 201
    )


async def list_keys(request: Request) -> Response:
    rt = runtime(request)
    user = await signed_in(request, rt)
    rows = await rt.db.rpc("list_api_keys", {"p_user_id": str(user.id)})
    return schemas.respond(
        schemas.ApiKeyList(api_keys=[schemas.ApiKeyInfo.model_validate(_info(r)) for r in rows])
    )


async def revoke_key(request: Request) -> Response:
    rt = runtime(request)
    user = await signed_in(request, rt)
    try:
        key_id = uuid.UUID(str(request.path_params["api_key_id"]))
    except ValueError:
        raise ApiError(404, "api_key_not_found", "no such API key") from None
    row = (
        await rt.db.rpc("revoke_api_key", {"p_user_id": str(user.id), "p_api_key_id": str(key_id)})
    )[0]
    if row["status"] == "not_found":
        raise ApiError(404, "api_key_not_found", f"no API key {key_id} of this user")
    return schemas.respond(
        schemas.Revoked(id=key_id, status=row["status"], revoked_at=row["revoked_at"])
    )


routes: list[BaseRoute] = [
    ApiRoute(
        "/v1/api-keys",
        create_key,
        methods=["POST"],
        summary="Make an API key for the signed-in user (shown once)",
        description="Without a body: a key with every scope that never expires.",
        body=schemas.ApiKeyRequest,
        body_required=False,
        security="supabaseAuth",
        responses={
            201: schemas.NewApiKey,
            400: schemas.ErrorResponse,
            404: schemas.ErrorResponse,
            413: schemas.ErrorResponse,
            422: schemas.ErrorResponse,
            **schemas.SIGNED_IN_ERRORS,
        },
    ),
    ApiRoute(
        "/v1/api-keys",
        list_keys,
        methods=["GET"],
        summary="The signed-in user's API keys, newest first (no secrets)",
        security="supabaseAuth",
        responses={200: schemas.ApiKeyList, **schemas.SIGNED_IN_ERRORS},
        name="list_api_keys",
    ),
    ApiRoute(
        "/v1/api-keys/{api_key_id}",
        revoke_key,
        methods=["DELETE"],
        summary="Revoke one of the signed-in user's API keys, at once",
        security="supabaseAuth",
        responses={200: schemas.Revoked, 404: schemas.ErrorResponse, **schemas.SIGNED_IN_ERRORS},
    ),
]
