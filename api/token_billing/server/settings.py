"""Configuration from the environment (and `.env`), checked before the service starts.

Every field is one environment variable of the same name in upper case; `.env.example` lists them
all. Secrets are `SecretStr`, so they never show in a repr, a log line or an error message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict
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


# What `make dev` (scripts/dev.py) puts in STRIPE_SECRET_KEY when the developer has no Stripe
# test key: a made-up key that only a local Stripe double (STRIPE_API_BASE) accepts.
GENERATED_STRIPE_KEY_PREFIX = "sk_test_tbdev_"
STRIPE_API = "https://api.stripe.com"
TEST_KEY_PREFIXES = ("sk_test_", "rk_test_")
LIVE_KEY_PREFIXES = ("sk_live_", "rk_live_")


def _require_real(value: str) -> None:
    # The variable's name is added by ConfigError (from the error's location): never here too.
    if is_placeholder(value):
        raise ValueError("is empty or a placeholder; set the real value")


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

    environment: Environment = "production"
    """production (the default), test or development. Only production may use a live Stripe
    key; only development, with a Stripe test key, serves the demo page and POST /dev/session."""

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

    stripe_publishable_key: str | None = None
    """The Stripe publishable key (pk_test_... or pk_live_...). Not a secret: with it the demo page
    offers Stripe's Payment Element (POST /v1/payment-intents) next to Checkout."""

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

    balance_streams_max: int = Field(default=500, ge=1, le=100_000)
    """Most balance streams open at once in one process (then 503 too_many_streams); kept below
    HTTP_MAX_CONNECTIONS so that streams never take every connection."""

    balance_streams_per_user: int = Field(default=5, ge=1, le=100)
    """Most balance streams one user may hold open at once (then 429 too_many_streams): one user
    cannot take the slots of the others. A page needs one per tab."""

    api_key_rate_per_second: float = Field(default=20.0, gt=0, le=100_000)
    """Requests a second one API key may make (a token bucket per key, in each process; then
    429 rate_limited with Retry-After)."""

    api_key_rate_burst: int = Field(default=40, ge=1, le=1_000_000)
    """Requests one API key may make at once before API_KEY_RATE_PER_SECOND paces it."""

    cors_origins: Annotated[list[str], NoDecode] = []
    """Web origins (scheme://host[:port], comma-separated) whose pages may call the API from a
    browser: preflights are answered and credentials allowed for them only. Empty: same origin
    only."""

    metrics_port: int | None = Field(default=None, ge=1, le=65_535)
    """Port of a separate listener that serves GET /metrics (Prometheus text) and nothing else.
    Unset: no metrics listener."""

    metrics_host: str = "127.0.0.1"
    """Address the metrics listener binds (0.0.0.0 for a Prometheus on another host: keep the
    port off the internet)."""

    metrics_token: SecretStr | None = None
    """A bearer token that GET /metrics then requires (`Authorization: Bearer <token>`); with it,
    /metrics is also served on the API port. At least 16 characters."""

    metrics_business_seconds: int = Field(default=60, ge=0, le=86_400)
    """How long GET /metrics serves the business figures (subscribers, revenue, tokens granted,
    used and expired, parked events: public.business_metrics) before it asks the database
    again. 0: no business figures on /metrics."""

    operator_token: SecretStr | None = None
    """A bearer token for the operator dashboard: with it, GET /ops serves the page and
    GET /v1/ops/summary its figures (`Authorization: Bearer <token>`). At least 32 characters."""

    billing_worker_interval_seconds: float = Field(default=0.0, ge=0, le=3600)
    """How often the billing worker runs in the service: delivers notifications to the host
    webhook, charges auto top-ups, grants annual plans' scheduled months, invoices postpaid
    overage. 0: off (run one service with it on, e.g. 5)."""

    notification_webhook_url: AnyHttpUrl | None = None
    """The host app's HTTPS endpoint that receives each notification once (a signed JSON POST,
    see docs/notifications.md). Unset: notifications are only rows the user reads."""

    notification_webhook_secret: SecretStr | None = None
    """The HMAC-SHA256 key of the Token-Billing-Signature header of notification webhooks; at
    least 32 characters. Required with NOTIFICATION_WEBHOOK_URL."""

    db_startup_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    """How long startup waits for the database to answer before the service exits (status 3)
    instead of running without it."""

    http_max_head_bytes: int = Field(default=32_768, ge=4096, le=1_048_576)
    """Largest request head (request line and headers together); larger is a 431 and the
    connection closes. Bounds what one connection can make the service hold before a request."""

    http_max_request_line_bytes: int = Field(default=8192, ge=256, le=1_048_576)
    """Longest request target (path and query); longer is a 414."""

    http_max_header_bytes: int = Field(default=8192, ge=256, le=1_048_576)
    """Longest single header (name and value); longer is a 431."""

    http_max_headers: int = Field(default=100, ge=10, le=10_000)
    """Most headers in one request; more is a 431."""

    http_header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """Seconds a client has to send a whole request head, from the connection's start or the
    end of its previous response (then 408 and the connection closes): slow heads hold nothing
    for long."""

    http_body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """Seconds a client has to send a request's whole body after its head (then 408)."""

    http_keep_alive_seconds: int = Field(default=5, ge=1, le=3600)
    """How long an idle keep-alive connection stays open between requests. Behind a proxy or
    load balancer, make it longer than the proxy's own upstream idle timeout."""

    http_max_connections: int = Field(default=1000, ge=1, le=1_000_000)
    """Most connections (and requests in flight) at once; past it requests get 503 at once."""

    http_max_connections_per_client: int = Field(default=100, ge=0, le=1_000_000)
    """Most connections at once from one client address (TCP peer); one more is answered 503
    and closed. 0: no limit. Behind a reverse proxy every connection comes from the proxy: set 0
    and let the proxy limit per client."""

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
            raise ValueError("is empty; set the endpoint's whsec_ secret")
        for secret in value:
            raw = secret.get_secret_value()
            _require_real(raw)
            if not raw.startswith("whsec_"):
                raise ValueError("must start with whsec_ (the endpoint's signing secret)")
        return value

    @field_validator("stripe_secret_key")
    @classmethod
    def _check_stripe_key(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        _require_real(raw)
        if not raw.startswith((*TEST_KEY_PREFIXES, *LIVE_KEY_PREFIXES)):
            raise ValueError("must be a secret (sk_) or restricted (rk_) key")
        return value

    @field_validator(
        "database_url",
        "supabase_service_role_key",
        "supabase_jwt_secret",
        "metrics_token",
        "operator_token",
        "notification_webhook_secret",
    )
    @classmethod
    def _check_optional_secret(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        if value is None:
            return None
        _require_real(value.get_secret_value())
        if info.field_name == "metrics_token" and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        if (
            info.field_name in ("operator_token", "notification_webhook_secret")
            and len(value.get_secret_value()) < 32
        ):
            raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value().strip()
        # The reason psycopg gives quotes the text, which may hold a password: never shown.
        shape = "write it as postgresql://USER:PASSWORD@HOST:5432/DBNAME"
        try:
            parts = conninfo_to_dict(raw)
        except ProgrammingError:
            raise ValueError(f"is not a Postgres connection URL; {shape}") from None
        if "://" in raw and not raw.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"is not a Postgres connection URL; {shape}")
        port = str(parts.get("port") or "5432")
        if not all(p.isdigit() and 0 < int(p) < 65_536 for p in port.split(",")):
            raise ValueError(f"has a port that is not a number from 1 to 65535; {shape}")
        return SecretStr(raw)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        origins = []
        for origin in value:
            if origin == "*":
                raise ValueError(
                    "must list the origins themselves: '*' would let every site call the API"
                )
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
                or parts.username
            ):
                raise ValueError(
                    f"has {origin!r}, which is not an origin (scheme://host[:port], no path)"
                )
            origins.append(f"{parts.scheme}://{parts.netloc.lower()}")
        return origins

    @model_validator(mode="wrap")
    @classmethod
    def _check_whole(cls, data: Any, handler: Callable[[Any], Settings]) -> Settings:
        """Every problem at once: the fields' own, and those of combinations of fields, which
        are read from the raw values so that they are found even when some field is invalid."""
        problems: dict[str, str] = {}
        settings: Settings | None = None
        try:
            settings = handler(data)
        except ValidationError as exc:
            for error in exc.errors():
                name = str(error["loc"][0]) if error["loc"] else ""
                problems.setdefault(name, _problem(error["type"], str(error["msg"])))
        if isinstance(data, Mapping):
            for name, problem in _combination_problems(data):
                problems.setdefault(name, problem)
        if problems or settings is None:
            order = list(cls.model_fields)
            ranked = sorted(
                problems.items(), key=lambda item: order.index(item[0]) if item[0] in order else -1
            )
            raise ConfigError([(name.upper(), problem) for name, problem in ranked])
        return settings

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

    @property
    def dev_routes(self) -> bool:
        """The demo page and POST /dev/session are served: only when ENVIRONMENT is development
        (set explicitly: the default is production) and the Stripe key is a test key."""
        key = self.stripe_secret_key.get_secret_value()
        return self.environment == "development" and key.startswith(TEST_KEY_PREFIXES)

    @property
    def stripe_key_generated(self) -> bool:
        """The Stripe key is the made-up one `make dev` writes, against the real Stripe API,
        which would refuse it: Checkout and the portal answer 409 saying what to configure."""
        key = self.stripe_secret_key.get_secret_value()
        return (
            key.startswith(GENERATED_STRIPE_KEY_PREFIX) and self.stripe_api_base_url == STRIPE_API
        )

    @property
    def api_key_environment(self) -> str:
        """live with a live Stripe key, else test: the API keys (tb_live_ or tb_test_) this
        deployment makes and accepts."""
        key = self.stripe_secret_key.get_secret_value()
        return "live" if key.startswith(LIVE_KEY_PREFIXES) else "test"

    @property
    def mode(self) -> str:
        """What the startup log calls this configuration."""
        if self.dev_routes:
            return "development (demo page and POST /dev/session served)"
        return f"{self.environment} (no demo page, no /dev routes)"


