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
    assert settings.environment == "development"
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
    with pytest.raises(ConfigError, match="set DATABASE_URL, or both SUPABASE_URL and"):
        load_settings()


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
