"""The request and response bodies of the HTTP API, as pydantic models.

They validate what comes in (token_billing.server.deps.read_model and query_model answer a 422
naming the field), build what goes out (`respond`), and are the OpenAPI document's schemas
(token_billing.server.openapi). Field names and meanings are the contract (docs/contract.md).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from starlette.responses import JSONResponse

from token_billing.server.openapi import Media, Response


class Model(BaseModel):
    """A body of the API. `error_codes` maps a field to the error code a bad value of it gets."""

    model_config = ConfigDict(extra="ignore")
    error_codes: ClassVar[Mapping[str, str]] = {}


def respond(
    model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The model as a JSON response (built through the model, so it matches the document)."""
    return JSONResponse(
        model.model_dump(mode="json", by_alias=True), status_code=status, headers=headers
    )


# --- errors ------------------------------------------------------------------------------------


class ErrorDetail(Model):
    code: str = Field(description="A stable, machine-readable code, e.g. unknown_product.")
    message: str = Field(description="What went wrong, for a person; no secrets, no traces.")


class ErrorResponse(Model):
    """An error: its code and a message for the caller."""

    error: ErrorDetail


# What every route for signed-in users may answer besides its own statuses: no or a bad token,
# the database (or Stripe) unavailable for now.
SIGNED_IN_ERRORS: Mapping[int, Response] = {401: ErrorResponse, 503: ErrorResponse}


# --- purchases ---------------------------------------------------------------------------------


class PurchaseRequest(Model):
    """What to buy: a product code of the catalog (GET /v1/products) and how many."""

    error_codes: ClassVar[Mapping[str, str]] = {
        "product": "invalid_request",
        "quantity": "invalid_quantity",
        "interval": "invalid_interval",
    }

    product: StrictStr = Field(
        min_length=1,
        max_length=200,
        description="A product code, e.g. pack_100 (a pack) or starter (a plan).",
        examples=["pack_100"],
    )
    quantity: StrictInt = Field(
        default=1,
        ge=1,
        le=100,
        description="How many packs (1 to 100); a plan is bought with 1.",
    )
    interval: Literal["month", "year"] | None = Field(
        default=None,
        description=(
            "Plans only: the billing interval of the price to subscribe at (month, the default, or "
            "year when the plan has an annual price)."
        ),
        examples=["year"],
    )


class CheckoutSession(Model):
    """A Stripe Checkout Session: send the browser to `url`."""

    id: str = Field(description="The Checkout Session id, cs_...")
    url: str = Field(description="Stripe's hosted checkout page.")


class PortalSession(Model):
    """A Stripe billing portal session: send the browser to `url`."""

    url: str = Field(description="Stripe's hosted billing portal.")


class PaymentIntentSession(Model):
    """A PaymentIntent for a pack, for Stripe's Payment Element."""

    id: str = Field(description="The PaymentIntent id, pi_...")
    client_secret: str = Field(description="What the Payment Element needs to confirm it.")


# --- balance, ledger, catalog ------------------------------------------------------------------


class Balance(Model):
    """The signed-in user's balance: the fields of public.my_tokens()."""

    balance: int = Field(description="Tokens held, reserved ones included (negative: debt).")
    available: int = Field(description="balance - reserved: what may be spent now.")
    reserved: int = Field(description="Tokens held by pending reservations.")
    plan: str = Field(description="The plan's product code (free without a subscription).")
    subscription_status: str = Field(description="Stripe's subscription status, or none.")


class Entitlements(Model):
    """What the signed-in user's plan entitles them to: the fields of public.my_entitlements()."""

    plan: str = Field(description="The plan subscribed to (free without a subscription).")
    subscription_status: str = Field(description="Stripe's subscription status, or none.")
    entitled_plan: str = Field(
        description="The plan whose entitlements apply now: the own, or free once a past_due "
        "subscription's grace period is over."
    )
    limits: dict[str, int | float | None] = Field(
        description='Host-defined limits, e.g. {"max_agents": 3}; null: unlimited.'
    )
    features: list[str] = Field(description="Host-defined feature keys, e.g. api_access.")
    grace_until: datetime | None = Field(
        default=None, description="past_due only: when the plan's entitlements end."
    )
    period_tokens: int = Field(
        description="The plan's tokens per period: the low-balance warning is a share of it."
    )


