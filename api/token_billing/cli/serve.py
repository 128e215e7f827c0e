"""`token-billing serve`: the service under uvicorn, one worker, settings from the environment.

uvicorn runs with the limits of token_billing.server.serving (h11, bounded heads, read
timeouts, connections per client) and, when METRICS_PORT is set, the metrics listener beside it.
"""

from __future__ import annotations

import argparse
from typing import Any

from token_billing.cli.settings import server_settings


def add_parser(commands: Any) -> None:
    """`serve` as a subcommand of `commands` (an argparse subparsers action)."""
    s = commands.add_parser(
        "serve",
        help="run the HTTP service (uvicorn, one worker)",
        description="Run the HTTP service with the settings of the environment and .env (see "
        ".env.example and docs/deployment.md). It exits with status 3 when the database "
        "cannot be reached within DB_STARTUP_TIMEOUT_SECONDS, 2 when the settings are invalid.",
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    s.add_argument(
        "--port", type=int, default=8000, help="port of the API (default: 8000)", metavar="PORT"
    )
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = server_settings("serve", args.env_file)
    if settings is None:
        return 2
    from token_billing.server.logs import configure_logging
    from token_billing.server.serving import STARTUP_FAILURE, build_server

    configure_logging(settings.log_level)
    server = build_server(settings, host=args.host, port=args.port)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn's way to say startup failed
        return int(exc.code) if isinstance(exc.code, int) else STARTUP_FAILURE
    return 0
