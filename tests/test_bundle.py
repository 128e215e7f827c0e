"""sql/token_billing.sql: generated from the migrations, up to date, and applies on its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from scripts import bundle_sql
from scripts.pgcluster import OWNER, Database, PgCluster


def test_bundle_should_be_up_to_date() -> None:
    """The committed bundle should equal what scripts/bundle_sql.py renders now."""
    assert bundle_sql.BUNDLE.exists(), "sql/token_billing.sql is missing: run `make bundle`"
    up_to_date = bundle_sql.BUNDLE.read_text(encoding="utf-8") == bundle_sql.render()
    assert up_to_date, "sql/token_billing.sql is out of date: run `make bundle`"


def test_bundle_should_list_every_migration_in_order() -> None:
    """Each migration should appear once, under its `-- migration:` line, in file-name order."""
    text = bundle_sql.render()
    names = [p.name for p in bundle_sql.migration_files()]
    positions = [text.find(f"\n-- migration: {name}\n") for name in names]
    assert all(pos >= 0 for pos in positions), positions
    assert positions == sorted(positions)
    assert text.count("\n-- migration: ") == len(names)


@pytest.fixture
def bare_db(pg_cluster: PgCluster) -> Iterator[Database]:
    """A database with only the Supabase compat layer: what a new Supabase project looks like."""
    name = f"tb_bundle_{uuid.uuid4().hex[:12]}"
    pg_cluster.apply_compat("postgres")
    pg_cluster.create_database(name)
    pg_cluster.apply_compat(name)
    yield Database(pg_cluster, name)
    pg_cluster.drop_database(name)


def _objects(db: Database) -> set[str]:
    """The relations and functions in billing and public, by name and signature."""
    out = db.psql(
        "select format('%s %s.%s', c.relkind, n.nspname, c.relname) from pg_class c "
        "join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname in ('billing', 'public') and c.relkind in ('r', 'v', 'm', 'p', 'S') "
        "union all "
        "select 'f ' || p.oid::regprocedure::text from pg_proc p "
        "join pg_namespace n on n.oid = p.pronamespace where n.nspname in ('billing', 'public')"
    )
    return set(out.splitlines())


def test_bundle_should_apply_cleanly_as_postgres(bare_db: Database, shared_db: Database) -> None:
    """Pasting the bundle into a fresh project (role postgres) should succeed and create the
    same tables and functions as `supabase db push`."""
    bare_db.psql(file=bundle_sql.BUNDLE, user=OWNER)
    bundled, pushed = _objects(bare_db), _objects(shared_db)
    assert bundled == pushed, (
        f"only in the bundle: {sorted(bundled - pushed)}\n"
        f"only in the migrations: {sorted(pushed - bundled)}\n"
        "(a stale bundle? run `make bundle`)"
    )
