"""`token-billing install` and `token-billing uninstall`: token-billing's SQL into a host project.

    token-billing install [--migrations-dir DIR | --db-url URL | --print] [choices]
    token-billing uninstall [--migrations-dir DIR | --db-url URL | --print] [--drop-ledger]

By default both write a new migration into ./supabase/migrations (the Supabase CLI project of
the current directory), dated after its newest, for `supabase db push` to apply after the
host's own history. `--db-url` runs the SQL against a database at once (one transaction);
`--print` writes it to standard output. Needs only psycopg (no server extra).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from token_billing import install

DEFAULT_MIGRATIONS = Path("supabase") / "migrations"


def _grant(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of tokens: {text!r}") from None
    if not 0 <= value <= 10**15:
        raise argparse.ArgumentTypeError(f"must be from 0 to 10^15 tokens, got {value}")
    return value


def _destination(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--migrations-dir",
        type=Path,
        metavar="DIR",
        help=f"write a new migration into DIR (default: {DEFAULT_MIGRATIONS}) for "
        "`supabase db push`",
    )
    where.add_argument(
        "--db-url",
        metavar="URL",
        help="run the SQL against this database now, in one transaction (connect as postgres)",
    )
    where.add_argument("--print", action="store_true", help="write the SQL to standard output")


def add_parser(commands: Any) -> None:
    """`install` and `uninstall` as subcommands of `commands` (an argparse subparsers action)."""
    i = commands.add_parser(
        "install",
        help="install or upgrade token-billing in a Supabase project",
        description="Install token-billing, or upgrade it to this package's version. A project "
        "that has it already gets only the migrations it lacks; a current one, nothing.",
    )
    _destination(i)
    i.add_argument(
        "--signup-grant",
        type=_grant,
        metavar="TOKENS",
        help="tokens credited to each new account (default 100; 0: none). First install only",
    )
    i.add_argument(
        "--grant-existing-users",
        action="store_true",
        default=None,
        help="give users that exist at install the signup grant too (default: accounts open "
        "with 0 tokens). First install only",
    )
    i.add_argument(
        "--grant-anonymous-users",
        action="store_true",
        default=None,
        help="give anonymous users (Supabase anonymous sign-ins) the grant at signup (default: "
        "they get it when they link an email or phone). First install only",
    )
    i.add_argument(
        "--replace-conflicting",
        action="store_true",
        help="drop functions in public named like token-billing's that are not (a tutorial's "
        "add_tokens or deduct_tokens, say) instead of refusing to install",
    )
    i.set_defaults(run=run_install)

    u = commands.add_parser(
        "uninstall",
        help="remove everything token-billing made, and nothing else",
        description="Remove token-billing: its schema billing with all data, its functions in "
        "public, its triggers on auth.users, its pg_cron job and its publication membership.",
    )
    _destination(u)
    u.add_argument(
        "--drop-ledger",
        action="store_true",
        help="confirm that the ledger's entries may be deleted (export them first); without "
        "it, a database whose ledger holds entries is refused",
    )
    u.set_defaults(run=run_uninstall)


def _run(args: argparse.Namespace, choices: install.Choices, *, uninstall: bool) -> int:
    name = "uninstall" if uninstall else "install"
    try:
        if args.print:
            sys.stdout.write(install.render_migration(choices, uninstall=uninstall))
            return 0
        if args.db_url:
            for notice in install.apply(args.db_url, choices, uninstall=uninstall):
                print(notice)
            return 0
        written = install.write_migration(
            args.migrations_dir or DEFAULT_MIGRATIONS, choices, uninstall=uninstall
        )
    except install.InstallError as exc:
        print(f"token-billing {name}: {exc}", file=sys.stderr)
        return 1
    print(written.message)
    if written.path is not None:
        print("next: supabase db push")
    return 0


def run_install(args: argparse.Namespace) -> int:
    choices = install.Choices(
        signup_grant=args.signup_grant,
        grant_existing_users=args.grant_existing_users,
        grant_anonymous_users=args.grant_anonymous_users,
        replace_conflicting=args.replace_conflicting,
    )
    return _run(args, choices, uninstall=False)


def run_uninstall(args: argparse.Namespace) -> int:
    return _run(args, install.Choices(drop_ledger=args.drop_ledger), uninstall=True)


def database_url(explicit: str | None) -> str | None:
    """--db-url, else DATABASE_URL from the environment."""
    return explicit or os.environ.get("DATABASE_URL") or None
