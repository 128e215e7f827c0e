"""Supabase access tokens: HS256 with the project secret, ES256/RS256 through the JWKS."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.testclient import TestClient

from scripts.pgcluster import Database
from tests.app_support import JWT_SECRET, bearer, new_user, settings_for, user_token
from token_billing.server.app import create_app
from token_billing.server.auth import Authenticator, User
from token_billing.server.http_errors import ApiError

USER = uuid.UUID("00000000-0000-0000-0000-0000000000a1")
OTHER_PROJECT_SECRET = "another-project-secret-0123456789ab"  # noqa: S105 - a test value


class JwksServer:
    """A project's /auth/v1/.well-known/jwks.json on a local port; counts the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/auth/v1/.well-known/jwks.json":
                    self.send_error(404)
                    return
                server.fetches += 1
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def es256_key(kid: str) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP256R1())
    public: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    public.update(kid=kid, alg="ES256", use="sig", key_ops=["verify"])
    return private, public


def claims(issuer: str | None = None, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": str(USER),
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + 600,
        "is_anonymous": False,
    }
    if issuer:
        base["iss"] = issuer
    base.update(extra)
    return base


def verify(token: str | None, **settings: Any) -> User:
    """Run the Authenticator once, in its own event loop, as a request would."""

    async def run() -> User:
        async with httpx.AsyncClient() as http:
            auth = Authenticator(
                settings_for(None, database_url="postgresql://x@h/d", **settings), http
            )
            return await auth.user(None if token is None else f"Bearer {token}")

    return asyncio.run(run())


def refused(token: str | None, **settings: Any) -> str:
    with pytest.raises(ApiError) as caught:
        verify(token, **settings)
    assert caught.value.status == 401
    return caught.value.message


# --- HS256 ---------------------------------------------------------------------------------------


def test_valid_hs256_token_should_give_the_user() -> None:
    user = verify(user_token(USER))
    assert user.id == USER
    assert not user.is_anonymous
    assert user.email == f"{USER}@example.com"


def test_missing_token_should_be_401() -> None:
    assert "missing" in refused(None)


def test_expired_token_should_be_401() -> None:
    assert "expired" in refused(user_token(USER, expires_in=-60))


def test_wrong_audience_should_be_401() -> None:
    assert "not for signed-in users" in refused(user_token(USER, audience="anon"))


def test_wrong_signature_should_be_401() -> None:
    assert "signature" in refused(user_token(USER, secret=OTHER_PROJECT_SECRET))


def test_anon_key_should_not_pass_as_a_user() -> None:
    # The anon key is an HS256 JWT of role anon and no subject.
    now = int(time.time())
    anon_key = jwt.encode(
        {"role": "anon", "iss": "supabase", "iat": now, "exp": now + 600}, JWT_SECRET
    )
    refused(anon_key)


def test_service_role_token_should_not_pass_as_a_user() -> None:
    refused(user_token(USER, role="service_role"))


def test_unsigned_token_should_be_401() -> None:
    token = jwt.encode(claims(), key="", algorithm="none")
    assert "not accepted" in refused(token)


def test_garbage_token_should_be_401() -> None:
    assert "not a JWT" in refused("not.a.jwt")


def test_non_uuid_subject_should_be_401() -> None:
    refused(user_token("someone"))


def test_issuer_should_be_checked_when_the_project_url_is_set() -> None:
    issuer = "https://abcd.supabase.co/auth/v1"
    good = jwt.encode(claims(issuer), JWT_SECRET, algorithm="HS256")
    bad = jwt.encode(claims("https://evil.supabase.co/auth/v1"), JWT_SECRET, algorithm="HS256")
    assert verify(good, supabase_url="https://abcd.supabase.co").id == USER
    assert "another project" in refused(bad, supabase_url="https://abcd.supabase.co")


def test_anonymous_sign_in_should_be_flagged() -> None:
    assert verify(user_token(USER, is_anonymous=True)).is_anonymous


# --- asymmetric keys through the JWKS -------------------------------------------------------


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


