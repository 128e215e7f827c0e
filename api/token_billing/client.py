"""A small async client for agent backends: reserve, settle, deduct, add, balance, and usage
priced by the rate card (quote, record_usage, settle with usage items).

    tokens = TokenBilling(database)
    async with tokens.reserve(user_id, estimate, key=request_id) as r:
        answer = await run_model(...)
        await r.settle(actual_tokens_used)

    quote = await tokens.quote(user_id, [{"meter": "llm.output_tokens", "quantity": 2000}])
    async with tokens.reserve(user_id, quote.tokens, key=request_id) as r:
        usage = await run_model(...)
        await r.settle([{"meter": "llm.output_tokens", "quantity": usage.output_tokens,
                         "dimensions": {"model": "gpt-4o"}}])

A reservation holds `estimate` tokens while the work runs, and keeps itself alive while the
block runs: every `heartbeat` (a third) of its TTL it extends the hold by another TTL, until the
block exits. `settle(actual)` charges what was used (0 is fine) and releases the rest; leaving
the block without settling (an exception, an early return) releases the whole hold. Work whose
hold expired anyway is still charged, once: `settle` falls back to one `deduct_tokens` keyed
`hold-expired:<reservation id>`, and raises HoldExpired when the balance no longer covers it.
Every call that changes a balance takes an idempotency key: retrying a call with the same key is
safe and returns status `duplicate`; reserving with the key of a hold that already resolved
(`reserve_tokens` answers `duplicate`, `get_reservation` how the hold resolved) raises
HoldResolved, carrying how it resolved, so a retried request is never served twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from token_billing.coalescer import DeductCoalescer
from token_billing.db import Database
from token_billing.errors import (
    HoldExpired,
    HoldResolved,
    InsufficientTokens,
    TokenBillingError,
    UnknownAccount,
)

BALANCE_FIELDS = ("balance", "available", "reserved", "plan", "subscription_status")
# The prefix of the key that charges work whose hold expired (followed by the reservation id).
HOLD_EXPIRED_KEY = "hold-expired:"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """The row of a balance-changing call. `hold_expired`: the hold had expired, and the work
    was charged by a deduct_tokens of its own (keyed `hold-expired:<reservation id>`)."""

    status: str
    balance: int | None = None
    entry_id: int | None = None
    available: int | None = None
    hold_expired: bool = False
    tokens: int | None = None
    retry_after_ms: int | None = None
    """Set when the plan throttles overage: the call applied below zero, and the caller should
    wait this long before its next call (TokenBilling.deduct already waited, by default)."""


UsageItems = Sequence[Mapping[str, Any]]
"""Usage items: `{"meter": "llm.output_tokens", "quantity": 800, "dimensions": {"model": ...}}`."""


@dataclass(frozen=True)
class Quote:
    """The price of usage items (public.quote_usage): the total and each item's."""

    tokens: int
    items: list[dict[str, Any]]


def _items(items: UsageItems) -> list[dict[str, Any]]:
    return [dict(item) for item in items]


@dataclass(frozen=True)
class ReservationState:
    """One hold and its outcome, as `public.get_reservation` answers it."""

    reservation_id: uuid.UUID
    status: str
    user_id: uuid.UUID
    amount: int
    expires_at: datetime
    settle_amount: int | None
    charged: int | None
    entry_id: int | None

    def resolved_error(self, key: str | None = None) -> HoldResolved:
        return HoldResolved(
            self.reservation_id,
            self.status,
            key=key,
            amount=self.amount,
            settle_amount=self.settle_amount,
            charged=self.charged,
            entry_id=self.entry_id,
        )


def _one(rows: list[dict[str, Any]], function: str) -> dict[str, Any]:
    if not rows:
        raise RuntimeError(f"{function} returned no row")
    return rows[0]


