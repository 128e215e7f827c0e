"""Run each pgTAP file in supabase/tests with pg_prove, one pytest test per file.

Every pgTAP file wraps itself in begin/rollback, so all of them share one clone of the template.
They run as role `postgres`, the role `supabase test db` and the SQL editor use, and share the
helpers of the template's `tests` schema (tests/sql/pgtap_helpers.sql: users, Stripe events, the
ledger invariants); the last test checks that its Stripe fixtures are trimmed real payloads.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from scripts.pgcluster import OWNER, ROOT, Database
from tests import stripe_fixtures

PGTAP_DIR = ROOT / "supabase" / "tests"
PGTAP_FILES = sorted(PGTAP_DIR.glob("*.sql"))
if not PGTAP_FILES:
    raise FileNotFoundError(f"no pgTAP files in {PGTAP_DIR}: the suite would run none of them")


def _pg_prove() -> str:
    found = shutil.which("pg_prove") or "/usr/bin/pg_prove"
    if not Path(found).exists():
        pytest.fail("pg_prove is missing: run scripts/bootstrap.sh")
    return found


@pytest.mark.parametrize("path", PGTAP_FILES, ids=[p.name for p in PGTAP_FILES])
def test_pgtap_file(shared_db: Database, path: Path) -> None:
    """Each pgTAP file should pass in full under pg_prove."""
    cluster = shared_db.cluster
    proc = subprocess.run(
        [
            _pg_prove(),
            "--failures",
            "--host",
            cluster.host,
            "--port",
            str(cluster.port),
            "--username",
            OWNER,
            "--dbname",
            shared_db.name,
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
        env=cluster.env(shared_db.name, OWNER),
    )
    output, status = proc.stdout + proc.stderr, proc.returncode
    assert status == 0, f"pg_prove {path.name} exited {status}:\n{output}"
    assert "Result: PASS" in output, f"pg_prove {path.name} did not report PASS:\n{output}"


def _not_in(trimmed: Any, real: Any, path: str = "") -> list[str]:
    """Where `trimmed` holds a field `real` lacks or a value that differs from it."""
    if isinstance(trimmed, dict):
        if not isinstance(real, dict):
            return [f"{path or '.'}: an object where the real payload has {real!r}"]
        return [
            problem
            for key, value in trimmed.items()
            for problem in (
                _not_in(value, real[key], f"{path}.{key}")
                if key in real
                else [f"{path}.{key}: not in the real payload"]
            )
        ]
    if isinstance(trimmed, list):
        if not isinstance(real, list) or len(real) < len(trimmed):
            return [f"{path}: a list of {len(trimmed)} where the real payload has {real!r}"]
        return [p for i, item in enumerate(trimmed) for p in _not_in(item, real[i], f"{path}.{i}")]
    return [] if trimmed == real else [f"{path}: {trimmed!r}, the real payload has {real!r}"]


def test_pgtap_stripe_fixtures_should_be_trimmed_real_payloads(shared_db: Database) -> None:
    """Each fixture tests/sql/pgtap_helpers.sql gives the pgTAP files should keep only fields of
    the vendored payload it is named after, with their values: trimmed, never edited."""
    with shared_db.connect() as conn:
        rows = conn.execute("select name, event from tests.stripe_fixtures order by 1").fetchall()
    assert rows, "tests.stripe_fixtures is empty"
    problems = []
    for name, trimmed in rows:
        real = stripe_fixtures.load(name)
        if real.get("object") != "event":
            # A data-only or bare-object file sits under `data`, as the pgTAP helpers keep it.
            real = {"data": real if isinstance(real.get("object"), dict) else {"object": real}}
        problems += [f"{name} {problem}" for problem in _not_in(trimmed, real)]
    assert problems == [], "\n".join(problems)
