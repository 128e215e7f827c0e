"""API keys and the usage routes: the key lifecycle (create, use, revoke, expiry, scopes,
prefixes, the constant-time comparison), every new route against forged, missing, revoked,
expired and wrong-scope credentials, usage priced and charged end to end, holds, the rate limit,
and a property of graduated pricing: any split of a quantity into calls of one period costs
what the whole quantity costs."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import bearer, new_user, scalar, settings_for, user_token
from token_billing.server import api_keys
from token_billing.server.app import create_app

GPT4O_CALL = [
    {"meter": "llm.input_tokens", "quantity": 1200, "dimensions": {"model": "gpt-4o"}},
    {"meter": "llm.output_tokens", "quantity": 800, "dimensions": {"model": "gpt-4o"}},
]
# Every route an API key reaches, with a body that is valid for it (hold ids made up).
HOLD = "00000000-0000-0000-0000-00000000abcd"
KEY_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/usage", {"items": GPT4O_CALL}),
    ("POST", "/v1/usage/quote", {"items": GPT4O_CALL}),
    ("GET", "/v1/usage", None),
    ("GET", "/v1/balance", None),
    ("POST", "/v1/holds", {"amount": 5}),
    ("POST", f"/v1/holds/{HOLD}/settle", {"amount": 1}),
    ("POST", f"/v1/holds/{HOLD}/release", None),
    ("POST", f"/v1/holds/{HOLD}/extend", {"ttl_seconds": 60}),
]
ROUTE_IDS = [f"{method} {path}" for method, path, _ in KEY_ROUTES]


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(db))) as c:
        yield c


def make_key(client: TestClient, user: uuid.UUID, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/api-keys", json=body, headers=bearer(user))
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


def key_auth(key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def call(
    client: TestClient, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> Any:
    return client.request(
        method, path, json=body, headers={"Idempotency-Key": "route-check", **headers}
    )


# --- the key lifecycle -------------------------------------------------------------------------


def test_a_key_should_be_shown_once_and_listed_without_its_secret(
    client: TestClient, db: Database
) -> None:
    user = new_user(db)
    made = make_key(client, user, name="agent", scopes=["usage:write", "balance:read"])
    assert made["key"].startswith("tb_test_")
    assert len(made["key"]) == 72
    assert made["lookup"] == made["key"][:20]
    assert made["scopes"] == ["balance:read", "usage:write"]
    listed = client.get("/v1/api-keys", headers=bearer(user)).json()["api_keys"]
    assert [k["id"] for k in listed] == [made["id"]]
    assert "key" not in listed[0]
    assert made["key"][20:] not in str(listed), "the secret should never be listed"
    stored = scalar(db, "select count(*) from billing.api_keys where lookup = %s", [made["lookup"]])
    assert stored == 1
    assert client.get("/v1/api-keys", headers=bearer(new_user(db))).json() == {"api_keys": []}


def test_a_key_should_work_until_revoked_and_then_at_once_no_more(
    client: TestClient, db: Database
) -> None:
    user = new_user(db)
    key = make_key(client, user)
    response = client.get("/v1/balance", headers=key_auth(key["key"]))
    assert response.status_code == 200
    assert response.json()["balance"] == 100
    listed = client.get("/v1/api-keys", headers=bearer(user)).json()["api_keys"]
    assert listed[0]["last_used_at"] is not None, "the first use should be recorded"

    other = new_user(db)
    foreign = client.delete(f"/v1/api-keys/{key['id']}", headers=bearer(other))
    assert foreign.status_code == 404, "another user should not revoke the key"
    revoked = client.delete(f"/v1/api-keys/{key['id']}", headers=bearer(user))
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "applied"
    again = client.delete(f"/v1/api-keys/{key['id']}", headers=bearer(user))
    assert again.json()["status"] == "duplicate"

    refused = client.get("/v1/balance", headers=key_auth(key["key"]))
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "the API key has been revoked"


def test_the_key_routes_should_need_a_signed_in_user(client: TestClient, db: Database) -> None:
    key = make_key(client, new_user(db))
    assert client.post("/v1/api-keys", json={}).status_code == 401
    assert client.get("/v1/api-keys").status_code == 401
    with_key = client.get("/v1/api-keys", headers=key_auth(key["key"]))
    assert with_key.status_code == 401, "an API key should not manage API keys"
    assert client.delete(f"/v1/api-keys/{key['id']}").status_code == 401
    user = new_user(db)
    wrong_secret = "not-the-project-secret-0123456789abcdef"  # noqa: S105 - a test value
    forged = {"Authorization": f"Bearer {user_token(user, secret=wrong_secret)}"}
    expired = {"Authorization": f"Bearer {user_token(user, expires_in=-3600)}"}
    for headers in (forged, expired):
        for method, path in (
            ("POST", "/v1/api-keys"),
            ("GET", "/v1/api-keys"),
            ("DELETE", f"/v1/api-keys/{key['id']}"),
        ):
            response = client.request(
                method, path, json={} if method == "POST" else None, headers=headers
            )
            assert response.status_code == 401, (method, path, response.text)


def test_an_unknown_scope_should_be_refused(client: TestClient, db: Database) -> None:
    response = client.post("/v1/api-keys", json={"scopes": ["admin"]}, headers=bearer(new_user(db)))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_scopes"


@pytest.fixture
def keys(client: TestClient, db: Database) -> dict[str, str]:
    """A user's keys: one with every scope, a revoked one, an expired one, a read-only one."""
    user = new_user(db)
    made = {
        "good": make_key(client, user),
        "revoked": make_key(client, user),
        "expired": make_key(client, user),
        "read_only": make_key(client, user, scopes=["balance:read"]),
    }
    client.delete(f"/v1/api-keys/{made['revoked']['id']}", headers=bearer(user))
    with db.connect() as conn:
        conn.execute(
            "update billing.api_keys set expires_at = now() - interval '1 second' where id = %s",
            [made["expired"]["id"]],
        )
    return {name: value["key"] for name, value in made.items()}