class LedgerQuery(Model):
    error_codes: ClassVar[Mapping[str, str]] = {"limit": "invalid_limit"}

    limit: int = Field(default=20, ge=1, le=100, description="How many entries (1 to 100).")


class LedgerEntry(Model):
    id: int
    amount: int = Field(description="Signed: credits positive, debits negative.")
    balance_after: int
    kind: str = Field(description="purchase, subscription, usage, expiry, refund, signup, ...")
    description: str | None = None
    created_at: datetime


class LedgerPage(Model):
    """The user's most recent ledger entries, newest first."""

    entries: list[LedgerEntry]


class ProductPrice(Model):
    """One price of a plan: per month or per year, in a currency."""

    interval: Literal["month", "year"]
    currency: str
    unit_amount: int = Field(description="The price per interval in the currency's minor unit.")
    purchasable: bool = Field(description="Has a Stripe price: checkout can sell it.")


class Product(Model):
    code: str
    kind: Literal["pack", "plan"]
    name: str
    description: str | None = None
    tokens: int = Field(description="Tokens per pack, or per billing period of a plan.")
    price_cents: int | None = None
    currency: str | None = None
    rollover: bool = False
    sort_order: int = 0
    purchasable: bool = Field(description="Has a Stripe price: checkout can sell it.")
    prices: list[ProductPrice] = Field(
        default_factory=list,
        description="Plans: every price it sells at (monthly, annual), for the pricing cards.",
    )


class ProductList(Model):
    """The active catalog."""

    products: list[Product]


# --- the marketplace (Stripe Connect) ------------------------------------------------------------


class CreatorOnboarding(Model):
    """The creator's connected account and where to send the browser to onboard."""

    stripe_account_id: str = Field(description="The creator's Stripe Express account, acct_...")
    url: str = Field(description="Stripe's onboarding page (an AccountLink; single use).")
    charges_enabled: bool = Field(description="The account can take charges (list agents).")
    payouts_enabled: bool = Field(description="The account can be paid out.")


class CreatorDashboard(Model):
    """A login link to the creator's Stripe Express dashboard."""

    url: str = Field(description="Stripe's Express dashboard (a login link; single use).")


class ListingRequest(Model):
    """An agent to sell: a one-off price in cents, a price in tokens per run, or both."""

    error_codes: ClassVar[Mapping[str, str]] = {
        "code": "invalid_request",
        "name": "invalid_request",
        "price_cents": "invalid_price",
        "tokens_per_run": "invalid_price",
    }

    code: StrictStr = Field(
        min_length=1,
        max_length=64,
        pattern="^[a-z0-9_]+$",
        description="The listing's product code (a-z, 0-9, _).",
        examples=["agent_summarizer"],
    )
    name: StrictStr = Field(min_length=1, max_length=200, description="Display name.")
    description: StrictStr | None = Field(default=None, max_length=2000)
    price_cents: StrictInt | None = Field(
        default=None, ge=50, le=99_999_999, description="One-off price in cents (USD)."
    )
    tokens_per_run: StrictInt = Field(
        default=0, ge=0, le=1_000_000_000, description="Tokens one run costs (0: none)."
    )
    active: bool = Field(default=True, description="Listed (only with charges_enabled).")


class Listing(Model):
    code: str
    name: str
    description: str | None = None
    price_cents: int | None = Field(default=None, description="One-off price, minor units.")
    currency: str
    tokens_per_run: int = Field(description="Tokens one run costs (0: not sold per run).")
    creator_id: uuid.UUID
    purchasable: bool = Field(description="Can be bought now (a price, creator can take charges).")


