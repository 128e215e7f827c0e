"""The signup grant of an anonymous user lands exactly once when the user links an email or
phone, also when the link races itself: eight connections update the same users at once
(linking, turning anonymous again, linking again), each in its own transaction."""

from __future__ import annotations

import threading
import uuid

import psycopg

from scripts.pgcluster import Database

USERS = [uuid.UUID(f"00000000-0000-0000-0000-0000000a1{i:03d}") for i in range(4)]
THREADS = 8
ROUNDS = 20


def test_linking_an_anonymous_user_concurrently_grants_once(db: Database) -> None:
    with db.connect() as conn:
        for user in USERS:
            conn.execute(
                "insert into auth.users (id, aud, role, is_anonymous) "
                "values (%s, 'authenticated', 'authenticated', true)",
                [str(user)],
            )
        granted = conn.execute(
            "select count(*) from billing.ledger_entries where user_id = any(%s)", [USERS]
        ).fetchone()
    assert granted == (0,), "anonymous users should get no grant at signup"

    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def link(index: int) -> None:
        try:
            with psycopg.connect(db.dsn(), autocommit=True) as conn:
                start.wait()
                for round_ in range(ROUNDS):
                    for user in USERS:
                        if (round_ + index) % 3 == 0:
                            conn.execute(
                                "update auth.users set is_anonymous = true where id = %s",
                                [str(user)],
                            )
                        conn.execute(
                            "update auth.users set is_anonymous = false, email = %s where id = %s",
                            [f"{user}-{index}-{round_}@example.com", str(user)],
                        )
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=link, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    with db.connect() as conn:
        grants = conn.execute(
            "select user_id, count(*), sum(amount) from billing.ledger_entries "
            "where user_id = any(%s) and kind = 'signup' group by user_id",
            [USERS],
        ).fetchall()
        balances = conn.execute(
            "select user_id, balance from billing.accounts where user_id = any(%s)", [USERS]
        ).fetchall()
        problems = conn.execute("select * from billing.check_invariants()").fetchall()
    assert sorted(grants) == sorted((user, 1, 100) for user in USERS), "one grant per user"
    assert sorted(balances) == sorted((user, 100) for user in USERS)
    assert problems == []
