"""Installing into the Supabase projects teams really have: install, re-install, upgrade, uninstall.

Each host shape is a database the way a team's project looks before token-billing arrives: a
fresh project; an app with its own `profiles` table, signup trigger, publication member and
users; the tutorial's `deduct_tokens`/`add_tokens` left in `public`; a `billing` schema of the
host's own; 50,000 users; a Supabase CLI project whose migrations are dated after ours, with a
pg_cron job. For each, the catalog (tests/catalog.py) is compared before and after: an install
adds only token-billing's objects and changes nothing of the host's, a second install changes
nothing, and an uninstall leaves exactly the catalog the host had before.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from scripts import bundle_sql
from scripts.pgcluster import OWNER, ROOT, Database, PgCluster, run_supabase
from tests.catalog import diff, snapshot
from tests.conftest import create_cron_database
from token_billing import install

RELEASE_0_1_0 = ROOT / "sql" / "releases" / "token_billing-0.1.0.sql"

PROFILES_APP = """
create table public.profiles (
  id uuid primary key references auth.users (id) on delete cascade,
  display_name text,
  tokens integer not null default 100
);
alter table public.profiles enable row level security;
create policy profiles_select_own on public.profiles for select to authenticated
using (id = (select auth.uid()));
create function public.handle_new_user() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  insert into public.profiles (id) values (new.id);
  return new;
end;
$$;
create trigger on_auth_user_created after insert on auth.users
for each row execute function public.handle_new_user();
alter publication supabase_realtime add table public.profiles;
insert into auth.users (id, email) values
  ('00000000-0000-0000-0000-0000000ba001', 'ada@example.com'),
  ('00000000-0000-0000-0000-0000000ba002', 'grace@example.com');
"""

# The monetization tutorial's functions, as teams leave them: security definer in public, so
# Supabase's default privileges make them executable by anon.
TUTORIAL = (
    PROFILES_APP
    + """
create function public.deduct_tokens(p_user_id uuid, p_amount integer, p_reason text)
returns boolean language plpgsql security definer as $$
begin
  update public.profiles set tokens = tokens - p_amount where id = p_user_id and tokens >= p_amount;
  return found;
end;
$$;
create function public.add_tokens(p_user_id uuid, p_amount integer)
returns void language plpgsql security definer as $$
begin
  update public.profiles set tokens = tokens + p_amount where id = p_user_id;
end;
$$;
"""
)

FOREIGN_BILLING = """
create schema billing;
create table billing.products (id serial primary key, name text not null);
insert into billing.products (name) values ('a host product');
grant usage on schema billing to anon, authenticated;
grant select on billing.products to anon, authenticated;
"""

HOSTS = {"fresh": "", "profiles_app": PROFILES_APP}

OUR_TRIGGERS = ("tg_users__50_open_billing_account", "tg_users__51_grant_linked_billing_account")
OUR_FUNCTIONS = tuple(
    sorted(
        {
            signature.split("(")[0].removeprefix("public.")
            for migration in bundle_sql.migrations()
            for signature in bundle_sql.public_functions(migration.text)
        }
    )
)


def _ours(line: str) -> bool:
    """Whether a catalog line describes an object token-billing makes."""
    return (
        "billing." in line
        or line.startswith("schema billing ")
        or any(line.startswith(f"function public.{name}(") for name in OUR_FUNCTIONS)
        or any(trigger in line for trigger in OUR_TRIGGERS)
        or "token-billing-expire" in line
    )


def _assert_only_ours_added(before: set[str], after: set[str]) -> None:
    assert before - after == set(), "the install changed or removed host objects:\n" + diff(
        before, after
    )
    foreign = sorted(line for line in after - before if not _ours(line))
    assert foreign == [], "the install added objects that are not token-billing's:\n" + "\n".join(
        foreign
    )


@pytest.fixture
def new_host(pg_cluster: PgCluster) -> Iterator[Callable[[str], Database]]:
    """Make databases shaped like a Supabase project (compat layer, then the host's own SQL run
    as postgres); all dropped after the test."""
    made: list[str] = []

    def make(host_sql: str) -> Database:
        name = f"tb_host_{uuid.uuid4().hex[:12]}"
        pg_cluster.apply_compat("postgres")
        pg_cluster.create_database(name)
        pg_cluster.apply_compat(name)
        made.append(name)
        db = Database(pg_cluster, name)
        if host_sql:
            db.psql(host_sql, user=OWNER)
        return db

    yield make
    for name in made:
        pg_cluster.drop_database(name)


def _run_installer(db: Database, settings: str = "") -> str:
    """The SQL editor's way: the installer file as role postgres, in one session."""
    text = settings + install.installer_sql()
    with db.connect(OWNER, autocommit=False) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute(text)
        conn.commit()
    return "\n".join(notices)


