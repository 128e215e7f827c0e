"""The demo page's server side: dev-only routes, the demo token, the ledger read, the TypeScript.

The page itself is tested in a real browser in tests/test_browser.py.
"""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from pathlib import Path

import httpx
import jwt
import pytest
from starlette.testclient import TestClient

from scripts import web as web_build
from scripts.dev import DEMO_USER_ID
from scripts.pgcluster import Database
from tests.app_support import (
    JWT_SECRET,
    STRIPE_KEY,
    WEBHOOK_SECRET,
    bearer,
    new_user,
    running_server,
    settings_for,
)
from tests.browser_support import dollars
from token_billing.server.app import create_app
from token_billing.server.routes import dev
from token_billing.server.settings import load_settings

PAGE_PATHS = [
    ("GET", "/"),
    ("GET", "/styles.css"),
    ("GET", "/config.json"),
    ("GET", "/dist/main.js"),
    ("POST", "/dev/session"),
]


@pytest.fixture(scope="module")
def bundle() -> None:
    """The page's script, built as `make web` builds it (only when a source changed)."""
    web_build.build()


@pytest.mark.parametrize("environment", ["production", "test"])
def test_page_and_demo_sign_in_should_404_outside_development(
    db: Database, bundle: None, environment: str
) -> None:
    with TestClient(create_app(settings_for(db, environment=environment))) as client:
        answers = {(method, path): client.request(method, path) for method, path in PAGE_PATHS}
    assert {key: r.status_code for key, r in answers.items()} == dict.fromkeys(answers, 404)
    assert not any("access_token" in r.text for r in answers.values())