class ListingResult(Model):
    """What upsert_listing did: applied (new), updated or duplicate (unchanged)."""

    status: str
    code: str


class ListingList(Model):
    """The active agent listings."""

    listings: list[Listing]


class CreatorPayout(Model):
    id: uuid.UUID
    period: str
    amount_cents: int
    currency: str
    status: str = Field(description="pending, paid or failed.")
    stripe_transfer_id: str | None = None
    reversed_cents: int


class CreatorEarning(Model):
    """One entry of the creator's earnings ledger (public.my_creator_earnings, through RLS)."""

    id: int
    kind: str = Field(
        description="usage_share, usage_share_reversed, debt, payout, payout_returned, ..."
    )
    amount_microcents: int = Field(description="Signed: credits positive, debits negative.")
    balance_microcents: int = Field(description="The earnings balance after this entry.")
    product_code: str | None = Field(default=None, description="The listing it came from.")
    tokens: int | None = Field(default=None, description="Tokens spent (a usage share).")
    created_at: datetime


class CreatorSummary(Model):
    """The signed-in creator's account state, earnings and payouts."""

    # The latest earnings entries the summary carries.
    RECENT_EARNINGS: ClassVar[int] = 10

    stripe_account_id: str
    charges_enabled: bool
    payouts_enabled: bool
    details_submitted: bool
    requirements_due: list[str] = Field(
        description="What Stripe needs now (requirements.currently_due and past_due of the last "
        "account.updated), e.g. external_account."
    )
    disabled_reason: str | None = Field(
        default=None, description="Stripe's requirements.disabled_reason (null: none)."
    )
    deauthorized_at: datetime | None = Field(
        default=None, description="When the account left the platform (no sales nor payouts)."
    )
    commission_bps: int = Field(description="The platform's commission, basis points.")
    currency: Literal["usd"] = Field(
        default="usd", description="The earnings' currency (creators earn in USD)."
    )
    balance_microcents: int = Field(description="Earnings owed now, millionths of a cent.")
    settled_microcents: int = Field(description="Of which payable now (past the hold).")
    earned_microcents: int = Field(description="Usage revenue share earned in total.")
    debt_microcents: int = Field(description="Debt entries (refunds, disputes beyond the balance).")
    paid_out_cents: int = Field(description="Paid out in total, net of returns.")
    recent_earnings: list[CreatorEarning] = Field(
        description="The latest earnings entries (at most 10), newest first."
    )
    payouts: list[CreatorPayout]


# --- usage, holds and API keys (agent backends) --------------------------------------------------

# What every route for agent backends may answer besides its own statuses: no or a bad key (401),
# a key without the route's scope or a user's session instead of a key (403), the key over its
# rate (429, Retry-After), the database unavailable (503).
AGENT_ERRORS: Mapping[int, Response] = {
    401: ErrorResponse,
    403: ErrorResponse,
    429: ErrorResponse,
    503: ErrorResponse,
}


class UsageItem(Model):
    """What one model call (or run, or report) used: a meter of the catalog and a quantity."""

    meter: StrictStr = Field(
        min_length=1, max_length=64, description="A meter code, e.g. llm.input_tokens."
    )
    quantity: StrictInt = Field(
        ge=0, le=1_000_000_000_000, description="How much, in the meter's unit."
    )
    dimensions: dict[str, StrictStr] = Field(
        default_factory=dict,
        max_length=16,
        description='e.g. {"model": "gpt-4o"}: the meter\'s dimension picks the price.',
    )
    cost_microcents: StrictInt | None = Field(
        default=None,
        ge=0,
        le=1_000_000_000_000_000,
        description="What the call cost the provider, in micro-cents (10^-6 of a cent) of the "
        "cost currency; default: the rate card's cost for the meter, if it has one.",
    )


