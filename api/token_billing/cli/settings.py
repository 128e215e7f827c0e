"""The service's settings, as a command reads them; the server extra they need, checked first.

Commands that run or call the service (`serve`, `stripe ...`) read the same settings as the
service, which live in the server extra. Without it they stop with one line that says what to
install, instead of an ImportError's traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from token_billing.server.settings import Settings

# What `pip install 'token-billing[server]'` adds to the core install, by import name.
SERVER_EXTRA_MODULES = (
    "starlette",
    "uvicorn",
    "h11",
    "pydantic_settings",
    "stripe",
    "jwt",
    "prometheus_client",
    "httpx",
    "supabase",
)


def missing_server_module() -> str | None:
    """The first module of the server extra that is not installed, or None."""
    return next((m for m in SERVER_EXTRA_MODULES if importlib.util.find_spec(m) is None), None)


def server_settings(command: str, env_file: Path | None = None) -> Settings | None:
    """The settings from the environment and `.env` (or `env_file`); None, once what is wrong
    has been printed on stderr, when the server extra is missing or the settings are invalid."""
    missing = missing_server_module()
    if missing is not None:
        print(
            f"token-billing {command}: needs the server extra (no module named {missing!r}): "
            "pip install 'token-billing[server]'",
            file=sys.stderr,
        )
        return None
    from token_billing.server.settings import ConfigError, load_settings

    try:
        if env_file is not None:
            if not env_file.is_file():
                raise ConfigError(f"--env-file {env_file} does not exist")
            return load_settings(_env_file=env_file)
        return load_settings()
    except ConfigError as exc:
        print(f"token-billing: {exc}", file=sys.stderr)
        return None
