"""API keys: `Authorization: Bearer tb_live_...` for agent backends, with scopes and a rate limit.

A key is `tb_live_` or `tb_test_` and 64 hex digits (244 random bits, made by
`public.create_api_key`). Its first 20 characters are the lookup prefix that finds its row; the
database keeps only the SHA-256 of the whole key. Every request looks the key up (one indexed
read, `public.authenticate_api_key`), so a revocation counts from the next request in every
process, and compares the hash of the key presented with the stored one with
`hmac.compare_digest` (constant time). SHA-256 rather than a password hash: the secret has far
too much entropy to be guessed or searched for, so a slow hash would only slow every request.

`last_used_at` is written at most once a minute per key and process (`public.touch_api_key`
refuses more often still), never on every request.

The rate limit is a token bucket per key, in process: it costs no database write per request
(the path it protects is the database's hot path), at the price of being per process: with N
service processes a key gets up to N times API_KEY_RATE_PER_SECOND. That bounds a runaway agent,
which is its purpose; a hard global quota is the balance itself.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from token_billing.db import Database
from token_billing.server.http_errors import ApiError

SCOPES = ("usage:read", "usage:write", "balance:read")
KEY_PATTERN = re.compile(r"^tb_(live|test)_[0-9a-f]{64}$")
LOOKUP_LENGTH = 20
TOUCH_EVERY_SECONDS = 60.0


def looks_like_key(token: str) -> bool:
    """Whether a bearer token is meant as an API key (rather than a Supabase JWT)."""
    return token.startswith("tb_")


def key_unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="token-billing"'}
    )


def _as_bytes(value: object) -> bytes:
    """A bytea as psycopg (bytes, memoryview) or PostgREST (`\\x` and hex) returns it."""
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("\\x"))
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"not a bytea value: {type(value).__name__}")


def secret_sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class KeyCaller:
    """A request authenticated by an API key: the user it acts as and what it may do."""

    user_id: uuid.UUID
    api_key_id: uuid.UUID
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise ApiError(
                403, "missing_scope", f"this API key lacks the scope {scope} this route needs"
            )


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per key: `rate` requests a second, bursts of `burst`."""

    rate: float
    burst: int
    _buckets: dict[uuid.UUID, _Bucket] = field(default_factory=dict)

    def take(self, key_id: uuid.UUID, now: float | None = None) -> float:
        """0 when the request may go; else the seconds until it could (nothing is taken)."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key_id)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()  # bounded memory; a cleared bucket starts full
            bucket = self._buckets[key_id] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


class KeyAuthenticator:
    """Verifies API keys against the database, rate-limits them, and records their use."""

    def __init__(self, db: Database, *, environment: str, rate: float, burst: int) -> None:
        self._db = db
        self.environment = environment  # live or test: the only keys this deployment accepts
        self.limiter = RateLimiter(rate, burst)
        self._touched: dict[uuid.UUID, float] = {}

    async def caller(self, token: str) -> KeyCaller:
        """The caller a key names, or a 401 saying why not (429 when over its rate)."""
        match = KEY_PATTERN.match(token)
        if match is None:
            raise key_unauthorized("the API key is malformed (tb_live_ or tb_test_ and 64 hex)")
        if match.group(1) != self.environment:
            raise key_unauthorized(
                f"a tb_{match.group(1)}_ key is not accepted here: this deployment takes "
                f"tb_{self.environment}_ keys"
            )
        rows = await self._db.rpc("authenticate_api_key", {"p_lookup": token[:LOOKUP_LENGTH]})
        stored = _as_bytes(rows[0]["secret_sha256"]) if rows else b"\x00" * 32
        # Constant time, and the same work for an unknown lookup as for a wrong secret.
        if not hmac.compare_digest(stored, secret_sha256(token)) or not rows:
            raise key_unauthorized("the API key is not valid")
        row = rows[0]
        if row["status"] == "revoked":
            raise key_unauthorized("the API key has been revoked")
        if row["status"] == "expired":
            raise key_unauthorized("the API key has expired")
        key_id = uuid.UUID(str(row["api_key_id"]))
        wait = self.limiter.take(key_id)
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                "too many requests with this API key; retry after the time Retry-After gives",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        now = time.monotonic()
        if now - self._touched.get(key_id, -math.inf) >= TOUCH_EVERY_SECONDS:
            self._touched[key_id] = now
            await self._db.rpc("touch_api_key", {"p_api_key_id": str(key_id)})
        return KeyCaller(
            user_id=uuid.UUID(str(row["user_id"])),
            api_key_id=key_id,
            scopes=frozenset(row["scopes"]),
        )
