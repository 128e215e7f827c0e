"""Real Stripe test mode, for whoever has a test key: skipped without one (CI has none).

    STRIPE_TEST_SECRET_KEY=sk_test_... make test PYTEST_ARGS='tests/test_stripe_live.py'

It syncs the catalog into the test-mode account (idempotent: lookup keys `token-billing:<code>`),
then asks the service for a Checkout Session for a pack and a plan, exactly as a signed-in user
would, and checks what Stripe answered. Nothing is charged: the sessions are never paid.
"""

from __future__ import annotations

import os

import pytest
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import JWT_SECRET, bearer, new_user, settings_for
from token_billing.cli import main
from token_billing.server.app import create_app

KEY = os.environ.get("STRIPE_TEST_SECRET_KEY", "")

pytestmark = pytest.mark.skipif(
    not KEY.startswith("sk_test_"), reason="set STRIPE_TEST_SECRET_KEY=sk_test_... to run"
)


def test_checkout_against_stripe_test_mode(
    db: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.chdir(str(tmp_path))
    for name, value in {
        "ENVIRONMENT": "test",
        "DATABASE_URL": db.dsn(),
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "STRIPE_SECRET_KEY": KEY,
        "STRIPE_WEBHOOK_SECRET": "whsec_live_test_not_used_for_signing_0001",
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["stripe", "sync-products"]) == 0

    user = new_user(db)
    settings = settings_for(db, stripe_url="https://api.stripe.com", stripe_secret_key=KEY)
    headers = bearer(user)
    with TestClient(create_app(settings)) as client:
        pack = client.post("/v1/checkout/sessions", json={"product": "pack_100"}, headers=headers)
        plan = client.post("/v1/checkout/sessions", json={"product": "starter"}, headers=headers)
    assert pack.status_code == 201, pack.text
    assert pack.json()["id"].startswith("cs_test_")
    assert pack.json()["url"].startswith("https://checkout.stripe.com/")
    assert plan.status_code == 201, plan.text
    assert plan.json()["id"].startswith("cs_test_")
