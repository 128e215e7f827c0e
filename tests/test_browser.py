"""The demo page in headless Chromium against `make dev`'s stack.

The stack is started the way a developer starts it, `python -m scripts.dev --no-wait`, on free
ports and in a state directory of its own (a developer's stack on 54322 is never touched), with
STRIPE_API_BASE pointing at the local Stripe double; `--stop` ends it after the module. The page
is driven by playwright-core in Debian's Chromium (tests/browser/driver.mjs).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from scripts import web as web_build
from scripts.dev import DEMO_USER_ID, read_env_file
from scripts.pgcluster import ROOT, port_in_use
from tests.app_support import (
    PACK_PRICE,
    derived_checkout_event,
    encode,
    free_port,
    sign,
    user_token,
)
from tests.browser_support import ARTIFACTS, Browser, dollars, missing_prerequisites
from tests.stripe_double import StripeDouble
from tests.stripe_fixtures import account_updated
from token_billing.cli.stripe_events import customer_id_for

pytestmark = pytest.mark.slow

LIVE_UPDATE_SECONDS = 2.0
SESSION_KEY = "token-billing.session"


@dataclass(frozen=True)
class Stack:
    url: str
    api_port: int
    pg_port: int
    state: Path
    settings: dict[str, str]
    banner: str
    # What started it, so a test can start it again; the port of the page's other origin.
    args: list[str]
    env: dict[str, str]
    page_port: int

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.settings["DATABASE_URL"], autocommit=True)

    def balance(self) -> int:
        with self.connect() as conn:
            row = conn.execute(
                "select balance - reserved from billing.accounts where user_id = %s",
                [DEMO_USER_ID],
            ).fetchone()
        assert row is not None
        return int(row[0])


def _dev(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.dev", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )


@pytest.fixture(scope="module")
def stripe_double() -> Iterator[StripeDouble]:
    with StripeDouble() as double:
        double.add_price(PACK_PRICE, unit_amount=500, currency="usd")
        # make dev's startup purchase (a triggered event) links this made-up customer to the
        # demo user; the double plays a Stripe account that knows it.
        customer = customer_id_for(DEMO_USER_ID)
        double.state.customers[customer] = {"id": customer, "object": "customer"}
        yield double


@pytest.fixture(scope="module")
def stack(stripe_double: StripeDouble) -> Iterator[Stack]:
    missing = missing_prerequisites()
    if missing:
        pytest.fail("the browser tests need: " + ", ".join(missing))
    web_build.build()
    # Not under pytest's tmp dir: the `postgres` OS user must be able to reach the data dir.
    state = Path(tempfile.mkdtemp(prefix="tb-devstack-", dir="/tmp"))
    os.chmod(state, 0o755)  # noqa: S103
    pg_port, api_port, metrics_port, page_port = free_port(), free_port(), free_port(), free_port()
    args = [
        *("--dir", str(state), "--port", str(pg_port), "--api-port", str(api_port)),
        *("--metrics-port", str(metrics_port)),
    ]
    # No Stripe key of ours: make dev generates its fake one, as for a developer without a
    # Stripe account; its requests go to the double.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "SUPABASE_"))}
    env.update(STRIPE_API_BASE=stripe_double.url, STRIPE_MAX_NETWORK_RETRIES="0")
    # The page is also served from another origin (other_origin below), which the API allows.
    env.update(CORS_ORIGINS=f"http://127.0.0.1:{page_port}")
    started = _dev("--no-wait", *args, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        settings = read_env_file(state / "dev.env")
        stack = Stack(
            url=f"http://localhost:{api_port}",
            api_port=api_port,
            pg_port=pg_port,
            state=state,
            settings=settings,
            banner=started.stdout,
            args=args,
            env=env,
            page_port=page_port,
        )
        # What `token-billing stripe sync-products` stores: pack_100 sells at the double's price.
        with stack.connect() as conn:
            conn.execute(
                "update billing.products set stripe_price_id = %s where code = 'pack_100'",
                [PACK_PRICE],
            )
        yield stack
    finally:
        stopped = _dev("--stop", *args)
        still_up = [port for port in (pg_port, api_port, metrics_port) if port_in_use(port)]
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert still_up == [], f"--stop should stop the service and Postgres: {still_up} open"


@pytest.fixture(scope="module")
def other_origin(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The page as a host app would serve it: its files on an origin of their own (another
    port), with a config.json that points at the API's origin."""
    site = tmp_path_factory.mktemp("site")
    for name in ("index.html", "styles.css"):
        shutil.copy(web_build.WEB / name, site / name)
    shutil.copytree(web_build.DIST, site / "dist")
    config = {"apiUrl": stack.url, "supabaseUrl": None, "supabaseAnonKey": None, "devSignIn": True}
    (site / "config.json").write_text(json.dumps(config))
    handler = functools.partial(_QuietFiles, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", stack.page_port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{stack.page_port}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Browser]:
    with Browser() as b:
        yield b
        errors = [line for line in b.console() if line.startswith("pageerror")]
        assert errors == [], "the page should raise no uncaught error"


def signed_in(browser: Browser, stack: Stack) -> None:
    """The page, fresh, signed in as the demo user, with the current balance shown live."""
    browser.goto(f"{stack.url}/")
    if browser.visible("#sign-in-button"):
        browser.click("#sign-in-button")
    browser.wait_for_text("#available", f"^{stack.balance():,}$", 5000)
    browser.wait_for_text("#live-text", "^Live$", 5000)


def post_purchase(stack: Stack) -> httpx.Response:
    event = derived_checkout_event(uuid.UUID(DEMO_USER_ID), "pack_100")
    # Sold first: the service records each session it creates before the user can pay it.
    with stack.connect() as conn:
        conn.execute(
            "select * from public.record_checkout_session(%s)", [Jsonb(event["data"]["object"])]
        )
    return post_event(stack, event)


def post_event(stack: Stack, event: dict[str, Any]) -> httpx.Response:
    """A Stripe event to the service's webhook, signed with the stack's secret (a real HMAC)."""
    payload = encode(event)
    return httpx.post(
        f"{stack.url}/v1/webhooks/stripe",
        content=payload,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": sign(payload, stack.settings["STRIPE_WEBHOOK_SECRET"]),
        },
        timeout=10,
    )


