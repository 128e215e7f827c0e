"""The browser's live balance: a deduction reaches the realtime stream as an update of the
owner's billing.accounts row.

Supabase Realtime decodes the logical replication stream of the supabase_realtime publication.
Here a logical slot with wal2json, restricted to the tables that publication lists, stands in
for it: what it sees is what Realtime would forward (after RLS, to the row's owner only).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from scripts.pgcluster import Database

OWNER = uuid.UUID("00000000-0000-0000-0000-0000000000b1")
OTHER = uuid.UUID("00000000-0000-0000-0000-0000000000b2")


def _changes(conn: Any, slot: str, tables: str = "*.*") -> list[dict[str, Any]]:
    rows = conn.execute(
        "select data from pg_logical_slot_get_changes(%s, null, null, "
        "'format-version', '2', 'add-tables', %s, 'include-timestamp', '0')",
        [slot, tables],
    ).fetchall()
    return [json.loads(data) for (data,) in rows]


def _published(conn: Any) -> set[tuple[str, str]]:
    rows = conn.execute(
        "select schemaname, tablename from pg_publication_tables "
        "where pubname = 'supabase_realtime'"
    ).fetchall()
    return {(schema, table) for schema, table in rows}


def test_deduction_is_published_as_an_update_of_the_owners_account(db: Database) -> None:
    db.create_user(OWNER)
    db.create_user(OTHER)
    slot = f"tb_realtime_{uuid.uuid4().hex[:8]}"
    with db.connect_superuser() as conn:
        published = conn.execute(
            "select schemaname || '.' || tablename from pg_publication_tables "
            "where pubname = 'supabase_realtime'"
        ).fetchall()
        assert sorted(row[0] for row in published) == ["billing.accounts", "billing.notifications"]
        tables = ",".join(row[0] for row in published)
        conn.execute("select pg_create_logical_replication_slot(%s, 'wal2json')", [slot])
        try:
            with db.as_service_role() as svc:
                # The test cluster commits asynchronously; decoding reads only flushed WAL.
                svc.execute("set synchronous_commit = on")
                status, balance = svc.execute(
                    "select status, balance from public.deduct_tokens(%s, 7, 'rt-1')", [OWNER]
                ).fetchone() or (None, None)
            assert (status, balance) == ("applied", 93)

            changes = [c for c in _changes(conn, slot, tables) if c["action"] in "IUD"]
            assert len(changes) == 1, changes
            change = changes[0]
            assert (change["action"], change["schema"], change["table"]) == (
                "U",
                "billing",
                "accounts",
            )
            row = {col["name"]: col["value"] for col in change["columns"]}
            assert row["user_id"] == str(OWNER)
            assert row["balance"] == 93
            assert row["reserved"] == 0
        finally:
            conn.execute("select pg_drop_replication_slot(%s)", [slot])


def test_a_low_balance_notification_is_published_for_its_owner(db: Database) -> None:
    """Crossing 20% of the free plan's 100 tokens inserts one notification, published like the
    account row (and, like it, readable through RLS by its owner only)."""
    db.create_user(OWNER)
    slot = f"tb_realtime_{uuid.uuid4().hex[:8]}"
    with db.connect_superuser() as conn:
        conn.execute("select pg_create_logical_replication_slot(%s, 'wal2json')", [slot])
        try:
            with db.as_service_role() as svc:
                svc.execute("set synchronous_commit = on")
                svc.execute("select * from public.deduct_tokens(%s, 85, 'rt-low')", [OWNER])
            inserted = [
                c for c in _changes(conn, slot, "billing.notifications") if c["action"] == "I"
            ]
        finally:
            conn.execute("select pg_drop_replication_slot(%s)", [slot])
    assert len(inserted) == 1, inserted
    row = {col["name"]: col["value"] for col in inserted[0]["columns"]}
    assert (row["user_id"], row["kind"]) == (str(OWNER), "low_balance")


def test_ledger_rows_never_reach_the_stream(db: Database) -> None:
    """Only the account row is published: entries (descriptions, metadata) stay server-side."""
    db.create_user(OWNER)
    slot = f"tb_realtime_{uuid.uuid4().hex[:8]}"
    with db.connect_superuser() as conn:
        conn.execute("select pg_create_logical_replication_slot(%s, 'wal2json')", [slot])
        try:
            with db.as_service_role() as svc:
                svc.execute("set synchronous_commit = on")
                svc.execute(
                    "select * from public.add_tokens(%s, 5, 'rt-2', 'promotion', 'secret note')",
                    [OWNER],
                )
            # Decode everything the credit wrote, then keep what the publication carries.
            written = {
                (c["schema"], c["table"]) for c in _changes(conn, slot) if c["action"] in "IUD"
            }
            assert {("billing", "ledger_entries"), ("billing", "credit_buckets")} <= written
            assert written & _published(conn) == {("billing", "accounts")}
        finally:
            conn.execute("select pg_drop_replication_slot(%s)", [slot])
