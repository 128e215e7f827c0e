"""constraints.txt: every Python dependency pinned, and the venv the tests run in built from it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"


def _name(raw: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", raw).lower()


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pins[_name(name)] = version.strip()
    return pins


# The extras `pip install -e '.[dev]'` installs (dev pulls in server and supabase); `embedded`
# is not among them.
INSTALLED_EXTRAS = ("server", "supabase", "dev")


def _declared() -> list[Requirement]:
    """Every requirement the dev venv installs; the project's own extras (token-billing[...])
    are those extras' requirements, listed already."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    requirements = [
        Requirement(r)
        for r in [*project["dependencies"], *(r for name in INSTALLED_EXTRAS for r in extras[name])]
    ]
    return [r for r in requirements if _name(r.name) != _name(project["name"])]


def test_dev_should_install_every_extra_but_embedded() -> None:
    """`pip install -e '.[dev]'` is what bootstrap.sh and `make lock` install: it must bring the
    server and supabase extras, or their pins would go stale unseen."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pulled: set[str] = set()
    for raw in project["optional-dependencies"]["dev"]:
        requirement = Requirement(raw)
        if _name(requirement.name) == _name(project["name"]):
            pulled |= requirement.extras
    assert pulled == {"server", "supabase"}, f"dev pulls in {sorted(pulled)}"
    assert set(project["optional-dependencies"]) == {*INSTALLED_EXTRAS, "embedded"}


def test_every_declared_dependency_should_be_pinned() -> None:
    """A dependency added to pyproject.toml without `make lock` would install at whatever version
    PyPI has that day, which is how a new release breaks CI on an unchanged commit."""
    pins = _pins()
    unpinned = [str(r) for r in _declared() if _name(r.name) not in pins]
    assert not unpinned, f"not in constraints.txt (run `make lock`): {unpinned}"


def test_each_pin_should_satisfy_pyproject() -> None:
    pins = _pins()
    outside = [
        f"{r.name}=={pins[_name(r.name)]} (pyproject: {r.specifier})"
        for r in _declared()
        if _name(r.name) in pins and not r.specifier.contains(pins[_name(r.name)], prereleases=True)
    ]
    assert not outside, f"pins outside pyproject.toml's ranges (run `make lock`): {outside}"


def test_the_venv_should_hold_the_pinned_versions() -> None:
    """The tests should run on exactly what CI installs (bootstrap.sh installs with -c)."""
    installed = {_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {
        name: (version, installed.get(name))
        for name, version in _pins().items()
        if installed.get(name) != version
    }
    assert not differ, f"pinned vs installed (run `make bootstrap`): {differ}"
