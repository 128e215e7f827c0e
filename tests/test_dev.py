"""`make dev`'s settings: generated local secrets, or the developer's real Stripe test keys.

The whole stack (start, page, --stop) runs in tests/test_browser.py; these are the choices it
makes about settings, which that test cannot vary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.dev import Layout, banner, dev_settings, read_env_file, write_env_file
from scripts.pgcluster import Database, PgCluster
from token_billing.server.settings import load_settings

REAL_TEST_KEY = "sk_test_51Hdeveloper0wnKey9876543210"
REAL_HOOK = "whsec_fromStripeListen0123456789abcdef"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


@pytest.fixture
def cluster(tmp_path: Path) -> PgCluster:
    return PgCluster(
        datadir=tmp_path / "pgdata", port=55555, socket_dir=tmp_path, bindir=Path("/nowhere")
    )


def test_without_keys_dev_should_generate_settings_the_service_accepts(
    layout: Layout, cluster: PgCluster
) -> None:
    values, real = dev_settings(layout, cluster, 8123, {"LOG_LEVEL": "DEBUG"})
    assert not real
    assert values["STRIPE_SECRET_KEY"].startswith("sk_test_tbdev_")
    assert values["STRIPE_WEBHOOK_SECRET"].startswith("whsec_dev_")
    assert values["APP_URL"] == "http://localhost:8123"
    assert values["DATABASE_URL"].endswith("@127.0.0.1:55555/postgres")
    assert values["LOG_LEVEL"] == "DEBUG", "other settings of the developer should carry over"
    write_env_file(layout.env_file, values)
    settings = load_settings(_env_file=layout.env_file)
    assert settings.environment == "development"
    assert settings.supabase_jwt_secret is not None
    assert (
        settings.app_link(settings.checkout_cancel_path) == "http://localhost:8123/?checkout=cancel"
    )


def test_generated_secrets_should_survive_a_restart(layout: Layout, cluster: PgCluster) -> None:
    first, _ = dev_settings(layout, cluster, 8000, {})
    write_env_file(layout.env_file, first)
    second, _ = dev_settings(layout, cluster, 8000, {})
    for name in ("SUPABASE_JWT_SECRET", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"):
        assert second[name] == first[name], f"{name} should be kept, so open pages stay valid"
    assert layout.env_file.stat().st_mode & 0o777 == 0o600


def test_real_test_keys_should_be_used_and_print_the_stripe_listen_line(
    layout: Layout, cluster: PgCluster
) -> None:
    user = {
        "STRIPE_SECRET_KEY": REAL_TEST_KEY,
        "STRIPE_WEBHOOK_SECRET": REAL_HOOK,
        # make dev serves its own database and never a remote project's:
        "DATABASE_URL": "postgresql://postgres:pw@db.example.supabase.co:5432/postgres",
        "SUPABASE_URL": "https://example.supabase.co",
        "ENVIRONMENT": "production",
    }
    values, real = dev_settings(layout, cluster, 8000, user)
    assert real
    assert values["STRIPE_SECRET_KEY"] == REAL_TEST_KEY
    assert values["STRIPE_WEBHOOK_SECRET"] == REAL_HOOK
    assert values["ENVIRONMENT"] == "development"
    assert "supabase.co" not in values["DATABASE_URL"]
    assert "SUPABASE_URL" not in values
    text = banner(
        Database(cluster, "postgres"),
        layout,
        "http://localhost:8000",
        real_keys=True,
        purchase=None,
    )
    assert "stripe listen --forward-to localhost:8000/v1/webhooks/stripe" in text


@pytest.mark.parametrize(
    "key", ["sk_live_51Hsomebody0123456789", "sk_test_...", "changeme", "rk_live_x123456789"]
)
def test_live_or_placeholder_keys_should_never_reach_the_dev_service(
    layout: Layout, cluster: PgCluster, key: str
) -> None:
    values, real = dev_settings(layout, cluster, 8000, {"STRIPE_SECRET_KEY": key})
    assert not real
    assert values["STRIPE_SECRET_KEY"].startswith("sk_test_tbdev_")


def test_env_files_should_read_the_way_dotenv_writes_them(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(
        "# comment\n\nexport STRIPE_SECRET_KEY='sk_test_quoted123'\n"
        'stripe_webhook_secret="whsec_double"\nAPP_URL=http://x:1/?a=b\nbroken line\n'
    )
    assert read_env_file(path) == {
        "STRIPE_SECRET_KEY": "sk_test_quoted123",
        "STRIPE_WEBHOOK_SECRET": "whsec_double",
        "APP_URL": "http://x:1/?a=b",
    }
