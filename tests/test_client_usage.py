"""token_billing.client with the rate card: quote, record_usage, and a hold settled with the
usage items it covered (PostgresDatabase on a fresh database)."""

from __future__ import annotations

import pytest

from scripts.pgcluster import Database
from tests.app_support import account, new_user
from tests.test_client import run
from token_billing import IdempotencyConflict, InsufficientTokens, TokenBilling
from token_billing.client import Quote, Result

CALL = [
    {"meter": "llm.input_tokens", "quantity": 1200, "dimensions": {"model": "gpt-4o"}},
    {"meter": "llm.output_tokens", "quantity": 800, "dimensions": {"model": "gpt-4o"}},
]


def test_quote_should_price_without_charging(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> Quote:
        return await tokens.quote(user, CALL)

    quote = run(db, body)
    assert quote.tokens == 11
    assert [item["tokens"] for item in quote.items] == [3, 8]
    assert account(db, user)["balance"] == 100


def test_record_usage_should_charge_once_per_key(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> tuple[Result, Result]:
        first = await tokens.record_usage(user, CALL, key="call-1")
        again = await tokens.record_usage(user, CALL, key="call-1")
        with pytest.raises(IdempotencyConflict):
            await tokens.record_usage(user, CALL[:1], key="call-1")
        with pytest.raises(InsufficientTokens):
            await tokens.record_usage(
                user, [{"meter": "agent.run", "quantity": 1000}], key="call-2"
            )
        return first, again

    first, again = run(db, body)
    assert (first.status, first.tokens, first.balance) == ("applied", 11, 89)
    assert (again.status, again.entry_id) == ("duplicate", first.entry_id)
    assert account(db, user)["balance"] == 89


def test_a_hold_should_settle_with_usage_items(db: Database) -> None:
    user = new_user(db)

    async def body(tokens: TokenBilling) -> Result:
        quote = await tokens.quote(user, CALL)
        async with tokens.reserve(user, quote.tokens, key="req-1") as hold:
            return await hold.settle(
                [{"meter": "llm.output_tokens", "quantity": 500, "dimensions": {"model": "gpt-4o"}}]
            )

    settled = run(db, body)
    assert (settled.status, settled.tokens, settled.balance) == ("applied", 5, 95)
    assert account(db, user) == {"balance": 95, "reserved": 0, "plan": "free", "status": "none"}
