"""The Database the settings name (PostgresDatabase on DATABASE_URL, else SupabaseDatabase), and
the startup wait for it."""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
from psycopg.conninfo import conninfo_to_dict

from token_billing.db import Database, PostgresDatabase, SupabaseDatabase
from token_billing.errors import DatabaseError, DatabaseUnavailable
from token_billing.server.settings import Settings

logger = logging.getLogger("token_billing.server")


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


class StartupError(RuntimeError):
    """The service cannot start; the message says why and what to check."""


def describe(settings: Settings) -> str:
    """Where the database is, without credentials: `postgres host:port/db` or `postgrest URL`."""
    if settings.database_url is not None:
        parts = conninfo_to_dict(settings.database_url.get_secret_value())
        host = parts.get("host") or "localhost"
        return f"postgres {host}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"
    return f"postgrest {settings.supabase_base}/rest/v1"


async def _probe(settings: Settings, db: Database) -> None:
    """One attempt to reach the database; raises with the driver's reason."""
    if settings.database_url is None:
        await db.ping()
        return
    # A connection of its own: the pool retries in the background and says only that it timed
    # out, while this says why (refused, no such database, password rejected).
    conn = await psycopg.AsyncConnection.connect(
        settings.database_url.get_secret_value(),
        connect_timeout=settings.db_connect_timeout_seconds,
        application_name="token-billing-startup",
    )
    await conn.close()


async def wait_until_reachable(settings: Settings, db: Database) -> float:
    """Wait for the database at most DB_STARTUP_TIMEOUT_SECONDS; the seconds it took, or a
    StartupError saying what failed last (a service that starts without its database would
    answer 503 to everything while looking alive)."""
    started = time.monotonic()
    deadline = started + settings.db_startup_timeout_seconds
    delay = 0.25
    while True:
        try:
            await _probe(settings, db)
            return time.monotonic() - started
        except (psycopg.Error, DatabaseUnavailable, DatabaseError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupError(
                    f"the database ({describe(settings)}) could not be reached for "
                    f"{settings.db_startup_timeout_seconds:g} s (DB_STARTUP_TIMEOUT_SECONDS): "
                    f"{reason}"
                ) from None
            logger.warning(
                "waiting for the database",
                extra={"fields": {"database": describe(settings), "error": reason}},
            )
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
