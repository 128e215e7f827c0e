"""The Database the settings name: PostgresDatabase on DATABASE_URL, else SupabaseDatabase."""

from __future__ import annotations

from token_billing.db import Database, PostgresDatabase, SupabaseDatabase
from token_billing.server.settings import Settings


def postgres_database(settings: Settings) -> PostgresDatabase:
    """The psycopg pool of DATABASE_URL, sized and timed as the settings say."""
    if settings.database_url is None:
        raise ValueError("DATABASE_URL is not set")
    return PostgresDatabase(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        timeout_seconds=settings.db_pool_timeout_seconds,
        connect_timeout_seconds=settings.db_connect_timeout_seconds,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )


def supabase_database(settings: Settings) -> SupabaseDatabase:
    """PostgREST at SUPABASE_URL with the service role key."""
    if settings.supabase_base is None or settings.supabase_service_role_key is None:
        raise ValueError("SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are not set")
    return SupabaseDatabase(
        settings.supabase_base,
        settings.supabase_service_role_key.get_secret_value(),
        timeout_seconds=settings.db_statement_timeout_ms / 1000 + 5,
    )


def database_from_settings(settings: Settings) -> Database:
    """PostgresDatabase when DATABASE_URL is set, else SupabaseDatabase."""
    if settings.database_url is not None:
        return postgres_database(settings)
    return supabase_database(settings)
