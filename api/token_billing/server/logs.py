"""Structured logs: one JSON object per line on stderr.

A log call passes its fields as `extra={"fields": {...}}`. Nothing here formats secrets: callers
log ids (user, event, Stripe object), never keys, tokens or request bodies.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_CONFIGURED = "_token_billing_json"

# Where a request keeps the fields of its one access log line (the ASGI scope, so the routes and
# the middleware share them without a context variable).
LOG_SCOPE_KEY = "token_billing.log"


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure_logging(level: str = "INFO") -> None:
    """Send the `api` loggers to stderr as JSON lines (idempotent)."""
    logger = logging.getLogger("token_billing")
    logger.setLevel(level)
    if not any(getattr(h, _CONFIGURED, False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        setattr(handler, _CONFIGURED, True)
        logger.addHandler(handler)
        logger.propagate = False
