"""Configuration from the environment (and `.env`), checked before the service starts.

Every field is one environment variable of the same name in upper case; `.env.example` lists them
all. Secrets are `SecretStr`, so they never show in a repr, a log line or an error message.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Environment = Literal["development", "test", "production"]

# Values copied from documentation or templates instead of real secrets. A secret containing
# "..." or wrapped in <> is a placeholder too (`sk_test_...`, `<your key>`).
_PLACEHOLDERS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "replaceme",
        "replace-me",
        "replace_me",
        "todo",
        "xxx",
        "secret",
        "password",
        "sk_test_",
        "sk_live_",
        "whsec_",
        "your-secret",
        "your_secret",
    }
)


def is_placeholder(value: str) -> bool:
    """True for an empty value or one that is obviously a template, never a real secret."""
    v = value.strip().lower()
    return (
        not v
        or v in _PLACEHOLDERS
        or "..." in v
        or "xxxx" in v
        or (v.startswith("<") and v.endswith(">"))
        or v.startswith(("your-", "your_", "changeme"))
    )


def _require_real(name: str, value: str) -> None:
    if is_placeholder(value):
        raise ValueError(f"{name} is empty or a placeholder; set the real value")


class Settings(BaseSettings):
    """The service's settings. Construct with no arguments to read the environment and `.env`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # `SUPABASE_URL=` in a .env copied from .env.example means unset, not "".
        env_ignore_empty=True,
        hide_input_in_errors=True,
    )

    environment: Environment = "development"
    """development, test or production. Only production may use a live Stripe key."""

    database_url: SecretStr | None = None
    """Postgres URL (libpq form), the fast path. Log in as `postgres` or `authenticator`: every
    connection switches to `service_role`, so the service has exactly the Data API service role's
    rights. Use a direct or session-mode pooler URL. Unset: the supabase-py path is used."""

    supabase_url: AnyHttpUrl | None = None
    """The project URL, e.g. https://abcd.supabase.co. Sets the expected JWT issuer
    (`<url>/auth/v1`), the JWKS location, and the PostgREST endpoint when DATABASE_URL is unset."""

    supabase_service_role_key: SecretStr | None = None
    """The service role (or `sb_secret_...`) key; needed only when DATABASE_URL is unset."""

    supabase_anon_key: str | None = None
    """The project's anon (or `sb_publishable_...`) key. Not a secret: the browser page uses it
    with SUPABASE_URL for a live balance through Supabase Realtime. Unset: the page uses the
    service's GET /v1/balance/stream instead."""

    supabase_jwt_secret: SecretStr | None = None
    """The project's legacy HS256 JWT secret. Unset: tokens are verified with the project's JWKS
    (ES256/RS256 signing keys) at SUPABASE_URL/auth/v1/.well-known/jwks.json."""

    stripe_secret_key: SecretStr
    """Stripe secret or restricted key (`sk_test_`/`rk_test_`; `sk_live_`/`rk_live_` only when
    ENVIRONMENT=production)."""

    stripe_webhook_secret: Annotated[list[SecretStr], NoDecode]
    """Signing secret(s) of the webhook endpoint (`whsec_...`). Several, comma-separated, while a
    secret is being rotated: a delivery signed with any of them is accepted."""

    stripe_api_base: AnyHttpUrl = AnyHttpUrl("https://api.stripe.com")
    """Base URL of the Stripe API; tests point it at a local double."""

    stripe_max_network_retries: int = Field(default=2, ge=0, le=10)
    """Retries of a Stripe request after a network error, 409 or 5xx, with backoff. Every POST
    carries an Idempotency-Key, so a retry never makes a second object."""

    stripe_timeout_seconds: float = Field(default=30.0, gt=0, le=120)
    """Timeout of one Stripe HTTP request."""

    app_url: AnyHttpUrl = AnyHttpUrl("http://localhost:3000")
    """The web app users come from; checkout success/cancel and portal return URLs are built on
    it."""

    checkout_success_path: str = "/billing/success?session_id={CHECKOUT_SESSION_ID}"
    """Path (and query) under APP_URL where Checkout returns after payment."""

    checkout_cancel_path: str = "/billing/cancel"
    """Path under APP_URL where Checkout returns when the user gives up."""

    portal_return_path: str = "/billing"
    """Path under APP_URL where the billing portal returns."""

    db_pool_min_size: int = Field(default=1, ge=0, le=100)
    """Connections the Postgres pool keeps open."""

    db_pool_max_size: int = Field(default=10, ge=1, le=200)
    """Most connections the Postgres pool opens; bounded so the service cannot exhaust the
    database's connection slots."""

    db_pool_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    """How long a request waits for a pooled connection before it fails with 503."""

    db_connect_timeout_seconds: int = Field(default=5, ge=1, le=60)
    """Timeout of opening one database connection."""

    db_statement_timeout_ms: int = Field(default=15_000, ge=100, le=300_000)
    """statement_timeout of every service connection, so a stuck call fails rather than holds a
    pool slot."""

    webhook_max_body_bytes: int = Field(default=1_048_576, ge=1024, le=16_777_216)
    """Largest webhook body accepted (1 MiB); larger ones are refused with 413 unread."""

    webhook_tolerance_seconds: int = Field(default=300, ge=1, le=3600)
    """Largest age of a Stripe-Signature timestamp; older deliveries are refused (replays)."""

    jwt_leeway_seconds: int = Field(default=10, ge=0, le=300)
    """Clock skew allowed when checking a JWT's exp and iat."""

    jwks_cache_seconds: int = Field(default=600, ge=1, le=86_400)
    """How long fetched JWKS keys are trusted before they are fetched again."""

    balance_stream_heartbeat_seconds: float = Field(default=15.0, gt=0, le=300)
    """Seconds between the comment lines that keep an idle GET /v1/balance/stream open through
    proxies (and between checks that the service's LISTEN connection is alive)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of the JSON log lines written to stderr."""

    @field_validator("stripe_webhook_secret", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")]
        if isinstance(value, SecretStr):
            return [part.strip() for part in value.get_secret_value().split(",")]
        return value

    @field_validator("stripe_webhook_secret")
    @classmethod
    def _check_webhook_secrets(cls, value: list[SecretStr]) -> list[SecretStr]:
        if not value:
            raise ValueError("STRIPE_WEBHOOK_SECRET is empty; set the endpoint's whsec_ secret")
        for secret in value:
            raw = secret.get_secret_value()
            _require_real("STRIPE_WEBHOOK_SECRET", raw)
            if not raw.startswith("whsec_"):
                raise ValueError("STRIPE_WEBHOOK_SECRET must start with whsec_")
        return value

    @field_validator("stripe_secret_key")
    @classmethod
    def _check_stripe_key(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        _require_real("STRIPE_SECRET_KEY", raw)
        if not raw.startswith(("sk_test_", "sk_live_", "rk_test_", "rk_live_")):
            raise ValueError("STRIPE_SECRET_KEY must be a secret (sk_) or restricted (rk_) key")
        return value

    @field_validator("database_url", "supabase_service_role_key", "supabase_jwt_secret")
    @classmethod
    def _check_optional_secret(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        if value is None:
            return None
        _require_real(str(info.field_name).upper(), value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> Settings:
        live = self.stripe_secret_key.get_secret_value().startswith(("sk_live_", "rk_live_"))
        if live and self.environment != "production":
            raise ValueError(
                "STRIPE_SECRET_KEY is a live key but ENVIRONMENT is "
                f"{self.environment!r}; live keys are accepted only with ENVIRONMENT=production"
            )
        if self.database_url is None and (
            self.supabase_url is None or self.supabase_service_role_key is None
        ):
            raise ValueError("set DATABASE_URL, or both SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        if self.supabase_jwt_secret is None and self.supabase_url is None:
            raise ValueError(
                "set SUPABASE_JWT_SECRET (HS256) or SUPABASE_URL (its JWKS verifies user tokens)"
            )
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("DB_POOL_MIN_SIZE must not exceed DB_POOL_MAX_SIZE")
        return self

    # --- derived values ---------------------------------------------------------------------
    @property
    def supabase_base(self) -> str | None:
        """SUPABASE_URL without a trailing slash."""
        return str(self.supabase_url).rstrip("/") if self.supabase_url else None

    @property
    def jwt_issuer(self) -> str | None:
        """The issuer Supabase Auth writes into access tokens."""
        base = self.supabase_base
        return f"{base}/auth/v1" if base else None

    @property
    def jwks_url(self) -> str | None:
        base = self.supabase_base
        return f"{base}/auth/v1/.well-known/jwks.json" if base else None

    def app_link(self, path: str) -> str:
        """An absolute URL under APP_URL."""
        return str(self.app_url).rstrip("/") + "/" + path.lstrip("/")

    @property
    def webhook_secrets(self) -> list[str]:
        return [s.get_secret_value() for s in self.stripe_webhook_secret]

    @property
    def stripe_api_base_url(self) -> str:
        return str(self.stripe_api_base).rstrip("/")


class ConfigError(RuntimeError):
    """The environment does not make valid settings; the message names each variable."""


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment and `.env`, or a ConfigError naming every bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            variable = "_".join(str(part) for part in error["loc"][:1]).upper()
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "missing":
                message = "is required but not set"
            problems.append(f"{variable} {message}" if variable else message)
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
