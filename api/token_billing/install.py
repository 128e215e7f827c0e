"""Install, upgrade and uninstall token-billing in a host project.

The SQL is generated from supabase/migrations by scripts/bundle_sql.py and shipped in the
package: the installer `token_billing.sql` (one `do` block that refuses a foreign `billing`
schema or shadowing `public` functions, then applies every migration the database does not have
yet) and `token_billing_uninstall.sql`. Two ways to run it:

- into a host's Supabase CLI project: `write_migration()` writes the installer as a *new*
  migration, timestamped after the host's newest one, so `supabase db push` applies it after the
  host's own history (the CLI refuses files dated before the last applied migration);
- straight into a database: `apply()` runs it in one transaction.

Standard library and psycopg only: no server dependency.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

INSTALLER = "token_billing.sql"
UNINSTALLER = "token_billing_uninstall.sql"
MANIFEST = "manifest.json"

# A migration this module wrote into a host project: `<timestamp>_token_billing_<version>.sql`.
HOST_MIGRATION = re.compile(r"^(?P<stamp>\d{14})_token_billing_(?P<what>[a-z0-9_]+)\.sql$")
ANY_MIGRATION = re.compile(r"^(?P<stamp>\d+)_.+\.sql$")
LISTED_MIGRATION = re.compile(r"^--   (?P<version>\d{14})_[a-z0-9_]+\.sql$", re.MULTILINE)
STAMP_FORMAT = "%Y%m%d%H%M%S"


class InstallError(Exception):
    """The install, upgrade or uninstall cannot go ahead; the message says why."""


def sql_dir() -> Traversable:
    """Where the generated SQL is: inside the installed package, or `sql/` of a source checkout
    (an editable install)."""
    packaged = resources.files("token_billing").joinpath("sql")
    if packaged.is_dir() and packaged.joinpath(INSTALLER).is_file():
        return packaged
    source = Path(__file__).resolve().parents[2] / "sql"
    if (source / INSTALLER).is_file():
        return source
    raise InstallError("the token-billing SQL is missing from this installation")


def installer_sql() -> str:
    return sql_dir().joinpath(INSTALLER).read_text(encoding="utf-8")


def uninstaller_sql() -> str:
    return sql_dir().joinpath(UNINSTALLER).read_text(encoding="utf-8")


@cache
def manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sql_dir().joinpath(MANIFEST).read_text(encoding="utf-8"))
    return data


def current_version() -> str:
    return str(manifest()["current"]["version"])


def expected_migrations() -> list[str]:
    """The migration versions the current installer contains, in order."""
    return [str(m["version"]) for m in manifest()["current"]["migrations"]]


def releases() -> dict[str, list[str]]:
    """Each release and the migration versions it contains."""
    return {
        version: [str(m["version"]) for m in entry["migrations"]]
        for version, entry in manifest()["releases"].items()
    }


def installed_release(applied: Sequence[str]) -> str | None:
    """The newest release every migration of which is applied, or None."""
    have = set(applied)
    found = None
    for version, versions in releases().items():
        if set(versions) <= have:
            found = version
    return found


@dataclass(frozen=True)
class Choices:
    """Install choices, read by the first install only (billing.settings); None: the default."""

    signup_grant: int | None = None
    grant_existing_users: bool | None = None
    grant_anonymous_users: bool | None = None
    replace_conflicting: bool = False
    # Uninstall only: the ledger may be dropped with everything else (export it first).
    drop_ledger: bool = False

    def settings(self) -> dict[str, str]:
        values: dict[str, str] = {}
        if self.signup_grant is not None:
            if not 0 <= self.signup_grant <= 10**15:
                raise InstallError(
                    f"the signup grant must be from 0 to 10^15 tokens, got {self.signup_grant}"
                )
            values["signup_grant"] = str(self.signup_grant)
        if self.grant_existing_users is not None:
            values["grant_existing_users"] = "on" if self.grant_existing_users else "off"
        if self.grant_anonymous_users is not None:
            values["grant_anonymous_users"] = "on" if self.grant_anonymous_users else "off"
        if self.replace_conflicting:
            values["replace_conflicting"] = "on"
        if self.drop_ledger:
            values["confirm_uninstall"] = "drop-ledger"
        return values

    def prelude(self) -> str:
        """`set_config` statements for the installer, local to the migration's transaction."""
        return "".join(
            f"select pg_catalog.set_config('token_billing.{name}', '{value}', true);\n"
            for name, value in self.settings().items()
        )


