"""A/B: one bench script against the migrations of a git ref and of the working tree.

    .venv/bin/python -m bench.ab --base main --script reserve_settle --rounds 8 --seconds 4

Both sets of migrations are applied to two databases of one throwaway cluster (the ref's
`supabase/` taken with `git archive`), loaded with the bench fixtures, and the script runs
against each in turn, in rounds whose order flips, so both sides see the same machine at nearly
the same moment. It prints each round's tps and the ratio (working tree / base), then the
medians: on a shared, noisy machine the ratio of neighbours is what holds.

    .venv/bin/python -m bench.ab --script deduct_thresholds --versus deduct --rounds 8

With `--versus`, both scripts run against the working tree's database instead (no ref): the
ratio is --script over --versus.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.pgbench import run_script
from bench.run import ACCOUNTS, SETTINGS, load_references
from scripts.pgcluster import OWNER, ROOT, PgCluster, build_template, temporary_cluster


def load(
    cluster: PgCluster, dbname: str, workdir: Path, variants: list[Path] | None = None
) -> None:
    template = f"{dbname}_template"
    build_template(
        cluster, template, workdir=workdir, extensions=(), as_template=False, pgtap_helpers=None
    )
    for variant in variants or []:
        cluster.psql(template, file=variant, user=OWNER)
    cluster.mark_template(template)
    cluster.create_database(dbname, template=template)
    # The references and fixtures `make bench` loads, the reservations' among them.
    load_references(cluster, dbname, reservations=True)


def export(ref: str, into: Path) -> None:
    """The ref's supabase/ directory (migrations, config, seed) under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "supabase"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git ref to compare against (main)")
    parser.add_argument("--script", default="reserve_settle", help="bench/scripts/<name>.sql")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--accounts",
        choices=sorted(ACCOUNTS),
        default="10k",
        help="the accounts a script draws from (-D first, last; default 10k)",
    )
    parser.add_argument(
        "--versus",
        help="another bench/scripts/<name>.sql to compare --script with, both on the working tree",
    )
    parser.add_argument(
        "--variant",
        type=Path,
        action="append",
        default=[],
        help="SQL applied to the tree's database after its migrations (repeatable)",
    )
    ns = parser.parse_args(argv)
    first, last = ACCOUNTS[ns.accounts]

    with (
        tempfile.TemporaryDirectory(prefix="tb-ab-") as tmp,
        temporary_cluster(**SETTINGS) as cluster,
    ):
        if ns.versus:
            load(cluster, "ab_tree", ROOT, ns.variant)
        else:
            export(ns.base, Path(tmp))
            load(cluster, "ab_base", Path(tmp))
            load(cluster, "ab_tree", ROOT, ns.variant)
        # With --versus, "base" is the other script on the same database.
        scripts = {"ab_base": ns.versus or ns.script, "ab_tree": ns.script}
        databases = {"ab_base": "ab_tree" if ns.versus else "ab_base", "ab_tree": "ab_tree"}
        ratios: list[float] = []
        tps: dict[str, list[float]] = {"ab_base": [], "ab_tree": []}
        for index in range(ns.rounds):
            order = ["ab_base", "ab_tree"] if index % 2 == 0 else ["ab_tree", "ab_base"]
            got = {}
            for dbname in order:
                run = run_script(
                    cluster,
                    databases[dbname],
                    scripts[dbname],
                    clients=ns.clients,
                    seconds=ns.seconds,
                    defines={"first": first, "last": last},
                )
                got[dbname] = run.tps
                tps[dbname].append(run.tps)
            ratios.append(got["ab_tree"] / got["ab_base"])
            print(
                f"round {index + 1}: base {got['ab_base']:,.0f} tps, tree {got['ab_tree']:,.0f} "
                f"tps, ratio {ratios[-1]:.3f}",
                flush=True,
            )
        print(
            f"{ns.script}, {ns.clients} clients, {ns.rounds} rounds of {ns.seconds:g} s: "
            f"base ({ns.versus or ns.base}) median {statistics.median(tps['ab_base']):,.0f} tps, "
            f"tree median {statistics.median(tps['ab_tree']):,.0f} tps, "
            f"ratio median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
