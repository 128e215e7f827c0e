"""`token-billing doctor`: check a live database and print each finding with its fix.

    token-billing doctor [--db-url URL] [--schema NAME ...] [--json]

Exit status 0 when nothing is an error, 1 otherwise (so CI can run it), 2 when the database
cannot be reached. Needs only psycopg (no server extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from token_billing import doctor
from token_billing.cli.install import database_url


def add_parser(commands: Any) -> None:
    d = commands.add_parser(
        "doctor",
        help="check a database: security traps, the installed version, expiry, Realtime",
        description="Read a live database and report what is wrong, with the fix for each: "
        "security definer functions anon or authenticated can execute (Supabase lints "
        "0028/0029), functions that shadow token-billing's, tables without RLS, the installed "
        "version, the pg_cron expiry job, the Realtime publication, parked Stripe events.",
    )
    d.add_argument("--db-url", metavar="URL", help="the database (default: $DATABASE_URL)")
    d.add_argument(
        "--schema",
        action="append",
        default=[],
        metavar="NAME",
        help="another schema the Data API exposes (public and PostgREST's db_schemas are read "
        "from the database); repeatable",
    )
    d.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    d.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import psycopg

    url = database_url(args.db_url)
    if not url:
        print("token-billing doctor: give --db-url or set DATABASE_URL", file=sys.stderr)
        return 2
    try:
        findings = doctor.run(url, schemas=args.schema)
    except psycopg.OperationalError as exc:
        print(f"token-billing doctor: cannot reach the database: {exc}".strip(), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        print(doctor.render(findings))
    return 1 if any(f.level == "error" for f in findings) else 0
