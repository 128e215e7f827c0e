"""Build the SQL that installs token-billing into any project, from supabase/migrations.

Writes, all generated and committed (`--check` fails when one is out of date; the tests run it):

- `sql/token_billing.sql`: the installer of the current version. One `do` block, so it applies
  whole or not at all in any client (the SQL editor, psql, `supabase db push`). It refuses, and
  changes nothing, when the database holds a `billing` schema token-billing did not create, a
  `public` function that would shadow one of ours (unless `token_billing.replace_conflicting` is
  on: then it drops it), or token-billing migrations newer than it knows. Otherwise it runs each
  migration not yet recorded in `billing.schema_migrations`: a fresh install, an upgrade from any
  earlier release, or nothing at all when the database is current.
- `sql/token_billing_uninstall.sql`: removes everything any version made (the schema, the
  functions in `public`, the triggers on `auth.users`, the pg_cron job, the publication
  membership) and nothing else.
- `sql/manifest.json`: the current version's migrations (with their sha256) and every release's.
- `sql/releases/token_billing-<version>.sql`: the installer of each release, frozen by
  `--release VERSION`. A released installer, and every migration a release contains, never
  changes again: `--check` fails when one did.

    python scripts/bundle_sql.py                  # rewrite the generated files
    python scripts/bundle_sql.py --check          # exit 1: a file is stale or a release changed
    python scripts/bundle_sql.py --release 0.1.0  # freeze the current installer as release 0.1.0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "supabase" / "migrations"
SQL = ROOT / "sql"
INSTALLER = SQL / "token_billing.sql"
UNINSTALLER = SQL / "token_billing_uninstall.sql"
MANIFEST = SQL / "manifest.json"
RELEASES = SQL / "releases"

MIGRATION_FILE = re.compile(r"^(?P<version>\d{14})_(?P<name>[a-z0-9_]+)\.sql$")
PUBLIC_FUNCTION = re.compile(
    r"^create (?:or replace )?function public\.(?P<name>[a-z_][a-z0-9_]*)\((?P<args>[^)]*)\)",
    re.MULTILINE,
)
AUTH_TRIGGER = re.compile(
    r"create trigger (?P<name>[a-z_][a-z0-9_]*)\s+(?:after|before)\s[^;]*?\son auth\.users\b",
    re.DOTALL,
)
CRON_JOB = re.compile(r"cron\.schedule\(\s*'(?P<name>[^']+)'")
# Argument modes that are not part of a function's identity.
OUT_MODE = re.compile(r"^out\s", re.IGNORECASE)


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def file_name(self) -> str:
        return self.path.name


def migrations(directory: Path = MIGRATIONS) -> list[Migration]:
    """The migrations in the order the Supabase CLI applies them: by file name."""
    found = []
    for path in sorted(directory.glob("*.sql"), key=lambda p: p.name):
        match = MIGRATION_FILE.match(path.name)
        if not match:
            raise SystemExit(f"{path.name}: migration names are <14-digit timestamp>_<name>.sql")
        found.append(Migration(match["version"], match["name"], path))
    if not found:
        raise SystemExit(f"no migrations in {directory}")
    return found


def footer(migration: Migration) -> str:
    """The statement each migration ends with: it records itself as applied."""
    return (
        "insert into billing.schema_migrations (version, name) values "
        f"('{migration.version}', '{migration.name}');"
    )


def check_footers(found: list[Migration]) -> list[str]:
    problems = []
    for migration in found:
        if not migration.text.rstrip().endswith(footer(migration)):
            problems.append(f"{migration.file_name} must end with: {footer(migration)}")
    return problems


def _split_arguments(args: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in args:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [" ".join(part.split()) for part in parts]


def public_functions(text: str) -> list[str]:
    """`public.name(type, ...)` of every function a migration creates in public, identity
    arguments only (names, defaults and OUT arguments dropped), as `to_regprocedure` reads it."""
    signatures = []
    for match in PUBLIC_FUNCTION.finditer(text):
        types = []
        for argument in _split_arguments(match["args"]):
            if OUT_MODE.match(argument):
                continue
            declared = re.sub(r"\s+default\s.*$", "", argument, flags=re.IGNORECASE)
            declared = re.sub(r"^(in|inout|variadic)\s+", "", declared, flags=re.IGNORECASE)
            words = declared.split()
            types.append(" ".join(words[1:]) if len(words) > 1 else words[0])
        signatures.append(f"public.{match['name']}({', '.join(types)})")
    return signatures


def _project_version() -> str:
    """token_billing.__version__ (pyproject's version is read from it), without importing it."""
    source = (ROOT / "api" / "token_billing" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', source, re.MULTILINE)
    if not match:
        raise SystemExit("api/token_billing/__init__.py has no __version__")
    return match[1]


def _sql_array(values: list[str]) -> str:
    inner = ",\n    ".join("'" + value.replace("'", "''") + "'" for value in values)
    return f"array[\n    {inner}\n  ]::text[]"


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _dollar_tag(migration: Migration) -> str:
    tag = f"$tb_migration_{migration.version}$"
    if tag in migration.text:
        raise SystemExit(f"{migration.file_name} contains {tag}, the installer's quote for it")
    return tag


TEMPLATES = ROOT / "scripts" / "templates"


def _fill(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    if "{{" in text:
        raise SystemExit(f"{template}: a placeholder was left unfilled")
    return text


def render_installer(version: str, found: list[Migration], known: list[str]) -> str:
    """The installer's full text; a pure function of the migrations and the known signatures."""
    ours = _unique([s for m in found for s in public_functions(m.text)])
    names = _unique([s.split("(")[0].removeprefix("public.") for s in ours])
    blocks = []
    for migration in found:
        tag = _dollar_tag(migration)
        blocks.append(
            "\n".join(
                [
                    f"  -- {migration.file_name}",
                    f"  if v_installed is null or '{migration.version}' <> all(v_installed) then",
                    f"    execute {tag}",
                    migration.text.strip("\n"),
                    f"{tag};",
                    "    v_applied := v_applied + 1;",
                    "  end if;",
                ]
            )
        )
    return _fill(
        "installer.sql",
        {
            "version": version,
            "migration_list": "\n".join(f"--   {m.file_name}" for m in found),
            "migration_versions": _sql_array([m.version for m in found]),
            "known_functions": _sql_array(known),
            "function_names": _sql_array(names),
            "migrations": "\n\n".join(blocks),
        },
    )


def render_uninstaller(known: list[str], triggers: list[str], cron_jobs: list[str]) -> str:
    return _fill(
        "uninstaller.sql",
        {
            "known_functions": _sql_array(known),
            "triggers": _sql_array(triggers),
            "cron_jobs": _sql_array(cron_jobs),
        },
    )


def _read_manifest() -> dict[str, object]:
    if MANIFEST.exists():
        data: dict[str, object] = json.loads(MANIFEST.read_text(encoding="utf-8"))
        return data
    return {"releases": {}}


def _entries(found: list[Migration]) -> list[dict[str, str]]:
    return [{"version": m.version, "name": m.name, "sha256": m.sha256} for m in found]


def render_all(found: list[Migration], manifest: dict[str, object]) -> dict[Path, str]:
    """Every generated file's path and text."""
    releases = manifest.get("releases", {})
    # Signatures of every version: the released migrations are the current files (they never
    # change), so the current files hold them all, as long as no migration is ever deleted.
    known = _unique([s for m in found for s in public_functions(m.text)])
    triggers = _unique([t["name"] for m in found for t in AUTH_TRIGGER.finditer(m.text)])
    cron_jobs = _unique([j["name"] for m in found for j in CRON_JOB.finditer(m.text)])
    version = _project_version()
    current = {
        "version": version,
        "migrations": _entries(found),
        "functions": _unique([s for m in found for s in public_functions(m.text)]),
        "triggers": triggers,
        "cron_jobs": cron_jobs,
    }
    text = json.dumps({"current": current, "releases": releases}, indent=2) + "\n"
    return {
        INSTALLER: render_installer(version, found, known),
        UNINSTALLER: render_uninstaller(known, triggers, cron_jobs),
        MANIFEST: text,
    }


def check_releases(found: list[Migration], manifest: dict[str, object]) -> list[str]:
    """A released installer, and every migration of a release, must never change."""
    problems = []
    by_version = {m.version: m for m in found}
    releases: dict[str, Any] = manifest.get("releases", {})  # type: ignore[assignment]
    for release, entry in releases.items():
        path = RELEASES / f"token_billing-{release}.sql"
        if not path.exists():
            problems.append(f"release {release}: {path.relative_to(ROOT)} is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            problems.append(f"release {release}: {path.relative_to(ROOT)} changed after release")
        for migration in entry["migrations"]:
            current = by_version.get(migration["version"])
            if current is None:
                problems.append(f"release {release}: migration {migration['version']} is gone")
            elif current.sha256 != migration["sha256"] or current.name != migration["name"]:
                problems.append(
                    f"release {release}: {current.file_name} changed after release; ship the fix "
                    "as a new migration"
                )
    return problems


def release(version: str, found: list[Migration], manifest: dict[str, object]) -> None:
    releases: dict[str, Any] = manifest.setdefault("releases", {})  # type: ignore[assignment]
    if version in releases:
        raise SystemExit(f"release {version} exists already: a released file never changes")
    if _project_version() != version:
        raise SystemExit(f"token_billing.__version__ is {_project_version()}, not {version}")
    installer = render_all(found, manifest)[INSTALLER]
    RELEASES.mkdir(parents=True, exist_ok=True)
    path = RELEASES / f"token_billing-{version}.sql"
    path.write_text(installer, encoding="utf-8")
    releases[version] = {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "migrations": _entries(found),
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"released {version}: {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a generated file is out of date"
    )
    parser.add_argument("--release", metavar="VERSION", help="freeze the installer as VERSION")
    args = parser.parse_args(argv)
    found = migrations()
    problems = check_footers(found)
    manifest = _read_manifest()
    if args.release:
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        release(args.release, found, manifest)
        manifest = _read_manifest()
    problems += check_releases(found, manifest)
    stale = []
    for path, text in render_all(found, manifest).items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(f"{path.relative_to(ROOT)} is out of date: run `make bundle`")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if problems or stale:
        print("\n".join(problems + stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