def render_migration(choices: Choices | None = None, *, uninstall: bool = False) -> str:
    """The text of a host migration that installs (or upgrades to) this version, or uninstalls."""
    choices = choices or Choices()
    if uninstall:
        head = (
            f"-- token-billing {current_version()} uninstall, written by `token-billing "
            "uninstall`.\n"
        )
        return head + choices.prelude() + "\n" + uninstaller_sql()
    head = (
        f"-- token-billing {current_version()}, written by `token-billing install`: the installer "
        "(sql/token_billing.sql)\n-- with the install choices below. Apply it with `supabase db "
        "push`; never edit it.\n"
    )
    return head + choices.prelude() + "\n" + installer_sql()


@dataclass
class Written:
    """What `write_migration` did."""

    path: Path | None
    message: str
    previous: list[Path] = field(default_factory=list)


def _host_migrations(directory: Path) -> list[Path]:
    return sorted(
        (p for p in directory.glob("*.sql") if ANY_MIGRATION.match(p.name)), key=lambda p: p.name
    )


def _next_stamp(existing: list[Path], now: datetime) -> str:
    """Now, or one second after the newest migration when that is later (a host may date its
    migrations ahead): `supabase db push` refuses a file older than the last one applied."""
    stamp = now.astimezone(UTC).strftime(STAMP_FORMAT)
    if existing:
        newest = max(ANY_MIGRATION.match(p.name)["stamp"] for p in existing)  # type: ignore[index]
        if len(newest) == 14 and newest >= stamp:
            following = datetime.strptime(newest, STAMP_FORMAT).replace(tzinfo=UTC)
            stamp = (following + timedelta(seconds=1)).strftime(STAMP_FORMAT)
    return stamp


def _listed(text: str) -> set[str]:
    return set(LISTED_MIGRATION.findall(text))


def write_migration(
    directory: Path,
    choices: Choices | None = None,
    *,
    uninstall: bool = False,
    now: datetime | None = None,
) -> Written:
    """Write the install (or upgrade, or uninstall) migration into a host's migrations folder.

    Installs: nothing is written when a token-billing migration already there has every
    migration of this version; a folder holding migrations this version does not know (a newer
    release was installed) is refused.
    """
    if not directory.is_dir():
        raise InstallError(f"{directory} is not a directory (the Supabase CLI's migrations folder)")
    existing = _host_migrations(directory)
    ours = [p for p in existing if HOST_MIGRATION.match(p.name)]
    want = set(expected_migrations())
    if not uninstall and ours:
        latest = ours[-1]
        have = _listed(latest.read_text(encoding="utf-8"))
        if HOST_MIGRATION.match(latest.name)["what"] == "uninstall":  # type: ignore[index]
            have = set()
        unknown = sorted(have - want)
        if unknown:
            raise InstallError(
                f"{latest} installs token-billing migrations this package does not know "
                f"({', '.join(unknown)}): it came from a newer release than {current_version()}"
            )
        if want <= have:
            return Written(
                None,
                f"token-billing {current_version()} is already installed by {latest}: "
                "nothing to write",
                ours,
            )
    stamp = _next_stamp(existing, now or datetime.now(UTC))
    what = "uninstall" if uninstall else re.sub(r"[^a-z0-9]+", "_", current_version().lower())
    path = directory / f"{stamp}_token_billing_{what}.sql"
    path.write_text(render_migration(choices, uninstall=uninstall), encoding="utf-8")
    verb = "uninstalls" if uninstall else ("upgrades to" if ours else "installs")
    return Written(
        path,
        f"wrote {path}: it {verb} token-billing {current_version()} on `supabase db push`",
        ours,
    )


def apply(dsn: str, choices: Choices | None = None, *, uninstall: bool = False) -> list[str]:
    """Run the installer (or the uninstaller) against a database in one transaction; the
    server's notices (what was applied) are returned. Connect as the role that owns the
    project's schema (postgres on Supabase)."""
    import psycopg

    notices: list[str] = []
    text = render_migration(choices, uninstall=uninstall)
    try:
        with psycopg.connect(dsn, autocommit=False) as conn:
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            conn.execute(text)
            conn.commit()
    except psycopg.Error as exc:
        diag = exc.diag
        message = diag.message_primary or str(exc)
        hint = f"\nhint: {diag.message_hint}" if diag.message_hint else ""
        raise InstallError(f"{message}{hint}") from exc
    return notices
