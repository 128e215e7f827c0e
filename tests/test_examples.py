"""The README's agent endpoint (examples/agent/app.py) does what the README says it does."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from starlette.testclient import TestClient

from examples.agent.app import ESTIMATE, create_app
from scripts.pgcluster import Database

USER = uuid.UUID("00000000-0000-0000-0000-00000000e001")


def _balance(db: Database) -> int:
    return int(db.psql(f"select balance from billing.accounts where user_id = '{USER}'"))


def test_the_agent_endpoint_charges_what_each_call_used_once(db: Database) -> None:
    db.create_user(USER)  # 100 tokens of signup grant
    db.psql(f"select public.add_tokens('{USER}', 1000, 'bought-1', 'purchase')")
    app = create_app(db.dsn("authenticator"))
    with TestClient(app) as client:
        first = client.post(
            "/agent",
            json={"user_id": str(USER), "prompt": "hello"},
            headers={"idempotency-key": "r1"},
        )
        assert first.status_code == 200, first.text
        assert first.json() == {"answer": "olleh", "tokens_used": 3, "balance": 1097}
        # A retried request with the same key is not run or charged again: 409 with the cost.
        again = client.post(
            "/agent",
            json={"user_id": str(USER), "prompt": "hello"},
            headers={"idempotency-key": "r1"},
        )
        assert again.status_code == 409, again.text
        assert again.json()["tokens_used"] == 3
        assert "already resolved" in again.json()["error"]
        assert _balance(db) == 1097
        # Without the estimate available, the call is refused before the model runs.
        db.psql(f"select public.deduct_tokens('{USER}', {1097 - ESTIMATE + 1}, 'spent')")
        poor = client.post(
            "/agent", json={"user_id": str(USER), "prompt": "hi"}, headers={"idempotency-key": "r2"}
        )
        assert poor.status_code == 402
        assert f"{ESTIMATE} were requested" in poor.json()["error"]
        assert client.post("/agent", json={"user_id": str(USER), "prompt": "x"}).status_code == 400
    assert db.psql("select count(*) from billing.check_invariants()").strip() == "0"


PLANS = Path(__file__).resolve().parents[1] / "examples" / "plans"


def test_the_plans_walkthrough_prints_what_the_readme_shows(db: Database) -> None:
    """examples/plans/walkthrough.sql (the README's crossing of 20% and the auto top-up landing)
    prints exactly examples/plans/walkthrough.out."""
    out = db.cluster.psql(db.name, file=PLANS / "walkthrough.sql")
    if os.environ.get("UPDATE_EXAMPLES") == "1":  # after changing the walkthrough on purpose
        (PLANS / "walkthrough.out").write_text(out)
    assert out == (PLANS / "walkthrough.out").read_text()
    assert db.psql("select count(*) from billing.check_invariants()").strip() == "0"