def test_demo_sign_in_should_exist_only_when_development_is_explicit(
    db: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A deployment that forgot ENVIRONMENT is production: nothing is signed. Against the
    service under uvicorn, with its settings read from the environment as `serve` reads them."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("ENVIRONMENT", "CORS_ORIGINS", "METRICS_PORT", "SUPABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "DATABASE_URL": db.dsn(),
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    answers = {}
    for environment in (None, "production", "test", "development"):
        if environment is not None:
            monkeypatch.setenv("ENVIRONMENT", environment)
        with running_server(load_settings()) as url:
            answers[environment] = httpx.post(f"{url}/dev/session", timeout=10)
    assert {env: r.status_code for env, r in answers.items()} == {
        None: 404,
        "production": 404,
        "test": 404,
        "development": 200,
    }
    assert "access_token" in answers["development"].json()


def test_checkout_and_portal_should_say_what_to_configure_with_a_generated_key(
    db: Database,
) -> None:
    """make dev without a Stripe test key: a clear 409 at once, not a 503 after Stripe refused
    the made-up key."""
    settings = settings_for(
        db,
        environment="development",
        stripe_secret_key="sk_test_tbdev_0123456789abcdef01234567",  # noqa: S106 - made up
        stripe_api_base="https://api.stripe.com",
    )
    user = new_user(db)
    with TestClient(create_app(settings)) as client:
        checkout = client.post(
            "/v1/checkout/sessions", json={"product": "pack_100"}, headers=bearer(user)
        )
        portal = client.post("/v1/portal/sessions", headers=bearer(user))
        intent = client.post(
            "/v1/payment-intents", json={"product": "pack_100"}, headers=bearer(user)
        )
    for response in (checkout, portal, intent):
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "stripe_not_configured"
        assert "STRIPE_SECRET_KEY" in response.json()["error"]["message"]
        assert "sk_test_" in response.json()["error"]["message"]


def test_page_should_be_served_in_development(db: Database, bundle: None) -> None:
    with TestClient(create_app(settings_for(db, environment="development"))) as client:
        page = client.get("/")
        script = client.get("/dist/main.js")
        styles = client.get("/styles.css")
        config = client.get("/config.json")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == (dev.WEB_DIR / "index.html").read_text(), "the copyable example, as is"
    assert '<script type="module" src="dist/main.js">' in page.text
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert styles.status_code == 200
    assert config.json() == {
        "apiUrl": "",
        "supabaseUrl": None,
        "supabaseAnonKey": None,
        "devSignIn": True,
        "stripePublishableKey": None,
    }


def test_config_should_offer_the_payment_element_with_a_publishable_key(db: Database) -> None:
    settings = settings_for(
        db, environment="development", stripe_publishable_key="pk_test_51DoubleKey0123"
    )
    with TestClient(create_app(settings)) as client:
        config = client.get("/config.json").json()
    assert config["stripePublishableKey"] == "pk_test_51DoubleKey0123"
    main = (dev.WEB_DIR / "main.ts").read_text()
    assert "/v1/payment-intents" in (dev.WEB_DIR / "api.ts").read_text()
    assert "https://js.stripe.com/v3/" in main, "Stripe.js comes from Stripe's own domain"


def test_config_should_offer_realtime_when_supabase_is_configured(db: Database) -> None:
    settings = settings_for(
        db,
        environment="development",
        supabase_url="https://abcd.supabase.co",
        supabase_anon_key="anon-key-for-the-browser",
    )
    with TestClient(create_app(settings)) as client:
        config = client.get("/config.json").json()
    assert config["supabaseUrl"] == "https://abcd.supabase.co"
    assert config["supabaseAnonKey"] == "anon-key-for-the-browser"


def test_page_script_should_bundle_supabase_js_and_load_nothing_from_a_cdn(bundle: None) -> None:
    html = (dev.WEB_DIR / "index.html").read_text()
    assert "http://" not in html
    assert "https://" not in html
    chunks = list((dev.DIST_DIR / "chunks").glob("*.js"))
    # supabase-js's Realtime client connects to <project>/realtime/v1.
    assert any("realtime/v1" in chunk.read_text() for chunk in chunks), (
        "supabase-js (realtime-js) should be bundled into a chunk of its own"
    )
    assert "realtime/v1" not in dev.BUNDLE.read_text(), (
        "the main script should load supabase-js only when Realtime is configured"
    )


def test_demo_sign_in_should_give_a_token_the_service_accepts(db: Database) -> None:
    db.create_user(DEMO_USER_ID, "demo@example.com")
    assert str(dev.DEMO_USER_ID) == DEMO_USER_ID, "make dev and the service should agree"
    with TestClient(create_app(settings_for(db, environment="development"))) as client:
        session = client.post("/dev/session")
        token = session.json()["access_token"]
        balance = client.get("/v1/balance", headers={"Authorization": f"Bearer {token}"})
    assert session.status_code == 200
    assert session.headers["cache-control"] == "no-store"
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience="authenticated")
    assert claims["sub"] == DEMO_USER_ID
    assert claims["role"] == "authenticated"
    assert 3500 <= claims["exp"] - claims["iat"] <= 3600
    assert balance.status_code == 200
    assert balance.json()["balance"] == 100


# --- GET /v1/ledger ----------------------------------------------------------------------------


def test_ledger_should_list_only_the_own_entries_newest_first(db: Database) -> None:
    alice, bob = new_user(db), new_user(db)
    with db.as_service_role() as conn:
        conn.execute("select * from public.deduct_tokens(%s, 30, 'l-1', 'a chat')", [alice])
        conn.execute("select * from public.add_tokens(%s, 9, 'l-2', 'promotion', 'hi')", [bob])
    with TestClient(create_app(settings_for(db))) as client:
        mine = client.get("/v1/ledger", headers=bearer(alice))
        one = client.get("/v1/ledger?limit=1", headers=bearer(alice))
        theirs = client.get("/v1/ledger", headers=bearer(bob))
    assert mine.status_code == 200
    entries = mine.json()["entries"]
    assert [(e["amount"], e["balance_after"], e["kind"]) for e in entries] == [
        (-30, 70, "usage"),
        (100, 100, "signup"),
    ]
    assert entries[0]["description"] == "a chat"
    assert set(entries[0]) == {
        "id",
        "amount",
        "balance_after",
        "kind",
        "description",
        "created_at",
    }, "no metadata nor idempotency keys should leave the server"
    assert [e["amount"] for e in one.json()["entries"]] == [-30]
    assert [e["amount"] for e in theirs.json()["entries"]] == [9, 100]