class Reservation:
    """A pending hold; an async context manager that keeps it alive while the block runs and
    releases it on exit unless it was settled."""

    def __init__(
        self,
        billing: TokenBilling,
        user_id: uuid.UUID | str,
        amount: int,
        key: str,
        ttl: timedelta,
        heartbeat: float | None = 1 / 3,
    ) -> None:
        if heartbeat is not None and not 0 < heartbeat < 1:
            raise ValueError(f"heartbeat must be a fraction of the TTL in (0, 1), got {heartbeat}")
        self._billing = billing
        self.user_id = user_id
        self.amount = amount
        self.key = key
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.id: uuid.UUID | None = None
        self.available: int | None = None
        self.settled: Result | None = None
        self.released: Result | None = None
        # Extensions the heartbeat applied, and whether it found the hold gone (not_pending).
        self.extensions = 0
        self.lost = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Reservation:
        await self.open()
        if self.heartbeat is not None:
            self._heartbeat_task = asyncio.create_task(
                self._keep_alive(self.ttl.total_seconds() * self.heartbeat),
                name=f"token-billing heartbeat {self.id}",
            )
        return self

    async def open(self) -> Reservation:
        """Place the hold without a block (no heartbeat), for work settled later
        (`TokenBilling.settle_many`); nothing releases it but a settle, a release or its TTL.

        Raises InsufficientTokens, UnknownAccount, or HoldResolved when this key's hold already
        resolved (a retried request: do not run the work again)."""
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
        reservation_id = uuid.UUID(str(row["reservation_id"]))
        if status == "duplicate":
            # The key's hold, pending or already resolved: only get_reservation tells which.
            state = await self._billing.reservation(reservation_id)
            if state.status != "pending":
                raise state.resolved_error(self.key)
        self.id = reservation_id
        self.available = row.get("available")
        return self

    async def _keep_alive(self, every_seconds: float) -> None:
        """Extend the hold by its TTL every `every_seconds` until told to stop or the hold is
        gone. A failed extension (the database briefly away) is tried again at the next beat.
        Stopping waits for an extension in flight rather than cancelling it mid-call."""
        while True:
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=every_seconds)
                return
            except TimeoutError:
                pass
            try:
                status, _ = await self.extend()
            except TokenBillingError as exc:
                logger.warning("could not extend hold %s: %s", self.id, exc)
                continue
            if status == "not_pending":
                self.lost = True
                return

    async def _stop_heartbeat(self) -> None:
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            self._stop.set()
            await task

    async def extend(self, ttl: timedelta | None = None) -> tuple[str, datetime]:
        """Move the hold's expiry to now + `ttl` (default: its TTL). Statuses: applied,
        duplicate (not later than it is), not_pending."""
        if self.id is None:
            raise RuntimeError("the reservation is not open")
        row = _one(
            await self._billing.db.rpc(
                "extend_reservation",
                {"p_reservation_id": str(self.id), "p_ttl": ttl or self.ttl},
            ),
            "extend_reservation",
        )
        if row["status"] == "applied":
            self.extensions += 1
        return str(row["status"]), row["expires_at"]

    async def settle(self, actual: int | UsageItems) -> Result:
        """Charge `actual` tokens (0 charges nothing), or usage items priced by the rate card in
        the same transaction (public.record_usage), and release the rest of the hold.

        Above the reservation the excess comes from available tokens, capped at zero: status
        `partial`. If the hold expired before this, the work is charged anyway with one
        deduct_tokens (the Result says `hold_expired`); HoldExpired if the balance no longer
        covers it. HoldResolved if something else settled or released the hold.
        """
        if self.id is None:
            raise RuntimeError("the reservation is not open")
        await self._stop_heartbeat()
        if not isinstance(actual, int):
            return await self._settle_usage(actual)
        row = _one(
            await self._billing.db.rpc(
                "settle_reservation", {"p_reservation_id": str(self.id), "p_amount": actual}
            ),
            "settle_reservation",
        )
        if row["status"] == "not_pending":
            state = await self._billing.reservation(self.id)
            if state.status != "expired":
                raise state.resolved_error(self.key)
            self.settled = await self._charge_after_expiry(actual)
        else:
            self.settled = Result(row["status"], row.get("balance"), row.get("entry_id"))
        return self.settled

    async def _settle_usage(self, items: UsageItems) -> Result:
        if self.id is None:
            raise RuntimeError("the reservation is not open")
        # A hold settles once: its id is the settlement's key, so a retry is a duplicate.
        result = await self._billing.record_usage(
            self.user_id, items, key=f"hold:{self.id}", hold=self.id
        )
        if result.status == "not_pending":
            state = await self._billing.reservation(self.id)
            if state.status != "expired":
                raise state.resolved_error(self.key)
            # The hold expired first: the usage is charged once anyway, as a deduct.
            try:
                charged = await self._billing.record_usage(
                    self.user_id, items, key=f"{HOLD_EXPIRED_KEY}{self.id}"
                )
            except InsufficientTokens as exc:
                raise HoldExpired(
                    self.user_id, exc.requested, reservation_id=self.id, balance=exc.balance
                ) from None
            result = Result(
                charged.status,
                charged.balance,
                charged.entry_id,
                hold_expired=True,
                tokens=charged.tokens,
            )
        self.settled = result
        return result

    async def _charge_after_expiry(self, actual: int) -> Result:
        if self.id is None:
            raise RuntimeError("the reservation is not open")
        if actual == 0:
            return Result("applied", hold_expired=True)
        try:
            charged = await self._billing.deduct(
                self.user_id,
                actual,
                key=f"{HOLD_EXPIRED_KEY}{self.id}",
                description="Usage of a hold that expired before it was settled",
                metadata={"reservation_id": str(self.id)},
            )
        except InsufficientTokens as exc:
            raise HoldExpired(
                self.user_id, actual, reservation_id=self.id, balance=exc.balance
            ) from None
        return Result(charged.status, charged.balance, charged.entry_id, hold_expired=True)

    async def release(self) -> Result:
        """Lift the hold without charging."""
        if self.id is None:
            raise RuntimeError("the reservation is not open")
        await self._stop_heartbeat()
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
        await self._stop_heartbeat()
        if self.id is not None and self.settled is None and self.released is None:
            await self.release()


