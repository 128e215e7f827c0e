"""Settings: secrets required and real, live Stripe keys only in production, .env honoured."""

from __future__ import annotations

from pathlib import Path

import pytest

from token_billing.server.settings import ConfigError, Settings, is_placeholder, load_settings

# Every variable the service reads; cleared so the developer's environment cannot leak in.
VARIABLES = (
    "ENVIRONMENT",
    "DATABASE_URL",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_JWT_SECRET",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_API_BASE",
    "APP_URL",
    "CORS_ORIGINS",
    "METRICS_PORT",
    "METRICS_TOKEN",
    "DB_POOL_MIN_SIZE",
    "DB_POOL_MAX_SIZE",
)

LIVE_KEY = "sk_live_51AbCdEfGhIjKl"  # a test value, not a key
ROTATING = "whsec_new0123456789, whsec_old0123456789"  # test values

VALID = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "SUPABASE_JWT_SECRET": "a-real-looking-jwt-secret-of-32-characters",
    "STRIPE_SECRET_KEY": "sk_test_51AbCdEfGhIjKlMnOp",
    "STRIPE_WEBHOOK_SECRET": "whsec_0123456789abcdef",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def set_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in {**VALID, **values}.items():
        monkeypatch.setenv(name, value)


def test_valid_environment_should_load(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    settings = load_settings()
    assert settings.environment == "production", "an unset ENVIRONMENT should be production"
    assert not settings.dev_routes
    assert settings.cors_origins == []
    assert settings.metrics_port is None
    assert settings.webhook_secrets == ["whsec_0123456789abcdef"]
    assert settings.stripe_api_base_url == "https://api.stripe.com"
    assert settings.webhook_max_body_bytes == 1024 * 1024


@pytest.mark.parametrize("variable", ["STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"])
def test_missing_secret_should_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    set_env(monkeypatch)
    monkeypatch.delenv(variable)
    with pytest.raises(ConfigError, match=f"{variable} is required but not set"):
        load_settings()


def test_missing_database_should_say_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    monkeypatch.delenv("DATABASE_URL")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        "invalid settings: DATABASE_URL is required but not set (or set SUPABASE_URL and "
        "SUPABASE_SERVICE_ROLE_KEY to reach the database through PostgREST)"
    )


def test_supabase_url_and_service_key_should_replace_the_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_env(
        monkeypatch,
        SUPABASE_URL="https://abcd.supabase.co/",
        SUPABASE_SERVICE_ROLE_KEY="sb_secret_abcdefghijklmnop",
    )
    monkeypatch.delenv("DATABASE_URL")
    settings = load_settings()
    assert settings.database_url is None
    assert settings.jwt_issuer == "https://abcd.supabase.co/auth/v1"
    assert settings.jwks_url == "https://abcd.supabase.co/auth/v1/.well-known/jwks.json"


def test_no_way_to_verify_tokens_should_be_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    monkeypatch.delenv("SUPABASE_JWT_SECRET")
    with pytest.raises(ConfigError, match="SUPABASE_JWT_SECRET"):
        load_settings()


@pytest.mark.parametrize("environment", ["development", "test"])
def test_live_key_outside_production_should_be_refused(
    monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    set_env(monkeypatch, STRIPE_SECRET_KEY=LIVE_KEY, ENVIRONMENT=environment)
    with pytest.raises(ConfigError, match="live key") as caught:
        load_settings()
    assert LIVE_KEY not in str(caught.value), "the secret should never be echoed"


def test_live_key_in_production_should_be_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, STRIPE_SECRET_KEY=LIVE_KEY, ENVIRONMENT="production")
    assert load_settings().environment == "production"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STRIPE_SECRET_KEY", "sk_test_..."),
        ("STRIPE_SECRET_KEY", "changeme"),
        ("STRIPE_SECRET_KEY", ""),
        ("STRIPE_SECRET_KEY", "pk_test_51AbCdEf"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_..."),
        ("STRIPE_WEBHOOK_SECRET", "whsec_"),
        ("STRIPE_WEBHOOK_SECRET", "not-a-whsec"),
        ("SUPABASE_JWT_SECRET", "<your jwt secret>"),
        ("SUPABASE_JWT_SECRET", "changeme"),
    ],
)
def test_placeholder_should_be_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    set_env(monkeypatch, **{variable: value})
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_several_webhook_secrets_should_be_accepted_for_rotation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_env(monkeypatch, STRIPE_WEBHOOK_SECRET=ROTATING)
    assert load_settings().webhook_secrets == ["whsec_new0123456789", "whsec_old0123456789"]


