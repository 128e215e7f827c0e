"""The demo page, served by the service only in development with a Stripe test key.

`/` is examples/web/index.html (the copyable example, unchanged) with its stylesheet, its bundle
(examples/web/dist, built by `make web` with esbuild) and `/config.json`, which tells the page
where the API is and whether Supabase Realtime is configured. `POST /dev/session` signs an
access token for the demo user with SUPABASE_JWT_SECRET, so a person can try the flow without a
Supabase Auth server. These routes exist only when ENVIRONMENT is explicitly `development` (the
default is production) and the Stripe key is a test key (Settings.dev_routes); anywhere else
they 404, and a deployment that forgot ENVIRONMENT signs nothing.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from token_billing.server import schemas
from token_billing.server.auth import AUDIENCE
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute
from token_billing.server.settings import Settings

# The repository's examples/web: the demo page runs from a clone (`make dev`), never from a wheel.
WEB_DIR = Path(__file__).resolve().parents[4] / "examples" / "web"
DIST_DIR = WEB_DIR / "dist"
BUNDLE = DIST_DIR / "main.js"

# The demo user `make dev` creates (scripts/dev.py).
DEMO_USER_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")
DEMO_EMAIL = "demo@example.com"
DEV_TOKEN_SECONDS = 3600

_NO_CACHE = {"Cache-Control": "no-cache"}


def dev_token(settings: Settings, *, expires_in: int = DEV_TOKEN_SECONDS) -> str:
    """A Supabase-shaped access token for the demo user, signed with SUPABASE_JWT_SECRET."""
    if settings.supabase_jwt_secret is None:
        raise ApiError(
            409,
            "dev_sign_in_unavailable",
            "demo sign-in needs SUPABASE_JWT_SECRET (make dev generates one)",
        )
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(DEMO_USER_ID),
        "aud": AUDIENCE,
        "role": "authenticated",
        "email": DEMO_EMAIL,
        "iat": now,
        "exp": now + expires_in,
        "aal": "aal1",
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.supabase_jwt_secret.get_secret_value(), algorithm="HS256")


def routes(settings: Settings) -> list[BaseRoute]:
    """The page's routes in development (with a Stripe test key); none at all anywhere else."""
    if not settings.dev_routes:
        return []

    async def page(request: Request) -> Response:
        if not BUNDLE.exists():
            return PlainTextResponse(
                "The page's script is not built yet: run `make web` (esbuild), then reload.",
                status_code=503,
            )
        return FileResponse(WEB_DIR / "index.html", headers=_NO_CACHE)

    async def styles(request: Request) -> Response:
        return FileResponse(WEB_DIR / "styles.css", headers=_NO_CACHE)

    async def config(request: Request) -> Response:
        realtime = settings.supabase_base is not None and bool(settings.supabase_anon_key)
        return schemas.respond(
            schemas.PageConfig(
                apiUrl="",
                supabaseUrl=settings.supabase_base if realtime else None,
                supabaseAnonKey=settings.supabase_anon_key if realtime else None,
                devSignIn=settings.supabase_jwt_secret is not None,
                stripePublishableKey=settings.stripe_publishable_key,
            ),
            headers=_NO_CACHE,
        )

    async def dev_session(request: Request) -> Response:
        token = dev_token(settings)
        return schemas.respond(
            schemas.DevSession(
                access_token=token,
                token_type="bearer",  # noqa: S106 - the OAuth token type, not a secret
                expires_in=DEV_TOKEN_SECONDS,
                user=schemas.DevUser(id=str(DEMO_USER_ID), email=DEMO_EMAIL),
            ),
            headers={"Cache-Control": "no-store"},
        )

    return [
        Route("/", page, methods=["GET"], include_in_schema=False),
        Route("/styles.css", styles, methods=["GET"], include_in_schema=False),
        ApiRoute(
            "/config.json",
            config,
            methods=["GET"],
            summary="The demo page's configuration (development only)",
            responses={200: schemas.PageConfig},
            tag="development",
        ),
        ApiRoute(
            "/dev/session",
            dev_session,
            methods=["POST"],
            summary="An access token for the demo user (development only)",
            responses={200: schemas.DevSession, 409: schemas.ErrorResponse},
            tag="development",
        ),
        Mount("/dist", StaticFiles(directory=DIST_DIR, check_dir=False), name="dist"),
    ]
