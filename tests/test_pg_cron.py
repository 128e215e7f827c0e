"""On Supabase pg_cron is available: where it is installed, the expiry migration schedules
`expire_tokens()` every minute; where it is not (the other tests' clusters), it schedules
nothing and the migrations still apply.

pg_cron must be preloaded and bound to one database, so this test runs its own cluster.
"""

from __future__ import annotations

from scripts.pgcluster import temporary_cluster

DBNAME = "tb_cron"


def test_expiry_is_scheduled_every_minute_where_pg_cron_is_installed() -> None:
    with temporary_cluster(
        shared_preload_libraries="'pg_cron'", **{"cron.database_name": f"'{DBNAME}'"}
    ) as cluster:
        cluster.apply_compat("postgres")
        cluster.create_database(DBNAME)
        # As on Supabase: the extension enabled by the platform, usable by postgres.
        cluster.psql(DBNAME, "create extension pg_cron")
        cluster.psql(DBNAME, "grant usage on schema cron to postgres")
        cluster.apply_compat(DBNAME)
        cluster.push_migrations(DBNAME, include_seed=False)

        jobs = cluster.psql(
            DBNAME, "select jobname, schedule, command, username from cron.job order by jobid"
        ).split("\n")
        assert [job for job in jobs if job] == [
            "token-billing-expire|* * * * *|select * from public.expire_tokens()|postgres"
        ]
