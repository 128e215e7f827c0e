"""The request and response bodies of the HTTP API, as pydantic models.

They validate what comes in (token_billing.server.deps.read_model and query_model answer a 422
naming the field), build what goes out (`respond`), and are the OpenAPI document's schemas
(token_billing.server.openapi). Field names and meanings are the contract (docs/contract.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
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
    return JSONResponse(model.model_dump(mode="json"), status_code=status, headers=headers)


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


class ProductList(Model):
    """The active catalog."""

    products: list[Product]


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