def test_dotenv_file_should_be_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "".join(f"{name}={value}\n" for name, value in VALID.items()) + "APP_URL=https://app.test\n"
    )
    settings = load_settings()
    assert settings.app_link("/billing") == "https://app.test/billing"
    assert settings.stripe_secret_key.get_secret_value() == VALID["STRIPE_SECRET_KEY"]


def test_secrets_should_not_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    text = repr(Settings())  # type: ignore[call-arg]
    for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "SUPABASE_JWT_SECRET"):
        assert VALID[name] not in text


@pytest.mark.parametrize("value", ["", "  ", "sk_test_...", "<key>", "your-key", "xxxx-xxxx"])
def test_is_placeholder_should_spot_templates(value: str) -> None:
    assert is_placeholder(value)


@pytest.mark.parametrize("value", ["sk_test_51AbCdEf", "whsec_0123456789abcdef"])
def test_is_placeholder_should_accept_real_looking_values(value: str) -> None:
    assert not is_placeholder(value)


ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def test_env_example_should_document_every_setting() -> None:
    documented = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert documented == {name.upper() for name in Settings.model_fields}


def test_env_example_filled_in_should_load(tmp_path: Path) -> None:
    text = ENV_EXAMPLE.read_text()
    text = text.replace("STRIPE_SECRET_KEY=\n", f"STRIPE_SECRET_KEY={VALID['STRIPE_SECRET_KEY']}\n")
    text = text.replace(
        "STRIPE_WEBHOOK_SECRET=\n", f"STRIPE_WEBHOOK_SECRET={VALID['STRIPE_WEBHOOK_SECRET']}\n"
    )
    text = text.replace(
        "SUPABASE_JWT_SECRET=\n", f"SUPABASE_JWT_SECRET={VALID['SUPABASE_JWT_SECRET']}\n"
    )
    (tmp_path / ".env").write_text(text)
    settings = load_settings()
    assert settings.supabase_url is None, "an empty value should mean unset"
    assert (
        settings.app_link(settings.checkout_cancel_path) == "http://localhost:3000/billing/cancel"
    )


def test_env_example_as_is_should_name_the_missing_secrets(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text())
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "STRIPE_SECRET_KEY is required" in str(caught.value)
    assert "STRIPE_WEBHOOK_SECRET is required" in str(caught.value)


# --- the whole configuration at once ----------------------------------------------------------


def test_an_empty_environment_should_name_every_missing_variable_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    assert str(caught.value) == (
        "invalid settings (4 problems):\n"
        "  DATABASE_URL is required but not set (or set SUPABASE_URL and "
        "SUPABASE_SERVICE_ROLE_KEY to reach the database through PostgREST)\n"
        "  SUPABASE_JWT_SECRET is required but not set (or set SUPABASE_URL: its JWKS then "
        "verifies user tokens)\n"
        "  STRIPE_SECRET_KEY is required but not set\n"
        "  STRIPE_WEBHOOK_SECRET is required but not set"
    )
    assert [name for name, _ in caught.value.problems] == [
        "DATABASE_URL",
        "SUPABASE_JWT_SECRET",
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRET",
    ]


def test_every_bad_variable_should_be_reported_in_one_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = {
        "ENVIRONMENT": "staging",
        "DATABASE_URL": "notaurl",
        "STRIPE_SECRET_KEY": "sk_test_...",
        "STRIPE_WEBHOOK_SECRET": "not-a-whsec",
        "CORS_ORIGINS": "http://localhost:3000, *",
        "DB_POOL_MAX_SIZE": "many",
        "METRICS_TOKEN": "short",
    }
    set_env(monkeypatch, **bad)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        "invalid settings (7 problems):\n"
        "  ENVIRONMENT is invalid: input should be 'development', 'test' or 'production'\n"
        "  DATABASE_URL is not a Postgres connection URL; write it as "
        "postgresql://USER:PASSWORD@HOST:5432/DBNAME\n"
        "  STRIPE_SECRET_KEY is empty or a placeholder; set the real value\n"
        "  STRIPE_WEBHOOK_SECRET must start with whsec_ (the endpoint's signing secret)\n"
        "  DB_POOL_MAX_SIZE is invalid: input should be a valid integer, unable to parse "
        "string as an integer\n"
        "  CORS_ORIGINS must list the origins themselves: '*' would let every site call the "
        "API\n"
        "  METRICS_TOKEN must be at least 16 characters (e.g. `openssl rand -hex 24`)"
    )


