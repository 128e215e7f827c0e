"""`token-billing creators payout [--dry-run]` (pay creators their settled earnings by Stripe
Transfer) and `token-billing creators refund SESSION [--amount CENTS]` (refund an agent sale,
taking the creator's share back through Stripe).

A payout is made in the database first (public.begin_creator_payouts: one per creator and
period, its amount taken from the earnings balance in the same transaction), then transferred
with the payout's own Idempotency-Key (creator-payout:<creator>:<period>), then recorded
(public.complete_creator_payout). A run that Stripe did not answer leaves the payout pending; the
next run transfers it again with the same key, and Stripe answers the same transfer: a creator is
paid once. A transfer Stripe refuses fails the payout (public.fail_creator_payout): the amount
goes back to the balance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import date
from typing import TYPE_CHECKING, Any

from token_billing.cli.settings import server_settings

if TYPE_CHECKING:
    import stripe

    from token_billing.db import Database
    from token_billing.server.settings import Settings

# Stripe answers that mean "not made, and it will not be made with these parameters".
REFUSED_STATUSES = frozenset({400, 402, 403, 404})


def add_parser(commands: Any) -> None:
    """`creators payout` and `creators refund` under `commands` (argparse subparsers)."""
    c = commands.add_parser(
        "creators",
        help="the marketplace: pay creators out, refund an agent sale",
        description="The marketplace's operator commands. They read the same settings as the "
        "service.",
    )
    actions = c.add_subparsers(
        dest="creators_command", required=True, metavar="ACTION", help="payout or refund"
    )
    p = actions.add_parser(
        "payout",
        help="transfer each creator's settled earnings (once per creator and period)",
        description="For each creator with payouts_enabled and settled earnings of at least "
        "billing.settings.creator_payout_minimum_cents, one Stripe Transfer per period. Safe to "
        "repeat and to run concurrently: a payout is made once and retried with its own key. "
        "Exit 1 when a transfer got no answer or was refused.",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be paid; change nothing")
    p.add_argument(
        "--period",
        type=date.fromisoformat,
        help="the payout period, a UTC date YYYY-MM-DD (default: today)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines, one payout a line")
    p.set_defaults(run=payout)

    r = actions.add_parser(
        "refund",
        help="refund an agent sale: the transfer reversed and the fee refunded, in proportion",
        description="Refunds a paid agent Checkout Session with reverse_transfer and "
        "refund_application_fee, so the creator returns its share through Stripe and the "
        "platform its fee, in proportion. The refund's events then revoke the agent when it "
        "is refunded in full.",
    )
    r.add_argument("session", metavar="SESSION", help="the agent sale's Checkout Session, cs_...")
    r.add_argument("--amount", type=int, help="cents to refund (default: what is not refunded)")
    r.set_defaults(run=refund)


def _stripe_refused(exc: Exception) -> bool:
    import stripe

    return (
        isinstance(exc, stripe.StripeError)
        and not isinstance(exc, stripe.IdempotencyError | stripe.RateLimitError)
        and exc.http_status in REFUSED_STATUSES
    )


async def _transfer(
    client: stripe.StripeClient, db: Database, row: dict[str, Any]
) -> tuple[str, str]:
    """Transfer one pending payout; (outcome, detail)."""
    import stripe

    try:
        transfer = await client.v1.transfers.create_async(
            params={
                "amount": int(row["amount_cents"]),
                "currency": str(row["currency"]),
                "destination": str(row["stripe_account_id"]),
                "transfer_group": f"creator-payout-{row['period']}",
                "metadata": {
                    "payout_id": str(row["payout_id"]),
                    "creator_id": str(row["creator_id"]),
                    "period": str(row["period"]),
                },
            },
            options={"idempotency_key": str(row["idempotency_key"])},
        )
    except stripe.StripeError as exc:
        if _stripe_refused(exc):
            reason = f"{exc.http_status} {exc.code or ''} {exc.user_message or exc}".strip()
            await db.rpc(
                "fail_creator_payout", {"p_payout_id": row["payout_id"], "p_reason": reason}
            )
            return "failed", reason
        # No answer (a timeout, 5xx, rate limit): the payout stays pending; the next run retries
        # with the same key.
        return "pending", f"no answer from Stripe ({type(exc).__name__}): run again to retry"
    done = await db.rpc(
        "complete_creator_payout",
        {"p_payout_id": row["payout_id"], "p_transfer": transfer.to_dict()},
    )
    return "paid", f"{transfer.id} ({done[0]['status']})"


async def _payout(settings: Settings, args: argparse.Namespace) -> int:
    from token_billing.server.database import database_from_settings
    from token_billing.server.stripe_api import make_client

    db = database_from_settings(settings)
    await db.open()
    client, http = make_client(settings)
    failures = 0
    try:
        rows = await db.rpc(
            "begin_creator_payouts",
            {
                "p_period": args.period.isoformat() if args.period else None,
                "p_dry_run": bool(args.dry_run),
            },
        )
        for row in rows:
            if args.dry_run:
                outcome, detail = "would_pay", str(row["idempotency_key"])
            else:
                outcome, detail = await _transfer(client, db, row)
            failures += outcome in ("failed", "pending")
            if args.json:
                print(
                    json.dumps(
                        {
                            "payout_id": None
                            if row["payout_id"] is None
                            else str(row["payout_id"]),
                            "creator_id": str(row["creator_id"]),
                            "stripe_account_id": row["stripe_account_id"],
                            "period": row["period"],
                            "amount_cents": row["amount_cents"],
                            "currency": row["currency"],
                            "outcome": outcome,
                            "detail": detail,
                        }
                    )
                )
            else:
                print(
                    f"{outcome:<9} {row['creator_id']} {row['stripe_account_id']} "
                    f"{row['amount_cents']} {row['currency']} ({row['period']}): {detail}"
                )
        if not args.json:
            print(
                f"{len(rows)} payout(s){' (dry run)' if args.dry_run else ''}, {failures} not paid"
            )
    finally:
        await db.close()
        await http.close_async()  # type: ignore[no-untyped-call]
    return 1 if failures else 0


def payout(args: argparse.Namespace) -> int:
    settings = server_settings("creators payout", args.env_file)
    if settings is None:
        return 2
    return asyncio.run(_payout(settings, args))


async def _refund(settings: Settings, args: argparse.Namespace) -> int:
    import stripe

    from token_billing.cli.stripe import stripe_failure
    from token_billing.server.database import database_from_settings
    from token_billing.server.stripe_api import idempotency_key, make_client

    db = database_from_settings(settings)
    await db.open()
    client, http = make_client(settings)
    try:
        rows = await db.rpc("get_marketplace_sale", {"p_sale_id": args.session})
        if not rows or rows[0]["status"] != "paid" or not rows[0]["stripe_payment_intent_id"]:
            print(f"token-billing: {args.session} is not a paid agent sale", file=sys.stderr)
            return 1
        sale = rows[0]
        left = int(sale["amount_cents"]) - int(sale["refunded_cents"])
        amount = args.amount if args.amount is not None else left
        if not 1 <= amount <= left:
            print(
                f"token-billing: --amount must be from 1 to {left} (the part of {args.session} "
                "not refunded)",
                file=sys.stderr,
            )
            return 1
        try:
            refund = await client.v1.refunds.create_async(
                params={
                    "payment_intent": str(sale["stripe_payment_intent_id"]),
                    "amount": amount,
                    "reverse_transfer": True,
                    "refund_application_fee": True,
                    "metadata": {"sale_id": args.session},
                },
                # One refund per sale and refunded-so-far: a retry makes no second refund.
                options={
                    "idempotency_key": idempotency_key(
                        "marketplace-refund", args.session, sale["refunded_cents"], amount
                    )
                },
            )
        except stripe.StripeError as exc:
            print(f"token-billing: {stripe_failure(exc, settings)}", file=sys.stderr)
            return 1
        print(
            f"refunded {amount} of {sale['amount_cents']} {sale['currency']} of {args.session}: "
            f"{refund.id} (transfer reversal {refund.transfer_reversal or 'none'})"
        )
    finally:
        await db.close()
        await http.close_async()  # type: ignore[no-untyped-call]
    return 0


def refund(args: argparse.Namespace) -> int:
    settings = server_settings("creators refund", args.env_file)
    if settings is None:
        return 2
    return asyncio.run(_refund(settings, args))
