"""Coalesce concurrent deduct calls into `deduct_tokens_batch` calls (opt-in).

    from token_billing.coalescer import DeductCoalescer

    tokens = TokenBilling(db, coalescer=DeductCoalescer(db))
    await tokens.deduct(user_id, 12, key=request_id)    # as before: its own result

An agent backend that charges many small calls pays one round trip and one commit per
`deduct_tokens`; on a hot account the commits queue one behind the other. The coalescer gathers
the deduct calls that arrive within `window_seconds` of each other (or `max_items`, whichever
comes first) into one `public.deduct_tokens_batch` call: one transaction, one commit, one row per
item with the status `deduct_tokens` would have answered. Each caller gets its own row back, and
its idempotency key goes into the batch unchanged, so a retried call still answers `duplicate`.

A batch that fails as a whole (one item's key reused with other arguments, a malformed item, a
deadlock, a lost connection) is retried item by item with `deduct_tokens`: every caller then
gets exactly what a direct call would have answered, its own error included. Retrying is safe
because every item carries its key: an item the failed batch did commit answers `duplicate`.

When a batch leaves while other slots are free, it is split over them by account (every item
of one account in the same part, so parts never wait on each other's row locks): the parts run
as concurrent transactions, on as many server processes, instead of one batch holding every
caller until its one transaction ends.

The price is latency: a call waits up to `window_seconds` before its batch leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from token_billing.db import Database, Row

# deduct_tokens's parameter -> the field of a deduct_tokens_batch item.
_ITEM_FIELDS = {
    "p_user_id": "user_id",
    "p_amount": "amount",
    "p_idempotency_key": "idempotency_key",
    "p_description": "description",
    "p_metadata": "metadata",
}
BATCH_ITEMS_MAX = 1000

__all__ = ["BATCH_ITEMS_MAX", "DeductCoalescer"]


@dataclass
class _Pending:
    params: dict[str, Any]
    future: asyncio.Future[Row] = field(repr=False)


class DeductCoalescer:
    """Gathers concurrent `deduct_tokens` calls into `deduct_tokens_batch` calls.

    `window_seconds`: how long the first call of a batch waits for others (default 2 ms).
    `max_items`: a batch leaves at once when it has this many items (at most 1000).
    `max_in_flight`: batches sent at the same time; more wait for one of them to finish.
    `split_min_items`: a leaving batch is split over the free slots into parts of at least this
    many items (by account); 0 never splits.
    """

    def __init__(
        self,
        db: Database,
        *,
        window_seconds: float = 0.002,
        max_items: int = 200,
        max_in_flight: int = 4,
        split_min_items: int = 8,
    ) -> None:
        if not 1 <= max_items <= BATCH_ITEMS_MAX:
            raise ValueError(f"max_items must be 1..{BATCH_ITEMS_MAX}, got {max_items}")
        if window_seconds < 0 or max_in_flight < 1 or split_min_items < 0:
            raise ValueError(
                "window_seconds must be >= 0, max_in_flight >= 1 and split_min_items >= 0"
            )
        self.db = db
        self.window_seconds = window_seconds
        self.max_items = max_items
        self.max_in_flight = max_in_flight
        self.split_min_items = split_min_items
        self._slots = asyncio.Semaphore(max_in_flight)
        self._busy = 0
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting_senders = 0
        # Counters for operators and the bench: deduct_tokens_batch calls made, items they held.
        self.batches_sent = 0
        self.items_sent = 0

    async def deduct(self, params: Mapping[str, Any]) -> Row:
        """The row `deduct_tokens(**params)` answers (status, balance, entry_id), from a batch;
        raises what a direct `deduct_tokens` call with these parameters would raise."""
        loop = asyncio.get_running_loop()
        pending = _Pending(dict(params), loop.create_future())
        _item(pending.params)  # an unknown parameter fails here, in its caller
        self._pending.append(pending)
        if self._waiting_senders == 0:
            if len(self._pending) >= self.max_items:
                self._flush()
            elif self._timer is None:
                self._timer = loop.call_later(self.window_seconds, self._flush)
        return await pending.future

    async def aclose(self) -> None:
        """Send what is gathered and wait for every batch in flight."""
        while self._pending or self._tasks:
            if self._pending and self._waiting_senders == 0:
                self._flush()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _flush(self) -> None:
        """Hand what is pending to a sender; it takes the batch once it has a slot."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        self._waiting_senders += 1
        self._start(self._send())

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the max_in_flight slots, counted in _busy while held (what _split reads)."""
        async with self._slots:
            self._busy += 1
            try:
                yield
            finally:
                self._busy -= 1

    async def _send(self) -> None:
        async with self._slot():
            self._waiting_senders -= 1
            # The batch is what is pending when a slot frees: while every slot is busy, calls
            # keep gathering into the next batch instead of queueing as small ones.
            batch = self._pending[: self.max_items]
            del self._pending[: self.max_items]
            if self._pending and self._waiting_senders == 0:
                self._flush()
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            parts = self._split(live)
            for part in parts[1:]:
                self._start(self._send_part(part))
            await self._execute(parts[0])

    def _split(self, live: list[_Pending]) -> list[list[_Pending]]:
        """The batch in parts for the free slots: whole accounts per part, sizes balanced."""
        free = self.max_in_flight - self._busy
        if self.split_min_items == 0 or free == 0:
            return [live]
        by_account: dict[str, list[_Pending]] = {}
        for pending in live:
            by_account.setdefault(str(pending.params.get("p_user_id")), []).append(pending)
        count = min(free + 1, len(live) // self.split_min_items, len(by_account))
        if count < 2:
            return [live]
        parts: list[list[_Pending]] = [[] for _ in range(count)]
        for group in sorted(by_account.values(), key=len, reverse=True):
            min(parts, key=len).extend(group)
        return parts

    def _start(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_part(self, live: list[_Pending]) -> None:
        async with self._slot():
            await self._execute(live)

    async def _execute(self, live: list[_Pending]) -> None:
        """One deduct_tokens_batch call for these callers; each gets its own answer."""
        items = [_item(p.params) for p in live]
        self.batches_sent += 1
        self.items_sent += len(items)
        try:
            rows = await self.db.rpc("deduct_tokens_batch", {"p_items": items})
        except Exception:  # every caller gets its own answer below
            await self._one_by_one(live)
            return
        answered = {int(row["item"]): row for row in rows}
        unanswered = []
        for index, pending in enumerate(live):
            row = answered.get(index)
            if row is None or row.get("status") == "insufficient_funds":
                # A refusal is re-asked of deduct_tokens itself: the plan's overage strategy
                # (throttle, postpaid) is decided there, and the refused item wrote nothing.
                unanswered.append(pending)
            elif not pending.future.done():
                pending.future.set_result(
                    {key: row.get(key) for key in ("status", "balance", "entry_id")}
                )
        if unanswered:
            await self._one_by_one(unanswered)

    async def _one_by_one(self, batch: list[_Pending]) -> None:
        for pending in batch:
            if pending.future.done():
                continue
            try:
                rows = await self.db.rpc("deduct_tokens", pending.params)
            except Exception as exc:  # handed to its caller
                if not pending.future.done():
                    pending.future.set_exception(exc)
                continue
            if pending.future.done():
                continue
            if rows:
                pending.future.set_result(rows[0])
            else:
                pending.future.set_exception(RuntimeError("deduct_tokens returned no row"))


def _item(params: Mapping[str, Any]) -> dict[str, Any]:
    """A deduct_tokens_batch item from deduct_tokens's parameters."""
    item = {}
    for name, value in params.items():
        field_name = _ITEM_FIELDS.get(name)
        if field_name is None:
            raise ValueError(f"deduct_tokens takes no parameter {name!r}")
        item[field_name] = value
    return item