# --- make dev ------------------------------------------------------------------------------------


def test_make_dev_should_print_the_urls_the_demo_user_and_a_working_trigger(stack: Stack) -> None:
    banner, url = stack.banner, stack.url
    assert f"page         {url}/" in banner
    assert "/metrics   (a listener of its own: never on the API port)" in banner
    assert httpx.get(f"{url}/metrics").status_code == 404
    assert DEMO_USER_ID in banner
    assert "stripe listen" not in banner, "without a Stripe test key there is nothing to forward"
    assert "checkout.session.completed for pack_100 landed: balance 100 -> 200" in banner, (
        "make dev should send one purchase at startup and show the balance before and after"
    )
    assert stack.settings["ENVIRONMENT"] == "development"
    assert stack.settings["STRIPE_WEBHOOK_SECRET"].startswith("whsec_dev_")
    assert stack.settings["STRIPE_SECRET_KEY"].startswith("sk_test_tbdev_")
    assert (stack.state / "dev.env").stat().st_mode & 0o077 == 0, "dev.env holds secrets: 0600"

    command = next(line.strip() for line in banner.splitlines() if " stripe trigger " in line)
    assert f"--user {DEMO_USER_ID} --product pack_100" in command
    before = stack.balance()
    pasted = subprocess.run(
        shlex.split(command), cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    assert stack.balance() == before + 100, "the printed command should credit the demo user"


# --- the page --------------------------------------------------------------------------------


def test_page_should_show_the_balance_plan_catalog_and_history(
    browser: Browser, stack: Stack
) -> None:
    signed_in(browser, stack)
    assert browser.text("#plan") == "Free"
    assert browser.text("#reserved") == "0"
    assert "demo@example.com" in browser.text("#account-email")
    assert browser.visible('button[data-product="pack_100"]')
    assert browser.text('button[data-product="pack_100"]') == "Buy"
    assert browser.text('button[data-product="pack_250"]') == "Not on sale yet"
    assert "Token pack pack_100" in browser.text("#ledger")


def test_a_signed_purchase_should_update_the_open_page_within_two_seconds(
    browser: Browser, stack: Stack
) -> None:
    signed_in(browser, stack)
    before = stack.balance()
    started = time.monotonic()
    response = post_purchase(stack)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "applied"
    browser.wait_for_text("#available", f"^{before + 100:,}$", int(LIVE_UPDATE_SECONDS * 1000))
    elapsed = time.monotonic() - started
    assert elapsed < LIVE_UPDATE_SECONDS, f"the page took {elapsed:.2f}s"
    assert browser.wait_for_text("#balance-announcement", r"\(\+100\)")["text"].startswith(
        "Balance updated:"
    ), "screen readers should hear the change (aria-live)"
    assert browser.wait_for_text("#ledger", "Token pack pack_100 x 1")


def test_a_deduction_should_update_the_open_page_within_two_seconds(
    browser: Browser, stack: Stack
) -> None:
    signed_in(browser, stack)
    before = stack.balance()
    started = time.monotonic()
    with stack.connect() as conn:
        conn.execute("set role service_role")
        row = conn.execute(
            "select status from public.deduct_tokens(%s, 25, %s, 'An agent run')",
            [DEMO_USER_ID, f"browser-{time.time_ns()}"],
        ).fetchone()
    assert row == ("applied",)
    browser.wait_for_text("#available", f"^{before - 25:,}$", int(LIVE_UPDATE_SECONDS * 1000))
    elapsed = time.monotonic() - started
    assert elapsed < LIVE_UPDATE_SECONDS, f"the page took {elapsed:.2f}s"
    browser.wait_for_text("#ledger", "An agent run")
    shot = browser.screenshot(ARTIFACTS / "web-page.png")
    assert shot.stat().st_size > 10_000


def test_keyboard_should_reach_a_buy_button_and_enter_should_open_checkout(
    browser: Browser, stack: Stack, stripe_double: StripeDouble
) -> None:
    signed_in(browser, stack)
    stripe_double.clear()
    focused = None
    for _ in range(30):
        browser.press("Tab")
        focused = browser.focused()
        if focused and focused.get("product") == "pack_100":
            break
    assert focused is not None
    assert focused["product"] == "pack_100", "Tab should reach the first buy button"
    assert focused["tag"] == "button"
    assert focused["label"] == "Buy 100 tokens for $5.00"
    assert focused["outline"] != "none", "the focused button should show a focus ring"

    browser.press("Enter")
    landed = browser.wait_for_url(r"^https://checkout\.stripe\.com/", 5000)
    assert landed in browser.stripe_visits()
    sessions = stripe_double.posts("/v1/checkout/sessions")
    assert len(sessions) == 1
    params = sessions[0].params
    assert params["mode"] == "payment"
    assert params["line_items[0][price]"] == PACK_PRICE
    assert params["client_reference_id"] == DEMO_USER_ID
    assert params["success_url"].startswith(f"{stack.url}/?checkout=success")

    browser.goto(f"{stack.url}/?checkout=cancel")
    browser.wait_for_text("#notice", "Checkout cancelled. Nothing was charged.")


def test_the_page_should_work_from_another_origin(
    browser: Browser, stack: Stack, other_origin: str
) -> None:
    """A host app serves the page itself and calls the API cross-origin (CORS_ORIGINS): sign
    in, the balance, the live stream and the catalog all work through the preflights."""
    browser.goto(f"{other_origin}/")
    if browser.visible("#sign-in-button"):
        browser.click("#sign-in-button")
    browser.wait_for_text("#available", f"^{stack.balance():,}$", 5000)
    browser.wait_for_text("#live-text", "^Live$", 5000)
    assert browser.text('button[data-product="pack_100"]') == "Buy"
    before = stack.balance()
    response = post_purchase(stack)
    assert response.status_code == 200, response.text
    browser.wait_for_text("#available", f"^{before + 100:,}$", 5000)
    assert browser.call("url") == f"{other_origin}/"
    browser.screenshot(ARTIFACTS / "web-page-other-origin.png")


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (500, "The payment provider couldn't start checkout. Nothing was charged."),
        (
            0,
            "We couldn't reach the payment provider, so checkout didn't open. Nothing was charged.",
        ),
    ],
    ids=["stripe-error", "stripe-unreachable"],
)
def test_a_checkout_failure_should_be_explained_in_plain_words(
    browser: Browser, stack: Stack, stripe_double: StripeDouble, failure: int, message: str
) -> None:
    signed_in(browser, stack)
    stripe_double.fail_next(failure, path="/v1/checkout/sessions")
    browser.click('button[data-product="pack_100"]')
    shown = browser.wait_for_text("#error-text", "Nothing was charged")["text"]
    assert shown.startswith(message)
    assert browser.call("url") == f"{stack.url}/", "the page should stay, not redirect"
    focused = browser.focused()
    assert focused is not None
    assert focused["product"] == "pack_100", "focus should return to the button"
    assert browser.text('button[data-product="pack_100"]') == "Buy"
    browser.screenshot(ARTIFACTS / f"web-page-checkout-failure-{failure}.png")