@pytest.mark.parametrize("limit", ["0", "101", "ten"])
def test_ledger_should_refuse_a_bad_limit(db: Database, limit: str) -> None:
    with TestClient(create_app(settings_for(db))) as client:
        response = client.get(f"/v1/ledger?limit={limit}", headers=bearer(uuid.uuid4()))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_limit"


def test_ledger_should_require_a_signed_in_user(db: Database) -> None:
    with TestClient(create_app(settings_for(db))) as client:
        response = client.get("/v1/ledger")
    assert response.status_code == 401


# --- TypeScript ----------------------------------------------------------------------------------


def test_examples_should_typecheck_against_the_real_supabase_js_and_react_types() -> None:
    """tsc --noEmit over examples/web, useTokenBalance.ts included (strict)."""
    proc = web_build.typecheck()
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_money_should_format_integer_amounts_exactly(tmp_path: Path) -> None:
    """examples/web/money.ts, bundled by esbuild and run by node, against Python's decimals:
    cents and micro-cents up to 2^53 without a floating point digit wrong."""
    bundle = tmp_path / "money.mjs"
    built = subprocess.run(
        [
            str(web_build.BIN / "esbuild"),
            str(web_build.WEB / "money.ts"),
            "--format=esm",
            f"--outfile={bundle}",
            "--log-level=warning",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    rng = random.Random(19)
    edges = [0, 1, -1, 5, -5, 29, 999_999, -999_999, 1_000_000, 55_999_992, 18_666_664]
    edges += [-106_666_656, 100_000_000, 2**53 - 1, -(2**53 - 1), 123_456_789_012]
    amounts = edges + [rng.randint(-(2**53 - 1), 2**53 - 1) for _ in range(300)]
    amounts += [rng.randint(-(10**9), 10**9) for _ in range(300)]
    runner = tmp_path / "run.mjs"
    runner.write_text(
        'import * as money from "./money.mjs";\n'
        'import { readFileSync } from "node:fs";\n'
        "const amounts = JSON.parse(readFileSync(process.argv[2], 'utf8'));\n"
        "const out = amounts.map((a) => [money.formatMinor(a, 'usd'), money.formatMicro(a, 'usd'),"
        " money.formatMicroExact(a, 'usd'), money.hasFraction(a)]);\n"
        "out.push([money.formatMinor(500, 'jpy'), money.formatMicro(12_000_000, 'JPY')]);\n"
        "try { money.formatMinor(0.1 + 0.2, 'usd'); out.push('no error'); }"
        " catch (e) { out.push(e.name); }\n"
        "console.log(JSON.stringify(out));\n"
    )
    cases = tmp_path / "amounts.json"
    cases.write_text(json.dumps(amounts))
    ran = subprocess.run(
        ["node", str(runner), str(cases)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    *formatted, yen, fraction_error = json.loads(ran.stdout)
    wrong = [
        (amount, got, want)
        for amount, got in zip(amounts, formatted, strict=True)
        if got
        != (
            want := [
                dollars(amount, 2, 2),
                dollars(amount, 8, 2),
                dollars(amount, 8, None),
                amount % 1_000_000 != 0,
            ]
        )
    ]
    assert wrong == [], f"money.ts should print exact amounts: {wrong[:5]}"
    assert formatted[edges.index(55_999_992)][1:3] == ["$0.55", "$0.55999992"]
    assert formatted[edges.index(-999_999)][1] == "$0.00", "no minus sign on a zero figure"
    assert yen == ["¥500", "¥12"], "a currency without cents should have no decimals"
    assert fraction_error == "RangeError", "a fraction is no amount: refused, not rounded"
