"""The ceiling of the webhook measurement: a bare Starlette endpoint that reads the body and
answers 200, served by the same uvicorn setup as `token-billing serve` (one worker, h11, no
access log). Run: `python -m uvicorn bench.bare_app:app --http h11 --port P`.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def webhook(request: Request) -> Response:
    await request.body()
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/v1/webhooks/stripe", webhook, methods=["POST"])])
