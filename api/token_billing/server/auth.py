"""Who is calling: verification of Supabase Auth access tokens.

A project signs access tokens either with the legacy shared secret (HS256, SUPABASE_JWT_SECRET)
or with asymmetric signing keys (ES256/RS256) published at
SUPABASE_URL/auth/v1/.well-known/jwks.json. Both are accepted; the algorithm a token names picks
the key, and a token can never choose a key of the other kind (no HS256 with a public key).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from jwt import PyJWK

from token_billing.server.http_errors import ApiError
from token_billing.server.settings import Settings

AUDIENCE = "authenticated"
ASYMMETRIC_ALGORITHMS = ("ES256", "RS256")
# An unknown kid makes the JWKS be fetched again (the project may have rotated its key), but a kid
# that is still unknown afterwards is remembered for a while, and refetches are capped, so tokens
# with made-up kids cannot make the service hammer the auth server.
_UNKNOWN_KID_SECONDS = 60.0
_MAX_REFETCHES_PER_MINUTE = 10


@dataclass(frozen=True)
class User:
    """A verified signed-in user."""

    id: uuid.UUID
    claims: Mapping[str, Any]
    token: str

    @property
    def is_anonymous(self) -> bool:
        """Signed in with Supabase anonymous sign-in: no email, may not buy."""
        return bool(self.claims.get("is_anonymous", False))

    @property
    def email(self) -> str | None:
        email = self.claims.get("email")
        return email if isinstance(email, str) and email else None


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="token-billing"'}
    )


class JwksCache:
    """The project's public signing keys by kid, fetched lazily and refreshed on unknown kids."""

    def __init__(self, url: str, *, ttl_seconds: float, http: httpx.AsyncClient) -> None:
        self._url = url
        self._ttl = ttl_seconds
        self._http = http
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None
        self._unknown: dict[str, float] = {}  # kid -> when it was found missing
        self._refetches: list[float] = []
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> PyJWK:
        now = time.monotonic()
        if self._fetched_at is None or now - self._fetched_at > self._ttl:
            await self._refresh()
        elif kid is not None and kid not in self._keys and self._may_refetch(kid, now):
            self._refetches.append(now)
            await self._refresh()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if kid is None or kid not in self._keys:
            if kid is not None:
                self._unknown[kid] = now
            raise unauthorized("the token's signing key is not one of the project's keys")
        return self._keys[kid]

    def _may_refetch(self, kid: str, now: float) -> bool:
        self._unknown = {k: t for k, t in self._unknown.items() if now - t < _UNKNOWN_KID_SECONDS}
        self._refetches = [t for t in self._refetches if now - t < 60.0]
        return kid not in self._unknown and len(self._refetches) < _MAX_REFETCHES_PER_MINUTE

    async def _refresh(self) -> None:
        async with self._lock:
            try:
                response = await self._http.get(self._url)
                response.raise_for_status()
                document = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                if self._keys:
                    return  # keep serving the keys we have; the next miss retries
                raise ApiError(
                    503, "auth_unavailable", "cannot fetch the project's signing keys"
                ) from exc
            keys: dict[str, PyJWK] = {}
            for jwk in document.get("keys", []):
                if jwk.get("alg") not in ASYMMETRIC_ALGORITHMS:
                    continue
                try:
                    keys[str(jwk.get("kid"))] = PyJWK(jwk)
                except jwt.PyJWTError:
                    continue
            self._keys = keys
            self._fetched_at = time.monotonic()


class Authenticator:
    """Verifies `Authorization: Bearer <access token>` headers."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self._secret = (
            settings.supabase_jwt_secret.get_secret_value()
            if settings.supabase_jwt_secret
            else None
        )
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_seconds
        jwks_url = settings.jwks_url
        self._jwks = (
            JwksCache(jwks_url, ttl_seconds=settings.jwks_cache_seconds, http=http)
            if jwks_url
            else None
        )

    async def user(self, authorization: str | None) -> User:
        """The verified user, or a 401 ApiError saying what is wrong with the token."""
        if not authorization:
            raise unauthorized("missing Authorization: Bearer <Supabase access token>")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("the Authorization header must be: Bearer <access token>")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("the access token is not a JWT") from None
        algorithm = header.get("alg")
        key: Any
        if algorithm == "HS256" and self._secret is not None:
            key = self._secret
        elif algorithm in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            key = await self._jwks.key(header.get("kid"))
        else:
            raise unauthorized(f"tokens signed with {algorithm!r} are not accepted")
        options: dict[str, Any] = {"require": ["exp", "sub", "aud"]}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                audience=AUDIENCE,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("the access token has expired") from None
        except jwt.InvalidAudienceError:
            raise unauthorized("the access token is not for signed-in users") from None
        except jwt.InvalidIssuerError:
            raise unauthorized("the access token was issued by another project") from None
        except jwt.InvalidSignatureError:
            raise unauthorized("the access token's signature is invalid") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(f"the access token is invalid: {exc}") from None
        if claims.get("role") != "authenticated":
            raise unauthorized("the access token is not a signed-in user's")
        try:
            user_id = uuid.UUID(str(claims["sub"]))
        except ValueError:
            raise unauthorized("the access token's subject is not a user id") from None
        return User(id=user_id, claims=claims, token=token)
