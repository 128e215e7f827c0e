"""The pinned Supabase CLI's own checks pass against the migrated database.

`supabase db lint` runs plpgsql_check over every function (warnings fail too); `supabase db
advisors` runs Supabase's security and performance advisors (anything at warn or above fails).
Both connect as `postgres`, the role a linked project's CLI uses.
"""

from __future__ import annotations

import json
import subprocess

from scripts.pgcluster import OWNER, Database, run_supabase


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_db_lint_should_find_nothing(shared_db: Database) -> None:
    """plpgsql_check should report no error and no warning in any schema."""
    proc = run_supabase(
        "db",
        "lint",
        f"--remote={shared_db.dsn(OWNER)}",
        "--level",
        "warning",
        "--fail-on",
        "warning",
        "--output-format",
        "json",
        check=False,
    )
    status = proc.returncode
    assert status == 0, _explain(proc)
    report = json.loads(proc.stdout)
    assert report["results"] == [], _explain(proc)


def test_db_advisors_should_raise_no_warning(shared_db: Database) -> None:
    """Supabase's security and performance advisors should flag nothing at warn or error."""
    proc = run_supabase(
        "db",
        "advisors",
        f"--remote={shared_db.dsn(OWNER)}",
        "--type",
        "all",
        "--level",
        "info",
        "--fail-on",
        "warn",
        "--output-format",
        "json",
        check=False,
    )
    try:
        results = json.loads(proc.stdout).get("results", [])
    except ValueError:
        results = None
    flagged = [r for r in results or [] if str(r.get("level", "")).upper() in ("WARN", "ERROR")]
    status = proc.returncode
    assert status == 0, f"{json.dumps(flagged, indent=2)}\n{_explain(proc)}"
    assert results is not None, _explain(proc)
    assert flagged == [], json.dumps(flagged, indent=2)


def test_migration_history_should_list_every_migration(shared_db: Database) -> None:
    """`supabase db push` should have recorded each migration file in its history table, and
    each migration should have recorded itself in billing.schema_migrations too."""
    from scripts.bundle_sql import migrations

    expected = ",".join(m.path.stem for m in migrations())
    for table in ("supabase_migrations.schema_migrations", "billing.schema_migrations"):
        versions = shared_db.psql(
            f"select string_agg(version || '_' || name, ',' order by version) from {table}"
        ).strip()
        assert versions == expected, table