def _uninstall(db: Database) -> None:
    install.apply(db.dsn(OWNER), install.Choices(drop_ledger=True), uninstall=True)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The `token-billing` command, as a host runs it from its project directory."""
    return subprocess.run(
        [sys.executable, "-m", "token_billing.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=120,
    )


# --- the generated SQL ---------------------------------------------------------------------------


def test_generated_sql_should_be_up_to_date_and_releases_unchanged() -> None:
    """sql/ should equal what scripts/bundle_sql.py renders; no released file may have changed."""
    assert bundle_sql.main(["--check"]) == 0, "run `make bundle` (see stderr above)"


def test_every_migration_should_record_itself() -> None:
    assert bundle_sql.check_footers(bundle_sql.migrations()) == []


def test_0_1_0_should_be_released_and_frozen() -> None:
    manifest = json.loads((ROOT / "sql" / "manifest.json").read_text())
    assert "0.1.0" in manifest["releases"]
    assert RELEASE_0_1_0.exists()
    assert bundle_sql.check_releases(bundle_sql.migrations(), manifest) == []


def test_installer_should_build_what_supabase_db_push_builds(
    new_host: Callable[[str], Database], tmp_path: Path
) -> None:
    """Both ways in (the installer, the repository's own `supabase db push`) should make the
    same catalog."""
    pasted, pushed = new_host(""), new_host("")
    _run_installer(pasted)
    project = tmp_path / "project"
    (project / "supabase").mkdir(parents=True)
    shutil.copytree(ROOT / "supabase" / "migrations", project / "supabase" / "migrations")
    shutil.copy(ROOT / "supabase" / "config.toml", project / "supabase" / "config.toml")
    run_supabase("db", "push", f"--remote={pushed.dsn(OWNER)}", "--yes", workdir=project)
    assert diff(snapshot(pushed), snapshot(pasted)) == ""


# --- host shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_install_reinstall_uninstall_should_touch_only_our_objects(
    new_host: Callable[[str], Database], host: str
) -> None:
    db = new_host(HOSTS[host])
    before = snapshot(db)

    notices = _run_installer(db)
    assert f"token-billing {install.current_version()}: applied" in notices
    installed = snapshot(db)
    _assert_only_ours_added(before, installed)

    # Users of the host that existed before: accounts, but no grant by default.
    rows = db.psql("select count(*), coalesce(sum(balance), 0) from billing.accounts").strip()
    users = db.psql("select count(*) from auth.users").strip()
    assert rows == f"{users}|0"
    assert db.psql("select count(*) from billing.check_invariants()").strip() == "0"

    assert "already installed, nothing to do" in _run_installer(db)
    assert diff(installed, snapshot(db)) == "", "a second install should change nothing"

    # New signups now get accounts and the grant; the host's own trigger keeps working.
    db.create_user("00000000-0000-0000-0000-0000000ba0ff")
    assert (
        db.psql(
            "select balance from billing.accounts "
            "where user_id = '00000000-0000-0000-0000-0000000ba0ff'"
        ).strip()
        == "100"
    )

    _uninstall(db)
    assert diff(before, snapshot(db)) == "", "uninstall should leave the host as it was"


def test_foreign_billing_schema_should_be_refused_and_left_alone(
    new_host: Callable[[str], Database],
) -> None:
    db = new_host(FOREIGN_BILLING)
    before = snapshot(db)
    with pytest.raises(psycopg.Error) as caught:
        _run_installer(db)
    assert caught.value.sqlstate == "TBINS"
    assert "schema billing already exists and was not created by token-billing" in str(caught.value)
    assert "products" in str(caught.value), "the message should name what the schema holds"
    assert diff(before, snapshot(db)) == ""
    with db.as_anon() as conn:
        assert conn.execute("select name from billing.products").fetchall() == [("a host product",)]

    with pytest.raises(install.InstallError, match="not created by token-billing"):
        _uninstall(db)
    assert diff(before, snapshot(db)) == ""


def test_tutorial_functions_should_be_refused_or_replaced_on_request(
    new_host: Callable[[str], Database],
) -> None:
    db = new_host(TUTORIAL)
    before = snapshot(db)
    with pytest.raises(psycopg.Error) as caught:
        _run_installer(db)
    message = str(caught.value)
    assert caught.value.sqlstate == "TBINS"
    assert "add_tokens(uuid,integer)" in message.replace(" ", "")
    assert "deduct_tokens(uuid,integer,text)" in message.replace(" ", "")
    assert diff(before, snapshot(db)) == "", "a refused install should change nothing"

    notices = _run_installer(
        db, "select set_config('token_billing.replace_conflicting', 'on', false);\n"
    )
    assert "droppeddeduct_tokens(uuid,integer,text)" in notices.replace(" ", "")
    # The README's example now runs token-billing's deduct_tokens, not the tutorial's.
    user = "00000000-0000-0000-0000-0000000ba001"
    with db.connect(OWNER) as conn:
        conn.execute("update billing.settings set signup_grant = 100")
        conn.execute("select billing.grant_signup(%s, false)", [user])
    with db.as_service_role() as conn:
        row = conn.execute(
            "select status, balance from public.deduct_tokens(%s, 10, gen_random_uuid()::text)",
            [user],
        ).fetchone()
    assert row == ("applied", 90)
    with db.as_anon() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from public.add_tokens(%s, 1000, 'mint')", [user])

    _uninstall(db)
    replaced = {line for line in before if line.startswith("function public.")}
    replaced = {line for line in replaced if "add_tokens(" in line or "deduct_tokens(" in line}
    assert len(replaced) == 2
    assert diff(before - replaced, snapshot(db)) == "", (
        "uninstall should leave the host as it was, less the two functions it asked us to replace"
    )


def test_a_newer_install_should_be_refused(new_host: Callable[[str], Database]) -> None:
    db = new_host("")
    _run_installer(db)
    db.psql(
        "insert into billing.schema_migrations (version, name) values ('29991231235959', 'later')"
    )
    before = snapshot(db)
    with pytest.raises(psycopg.Error, match="installed by a newer release"):
        _run_installer(db)
    assert diff(before, snapshot(db)) == ""


def test_a_failure_midway_should_leave_nothing_behind(new_host: Callable[[str], Database]) -> None:
    """The install is one transaction: a failure in its last migration leaves no trace."""
    db = new_host("")
    before = snapshot(db)
    db.psql(
        "create function public.refuse_triggers() returns event_trigger language plpgsql as $$ "
        "begin raise exception 'no triggers today'; end $$; "
        "create event trigger refuse_triggers on ddl_command_end when tag in ('CREATE TRIGGER') "
        "execute function public.refuse_triggers();"
    )
    with_trap = snapshot(db)
    with pytest.raises(psycopg.Error, match="no triggers today"):
        _run_installer(db)
    assert diff(with_trap, snapshot(db)) == ""
    db.psql("drop event trigger refuse_triggers; drop function public.refuse_triggers();")
    assert diff(before, snapshot(db)) == ""


def test_existing_users_should_get_the_grant_only_when_chosen(
    new_host: Callable[[str], Database],
) -> None:
    db = new_host(PROFILES_APP)
    db.psql(
        "insert into auth.users (id, is_anonymous) "
        "values ('00000000-0000-0000-0000-0000000ba003', true)"
    )
    install.apply(db.dsn(OWNER), install.Choices(signup_grant=40, grant_existing_users=True))
    rows = db.psql(
        "select a.user_id, a.balance from billing.accounts as a order by a.user_id"
    ).split()
    assert rows == [
        "00000000-0000-0000-0000-0000000ba001|40",
        "00000000-0000-0000-0000-0000000ba002|40",
        "00000000-0000-0000-0000-0000000ba003|0",  # anonymous: the grant waits for a link
    ]
    # The choices are kept; a second install with other choices changes nothing.
    install.apply(db.dsn(OWNER), install.Choices(signup_grant=0, grant_existing_users=False))
    assert db.psql("select signup_grant, grant_existing_users from billing.settings").strip() == (
        "40|t"
    )
    with pytest.raises(install.InstallError, match="signup grant must be from 0"):
        install.Choices(signup_grant=-1).prelude()
    with pytest.raises(psycopg.Error, match=r"token_billing\.signup_grant must be an integer"):
        _run_installer(
            new_host(""), "select set_config('token_billing.signup_grant', 'lots', false);"
        )


def test_fifty_thousand_users_install_without_blocking_signups_for_long(
    new_host: Callable[[str], Database],
) -> None:
    """A project with 50,000 users: every user gets an account (and here the grant), signups
    during the install all get theirs too, and the time a signup waited is reported."""
    db = new_host("")
    db.psql(
        "insert into auth.users (id, email) "
        "select gen_random_uuid(), 'user' || g || '@example.com' from generate_series(1, 50000) g"
    )
    waits: list[float] = []
    stop = threading.Event()

    def sign_up() -> None:
        with db.connect(OWNER) as conn:
            while not stop.is_set():
                started = time.monotonic()
                conn.execute(
                    "insert into auth.users (id, email) values (gen_random_uuid(), 'late@x')"
                )
                waits.append(time.monotonic() - started)
                time.sleep(0.01)

    signups = threading.Thread(target=sign_up)
    signups.start()
    try:
        started = time.monotonic()
        install.apply(db.dsn(OWNER), install.Choices(signup_grant=25, grant_existing_users=True))
        seconds = time.monotonic() - started
        time.sleep(0.2)
    finally:
        stop.set()
        signups.join()
    users, accounts, granted = (
        db.psql(
            "select (select count(*) from auth.users), (select count(*) from billing.accounts), "
            "(select count(*) from billing.ledger_entries where kind = 'signup')"
        )
        .strip()
        .split("|")
    )
    assert users == accounts, "every user should have an account"
    assert int(users) >= 50000 + len(waits)
    assert granted == users, "every user, old or new, should have had the grant exactly once"
    assert db.psql("select count(*) from billing.check_invariants()").strip() == "0"
    print(
        f"\ninstall figures: 50,000 users installed with grants in {seconds:.1f}s; "
        f"{len(waits)} concurrent signups, longest wait {max(waits):.2f}s"
    )


# --- upgrades ---------------------------------------------------------------------------------


def _fill(db: Database) -> dict[str, str]:
    """Balances, a pending hold, a credited Stripe payment and a parked event: what an upgrade
    must keep."""
    user = "00000000-0000-0000-0000-0000000ba001"
    db.psql(
        "insert into billing.products (code, kind, name, tokens, price_cents) "
        "values ('pack_100', 'pack', '100 tokens', 100, 500)"
    )
    event = {
        "id": "evt_upgrade_1",
        "object": "event",
        "type": "checkout.session.completed",
        "created": 1764000000,
        "livemode": False,
        "data": {
            "object": {
                "id": "cs_upgrade_1",
                "object": "checkout.session",
                "mode": "payment",
                "payment_status": "paid",
                "status": "complete",
                "client_reference_id": user,
                "customer": None,
                "payment_intent": "pi_upgrade_1",
                "amount_total": 500,
                "currency": "usd",
                "metadata": {"user_id": user, "product": "pack_100", "quantity": "1"},
            }
        },
    }
    parked = {**event, "id": "evt_upgrade_2", "type": "charge.refunded"}
    parked["data"] = {
        "object": {
            "id": "ch_unknown",
            "object": "charge",
            "payment_intent": "pi_unknown",
            "amount": 500,
            "amount_refunded": 500,
            "refunded": True,
        }
    }
    with db.as_service_role() as conn:
        conn.execute("select public.add_tokens(%s, 50, 'gift-1', 'promotion')", [user])
        conn.execute("select public.deduct_tokens(%s, 30, 'use-1')", [user])
        conn.execute("select public.reserve_tokens(%s, 20, 'hold-1', interval '7 days')", [user])
        for e in (event, parked):
            conn.execute("select public.handle_stripe_event(%s::jsonb)", [json.dumps(e)])
    return {
        "accounts": db.psql("select user_id, balance, reserved from billing.accounts order by 1"),
        "entries": db.psql(
            "select id, user_id, amount, kind from billing.ledger_entries order by 1"
        ),
        "holds": db.psql("select id, status, amount from billing.reservations order by 1"),
        "events": db.psql("select id, status from billing.stripe_events order by 1"),
    }


def test_upgrade_from_0_1_0_should_keep_the_data_and_match_a_fresh_install(
    new_host: Callable[[str], Database],
) -> None:
    old = new_host(PROFILES_APP)
    old.psql(file=RELEASE_0_1_0, user=OWNER)
    kept = _fill(old)
    assert (
        install.installed_release(old.psql("select version from billing.schema_migrations").split())
        == "0.1.0"
    )

    _run_installer(old)
    assert old.psql("select count(*) from billing.check_invariants()").strip() == "0"
    for what, rows in kept.items():
        now = {
            "accounts": "select user_id, balance, reserved from billing.accounts order by 1",
            "entries": "select id, user_id, amount, kind from billing.ledger_entries order by 1",
            "holds": "select id, status, amount from billing.reservations order by 1",
            "events": "select id, status from billing.stripe_events order by 1",
        }[what]
        assert old.psql(now) == rows, f"the upgrade should keep {what}"
    applied = old.psql("select version from billing.schema_migrations order by 1").split()
    assert applied == install.expected_migrations()

    fresh = new_host(PROFILES_APP)
    _run_installer(fresh)
    assert diff(snapshot(fresh), snapshot(old)) == "", (
        "an upgraded database should have exactly the schema of a fresh install"
    )


# --- a Supabase CLI project with newer migrations and pg_cron -----------------------------------

HOST_MIGRATION = "20990101000000_host_profiles.sql"


def test_install_into_a_cli_project_with_newer_migrations(
    cron_cluster: PgCluster, tmp_path: Path
) -> None:
    """`token-billing install --migrations-dir` writes a migration dated after the host's
    newest, so `supabase db push` applies it (a file dated before the last applied migration
    would be refused); a second run writes nothing; an uninstall migration undoes it all and
    leaves the host's own pg_cron job."""
    db = create_cron_database(cron_cluster)
    project = tmp_path / "host"
    migrations = project / "supabase" / "migrations"
    migrations.mkdir(parents=True)
    shutil.copy(ROOT / "supabase" / "config.toml", project / "supabase" / "config.toml")
    (migrations / HOST_MIGRATION).write_text(
        PROFILES_APP + "\nselect cron.schedule('host-nightly', '0 3 * * *', 'select 1');\n"
    )

    def push() -> str:
        proc = run_supabase("db", "push", f"--remote={db.dsn(OWNER)}", "--yes", workdir=project)
        return proc.stdout + proc.stderr

    push()
    before = snapshot(db)

    cli = _cli("install", "--signup-grant", "0", cwd=project)
    assert cli.returncode == 0, cli.stderr
    (written,) = sorted(set(migrations.glob("*.sql")) - {migrations / HOST_MIGRATION})
    assert written.name > HOST_MIGRATION, "the install must sort after the host's history"
    assert written.name.endswith(
        f"_token_billing_{install.current_version().replace('.', '_')}.sql"
    )
    assert cli.stdout == f"wrote {written.relative_to(project)}: it installs token-billing " + (
        f"{install.current_version()} on `supabase db push`\nnext: supabase db push\n"
    )
    output = push()
    assert written.name in output
    _assert_only_ours_added(before, snapshot(db))
    assert db.psql("select signup_grant from billing.settings").strip() == "0"
    jobs = db.psql("select jobname from cron.job order by 1").split()
    assert jobs == ["host-nightly", "token-billing-expire"]

    again = _cli("install", cwd=project)
    assert again.returncode == 0
    assert "already installed" in again.stdout
    assert "Remote database is up to date" in push()

    removal = _cli("uninstall", cwd=project)
    assert removal.returncode == 0, removal.stderr
    assert "it uninstalls token-billing" in removal.stdout
    assert "token_billing_uninstall.sql" in push()
    assert diff(before, snapshot(db)) == ""


def test_uninstall_should_refuse_a_ledger_with_entries_unless_told(
    new_host: Callable[[str], Database], tmp_path: Path
) -> None:
    db = new_host(PROFILES_APP)
    _run_installer(db)
    db.create_user("00000000-0000-0000-0000-0000000ba0fe")  # a signup: one ledger entry
    before = snapshot(db)
    refused = _cli("uninstall", "--db-url", db.dsn(OWNER), cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "token-billing uninstall: billing.ledger_entries holds 1 entries, which uninstalling "
        "deletes; nothing was removed"
    )
    assert diff(before, snapshot(db)) == ""
    removed = _cli("uninstall", "--db-url", db.dsn(OWNER), "--drop-ledger", cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == "token-billing removed\n"


def test_write_migration_should_refuse_a_folder_from_a_newer_release(tmp_path: Path) -> None:
    newer = tmp_path / "20990101000000_token_billing_9_0_0.sql"
    newer.write_text(install.installer_sql() + "\n--   29991231235959_later.sql\n")
    with pytest.raises(install.InstallError, match="newer release"):
        install.write_migration(tmp_path)
    with pytest.raises(install.InstallError, match="is not a directory"):
        install.write_migration(tmp_path / "missing")
