"""`token-billing serve`: the service under uvicorn, one worker, settings from the environment."""

from __future__ import annotations

import argparse
from typing import Any

from token_billing.cli.settings import server_settings

# Seconds a shutdown waits for requests in flight (balance streams end at once: see
# token_billing.server.stream).
GRACEFUL_SHUTDOWN_SECONDS = 10


def add_parser(commands: Any) -> None:
    """`serve` as a subcommand of `commands` (an argparse subparsers action)."""
    s = commands.add_parser("serve", help="run the HTTP service (uvicorn, one worker)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = server_settings("serve", args.env_file)
    if settings is None:
        return 2
    import uvicorn

    from token_billing.server.app import create_app
    from token_billing.server.logs import configure_logging
    from token_billing.server.stream import Server

    configure_logging(settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        workers=1,
        access_log=False,  # the app writes one JSON line per request itself
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    Server(config).run()
    return 0
