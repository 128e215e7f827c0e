"""The Stripe calls the service makes, with the async StripeClient.

Every POST carries an Idempotency-Key derived from what it does, so a retry (ours, the stripe
library's after a network error or 5xx, or the user's double click) makes one object, never two.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import stripe

from token_billing.server.http_errors import ApiError
from token_billing.server.metrics import Metrics
from token_billing.server.settings import Settings

logger = logging.getLogger("token_billing.stripe")


def idempotency_key(*parts: object) -> str:
    """A stable key from the parts: the same parts give the same key (at most 255 characters)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f"tb-{parts[0]}-{digest[:48]}"


def stripe_error(exc: stripe.StripeError, operation: str) -> ApiError:
    """A clean ApiError for a failed Stripe call; details go to the log, not to the caller."""
    request_id = getattr(exc, "request_id", None)
    fields = {
        "operation": operation,
        "stripe_error": type(exc).__name__,
        "stripe_code": exc.code,
        "http_status": exc.http_status,
        "stripe_request_id": request_id,
    }
    suffix = f" (Stripe request {request_id})" if request_id else ""
    if isinstance(exc, stripe.CardError):
        logger.info("stripe card error", extra={"fields": fields})
        reason = f" ({exc.code})" if exc.code else ""
        return ApiError(402, "payment_failed", f"the payment was declined{reason}")
    if isinstance(exc, stripe.IdempotencyError):
        logger.warning("stripe idempotency error", extra={"fields": fields})
        return ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request",
        )
    if isinstance(exc, stripe.RateLimitError):
        logger.warning("stripe rate limit", extra={"fields": fields})
        return ApiError(
            503,
            "stripe_busy",
            "Stripe is rate limiting; retry shortly" + suffix,
            headers={"Retry-After": "2"},
        )
    if isinstance(exc, stripe.APIConnectionError):
        logger.warning("stripe unreachable", extra={"fields": fields})
        return ApiError(
            503,
            "stripe_unavailable",
            "Stripe cannot be reached; retry shortly",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        logger.error("stripe refused the service's key", extra={"fields": fields})
        return ApiError(
            502, "stripe_misconfigured", "the payment provider refused the request" + suffix
        )
    logger.error("stripe request failed", extra={"fields": fields})
    return ApiError(502, "stripe_error", "the payment provider failed the request" + suffix)


def stripe_not_configured() -> ApiError:
    """409 for a Stripe call with the key `make dev` made up, which the real Stripe refuses."""
    return ApiError(
        409,
        "stripe_not_configured",
        "Stripe is not configured: make dev runs with a generated placeholder key. Put your "
        "Stripe test key (sk_test_...) in .env as STRIPE_SECRET_KEY and restart make dev "
        "(then `token-billing stripe sync-products` prices the catalog)",
    )


class HTTPXClient(stripe.HTTPXClient):
    """stripe's async httpx transport, sending the form body as `content=`.

    The library passes the encoded body as httpx's `data=<str>`, which httpx deprecates (a
    DeprecationWarning on every request); the bytes on the wire are the same.
    """

    def _get_request_args_kwargs(  # type: ignore[no-untyped-def]
        self, method: str, url: str, headers: Mapping[str, str], post_data
    ):
        args, kwargs = super()._get_request_args_kwargs(method, url, headers, post_data)
        data = kwargs.pop("data", None)
        if isinstance(data, str | bytes):
            kwargs["content"] = data
        elif data:
            kwargs["data"] = data
        return args, kwargs


def make_client(settings: Settings) -> tuple[stripe.StripeClient, HTTPXClient]:
    """The async StripeClient for these settings, and its transport (close it when done)."""
    http = HTTPXClient(timeout=settings.stripe_timeout_seconds)
    client = stripe.StripeClient(
        settings.stripe_secret_key.get_secret_value(),
        base_addresses={"api": settings.stripe_api_base_url},
        max_network_retries=settings.stripe_max_network_retries,
        http_client=http,
    )
    return client, http


def _metadata(values: Mapping[str, object]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}


class StripeGateway:
    """The StripeClient the service uses, its metrics, and its error mapping."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.client, self._http = make_client(settings)
        self._metrics = metrics
        self._placeholder_key = settings.stripe_key_generated

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def _call(self, operation: str, coro: Any) -> Any:
        if self._placeholder_key:
            coro.close()  # never sent: Stripe would refuse the key after a network round trip
            raise stripe_not_configured()
        started = time.perf_counter()
        try:
            return await coro
        except stripe.StripeError as exc:
            self._metrics.stripe_errors.labels(operation, type(exc).__name__).inc()
            raise stripe_error(exc, operation) from exc
        finally:
            self._metrics.stripe_latency.labels(operation).observe(time.perf_counter() - started)

    async def create_customer(self, user_id: str, email: str | None) -> str:
        """A new customer for the user; the key makes concurrent or retried calls make one."""
        params: dict[str, Any] = {"metadata": {"user_id": user_id}}
        if email:
            params["email"] = email
        customer = await self._call(
            "customers.create",
            self.client.v1.customers.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key("customer", user_id)},
            ),
        )
        return str(customer.id)

    async def create_checkout_session(self, params: Mapping[str, Any], key: str) -> dict[str, Any]:
        """The new session as Stripe returned it (the service records it before handing it out)."""
        session = await self._call(
            "checkout.sessions.create",
            self.client.v1.checkout.sessions.create_async(
                params=dict(params),  # type: ignore[arg-type]
                options={"idempotency_key": key},
            ),
        )
        return dict(session.to_dict())

    async def create_payment_intent(self, params: Mapping[str, Any], key: str) -> dict[str, Any]:
        """A PaymentIntent for the Payment Element, as Stripe returned it."""
        intent = await self._call(
            "payment_intents.create",
            self.client.v1.payment_intents.create_async(
                params=dict(params),  # type: ignore[arg-type]
                options={"idempotency_key": key},
            ),
        )
        return dict(intent.to_dict())

    @property
    def placeholder_key(self) -> bool:
        """True with the key `make dev` made up (every call would be refused)."""
        return self._placeholder_key

    async def checkout_line_items(self, session_id: str) -> list[dict[str, Any]]:
        """A Checkout Session's line items (price id and quantity), at most 100."""
        page = await self._call(
            "checkout.sessions.line_items",
            self.client.v1.checkout.sessions.line_items.list_async(
                session_id, params={"limit": 100}
            ),
        )
        return [
            {
                "price": {"id": item.price.id if item.price else None},
                "quantity": item.quantity,
            }
            for item in page.data
        ]

    async def create_portal_session(self, customer_id: str, return_url: str, key: str) -> str:
        session = await self._call(
            "billing_portal.sessions.create",
            self.client.v1.billing_portal.sessions.create_async(
                params={"customer": customer_id, "return_url": return_url},
                options={"idempotency_key": key},
            ),
        )
        return str(session.url)

    # --- Stripe Connect (the marketplace) ---------------------------------------------------

    async def create_express_account(self, user_id: str, email: str | None) -> str:
        """The creator's Express account; the key is the user's, so it is made once."""
        params: dict[str, Any] = {
            "type": "express",
            "metadata": {"user_id": user_id},
            "capabilities": {
                "card_payments": {"requested": True},
                "transfers": {"requested": True},
            },
        }
        if email:
            params["email"] = email
        account = await self._call(
            "accounts.create",
            self.client.v1.accounts.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key("creator-account", user_id)},
            ),
        )
        return str(account.id)

    async def create_account_link(
        self, account_id: str, refresh_url: str, return_url: str, key: str
    ) -> str:
        """An onboarding AccountLink (a single-use URL that expires in minutes)."""
        link = await self._call(
            "account_links.create",
            self.client.v1.account_links.create_async(
                params={
                    "account": account_id,
                    "refresh_url": refresh_url,
                    "return_url": return_url,
                    "type": "account_onboarding",
                },
                options={"idempotency_key": key},
            ),
        )
        return str(link.url)

    async def create_login_link(self, account_id: str, key: str) -> str:
        """A login link to the creator's Express dashboard."""
        link = await self._call(
            "accounts.login_links.create",
            self.client.v1.accounts.login_links.create_async(
                account_id, options={"idempotency_key": key}
            ),
        )
        return str(link.url)

    @staticmethod
    def metadata(values: Mapping[str, object]) -> dict[str, str]:
        return _metadata(values)
