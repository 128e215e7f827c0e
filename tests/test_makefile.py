"""The Makefile: `make help` names every target with a description, and nothing else."""

from __future__ import annotations

import re
import subprocess

from scripts.pgcluster import ROOT

MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")


def _rules() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):(?!=)", MAKEFILE, flags=re.MULTILINE))


def _phony() -> set[str]:
    match = re.search(r"^\.PHONY:((?:.*\\\n)*.*)$", MAKEFILE, flags=re.MULTILINE)
    assert match, "the Makefile has no .PHONY line"
    return set(match.group(1).replace("\\\n", " ").split())


def test_help_should_list_every_target_with_a_description() -> None:
    proc = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    listed = dict(
        line.strip().split(maxsplit=1) for line in proc.stdout.splitlines() if line.startswith("  ")
    )
    assert set(listed) == _rules(), "a target without a `## ` description, or one listed twice"
    assert all(description.strip() for description in listed.values())


def test_every_target_should_be_phony() -> None:
    # None of them makes a file of its name: a stray file `test` must not stop `make test`.
    assert _phony() == _rules()
