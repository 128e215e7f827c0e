"""The `token-billing` command.

    token-billing [--env-file PATH] serve [--host H] [--port P]
    token-billing [--env-file PATH] stripe trigger EVENT --user USER_ID --product CODE [--url URL]
    token-billing [--env-file PATH] stripe sync-products

Settings come from the environment and `.env` (or --env-file), as for the service (see
.env.example); `make dev` writes its own to .dev/dev.env.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import httpx

from token_billing.server.settings import ConfigError, Settings, load_settings

# Seconds a shutdown waits for requests in flight (balance streams end at once: see
# token_billing.server.stream).
GRACEFUL_SHUTDOWN_SECONDS = 10


def _settings(out: TextIO, env_file: Path | None = None) -> Settings | None:
    try:
        if env_file is not None:
            if not env_file.is_file():
                raise ConfigError(f"--env-file {env_file} does not exist")
            return load_settings(_env_file=env_file)
        return load_settings()
    except ConfigError as exc:
        print(f"token-billing: {exc}", file=out)
        return None


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from token_billing.server.app import create_app
    from token_billing.server.logs import configure_logging
    from token_billing.server.stream import Server

    settings = _settings(sys.stderr, args.env_file)
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        workers=1,
        access_log=False,  # the app writes one JSON line per request itself
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    Server(config).run()
    return 0


async def _product(settings: Settings, code: str) -> dict[str, object] | None:
    from token_billing.server.database import database_from_settings

    db = database_from_settings(settings)
    await db.open()
    try:
        rows = await db.rpc("list_products", {"p_include_inactive": True})
    finally:
        await db.close()
    return next((row for row in rows if row["code"] == code), None)


def trigger(args: argparse.Namespace) -> int:
    from token_billing.cli.stripe_events import Product, build_event, stripe_signature

    settings = _settings(sys.stderr, args.env_file)
    if settings is None:
        return 2
    row = asyncio.run(_product(settings, args.product))
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


async def _sync(settings: Settings) -> int:
    import stripe

    from token_billing.server.catalog import sync_products
    from token_billing.server.database import database_from_settings
    from token_billing.server.stripe_api import make_client

    client, http = make_client(settings)
    db = database_from_settings(settings)
    await db.open()
    try:
        await sync_products(client, db, lambda result: print(result.line()))
    except stripe.StripeError as exc:
        print(f"token-billing: Stripe refused: {exc.user_message or exc}", file=sys.stderr)
        return 1
    finally:
        await db.close()
        await http.close_async()  # type: ignore[no-untyped-call]
    return 0


def sync(args: argparse.Namespace) -> int:
    settings = _settings(sys.stderr, args.env_file)
    if settings is None:
        return 2
    return asyncio.run(_sync(settings))


def parser() -> argparse.ArgumentParser:
    from token_billing.cli.stripe_events import TRIGGERABLE

    p = argparse.ArgumentParser(prog="token-billing", description=__doc__.split("\n")[0])
    p.add_argument(
        "--env-file",
        type=Path,
        help="read settings from this file instead of .env (the environment still wins)",
    )
    commands = p.add_subparsers(dest="command", required=True)

    s = commands.add_parser("serve", help="run the HTTP service (uvicorn, one worker)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(run=serve)

    stripe_cmd = commands.add_parser("stripe", help="Stripe helpers")
    stripe_commands = stripe_cmd.add_subparsers(dest="stripe_command", required=True)

    t = stripe_commands.add_parser(
        "trigger",
        help="send a signed, realistic Stripe event to the running service",
        description="Builds the event Stripe would send, signs it with STRIPE_WEBHOOK_SECRET "
        "and posts it to URL/v1/webhooks/stripe.",
    )
    t.add_argument("event", choices=TRIGGERABLE)
    t.add_argument("--user", required=True, help="the user id (auth.users.id)")
    t.add_argument("--product", required=True, help="a billing.products code, e.g. pack_100")
    t.add_argument("--quantity", type=int, default=1)
    t.add_argument("--url", default="http://127.0.0.1:8000", help="where the service runs")
    t.add_argument("--customer", help="Stripe customer id (default: one derived from the user)")
    t.add_argument("--payment-intent", help="pi_... of the purchase (charge.refunded)")
    t.add_argument("--amount", type=int, help="refunded amount in cents (default: all)")
    t.set_defaults(run=trigger)

    y = stripe_commands.add_parser(
        "sync-products",
        help="create or update Stripe Products and Prices from billing.products",
    )
    y.set_defaults(run=sync)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
