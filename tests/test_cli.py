"""The `token-billing` command: serve, stripe trigger, stripe sync-products."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scripts.pgcluster import Database
from tests.app_support import (
    JWT_SECRET,
    PLAN_PRICE,
    STRIPE_KEY,
    WEBHOOK_SECRET,
    account,
    free_port,
    new_user,
    running_server,
    scalar,
    set_price,
    settings_for,
)
from tests.stripe_double import StripeDouble
from token_billing.cli import main
from token_billing.cli.stripe_events import stripe_signature

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli_env(db: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The environment `token-billing` reads, pointing at the test database."""
    env = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": db.dsn(),
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return env


@pytest.fixture
def service(db: Database, cli_env: dict[str, str]) -> Iterator[str]:
    with running_server(settings_for(db)) as url:
        yield url


def test_signature_should_be_the_one_stripe_verifies() -> None:
    import stripe

    payload = b'{"id": "evt_1"}'
    header = stripe_signature(payload, WEBHOOK_SECRET, timestamp=int(time.time()))
    assert stripe.WebhookSignature.verify_header(payload, header, WEBHOOK_SECRET)
    assert header.startswith("t=")
    assert ",v1=" in header


def test_trigger_checkout_should_credit_the_pack(
    db: Database, service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    user = new_user(db)
    code = main(
        [
            "stripe", "trigger", "checkout.session.completed",
            "--user", str(user), "--product", "pack_250", "--quantity", "2", "--url", service,
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "<- 200" in out
    assert '"status":"applied"' in out
    assert account(db, user)["balance"] == 100 + 500


def test_trigger_plan_events_should_subscribe_and_grant(
    db: Database, service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    set_price(db, "starter", PLAN_PRICE)
    user = new_user(db)
    for event in ("customer.subscription.created", "invoice.paid"):
        code = main(
            ["stripe", "trigger", event, "--user", str(user), "--product", "starter",
             "--url", service]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        assert '"status":"applied"' in out, out
    state = account(db, user)
    assert (state["plan"], state["status"]) == ("starter", "active")
    assert state["balance"] == 100 + 5000


def test_trigger_refund_should_take_the_tokens_back(
    db: Database, service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    user = new_user(db)
    args = ["--user", str(user), "--product", "pack_100", "--url", service]
    assert main(["stripe", "trigger", "checkout.session.completed", *args]) == 0
    intent = next(
        line.split()[-1]
        for line in capsys.readouterr().out.splitlines()
        if "payment_intent" in line
    )
    assert account(db, user)["balance"] == 200

    code = main(["stripe", "trigger", "charge.refunded", *args, "--payment-intent", intent])

    out = capsys.readouterr().out
    assert code == 0, out
    assert account(db, user)["balance"] == 100


def test_trigger_should_refuse_impossible_combinations(
    db: Database, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    user = str(new_user(db))
    assert main(["stripe", "trigger", "invoice.paid", "--user", user, "--product", "pack_100"]) == 2
    assert "is a pack" in capsys.readouterr().err
    assert (
        main(["stripe", "trigger", "charge.refunded", "--user", user, "--product", "pack_100"]) == 2
    )
    assert "--payment-intent" in capsys.readouterr().err
    assert main(["stripe", "trigger", "invoice.paid", "--user", user, "--product", "nope"]) == 2
    assert "no product 'nope'" in capsys.readouterr().err


def test_trigger_without_a_running_service_should_fail_clearly(
    db: Database, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = main(
        ["stripe", "trigger", "checkout.session.completed", "--user", str(new_user(db)),
         "--product", "pack_100", "--url", url]
    )  # fmt: skip
    assert code == 1
    assert "cannot reach" in capsys.readouterr().err


def test_bad_settings_should_exit_2_naming_the_variable(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("STRIPE_WEBHOOK_SECRET")
    assert main(["stripe", "sync-products"]) == 2
    assert "STRIPE_WEBHOOK_SECRET is required" in capsys.readouterr().err


# --- sync-products --------------------------------------------------------------------------


def test_sync_products_should_create_prices_once_and_store_them(
    db: Database,
    cli_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with StripeDouble() as stripe_double:
        monkeypatch.setenv("STRIPE_API_BASE", stripe_double.url)

        assert main(["stripe", "sync-products"]) == 0
        first = capsys.readouterr().out
        created = {p["lookup_key"]: p for p in stripe_double.state.prices.values() if p["active"]}
        writes_after_first = len(stripe_double.posts())

        assert main(["stripe", "sync-products"]) == 0
        second = capsys.readouterr().out
        writes_after_second = len(stripe_double.posts())

    assert set(created) == {
        f"token-billing:{c}"
        for c in ("pack_100", "pack_250", "pack_600", "starter", "pro", "enterprise")
    } | {"token-billing:pro:year:usd"}
    annual = created["token-billing:pro:year:usd"]
    assert annual["recurring"] == {"interval": "year", "interval_count": 1}
    assert annual["unit_amount"] == 95000
    assert annual["product"] == "tb_pro", "the annual price should be a price of the pro product"
    assert (
        scalar(
            db,
            "select stripe_price_id from billing.product_prices "
            "where product_code = 'pro' and billing_interval = 'year'",
        )
        == annual["id"]
    )
    starter = created["token-billing:starter"]
    assert starter["recurring"] == {"interval": "month", "interval_count": 1}
    assert starter["unit_amount"] == 2900
    assert starter["product"] == "tb_starter"
    assert created["token-billing:pack_100"]["recurring"] is None
    for line in first.splitlines():
        if line.startswith("free"):
            assert "skipped" in line
    stored = scalar(db, "select stripe_price_id from billing.products where code = 'starter'")
    assert stored == starter["id"]
    assert scalar(db, "select stripe_price_id from billing.products where code = 'free'") is None
    assert writes_after_second == writes_after_first, "a second run should write nothing"
    assert second.count("unchanged") == 7


def test_sync_products_should_replace_a_changed_price(
    db: Database,
    cli_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with StripeDouble() as stripe_double:
        monkeypatch.setenv("STRIPE_API_BASE", stripe_double.url)
        assert main(["stripe", "sync-products"]) == 0
        old = scalar(db, "select stripe_price_id from billing.products where code = 'pack_100'")
        with db.connect() as conn:
            conn.execute("update billing.products set price_cents = 600 where code = 'pack_100'")
        stripe_double.clear()

        assert main(["stripe", "sync-products"]) == 0
        out = capsys.readouterr().out

        new = scalar(db, "select stripe_price_id from billing.products where code = 'pack_100'")
        prices = stripe_double.state.prices
        created = stripe_double.posts("/v1/prices")

    assert new != old
    assert prices[new]["unit_amount"] == 600
    assert prices[new]["lookup_key"] == "token-billing:pack_100"
    assert prices[old]["active"] is False, "the old price should be archived"
    assert prices[old]["lookup_key"] is None
    assert created[0].params["transfer_lookup_key"] == "true"
    assert all(r.idempotency_key for r in stripe_double.posts())
    assert "pack_100" in out
    assert "created" in out


def test_sync_products_should_adopt_an_existing_price(
    db: Database,
    cli_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with StripeDouble() as stripe_double:
        monkeypatch.setenv("STRIPE_API_BASE", stripe_double.url)
        stripe_double.state.products["tb_starter"] = {
            "id": "tb_starter",
            "object": "product",
            "active": True,
            "name": "Starter",
            "description": None,
            "metadata": {"token_billing_code": "starter"},
        }
        stripe_double.add_price(
            "price_legacy_starter_year",
            "tb_starter",
            unit_amount=29000,
            currency="usd",
            recurring={"interval": "year", "interval_count": 1},
        )
        stripe_double.add_price("price_one_off", "tb_starter", unit_amount=100, currency="usd")

        assert (
            main(
                [
                    "stripe",
                    "sync-products",
                    "--adopt",
                    "price_legacy_starter_year",
                    "--adopt",
                    "price_one_off",
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        created = stripe_double.posts("/v1/prices")

    assert "starter/year/usd" in out
    assert "adopted" in out
    assert "not a monthly or yearly price" in out
    assert (
        scalar(
            db,
            "select stripe_price_id || ' ' || unit_amount from billing.product_prices "
            "where product_code = 'starter' and billing_interval = 'year'",
        )
        == "price_legacy_starter_year 29000"
    )
    assert all(
        "token-billing:starter:year" not in r.params.get("lookup_key", "") for r in created
    ), "an adopted price should not be created again"


# --- serve ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_should_run_the_app_under_uvicorn(db: Database, cli_env: dict[str, str]) -> None:
    port = free_port()
    env = {**os.environ, **cli_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "token_billing.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None
        assert ready.status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    access = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(entry.get("route") == "/readyz" and entry["status"] == 200 for entry in access), err
    assert STRIPE_KEY not in err
    assert WEBHOOK_SECRET not in err


# --- help and errors ------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_command_and_option_should_have_help_text() -> None:
    from token_billing.cli import parser

    root = parser()
    missing = []
    commands = []
    for prog, p in _parsers(root):
        commands.append(prog)
        if not p.description:
            missing.append(f"{prog}: no description")
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{prog} {choice.dest}: no help")
                continue
            if not action.help:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert {
        "token-billing install",
        "token-billing uninstall",
        "token-billing doctor",
        "token-billing serve",
        "token-billing stripe trigger",
        "token-billing stripe sync-products",
        "token-billing stripe reconcile",
        "token-billing user",
        "token-billing events parked",
        "token-billing events replay",
    } <= set(commands)
    assert missing == []
    assert "The `token-billing` command." not in root.format_help()


def test_sync_products_should_say_when_stripe_cannot_be_reached(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("STRIPE_API_BASE", nowhere)
    assert main(["stripe", "sync-products"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"token-billing: could not reach Stripe at {nowhere} "), err
    assert "refused" not in err.split(":")[1]


def test_sync_products_should_say_when_stripe_refuses(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with StripeDouble() as stripe_double:
        monkeypatch.setenv("STRIPE_API_BASE", stripe_double.url)
        stripe_double.fail_next(
            status=401, error_type="invalid_request_error", message="Invalid API Key provided"
        )
        assert main(["stripe", "sync-products"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("token-billing: Stripe refused the key (401): check STRIPE_SECRET_KEY"), (
        err
    )
