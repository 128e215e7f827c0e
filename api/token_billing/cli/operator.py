"""The operator's commands: `token-billing user <id|email>`, `token-billing adjust`,
`token-billing events parked|replay` and `token-billing report
revenue|products|mrr|failures|usage|margin`. They read the same settings as the service and call
its RPCs as service_role."""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from token_billing.cli.settings import server_settings

if TYPE_CHECKING:
    from token_billing.db import Database
    from token_billing.server.settings import Settings


def add_parser(commands: Any) -> None:
    """`user` and `events` under `commands` (argparse subparsers)."""
    u = commands.add_parser(
        "user",
        help="one user: balance, holds, buckets with expiry, last entries, Stripe, parked events",
        description="Everything token-billing knows of one user, read in one snapshot. "
        "Exit 1 when no user has that id or email.",
    )
    u.add_argument("user", metavar="USER", help="the user id (auth.users.id) or email address")
    u.add_argument("--json", action="store_true", help="the report as one JSON object")
    u.set_defaults(run=user)

    a = commands.add_parser(
        "adjust",
        help="credit or debit a user's balance by hand, with a reason",
        description="One `adjustment` ledger entry (public.adjust_tokens) carrying the reason and "
        "the operator. A positive amount credits (a never-expiring bucket); a negative one "
        "debits and never takes available below zero unless --allow-debt. The idempotency key "
        "defaults to one derived from the user, the amount and the reason, so running the same "
        "command twice applies it once (the second answers duplicate); give --idempotency-key "
        "to apply an identical adjustment again on purpose. Exit 1 when nothing was applied "
        "(no such user or account, insufficient funds).",
    )
    a.add_argument("user", metavar="USER", help="the user id (auth.users.id) or email address")
    a.add_argument(
        "amount", metavar="AMOUNT", type=_signed_amount, help="tokens: +50 credits, -50 debits"
    )
    a.add_argument("--reason", required=True, help="why (3..500 characters); kept on the entry")
    a.add_argument("--idempotency-key", dest="key", help="the entry's key (default: derived)")
    a.add_argument(
        "--allow-debt", action="store_true", help="a debit may take the balance below zero"
    )
    a.add_argument("--operator", default=None, help="who is adjusting (default: the login name)")
    a.add_argument("--json", action="store_true", help="the result as one JSON object")
    a.set_defaults(run=adjust)

    e = commands.add_parser(
        "events",
        help="the parked Stripe events: list them, or try them again",
        description="Parked events wait for what they need (a customer link, a plan's price, "
        "the payment they refund). `parked` lists them with the reason; `replay` tries each "
        "again, oldest first (public.replay_parked_stripe_events).",
    )
    actions = e.add_subparsers(
        dest="events_command", required=True, metavar="ACTION", help="parked or replay"
    )
    parked = actions.add_parser(
        "parked",
        help="list the parked events, oldest first",
        description="The parked Stripe events, oldest first, each with why it waits.",
    )
    parked.add_argument(
        "--limit", type=int, default=100, help="at most this many (1..10000, default 100)"
    )
    parked.add_argument("--json", action="store_true", help="JSON lines, one event a line")
    parked.set_defaults(run=events_parked)
    replay = actions.add_parser(
        "replay",
        help="try every parked event again, oldest first",
        description="Feeds every parked event to the handler again, oldest first, and prints "
        "what each did; those whose cause is still there stay parked.",
    )
    replay.add_argument("--json", action="store_true", help="JSON lines, one event a line")
    replay.set_defaults(run=events_replay)

    r = commands.add_parser(
        "report",
        help="figures for a period: revenue, products, MRR, failed payments, the token flow, "
        "margin",
        description="revenue: payments, refunds, lost disputes and net by period and currency; "
        "products: what each product sold in the period earned; mrr: MRR by calendar month "
        "(UTC) per currency, with new, expansion, contraction and churned MRR, subscribers, "
        "churn rate, ARPU and LTV; failures: the failed-payment rate of invoices; usage: tokens "
        "granted, used, expired (breakage) and clawed back by period and kind; margin: revenue "
        "attributed (cash basis: what users paid in the period, net) against the provider cost "
        "of their usage, per plan, user or in total. Money in minor units (costs in micro-cents), "
        "never mixing currencies.",
    )
    reports = r.add_subparsers(
        dest="report",
        required=True,
        metavar="REPORT",
        help="revenue, products, mrr, failures, usage or margin",
    )
    for name, text in [
        ("revenue", "payments, refunds, lost disputes and net by period and currency"),
        ("products", "what each product sold in the period earned"),
        ("mrr", "MRR by month with its movements, churn, ARPU and LTV"),
        ("failures", "invoices tried, failed at least once, recovered, and the failure rate"),
        ("usage", "tokens by period and ledger kind"),
        ("margin", "revenue attributed against the provider cost of usage, by plan, user or total"),
    ]:
        one = reports.add_parser(name, help=text, description=text + ".")
        one.add_argument(
            "--from", dest="start", required=True, type=_date, help="first day, YYYY-MM-DD (UTC)"
        )
        one.add_argument(
            "--to", dest="end", required=True, type=_date, help="the day after the last, YYYY-MM-DD"
        )
        if name in ("revenue", "products", "mrr", "margin"):
            one.add_argument("--currency", help="only this currency (ISO code)")
        if name == "margin":
            one.add_argument(
                "--group", choices=("plan", "user", "total"), default="plan",
                help="rows per plan (default), per user, or one per period and currency",
            )  # fmt: skip
            one.add_argument(
                "--check-floor",
                action="store_true",
                help="also check each period against billing.settings.margin_floor_bp: raise an "
                "alert (billing.alerts) for every plan under it and exit 3 when there is one",
            )
        if name in ("usage", "revenue", "failures", "margin"):
            one.add_argument(
                "--by", choices=("day", "week", "month"), default="month",
                help="the period (default month)",
            )  # fmt: skip
        one.add_argument("--csv", action="store_true", help="CSV with a header row")
        one.set_defaults(run=report)


