"""A small async client for agent backends: reserve, settle, deduct, add, balance.

    tokens = TokenBilling(database)
    async with tokens.reserve(user_id, estimate, key=request_id) as r:
        answer = await run_model(...)
        await r.settle(actual_tokens_used)

A reservation holds `estimate` tokens while the work runs. `settle(actual)` charges what was
used and releases the rest; leaving the block without settling (an exception, an early return)
releases the whole hold. Every call that changes a balance takes an idempotency key: retrying a
call with the same key is safe and returns status `duplicate`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from token_billing.coalescer import DeductCoalescer
from token_billing.db import Database
from token_billing.errors import InsufficientTokens, UnknownAccount

BALANCE_FIELDS = ("balance", "available", "reserved", "plan", "subscription_status")


@dataclass(frozen=True)
class Result:
    """The row of a balance-changing call."""

    status: str
    balance: int | None = None
    entry_id: int | None = None
    available: int | None = None


def _one(rows: list[dict[str, Any]], function: str) -> dict[str, Any]:
    if not rows:
        raise RuntimeError(f"{function} returned no row")
    return rows[0]


class Reservation:
    """A pending hold; an async context manager that releases it unless it was settled."""

    def __init__(
        self,
        billing: TokenBilling,
        user_id: uuid.UUID | str,
        amount: int,
        key: str,
        ttl: timedelta,
    ) -> None:
        self._billing = billing
        self.user_id = user_id
        self.amount = amount
        self.key = key
        self.ttl = ttl
        self.id: uuid.UUID | None = None
        self.available: int | None = None
        self.settled: Result | None = None
        self.released: Result | None = None

    async def __aenter__(self) -> Reservation:
        return await self.open()

    async def open(self) -> Reservation:
        """Place the hold without a block, for work settled later (`TokenBilling.settle_many`);
        nothing releases it but a settle, a release or its TTL."""
        row = _one(
            await self._billing.db.rpc(
                "reserve_tokens",
                {
                    "p_user_id": str(self.user_id),
                    "p_amount": self.amount,
                    "p_idempotency_key": self.key,
                    "p_ttl": self.ttl,
                },
            ),
            "reserve_tokens",
        )
        status = row["status"]
        if status == "insufficient_funds":
            raise InsufficientTokens(self.user_id, self.amount, row.get("available"))
        if status == "unknown_account":
            raise UnknownAccount(f"no billing account for user {self.user_id}")
        self.id = uuid.UUID(str(row["reservation_id"]))
        self.available = row.get("available")
        return self

    async def settle(self, actual: int) -> Result:
        """Charge `actual` tokens (0 releases everything) and release the rest of the hold.

        Above the reservation the excess comes from available tokens, capped at zero: status
        `partial`.
        """
        if self.id is None:
            raise RuntimeError("the reservation is not open")
        if actual <= 0:
            self.released = await self.release()
            self.settled = self.released
            return self.released
        row = _one(
            await self._billing.db.rpc(
                "settle_reservation", {"p_reservation_id": str(self.id), "p_amount": actual}
            ),
            "settle_reservation",
        )
        self.settled = Result(row["status"], row.get("balance"), row.get("entry_id"))
        return self.settled

    async def release(self) -> Result:
        """Lift the hold without charging."""
        if self.id is None:
            raise RuntimeError("the reservation is not open")
        row = _one(
            await self._billing.db.rpc("release_reservation", {"p_reservation_id": str(self.id)}),
            "release_reservation",
        )
        self.released = Result(row["status"], available=row.get("available"))
        return self.released

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.id is not None and self.settled is None and self.released is None:
            await self.release()


class TokenBilling:
    """The token-billing RPCs for a backend, over any `token_billing.db.Database`.

    `coalescer` (opt-in, `token_billing.coalescer.DeductCoalescer`): `deduct` calls go through
    it, gathered with concurrent ones into `deduct_tokens_batch` calls; each still gets its own
    result."""

    def __init__(self, db: Database, *, coalescer: DeductCoalescer | None = None) -> None:
        self.db = db
        self.coalescer = coalescer

    def reserve(
        self,
        user_id: uuid.UUID | str,
        estimate: int,
        *,
        key: str | None = None,
        ttl: timedelta = timedelta(minutes=15),
    ) -> Reservation:
        """Hold `estimate` tokens; use as `async with`. Pass a `key` (a request id) to make a
        retried request reuse its reservation instead of holding twice."""
        return Reservation(self, user_id, estimate, key or f"reserve:{uuid.uuid4()}", ttl)

    async def deduct(
        self,
        user_id: uuid.UUID | str,
        amount: int,
        *,
        key: str,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Result:
        """Charge usage at once; raises InsufficientTokens rather than go below zero."""
        params = {
            "p_user_id": str(user_id),
            "p_amount": amount,
            "p_idempotency_key": key,
            "p_description": description,
            "p_metadata": dict(metadata or {}),
        }
        if self.coalescer is not None:
            row = await self.coalescer.deduct(params)
        else:
            row = _one(await self.db.rpc("deduct_tokens", params), "deduct_tokens")
        if row["status"] == "insufficient_funds":
            # deduct_tokens answers the balance (reserve_tokens answers what is available).
            raise InsufficientTokens(user_id, amount, balance=row.get("balance"))
        if row["status"] == "unknown_account":
            raise UnknownAccount(f"no billing account for user {user_id}")
        return Result(row["status"], row.get("balance"), row.get("entry_id"))

    async def add(
        self,
        user_id: uuid.UUID | str,
        amount: int,
        *,
        key: str,
        kind: str = "adjustment",
        description: str | None = None,
        expires_at: datetime | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Result:
        """Credit tokens (kinds: purchase, subscription, promotion, adjustment, refund)."""
        row = _one(
            await self.db.rpc(
                "add_tokens",
                {
                    "p_user_id": str(user_id),
                    "p_amount": amount,
                    "p_idempotency_key": key,
                    "p_kind": kind,
                    "p_description": description,
                    "p_expires_at": expires_at,
                    "p_metadata": dict(metadata or {}),
                },
            ),
            "add_tokens",
        )
        if row["status"] == "unknown_account":
            raise UnknownAccount(f"no billing account for user {user_id}")
        return Result(row["status"], row.get("balance"), row.get("entry_id"))

    async def settle_many(self, settlements: Mapping[uuid.UUID | str, int]) -> dict[str, Result]:
        """Settle many reservations (id -> actual tokens, at most 1000) in one call and one
        transaction; each as `Reservation.settle` would, keyed by reservation id in the answer.
        A malformed item (22023) or an unknown reservation (TBRES) refuses them all."""
        rows = await self.db.rpc(
            "settle_reservations",
            {
                "p_settlements": [
                    {"reservation_id": str(reservation_id), "amount": amount}
                    for reservation_id, amount in settlements.items()
                ]
            },
        )
        return {
            str(row["reservation_id"]): Result(
                row["status"], row.get("balance"), row.get("entry_id")
            )
            for row in rows
        }

    async def balance(self, user_id: uuid.UUID | str) -> dict[str, Any]:
        """balance, available, reserved, plan and subscription_status of the user."""
        rows = await self.db.rpc("get_billing_profile", {"p_user_id": str(user_id)})
        if not rows:
            raise UnknownAccount(f"no billing account for user {user_id}")
        return {key: rows[0][key] for key in BALANCE_FIELDS}
