"""Installing into a project that already has users: the backfill, and re-running the compat."""

from __future__ import annotations

import uuid

from scripts.pgcluster import PgCluster

EXISTING = [uuid.UUID(f"00000000-0000-0000-0000-00000000ba{i:02d}") for i in range(3)]


def test_existing_users_get_accounts_and_one_signup_grant(pg_cluster: PgCluster) -> None:
    name = f"tb_backfill_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    try:
        pg_cluster.apply_compat(name)
        pg_cluster.apply_compat(name)  # idempotent: a second run must change nothing
        for user in EXISTING:
            pg_cluster.psql(
                name, f"insert into auth.users (id, email) values ('{user}', '{user}@x')"
            )
        pg_cluster.push_migrations(name, include_seed=False)

        rows = pg_cluster.psql(
            name,
            "select a.user_id, a.balance, count(e.id) from billing.accounts as a "
            "left join billing.ledger_entries as e on e.user_id = a.user_id "
            "group by a.user_id, a.balance order by a.user_id",
        ).split()
        assert rows == [f"{user}|100|1" for user in EXISTING]

        # A second push is a no-op: the migrations are recorded, the grant is not repeated.
        pg_cluster.push_migrations(name, include_seed=False)
        total = pg_cluster.psql(name, "select sum(balance) from billing.accounts").strip()
        assert total == "300"
    finally:
        pg_cluster.drop_database(name)