def _run(command: str, args: argparse.Namespace, work: Callable[[Database], Awaitable[int]]) -> int:
    settings = server_settings(command, args.env_file)
    if settings is None:
        return 2
    return asyncio.run(_with_database(settings, work))


async def _with_database(settings: Settings, work: Callable[[Database], Awaitable[int]]) -> int:
    from token_billing.errors import DatabaseError, DatabaseUnavailable
    from token_billing.server.database import database_from_settings, describe

    db = database_from_settings(settings)
    await db.open()
    try:
        return await work(db)
    except (DatabaseUnavailable, DatabaseError) as exc:
        print(f"token-billing: the database ({describe(settings)}) failed: {exc}", file=sys.stderr)
        return 1
    finally:
        await db.close()


def _when(value: Any) -> str:
    """A timestamp from the database (ISO text in jsonb, or a datetime), to the minute, in UTC."""
    if value is None:
        return "never"
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _signed(amount: int) -> str:
    return f"+{amount}" if amount > 0 else str(amount)


def render_user(report: Mapping[str, Any]) -> list[str]:
    """The report of public.describe_user as lines for a terminal."""
    a = report["account"] or {}
    lines = [f"user {report['user_id']} {report.get('email') or '(no email)'}"]
    if not a:
        lines.append("account: none (the user has no billing account)")
    else:
        lines.append(
            f"account: balance {a['balance']}, available {a['available']}, reserved "
            f"{a['reserved']}; plan {a['plan']} ({a['subscription_status']})"
        )
    holds: Sequence[Mapping[str, Any]] = report["holds"]
    lines.append(f"holds: {len(holds)} pending")
    lines += [
        f"  {h['id']} {h['amount']} tokens, expires {_when(h['expires_at'])} "
        f"(key {h['idempotency_key']})"
        for h in holds
    ]
    buckets: Sequence[Mapping[str, Any]] = report["buckets"]
    lines.append(f"buckets: {len(buckets)} live")
    lines += [
        f"  {b['remaining']} of {b['amount']} ({b['kind']}, entry {b['entry_id']}), "
        + (f"expires {_when(b['expires_at'])}" if b["expires_at"] else "no expiry")
        for b in buckets
    ]
    entries: Sequence[Mapping[str, Any]] = report["entries"]
    lines.append(f"entries: newest {len(entries)}")
    lines += [
        f"  #{e['id']} {_when(e['created_at'])} {e['kind']} {_signed(e['amount'])} -> "
        f"{e['balance_after']}" + (f"  {e['description']}" if e.get("description") else "")
        for e in entries
    ]
    customers = report["stripe_customers"]
    lines.append(f"stripe customers: {', '.join(customers) if customers else 'none'}")
    lines += [
        f"  subscription {s['id']}: {s['product_code']} {s['status']}, period ends "
        f"{_when(s['current_period_end'])}"
        + (" (cancels then)" if s["cancel_at_period_end"] else "")
        for s in report["subscriptions"]
    ]
    payments: Sequence[Mapping[str, Any]] = report["payments"]
    lines.append(f"payments: newest {len(payments)}")
    lines += [
        f"  {p['id']} {p['product_code']} x{p['quantity']}: {p['amount_paid_cents']} "
        f"{p['currency'] or ''}, {p['tokens']} tokens, refunded {p['refunded_cents']}"
        for p in payments
    ]
    parked: Sequence[Mapping[str, Any]] = report["parked_events"]
    lines.append(f"parked events: {len(parked)}")
    lines += [f"  {e['id']} {e['type']} ({e['attempts']} tries): {e['detail']}" for e in parked]
    return lines


