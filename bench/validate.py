"""Check a proposed SQL change against the project's pgTAP suite before benching it.

    python -m bench.validate path/to/change.sql

Builds a throwaway cluster, applies the migrations and seed (Supabase CLI), then the variant
files as `postgres`, and runs every supabase/tests/*.sql file with pg_prove, as the test suite
does. Exits non-zero when a file fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from scripts.pgcluster import OWNER, ROOT, build_template, temporary_cluster

DB = "tb_validate"


def main(argv: list[str] | None = None) -> int:
    variants = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    pg_prove = shutil.which("pg_prove") or "/usr/bin/pg_prove"
    failed: list[str] = []
    with temporary_cluster() as cluster:
        build_template(cluster, DB, as_template=False)
        for variant in variants:
            cluster.psql(DB, file=variant, user=OWNER)
        for path in sorted((ROOT / "supabase" / "tests").glob("*.sql")):
            proc = subprocess.run(
                [pg_prove, "--failures", str(path)],
                capture_output=True,
                text=True,
                check=False,
                env=cluster.env(DB, OWNER),
            )
            passed = proc.returncode == 0 and "Result: PASS" in proc.stdout + proc.stderr
            print(f"{'ok  ' if passed else 'FAIL'} {path.name}")
            if not passed:
                failed.append(path.name)
                print(proc.stdout[-4000:] + proc.stderr[-2000:])
        invariants = cluster.psql(DB, "select count(*) from billing.check_invariants()").strip()
        print(f"check_invariants after the suite: {invariants} violations")
    print("validate: " + ("FAILED: " + ", ".join(failed) if failed else "all pgTAP files pass"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