class TokenBilling:
    """The token-billing RPCs for a backend, over any `token_billing.db.Database`.

    `coalescer` (opt-in, `token_billing.coalescer.DeductCoalescer`): `deduct` calls go through
    it, gathered with concurrent ones into `deduct_tokens_batch` calls; each still gets its own
    result."""

    def __init__(
        self,
        db: Database,
        *,
        coalescer: DeductCoalescer | None = None,
        honour_throttle: bool = True,
    ) -> None:
        self.db = db
        self.coalescer = coalescer
        # A throttled deduct (the plan's overage strategy) answers retry_after_ms: deduct waits
        # that long before it returns, so the caller slows down as the plan asks.
        self.honour_throttle = honour_throttle

    def reserve(
        self,
        user_id: uuid.UUID | str,
        estimate: int,
        *,
        key: str | None = None,
        ttl: timedelta = timedelta(minutes=15),
        heartbeat: float | None = 1 / 3,
    ) -> Reservation:
        """Hold `estimate` tokens; use as `async with`. Pass a `key` (a request id) to make a
        retried request reuse its pending reservation instead of holding twice (and raise
        HoldResolved once that hold resolved). While the block runs, the hold is extended every
        `heartbeat` (a fraction) of `ttl`; None turns that off."""
        return Reservation(
            self, user_id, estimate, key or f"reserve:{uuid.uuid4()}", ttl, heartbeat
        )

    async def reservation(self, reservation_id: uuid.UUID | str) -> ReservationState:
        """One hold and how it resolved (`public.get_reservation`)."""
        rows = await self.db.rpc("get_reservation", {"p_reservation_id": str(reservation_id)})
        row = _one(rows, "get_reservation")
        return ReservationState(
            reservation_id=uuid.UUID(str(reservation_id)),
            status=row["status"],
            user_id=uuid.UUID(str(row["user_id"])),
            amount=row["amount"],
            expires_at=row["expires_at"],
            settle_amount=row.get("settle_amount"),
            charged=row.get("charged"),
            entry_id=row.get("entry_id"),
        )

    async def deduct(
        self,
        user_id: uuid.UUID | str,
        amount: int,
        *,
        key: str,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Result:
        """Charge usage at once; raises InsufficientTokens rather than go below zero, unless the
        plan's overage strategy applies it (throttle: waits `retry_after_ms` first, postpaid)."""
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
        retry_after_ms = row.get("retry_after_ms")
        if retry_after_ms and self.honour_throttle:
            await asyncio.sleep(int(retry_after_ms) / 1000)
        return Result(
            row["status"], row.get("balance"), row.get("entry_id"), retry_after_ms=retry_after_ms
        )

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

    async def quote(self, user_id: uuid.UUID | str, items: UsageItems) -> Quote:
        """The tokens usage items would cost the user now, without charging (an estimate for
        `reserve`)."""
        row = _one(
            await self.db.rpc("quote_usage", {"p_user_id": str(user_id), "p_items": _items(items)}),
            "quote_usage",
        )
        return Quote(int(row["tokens"]), list(row["items"]))

    async def record_usage(
        self,
        user_id: uuid.UUID | str,
        items: UsageItems,
        *,
        key: str,
        hold: uuid.UUID | str | None = None,
    ) -> Result:
        """Price usage items by the rate card and charge them in one transaction: settling
        `hold` (a reservation id), or as a deduct. An item may carry `cost_microcents`, what the
        call cost the provider (else the rate card's cost is recorded, if it has one). Raises
        InsufficientTokens rather than go below zero (a deduct), UnknownAccount;
        `Result.tokens` is what the items cost."""
        row = _one(
            await self.db.rpc(
                "record_usage",
                {
                    "p_user_id": str(user_id),
                    "p_items": _items(items),
                    "p_idempotency_key": key,
                    "p_reservation_id": str(hold) if hold is not None else None,
                },
            ),
            "record_usage",
        )
        if row["status"] == "insufficient_funds":
            raise InsufficientTokens(user_id, int(row["tokens"]), balance=row.get("balance"))
        if row["status"] == "unknown_account":
            raise UnknownAccount(f"no billing account for user {user_id}")
        return Result(
            row["status"], row.get("balance"), row.get("entry_id"), tokens=row.get("tokens")
        )

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