def _forged(key: str) -> str:
    last = "0" if key[-1] != "0" else "1"
    return key[:-1] + last


@pytest.mark.parametrize(("method", "path", "body"), KEY_ROUTES, ids=ROUTE_IDS)
def test_every_key_route_should_refuse_bad_credentials(
    client: TestClient,
    keys: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    good = keys["good"]
    cases = {
        "missing": ({}, 401, "unauthorized"),
        "forged secret": (key_auth(_forged(good)), 401, "unauthorized"),
        "unknown lookup": (key_auth("tb_test_" + "0" * 64), 401, "unauthorized"),
        "malformed": (key_auth("tb_test_short"), 401, "unauthorized"),
        "live key on a test deployment": (key_auth("tb_live_" + good[8:]), 401, "unauthorized"),
        "revoked": (key_auth(keys["revoked"]), 401, "unauthorized"),
        "expired": (key_auth(keys["expired"]), 401, "unauthorized"),
    }
    for case, (headers, status, code) in cases.items():
        response = call(client, method, path, body, headers)
        assert response.status_code == status, f"{case}: {response.text}"
        assert response.json()["error"]["code"] == code, case
    if path != "/v1/balance":
        response = call(client, method, path, body, key_auth(keys["read_only"]))
        assert response.status_code == 403
        error = response.json()["error"]
        assert error["code"] == "missing_scope"
        assert ("usage:write" in error["message"]) or ("usage:read" in error["message"])


def test_the_messages_should_say_what_is_wrong_with_a_key(
    client: TestClient, keys: dict[str, str]
) -> None:
    def message(key: str) -> str:
        text: str = client.get("/v1/balance", headers=key_auth(key)).json()["error"]["message"]
        return text

    assert message(keys["expired"]) == "the API key has expired"
    assert message(_forged(keys["good"])) == "the API key is not valid"
    assert "tb_test_" in message("tb_live_" + keys["good"][8:])


def test_a_write_route_should_take_an_api_key_not_a_session(
    client: TestClient, db: Database
) -> None:
    response = client.post(
        "/v1/usage",
        json={"items": GPT4O_CALL},
        headers={**bearer(new_user(db)), "Idempotency-Key": "k"},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "api_key_required"


def test_the_secret_should_be_compared_in_constant_time(
    client: TestClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = make_key(client, new_user(db))["key"]
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert client.get("/v1/balance", headers=key_auth(key)).status_code == 200
    assert client.get("/v1/balance", headers=key_auth(_forged(key))).status_code == 401
    assert client.get("/v1/balance", headers=key_auth("tb_test_" + "a" * 64)).status_code == 401
    assert [presented for _, presented in compared] == [
        api_keys.secret_sha256(k) for k in (key, _forged(key), "tb_test_" + "a" * 64)
    ], "every key presented, known or not, should go through hmac.compare_digest"
    assert compared[0][0] == compared[0][1]


# --- usage priced and charged ------------------------------------------------------------------


def test_an_agent_should_price_and_charge_a_model_call_in_one_request(
    client: TestClient, db: Database
) -> None:
    user = new_user(db)
    key = make_key(client, user)["key"]
    quote = client.post("/v1/usage/quote", json={"items": GPT4O_CALL}, headers=key_auth(key))
    assert quote.status_code == 200
    assert quote.json()["tokens"] == 11
    assert [item["tokens"] for item in quote.json()["items"]] == [3, 8]

    charged = client.post("/v1/usage", json={"items": GPT4O_CALL}, headers=key_auth(key, "call-1"))
    assert charged.status_code == 200, charged.text
    assert charged.json()["status"] == "applied"
    assert charged.json()["tokens"] == 11
    assert charged.json()["balance"] == 89

    retry = client.post("/v1/usage", json={"items": GPT4O_CALL}, headers=key_auth(key, "call-1"))
    assert retry.json()["status"] == "duplicate"
    assert retry.json()["entry_id"] == charged.json()["entry_id"]
    other = client.post(
        "/v1/usage", json={"items": GPT4O_CALL[:1]}, headers=key_auth(key, "call-1")
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"

    summary = client.get("/v1/usage?group_by=model", headers=key_auth(key)).json()
    assert set(summary) == {"from", "to", "meters"}
    assert [
        (m["meter"], m["dimension"], m["quantity"], m["tokens"]) for m in summary["meters"]
    ] == [
        ("llm.input_tokens", "gpt-4o", 1200, 3),
        ("llm.output_tokens", "gpt-4o", 800, 8),
    ]
    as_user = client.get("/v1/usage", headers=bearer(user)).json()
    assert sum(m["tokens"] for m in as_user["meters"]) == 11, "the user should read it too"
    assert client.get("/v1/balance", headers=key_auth(key)).json()["balance"] == 89


def test_an_agent_may_send_the_provider_cost_of_a_call(client: TestClient, db: Database) -> None:
    user = new_user(db)
    key = make_key(client, user)["key"]
    items = [{**GPT4O_CALL[0], "cost_microcents": 300_000}, GPT4O_CALL[1]]
    charged = client.post("/v1/usage", json={"items": items}, headers=key_auth(key, "costed"))
    assert charged.status_code == 200, charged.text
    with db.connect() as conn:
        costs = conn.execute(
            "select cost_microcents, plan from billing.usage_records where user_id = %s "
            "order by line",
            [user],
        ).fetchall()
    assert costs == [(300_000, "free"), (None, "free")], "the seed's prices carry no cost"
    bad = client.post(
        "/v1/usage",
        json={"items": [{**GPT4O_CALL[0], "cost_microcents": -1}]},
        headers=key_auth(key, "bad-cost"),
    )
    assert bad.status_code == 422
    other = client.post(
        "/v1/usage",
        json={"items": [{**GPT4O_CALL[0], "cost_microcents": 1}, GPT4O_CALL[1]]},
        headers=key_auth(key, "costed"),
    )
    assert other.status_code == 409, "the same key with another cost is another call"


def test_two_users_may_use_the_same_idempotency_key(client: TestClient, db: Database) -> None:
    for _ in range(2):
        key = make_key(client, new_user(db))["key"]
        response = client.post(
            "/v1/usage", json={"items": GPT4O_CALL}, headers=key_auth(key, "same")
        )
        assert response.json()["status"] == "applied"


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"items": GPT4O_CALL}, {}, 400, "missing_idempotency_key"),
        ({"items": []}, {"Idempotency-Key": "k"}, 422, "invalid_items"),
        ({"items": [{"meter": "nope", "quantity": 1}]}, {"Idempotency-Key": "k"}, 400, None),
        (
            {"items": [{"meter": "agent.run", "quantity": 10**6}]},
            {"Idempotency-Key": "k"},
            402,
            None,
        ),
        ({"items": [{"meter": "agent.run", "quantity": -1}]}, {"Idempotency-Key": "k"}, 422, None),
    ],
    ids=["no key", "no items", "unknown meter", "too expensive", "negative"],
)
def test_bad_usage_should_be_refused_and_charge_nothing(
    client: TestClient,
    db: Database,
    body: dict[str, Any],
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    key = make_key(client, new_user(db))["key"]
    response = client.post("/v1/usage", json=body, headers={**key_auth(key), **headers})
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code
    assert client.get("/v1/balance", headers=key_auth(key)).json()["balance"] == 100


def test_a_hold_should_be_settled_with_the_usage_it_covered(
    client: TestClient, db: Database
) -> None:
    user = new_user(db)
    key = make_key(client, user)["key"]
    held = client.post("/v1/holds", json={"items": GPT4O_CALL}, headers=key_auth(key, "h-1"))
    assert held.status_code == 201, held.text
    hold = held.json()
    assert hold["amount"] == 11
    assert hold["available"] == 89
    again = client.post("/v1/holds", json={"items": GPT4O_CALL}, headers=key_auth(key, "h-1"))
    assert again.status_code == 200
    assert again.json()["id"] == hold["id"]

    stranger = make_key(client, new_user(db))["key"]
    foreign = client.post(
        f"/v1/holds/{hold['id']}/settle", json={"items": GPT4O_CALL}, headers=key_auth(stranger)
    )
    assert foreign.status_code == 404, "another user's hold should be not found"

    used = [{"meter": "llm.output_tokens", "quantity": 500, "dimensions": {"model": "gpt-4o"}}]
    settled = client.post(
        f"/v1/holds/{hold['id']}/settle", json={"items": used}, headers=key_auth(key)
    )
    assert settled.status_code == 200, settled.text
    assert settled.json()["status"] == "applied"
    assert settled.json()["tokens"] == 5
    assert settled.json()["balance"] == 95
    retry = client.post(
        f"/v1/holds/{hold['id']}/settle", json={"items": used}, headers=key_auth(key)
    )
    assert retry.json()["status"] == "duplicate"
    late = client.post(f"/v1/holds/{hold['id']}/release", headers=key_auth(key))
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "hold_not_pending"
    assert scalar(db, "select reserved from billing.accounts where user_id = %s", [str(user)]) == 0


def test_a_hold_should_be_released_or_settled_by_amount(client: TestClient, db: Database) -> None:
    key = make_key(client, new_user(db))["key"]
    first = client.post("/v1/holds", json={"amount": 30}, headers=key_auth(key, "a")).json()
    released = client.post(f"/v1/holds/{first['id']}/release", headers=key_auth(key))
    assert released.json() == {"status": "applied", "available": 100}
    second = client.post("/v1/holds", json={"amount": 30}, headers=key_auth(key, "b")).json()
    settled = client.post(
        f"/v1/holds/{second['id']}/settle", json={"amount": 12}, headers=key_auth(key)
    )
    assert settled.json()["status"] == "applied"
    assert settled.json()["balance"] == 88
    too_much = client.post("/v1/holds", json={"amount": 1000}, headers=key_auth(key, "c"))
    assert too_much.status_code == 402


# --- the rate limit ------------------------------------------------------------------------------


def test_a_key_over_its_rate_should_get_429_with_retry_after(db: Database) -> None:
    slow = settings_for(db, api_key_rate_per_second=0.01, api_key_rate_burst=2)
    with TestClient(create_app(slow)) as client:
        user = new_user(db)
        key = make_key(client, user)["key"]
        other = make_key(client, user)["key"]
        statuses = [client.get("/v1/balance", headers=key_auth(key)).status_code for _ in range(3)]
        limited = client.get("/v1/balance", headers=key_auth(key))
        fresh = client.get("/v1/balance", headers=key_auth(other))
    assert statuses == [200, 200, 429]
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 100
    assert fresh.status_code == 200, "the limit should be per key"


def test_the_bucket_should_refill_at_its_rate() -> None:
    limiter = api_keys.RateLimiter(rate=2.0, burst=1)
    key = uuid.uuid4()
    assert limiter.take(key, now=10.0) == 0
    assert limiter.take(key, now=10.0) == pytest.approx(0.5)
    assert limiter.take(key, now=10.5) == 0, "half a second at 2/s should refill one"


# --- graduated pricing: any split of a period's quantity costs what the whole does --------------


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    parts=st.lists(st.integers(min_value=0, max_value=1500), min_size=1, max_size=6),
    meter=st.sampled_from(["api.call", "llm.input_tokens"]),
)
def test_any_split_of_a_quantity_should_cost_what_the_whole_costs(
    db: Database, parts: list[int], meter: str
) -> None:
    """api.call is graduated (10 up to 1,000, then 8); llm.input_tokens rounds 2.5/1K up once
    per period. The charges of a period telescope to F(total): the split changes nothing."""
    user = new_user(db)
    dimensions = {"model": "gpt-4o"}
    with db.connect() as conn:
        conn.execute("set role service_role")
        whole = conn.execute(
            "select tokens from public.quote_usage(%s, %s::jsonb)",
            [
                str(user),
                f'[{{"meter": "{meter}", "quantity": {sum(parts)}, "dimensions": '
                f'{{"model": "{dimensions["model"]}"}}}}]',
            ],
        ).fetchone()
        assert whole is not None
        conn.execute(
            "select status from public.add_tokens(%s, 1000000, %s)", [str(user), f"fund-{user}"]
        )
        charged = 0
        for n, quantity in enumerate(parts):
            row = conn.execute(
                "select status, tokens from public.record_usage(%s, %s::jsonb, %s)",
                [
                    str(user),
                    f'[{{"meter": "{meter}", "quantity": {quantity}, "dimensions": '
                    f'{{"model": "gpt-4o"}}}}]',
                    f"split-{user}-{n}",
                ],
            ).fetchone()
            assert row is not None
            assert row[0] == "applied"
            charged += row[1]
    assert charged == whole[0]


