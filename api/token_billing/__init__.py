"""token-billing: token (credit) billing for AI products on Supabase and Stripe.

The client needs only psycopg (the core install); the HTTP service is the `server` extra
(token_billing.server), and the `token-billing` command is token_billing.cli.

    from token_billing import TokenBilling
    from token_billing.db import PostgresDatabase

    db = PostgresDatabase(database_url)
    await db.open()
    tokens = TokenBilling(db)
    async with tokens.reserve(user_id, estimate, key=request_id) as r:
        await r.settle(actual_tokens_used)
"""

from token_billing.client import Reservation, ReservationState, Result, TokenBilling
from token_billing.errors import (
    DatabaseError,
    DatabaseUnavailable,
    HoldExpired,
    HoldResolved,
    IdempotencyConflict,
    InsufficientTokens,
    InvalidArgument,
    ReservationNotFound,
    TokenBillingError,
    UnknownAccount,
)

__version__ = "0.2.0.dev0"

__all__ = [
    "DatabaseError",
    "DatabaseUnavailable",
    "HoldExpired",
    "HoldResolved",
    "IdempotencyConflict",
    "InsufficientTokens",
    "InvalidArgument",
    "Reservation",
    "ReservationNotFound",
    "ReservationState",
    "Result",
    "TokenBilling",
    "TokenBillingError",
    "UnknownAccount",
    "__version__",
]
