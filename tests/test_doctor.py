"""`token-billing doctor` against live databases: each finding it should make, with its fix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from scripts.pgcluster import OWNER, Database, PgCluster
from tests.conftest import create_cron_database
from tests.test_install import PROFILES_APP, TUTORIAL, _cli, _run_installer, new_host
from token_billing import doctor

__all__ = ["new_host"]  # the fixture, shared with test_install


def _by_check(findings: list[doctor.Finding]) -> dict[str, doctor.Finding]:
    return {f.check: f for f in findings}


def test_doctor_on_the_tutorial_project_reports_the_minting_trap(
    new_host: Callable[[str], Database],
) -> None:
    db = new_host(TUTORIAL)
    found = _by_check(doctor.run(db.dsn(OWNER)))
    assert found["version"].level == "error"
    assert found["version"].message == "token-billing is not installed"
    anon = found["definer_executable_by_anon"]
    assert anon.level == "error"
    assert "lint 0028" in anon.message
    assert "public.add_tokens(p_user_id uuid, p_amount integer)" in anon.message
    assert "public.handle_new_user" not in anon.message, "a trigger function is not callable"
    assert (
        "revoke execute on function public.add_tokens(p_user_id uuid, p_amount integer) "
        "from public, anon, authenticated;"
    ) in (anon.fix or "").splitlines()
    assert found["definer_executable_by_authenticated"].level == "error"
    assert found["shadowing"].level == "error"
    assert "public.deduct_tokens(p_user_id uuid, p_amount integer, p_reason text)" in (
        found["shadowing"].message
    )
    assert "expiry_job" not in found, "checks of an installed schema need one"


def test_doctor_on_a_healthy_install_finds_no_error(new_host: Callable[[str], Database]) -> None:
    db = new_host(PROFILES_APP)
    _run_installer(db)
    findings = doctor.run(db.dsn(OWNER))
    assert [f for f in findings if f.level == "error"] == [], doctor.render(findings)
    found = _by_check(findings)
    assert found["version"].message.startswith("installed: ")
    assert found["expiry_job"].level == "warn", "no pg_cron in this cluster"
    assert found["publication"].level == "ok"
    assert found["parked_events"].level == "ok"
    assert doctor.render(findings).endswith("0 errors, 1 warning")


def test_doctor_reports_what_breaks_later(new_host: Callable[[str], Database]) -> None:
    db = new_host(PROFILES_APP)
    _run_installer(db)
    db.psql(
        "create table public.notes (id bigint primary key, body text);"
        "alter publication supabase_realtime drop table billing.accounts;"
        "delete from billing.schema_migrations where version = (select max(version) from "
        "billing.schema_migrations);"
        "insert into billing.stripe_events (id, type, created, payload, status, detail, "
        "processed_at) values ('evt_parked', 'charge.refunded', now(), '{}', 'parked', "
        "'payment pi_x is not recorded', now());",
        user=OWNER,
    )
    db.psql("alter table auth.users disable trigger tg_users__50_open_billing_account")
    db.psql("insert into auth.users (id, email) values (gen_random_uuid(), 'lost@example.com')")
    found = _by_check(doctor.run(db.dsn(OWNER)))
    assert found["rls"].level == "error"
    assert found["rls"].fix == "alter table public.notes enable row level security;"
    assert found["publication"].level == "error"
    assert found["publication"].fix == (
        "alter publication supabase_realtime add table billing.accounts;"
    )
    assert found["version"].level == "error"
    assert "missing" in found["version"].message
    assert found["parked_events"].level == "warn"
    assert "payment pi_x is not recorded" in found["parked_events"].message
    assert found["accounts"].level == "error"  # the trigger is disabled
    text = doctor.render(doctor.run(db.dsn(OWNER)))
    assert "1 users have no billing account" in text


def test_doctor_reads_the_expiry_jobs_runs(cron_cluster: PgCluster) -> None:
    cron_db = create_cron_database(cron_cluster)
    _run_installer(cron_db)
    found = _by_check(doctor.run(cron_db.dsn(OWNER)))
    assert found["expiry_job"].level == "warn"
    assert found["expiry_job"].message == "token-billing-expire has not run yet"
    cron_db.psql(
        "insert into cron.job_run_details (jobid, runid, job_pid, database, username, command, "
        "status, return_message, start_time, end_time) select jobid, 1, 1, current_database(), "
        "'postgres', command, 'failed', 'ERROR:  out of cheese', now(), now() from cron.job "
        "where jobname = 'token-billing-expire'"
    )
    expiry = _by_check(doctor.run(cron_db.dsn(OWNER)))["expiry_job"]
    assert expiry.level == "error"
    assert "out of cheese" in expiry.message


def test_the_doctor_command_exits_non_zero_on_errors(
    new_host: Callable[[str], Database], tmp_path: Path
) -> None:
    sick, healthy = new_host(TUTORIAL), new_host(PROFILES_APP)
    _run_installer(healthy)
    result = _cli("doctor", "--db-url", sick.dsn(OWNER), cwd=tmp_path)
    assert result.returncode == 1
    assert "error  definer_executable_by_anon:" in result.stdout
    assert "       fix: revoke execute on function public.add_tokens(" in result.stdout
    result = _cli("doctor", "--db-url", healthy.dsn(OWNER), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    findings = json.loads(result.stdout)
    assert {f["level"] for f in findings} <= {"ok", "warn"}
    unreachable = _cli("doctor", "--db-url", "postgresql://nobody@127.0.0.1:1/none", cwd=tmp_path)
    assert unreachable.returncode == 2
    assert unreachable.stderr.startswith("token-billing doctor: cannot reach the database")
