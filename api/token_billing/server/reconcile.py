"""What Stripe says happened, against what the database stored (`token-billing stripe reconcile`).

A webhook Stripe gave up on, an endpoint that was misconfigured for a day, a deployment that was
down: each leaves an event the database never stored, and Stripe never sends it again. A run
1. lists the events of the window from Stripe's Events API (Stripe keeps 30 days of them),
2. asks the database which of them it never stored (`public.stripe_events_unknown`),
3. feeds each of those, oldest first, to `public.handle_stripe_event`, the one RPC the webhook
   makes, so an event applies exactly as if it had been delivered (and at most once, however
   often the run repeats: the handler is idempotent on the event id),
4. lists the paid Checkout Sessions, PaymentIntents and invoices of the window and asks which
   of this plugin's have no credit, or one that disagrees with what was paid
   (`public.stripe_credit_drift`).

Nothing else changes, so a run is safe to repeat and to schedule.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import stripe

from token_billing.db import Database, JsonText
from token_billing.errors import DatabaseError

# Stripe's Events API returns the events of the last 30 days only.
EVENTS_RETENTION_SECONDS = 30 * 86_400
# The SQL functions take at most this many ids or objects per call.
BATCH = 1000

_SPAN = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_since(text: str) -> int:
    """`72h`, `30m`, `7d` or `2w` as seconds; refuses what Stripe no longer keeps."""
    match = _SPAN.match(text)
    if not match:
        raise ValueError(f"--since {text!r}: a span like 30m, 72h, 7d or 2w")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"--since {text!r}: the span must be longer than 0")
    if seconds > EVENTS_RETENTION_SECONDS:
        raise ValueError(
            f"--since {text!r}: Stripe's Events API keeps 30 days of events; use at most 30d"
        )
    return seconds


@dataclass(frozen=True)
class Replay:
    """An event the database had never stored, and what feeding it to the handler did."""

    event_id: str
    type: str
    created: int
    status: str  # the handler's status (applied, ignored, parked, ...), or "error", or "dry_run"
    detail: str | None

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.created))
        verb = "would replay" if self.status == "dry_run" else "replayed"
        outcome = "" if self.status == "dry_run" else f": {self.status}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{verb} {self.event_id} {self.type} of {when} UTC{outcome}{detail}"


@dataclass(frozen=True)
class Drift:
    """A paid object of this plugin whose credit is missing or disagrees with the payment."""

    object_id: str
    object_type: str
    problem: str  # not_credited, amount_differs, currency_differs
    paid_cents: int | None
    currency: str | None
    credited_cents: int | None
    credited_currency: str | None
    detail: str | None

    def line(self) -> str:
        paid = f"paid {self.paid_cents} {self.currency}"
        if self.problem == "not_credited":
            told = "not credited"
        else:
            told = f"credited for {self.credited_cents} {self.credited_currency}"
        return f"drift {self.object_type} {self.object_id}: {paid}, {told} ({self.detail})"


@dataclass
class Report:
    since: int
    events_listed: int = 0
    objects_checked: int = 0
    replays: list[Replay] = field(default_factory=list)
    drifts: list[Drift] = field(default_factory=list)

    @property
    def failed(self) -> list[Replay]:
        return [r for r in self.replays if r.status == "error"]

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "summary",
            "since": self.since,
            "events_listed": self.events_listed,
            "events_unknown": len(self.replays),
            "replayed": sum(r.status not in ("dry_run", "error") for r in self.replays),
            "failed": len(self.failed),
            "objects_checked": self.objects_checked,
            "drifts": len(self.drifts),
        }

    def json_lines(self) -> list[str]:
        lines = [json.dumps({"kind": "replay", **asdict(r)}) for r in self.replays]
        lines += [json.dumps({"kind": "drift", **asdict(d)}) for d in self.drifts]
        lines.append(json.dumps(self.summary()))
        return lines

    def text_lines(self) -> list[str]:
        s = self.summary()
        since = time.strftime("%Y-%m-%d %H:%M", time.gmtime(self.since))
        lines = [
            f"events: {s['events_listed']} listed since {since} UTC, "
            f"{s['events_unknown']} never stored"
        ]
        lines += [r.line() for r in self.replays]
        lines.append(
            f"payments: {s['objects_checked']} paid sessions, intents and invoices checked"
        )
        lines += [d.line() for d in self.drifts]
        lines.append(
            f"reconcile: {s['replayed']} replayed, {s['failed']} failed, {s['drifts']} drift"
            + ("" if s["drifts"] == 1 else "s")
        )
        return lines


Progress = Callable[[str, int], None]


def _no_progress(stage: str, count: int) -> None:
    pass


async def _listed(
    first: Awaitable[stripe.ListObject[Any]], progress: Progress, stage: str
) -> list[dict[str, Any]]:
    """Every object of a Stripe list, page by page (starting_after), as plain dicts."""
    page = await first
    out: list[dict[str, Any]] = []
    iterator: AsyncIterator[Any] = page.auto_paging_iter().__aiter__()
    async for obj in iterator:
        out.append(obj.to_dict(for_json=True))  # decimals as Stripe sends them: strings
        if len(out) % 100 == 0:
            progress(stage, len(out))
    progress(stage, len(out))
    return out


async def reconcile(
    client: stripe.StripeClient,
    db: Database,
    *,
    since_seconds: int,
    dry_run: bool = False,
    now: float | None = None,
    progress: Progress = _no_progress,
) -> Report:
    since = int((time.time() if now is None else now) - since_seconds)
    report = Report(since=since)

    events = await _listed(
        client.v1.events.list_async({"created": {"gte": since}, "limit": 100}), progress, "events"
    )
    report.events_listed = len(events)
    unknown: set[str] = set()
    for start in range(0, len(events), BATCH):
        ids = [e["id"] for e in events[start : start + BATCH]]
        rows = await db.rpc("stripe_events_unknown", {"p_event_ids": ids})
        unknown.update(str(row["event_id"]) for row in rows)
    # The list is newest first; replay oldest first, as Stripe would have delivered them.
    lost = [e for e in reversed(events) if e["id"] in unknown]
    lost.sort(key=lambda e: int(e.get("created") or 0))
    for n, event in enumerate(lost, 1):
        progress("replay", n)
        status, detail = "dry_run", None
        if not dry_run:
            try:
                rows = await db.rpc("handle_stripe_event", {"p_event": JsonText(json.dumps(event))})
            except DatabaseError as exc:
                status, detail = "error", f"{exc.sqlstate}: {exc}"
            else:
                row = rows[0] if rows else {}
                status, detail = str(row.get("status") or "error"), row.get("detail")
        report.replays.append(
            Replay(
                event["id"], str(event.get("type")), int(event.get("created") or 0), status, detail
            )
        )

    sessions = await _listed(
        client.v1.checkout.sessions.list_async(
            {"created": {"gte": since}, "status": "complete", "limit": 100}
        ),
        progress,
        "sessions",
    )
    intents = await _listed(
        client.v1.payment_intents.list_async({"created": {"gte": since}, "limit": 100}),
        progress,
        "payment intents",
    )
    invoices = await _listed(
        client.v1.invoices.list_async({"created": {"gte": since}, "status": "paid", "limit": 100}),
        progress,
        "invoices",
    )
    objects = sessions + [i for i in intents if i.get("status") == "succeeded"] + invoices
    report.objects_checked = len(objects)
    for start in range(0, len(objects), BATCH):
        rows = await db.rpc(
            "stripe_credit_drift",
            {"p_objects": JsonText(json.dumps(objects[start : start + BATCH]))},
        )
        report.drifts.extend(
            Drift(
                object_id=str(row["object_id"]),
                object_type=str(row["object_type"]),
                problem=str(row["problem"]),
                paid_cents=row["paid_cents"],
                currency=row["currency"],
                credited_cents=row["credited_cents"],
                credited_currency=row["credited_currency"],
                detail=row["detail"],
            )
            for row in rows
        )
    return report
