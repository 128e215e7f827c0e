"""`token-billing doctor`: read a live database and say what is wrong, with the fix for each.

The checks cover what the Supabase CLI's advisors do not (a `security definer` function that
`anon` or `authenticated` can execute in an exposed schema: Supabase's lints 0028 and 0029, the
tutorial's minting trap) and what only token-billing knows: the installed version against this
package's, functions that shadow ours, the expiry job's last runs, the Realtime publication,
parked Stripe events, the ledger's invariants. A finding is `ok`, `warn` or `error`; the command
exits non-zero when any is an error, so CI can run it.

Read-only: every check is a select. Connect as the project's owner role (postgres on Supabase).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from token_billing import install

if TYPE_CHECKING:
    import psycopg

LEVELS = ("ok", "warn", "error")


@dataclass(frozen=True)
class Finding:
    """One check's verdict: level, what was found, and the fix (SQL or a command) if any."""

    check: str
    level: str
    message: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rows(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> list[Any]:
    return conn.execute(query, params or None).fetchall()


def _one(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params or None).fetchone()
    return row[0] if row else None


def exposed_schemas(conn: psycopg.Connection[Any], extra: Sequence[str] = ()) -> list[str]:
    """The schemas the Data API serves: PostgREST's `pgrst.db_schemas` where the database
    carries it (on the authenticator role, as Supabase sets it), else public; plus `extra`."""
    setting = _one(
        conn,
        "select substring(c from '^pgrst\\.db_schemas=(.*)$') "
        "from pg_roles as r, unnest(r.rolconfig) as c "
        "where r.rolname = 'authenticator' and c like 'pgrst.db_schemas=%'",
    )
    names = [s.strip() for s in (setting or "public").split(",") if s.strip()]
    return list(dict.fromkeys([*names, *extra]))


def check_version(conn: psycopg.Connection[Any]) -> list[Finding]:
    expected = install.expected_migrations()
    version = install.current_version()
    if _one(conn, "select to_regclass('billing.schema_migrations') is not null") is not True:
        if _one(conn, "select exists (select 1 from pg_namespace where nspname = 'billing')"):
            return [
                Finding(
                    "version",
                    "error",
                    "schema billing exists but was not made by token-billing (no "
                    "billing.schema_migrations)",
                    "install token-billing into a project whose own schema is not named billing",
                )
            ]
        return [
            Finding(
                "version",
                "error",
                "token-billing is not installed",
                "token-billing install --migrations-dir supabase/migrations && supabase db push",
            )
        ]
    applied = [r[0] for r in _rows(conn, "select version from billing.schema_migrations")]
    unknown = sorted(set(applied) - set(expected))
    missing = [v for v in expected if v not in applied]
    release = install.installed_release(applied) or "an unreleased version"
    if unknown:
        return [
            Finding(
                "version",
                "error",
                f"the database has token-billing migrations this package ({version}) does not "
                f"know: {', '.join(unknown)}",
                "upgrade the token-billing package to the release the database is at",
            )
        ]
    if missing:
        return [
            Finding(
                "version",
                "error",
                f"installed: {release}, {len(applied)} of the {len(expected)} migrations of "
                f"{version}; missing {', '.join(missing)}",
                "token-billing install --migrations-dir supabase/migrations && supabase db push",
            )
        ]
    return [Finding("version", "ok", f"installed: {version} ({len(applied)} migrations)")]


def check_definer_functions(conn: psycopg.Connection[Any], schemas: Sequence[str]) -> list[Finding]:
    """Supabase lints 0028 (anon) and 0029 (authenticated): a security definer function in an
    exposed schema runs with its owner's rights for anyone the Data API lets call it."""
    findings = []
    for role, lint in (("anon", "0028"), ("authenticated", "0029")):
        rows = _rows(
            conn,
            "select format('%%I.%%I(%%s)', n.nspname, p.proname, "
            "pg_get_function_identity_arguments(p.oid)) "
            "from pg_proc as p join pg_namespace as n on n.oid = p.pronamespace "
            "where n.nspname = any(%s) and p.prosecdef "
            # A trigger function cannot be called through the Data API.
            "and p.prorettype not in ('trigger'::regtype, 'event_trigger'::regtype) "
            "and has_function_privilege(%s, p.oid, 'execute') "
            "and not exists (select 1 from pg_depend as d where d.objid = p.oid "
            "and d.classid = 'pg_proc'::regclass and d.deptype = 'e') "
            "order by 1",
            [list(schemas), role],
        )
        names = [r[0] for r in rows]
        if names:
            findings.append(
                Finding(
                    f"definer_executable_by_{role}",
                    "error",
                    f"security definer functions that {role} can execute over the Data API "
                    f"(Supabase lint {lint}): {', '.join(names)}",
                    "\n".join(
                        f"revoke execute on function {name} from public, anon, authenticated;"
                        for name in names
                    ),
                )
            )
        else:
            findings.append(
                Finding(
                    f"definer_executable_by_{role}",
                    "ok",
                    f"no security definer function in {', '.join(schemas)} is executable by {role}",
                )
            )
    return findings


def check_shadowing(conn: psycopg.Connection[Any]) -> list[Finding]:
    """Functions in public named like ours that are not ours: a call may run the wrong one, and
    PostgREST answers PGRST203 (ambiguous) for an overload."""
    known = [str(s) for s in install.manifest()["current"]["functions"]]
    names = sorted({s.split("(")[0].removeprefix("public.") for s in known})
    rows = _rows(
        conn,
        "select format('public.%%I(%%s)', p.proname, pg_get_function_identity_arguments(p.oid)) "
        "from pg_proc as p where p.pronamespace = 'public'::regnamespace and p.proname = any(%s) "
        "and p.oid not in (select to_regprocedure(k) from unnest(%s::text[]) as k "
        "where to_regprocedure(k) is not null) order by 1",
        [names, known],
    )
    if not rows:
        return [Finding("shadowing", "ok", "no function in public shadows token-billing's")]
    shadows = [r[0] for r in rows]
    return [
        Finding(
            "shadowing",
            "error",
            f"functions in public named like token-billing's that are not token-billing's: "
            f"{', '.join(shadows)}",
            "\n".join(f"drop function {name};" for name in shadows),
        )
    ]


def check_rls(conn: psycopg.Connection[Any], schemas: Sequence[str]) -> list[Finding]:
    """Supabase lint 0013: a table in an exposed schema without row level security is readable
    and writable by anyone the table's grants let in, with the anon key."""
    rows = _rows(
        conn,
        "select format('%%I.%%I', n.nspname, c.relname) from pg_class as c "
        "join pg_namespace as n on n.oid = c.relnamespace "
        "where n.nspname = any(%s) and c.relkind in ('r', 'p') and not c.relrowsecurity "
        "and not exists (select 1 from pg_depend as d where d.objid = c.oid "
        "and d.classid = 'pg_class'::regclass and d.deptype = 'e') order by 1",
        [list(schemas)],
    )
    if not rows:
        return [Finding("rls", "ok", f"every table in {', '.join(schemas)} has RLS enabled")]
    tables = [r[0] for r in rows]
    return [
        Finding(
            "rls",
            "error",
            f"tables in an exposed schema without row level security (Supabase lint 0013): "
            f"{', '.join(tables)}",
            "\n".join(f"alter table {t} enable row level security;" for t in tables),
        )
    ]


def check_expiry_job(conn: psycopg.Connection[Any]) -> list[Finding]:
    if not _one(conn, "select exists (select 1 from pg_extension where extname = 'pg_cron')"):
        return [
            Finding(
                "expiry_job",
                "warn",
                "pg_cron is not installed: nothing runs expire_tokens(), so expired tokens and "
                "holds stay until something does",
                "enable pg_cron (Database > Extensions), then run select cron.schedule("
                "'token-billing-expire', '* * * * *', 'select * from public.expire_tokens()'); "
                "or call select * from public.expire_tokens() every minute from your scheduler",
            )
        ]
    job = _rows(conn, "select jobid, active from cron.job where jobname = 'token-billing-expire'")
    schedule = (
        "select cron.schedule('token-billing-expire', '* * * * *', "
        "'select * from public.expire_tokens()');"
    )
    if not job:
        return [
            Finding(
                "expiry_job", "error", "the pg_cron job token-billing-expire is missing", schedule
            )
        ]
    jobid, active = job[0]
    if not active:
        return [
            Finding(
                "expiry_job",
                "error",
                "the pg_cron job token-billing-expire is not active",
                f"select cron.alter_job({jobid}, active => true);",
            )
        ]
    runs = _rows(
        conn,
        "select status, coalesce(return_message, ''), end_time from cron.job_run_details "
        "where jobid = %s order by start_time desc limit 5",
        [jobid],
    )
    if not runs:
        return [Finding("expiry_job", "warn", "token-billing-expire has not run yet")]
    failed = [r for r in runs if r[0] == "failed"]
    if runs[0][0] == "failed":
        return [
            Finding(
                "expiry_job",
                "error",
                f"token-billing-expire failed in {len(failed)} of its last {len(runs)} runs; "
                f"the last said: {runs[0][1]}",
                "select * from public.expire_tokens();  -- run it once by hand to see the error",
            )
        ]
    return [Finding("expiry_job", "ok", f"token-billing-expire ran; last run {runs[0][0]}")]


def check_publication(conn: psycopg.Connection[Any]) -> list[Finding]:
    if not _one(
        conn, "select exists (select 1 from pg_publication where pubname = 'supabase_realtime')"
    ):
        return [
            Finding(
                "publication",
                "warn",
                "there is no supabase_realtime publication: browsers cannot follow the balance "
                "through Supabase Realtime (the service's /v1/balance/stream still works)",
            )
        ]
    member = _one(
        conn,
        "select exists (select 1 from pg_publication_tables where pubname = 'supabase_realtime' "
        "and schemaname = 'billing' and tablename = 'accounts')",
    )
    if not member:
        return [
            Finding(
                "publication",
                "error",
                "billing.accounts is not in the supabase_realtime publication: browsers see no "
                "balance changes",
                "alter publication supabase_realtime add table billing.accounts;",
            )
        ]
    return [Finding("publication", "ok", "billing.accounts is in supabase_realtime")]


def check_parked_events(conn: psycopg.Connection[Any]) -> list[Finding]:
    count, oldest, reason = conn.execute(  # type: ignore[misc]
        "select count(*), min(received_at), (array_agg(detail order by received_at))[1] "
        "from billing.stripe_events where status = 'parked'"
    ).fetchone()
    if not count:
        return [Finding("parked_events", "ok", "no parked Stripe events")]
    return [
        Finding(
            "parked_events",
            "warn",
            f"{count} Stripe events are parked (oldest received {oldest}): {reason}",
            "select * from public.replay_parked_stripe_events();",
        )
    ]


def check_accounts(conn: psycopg.Connection[Any]) -> list[Finding]:
    findings = []
    missing = _one(
        conn,
        "select count(*) from auth.users as u "
        "where not exists (select 1 from billing.accounts as a where a.user_id = u.id)",
    )
    if missing:
        findings.append(
            Finding(
                "accounts",
                "warn",
                f"{missing} users have no billing account (the signup trigger was missing?)",
                "select billing.open_missing_accounts();",
            )
        )
    triggers = [str(t) for t in install.manifest()["current"]["triggers"]]
    present = _one(
        conn,
        "select count(*) from pg_trigger where tgrelid = 'auth.users'::regclass "
        "and tgname = 'tg_users__50_open_billing_account' and tgenabled <> 'D'",
    )
    if triggers and not present:
        findings.append(
            Finding(
                "accounts",
                "error",
                "the trigger that opens an account for each new user is missing or disabled",
                "token-billing install (it recreates nothing that exists; reinstall after "
                "uninstall)",
            )
        )
    problems = _rows(conn, "select * from billing.check_invariants() limit 5")
    if problems:
        findings.append(
            Finding(
                "invariants",
                "error",
                "billing.check_invariants() reports: "
                + "; ".join(
                    f"user {user}: {problem} (expected {expected}, actual {actual})"
                    for user, problem, expected, actual in problems
                ),
            )
        )
    if not findings:
        findings.append(
            Finding("accounts", "ok", "every user has an account and the invariants hold")
        )
    return findings


def diagnose(conn: psycopg.Connection[Any], *, schemas: Sequence[str] = ()) -> list[Finding]:
    """Every check, in order. Checks that need an installed schema are skipped without one."""
    exposed = exposed_schemas(conn, schemas)
    findings = check_version(conn)
    findings += check_definer_functions(conn, exposed)
    findings += check_shadowing(conn)
    findings += check_rls(conn, exposed)
    if _one(conn, "select to_regclass('billing.schema_migrations') is null"):
        return findings
    findings += check_expiry_job(conn)
    findings += check_publication(conn)
    findings += check_parked_events(conn)
    findings += check_accounts(conn)
    return findings


def run(dsn: str, *, schemas: Sequence[str] = ()) -> list[Finding]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set default_transaction_read_only = on")
        return diagnose(conn, schemas=schemas)


def render(findings: Sequence[Finding]) -> str:
    lines = []
    for finding in findings:
        lines.append(f"{finding.level:<6} {finding.check}: {finding.message}")
        if finding.fix and finding.level != "ok":
            lines += [f"       fix: {line}" for line in finding.fix.splitlines()]
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warn" for f in findings)
    lines.append(f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}")
    return "\n".join(lines)