def test_the_summary_should_take_a_period_and_refuse_a_backwards_one(
    client: TestClient, db: Database
) -> None:
    key = make_key(client, new_user(db))["key"]
    client.post("/v1/usage", json={"items": GPT4O_CALL}, headers=key_auth(key, "p-1"))
    past = client.get("/v1/usage?from=2020-01-01T00:00:00&to=2020-02-01", headers=key_auth(key))
    assert past.status_code == 200
    assert past.json()["meters"] == []
    backwards = client.get("/v1/usage?from=2030-01-01&to=2020-01-01", headers=key_auth(key))
    assert backwards.status_code == 422
    assert backwards.json()["error"]["code"] == "invalid_period"


def test_a_hold_should_be_extended_and_a_resolved_key_refused(
    client: TestClient, db: Database
) -> None:
    key = make_key(client, new_user(db))["key"]
    hold = client.post(
        "/v1/holds", json={"amount": 10, "ttl_seconds": 60}, headers=key_auth(key, "x")
    ).json()
    extended = client.post(
        f"/v1/holds/{hold['id']}/extend", json={"ttl_seconds": 3600}, headers=key_auth(key)
    )
    assert extended.status_code == 200, extended.text
    assert extended.json()["status"] == "applied"
    expires_at = scalar(
        db, "select expires_at from billing.reservations where id = %s", [hold["id"]]
    )
    assert expires_at == datetime.fromisoformat(extended.json()["expires_at"])
    client.post(f"/v1/holds/{hold['id']}/release", headers=key_auth(key))
    again = client.post(
        "/v1/holds", json={"amount": 10, "ttl_seconds": 60}, headers=key_auth(key, "x")
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "hold_resolved"


def test_a_wrong_method_should_name_every_method_of_the_path(client: TestClient) -> None:
    response = client.put("/v1/usage")
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD, POST"