def test_an_expired_session_should_say_so_and_offer_to_sign_in_again(
    browser: Browser, stack: Stack
) -> None:
    signed_in(browser, stack)
    expired = user_token(
        DEMO_USER_ID, secret=stack.settings["SUPABASE_JWT_SECRET"], expires_in=-120
    )
    session = {"token": expired, "userId": DEMO_USER_ID, "email": "demo@example.com"}
    browser.set_session_storage(SESSION_KEY, json.dumps(session))
    browser.reload()
    text = browser.wait_for_text("#error-text", "expired")["text"]
    assert text == "Your session has expired. Sign in again to see your balance and buy tokens."
    assert browser.visible("#error-sign-in")
    assert not browser.visible("#available"), "nothing stale should stay on screen"
    browser.screenshot(ARTIFACTS / "web-page-expired.png")

    browser.click("#error-sign-in")
    browser.wait_for_text("#available", f"^{stack.balance():,}$")
    assert not browser.visible("#error")


# --- the Creator section -------------------------------------------------------------------------


def page_user(stack: Stack) -> tuple[str, str, str]:
    """A user of the test's own in the stack's auth.users (the signup trigger opens the
    account): (id, email, an access token signed with the stack's secret)."""
    user_id = str(uuid.uuid4())
    email = f"creator-{user_id[:8]}@example.com"
    with stack.connect() as conn:
        conn.execute(
            "insert into auth.users (id, email, aud, role) "
            "values (%s, %s, 'authenticated', 'authenticated')",
            [user_id, email],
        )
    claims: dict[str, Any] = {"email": email}
    if stack.settings.get("JWT_ISSUER"):
        claims["iss"] = stack.settings["JWT_ISSUER"]
    token = user_token(user_id, secret=stack.settings["SUPABASE_JWT_SECRET"], **claims)
    return user_id, email, token


