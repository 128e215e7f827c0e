"""The operator's dashboard: `GET /ops` (the page) and `GET /v1/ops/summary` (its figures).

Both exist only when OPERATOR_TOKEN is set. The page is static (HTML, one script, one
stylesheet, shipped in the package) and holds no data; the figures need
`Authorization: Bearer <OPERATOR_TOKEN>`, compared in constant time. The page keeps the token in
the tab's sessionStorage only (never a cookie, so no other site can make the browser send it),
is never cached, and forbids framing and any script but its own (Content-Security-Policy). The
figures are what the CLI reports (`token-billing report revenue|mrr|usage`, `events parked`),
read as service_role through the same functions.
"""

from __future__ import annotations

import hmac
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute

from token_billing.server import schemas
from token_billing.server.deps import query_model, runtime
from token_billing.server.http_errors import ApiError
from token_billing.server.openapi import ApiRoute, Media
from token_billing.server.settings import Settings

PAGE_DIR = Path(__file__).resolve().parents[1] / "ops_page"
PAGE_FILES = {"ops.js": "text/javascript", "ops.css": "text/css"}
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MAX_DAYS = 3660


class SummaryQuery(schemas.Model):
    """The period: from its first day to the day after its last (UTC); default the last year."""

    error_codes: ClassVar[dict[str, str]] = {"from": "invalid_request", "to": "invalid_request"}

    start: date | None = Field(default=None, alias="from", description="First day, YYYY-MM-DD.")
    end: date | None = Field(default=None, alias="to", description="Day after the last.")

    @model_validator(mode="after")
    def _ordered(self) -> SummaryQuery:
        if self.start is not None and self.end is not None:
            if self.end <= self.start:
                raise ValueError("to must be later than from")
            if (self.end - self.start).days > MAX_DAYS:
                raise ValueError(f"a period spans at most {MAX_DAYS} days")
        return self

    def period(self, today: date) -> tuple[date, date]:
        end = self.end or today + timedelta(days=1)
        start = self.start or date(end.year - 1, end.month, 1)
        if end <= start:
            raise ApiError(422, "invalid_request", "to must be later than from")
        return start, end


class MrrMonth(schemas.Model):
    month_start: datetime
    currency: str
    mrr_start_cents: int
    mrr_end_cents: int
    new_cents: int
    expansion_cents: int
    contraction_cents: int
    churned_cents: int
    subscribers_start: int
    subscribers_end: int
    new_subscribers: int
    churned_subscribers: int
    churn_rate_bp: int | None
    arpu_cents: int | None
    ltv_cents: int | None


class RevenuePeriod(schemas.Model):
    period_start: datetime
    currency: str
    payments: int
    gross_cents: int
    packs_cents: int
    plans_cents: int
    refunds: int
    refunded_cents: int
    disputes_lost: int
    disputed_cents: int
    net_cents: int


class TokenFlow(schemas.Model):
    period_start: datetime
    kind: str
    entries: int
    tokens: int


class ParkedEvent(schemas.Model):
    event_id: str
    type: str
    created: datetime
    attempts: int
    detail: str | None


class Alert(schemas.Model):
    id: int
    kind: str
    subject: str
    period_start: datetime
    currency: str
    detail: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class Summary(schemas.Model):
    """The dashboard's figures for a period (minor units and tokens are integers)."""

    period_from: date = Field(description="The period's first day (UTC).")
    period_to: date = Field(description="The day after its last.")
    revenue: list[RevenuePeriod]
    mrr: list[MrrMonth]
    token_flow: list[TokenFlow]
    parked_events: list[ParkedEvent]
    alerts: list[Alert] = Field(description="The newest alerts (a plan's margin under the floor).")


def check_operator(request: Request, settings: Settings) -> None:
    """401 unless the request carries OPERATOR_TOKEN as its bearer token."""
    expected = settings.operator_token
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if (
        expected is None
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(token.strip().encode(), expected.get_secret_value().encode())
    ):
        raise ApiError(
            401,
            "unauthorized",
            "the dashboard's figures need Authorization: Bearer <OPERATOR_TOKEN>",
            headers={"WWW-Authenticate": 'Bearer realm="operator"'},
        )


async def summary(request: Request) -> Response:
    rt = runtime(request)
    check_operator(request, rt.settings)
    start, end = query_model(request, SummaryQuery).period(datetime.now(UTC).date())
    p_from = datetime(start.year, start.month, start.day, tzinfo=UTC)
    p_to = datetime(end.year, end.month, end.day, tzinfo=UTC)
    revenue = await rt.db.rpc(
        "revenue_report", {"p_from": p_from, "p_to": p_to, "p_granularity": "month"}
    )
    mrr = await rt.db.rpc("mrr_report", {"p_from": p_from, "p_to": p_to})
    flow = await rt.db.rpc(
        "token_flow_report", {"p_from": p_from, "p_to": p_to, "p_granularity": "month"}
    )
    parked = await rt.db.rpc("list_parked_stripe_events", {"p_limit": 20})
    alerts = await rt.db.rpc("list_alerts", {"p_limit": 20})
    body: dict[str, Any] = {
        "period_from": start,
        "period_to": end,
        "revenue": revenue,
        "mrr": mrr,
        "token_flow": flow,
        "parked_events": parked,
        "alerts": alerts,
    }
    response = schemas.respond(Summary.model_validate(body))
    response.headers["Cache-Control"] = "no-store"
    return response


async def page(request: Request) -> Response:
    return FileResponse(PAGE_DIR / "index.html", headers=PAGE_HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in PAGE_FILES:
        raise ApiError(404, "not_found", f"no asset {name!r}")
    return FileResponse(PAGE_DIR / name, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)


def routes(settings: Settings) -> list[BaseRoute]:
    """The dashboard's routes when OPERATOR_TOKEN is set; none otherwise."""
    if settings.operator_token is None:
        return []
    html = Media("text/html", "The dashboard page (static; its figures need the token).")
    return [
        ApiRoute(
            "/v1/ops/summary",
            summary,
            methods=["GET"],
            summary="The operator dashboard's figures: revenue and MRR by month, token flow, "
            "parked events, alerts",
            query=SummaryQuery,
            security="operatorToken",
            tag="operator",
            responses={
                200: Summary,
                401: schemas.ErrorResponse,
                422: schemas.ErrorResponse,
                503: schemas.ErrorResponse,
            },
        ),
        ApiRoute(
            "/ops",
            page,
            methods=["GET"],
            summary="The operator dashboard page",
            tag="operator",
            responses={200: html},
        ),
        ApiRoute(
            "/ops/{name}",
            asset,
            methods=["GET"],
            summary="The dashboard page's script and stylesheet",
            tag="operator",
            responses={
                200: Media("text/javascript", "ops.js or ops.css"),
                404: schemas.ErrorResponse,
            },
        ),
    ]
