"""token_billing.client.TokenBilling over the real RPCs (PostgresDatabase on a fresh database)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from scripts.pgcluster import Database
from tests.app_support import account, new_user, scalar
from token_billing import (
    DatabaseError,
    HoldExpired,
    HoldResolved,
    IdempotencyConflict,
    InsufficientTokens,
    InvalidArgument,
    ReservationNotFound,
    Result,
    TokenBilling,
    TokenBillingError,
    UnknownAccount,
)
from token_billing.db import PostgresDatabase

T = TypeVar("T")


def run(db: Database, body: Callable[[TokenBilling], Awaitable[T]], *, max_size: int = 2) -> T:
    """Run `body` with a TokenBilling on its own pool, in a fresh event loop."""

    async def main() -> T:
        database = PostgresDatabase(db.dsn(), min_size=1, max_size=max_size)
        await database.open()
        try:
            return await body(TokenBilling(database))
        finally:
            await database.close()

    return asyncio.run(main())


class Boom(Exception):
    pass


def test_reserve_then_settle_should_charge_the_actual_amount(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> tuple[int | None, str]:
        async with tokens.reserve(user, 40, key="req-1") as r:
            held = account(db, user)["reserved"]
            result = await r.settle(25)
        return held, result.status

    held, status = run(db, body)
    assert held == 40, "the estimate should be held while the work runs"
    assert status == "applied"
    assert account(db, user) == {"balance": 75, "reserved": 0, "plan": "free", "status": "none"}


def test_settle_many_should_settle_each_hold_once(db: Database) -> None:
    first, second = new_user(db), new_user(db)

    async def body(tokens: TokenBilling) -> tuple[dict[str, str], dict[str, str], DatabaseError]:
        holds = [
            await tokens.reserve(first, 30).open(),
            await tokens.reserve(first, 20).open(),
            await tokens.reserve(second, 50).open(),
        ]
        actual = {hold.id: used for hold, used in zip(holds, (10, 20, 60), strict=True)}
        settled = await tokens.settle_many({h: n for h, n in actual.items() if h is not None})
        replayed = await tokens.settle_many({h: n for h, n in actual.items() if h is not None})
        with pytest.raises(DatabaseError) as refused:
            await tokens.settle_many({holds[0].id or "": 10, uuid.uuid4(): 5})
        return (
            {key: r.status for key, r in settled.items()},
            {key: r.status for key, r in replayed.items()},
            refused.value,
        )

    settled, replayed, refused = run(db, body)
    assert sorted(settled.values()) == ["applied", "applied", "applied"]
    assert set(replayed.values()) == {"duplicate"}
    assert settled.keys() == replayed.keys()
    assert refused.sqlstate == "TBRES", "an unknown reservation should refuse the batch"
    assert isinstance(refused, ReservationNotFound), "TBRES should raise its typed error"
    assert account(db, first) == {"balance": 70, "reserved": 0, "plan": "free", "status": "none"}
    assert account(db, second) == {"balance": 40, "reserved": 0, "plan": "free", "status": "none"}


def test_a_call_on_dead_pooled_connections_should_be_retried_on_a_new_one(db: Database) -> None:
    # The pool does not test a connection on checkout (a round trip per call); a call whose
    # connection died (a Postgres restart, a killed backend) is retried on the next one.
    user = new_user(db)

    async def body(tokens: TokenBilling) -> tuple[int, str, int]:
        database = tokens.db
        assert isinstance(database, PostgresDatabase)
        await asyncio.gather(*(tokens.balance(user) for _ in range(4)))  # open connections
        with db.connect_superuser() as conn:
            killed = conn.execute(
                "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity "
                "where datname = %s and application_name = 'token-billing'",
                [db.name],
            ).fetchone()
        await asyncio.sleep(0.2)  # the backends are gone; the pool has not noticed
        result = await tokens.deduct(user, 5, key="after-the-kill")
        await database.ping()
        return (
            int(killed[0]) if killed else 0,
            result.status,
            (await tokens.balance(user))["balance"],
        )

    killed, status, balance = run(db, body, max_size=4)
    assert killed >= 1, "the pool's connections should have been killed"
    assert status == "applied", "the call should have been retried on a live connection"
    assert balance == 95


def test_exception_inside_the_block_should_release_the_hold(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        async with tokens.reserve(user, 40):
            raise Boom

    with pytest.raises(Boom):
        run(db, body)
    assert account(db, user)["reserved"] == 0
    assert account(db, user)["balance"] == 100
    assert scalar(db, "select status from billing.reservations") == "released"


def test_leaving_without_settling_should_release_the_hold(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> str | None:
        async with tokens.reserve(user, 10) as r:
            pass
        return r.released.status if r.released else None

    assert run(db, body) == "applied"
    assert account(db, user) == {"balance": 100, "reserved": 0, "plan": "free", "status": "none"}


def test_settling_above_the_estimate_should_be_capped_at_available(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> str:
        async with tokens.reserve(user, 50) as r:
            return (await r.settle(500)).status

    assert run(db, body) == "partial"
    assert account(db, user)["balance"] == 0, "never below zero for usage"


def test_reserving_more_than_available_should_raise(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        async with tokens.reserve(user, 101):
            raise AssertionError("should not enter")

    with pytest.raises(InsufficientTokens) as caught:
        run(db, body)
    assert caught.value.available == 100
    assert caught.value.requested == 101
    assert str(caught.value) == f"user {user} has 100 tokens available, 101 were requested"


def test_a_retried_request_should_reuse_its_reservation(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> tuple[uuid.UUID | None, uuid.UUID | None]:
        first = await tokens.reserve(user, 30, key="req-7").__aenter__()
        again = await tokens.reserve(user, 30, key="req-7").__aenter__()
        await first.settle(30)
        return first.id, again.id

    first_id, again_id = run(db, body)
    assert first_id == again_id
    assert account(db, user)["balance"] == 70


def test_unknown_user_should_raise_unknown_account(db: Database) -> None:
    async def body(tokens: TokenBilling) -> None:
        async with tokens.reserve(uuid.uuid4(), 1):
            pass

    with pytest.raises(UnknownAccount) as caught:
        run(db, body)
    assert isinstance(caught.value, TokenBillingError), "every client error has one base class"


def test_deduct_add_and_balance_should_round_trip(db: Database) -> None:
    user = new_user(db)
    expires = datetime.now(UTC) + timedelta(days=30)

    async def body(tokens: TokenBilling) -> list[object]:
        added = await tokens.add(user, 50, key="promo-1", kind="promotion", expires_at=expires)
        again = await tokens.add(user, 50, key="promo-1", kind="promotion", expires_at=expires)
        used = await tokens.deduct(user, 120, key="use-1", metadata={"model": "small"})
        balance = await tokens.balance(user)
        return [added.status, again.status, used.status, used.balance, balance]

    added, again, used, used_balance, balance = run(db, body)
    assert (added, again, used, used_balance) == ("applied", "duplicate", "applied", 30)
    assert isinstance(balance, dict)
    assert {k: balance[k] for k in ("balance", "available", "reserved", "plan")} == {
        "balance": 30,
        "available": 30,
        "reserved": 0,
        "plan": "free",
    }


def test_deducting_more_than_available_should_raise_and_change_nothing(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        await tokens.deduct(user, 101, key="too-much")

    with pytest.raises(InsufficientTokens) as caught:
        run(db, body)
    assert account(db, user)["balance"] == 100
    assert (caught.value.requested, caught.value.balance) == (101, 100), "the numbers it answered"
    assert "None" not in str(caught.value), "the message should name real numbers"
    assert str(caught.value) == (
        f"user {user} has a balance of 100 tokens, not enough available for the 101 requested"
    )


def test_key_reused_with_other_arguments_should_raise_tbkey(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        await tokens.deduct(user, 5, key="k")
        await tokens.deduct(user, 6, key="k")

    with pytest.raises(IdempotencyConflict) as caught:
        run(db, body)
    assert caught.value.sqlstate == "TBKEY"
    assert isinstance(caught.value, DatabaseError), "a typed error should still be a DatabaseError"


def test_invalid_amount_should_raise_22023_naming_the_argument(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        await tokens.add(user, 0, key="zero")

    with pytest.raises(InvalidArgument) as caught:
        run(db, body)
    assert caught.value.sqlstate == "22023"
    assert "p_amount" in caught.value.message


def _hold(db: Database, reservation_id: uuid.UUID | None) -> tuple[str, bool, bool]:
    """status, whether it was extended, and whether its expiry is later than its first one."""
    with db.connect() as conn:
        row = conn.execute(
            "select status, first_expires_at is not null, expires_at > first_expires_at "
            "from billing.reservations where id = %s",
            [str(reservation_id)],
        ).fetchone()
    assert row is not None
    return row[0], row[1], bool(row[2])


def test_a_hold_should_keep_itself_alive_while_the_block_runs(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> tuple[tuple[str, bool, bool], int, int, str]:
        # A 2 s hold extended every 0.2 s: wait (however slow the machine) for two beats.
        async with tokens.reserve(user, 40, ttl=timedelta(seconds=2), heartbeat=0.1) as r:
            for _ in range(200):
                if r.extensions >= 2:
                    break
                await asyncio.sleep(0.1)
            during = _hold(db, r.id)
            settled = await r.settle(25)
        after_exit = r.extensions
        await asyncio.sleep(0.5)  # two beats' time: a heartbeat still running would extend
        return during, after_exit, r.extensions, settled.status

    during, after_exit, later, status = run(db, body)
    assert during == ("pending", True, True), "the heartbeat should have moved the expiry later"
    assert after_exit >= 2
    assert later == after_exit, "the heartbeat should stop when the block settles"
    assert status == "applied"
    assert account(db, user)["balance"] == 75


def test_work_that_outlives_its_hold_should_still_be_charged_once(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> tuple[str, bool, int | None, str]:
        async with tokens.reserve(user, 40, key="long-run", heartbeat=None) as r:
            # The work outlives the TTL: expiry resolves the hold while the block runs.
            db.psql("select * from public.expire_tokens(now() + interval '1 hour')")
            settled = await r.settle(30)
            again = await r.settle(30)
        return settled.status, settled.hold_expired, settled.balance, again.status

    status, hold_expired, balance, again = run(db, body)
    assert (status, hold_expired, balance) == ("applied", True, 70), "never a silent zero"
    assert again == "duplicate", "a retried settle should not charge twice"
    assert (
        scalar(
            db,
            "select amount from billing.ledger_entries where idempotency_key = "
            "'hold-expired:' || (select id from billing.reservations where idempotency_key = %s)",
            ["long-run"],
        )
        == -30
    )


def test_an_expired_hold_the_balance_no_longer_covers_should_raise_hold_expired(
    db: Database,
) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        async with tokens.reserve(user, 40, heartbeat=None) as r:
            db.psql("select * from public.expire_tokens(now() + interval '1 hour')")
            await tokens.deduct(user, 90, key="spent-meanwhile")
            await r.settle(30)

    with pytest.raises(HoldExpired) as caught:
        run(db, body)
    assert isinstance(caught.value, InsufficientTokens), "a 402 handler should catch it too"
    assert (caught.value.requested, caught.value.balance) == (30, 10)
    assert "None" not in str(caught.value)
    assert "expired before it was settled" in str(caught.value)
    assert "has a balance of 10 tokens" in str(caught.value)
    assert account(db, user)["balance"] == 10, "nothing should have been charged"


def test_a_retried_key_of_a_settled_hold_should_raise_hold_resolved(db: Database) -> None:
    user = new_user(db)
    ran: list[str] = []

    async def body(tokens: TokenBilling) -> None:
        async with tokens.reserve(user, 40, key="req-9") as r:
            ran.append("first")
            await r.settle(25)
        async with tokens.reserve(user, 40, key="req-9"):
            ran.append("again")

    with pytest.raises(HoldResolved) as caught:
        run(db, body)
    assert ran == ["first"], "the work should not run again as if it held tokens"
    resolved = caught.value
    assert (resolved.status, resolved.amount, resolved.settle_amount, resolved.charged) == (
        "settled",
        40,
        25,
        25,
    )
    assert resolved.entry_id is not None
    assert "settled: 25 of the 40 held tokens were charged" in str(resolved)
    assert isinstance(resolved, TokenBillingError)
    assert account(db, user) == {"balance": 75, "reserved": 0, "plan": "free", "status": "none"}


def test_a_retried_key_of_a_released_hold_should_raise_hold_resolved(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        with contextlib.suppress(Boom):
            async with tokens.reserve(user, 40, key="req-10"):
                raise Boom
        await tokens.reserve(user, 40, key="req-10").open()

    with pytest.raises(HoldResolved) as caught:
        run(db, body)
    assert (caught.value.status, caught.value.charged) == ("released", None)
    assert account(db, user)["reserved"] == 0


def test_a_retried_key_of_an_expired_hold_should_raise_hold_resolved(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        await tokens.reserve(user, 40, key="req-11", ttl=timedelta(minutes=1)).open()
        db.psql("select * from public.expire_tokens(now() + interval '1 hour')")
        await tokens.reserve(user, 40, key="req-11", ttl=timedelta(minutes=1)).open()

    with pytest.raises(HoldResolved) as caught:
        run(db, body)
    assert (caught.value.status, caught.value.charged) == ("expired", None)
    # The RPC answers the contract's duplicate with the hold's id, pending or not; the client
    # asked get_reservation how the hold resolved.
    assert (
        scalar(
            db,
            "select status from public.reserve_tokens(%s, 40, 'req-11', interval '1 minute')",
            [user],
        )
        == "duplicate"
    )
    assert account(db, user) == {"balance": 100, "reserved": 0, "plan": "free", "status": "none"}


def test_settling_a_hold_something_else_settled_should_raise_hold_resolved(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> None:
        async with tokens.reserve(user, 40, heartbeat=None) as r:
            db.psql(f"select * from public.settle_reservation('{r.id}', 5)")
            await r.settle(10)

    with pytest.raises(HoldResolved) as caught:
        run(db, body)
    assert (caught.value.status, caught.value.charged) == ("settled", 5)
    assert account(db, user)["balance"] == 95, "charged once, by the first settlement"


def test_settling_for_zero_should_release_the_hold_and_charge_nothing(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> Result:
        async with tokens.reserve(user, 40) as r:
            return await r.settle(0)

    result = run(db, body)
    assert (result.status, result.entry_id) == ("applied", None)
    assert account(db, user) == {"balance": 100, "reserved": 0, "plan": "free", "status": "none"}
    assert scalar(db, "select status from billing.reservations") == "settled"


def test_a_throttled_deduct_should_wait_the_answered_delay(db: Database) -> None:
    """Starter throttles overage: past zero the deduct applies and answers retry_after_ms,
    which the client waits before it returns (unless told not to)."""
    user = new_user(db)
    with db.connect() as conn:
        conn.execute(
            "update billing.accounts set plan = 'starter', subscription_status = 'active' "
            "where user_id = %s",
            [str(user)],
        )
        conn.execute("update billing.products set throttle_delay_ms = 300 where code = 'starter'")

    async def body(tokens: TokenBilling) -> tuple[Result, float, Result, float, Result]:
        plain = await tokens.deduct(user, 100, key="within")
        loop = asyncio.get_running_loop()
        started = loop.time()
        throttled = await tokens.deduct(user, 50, key="past-zero")
        waited = loop.time() - started
        quick = TokenBilling(tokens.db, honour_throttle=False)
        started = loop.time()
        unwaited = await quick.deduct(user, 50, key="past-zero-2")
        return plain, waited, throttled, loop.time() - started, unwaited

    plain, waited, throttled, unwaited_s, unwaited = run(db, body)
    assert (plain.status, plain.balance, plain.retry_after_ms) == ("applied", 0, None)
    assert (throttled.status, throttled.balance, throttled.retry_after_ms) == ("applied", -50, 300)
    assert waited >= 0.3, "the client should wait the plan's delay"
    assert (unwaited.status, unwaited.balance, unwaited.retry_after_ms) == ("applied", -100, 300)
    assert unwaited_s < 0.3, "honour_throttle=False should return at once"
    assert account(db, user)["balance"] == -100
