"""token-billing: token (credit) billing for AI apps on Supabase and Stripe.

    token-billing install [--migrations-dir DIR | --db-url URL | --print] [--signup-grant N] ...
    token-billing uninstall [--migrations-dir DIR | --db-url URL | --print] [--drop-ledger]
    token-billing doctor [--db-url URL] [--json]
    token-billing [--env-file PATH] serve [--host H] [--port P]
    token-billing [--env-file PATH] stripe trigger EVENT --user USER_ID --product CODE [--url URL]
    token-billing [--env-file PATH] stripe sync-products
    token-billing [--env-file PATH] stripe reconcile [--since 72h] [--dry-run] [--output FORMAT]
    token-billing [--env-file PATH] user USER_ID_OR_EMAIL [--json]
    token-billing [--env-file PATH] events parked|replay [--json]
    token-billing [--env-file PATH] creators payout [--dry-run] [--period YYYY-MM-DD] [--json]
    token-billing [--env-file PATH] creators refund SESSION [--amount CENTS]

Settings come from the environment and `.env` (or --env-file), as for the service (see
.env.example); `make dev` writes its own to .dev/dev.env. `serve` and `stripe` need the server
extra (`pip install 'token-billing[server]'`) and say so when it is missing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from token_billing.cli import creators, doctor, install, operator, serve, stripe

DESCRIPTION = (
    "token-billing: token (credit) billing for AI apps on Supabase and Stripe. Install its SQL "
    "into a project, check a database, run the HTTP service, and work with Stripe. Settings come "
    "from the environment and .env (see .env.example)."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="token-billing", description=DESCRIPTION)
    p.add_argument(
        "--env-file",
        type=Path,
        help="read settings from this file instead of .env (the environment still wins)",
    )
    commands = p.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND --help)"
    )
    install.add_parser(commands)
    doctor.add_parser(commands)
    serve.add_parser(commands)
    stripe.add_parser(commands)
    operator.add_parser(commands)
    creators.add_parser(commands)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code