def test_a_placeholder_should_name_its_variable_once(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, **{"STRIPE_SECRET_KEY": "sk_test_..."})
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        "invalid settings: STRIPE_SECRET_KEY is empty or a placeholder; set the real value"
    )


@pytest.mark.parametrize(
    "url",
    [
        "notaurl",
        "http://db.example.com/postgres",
        "postgresql://postgres@db.example.com:notaport/postgres",
        "postgresql://postgres@db.example.com:99999/postgres",
    ],
)
def test_database_url_should_be_parsed(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    set_env(monkeypatch, DATABASE_URL=url)
    with pytest.raises(ConfigError, match=r"^invalid settings: DATABASE_URL ") as caught:
        load_settings()
    assert "postgresql://USER:PASSWORD@HOST:5432/DBNAME" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:pw@db.example.supabase.co:5432/postgres?sslmode=require",
        "postgres://postgres@127.0.0.1/postgres",
        "host=127.0.0.1 port=5432 dbname=postgres user=postgres",
    ],
)
def test_database_url_should_accept_libpq_forms(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    set_env(monkeypatch, DATABASE_URL=url)
    assert load_settings().database_url is not None


def test_a_password_in_a_bad_database_url_should_never_be_echoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_env(monkeypatch, DATABASE_URL="postgresql://u:hunter2secret@h:port/db")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "hunter2secret" not in str(caught.value)


def test_a_combination_problem_should_be_found_beside_field_problems(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The checks across fields run even when a field is invalid (the next try finds nothing
    new)."""
    set_env(monkeypatch, **{"STRIPE_WEBHOOK_SECRET": "whsec_...", "DB_POOL_MIN_SIZE": "20"})
    monkeypatch.delenv("SUPABASE_JWT_SECRET")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert [name for name, _ in caught.value.problems] == [
        "SUPABASE_JWT_SECRET",
        "STRIPE_WEBHOOK_SECRET",
        "DB_POOL_MIN_SIZE",
    ]
    assert "DB_POOL_MIN_SIZE must not exceed DB_POOL_MAX_SIZE (10)" in str(caught.value)


def test_cors_origins_should_be_a_normalized_list(monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, CORS_ORIGINS="http://localhost:3000, https://App.Example.com/")
    assert load_settings().cors_origins == ["http://localhost:3000", "https://app.example.com"]


@pytest.mark.parametrize(
    ("environment", "key", "served"),
    [
        ("development", "sk_test_51AbCdEfGhIjKlMnOp", True),
        ("development", "rk_test_51AbCdEfGhIjKlMnOp", True),
        ("test", "sk_test_51AbCdEfGhIjKlMnOp", False),
        ("production", "sk_test_51AbCdEfGhIjKlMnOp", False),
        ("production", LIVE_KEY, False),
        (None, "sk_test_51AbCdEfGhIjKlMnOp", False),
    ],
)
def test_dev_routes_should_need_explicit_development_and_a_test_key(
    monkeypatch: pytest.MonkeyPatch, environment: str | None, key: str, served: bool
) -> None:
    set_env(monkeypatch, STRIPE_SECRET_KEY=key)
    if environment is not None:
        monkeypatch.setenv("ENVIRONMENT", environment)
    assert load_settings().dev_routes is served


DEPLOYMENT = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


def _default_text(name: str) -> str:
    from pydantic_core import PydanticUndefined

    default = Settings.model_fields[name].default
    if default is PydanticUndefined:
        return "**required**"
    if default is None:
        return "unset"
    if isinstance(default, list):
        return "empty" if not default else ",".join(default)
    return f"`{default}`"


def test_the_deployment_page_should_list_every_setting_with_its_default() -> None:
    rows = {
        line.split("`")[1]: [cell.strip() for cell in line.split("|")[1:-1]]
        for line in DEPLOYMENT.read_text().splitlines()
        if line.startswith("| `") and line.split("`")[1].isupper()
    }
    names = {name.upper(): name for name in Settings.model_fields}
    documented = {name for name in rows if name in names}
    assert documented == set(names), "docs/deployment.md should have a row per setting"
    wrong = {
        name: (rows[name][1], _default_text(field))
        for name, field in names.items()
        if rows[name][1] != _default_text(field)
    }
    assert wrong == {}, "each row should show the setting's real default"
    assert all(rows[name][2] for name in names), "each row should say what the setting does"
