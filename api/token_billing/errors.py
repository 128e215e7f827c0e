"""The errors the client and the database layer raise, all under one base class.

    try:
        async with tokens.reserve(user_id, estimate, key=request_id) as r:
            ...
    except InsufficientTokens as exc:
        ...  # exc.requested, exc.available: the numbers the database answered with
    except TokenBillingError:
        ...  # anything else token-billing refused, or the database being unreachable

Nothing here knows HTTP: the service maps these to statuses in token_billing.server.http_errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Final


class TokenBillingError(Exception):
    """The base class of every error token-billing raises on purpose."""


class DatabaseUnavailable(TokenBillingError):
    """The database cannot be reached (connection refused or lost, pool exhausted, timeout).

    Nothing was committed by the call that raised it: retry it with the same idempotency key.
    """

    def __init__(self, message: str = "the database is unavailable; retry later") -> None:
        super().__init__(message)
        self.message = message


class DatabaseError(TokenBillingError):
    """A database call failed with a SQLSTATE (`sqlstate`), in the function `function`.

    The RPCs raise documented SQLSTATEs on purpose: 22023 for an invalid argument (the message
    names it), TBKEY for an idempotency key reused with other arguments, TBRES for an unknown
    reservation. Those three raise the subclasses below; any other SQLSTATE raises this class.
    """

    def __init__(self, sqlstate: str | None, message: str, *, function: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.function = function


class InvalidArgument(DatabaseError):
    """SQLSTATE 22023: an argument is null, out of range or of an unknown kind."""


class IdempotencyConflict(DatabaseError):
    """SQLSTATE TBKEY: the idempotency key was used before with other arguments."""


class ReservationNotFound(DatabaseError):
    """SQLSTATE TBRES: no reservation has this id."""


_BY_SQLSTATE: Final[Mapping[str, type[DatabaseError]]] = {
    "22023": InvalidArgument,
    "TBKEY": IdempotencyConflict,
    "TBRES": ReservationNotFound,
}


def database_error(sqlstate: str | None, message: str, *, function: str = "") -> DatabaseError:
    """The DatabaseError for a SQLSTATE: its subclass when it has one."""
    cls = _BY_SQLSTATE.get(sqlstate or "", DatabaseError)
    return cls(sqlstate, message, function=function)


class UnknownAccount(TokenBillingError):
    """No billing account exists for the user."""


class InsufficientTokens(TokenBillingError):
    """The user's available tokens do not cover the amount; nothing was charged or held.

    `available` is what `reserve_tokens` answered (balance minus what is reserved); `balance`
    is what `deduct_tokens` answered. Each is None when the call did not return it.
    """

    def __init__(
        self,
        user_id: uuid.UUID | str,
        requested: int,
        available: int | None = None,
        *,
        balance: int | None = None,
    ) -> None:
        if available is not None:
            message = f"user {user_id} has {available} tokens available, {requested} were requested"
        elif balance is not None:
            message = (
                f"user {user_id} has a balance of {balance} tokens, not enough available "
                f"for the {requested} requested"
            )
        else:
            message = (
                f"user {user_id} has not enough tokens available for the {requested} requested"
            )
        super().__init__(message)
        self.user_id = user_id
        self.requested = requested
        self.available = available
        self.balance = balance


class HoldExpired(InsufficientTokens):
    """The hold expired before the work settled, and the balance no longer covers what it used.

    The client charges work whose hold expired anyway with one `deduct_tokens` keyed
    `hold-expired:<reservation id>`; when that is refused, nothing was charged and this is
    raised: `requested` is what the work used, `balance` what `deduct_tokens` answered.
    """

    def __init__(
        self,
        user_id: uuid.UUID | str,
        requested: int,
        *,
        reservation_id: uuid.UUID,
        balance: int | None = None,
    ) -> None:
        super().__init__(user_id, requested, balance=balance)
        self.reservation_id = reservation_id
        self.args = (
            f"hold {reservation_id} expired before it was settled, and {self.args[0]}; "
            "nothing was charged",
        )


class HoldResolved(TokenBillingError):
    """The hold of this idempotency key (or of this reservation) already resolved.

    Raised when reserving with the key of a hold that was settled, released or expired (a
    retried request), and when settling a hold that something else resolved. The work must not
    run again as if it held tokens: return the answer stored for the first request. The earlier
    outcome: `status` (settled, released or expired), `amount` (held), `settle_amount` (what
    settle was asked to charge, settled only), `charged` (what the ledger charged, settled
    only), `entry_id` (that ledger entry, if any).
    """

    def __init__(
        self,
        reservation_id: uuid.UUID,
        status: str,
        *,
        key: str | None = None,
        amount: int | None = None,
        settle_amount: int | None = None,
        charged: int | None = None,
        entry_id: int | None = None,
    ) -> None:
        if status == "settled":
            outcome = f"settled: {charged} of the {amount} held tokens were charged"
        else:
            outcome = f"{status}: none of the {amount} held tokens were charged"
        subject = (
            f"the hold of key {key!r} (reservation {reservation_id})"
            if key
            else (f"hold {reservation_id}")
        )
        super().__init__(f"{subject} already resolved, {outcome}")
        self.reservation_id = reservation_id
        self.status = status
        self.key = key
        self.amount = amount
        self.settle_amount = settle_amount
        self.charged = charged
        self.entry_id = entry_id