def user(args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        rows = await db.rpc("describe_user", {"p_user": args.user})
        if not rows:
            print(f"token-billing: no user {args.user!r}", file=sys.stderr)
            return 1
        report = rows[0]["report"]
        if isinstance(report, str):  # PostgREST hands jsonb back parsed; psycopg too. Be sure.
            report = json.loads(report)
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            print("\n".join(render_user(report)))
        return 0

    return _run("user", args, work)


def _print_events(rows: Sequence[Mapping[str, Any]], as_json: bool, empty: str) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(dict(row), default=str))
        return
    if not rows:
        print(empty)
    for row in rows:
        extra = f" {_when(row['created'])}, {row['attempts']} tries" if "attempts" in row else ""
        status = f" -> {row['status']}" if "status" in row else ""
        print(f"{row['event_id']} {row['type']}{extra}{status}: {row['detail']}")


def events_parked(args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        rows = await db.rpc("list_parked_stripe_events", {"p_limit": args.limit})
        _print_events(rows, args.json, "no parked events")
        return 0

    return _run("events parked", args, work)


def events_replay(args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        rows = await db.rpc("replay_parked_stripe_events")
        _print_events(rows, args.json, "no parked events to replay")
        return 0

    return _run("events replay", args, work)


def _date(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d")
    when = None
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        when = datetime.fromisoformat(value)
    return when.astimezone(UTC).strftime("%Y-%m-%d") if when else str(value)


def render_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rows as aligned columns: text left, numbers right."""
    if not rows:
        return ["(no rows)"]
    names = list(rows[0])
    cells = [[_cell(row[n]) for n in names] for row in rows]
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    numeric = [all(isinstance(row[n], int) or row[n] is None for row in rows) for n in names]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return [line(names), *(line(c) for c in cells)]


def report(args: argparse.Namespace) -> int:
    if args.end <= args.start:
        print("token-billing: --to must be later than --from", file=sys.stderr)
        return 2

    async def work(db: Database) -> int:
        if args.report == "mrr":
            rows = await db.rpc(
                "mrr_report",
                {"p_from": args.start, "p_to": args.end, "p_currency": args.currency},
            )
        elif args.report == "revenue":
            rows = await db.rpc(
                "revenue_report",
                {
                    "p_from": args.start,
                    "p_to": args.end,
                    "p_granularity": args.by,
                    "p_currency": args.currency,
                },
            )
        elif args.report == "failures":
            rows = await db.rpc(
                "payment_failure_report",
                {"p_from": args.start, "p_to": args.end, "p_granularity": args.by},
            )
        elif args.report == "products":
            rows = await db.rpc(
                "revenue_by_product",
                {"p_from": args.start, "p_to": args.end, "p_currency": args.currency},
            )
        elif args.report == "margin":
            rows = await db.rpc(
                "margin_report",
                {
                    "p_from": args.start,
                    "p_to": args.end,
                    "p_granularity": args.by,
                    "p_group_by": args.group,
                    "p_currency": args.currency,
                },
            )
        else:
            rows = await db.rpc(
                "token_flow_report",
                {"p_from": args.start, "p_to": args.end, "p_granularity": args.by},
            )
        if args.csv:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(list(rows[0]) if rows else [])
            for row in rows:
                writer.writerow([_cell(v) for v in row.values()])
        else:
            print("\n".join(render_table(rows)))
        if args.report == "margin" and args.check_floor:
            return await check_floor(db, args.start, args.end, args.by)
        return 0

    return _run(f"report {args.report}", args, work)


def _periods(start: datetime, end: datetime, by: str) -> list[datetime]:
    """The first instant of every period (day, week from Monday, month; UTC) that meets
    [start, end)."""
    if by == "month":
        at = start.replace(day=1)
    elif by == "week":
        at = start - timedelta(days=start.weekday())
    else:
        at = start
    periods = []
    while at < end:
        periods.append(at)
        if by == "month":
            at = at.replace(year=at.year + at.month // 12, month=at.month % 12 + 1)
        else:
            at += timedelta(days=7 if by == "week" else 1)
    return periods


async def check_floor(db: Database, start: datetime, end: datetime, by: str) -> int:
    """public.check_margin_floor for every period of the report: 3 when a plan is under the
    floor (each such plan is then an alert row), else 0."""
    breaches: list[Mapping[str, Any]] = []
    for period in _periods(start, end, by):
        for row in await db.rpc(
            "check_margin_floor", {"p_period_start": period, "p_granularity": by}
        ):
            breaches.append({"period_start": period, **row})
    if not breaches:
        print("margin floor: no plan under it (or no floor set: billing.settings.margin_floor_bp)")
        return 0
    for b in breaches:
        print(
            f"margin floor: plan {b['plan']} {b['currency']} {_cell(b['period_start'])}: margin "
            f"{b['margin_bp']} bp < floor {b['floor_bp']} bp (alert {b['alert_id']})",
            file=sys.stderr,
        )
    return 3


def _signed_amount(text: str) -> int:
    try:
        amount = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens") from None
    if amount == 0:
        raise argparse.ArgumentTypeError("the amount must not be 0")
    return amount


def adjustment_key(user_id: str, amount: int, reason: str) -> str:
    """The default key of `adjust`: the same user, amount and reason make the same key, so a
    command run twice applies once."""
    digest = hashlib.sha256(f"{user_id}\n{amount}\n{reason.strip()}".encode()).hexdigest()
    return f"adjust:{user_id}:{digest[:32]}"


def adjust(args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        rows = await db.rpc("describe_user", {"p_user": args.user})
        if not rows:
            print(f"token-billing: no user {args.user!r}", file=sys.stderr)
            return 1
        report = rows[0]["report"]
        if isinstance(report, str):
            report = json.loads(report)
        user_id = str(report["user_id"])
        key = args.key or adjustment_key(user_id, args.amount, args.reason)
        result = (
            await db.rpc(
                "adjust_tokens",
                {
                    "p_user_id": user_id,
                    "p_amount": args.amount,
                    "p_reason": args.reason,
                    "p_idempotency_key": key,
                    "p_allow_debt": args.allow_debt,
                    "p_operator": args.operator or _login(),
                },
            )
        )[0]
        outcome = {"user_id": user_id, "amount": args.amount, "idempotency_key": key, **result}
        if args.json:
            print(json.dumps(outcome, default=str))
        elif result["status"] in ("applied", "duplicate"):
            again = " (already applied: nothing changed)" if result["status"] == "duplicate" else ""
            print(
                f"{result['status']}: {_signed(args.amount)} tokens for {user_id}, balance "
                f"{result['balance']}, entry {result['entry_id']}{again}"
            )
        else:
            print(
                f"token-billing: {result['status']} for {user_id}"
                + (
                    f" (balance {result['balance']}; --allow-debt lets a debit go below zero)"
                    if result["status"] == "insufficient_funds"
                    else ""
                ),
                file=sys.stderr,
            )
        return 0 if result["status"] in ("applied", "duplicate") else 1

    return _run("adjust", args, work)


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None
