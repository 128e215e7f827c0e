"""Helpers of the fault, storm, fuzz and limit suites: scale, figures, retries, chaos.

`STRESS_SCALE` (an integer >= 1, default 1) multiplies the work of every suite marked `stress`:
`make test` runs them at 1, `make stress` at 10 or whatever the environment says. Each suite
ends with one `reliability <suite>: ...` line of real figures, printed at the end of the run
(tests/conftest.py) so docs/reliability.md can quote the last run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg

from scripts.pgcluster import Database, PgCluster
from token_billing.errors import DatabaseError, DatabaseUnavailable


def _scale() -> int:
    raw = os.environ.get("STRESS_SCALE", "1")
    try:
        value = int(raw)
    except ValueError:
        raise RuntimeError(f"STRESS_SCALE must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise RuntimeError(f"STRESS_SCALE must be a positive integer, got {raw!r}")
    return value


STRESS_SCALE = _scale()

# One line per suite run, printed by the terminal summary hook in tests/conftest.py.
SUMMARIES: list[str] = []

# SQLSTATEs after which the outcome of a call is unknown or it was refused for a passing reason:
# the client retries the very same call. Connection classes, admin shutdown, timeouts, and the
# serialization/deadlock/too-many-connections family.
TRANSIENT_SQLSTATES = frozenset(
    {"57P01", "57P02", "57P03", "57014", "40001", "40P01", "53300", "55P03", "25P02"}
)

T = TypeVar("T")


def scaled(count: int) -> int:
    """`count` times STRESS_SCALE."""
    return count * STRESS_SCALE


def report(suite: str, **figures: object) -> str:
    """Record (and print) the figures line of one suite run."""
    parts = ", ".join(f"{name}={value}" for name, value in figures.items())
    line = f"reliability {suite} (STRESS_SCALE={STRESS_SCALE}): {parts}"
    SUMMARIES.append(line)
    print(line)
    return line


def is_transient(exc: BaseException) -> bool:
    """Whether a failed call may simply be retried with the same arguments (same key)."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, DatabaseError):
        return exc.sqlstate in TRANSIENT_SQLSTATES or (exc.sqlstate or "").startswith("08")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate or ""
        return sqlstate in TRANSIENT_SQLSTATES or sqlstate.startswith("08")
    return False


class GaveUp(AssertionError):
    """A call kept failing past its deadline: the service did not recover."""


def retry(call: Callable[[], T], *, deadline_seconds: float, on_retry: Callable[[], None]) -> T:
    """`call()` until it answers; transient failures are retried verbatim, with a short pause."""
    deadline = time.monotonic() + deadline_seconds
    pause = 0.005
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() > deadline:
                raise GaveUp(f"still failing after {deadline_seconds}s: {exc!r}") from exc
            on_retry()
            time.sleep(pause)
            pause = min(pause * 2, 0.25)


class Counter:
    """A thread-safe tally."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


def ready_within(
    readyz_status: Callable[[], int], seconds: float, interval: float = 0.1
) -> tuple[int, float]:
    """Poll /readyz (through `readyz_status`) until it answers 200 or `seconds` pass: the last
    status, and how long it took."""
    started = time.monotonic()
    status = 0
    while time.monotonic() - started < seconds:
        status = readyz_status()
        if status == 200:
            break
        time.sleep(interval)
    return status, time.monotonic() - started


def superuser(db: Database) -> psycopg.Connection[tuple[Any, ...]]:
    return db.connect_superuser()


def terminate(db: Database, where: str, *, limit: int | None = None) -> int:
    """pg_terminate_backend of the sessions of `db` matching `where` (SQL on pg_stat_activity,
    written by the tests themselves); how many were killed."""
    query = (
        "select count(*) filter (where pg_terminate_backend(pid)) from ("
        "select pid from pg_stat_activity where datname = %s and pid <> pg_backend_pid() "
        f"and ({where}) order by random()"
        + (f" limit {int(limit)}" if limit is not None else "")
        + ") as victims"
    )
    with db.connect_superuser() as conn:
        row = conn.execute(query, [db.name]).fetchone()
    return int(row[0]) if row else 0


def restart(cluster: PgCluster, *, down_seconds: float = 0.0) -> float:
    """`pg_ctl stop -m fast`, stay down `down_seconds`, start again; the seconds it was down."""
    started = time.monotonic()
    cluster.stop("fast")
    try:
        time.sleep(down_seconds)
    finally:
        cluster.start()
    return time.monotonic() - started


@contextmanager
def cluster_back_up(cluster: PgCluster) -> Iterator[None]:
    """Make sure the cluster runs again when the block ends, however it ends."""
    try:
        yield
    finally:
        if not cluster.running:
            cluster.start()


def invariant_problems(db: Database) -> list[tuple[Any, ...]]:
    with db.connect_superuser() as conn:
        return conn.execute("select * from billing.check_invariants()").fetchall()


def negative_available(db: Database) -> list[tuple[Any, ...]]:
    with db.connect_superuser() as conn:
        return conn.execute(
            "select user_id, balance, reserved from billing.accounts where balance - reserved < 0"
        ).fetchall()
