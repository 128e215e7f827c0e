"""Prometheus metrics, one registry per app so that two apps (or two tests) never share counts.

Besides the service's own counters, the registry holds the business figures
(`BusinessMetrics`): what public.business_metrics() answered, asked at most once every
METRICS_BUSINESS_SECONDS by the /metrics endpoints, so a scrape costs the database nothing in
between and never a scan of the ledger's history (the migration keeps its totals incrementally).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from token_billing.db import Database

__all__ = ["CONTENT_TYPE_LATEST", "BusinessMetrics", "Metrics"]

logger = logging.getLogger("token_billing.server")

# What each business figure is; a name ending in _total is a counter (it only grows).
BUSINESS_HELP = {
    "token_billing_subscribers": "Stripe subscriptions active, trialing or past due, by plan "
    "and status.",
    "token_billing_revenue_cents_total": "Net revenue (paid less refunded and lost in disputes) "
    "in the currency's minor unit, all time, by currency.",
    "token_billing_tokens_granted_total": "Tokens credited, by ledger kind (purchase, "
    "subscription, signup, promotion, adjustment, ...).",
    "token_billing_tokens_used_total": "Tokens debited by usage.",
    "token_billing_tokens_expired_total": "Tokens that expired unused (breakage).",
    "token_billing_tokens_taken_back_total": "Tokens debited otherwise (clawback, dispute, "
    "adjustment), by ledger kind.",
    "token_billing_ledger_totals_through_timestamp_seconds": "The ledger's token counters count "
    "the entries created before this time (they lag by the refresh's lag, 10 minutes).",
    "token_billing_stripe_events_parked": "Stripe events parked, waiting for what they need.",
    "token_billing_invoice_payment_failures_total": "invoice.payment_failed events stored.",
    "token_billing_alerts": "Alerts raised (billing.alerts), by kind.",
}

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

        self.business = BusinessMetrics()
        self.registry.register(self.business)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def refresh(self) -> None:
        """Ask the database for the business figures if the cached ones are older than allowed
        (a no-op without a database attached, or with METRICS_BUSINESS_SECONDS=0)."""
        await self.business.refresh()


class BusinessMetrics(Collector):
    """The last answer of public.business_metrics(), as Prometheus families."""

    def __init__(self) -> None:
        self._db: Database | None = None
        self._ttl_seconds = 0.0
        self._rows: list[Mapping[str, Any]] = []
        self._fetched_at: float | None = None
        self._failures = 0
        self._lock = asyncio.Lock()

    def attach(self, db: Database, ttl_seconds: float) -> None:
        """Refresh from `db` at most every `ttl_seconds` (0: never; no business figures)."""
        self._db = db
        self._ttl_seconds = ttl_seconds

    def detach(self) -> None:
        self._db = None

    def stale(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._fetched_at is None or now - self._fetched_at >= self._ttl_seconds

    async def refresh(self) -> None:
        if self._db is None or self._ttl_seconds <= 0 or not self.stale():
            return
        async with self._lock:
            if not self.stale():  # another scrape refreshed while this one waited
                return
            from token_billing.errors import DatabaseError, DatabaseUnavailable

            try:
                rows = await self._db.rpc("business_metrics", {})
            except (DatabaseError, DatabaseUnavailable) as exc:
                # Serve the last figures; the failures counter says they are old.
                self._failures += 1
                logger.warning(
                    "business metrics unavailable", extra={"fields": {"error": str(exc)}}
                )
                self._fetched_at = time.monotonic()
                return
            self._rows = list(rows)
            self._fetched_at = time.monotonic()

    def set_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """The figures as public.business_metrics() answers them (for tests)."""
        self._rows = list(rows)
        self._fetched_at = time.monotonic()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        by_name: dict[str, list[Mapping[str, Any]]] = {}
        for row in self._rows:
            by_name.setdefault(str(row["metric"]), []).append(row)
        for name, rows in sorted(by_name.items()):
            label_names = sorted({key for row in rows for key in (row["labels"] or {})})
            family: CounterMetricFamily | GaugeMetricFamily
            if name.endswith("_total"):
                family = CounterMetricFamily(
                    name.removesuffix("_total"), BUSINESS_HELP.get(name, name), labels=label_names
                )
            else:
                family = GaugeMetricFamily(name, BUSINESS_HELP.get(name, name), labels=label_names)
            for row in rows:
                labels = row["labels"] or {}
                family.add_metric(
                    [str(labels.get(n, "")) for n in label_names], float(row["value"] or 0)
                )
            yield family
        failures = CounterMetricFamily(
            "token_billing_business_metrics_failures",
            "Refreshes of the business figures that failed (the last figures were served).",
        )
        failures.add_metric([], float(self._failures))
        yield failures
