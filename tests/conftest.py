"""Fixtures: one Supabase-shaped Postgres cluster per test session, migrated once.

The session starts its own cluster (scripts/pgcluster.py) in a temp dir on a free port, builds
`tb_template` the way users deploy (tests/sql/supabase_compat.sql, then `supabase db push` of
supabase/migrations and supabase/seed.sql), adds the pgTAP files' `tests` schema
(tests/sql/pgtap_helpers.sql), and marks it a template. Each test that asks for `db`
gets a fresh copy of it (`create database ... template tb_template`, about 0.1 s), dropped after.

Ways in (scripts.pgcluster.Database): `db.connect()` as postgres, `db.connect_superuser()`,
`db.as_user(user_id)` / `db.as_anon()` / `db.as_service_role()` (login as authenticator, then
`set role` with request.jwt.claims, as PostgREST does), `db.create_user(user_id)`, `db.psql(sql)`.

Tests that restart Postgres or kill backends wholesale (the fault and storm suites) use
`chaos_db` instead: a clone on a second cluster of their own, so no other test is disturbed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from scripts.pgcluster import Database, PgCluster, build_template, temporary_cluster
from tests.fault_support import SUMMARIES

TEMPLATE = "tb_template"

# Seconds spent on harness setup, reported at the end of the run.
_TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TIMINGS:
        parts = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in _TIMINGS.items())
        terminalreporter.write_line(f"database harness: {parts}")
    # The fault, storm and fuzz suites' figures (docs/reliability.md quotes them).
    for line in SUMMARIES:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A running throwaway cluster; superuser `supabase_admin`, trust auth, fsync off."""
    started = time.monotonic()
    with temporary_cluster() as cluster:
        _TIMINGS["cluster start"] = time.monotonic() - started
        yield cluster


@pytest.fixture(scope="session")
def template_db(pg_cluster: PgCluster) -> Database:
    """The migrated and seeded template. Never connect to it while tests clone it."""
    started = time.monotonic()
    build_template(pg_cluster, TEMPLATE)
    _TIMINGS["template build (compat + supabase db push + pgTAP helpers)"] = (
        time.monotonic() - started
    )
    return Database(pg_cluster, TEMPLATE)


def _clone(pg_cluster: PgCluster, template_db: Database, prefix: str) -> Database:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name, template=template_db.name)
    return Database(pg_cluster, name)


@pytest.fixture(scope="session")
def shared_db(pg_cluster: PgCluster, template_db: Database) -> Iterator[Database]:
    """One clone for the whole session, for checks that leave no trace (pgTAP files, which run
    inside begin/rollback, and the Supabase CLI's lint and advisors)."""
    db = _clone(pg_cluster, template_db, "tb_shared")
    yield db
    pg_cluster.drop_database(db.name)


@pytest.fixture
def db(pg_cluster: PgCluster, template_db: Database) -> Iterator[Database]:
    """A fresh migrated database for one test, dropped after it."""
    db = _clone(pg_cluster, template_db, "tb_test")
    yield db
    pg_cluster.drop_database(db.name)


@pytest.fixture(scope="session")
def chaos_cluster() -> Iterator[tuple[PgCluster, Database]]:
    """A second cluster with its own template, for tests that restart Postgres or kill its
    backends wholesale: the session cluster (and every other test's database) is never touched."""
    started = time.monotonic()
    with temporary_cluster() as cluster:
        build_template(cluster, TEMPLATE)
        _TIMINGS["chaos cluster (start + template)"] = time.monotonic() - started
        yield cluster, Database(cluster, TEMPLATE)


@pytest.fixture
def chaos_db(chaos_cluster: tuple[PgCluster, Database]) -> Iterator[Database]:
    """A fresh migrated database on the chaos cluster, dropped after the test."""
    cluster, template = chaos_cluster
    db = _clone(cluster, template, "tb_chaos")
    yield db
    cluster.drop_database(db.name)


CRON_DB = "tb_cron"


@pytest.fixture
def cron_cluster() -> Iterator[PgCluster]:
    """A cluster of its own with pg_cron preloaded and bound to the database `tb_cron` (pg_cron
    serves one database per cluster), which the test creates; the compat layer is applied."""
    with temporary_cluster(
        shared_preload_libraries="'pg_cron'", **{"cron.database_name": f"'{CRON_DB}'"}
    ) as cluster:
        cluster.apply_compat("postgres")
        yield cluster


def create_cron_database(cluster: PgCluster) -> Database:
    """`tb_cron` as on Supabase: pg_cron enabled by the platform and usable by postgres."""
    cluster.create_database(CRON_DB)
    cluster.psql(CRON_DB, "create extension pg_cron; grant usage on schema cron to postgres")
    cluster.apply_compat(CRON_DB)
    return Database(cluster, CRON_DB)
