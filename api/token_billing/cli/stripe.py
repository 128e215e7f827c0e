"""`token-billing stripe trigger` (a signed, realistic event to the running service),
`token-billing stripe sync-products` (Stripe Products and Prices from billing.products) and
`token-billing stripe reconcile` (events and payments Stripe has that the database lacks)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from token_billing.cli.settings import server_settings
from token_billing.cli.stripe_events import TRIGGERABLE

if TYPE_CHECKING:
    from token_billing.server.settings import Settings


def add_parser(commands: Any) -> None:
    """`stripe trigger` and `stripe sync-products` under `commands` (argparse subparsers)."""
    stripe_cmd = commands.add_parser(
        "stripe",
        help="Stripe helpers: send a test event, sync the catalog",
        description="Stripe helpers. They read STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET and the "
        "database settings like the service.",
    )
    stripe_commands = stripe_cmd.add_subparsers(
        dest="stripe_command",
        required=True,
        metavar="COMMAND",
        help="trigger, sync-products or reconcile",
    )

    t = stripe_commands.add_parser(
        "trigger",
        help="send a signed, realistic Stripe event to the running service",
        description="Builds the event Stripe would send, signs it with STRIPE_WEBHOOK_SECRET "
        "and posts it to URL/v1/webhooks/stripe.",
    )
    t.add_argument(
        "event",
        choices=TRIGGERABLE,
        metavar="EVENT",
        help="the event type: " + ", ".join(TRIGGERABLE),
    )
    t.add_argument("--user", required=True, help="the user id (auth.users.id)")
    t.add_argument("--product", required=True, help="a billing.products code, e.g. pack_100")
    t.add_argument(
        "--quantity", type=int, default=1, help="packs bought (checkout events; default 1)"
    )
    t.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="where the service runs (default: http://127.0.0.1:8000)",
    )
    t.add_argument("--customer", help="Stripe customer id (default: one derived from the user)")
    t.add_argument("--payment-intent", help="pi_... of the purchase (charge.refunded)")
    t.add_argument("--amount", type=int, help="refunded amount in cents (default: all)")
    t.set_defaults(run=trigger)

    y = stripe_commands.add_parser(
        "sync-products",
        help="create or update Stripe Products and Prices from billing.products",
        description="Make Stripe's Products and Prices match billing.products and store each "
        "price id back; running it again changes nothing unless the catalog changed.",
    )
    y.add_argument(
        "--adopt",
        action="append",
        default=[],
        metavar="PRICE_ID",
        help="map an existing Stripe price (price_...) of a tb_<code> product to its plan "
        "(monthly or yearly, any currency) instead of creating one; repeatable",
    )
    y.set_defaults(run=sync)

    r = stripe_commands.add_parser(
        "reconcile",
        help="apply the Stripe events the database never stored; report payments without credit",
        description="Lists the window's events from Stripe's Events API, feeds each one the "
        "database never stored to handle_stripe_event (as the webhook would, once), then "
        "compares the window's paid Checkout Sessions and invoices with the credits they made. "
        "Safe to repeat and to run from cron. Exit status: 0 when nothing is left to fix, 1 when "
        "a drift remains or a replay failed (or, with --dry-run, when anything was found).",
    )
    r.add_argument(
        "--since",
        default="72h",
        help="how far back: 30m, 72h, 7d, 2w (default 72h; Stripe keeps 30 days of events)",
    )
    r.add_argument("--dry-run", action="store_true", help="report what is missing; store nothing")
    r.add_argument(
        "--output",
        choices=("auto", "text", "json"),
        default="auto",
        help="text lines and a progress line, or JSON lines (default: text on a terminal, "
        "JSON lines otherwise)",
    )
    r.set_defaults(run=reconcile)


def stripe_failure(exc: Exception, settings: Settings) -> str:
    """What went wrong with a Stripe call: Stripe answered and refused, or was not reached."""
    import stripe

    if isinstance(exc, stripe.APIConnectionError):
        return (
            f"could not reach Stripe at {settings.stripe_api_base_url} (network, DNS or proxy; "
            f"STRIPE_API_BASE): {exc.user_message or exc}"
        )
    if isinstance(exc, stripe.StripeError):
        status = f" ({exc.http_status}{' ' + exc.code if exc.code else ''})"
        if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
            return f"Stripe refused the key{status}: check STRIPE_SECRET_KEY: {exc.user_message}"
        return f"Stripe refused the request{status}: {exc.user_message or exc}"
    return f"the Stripe call failed: {exc}"


async def _product(settings: Settings, code: str) -> dict[str, object] | None:
    from token_billing.server.database import database_from_settings

    db = database_from_settings(settings)
    await db.open()
    try:
        rows = await db.rpc("list_products", {"p_include_inactive": True})
    finally:
        await db.close()
    return next((row for row in rows if row["code"] == code), None)


async def _record_session(settings: Settings, session: dict[str, Any]) -> None:
    """Record the session as the service does when it creates one (record_checkout_session):
    the handler credits only what was sold."""
    from token_billing.server.database import database_from_settings

    db = database_from_settings(settings)
    await db.open()
    try:
        await db.rpc("record_checkout_session", {"p_session": session})
    finally:
        await db.close()


def trigger(args: argparse.Namespace) -> int:
    settings = server_settings("stripe trigger", args.env_file)
    if settings is None:
        return 2
    import httpx

    from token_billing.cli.stripe_events import Product, build_event, stripe_signature
    from token_billing.errors import DatabaseError, DatabaseUnavailable
    from token_billing.server.database import describe

    try:
        row = asyncio.run(_product(settings, args.product))
    except (DatabaseUnavailable, DatabaseError) as exc:
        print(f"token-billing: the database ({describe(settings)}) failed: {exc}", file=sys.stderr)
        return 1
    if row is None:
        print(f"token-billing: no product {args.product!r} in billing.products", file=sys.stderr)
        return 2
    try:
        event = build_event(
            args.event,
            args.user,
            Product.from_row(row),
            quantity=args.quantity,
            customer=args.customer,
            payment_intent=args.payment_intent,
            amount_cents=args.amount,
        )
    except ValueError as exc:
        print(f"token-billing: {exc}", file=sys.stderr)
        return 2
    if (
        row["kind"] == "plan"
        and not row.get("stripe_price_id")
        and args.event.startswith("invoice")
    ):
        print(
            f"note: {args.product} has no stripe_price_id, so the invoice cannot be mapped to "
            "the plan and will be parked; run `token-billing stripe sync-products` first",
            file=sys.stderr,
        )
    if event["data"]["object"].get("object") == "checkout.session":
        try:
            asyncio.run(_record_session(settings, event["data"]["object"]))
        except (DatabaseUnavailable, DatabaseError) as exc:
            print(f"token-billing: recording the session failed: {exc}", file=sys.stderr)
            return 1
        print("   the session is recorded as the service's (record_checkout_session)")
    payload = json.dumps(event, separators=(",", ":")).encode()
    header = stripe_signature(payload, settings.webhook_secrets[0])
    url = args.url.rstrip("/") + "/v1/webhooks/stripe"
    obj = event["data"]["object"]
    print(f"-> {event['type']} {event['id']} ({obj['object']} {obj['id']})")
    if obj.get("payment_intent"):
        print(f"   payment_intent {obj['payment_intent']}")
    try:
        response = httpx.post(
            url,
            content=payload,
            headers={"Content-Type": "application/json", "Stripe-Signature": header},
            timeout=30.0,
        )
    except httpx.HTTPError as exc:
        print(f"token-billing: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"<- {response.status_code} {response.text}")
    return 0 if response.is_success else 1


async def _sync(settings: Settings, adopt: list[str]) -> int:
    import stripe

    from token_billing.errors import DatabaseError, DatabaseUnavailable
    from token_billing.server.catalog import sync_products
    from token_billing.server.database import database_from_settings, describe
    from token_billing.server.stripe_api import make_client

    client, http = make_client(settings)
    db = database_from_settings(settings)
    await db.open()
    try:
        await sync_products(client, db, lambda result: print(result.line()), adopt)
    except stripe.StripeError as exc:
        print(f"token-billing: {stripe_failure(exc, settings)}", file=sys.stderr)
        return 1
    except (DatabaseUnavailable, DatabaseError) as exc:
        print(f"token-billing: the database ({describe(settings)}) failed: {exc}", file=sys.stderr)
        return 1
    finally:
        await db.close()
        await http.close_async()  # type: ignore[no-untyped-call]
    return 0


def sync(args: argparse.Namespace) -> int:
    settings = server_settings("stripe sync-products", args.env_file)
    if settings is None:
        return 2
    return asyncio.run(_sync(settings, list(args.adopt)))


def _progress_line(stage: str, count: int) -> None:
    print(f"\r{stage}: {count}\033[K", end="", file=sys.stderr, flush=True)


async def _reconcile(settings: Settings, args: argparse.Namespace, since: int, tty: bool) -> int:
    import stripe

    from token_billing.errors import DatabaseError, DatabaseUnavailable
    from token_billing.server.database import database_from_settings, describe
    from token_billing.server.reconcile import reconcile as run_reconcile
    from token_billing.server.stripe_api import make_client

    client, http = make_client(settings)
    db = database_from_settings(settings)
    await db.open()
    try:
        report = await run_reconcile(
            client,
            db,
            since_seconds=since,
            dry_run=args.dry_run,
            progress=_progress_line if tty else (lambda stage, count: None),
        )
    except stripe.StripeError as exc:
        print(f"token-billing: {stripe_failure(exc, settings)}", file=sys.stderr)
        return 1
    except (DatabaseUnavailable, DatabaseError) as exc:
        print(f"token-billing: the database ({describe(settings)}) failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        await db.close()
        await http.close_async()  # type: ignore[no-untyped-call]
    text = args.output == "text" or (args.output == "auto" and tty)
    for line in report.text_lines() if text else report.json_lines():
        print(line)
    if report.drifts or report.failed:
        return 1
    return 1 if args.dry_run and report.replays else 0


def reconcile(args: argparse.Namespace) -> int:
    settings = server_settings("stripe reconcile", args.env_file)
    if settings is None:
        return 2
    from token_billing.server.reconcile import parse_since

    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"token-billing: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_reconcile(settings, args, since, sys.stdout.isatty()))
