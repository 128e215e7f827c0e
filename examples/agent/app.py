"""An agent endpoint that charges tokens for what each call used: hold, run, settle.

    DATABASE_URL=postgresql://... uvicorn examples.agent.app:app

POST /agent {"user_id": "...", "prompt": "..."} with an `Idempotency-Key` header. The request
holds an estimate, runs the model, and settles what the answer really cost; a failure releases
the hold. A retry with the same key while the first request still runs reuses its hold; once
that hold resolved, the retry gets 409 with what the first request was charged (HoldResolved),
never a second answer for free: a real app returns the answer it stored for that key. How the
user is authenticated is the host app's business (a Supabase JWT, an API key): here the body
names the user.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from token_billing import HoldResolved, InsufficientTokens, TokenBilling
from token_billing.db import PostgresDatabase

ESTIMATE = 500  # tokens held while the model runs: the most one call may cost

Model = Callable[[str], Awaitable[tuple[str, int]]]


async def echo_model(prompt: str) -> tuple[str, int]:
    """A stand-in for the model call: the answer and the tokens it used (1 per 4 characters,
    rounded up)."""
    answer = prompt[::-1]
    return answer, -(-len(prompt + answer) // 4)


def create_app(database_url: str, model: Model = echo_model) -> Starlette:
    db = PostgresDatabase(database_url)
    tokens = TokenBilling(db)

    async def agent(request: Request) -> Response:
        body = await request.json()
        key = request.headers.get("idempotency-key")
        if not key:
            return JSONResponse({"error": "an Idempotency-Key header is required"}, 400)
        try:
            async with tokens.reserve(body["user_id"], ESTIMATE, key=f"agent:{key}") as hold:
                answer, used = await model(body["prompt"])
                settled = await hold.settle(used)
        except HoldResolved as exc:
            # This key's request was answered before: say what it cost, do not run it again.
            return JSONResponse({"error": str(exc), "tokens_used": exc.charged or 0}, 409)
        except InsufficientTokens as exc:
            return JSONResponse({"error": str(exc)}, 402)
        return JSONResponse({"answer": answer, "tokens_used": used, "balance": settled.balance})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await db.open()
        try:
            yield
        finally:
            await db.close()

    return Starlette(routes=[Route("/agent", agent, methods=["POST"])], lifespan=lifespan)


if "DATABASE_URL" in os.environ:
    app = create_app(os.environ["DATABASE_URL"])
