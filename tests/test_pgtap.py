"""Run each pgTAP file in supabase/tests with pg_prove, one pytest test per file.

Every pgTAP file wraps itself in begin/rollback, so all of them share one clone of the template.
They run as role `postgres`, the role `supabase test db` and the SQL editor use.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.pgcluster import OWNER, ROOT, Database

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