class UsageRequest(Model):
    """Usage to price and charge at once (public.record_usage)."""

    error_codes: ClassVar[Mapping[str, str]] = {"items": "invalid_items"}

    items: list[UsageItem] = Field(min_length=1, max_length=100)
    hold_id: uuid.UUID | None = Field(
        default=None, description="A pending hold to settle with this usage (else a deduct)."
    )


class QuoteRequest(Model):
    """Usage to price without charging (public.quote_usage)."""

    error_codes: ClassVar[Mapping[str, str]] = {"items": "invalid_items"}

    items: list[UsageItem] = Field(min_length=1, max_length=100)


class PricedItem(Model):
    meter: str
    quantity: int
    dimensions: dict[str, str]
    price_id: int = Field(description="The price version it was priced at.")
    percent_off: int | None = Field(default=None, description="The customer discount applied.")
    tokens: int
    cost_microcents: int | None = Field(
        default=None, description="The provider's cost in micro-cents; null when unknown."
    )


class Quote(Model):
    """The price of the items: total tokens and each item's."""

    tokens: int
    items: list[PricedItem]


class UsageResult(Model):
    """The usage was priced and charged (statuses of deduct_tokens / settle_reservation)."""

    status: Literal["applied", "partial", "duplicate"]
    tokens: int = Field(description="What the items were priced at.")
    balance: int | None = Field(description="The balance after the charge.")
    entry_id: int | None = Field(description="The ledger entry; null when it cost nothing.")


class UsageQuery(Model):
    error_codes: ClassVar[Mapping[str, str]] = {
        "from": "invalid_period",
        "to": "invalid_period",
        "group_by": "invalid_group_by",
    }
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    from_: datetime | None = Field(
        default=None, alias="from", description="Start (inclusive); default: this month (UTC)."
    )
    to: datetime | None = Field(default=None, description="End (exclusive); default: now.")
    group_by: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9_]{1,64}$",
        description="A dimension to break each meter down by, e.g. model.",
    )

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _iso_only(cls, value: object) -> object:
        # pydantic would also read a number as seconds since 1970: the document says date-time.
        if isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}", value):
            raise ValueError("must be an ISO 8601 date or date-time, e.g. 2026-12-01T00:00:00Z")
        return value


class UsageLine(Model):
    meter: str
    unit: str
    dimension: str | None = Field(description="The group_by dimension's value, if asked.")
    quantity: int
    tokens: int
    records: int


class UsageSummary(Model):
    """Quantities and tokens per meter (and dimension) for a period."""

    from_: datetime = Field(serialization_alias="from")
    to: datetime
    meters: list[UsageLine]


class HoldRequest(Model):
    """Hold tokens for work about to run: an amount, or the quote of the usage expected."""

    error_codes: ClassVar[Mapping[str, str]] = {
        "amount": "invalid_amount",
        "items": "invalid_items",
        "ttl_seconds": "invalid_ttl",
    }

    amount: StrictInt | None = Field(default=None, ge=1, le=1_000_000_000_000_000)
    items: list[UsageItem] | None = Field(default=None, min_length=1, max_length=100)
    ttl_seconds: StrictInt = Field(
        default=900, ge=1, le=604_800, description="Seconds until it expires."
    )


class Hold(Model):
    """A pending hold (public.reserve_tokens)."""

    id: uuid.UUID
    status: Literal["applied", "duplicate"]
    amount: int
    available: int | None = Field(description="Available tokens right after the hold.")


class SettleRequest(Model):
    """What the held work used: usage items (priced now) or a number of tokens (0 releases)."""

    error_codes: ClassVar[Mapping[str, str]] = {
        "amount": "invalid_amount",
        "items": "invalid_items",
    }

    amount: StrictInt | None = Field(default=None, ge=0, le=1_000_000_000_000_000)
    items: list[UsageItem] | None = Field(default=None, min_length=1, max_length=100)


class Settlement(Model):
    """The hold was settled or released."""

    status: Literal["applied", "partial", "duplicate"]
    tokens: int | None = Field(description="What the usage was priced at (items only).")
    balance: int | None
    entry_id: int | None