def signed_in_as(browser: Browser, stack: Stack, user_id: str, email: str, token: str) -> None:
    """The page, fresh, with this user's session (as an app that signed them in stores it)."""
    browser.goto(f"{stack.url}/")
    # Booted first: a page that finds no session clears the key, which would drop ours.
    browser.wait_for_text("#sign-in-button:visible, #account-email:visible", ".")
    session = {"token": token, "userId": user_id, "email": email}
    browser.set_session_storage(SESSION_KEY, json.dumps(session))
    browser.reload()
    browser.wait_for_text("#account-email", f"^{email}$")
    browser.wait_for_text("#live-text", "^Live$", 5000)


def test_a_user_who_is_not_a_creator_should_be_offered_onboarding_and_sent_to_stripe(
    browser: Browser, stack: Stack, stripe_double: StripeDouble
) -> None:
    user_id, email, token = page_user(stack)
    signed_in_as(browser, stack, user_id, email, token)
    browser.wait_for_text("#creator-onboard", "^Sell your agents$")
    assert browser.call("attribute", selector="#creator-onboard", name="type") == "button"
    assert not browser.visible("#creator-account"), "no creator figures for a non-creator"
    browser.screenshot(ARTIFACTS / "web-page-creator-onboard.png")
    stripe_double.clear()

    browser.click("#creator-onboard")
    landed = browser.wait_for_url(r"^https://connect\.stripe\.com/", 5000)
    accounts = stripe_double.posts("/v1/accounts")
    assert len(accounts) == 1, "the click should create one Express account"
    assert accounts[0].params["type"] == "express"
    assert accounts[0].params["metadata[user_id]"] == user_id
    account_id = next(
        a for a, v in stripe_double.state.accounts.items() if v["metadata"]["user_id"] == user_id
    )
    links = stripe_double.posts("/v1/account_links")
    assert [link.params for link in links] == [
        {
            "account": account_id,
            "refresh_url": f"{stack.url}/?creator=refresh",
            "return_url": f"{stack.url}/?creator=onboarded",
            "type": "account_onboarding",
        }
    ]
    assert landed == f"https://connect.stripe.com/setup/e/{account_id}/double", (
        "the page should open the onboarding link the service answered"
    )
    assert landed in browser.stripe_visits()
    with stack.connect() as conn:
        row = conn.execute(
            "select stripe_account_id from billing.creators where user_id = %s", [user_id]
        ).fetchone()
    assert row == (account_id,), "the account should be recorded before the link is handed out"

    # Back from Stripe (return_url): onboarding is not finished until account.updated says so.
    browser.goto(f"{stack.url}/?creator=onboarded")
    browser.wait_for_text("#notice", "^Welcome back from Stripe")
    browser.wait_for_text("#creator-state", "onboarding isn't finished")
    assert browser.text("#creator-continue") == "Continue onboarding"
    assert not browser.visible("#creator-dashboard"), "no dashboard before onboarding is done"
    assert not browser.visible("#creator-join")