def test_es256_token_should_verify_with_the_project_jwks(jwks: JwksServer) -> None:
    private, public = es256_key("key-1")
    jwks.keys = [public]
    token = jwt.encode(
        claims(f"{jwks.url}/auth/v1"), private, algorithm="ES256", headers={"kid": "key-1"}
    )
    assert verify(token, supabase_url=jwks.url, supabase_jwt_secret=None).id == USER


def test_rs256_token_should_verify_with_the_project_jwks(jwks: JwksServer) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    public.update(kid="rsa-1", alg="RS256", use="sig")
    jwks.keys = [public]
    token = jwt.encode(
        claims(f"{jwks.url}/auth/v1"), private, algorithm="RS256", headers={"kid": "rsa-1"}
    )
    assert verify(token, supabase_url=jwks.url, supabase_jwt_secret=None).id == USER


def test_token_signed_by_another_key_should_be_401(jwks: JwksServer) -> None:
    _, public = es256_key("key-1")
    impostor, _ = es256_key("key-1")
    jwks.keys = [public]
    token = jwt.encode(
        claims(f"{jwks.url}/auth/v1"), impostor, algorithm="ES256", headers={"kid": "key-1"}
    )
    assert "signature" in refused(token, supabase_url=jwks.url, supabase_jwt_secret=None)


def test_hs256_token_should_be_refused_when_only_the_jwks_is_configured(
    jwks: JwksServer,
) -> None:
    token = jwt.encode(claims(f"{jwks.url}/auth/v1"), JWT_SECRET, algorithm="HS256")
    assert "not accepted" in refused(token, supabase_url=jwks.url, supabase_jwt_secret=None)


def test_unknown_kid_should_refetch_the_jwks_once(jwks: JwksServer) -> None:
    old_private, old_public = es256_key("old")
    new_private, new_public = es256_key("new")
    jwks.keys = [old_public]
    issuer = f"{jwks.url}/auth/v1"
    old_token = jwt.encode(claims(issuer), old_private, algorithm="ES256", headers={"kid": "old"})
    new_token = jwt.encode(claims(issuer), new_private, algorithm="ES256", headers={"kid": "new"})
    unknown = jwt.encode(claims(issuer), new_private, algorithm="ES256", headers={"kid": "zzz"})

    async def run() -> list[str]:
        outcomes = []
        async with httpx.AsyncClient() as http:
            auth = Authenticator(
                settings_for(
                    None,
                    database_url="postgresql://x@h/d",
                    supabase_url=jwks.url,
                    supabase_jwt_secret=None,
                ),
                http,
            )
            outcomes.append(str((await auth.user(f"Bearer {old_token}")).id))
            outcomes.append(str((await auth.user(f"Bearer {old_token}")).id))
            jwks.keys = [old_public, new_public]  # the project rotated its signing key
            outcomes.append(str((await auth.user(f"Bearer {new_token}")).id))
            for _ in range(3):
                try:
                    await auth.user(f"Bearer {unknown}")
                except ApiError as exc:
                    outcomes.append(str(exc.status))
        return outcomes

    assert asyncio.run(run()) == [str(USER)] * 3 + ["401"] * 3
    assert jwks.fetches == 3, (
        "cached; refetched once for the new kid and once for the unknown one, not per token"
    )


# --- through the app ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
        ({"Authorization": f"Bearer {user_token(USER, expires_in=-5)}"}, "expired"),
        ({"Authorization": f"Bearer {user_token(USER, audience='x')}"}, "signed-in"),
        (
            {"Authorization": f"Bearer {user_token(USER, secret='x' * 40)}"},
            "signature",
        ),
    ],
)
def test_app_should_answer_401_json_for_bad_tokens(
    db: Database, headers: dict[str, str], reason: str
) -> None:
    with TestClient(create_app(settings_for(db))) as client:
        response = client.get("/v1/balance", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert reason in response.json()["error"]["message"]


def test_app_should_serve_the_balance_of_the_token_user(db: Database) -> None:
    user = new_user(db)
    with TestClient(create_app(settings_for(db))) as client:
        response = client.get("/v1/balance", headers=bearer(user))
    assert response.status_code == 200
    assert response.json() == {
        "balance": 100,
        "available": 100,
        "reserved": 0,
        "plan": "free",
        "subscription_status": "none",
    }
