"""token_billing.coalescer.DeductCoalescer through TokenBilling.deduct, on the real database:
concurrent calls share deduct_tokens_batch calls and each caller gets its own answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from scripts.pgcluster import Database
from tests.app_support import account, new_user, scalar
from token_billing import (
    IdempotencyConflict,
    InsufficientTokens,
    InvalidArgument,
    Result,
    TokenBilling,
    UnknownAccount,
)
from token_billing.coalescer import DeductCoalescer
from token_billing.db import PostgresDatabase

T = TypeVar("T")


def run(
    db: Database,
    body: Callable[[TokenBilling, DeductCoalescer], Awaitable[T]],
    *,
    max_in_flight: int = 2,
    split_min_items: int = 8,
) -> T:
    """Run `body` with a coalescing TokenBilling on its own pool, in a fresh event loop."""

    async def main() -> T:
        database = PostgresDatabase(db.dsn(), min_size=1, max_size=max_in_flight + 2)
        await database.open()
        # A long window: the calls of one gather always land in one batch.
        coalescer = DeductCoalescer(
            database,
            window_seconds=0.05,
            max_in_flight=max_in_flight,
            split_min_items=split_min_items,
        )
        try:
            return await body(TokenBilling(database, coalescer=coalescer), coalescer)
        finally:
            await coalescer.aclose()
            await database.close()

    return asyncio.run(main())


def test_concurrent_deducts_should_share_batches_and_each_get_its_own_result(
    db: Database,
) -> None:
    users = [new_user(db), new_user(db)]

    async def body(tokens: TokenBilling, coalescer: DeductCoalescer) -> list[Result]:
        return await asyncio.gather(
            *(
                tokens.deduct(users[n % 2], 1 + n % 3, key=f"co-{n}", metadata={"n": n})
                for n in range(40)
            )
        )

    results = run(db, body)
    assert [r.status for r in results] == ["applied"] * 40
    assert len({r.entry_id for r in results}) == 40, "each caller should get its own entry"
    for n, result in enumerate(results):
        row = scalar(
            db,
            "select jsonb_build_array(user_id, amount, balance_after, metadata) "
            "from billing.ledger_entries where id = %s and idempotency_key = %s",
            [result.entry_id, f"co-{n}"],
        )
        assert row == [str(users[n % 2]), -(1 + n % 3), result.balance, {"n": n}], (
            "each caller's key, amount and balance should be its own"
        )
    spent = [sum(1 + n % 3 for n in range(40) if n % 2 == u) for u in (0, 1)]
    assert [account(db, u)["balance"] for u in users] == [100 - spent[0], 100 - spent[1]]
    batches = scalar(
        db,
        "select count(distinct xmin::text) from billing.ledger_entries "
        "where idempotency_key like 'co-%%'",
    )
    assert batches < 40, "the calls should have been committed in shared batches"
    assert scalar(db, "select count(*) from billing.check_invariants()") == 0


def transactions_by_user(db: Database, prefix: str) -> dict[str, set[str]]:
    """The transactions (xmin) that wrote each user's entries under keys with this prefix."""
    rows = scalar(
        db,
        "select coalesce(jsonb_object_agg(u, xmins), '{}') from ("
        " select user_id::text as u, jsonb_agg(distinct xmin::text) as xmins"
        " from billing.ledger_entries where idempotency_key like %s group by user_id) as t",
        [prefix + "%"],
    )
    return {user: set(xmins) for user, xmins in rows.items()}


@pytest.mark.parametrize("split_min_items", [8, 0])
def test_a_batch_should_split_over_free_slots_by_whole_accounts(
    db: Database, split_min_items: int
) -> None:
    users = [new_user(db) for _ in range(6)]
    prefix = f"split-{split_min_items}-"

    async def body(tokens: TokenBilling, coalescer: DeductCoalescer) -> list[Result]:
        return await asyncio.gather(
            *(tokens.deduct(users[n % 6], 1, key=f"{prefix}{n}") for n in range(48))
        )

    results = run(db, body, max_in_flight=4, split_min_items=split_min_items)
    assert [r.status for r in results] == ["applied"] * 48
    by_user = transactions_by_user(db, prefix)
    assert sorted(by_user) == sorted(str(u) for u in users)
    assert all(len(xmins) == 1 for xmins in by_user.values()), (
        "every item of one account should be in the same part, one transaction"
    )
    parts = len(set().union(*by_user.values()))
    if split_min_items:
        # 48 items, 6 accounts, 3 free slots beside the sender's: 4 parts of whole accounts.
        assert parts == 4, f"the batch should have been split over the 4 slots, got {parts}"
    else:
        assert parts == 1, "split_min_items=0 should send the batch whole"
    assert [account(db, u)["balance"] for u in users] == [100 - 8] * 6
    assert scalar(db, "select count(*) from billing.check_invariants()") == 0


def test_a_retried_key_should_answer_duplicate_through_the_coalescer(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling, coalescer: DeductCoalescer) -> tuple[Result, Result]:
        first = await tokens.deduct(user, 7, key="co-retry")
        again = await tokens.deduct(user, 7, key="co-retry")
        return first, again

    first, again = run(db, body)
    assert first.status == "applied"
    assert (again.status, again.entry_id, again.balance) == ("duplicate", first.entry_id, 93)
    assert account(db, user)["balance"] == 93, "the retry should charge nothing"


def test_a_failed_batch_should_be_retried_item_by_item(db: Database) -> None:
    """One caller's key reused with another amount (TBKEY) refuses its batch; every other
    caller in that batch still gets what a direct call would answer."""
    user, poor = new_user(db), new_user(db)

    async def body(
        tokens: TokenBilling, coalescer: DeductCoalescer
    ) -> tuple[list[Result | BaseException], int]:
        await tokens.deduct(user, 5, key="co-used")
        before = coalescer.batches_sent
        answers = await asyncio.gather(
            tokens.deduct(user, 1, key="co-a"),
            tokens.deduct(user, 6, key="co-used"),  # the key is taken with amount 5
            tokens.deduct(poor, 500, key="co-b"),
            tokens.deduct(uuid.uuid4(), 1, key="co-c"),
            tokens.deduct(user, 0, key="co-d"),
            tokens.deduct(user, 2, key="co-e"),
            return_exceptions=True,
        )
        return list(answers), coalescer.batches_sent - before

    answers, batches = run(db, body)
    assert batches == 1, "the six calls should have gone out as one batch"
    applied_a, conflict, poor_answer, unknown, invalid, applied_e = answers
    assert isinstance(applied_a, Result)
    assert applied_a.status == "applied"
    assert isinstance(conflict, IdempotencyConflict)
    assert isinstance(poor_answer, InsufficientTokens)
    assert isinstance(unknown, UnknownAccount)
    assert isinstance(invalid, InvalidArgument)
    assert isinstance(applied_e, Result)
    assert applied_e.status == "applied"
    assert account(db, user)["balance"] == 100 - 5 - 1 - 2
    assert scalar(db, "select count(*) from billing.check_invariants()") == 0


def test_an_unknown_parameter_should_fail_in_its_caller(db: Database) -> None:
    async def body(tokens: TokenBilling, coalescer: DeductCoalescer) -> None:
        await coalescer.deduct({"p_user_id": str(uuid.uuid4()), "p_amount": 1, "p_kind": "x"})

    with pytest.raises(ValueError, match="p_kind"):
        run(db, body)