def _problem(error_type: str, message: str) -> str:
    """A pydantic error as the rest of a sentence that starts with the variable's name."""
    if error_type == "missing":
        return "is required but not set"
    if message.startswith("Value error, "):
        return message.removeprefix("Value error, ")
    return "is invalid: " + message[:1].lower() + message[1:]


def _raw(data: Mapping[str, Any], name: str) -> str | None:
    """A setting as given (environment, .env or keyword), as text; None when unset."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    text = str(value).strip()
    return text or None


def _raw_int(data: Mapping[str, Any], name: str, default: int) -> int | None:
    text = _raw(data, name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        return None  # the field reports it


def _combination_problems(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems no single field has, from the values as given (each field also checks itself)."""
    problems: list[tuple[str, str]] = []
    environment = _raw(data, "environment") or "production"
    key = _raw(data, "stripe_secret_key") or ""
    if key.startswith(LIVE_KEY_PREFIXES) and environment.lower() in ("development", "test"):
        problems.append(
            (
                "stripe_secret_key",
                f"is a live key but ENVIRONMENT is {environment.lower()!r}; live keys are "
                "accepted only with ENVIRONMENT=production",
            )
        )
    database_url = _raw(data, "database_url")
    supabase_url = _raw(data, "supabase_url")
    if database_url is None and supabase_url is None:
        problems.append(
            (
                "database_url",
                "is required but not set (or set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY to "
                "reach the database through PostgREST)",
            )
        )
    elif database_url is None and _raw(data, "supabase_service_role_key") is None:
        problems.append(
            (
                "supabase_service_role_key",
                "is required when DATABASE_URL is not set (the RPCs then go through PostgREST)",
            )
        )
    if _raw(data, "supabase_jwt_secret") is None and supabase_url is None:
        problems.append(
            (
                "supabase_jwt_secret",
                "is required but not set (or set SUPABASE_URL: its JWKS then verifies user tokens)",
            )
        )
    webhook_url = _raw(data, "notification_webhook_url")
    if webhook_url is not None and _raw(data, "notification_webhook_secret") is None:
        problems.append(
            (
                "notification_webhook_secret",
                "is required with NOTIFICATION_WEBHOOK_URL (the host verifies each delivery)",
            )
        )
    if (
        webhook_url is not None
        and not webhook_url.lower().startswith("https://")
        and environment.lower() == "production"
    ):
        problems.append(
            ("notification_webhook_url", "must be an https:// URL with ENVIRONMENT=production")
        )
    low, high = _raw_int(data, "db_pool_min_size", 1), _raw_int(data, "db_pool_max_size", 10)
    if low is not None and high is not None and low > high:
        problems.append(("db_pool_min_size", f"must not exceed DB_POOL_MAX_SIZE ({high})"))
    streams = _raw_int(data, "balance_streams_max", 500)
    connections = _raw_int(data, "http_max_connections", 1000)
    if streams is not None and connections is not None and streams >= connections:
        problems.append(
            ("balance_streams_max", f"must be below HTTP_MAX_CONNECTIONS ({connections})")
        )
    return problems


class ConfigError(RuntimeError):
    """The environment does not make valid settings; one line per variable, each named once."""

    def __init__(self, problems: Sequence[tuple[str, str]] | str) -> None:
        self.problems = [("", problems)] if isinstance(problems, str) else list(problems)
        lines = [f"{name} {problem}".strip() for name, problem in self.problems]
        if len(lines) == 1:
            text = f"invalid settings: {lines[0]}"
        else:
            text = f"invalid settings ({len(lines)} problems):\n" + "\n".join(
                f"  {line}" for line in lines
            )
        super().__init__(text)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment and `.env`, or a ConfigError naming every bad variable."""
    return Settings(**overrides)  # type: ignore[arg-type]
