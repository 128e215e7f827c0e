"""Prometheus metrics, one registry per app so that two apps (or two tests) never share counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's collectors, registered in their own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "token_billing_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "token_billing_http_request_duration_seconds",
            "Time from request to the end of the response, by route template.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "token_billing_webhook_events",
            "Stripe webhook deliveries by event type and outcome (handle_stripe_event status, or "
            "invalid_signature, invalid_payload, too_large, incomplete, database_unavailable, "
            "error).",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.webhook_latency = Histogram(
            "token_billing_webhook_handle_duration_seconds",
            "Time of the handle_stripe_event call for one delivery, by outcome.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.checkout_sessions = Counter(
            "token_billing_checkout_sessions_created",
            "Stripe Checkout Sessions created, by product kind (pack or plan).",
            ["kind"],
            registry=self.registry,
        )
        self.portal_sessions = Counter(
            "token_billing_portal_sessions_created",
            "Stripe billing portal sessions created.",
            registry=self.registry,
        )
        self.stripe_errors = Counter(
            "token_billing_stripe_errors",
            "Stripe API calls that failed after the library's retries, by operation and error.",
            ["operation", "error"],
            registry=self.registry,
        )
        self.stripe_latency = Histogram(
            "token_billing_stripe_request_duration_seconds",
            "Time of one Stripe API operation including retries.",
            ["operation"],
            buckets=_LATENCY_BUCKETS_SECONDS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