@pytest.fixture
def payouts_at_once(stack: Stack) -> Iterator[None]:
    """Earnings payable at once (no hold) from 1 cent, for one test; the defaults after it."""
    with stack.connect() as conn:
        conn.execute(
            "update billing.settings set creator_earnings_hold = interval '0', "
            "creator_payout_minimum_cents = 1"
        )
    yield
    with stack.connect() as conn:
        conn.execute(
            "update billing.settings set creator_earnings_hold = default, "
            "creator_payout_minimum_cents = default"
        )


@pytest.mark.usefixtures("payouts_at_once")
def test_a_creator_should_see_the_earnings_the_database_holds_and_the_payouts(
    browser: Browser, stack: Stack, stripe_double: StripeDouble
) -> None:
    """A creator made through the service and the database's own paths: onboarded, enabled by
    a signed account.updated, an agent listed, tokens spent on it, a payout run; the page shows
    the balance exactly as the earnings ledger holds it."""
    creator, email, token = page_user(stack)
    auth = {"Authorization": f"Bearer {token}"}
    onboarded = httpx.post(f"{stack.url}/v1/creators/onboard", headers=auth, timeout=10)
    assert onboarded.status_code == 201, onboarded.text
    account_id = onboarded.json()["stripe_account_id"]
    enabled = account_updated(
        account_id,
        charges=True,
        payouts=True,
        created=int(time.time()),
        requirements={"currently_due": ["individual.verification.document"]},
    )
    answer = post_event(stack, enabled.payload)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "applied", answer.text
    code = f"agent_page_{creator[:8]}"
    listed = httpx.post(
        f"{stack.url}/v1/creators/listings",
        json={"code": code, "name": "Page Summarizer", "price_cents": 1999, "tokens_per_run": 7},
        headers=auth,
        timeout=10,
    )
    assert listed.status_code == 201, listed.text

    spender, _, _ = page_user(stack)

    def runs(count: int) -> None:
        with stack.connect() as conn:
            conn.execute("set role service_role")
            for _ in range(count):
                row = conn.execute(
                    "select status from public.deduct_tokens(%s, 7, %s, 'run', %s)",
                    [spender, f"run-{uuid.uuid4()}", Jsonb({"listing": code})],
                ).fetchone()
                assert row == ("applied",)

    runs(3)
    # A payout of the settled whole cents, then more runs: the balance keeps the fraction of a
    # cent the payout left.
    paid = subprocess.run(
        [sys.executable, "-m", "token_billing.cli", "creators", "payout"],
        cwd=stack.state,
        env={**stack.env, **stack.settings},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert [t["destination"] for t in stripe_double.state.transfers.values()].count(
        account_id
    ) == 1, "the payout should be one transfer to the creator's account"
    runs(2)

    with stack.connect() as conn:
        balance, settled, earned = conn.execute(
            "select balance_microcents, settled_microcents, earned_microcents "
            "from public.creator_statement(%s)",
            [creator],
        ).fetchone() or (None, None, None)
        entries = conn.execute(
            "select kind, amount_microcents from billing.creator_earnings "
            "where creator_id = %s order by id desc",
            [creator],
        ).fetchall()
        payouts = conn.execute(
            "select period, amount_cents, status from billing.creator_payouts "
            "where creator_id = %s",
            [creator],
        ).fetchall()
        commission_bps = conn.execute(
            "select commission_bps from public.get_creator(%s)", [creator]
        ).fetchone()
    assert balance is not None
    assert balance % 1_000_000 != 0, "the balance should hold a fraction of a cent to show"
    assert [status for _, _, status in payouts] == ["paid"], payouts
    assert commission_bps == (2000,)

    signed_in_as(browser, stack, creator, email, token)
    browser.wait_for_text("#creator-balance", f"^{re.escape(dollars(balance, 8, 2))}$")
    assert browser.text("#creator-balance-exact").startswith(
        f"Exactly {dollars(balance, 8, None)}."
    ), "the exact balance, to the micro-cent, as the database holds it"
    assert browser.text("#creator-settled") == dollars(settled, 8, 2)
    assert browser.text("#creator-earned") == dollars(earned, 8, 2)
    assert browser.text("#creator-paid-out") == dollars(payouts[0][1], 2, 2)
    assert browser.text("#creator-charges") == "Yes"
    assert browser.text("#creator-payouts-enabled") == "Yes"
    assert browser.text("#creator-commission") == "20% (you keep 80%)"
    assert browser.text("#creator-state") == (
        "Your Stripe account can take payments and be paid out."
    )
    assert browser.text("#creator-requirement-list") == "A photo of an identity document", (
        "what Stripe needs should be said in plain words, not as Stripe's field name"
    )

    rows = browser.count("#creator-earnings-rows tr")
    assert rows == len(entries) == 6, "five runs and the payout, newest first"
    newest = browser.text("#creator-earnings-rows tr:first-child")
    assert f"Your share of tokens spent on {code} (7 tokens)" in newest
    assert f"+{dollars(entries[0][1], 8, None)}" in newest
    assert f"{dollars(balance, 8, None)}" in newest, "the newest entry's balance is the balance"
    payout_row = browser.text("#creator-earnings-rows tr:nth-child(3)")
    assert entries[2][0] == "payout"
    assert "Payout" in payout_row
    assert dollars(entries[2][1], 8, None) in payout_row
    assert dollars(entries[2][1], 8, None).startswith("\u2212"), "a debit shows its minus sign"

    payout_text = browser.text("#creator-payout-rows")
    assert payouts[0][0] in payout_text
    assert "Paid" in payout_text
    assert dollars(payouts[0][1], 2, 2) in payout_text
    listing = browser.text(f'#creator-listings li[data-listing="{code}"]')
    assert listing == f"Page Summarizer ({code}): $19.99, 7 tokens a run"
    assert browser.text("#creator-continue") == "Give Stripe what it needs"
    assert browser.visible("#creator-dashboard")
    assert not browser.visible("#creator-onboard")
    browser.screenshot(ARTIFACTS / "web-page-creator.png")

    # The Stripe dashboard: a login link for the creator's account, opened like Checkout.
    stripe_double.clear()
    browser.click("#creator-dashboard")
    landed = browser.wait_for_url(r"^https://connect\.stripe\.com/express/", 5000)
    assert landed == f"https://connect.stripe.com/express/{account_id}/double"
    assert len(stripe_double.posts(f"/v1/accounts/{account_id}/login_links")) == 1


def test_an_onboarding_failure_should_be_explained_in_plain_words(
    browser: Browser, stack: Stack, stripe_double: StripeDouble
) -> None:
    user_id, email, token = page_user(stack)
    signed_in_as(browser, stack, user_id, email, token)
    stripe_double.fail_next(500, path="/v1/accounts")
    browser.click("#creator-onboard")
    shown = browser.wait_for_text("#error-text", "Stripe")["text"]
    assert shown == "Stripe couldn't open the page for your account. Please try again later."
    assert browser.call("url") == f"{stack.url}/", "the page should stay, not redirect"
    focused = browser.focused()
    assert focused is not None
    assert focused["id"] == "creator-onboard", "focus should return to the button"
    assert browser.text("#creator-onboard") == "Sell your agents"


# --- a second start ------------------------------------------------------------------------------


def test_a_second_make_dev_should_not_buy_again(stack: Stack) -> None:
    """The startup purchase lands once per fresh dev database, not at every start."""
    before = stack.balance()
    again = _dev("--no-wait", *stack.args, env=stack.env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Demo purchase: made when this database was new" in again.stdout
    assert "landed: balance" not in again.stdout
    assert stack.balance() == before, "a restart should not credit the demo user again"