class ExtendRequest(Model):
    error_codes: ClassVar[Mapping[str, str]] = {"ttl_seconds": "invalid_ttl"}

    ttl_seconds: StrictInt = Field(ge=1, le=604_800, description="Seconds from now.")


class Extension(Model):
    """The hold's expiry (public.extend_reservation)."""

    status: Literal["applied", "duplicate"]
    expires_at: datetime | None


class Release(Model):
    """The hold was lifted without a charge."""

    status: Literal["applied", "duplicate"]
    available: int | None


Scope = Literal["usage:read", "usage:write", "balance:read"]
ALL_SCOPES: tuple[Scope, ...] = ("usage:read", "usage:write", "balance:read")


class ApiKeyRequest(Model):
    """A new API key for the signed-in user."""

    error_codes: ClassVar[Mapping[str, str]] = {
        "scopes": "invalid_scopes",
        "expires_at": "invalid_expiry",
    }

    name: StrictStr | None = Field(default=None, min_length=1, max_length=100)
    scopes: list[Scope] = Field(
        default_factory=lambda: list(ALL_SCOPES),
        min_length=1,
        max_length=3,
    )
    expires_at: datetime | None = Field(default=None, description="Default: never.")


class ApiKeyInfo(Model):
    id: uuid.UUID
    name: str | None
    lookup: str = Field(description="The key's first 20 characters, to tell keys apart.")
    scopes: list[str]
    environment: Literal["live", "test"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(description="Up to a minute stale.")


class NewApiKey(ApiKeyInfo):
    """The key, shown this once: only its hash is kept."""

    key: str = Field(description="tb_live_... or tb_test_...: store it now, never shown again.")


class ApiKeyList(Model):
    """The signed-in user's API keys, newest first (no secrets)."""

    api_keys: list[ApiKeyInfo]


class Revoked(Model):
    """The key authenticates nothing from now on."""

    id: uuid.UUID
    status: Literal["applied", "duplicate"]
    revoked_at: datetime


# --- Stripe webhooks -----------------------------------------------------------------------------


class StripeEventData(Model):
    model_config = ConfigDict(extra="allow")

    object: dict[str, Any] = Field(description="The Stripe object the event is about.")


class StripeEvent(Model):
    """A Stripe v1 snapshot event, as Stripe signs and sends it (Stripe-Signature header)."""

    model_config = ConfigDict(extra="allow")

    id: StrictStr
    object: Literal["event"]
    type: StrictStr
    data: StripeEventData


class WebhookResult(Model):
    """The event is stored with its outcome (public.handle_stripe_event)."""

    status: Literal["applied", "duplicate", "ignored", "stale", "parked"]
    detail: str | None = None


# --- operators and the demo page ---------------------------------------------------------------


class Health(Model):
    """The process answers."""

    status: Literal["ok"]


class Ready(Model):
    """The database answers and has every migration of this version of token-billing."""

    status: Literal["ready"]
    version: str = Field(description="The token-billing version whose schema is installed.")
    migrations: int = Field(description="How many migrations that version has.")


class DevUser(Model):
    id: str
    email: str


class DevSession(Model):
    """An access token for the demo user (development only)."""

    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    user: DevUser


class PageConfig(Model):
    """What the demo page reads: where the API is, and whether Supabase Realtime is set up."""

    apiUrl: str  # the page's JSON keys are camelCase
    supabaseUrl: str | None
    supabaseAnonKey: str | None
    devSignIn: bool
    stripePublishableKey: str | None = None


PROMETHEUS_TEXT = Media(
    "text/plain; version=0.0.4",
    "Prometheus metrics in the text exposition format.",
)
EVENT_STREAM = Media(
    "text/event-stream",
    'Server-Sent Events: `status` {"live": bool}, `balance` with the fields of GET '
    '/v1/balance on every change, comment lines as heartbeats, and `end` {"reason": '
    '"token_expired"} before the stream closes when the access token expires (reconnect '
    "with a fresh one).",
)
